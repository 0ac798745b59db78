//! What a mirror changes, path by path: the account people (`-n`, `-v`, the summary line) and
//! scripts (`--json`) read. Every SRC entry below its root lands in exactly one category and
//! DEST's removed entries are counted apart, so the counts add up:
//!
//! ```text
//! files + dirs + symlinks + others scanned
//!   = sent + renamed + copied + linked + dirs created + attrs only + unchanged + skipped
//! ```
//!
//! The receiver carries out the plan, never this account. Where the plan's steps differ from
//! what a person sees, the account follows the person: a rename is a link plus a delete in the
//! plan, here one `renamed` whose old name is no delete.
//!
//! Pure computation from the manifests and the plan, no I/O.

use crate::sync::manifest::{ByPath, Kind, Manifest, RelPath, Skipped};
use crate::sync::plan::{ancestors, meta_same, Plan, ReuseMode};
use crate::sync::receive::ReceiveStats;
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

/// A path given content that DEST already has: `from` is the DEST name it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub from: RelPath,
    pub to: RelPath,
}

/// SRC's entries below its root, by type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scanned {
    /// Regular files.
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Fifos, sockets and device files.
    pub others: u64,
    /// Content bytes of the regular files.
    pub bytes: u64,
}

impl Scanned {
    /// Everything below SRC's root.
    pub fn entries(&self) -> u64 {
        self.files + self.dirs + self.symlinks + self.others
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub scanned: Scanned,
    /// New or changed content in the stream: files, symlinks and fifos.
    pub sent: Vec<RelPath>,
    /// Content bytes of the files sent: planned, and after a run, written.
    pub bytes_sent: u64,
    /// Content DEST had under a name that this run removes or gives other content: moved,
    /// not sent.
    pub renamed: Vec<Placed>,
    /// Content DEST has and keeps under `from`: copied within DEST, not sent.
    pub copied: Vec<Placed>,
    /// A new hard link to `from`, a file DEST has or receives in this run.
    pub linked: Vec<Placed>,
    pub dirs_created: Vec<RelPath>,
    /// Content as it was; only owner, group, mode or mtime set.
    pub attrs_only: Vec<RelPath>,
    pub unchanged: u64,
    /// Not mirrored: sockets and device files, and after a run what was left behind.
    pub skipped: Vec<Skipped>,
    /// DEST entries removed, each one under a removed directory too. The old name of a
    /// renamed entry is not one.
    pub deleted: Vec<RelPath>,
}

/// DEST's files that lose a name in this run, by inode: where a rename can come from.
struct OldNames<'a> {
    by_inode: HashMap<(u64, u64), Vec<&'a RelPath>>,
    taken: HashSet<&'a [u8]>,
}

impl<'a> OldNames<'a> {
    /// Takes `name`, if it is an old name of `inode`.
    fn claim(&mut self, inode: (u64, u64), name: &[u8]) -> Option<&'a RelPath> {
        let names = self.by_inode.get_mut(&inode)?;
        let i = names.iter().position(|n| n[..] == *name)?;
        let name = names.remove(i);
        self.taken.insert(name);
        Some(name)
    }

    /// Takes an old name of `inode`: `preferred` if it is one, else the first.
    fn take(&mut self, inode: (u64, u64), preferred: &[u8]) -> Option<&'a RelPath> {
        let names = self.by_inode.get_mut(&inode)?;
        let i = names.iter().position(|n| n[..] == *preferred).unwrap_or(0);
        let name = (i < names.len()).then(|| names.remove(i))?;
        self.taken.insert(name);
        Some(name)
    }
}

impl Changes {
    /// The account of `plan`, built from `src` and `dest`.
    pub fn of(src: &Manifest, dest: &Manifest, plan: &Plan) -> Changes {
        let dest_by_path = ByPath::new(dest);
        let removed: HashSet<&[u8]> = plan.delete.iter().map(|p| &p[..]).collect();
        // A run that deletes no directory (most re-syncs) looks up no file's ancestors: the
        // account of the benchmark's delta (56k files) took 30-33 ms with them, 13-26 without.
        let removes_dirs = plan
            .delete
            .iter()
            .any(|p| dest_by_path.get(p).is_some_and(|d| d.kind == Kind::Dir));
        let gone = |p: &[u8]| {
            !p.is_empty()
                && (removed.contains(p)
                    || removes_dirs && ancestors(p).any(|a| removed.contains(a)))
        };
        let mut old = OldNames {
            by_inode: HashMap::new(),
            taken: HashSet::new(),
        };
        for d in dest.entries.iter().filter(|d| d.kind == Kind::File) {
            if gone(&d.path) {
                old.by_inode.entry(d.inode()).or_default().push(&d.path);
            }
        }
        let dest_inode = |p: &[u8]| {
            dest_by_path
                .get(p)
                .filter(|d| d.kind == Kind::File)
                .map(|d| d.inode())
        };
        let mut changes = Changes::default();
        // Clones of the plan's paths: 8 bytes a slot, where a slice took 16. Sized once: a
        // table grown by doubling held its old slots beside the new for a moment.
        let mut accounted: HashSet<RelPath> =
            HashSet::with_capacity(plan.reuse.len() + plan.link.len() + plan.send.len());

        // A linked reuse takes its old name, which no longer exists afterwards: first, so no
        // copy or link claims that name.
        for r in plan.reuse.iter().filter(|r| r.mode == ReuseMode::Link) {
            if let Some(inode) = dest_inode(&r.from) {
                old.claim(inode, &r.from);
            }
            changes.renamed.push(placed(&r.from, &r.to));
            accounted.insert(r.to.clone());
        }
        // Content copied, or linked to a new name, from an inode that loses a name in this
        // run, was moved from that name.
        for r in plan.reuse.iter().filter(|r| r.mode == ReuseMode::Copy) {
            match dest_inode(&r.from).and_then(|inode| old.take(inode, &r.from)) {
                Some(name) => changes.renamed.push(placed(name, &r.to)),
                None => changes.copied.push(placed(&r.from, &r.to)),
            }
            accounted.insert(r.to.clone());
        }
        let reused_from: HashMap<&[u8], &[u8]> = plan
            .reuse
            .iter()
            .map(|r| (&r.to[..], &r.from[..]))
            .collect();
        for l in &plan.link {
            // The DEST inode behind `from`: where reused content came from, else its own.
            let origin = reused_from.get(&l.from[..]).copied().unwrap_or(&l.from);
            let new_name = !dest_by_path.contains(&l.to);
            match dest_inode(origin)
                .filter(|_| new_name)
                .and_then(|inode| old.take(inode, origin))
            {
                Some(name) => changes.renamed.push(placed(name, &l.to)),
                None => changes.linked.push(placed(&l.from, &l.to)),
            }
            accounted.insert(l.to.clone());
        }
        changes.sent.reserve_exact(plan.send.len());
        for s in &plan.send {
            match &s.link_to {
                Some(first) => changes.linked.push(placed(first, &s.path)),
                None => {
                    changes.sent.push(s.path.clone());
                    if s.kind == Kind::File {
                        changes.bytes_sent += s.size;
                    }
                }
            }
            accounted.insert(s.path.clone());
        }
        let created: HashSet<&[u8]> = plan.mkdir.iter().map(|p| &p[..]).collect();

        for s in src.entries.iter().filter(|s| !s.path.is_empty()) {
            match s.kind {
                Kind::File => {
                    changes.scanned.files += 1;
                    changes.scanned.bytes += s.size;
                }
                Kind::Dir => changes.scanned.dirs += 1,
                Kind::Symlink => changes.scanned.symlinks += 1,
                Kind::Fifo => changes.scanned.others += 1,
            }
            if accounted.contains(&s.path[..]) {
                continue;
            }
            if s.kind == Kind::Dir && created.contains(&s.path[..]) {
                changes.dirs_created.push(s.path.clone());
                continue;
            }
            // Placed by none of the above, the entry is in DEST already with its content;
            // the plan may still set its metadata (on this name or another of its inode).
            match dest_by_path.get(&s.path[..]) {
                Some(d) if d.kind == s.kind && !meta_same(s, d) => {
                    changes.attrs_only.push(s.path.clone())
                }
                _ => changes.unchanged += 1,
            }
        }
        // Settled entries (`sync::settle`) are unchanged by definition.
        let settled = src.settled;
        changes.scanned.files += settled.files;
        changes.scanned.bytes += settled.bytes;
        changes.scanned.symlinks += settled.symlinks;
        changes.scanned.others += settled.fifos;
        changes.unchanged += settled.entries();
        changes.scanned.others += src.skipped.len() as u64;
        changes.skipped = src.skipped.clone();
        changes.deleted = dest
            .entries
            .iter()
            .filter(|d| gone(&d.path) && !old.taken.contains(&d.path[..]))
            .map(|d| d.path.clone())
            .collect();
        changes.sort();
        changes
    }

    /// After the transfer: what was left behind moves from its category to `skipped`, and
    /// the bytes sent are those written.
    pub fn received(&mut self, stats: &ReceiveStats) {
        let left: HashSet<&[u8]> = stats.vanished.iter().map(|s| s.path.as_slice()).collect();
        self.sent.retain(|p| !left.contains(&p[..]));
        for placed in [&mut self.renamed, &mut self.copied, &mut self.linked] {
            placed.retain(|p| !left.contains(&p.to[..]));
        }
        self.skipped.extend(stats.vanished.iter().cloned());
        self.bytes_sent = stats.bytes_written;
        self.sort();
    }

    /// Unstable sorts where a list names each path once: a stable sort's scratch space was
    /// 0.9 MB of a first copy's peak (56k files sent).
    fn sort(&mut self) {
        self.sent.sort_unstable();
        for placed in [&mut self.renamed, &mut self.copied, &mut self.linked] {
            placed.sort_unstable_by(|a, b| a.to.cmp(&b.to));
        }
        self.dirs_created.sort_unstable();
        self.attrs_only.sort_unstable();
        self.skipped.sort_by(|a, b| a.path.cmp(&b.path));
        self.deleted.sort_unstable();
    }
}

fn placed(from: &RelPath, to: &RelPath) -> Placed {
    Placed {
        from: from.clone(),
        to: to.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::plan::tests::{entry, manifest, with_hashes};
    use crate::sync::plan::{build, hash_request, PlanOptions};

    fn paths(ps: &[&str]) -> Vec<RelPath> {
        ps.iter().map(|p| RelPath::from(p.as_bytes())).collect()
    }

    fn moved(from: &str, to: &str) -> Placed {
        placed(&from.as_bytes().into(), &to.as_bytes().into())
    }

    /// The account of a mirror from `dest` to `src`, both phases of planning included.
    fn account(mut src: Manifest, mut dest: Manifest) -> Changes {
        let opts = PlanOptions {
            delete: true,
            ..PlanOptions::default()
        };
        let req = hash_request(&src, &dest, &opts);
        with_hashes(&mut src, &req.src);
        with_hashes(&mut dest, &req.dest);
        let plan = build(&src, &dest, &opts).unwrap();
        let changes = Changes::of(&src, &dest, &plan);
        let s = &changes.scanned;
        let categories = changes.sent.len()
            + changes.renamed.len()
            + changes.copied.len()
            + changes.linked.len()
            + changes.dirs_created.len()
            + changes.attrs_only.len()
            + changes.skipped.len();
        assert_eq!(
            s.files + s.dirs + s.symlinks + s.others,
            categories as u64 + changes.unchanged,
            "the categories do not add up to the entries scanned: {changes:#?}"
        );
        changes
    }

    #[test]
    fn every_entry_is_counted_once_and_the_counts_add_up() {
        let mut link = entry("link", Kind::Symlink, 0, 10, 1);
        link.target = Some(b"edit"[..].into());
        let mut attr = entry("attr", Kind::File, 90, 17, 1);
        attr.meta.mode = 0o600;
        let mut src = manifest(vec![
            entry("cur", Kind::Dir, 0, 2, 2),
            entry("cur/a:2,S", Kind::File, 50, 3, 1),
            entry("cur/new", Kind::File, 60, 4, 1),
            entry("edit", Kind::File, 71, 5, 1),
            entry("h1", Kind::File, 80, 6, 2),
            entry("h2", Kind::File, 80, 6, 2),
            link,
            entry("newdir", Kind::Dir, 0, 11, 2),
            entry("attr", Kind::File, 90, 7, 1),
            entry("same", Kind::File, 95, 8, 1),
        ]);
        src.skipped.push(Skipped {
            path: b"sock".to_vec(),
            reason: "socket".into(),
        });
        let dest = manifest(vec![
            entry("cur", Kind::Dir, 0, 2, 2),
            entry("cur/a:2,", Kind::File, 50, 13, 1),
            entry("edit", Kind::File, 70, 15, 1),
            entry("h1", Kind::File, 80, 16, 1),
            attr,
            entry("same", Kind::File, 95, 18, 1),
            entry("gone", Kind::File, 30, 20, 1),
            entry("olddir", Kind::Dir, 0, 21, 2),
            entry("olddir/x", Kind::File, 31, 22, 1),
        ]);
        let c = account(src, dest);
        assert_eq!(
            c.scanned,
            Scanned {
                files: 7,
                dirs: 2,
                symlinks: 1,
                others: 1,
                // Per name: h1 and h2 are one inode.
                bytes: 50 + 60 + 71 + 80 + 80 + 90 + 95,
            }
        );
        assert_eq!(c.scanned.entries(), 11);
        assert_eq!(c.sent, paths(&["cur/new", "edit", "link"]));
        assert_eq!(c.bytes_sent, 60 + 71);
        assert_eq!(c.renamed, vec![moved("cur/a:2,", "cur/a:2,S")]);
        assert_eq!(c.linked, vec![moved("h1", "h2")]);
        assert!(c.copied.is_empty());
        assert_eq!(c.dirs_created, paths(&["newdir"]));
        assert_eq!(c.attrs_only, paths(&["attr"]));
        assert_eq!(c.unchanged, 3, "cur, h1 and same");
        assert_eq!(c.deleted, paths(&["gone", "olddir", "olddir/x"]));
    }

    #[test]
    fn a_rotated_log_is_a_rename_and_a_send_and_nothing_is_deleted() {
        // `mv log log.1`, then a new `log`: DEST's `log` moves to `log.1` and gets the new
        // content. This once made the delete count go below zero.
        let src = manifest(vec![
            entry("log", Kind::File, 20, 2, 1),
            entry("log.1", Kind::File, 10, 3, 1),
        ]);
        let dest = manifest(vec![entry("log", Kind::File, 10, 9, 1)]);
        let c = account(src, dest);
        assert_eq!(c.renamed, vec![moved("log", "log.1")]);
        assert_eq!(c.sent, paths(&["log"]));
        assert!(c.deleted.is_empty(), "{c:?}");
    }

    #[test]
    fn renaming_one_name_of_a_hard_linked_message_is_a_rename_not_a_link_and_a_delete() {
        let src = manifest(vec![
            entry("cur", Kind::Dir, 0, 2, 2),
            entry("cur/m:2,S", Kind::File, 40, 5, 2),
            entry("other", Kind::Dir, 0, 3, 2),
            entry("other/m", Kind::File, 40, 5, 2),
        ]);
        let dest = manifest(vec![
            entry("cur", Kind::Dir, 0, 2, 2),
            entry("cur/m:2,", Kind::File, 40, 9, 2),
            entry("other", Kind::Dir, 0, 3, 2),
            entry("other/m", Kind::File, 40, 9, 2),
        ]);
        let c = account(src, dest);
        assert_eq!(c.renamed, vec![moved("cur/m:2,", "cur/m:2,S")]);
        assert!(c.linked.is_empty() && c.deleted.is_empty(), "{c:?}");
        assert_eq!(c.unchanged, 3);
    }

    #[test]
    fn both_names_of_a_hard_linked_pair_renamed_are_two_renames() {
        let src = manifest(vec![
            entry("x2", Kind::File, 40, 5, 2),
            entry("y2", Kind::File, 40, 5, 2),
        ]);
        let dest = manifest(vec![
            entry("x", Kind::File, 40, 9, 2),
            entry("y", Kind::File, 40, 9, 2),
        ]);
        let c = account(src, dest);
        assert_eq!(c.renamed, vec![moved("x", "x2"), moved("y", "y2")]);
        assert!(c.copied.is_empty() && c.linked.is_empty() && c.deleted.is_empty());
    }

    #[test]
    fn content_that_stays_under_its_name_is_copied() {
        let src = manifest(vec![
            entry("a", Kind::File, 70, 3, 1),
            entry("b", Kind::File, 70, 4, 1),
        ]);
        let dest = manifest(vec![entry("a", Kind::File, 70, 9, 1)]);
        let c = account(src, dest);
        assert_eq!(c.copied, vec![moved("a", "b")]);
        assert_eq!((c.renamed.len(), c.unchanged), (0, 1));
    }

    #[test]
    fn what_a_run_left_behind_is_skipped_instead_of_sent() {
        let src = manifest(vec![
            entry("a", Kind::File, 1, 2, 1),
            entry("b", Kind::File, 2, 3, 2),
            entry("c", Kind::File, 2, 3, 2),
        ]);
        let mut c = account(src, manifest(vec![]));
        assert_eq!((c.sent.len(), c.linked.len(), c.bytes_sent), (2, 1, 3));
        let left = |p: &str| Skipped {
            path: p.as_bytes().to_vec(),
            reason: "changed during the sync".into(),
        };
        c.received(&ReceiveStats {
            bytes_written: 1,
            vanished: vec![left("c"), left("b")],
            ..ReceiveStats::default()
        });
        assert_eq!(c.sent, paths(&["a"]));
        assert!(c.linked.is_empty());
        assert_eq!(c.skipped, vec![left("b"), left("c")]);
        assert_eq!(c.bytes_sent, 1);
    }
}
