//! `relaymove plan | migrate | status | rollback`: the move of a whole mail server, from the
//! config. The steps live in `migrate/`; this file reads options and renders.

use crate::config::Config;
use crate::dns::change::{self, Direction};
use crate::migrate::journal::{self, Journal, StepState};
use crate::migrate::{self, Cx, Options, Range, StepId, STEPS};
use crate::report::events::{Event, Reporter};
use crate::report::size;
use anyhow::{anyhow, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::path::PathBuf;

/// Options every migration command shares.
#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// The migration's configuration file.
    #[arg(
        long,
        short = 'c',
        default_value = "relaymove.toml",
        env = "RELAYMOVE_CONFIG"
    )]
    pub config: PathBuf,
    /// JSON Lines on stdout (one object per event, tagged by `type`) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Show what `migrate` would do and every preflight finding; change nothing.
#[derive(Args, Debug)]
pub struct PlanCmd {
    #[command(flatten)]
    pub common: ConfigArgs,
}

/// Move the mail server from old to new: every step in order, journaled; run it again
/// after any interruption to resume.
#[derive(Args, Debug)]
pub struct MigrateCmd {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Do not ask before taking mail down on old.
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Stop after this step (e.g. `presync`, repeatable while old serves mail). Steps:
    /// preflight, presync, prepare_new, freeze_old, final_sync, ownership, activate_new,
    /// forward_old, dns_cutover, verify, drain_old, finish.
    #[arg(long, value_name = "STEP")]
    pub until: Option<String>,
    /// Run this step and the ones after it again, even if the journal says they are done.
    #[arg(long, value_name = "STEP")]
    pub from: Option<String>,
    /// Go on to take mail down before the old TTL has run out everywhere.
    #[arg(long)]
    pub force_dns: bool,
    /// No progress display during the syncs.
    #[arg(long)]
    pub no_progress: bool,
    /// How the data travels: `direct` (old connects to new over SSH with a one-time key that
    /// can only receive the transfer) or `controller` (through this machine, for hosts that
    /// cannot reach each other). Default: `route` under [migrate], else direct.
    #[arg(long, value_enum)]
    pub route: Option<crate::commands::sync::RouteChoice>,
    /// Limit the first copy (presync, while old serves mail) to RATE: KiB a second, or 500K,
    /// 20M, 1G. Default: `bwlimit` under [migrate], else none. The final sync runs at full speed.
    #[arg(long, value_name = "RATE", value_parser = crate::commands::sync::parse_rate)]
    pub bwlimit: Option<u64>,
    /// Run the first copy at normal CPU and I/O priority; by default both agents run it at
    /// low priority (nice 10, best-effort I/O level 7), so old keeps serving first.
    #[arg(long)]
    pub normal_priority: bool,
}

/// Where the migration stands: each step from the journal, and what the hosts show now.
#[derive(Args, Debug)]
pub struct StatusCmd {
    #[command(flatten)]
    pub common: ConfigArgs,
}

/// Return service to the old host, from whatever step the migration reached.
#[derive(Args, Debug)]
pub struct RollbackCmd {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// Do not ask first.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn step_arg(name: &Option<String>, flag: &str) -> Result<Option<StepId>> {
    match name {
        None => Ok(None),
        Some(n) => StepId::parse(n).map(Some).ok_or_else(|| {
            anyhow!(
                "{flag} {n}: no such step\nhint: the steps are {}",
                migrate::step_names()
            )
        }),
    }
}

pub fn migrate(cmd: MigrateCmd) -> Result<i32> {
    let config = Config::load(&cmd.common.config)?;
    let range = Range {
        from: step_arg(&cmd.from, "--from")?,
        until: step_arg(&cmd.until, "--until")?.unwrap_or(StepId::Finish),
    };
    let out = Reporter::new(cmd.common.json);
    let options = Options {
        force_dns: cmd.force_dns,
        yes: cmd.yes,
        progress: !cmd.no_progress,
        route: cmd.route,
        bwlimit: cmd.bwlimit,
        normal_priority: cmd.normal_priority,
    };
    runtime()?.block_on(async {
        let mut journal = Journal::open(&migrate::journal_path(&config))?;
        let stop = migrate::stop_on_signals();
        let mut cx = Cx::connect(config, out, options).await?;
        let result = migrate::run(&mut cx, &mut journal, range, &stop).await;
        let closed = cx.close().await;
        result?;
        closed?;
        if !out.json() {
            eprintln!(
                "\nrelaymove: {} (journal: {})",
                if range.until == StepId::Finish {
                    "the mail server runs on new".to_string()
                } else {
                    format!("stopped after {} as asked", range.until.id())
                },
                journal.path().display()
            );
        }
        Ok(0)
    })
}

pub fn rollback(cmd: RollbackCmd) -> Result<i32> {
    let config = Config::load(&cmd.common.config)?;
    let out = Reporter::new(cmd.common.json);
    if !cmd.yes {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            return Err(anyhow!(
                "rollback stops mail on new and returns it to old, and there is no terminal to confirm it\nhint: pass --yes"
            ));
        }
        eprint!("new ({}) stops serving mail; what it accepted goes back to old, DNS back to old. Go on? [y/N] ", config.hosts.new.ssh);
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(anyhow!("not confirmed; nothing was changed"));
        }
    }
    runtime()?.block_on(async {
        let mut journal = Journal::open(&migrate::journal_path(&config))?;
        let mut cx = Cx::connect(config, out, Options { yes: cmd.yes, progress: true, ..Options::default() }).await?;
        let result = migrate::rollback::run(&mut cx, &mut journal).await;
        let closed = cx.close().await;
        result?;
        closed?;
        if !out.json() {
            eprintln!("relaymove: rolled back: old serves mail again; `relaymove migrate` starts a new move");
        }
        Ok(0)
    })
}

pub fn plan(cmd: PlanCmd) -> Result<i32> {
    let config = Config::load(&cmd.common.config)?;
    let out = Reporter::new(cmd.common.json);
    runtime()?.block_on(async {
        let mut cx = Cx::connect(config, out, Options::default()).await?;
        let planned = plan_of(&mut cx).await;
        let closed = cx.close().await;
        let failed = planned?;
        closed?;
        Ok(if failed { 1 } else { 0 })
    })
}

/// Emits the preflight findings and each step's plan; true when a finding fails.
async fn plan_of(cx: &mut Cx) -> Result<bool> {
    let (findings, measured) = migrate::preflight::check(cx).await?;
    let records = journal::read(&migrate::journal_path(&cx.config))?;
    let records = journal::current(&records);
    let dns = match change::plan_changes(&cx.config, Direction::Cutover).await {
        Ok(lines) if lines.is_empty() => {
            vec![format!("{} already points at new", cx.config.domain)]
        }
        Ok(lines) => lines,
        Err(e) => vec![format!("cannot plan the DNS change: {e:#}")],
    };
    let trees: Vec<String> = measured["trees"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    format!(
                        "{} ({}, {} inodes): {}",
                        t["path"].as_str().unwrap_or("?"),
                        size(t["bytes"].as_u64().unwrap_or(0)),
                        t["inodes"].as_u64().unwrap_or(0),
                        t["why"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let p = &cx.profile;
    let presync_s = match (
        journal::state_of(records, StepId::Presync.id()),
        records.iter().find_map(|r| match r {
            journal::Record::Started { at, step, .. } if step == StepId::Presync.id() => Some(*at),
            _ => None,
        }),
    ) {
        (StepState::Done { at, .. }, Some(start)) => Some(at.saturating_sub(start)),
        _ => None,
    };
    for step in STEPS {
        let lines: Vec<String> = match step {
            StepId::Preflight => Vec::new(),
            StepId::Presync => trees.clone(),
            StepId::PrepareNew => vec![format!(
                "stop on new if running: {}{}",
                p.stop_order.join(", "),
                match &cx.config.migrate.configure_command {
                    Some(c) => format!("; then run {}", c.join(" ")),
                    None => String::new(),
                }
            )],
            StepId::FreezeOld => vec![
                format!(
                    "Postfix on old reloaded with every delivery transport in defer_transports: it accepts mail from other servers on port 25 and delivers none; stop and disable on old: {}",
                    p.stopped_at_freeze().join(", ")
                ),
                "no sender is refused or deferred; IMAP, and submission (its logins go through Dovecot), are down from here until activate_new".into(),
            ],
            StepId::FinalSync => vec![
                format!(
                    "every tree again with deletes, then {} (mail on hold stays on hold); postsuper -s, postfix set-permissions, postfix check on new",
                    p.hold_queue.display(),
                ),
                match presync_s {
                    Some(s) => format!("the last presync took {s}s; the final pass carries only what changed since"),
                    None => "ETA: run `relaymove migrate --until presync` first; the final pass then carries only what changed".into(),
                },
                "then every file compared by SHA-256 on both hosts, owners by name, modes, mtimes, links".into(),
            ],
            StepId::Ownership => vec![format!("owners of {} checked; ids of {} mapped by name", p.trees.iter().filter(|t| t.owner.is_some()).map(|t| t.path.display().to_string()).collect::<Vec<_>>().join(", "), p.accounts.join(", "))],
            StepId::ActivateNew => vec![format!(
                "daemon-reload; enable and restart on new in this order: {}; ports {:?} answer; certificate and DKIM key checked",
                p.start_order.join(", "),
                p.ports
            )],
            StepId::ForwardOld => vec![format!(
                "Postfix on old reloaded with transport {}:[{}]:25 for {}: what it accepted during the freeze, and what senders still bring, goes to new",
                migrate::postfix::FORWARD,
                cx.config.hosts.new.addresses().first().map(|a| a.to_string()).unwrap_or_else(|| "new's address".into()),
                cx.config.domain.trim_end_matches('.')
            )],
            StepId::DnsCutover => dns.clone(),
            StepId::Verify => vec!["UIDVALIDITY and every UID of every mailbox as on old; held mail still held".into()],
            StepId::DrainOld => vec!["old forwards until resolvers can no longer hold its address (the TTL of the records dns_cutover replaces, shown above, from the cutover on) and its queue is empty; waits up to 15 min, else `relaymove migrate` again finishes later".into()],
            StepId::Finish => vec!["stop and disable Postfix and OpenDKIM on old, its Postfix configuration as before the move; disable old's acmetool/certbot timer; print when `relaymove dns raise-ttl` is safe".into()],
        };
        cx.out.emit(Event::StepStarted {
            step: step.id(),
            title: step.title(),
            n: STEPS.iter().position(|s| *s == step).unwrap_or(0) + 1,
            of: STEPS.len(),
        });
        if step == StepId::Preflight {
            for finding in &findings {
                cx.out.emit(Event::Finding {
                    step: step.id(),
                    finding,
                });
            }
        }
        let state = state_line(&journal::state_of(records, step.id()));
        if state != "pending" {
            cx.out.note(step.id(), &format!("journal: {state}"));
        }
        for line in &lines {
            cx.out.note(step.id(), line);
        }
    }
    let failed = findings
        .iter()
        .any(|f| f.level == crate::report::finding::Level::Fail);
    if failed && !cx.out.json() {
        eprintln!("\nrelaymove: preflight failures above must be fixed before `relaymove migrate`");
    }
    Ok(failed)
}

fn state_line(state: &StepState) -> String {
    match state {
        StepState::Pending => "pending".into(),
        StepState::Running { since } => format!(
            "started {} and not finished (interrupted, or running now)",
            crate::commands::dns::utc(*since)
        ),
        StepState::Done { at, facts } => format!(
            "done {}{}",
            crate::commands::dns::utc(*at),
            facts
                .get("summary")
                .and_then(Value::as_str)
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        ),
        StepState::Failed { at, error } => {
            format!("FAILED {}: {error}", crate::commands::dns::utc(*at))
        }
    }
}

pub fn status(cmd: StatusCmd) -> Result<i32> {
    let config = Config::load(&cmd.common.config)?;
    let path = migrate::journal_path(&config);
    let all = journal::read(&path)?;
    let records = journal::current(&all);
    let out = Reporter::new(cmd.common.json);
    // A held lock means a migrate or rollback runs now.
    let running = std::fs::File::open(&path)
        .ok()
        .map(|f| nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).is_err())
        .unwrap_or(false);
    let steps: Vec<Value> = STEPS
        .iter()
        .map(|s| {
            let state = journal::state_of(records, s.id());
            json!({"step": s.id(), "title": s.title(), "state": state_line(&state)})
        })
        .collect();
    let now = runtime()?.block_on(async {
        let cx = Cx::connect(config.clone(), out, Options::default()).await;
        let Ok(cx) = cx else {
            return json!({"hosts": format!("{:#}", cx.err().map(|e| e.to_string()).unwrap_or_default())});
        };
        let old = migrate::services::units_running(&cx.old, &cx.profile).await;
        let new = migrate::services::units_running(&cx.new, &cx.profile).await;
        let dns = change::pending(&cx.config, Direction::Cutover).await;
        let forwarding = forwarding(&cx, records).await;
        let _ = cx.close().await;
        let show = |r: Result<Option<String>>| match r {
            Ok(None) => "serves mail".to_string(),
            Ok(Some(why)) => why,
            Err(e) => format!("unknown: {e:#}"),
        };
        let mut now = json!({
            "old": show(old),
            "new": show(new),
            "dns": match dns {
                Ok(0) => format!("{} points at new", config.domain),
                Ok(_) => format!("{} does not point at new", config.domain),
                Err(e) => format!("unknown: {e:#}"),
            },
        });
        match forwarding {
            Ok(Some(text)) => now["forwarding"] = json!(text),
            Ok(None) => {}
            Err(e) => now["forwarding"] = json!(format!("unknown: {e:#}")),
        }
        now
    });
    if out.json() {
        println!(
            "{}",
            json!({"type": "status", "journal": path, "running": running, "steps": steps, "now": now})
        );
        return Ok(0);
    }
    println!(
        "journal {}{}",
        path.display(),
        if running {
            " (a migrate or rollback runs now)"
        } else {
            ""
        }
    );
    if records.is_empty() {
        println!(
            "no migration recorded since {}",
            if all.is_empty() {
                "ever"
            } else {
                "the last rollback"
            }
        );
    }
    for s in &steps {
        println!(
            "  {:<13} {}",
            s["step"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or("")
        );
    }
    println!("now:");
    if let Some(obj) = now.as_object() {
        for (k, v) in obj {
            println!("  {k:<10} {}", v.as_str().unwrap_or(""));
        }
    }
    Ok(0)
}

/// While old forwards (from forward_old until finish): what still reaches it, from which
/// sending hosts, and whether it can be retired. `None` outside that phase.
async fn forwarding(cx: &Cx, records: &[journal::Record]) -> Result<Option<String>> {
    let done = |step: StepId| {
        matches!(
            journal::state_of(records, step.id()),
            StepState::Done { .. }
        )
    };
    let Some(since) = migrate::recorded(records, StepId::ForwardOld, "/since") else {
        return Ok(None);
    };
    if done(StepId::Finish)
        || migrate::postfix::mode(&cx.old).await? != migrate::postfix::Mode::Forward
    {
        return Ok(None);
    }
    let arrivals = migrate::forwarded::since(&cx.old, cx.profile.postfix_unit, since).await?;
    let queued = migrate::postfix::waiting(&cx.old).await?;
    let until = migrate::old_answers_until(records);
    let now = migrate::now_unix();
    let last = arrivals.iter().map(|a| a.last).max().unwrap_or(since);
    let verdict = match until {
        Some(t) if t > now => format!(
            "resolvers may send mail to old until {}: keep it forwarding",
            crate::commands::dns::utc(t)
        ),
        None if done(StepId::DnsCutover) => {
            "when resolvers drop old's address is not recorded: keep old forwarding".into()
        }
        None => "the DNS cutover is not done: keep old forwarding".into(),
        Some(_) if queued > 0 => format!("{queued} message(s) still queued on old"),
        Some(_) => format!(
            "nothing for {}s and the old TTL has run out: old can be retired (`relaymove migrate` finishes)",
            now.saturating_sub(last)
        ),
    };
    Ok(Some(format!(
        "{}; {queued} queued; {verdict}",
        migrate::forwarded::describe(&arrivals)
    )))
}
