//! Helpers shared by the integration tests: run the binary, build trees, compare trees
//! entry by entry the way a user would check a mirror.
#![allow(dead_code)]

pub mod knot;
pub mod maildir;

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_relaymove"))
}

/// Runs `relaymove ARGS…` with a private hash cache directory and no progress output.
pub fn relaymove(args: &[&OsStr], cache: &Path) -> Output {
    Command::new(bin())
        .args(args)
        .env("RELAYMOVE_CACHE_DIR", cache)
        .output()
        .expect("running relaymove")
}

pub fn sync_json(src: &Path, dest: &Path, extra: &[&str], cache: &Path) -> serde_json::Value {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("sync"),
        OsStr::new("--json"),
        OsStr::new("--no-progress"),
    ];
    args.extend(extra.iter().map(OsStr::new));
    args.push(src.as_os_str());
    args.push(dest.as_os_str());
    let out = relaymove(&args, cache);
    assert!(
        out.status.success(),
        "sync failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report on stdout")
}

#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Seen {
    pub kind: &'static str,
    pub sha256: Option<String>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    pub target: Option<Vec<u8>>,
    /// For hard-linked files: the first path (in sorted order) naming the same inode.
    pub link_group: Option<Vec<u8>>,
}

/// Every entry under `root` (the root itself as ""), never following symlinks.
pub fn snapshot(root: &Path) -> BTreeMap<Vec<u8>, Seen> {
    let mut out = BTreeMap::new();
    let mut first_name: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e.expect("walking");
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let md = e.path().symlink_metadata().unwrap();
        let ft = md.file_type();
        let kind = if ft.is_file() {
            "file"
        } else if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else {
            "other"
        };
        let sha256 = ft.is_file().then(|| {
            let bytes = std::fs::read(e.path()).unwrap();
            Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        });
        let target = ft.is_symlink().then(|| {
            std::fs::read_link(e.path())
                .unwrap()
                .as_os_str()
                .as_bytes()
                .to_vec()
        });
        let link_group = (ft.is_file() && md.nlink() > 1).then(|| {
            first_name
                .entry((md.dev(), md.ino()))
                .or_insert_with(|| rel.clone())
                .clone()
        });
        out.insert(
            rel,
            Seen {
                kind,
                sha256,
                mode: if ft.is_symlink() {
                    0
                } else {
                    md.mode() & 0o7777
                },
                uid: md.uid(),
                gid: md.gid(),
                mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
                target,
                link_group,
            },
        );
    }
    out
}

/// Asserts DEST mirrors SRC entry by entry (sockets in SRC are expected to be absent).
pub fn assert_mirror(src: &Path, dest: &Path) {
    let mut a = snapshot(src);
    a.retain(|_, s| s.kind != "socket");
    let b = snapshot(dest);
    let show = |p: &[u8]| String::from_utf8_lossy(p).escape_debug().to_string();
    for (path, seen) in &a {
        match b.get(path) {
            None => panic!("{} missing from DEST", show(path)),
            Some(other) => assert_eq!(
                seen,
                other,
                "entry {} differs (left SRC, right DEST)",
                show(path)
            ),
        }
    }
    for path in b.keys() {
        assert!(
            a.contains_key(path),
            "{} in DEST but not in SRC",
            show(path)
        );
    }
}

pub fn p(root: &Path, rel: &[u8]) -> PathBuf {
    root.join(OsStr::from_bytes(rel))
}

/// Sets an entry's mtime (not following symlinks) to `sec.nsec`.
pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(sec, nsec);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

pub fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}
