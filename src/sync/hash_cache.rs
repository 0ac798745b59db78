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

    fn retain(&mut self, keep: impl Fn(&[u8]) -> bool) {
        self.entries.retain(|c| keep(&c.path));
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
    /// Read on first use, not when opened: a scan without `--checksum` only prunes the
    /// cache, and a cache whose paths all still exist is then never built into a map
    /// (measured: on the DEST agent of a no-change re-sync of 56k files this was a tenth of
    /// all samples, and the map some 12 MB).
    map: Option<Map>,
    dirty: bool,
}

/// The cache file is a zstd-compressed postcard sequence of `(path, stamp, digest)`, written
/// from the map and read into it one entry at a time: never a second copy of the whole
/// cache in memory (measured on a 66k-file receive: 48 MB of a 62 MB heap peak before).
struct Entries<'a>(&'a Map);

impl Serialize for Entries<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            self.0
                .entries
                .iter()
                .map(|c| (raw_path::Borrowed(&c.path), &c.stamp, &c.digest)),
        )
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

/// Calls `each` for every entry of the cache file; `None` when it is missing or unreadable,
/// perhaps after some entries were handed out.
fn read_entries(file: &Option<PathBuf>, each: impl FnMut(RelPath, Stamp, Digest)) -> Option<()> {
    let decoder = zstd::Decoder::new(fs::File::open(file.as_ref()?).ok()?).ok()?;
    // Postcard reads a path byte by byte: from a buffer, not from the decompressor.
    let decoded = io::BufReader::with_capacity(64 << 10, decoder);
    // Each path is copied into the scratch space; a longer one makes the cache unreadable,
    // that is empty.
    let mut scratch = vec![0u8; 64 << 10];
    let reader = postcard::de_flavors::io::io::IOReader::new(decoded, &mut scratch);
    EachEntry(each)
        .deserialize(&mut postcard::Deserializer::from_flavor(reader))
        .ok()
}

/// The cache file as a map; empty when it is missing or damaged.
fn load(file: &Option<PathBuf>) -> Map {
    let mut map = Map::new();
    match read_entries(file, |path, stamp, digest| {
        map.entries.push(Cached {
            path,
            stamp,
            digest,
        })
    }) {
        Some(()) => {
            // A file lists each path once; should one be listed twice, the table finds one
            // of them, either a hash whose stamps are checked before it is used.
            map.reindex();
            map
        }
        None => Map::new(),
    }
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
        HashCache {
            file,
            map: None,
            dirty: false,
        }
    }

    /// A cache kept in `file`, whatever tree it is for.
    #[cfg(test)]
    pub fn at(file: PathBuf) -> HashCache {
        HashCache {
            file: Some(file),
            map: None,
            dirty: false,
        }
    }

    /// A cache that remembers nothing and saves nowhere.
    pub fn disabled() -> HashCache {
        HashCache {
            file: None,
            map: Some(Map::new()),
            dirty: false,
        }
    }

    fn map(&mut self) -> &mut Map {
        let file = &self.file;
        self.map.get_or_insert_with(|| load(file))
    }

    pub fn get(&mut self, path: &[u8], stamp: &Stamp) -> Option<Digest> {
        match self.map().get(path) {
            Some(c) if c.stamp == *stamp => Some(c.digest),
            _ => None,
        }
    }

    /// A receiver passes the plan's path, so the cache shares it instead of copying it.
    pub fn put(&mut self, path: RelPath, stamp: Stamp, digest: Digest) {
        self.map().insert(Cached {
            path,
            stamp,
            digest,
        });
        self.dirty = true;
    }

    pub fn remove(&mut self, path: &[u8]) {
        if self.map().remove(path) {
            self.dirty = true;
        }
    }

    /// Drops entries for paths no longer in the tree. Before the cache is used, the file is
    /// checked in place and only read into a map when some entry must go.
    pub fn retain(&mut self, keep: impl Fn(&[u8]) -> bool) {
        if let Some(map) = &mut self.map {
            let before = map.len();
            map.retain(keep);
            self.dirty |= map.len() != before;
            return;
        }
        let mut all_kept = true;
        if read_entries(&self.file, |path, _, _| all_kept &= keep(&path)).is_none() || all_kept {
            return;
        }
        let mut map = load(&self.file);
        map.retain(keep);
        self.map = Some(map);
        self.dirty = true;
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
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let Some(map) = self.map.as_ref().filter(|_| self.dirty) else {
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
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        let f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        let result = zstd::Encoder::new(f, 1)
            .context("compressing the hash cache")
            .and_then(|packed| {
                postcard::to_io(
                    &Entries(map),
                    io::BufWriter::with_capacity(64 << 10, packed),
                )
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
    fn pruning_reads_the_file_into_a_map_only_when_an_entry_goes() {
        let t = tempfile::tempdir().unwrap();
        let at = |file: &Path| HashCache {
            file: Some(file.to_path_buf()),
            map: None,
            dirty: false,
        };
        let file = t.path().join("c.hashes");
        let mut c = at(&file);
        c.put(b"a"[..].into(), stamp(1), [1; 32]);
        c.put(b"b"[..].into(), stamp(2), [2; 32]);
        c.save().unwrap();

        let mut c = at(&file);
        c.retain(|_| true);
        assert!(c.map.is_none() && !c.dirty);
        assert_eq!(c.get(b"b", &stamp(2)), Some([2; 32]));

        let mut c = at(&file);
        c.retain(|p| p != b"a");
        assert!(c.dirty);
        c.save().unwrap();
        let mut c = at(&file);
        assert_eq!(c.get(b"a", &stamp(1)), None);
        assert_eq!(c.get(b"b", &stamp(2)), Some([2; 32]));

        // A damaged file is an empty cache, left alone by pruning.
        fs::write(&file, b"not zstd").unwrap();
        let mut c = at(&file);
        c.retain(|_| false);
        assert!(!c.dirty);
        assert_eq!(c.get(b"b", &stamp(2)), None);
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
    fn the_cache_finds_each_path_after_puts_removes_and_pruning() {
        // Against a plain map: every step, every path answers the same.
        let mut c = HashCache::disabled();
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
            assert_eq!(c.map().len(), model.len());
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
            }
        }
        c.retain(|p| p.ends_with(b"1"));
        model.retain(|p, _| p.ends_with(b"1"));
        check(&mut c, &model);
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
