//! `relaymove rollback`: service back to old, from whatever step the migration reached,
//! without a sender meeting a refusal.
//!
//! Order: old first accepts mail again without forwarding it (frozen: it keeps what comes
//! until it is whole again); DNS back by compare-and-swap; new forwards what it has for the
//! domain to old, then stops; the mailboxes new wrote come back to old while Dovecot is
//! stopped on both; then old's configuration and units exactly as the journal recorded them
//! before the move, and old delivers what it kept. Each part is journaled, so an interrupted
//! rollback resumes without repeating a part that is done (syncing back again after old
//! took new mail would lose that mail).

use crate::dns::change::{self, Direction};
use crate::migrate::journal::{self, Journal, Record, StepState};
use crate::migrate::{now_unix, postfix, services, Cx, StepId};
use crate::remote::mirror::{mirror, MirrorOptions, Side};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    FreezeOld,
    DnsBack,
    NewForwards,
    StopNew,
    SyncBack,
    StartOld,
}

impl Part {
    fn id(self) -> &'static str {
        match self {
            Part::FreezeOld => "rollback_freeze_old",
            Part::DnsBack => "rollback_dns",
            Part::NewForwards => "rollback_new_forwards",
            Part::StopNew => "rollback_stop_new",
            Part::SyncBack => "rollback_sync_back",
            Part::StartOld => "rollback_start_old",
        }
    }
}

fn started(records: &[Record], step: StepId) -> bool {
    journal::state_of(records, step.id()) != StepState::Pending
}

pub async fn run(cx: &mut Cx, journal: &mut Journal) -> Result<()> {
    let records = journal.current().to_vec();
    if !records.iter().any(|r| r.step().is_some()) {
        bail!("no migration to roll back: the journal {} has no step\nhint: nothing was changed by relaymove", journal.path().display());
    }
    crate::migrate::setup(cx, journal).await?;
    let frozen = started(&records, StepId::FreezeOld);
    let new_took_mail = started(&records, StepId::ActivateNew);
    let dns_moved = started(&records, StepId::DnsCutover);
    let before = journal::first_plan(&records, StepId::FreezeOld.id()).cloned();
    for part in [
        Part::FreezeOld,
        Part::DnsBack,
        Part::NewForwards,
        Part::StopNew,
        Part::SyncBack,
        Part::StartOld,
    ] {
        if matches!(
            journal::state_of(&records, part.id()),
            StepState::Done { .. }
        ) {
            continue;
        }
        journal.append(Record::Started {
            at: now_unix(),
            step: part.id().to_string(),
            plan: Value::Null,
        })?;
        let done = match part {
            Part::FreezeOld if frozen => freeze_old(cx).await,
            Part::FreezeOld => Ok(json!({"summary": "old was never frozen; it serves mail"})),
            Part::DnsBack if dns_moved => dns_back(cx).await,
            Part::DnsBack => Ok(json!({"summary": "DNS was not changed"})),
            Part::NewForwards if new_took_mail => {
                // Until when resolvers may hand out new's address: what the switch back said.
                let until = match journal::state_of(journal.current(), Part::DnsBack.id()) {
                    StepState::Done { facts, .. } => facts
                        .pointer("/switched/old_answers_until")
                        .and_then(Value::as_u64),
                    _ => None,
                };
                new_forwards(cx, until).await
            }
            Part::NewForwards => Ok(json!({"summary": "new never took mail"})),
            Part::StopNew => stop_new(cx).await,
            Part::SyncBack if new_took_mail => sync_back(cx).await,
            Part::SyncBack => Ok(json!({"summary": "new never took mail; nothing to carry back"})),
            Part::StartOld => start_old(cx, before.as_ref()).await,
        };
        match done {
            Ok(facts) => {
                let summary = facts["summary"].as_str().unwrap_or("").to_string();
                cx.out.note("rollback", &summary);
                journal.append(Record::Done {
                    at: now_unix(),
                    step: part.id().to_string(),
                    facts,
                })?;
            }
            Err(e) => {
                journal.append(Record::Failed {
                    at: now_unix(),
                    step: part.id().to_string(),
                    error: format!("{e:#}"),
                })?;
                bail!("rollback: {e:#}\nhint: fix the cause, then run `relaymove rollback` again: it resumes where it stopped");
            }
        }
    }
    journal.append(Record::RolledBack { at: now_unix() })?;
    Ok(())
}

/// Old accepts mail and keeps it (whatever mode it was in: forwarding, or stopped by the
/// finish), so that it takes over from new before DNS points at it again.
async fn freeze_old(cx: &mut Cx) -> Result<Value> {
    postfix::freeze(&cx.old).await?;
    for unit in cx.profile.start_order {
        if cx.profile.accepting.contains(unit) {
            cx.old.run(&["systemctl", "start", unit]).await?;
        }
    }
    if let Some(ip) = cx.config.hosts.old.addresses().first().copied() {
        wait_smtp(cx, ip).await?;
    }
    Ok(json!({"summary": "old accepts mail and keeps it until it serves again"}))
}

/// New hands what it holds for the domain to old, and keeps forwarding what senders bring
/// until `until`, when no resolver can still hold new's address (the DNS went back to old).
async fn new_forwards(cx: &mut Cx, until: Option<u64>) -> Result<Value> {
    if !cx
        .new
        .test(&["systemctl", "is-active", "--quiet", cx.profile.postfix_unit])
        .await?
    {
        return Ok(json!({"summary": "Postfix does not run on new: nothing to forward"}));
    }
    let Some(to) = cx.config.hosts.old.addresses().first().copied() else {
        bail!("[hosts.old] has no ipv4 or ipv6 in the config: new cannot forward to it\nhint: add old's address to the config");
    };
    let domain = cx.config.domain.trim_end_matches('.').to_string();
    let helo = postfix::helo_name(&cx.new, &domain).await?;
    // Old (frozen) must take what new forwards, whatever the original senders' SPF says;
    // old's configuration is restored when it serves again.
    let from = services::forwarder_addresses(&cx.new, cx.config.hosts.new.addresses(), to).await;
    postfix::trust(&cx.old, &from).await?;
    postfix::forward(&cx.new, &domain, to, &helo).await?;
    if let Some(until) = until.filter(|t| *t > now_unix()) {
        cx.out.note(
            "rollback",
            &format!(
                "new forwards to old until {} ({}s), when no resolver can hold new's address any more",
                crate::commands::dns::utc(until),
                until - now_unix()
            ),
        );
        while now_unix() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    postfix::wait_drained(&cx.new, Duration::from_secs(120)).await?;
    Ok(json!({"summary": format!("new forwarded its queue for {domain} to old ({to})")}))
}

async fn stop_new(cx: &mut Cx) -> Result<Value> {
    let units = cx.profile.units();
    for unit in cx.profile.stop_order {
        cx.new
            .run(&[
                "systemctl",
                "stop",
                unit,
                if *unit == "postfix" {
                    cx.profile.postfix_unit
                } else {
                    unit
                },
            ])
            .await?;
    }
    let mut disable = vec!["systemctl", "disable", "--quiet"];
    disable.extend(units.iter().copied());
    cx.new.run(&disable).await?;
    postfix::restore(&cx.new).await?;
    if let Some(why) = services::units_stopped(&cx.new, &cx.profile).await? {
        bail!("{why} after stopping it");
    }
    Ok(json!({"summary": format!("new stopped and disabled: {}", units.join(", "))}))
}

/// New → old: the mailboxes as new has them (a superset of what old had at the final sync,
/// plus what new delivered since). Dovecot is stopped on both hosts.
async fn sync_back(cx: &mut Cx) -> Result<Value> {
    let mail_root = cx.profile.mailboxes().to_path_buf();
    let opts = MirrorOptions {
        delete: true,
        progress: cx.options.progress && !cx.out.json(),
        route: cx.route(false).await,
        lock_wait: super::trees::LOCK_WAIT,
        ..MirrorOptions::default()
    };
    let files = back(cx, &mail_root, &opts).await?;
    Ok(json!({"summary": format!("{}: {files} files back to old", mail_root.display())}))
}

async fn back(cx: &mut Cx, root: &PathBuf, opts: &MirrorOptions) -> Result<u64> {
    let new = cx.new.agent().await?;
    let old = cx.old.agent().await?;
    let outcome = mirror(Side { agent: new, root }, Side { agent: old, root }, opts).await?;
    Ok(outcome.stats.files_written)
}

async fn dns_back(cx: &mut Cx) -> Result<Value> {
    Ok(
        match change::switch(&cx.config, Direction::Rollback, &|m: &str| {
            cx.out.note("rollback", m)
        })
        .await?
        {
            None => json!({"summary": format!("{} already points at old", cx.config.domain)}),
            Some(s) => json!({
                "summary": format!("{} back to old on every authoritative server ({:.1}s)", s.changed.join("; "), s.propagation_s),
                "switched": s,
            }),
        },
    )
}

/// Old's Postfix configuration as it was, and its units as they were before `freeze_old`:
/// enabled ones enabled, active ones started (in start order); then what it kept meanwhile
/// is delivered, and port 25 answers.
async fn start_old(cx: &mut Cx, before: Option<&Value>) -> Result<Value> {
    let Some(units) = before.and_then(|b| b.get("units")) else {
        return Ok(json!({"summary": "old was never frozen"}));
    };
    postfix::restore(&cx.old).await?;
    let was = |unit: &str, key: &str, want: &str| {
        units
            .pointer(&format!("/{unit}/{key}"))
            .and_then(Value::as_str)
            .is_some_and(|s| s == want)
    };
    let enable: Vec<&str> = cx
        .profile
        .units()
        .into_iter()
        .filter(|u| was(u, "enabled", "enabled"))
        .collect();
    if !enable.is_empty() {
        let mut argv = vec!["systemctl", "enable", "--quiet"];
        argv.extend(enable.iter().copied());
        cx.old.run(&argv).await?;
    }
    let start: Vec<&str> = cx
        .profile
        .start_order
        .iter()
        .copied()
        .filter(|u| was(u, "active", "active"))
        .collect();
    // `start`, not `restart`: Postfix kept running (reloaded by the restore); a restart
    // would refuse senders for a moment.
    for unit in &start {
        cx.old.run(&["systemctl", "start", unit]).await?;
    }
    if start.contains(&"postfix") {
        cx.old.run(&["postqueue", "-f"]).await?;
        if let Some(ip) = cx.config.hosts.old.addresses().first().copied() {
            wait_smtp(cx, ip).await?;
        }
    }
    Ok(
        json!({"summary": format!("old serves mail again: enabled {}, started {}", enable.join(" "), start.join(" "))}),
    )
}

/// Waits up to 30 s for port 25 at `ip` to answer.
async fn wait_smtp(cx: &Cx, ip: std::net::IpAddr) -> Result<()> {
    if services::wait_ports(ip, &[25], true, Duration::from_secs(30))
        .await
        .is_empty()
    {
        bail!(
            "old ({}) does not answer on port 25\nhint: `journalctl -u postfix@-` on old",
            cx.old.host.label()
        );
    }
    Ok(())
}
