//! The agent: the code that runs on each host (`relaymove agent serve`), started by the
//! controller (locally as a child process, remotely over SSH). It answers the requests of
//! `remote/protocol.rs` on stdin and stdout until stdin closes. Only this process touches the
//! host's file system; the controller never does.

use crate::remote::direct::{self, Connection, KeyFiles, Listening};
use crate::remote::protocol::{
    read_frame_opt, widen_pipe, write_frame, ChunkReader, ChunkWriter, DirectSend, Hashes, Hello,
    ManifestFrame, ReceiveEvent, Reply, Request, Space, PROTOCOL,
};
use crate::sync::beneath::{validate, Tree};
use crate::sync::compress::{Compression, LevelsTaken};
use crate::sync::hash_cache::{hex, HashCache};
use crate::sync::manifest::Manifest;
use crate::sync::plan::{Plan, SendItem};
use crate::sync::receive::{Durability, Receiver};
use crate::sync::scan::{hash_paths, scan_each, ScanOptions};
use crate::sync::send::{send, SendOptions};
use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use sha2::Digest as _;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::hash::BuildHasher;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Answers requests on stdin until it closes; returns the exit code.
pub fn serve() -> Result<i32> {
    // stdin is not locked for the whole run: the receiver reads it from its decompression
    // thread.
    let mut input = io::stdin();
    let stdout = io::stdout();
    widen_pipe(&input);
    widen_pipe(&stdout);
    write_frame(&mut stdout.lock(), &Hello { protocol: PROTOCOL })?;
    let mut held = Held::default();
    let mut direct = Direct::default();
    let mut caches = Caches::default();
    while let Some(request) = read_frame_opt::<Request>(&mut input)? {
        let mut out = stdout.lock();
        match request {
            Request::Scan {
                root,
                checksum,
                excludes,
            } => {
                let root = path(&root);
                let cache = caches.of(root);
                let opts = ScanOptions { checksum, excludes };
                // The paths found, by hash: 8 bytes a path. Two paths with one hash only
                // keep a stale cache entry, whose stamps then never match a file.
                let hasher = foldhash::fast::FixedState::default();
                let mut present = HashSet::new();
                let mut frame = ManifestFrame::new()?;
                let scanned = scan_each(root, &opts, cache, &mut |e| {
                    present.insert(hasher.hash_one(&*e.path));
                    frame.push(&e)
                })
                .with_context(|| format!("scanning {}", root.display()));
                match &scanned {
                    Ok(rest) => frame.write(&mut out, rest)?,
                    Err(e) => write_frame(&mut out, &Reply::<Manifest>::Err(format!("{e:#}")))?,
                }
                // Once the controller has its answer: the cache forgets what the tree no
                // longer has (reading all of it, 0.05 s on a 56k-file tree).
                if scanned.is_ok() {
                    cache.retain(|p| present.contains(&hasher.hash_one(p)));
                }
            }
            Request::Hash { root, paths } => {
                let root = path(&root);
                write_frame(&mut out, &text(do_hash(root, paths, caches.of(root))))?;
            }
            Request::Send {
                root,
                items,
                compression,
                bwlimit,
                to: None,
            } => {
                // ChunkWriter buffers a whole chunk; no BufWriter needed in between.
                let mut chunks = ChunkWriter::new(Throttle::new(&mut out, bwlimit));
                let root = path(&root);
                let sent = do_send(root, &items, compression, &mut chunks, caches.of(root));
                // The end marker goes out even after a failure, so the stream stays in step.
                chunks.finish()?;
                write_frame(&mut out, &text(sent))?;
            }
            Request::Send {
                root,
                items,
                compression,
                bwlimit,
                to: Some(to),
            } => {
                let root = path(&root);
                let cache = caches.of(root);
                let sent = send_direct(&mut direct, root, &items, compression, bwlimit, &to, cache);
                write_frame(&mut out, &text(sent))?;
            }
            Request::DirectKey {
                token,
                address,
                port,
            } => {
                let made = direct::make_key(&token, &address, port).map(|(files, made)| {
                    direct.keys.insert(token, files);
                    made
                });
                write_frame(&mut out, &text(made))?;
            }
            Request::DirectAccept {
                token,
                public_key,
                from,
            } => {
                let opened = Listening::open(&token, &public_key, from).map(|(l, accepting)| {
                    direct.listening.insert(token, l);
                    accepting
                });
                write_frame(&mut out, &text(opened))?;
            }
            Request::Priority { low } => {
                write_frame(&mut out, &text(priority(low)))?;
            }
            Request::Lock { path: file } => {
                let locked = held.migration(path(&file));
                write_frame(&mut out, &text(locked))?;
            }
            Request::LockTree { root, wait_s } => {
                let wait = std::time::Duration::from_secs(wait_s.into());
                write_frame(&mut out, &text(held.tree(path(&root), wait)))?;
            }
            Request::Space { root } => {
                write_frame(&mut out, &text(space(path(&root))))?;
            }
            Request::Receive {
                root,
                mut plan,
                keep_setuid,
                compressed,
                from: None,
            } => {
                drop(out);
                plan.to_mut().shrink_to_fit();
                let mut chunks = ChunkReader::new(io::stdin());
                let received = do_receive(
                    path(&root),
                    caches.take(path(&root)),
                    &plan,
                    keep_setuid,
                    compressed,
                    &mut chunks,
                    &stdout,
                );
                let failed = received.is_err();
                report_received(received, &stdout)?;
                // Skip what the receiver did not read, up to the end marker.
                match chunks.drain() {
                    Ok(()) => {}
                    // After a failure the controller closes our input mid-stream: the
                    // session is over, and the failure was already reported.
                    Err(_) if failed => return Ok(0),
                    Err(e) => return Err(e).context("reading the end of the stream"),
                }
            }
            Request::Receive {
                root,
                mut plan,
                keep_setuid,
                compressed,
                from: Some(token),
            } => {
                drop(out);
                plan.to_mut().shrink_to_fit();
                let received = direct
                    .listening
                    .remove(&token)
                    .ok_or_else(|| anyhow!("bug: no direct transfer {token} was set up"))
                    .and_then(|l| l.accept(&io::stdin()))
                    .and_then(|stream| {
                        write_frame(&mut stdout.lock(), &ReceiveEvent::Connected)?;
                        // Dropped at the end: old's `agent accept`, and its ssh, then end.
                        let mut chunks = ChunkReader::new(stream);
                        do_receive(
                            path(&root),
                            caches.take(path(&root)),
                            &plan,
                            keep_setuid,
                            compressed,
                            &mut chunks,
                            &stdout,
                        )
                    });
                report_received(received, &stdout)?;
            }
        }
    }
    caches.save();
    Ok(0)
}

/// Each tree's hash cache, loaded once per session and saved when it ends: a scan, the
/// hashing for the plan and the send each saved and reloaded all of it (about 0.1 s each on a
/// 56k-file tree, one after another in a re-sync).
#[derive(Default)]
struct Caches(HashMap<PathBuf, HashCache>);

impl Caches {
    fn of(&mut self, root: &Path) -> &mut HashCache {
        self.0
            .entry(root.to_path_buf())
            .or_insert_with(|| HashCache::open(root))
    }

    /// For a receiver, which records what it placed and saves the cache itself.
    fn take(&mut self, root: &Path) -> HashCache {
        self.0.remove(root).unwrap_or_else(|| HashCache::open(root))
    }

    /// Best effort: a cache not saved only costs the next run some hashing.
    fn save(&mut self) {
        for cache in self.0.values_mut() {
            let _ = cache.save();
        }
    }
}

/// A receiver's verdict, sent at once: after a failure the controller stops the transfer
/// instead of sending the rest of it to be skipped here.
fn report_received(
    received: Result<crate::sync::receive::ReceiveStats>,
    stdout: &io::Stdout,
) -> Result<()> {
    let event = match received {
        Ok(stats) => ReceiveEvent::Done(stats),
        Err(e) => ReceiveEvent::Failed {
            message: format!("{e:#}"),
            errno: os_error(&e),
        },
    };
    write_frame(&mut stdout.lock(), &event)
}

/// The direct transfers this agent has set up and not yet run: a sender's keys, a
/// receiver's listening sockets (each removed when dropped, so also when the agent ends).
#[derive(Default)]
struct Direct {
    keys: HashMap<String, KeyFiles>,
    listening: HashMap<String, Listening>,
}

/// Sends the plan's files over the direct transfer `to` set up by `DirectKey`.
fn send_direct(
    direct: &mut Direct,
    root: &Path,
    items: &[SendItem],
    compression: Compression,
    bwlimit: Option<u64>,
    to: &DirectSend,
    cache: &mut HashCache,
) -> Result<LevelsTaken> {
    let key = direct
        .keys
        .remove(&to.token)
        .ok_or_else(|| anyhow!("bug: no direct transfer {} was set up", to.token))?;
    let (connection, stdin) = Connection::open(key, &to.user, &to.host_keys)?;
    let watch = connection.cancel_on(libc::STDIN_FILENO);
    let mut chunks = ChunkWriter::new(Throttle::new(stdin, bwlimit));
    let sent = do_send(root, items, compression, &mut chunks, cache);
    // Closing ssh's input (dropping the writer) ends the connection.
    let ended = chunks.finish().map(drop);
    if watch.end() {
        bail!("the controller cancelled the transfer");
    }
    // ssh's verdict comes first: it explains a broken pipe.
    connection.finish()?;
    let levels = sent?;
    ended.context("finishing the stream")?;
    Ok(levels)
}

/// Limits what passes through it to `rate` bytes a second on average.
struct Throttle<W: Write> {
    inner: W,
    rate: Option<u64>,
    start: std::time::Instant,
    written: u64,
}

impl<W: Write> Throttle<W> {
    fn new(inner: W, rate: Option<u64>) -> Throttle<W> {
        Throttle {
            inner,
            rate: rate.filter(|&r| r > 0),
            start: std::time::Instant::now(),
            written: 0,
        }
    }
}

impl<W: Write> Write for Throttle<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        if let Some(rate) = self.rate {
            self.written += n as u64;
            let due = std::time::Duration::from_secs_f64(self.written as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(self.start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Low priority: nice 10 and the lowest best-effort I/O level, so a production server's own
/// work goes first; normal: nice 0 and the I/O class that follows it. On Linux both are per
/// thread, and the threads a send or receive starts later inherit them. Only root may go back
/// to normal; for another user the request then leaves the priority low.
fn priority(low: bool) -> Result<()> {
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_BE: libc::c_long = 2;
    let (nice, ioprio) = if low {
        (10, IOPRIO_CLASS_BE << 13 | 7)
    } else {
        (0, 0)
    };
    // SAFETY: plain system calls on the calling thread, with integer arguments.
    let set = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if set != 0 {
        let e = io::Error::last_os_error();
        if low || e.raw_os_error() != Some(libc::EACCES) {
            return Err(e).context("setting the agent's CPU priority");
        }
    }
    // SAFETY: as above.
    let set = unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, ioprio) };
    if set != 0 {
        return Err(io::Error::last_os_error()).context("setting the agent's I/O priority");
    }
    Ok(())
}

fn path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

fn text<T>(r: Result<T>) -> Reply<T> {
    r.map_err(|e| format!("{e:#}"))
}

/// Locks `file` exclusively without waiting and writes this process's id into it, so
/// that a second controller is told who holds it: `Ok(Err(pid))` when another holds it.
///
/// `relaymove cleanup` removes lock files nobody holds. A file opened just before such a
/// removal and locked just after it is no longer at `file`, and a third agent would lock a
/// new one there: two holders. So the lock counts only while `file` still names the locked
/// inode; otherwise the file is opened again.
fn lock(file: &Path) -> Result<Result<Flock<std::fs::File>, String>> {
    use std::io::{Read, Seek};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut attempts = 0;
    let mut locked = loop {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(file)
            .with_context(|| format!("opening the lock file {}", file.display()))?;
        let locked = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((mut f, _)) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                return Ok(Err(holder.trim().to_string()));
            }
        };
        let held = locked.metadata()?;
        match std::fs::symlink_metadata(file) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => break locked,
            _ if attempts < 10 => attempts += 1,
            _ => bail!(
                "the lock file {} keeps being replaced while it is taken; is a cleanup looping on this host?",
                file.display()
            ),
        }
    };
    locked.set_len(0)?;
    locked.rewind()?;
    write!(locked, "{}", std::process::id())?;
    Ok(Ok(locked))
}

/// Locks for the controller, held until this process ends (the kernel then releases them).
#[derive(Default)]
struct Held(HashMap<PathBuf, Flock<std::fs::File>>);

impl Held {
    /// The migration lock: one controller per old host.
    fn migration(&mut self, file: &Path) -> Result<()> {
        if self.0.contains_key(file) {
            return Ok(());
        }
        match lock(file)? {
            Ok(l) => {
                self.0.insert(file.to_path_buf(), l);
                Ok(())
            }
            Err(pid) => bail!(
                "another relaymove holds {} (agent pid {pid}); two migrations must not interleave\nhint: wait for it, or end it (the lock goes with its process)",
                file.display()
            ),
        }
    }

    /// The lock of one receiving tree: two receivers in one DEST would each remove the
    /// other's temporary files as leftovers. Again for the same tree in this session, it is
    /// already held. Held by another process, it is tried again for up to `wait`.
    fn tree(&mut self, root: &Path, wait: std::time::Duration) -> Result<()> {
        let file = tree_lock_file(root)?;
        if self.0.contains_key(&file) {
            return Ok(());
        }
        let start = std::time::Instant::now();
        loop {
            match lock(&file)? {
                Ok(l) => {
                    self.0.insert(file, l);
                    return Ok(());
                }
                Err(_) if start.elapsed() < wait => {
                    std::thread::sleep(std::time::Duration::from_millis(250))
                }
                Err(pid) => bail!(
                    "DEST {} is in use by another relaymove (agent pid {pid}, lock {}{}); two syncs into one DEST \
                     would undo each other's work; nothing was changed\nhint: wait for the other sync to finish, or \
                     end it (`kill {pid}` on this host ends its agent, and the lock with it)",
                    root.display(),
                    file.display(),
                    if wait.is_zero() {
                        String::new()
                    } else {
                        format!(", held throughout the {} s waited", wait.as_secs())
                    }
                ),
            }
        }
    }
}

/// Where the lock of the tree at `root` lives: one file per tree, named by the hash of its
/// canonical path (symlinks and `..` resolved as far as the path exists), under /run (gone
/// after a reboot, like the processes that held the locks) or the user's runtime directory.
fn tree_lock_file(root: &Path) -> Result<PathBuf> {
    let mut existing = root;
    let mut rest = Vec::new();
    let canonical = loop {
        match existing.canonicalize() {
            Ok(c) => break c,
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    rest.push(name.to_os_string());
                    existing = parent;
                }
                _ => bail!("no existing directory above {}", root.display()),
            },
        }
    };
    let canonical = rest.iter().rev().fold(canonical, |p, n| p.join(n));
    let dir = lock_dir_for(nix::unistd::geteuid().is_root(), |key| {
        std::env::var_os(key)
    })
    .context("neither XDG_RUNTIME_DIR nor HOME is set")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_bytes());
    Ok(dir.join(format!("tree-{}.lock", &hex(&digest)[..32])))
}

/// Where the tree locks of a user (`root` or not) with environment `env` live.
/// `remote::cleanup` finds them by the same rules in shell; its tests hold the two together.
pub(crate) fn lock_dir_for(root: bool, env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    if root {
        Some(PathBuf::from("/run/relaymove"))
    } else if let Some(runtime) = env("XDG_RUNTIME_DIR") {
        Some(PathBuf::from(runtime).join("relaymove"))
    } else {
        env("HOME").map(|home| PathBuf::from(home).join(".local/lib/relaymove/locks"))
    }
}

/// The first OS error number in an error chain.
fn os_error(e: &anyhow::Error) -> Option<i32> {
    e.chain().find_map(|c| {
        c.downcast_ref::<io::Error>()
            .and_then(|e| e.raw_os_error())
            .or_else(|| c.downcast_ref::<nix::errno::Errno>().map(|e| *e as i32))
    })
}

/// Free space where `root` is, or would be created (its nearest existing ancestor).
fn space(root: &Path) -> Result<Space> {
    use nix::sys::statvfs::statvfs;
    let mut at = root;
    let st = loop {
        match statvfs(at) {
            Ok(st) => break st,
            Err(nix::errno::Errno::ENOENT) => {
                at = at
                    .parent()
                    .with_context(|| format!("no existing directory above {}", root.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("statvfs {}", at.display())),
        }
    };
    // Root may use the blocks and inodes reserved for it; anyone else may not.
    let root_user = nix::unistd::geteuid().is_root();
    let (blocks, inodes) = if root_user {
        (st.blocks_free(), st.files_free())
    } else {
        (st.blocks_available(), st.files_available())
    };
    let block = st.fragment_size().max(1);
    Ok(Space {
        bytes_free: blocks.saturating_mul(block),
        inodes_free: if st.files() == 0 { u64::MAX } else { inodes },
        block,
    })
}

fn do_hash(root: &Path, paths: Vec<Vec<u8>>, cache: &mut HashCache) -> Result<Hashes> {
    for rel in &paths {
        validate(rel)?;
    }
    let digests = hash_paths(root, &paths, cache)?;
    Ok(paths.into_iter().zip(digests).collect())
}

fn do_send(
    root: &Path,
    items: &[SendItem],
    compression: Compression,
    out: impl Write,
    cache: &mut HashCache,
) -> Result<LevelsTaken> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
        .min(4);
    send(
        root,
        items,
        out,
        SendOptions {
            compression,
            threads,
        },
        cache,
    )
}

fn do_receive(
    root: &Path,
    cache: HashCache,
    plan: &Plan,
    keep_setuid: bool,
    compressed: bool,
    input: &mut ChunkReader<impl Read + Send>,
    stdout: &io::Stdout,
) -> Result<crate::sync::receive::ReceiveStats> {
    let tree = Tree::open(root)?;
    let receiver = Receiver::new(tree, plan, cache, Durability::from_env())
        .keep_setuid(keep_setuid)
        .compressed(compressed);
    receiver.run(input, |p| {
        let _ = write_frame(&mut stdout.lock(), &ReceiveEvent::Progress(p));
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_lock_another_process_holds_is_refused_at_once_or_taken_when_it_goes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("dest");
        let file = tree_lock_file(&root).unwrap();
        // Another open file of the lock: to flock, another holder.
        let holder = lock(&file).unwrap().unwrap();
        let e = Held::default()
            .tree(&root, std::time::Duration::ZERO)
            .unwrap_err();
        assert!(
            e.to_string().contains("is in use by another relaymove"),
            "{e}"
        );
        let e = Held::default()
            .tree(&root, std::time::Duration::from_millis(600))
            .unwrap_err();
        assert!(
            e.to_string().contains("held throughout the 0 s waited"),
            "{e}"
        );
        // An earlier run's agent whose session ends while this one waits.
        let released = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(700));
            drop(holder);
        });
        let start = std::time::Instant::now();
        let mut held = Held::default();
        held.tree(&root, std::time::Duration::from_secs(30))
            .unwrap();
        assert!(start.elapsed() >= std::time::Duration::from_millis(600));
        released.join().unwrap();
        assert!(lock(&file).unwrap().is_err(), "the waiter holds the lock");
    }

    #[test]
    fn a_throttled_stream_takes_at_least_its_size_over_the_rate() {
        let start = std::time::Instant::now();
        let mut out = Throttle::new(Vec::new(), Some(1 << 20));
        for _ in 0..4 {
            out.write_all(&[7u8; 64 << 10]).unwrap();
        }
        assert_eq!(out.inner.len(), 256 << 10);
        // 256 KiB at 1 MiB/s: a quarter of a second at least (no upper bound: a loaded
        // machine may take longer).
        assert!(start.elapsed() >= std::time::Duration::from_millis(240));
        let start = std::time::Instant::now();
        let mut free = Throttle::new(Vec::new(), None);
        free.write_all(&[7u8; 1 << 20]).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }

    /// Priority is per thread on Linux: a thread of its own, so the test runner's other
    /// threads keep theirs.
    #[test]
    fn low_priority_sets_nice_and_the_io_class_and_root_can_go_back() {
        std::thread::spawn(|| {
            let ioprio = || unsafe { libc::syscall(libc::SYS_ioprio_get, 1, 0) };
            priority(true).unwrap();
            // SAFETY: plain system calls about the calling thread.
            assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, 10);
            assert_eq!(ioprio(), 2 << 13 | 7, "best effort, level 7");
            // Threads started now (a send's compressors) inherit it.
            let child = std::thread::spawn(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) });
            assert_eq!(child.join().unwrap(), 10);
            if nix::unistd::geteuid().is_root() {
                priority(false).unwrap();
                assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }, 0);
            }
        })
        .join()
        .unwrap();
    }
}
