//! What a scan of one tree produces: one [`Entry`] per file system object, with the metadata
//! the mirror must reproduce. Plain data, no I/O; it travels between controller and agents.

use serde::{Deserialize, Serialize};

/// A SHA-256 digest of a file's content.
pub type Digest = [u8; 32];

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
}

impl Kind {
    pub fn describe(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
        }
    }
}

/// Owner, group, mode and mtime: what `chown`, `chmod` and `utimensat` set.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Owner and group names on the scanning host; `None` when the id has no name there.
    pub user: Option<String>,
    pub group: Option<String>,
    pub mtime: i64,
    pub mtime_nsec: u32,
}

impl Meta {
    /// Owner equality as the mirror sees it: by name when both sides have one, else by number.
    pub fn same_owner(&self, other: &Meta) -> bool {
        let user = match (&self.user, &other.user) {
            (Some(a), Some(b)) => a == b,
            _ => self.uid == other.uid,
        };
        let group = match (&self.group, &other.group) {
            (Some(a), Some(b)) => a == b,
            _ => self.gid == other.gid,
        };
        user && group
    }

    pub fn same_mtime(&self, other: &Meta) -> bool {
        self.mtime == other.mtime && self.mtime_nsec == other.mtime_nsec
    }
}

/// Of a regular file's `mode`, the bits that make it run as root: setuid with owner root,
/// setgid with group root. A mirror drops them unless asked to keep them, so a compromised
/// source cannot plant a root program on the new host.
pub fn root_setuid_bits(mode: u32, uid: u32, gid: u32) -> u32 {
    let setuid = if uid == 0 { mode & 0o4000 } else { 0 };
    let setgid = if gid == 0 { mode & 0o2000 } else { 0 };
    setuid | setgid
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Entry {
    /// Path relative to the tree's root, as raw bytes; the root itself is empty.
    pub path: Vec<u8>,
    pub kind: Kind,
    pub size: u64,
    pub meta: Meta,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
    /// Symlink target, raw bytes.
    pub target: Option<Vec<u8>>,
    /// Content hash, present when it was asked for (`--checksum`, rename candidates).
    pub hash: Option<Digest>,
}

impl Entry {
    /// True for a regular file with other names in the same tree.
    pub fn is_hardlinked(&self) -> bool {
        self.kind == Kind::File && self.nlink > 1
    }

    pub fn inode(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }
}

/// An entry that is not mirrored, with the reason shown to the user.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub path: Vec<u8>,
    pub reason: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Manifest {
    /// False when the root does not exist (a missing SRC, a DEST not created yet).
    pub root_exists: bool,
    /// Entries in walk order: a directory always comes before its contents. The root, when
    /// it exists, is the first entry.
    pub entries: Vec<Entry>,
    /// Sockets and device files, which are not mirrored.
    pub skipped: Vec<Skipped>,
    /// Temporary files a crashed receiver left behind; the next receive removes them.
    pub leftovers: Vec<Vec<u8>>,
}

/// Renders a raw path for people: lossy UTF-8, with control characters escaped.
pub fn display_path(path: &[u8]) -> String {
    if path.is_empty() {
        return ".".to_string();
    }
    String::from_utf8_lossy(path).escape_debug().to_string()
}

/// Prefix of the temporary names a receiver writes next to their final place.
pub const TEMP_PREFIX: &[u8] = b".relaymove-tmp.";
