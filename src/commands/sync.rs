//! `relaymove sync SRC DEST`: make DEST an exact, verified mirror of SRC, locally or over SSH.
//!
//! The controller drives four phases, each an agent command on the host that owns the data:
//! scan both sides → hash rename candidates → plan (here) → send | receive, relaying the
//! stream through this process (so remote→remote works without host-to-host SSH or agent
//! forwarding).

use crate::remote::agent::{Agent, Host, SshOptions};
use crate::remote::endpoint::Endpoint;
use crate::remote::protocol::{
    read_chunk_async, read_frame_async, Hashes, ReceiveEvent, Reply, Request, CHUNK,
};
use crate::report::progress::Progress;
use crate::sync::manifest::{display_path, Digest, Manifest};
use crate::sync::plan::{self, Plan, PlanOptions, ReuseMode};
use crate::sync::receive::ReceiveStats;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::io::AsyncWriteExt;

/// Make DEST an exact, verified mirror of SRC (like `rsync -aH --delete SRC/ DEST/`).
///
/// Each endpoint is a local PATH or [user@]host[:port]:/PATH. Trailing slashes do not
/// matter: the contents of SRC become the contents of DEST, which is created if missing.
#[derive(Args, Debug)]
pub struct SyncCmd {
    /// Source: PATH or [user@]host[:port]:/PATH
    pub src: String,
    /// Destination: PATH or [user@]host[:port]:/PATH
    pub dest: String,
    /// Keep files in DEST that are not in SRC.
    #[arg(long)]
    pub no_delete: bool,
    /// Show what would change; change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Leave paths matching GLOB alone on both sides (repeatable). A pattern without `/`
    /// matches a name at any depth; one with `/` matches the path from the root.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Decide "changed" by content hash instead of size and mtime.
    #[arg(short = 'c', long)]
    pub checksum: bool,
    /// Allow an empty or missing SRC to empty DEST.
    #[arg(long)]
    pub allow_empty_source: bool,
    /// Print one JSON object with the results on stdout.
    #[arg(long)]
    pub json: bool,
    /// Print only errors.
    #[arg(short, long)]
    pub quiet: bool,
    /// List every change.
    #[arg(short, long)]
    pub verbose: bool,
    /// No progress display.
    #[arg(long)]
    pub no_progress: bool,
    /// zstd level for the stream (negative = faster, larger). Default: 1 over SSH, -1 locally.
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub compress_level: Option<i32>,
    /// Also write the transfer stream to FILE (zstd-compressed tar: `zstd -dc FILE | tar tv`).
    #[arg(long, value_name = "FILE")]
    pub tee_stream: Option<PathBuf>,
    /// ssh_config file to use instead of ~/.ssh/config.
    #[arg(long, env = "RELAYMOVE_SSH_CONFIG", value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
}

#[derive(Serialize)]
struct SkippedJson {
    path: String,
    reason: String,
}

/// The `--json` result. Scripts depend on these field names.
#[derive(Serialize)]
struct SyncReport {
    files_scanned: u64,
    files_sent: u64,
    bytes_sent: u64,
    wire_bytes: u64,
    renamed: u64,
    deleted: u64,
    hardlinks: u64,
    skipped: Vec<SkippedJson>,
    verified: bool,
    elapsed_s: f64,
    dry_run: bool,
    warnings: Vec<String>,
}

pub fn run(cmd: SyncCmd) -> Result<i32> {
    let src = match Endpoint::parse(&cmd.src) {
        Ok(e) => e,
        Err(msg) => return usage(&format!("SRC {msg}")),
    };
    let dest = match Endpoint::parse(&cmd.dest) {
        Ok(e) => e,
        Err(msg) => return usage(&format!("DEST {msg}")),
    };
    if cmd.quiet && cmd.verbose {
        return usage("--quiet and --verbose contradict each other");
    }
    if let (Endpoint::Local(a), Endpoint::Local(b)) = (&src, &dest) {
        if let (Ok(a), Ok(b)) = (a.canonicalize(), b.canonicalize()) {
            if b.starts_with(&a) || a.starts_with(&b) {
                return usage(&format!(
                    "{} and {} overlap; SRC and DEST must be separate trees",
                    a.display(),
                    b.display()
                ));
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(sync(cmd, src, dest))
}

fn usage(msg: &str) -> Result<i32> {
    eprintln!("relaymove: {msg}\nhint: see `relaymove sync --help`");
    Ok(2)
}

async fn connect(ep: &Endpoint, ssh: &SshOptions) -> Result<(Host, PathBuf)> {
    match ep {
        Endpoint::Local(p) => Ok((Host::local()?, absolute(p)?)),
        Endpoint::Remote(r) => Ok((Host::connect(r, ssh).await?, r.path.clone())),
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("reading the current directory")?
            .join(p))
    }
}

async fn sync(cmd: SyncCmd, src_ep: Endpoint, dest_ep: Endpoint) -> Result<i32> {
    let start = Instant::now();
    let ssh = SshOptions {
        config: cmd.ssh_config.clone(),
    };
    let (src_conn, dest_conn) = tokio::join!(connect(&src_ep, &ssh), connect(&dest_ep, &ssh));
    let (src, src_root) = src_conn?;
    let (dest, dest_root) = dest_conn?;
    let level = cmd.compress_level.unwrap_or(match (&src_ep, &dest_ep) {
        (Endpoint::Local(_), Endpoint::Local(_)) => -1,
        _ => 1,
    });

    let connected = start.elapsed();
    let (sa, da) = tokio::join!(Agent::start(&src), Agent::start(&dest));
    let (mut src_agent, mut dest_agent) = (sa?, da?);
    let phases = run_phases(
        &cmd,
        Side {
            agent: &mut src_agent,
            root: &src_root,
        },
        Side {
            agent: &mut dest_agent,
            root: &dest_root,
        },
        level,
    )
    .await;
    // Close both agents either way; an agent's own complaint (it crashed, say) is added to
    // the error.
    let (src_closed, dest_closed) = tokio::join!(src_agent.close(), dest_agent.close());
    let Phases {
        src_m,
        plan,
        stats,
        scanned,
        planned,
    } = match phases {
        Ok(p) => {
            src_closed?;
            dest_closed?;
            p
        }
        Err(e) => {
            let mut message = format!("{e:#}");
            for closed in [src_closed, dest_closed] {
                if let Err(agent) = closed {
                    message.push_str(&format!("\n  also: {agent:#}"));
                }
            }
            return Err(anyhow!(message));
        }
    };
    src.close().await;
    dest.close().await;
    let transferred = start.elapsed();
    if cmd.verbose {
        eprintln!(
            "relaymove: time: connect {:.2}s, scan {:.2}s, plan {:.2}s (with hashing), transfer {:.2}s (of which the final sync of DEST {:.2}s)",
            connected.as_secs_f64(),
            (scanned - connected.min(scanned)).as_secs_f64(),
            (planned - scanned).as_secs_f64(),
            (transferred - planned).as_secs_f64(),
            stats.sync_s,
        );
    }

    let mut skipped: Vec<SkippedJson> = src_m
        .skipped
        .iter()
        .chain(stats.vanished.iter())
        .map(|s| SkippedJson {
            path: display_path(&s.path),
            reason: s.reason.clone(),
        })
        .collect();
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    let report = if cmd.dry_run {
        SyncReport {
            files_scanned: src_m.entries.len() as u64,
            files_sent: plan.stats.files_to_send,
            bytes_sent: plan.stats.bytes_to_send,
            wire_bytes: 0,
            renamed: plan.stats.renamed,
            deleted: plan.stats.deleted,
            hardlinks: plan.stats.hardlinks,
            skipped,
            verified: false,
            elapsed_s: start.elapsed().as_secs_f64(),
            dry_run: true,
            warnings: Vec::new(),
        }
    } else {
        SyncReport {
            files_scanned: src_m.entries.len() as u64,
            files_sent: stats.files_written,
            bytes_sent: stats.bytes_written,
            wire_bytes: stats.wire_bytes,
            renamed: stats.renamed,
            deleted: stats.deleted,
            hardlinks: stats.hardlinks,
            skipped,
            verified: plan.is_empty() || stats.verified,
            elapsed_s: start.elapsed().as_secs_f64(),
            dry_run: false,
            warnings: stats.warnings.clone(),
        }
    };
    if !cmd.quiet {
        for w in &report.warnings {
            eprintln!("relaymove: warning: {w}");
        }
        for s in &report.skipped {
            if cmd.verbose {
                eprintln!("relaymove: skipped {}: {}", s.path, s.reason);
            }
        }
    }
    if cmd.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &report)?;
        out.write_all(b"\n")?;
    } else if !cmd.quiet {
        eprintln!("{}", summary(&report, &cmd.src, &cmd.dest));
    }
    Ok(0)
}

fn summary(r: &SyncReport, src: &str, dest: &str) -> String {
    let mb = |b: u64| b as f64 / 1e6;
    let verb = if r.dry_run { "would send" } else { "sent" };
    let mut s = format!(
        "relaymove: {src} → {dest}: {} entries scanned, {verb} {} files ({:.1} MB, {:.1} MB on the wire), {} renamed, {} deleted, {} hard links",
        r.files_scanned, r.files_sent, mb(r.bytes_sent), mb(r.wire_bytes), r.renamed, r.deleted, r.hardlinks
    );
    if !r.skipped.is_empty() {
        s.push_str(&format!(", {} skipped (-v lists them)", r.skipped.len()));
    }
    if r.verified && !r.dry_run {
        s.push_str("; every file written was checked against its SHA-256");
    }
    s.push_str(&format!(" [{:.2}s]", r.elapsed_s));
    s
}

fn print_plan(plan: &Plan) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for p in &plan.delete {
        writeln!(out, "delete  {}", display_path(p))?;
    }
    for p in &plan.mkdir {
        writeln!(out, "mkdir   {}/", display_path(p))?;
    }
    for r in &plan.reuse {
        let verb = if r.mode == ReuseMode::Link {
            "rename "
        } else {
            "copy   "
        };
        writeln!(
            out,
            "{verb} {} -> {}",
            display_path(&r.from),
            display_path(&r.to)
        )?;
    }
    for s in &plan.send {
        match &s.link_to {
            Some(t) => writeln!(
                out,
                "link    {} => {}",
                display_path(&s.path),
                display_path(t)
            )?,
            None => writeln!(out, "send    {}", display_path(&s.path))?,
        }
    }
    for l in &plan.link {
        writeln!(
            out,
            "link    {} => {}",
            display_path(&l.to),
            display_path(&l.from)
        )?;
    }
    for m in &plan.meta {
        writeln!(out, "attrs   {}", display_path(&m.path))?;
    }
    for d in &plan.dirs {
        writeln!(out, "attrs   {}/", display_path(&d.path))?;
    }
    Ok(())
}

/// What the phases produce, for the report.
struct Phases {
    src_m: Manifest,
    plan: Plan,
    stats: ReceiveStats,
    scanned: std::time::Duration,
    planned: std::time::Duration,
}

/// One end of a sync: its agent and the tree's root on that host.
struct Side<'a> {
    agent: &'a mut Agent,
    root: &'a Path,
}

fn root_bytes(p: &Path) -> Vec<u8> {
    p.as_os_str().as_bytes().to_vec()
}

async fn run_phases(cmd: &SyncCmd, src: Side<'_>, dest: Side<'_>, level: i32) -> Result<Phases> {
    let start = Instant::now();
    let scan = |root: &Path| Request::Scan {
        root: root_bytes(root),
        checksum: cmd.checksum,
        excludes: cmd.exclude.clone(),
    };
    let (src_scan, dest_scan) = (scan(src.root), scan(dest.root));
    let (s, d) = tokio::join!(
        src.agent.call::<Manifest>(&src_scan),
        dest.agent.call::<Manifest>(&dest_scan)
    );
    let mut src_m = s.with_context(|| format!("scanning SRC {}", cmd.src))?;
    let mut dest_m = d.with_context(|| format!("scanning DEST {}", cmd.dest))?;
    if !src_m.root_exists && !cmd.allow_empty_source {
        bail!(
            "SRC {} does not exist on {}; nothing was changed\nhint: check the path; pass --allow-empty-source to empty DEST",
            src.root.display(),
            src.agent.label()
        );
    }
    let scanned = start.elapsed();
    let opts = PlanOptions {
        delete: !cmd.no_delete,
        checksum: cmd.checksum,
        allow_empty_source: cmd.allow_empty_source,
    };
    let request = plan::hash_request(&src_m, &dest_m, &opts);
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
    let plan = plan::build(&src_m, &dest_m, &opts)
        .with_context(|| format!("planning {} → {}", cmd.src, cmd.dest))?;
    if (cmd.dry_run || cmd.verbose) && !cmd.json {
        print_plan(&plan)?;
    }
    let planned = start.elapsed();
    let stats = if cmd.dry_run || plan.is_empty() {
        ReceiveStats::default()
    } else {
        let enabled = !cmd.quiet && !cmd.no_progress;
        let mut progress =
            Progress::new(enabled, plan.stats.files_to_send, plan.stats.bytes_to_send);
        let tee = match &cmd.tee_stream {
            Some(path) => Some(
                tokio::fs::File::create(path)
                    .await
                    .with_context(|| format!("creating {}", path.display()))?,
            ),
            None => None,
        };
        let result = transfer(src, dest, &plan, level, tee, &mut progress).await;
        progress.finish();
        result.map_err(|e| {
            anyhow!(
                "sync {} → {} failed: {e:#}\nhint: every path in DEST holds its old or its new \
                 version, never a partial file; run the same command again to finish",
                cmd.src,
                cmd.dest
            )
        })?
    };
    Ok(Phases {
        src_m,
        plan,
        stats,
        scanned,
        planned,
    })
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
