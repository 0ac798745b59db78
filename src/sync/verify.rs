//! Proof that one tree mirrors another: every entry compared by kind, size, content hash,
//! mode, owner and group by name, mtime, symlink target and hard-link group. Unlike a sync's
//! `verified` (every file *written* was checked), this covers files no pass sent.
//!
//! Pure: it takes two manifests (from scans with `checksum`) and lists every difference.

use crate::sync::manifest::{display_path, ByPath, Entry, Kind, Manifest};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One way the trees differ, at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub path: Vec<u8>,
    pub what: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", display_path(&self.path), self.what)
    }
}

/// What to compare besides the tree's shape and metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Every file's SHA-256 must be known on both sides and equal.
    Hashes,
    /// Size only: a quick look, for re-checking a step that was recorded done.
    Sizes,
}

/// Every difference between `src` and `dest`, sorted by path.
pub fn compare(src: &Manifest, dest: &Manifest, content: Content) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut diff = |path: &[u8], what: String| {
        out.push(Difference {
            path: path.to_vec(),
            what,
        })
    };
    let dest_by_path = ByPath::new(dest);
    let src_by_path = ByPath::new(src);
    let src_groups = link_groups(src);
    let dest_groups = link_groups(dest);
    for s in &src.entries {
        let Some(d) = dest_by_path.get(&s.path[..]) else {
            diff(
                &s.path,
                format!("{} missing on the receiving side", s.kind.describe()),
            );
            continue;
        };
        if s.kind != d.kind {
            diff(
                &s.path,
                format!("{} here, {} there", s.kind.describe(), d.kind.describe()),
            );
            continue;
        }
        if s.kind == Kind::File {
            if s.size != d.size {
                diff(&s.path, format!("size {} here, {} there", s.size, d.size));
            } else if content == Content::Hashes {
                match (&s.hash, &d.hash) {
                    (Some(a), Some(b)) if a == b => {}
                    (Some(_), Some(_)) => diff(&s.path, "content differs (SHA-256)".into()),
                    _ => diff(&s.path, "content could not be hashed on both sides".into()),
                }
            }
            if src_groups.get(&s.path[..]) != dest_groups.get(&s.path[..]) {
                diff(&s.path, "hard links differ".into());
            }
        }
        if s.target != d.target {
            diff(&s.path, "symlink target differs".into());
        }
        if s.meta.mode != d.meta.mode {
            diff(
                &s.path,
                format!("mode {:o} here, {:o} there", s.meta.mode, d.meta.mode),
            );
        }
        if !s.meta.same_owner(&d.meta) {
            let who = |e: &Entry| {
                format!(
                    "{}:{}",
                    e.meta
                        .user
                        .as_deref()
                        .map_or_else(|| e.meta.uid.to_string(), str::to_string),
                    e.meta
                        .group
                        .as_deref()
                        .map_or_else(|| e.meta.gid.to_string(), str::to_string)
                )
            };
            diff(&s.path, format!("owner {} here, {} there", who(s), who(d)));
        }
        if !s.meta.same_mtime(&d.meta) && s.kind != Kind::Symlink {
            diff(&s.path, "mtime differs".into());
        }
    }
    for d in &dest.entries {
        if !src_by_path.contains(&d.path) {
            diff(
                &d.path,
                format!("{} only on the receiving side", d.kind.describe()),
            );
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// For each file with other names in the tree, the set of all its names.
fn link_groups(m: &Manifest) -> HashMap<&[u8], BTreeSet<&[u8]>> {
    let mut by_inode: BTreeMap<(u64, u64), BTreeSet<&[u8]>> = BTreeMap::new();
    for e in m.entries.iter().filter(|e| e.is_hardlinked()) {
        by_inode.entry(e.inode()).or_default().insert(&e.path[..]);
    }
    let mut out = HashMap::new();
    for names in by_inode.into_values().filter(|n| n.len() > 1) {
        for name in &names {
            out.insert(*name, names.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::Meta;

    fn file(path: &str, ino: u64, nlink: u32, hash: u8) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            kind: Kind::File,
            size: 3,
            meta: Meta {
                mode: 0o600,
                uid: 990,
                gid: 990,
                user: Some("vmail".into()),
                group: Some("vmail".into()),
                mtime: 1_700_000_000,
                mtime_nsec: 5,
            },
            dev: 1,
            ino,
            nlink,
            target: None,
            hash: Some(Box::new([hash; 32])),
        }
    }

    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            root_exists: true,
            entries,
            ..Default::default()
        }
    }

    fn tree() -> Vec<Entry> {
        vec![
            file("a/cur/1:2,S", 10, 2, 1),
            file("b/cur/1:2,", 10, 2, 1),
            file("a/dovecot-uidlist", 11, 1, 2),
        ]
    }

    #[test]
    fn identical_trees_have_no_difference_whatever_the_inode_numbers() {
        let mut other = tree();
        for e in &mut other {
            e.ino += 1000;
            e.meta.uid = 995; // vmail has another uid on the receiving host
        }
        assert!(compare(&manifest(tree()), &manifest(other), Content::Hashes).is_empty());
    }

    #[test]
    fn every_kind_of_broken_copy_is_found() {
        let mut other = tree();
        other[0].hash = Some(Box::new([9; 32])); // a flipped byte
        other[1].ino = 99; // the hard link became a copy
        other[2].meta.user = Some("root".into()); // wrong owner
        other[2].meta.mtime += 1;
        other.push(file("stale", 50, 1, 3));
        let found: Vec<String> = compare(&manifest(tree()), &manifest(other), Content::Hashes)
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(
            found,
            vec![
                "a/cur/1:2,S: content differs (SHA-256)",
                "a/cur/1:2,S: hard links differ",
                "a/dovecot-uidlist: owner vmail:vmail here, root:vmail there",
                "a/dovecot-uidlist: mtime differs",
                "b/cur/1:2,: hard links differ",
                "stale: file only on the receiving side",
            ]
        );
        let mut missing = tree();
        missing.pop();
        let found = compare(&manifest(tree()), &manifest(missing), Content::Sizes);
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].to_string(),
            "a/dovecot-uidlist: file missing on the receiving side"
        );
    }

    #[test]
    fn an_unhashed_file_is_a_difference_only_when_hashes_are_required() {
        let mut other = tree();
        other[2].hash = None;
        assert_eq!(
            compare(&manifest(tree()), &manifest(other.clone()), Content::Hashes).len(),
            1
        );
        assert!(compare(&manifest(tree()), &manifest(other), Content::Sizes).is_empty());
    }
}
