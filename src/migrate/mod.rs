//! `relaymove migrate`: the whole move as ordered, journaled, resumable steps.
//!
//! Each step observes (its plan, journaled before it changes anything), applies, and checks
//! its own result before it is recorded done. Applying is idempotent, so a step that started
//! and did not finish simply runs again. A step recorded done is re-checked against the hosts
//! when it is the last one done, and redone when it no longer holds: what the hosts show
//! beats what the journal says. State between steps lives in the journal, never in memory.

pub mod forwarded;
pub mod journal;
pub mod postfix;
pub mod preflight;
pub mod profile;
pub mod rollback;
pub mod services;
pub mod trees;

use crate::commands::sync::RouteChoice;
use crate::config::Config;
use crate::dns::change::{self, Direction, StagingState};
use crate::remote::agent::{Agent, Host, SshOptions};
use crate::remote::endpoint::TransferAddress;
use crate::remote::mirror::Route;
use crate::report::events::{Event, Reporter};
use anyhow::{anyhow, bail, Context, Result};
use journal::{Fingerprint, Journal, Record, StepState};
use profile::Profile;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The steps, in the order they run. Why this order:
/// - preflight first: nothing changes before every finding is known.
/// - presync while old still serves mail: the bulk moves without downtime; the final pass
///   only carries what changed since.
/// - prepare_new before freeze_old: new's stock daemons must not accept mail, and the
///   configure hook may take minutes, which must not count as downtime.
/// - freeze_old before final_sync: the mailboxes must stop changing, or the final pass misses
///   mail (and Dovecot's UID lists would diverge). Old keeps accepting mail meanwhile and
///   delivers none: no sender is refused or deferred.
/// - final_sync, then ownership: it checks what the sync wrote.
/// - activate_new before forward_old and dns_cutover: whatever reaches new, by forwarding or
///   by DNS, finds it serving.
/// - forward_old before dns_cutover: what old accepted during the freeze goes to new, and so
///   does whatever senders still deliver to old's address after the cutover.
/// - dns_cutover once new serves and old forwards: at no moment does a sender find nobody.
/// - verify after activate: Dovecot's view is read on the running new host.
/// - drain_old: old forwards until no resolver can still hold its address, and its queue is
///   empty.
/// - finish last: old stops, its Postfix configuration as it was, disabled for a rollback.
pub const STEPS: [StepId; 12] = [
    StepId::Preflight,
    StepId::Presync,
    StepId::PrepareNew,
    StepId::FreezeOld,
    StepId::FinalSync,
    StepId::Ownership,
    StepId::ActivateNew,
    StepId::ForwardOld,
    StepId::DnsCutover,
    StepId::Verify,
    StepId::DrainOld,
    StepId::Finish,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StepId {
    Preflight,
    Presync,
    PrepareNew,
    FreezeOld,
    FinalSync,
    Ownership,
    ActivateNew,
    ForwardOld,
    DnsCutover,
    Verify,
    DrainOld,
    Finish,
}

impl StepId {
    /// The journal key; never rename.
    pub fn id(self) -> &'static str {
        match self {
            StepId::Preflight => "preflight",
            StepId::Presync => "presync",
            StepId::PrepareNew => "prepare_new",
            StepId::FreezeOld => "freeze_old",
            StepId::FinalSync => "final_sync",
            StepId::Ownership => "ownership",
            StepId::ActivateNew => "activate_new",
            StepId::ForwardOld => "forward_old",
            StepId::DnsCutover => "dns_cutover",
            StepId::Verify => "verify",
            StepId::DrainOld => "drain_old",
            StepId::Finish => "finish",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            StepId::Preflight => "check both hosts, the DNS and the plan; change nothing",
            StepId::Presync => "first copy of every tree while old serves mail (repeatable)",
            StepId::PrepareNew => "new's mail daemons stopped; the configure hook, if any",
            StepId::FreezeOld => "old keeps accepting mail and delivers none; Dovecot stops on old",
            StepId::FinalSync => {
                "final pass of every tree and the held queue, then proof by SHA-256"
            }
            StepId::Ownership => "owners by name on new, uid/gid mappings",
            StepId::ActivateNew => {
                "new starts: OpenDKIM, Dovecot, Postfix; ports, certificate, DKIM key"
            }
            StepId::ForwardOld => "old forwards all mail for the domain to new",
            StepId::DnsCutover => "A/AAAA to new, on every authoritative server",
            StepId::Verify => "Dovecot's view on new against old's files; held mail",
            StepId::DrainOld => "old forwards until no resolver can hold its address",
            StepId::Finish => "old stops, disabled, its configuration as it was",
        }
    }

    pub fn parse(s: &str) -> Option<StepId> {
        STEPS.iter().copied().find(|st| st.id() == s)
    }

    fn index(self) -> usize {
        STEPS.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// The names `--until` and `--from` accept, for messages.
pub fn step_names() -> String {
    STEPS.map(|s| s.id()).join(", ")
}

/// One host of the migration: its SSH session and, once needed, its agent.
pub struct Node {
    pub role: &'static str,
    pub host: Host,
    agent: Option<Agent>,
}

impl Node {
    pub fn label(&self) -> String {
        format!("{} ({})", self.role, self.host.label())
    }

    /// The host's agent, started on first use and kept for every later tree.
    pub async fn agent(&mut self) -> Result<&mut Agent> {
        if self.agent.is_none() {
            self.agent = Some(Agent::start(&self.host).await?);
        }
        self.agent
            .as_mut()
            .ok_or_else(|| anyhow!("bug: agent not started"))
    }

    /// Runs `argv` on the host; a failure names the host and the command.
    pub async fn run(&self, argv: &[&str]) -> Result<String> {
        self.host
            .run(argv)
            .await
            .map_err(|e| anyhow!("{}: {e}", self.role))
    }

    /// Runs `argv` and returns its status and output, whatever the status.
    pub async fn status(&self, argv: &[&str]) -> Result<crate::remote::agent::Ran> {
        self.host
            .run_status(argv)
            .await
            .map_err(|e| anyhow!("{}: {e}", self.role))
    }

    /// Runs `argv`; `Ok(false)` when it exits non-zero.
    pub async fn test(&self, argv: &[&str]) -> Result<bool> {
        Ok(self.status(argv).await?.status == 0)
    }

    pub async fn close(mut self) -> Result<()> {
        let closed = match self.agent.take() {
            Some(a) => a.close().await,
            None => Ok(()),
        };
        self.host.close().await;
        closed
    }
}

/// What every step works with.
pub struct Cx {
    pub config: Config,
    pub profile: Profile,
    pub old: Node,
    pub new: Node,
    pub out: Reporter,
    pub options: Options,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Go on to the cutover before the TTL staging says it is safe.
    pub force_dns: bool,
    /// No confirmation before mail goes down.
    pub yes: bool,
    /// Show sync progress.
    pub progress: bool,
    /// `--route`, over the config's.
    pub route: Option<RouteChoice>,
    /// `--bwlimit` for the presync, over the config's.
    pub bwlimit: Option<u64>,
    /// Presync at normal priority.
    pub normal_priority: bool,
}

impl Cx {
    /// How a sync's data reaches new (`to_new`) or old: directly at the host's transfer
    /// address unless the route is `controller`.
    pub async fn route(&self, to_new: bool) -> Route {
        let choice = self
            .options
            .route
            .or(self.config.migrate.route)
            .unwrap_or(RouteChoice::Direct);
        if choice == RouteChoice::Controller {
            return Route::Controller;
        }
        let (node, host) = if to_new {
            (&self.new, &self.config.hosts.new)
        } else {
            (&self.old, &self.config.hosts.old)
        };
        // Validated when the config was read.
        match host
            .transfer_address
            .as_deref()
            .and_then(|t| TransferAddress::parse(t).ok())
        {
            Some(to) => Route::Direct(to),
            None => node
                .host
                .transfer_address()
                .await
                .map_or(Route::Controller, Route::Direct),
        }
    }

    /// The presync's bandwidth limit, bytes a second.
    pub fn presync_bwlimit(&self) -> Option<u64> {
        self.options.bwlimit.or_else(|| {
            let rate = self.config.migrate.bwlimit.as_deref()?;
            crate::commands::sync::parse_rate(rate).ok()
        })
    }

    /// Connects to both hosts (strict host keys, no agent forwarding).
    pub async fn connect(config: Config, out: Reporter, options: Options) -> Result<Cx> {
        let ssh = SshOptions {
            config: config.ssh_config.clone(),
        };
        let (old, new) = tokio::join!(
            Host::connect_target(&config.hosts.old.ssh, &ssh),
            Host::connect_target(&config.hosts.new.ssh, &ssh)
        );
        let old = old.context("connecting to old")?;
        let new = new.context("connecting to new")?;
        Ok(Cx {
            profile: Profile::of(&config),
            config,
            old: Node {
                role: "old",
                host: old,
                agent: None,
            },
            new: Node {
                role: "new",
                host: new,
                agent: None,
            },
            out,
            options,
        })
    }

    pub async fn close(self) -> Result<()> {
        let (a, b) = tokio::join!(self.old.close(), self.new.close());
        a.and(b)
    }

    /// What identifies this setup in the journal.
    pub async fn fingerprint(&self) -> Result<Fingerprint> {
        let (old_key, new_key) = tokio::join!(host_key(&self.old), host_key(&self.new));
        let addrs = |h: &crate::config::HostConfig| {
            h.addresses()
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
        };
        Ok(Fingerprint {
            domain: self.config.domain.clone(),
            profile: format!("{:?}", self.config.profile).to_lowercase(),
            old: self.config.hosts.old.ssh.clone(),
            new: self.config.hosts.new.ssh.clone(),
            old_addresses: addrs(&self.config.hosts.old),
            new_addresses: addrs(&self.config.hosts.new),
            old_host_key: old_key?,
            new_host_key: new_key?,
        })
    }
}

/// SHA-256 of the host's ed25519 key as the host has it.
async fn host_key(node: &Node) -> Result<String> {
    let text = node
        .run(&["cat", "/etc/ssh/ssh_host_ed25519_key.pub"])
        .await
        .with_context(|| format!("reading the host key of {}", node.label()))?;
    let field = text.split_whitespace().nth(1).unwrap_or_default();
    Ok(crate::sync::hash_cache::hex(&Sha256::digest(
        field.as_bytes(),
    )))
}

/// Where the journal of this config lives.
pub fn journal_path(config: &Config) -> std::path::PathBuf {
    config.beside(".journal")
}

/// Checks the journal's setup against this one, or records it for a new migration.
pub async fn setup(cx: &Cx, journal: &mut Journal) -> Result<()> {
    let now = cx.fingerprint().await?;
    let recorded = journal.current().iter().find_map(|r| match r {
        Record::Setup { fingerprint, .. } => Some(fingerprint.clone()),
        _ => None,
    });
    match recorded {
        Some(before) => {
            let changes = before.changes(&now);
            if !changes.is_empty() {
                bail!(
                    "the setup changed since this migration began ({}):\n  {}\nhint: put the config back as it was to resume; or roll back (`relaymove rollback`), or move the journal aside to start over",
                    journal.path().display(),
                    changes.join("\n  ")
                );
            }
            Ok(())
        }
        None => journal.append(Record::Setup {
            at: now_unix(),
            fingerprint: now,
        }),
    }
}

pub fn now_unix() -> u64 {
    change::now_unix()
}

/// A number the done `step` recorded at `pointer` of its facts.
pub fn recorded(records: &[Record], step: StepId, pointer: &str) -> Option<u64> {
    match journal::state_of(records, step.id()) {
        StepState::Done { facts, .. } => facts.pointer(pointer).and_then(Value::as_u64),
        _ => None,
    }
}

/// Until when resolvers may still hand out old's address, as the DNS cutover recorded it.
pub fn old_answers_until(records: &[Record]) -> Option<u64> {
    recorded(records, StepId::DnsCutover, "/switched/old_answers_until")
}

/// How far to go.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// Run this step and all after it even if recorded done.
    pub from: Option<StepId>,
    /// Stop after this step.
    pub until: StepId,
}

/// Runs the steps of `range`, resuming where the journal says the migration stands.
/// Returns the last step that ran or was found done.
pub async fn run(
    cx: &mut Cx,
    journal: &mut Journal,
    range: Range,
    stop: &Arc<AtomicBool>,
) -> Result<()> {
    setup(cx, journal).await?;
    // Both agents for the whole run: every tree goes through them, and their open channels
    // keep the SSH connections up through long quiet waits (the DNS gate, a configure hook).
    let (old, new) = tokio::join!(cx.old.agent(), cx.new.agent());
    let (old, _) = (old?, new?);
    // A lock on old, held by its agent: a second controller (another config file, another
    // machine) cannot interleave its steps with ours.
    old.call::<()>(&crate::remote::protocol::Request::Lock {
        path: b"/run/relaymove-migrate.lock".to_vec(),
    })
    .await
    .context("locking the migration on old")?;
    let last_done = STEPS
        .iter()
        .rev()
        .find(|s| {
            matches!(
                journal::state_of(journal.current(), s.id()),
                StepState::Done { .. }
            )
        })
        .copied();
    for step in STEPS {
        if step > range.until {
            break;
        }
        if stop.load(Ordering::SeqCst) {
            let hint = format!(
                "run `relaymove migrate` again to continue{}",
                if step > StepId::FreezeOld {
                    "; `relaymove rollback` returns service to old"
                } else {
                    ""
                }
            );
            cx.out.emit(Event::Stopped {
                after: "an interruption",
                hint: &hint,
            });
            bail!("interrupted before {}", step.id());
        }
        let forced = range.from.is_some_and(|f| step >= f);
        let state = journal::state_of(journal.current(), step.id());
        let n = step.index() + 1;
        cx.out.emit(Event::StepStarted {
            step: step.id(),
            title: step.title(),
            n,
            of: STEPS.len(),
        });
        if let StepState::Done { .. } = &state {
            if !forced {
                if Some(step) != last_done {
                    cx.out.emit(Event::StepSkipped {
                        step: step.id(),
                        reason: "a later step is done",
                    });
                    continue;
                }
                match still_holds(cx, step).await? {
                    None => {
                        cx.out.emit(Event::StepSkipped {
                            step: step.id(),
                            reason: "recorded in the journal, and the hosts still show it",
                        });
                        continue;
                    }
                    Some(why) => {
                        cx.note(step, &format!("recorded done, but {why}: running it again"))
                    }
                }
            }
        }
        if step == StepId::FreezeOld {
            dns_gate(cx, stop).await?;
            confirm(cx)?;
        }
        let started = Instant::now();
        let plan = observe(cx, journal, step).await?;
        journal.append(Record::Started {
            at: now_unix(),
            step: step.id().to_string(),
            plan: plan.clone(),
        })?;
        match apply(cx, journal, step, &plan, stop).await {
            Ok(facts) => {
                let summary = facts
                    .get("summary")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                journal.append(Record::Done {
                    at: now_unix(),
                    step: step.id().to_string(),
                    facts,
                })?;
                cx.out.emit(Event::StepDone {
                    step: step.id(),
                    elapsed_s: started.elapsed().as_secs_f64(),
                    summary: &summary,
                });
            }
            Err(e) => {
                let error = format!("{e:#}");
                journal.append(Record::Failed {
                    at: now_unix(),
                    step: step.id().to_string(),
                    error: error.clone(),
                })?;
                cx.out.emit(Event::StepFailed {
                    step: step.id(),
                    error: &error,
                });
                let after = if step > StepId::FreezeOld {
                    "; old still accepts mail: `relaymove rollback` returns service to it"
                } else {
                    ""
                };
                bail!(
                    "step {} failed: {error}\nhint: fix the cause, then run `relaymove migrate` again: it resumes at {}{after}",
                    step.id(),
                    step.id()
                );
            }
        }
    }
    Ok(())
}

impl Cx {
    pub fn note(&self, step: StepId, message: &str) {
        self.out.note(step.id(), message);
    }
}

/// What a step sees before it changes anything (journaled with its start).
async fn observe(cx: &mut Cx, journal: &Journal, step: StepId) -> Result<Value> {
    match step {
        // Rollback restores what old ran before the migration touched it: the first
        // observation, not the half-disabled state a re-run would see.
        StepId::FreezeOld => match journal::first_plan(journal.current(), step.id()) {
            Some(first) => Ok(first.clone()),
            None => services::observe_units(&cx.old, &cx.profile).await,
        },
        _ => Ok(Value::Null),
    }
}

async fn apply(
    cx: &mut Cx,
    journal: &Journal,
    step: StepId,
    plan: &Value,
    stop: &Arc<AtomicBool>,
) -> Result<Value> {
    match step {
        StepId::Preflight => preflight::apply(cx).await,
        StepId::Presync => trees::presync(cx).await,
        StepId::PrepareNew => services::prepare_new(cx).await,
        StepId::FreezeOld => services::freeze_old(cx, plan).await,
        StepId::FinalSync => trees::final_sync(cx).await,
        StepId::Ownership => trees::ownership(cx).await,
        StepId::ActivateNew => services::activate_new(cx).await,
        StepId::ForwardOld => services::forward_old(cx).await,
        StepId::DnsCutover => dns_cutover(cx).await,
        StepId::Verify => trees::verify(cx, journal).await,
        StepId::DrainOld => services::drain_old(cx, journal, stop).await,
        StepId::Finish => finish(cx, journal).await,
    }
}

/// `None` when what `step` did still holds on the hosts, else why not.
async fn still_holds(cx: &mut Cx, step: StepId) -> Result<Option<String>> {
    match step {
        // Repeatable while old serves mail: each pass leaves less for the final one.
        StepId::Presync => Ok(Some("old still serves mail".into())),
        StepId::PrepareNew => services::units_stopped(&cx.new, &cx.profile).await,
        StepId::FreezeOld => services::still_frozen(cx).await,
        StepId::FinalSync => trees::still_equal(cx).await,
        StepId::DnsCutover => Ok(
            match change::pending(&cx.config, Direction::Cutover).await? {
                0 => None,
                n => Some(format!("{n} record set(s) do not point at new")),
            },
        ),
        StepId::ActivateNew => services::units_running(&cx.new, &cx.profile).await,
        StepId::ForwardOld => services::still_forwarding(cx).await,
        // Read-only or reporting steps: what they found is not undone by time.
        _ => Ok(None),
    }
}

/// Before mail goes down: the old TTL must have run out everywhere, or resolvers would keep
/// sending mail to old for up to that TTL after the cutover. A short wait is waited out.
async fn dns_gate(cx: &Cx, stop: &Arc<AtomicBool>) -> Result<()> {
    /// Longer than this and the operator is told to come back.
    const MAX_WAIT: u64 = 15 * 60;
    let step = StepId::FreezeOld;
    if change::pending(&cx.config, Direction::Cutover).await? == 0 {
        return Ok(());
    }
    let Some(staging) = StagingState::load(&cx.config.state_path())? else {
        if cx.options.force_dns {
            cx.note(step, "TTL not staged; going on because of --force-dns");
            return Ok(());
        }
        bail!(
            "the TTL of {} was not lowered: resolvers may keep sending mail to old for the whole current TTL after the cutover; nothing was changed\nhint: run `relaymove dns lower-ttl`, then `relaymove migrate` again after the time it prints (or pass --force-dns)",
            cx.config.domain
        );
    };
    let safe = staging.safe_cutover_at();
    let now = now_unix();
    if safe <= now {
        return Ok(());
    }
    if cx.options.force_dns {
        cx.note(
            step,
            "the old TTL has not run out yet; going on because of --force-dns",
        );
        return Ok(());
    }
    if safe - now > MAX_WAIT {
        bail!(
            "the cutover is safe only from {} (in {} min: the old TTL after `lower-ttl`, plus a margin); nothing was taken down\nhint: run `relaymove migrate` again then; the presync done so far is kept",
            crate::commands::dns::utc(safe),
            (safe - now).div_ceil(60)
        );
    }
    cx.note(
        step,
        &format!(
            "waiting {}s, until {}, for resolvers to drop the old TTL (Ctrl-C stops here, nothing is down yet)",
            safe - now,
            crate::commands::dns::utc(safe)
        ),
    );
    while now_unix() < safe {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted while waiting for the TTL; nothing was taken down");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Asks before the first step that takes mail down.
fn confirm(cx: &Cx) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if cx.options.yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("the next step takes mail down on old, and there is no terminal to confirm it\nhint: pass --yes");
    }
    eprint!(
        "\nold ({}) stops delivering mail now (it keeps accepting it; IMAP is down until new takes over after the final sync). Go on? [y/N] ",
        cx.old.host.label()
    );
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        bail!(
            "not confirmed; nothing was taken down\nhint: run `relaymove migrate` again when ready"
        )
    }
}

async fn dns_cutover(cx: &mut Cx) -> Result<Value> {
    let step = StepId::DnsCutover;
    match change::switch(&cx.config, Direction::Cutover, &|m: &str| {
        cx.out.note("dns_cutover", m)
    })
    .await?
    {
        // Found done: by an earlier run that died between the update and its record, so the
        // switch may be seconds old. Resolvers may hold old's address for the lowered TTL
        // from now: old forwards that long (drain_old reads this).
        None => Ok(json!({
            "summary": format!("{} already points at new", cx.config.domain),
            "switched": {"old_answers_until": now_unix() + u64::from(cx.config.dns.low_ttl)},
        })),
        Some(switched) => {
            for line in &switched.changed {
                cx.note(step, line);
            }
            Ok(json!({
                "summary": format!("every authoritative server serves new's addresses ({:.1}s)", switched.propagation_s),
                "switched": switched,
            }))
        }
    }
}

async fn finish(cx: &mut Cx, journal: &Journal) -> Result<Value> {
    let step = StepId::Finish;
    // Two hosts must never both renew: old's acmetool would replace the certificate on
    // the host that no longer serves it, and may change the account state.
    for timer in ["acmetool.timer", "certbot.timer"] {
        if cx.old.test(&["systemctl", "cat", timer]).await? {
            cx.old
                .run(&["systemctl", "disable", "--now", "--quiet", timer])
                .await?;
            cx.note(step, &format!("{timer} disabled on old"));
        }
    }
    services::retire_old(cx).await?;
    let raise = match old_answers_until(journal.current()) {
        Some(t) if t > now_unix() => format!(
            "run `relaymove dns raise-ttl` after {} (resolvers may hold old's address until then)",
            crate::commands::dns::utc(t)
        ),
        _ => "run `relaymove dns raise-ttl` when you are sure you keep new".to_string(),
    };
    cx.note(step, &raise);
    cx.note(
        step,
        "old is stopped and disabled, its configuration as it was: `relaymove rollback` returns service to it",
    );
    Ok(json!({"summary": "moved", "raise_ttl": raise}))
}

/// Ctrl-C and SIGTERM set `stop`: the run ends at the next step boundary. A second one
/// ends the process at once.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!(
                    "relaymove: interrupted again: stopping now; run `relaymove migrate` to resume"
                );
                std::process::exit(130);
            }
            eprintln!("relaymove: interrupted: stopping after the current step (Ctrl-C again to stop at once)");
        }
    });
    stop
}
