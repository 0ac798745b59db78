//! The receiving side: carries out a [`Plan`] in DEST and writes the stream's members.
//!
//! Every file is written under a temporary name next to its final place, its SHA-256
//! compared with the stream's, its owner, mode and mtime set, and only then renamed into
//! place. A broken stream therefore leaves each path with either its old or its new content.
//! Members the plan did not ask for are refused, whatever the stream says.
//!
//! Durability: by default one `syncfs` before returning success (measured: per-file `fsync`
//! costs more than the whole transfer on many small files; see the README). After a crash
//! before that point, a renamed file may be empty on disk; its size then differs from SRC and
//! the next run sends it again. `RELAYMOVE_DURABILITY=fsync` syncs each file before rename.

use crate::sync::beneath::{remove_at, validate, Tree};
use crate::sync::compress::LevelsTaken;
use crate::sync::hash_cache::{HashCache, Stamp};
use crate::sync::manifest::{
    display_path, root_setuid_bits, Digest, Kind, Meta, RelPath, Skipped, TEMP_PREFIX,
};
use crate::sync::plan::{ancestors, Plan, ReuseMode, SendItem};
use crate::sync::scan::hash_reader;
use crate::sync::stream::{MemberKind, MemberReader, MAX_PAX_HEADER};
use anyhow::{anyhow, bail, Context, Result};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use nix::errno::Errno;
use nix::fcntl::{openat, renameat2, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{fchmod, fstatat, futimens, utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, Gid, Group, Uid, User};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// One `syncfs` of DEST's file system at the end.
    Syncfs,
    /// `fsync` of every file before its rename, and of every touched directory.
    Fsync,
}

impl Durability {
    pub fn from_env() -> Durability {
        match std::env::var("RELAYMOVE_DURABILITY").as_deref() {
            Ok("fsync") => Durability::Fsync,
            _ => Durability::Syncfs,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Default, Clone)]
pub struct ReceiveStats {
    pub files_written: u64,
    pub bytes_written: u64,
    pub wire_bytes: u64,
    /// True when every file written had its SHA-256 checked against the sender's.
    pub verified: bool,
    /// Paths the sender reported gone from the live source after the scan.
    pub vanished: Vec<Skipped>,
    pub warnings: Vec<String>,
    /// Uncompressed bytes the sender took at each zstd level of an adaptive stream (from
    /// the sender's reply, set by the controller).
    #[serde(default)]
    pub zstd_levels: LevelsTaken,
    /// Seconds spent making DEST durable.
    pub sync_s: f64,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy)]
pub struct ReceiveProgress {
    pub files: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
}

/// Maps owner names to this host's ids; an unknown name keeps the sender's number.
#[derive(Default)]
struct Owners {
    /// Keep setuid/setgid on root-owned files; else they are dropped here, whatever the
    /// stream's headers say (the controller plans without them too).
    keep_setuid: bool,
    users: HashMap<String, Option<u32>>,
    groups: HashMap<String, Option<u32>>,
    warned: HashSet<String>,
    warnings: Vec<String>,
    is_root: bool,
    chown_failed: bool,
}

/// This host's id for `name` (looked up once), else the sender's number, reported once.
fn local_id(
    known: &mut HashMap<String, Option<u32>>,
    name: Option<&str>,
    sender_id: u32,
    kind: &str,
    resolve: impl FnOnce(&str) -> Option<u32>,
    warned: &mut HashSet<String>,
    warnings: &mut Vec<String>,
) -> u32 {
    let Some(name) = name else {
        return sender_id;
    };
    let found = match known.get(name) {
        Some(found) => *found,
        None => {
            let found = resolve(name);
            known.insert(name.to_string(), found);
            found
        }
    };
    found.unwrap_or_else(|| {
        if warned.insert(format!("{kind}:{name}")) {
            warnings.push(format!(
                "{kind} {name:?} does not exist on this host; kept numeric id {sender_id}"
            ));
        }
        sender_id
    })
}

impl Owners {
    fn ids(&mut self, meta: &Meta) -> (u32, u32) {
        let uid = local_id(
            &mut self.users,
            meta.user.as_deref(),
            meta.uid,
            "user",
            |n| User::from_name(n).ok().flatten().map(|u| u.uid.as_raw()),
            &mut self.warned,
            &mut self.warnings,
        );
        let gid = local_id(
            &mut self.groups,
            meta.group.as_deref(),
            meta.gid,
            "group",
            |n| Group::from_name(n).ok().flatten().map(|g| g.gid.as_raw()),
            &mut self.warned,
            &mut self.warnings,
        );
        (uid, gid)
    }

    /// Records a failed chown once for an unprivileged receiver instead of failing the sync.
    fn chown_result(&mut self, r: nix::Result<()>, what: &str) -> Result<()> {
        match r {
            Ok(()) => Ok(()),
            Err(Errno::EPERM) if !self.is_root => {
                if !self.chown_failed {
                    self.chown_failed = true;
                    self.warnings
                        .push("not running as root: owners could not be set".to_string());
                }
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("setting the owner of {what}")),
        }
    }
}

fn mtime_spec(meta: &Meta) -> [TimeSpec; 2] {
    [
        TimeSpec::UTIME_OMIT,
        TimeSpec::new(meta.mtime, i64::from(meta.mtime_nsec)),
    ]
}

/// Owner, mode and mtime on an open file or directory; chown first, as it clears setuid and
/// setgid. `created_by` is set for a file this run just created, as (uid, gid), with
/// `meta.mode & 0o777` under a zero umask: then chown only when the owner differs, and chmod
/// only for setuid, setgid and sticky. Anything else is read back first and only what differs
/// is set: each call dirties the inode for the journal, and a Maildir rename needs none of
/// the three, a directory whose entries changed only its mtime.
fn apply_meta_fd(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    created_by: Option<(u32, u32)>,
    owners: &mut Owners,
    what: &str,
) -> Result<()> {
    let (uid, gid) = owners.ids(meta);
    let now = match created_by {
        Some(_) => None,
        None => Some(
            nix::sys::stat::fstat(fd).with_context(|| format!("reading the metadata of {what}"))?,
        ),
    };
    let owned = match &now {
        Some(st) => (st.st_uid, st.st_gid) == (uid, gid),
        None => created_by == Some((uid, gid)),
    };
    if !owned {
        let r = fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
        owners.chown_result(r, what)?;
    }
    let mut mode = meta.mode;
    let root_bits = root_setuid_bits(mode, uid, gid);
    if !owners.keep_setuid && root_bits != 0 {
        let st_mode = match &now {
            Some(st) => st.st_mode,
            None => {
                nix::sys::stat::fstat(fd)
                    .with_context(|| format!("reading the type of {what}"))?
                    .st_mode
            }
        };
        if st_mode & libc::S_IFMT == libc::S_IFREG {
            mode &= !root_bits;
        }
    }
    // A chown above may have cleared setuid and setgid: the mode read before it is stale.
    let mode_set = match &now {
        Some(st) => owned && st.st_mode & 0o7777 == mode,
        None => mode & 0o7000 == 0,
    };
    if !mode_set {
        fchmod(fd, Mode::from_bits_truncate(mode))
            .with_context(|| format!("setting the mode of {what}"))?;
    }
    let mtime_set = now.is_some_and(|st| {
        st.st_mtime == meta.mtime && st.st_mtime_nsec == i64::from(meta.mtime_nsec)
    });
    if !mtime_set {
        let [atime, mtime] = mtime_spec(meta);
        futimens(fd, &atime, &mtime).with_context(|| format!("setting the mtime of {what}"))?;
    }
    Ok(())
}

/// Owner and mtime of a symlink, by name, never following it.
fn apply_meta_symlink(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    meta: &Meta,
    owners: &mut Owners,
    what: &str,
) -> Result<()> {
    let (uid, gid) = owners.ids(meta);
    let r = fchownat(
        dir,
        name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    );
    owners.chown_result(r, what)?;
    let [atime, mtime] = mtime_spec(meta);
    utimensat(dir, name, &atime, &mtime, UtimensatFlags::NoFollowSymlink)
        .with_context(|| format!("setting the mtime of {what}"))?;
    Ok(())
}

/// Opens a non-directory, non-symlink entry for metadata changes (fifos without blocking).
fn open_nofollow(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Why a file sent but not placed is listed among the skipped.
const CHANGED_DURING_SYNC: &str =
    "changed on the source during the sync (its content no longer matched its SHA-256); DEST keeps its old version";

/// How often the receiver reports progress, within a big file too.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn temp_name() -> OsString {
    let mut name = TEMP_PREFIX.to_vec();
    name.extend_from_slice(
        format!(
            "{}.{}",
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        )
        .as_bytes(),
    );
    OsString::from_vec(name)
}

/// A temporary name that is removed unless it was renamed into place.
struct TempGuard<'a> {
    dir: BorrowedFd<'a>,
    name: OsString,
    armed: bool,
}

impl<'a> TempGuard<'a> {
    fn new(dir: BorrowedFd<'a>) -> TempGuard<'a> {
        TempGuard {
            dir,
            name: temp_name(),
            armed: true,
        }
    }

    /// Renames the temp into `final_name`.
    fn commit(mut self, final_name: &OsStr) -> Result<()> {
        nix::fcntl::renameat(self.dir, self.name.as_os_str(), self.dir, final_name)?;
        self.armed = false;
        Ok(())
    }

    /// Like `commit`, for a new hard link: when the temp and `final_name` are already links
    /// to one inode, rename(2) does nothing, so the temp name is removed explicitly.
    fn commit_link(mut self, final_name: &OsStr) -> Result<()> {
        nix::fcntl::renameat(self.dir, self.name.as_os_str(), self.dir, final_name)?;
        let _ = nix::unistd::unlinkat(
            self.dir,
            self.name.as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        self.armed = false;
        Ok(())
    }
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = remove_at(self.dir, &self.name);
        }
    }
}

/// Counts the bytes read from the wire (compressed, when the stream is).
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Which side of a copy failed: a failed read is the stream's (or the source's) fault, a
/// failed write DEST's (full, read-only, a disk error), and the message must say which.
enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Writes `src` to `out` while hashing it; returns the digest and byte count.
/// Copies `src` to `out`, hashing it; `copied` hears the bytes copied so far, so a big file
/// shows progress before it is complete.
fn copy_hashing(
    src: &mut impl Read,
    out: &mut File,
    buf: &mut [u8],
    copied: &mut impl FnMut(u64),
) -> Result<(Digest, u64), CopyError> {
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    loop {
        let n = match src.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(CopyError::Write)?;
        total += n as u64;
        copied(total);
    }
    Ok((hasher.finalize().into(), total))
}

/// Reads `input`, decompressing it if `compressed`, into buffers taken from `empty` and
/// handed over through `full`.
fn read_ahead(
    input: impl Read,
    compressed: bool,
    full: std::sync::mpsc::SyncSender<io::Result<(Vec<u8>, usize)>>,
    empty: std::sync::mpsc::Receiver<Vec<u8>>,
) {
    let mut decoder: Box<dyn Read> = if compressed {
        match zstd::stream::read::Decoder::new(input) {
            Ok(d) => Box::new(d),
            Err(e) => {
                let _ = full.send(Err(e));
                return;
            }
        }
    } else {
        Box::new(input)
    };
    while let Ok(mut buf) = empty.recv() {
        let result = loop {
            match decoder.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let done = !matches!(result, Ok(n) if n > 0);
        if full.send(result.map(|n| (buf, n))).is_err() || done {
            return;
        }
    }
}

/// The reading end of `read_ahead`.
struct ChannelReader {
    full: std::sync::mpsc::Receiver<io::Result<(Vec<u8>, usize)>>,
    empty: std::sync::mpsc::Sender<Vec<u8>>,
    current: Option<(Vec<u8>, usize)>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some((buf, len)) = &self.current {
                if self.pos < *len {
                    let n = (len - self.pos).min(out.len());
                    out[..n].copy_from_slice(&buf[self.pos..self.pos + n]);
                    self.pos += n;
                    return Ok(n);
                }
            }
            if let Some((buf, _)) = self.current.take() {
                let _ = self.empty.send(buf);
            }
            match self.full.recv() {
                Ok(Ok((buf, len))) => {
                    if len == 0 {
                        return Ok(0);
                    }
                    self.current = Some((buf, len));
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
    }
}

pub struct Receiver<'p> {
    tree: Tree,
    plan: &'p Plan,
    durability: Durability,
    owners: Owners,
    cache: HashCache,
    stats: ReceiveStats,
    touched_dirs: HashSet<Vec<u8>>,
    /// Files whose content changed on the source while it was sent: left as DEST had them.
    changed: HashSet<RelPath>,
    /// One copy buffer for the whole run.
    buf: Vec<u8>,
    /// Our own ids: a new file already has them, so chown can be skipped.
    me: (u32, u32),
    /// The stream is zstd-compressed (the default), else a plain tar.
    compressed: bool,
}

impl<'p> Receiver<'p> {
    pub fn new(
        tree: Tree,
        plan: &'p Plan,
        mut cache: HashCache,
        durability: Durability,
    ) -> Receiver<'p> {
        // Each file placed goes into the cache as it is placed, its stamps taken at the end.
        cache.reserve(plan.send.len() + plan.reuse.len());
        Receiver {
            tree,
            plan,
            durability,
            owners: Owners {
                is_root: nix::unistd::geteuid().is_root(),
                ..Owners::default()
            },
            cache,
            stats: ReceiveStats::default(),
            touched_dirs: HashSet::new(),
            changed: HashSet::new(),
            buf: vec![0u8; 256 * 1024],
            me: (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
            compressed: true,
        }
    }

    /// Keep setuid/setgid bits on root-owned files (off by default).
    pub fn keep_setuid(mut self, keep: bool) -> Receiver<'p> {
        self.owners.keep_setuid = keep;
        self
    }

    /// Whether the stream is zstd-compressed (by default) or a plain tar.
    pub fn compressed(mut self, compressed: bool) -> Receiver<'p> {
        self.compressed = compressed;
        self
    }

    /// Carries out the plan, reading members from `input` (the tar stream).
    /// `progress` is called now and then from this thread.
    pub fn run(
        self,
        input: impl Read + Send,
        mut progress: impl FnMut(ReceiveProgress),
    ) -> Result<ReceiveStats> {
        // New files are created with their final permission bits, so no umask may mask them.
        let umask = nix::sys::stat::umask(Mode::empty());
        let result = self.apply(input, &mut progress);
        nix::sys::stat::umask(umask);
        result
    }

    fn apply(
        mut self,
        input: impl Read + Send,
        progress: &mut impl FnMut(ReceiveProgress),
    ) -> Result<ReceiveStats> {
        let staged = self.stage_reuse()?;
        for rel in &self.plan.delete {
            self.tree.remove(rel)?;
        }
        for rel in &self.plan.mkdir {
            if !rel.is_empty() {
                self.tree.mkdir(rel)?;
            }
        }
        self.place_reuse(staged)?;
        let wire = Arc::new(AtomicU64::new(0));
        let result = self.receive_stream(input, wire.clone(), progress);
        self.stats.wire_bytes = wire.load(Ordering::Relaxed);
        let finished = result
            .and_then(|()| self.links())
            .and_then(|()| self.metadata());
        if finished.is_ok() {
            self.remember_hashes();
        }
        // The hash cache is written while the file system syncs, not after it (each took
        // about 0.1 s at the end of a 56k-file delta). One sync covers both outcomes: on failure,
        // what was already placed is made durable before the error is reported, and the
        // first error is the one reported.
        let (synced, saved) = std::thread::scope(|s| {
            let cache = &mut self.cache;
            let saving = finished.is_ok().then(|| s.spawn(|| cache.write()));
            let synced = sync_tree(&mut self.tree, &mut self.touched_dirs, self.durability);
            (synced, saving.map(|h| h.join()))
        });
        self.stats.sync_s += synced.as_ref().copied().unwrap_or_default();
        finished?;
        synced?;
        // Only now, with what it describes durable, does the new cache replace the old.
        let saved = match saved {
            Some(Ok(Ok(Some(written)))) => written.commit(),
            Some(Ok(Ok(None))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(anyhow!("its writer panicked")),
        };
        if let Err(e) = saved {
            self.stats
                .warnings
                .push(format!("could not save the hash cache: {e:#}"));
        }
        self.stats.warnings.append(&mut self.owners.warnings);
        self.stats.verified = true;
        progress(ReceiveProgress {
            files: self.stats.files_written,
            bytes: self.stats.bytes_written,
            wire_bytes: self.stats.wire_bytes,
        });
        // The cache's hashes, one for each file placed (every file of a first copy), are freed
        // on a thread of its own: the controller waits for this answer, not for that (about
        // 10 ms for 56k files).
        let cache = std::mem::replace(&mut self.cache, HashCache::disabled());
        let _ = std::thread::Builder::new().spawn(move || drop(cache));
        Ok(self.stats)
    }

    fn staging_dir(&self) -> OsString {
        let mut name = TEMP_PREFIX.to_vec();
        name.extend_from_slice(format!("stage.{}", std::process::id()).as_bytes());
        OsString::from_vec(name)
    }

    /// Links or copies reusable content aside before any delete can remove it. A rename
    /// (content whose only name is deleted, moving to a name that is free in a directory
    /// that stays) is done at once, one `renameat2` instead of a link into the staging
    /// directory, an unlink and a rename out of it: the 2311 renames of the benchmark's
    /// delta took 0.19 s that way. Its entry in the returned list is then `None`.
    fn stage_reuse(&mut self) -> Result<Vec<Option<OsString>>> {
        if self.plan.reuse.is_empty() {
            return Ok(Vec::new());
        }
        let stage = self.staging_dir();
        let root = self.tree.dir(b"")?;
        nix::sys::stat::mkdirat(
            root.as_fd(),
            stage.as_os_str(),
            Mode::from_bits_truncate(0o700),
        )
        .with_context(|| {
            format!(
                "creating staging directory in {}",
                self.tree.root_path().display()
            )
        })?;
        let stage_fd = openat(
            root.as_fd(),
            stage.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let deleted: HashSet<&[u8]> = self.plan.delete.iter().map(|p| &p[..]).collect();
        let goes = |p: &[u8]| deleted.contains(p) || ancestors(p).any(|a| deleted.contains(a));
        // Content another reuse reads too must stay where it is until all are staged.
        let mut readers: HashMap<&[u8], u32> = HashMap::new();
        for reuse in &self.plan.reuse {
            *readers.entry(&reuse.from[..]).or_default() += 1;
        }
        self.cache.want(self.plan.reuse.iter().map(|r| &r.from[..]));
        let mut staged = Vec::new();
        for (i, reuse) in self.plan.reuse.iter().enumerate() {
            let (dir, name) = self.tree.parent(&reuse.from)?;
            let what = self.tree.show(&reuse.from);
            let fd = open_nofollow(dir.as_fd(), name).with_context(|| format!("opening {what}"))?;
            let mut file = File::from(fd);
            let md = file.metadata()?;
            if !md.is_file() {
                bail!("{what} changed type since the scan; run the sync again");
            }
            let digest = match self.cache.get(&reuse.from, &Stamp::of(&md)) {
                Some(d) => d,
                None => hash_reader(&mut file).with_context(|| format!("hashing {what}"))?,
            };
            if digest != reuse.digest {
                bail!("{what} changed since the scan; run the sync again");
            }
            let movable = reuse.mode == ReuseMode::Link
                && readers[&reuse.from[..]] == 1
                && goes(&reuse.from)
                && !ancestors(&reuse.to).any(|a| deleted.contains(a));
            // Into a directory reached without following a symlink; a name already taken, a
            // directory not made yet or a file system without RENAME_NOREPLACE takes the
            // staged way instead.
            let target = match movable {
                true => self.tree.parent_if_present(&reuse.to).ok().flatten(),
                false => None,
            };
            if let Some((to_dir, to_name)) = target {
                let to_what = self.tree.show(&reuse.to);
                apply_meta_fd(file.as_fd(), &reuse.meta, None, &mut self.owners, &to_what)?;
                let renamed = renameat2(
                    dir.as_fd(),
                    name,
                    to_dir.as_fd(),
                    to_name,
                    RenameFlags::RENAME_NOREPLACE,
                );
                if renamed.is_ok() {
                    self.cache
                        .put(reuse.to.clone(), Stamp::PENDING, reuse.digest);
                    staged.push(None);
                    continue;
                }
            }
            let staged_name = OsString::from(i.to_string());
            match reuse.mode {
                ReuseMode::Link => linkat(
                    dir.as_fd(),
                    name,
                    stage_fd.as_fd(),
                    staged_name.as_os_str(),
                    AtFlags::empty(),
                )
                .with_context(|| format!("linking {what}"))?,
                ReuseMode::Copy => {
                    use std::io::Seek;
                    file.seek(io::SeekFrom::Start(0))?;
                    let out = openat(
                        stage_fd.as_fd(),
                        staged_name.as_os_str(),
                        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o600),
                    )?;
                    let mut out = File::from(out);
                    let (copied, _) = copy_hashing(&mut file, &mut out, &mut self.buf, &mut |_| {})
                        .map_err(|(CopyError::Read(e) | CopyError::Write(e))| e)
                        .with_context(|| format!("copying {what}"))?;
                    if copied != reuse.digest {
                        bail!("{what} changed while being copied; run the sync again");
                    }
                    if self.durability == Durability::Fsync {
                        out.sync_all()?;
                    }
                }
            }
            staged.push(Some(staged_name));
        }
        Ok(staged)
    }

    fn place_reuse(&mut self, staged: Vec<Option<OsString>>) -> Result<()> {
        if staged.is_empty() {
            return Ok(());
        }
        let stage = self.staging_dir();
        let root = self.tree.dir(b"")?;
        let stage_fd = openat(
            root.as_fd(),
            stage.as_os_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        for (reuse, staged_name) in self.plan.reuse.iter().zip(staged) {
            let Some(staged_name) = staged_name else {
                continue;
            };
            let what = self.tree.show(&reuse.to);
            let fd = open_nofollow(stage_fd.as_fd(), &staged_name)?;
            apply_meta_fd(fd.as_fd(), &reuse.meta, None, &mut self.owners, &what)?;
            let (dir, name) = self.tree.parent(&reuse.to)?;
            nix::fcntl::renameat(stage_fd.as_fd(), staged_name.as_os_str(), dir.as_fd(), name)
                .with_context(|| format!("moving content into {what}"))?;
            self.cache
                .put(reuse.to.clone(), Stamp::PENDING, reuse.digest);
        }
        remove_at(root.as_fd(), &stage).context("removing the staging directory")?;
        Ok(())
    }

    fn receive_stream(
        &mut self,
        input: impl Read + Send,
        wire: Arc<AtomicU64>,
        progress: &mut impl FnMut(ReceiveProgress),
    ) -> Result<()> {
        let plan = self.plan;
        // Keyed by a clone of the plan's path: 8 bytes a slot, where a slice took 16.
        let mut expected: HashMap<RelPath, &SendItem> =
            plan.send.iter().map(|s| (s.path.clone(), s)).collect();
        // Files of hard-link groups placed from this stream, with their group (the group's
        // first planned name): a hard link member may only name one of its own group. Files
        // of no group are left out: no member may name them, and on a first copy of 56k
        // files the map of them all was 2.2 MB of this agent's 24 MB peak.
        let groups: HashSet<&[u8]> = plan
            .send
            .iter()
            .filter_map(|s| s.link_to.as_deref())
            .collect();
        let mut placed_in: HashMap<&[u8], &[u8]> = HashMap::new();
        // Link groups whose file was left behind: their other names are left behind too.
        let mut changed_groups: HashSet<&[u8]> = HashSet::new();
        // A legitimate trailer lists at most every planned path, hex-encoded and quoted.
        let trailer_cap = plan
            .send
            .iter()
            .fold(MAX_PAX_HEADER, |n, s| n + 2 * s.path.len() as u64 + 3);
        let counting = CountingReader {
            inner: input,
            count: wire.clone(),
        };
        // Reading and decompressing run in their own thread, overlapping hashing and writing.
        std::thread::scope(|scope| {
            let (full_tx, full_rx) =
                std::sync::mpsc::sync_channel::<io::Result<(Vec<u8>, usize)>>(8);
            let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            for _ in 0..10 {
                let _ = empty_tx.send(vec![0u8; 256 * 1024]);
            }
            let compressed = self.compressed;
            scope.spawn(move || read_ahead(counting, compressed, full_tx, empty_rx));
            let reader = ChannelReader {
                full: full_rx,
                empty: empty_tx,
                current: None,
                pos: 0,
            };
            let mut archive = tar::Archive::new(reader);
            let mut last_report = Instant::now();
            let cut = |e: &dyn std::fmt::Display| anyhow!("the stream broke off ({e:#})");
            let mut members = MemberReader::new(&mut archive, trailer_cap).map_err(|e| cut(&e))?;
            while let Some((member, mut entry)) = members.next_member().map_err(|e| cut(&e))? {
                validate(&member.path).context("refusing a stream member")?;
                let item = match expected.remove(member.path.as_slice()) {
                    Some(item) if item.kind == member.plan_kind() => item,
                    Some(item) => bail!(
                        "stream member {} is a {}, the plan expected a {}; refused",
                        display_path(&member.path),
                        member.plan_kind().describe(),
                        item.kind.describe()
                    ),
                    None => bail!(
                        "stream member {} was not asked for; refused",
                        display_path(&member.path)
                    ),
                };
                // Refused from its header, before a byte of it reaches the disk.
                if entry.size() > item.size {
                    bail!(
                        "stream member {} is {} bytes, the plan expected at most {}; refused",
                        display_path(&member.path),
                        entry.size(),
                        item.size
                    );
                }
                let group = item.link_to.as_deref().unwrap_or(&item.path);
                // The plan's path, which the stream's matched: shared, not copied.
                let path = item.path.clone();
                let (dir, name) = self.tree.parent(&path)?;
                let what = self.tree.show(&path);
                self.touched_dirs
                    .insert(crate::sync::beneath::split(&path).0.to_vec());
                let tmp = TempGuard::new(dir.as_fd());
                match &member.kind {
                    MemberKind::File { digest } => {
                        let fd = openat(
                            dir.as_fd(),
                            tmp.name.as_os_str(),
                            OFlag::O_WRONLY
                                | OFlag::O_CREAT
                                | OFlag::O_EXCL
                                | OFlag::O_NOFOLLOW
                                | OFlag::O_CLOEXEC,
                            Mode::from_bits_truncate(member.meta.mode & 0o777),
                        )
                        .with_context(|| format!("creating a temporary file for {what}"))?;
                        let mut file = File::from(fd);
                        let (files, before) = (self.stats.files_written, self.stats.bytes_written);
                        let mut copied = |so_far: u64| {
                            if last_report.elapsed() > PROGRESS_EVERY {
                                last_report = Instant::now();
                                progress(ReceiveProgress {
                                    files,
                                    bytes: before + so_far,
                                    wire_bytes: wire.load(Ordering::Relaxed),
                                });
                            }
                        };
                        let copy = copy_hashing(&mut entry, &mut file, &mut self.buf, &mut copied);
                        let (got, n) = match copy {
                            Ok(done) => done,
                            Err(CopyError::Read(e)) => return Err(cut(&e)),
                            Err(CopyError::Write(e)) => {
                                return Err(e).with_context(|| format!("writing {what}"))
                            }
                        };
                        if got != *digest {
                            // The sender reads a big file twice (to hash, then to send): a
                            // file written meanwhile, like a live mbox, arrives torn. Keep
                            // DEST's version and go on; the next run copies it.
                            self.left_behind(path);
                            changed_groups.insert(group);
                            continue;
                        }
                        apply_meta_fd(
                            file.as_fd(),
                            &member.meta,
                            Some(self.me),
                            &mut self.owners,
                            &what,
                        )?;
                        if self.durability == Durability::Fsync {
                            file.sync_all().with_context(|| format!("syncing {what}"))?;
                        }
                        tmp.commit(name)
                            .with_context(|| format!("renaming into {what}"))?;
                        self.cache.put(path, Stamp::PENDING, *digest);
                        if groups.contains(group) {
                            placed_in.insert(&item.path, group);
                        }
                        self.stats.files_written += 1;
                        self.stats.bytes_written += n;
                    }
                    MemberKind::HardLink { target } => {
                        if changed_groups.contains(group) {
                            self.left_behind(path);
                            continue;
                        }
                        if placed_in.get(target.as_slice()) != Some(&group) {
                            bail!(
                                "hard link member {what} points at {}, which this stream did not place in its link group; refused",
                                self.tree.show(target)
                            );
                        }
                        let (tdir, tname) = self.tree.parent(target)?;
                        linkat(
                            tdir.as_fd(),
                            tname,
                            dir.as_fd(),
                            tmp.name.as_os_str(),
                            AtFlags::empty(),
                        )
                        .with_context(|| format!("linking {what} to {}", self.tree.show(target)))?;
                        tmp.commit_link(name)
                            .with_context(|| format!("renaming into {what}"))?;
                    }
                    MemberKind::Symlink { target } => {
                        nix::unistd::symlinkat(
                            OsStr::from_bytes(target),
                            dir.as_fd(),
                            tmp.name.as_os_str(),
                        )
                        .with_context(|| format!("creating symlink {what}"))?;
                        apply_meta_symlink(
                            dir.as_fd(),
                            &tmp.name,
                            &member.meta,
                            &mut self.owners,
                            &what,
                        )?;
                        tmp.commit(name)
                            .with_context(|| format!("renaming into {what}"))?;
                    }
                    MemberKind::Fifo => {
                        nix::unistd::mkfifoat(
                            dir.as_fd(),
                            tmp.name.as_os_str(),
                            Mode::from_bits_truncate(0o600),
                        )
                        .with_context(|| format!("creating fifo {what}"))?;
                        let fd = open_nofollow(dir.as_fd(), &tmp.name)?;
                        apply_meta_fd(fd.as_fd(), &member.meta, None, &mut self.owners, &what)?;
                        tmp.commit(name)
                            .with_context(|| format!("renaming into {what}"))?;
                    }
                }
                if last_report.elapsed() > PROGRESS_EVERY {
                    last_report = Instant::now();
                    progress(ReceiveProgress {
                        files: self.stats.files_written,
                        bytes: self.stats.bytes_written,
                        wire_bytes: wire.load(Ordering::Relaxed),
                    });
                }
            }
            let trailer = members
                .trailer()
                .ok_or_else(|| cut(&"no end-of-stream trailer"))?;
            for hex_path in &trailer.vanished {
                let path = decode_hex(hex_path)
                    .ok_or_else(|| anyhow!("malformed path in the stream trailer"))?;
                if expected.remove(path.as_slice()).is_some() {
                    self.stats.vanished.push(Skipped {
                        path,
                        reason: "vanished or changed on the source during the sync".into(),
                    });
                }
            }
            if !expected.is_empty() {
                let mut missing: Vec<String> =
                    expected.keys().take(5).map(|p| display_path(p)).collect();
                missing.sort();
                bail!(
                    "the stream ended without {} expected entries (first: {}); run the sync again",
                    expected.len(),
                    missing.join(", ")
                );
            }
            Ok(())
        })
    }

    /// Records a file that changed on the source during the sync, left as DEST had it.
    fn left_behind(&mut self, path: RelPath) {
        self.stats.vanished.push(Skipped {
            path: path.to_vec(),
            reason: CHANGED_DURING_SYNC.into(),
        });
        self.changed.insert(path);
    }

    fn links(&mut self) -> Result<()> {
        for link in &self.plan.link {
            // A name for content that was left behind waits for the next run as well.
            if self.changed.contains(&link.from) {
                self.left_behind(link.to.clone());
                continue;
            }
            let what = self.tree.show(&link.to);
            let (fdir, fname) = self.tree.parent(&link.from)?;
            let (dir, name) = self.tree.parent(&link.to)?;
            let tmp = TempGuard::new(dir.as_fd());
            linkat(
                fdir.as_fd(),
                fname,
                dir.as_fd(),
                tmp.name.as_os_str(),
                AtFlags::empty(),
            )
            .with_context(|| format!("linking {what} to {}", self.tree.show(&link.from)))?;
            tmp.commit_link(name)
                .with_context(|| format!("renaming into {what}"))?;
        }
        Ok(())
    }

    fn metadata(&mut self) -> Result<()> {
        for update in &self.plan.meta {
            let what = self.tree.show(&update.path);
            let (dir, name) = self.tree.parent(&update.path)?;
            match update.kind {
                Kind::Symlink => {
                    apply_meta_symlink(dir.as_fd(), name, &update.meta, &mut self.owners, &what)?
                }
                _ => {
                    let fd = open_nofollow(dir.as_fd(), name)
                        .with_context(|| format!("opening {what}"))?;
                    apply_meta_fd(fd.as_fd(), &update.meta, None, &mut self.owners, &what)?;
                }
            }
        }
        for update in &self.plan.dirs {
            let what = self.tree.show(&update.path);
            let fd = self.tree.dir(&update.path)?;
            apply_meta_fd(fd.as_fd(), &update.meta, None, &mut self.owners, &what)?;
        }
        Ok(())
    }

    /// Records the stamps of what this run placed, and forgets what it deleted, in the hash
    /// cache; the caller saves it.
    fn remember_hashes(&mut self) {
        let tree = &mut self.tree;
        self.cache.restamp(|path| {
            let (dir, name) = tree.parent(path).ok()?;
            let st = fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).ok()?;
            Some(crate::sync::scan::stamp_of_stat(&st))
        });
        for rel in &self.plan.delete {
            self.cache.remove(rel);
        }
    }
}

/// Makes what was written durable: one `syncfs`, and with `Durability::Fsync` each touched
/// directory first. Returns the seconds it took.
fn sync_tree(
    tree: &mut Tree,
    touched_dirs: &mut HashSet<Vec<u8>>,
    durability: Durability,
) -> Result<f64> {
    let start = Instant::now();
    if durability == Durability::Fsync {
        for d in touched_dirs.drain().collect::<Vec<_>>() {
            let fd = tree.dir(&d)?;
            nix::unistd::fsync(fd.as_fd()).with_context(|| format!("syncing {}", tree.show(&d)))?;
        }
    }
    nix::unistd::syncfs(tree.root_fd())
        .with_context(|| format!("syncing the file system of {}", tree.root_path().display()))?;
    Ok(start.elapsed().as_secs_f64())
}

pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::plan::SendItem;
    use crate::sync::stream::{StreamWriter, Trailer};

    fn meta() -> Meta {
        Meta {
            mode: 0o644,
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime: 1_000,
            mtime_nsec: 0,
        }
    }

    fn plan_for(paths: &[&[u8]]) -> Plan {
        Plan {
            send: paths
                .iter()
                .map(|p| SendItem {
                    path: (*p).into(),
                    kind: Kind::File,
                    link_to: None,
                    // Sizes are checked by their own test.
                    size: u64::MAX,
                })
                .collect(),
            ..Plan::default()
        }
    }

    /// A stream with the given members; `digest_of` overrides the true hash of a member.
    fn stream(members: &[(&[u8], &[u8])], bad_digest_for: Option<&[u8]>, trailer: bool) -> Vec<u8> {
        let enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        let mut w = StreamWriter::new(enc);
        for (path, data) in members {
            let mut digest: Digest = Sha256::digest(data).into();
            if bad_digest_for == Some(*path) {
                digest[0] ^= 1;
            }
            w.file(path, &meta(), data.len() as u64, &digest, *data)
                .unwrap();
        }
        if trailer {
            w.finish(Trailer::default()).unwrap().finish().unwrap()
        } else {
            // Cut off: no trailer, no end-of-archive, an unfinished zstd frame.
            let mut enc = w.finish(Trailer::default()).unwrap();
            enc.flush().unwrap();
            let mut bytes = enc.finish().unwrap();
            bytes.truncate(bytes.len() / 2);
            bytes
        }
    }

    fn receive(dest: &std::path::Path, plan: &Plan, bytes: &[u8]) -> Result<ReceiveStats> {
        let tree = Tree::open(dest).unwrap();
        Receiver::new(tree, plan, HashCache::disabled(), Durability::Syncfs).run(bytes, |_| {})
    }

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_verified_files() {
        let t = tempfile::tempdir().unwrap();
        let plan = plan_for(&[b"a", b"b"]);
        let stats = receive(
            t.path(),
            &plan,
            &stream(&[(b"a", b"1"), (b"b", b"22")], None, true),
        )
        .unwrap();
        assert!(stats.verified);
        assert_eq!(stats.files_written, 2);
        assert_eq!(std::fs::read(t.path().join("b")).unwrap(), b"22");
    }

    #[test]
    fn refuses_paths_outside_dest_and_members_not_asked_for() {
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("dest");
        for (path, plan_path) in [
            (&b"../escape"[..], &b"../escape"[..]),
            (b"/tmp/abs", b"/tmp/abs"),
            (b"other", b"a"),
        ] {
            let plan = plan_for(&[plan_path]);
            let err = receive(&dest, &plan, &stream(&[(path, b"x")], None, true)).unwrap_err();
            assert!(format!("{err:#}").contains("refus"), "{err:#}");
        }
        assert_eq!(names(t.path()), vec!["dest"]);
        assert!(names(&dest).is_empty());
    }

    #[test]
    fn a_file_changed_during_the_sync_keeps_its_old_version_and_the_rest_arrives() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("a"), b"old").unwrap();
        let plan = plan_for(&[b"a", b"b"]);
        let stats = receive(
            t.path(),
            &plan,
            &stream(&[(b"a", b"new"), (b"b", b"bee")], Some(b"a"), true),
        )
        .unwrap();
        assert_eq!(std::fs::read(t.path().join("a")).unwrap(), b"old");
        assert_eq!(std::fs::read(t.path().join("b")).unwrap(), b"bee");
        assert_eq!(names(t.path()), vec!["a", "b"]);
        assert_eq!(stats.files_written, 1);
        assert_eq!(stats.vanished.len(), 1);
        assert_eq!(stats.vanished[0].path, b"a");
        assert!(
            stats.vanished[0]
                .reason
                .contains("changed on the source during the sync"),
            "{}",
            stats.vanished[0].reason
        );
    }

    #[test]
    fn a_cut_stream_is_an_error_and_leaves_no_partial_file() {
        let t = tempfile::tempdir().unwrap();
        let big = vec![42u8; 1 << 20];
        let plan = plan_for(&[b"a", b"b"]);
        let err = receive(
            t.path(),
            &plan,
            &stream(&[(b"a", b"first"), (b"b", &big)], None, false),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("broke off"), "{err:#}");
        for name in names(t.path()) {
            assert!(
                !name.starts_with(".relaymove-tmp"),
                "temp file left: {name}"
            );
            let data = std::fs::read(t.path().join(&name)).unwrap();
            assert!(data == b"first" || data == big, "partial file {name}");
        }
    }

    #[test]
    fn the_hash_cache_changes_only_after_a_receive_that_succeeded() {
        let (t, caches) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let file = caches.path().join("dest.hashes");
        let run = |plan: &Plan, bytes: &[u8]| {
            let cache = HashCache::at(file.clone());
            Receiver::new(
                Tree::open(t.path()).unwrap(),
                plan,
                cache,
                Durability::Syncfs,
            )
            .run(bytes, |_| {})
        };
        run(&plan_for(&[b"a"]), &stream(&[(b"a", b"first")], None, true)).unwrap();
        let saved = std::fs::read(&file).expect("a successful receive saves the cache");
        let digest: Digest = Sha256::digest(b"first").into();
        let st = std::fs::metadata(t.path().join("a")).unwrap();
        let stamp = Stamp::of(&st);
        assert_eq!(HashCache::at(file.clone()).get(b"a", &stamp), Some(digest));

        // Incompressible, so the cut falls inside it, after `b` was placed.
        let mut x = 1u32;
        let noise: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 16) as u8
            })
            .collect();
        let cut = stream(&[(b"b", b"second"), (b"c", &noise)], None, false);
        run(&plan_for(&[b"b", b"c"]), &cut).unwrap_err();
        assert_eq!(std::fs::read(t.path().join("b")).unwrap(), b"second");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            saved,
            "a failed receive changed the cache"
        );
        assert_eq!(
            names(caches.path()),
            ["dest.hashes"],
            "a temporary cache file is left"
        );
    }

    #[test]
    fn a_first_sync_that_fails_midway_leaves_a_new_dest_root_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dest = t.path().join("new");
        let mut plan = plan_for(&[b"key.pem", b"b"]);
        plan.mkdir.push(RelPath::from(&[][..]));
        plan.dirs.push(crate::sync::plan::MetaUpdate {
            path: RelPath::from(&[][..]),
            kind: Kind::Dir,
            meta: Meta {
                mode: 0o755,
                ..meta()
            },
        });
        let big = vec![1u8; 1 << 20];
        let bytes = stream(&[(b"key.pem", b"secret"), (b"b", &big)], None, false);
        assert!(receive(&dest, &plan, &bytes).is_err());
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "DEST root left {mode:o}");
        // A run that finishes gives the root SRC root's mode.
        let bytes = stream(&[(b"key.pem", b"secret"), (b"b", &big)], None, true);
        receive(&dest, &plan, &bytes).unwrap();
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
    }

    #[test]
    fn never_writes_through_a_symlink_in_dest() {
        let t = tempfile::tempdir().unwrap();
        let (dest, outside) = (t.path().join("dest"), t.path().join("outside"));
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("d")).unwrap();
        let plan = plan_for(&[b"d/f"]);
        let err = receive(&dest, &plan, &stream(&[(b"d/f", b"x")], None, true)).unwrap_err();
        assert!(
            format!("{err:#}").contains("refusing to write through it"),
            "{err:#}"
        );
        assert!(names(&outside).is_empty());
    }

    fn compressed(tar: &[u8]) -> Vec<u8> {
        zstd::encode_all(tar, 1).unwrap()
    }

    #[test]
    fn a_member_larger_than_planned_is_refused_before_its_content_is_written() {
        let t = tempfile::tempdir().unwrap();
        let mut plan = plan_for(&[b"a"]);
        plan.send[0].size = 10;
        // The header claims a TiB; only a little content follows.
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path("a").unwrap();
        h.set_size(1 << 40);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        let mut tar = tar::Builder::new(Vec::new());
        let digest = "0".repeat(64);
        tar.append_pax_extensions([(crate::sync::stream::SHA256_KEY, digest.as_bytes())])
            .unwrap();
        let mut bytes = tar.into_inner().unwrap();
        bytes.truncate(bytes.len() - 1024); // the end-of-archive blocks
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(&[7u8; 1 << 16]);
        let err = receive(t.path(), &plan, &compressed(&bytes)).unwrap_err();
        assert!(
            format!("{err:#}").contains("is 1099511627776 bytes, the plan expected at most 10"),
            "{err:#}"
        );
        assert!(names(t.path()).is_empty());
    }

    #[test]
    fn a_huge_pax_header_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_path("pax").unwrap();
        h.set_size(1 << 30);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.resize(bytes.len() + (4 << 20), b'x');
        let err = receive(t.path(), &plan_for(&[b"a"]), &compressed(&bytes)).unwrap_err();
        assert!(
            format!("{err:#}").contains("PAX header of 1073741824 bytes"),
            "{err:#}"
        );
    }

    #[test]
    fn a_hard_link_is_accepted_only_to_a_file_of_its_group_placed_by_the_stream() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("private")).unwrap();
        std::fs::write(t.path().join("private/dkim.key"), b"key").unwrap();
        let item = |path: &[u8], link_to: Option<&[u8]>| SendItem {
            path: path.into(),
            kind: Kind::File,
            link_to: link_to.map(|l| l.into()),
            size: 3,
        };
        let plan = Plan {
            send: vec![
                item(b"a", None),
                item(b"b", Some(b"a")),
                item(b"c", None),
                item(b"x", None),
            ],
            ..Plan::default()
        };
        // `x` sent as a hard link to `target`, or as a file.
        let stream_with = |target: Option<&[u8]>| {
            let enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
            let mut w = StreamWriter::new(enc);
            let digest: Digest = Sha256::digest(b"aaa").into();
            w.file(b"a", &meta(), 3, &digest, &b"aaa"[..]).unwrap();
            w.hardlink(b"b", &meta(), b"a").unwrap();
            w.file(b"c", &meta(), 3, &digest, &b"aaa"[..]).unwrap();
            match target {
                Some(target) => w.hardlink(b"x", &meta(), target).unwrap(),
                None => w.file(b"x", &meta(), 3, &digest, &b"aaa"[..]).unwrap(),
            }
            w.finish(Trailer::default()).unwrap().finish().unwrap()
        };
        // To a file DEST already had, to a file of another group, and to one this stream
        // placed in no group.
        for target in [&b"private/dkim.key"[..], b"a", b"c"] {
            let err = receive(t.path(), &plan, &stream_with(Some(target))).unwrap_err();
            assert!(
                format!("{err:#}").contains("did not place in its link group"),
                "{err:#}"
            );
            assert!(std::fs::symlink_metadata(t.path().join("x")).is_err());
        }
        // Within the group it works.
        receive(t.path(), &plan, &stream_with(None)).unwrap();
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &str| std::fs::metadata(t.path().join(p)).unwrap().ino();
        assert_eq!(ino("a"), ino("b"));
        assert_ne!(ino("a"), ino("x"));
    }

    #[test]
    fn setuid_and_setgid_root_bits_from_the_stream_are_dropped_unless_kept() {
        use std::os::unix::fs::PermissionsExt;
        let members: [(&[u8], u32, u32); 3] = [
            (b"suid-root", 0o6755, 0),
            (b"suid-daemon", 0o4755, 1),
            (b"plain", 0o755, 0),
        ];
        let bytes = {
            let enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
            let mut w = StreamWriter::new(enc);
            for (path, mode, uid) in members {
                let m = Meta {
                    mode,
                    uid,
                    gid: uid,
                    ..meta()
                };
                let digest: Digest = Sha256::digest(b"#!/bin/sh\n").into();
                w.file(path, &m, 10, &digest, &b"#!/bin/sh\n"[..]).unwrap();
            }
            w.finish(Trailer::default()).unwrap().finish().unwrap()
        };
        let plan = plan_for(&[b"suid-root", b"suid-daemon", b"plain"]);
        let mode = |dir: &std::path::Path, name: &str| {
            std::fs::metadata(dir.join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        let t = tempfile::tempdir().unwrap();
        receive(t.path(), &plan, &bytes).unwrap();
        assert_eq!(mode(t.path(), "suid-root"), 0o755);
        assert_eq!(mode(t.path(), "suid-daemon"), 0o4755, "not root's: kept");
        assert_eq!(mode(t.path(), "plain"), 0o755);
        let kept = tempfile::tempdir().unwrap();
        let tree = Tree::open(kept.path()).unwrap();
        Receiver::new(tree, &plan, HashCache::disabled(), Durability::Syncfs)
            .keep_setuid(true)
            .run(&bytes[..], |_| {})
            .unwrap();
        assert_eq!(mode(kept.path(), "suid-root"), 0o6755);
    }

    #[test]
    fn decode_hex_round_trips() {
        assert_eq!(decode_hex("00ff7f"), Some(vec![0, 255, 127]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
