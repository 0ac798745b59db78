//! `relaymove cleanup HOST`: remove what relaymove left on a host (agents, hash caches,
//! stale lock files). What is removed and what never is: `remote::cleanup`. This file picks
//! the host, runs it there and renders the findings.

use crate::config::Config;
use crate::remote::agent::{Host, RunError, SshOptions};
use crate::remote::cleanup::{self, Finding};
use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use std::path::PathBuf;

/// Remove what relaymove left on a host: its agent binaries, hash caches and lock files
/// no process holds. Nothing else: other files in those directories, and symlinks, stay.
///
/// Runs as the SSH login user and cleans that user's places (root: /var/lib/relaymove,
/// /run/relaymove, /run/relaymove-migrate.lock). Refused, with nothing removed, while an
/// agent runs or a migration or sync holds a lock there, or when one of those directories
/// is a symlink or writable by another user.
#[derive(Args, Debug)]
pub struct CleanupCmd {
    /// The host: [user@]host[:port], or `old` / `new` of the config given with --config.
    pub host: String,
    /// List what would be removed; remove nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Read `old` and `new` (and its ssh_config) from this relaymove.toml.
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// ssh_config file to use instead of ~/.ssh/config (default with --config: its ssh_config).
    #[arg(long, env = "RELAYMOVE_SSH_CONFIG", value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// Print one JSON object with the findings on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: CleanupCmd) -> Result<i32> {
    let (target, mut ssh_config) = match &cmd.config {
        Some(file) => {
            let config = Config::load(file)?;
            let target = match cmd.host.as_str() {
                "old" => config.hosts.old.ssh.clone(),
                "new" => config.hosts.new.ssh.clone(),
                other => other.to_string(),
            };
            (target, config.ssh_config)
        }
        None => (cmd.host.clone(), None),
    };
    if cmd.ssh_config.is_some() {
        ssh_config = cmd.ssh_config.clone();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let findings = runtime.block_on(async {
        let host = Host::connect_target(&target, &SshOptions { config: ssh_config }).await?;
        let mode = if cmd.dry_run { "list" } else { "remove" };
        let ran = host
            .run_status(&["sh", "-c", cleanup::SCRIPT, "relaymove", mode])
            .await;
        host.close().await;
        let ran = ran?;
        let findings = cleanup::parse(&ran.stdout)?;
        cleanup::refusal(&target, ran.status, &findings)?;
        if ran.status != 0 {
            // Partial output still says what went before the failure.
            render(&target, cmd.dry_run, cmd.json, &findings);
            return Err(RunError::Failed {
                host: target.clone(),
                command: "the cleanup script".into(),
                status: ran.status,
                stderr: ran.stderr.trim().to_string(),
            }
            .into());
        }
        Ok::<_, anyhow::Error>(findings)
    })?;
    render(&target, cmd.dry_run, cmd.json, &findings);
    Ok(0)
}

fn render(target: &str, dry_run: bool, as_json: bool, findings: &[Finding]) {
    let bytes: u64 = findings
        .iter()
        .map(|f| match f {
            Finding::Remove { bytes, .. } => *bytes,
            _ => 0,
        })
        .sum();
    if as_json {
        let report = json!({
            "host": target,
            "dry_run": dry_run,
            "bytes": bytes,
            "findings": findings,
        });
        println!("{report}");
        return;
    }
    let gone = findings
        .iter()
        .filter(|f| matches!(f, Finding::Remove { .. } | Finding::Rmdir { .. }))
        .count();
    if gone == 0 {
        println!("nothing of relaymove's on {target}");
    } else {
        println!(
            "{} on {target} ({:.1} MB):",
            if dry_run { "would remove" } else { "removed" },
            bytes as f64 / 1e6
        );
    }
    for f in findings {
        match f {
            Finding::Remove { kind, bytes, path } => {
                println!("  {kind:<14} {:>12} B  {path}", bytes)
            }
            Finding::Rmdir { path } => println!("  {:<14} {:>12}    {path}/", "directory", ""),
            _ => {}
        }
    }
    for f in findings {
        match f {
            Finding::Keep { count, path } => eprintln!(
                "relaymove: kept {path}: {count} {} not relaymove's",
                if *count == 1 { "entry is" } else { "entries are" }
            ),
            Finding::Foreign { path } => eprintln!(
                "relaymove: left {path}: named like relaymove's but not a regular file (relaymove never makes it); remove it yourself if nothing needs it"
            ),
            _ => {}
        }
    }
}
