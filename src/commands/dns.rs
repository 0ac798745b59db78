//! `relaymove dns …`: look at, stage and switch the mail domain's DNS.

use crate::config::Config;
use crate::dns::change::{self, describe, now_unix, Direction, StagingState};
use crate::dns::checks;
use crate::dns::server::Server;
use crate::dns::status::{self, agreement, Names, ServerView};
use crate::report::finding::Level;
use crate::report::printable;
// Migrate shows times the same way.
pub use crate::report::utc;
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::net::IpAddr;
use std::path::PathBuf;

/// Look at, stage and switch the mail domain's DNS records.
#[derive(Args, Debug)]
pub struct DnsCmd {
    /// The migration's configuration file.
    #[arg(
        long,
        short = 'c',
        default_value = "relaymove.toml",
        env = "RELAYMOVE_CONFIG",
        global = true
    )]
    pub config: PathBuf,
    /// One JSON object on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: DnsAction,
}

#[derive(Subcommand, Debug)]
pub enum DnsAction {
    /// What every authoritative server serves, whether they agree, and when the cutover is safe.
    Status,
    /// Lower the TTL of the records the cutover changes, and record when that took effect.
    LowerTtl {
        /// The low TTL in seconds (default: [dns] low_ttl).
        #[arg(long)]
        to: Option<u32>,
    },
    /// Restore the TTL after the migration.
    RaiseTtl {
        /// The TTL in seconds (default: the one `lower-ttl` replaced, else 3600).
        #[arg(long)]
        to: Option<u32>,
    },
    /// Point A/AAAA from the old host's addresses to the new host's, atomically.
    Cutover,
    /// Point A/AAAA back from the new host's addresses to the old host's.
    Rollback,
    /// Mail-auth checks for the new host: SPF, DKIM, CAA, PTR, MX, DMARC.
    Check,
}

pub fn run(cmd: DnsCmd) -> Result<i32> {
    let config = Config::load(&cmd.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cmd.action {
            DnsAction::Status => status(&config, cmd.json).await,
            DnsAction::LowerTtl { to } => {
                lower_ttl(&config, to.unwrap_or(config.dns.low_ttl), cmd.json).await
            }
            DnsAction::RaiseTtl { to } => raise_ttl(&config, to, cmd.json).await,
            DnsAction::Cutover => switch(&config, Direction::Cutover, cmd.json).await,
            DnsAction::Rollback => switch(&config, Direction::Rollback, cmd.json).await,
            DnsAction::Check => check(&config, cmd.json).await,
        }
    })
}

/// Progress and instructions of a DNS change, on stderr (stdout holds the result).
fn say(message: &str) {
    eprintln!("relaymove: {message}");
}

#[derive(Serialize)]
struct AddressLine {
    #[serde(rename = "type")]
    rtype: String,
    value: String,
    ttl: u32,
    points_at: &'static str,
}

#[derive(Serialize)]
struct StatusReport {
    zone: String,
    domain: String,
    servers: Vec<ServerView>,
    agree: bool,
    differences: Vec<String>,
    addresses: Vec<AddressLine>,
    negative_ttl: Option<u32>,
    staging: Option<StagingState>,
    /// Unix seconds from which the cutover is safe (after `lower-ttl`).
    safe_cutover_at: Option<u64>,
    /// Record types the cutover adds (resolvers may cache their absence for `negative_ttl`).
    new_types: Vec<String>,
}

fn points_at(config: &Config, ip: &str) -> &'static str {
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return "?";
    };
    if config.hosts.old.addresses().contains(&ip) {
        "old host"
    } else if config.hosts.new.addresses().contains(&ip) {
        "new host"
    } else {
        "neither host"
    }
}

async fn status(config: &Config, json: bool) -> Result<i32> {
    let names = Names::of(config)?;
    let authorities = status::authorities(config, &names).await?;
    let mut views = Vec::new();
    for a in &authorities {
        views.push(status::view(*a, &names).await);
    }
    let differences = agreement(&views);
    let reference = views.iter().find(|v| v.error.is_none());
    let addresses: Vec<AddressLine> = reference
        .map(|v| {
            v.records
                .iter()
                .filter(|r| r.rtype == "A" || r.rtype == "AAAA")
                .map(|r| AddressLine {
                    rtype: r.rtype.clone(),
                    value: r.value.clone(),
                    ttl: r.ttl,
                    points_at: points_at(config, &r.value),
                })
                .collect()
        })
        .unwrap_or_default();
    let staging = StagingState::load(&config.state_path())?;
    let mut new_types = Vec::new();
    if config.hosts.new.ipv6.is_some() && !addresses.iter().any(|a| a.rtype == "AAAA") {
        new_types.push("AAAA".to_string());
    }
    if config.hosts.new.ipv4.is_some() && !addresses.iter().any(|a| a.rtype == "A") {
        new_types.push("A".to_string());
    }
    let report = StatusReport {
        zone: names.zone.to_ascii(),
        domain: names.domain.to_ascii(),
        agree: differences.is_empty(),
        negative_ttl: reference.and_then(|v| v.negative_ttl),
        safe_cutover_at: staging.as_ref().map(|s| s.safe_cutover_at()),
        staging,
        servers: views,
        differences,
        addresses,
        new_types,
    };
    let code = if report.agree { 0 } else { 1 };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(code);
    }
    println!("zone {}, mail domain {}", report.zone, report.domain);
    for (role, host) in [("old", &config.hosts.old), ("new", &config.hosts.new)] {
        let ips: Vec<String> = host.addresses().iter().map(|a| a.to_string()).collect();
        println!("{role} host {}: {}", host.ssh, ips.join(", "));
    }
    println!("authoritative servers:");
    for v in &report.servers {
        match &v.error {
            Some(e) => println!("  {:<22} ERROR {e}", v.server),
            None => println!(
                "  {:<22} serial {:<12} negative TTL {}s",
                v.server,
                v.serial.map(|s| s.to_string()).unwrap_or_default(),
                v.negative_ttl.unwrap_or(0)
            ),
        }
    }
    if let Some(v) = report.servers.iter().find(|v| v.error.is_none()) {
        println!("records (as {} serves them):", v.server);
        for r in &v.records {
            let note = if r.rtype == "A" || r.rtype == "AAAA" {
                points_at(config, &r.value)
            } else {
                ""
            };
            println!(
                "  {:<38} {:<5} {:>6}  {}  {note}",
                printable(&r.name),
                r.rtype,
                r.ttl,
                printable(&r.value)
            );
        }
    }
    if report.agree {
        println!("all {} servers agree", report.servers.len());
    } else {
        println!("the servers DISAGREE:");
        for d in &report.differences {
            println!("  {}", printable(d));
        }
    }
    let now = now_unix();
    match (&report.staging, report.safe_cutover_at) {
        (Some(s), Some(at)) => {
            println!(
                "TTL lowered to {}s, served everywhere since {}; safe to cut over from {}{}",
                s.low_ttl,
                utc(s.served_everywhere_at),
                utc(at),
                if at <= now {
                    " (now)".to_string()
                } else {
                    format!(" (in {} min)", (at - now).div_ceil(60))
                }
            );
        }
        _ => {
            let longest = report.addresses.iter().map(|a| a.ttl).max().unwrap_or(0);
            println!(
                "TTL not staged: run `relaymove dns lower-ttl` at least {}s (the current TTL) plus a margin before the cutover",
                longest
            );
        }
    }
    for t in &report.new_types {
        println!(
            "{t} does not exist yet: resolvers may keep its absence cached up to {}s after the cutover adds it",
            report.negative_ttl.unwrap_or(0)
        );
    }
    Ok(code)
}

#[derive(Serialize)]
struct ChangeReport {
    action: &'static str,
    changed: Vec<String>,
    /// Seconds until every authoritative server served the change.
    propagation_s: f64,
    /// Until when resolvers may still hand out the previous answer (Unix seconds).
    old_answers_until: Option<u64>,
}

fn print_change(report: &ChangeReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    for c in &report.changed {
        println!("{}: {}", report.action, printable(c));
    }
    println!(
        "every authoritative server serves it ({:.1}s)",
        report.propagation_s
    );
    if let Some(until) = report.old_answers_until {
        println!(
            "resolvers may hand out the previous answer until {}",
            utc(until)
        );
    }
    Ok(())
}

async fn switch(config: &Config, direction: Direction, json: bool) -> Result<i32> {
    let Some(switched) = change::switch(config, direction, &say).await? else {
        if !json {
            println!(
                "{} already points at the {} host; nothing to do",
                config.domain,
                match direction {
                    Direction::Cutover => "new",
                    Direction::Rollback => "old",
                }
            );
        }
        return Ok(0);
    };
    print_change(
        &ChangeReport {
            action: direction.action(),
            changed: switched.changed,
            propagation_s: switched.propagation_s,
            old_answers_until: switched.old_answers_until,
        },
        json,
    )?;
    Ok(0)
}

async fn lower_ttl(config: &Config, ttl: u32, json: bool) -> Result<i32> {
    let names = Names::of(config)?;
    let authorities = status::authorities(config, &names).await?;
    let primary = change::primary(config, &authorities)?;
    let (mut changes, previous) =
        change::plan_ttl(&Server::new(primary, None), &names, ttl).await?;
    // Only lower: an RRset already at or below the target stays as it is.
    changes.retain(|c| c.current.first().is_some_and(|r| r.ttl > ttl));
    if previous.is_empty() {
        bail!(
            "{} has no A or AAAA record in zone {}; nothing to stage",
            names.domain,
            names.zone
        );
    }
    let path = config.state_path();
    let mut state = StagingState::load(&path)?.unwrap_or_default();
    if changes.is_empty() && !state.previous_ttl.is_empty() {
        if !json {
            println!(
                "TTLs are already at most {ttl}s (staged earlier; see `relaymove dns status`)"
            );
        }
        return Ok(0);
    }
    let took = if changes.is_empty() {
        std::time::Duration::ZERO
    } else {
        change::apply(config, &names, primary, &changes, "lower-ttl", &say).await?;
        change::wait_for(config, &authorities, &changes, &say).await?
    };
    state.previous_ttl = previous;
    state.low_ttl = ttl;
    state.served_everywhere_at = now_unix();
    state.save(&path)?;
    let report = ChangeReport {
        action: "lower-ttl",
        changed: describe(&changes),
        propagation_s: took.as_secs_f64(),
        old_answers_until: Some(state.safe_cutover_at()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &report.changed {
            println!("lower-ttl: {}", printable(c));
        }
        println!(
            "recorded in {}; safe to cut over from {}",
            path.display(),
            utc(state.safe_cutover_at())
        );
    }
    Ok(0)
}

async fn raise_ttl(config: &Config, to: Option<u32>, json: bool) -> Result<i32> {
    let names = Names::of(config)?;
    let authorities = status::authorities(config, &names).await?;
    let primary = change::primary(config, &authorities)?;
    let path = config.state_path();
    let state = StagingState::load(&path)?;
    let ttl = to
        .or_else(|| {
            state
                .as_ref()
                .and_then(|s| s.previous_ttl.values().copied().max())
        })
        .unwrap_or(3600);
    let (changes, _) = change::plan_ttl(&Server::new(primary, None), &names, ttl).await?;
    let took = if changes.is_empty() {
        std::time::Duration::ZERO
    } else {
        change::apply(config, &names, primary, &changes, "raise-ttl", &say).await?;
        change::wait_for(config, &authorities, &changes, &say).await?
    };
    if state.is_some() {
        std::fs::remove_file(&path).ok();
    }
    print_change(
        &ChangeReport {
            action: "raise-ttl",
            changed: describe(&changes),
            propagation_s: took.as_secs_f64(),
            old_answers_until: None,
        },
        json,
    )?;
    Ok(0)
}

async fn check(config: &Config, json: bool) -> Result<i32> {
    let names = Names::of(config)?;
    let findings = checks::run(config, &names).await?;
    let failed = findings.iter().any(|f| f.level == Level::Fail);
    if json {
        println!("{}", serde_json::to_string_pretty(&findings)?);
    } else {
        for f in &findings {
            println!("{}  {}: {}", f.level.tag(), f.check, printable(&f.detail));
            if let Some(fix) = &f.fix {
                println!("      fix: {}", printable(fix));
            }
        }
    }
    Ok(if failed { 1 } else { 0 })
}
