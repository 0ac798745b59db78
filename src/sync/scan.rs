//! Walks one tree: every entry's type, size, mode, owner (number and name on this host), mtime
//! to the nanosecond, inode identity and symlink target, never following symlinks, handed on
//! in walk order as it is found (the agent encodes each into its answer at once), and a
//! [`Manifest`] of the rest. Hashes come from the [`HashCache`] when its stamps match, else
//! from reading.
//!
//! A scan error on any path fails the scan: a partial SRC manifest would make the mirror
//! delete what it could not see.

use crate::sync::beneath::{split, Tree};
use crate::sync::filter::Excludes;
use crate::sync::hash_cache::{HashCache, Stamp};
use crate::sync::lister::{Child, Listed, Lister, LISTERS};
use crate::sync::manifest::{Digest, Entry, Kind, Manifest, Meta, Name, RelPath, Skipped};
use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};
use nix::unistd::{Gid, Group, Uid, User};
use sha2::{Digest as _, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default, Clone)]
pub struct ScanOptions {
    /// Hash every regular file (`--checksum`).
    pub checksum: bool,
    pub excludes: Vec<String>,
}

/// Resolves uids and gids to names once per id.
#[derive(Default)]
pub struct Names {
    users: HashMap<u32, Option<Name>>,
    groups: HashMap<u32, Option<Name>>,
}

impl Names {
    pub fn user(&mut self, uid: u32) -> Option<Name> {
        self.users
            .entry(uid)
            .or_insert_with(|| {
                User::from_uid(Uid::from_raw(uid))
                    .ok()
                    .flatten()
                    .map(|u| Name::from(u.name))
            })
            .clone()
    }

    pub fn group(&mut self, gid: u32) -> Option<Name> {
        self.groups
            .entry(gid)
            .or_insert_with(|| {
                Group::from_gid(Gid::from_raw(gid))
                    .ok()
                    .flatten()
                    .map(|g| Name::from(g.name))
            })
            .clone()
    }
}

/// Metadata of an lstat result, with names looked up on this host.
pub fn meta_of(md: &fs::Metadata, names: &mut Names) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        user: names.user(md.uid()),
        group: names.group(md.gid()),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
    }
}

/// Metadata of an `fstatat` result, with names looked up on this host.
pub fn meta_of_stat(st: &FileStat, names: &mut Names) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        user: names.user(st.st_uid),
        group: names.group(st.st_gid),
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec as u32,
    }
}

pub fn stamp_of_stat(st: &FileStat) -> Stamp {
    Stamp {
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec,
        ctime: st.st_ctime,
        ctime_nsec: st.st_ctime_nsec,
    }
}

/// Walks the tree with directory handles: each entry is stat'ed relative to its open
/// directory (no path lookup from the root for every file), names sorted per directory,
/// a directory always before its contents.
struct Walk<'a> {
    root: &'a Path,
    opts: &'a ScanOptions,
    cache: &'a mut HashCache,
    names: Names,
    /// Everything but the entries, which go to `each` as they are found.
    manifest: Manifest,
    each: &'a mut dyn FnMut(Entry) -> Result<()>,
}

impl Walk<'_> {
    fn show(&self, rel: &[u8]) -> String {
        self.root.join(OsStr::from_bytes(rel)).display().to_string()
    }

    fn dir(&mut self, lister: &Lister, prefix: &[u8]) -> Result<()> {
        let (dir, children) = match lister.take(prefix) {
            Listed::Children { fd, children } => (fd, children),
            // Deleted between its parent's listing and its own on a live tree: not an error.
            Listed::Gone => return Ok(()),
            Listed::Failed(what, e) => {
                return Err(e).with_context(|| format!("{what} {}", self.show(prefix)))
            }
        };
        for child in children {
            let (rel, stat, target) = match child {
                Child::Leftover(rel) => {
                    self.manifest.leftovers.push(rel);
                    continue;
                }
                Child::Found { rel, stat, target } => (rel, stat, target),
            };
            let st = match stat {
                Ok(st) => st,
                // Deleted between readdir and stat on a live tree: not an error.
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", self.show(&rel))),
            };
            let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            let kind = match fmt {
                SFlag::S_IFREG => Kind::File,
                SFlag::S_IFDIR => Kind::Dir,
                SFlag::S_IFLNK => Kind::Symlink,
                SFlag::S_IFIFO => Kind::Fifo,
                other => {
                    let reason = if other == SFlag::S_IFSOCK {
                        "socket (recreated by the daemon that owns it)"
                    } else {
                        "device file (not mirrored)"
                    };
                    self.manifest.skipped.push(Skipped {
                        path: rel,
                        reason: reason.to_string(),
                    });
                    continue;
                }
            };
            let target = match target {
                Some(Ok(t)) => Some(t),
                None => None,
                Some(Err(Errno::ENOENT)) => continue,
                Some(Err(e)) => {
                    return Err(e).with_context(|| format!("reading link {}", self.show(&rel)))
                }
            };
            let hash = if kind == Kind::File && self.opts.checksum {
                match self.hash_at(&dir, OsStr::from_bytes(split(&rel).1), &rel, &st) {
                    Ok(h) => Some(h),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(e).with_context(|| format!("hashing {}", self.show(&rel)))
                    }
                }
            } else {
                None
            };
            self.push(&rel, kind, &st, target, hash)?;
            if kind == Kind::Dir {
                self.dir(lister, &rel)?;
            }
        }
        Ok(())
    }

    fn hash_at(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        rel: &[u8],
        st: &FileStat,
    ) -> io::Result<Digest> {
        let stamp = stamp_of_stat(st);
        if let Some(d) = self.cache.get(rel, &stamp) {
            return Ok(d);
        }
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)?;
        let mut file = File::from(fd);
        let digest = hash_reader(&mut file)?;
        // Only remember the hash if the file did not change while we read it.
        if Stamp::of(&file.metadata()?) == stamp {
            self.cache.put(rel.into(), stamp, digest);
        }
        Ok(digest)
    }

    fn push(
        &mut self,
        path: &[u8],
        kind: Kind,
        st: &FileStat,
        target: Option<Vec<u8>>,
        hash: Option<Digest>,
    ) -> Result<()> {
        let meta = meta_of_stat(st, &mut self.names);
        (self.each)(Entry {
            path: path.into(),
            kind,
            size: if kind == Kind::File {
                st.st_size as u64
            } else {
                0
            },
            meta,
            dev: st.st_dev,
            ino: st.st_ino,
            nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            target: target.map(RelPath::from),
            hash: hash.map(Box::new),
        })
    }
}

/// The manifest of the tree at `root`.
#[cfg(test)]
pub fn scan(root: &Path, opts: &ScanOptions, cache: &mut HashCache) -> Result<Manifest> {
    let mut entries = Vec::new();
    let mut m = scan_each(root, opts, cache, &mut |e| {
        entries.push(e);
        Ok(())
    })?;
    m.entries = entries;
    Ok(m)
}

/// Scans the tree at `root`, handing each entry to `each` as it is found, in walk order
/// (`settle::walk_order`); the manifest returned has everything else. An error from `each`
/// ends the scan.
pub fn scan_each(
    root: &Path,
    opts: &ScanOptions,
    cache: &mut HashCache,
    each: &mut dyn FnMut(Entry) -> Result<()>,
) -> Result<Manifest> {
    let excludes = Excludes::new(&opts.excludes)?;
    // The root is followed when it is a symlink: it names the tree, the user chose it.
    let root_fd = match openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(Manifest::default()),
        Err(Errno::ENOTDIR) => bail!(
            "{} is not a directory; sync mirrors the contents of a directory",
            root.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("opening {}", root.display())),
    };
    let st = fstat(&root_fd).with_context(|| format!("reading {}", root.display()))?;
    let mut walk = Walk {
        root,
        opts,
        cache,
        names: Names::default(),
        manifest: Manifest {
            root_exists: true,
            ..Manifest::default()
        },
        each,
    };
    walk.push(b"", Kind::Dir, &st, None, None)?;
    let lister = Lister::new(Arc::new(root_fd), excludes);
    std::thread::scope(|s| {
        for _ in 0..LISTERS {
            s.spawn(|| lister.work());
        }
        let walked = walk.dir(&lister, b"");
        lister.stop();
        walked
    })?;
    Ok(walk.manifest)
}

/// Threads that hash the files of one request: a re-sync's rename candidates are thousands
/// of small files, and on a host of its own an agent has idle cores. (On the benchmark's
/// two cores, shared by both agents, the delta was no faster: 2.3k files took 70-100 ms on
/// each side either way, DEST's mostly loading its cache and opening files.)
const HASHERS: usize = 4;

/// The hashes of `paths` in the tree at `root`, in their order, from the cache when its
/// stamps match, else by reading; `None` for a path gone or no longer a regular file.
pub fn hash_paths(
    root: &Path,
    paths: &[Vec<u8>],
    cache: &mut HashCache,
) -> Result<Vec<Option<Digest>>> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(HASHERS)
        .min(paths.len())
        .max(1);
    cache.want(paths.iter().map(|p| &p[..]));
    let next = AtomicUsize::new(0);
    let cache = Mutex::new(cache);
    // Each thread's answers, by their place in `paths`.
    type Answers = Vec<(usize, Option<Digest>)>;
    let hashed: Vec<Result<Answers>> = std::thread::scope(|s| {
        let hashers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut tree = Tree::open_existing(root)?;
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(rel) = paths.get(i) else {
                            return Ok(out);
                        };
                        // A file that cannot be read simply has no hash.
                        out.push((i, hash_path(&mut tree, rel, &cache).ok().flatten()));
                    }
                })
            })
            .collect();
        hashers
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a hashing thread panicked")))
            })
            .collect()
    });
    let mut digests = vec![None; paths.len()];
    for part in hashed {
        for (i, digest) in part? {
            digests[i] = digest;
        }
    }
    Ok(digests)
}

/// The hash of regular file `rel` in `tree`; the cache is held only to look up and store.
fn hash_path(tree: &mut Tree, rel: &[u8], cache: &Mutex<&mut HashCache>) -> Result<Option<Digest>> {
    let Some(mut f) = tree.open_file(rel)? else {
        return Ok(None);
    };
    let stamp = Stamp::of(&f.metadata()?);
    if let Some(d) = locked(cache).get(rel, &stamp) {
        return Ok(Some(d));
    }
    let digest = hash_reader(&mut f).with_context(|| format!("hashing {}", tree.show(rel)))?;
    // Only remember the hash if the file did not change while we read it.
    if Stamp::of(&f.metadata()?) == stamp {
        locked(cache).put(rel.into(), stamp, digest);
    }
    Ok(Some(digest))
}

/// The cache behind `cache`; a thread that panicked holding it left it whole (a lookup or an
/// insert), so it stays usable.
fn locked<'a, 'c>(
    cache: &'a Mutex<&'c mut HashCache>,
) -> std::sync::MutexGuard<'a, &'c mut HashCache> {
    cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// [`hash_reader`]'s buffer, one per thread. A fresh one per file was 256 KiB to zero for
    /// every file hashed: for the 2311 renamed messages of the benchmark's delta, more bytes
    /// than the messages themselves (perf: memset beside SHA-256).
    static HASH_BUFFER: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 256 * 1024]);
}

pub fn hash_reader(r: &mut impl Read) -> io::Result<Digest> {
    HASH_BUFFER.with_borrow_mut(|buf| {
        let mut hasher = Sha256::new();
        loop {
            let n = match r.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
        }
        Ok(hasher.finalize().into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::mpsc;
    use std::time::Duration;

    /// `hash_paths` in a thread, so that a hang fails the test instead of blocking it.
    fn hash_soon(root: &Path, rel: &'static [u8]) -> Option<Digest> {
        let root = root.to_path_buf();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let hashed = hash_paths(&root, &[rel.to_vec()], &mut HashCache::disabled()).unwrap();
            let _ = tx.send(hashed[0]);
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("hashing hung")
    }

    #[test]
    fn hashes_come_back_in_the_order_asked_whichever_thread_read_them() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join("d")).unwrap();
        let mut paths = Vec::new();
        for i in (0..300).rev() {
            fs::write(t.path().join(format!("d/{i}")), i.to_string().repeat(i)).unwrap();
            paths.push(format!("d/{i}").into_bytes());
        }
        paths.insert(150, b"d/missing".to_vec());
        let hashed = hash_paths(t.path(), &paths, &mut HashCache::disabled()).unwrap();
        assert_eq!(hashed.len(), paths.len());
        for (path, digest) in paths.iter().zip(hashed) {
            let expected = fs::read(t.path().join(OsStr::from_bytes(path)))
                .ok()
                .map(|content| Digest::from(Sha256::digest(content)));
            assert_eq!(digest, expected, "{}", String::from_utf8_lossy(path));
        }
    }

    #[test]
    fn hash_requests_neither_follow_a_swapped_directory_nor_hang_on_a_fifo() {
        let t = tempfile::tempdir().unwrap();
        let (src, outside) = (t.path().join("src"), t.path().join("outside"));
        fs::create_dir_all(src.join("d")).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(src.join("d/f"), b"x").unwrap();
        fs::write(outside.join("f"), b"secret").unwrap();
        fs::write(src.join("plain"), b"x").unwrap();
        assert_eq!(hash_soon(&src, b"plain"), Some(Sha256::digest(b"x").into()));

        fs::rename(src.join("d"), src.join("d.old")).unwrap();
        symlink(&outside, src.join("d")).unwrap();
        assert_eq!(hash_soon(&src, b"d/f"), None);

        fs::remove_file(src.join("plain")).unwrap();
        nix::unistd::mkfifo(&src.join("plain"), Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(hash_soon(&src, b"plain"), None);
    }
}
