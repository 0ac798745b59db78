//! `relaymove agent …`: the side of a sync that runs on each host, started by the controller
//! (locally as a child process, remotely over SSH). Speaks the protocol in
//! `remote/protocol.rs` on stdin and stdout; errors go to stderr and the exit status.

use crate::remote::protocol::{read_frame, write_frame, AgentMessage};
use crate::sync::beneath::Tree;
use crate::sync::hash_cache::HashCache;
use crate::sync::manifest::Digest;
use crate::sync::plan::{Plan, SendItem};
use crate::sync::receive::{Durability, Receiver};
use crate::sync::scan::{hash_path, scan, ScanOptions};
use crate::sync::send::{send, SendOptions};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Internal: the per-host half of a sync (started by the controller, not by people).
#[derive(Args, Debug)]
pub struct AgentCmd {
    #[command(subcommand)]
    pub action: AgentAction,
}

#[derive(Subcommand, Debug)]
pub enum AgentAction {
    /// Write the manifest of ROOT.
    Scan {
        root: PathBuf,
        #[arg(long)]
        checksum: bool,
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// Hash the files named on stdin.
    Hash { root: PathBuf },
    /// Stream the entries named on stdin.
    Send {
        root: PathBuf,
        #[arg(long, default_value_t = 1, allow_hyphen_values = true)]
        level: i32,
    },
    /// Apply the plan on stdin, then the stream that follows it.
    Receive { root: PathBuf },
}

pub fn run(cmd: AgentCmd) -> Result<i32> {
    // Not locked for the whole run: the receiver reads stdin from its decompression thread.
    let mut input = io::stdin();
    let stdout = io::stdout();
    match cmd.action {
        AgentAction::Scan {
            root,
            checksum,
            exclude,
        } => {
            let mut cache = HashCache::open(&root);
            let manifest = scan(
                &root,
                &ScanOptions {
                    checksum,
                    excludes: exclude,
                },
                &mut cache,
            )
            .with_context(|| format!("scanning {}", root.display()))?;
            let present: HashSet<&[u8]> =
                manifest.entries.iter().map(|e| e.path.as_slice()).collect();
            cache.retain(|p| present.contains(p));
            let _ = cache.save();
            write_frame(&mut stdout.lock(), &manifest)?;
        }
        AgentAction::Hash { root } => {
            let paths: Vec<Vec<u8>> = read_frame(&mut input)?;
            let mut cache = HashCache::open(&root);
            let mut out: Vec<(Vec<u8>, Option<Digest>)> = Vec::with_capacity(paths.len());
            for rel in paths {
                crate::sync::beneath::validate(&rel)?;
                let full = root.join(OsStr::from_bytes(&rel));
                // A file gone or changed type since the scan simply has no hash.
                let digest = match std::fs::symlink_metadata(&full) {
                    Ok(md) if md.is_file() => hash_path(&full, &rel, &md, &mut cache).ok(),
                    _ => None,
                };
                out.push((rel, digest));
            }
            let _ = cache.save();
            write_frame(&mut stdout.lock(), &out)?;
        }
        AgentAction::Send { root, level } => {
            let items: Vec<SendItem> = read_frame(&mut input)?;
            let mut cache = HashCache::open(&root);
            let threads = std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
                .min(4);
            let out = BufWriter::with_capacity(1 << 20, stdout.lock());
            send(
                &root,
                &items,
                out,
                SendOptions { level, threads },
                &mut cache,
            )?;
            let _ = cache.save();
        }
        AgentAction::Receive { root } => {
            let plan: Plan = read_frame(&mut input)?;
            let tree = Tree::open(&root)?;
            let cache = HashCache::open(&root);
            let receiver = Receiver::new(tree, &plan, cache, Durability::from_env());
            let mut out = stdout.lock();
            let result = receiver.run(input, |p| {
                let _ = emit(&mut out, &AgentMessage::Progress(p));
            });
            match result {
                Ok(stats) => emit(&mut out, &AgentMessage::Done(stats))?,
                Err(e) => {
                    emit(
                        &mut out,
                        &AgentMessage::Error {
                            message: format!("{e:#}"),
                        },
                    )?;
                    return Ok(1);
                }
            }
        }
    }
    Ok(0)
}

fn emit(out: &mut impl Write, msg: &AgentMessage) -> Result<()> {
    serde_json::to_writer(&mut *out, msg)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}
