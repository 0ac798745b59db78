//! `relaymove rollback`: service back to old, from whatever step the migration reached.
//!
//! Order: new stops taking mail first; then what new accepted meanwhile (mailboxes and queue)
//! goes back to old, while both are stopped; then DNS back by compare-and-swap; then old's
//! units exactly as the journal recorded them before the move. Each part is journaled, so an
//! interrupted rollback resumes without repeating a part that is done (syncing back again
//! after old took new mail would lose that mail).

use crate::dns::change::{self, Direction};
use crate::migrate::journal::{self, Journal, Record, StepState};
use crate::migrate::{now_unix, services, Cx, StepId};
use crate::remote::mirror::{mirror, MirrorOptions, Side};
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    StopNew,
    SyncBack,
    DnsBack,
    StartOld,
}

impl Part {
    fn id(self) -> &'static str {
        match self {
            Part::StopNew => "rollback_stop_new",
            Part::SyncBack => "rollback_sync_back",
            Part::DnsBack => "rollback_dns",
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
    let new_took_mail = started(&records, StepId::ActivateNew);
    let dns_moved = started(&records, StepId::DnsCutover);
    let before = journal::first_plan(&records, StepId::DisableOld.id()).cloned();
    for part in [Part::StopNew, Part::SyncBack, Part::DnsBack, Part::StartOld] {
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
            Part::StopNew => stop_new(cx).await,
            Part::SyncBack if new_took_mail => sync_back(cx).await,
            Part::SyncBack => Ok(json!({"summary": "new never took mail; nothing to carry back"})),
            Part::DnsBack if dns_moved => dns_back(cx).await,
            Part::DnsBack => Ok(json!({"summary": "DNS was not changed"})),
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
    if let Some(why) = services::units_stopped(&cx.new, &cx.profile).await? {
        bail!("{why} after stopping it");
    }
    Ok(json!({"summary": format!("new stopped and disabled: {}", units.join(", "))}))
}

/// New → old: the mailboxes and the queue as new has them (a superset of what old had at
/// the final sync, plus what new accepted since).
async fn sync_back(cx: &mut Cx) -> Result<Value> {
    let mail_root = cx.profile.mailboxes().to_path_buf();
    let queue = cx.profile.queue.clone();
    let mut lines = Vec::new();
    for (root, excludes) in [
        (mail_root, Vec::new()),
        (queue, cx.profile.queue_excludes()),
    ] {
        let opts = MirrorOptions {
            delete: true,
            excludes,
            level: 1,
            progress: cx.options.progress && !cx.out.json(),
            ..MirrorOptions::default()
        };
        let outcome = back(cx, &root, &opts).await?;
        lines.push(format!("{}: {} files back to old", root.display(), outcome));
    }
    cx.old.run(&["postsuper", "-s"]).await?;
    Ok(json!({"summary": lines.join("; ")}))
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

/// Old's units as they were before `disable_old`: enabled ones enabled, active ones started
/// (in start order), then its ports answer.
async fn start_old(cx: &mut Cx, before: Option<&Value>) -> Result<Value> {
    let Some(units) = before.and_then(|b| b.get("units")) else {
        return Ok(json!({"summary": "old was never disabled"}));
    };
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
    for unit in &start {
        cx.old.run(&["systemctl", "restart", unit]).await?;
    }
    if start.contains(&"postfix") {
        if let Some(ip) = cx.config.hosts.old.addresses().first().copied() {
            let mut open = Vec::new();
            for _ in 0..60 {
                open = services::open_ports(ip, &cx.profile).await;
                if open.contains(&25) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            if !open.contains(&25) {
                bail!("old does not answer on port 25 after Postfix started\nhint: `journalctl -u postfix@-` on old");
            }
        }
    }
    Ok(
        json!({"summary": format!("old serves mail again: enabled {}, started {}", enable.join(" "), start.join(" "))}),
    )
}
