//! One mirror of a tree from one agent to another: scan both sides (settling what they have
//! alike as the scans arrive, `sync::settle`), hash rename candidates, plan, then stream the
//! plan's files from the sender's agent to the receiver's: directly between the hosts over a
//! one-time SSH key (`Route::Direct`, see `remote::direct`), or relayed through this process
//! (`Route::Controller`: no host-to-host SSH at all).
//!
//! It takes running agents, not endpoints, so one agent session per host serves every tree of
//! a migration step. It prints nothing: the caller renders the outcome and owns the progress
//! display.

use crate::remote::agent::Agent;
use crate::remote::direct::{self, Accepting, KeyMade};
use crate::remote::endpoint::TransferAddress;
use crate::remote::protocol::{
    read_chunk_async, read_frame_async, DirectSend, Hashes, ReceiveEvent, Reply, Request, Space,
    CHUNK,
};
use crate::report::progress::Progress;
use crate::report::size;
use crate::sync::changes::Changes;
use crate::sync::compress::{Compression, LevelsTaken};
use crate::sync::manifest::{
    display_path, root_setuid_bits, Digest, Entry, Kind, Manifest, RelPath, Skipped,
};
use crate::sync::plan::{self, Plan, PlanOptions};
use crate::sync::receive::ReceiveStats;
use crate::sync::settle::settle;
use anyhow::{anyhow, bail, Context, Result};
use foldhash::HashMap;
use std::borrow::Cow;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// What to mirror and how.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Delete what DEST has and SRC has not.
    pub delete: bool,
    /// Decide "changed" by content hash instead of size and mtime.
    pub checksum: bool,
    /// Globs left alone on both sides.
    pub excludes: Vec<String>,
    /// An empty or missing SRC may empty DEST.
    pub allow_empty_source: bool,
    /// Plan only.
    pub dry_run: bool,
    /// How the stream is compressed (`None` when both sides are on this host).
    pub compression: Compression,
    /// Also write the stream to this file (created 0600, never over an existing file).
    pub tee_stream: Option<PathBuf>,
    /// Show a progress bar or lines on stderr while the stream flows.
    pub progress: bool,
    /// An agent that sends nothing for this long, in any phase, fails the mirror (a hung
    /// disk, a stopped process or a dead connection would otherwise wait forever).
    pub timeout: Duration,
    /// Keep setuid/setgid bits on files owned by root; else they arrive without them.
    pub keep_setuid: bool,
    /// How the stream travels between two remote hosts.
    pub route: Route,
    /// Stream bytes a second at most (the sender waits).
    pub bwlimit: Option<u64>,
    /// How long DEST's lock, held by another relaymove, is waited for before the mirror
    /// fails. Zero for `sync`: a second sync is told at once.
    pub lock_wait: Duration,
}

/// The stream's way from sender to receiver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Route {
    /// Through this process: for a local side, or hosts that cannot reach each other.
    #[default]
    Controller,
    /// The sending host connects to the receiving one at this address (both remote).
    Direct(TransferAddress),
}

/// `MirrorOptions::timeout` unless set: long enough for a scan of a big tree or the final
/// `syncfs` of a slow disk, which send nothing while they run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl Default for MirrorOptions {
    fn default() -> MirrorOptions {
        MirrorOptions {
            delete: false,
            checksum: false,
            excludes: Vec::new(),
            allow_empty_source: false,
            dry_run: false,
            compression: Compression::Adaptive,
            tee_stream: None,
            progress: false,
            timeout: DEFAULT_TIMEOUT,
            keep_setuid: false,
            route: Route::Controller,
            bwlimit: None,
            lock_wait: Duration::ZERO,
        }
    }
}

/// What a mirror found and did.
pub struct MirrorOutcome {
    pub plan: Plan,
    /// What the plan changes, path by path; after a run, what it changed.
    pub changes: Changes,
    /// Default (nothing written) for a dry run or an empty plan.
    pub stats: ReceiveStats,
    /// Since the mirror began: both trees scanned, and the plan made.
    pub scanned: Duration,
    pub planned: Duration,
}

impl MirrorOutcome {
    /// Files SRC has but DEST did not get in this run: they vanished or changed on the
    /// source while it was read (a live tree). DEST keeps its old version; the next run
    /// copies them.
    pub fn left_behind(&self) -> &[Skipped] {
        &self.stats.vanished
    }

    /// True when every file written was checked against the sender's SHA-256.
    pub fn verified(&self) -> bool {
        self.plan.is_empty() || self.stats.verified
    }
}

/// One end of a mirror: its agent and the tree's root on that host.
pub struct Side<'a> {
    pub agent: &'a mut Agent,
    pub root: &'a Path,
}

fn root_bytes(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

/// `host:/path` for messages.
pub fn describe(side: &Side<'_>) -> String {
    format!("{}:{}", side.agent.label(), side.root.display())
}

/// The request for a scan of `root`: a caller that asks for SRC's scan ahead
/// ([`Agent::ask_ahead`]) makes it here too, so that the mirror's own is the same.
pub fn scan_request(root: &Path, checksum: bool, excludes: &[String]) -> Request<'static> {
    Request::Scan {
        root: root_bytes(root),
        checksum,
        excludes: excludes.to_vec(),
    }
}

/// Scans both roots in parallel; the manifests come back as each agent saw them.
pub async fn scan_both(
    src: &mut Side<'_>,
    dest: &mut Side<'_>,
    checksum: bool,
    excludes: &[String],
) -> Result<(Manifest, Manifest)> {
    let (src_scan, dest_scan) = (
        scan_request(src.root, checksum, excludes),
        scan_request(dest.root, checksum, excludes),
    );
    let (src_what, dest_what) = (describe(src), describe(dest));
    let (s, d) = tokio::join!(
        src.agent.call::<Manifest>(&src_scan),
        dest.agent.call::<Manifest>(&dest_scan)
    );
    Ok((
        s.with_context(|| format!("scanning {src_what}"))?,
        d.with_context(|| format!("scanning {dest_what}"))?,
    ))
}

/// `agent.call`, failing when the agent answers nothing for `limit` (see [`within`]).
async fn call_within<T: serde::de::DeserializeOwned + Send + 'static>(
    agent: &mut Agent,
    request: &Request<'_>,
    limit: Option<Duration>,
    phase: &str,
) -> Result<T> {
    within(agent, limit, phase, async |a: &mut Agent| {
        a.call(request).await
    })
    .await
}

/// `call` on `agent`, failing when it gives no answer for `limit`; the agent is then
/// abandoned (its session can no longer be trusted to be in step).
async fn within<T>(
    agent: &mut Agent,
    limit: Option<Duration>,
    phase: &str,
    call: impl AsyncFnOnce(&mut Agent) -> Result<T>,
) -> Result<T> {
    let Some(limit) = limit else {
        return call(agent).await;
    };
    match tokio::time::timeout(limit, call(agent)).await {
        Ok(answer) => answer,
        Err(_) => {
            let e = silent(agent.label(), phase, limit);
            agent.abort();
            Err(e)
        }
    }
}

/// Scans both trees and settles them as the manifests arrive (`sync::settle`): the plan gets
/// what differs, and neither tree is ever whole in this process. SRC's files lose their root
/// setuid bits first unless `keep_setuid`, so that DEST without them settles too; their paths
/// are returned.
async fn scan_settled(
    src: &mut Side<'_>,
    dest: &mut Side<'_>,
    opts: &MirrorOptions,
    limit: Option<Duration>,
) -> Result<(Manifest, Manifest, Vec<RelPath>)> {
    let (src_scan, dest_scan) = (
        scan_request(src.root, opts.checksum, &opts.excludes),
        scan_request(dest.root, opts.checksum, &opts.excludes),
    );
    let (src_what, dest_what) = (describe(src), describe(dest));
    let (src_phase, dest_phase) = (
        format!("scanning {src_what}"),
        format!("scanning {dest_what}"),
    );
    // Two batches a side in flight: the decoders run ahead of the merge, not a tree ahead.
    let (src_tx, src_rx) = mpsc::sync_channel::<Vec<Entry>>(2);
    let (dest_tx, dest_rx) = mpsc::sync_channel::<Vec<Entry>>(2);
    let (checksum, keep_setuid) = (opts.checksum, opts.keep_setuid);
    let settling = tokio::task::spawn_blocking(move || {
        let (mut s, mut d, mut unset) = (Manifest::default(), Manifest::default(), Vec::new());
        let src_entries = src_rx.into_iter().flatten().map(|mut e| {
            if !keep_setuid && drop_root_setuid(&mut e) {
                unset.push(e.path.clone());
            }
            e
        });
        settle(
            &mut s,
            src_entries,
            &mut d,
            dest_rx.into_iter().flatten(),
            checksum,
        )?;
        anyhow::Ok((s, d, unset))
    });
    let pass = |tx: mpsc::SyncSender<Vec<Entry>>| move |batch| tx.send(batch).is_ok();
    let (s, d) = tokio::join!(
        within(src.agent, limit, &src_phase, async |a: &mut Agent| a
            .scan_each(&src_scan, pass(src_tx))
            .await),
        within(dest.agent, limit, &dest_phase, async |a: &mut Agent| a
            .scan_each(&dest_scan, pass(dest_tx))
            .await)
    );
    // Both decoders have ended (their senders are gone), so the merge has too. Its error, an
    // agent's scan out of order, is why the decoders stopped: it goes first.
    let (mut src_m, mut dest_m, unset) = settling
        .await
        .context("settling the scans")?
        .with_context(|| format!("scanning {src_what} and {dest_what}"))?;
    let s = s.with_context(|| src_phase.clone())?;
    let d = d.with_context(|| dest_phase.clone())?;
    for (whole, scanned) in [(&mut src_m, s), (&mut dest_m, d)] {
        whole.root_exists = scanned.root_exists;
        whole.skipped = scanned.skipped;
        whole.leftovers = scanned.leftovers;
    }
    Ok((src_m, dest_m, unset))
}

/// The error for an agent that went silent.
fn silent(host: &str, phase: &str, limit: Duration) -> anyhow::Error {
    anyhow!(
        "the agent on {host} made no progress for {} s while {phase}: it is stuck (a hung disk or mount, a \
         stopped process) or its connection is dead; if that phase is legitimately this slow there, raise \
         --timeout (now {} s)",
        limit.as_secs(),
        limit.as_secs()
    )
}

/// Makes `dest` a mirror of `src`.
pub async fn mirror(
    mut src: Side<'_>,
    mut dest: Side<'_>,
    opts: &MirrorOptions,
) -> Result<MirrorOutcome> {
    let start = Instant::now();
    let (src_what, dest_what) = (describe(&src), describe(&dest));
    // Before the scan: a second sync into this DEST is refused before it plans anything.
    let limit = Some(opts.timeout);
    if !opts.dry_run {
        let lock = Request::LockTree {
            root: root_bytes(dest.root),
            wait_s: u32::try_from(opts.lock_wait.as_secs()).unwrap_or(u32::MAX),
        };
        call_within::<()>(dest.agent, &lock, limit, &format!("locking {dest_what}"))
            .await
            .with_context(|| format!("locking {dest_what}"))?;
    }
    // Cleared when the mirror returns, before its caller prints the outcome or the error.
    let mut progress = Progress::new(opts.progress);
    progress.phase(format!("scanning {src_what} and {dest_what}"));
    let (mut src_m, mut dest_m, unset) = scan_settled(&mut src, &mut dest, opts, limit).await?;
    if !src_m.root_exists && !opts.allow_empty_source {
        bail!(
            "SRC {} does not exist on {}; nothing was changed\nhint: check the path; pass --allow-empty-source to empty DEST",
            src.root.display(),
            src.agent.label()
        );
    }
    let scanned = start.elapsed();
    let plan_opts = PlanOptions {
        delete: opts.delete,
        checksum: opts.checksum,
        allow_empty_source: opts.allow_empty_source,
    };
    let request = plan::hash_request(&src_m, &dest_m, &plan_opts);
    if !request.src.is_empty() {
        progress.phase(format!(
            "hashing {} rename candidates",
            request.src.len() + request.dest.len()
        ));
        let hash = |root: &Path, paths: Vec<Vec<u8>>| Request::Hash {
            root: root_bytes(root),
            paths,
        };
        let (src_hash, dest_hash) = (hash(src.root, request.src), hash(dest.root, request.dest));
        let (src_phase, dest_phase) = (
            format!("hashing rename candidates in {src_what}"),
            format!("hashing rename candidates in {dest_what}"),
        );
        let (hs, hd) = tokio::join!(
            call_within::<Hashes>(src.agent, &src_hash, limit, &src_phase),
            call_within::<Hashes>(dest.agent, &dest_hash, limit, &dest_phase)
        );
        fill_hashes(&mut src_m, hs?);
        fill_hashes(&mut dest_m, hd?);
    }
    progress.phase("planning".to_string());
    let plan = plan::build(&src_m, &dest_m, &plan_opts)
        .with_context(|| format!("planning {src_what} → {dest_what}"))?;
    let planned = start.elapsed();
    let mut changes = Changes::of(&src_m, &dest_m, &plan);
    let mut stats = if opts.dry_run || plan.is_empty() {
        ReceiveStats::default()
    } else {
        let request = Request::Space {
            root: root_bytes(dest.root),
        };
        let phase = format!("checking the free space of {dest_what}");
        let space = call_within::<Space>(dest.agent, &request, limit, &phase)
            .await
            .with_context(|| phase.clone())?;
        check_space(&needed(&plan, &dest_m, space.block), &space, &dest_what)?;
        // The transfer needs the plan, not the trees: their manifests (on a first copy, a
        // third of the controller's memory) go before it starts.
        drop((src_m, dest_m));
        progress.transfer(plan.stats.files_to_send, plan.stats.bytes_to_send);
        let transferred = match (&opts.route, &opts.tee_stream) {
            (Route::Direct(to), None) => {
                transfer_direct(src, dest, &plan, opts, to, &mut progress).await
            }
            _ => {
                let tee = match &opts.tee_stream {
                    Some(path) => Some(create_tee(path)?),
                    None => None,
                };
                transfer(src, dest, &plan, opts, tee, &mut progress).await
            }
        };
        transferred.map_err(|e| {
            if e.chain().any(|c| c.is::<NoDirectRoute>()) {
                // Nothing was sent: its own hint is the whole story.
                return anyhow!("sync {src_what} → {dest_what} failed: {e:#}");
            }
            let errno = e
                .chain()
                .find_map(|c| c.downcast_ref::<ReceiverFailed>())
                .and_then(|f| f.errno);
            anyhow!(
                "sync {src_what} → {dest_what} failed: {e:#}\nhint: {}",
                failure_hint(errno, &dest_what)
            )
        })?
    };
    if !opts.dry_run {
        changes.received(&stats);
    }
    if !unset.is_empty() {
        let shown: Vec<String> = unset.iter().take(5).map(|p| display_path(p)).collect();
        stats.warnings.push(format!(
            "{} root-owned setuid/setgid files of {src_what} are on {dest_what} without those bits ({}{}); \
             pass --keep-setuid if the source is trusted and they are needed",
            unset.len(),
            shown.join(", "),
            if unset.len() > shown.len() { ", …" } else { "" }
        ));
    }
    Ok(MirrorOutcome {
        plan,
        changes,
        stats,
        scanned,
        planned,
    })
}

/// Clears the [`root_setuid_bits`] of a SRC entry that is a regular file; true if it had any.
fn drop_root_setuid(e: &mut Entry) -> bool {
    let bits = root_setuid_bits(e.meta.mode, e.meta.uid, e.meta.gid);
    if e.kind != Kind::File || bits == 0 {
        return false;
    }
    e.meta.mode &= !bits;
    true
}

/// What the receiver needs on DEST's file system at most: the files it is sent (each a
/// whole number of blocks) and the directories it creates, less what the plan's deletes,
/// which run first, free.
#[derive(Debug, PartialEq, Eq)]
struct Needed {
    bytes: u64,
    inodes: u64,
}

fn needed(plan: &Plan, dest: &Manifest, block: u64) -> Needed {
    let blocks = |size: u64| size.div_ceil(block.max(1)).saturating_mul(block.max(1));
    let mut need = Needed {
        bytes: 0,
        inodes: 0,
    };
    for item in plan.send.iter().filter(|i| i.link_to.is_none()) {
        need.bytes = need.bytes.saturating_add(blocks(item.size));
        need.inodes += 1;
    }
    need.bytes = need
        .bytes
        .saturating_add(plan.mkdir.len() as u64 * blocks(1));
    need.inodes += plan.mkdir.len() as u64;
    // Only an inode's last name frees it.
    let deleted: foldhash::HashSet<&[u8]> = plan.delete.iter().map(|p| &p[..]).collect();
    let under_deleted =
        |path: &[u8]| deleted.contains(path) || plan::ancestors(path).any(|a| deleted.contains(a));
    let (mut freed_bytes, mut freed_inodes) = (0u64, 0u64);
    for e in dest.entries.iter().filter(|e| !e.path.is_empty()) {
        if e.nlink <= 1 && under_deleted(&e.path) {
            freed_inodes += 1;
            if e.kind == crate::sync::manifest::Kind::File {
                freed_bytes = freed_bytes.saturating_add(blocks(e.size));
            }
        }
    }
    Needed {
        bytes: need.bytes.saturating_sub(freed_bytes),
        inodes: need.inodes.saturating_sub(freed_inodes),
    }
}

/// Refuses, before anything is written, a transfer that cannot fit.
fn check_space(need: &Needed, space: &Space, dest_what: &str) -> Result<()> {
    if need.bytes > space.bytes_free {
        bail!(
            "not enough space for DEST: need {}, {} free on {dest_what}; nothing was changed\nhint: make room on that \
             file system (or grow it), or sync into a larger one",
            size(need.bytes),
            size(space.bytes_free)
        );
    }
    if need.inodes > space.inodes_free {
        bail!(
            "not enough inodes for DEST: need {} files and directories, {} free on {dest_what}; nothing was \
             changed\nhint: remove files from that file system, or sync into one with more inodes",
            need.inodes,
            space.inodes_free
        );
    }
    Ok(())
}

/// The receiver's failure, with the OS error behind it: the hint depends on it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct ReceiverFailed {
    message: String,
    errno: Option<i32>,
}

/// The next step after a failed transfer. A full, read-only or forbidden DEST fails the
/// same way on a rerun, so only a broken stream gets "run it again".
fn failure_hint(errno: Option<i32>, dest_what: &str) -> String {
    const KEPT: &str = "every path in DEST holds its old or its new version, never a partial file";
    match errno {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => format!(
            "the file system of the file named above, in {dest_what}, is full (or its quota is used up): make room \
             or grow it, then sync again; a rerun before that fails the same way ({KEPT})"
        ),
        Some(libc::EROFS) => format!(
            "{dest_what} is on a read-only file system: remount it read-write (or pick another DEST), then sync \
             again ({KEPT})"
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "the agent may not write in {dest_what}: connect as root (root@host:/path) or give its user write \
             access, then sync again ({KEPT})"
        ),
        _ => format!("{KEPT}; run the same command again to finish"),
    }
}

/// The tee file holds every byte sent, secrets included: owner-only from its creation, never
/// through a symlink, never over an existing file.
fn create_tee(path: &Path) -> Result<tokio::fs::File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| {
            format!(
                "creating --tee-stream {} (it must not exist yet)",
                path.display()
            )
        })?;
    Ok(tokio::fs::File::from_std(file))
}

fn fill_hashes(m: &mut Manifest, hashes: Hashes) {
    let map: HashMap<Vec<u8>, Digest> = hashes
        .into_iter()
        .filter_map(|(p, d)| d.map(|d| (p, d)))
        .collect();
    for e in &mut m.entries {
        if let Some(d) = map.get(&e.path[..]) {
            e.hash = Some(Box::new(*d));
        }
    }
}

/// Sends the plan's entries from `from` to `to`, relaying the stream through this process.
async fn transfer(
    from: Side<'_>,
    to: Side<'_>,
    plan: &Plan,
    opts: &MirrorOptions,
    mut tee: Option<tokio::fs::File>,
    progress: &mut Progress,
) -> Result<ReceiveStats> {
    let (sender, receiver) = (from.agent, to.agent);
    let (sender_label, receiver_label) = (sender.label().to_string(), receiver.label().to_string());
    receiver
        .send(&Request::Receive {
            root: root_bytes(to.root),
            plan: Cow::Borrowed(plan),
            keep_setuid: opts.keep_setuid,
            compressed: opts.compression.is_compressed(),
            from: None,
        })
        .await?;
    sender
        .send(&Request::Send {
            root: root_bytes(from.root),
            items: Cow::Borrowed(&plan.send),
            compression: opts.compression,
            bwlimit: opts.bwlimit,
            to: None,
        })
        .await?;
    let receiver_input = &mut receiver.input;
    let receiver_output = &mut receiver.output;
    let sender_output = &mut sender.output;
    // What the transfer waits for and since when, for the watchdog: every chunk and frame
    // that passes is activity.
    let waiting =
        std::sync::Mutex::new((Instant::now(), sender_label.clone(), "sending the stream"));
    let wait_for = |host: &str, phase: &'static str| {
        let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
        *w = (Instant::now(), host.to_string(), phase);
    };
    let active = || waiting.lock().unwrap_or_else(|e| e.into_inner()).0 = Instant::now();
    let relay = async {
        let mut buf = Vec::with_capacity(CHUNK);
        let relayed: Result<LevelsTaken> = async {
            loop {
                wait_for(&sender_label, "sending the stream");
                let more = read_chunk_async(sender_output, &mut buf)
                    .await
                    .with_context(|| format!("reading the stream from {sender_label}"))?;
                wait_for(&receiver_label, "receiving the stream");
                let input = receiver_input
                    .as_mut()
                    .ok_or_else(|| anyhow!("bug: receiver input closed"))?;
                input
                    .write_all(&(buf.len() as u32).to_le_bytes())
                    .await
                    .with_context(|| format!("writing the stream to {receiver_label}"))?;
                if !more {
                    input.flush().await?;
                    break;
                }
                input
                    .write_all(&buf)
                    .await
                    .with_context(|| format!("writing the stream to {receiver_label}"))?;
                if let Some(file) = tee.as_mut() {
                    file.write_all(&buf).await.context("writing --tee-stream")?;
                }
            }
            if let Some(file) = tee.as_mut() {
                file.flush().await.context("writing --tee-stream")?;
            }
            wait_for(&sender_label, "finishing the stream");
            let sent: Reply<LevelsTaken> = read_frame_async(sender_output)
                .await
                .with_context(|| format!("reading the sender's result from {sender_label}"))?;
            wait_for(&receiver_label, "finishing DEST (links, metadata, syncfs)");
            sent.map_err(|msg| anyhow!("{msg}"))
                .with_context(|| format!("sending from {sender_label}"))
        }
        .await;
        if relayed.is_err() {
            // The receiver then sees its input end mid-stream, cleans up and reports.
            *receiver_input = None;
        }
        relayed
    };
    let watch = async {
        loop {
            match read_frame_async::<ReceiveEvent>(receiver_output).await {
                Ok(ReceiveEvent::Progress(p)) => {
                    active();
                    progress.update(&p)
                }
                Ok(ReceiveEvent::Connected) => active(),
                Ok(ReceiveEvent::Done(stats)) => return Ok(stats),
                Ok(ReceiveEvent::Failed { message, errno }) => {
                    return Err(anyhow::Error::new(ReceiverFailed { message, errno }))
                }
                Err(e) => return Err(e.context(format!("lost the connection to {receiver_label}"))),
            }
        }
    };
    let limit = opts.timeout;
    let watchdog = async {
        let tick = (limit / 4).min(Duration::from_secs(1));
        loop {
            tokio::time::sleep(tick).await;
            let (since, host, phase) = waiting.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if since.elapsed() >= limit {
                return silent(&host, phase, limit);
            }
        }
    };
    // The receiver's verdict ends the transfer: after a failure nothing more is relayed.
    let mut relay = Box::pin(relay);
    let mut watch = Box::pin(watch);
    let mut watchdog = Box::pin(watchdog);
    let mut relayed = None;
    let received = loop {
        tokio::select! {
            r = &mut relay, if relayed.is_none() => relayed = Some(r),
            w = &mut watch => break w,
            e = &mut watchdog => {
                drop((relay, watch));
                // Whichever agent went silent, neither is in step any more.
                sender.abort();
                receiver.abort();
                return Err(e);
            }
        }
    };
    drop(watch);
    let receiving_into = || format!("receiving into {} on {receiver_label}", to.root.display());
    let (relayed, received) = match (relayed, received) {
        (Some(r), received) => (r, received),
        // The sender's result is all that is left to read.
        (None, Ok(stats)) => match tokio::time::timeout(limit, relay).await {
            Ok(r) => (r, Ok(stats)),
            Err(_) => {
                sender.abort();
                return Err(silent(&sender_label, "finishing the stream", limit));
            }
        },
        (None, Err(e)) => {
            // The sender is mid-stream and the receiver has given up: stop both instead of
            // producing and skipping the rest.
            drop(relay);
            sender.abort();
            receiver.input = None;
            return Err(e.context(receiving_into()));
        }
    };
    match (relayed, received) {
        (Ok(levels), Ok(stats)) => Ok(ReceiveStats {
            zstd_levels: levels,
            ..stats
        }),
        // The sender's failure is the cause; the receiver's message says what DEST holds.
        (Err(cause), Err(dest_state)) => Err(cause.context(format!("{dest_state:#}"))),
        (Err(cause), Ok(_)) => Err(cause),
        (Ok(_), Err(e)) => Err(e.context(receiving_into())),
    }
}

/// Sends the plan's entries from `from` to `to` over a direct SSH connection between the two
/// hosts (`remote::direct`); this process sees only the receiver's progress and both verdicts.
async fn transfer_direct(
    from: Side<'_>,
    to: Side<'_>,
    plan: &Plan,
    opts: &MirrorOptions,
    address: &TransferAddress,
    progress: &mut Progress,
) -> Result<ReceiveStats> {
    let limit = opts.timeout;
    let (sender, receiver) = (from.agent, to.agent);
    let (sender_label, receiver_label) = (sender.label().to_string(), receiver.label().to_string());
    let token = direct::new_token()?;
    let phase = format!("making a one-time key on {sender_label} for {receiver_label}");
    let key = Request::DirectKey {
        token: token.clone(),
        address: address.host.clone(),
        port: address.port,
    };
    let made: KeyMade = call_within(sender, &key, Some(limit), &phase)
        .await
        .map_err(|e| unreachable_hint(e, &sender_label, &receiver_label, address))?;
    let phase = format!("authorizing {sender_label}'s one-time key on {receiver_label}");
    let accept = Request::DirectAccept {
        token: token.clone(),
        public_key: made.public_key,
        from: made.source,
    };
    // Nothing was sent yet: the receiver's reason, with its own hint, is the whole story.
    let accepting: Accepting = call_within(receiver, &accept, Some(limit), &phase)
        .await
        .map_err(|e| {
            let e = format!("{phase}: {e:#}");
            let hint = if e.contains("\nhint:") {
                ""
            } else {
                "\nhint: relay the data through this machine with --route controller"
            };
            NoDirectRoute(format!("{e}{hint}"))
        })?;
    receiver
        .send(&Request::Receive {
            root: root_bytes(to.root),
            plan: Cow::Borrowed(plan),
            keep_setuid: opts.keep_setuid,
            compressed: opts.compression.is_compressed(),
            from: Some(token.clone()),
        })
        .await?;
    sender
        .send(&Request::Send {
            root: root_bytes(from.root),
            items: Cow::Borrowed(&plan.send),
            compression: opts.compression,
            bwlimit: opts.bwlimit,
            to: Some(DirectSend {
                token,
                user: accepting.user,
                host_keys: accepting.host_keys,
            }),
        })
        .await?;
    let connected = std::cell::Cell::new(false);
    let receiving_into = || format!("receiving into {} on {receiver_label}", to.root.display());
    let sender_output = &mut sender.output;
    let receiver_output = &mut receiver.output;
    // Each is one future for the whole transfer: a frame is never dropped half read.
    let mut send = Box::pin(async {
        match read_frame_async::<Reply<LevelsTaken>>(sender_output).await {
            Ok(r) => r.map_err(|msg| anyhow!("{msg}")),
            Err(e) => Err(e.context(format!("lost the connection to {sender_label}"))),
        }
        .with_context(|| format!("sending from {sender_label}"))
    });
    let mut watch = Box::pin(async {
        loop {
            match tokio::time::timeout(limit, read_frame_async::<ReceiveEvent>(receiver_output))
                .await
            {
                Err(_) => return Watched::Silent,
                Ok(Ok(ReceiveEvent::Connected)) => connected.set(true),
                Ok(Ok(ReceiveEvent::Progress(p))) => progress.update(&p),
                Ok(Ok(ReceiveEvent::Done(stats))) => return Watched::Received(Ok(stats)),
                Ok(Ok(ReceiveEvent::Failed { message, errno })) => {
                    return Watched::Received(Err(anyhow::Error::new(ReceiverFailed {
                        message,
                        errno,
                    })))
                }
                Ok(Err(e)) => return Watched::Lost(e),
            }
        }
    });
    let mut sent = None;
    let watched = loop {
        tokio::select! {
            r = &mut send, if sent.is_none() => {
                if r.is_err() && !connected.get() {
                    drop((send, watch));
                    // The receiver still waits for a connection that will not come.
                    receiver.abort();
                    let e = r.err().unwrap_or_else(|| anyhow!("bug: no error"));
                    return Err(unreachable_hint(e, &sender_label, &receiver_label, address));
                }
                sent = Some(r);
            }
            w = &mut watch => break w,
        }
    };
    drop(watch);
    let received = match watched {
        Watched::Received(r) => r,
        Watched::Silent => {
            drop(send);
            sender.abort();
            receiver.abort();
            return Err(silent(&receiver_label, "receiving the stream", limit));
        }
        Watched::Lost(e) => {
            drop(send);
            sender.abort();
            return Err(e.context(format!("lost the connection to {receiver_label}")));
        }
    };
    let sent = match sent {
        Some(s) => s,
        None => match tokio::time::timeout(limit, send).await {
            Ok(s) => s,
            Err(_) => {
                sender.abort();
                return Err(silent(&sender_label, "finishing the stream", limit));
            }
        },
    };
    match (sent, received) {
        (Ok(levels), Ok(stats)) => Ok(ReceiveStats {
            zstd_levels: levels,
            ..stats
        }),
        (Err(cause), Err(dest_state)) => Err(cause.context(format!("{dest_state:#}"))),
        (Err(cause), Ok(_)) => Err(cause),
        (Ok(_), Err(e)) => Err(e.context(receiving_into())),
    }
}

/// How watching a direct transfer's receiver ended.
enum Watched {
    Received(Result<ReceiveStats>),
    /// Nothing for the whole timeout.
    Silent,
    /// Its connection broke.
    Lost(anyhow::Error),
}

/// A direct transfer that never connected, with the way out.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NoDirectRoute(String);

fn unreachable_hint(
    e: anyhow::Error,
    sender: &str,
    receiver: &str,
    address: &TransferAddress,
) -> anyhow::Error {
    anyhow::Error::new(NoDirectRoute(format!(
        "{sender} could not reach {receiver} directly at {address}: {e:#}\nhint: by default the data goes \
         from host to host over SSH; give the address {sender} reaches {receiver} at with --transfer-address \
         (`transfer_address` under [hosts.new] in relaymove.toml for migrate), or relay the data through this \
         machine with --route controller (`route = \"controller\"` under [migrate])"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::{Entry, Kind, Meta};
    use crate::sync::plan::SendItem;

    fn entry(path: &[u8], kind: Kind, size: u64, nlink: u32) -> Entry {
        Entry {
            path: path.into(),
            kind,
            size,
            meta: Meta {
                mode: 0o644,
                uid: 0,
                gid: 0,
                user: None,
                group: None,
                mtime: 0,
                mtime_nsec: 0,
            },
            dev: 1,
            ino: 1,
            nlink,
            target: None,
            hash: None,
        }
    }

    #[test]
    fn space_needed_counts_whole_blocks_and_credits_what_deletes_free() {
        let send = |path: &[u8], size, link_to: Option<&[u8]>| SendItem {
            path: path.into(),
            kind: Kind::File,
            link_to: link_to.map(|l| l.into()),
            size,
        };
        let plan = Plan {
            send: vec![
                send(b"n/a", 1, None),
                send(b"n/b", 5000, None),
                send(b"n/c", 5000, Some(b"n/b")),
            ],
            mkdir: vec![b"n"[..].into()],
            delete: vec![b"old"[..].into()],
            ..Plan::default()
        };
        let dest = Manifest {
            entries: vec![
                entry(b"", Kind::Dir, 0, 1),
                entry(b"old", Kind::Dir, 0, 1),
                entry(b"old/x", Kind::File, 4096, 1),
                // Another name keeps this inode alive.
                entry(b"old/y", Kind::File, 8192, 2),
                entry(b"keep", Kind::File, 4096, 1),
            ],
            ..Manifest::default()
        };
        assert_eq!(
            needed(&plan, &dest, 4096),
            Needed {
                // a: one block, b: two, the directory one; old/x frees one.
                bytes: 3 * 4096,
                // a, b and n; old and old/x are freed.
                inodes: 1,
            }
        );
    }
}
