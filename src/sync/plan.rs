//! The delta: from the SRC and DEST manifests, what the receiver must do so DEST mirrors SRC.
//! Pure computation, no I/O; the controller runs it, the agents carry it out.
//!
//! Order of the receiver's work, and why:
//! 1. `reuse`: content already in DEST under another name (a Maildir flag rename `…:2,` →
//!    `…:2,S`, a `new/` → `cur/` move) is linked or copied aside first, before any delete can
//!    remove it.
//! 2. `delete`: extraneous entries and entries whose type changes, top-most first.
//! 3. `mkdir`, parents first, then the reused content is put in place.
//! 4. `send`: the stream; each file lands under a temp name, is verified, then renamed.
//! 5. `link`: further names of inodes placed by 3 or already in DEST (hard-link groups).
//! 6. `meta`, then `dirs` deepest first: writing into a directory changes its mtime.

use crate::sync::beneath::split;
use crate::sync::manifest::{raw_path, ByPath, Digest, Entry, Kind, Manifest, Meta, RelPath};
use anyhow::{bail, Result};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, Default)]
pub struct PlanOptions {
    pub delete: bool,
    pub checksum: bool,
    pub allow_empty_source: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReuseMode {
    /// The old name goes away, so a hard link then the delete amounts to a rename.
    Link,
    /// The old name stays (or shares its inode), so the content is copied locally.
    Copy,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Reuse {
    #[serde(with = "raw_path")]
    pub from: RelPath,
    #[serde(with = "raw_path")]
    pub to: RelPath,
    pub mode: ReuseMode,
    /// The receiver checks `from` still has this content before using it.
    pub digest: Digest,
    pub meta: Meta,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SendItem {
    #[serde(with = "raw_path")]
    pub path: RelPath,
    pub kind: Kind,
    /// For a hard-link group: the earlier member this one is a link to.
    #[serde(with = "raw_path::opt")]
    pub link_to: Option<RelPath>,
    pub size: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// An existing name (already in DEST, or placed earlier in this run).
    #[serde(with = "raw_path")]
    pub from: RelPath,
    #[serde(with = "raw_path")]
    pub to: RelPath,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MetaUpdate {
    #[serde(with = "raw_path")]
    pub path: RelPath,
    pub kind: Kind,
    pub meta: Meta,
}

/// The transfer's size, for its progress display. What the plan changes, path by path, is
/// `sync::changes`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub files_to_send: u64,
    pub bytes_to_send: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Plan {
    pub reuse: Vec<Reuse>,
    #[serde(with = "raw_path::list")]
    pub delete: Vec<RelPath>,
    #[serde(with = "raw_path::list")]
    pub mkdir: Vec<RelPath>,
    pub send: Vec<SendItem>,
    pub link: Vec<Link>,
    pub meta: Vec<MetaUpdate>,
    pub dirs: Vec<MetaUpdate>,
    pub stats: PlanStats,
}

impl Plan {
    /// Drops the spare room of its long lists, which outlive the manifests in the controller
    /// and are all the receiving agent holds of the trees. Grown by doubling, a first copy's
    /// send list (56k files) had 0.5 MB spare in the controller and 1.5 MB in the agent,
    /// whose decoder starts from a 1 MiB guess.
    pub fn shrink_to_fit(&mut self) {
        self.send.shrink_to_fit();
        self.meta.shrink_to_fit();
        self.mkdir.shrink_to_fit();
    }

    pub fn is_empty(&self) -> bool {
        self.reuse.is_empty()
            && self.delete.is_empty()
            && self.mkdir.is_empty()
            && self.send.is_empty()
            && self.link.is_empty()
            && self.meta.is_empty()
            && self.dirs.is_empty()
    }
}

/// Paths whose content hashes are needed to recognise content DEST already has.
#[derive(Serialize, Deserialize, Debug, Default, PartialEq, Eq)]
pub struct HashRequest {
    #[serde(with = "raw_path::list")]
    pub src: Vec<Vec<u8>>,
    #[serde(with = "raw_path::list")]
    pub dest: Vec<Vec<u8>>,
}

fn content_same(s: &Entry, d: &Entry, checksum: bool) -> bool {
    if s.kind != Kind::File || d.kind != Kind::File || s.size != d.size {
        return false;
    }
    if checksum {
        matches!((&s.hash, &d.hash), (Some(a), Some(b)) if a == b)
    } else {
        s.meta.same_mtime(&d.meta)
    }
}

pub(crate) fn meta_same(s: &Entry, d: &Entry) -> bool {
    let mode_ok = s.kind == Kind::Symlink || s.meta.mode == d.meta.mode;
    mode_ok && s.meta.same_owner(&d.meta) && s.meta.same_mtime(&d.meta)
}

/// True when the plan does nothing with either entry of a SRC and DEST pair under one path,
/// and nothing else in it looks either up: the same kind, not a directory (the plan
/// restores a directory's metadata when its contents change), one name each (hard links are
/// planned as groups), the same content by the plan's own test, the same metadata.
pub(crate) fn settles(s: &Entry, d: &Entry, checksum: bool) -> bool {
    let same_content = match s.kind {
        Kind::File => content_same(s, d, checksum),
        Kind::Symlink => s.target == d.target,
        Kind::Fifo => true,
        Kind::Dir => false,
    };
    s.kind == d.kind && s.nlink == 1 && d.nlink == 1 && same_content && meta_same(s, d)
}

/// The strict ancestors of a relative path, nearest first, excluding the root.
pub(crate) fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.iter()
        .enumerate()
        .rev()
        .filter(|(_, &b)| b == b'/')
        .map(move |(i, _)| &path[..i])
}

/// Phase one: which files to hash so that content moved within DEST is found, not re-sent.
/// Candidates match on size and mtime (a Maildir rename keeps both); hashes confirm.
pub fn hash_request(src: &Manifest, dest: &Manifest, opts: &PlanOptions) -> HashRequest {
    if opts.checksum {
        return HashRequest::default();
    }
    // Keyed by DEST's files, not SRC's: a first copy's DEST has none, and no map is made
    // (from SRC's 56k files it was 6.6 MB, the largest part of the controller's peak).
    let key = |e: &Entry| (e.size, e.meta.mtime, e.meta.mtime_nsec);
    let dest_files = || dest.entries.iter().filter(|e| e.kind == Kind::File);
    // Each key of DEST's files, and whether a SRC file that is not already in place has it.
    let mut keys: HashMap<(u64, i64, u32), bool> = dest_files().map(|d| (key(d), false)).collect();
    let mut req = HashRequest::default();
    if keys.is_empty() {
        return req;
    }
    let dest_by_path = ByPath::new(dest);
    for s in src
        .entries
        .iter()
        .filter(|e| e.kind == Kind::File && e.size > 0)
    {
        let Some(matched) = keys.get_mut(&key(s)) else {
            continue;
        };
        let same = dest_by_path
            .get(&s.path[..])
            .is_some_and(|d| content_same(s, d, false));
        if !same {
            req.src.push(s.path.to_vec());
            *matched = true;
        }
    }
    req.dest = dest_files()
        .filter(|d| keys.get(&key(d)) == Some(&true))
        .map(|d| d.path.to_vec())
        .collect();
    req.src.sort();
    req
}

/// Phase two: the full plan. `src` and `dest` carry the hashes phase one asked for.
pub fn build(src: &Manifest, dest: &Manifest, opts: &PlanOptions) -> Result<Plan> {
    if !src.root_exists && !opts.allow_empty_source {
        bail!("the source does not exist; pass --allow-empty-source to empty DEST");
    }
    let src_by_path = ByPath::new(src);
    let dest_by_path = ByPath::new(dest);
    let mut plan = Plan::default();

    // Deletes: extraneous entries (unless --no-delete), type changes, crash leftovers.
    let protected: HashSet<&[u8]> = src.skipped.iter().map(|s| s.path.as_slice()).collect();
    let mut doomed: HashSet<&[u8]> = HashSet::new();
    for d in dest.entries.iter().filter(|d| !d.path.is_empty()) {
        match src_by_path.get(&d.path[..]) {
            None if opts.delete && !protected.contains(&d.path[..]) => {
                doomed.insert(&d.path);
            }
            Some(s) if s.kind != d.kind => {
                doomed.insert(&d.path);
            }
            _ => {}
        }
    }
    let leftovers: Vec<&[u8]> = dest.leftovers.iter().map(|p| p.as_slice()).collect();
    let real_entries = |m: &Manifest| {
        m.entries.iter().filter(|e| !e.path.is_empty()).count() as u64 + m.settled.entries()
    };
    if !doomed.is_empty() && real_entries(src) == 0 && !opts.allow_empty_source {
        bail!(
            "the source is empty but DEST is not; refusing to delete {} entries from DEST \
             (an unmounted disk or a wrong path?). Pass --allow-empty-source if DEST must be emptied",
            doomed.len()
        );
    }
    let all_doomed: HashSet<&[u8]> = doomed.iter().chain(leftovers.iter()).copied().collect();
    let under_doomed = |p: &[u8]| ancestors(p).any(|a| all_doomed.contains(a));
    let mut top: Vec<&[u8]> = all_doomed
        .iter()
        .copied()
        .filter(|p| !under_doomed(p))
        .collect();
    top.sort();
    plan.delete = top.iter().map(|p| RelPath::from(*p)).collect();
    let gone = |p: &[u8]| doomed.contains(p) || ancestors(p).any(|a| doomed.contains(a));

    // Content already in DEST, by hash, for rename detection.
    let mut dest_by_hash: HashMap<Digest, Vec<&Entry>> = HashMap::new();
    for d in dest.entries.iter().filter(|d| d.kind == Kind::File) {
        if let Some(h) = d.digest() {
            dest_by_hash.entry(h).or_default().push(d);
        }
    }
    // A DEST name whose inode loses this name in the mirror can be moved instead of copied.
    let released = |d: &Entry| -> bool {
        d.nlink == 1
            && match src_by_path.get(&d.path[..]) {
                None => gone(&d.path),
                Some(s) => !content_same(s, d, opts.checksum),
            }
    };
    let mut link_used: HashSet<&[u8]> = HashSet::new();
    // DEST inodes already claimed by a SRC hard-link group, so two groups never share one.
    let mut claimed: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
    let mut groups_done: HashSet<(u64, u64)> = HashSet::new();
    let mut groups: HashMap<(u64, u64), Vec<&Entry>> = HashMap::new();
    for s in src.entries.iter().filter(|s| s.is_hardlinked()) {
        groups.entry(s.inode()).or_default().push(s);
    }
    let mut changed_dirs: BTreeSet<Vec<u8>> = BTreeSet::new();

    for s in &src.entries {
        let d = dest_by_path.get(&s.path[..]).filter(|d| d.kind == s.kind);
        match s.kind {
            Kind::Dir => {
                match d {
                    None => {
                        if !s.path.is_empty() || !dest.root_exists {
                            plan.mkdir.push(s.path.clone());
                        }
                        changed_dirs.insert(s.path.to_vec());
                    }
                    Some(d) if !meta_same(s, d) => {
                        changed_dirs.insert(s.path.to_vec());
                    }
                    Some(_) => {}
                }
                continue;
            }
            Kind::Symlink | Kind::Fifo => {
                match d {
                    Some(d) if s.kind == Kind::Fifo || s.target == d.target => {
                        if !meta_same(s, d) {
                            plan.meta.push(MetaUpdate {
                                path: s.path.clone(),
                                kind: s.kind,
                                meta: s.meta.clone(),
                            });
                        }
                    }
                    _ => plan.send.push(SendItem {
                        path: s.path.clone(),
                        kind: s.kind,
                        link_to: None,
                        size: 0,
                    }),
                }
                continue;
            }
            Kind::File => {}
        }
        let members: Vec<&Entry> = if s.is_hardlinked() {
            if !groups_done.insert(s.inode()) {
                continue;
            }
            groups[&s.inode()].clone()
        } else {
            vec![s]
        };
        let group_id = s.inode();
        // The anchor: a member whose DEST name already has the right content, on an inode no
        // other group claimed.
        let mut anchor: Option<(&Entry, &Entry)> = None;
        for m in &members {
            let Some(md) = dest_by_path.get(&m.path[..]) else {
                continue;
            };
            if !content_same(m, md, opts.checksum) {
                continue;
            }
            if md.nlink > 1 {
                let owner = claimed.entry(md.inode()).or_insert(group_id);
                if *owner != group_id {
                    continue;
                }
            }
            anchor = Some((m, md));
            break;
        }
        let rest_from: &Entry = match anchor {
            Some((a, ad)) => {
                if !meta_same(a, ad) {
                    plan.meta.push(MetaUpdate {
                        path: a.path.clone(),
                        kind: Kind::File,
                        meta: a.meta.clone(),
                    });
                }
                a
            }
            None => {
                let primary = members[0];
                let found = primary
                    .digest()
                    .and_then(|h| dest_by_hash.get(&h))
                    .and_then(|cands| {
                        let cands: Vec<&&Entry> =
                            cands.iter().filter(|c| c.size == primary.size).collect();
                        cands
                            .iter()
                            .find(|c| released(c) && !link_used.contains(&c.path[..]))
                            .map(|c| (**c, ReuseMode::Link))
                            .or_else(|| cands.first().map(|c| (**c, ReuseMode::Copy)))
                    });
                match (found, primary.digest()) {
                    (Some((c, mode)), Some(digest)) => {
                        if mode == ReuseMode::Link {
                            link_used.insert(&c.path);
                        }
                        plan.reuse.push(Reuse {
                            from: c.path.clone(),
                            to: primary.path.clone(),
                            mode,
                            digest,
                            meta: primary.meta.clone(),
                        });
                    }
                    _ => {
                        plan.send.push(SendItem {
                            path: primary.path.clone(),
                            kind: Kind::File,
                            link_to: None,
                            size: primary.size,
                        });
                        plan.stats.files_to_send += 1;
                        plan.stats.bytes_to_send += primary.size;
                        for m in &members[1..] {
                            plan.send.push(SendItem {
                                path: m.path.clone(),
                                kind: Kind::File,
                                link_to: Some(primary.path.clone()),
                                // Sent as the file itself if the primary vanished.
                                size: primary.size,
                            });
                        }
                        continue;
                    }
                }
                primary
            }
        };
        let placed_inode = dest_by_path
            .get(&rest_from.path[..])
            .filter(|d| anchor.is_some() && d.kind == Kind::File)
            .map(|d| d.inode());
        for m in members.iter().filter(|m| m.path != rest_from.path) {
            let already = dest_by_path
                .get(&m.path[..])
                .is_some_and(|d| d.kind == Kind::File && Some(d.inode()) == placed_inode);
            if !already {
                plan.link.push(Link {
                    from: rest_from.path.clone(),
                    to: m.path.clone(),
                });
            }
        }
    }

    // Directories whose contents change get their metadata restored afterwards.
    let touched = plan
        .delete
        .iter()
        .chain(plan.mkdir.iter())
        .chain(plan.reuse.iter().map(|r| &r.to))
        .chain(plan.send.iter().map(|s| &s.path))
        .chain(plan.link.iter().map(|l| &l.to));
    for p in touched {
        if !p.is_empty() {
            changed_dirs.insert(split(p).0.to_vec());
        }
    }
    // Reused content is staged in a directory at the root, which changes the root's mtime.
    if !plan.reuse.is_empty() {
        changed_dirs.insert(Vec::new());
    }
    let mut dirs: Vec<&Entry> = changed_dirs
        .iter()
        .filter_map(|p| src_by_path.get(p))
        .filter(|e| e.kind == Kind::Dir)
        .collect();
    // Deepest first; the root (empty path) last.
    dirs.sort_by(|a, b| b.path.cmp(&a.path));
    plan.dirs = dirs
        .into_iter()
        .map(|e| MetaUpdate {
            path: e.path.clone(),
            kind: Kind::Dir,
            meta: e.meta.clone(),
        })
        .collect();
    plan.shrink_to_fit();
    Ok(plan)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sync::changes::Changes;

    /// An entry whose mtime follows its size: equal sizes look like the same content.
    pub(crate) fn entry(path: &str, kind: Kind, size: u64, ino: u64, nlink: u32) -> Entry {
        Entry {
            path: path.as_bytes().into(),
            kind,
            size,
            meta: Meta {
                mode: 0o644,
                mtime: 1000 + size as i64,
                ..Meta::default()
            },
            dev: 1,
            ino,
            nlink,
            target: None,
            hash: None,
        }
    }

    /// A tree of `entries` under an existing root.
    pub(crate) fn manifest(entries: Vec<Entry>) -> Manifest {
        let mut all = vec![entry("", Kind::Dir, 0, 1, 2)];
        all.extend(entries);
        Manifest {
            root_exists: true,
            entries: all,
            ..Manifest::default()
        }
    }

    /// Hashes for `paths`, as the agents answer a [`hash_request`]; one per size.
    pub(crate) fn with_hashes(m: &mut Manifest, paths: &[Vec<u8>]) {
        for e in &mut m.entries {
            if paths.iter().any(|p| **p == *e.path) {
                e.hash = Some(Box::new([e.size as u8; 32]));
            }
        }
    }

    #[test]
    fn a_maildir_flag_rename_is_a_rename_not_a_send() {
        let src = manifest(vec![
            entry("cur", Kind::Dir, 0, 2, 2),
            entry("cur/1:2,S", Kind::File, 50, 3, 1),
        ]);
        let dest = manifest(vec![
            entry("cur", Kind::Dir, 0, 2, 2),
            entry("cur/1:2,", Kind::File, 50, 9, 1),
        ]);
        let opts = PlanOptions {
            delete: true,
            ..PlanOptions::default()
        };
        let req = hash_request(&src, &dest, &opts);
        assert_eq!(req.src, vec![b"cur/1:2,S".to_vec()]);
        assert_eq!(req.dest, vec![b"cur/1:2,".to_vec()]);
        let (mut src, mut dest) = (src, dest);
        with_hashes(&mut src, &req.src);
        with_hashes(&mut dest, &req.dest);
        let plan = build(&src, &dest, &opts).unwrap();
        assert!(plan.send.is_empty());
        assert_eq!(plan.reuse.len(), 1);
        assert_eq!(plan.reuse[0].mode, ReuseMode::Link);
        assert_eq!(plan.delete, vec![RelPath::from(&b"cur/1:2,"[..])]);
        let changes = Changes::of(&src, &dest, &plan);
        assert_eq!(changes.renamed.len(), 1);
        assert!(
            changes.deleted.is_empty(),
            "a rename's old name is no delete"
        );
    }

    #[test]
    fn a_copied_message_keeps_its_dest_twin_by_copying() {
        // Same content under two independent names in SRC; DEST has only the first.
        let src = manifest(vec![
            entry("a", Kind::File, 70, 3, 1),
            entry("b", Kind::File, 70, 4, 1),
        ]);
        let dest = manifest(vec![entry("a", Kind::File, 70, 9, 1)]);
        let opts = PlanOptions::default();
        let req = hash_request(&src, &dest, &opts);
        let (mut src, mut dest) = (src, dest);
        with_hashes(&mut src, &req.src);
        with_hashes(&mut dest, &req.dest);
        let plan = build(&src, &dest, &opts).unwrap();
        assert_eq!(plan.reuse.len(), 1);
        assert_eq!(plan.reuse[0].mode, ReuseMode::Copy);
    }

    #[test]
    fn hard_link_group_links_new_names_to_the_unchanged_member() {
        let src = manifest(vec![
            entry("x", Kind::File, 10, 5, 2),
            entry("y", Kind::File, 10, 5, 2),
        ]);
        let dest = manifest(vec![entry("x", Kind::File, 10, 7, 1)]);
        let plan = build(&src, &dest, &PlanOptions::default()).unwrap();
        assert!(plan.send.is_empty());
        assert_eq!(
            plan.link,
            vec![Link {
                from: b"x"[..].into(),
                to: b"y"[..].into()
            }]
        );
    }

    #[test]
    fn a_new_hard_link_group_is_sent_once() {
        let src = manifest(vec![
            entry("x", Kind::File, 10, 5, 2),
            entry("y", Kind::File, 10, 5, 2),
        ]);
        let dest = manifest(vec![]);
        let plan = build(&src, &dest, &PlanOptions::default()).unwrap();
        assert_eq!(plan.stats.files_to_send, 1);
        assert_eq!(plan.send[1].link_to.as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn an_empty_source_does_not_empty_dest() {
        let src = manifest(vec![]);
        let dest = manifest(vec![
            entry("a", Kind::File, 1, 2, 1),
            entry("b", Kind::File, 1, 3, 1),
        ]);
        let opts = PlanOptions {
            delete: true,
            ..PlanOptions::default()
        };
        let err = build(&src, &dest, &opts).unwrap_err().to_string();
        assert!(err.contains("refusing to delete 2 entries"), "{err}");
        let allowed = PlanOptions {
            allow_empty_source: true,
            ..opts
        };
        let plan = build(&src, &dest, &allowed).unwrap();
        assert_eq!(Changes::of(&src, &dest, &plan).deleted.len(), 2);
    }

    #[test]
    fn a_type_change_deletes_the_subtree_once_even_without_delete() {
        let src = manifest(vec![entry("d", Kind::File, 3, 2, 1)]);
        let dest = manifest(vec![
            entry("d", Kind::Dir, 0, 2, 2),
            entry("d/x", Kind::File, 1, 3, 1),
        ]);
        let plan = build(&src, &dest, &PlanOptions::default()).unwrap();
        assert_eq!(plan.delete, vec![RelPath::from(&b"d"[..])]);
        assert_eq!(
            Changes::of(&src, &dest, &plan).deleted,
            vec![RelPath::from(&b"d"[..]), RelPath::from(&b"d/x"[..])],
            "the directory and what it held"
        );
        assert_eq!(plan.send.len(), 1);
    }

    #[test]
    fn unchanged_trees_give_an_empty_plan() {
        let src = manifest(vec![entry("a", Kind::File, 1, 2, 1)]);
        let plan = build(&src, &src.clone(), &PlanOptions::default()).unwrap();
        assert!(plan.is_empty(), "{plan:?}");
    }
}
