//! The result of a sync for people and scripts: the `--json` object, the summary line and
//! the `-n`/`-v` listing, all three from one [`Changes`], so they agree. Prints nothing
//! itself except the listing, which goes where the caller says.

use crate::report::size;
use crate::sync::changes::{Changes, Placed};
use crate::sync::manifest::{display_path, RelPath};
use base64::Engine as _;
use serde::Serialize;
use std::io::Write;

/// A path in the JSON: a string when it is UTF-8, else `{"bytes": "<base64 of the raw
/// bytes>"}`. Paths on Linux are bytes; this keeps every one, unlike lossy UTF-8.
#[derive(Serialize, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum JsonPath {
    Text(String),
    Bytes { bytes: String },
}

impl JsonPath {
    pub fn new(path: &[u8]) -> JsonPath {
        match std::str::from_utf8(path) {
            Ok(text) => JsonPath::Text(text.to_string()),
            Err(_) => JsonPath::Bytes {
                bytes: base64::engine::general_purpose::STANDARD.encode(path),
            },
        }
    }
}

#[derive(Serialize)]
pub struct SkippedJson {
    pub path: JsonPath,
    pub reason: String,
}

#[derive(Serialize)]
pub struct PlacedJson {
    from: JsonPath,
    to: JsonPath,
}

/// With `-v`: every changed path, by the category it is counted in.
#[derive(Serialize)]
pub struct ChangeLists {
    sent: Vec<JsonPath>,
    renamed: Vec<PlacedJson>,
    copied: Vec<PlacedJson>,
    linked: Vec<PlacedJson>,
    dirs_created: Vec<JsonPath>,
    attrs_only: Vec<JsonPath>,
    deleted: Vec<JsonPath>,
}

/// The `--json` result. Scripts depend on these field names; the README's sync reference
/// says what each counts. The SRC entries scanned add up to
/// `sent + renamed + copied + linked + dirs_created + attrs_only + unchanged + len(skipped)`;
/// `deleted` counts DEST's entries.
#[derive(Serialize)]
pub struct SyncReport {
    pub files_scanned: u64,
    pub dirs_scanned: u64,
    pub symlinks_scanned: u64,
    pub others_scanned: u64,
    pub sent: u64,
    pub bytes_sent: u64,
    /// None in a dry run: nothing was streamed.
    pub wire_bytes: Option<u64>,
    pub renamed: u64,
    pub copied: u64,
    pub linked: u64,
    pub dirs_created: u64,
    pub attrs_only: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub skipped: Vec<SkippedJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangeLists>,
    pub verified: bool,
    pub elapsed_s: f64,
    pub dry_run: bool,
    pub warnings: Vec<String>,
}

/// How the run went, besides what changed.
pub struct RunFacts {
    pub dry_run: bool,
    /// Stream bytes after compression.
    pub wire_bytes: u64,
    pub verified: bool,
    pub elapsed_s: f64,
    pub warnings: Vec<String>,
}

impl SyncReport {
    /// `lists`: include every changed path (`-v`).
    pub fn new(c: &Changes, run: RunFacts, lists: bool) -> SyncReport {
        let paths = |ps: &[RelPath]| ps.iter().map(|p| JsonPath::new(p)).collect();
        let placed = |ps: &[Placed]| {
            ps.iter()
                .map(|p| PlacedJson {
                    from: JsonPath::new(&p.from),
                    to: JsonPath::new(&p.to),
                })
                .collect()
        };
        SyncReport {
            files_scanned: c.scanned.files,
            dirs_scanned: c.scanned.dirs,
            symlinks_scanned: c.scanned.symlinks,
            others_scanned: c.scanned.others,
            sent: c.sent.len() as u64,
            bytes_sent: c.bytes_sent,
            wire_bytes: (!run.dry_run).then_some(run.wire_bytes),
            renamed: c.renamed.len() as u64,
            copied: c.copied.len() as u64,
            linked: c.linked.len() as u64,
            dirs_created: c.dirs_created.len() as u64,
            attrs_only: c.attrs_only.len() as u64,
            unchanged: c.unchanged,
            deleted: c.deleted.len() as u64,
            skipped: c
                .skipped
                .iter()
                .map(|s| SkippedJson {
                    path: JsonPath::new(&s.path),
                    reason: s.reason.clone(),
                })
                .collect(),
            changes: lists.then(|| ChangeLists {
                sent: paths(&c.sent),
                renamed: placed(&c.renamed),
                copied: placed(&c.copied),
                linked: placed(&c.linked),
                dirs_created: paths(&c.dirs_created),
                attrs_only: paths(&c.attrs_only),
                deleted: paths(&c.deleted),
            }),
            verified: run.verified,
            elapsed_s: run.elapsed_s,
            dry_run: run.dry_run,
            warnings: run.warnings,
        }
    }
}

/// The summary line: what SRC holds, then each category of change with its count.
pub fn summary(r: &SyncReport, src: &str, dest: &str) -> String {
    let scanned = r.files_scanned + r.dirs_scanned + r.symlinks_scanned + r.others_scanned;
    let kinds: Vec<String> = [
        (r.files_scanned, "file", "files"),
        (r.dirs_scanned, "dir", "dirs"),
        (r.symlinks_scanned, "symlink", "symlinks"),
        (r.others_scanned, "other", "other"),
    ]
    .into_iter()
    .filter(|(n, ..)| *n > 0)
    .map(|(n, one, many)| count(n, one, many))
    .collect();
    let mut s = format!(
        "relaymove: {src} → {dest}: {}",
        count(scanned, "entry", "entries")
    );
    if !kinds.is_empty() {
        s.push_str(&format!(" ({})", kinds.join(", ")));
    }
    // Each: the count, how a run says it, how a dry run says it.
    let changes = [
        (
            r.renamed,
            format!("{} renamed", r.renamed),
            format!("rename {}", r.renamed),
        ),
        (
            r.copied,
            format!("{} copied within DEST", r.copied),
            format!("copy {} within DEST", r.copied),
        ),
        (
            r.linked,
            format!("{} hard-linked", r.linked),
            format!("hard-link {}", r.linked),
        ),
        (
            r.dirs_created,
            format!("{} created", count(r.dirs_created, "dir", "dirs")),
            format!("create {}", count(r.dirs_created, "dir", "dirs")),
        ),
        (
            r.attrs_only,
            format!("{} attrs only", r.attrs_only),
            format!("set attrs of {}", r.attrs_only),
        ),
    ];
    let mut done = vec![match r.wire_bytes {
        Some(wire) => format!(
            "{} sent ({} of content, {} streamed)",
            r.sent,
            size(r.bytes_sent),
            size(wire)
        ),
        None => format!("would send {} ({})", r.sent, size(r.bytes_sent)),
    }];
    for (_, run, dry) in changes.into_iter().filter(|(n, ..)| *n > 0) {
        done.push(if r.dry_run { dry } else { run });
    }
    let mut kept = vec![format!("{} unchanged", r.unchanged)];
    if !r.skipped.is_empty() {
        kept.push(format!("{} skipped (-v lists them)", r.skipped.len()));
    }
    if r.dry_run {
        s.push_str(&format!(
            ": {}; {}; would delete {} from DEST; dry run, nothing was changed",
            done.join(", "),
            kept.join(", "),
            r.deleted
        ));
    } else {
        s.push_str(&format!(
            ": {}, {}; {} deleted from DEST",
            done.join(", "),
            kept.join(", "),
            r.deleted
        ));
        if r.verified {
            s.push_str("; every file written was checked against its SHA-256");
        }
    }
    s.push_str(&format!(" [{:.2}s]", r.elapsed_s));
    s
}

/// "1 file", "2 files".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The `-n`/`-v` listing: one line per changed path, in the categories the counts use.
pub fn listing(c: &Changes, out: &mut impl Write) -> std::io::Result<()> {
    for p in &c.deleted {
        writeln!(out, "delete  {}", display_path(p))?;
    }
    for p in &c.dirs_created {
        writeln!(out, "mkdir   {}/", display_path(p))?;
    }
    for (verb, placed) in [("rename", &c.renamed), ("copy  ", &c.copied)] {
        for p in placed {
            writeln!(
                out,
                "{verb}  {} -> {}",
                display_path(&p.from),
                display_path(&p.to)
            )?;
        }
    }
    for p in &c.sent {
        writeln!(out, "send    {}", display_path(p))?;
    }
    // As rsync writes a hard link: the new name, then the name it shares content with.
    for p in &c.linked {
        writeln!(
            out,
            "link    {} => {}",
            display_path(&p.to),
            display_path(&p.from)
        )?;
    }
    for p in &c.attrs_only {
        writeln!(out, "attrs   {}", display_path(p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::changes::Scanned;
    use crate::sync::manifest::Skipped;

    fn changes() -> Changes {
        let p = |s: &str| RelPath::from(s.as_bytes());
        let placed = |from: &str, to: &str| Placed {
            from: p(from),
            to: p(to),
        };
        Changes {
            scanned: Scanned {
                files: 6,
                dirs: 2,
                symlinks: 1,
                others: 1,
                bytes: 4 << 20,
            },
            sent: vec![p("link"), p("new")],
            bytes_sent: 3 << 20,
            renamed: vec![placed("cur/a:2,", "cur/a:2,S")],
            copied: Vec::new(),
            linked: vec![placed("new", "new2")],
            dirs_created: vec![p("d")],
            attrs_only: vec![p("cur")],
            unchanged: 3,
            skipped: vec![Skipped {
                path: b"sock".to_vec(),
                reason: "socket".into(),
            }],
            deleted: vec![p("old"), p("old/x")],
        }
    }

    fn report(dry_run: bool) -> SyncReport {
        let run = RunFacts {
            dry_run,
            wire_bytes: 1536,
            verified: !dry_run,
            elapsed_s: 0.5,
            warnings: Vec::new(),
        };
        SyncReport::new(&changes(), run, false)
    }

    #[test]
    fn the_summary_says_what_each_count_counts_in_binary_units() {
        assert_eq!(
            summary(&report(false), "src", "dest"),
            "relaymove: src → dest: 10 entries (6 files, 2 dirs, 1 symlink, 1 other): \
             2 sent (3.00 MiB of content, 1.50 KiB streamed), 1 renamed, 1 hard-linked, \
             1 dir created, 1 attrs only, 3 unchanged, 1 skipped (-v lists them); \
             2 deleted from DEST; every file written was checked against its SHA-256 [0.50s]"
        );
    }

    #[test]
    fn a_dry_run_summary_says_would_and_claims_nothing_streamed() {
        assert_eq!(
            summary(&report(true), "src", "dest"),
            "relaymove: src → dest: 10 entries (6 files, 2 dirs, 1 symlink, 1 other): \
             would send 2 (3.00 MiB), rename 1, hard-link 1, create 1 dir, set attrs of 1; \
             3 unchanged, 1 skipped (-v lists them); would delete 2 from DEST; \
             dry run, nothing was changed [0.50s]"
        );
        let json = serde_json::to_value(report(true)).unwrap();
        assert_eq!(json["wire_bytes"], serde_json::Value::Null);
    }

    #[test]
    fn json_paths_keep_every_byte() {
        let json = |p: &[u8]| serde_json::to_string(&JsonPath::new(p)).unwrap();
        assert_eq!(json(b"cur/1:2,S"), r#""cur/1:2,S""#);
        assert_eq!(json(b"new\nline"), r#""new\nline""#);
        assert_eq!(json(b"bad-\xff\xfe"), r#"{"bytes":"YmFkLf/+"}"#);
    }

    #[test]
    fn the_listing_has_one_line_per_change() {
        let mut out = Vec::new();
        listing(&changes(), &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "delete  old\n\
             delete  old/x\n\
             mkdir   d/\n\
             rename  cur/a:2, -> cur/a:2,S\n\
             send    link\n\
             send    new\n\
             link    new2 => new\n\
             attrs   cur\n"
        );
    }
}
