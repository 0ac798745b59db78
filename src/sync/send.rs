//! The sending side: reads the entries the plan asks for from SRC and writes the stream.
//! SRC may be live (the first copy runs while mail flows): an entry that vanished, changed
//! type or grew since the scan is reported in the trailer, not treated as an error (the next
//! run copies it); a file is sent with its metadata and content as they are when it is read.
//!
//! Every entry is read through a [`Tree`]: a directory swapped for a symlink since the scan
//! makes the entries under it "vanished", never a read outside SRC.

use crate::sync::beneath::Tree;
use crate::sync::compress::{Compression, LevelsTaken, Output};
use crate::sync::hash_cache::{hex, HashCache, Stamp};
use crate::sync::manifest::Kind;
use crate::sync::plan::SendItem;
use crate::sync::scan::{hash_reader, meta_of, meta_of_stat, Names};
use crate::sync::stream::{StreamWriter, Trailer};
use anyhow::{Context, Result};
use foldhash::{HashMap, HashMapExt, HashSet};
use nix::fcntl::readlinkat;
use nix::sys::stat::SFlag;
use sha2::{Digest as _, Sha256};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Files up to this size are read once into memory (hash, then send from the buffer);
/// larger ones are read twice, once to hash and once to send.
const BUFFERED_MAX: u64 = 16 << 20;

#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    pub compression: Compression,
    /// zstd workers.
    pub threads: u32,
}

/// Sends the entries; returns, for an adaptive stream, the uncompressed bytes taken at each
/// zstd level.
pub fn send(
    root: &Path,
    items: &[SendItem],
    out: impl Write,
    opts: SendOptions,
    cache: &mut HashCache,
) -> Result<LevelsTaken> {
    let mut tree = Tree::open_existing(root)?;
    let mut stream = StreamWriter::new(Output::new(out, opts.compression, opts.threads)?);
    let mut names = Names::default();
    let mut vanished = Vec::new();
    let mut groups = Groups::of(items);
    let mut buf = Vec::new();
    for item in items {
        // The controller is trusted, but a sender never reads outside its tree either.
        crate::sync::beneath::validate(&item.path).context("refusing a send request")?;
        let sent = send_one(
            &mut stream,
            &mut tree,
            item,
            &mut names,
            cache,
            &mut groups,
            &mut buf,
        )
        .with_context(|| format!("sending {}", tree.show(&item.path)))?;
        if !sent {
            vanished.push(hex(&item.path));
        }
    }
    let output = stream
        .finish(Trailer {
            members: 0,
            vanished,
        })
        .context("finishing the stream")?;
    let (mut out, levels) = output.finish()?;
    out.flush()?;
    Ok(levels)
}

/// Hard-link groups, each named by its first planned member: the member actually sent as a
/// file, in case the planned one vanished. Only groups are kept (a copy of every path sent,
/// twice over, was 14 MB of a 52 MB sender on 56k files).
struct Groups<'a> {
    named: HashSet<&'a [u8]>,
    sent_as: HashMap<&'a [u8], &'a [u8]>,
}

impl<'a> Groups<'a> {
    fn of(items: &'a [SendItem]) -> Groups<'a> {
        Groups {
            named: items.iter().filter_map(|i| i.link_to.as_deref()).collect(),
            sent_as: HashMap::new(),
        }
    }

    /// The member of `group` sent as a file, if one was.
    fn sent_as(&self, group: &[u8]) -> Option<&'a [u8]> {
        self.sent_as.get(group).copied()
    }

    /// `item` was sent as a file: the first of its group so sent is the one to link to.
    fn sent(&mut self, item: &'a SendItem) {
        let group = item.link_to.as_deref().unwrap_or(&item.path);
        if self.named.contains(group) {
            self.sent_as.entry(group).or_insert(&item.path);
        }
    }
}

/// Sends one entry; `Ok(false)` when it is gone, changed type or grew since the scan.
fn send_one<'a, W: Write>(
    stream: &mut StreamWriter<W>,
    tree: &mut Tree,
    item: &'a SendItem,
    names: &mut Names,
    cache: &mut HashCache,
    groups: &mut Groups<'a>,
    buf: &mut Vec<u8>,
) -> Result<bool> {
    match item.kind {
        Kind::File => {}
        Kind::Symlink => {
            let Some((dir, name, st)) = tree.stat_if(&item.path, SFlag::S_IFLNK)? else {
                return Ok(false);
            };
            // Relative to the held parent: the link read is the one just stat'ed.
            let target = match readlinkat(dir.as_fd(), name) {
                Ok(t) => t,
                Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::EINVAL) => {
                    return Ok(false)
                }
                Err(e) => return Err(e).context("reading the link"),
            };
            stream.symlink(
                &item.path,
                &meta_of_stat(&st, names),
                target.as_os_str().as_bytes(),
            )?;
            return Ok(true);
        }
        Kind::Fifo => {
            let Some((_, _, st)) = tree.stat_if(&item.path, SFlag::S_IFIFO)? else {
                return Ok(false);
            };
            stream.fifo(&item.path, &meta_of_stat(&st, names))?;
            return Ok(true);
        }
        Kind::Dir => return Ok(false),
    }
    if let Some(primary) = &item.link_to {
        if let Some(actual) = groups.sent_as(primary) {
            let Some((_, _, st)) = tree.stat_if(&item.path, SFlag::S_IFREG)? else {
                return Ok(false);
            };
            stream.hardlink(&item.path, &meta_of_stat(&st, names), actual)?;
            return Ok(true);
        }
    }
    let Some(mut file) = tree.open_file(&item.path)? else {
        return Ok(false);
    };
    let md = file.metadata()?;
    let size = md.len();
    // The receiver refuses a member larger than planned (a bound on what a peer can make it
    // write); a file that grew since the scan is left for the next run.
    if size > item.size {
        return Ok(false);
    }
    let meta = meta_of(&md, names);
    let cached = cache.get(&item.path, &Stamp::of(&md));
    if size <= BUFFERED_MAX {
        buf.clear();
        (&mut file).take(size).read_to_end(buf)?;
        // A file that shrank is sent as read; one that grew, up to the size it had.
        let digest = match cached {
            Some(d) if buf.len() as u64 == size => d,
            _ => Sha256::digest(&buf[..]).into(),
        };
        stream.file(&item.path, &meta, buf.len() as u64, &digest, &buf[..])?;
    } else {
        let digest = match cached {
            Some(d) => d,
            None => {
                let d = hash_reader(&mut (&mut file).take(size))?;
                file.seek(io::SeekFrom::Start(0))?;
                d
            }
        };
        // If the file shrinks while it is sent, pad: the receiver's hash check rejects it.
        let data = (&mut file).take(size).chain(io::repeat(0)).take(size);
        stream.file(&item.path, &meta, size, &digest, data)?;
    }
    groups.sent(item);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::beneath::Tree;
    use crate::sync::manifest::Manifest;
    use crate::sync::plan::{self, PlanOptions};
    use crate::sync::receive::{Durability, ReceiveStats, Receiver};
    use crate::sync::scan::{scan, ScanOptions};
    use std::fs;
    use std::os::unix::fs::symlink;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Scans `src`, lets `change` alter it (the live source between scan and send), then
    /// sends the plan for an empty DEST and receives it into `dest`.
    fn sync_with_change(src: &Path, dest: &Path, change: impl FnOnce()) -> ReceiveStats {
        let manifest = scan(src, &ScanOptions::default(), &mut HashCache::disabled()).unwrap();
        let plan = plan::build(&manifest, &Manifest::default(), &PlanOptions::default()).unwrap();
        change();
        let (tx, rx) = mpsc::channel();
        let (src_owned, items) = (src.to_path_buf(), plan.send.clone());
        // A hang (a FIFO opened for reading) must fail the test, not block it.
        std::thread::spawn(move || {
            let mut wire = Vec::new();
            let opts = SendOptions {
                compression: Compression::Level(1),
                threads: 1,
            };
            let r = send(
                &src_owned,
                &items,
                &mut wire,
                opts,
                &mut HashCache::disabled(),
            );
            let _ = tx.send(r.map(|_| wire));
        });
        let wire = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the sender hung")
            .unwrap();
        let tree = Tree::open(dest).unwrap();
        Receiver::new(tree, &plan, HashCache::disabled(), Durability::Syncfs)
            .run(&wire[..], |_| {})
            .unwrap()
    }

    fn vanished(stats: &ReceiveStats) -> Vec<String> {
        let mut v: Vec<String> = stats
            .vanished
            .iter()
            .map(|s| String::from_utf8_lossy(&s.path).into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_after_the_scan_is_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest, outside) = (
            t.path().join("src"),
            t.path().join("dest"),
            t.path().join("rootonly"),
        );
        fs::create_dir_all(src.join("alice/zz")).unwrap();
        fs::write(src.join("alice/big"), b"big").unwrap();
        fs::write(src.join("alice/zz/notes"), b"mine").unwrap();
        symlink("notes", src.join("alice/zz/link")).unwrap();
        nix::unistd::mkfifo(
            &src.join("alice/zz/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("notes"), b"ROOT-ONLY SECRET").unwrap();
        symlink("/etc/shadow", outside.join("link")).unwrap();
        nix::unistd::mkfifo(
            &outside.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();

        let stats = sync_with_change(&src, &dest, || {
            fs::rename(src.join("alice/zz"), src.join("alice/zz.old")).unwrap();
            symlink(&outside, src.join("alice/zz")).unwrap();
        });

        assert_eq!(
            vanished(&stats),
            ["alice/zz/fifo", "alice/zz/link", "alice/zz/notes"]
        );
        assert_eq!(fs::read(dest.join("alice/big")).unwrap(), b"big");
        for name in ["notes", "link", "fifo"] {
            assert!(
                fs::symlink_metadata(dest.join("alice/zz").join(name)).is_err(),
                "{name} from outside SRC landed in DEST"
            );
        }
        for entry in walkdir::WalkDir::new(&dest) {
            let entry = entry.unwrap();
            if entry.file_type().is_file() {
                assert_ne!(fs::read(entry.path()).unwrap(), b"ROOT-ONLY SECRET");
            }
        }
    }

    #[test]
    fn a_hard_link_group_whose_first_member_vanished_arrives_linked_to_the_next() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("src"), t.path().join("dest"));
        fs::create_dir(&src).unwrap();
        fs::write(src.join("a"), b"shared").unwrap();
        fs::hard_link(src.join("a"), src.join("b")).unwrap();
        fs::hard_link(src.join("a"), src.join("c")).unwrap();
        fs::write(src.join("d"), b"alone").unwrap();

        let stats = sync_with_change(&src, &dest, || fs::remove_file(src.join("a")).unwrap());

        assert_eq!(vanished(&stats), ["a"]);
        let (b, c) = (
            fs::metadata(dest.join("b")).unwrap(),
            fs::metadata(dest.join("c")).unwrap(),
        );
        assert_eq!((b.ino(), b.nlink()), (c.ino(), 2));
        assert_eq!(fs::read(dest.join("c")).unwrap(), b"shared");
        assert_eq!(fs::read(dest.join("d")).unwrap(), b"alone");
    }

    #[test]
    fn a_fifo_or_symlink_swapped_in_for_a_file_is_reported_not_read() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("src"), t.path().join("dest"));
        fs::create_dir_all(&src).unwrap();
        for name in ["a", "b", "c"] {
            fs::write(src.join(name), name).unwrap();
        }
        let stats = sync_with_change(&src, &dest, || {
            fs::remove_file(src.join("a")).unwrap();
            nix::unistd::mkfifo(
                &src.join("a"),
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .unwrap();
            fs::remove_file(src.join("b")).unwrap();
            symlink("/etc/passwd", src.join("b")).unwrap();
        });
        assert_eq!(vanished(&stats), ["a", "b"]);
        assert_eq!(fs::read(dest.join("c")).unwrap(), b"c");
        assert!(fs::symlink_metadata(dest.join("a")).is_err());
        assert!(fs::symlink_metadata(dest.join("b")).is_err());
    }

    #[test]
    fn a_file_that_grew_since_the_scan_is_left_for_the_next_run() {
        let t = tempfile::tempdir().unwrap();
        let (src, dest) = (t.path().join("src"), t.path().join("dest"));
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("mbox"), b"one\n").unwrap();
        fs::write(src.join("shrunk"), b"four").unwrap();
        let stats = sync_with_change(&src, &dest, || {
            fs::write(src.join("mbox"), b"one\ntwo\n").unwrap();
            fs::write(src.join("shrunk"), b"4").unwrap();
        });
        assert_eq!(vanished(&stats), ["mbox"]);
        assert!(fs::symlink_metadata(dest.join("mbox")).is_err());
        assert_eq!(fs::read(dest.join("shrunk")).unwrap(), b"4");
    }
}
