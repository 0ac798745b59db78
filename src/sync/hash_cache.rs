//! A per-tree cache of content hashes, keyed by path and validated by inode, size, mtime and
//! ctime, so repeated passes over an unchanged tree do not re-read it.
//!
//! Why ctime: no user-space call can set it, so any write, chmod, chown or rename of the inode
//! changes it; an entry whose four stamps all match describes the same bytes.
//! The cache lives in `/var/lib/relaymove/cache` for root (else `$XDG_CACHE_HOME/relaymove` or
//! `~/.cache/relaymove`; `RELAYMOVE_CACHE_DIR` overrides), one file per tree, mode 0600.

use crate::sync::manifest::{raw_path, Digest, RelPath};
use anyhow::{Context, Result};
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest as _, Sha256};
use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::hash::BuildHasher;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The stamps that must all match for a cached hash to be trusted.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Stamp {
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub ctime: i64,
    pub ctime_nsec: i64,
}

impl Stamp {
    /// The stamps of a hash put before its file's are final (see [`HashCache::restamp`]); no
    /// file has inode 0, so none matches it.
    pub const PENDING: Stamp = Stamp {
        ino: 0,
        size: 0,
        mtime: 0,
        mtime_nsec: 0,
        ctime: 0,
        ctime_nsec: 0,
    };

    pub fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// One file's cached hash.
struct Cached {
    path: RelPath,
    stamp: Stamp,
    digest: Digest,
}

/// The cache's entries in a list, found by path through a table of their numbers. A slot of
/// the table takes 4 bytes; in a map of path to stamp and digest it took 96, and on the
/// receiver of a 56k-file delta that map's table doubled to 131,072 slots (12 MB, beside the
/// old one while it moved) when the files placed were added to it.
struct Map {
    entries: Vec<Cached>,
    table: hashbrown::HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl Map {
    fn new() -> Map {
        Map {
            entries: Vec::new(),
            table: hashbrown::HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn slot(&self, path: &[u8]) -> Option<usize> {
        let entries = &self.entries;
        self.table
            .find(self.hasher.hash_one(path), |&i| {
                *entries[i as usize].path == *path
            })
            .map(|&i| i as usize)
    }

    fn get(&self, path: &[u8]) -> Option<&Cached> {
        self.slot(path).map(|i| &self.entries[i])
    }

    fn insert(&mut self, c: Cached) {
        if let Some(i) = self.slot(&c.path) {
            self.entries[i] = c;
            return;
        }
        let (entries, hasher) = (&self.entries, &self.hasher);
        // A u32 numbers more entries than a cache could hold (4G of 100 bytes).
        let i = entries.len() as u32;
        self.table
            .insert_unique(hasher.hash_one(&*c.path), i, |&j| {
                hasher.hash_one(&*entries[j as usize].path)
            });
        self.entries.push(c);
    }

    fn remove(&mut self, path: &[u8]) -> bool {
        let Some(i) = self.slot(path) else {
            return false;
        };
        let hash = self.hasher.hash_one(path);
        if let Ok(slot) = self.table.find_entry(hash, |&j| j as usize == i) {
            slot.remove();
        }
        self.entries.swap_remove(i);
        // The last entry moved into the gap: its slot follows it.
        if let Some(moved) = self.entries.get(i) {
            let last = self.entries.len() as u32;
            let hash = self.hasher.hash_one(&*moved.path);
            if let Some(slot) = self.table.find_mut(hash, |&j| j == last) {
                *slot = i as u32;
            }
        }
        true
    }

    fn retain(&mut self, keep: impl FnMut(&Cached) -> bool) {
        self.entries.retain(keep);
        self.reindex();
    }

    /// The table rebuilt from the list, sized for it.
    fn reindex(&mut self) {
        let (entries, hasher) = (&self.entries, &self.hasher);
        let hash = |j: &u32| hasher.hash_one(&*entries[*j as usize].path);
        let mut table = hashbrown::HashTable::with_capacity(entries.len());
        for i in 0..entries.len() as u32 {
            table.insert_unique(hash(&i), i, hash);
        }
        self.table = table;
    }
}

pub struct HashCache {
    file: Option<PathBuf>,
    /// What this run learned: the hashes put since the file was read, and the paths
    /// forgotten. Only these are held whole; the file's own entries are read when they are
    /// asked for, and merged with these when the file is rewritten. A re-sync's cache then
    /// weighs what changed, not the tree (measured on DEST's agent of a 56k-file delta: the
    /// whole file read into a map was some 10 of its 26 MB).
    put: Map,
    gone: HashSet<RelPath, foldhash::fast::RandomState>,
    /// The file's entries looked up so far.
    read: Read,
    dirty: bool,
}

enum Read {
    /// Nothing yet.
    Nothing,
    /// The entries of the paths `want` asked for, and the hashes of those paths (found in
    /// the file or not): a `get` for any other path reads the whole file.
    Asked {
        index: Map,
        asked: HashSet<u64, foldhash::fast::RandomState>,
    },
    All(Map),
}

/// The cache file is a zstd-compressed postcard sequence of `(path, stamp, digest)`, rewritten
/// as the old file's entries that still hold, one at a time as they are read, then this run's:
/// never a second copy of the cache in memory (measured on a 66k-file receive: 48 MB of a
/// 62 MB heap peak before).
struct Merged<'a> {
    cache: &'a HashCache,
    /// How many of the old file's entries still hold, counted by a first reading.
    kept: usize,
}

impl Serialize for Merged<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error as _, SerializeSeq};
        let cache = self.cache;
        let mut seq = s.serialize_seq(Some(self.kept + cache.put.len()))?;
        let (mut kept, mut failed) = (0, None);
        read_entries(&cache.file, |path, stamp, digest| {
            if failed.is_none() && kept < self.kept && cache.holds(&path) {
                let entry = (raw_path::Borrowed(&path), &stamp, &digest);
                match seq.serialize_element(&entry) {
                    Ok(()) => kept += 1,
                    Err(e) => failed = Some(e),
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        if kept != self.kept {
            return Err(S::Error::custom(
                "the old cache file changed while it was rewritten",
            ));
        }
        for c in &cache.put.entries {
            seq.serialize_element(&(raw_path::Borrowed(&c.path), &c.stamp, &c.digest))?;
        }
        seq.end()
    }
}

/// Hands each entry of the file to its closure as it is decoded.
struct EachEntry<F>(F);

impl<'de, F: FnMut(RelPath, Stamp, Digest)> DeserializeSeed<'de> for EachEntry<F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(RelPath, Stamp, Digest)> Visitor<'de> for EachEntry<F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("hash cache entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while let Some((raw_path::Owned(path), stamp, digest)) = seq.next_element()? {
            (self.0)(path, stamp, digest);
        }
        Ok(())
    }
}

/// Calls `each` for every entry of the cache file: none when it is missing, those before the
/// damage when it is damaged (each still whole: its stamps are checked before its hash is
/// used).
fn read_entries(file: &Option<PathBuf>, each: impl FnMut(RelPath, Stamp, Digest)) {
    let Some(Ok(decoder)) = file
        .as_ref()
        .and_then(|f| fs::File::open(f).ok())
        .map(zstd::Decoder::new)
    else {
        return;
    };
    // Postcard reads a path byte by byte: from a buffer, not from the decompressor.
    let decoded = io::BufReader::with_capacity(64 << 10, decoder);
    // Each path is copied into the scratch space; a longer one makes the cache unreadable,
    // that is empty.
    let mut scratch = vec![0u8; 64 << 10];
    let reader = postcard::de_flavors::io::io::IOReader::new(decoded, &mut scratch);
    // What was read before an error stands; the cache only ever saves work.
    let _ = EachEntry(each).deserialize(&mut postcard::Deserializer::from_flavor(reader));
}

/// The entries of the cache file that `wanted` picks, in a map; what a damaged file held
/// before its damage.
fn load(file: &Option<PathBuf>, mut wanted: impl FnMut(&[u8]) -> bool, into: &mut Map) {
    read_entries(file, |path, stamp, digest| {
        if wanted(&path) {
            into.entries.push(Cached {
                path,
                stamp,
                digest,
            })
        }
    });
    // A file lists each path once; should one be listed twice, the table finds one of
    // them, either a hash whose stamps are checked before it is used.
    into.reindex();
}

impl HashCache {
    /// The cache for the tree at `root`. A missing or unreadable cache is empty; the cache
    /// only ever saves work, it never decides anything on its own.
    pub fn open(root: &Path) -> HashCache {
        let file = cache_dir().map(|dir| {
            let canonical = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
            let key = Sha256::digest(canonical.as_os_str().as_bytes());
            dir.join(format!("{}.hashes", hex(&key[..16])))
        });
        HashCache::in_file(file)
    }

    /// A cache kept in `file`, whatever tree it is for.
    #[cfg(test)]
    pub fn at(file: PathBuf) -> HashCache {
        HashCache::in_file(Some(file))
    }

    /// A cache that remembers nothing and saves nowhere.
    pub fn disabled() -> HashCache {
        HashCache::in_file(None)
    }

    fn in_file(file: Option<PathBuf>) -> HashCache {
        HashCache {
            file,
            put: Map::new(),
            gone: HashSet::default(),
            read: Read::Nothing,
            dirty: false,
        }
    }

    /// Whether the file's entry for `path`, if it has one, is still this cache's.
    fn holds(&self, path: &[u8]) -> bool {
        self.put.get(path).is_none() && !self.gone.contains(path)
    }

    /// Reads the file's entries for `paths` (those not asked for before), so that `get`
    /// answers for them without reading the whole file.
    pub fn want<'p>(&mut self, paths: impl IntoIterator<Item = &'p [u8]>) {
        let (mut index, mut asked) = match std::mem::replace(&mut self.read, Read::Nothing) {
            // Read whole, the cache answers for every path already.
            all @ Read::All(_) => {
                self.read = all;
                return;
            }
            Read::Asked { index, asked } => (index, asked),
            Read::Nothing => (Map::new(), HashSet::default()),
        };
        let new: HashSet<&[u8], foldhash::fast::RandomState> = paths
            .into_iter()
            .filter(|p| self.holds(p) && asked.insert(index.hasher.hash_one(p)))
            .collect();
        if !new.is_empty() {
            load(&self.file, |p| new.contains(p), &mut index);
        }
        self.read = Read::Asked { index, asked };
    }

    pub fn get(&mut self, path: &[u8], stamp: &Stamp) -> Option<Digest> {
        let found = match (self.put.get(path), &self.read) {
            (Some(c), _) => Some(c),
            _ if self.gone.contains(path) => None,
            (None, Read::All(index)) => index.get(path),
            (None, Read::Asked { index, asked })
                if asked.contains(&index.hasher.hash_one(path)) =>
            {
                index.get(path)
            }
            (None, _) => {
                let mut all = Map::new();
                load(&self.file, |_| true, &mut all);
                self.read = Read::All(all);
                return self.get(path, stamp);
            }
        };
        found.filter(|c| c.stamp == *stamp).map(|c| c.digest)
    }

    /// A receiver passes the plan's path, so the cache shares it instead of copying it.
    pub fn put(&mut self, path: RelPath, stamp: Stamp, digest: Digest) {
        if !self.gone.is_empty() {
            self.gone.remove(&path[..]);
        }
        self.put.insert(Cached {
            path,
            stamp,
            digest,
        });
        self.dirty = true;
    }

    /// Room for `n` more hashes: a first copy's receiver puts one for every file, and a list
    /// grown by doubling held twice that for a moment (its table rehashed every path each time).
    pub fn reserve(&mut self, n: usize) {
        let map = &mut self.put;
        map.entries.reserve_exact(n);
        let (entries, hasher) = (&map.entries, &map.hasher);
        map.table
            .reserve(n, |&j| hasher.hash_one(&*entries[j as usize].path));
    }

    /// Gives each hash put with [`Stamp::PENDING`] its file's stamps, now final (a receiver
    /// sets a file's mtime, which changes its ctime, after placing it); forgets those whose
    /// file `stamp_of` cannot stamp.
    pub fn restamp(&mut self, mut stamp_of: impl FnMut(&[u8]) -> Option<Stamp>) {
        let mut lost = false;
        for c in self.put.entries.iter_mut() {
            if c.stamp == Stamp::PENDING {
                match stamp_of(&c.path) {
                    Some(stamp) => c.stamp = stamp,
                    None => lost = true,
                }
            }
        }
        if lost {
            self.put.retain(|c| c.stamp != Stamp::PENDING);
        }
    }

    pub fn remove(&mut self, path: &[u8]) {
        self.put.remove(path);
        self.gone.insert(path.into());
        self.dirty = true;
    }

    /// Drops entries for paths no longer in the tree: reads the file through once, and
    /// remembers only what must go.
    pub fn retain(&mut self, keep: impl Fn(&[u8]) -> bool) {
        let before = self.put.len();
        self.put.retain(|c| keep(&c.path));
        self.dirty |= self.put.len() != before;
        let mut dropped = Vec::new();
        read_entries(&self.file, |path, _, _| {
            if !keep(&path) {
                dropped.push(path)
            }
        });
        self.dirty |= !dropped.is_empty();
        self.gone.extend(dropped);
    }

    /// Writes the cache atomically (temp file, rename). Failure to save is not fatal to a sync.
    pub fn save(&mut self) -> Result<()> {
        if let Some(written) = self.write()? {
            written.commit()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// The first half of [`save`](Self::save): the cache in a temporary file beside its own,
    /// which [`Written::commit`] puts in its place. `None` when there is nothing to save.
    pub fn write(&mut self) -> Result<Option<Written>> {
        let Some(file) = self.file.as_ref().filter(|_| self.dirty) else {
            return Ok(None);
        };
        let dir = file.parent().context("cache path has no parent")?;
        // Explicit modes: the receiver runs with a zero umask.
        std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let md = fs::metadata(dir)?;
        if md.mode() & 0o077 != 0 {
            fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .with_context(|| format!("restricting {}", dir.display()))?;
        }
        // Postcard writes a sequence's length first.
        let mut kept = 0;
        read_entries(&self.file, |path, _, _| {
            kept += usize::from(self.holds(&path))
        });
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        let merged = Merged { cache: self, kept };
        let result = zstd::Encoder::new(f, 1)
            .context("compressing the hash cache")
            .and_then(|packed| {
                postcard::to_io(&merged, io::BufWriter::with_capacity(64 << 10, packed))
                    .context("encoding the hash cache")
            })
            .and_then(|w| {
                w.into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|packed| packed.finish())
                    .with_context(|| format!("writing {}", tmp.display()))
            });
        let written = Written {
            tmp: Some(tmp),
            file: file.clone(),
        };
        result?;
        Ok(Some(written))
    }
}

/// A saved cache not yet in place; dropped uncommitted, its file is removed.
pub struct Written {
    tmp: Option<PathBuf>,
    file: PathBuf,
}

impl Written {
    pub fn commit(mut self) -> Result<()> {
        if let Some(tmp) = &self.tmp {
            // On failure the temporary file goes with `self`.
            fs::rename(tmp, &self.file)
                .with_context(|| format!("renaming to {}", self.file.display()))?;
        }
        self.tmp = None;
        Ok(())
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = fs::remove_file(tmp);
        }
    }
}

fn cache_dir() -> Option<PathBuf> {
    cache_dir_for(nix::unistd::geteuid().is_root(), |key| {
        std::env::var_os(key)
    })
}

/// Where the caches of a user (`root` or not) with environment `env` live. `remote::cleanup`
/// finds them by the same rules in shell; its tests hold the two together.
pub(crate) fn cache_dir_for(root: bool, env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    if let Some(dir) = env("RELAYMOVE_CACHE_DIR") {
        return (!dir.is_empty()).then(|| PathBuf::from(dir));
    }
    if root {
        return Some(PathBuf::from("/var/lib/relaymove/cache"));
    }
    if let Some(x) = env("XDG_CACHE_HOME") {
        return Some(PathBuf::from(x).join("relaymove"));
    }
    env("HOME").map(|h| PathBuf::from(h).join(".cache/relaymove"))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hex_digest(s: &str) -> Option<Digest> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d: Digest = Sha256::digest(b"abc").into();
        assert_eq!(parse_hex_digest(&hex(&d)), Some(d));
        assert_eq!(parse_hex_digest("zz"), None);
        assert_eq!(parse_hex_digest(&"g".repeat(64)), None);
    }

    fn stamp(ino: u64) -> Stamp {
        Stamp {
            ino,
            size: 2,
            mtime: 3,
            mtime_nsec: 4,
            ctime: 5,
            ctime_nsec: 6,
        }
    }

    #[test]
    fn pruning_reads_the_file_through_and_remembers_only_what_goes() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("c.hashes");
        let at = || HashCache::at(file.clone());
        let mut c = at();
        c.put(b"a"[..].into(), stamp(1), [1; 32]);
        c.put(b"b"[..].into(), stamp(2), [2; 32]);
        c.save().unwrap();

        let mut c = at();
        c.retain(|_| true);
        assert!(matches!(c.read, Read::Nothing) && c.gone.is_empty() && !c.dirty);
        assert_eq!(c.get(b"b", &stamp(2)), Some([2; 32]));

        let mut c = at();
        c.retain(|p| p != b"a");
        assert!(matches!(c.read, Read::Nothing) && c.dirty);
        assert_eq!(c.gone.iter().map(|p| &p[..]).collect::<Vec<_>>(), [b"a"]);
        c.save().unwrap();
        let mut c = at();
        assert_eq!(c.get(b"a", &stamp(1)), None);
        assert_eq!(c.get(b"b", &stamp(2)), Some([2; 32]));

        // A damaged file is an empty cache, left alone by pruning.
        fs::write(&file, b"not zstd").unwrap();
        let mut c = at();
        c.retain(|_| false);
        assert!(!c.dirty);
        assert_eq!(c.get(b"b", &stamp(2)), None);
    }

    #[test]
    fn wanting_some_paths_reads_only_theirs_and_another_path_then_reads_all() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("c.hashes");
        let mut c = HashCache::at(file.clone());
        for i in 0..10u8 {
            c.put(vec![b'f', b'0' + i].into(), stamp(i.into()), [i; 32]);
        }
        c.save().unwrap();

        let mut c = HashCache::at(file);
        c.want([&b"f1"[..], b"f2", b"nowhere"]);
        c.want([&b"f3"[..], b"f1"]);
        let read = |c: &HashCache| match &c.read {
            Read::Nothing => "nothing".to_string(),
            Read::Asked { index, .. } => format!("{} asked for", index.len()),
            Read::All(all) => format!("all {}", all.len()),
        };
        assert_eq!(read(&c), "3 asked for");
        for i in 1..=3u8 {
            assert_eq!(c.get(&[b'f', b'0' + i], &stamp(i.into())), Some([i; 32]));
        }
        assert_eq!(c.get(b"nowhere", &stamp(0)), None);
        // What this run put is found whether it was asked for or not.
        c.put(b"f5"[..].into(), stamp(50), [50; 32]);
        assert_eq!(c.get(b"f5", &stamp(50)), Some([50; 32]));
        assert_eq!(read(&c), "3 asked for");
        // A path never asked for is answered as the whole file would.
        assert_eq!(c.get(b"f4", &stamp(4)), Some([4; 32]));
        assert_eq!(read(&c), "all 10");
    }

    #[test]
    fn a_written_cache_replaces_the_old_one_only_when_committed() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("c.hashes");
        let at = || HashCache::at(file.clone());
        let mut c = at();
        c.put(b"old"[..].into(), stamp(1), [1; 32]);
        c.save().unwrap();
        let files = || fs::read_dir(t.path()).unwrap().count();

        // Dropped uncommitted (the receiver's sync failed): the old cache stays, alone.
        let mut c = at();
        c.put(b"new"[..].into(), stamp(2), [2; 32]);
        drop(c.write().unwrap().expect("a changed cache is written"));
        assert_eq!(files(), 1);
        assert_eq!(at().get(b"new", &stamp(2)), None);
        assert_eq!(at().get(b"old", &stamp(1)), Some([1; 32]));

        c.write().unwrap().unwrap().commit().unwrap();
        assert_eq!(files(), 1);
        assert_eq!(at().get(b"new", &stamp(2)), Some([2; 32]));
    }

    #[test]
    fn the_cache_finds_each_path_after_puts_removes_pruning_and_rewrites() {
        // Against a plain map: every step, every path answers the same, before and after
        // the cache is saved and read again (the old file's entries merged with the run's).
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("c.hashes");
        let mut c = HashCache::at(file.clone());
        let mut model = std::collections::HashMap::new();
        let path = |i: u64| format!("cur/{}", i % 97).into_bytes();
        let check = |c: &mut HashCache, model: &std::collections::HashMap<Vec<u8>, u64>| {
            for i in 0..97 {
                let p = path(i);
                let want = model.get(&p).map(|&n| [n as u8; 32]);
                let got = model.get(&p).and_then(|&n| c.get(&p, &stamp(n)));
                assert_eq!(got, want, "{}", String::from_utf8_lossy(&p));
                assert_eq!(c.get(&p, &stamp(1000)), None);
            }
        };
        let reopen = |c: &mut HashCache| {
            c.save().unwrap();
            *c = HashCache::at(file.clone());
            // Some paths asked for first: the rest are then read whole, on the first miss.
            let some: Vec<Vec<u8>> = (0..97).step_by(5).map(path).collect();
            c.want(some.iter().map(|p| &p[..]));
            let mut all = Map::new();
            load(&c.file, |_| true, &mut all);
            all.len()
        };
        for step in 0..2000u64 {
            let n = step * 7919 % 1009;
            let p = path(n);
            if n % 3 == 0 {
                c.remove(&p);
                model.remove(&p);
            } else {
                c.put(p.clone().into(), stamp(n), [n as u8; 32]);
                model.insert(p, n);
            }
            if step % 250 == 0 {
                check(&mut c, &model);
                assert_eq!(reopen(&mut c), model.len(), "one entry a path");
                check(&mut c, &model);
            }
        }
        c.retain(|p| p.ends_with(b"1"));
        model.retain(|p, _| p.ends_with(b"1"));
        check(&mut c, &model);
        assert_eq!(reopen(&mut c), model.len());
        check(&mut c, &model);
    }

    #[test]
    fn restamping_gives_pending_hashes_their_stamps_and_forgets_those_without() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("c.hashes");
        let mut c = HashCache::at(file.clone());
        c.put(b"hashed"[..].into(), stamp(1), [1; 32]);
        c.put(b"placed"[..].into(), Stamp::PENDING, [2; 32]);
        c.put(b"vanished"[..].into(), Stamp::PENDING, [3; 32]);
        let mut asked = Vec::new();
        c.restamp(|p| {
            asked.push(p.to_vec());
            (p == b"placed").then(|| stamp(2))
        });
        assert_eq!(
            asked,
            [b"placed".to_vec(), b"vanished".to_vec()],
            "only pending hashes"
        );
        c.save().unwrap();
        let mut c = HashCache::at(file);
        assert_eq!(c.get(b"hashed", &stamp(1)), Some([1; 32]));
        assert_eq!(c.get(b"placed", &stamp(2)), Some([2; 32]));
        let Read::All(all) = &c.read else {
            panic!("get reads the whole file")
        };
        assert_eq!(
            all.len(),
            2,
            "the hash of a file that could not be stamped was kept"
        );
    }

    #[test]
    fn a_changed_stamp_misses() {
        let mut c = HashCache::disabled();
        let s = Stamp {
            ino: 1,
            size: 2,
            mtime: 3,
            mtime_nsec: 4,
            ctime: 5,
            ctime_nsec: 6,
        };
        c.put(b"a"[..].into(), s, [7; 32]);
        assert_eq!(c.get(b"a", &s), Some([7; 32]));
        assert_eq!(c.get(b"a", &Stamp { ctime_nsec: 9, ..s }), None);
        assert_eq!(c.get(b"b", &s), None);
    }
}
