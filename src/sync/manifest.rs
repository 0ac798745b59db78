//! What a scan of one tree produces: one [`Entry`] per file system object, with the metadata
//! the mirror must reproduce. Plain data, no I/O; it travels between controller and agents.

use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::ops::Deref;
use std::sync::Arc;

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

/// A path relative to a tree's root, as raw bytes; the root itself is empty. Shared: the plan
/// and the account of a run name the entries of the manifests they were made from, so a clone
/// is a reference count, not a copy of the path. A thin pointer, its length kept with its
/// bytes: 8 bytes in each entry, plan item and account line instead of an `Arc<[u8]>`'s 16.
#[derive(Clone)]
pub struct RelPath(triomphe::ThinArc<(), u8>);

impl Deref for RelPath {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0.slice
    }
}

impl From<&[u8]> for RelPath {
    fn from(path: &[u8]) -> RelPath {
        RelPath(triomphe::ThinArc::from_header_and_slice((), path))
    }
}

impl From<Vec<u8>> for RelPath {
    fn from(path: Vec<u8>) -> RelPath {
        RelPath::from(&path[..])
    }
}

impl<const N: usize> From<&[u8; N]> for RelPath {
    fn from(path: &[u8; N]) -> RelPath {
        RelPath::from(&path[..])
    }
}

impl AsRef<[u8]> for RelPath {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::borrow::Borrow<[u8]> for RelPath {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl PartialEq for RelPath {
    fn eq(&self, other: &RelPath) -> bool {
        **self == **other
    }
}

impl Eq for RelPath {}

impl PartialOrd for RelPath {
    fn partial_cmp(&self, other: &RelPath) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RelPath {
    fn cmp(&self, other: &RelPath) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl std::hash::Hash for RelPath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// Raw byte paths on the wire. Postcard writes a `Vec<u8>` as its length and bytes either way,
/// but as bytes in one piece rather than as a sequence of one-byte elements (measured: the
/// element by element decoding of two 66k-entry manifests from a stream cost 80 ms of CPU).
/// Use with `#[serde(with = "raw_path")]`; `opt` and `list` for `Option` and `Vec` of paths.
/// A path decodes into a [`RelPath`] or a `Vec<u8>`, whichever the field is.
pub mod raw_path {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::ser::{SerializeSeq, Serializer};
    use std::fmt;
    use std::marker::PhantomData;

    struct BytesVisitor<P>(PhantomData<P>);

    impl<P: for<'a> From<&'a [u8]>> Visitor<'_> for BytesVisitor<P> {
        type Value = P;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a path as bytes")
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<P, E> {
            Ok(P::from(bytes))
        }
    }

    pub fn serialize<S: Serializer>(path: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(path)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, P: for<'a> From<&'a [u8]>>(
        d: D,
    ) -> Result<P, D::Error> {
        d.deserialize_byte_buf(BytesVisitor(PhantomData))
    }

    /// One path, written as [`serialize`] writes it.
    pub struct Borrowed<'a>(pub &'a [u8]);

    impl serde::Serialize for Borrowed<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    /// One path, read as [`deserialize`] reads it.
    pub struct Owned<P = Vec<u8>>(pub P);

    impl<'de, P: for<'a> From<&'a [u8]>> serde::Deserialize<'de> for Owned<P> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Owned<P>, D::Error> {
            d.deserialize_byte_buf(BytesVisitor(PhantomData)).map(Owned)
        }
    }

    pub mod opt {
        use super::*;

        pub fn serialize<S: Serializer, P: AsRef<[u8]>>(
            path: &Option<P>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match path {
                Some(p) => s.serialize_some(&Borrowed(p.as_ref())),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>, P: for<'a> From<&'a [u8]>>(
            d: D,
        ) -> Result<Option<P>, D::Error> {
            let path: Option<Owned<P>> = serde::Deserialize::deserialize(d)?;
            Ok(path.map(|p| p.0))
        }
    }

    pub mod list {
        use super::*;

        pub fn serialize<S: Serializer, P: AsRef<[u8]>>(
            paths: &[P],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(paths.len()))?;
            for p in paths {
                seq.serialize_element(&Borrowed(p.as_ref()))?;
            }
            seq.end()
        }

        pub fn deserialize<'de, D: Deserializer<'de>, P: for<'a> From<&'a [u8]>>(
            d: D,
        ) -> Result<Vec<P>, D::Error> {
            struct List<P>(PhantomData<P>);

            impl<'de, P: for<'a> From<&'a [u8]>> Visitor<'de> for List<P> {
                type Value = Vec<P>;

                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a list of paths")
                }

                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<P>, A::Error> {
                    // A hostile length is not an allocation: growth follows what arrives.
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                    while let Some(Owned(p)) = seq.next_element()? {
                        out.push(p);
                    }
                    Ok(out)
                }
            }

            d.deserialize_seq(List(PhantomData))
        }
    }
}

/// A user or group name. A tree has a handful of owners and tens of thousands of entries, so
/// every entry shares one allocation per name: cloned by reference count, and decoded
/// through a per-thread table (measured: two `String`s were 80 of some 470 bytes an entry).
/// `Arc<String>`, not `Arc<str>`: a thin pointer, 8 bytes an entry less for each name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<String>);

/// Decoded names kept for sharing; past this many (no real host has them) a name is
/// decoded on its own, so a hostile peer cannot grow the table without bound.
const SHARED_NAMES: usize = 4096;

thread_local! {
    static DECODED_NAMES: RefCell<HashMap<String, Name>> = RefCell::new(HashMap::new());
}

impl Name {
    /// `name`, sharing the allocation of an equal name this thread decoded before.
    pub fn shared(name: &str) -> Name {
        DECODED_NAMES.with_borrow_mut(|names| {
            if let Some(known) = names.get(name) {
                return known.clone();
            }
            let new = Name::from(name);
            if names.len() < SHARED_NAMES {
                names.insert(name.to_string(), new.clone());
            }
            new
        })
    }
}

impl From<&str> for Name {
    fn from(name: &str) -> Name {
        Name(Arc::new(name.to_string()))
    }
}

impl From<String> for Name {
    fn from(name: String) -> Name {
        Name(Arc::new(name))
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(&**self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Name;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a user or group name")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Name, E> {
                Ok(Name::shared(name))
            }
        }
        // `deserialize_string`, not `_str`: postcard reading from a stream lends a string
        // from reusable scratch space only then.
        d.deserialize_string(Visitor)
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
    pub user: Option<Name>,
    pub group: Option<Name>,
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
    #[serde(with = "raw_path")]
    pub path: RelPath,
    pub kind: Kind,
    pub size: u64,
    pub meta: Meta,
    pub dev: u64,
    pub ino: u64,
    /// Saturated at `u32::MAX`: the mirror only asks whether it is more than 1. With the
    /// target a `RelPath`, an entry takes 112 bytes instead of 128, and a re-sync's controller
    /// holds two manifests of them.
    pub nlink: u32,
    /// Symlink target, raw bytes.
    #[serde(with = "raw_path::opt")]
    pub target: Option<RelPath>,
    /// Content hash, present when it was asked for (`--checksum`, rename candidates); boxed,
    /// as most entries have none.
    pub hash: Option<Box<Digest>>,
}

impl Entry {
    /// True for a regular file with other names in the same tree.
    pub fn is_hardlinked(&self) -> bool {
        self.kind == Kind::File && self.nlink > 1
    }

    pub fn digest(&self) -> Option<Digest> {
        self.hash.as_deref().copied()
    }

    pub fn inode(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }
}

/// An entry that is not mirrored, with the reason shown to the user.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    #[serde(with = "raw_path")]
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
    #[serde(with = "raw_path::list")]
    pub leftovers: Vec<Vec<u8>>,
    /// Entries left out because the other tree has them exactly so (`sync::settle`): counted,
    /// not listed. None in a manifest as scanned.
    #[serde(skip)]
    pub settled: Settled,
}

/// What a manifest's settled entries were (files, symlinks and fifos; never a directory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    pub files: u64,
    /// Content bytes of the files.
    pub bytes: u64,
    pub symlinks: u64,
    pub fifos: u64,
}

impl Settled {
    pub fn entries(&self) -> u64 {
        self.files + self.symlinks + self.fifos
    }

    pub fn add(&mut self, e: &Entry) {
        match e.kind {
            Kind::File => {
                self.files += 1;
                self.bytes += e.size;
            }
            Kind::Symlink => self.symlinks += 1,
            Kind::Fifo => self.fifos += 1,
            Kind::Dir => {}
        }
    }
}

/// Decodes a [`Manifest`] as its encoding arrives, handing the entries to `batch` a few
/// thousand at a time instead of keeping them: the manifest it returns has none. `batch`
/// returning false stops the decoding with an error.
pub struct EachBatch<F>(pub F);

/// Entries handed over at once: large enough that passing them costs nothing per entry,
/// small enough to be nothing next to a tree.
const BATCH: usize = 1024;

impl<'de, F: FnMut(Vec<Entry>) -> bool> DeserializeSeed<'de> for EachBatch<F> {
    type Value = Manifest;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Manifest, D::Error> {
        // The fields in `Manifest`'s order, as its derived decoding reads them.
        const FIELDS: &[&str] = &["root_exists", "entries", "skipped", "leftovers"];
        d.deserialize_struct("Manifest", FIELDS, self)
    }
}

impl<'de, F: FnMut(Vec<Entry>) -> bool> Visitor<'de> for EachBatch<F> {
    type Value = Manifest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a manifest")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Manifest, A::Error> {
        let missing = || A::Error::custom("a manifest ended early");
        let root_exists = seq.next_element()?.ok_or_else(missing)?;
        seq.next_element_seed(Entries(self.0))?
            .ok_or_else(missing)?;
        let skipped = seq.next_element()?.ok_or_else(missing)?;
        let Leftovers(leftovers) = seq.next_element()?.ok_or_else(missing)?;
        Ok(Manifest {
            root_exists,
            entries: Vec::new(),
            skipped,
            leftovers,
            settled: Settled::default(),
        })
    }
}

#[derive(Deserialize)]
#[serde(transparent)]
struct Leftovers(#[serde(with = "raw_path::list")] Vec<Vec<u8>>);

struct Entries<F>(F);

impl<'de, F: FnMut(Vec<Entry>) -> bool> DeserializeSeed<'de> for Entries<F> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(Vec<Entry>) -> bool> Visitor<'de> for Entries<F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a manifest's entries")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let stopped = || A::Error::custom("the reader of a manifest stopped");
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(e) = seq.next_element()? {
            batch.push(e);
            if batch.len() == BATCH
                && !(self.0)(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
            {
                return Err(stopped());
            }
        }
        if !batch.is_empty() && !(self.0)(batch) {
            return Err(stopped());
        }
        Ok(())
    }
}

/// A manifest's entries by path, for the plan's lookups. It holds entry numbers (4 bytes a
/// slot; a map of path to entry took 24, and the plan holds one for each tree) and finds one
/// by hashing the path asked for and comparing it with the entry's.
pub struct ByPath<'a> {
    entries: &'a [Entry],
    table: hashbrown::HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl<'a> ByPath<'a> {
    pub fn new(m: &'a Manifest) -> ByPath<'a> {
        let hasher = foldhash::fast::RandomState::default();
        let entries = &m.entries[..];
        let mut table = hashbrown::HashTable::with_capacity(entries.len());
        let hash = |i: &u32| hasher.hash_one(&*entries[*i as usize].path);
        // A u32 numbers more entries than a controller could hold (4G entries of 100 bytes).
        for i in 0..entries.len() as u32 {
            table.insert_unique(hash(&i), i, hash);
        }
        ByPath {
            entries,
            table,
            hasher,
        }
    }

    pub fn get(&self, path: &[u8]) -> Option<&'a Entry> {
        let entries = self.entries;
        self.table
            .find(self.hasher.hash_one(path), |i| {
                *entries[*i as usize].path == *path
            })
            .map(|i| &entries[*i as usize])
    }

    pub fn contains(&self, path: &[u8]) -> bool {
        self.get(path).is_some()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_paths_travel_as_a_plain_vec_of_bytes_would() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Raw {
            #[serde(with = "raw_path")]
            one: Vec<u8>,
            #[serde(with = "raw_path::opt")]
            maybe: Option<Vec<u8>>,
            #[serde(with = "raw_path::list")]
            many: Vec<Vec<u8>>,
        }
        #[derive(Serialize)]
        struct Plain<'a> {
            one: &'a Vec<u8>,
            maybe: &'a Option<Vec<u8>>,
            many: &'a Vec<Vec<u8>>,
        }
        let raw = Raw {
            one: b"a\nb\xff".to_vec(),
            maybe: Some(vec![0; 300]),
            many: vec![Vec::new(), b"cur/x:2,S".to_vec()],
        };
        let wire = postcard::to_stdvec(&raw).unwrap();
        let plain = Plain {
            one: &raw.one,
            maybe: &raw.maybe,
            many: &raw.many,
        };
        assert_eq!(wire, postcard::to_stdvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<Raw>(&wire).unwrap(), raw);
        let mut scratch = [0u8; 512];
        let (back, _) = postcard::from_io::<Raw, _>((&wire[..], &mut scratch[..])).unwrap();
        assert_eq!(back, raw);
    }

    #[test]
    fn names_travel_as_strings_and_decode_into_one_allocation() {
        let wire = postcard::to_stdvec(&["vmail".to_string(), "vmail".to_string()]).unwrap();
        assert_eq!(
            postcard::to_stdvec(&[Name::from("vmail"), Name::from("vmail")]).unwrap(),
            wire
        );
        let [a, b]: [Name; 2] = postcard::from_bytes(&wire).unwrap();
        assert_eq!(&*a, "vmail");
        assert!(Arc::ptr_eq(&a.0, &b.0));
        // From a stream, where strings pass through scratch space, too.
        let mut scratch = [0u8; 16];
        let ([c, _], _): ([Name; 2], _) = postcard::from_io((&wire[..], &mut scratch[..])).unwrap();
        assert!(Arc::ptr_eq(&a.0, &c.0));
    }

    #[test]
    fn by_path_finds_each_entry_under_its_own_path_only() {
        let entry = |path: &str| Entry {
            path: path.as_bytes().into(),
            kind: Kind::File,
            size: path.len() as u64,
            meta: Meta::default(),
            dev: 1,
            ino: 0,
            nlink: 1,
            target: None,
            hash: None,
        };
        let names = ["", "cur", "cur/a:2,S", "cur/a:2,", "new/a", "new"];
        let m = Manifest {
            root_exists: true,
            entries: names.iter().map(|n| entry(n)).collect(),
            ..Manifest::default()
        };
        let by_path = ByPath::new(&m);
        for n in names {
            assert_eq!(
                &*by_path.get(n.as_bytes()).map(|e| e.path.clone()).unwrap(),
                n.as_bytes()
            );
        }
        for absent in ["cur/a", "new/", "a", "cur/a:2,S/x"] {
            assert!(!by_path.contains(absent.as_bytes()), "{absent}");
        }
    }
}
