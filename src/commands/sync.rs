//! `relaymove sync SRC DEST`: make DEST an exact, verified mirror of SRC, locally or over SSH.
//!
//! The phases (scan, hash, plan, stream) are `remote::mirror`; this file reads the options,
//! starts one agent per side and renders the outcome.

use crate::remote::agent::{own_digest, Agent, Host, SshOptions};
use crate::remote::endpoint::{Endpoint, TransferAddress};
use crate::remote::mirror::{
    mirror, scan_request, MirrorOptions, MirrorOutcome, Route, Side, DEFAULT_TIMEOUT,
};
use crate::remote::protocol::Request;
use crate::report::size;
use crate::report::sync_report::{listing, summary, RunFacts, SyncReport};
use crate::sync::compress::Compression;
use crate::sync::manifest::display_path;
use anyhow::{anyhow, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Make DEST an exact, verified mirror of SRC (like `rsync -aH --delete SRC/ DEST/`).
///
/// Each endpoint is a local PATH or [user@]host[:port]:/PATH. Trailing slashes do not
/// matter: the contents of SRC become the contents of DEST, which is created if missing.
///
/// Exit status: 0 DEST mirrors SRC; 1 failure (DEST keeps, for each path, its old or its
/// new version); 2 usage error; 3 finished, but files that changed or vanished on SRC
/// during the sync were left behind (DEST keeps their old versions; `-v` and `--json` list
/// them; run the sync again); 130 interrupted by Ctrl-C or SIGTERM (the SSH sessions are
/// closed; run the sync again to continue).
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
    /// Keep setuid/setgid bits on files owned by root (or group root). Without it they
    /// arrive without those bits and a warning lists them: a compromised source could
    /// otherwise plant root programs on DEST.
    #[arg(long)]
    pub keep_setuid: bool,
    /// Allow an empty or missing SRC to empty DEST.
    #[arg(long)]
    pub allow_empty_source: bool,
    /// Print one JSON object with the results on stdout; with -v, every changed path too.
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
    /// zstd level for the whole stream (negative = faster, larger). Default over SSH: from
    /// level 1, the level that moves the most data on this link (-5000, nearly a copy, to 6);
    /// between two local trees the stream is not compressed (only with --tee-stream, at -1).
    #[arg(long, allow_hyphen_values = true, value_parser = clap::value_parser!(i32).range(-7..=19))]
    pub compress_level: Option<i32>,
    /// Also write the transfer stream to FILE (zstd-compressed tar: `zstd -dc FILE | tar tv`).
    #[arg(long, value_name = "FILE")]
    pub tee_stream: Option<PathBuf>,
    /// Fail when an agent sends nothing for SECONDS in any phase (a hung disk, a stopped
    /// process, a dead connection); raise it for a scan or final disk sync that is slower.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    /// rsync habits: accepted with a note, as relaymove always mirrors like `rsync -aH
    /// --delete`.
    #[arg(short = 'a', long = "archive", hide = true)]
    pub rsync_archive: bool,
    #[arg(short = 'H', long = "hard-links", hide = true)]
    pub rsync_hard_links: bool,
    #[arg(long = "delete", hide = true, conflicts_with = "no_delete")]
    pub rsync_delete: bool,
    /// rsync's remote shell: refused with the way relaymove takes ssh options.
    #[arg(
        short = 'e',
        long = "rsh",
        hide = true,
        value_name = "COMMAND",
        allow_hyphen_values = true
    )]
    pub rsync_rsh: Option<String>,
    /// ssh_config file to use instead of ~/.ssh/config.
    #[arg(long, env = "RELAYMOVE_SSH_CONFIG", value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// Between two remote hosts: `direct` (SRC's host connects to DEST's over SSH with a
    /// one-time key that can only receive this transfer) or `controller` (the data passes
    /// through this machine, for hosts that cannot reach each other).
    #[arg(long, value_enum, default_value_t = RouteChoice::Direct)]
    pub route: RouteChoice,
    /// Where SRC's host reaches DEST's sshd on the direct route, HOST[:PORT]; default: DEST's
    /// host and port as this machine's ssh config resolves them.
    #[arg(long, value_name = "HOST[:PORT]", value_parser = parse_transfer_address)]
    pub transfer_address: Option<TransferAddress>,
    /// Limit the stream to RATE: KiB a second, or with a unit: 500K, 20M, 1G (bytes a
    /// second, powers of 1024), so that a live server keeps serving while it is copied.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// Run both agents at low CPU and I/O priority (nice 10, best-effort I/O level 7).
    #[arg(long)]
    pub low_priority: bool,
}

/// `--route`: how the data travels between two remote hosts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteChoice {
    Direct,
    Controller,
}

fn parse_transfer_address(s: &str) -> Result<TransferAddress, String> {
    TransferAddress::parse(s)
}

/// A rate as rsync's `--bwlimit` takes it: a bare number is KiB a second; `K`, `M`, `G`
/// (or `KiB`, `MiB`, `GiB`) are powers of 1024 bytes a second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of KiB a second, or like 500K, 20M, 1G"))?;
    let scale: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "K" | "KIB" => 1 << 10,
        "M" | "MIB" => 1 << 20,
        "G" | "GIB" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (K, M or G: KiB, MiB or GiB a second)"
            ))
        }
    };
    match n.checked_mul(scale) {
        Some(0) => Err(format!("{s:?}: a rate of 0 would never finish")),
        Some(rate) => Ok(rate),
        None => Err(format!("{s:?}: too large")),
    }
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
    // Ignoring -e would connect in a way the user did not ask for: refuse it.
    if cmd.rsync_rsh.is_some() {
        return usage(&format!("-e/--rsh is rsync's; {SSH_OPTIONS}"));
    }
    if (cmd.rsync_archive || cmd.rsync_hard_links || cmd.rsync_delete) && !cmd.quiet {
        eprintln!(
            "relaymove: note: -a, -H and --delete are not needed: {RSYNC_LIKE}; {SSH_OPTIONS}"
        );
    }
    if let (Endpoint::Local(a), Endpoint::Local(b)) = (&src, &dest) {
        if let (Some(a), Some(b)) = (resolved(a), resolved(b)) {
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

/// `p` with symlinks and `..` resolved as far as it exists, the missing rest appended: a
/// DEST not created yet is compared where it will be. None when that cannot be told (a
/// missing part with `..` in it).
fn resolved(p: &Path) -> Option<PathBuf> {
    let mut existing = p;
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            return Some(rest.iter().rev().fold(c, |c, name| c.join(name)));
        }
        rest.push(existing.file_name()?);
        existing = match existing.parent()? {
            parent if parent.as_os_str().is_empty() => Path::new("."),
            parent => parent,
        };
    }
}

/// For rsync users, who try its flags first.
const RSYNC_LIKE: &str =
    "relaymove always mirrors like rsync -aH --delete (--no-delete keeps extra files)";
const SSH_OPTIONS: &str = "ssh options go in the ssh config, see --ssh-config";

fn usage(msg: &str) -> Result<i32> {
    eprintln!("relaymove: {msg}\nhint: see `relaymove sync --help`");
    Ok(2)
}

/// One side of a sync: its host, its root there and its agent.
struct Opened {
    host: Host,
    root: PathBuf,
    agent: Agent,
}

impl Opened {
    async fn close(self) {
        let _ = self.agent.close().await;
        self.host.close().await;
    }
}

/// How much of SRC's scan [`sync`] reads ahead of DEST's start: about 36 bytes a file
/// (compressed), so all of a 100k-file tree; a larger one's agent waits at a full pipe.
const READ_AHEAD: usize = 4 << 20;

/// Connects to `ep`'s host and starts its agent there, at low priority if asked.
async fn open(ep: &Endpoint, ssh: &SshOptions, low_priority: bool) -> Result<Opened> {
    let (host, root) = match ep {
        Endpoint::Local(p) => (Host::local()?, absolute(p)?),
        Endpoint::Remote(r) => (Host::connect(r, ssh).await?, r.path.clone()),
    };
    let mut agent = match Agent::start(&host).await {
        Ok(agent) => agent,
        Err(e) => {
            host.close().await;
            return Err(e);
        }
    };
    if low_priority {
        let lowered = agent
            .call::<()>(&Request::Priority { low: true })
            .await
            .with_context(|| format!("lowering the priority of the agent on {}", host.label()));
        if let Err(e) = lowered {
            Opened { host, root, agent }.close().await;
            return Err(e);
        }
    }
    Ok(Opened { host, root, agent })
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
    // From here on Ctrl-C and SIGTERM no longer end the process at once: the sync closes
    // what it opened first.
    let mut interrupt = Box::pin(interrupted());
    // A remote agent is named by this binary's hash: hashing it overlaps the handshakes.
    let any_remote =
        matches!(src_ep, Endpoint::Remote(_)) || matches!(dest_ep, Endpoint::Remote(_));
    let hashed = async {
        if any_remote {
            // An error here comes back, with its context, when the agent is started.
            let _ = own_digest().await;
        }
    };
    let low_priority = cmd.low_priority;
    // SRC's scan is asked for as soon as its agent is up, and read ahead while DEST's host
    // is still connecting: over SSH the handshake and the agent's start took 0.47 s on
    // loopback, about as long as scanning 56k local files.
    let (dest_up, up) = tokio::sync::oneshot::channel::<()>();
    let src_open = async {
        let mut side = open(&src_ep, &ssh, low_priority).await?;
        let scan = scan_request(&side.root, cmd.checksum, &cmd.exclude);
        if let Err(e) = side.agent.ask_ahead(&scan).await {
            side.close().await;
            return Err(e);
        }
        side.agent.read_ahead(up, READ_AHEAD).await.ok();
        Ok(side)
    };
    let dest_open = async {
        let side = open(&dest_ep, &ssh, low_priority).await;
        let _ = dest_up.send(());
        side
    };
    let (src_side, dest_side) = tokio::select! {
        (src_side, dest_side, ()) = async { tokio::join!(src_open, dest_open, hashed) } => (src_side, dest_side),
        // Local agents are killed as they are dropped; a master half started ends by
        // itself (ControlPersist).
        how = &mut interrupt => return Ok(stopped(how)),
    };
    let (src, src_root, mut src_agent, dest, dest_root, mut dest_agent) =
        match (src_side, dest_side) {
            (Ok(s), Ok(d)) => (s.host, s.root, s.agent, d.host, d.root, d.agent),
            (Err(e), other) | (other, Err(e)) => {
                if let Ok(side) = other {
                    side.close().await;
                }
                return Err(e);
            }
        };
    let agents_started = start.elapsed();
    // Between two local trees compressing only costs CPU, except for the --tee-stream copy.
    let compression = match (cmd.compress_level, &src_ep, &dest_ep) {
        (Some(level), _, _) => Compression::Level(level),
        (None, Endpoint::Local(_), Endpoint::Local(_)) if cmd.tee_stream.is_none() => {
            Compression::None
        }
        (None, Endpoint::Local(_), Endpoint::Local(_)) => Compression::Level(-1),
        (None, _, _) => Compression::Adaptive,
    };
    // Direct needs two remote hosts: with a local side this process is one end anyway.
    let route = match (&src, &dest, cmd.route) {
        (Host::Remote { .. }, Host::Remote { .. }, RouteChoice::Direct) => {
            match &cmd.transfer_address {
                Some(to) => Route::Direct(to.clone()),
                None => dest
                    .transfer_address()
                    .await
                    .map_or(Route::Controller, Route::Direct),
            }
        }
        _ => Route::Controller,
    };
    let opts = MirrorOptions {
        delete: !cmd.no_delete,
        checksum: cmd.checksum,
        excludes: cmd.exclude.clone(),
        allow_empty_source: cmd.allow_empty_source,
        dry_run: cmd.dry_run,
        compression,
        tee_stream: cmd.tee_stream.clone(),
        progress: !cmd.quiet && !cmd.no_progress,
        timeout: Duration::from_secs(cmd.timeout),
        keep_setuid: cmd.keep_setuid,
        route,
        bwlimit: cmd.bwlimit,
        // A second sync into the same DEST is told at once.
        lock_wait: std::time::Duration::ZERO,
    };
    let mirrored = tokio::select! {
        mirrored = mirror(
            Side {
                agent: &mut src_agent,
                root: &src_root,
            },
            Side {
                agent: &mut dest_agent,
                root: &dest_root,
            },
            &opts,
        ) => mirrored,
        how = &mut interrupt => {
            // Their input closed, receivers remove their temporary files and end; an agent
            // busy elsewhere (a long scan) is not waited for.
            let closing = async { tokio::join!(src_agent.close(), dest_agent.close()) };
            let _ = tokio::time::timeout(Duration::from_secs(10), closing).await;
            tokio::join!(src.close(), dest.close());
            return Ok(stopped(how));
        }
    };
    // Close both agents either way; an agent's own complaint (it crashed, say) is added to
    // the error.
    let (src_closed, dest_closed) = tokio::join!(src_agent.close(), dest_agent.close());
    let outcome = match mirrored {
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
            tokio::join!(src.close(), dest.close());
            return Err(anyhow!(message));
        }
    };
    let left_behind = outcome.left_behind().len();
    let verified = outcome.verified();
    let MirrorOutcome {
        changes,
        stats,
        scanned,
        planned,
        ..
    } = outcome;
    if (cmd.dry_run || cmd.verbose) && !cmd.json {
        listing(&changes, &mut std::io::stdout().lock()).context("writing the listing")?;
    }
    src.close().await;
    dest.close().await;
    let transferred = start.elapsed();
    if cmd.verbose {
        eprintln!(
            "relaymove: time: connect and start agents {:.2}s, scan {:.2}s (after SRC's began), plan {:.2}s (with hashing), transfer {:.2}s (of which the final sync of DEST {:.2}s)",
            agents_started.as_secs_f64(),
            scanned.as_secs_f64(),
            (planned - scanned).as_secs_f64(),
            (transferred.saturating_sub(agents_started + planned)).as_secs_f64(),
            stats.sync_s,
        );
        if !stats.zstd_levels.is_empty() {
            let levels: Vec<String> = stats
                .zstd_levels
                .iter()
                .map(|(level, bytes)| format!("{level}: {}", size(*bytes)))
                .collect();
            eprintln!(
                "relaymove: stream: zstd level adapted to the link, data taken at each level: {}",
                levels.join(", ")
            );
        }
    }
    let run = RunFacts {
        dry_run: cmd.dry_run,
        wire_bytes: stats.wire_bytes,
        verified: verified && !cmd.dry_run,
        elapsed_s: start.elapsed().as_secs_f64(),
        warnings: stats.warnings,
    };
    let mut report = SyncReport::new(&changes, run, cmd.verbose);
    if left_behind > 0 {
        report.warnings.push(format!(
            "{left_behind} files changed or vanished on the source during the sync and were left behind \
             (DEST keeps their old versions; -v lists them); run the sync again to copy them"
        ));
    }
    if !cmd.quiet {
        for w in &report.warnings {
            eprintln!("relaymove: warning: {w}");
        }
        if cmd.verbose {
            for s in &changes.skipped {
                eprintln!("relaymove: skipped {}: {}", display_path(&s.path), s.reason);
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
    Ok(if left_behind > 0 { LEFT_BEHIND } else { 0 })
}

/// Resolves at the first Ctrl-C or SIGTERM, naming it. Once polled, those signals no longer
/// end the process by themselves.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            Ok(()) = tokio::signal::ctrl_c() => "Ctrl-C",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => match tokio::signal::ctrl_c().await {
            Ok(()) => "Ctrl-C",
            // No handler could be installed: the default (ending at once) still holds.
            Err(_) => std::future::pending().await,
        },
    }
}

/// Says how the interrupted sync left things; the exit status of a run ended by a signal.
fn stopped(how: &str) -> i32 {
    eprintln!(
        "relaymove: interrupted ({how}): the sync stopped; DEST keeps, for each path, its old or its new version, \
         and the SSH sessions are closed\nhint: run the same command again to continue; it sends only what is \
         still missing"
    );
    INTERRUPTED
}

/// 128 + SIGINT, as shells report a command ended by Ctrl-C.
const INTERRUPTED: i32 = 130;

/// Exit status of a sync that finished but left files behind (see `SyncCmd`).
const LEFT_BEHIND: i32 = 3;
