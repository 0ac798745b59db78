//! The data: every tree of the profile mirrored old → new through one agent per host, the
//! held Postfix queue in the final pass, and the proof that new holds what old held.
//!
//! The proof is made in the final pass, while old is frozen (it accepts mail and delivers
//! none) and new is stopped: afterwards new takes mail and its trees legitimately grow. `verify` (after activation) checks what must still
//! hold then: Dovecot's UIDVALIDITY and every UID old had, and the held queue.

use crate::migrate::journal::{self, StepState};
use crate::migrate::profile::Tree;
use crate::migrate::{Cx, Journal, StepId};
use crate::remote::mirror::{mirror, scan_both, MirrorOptions, Route, Side};
use crate::report::size;
use crate::sync::manifest::{Kind, Manifest};
use crate::sync::verify::{compare, Content};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// How many differences an error lists before "and N more".
const SHOW: usize = 20;

/// The profile's trees that exist on old; a missing required one is an error.
pub async fn present_trees(cx: &Cx) -> Result<Vec<Tree>> {
    let mut out = Vec::new();
    for tree in &cx.profile.trees {
        let path = tree.path.to_string_lossy();
        if cx.old.test(&["test", "-d", &path]).await? {
            out.push(tree.clone());
        } else if tree.required {
            bail!(
                "{path} does not exist on old ({}); nothing was changed\nhint: is profile = \"{:?}\" right for this server? Extra or moved trees go in [migrate] of the config",
                cx.old.host.label(),
                cx.profile.name
            );
        }
    }
    Ok(out)
}

/// How long a migration waits for a tree's lock that another relaymove holds. Old's migration
/// lock keeps out every other controller of this migration, so the holder is most likely an
/// agent of an earlier run whose connection broke (a cut link): it ends, and its lock with
/// it, once its SSH session does, seconds after the link is back (the lab's cut-link
/// scenario: a resume started at once met that agent still holding new's mailboxes).
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// Old → new: the presync at the configured bandwidth limit, the final sync at full speed.
async fn options(cx: &Cx, step: StepId, excludes: Vec<String>) -> MirrorOptions {
    MirrorOptions {
        route: cx.route(true).await,
        bwlimit: if step == StepId::Presync {
            cx.presync_bwlimit()
        } else {
            None
        },
        delete: true,
        checksum: false,
        excludes,
        allow_empty_source: false,
        dry_run: false,
        tee_stream: None,
        progress: cx.options.progress && !cx.out.json(),
        lock_wait: LOCK_WAIT,
        ..MirrorOptions::default()
    }
}

/// Mirrors one tree old → new through the hosts' agents; returns its facts.
async fn mirror_tree(
    cx: &mut Cx,
    step: StepId,
    path: &Path,
    excludes: Vec<String>,
) -> Result<Value> {
    let opts = options(cx, step, excludes).await;
    let old = cx.old.agent().await?;
    let new = cx.new.agent().await?;
    let outcome = mirror(
        Side {
            agent: old,
            root: path,
        },
        Side {
            agent: new,
            root: path,
        },
        &opts,
    )
    .await?;
    let s = &outcome.stats;
    let c = &outcome.changes;
    let line = format!(
        "{}: {} entries, {} files sent ({}), {} renamed, {} deleted{}",
        path.display(),
        c.scanned.entries(),
        s.files_written,
        size(s.bytes_written),
        c.renamed.len(),
        c.deleted.len(),
        if outcome.verified() {
            ""
        } else {
            " (NOT verified)"
        }
    );
    cx.note(step, &line);
    for w in &s.warnings {
        cx.note(step, &format!("warning: {w}"));
    }
    Ok(json!({
        "path": path,
        "entries": c.scanned.entries(),
        "bytes": c.scanned.bytes,
        "files_sent": s.files_written,
        "bytes_sent": s.bytes_written,
        "renamed": c.renamed.len(),
        "deleted": c.deleted.len(),
        // SRC's sockets and device files, and what vanished while it was read.
        "skipped": c.skipped.len(),
    }))
}

pub async fn presync(cx: &mut Cx) -> Result<Value> {
    let step = StepId::Presync;
    let trees = present_trees(cx).await?;
    // Old serves mail meanwhile: its work goes first.
    let low = !cx.options.normal_priority;
    if low {
        priority(cx, true).await?;
    }
    let mut facts = Vec::new();
    for tree in &trees {
        facts.push(mirror_tree(cx, step, &tree.path, Vec::new()).await?);
    }
    if low {
        priority(cx, false).await?;
    }
    Ok(json!({
        "summary": format!(
            "{} trees copied while old serves mail, {}",
            trees.len(),
            route_words(&cx.route(true).await)
        ),
        "trees": facts,
    }))
}

/// How the data went, for a step's summary.
fn route_words(route: &Route) -> String {
    match route {
        Route::Direct(to) => format!("old → new directly (at {to})"),
        Route::Controller => "relayed through this machine".to_string(),
    }
}

/// Both agents at low or normal CPU and I/O priority.
async fn priority(cx: &mut Cx, low: bool) -> Result<()> {
    for node in [&mut cx.old, &mut cx.new] {
        let label = node.label();
        node.agent()
            .await?
            .call::<()>(&crate::remote::protocol::Request::Priority { low })
            .await
            .with_context(|| format!("setting the agent's priority on {label}"))?;
    }
    Ok(())
}

pub async fn final_sync(cx: &mut Cx) -> Result<Value> {
    let step = StepId::FinalSync;
    // The mailboxes must not change under the final pass: old delivers nothing while frozen.
    if let Some(why) = crate::migrate::services::still_frozen(cx).await? {
        bail!(
            "{why}: the mailboxes could change under the final pass\nhint: run `relaymove migrate --from freeze_old`"
        );
    }
    // The held queue moves as files, into new's queue while its Postfix is stopped.
    if cx
        .new
        .test(&["systemctl", "is-active", "--quiet", cx.profile.postfix_unit])
        .await?
    {
        bail!("Postfix runs on new; the held queue cannot move into it while it does\nhint: run `relaymove migrate --from prepare_new`");
    }
    let trees = present_trees(cx).await?;
    let mut facts = Vec::new();
    for tree in &trees {
        facts.push(mirror_tree(cx, step, &tree.path, Vec::new()).await?);
    }
    let hold = cx.profile.hold_queue.clone();
    facts.push(mirror_tree(cx, step, &hold, Vec::new()).await?);
    // Proof while nothing moves: every file of every tree, by content, on both hosts.
    let mut proven = 0;
    for tree in &trees {
        proven += prove_equal(cx, &tree.path, Vec::new(), Content::Hashes).await?;
    }
    let held_before = held_files(cx, &hold).await?;
    // Queue file names follow inode numbers: on another file system they must be renamed
    // before Postfix starts (postsuper(1)); then the chroot and permissions are made whole.
    let renamed = cx.new.run(&["postsuper", "-s"]).await?;
    cx.new.run(&["postfix", "set-permissions"]).await?;
    cx.new
        .run(&["postfix", "check"])
        .await
        .context("`postfix check` on new after moving the held queue")?;
    let held_after = held_files(cx, &hold).await?;
    if held_before != held_after {
        bail!(
            "the held queue on new differs from old's after `postsuper -s`: {} held on old, {} on new",
            held_before.len(),
            held_after.len()
        );
    }
    let held = held_after.len();
    cx.note(
        step,
        &format!(
            "proven: {proven} entries identical on both hosts (SHA-256 of every file, owners by name, modes, mtimes, links); {held} held message(s) held on new{}",
            if renamed.trim().is_empty() { String::new() } else { format!(" ({})", renamed.trim()) }
        ),
    );
    Ok(json!({
        "summary": format!(
            "{} trees and the held queue moved {}; {proven} entries proven identical",
            trees.len(),
            route_words(&cx.route(true).await)
        ),
        "trees": facts,
        "proven_entries": proven,
        "queue": {"hold": held},
    }))
}

/// Scans `root` on both hosts and fails with every difference; returns the entry count.
async fn prove_equal(
    cx: &mut Cx,
    root: &Path,
    excludes: Vec<String>,
    content: Content,
) -> Result<usize> {
    let (src, dest) = scan_pair(cx, root, excludes, content == Content::Hashes).await?;
    let differences = compare(&src, &dest, content);
    if !differences.is_empty() {
        let mut text: Vec<String> = differences
            .iter()
            .take(SHOW)
            .map(|d| format!("  {d}"))
            .collect();
        if differences.len() > SHOW {
            text.push(format!("  and {} more", differences.len() - SHOW));
        }
        bail!(
            "{} on new differs from old ({} differences; \"here\" is old, \"there\" is new):\n{}",
            root.display(),
            differences.len(),
            text.join("\n")
        );
    }
    Ok(src.entries.len())
}

async fn scan_pair(
    cx: &mut Cx,
    root: &Path,
    excludes: Vec<String>,
    checksum: bool,
) -> Result<(Manifest, Manifest)> {
    let old = cx.old.agent().await?;
    let new = cx.new.agent().await?;
    scan_both(
        &mut Side { agent: old, root },
        &mut Side { agent: new, root },
        checksum,
        &excludes,
    )
    .await
}

/// The held queue's files by content, on both hosts; a difference is an error. Names are
/// left out: `postsuper -s` renames files on new. Returns new's multiset.
async fn held_files(cx: &mut Cx, hold: &Path) -> Result<Vec<[u8; 32]>> {
    let (old, new) = scan_pair(cx, hold, Vec::new(), true).await?;
    let contents = |m: &Manifest| {
        let mut hashes: Vec<[u8; 32]> = m
            .entries
            .iter()
            .filter(|e| e.kind == Kind::File)
            .map(|e| e.digest().unwrap_or_default())
            .collect();
        hashes.sort_unstable();
        hashes
    };
    let (old, new) = (contents(&old), contents(&new));
    if old != new {
        bail!(
            "the held queue on new is not old's: {} message(s) on old, {} on new",
            old.len(),
            new.len()
        );
    }
    Ok(new)
}

/// Re-check of a recorded final sync: the trees still look the same on both hosts (sizes,
/// owners, modes, mtimes; no hashing).
pub async fn still_equal(cx: &mut Cx) -> Result<Option<String>> {
    for tree in present_trees(cx).await? {
        if let Err(e) = prove_equal(cx, &tree.path, Vec::new(), Content::Sizes).await {
            return Ok(Some(format!("{e:#}")));
        }
    }
    Ok(None)
}

pub async fn ownership(cx: &mut Cx) -> Result<Value> {
    let step = StepId::Ownership;
    let mut checked = Vec::new();
    let mut wrong = Vec::new();
    let owned: Vec<(String, &str)> = cx
        .profile
        .trees
        .iter()
        .filter_map(|t| t.owner.map(|o| (t.path.to_string_lossy().into_owned(), o)))
        .chain(
            cx.profile
                .owned
                .iter()
                .map(|o| (o.path.to_string_lossy().into_owned(), o.owner)),
        )
        .collect();
    for (path, want) in owned {
        if !cx.old.test(&["test", "-e", &path]).await? {
            continue;
        }
        let on_new = cx.new.run(&["stat", "-c", "%U:%G", &path]).await?;
        if on_new.trim() != want {
            wrong.push(format!(
                "{path} is owned by {} on new, not {want}",
                on_new.trim()
            ));
        }
        checked.push(path);
    }
    if !wrong.is_empty() {
        bail!("{}\nhint: the daemons refuse files they do not own; run `relaymove migrate --from final_sync`", wrong.join("\n"));
    }
    let mut mappings = serde_json::Map::new();
    for account in cx.profile.accounts {
        let (old, new) = (ids(&cx.old, account).await?, ids(&cx.new, account).await?);
        if old.0.is_empty() && old.1.is_empty() {
            continue;
        }
        if (!old.0.is_empty() && new.0.is_empty()) || (!old.1.is_empty() && new.1.is_empty()) {
            bail!(
                "{account} exists on old but not on new: files it owns kept old's number\nhint: install the packages on new (the configure hook), then `relaymove migrate --from final_sync`"
            );
        }
        let line = format!(
            "{account}: uid {} → {}, gid {} → {}",
            old.0, new.0, old.1, new.1
        );
        if old != new {
            cx.note(step, &line);
        }
        mappings.insert(
            account.to_string(),
            json!({"old": [old.0, old.1], "new": [new.0, new.1]}),
        );
    }
    Ok(json!({
        "summary": format!("{} owners as the daemons need them; ids mapped by name", checked.len()),
        "checked": checked,
        "ids": mappings,
    }))
}

/// `(uid, gid)` of the account on `node`, empty strings where it has none.
async fn ids(node: &crate::migrate::Node, account: &str) -> Result<(String, String)> {
    let u = node
        .host
        .run_status(&["id", "-u", account])
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", node.role))?;
    let g = node
        .host
        .run_status(&["getent", "group", account])
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", node.role))?;
    let uid = if u.status == 0 {
        u.stdout.trim().to_string()
    } else {
        String::new()
    };
    let gid = g.stdout.split(':').nth(2).unwrap_or("").trim().to_string();
    Ok((uid, gid))
}

/// Dovecot's view, read from its files: per mailbox, the UID list's UIDVALIDITY and every
/// UID with its message file. New (running, taking mail) must keep old's UIDVALIDITY and
/// every UID old had, for the same file; it may have more.
pub async fn verify(cx: &mut Cx, journal: &Journal) -> Result<Value> {
    let step = StepId::Verify;
    let mail_root = cx.profile.mailboxes().to_string_lossy().into_owned();
    let old = uid_lists(&cx.old, &mail_root).await?;
    let new = uid_lists(&cx.new, &mail_root).await?;
    let mut problems = Vec::new();
    let mut uids = 0;
    for (mailbox, o) in &old {
        let Some(n) = new.get(mailbox) else {
            problems.push(format!("{mailbox}: no dovecot-uidlist on new"));
            continue;
        };
        if o.validity != n.validity {
            problems.push(format!("{mailbox}: UIDVALIDITY {} on old, {} on new: clients would download everything again", o.validity, n.validity));
        }
        for (uid, name) in &o.uids {
            match n.uids.get(uid) {
                Some(m) if m == name => uids += 1,
                Some(m) => {
                    problems.push(format!("{mailbox}: UID {uid} is {name} on old, {m} on new"))
                }
                None => problems.push(format!("{mailbox}: UID {uid} ({name}) missing on new")),
            }
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(SHOW);
        bail!(
            "Dovecot's view on new differs from old's ({n} problems):\n  {}",
            problems.join("\n  ")
        );
    }
    cx.note(step, &format!("{} mailboxes: UIDVALIDITY kept, all {uids} UIDs old had map to the same messages on new", old.len()));
    // Held mail stays held: new must not deliver what old's admin put on hold.
    let held_before = match journal::state_of(journal.current(), StepId::FinalSync.id()) {
        StepState::Done { facts, .. } => facts
            .pointer("/queue/hold")
            .and_then(Value::as_u64)
            .unwrap_or(0),
        _ => 0,
    };
    let held_now = cx
        .new
        .run(&["find", "/var/spool/postfix/hold", "-type", "f"])
        .await?
        .lines()
        .count() as u64;
    if held_now < held_before {
        bail!("{held_before} messages were held in old's queue, {held_now} are held on new\nhint: held mail was released on new; check `postqueue -p` there");
    }
    cx.note(step, &format!("{held_now} held messages still held on new"));
    Ok(json!({
        "summary": format!("{} mailboxes and {uids} UIDs as on old; {held_now} held", old.len()),
        "mailboxes": old.len(),
        "uids": uids,
        "held": held_now,
    }))
}

struct UidList {
    validity: String,
    /// UID → message file base name (without the `:2,` flags part).
    uids: BTreeMap<u64, String>,
}

/// Every `dovecot-uidlist` under `root` on `node`, parsed, by mailbox directory.
async fn uid_lists(node: &crate::migrate::Node, root: &str) -> Result<BTreeMap<String, UidList>> {
    let text = node
        .run(&[
            "find",
            root,
            "-name",
            "dovecot-uidlist",
            "-type",
            "f",
            "-exec",
            "awk",
            "{print FILENAME \"\\t\" $0}",
            "{}",
            "+",
        ])
        .await
        .with_context(|| format!("reading Dovecot's UID lists under {root} on {}", node.role))?;
    parse_uid_lists(&text)
}

/// Parses `path\tline` pairs of dovecot-uidlist files (version 3: a header
/// `3 V<uidvalidity> N<nextuid> …`, then `<uid> [fields] :<filename>`).
fn parse_uid_lists(text: &str) -> Result<BTreeMap<String, UidList>> {
    let mut out: BTreeMap<String, UidList> = BTreeMap::new();
    for line in text.lines() {
        let Some((file, rest)) = line.split_once('\t') else {
            continue;
        };
        let mailbox = file
            .trim_end_matches("dovecot-uidlist")
            .trim_end_matches('/')
            .to_string();
        let entry = out.entry(mailbox).or_insert_with(|| UidList {
            validity: String::new(),
            uids: BTreeMap::new(),
        });
        if entry.validity.is_empty() {
            entry.validity = rest
                .split_whitespace()
                .find_map(|f| f.strip_prefix('V'))
                .map(str::to_string)
                .with_context(|| format!("{file}: no UIDVALIDITY in the header"))?;
            continue;
        }
        let uid = rest
            .split_whitespace()
            .next()
            .and_then(|u| u.parse::<u64>().ok());
        let name = rest
            .split_once(':')
            .map(|(_, n)| n.split(":2,").next().unwrap_or(n).to_string());
        if let (Some(uid), Some(name)) = (uid, name) {
            entry.uids.insert(uid, name);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_lists_parse_header_and_entries_without_flags() {
        let text = "/m/a/dovecot-uidlist\t3 V1700000000 N3 G0123\n\
                    /m/a/dovecot-uidlist\t1 :1700000001.M1P1.old,S=10:2,S\n\
                    /m/a/dovecot-uidlist\t2 W12 :1700000002.M2P1.old,S=12\n\
                    /m/b/.Sent/dovecot-uidlist\t3 V1700000005 N1\n";
        let lists = parse_uid_lists(text).unwrap();
        assert_eq!(lists.len(), 2);
        let a = &lists["/m/a"];
        assert_eq!(a.validity, "1700000000");
        assert_eq!(a.uids[&1], "1700000001.M1P1.old,S=10");
        assert_eq!(a.uids[&2], "1700000002.M2P1.old,S=12");
        assert_eq!(lists["/m/b/.Sent"].uids.len(), 0);
        assert!(parse_uid_lists("/m/c/dovecot-uidlist\t3 N1\n").is_err());
    }
}
