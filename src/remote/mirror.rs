//! One mirror of a tree from one agent to another: scan both sides, hash rename candidates,
//! plan, then stream the plan's files from the sender's agent to the receiver's, relaying the
//! stream through this process (so remote→remote needs no host-to-host SSH or agent
//! forwarding).
//!
//! It takes running agents, not endpoints, so one agent session per host serves every tree of
//! a migration step. It prints nothing: the caller renders the outcome and owns the progress
//! display.

use crate::remote::agent::Agent;
use crate::remote::protocol::{
    read_chunk_async, read_frame_async, Hashes, ReceiveEvent, Reply, Request, CHUNK,
};
use crate::report::progress::Progress;
use crate::sync::manifest::{Digest, Manifest};
use crate::sync::plan::{self, Plan, PlanOptions};
use crate::sync::receive::ReceiveStats;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// What to mirror and how.
#[derive(Debug, Clone, Default)]
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
    /// zstd level of the stream.
    pub level: i32,
    /// Also write the stream to this file (created 0600, never over an existing file).
    pub tee_stream: Option<PathBuf>,
    /// Show a progress bar or lines on stderr while the stream flows.
    pub progress: bool,
}

/// What a mirror found and did.
pub struct MirrorOutcome {
    pub src: Manifest,
    pub plan: Plan,
    /// Default (nothing written) for a dry run or an empty plan.
    pub stats: ReceiveStats,
    pub scanned: Duration,
    pub planned: Duration,
}

impl MirrorOutcome {
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

/// Scans both roots in parallel; the manifests come back as each agent saw them.
pub async fn scan_both(
    src: &mut Side<'_>,
    dest: &mut Side<'_>,
    checksum: bool,
    excludes: &[String],
) -> Result<(Manifest, Manifest)> {
    let scan = |root: &Path| Request::Scan {
        root: root_bytes(root),
        checksum,
        excludes: excludes.to_vec(),
    };
    let (src_scan, dest_scan) = (scan(src.root), scan(dest.root));
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

/// Makes `dest` a mirror of `src`.
pub async fn mirror(
    mut src: Side<'_>,
    mut dest: Side<'_>,
    opts: &MirrorOptions,
) -> Result<MirrorOutcome> {
    let start = Instant::now();
    let (src_what, dest_what) = (describe(&src), describe(&dest));
    let (mut src_m, mut dest_m) =
        scan_both(&mut src, &mut dest, opts.checksum, &opts.excludes).await?;
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
        let hash = |root: &Path, paths: Vec<Vec<u8>>| Request::Hash {
            root: root_bytes(root),
            paths,
        };
        let (src_hash, dest_hash) = (hash(src.root, request.src), hash(dest.root, request.dest));
        let (hs, hd) = tokio::join!(
            src.agent.call::<Hashes>(&src_hash),
            dest.agent.call::<Hashes>(&dest_hash)
        );
        fill_hashes(&mut src_m, hs?);
        fill_hashes(&mut dest_m, hd?);
    }
    let plan = plan::build(&src_m, &dest_m, &plan_opts)
        .with_context(|| format!("planning {src_what} → {dest_what}"))?;
    let planned = start.elapsed();
    let stats = if opts.dry_run || plan.is_empty() {
        ReceiveStats::default()
    } else {
        let tee = match &opts.tee_stream {
            Some(path) => Some(create_tee(path)?),
            None => None,
        };
        let mut progress = Progress::new(
            opts.progress,
            plan.stats.files_to_send,
            plan.stats.bytes_to_send,
        );
        let result = transfer(src, dest, &plan, opts.level, tee, &mut progress).await;
        progress.finish();
        result.map_err(|e| {
            anyhow!(
                "sync {src_what} → {dest_what} failed: {e:#}\nhint: every path in DEST holds its old or its new \
                 version, never a partial file; run the same command again to finish"
            )
        })?
    };
    Ok(MirrorOutcome {
        src: src_m,
        plan,
        stats,
        scanned,
        planned,
    })
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
        if let Some(d) = map.get(&e.path) {
            e.hash = Some(*d);
        }
    }
}

/// Sends the plan's entries from `from` to `to`, relaying the stream through this process.
async fn transfer(
    from: Side<'_>,
    to: Side<'_>,
    plan: &Plan,
    level: i32,
    mut tee: Option<tokio::fs::File>,
    progress: &mut Progress,
) -> Result<ReceiveStats> {
    let (sender, receiver) = (from.agent, to.agent);
    let (sender_label, receiver_label) = (sender.label().to_string(), receiver.label().to_string());
    receiver
        .send(&Request::Receive {
            root: root_bytes(to.root),
            plan: plan.clone(),
        })
        .await?;
    sender
        .send(&Request::Send {
            root: root_bytes(from.root),
            items: plan.send.clone(),
            level,
        })
        .await?;
    let receiver_input = &mut receiver.input;
    let receiver_output = &mut receiver.output;
    let sender_output = &mut sender.output;
    let relay = async {
        let mut buf = Vec::with_capacity(CHUNK);
        let relayed: Result<()> = async {
            loop {
                let more = read_chunk_async(sender_output, &mut buf)
                    .await
                    .with_context(|| format!("reading the stream from {sender_label}"))?;
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
            let sent: Reply<()> = read_frame_async(sender_output)
                .await
                .with_context(|| format!("reading the sender's result from {sender_label}"))?;
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
    let total_files = plan.stats.files_to_send;
    let watch = async {
        loop {
            match read_frame_async::<ReceiveEvent>(receiver_output).await {
                Ok(ReceiveEvent::Progress(p)) => progress.update(&p, total_files),
                Ok(ReceiveEvent::Done(stats)) => return Ok(stats),
                Ok(ReceiveEvent::Failed(message)) => return Err(anyhow!("{message}")),
                Err(e) => return Err(e.context(format!("lost the connection to {receiver_label}"))),
            }
        }
    };
    let (relayed, received) = tokio::join!(relay, watch);
    match (relayed, received) {
        (Ok(()), Ok(stats)) => Ok(stats),
        // The sender's failure is the cause; the receiver's message says what DEST holds.
        (Err(cause), Err(dest_state)) => Err(cause.context(format!("{dest_state:#}"))),
        (Err(cause), Ok(_)) => Err(cause),
        (Ok(()), Err(e)) => Err(e.context(format!(
            "receiving into {} on {receiver_label}",
            to.root.display()
        ))),
    }
}
