//! `relaymove sync SRC DEST`: make DEST an exact, verified mirror of SRC, locally or over SSH.
//!
//! The controller drives four phases, each an agent command on the host that owns the data:
//! scan both sides → hash rename candidates → plan (here) → send | receive, relaying the
//! stream through this process (so remote→remote works without host-to-host SSH or agent
//! forwarding).

use crate::remote::agent::{Host, SshOptions};
use crate::remote::endpoint::Endpoint;
use crate::remote::protocol::{read_frame_async, write_frame_async, AgentMessage};
use crate::report::progress::Progress;
use crate::sync::manifest::{display_path, Digest, Manifest};
use crate::sync::plan::{self, Plan, PlanOptions, ReuseMode};
use crate::sync::receive::ReceiveStats;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, BufReader};

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

    let mut scan_args = vec![OsString::from("agent"), "scan".into()];
    if cmd.checksum {
        scan_args.push("--checksum".into());
    }
    for g in &cmd.exclude {
        scan_args.push("--exclude".into());
        scan_args.push(g.into());
    }
    let with_root = |root: &Path| {
        let mut a = scan_args.clone();
        a.push(root.as_os_str().to_owned());
        a
    };
    let connected = start.elapsed();
    let (s, d) = tokio::join!(
        scan_on(&src, with_root(&src_root)),
        scan_on(&dest, with_root(&dest_root))
    );
    let mut src_m = s.with_context(|| format!("scanning SRC {}", cmd.src))?;
    let mut dest_m = d.with_context(|| format!("scanning DEST {}", cmd.dest))?;
    if !src_m.root_exists && !cmd.allow_empty_source {
        bail!(
            "SRC {} does not exist on {}; nothing was changed\nhint: check the path; pass --allow-empty-source to empty DEST",
            src_root.display(),
            src.label()
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
        let (hs, hd) = tokio::join!(
            hash_on(&src, &src_root, &request.src),
            hash_on(&dest, &dest_root, &request.dest)
        );
        fill_hashes(&mut src_m, hs?);
        fill_hashes(&mut dest_m, hd?);
    }
    let plan = plan::build(&src_m, &dest_m, &opts)
        .with_context(|| format!("planning {} → {}", cmd.src, cmd.dest))?;

    let listing = cmd.dry_run || cmd.verbose;
    if listing && !cmd.json {
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
        let result = transfer(
            Side {
                host: &src,
                root: &src_root,
            },
            Side {
                host: &dest,
                root: &dest_root,
            },
            &plan,
            level,
            tee,
            &mut progress,
        )
        .await;
        progress.finish();
        result.with_context(|| format!("sync {} → {} failed", cmd.src, cmd.dest))?
    };
    let transferred = start.elapsed();
    if cmd.verbose {
        eprintln!(
            "relaymove: time: connect {:.2}s, scan {:.2}s, plan {:.2}s (with hashing), transfer {:.2}s (of which the final sync of DEST {:.2}s)",
            connected.as_secs_f64(),
            (scanned - connected).as_secs_f64(),
            (planned - scanned).as_secs_f64(),
            (transferred - planned).as_secs_f64(),
            stats.sync_s,
        );
    }
    src.close().await;
    dest.close().await;

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

async fn scan_on(host: &Host, args: Vec<OsString>) -> Result<Manifest> {
    let mut agent = host.spawn(&args).await?;
    drop(agent.stdin.take());
    let mut out = agent.take_stdout()?;
    let manifest = read_frame_async::<Manifest>(&mut out).await;
    drop(out);
    agent.finish().await?;
    manifest
}

async fn hash_on(
    host: &Host,
    root: &Path,
    paths: &[Vec<u8>],
) -> Result<Vec<(Vec<u8>, Option<Digest>)>> {
    let args = vec![
        OsString::from("agent"),
        "hash".into(),
        root.as_os_str().to_owned(),
    ];
    let mut agent = host.spawn(&args).await?;
    let mut stdin = agent.take_stdin()?;
    let mut out = agent.take_stdout()?;
    let paths = paths.to_vec();
    let writer = async move {
        let r = write_frame_async(&mut stdin, &paths).await;
        drop(stdin);
        r
    };
    let (w, hashes) = tokio::join!(writer, read_frame_async(&mut out));
    drop(out);
    agent.finish().await?;
    w?;
    hashes
}

fn fill_hashes(m: &mut Manifest, hashes: Vec<(Vec<u8>, Option<Digest>)>) {
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

/// One end of a transfer: the host and the tree's root there.
struct Side<'a> {
    host: &'a Host,
    root: &'a Path,
}

async fn transfer(
    from: Side<'_>,
    to: Side<'_>,
    plan: &Plan,
    level: i32,
    tee: Option<tokio::fs::File>,
    progress: &mut Progress,
) -> Result<ReceiveStats> {
    let (src, src_root, dest, dest_root) = (from.host, from.root, to.host, to.root);
    let recv_args = vec![
        OsString::from("agent"),
        "receive".into(),
        dest_root.as_os_str().to_owned(),
    ];
    let send_args = vec![
        OsString::from("agent"),
        "send".into(),
        src_root.as_os_str().to_owned(),
        "--level".into(),
        level.to_string().into(),
    ];
    let mut receiver = dest.spawn(&recv_args).await?;
    let mut sender = src.spawn(&send_args).await?;
    let mut recv_in = receiver.take_stdin()?;
    let recv_out = receiver.take_stdout()?;
    let mut send_in = sender.take_stdin()?;
    let send_out = sender.take_stdout()?;

    let items = plan.send.clone();
    let feed_sender = async move {
        let r = write_frame_async(&mut send_in, &items).await;
        drop(send_in);
        r
    };
    let relay = async move {
        write_frame_async(&mut recv_in, plan).await?;
        let copied = match tee {
            None => {
                let mut from = BufReader::with_capacity(1 << 20, send_out);
                tokio::io::copy_buf(&mut from, &mut recv_in)
                    .await
                    .map(|_| ())
            }
            Some(mut file) => relay_with_copy(send_out, &mut recv_in, &mut file).await,
        };
        drop(recv_in);
        copied.map_err(|e| anyhow!(e))
    };
    let total_files = plan.stats.files_to_send;
    let watch = async move {
        let mut lines = BufReader::new(recv_out).lines();
        let mut outcome: Option<Result<ReceiveStats, String>> = None;
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<AgentMessage>(&line) {
                Ok(AgentMessage::Progress(p)) => progress.update(&p, total_files),
                Ok(AgentMessage::Done(stats)) => outcome = Some(Ok(stats)),
                Ok(AgentMessage::Error { message }) => outcome = Some(Err(message)),
                Err(_) => {}
            }
        }
        outcome
    };
    let (fed, relayed, outcome) = tokio::join!(feed_sender, relay, watch);
    let sender_done = sender.finish().await;
    let receiver_done = receiver.finish().await;
    match outcome {
        Some(Ok(stats)) => {
            // The receiver checked every member and the trailer; a sender that then failed
            // (say, while closing) changes nothing in DEST.
            sender_done?;
            Ok(stats)
        }
        Some(Err(message)) => {
            let mut err = anyhow!("{message}");
            if let Err(e) = sender_done {
                err = err.context(format!("{e:#}"));
            }
            Err(err.context(format!(
                "receiving into {} on {}",
                dest_root.display(),
                dest.label()
            )))
        }
        None => {
            receiver_done?;
            sender_done?;
            fed?;
            relayed?;
            bail!(
                "bug: the receiver on {} ended without a result",
                dest.label()
            )
        }
    }
}

async fn relay_with_copy(
    mut from: impl tokio::io::AsyncRead + Unpin,
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    copy: &mut tokio::fs::File,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            copy.flush().await?;
            return Ok(());
        }
        copy.write_all(&buf[..n]).await?;
        to.write_all(&buf[..n]).await?;
    }
}
