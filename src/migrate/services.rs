//! The mail daemons: what runs where, stopping and disabling them on old, keeping new's stock
//! daemons quiet until the data is there, and starting new in the order the sockets need.
//! Every unit operation is `systemctl` with arguments, run over SSH; ports are probed from
//! this machine, the way senders see the hosts.

use crate::migrate::profile::Profile;
use crate::migrate::{Cx, Node, StepId};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// `systemctl is-enabled` and `is-active` of each unit, as `{unit: {enabled, active}}`.
pub async fn observe_units(node: &Node, profile: &Profile) -> Result<Value> {
    let mut units = serde_json::Map::new();
    for unit in profile.units() {
        // Both print their answer whatever their exit status ("disabled", "inactive").
        let enabled = node.status(&["systemctl", "is-enabled", unit]).await?;
        let active = node
            .status(&["systemctl", "is-active", active_unit(profile, unit)])
            .await?;
        units.insert(
            unit.to_string(),
            json!({"enabled": enabled.stdout.trim(), "active": active.stdout.trim()}),
        );
    }
    Ok(json!({ "units": units }))
}

/// The unit whose activity shows the daemon runs (Debian's `postfix.service` is a wrapper
/// that stays "active (exited)" whether or not Postfix runs).
fn active_unit<'a>(profile: &'a Profile, unit: &'a str) -> &'a str {
    if unit == "postfix" {
        profile.postfix_unit
    } else {
        unit
    }
}

/// `None` when none of the mail daemons runs on `node`, else which do.
pub async fn units_stopped(node: &Node, profile: &Profile) -> Result<Option<String>> {
    let running = running(node, profile).await?;
    Ok((!running.is_empty()).then(|| format!("{} runs on {}", running.join(", "), node.role)))
}

/// `None` when every mail daemon runs on `node`, else which do not.
pub async fn units_running(node: &Node, profile: &Profile) -> Result<Option<String>> {
    let running = running(node, profile).await?;
    let missing: Vec<&str> = profile
        .units()
        .into_iter()
        .filter(|u| !running.contains(u))
        .collect();
    Ok((!missing.is_empty())
        .then(|| format!("{} not running on {}", missing.join(", "), node.role)))
}

async fn running(node: &Node, profile: &Profile) -> Result<Vec<&'static str>> {
    let mut out = Vec::new();
    for unit in profile.units() {
        if node
            .test(&[
                "systemctl",
                "is-active",
                "--quiet",
                active_unit(profile, unit),
            ])
            .await?
        {
            out.push(unit);
        }
    }
    Ok(out)
}

/// Stops `units` in the order given (each waited for by systemctl before the next).
async fn stop(node: &Node, profile: &Profile, units: &[&str]) -> Result<()> {
    for unit in units {
        node.run(&["systemctl", "stop", unit, active_unit(profile, unit)])
            .await
            .with_context(|| format!("stopping {unit} on {}", node.role))?;
    }
    Ok(())
}

/// The address this machine reaches a host's mail ports at (IPv4 when it has one).
fn mail_address(cx: &Cx, node: &Node) -> Option<IpAddr> {
    let host = if node.role == "old" {
        &cx.config.hosts.old
    } else {
        &cx.config.hosts.new
    };
    host.addresses().first().copied()
}

/// Ports of `profile.ports` that accept a TCP connection within 2 s.
pub async fn open_ports(ip: IpAddr, profile: &Profile) -> Vec<u16> {
    let mut open = Vec::new();
    for &port in profile.ports {
        let connect = tokio::net::TcpStream::connect(SocketAddr::new(ip, port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
            open.push(port);
        }
    }
    open
}

/// Waits up to `limit` until the open ports are exactly `want` (all or none).
async fn wait_ports(ip: IpAddr, profile: &Profile, all_open: bool, limit: Duration) -> Vec<u16> {
    let start = Instant::now();
    loop {
        let open = open_ports(ip, profile).await;
        let done = if all_open {
            open.len() == profile.ports.len()
        } else {
            open.is_empty()
        };
        if done || start.elapsed() >= limit {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn prepare_new(cx: &mut Cx) -> Result<Value> {
    let step = StepId::PrepareNew;
    let was_running = running(&cx.new, &cx.profile).await?;
    if !was_running.is_empty() {
        // Debian starts a package's daemon on install with its stock config: it must not take
        // mail for the domain before new holds the data.
        stop(&cx.new, &cx.profile, cx.profile.stop_order).await?;
        cx.note(step, &format!("stopped on new: {}", was_running.join(", ")));
    }
    if let Some(argv) = cx.config.migrate.configure_command.clone() {
        let argv: Vec<String> = argv
            .iter()
            .map(|a| {
                a.replace("{new}", &cx.config.hosts.new.ssh)
                    .replace("{old}", &cx.config.hosts.old.ssh)
            })
            .collect();
        cx.note(
            step,
            &format!("running the configure hook: {}", argv.join(" ")),
        );
        // Its output goes to stderr with ours: stdout carries --json events.
        let status = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(std::process::Stdio::null())
            .stdout(std::io::stderr())
            .status()
            .await
            .with_context(|| format!("starting the configure hook {}", argv[0]))?;
        if !status.success() {
            bail!(
                "the configure hook `{}` failed ({status})\nhint: run it by hand to see why; old still serves mail",
                argv.join(" ")
            );
        }
        // The hook may have started daemons again (cmdeploy's configure stage does).
        let started = running(&cx.new, &cx.profile).await?;
        if !started.is_empty() {
            stop(&cx.new, &cx.profile, cx.profile.stop_order).await?;
            cx.note(
                step,
                &format!("the hook started {}: stopped again", started.join(", ")),
            );
        }
    }
    if let Some(why) = units_stopped(&cx.new, &cx.profile).await? {
        bail!("{why} after stopping it");
    }
    Ok(json!({
        "summary": if was_running.is_empty() { "no mail daemon ran on new".to_string() } else { format!("stopped {}", was_running.join(", ")) },
        "stopped": was_running,
    }))
}

pub async fn disable_old(cx: &mut Cx, plan: &Value) -> Result<Value> {
    let step = StepId::DisableOld;
    let units = cx.profile.units();
    // Postfix first, alone: from here senders get "connection refused" and keep their mail,
    // while Dovecot takes the last LMTP deliveries Postfix makes while stopping. Then Dovecot,
    // which must be down before the final sync reads the mailboxes. OpenDKIM only signs
    // outgoing mail and takes ~4 s to stop: it stops in the background, and the final sync
    // waits for it at its end, out of the downtime's critical path.
    let (background, now): (Vec<&str>, Vec<&str>) = cx
        .profile
        .stop_order
        .iter()
        .partition(|u| cx.profile.stop_in_background.contains(u));
    stop(&cx.old, &cx.profile, &now).await?;
    for unit in &background {
        cx.old
            .run(&["systemctl", "stop", "--no-block", unit])
            .await?;
    }
    // --no-reload: disabling changes only what starts at boot; a reload costs a second here.
    let mut disable = vec!["systemctl", "disable", "--no-reload", "--quiet"];
    disable.extend(units.iter().copied());
    cx.old.run(&disable).await?;
    let running = running(&cx.old, &cx.profile).await?;
    if let Some(unit) = running.iter().find(|u| now.contains(u)) {
        bail!("{unit} runs on old after stopping it");
    }
    let open = match mail_address(cx, &cx.old) {
        Some(ip) => wait_ports(ip, &cx.profile, false, Duration::from_secs(10)).await,
        None => Vec::new(),
    };
    if !open.is_empty() {
        bail!(
            "old still answers on port(s) {open:?} after its mail daemons stopped\nhint: something else listens there (`ss -ltnp` on old); stop it, then run `relaymove migrate` again"
        );
    }
    cx.note(
        step,
        &format!("stopped and disabled on old: {}", units.join(", ")),
    );
    Ok(json!({
        "summary": format!("ports {:?} closed on old", cx.profile.ports),
        "before": plan,
    }))
}

/// Waits until none of the mail daemons runs on `node` (a unit stopped in the background).
pub async fn wait_stopped(node: &Node, profile: &Profile, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        match units_stopped(node, profile).await? {
            None => return Ok(()),
            Some(why) if start.elapsed() >= limit => {
                bail!("{why} {}s after stopping it", limit.as_secs())
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

pub async fn activate_new(cx: &mut Cx) -> Result<Value> {
    let step = StepId::ActivateNew;
    cx.new.run(&["systemctl", "daemon-reload"]).await?;
    let mut enable = vec!["systemctl", "enable", "--quiet"];
    enable.extend(cx.profile.start_order.iter().copied());
    cx.new.run(&enable).await?;
    // Stop first (a re-run after an interruption finds them running): Postfix must never run
    // while Dovecot restarts, or it defers the LMTP deliveries in between for its backoff
    // time (5 minutes and more). Then start, not merely keep, each in order: a daemon that ran
    // before (Debian's install, a configure hook) would keep the config and keys it read then.
    stop(&cx.new, &cx.profile, cx.profile.stop_order).await?;
    for unit in cx.profile.start_order {
        cx.new
            .run(&["systemctl", "start", unit])
            .await
            .with_context(|| format!("starting {unit} on new"))?;
    }
    let ip = mail_address(cx, &cx.new);
    let open = match ip {
        Some(ip) => wait_ports(ip, &cx.profile, true, Duration::from_secs(30)).await,
        None => Vec::new(),
    };
    if open.len() != cx.profile.ports.len() {
        bail!(
            "new answers only on port(s) {open:?} of {:?} 30s after start\nhint: `journalctl -u postfix@- -u dovecot` on new; `relaymove rollback` returns service to old",
            cx.profile.ports
        );
    }
    cx.note(
        step,
        &format!("new answers on ports {:?}", cx.profile.ports),
    );
    // The moved queue's deferred mail would wait out old's backoff; deliver it now (held
    // mail stays held).
    cx.new.run(&["postqueue", "-f"]).await?;
    let certificate = served_certificate(cx).await?;
    cx.note(step, &certificate);
    let dkim = dkim_key_published(cx).await?;
    cx.note(step, &dkim);
    Ok(json!({
        "summary": "OpenDKIM, Dovecot and Postfix run on new",
        "certificate": certificate,
        "dkim": dkim,
    }))
}

/// Proves the certificate new serves (IMAPS, SMTPS, SMTP STARTTLS) is the one moved from
/// old, by SHA-256 fingerprint.
async fn served_certificate(cx: &Cx) -> Result<String> {
    let Some(cert) = &cx.profile.certificate else {
        return Ok("no certificate path in this profile".into());
    };
    let cert = cert.to_string_lossy().into_owned();
    if !cx.old.test(&["test", "-e", &cert]).await? {
        return Ok(format!("old has no {cert}; certificate not compared"));
    }
    let fingerprint = |text: &str| {
        text.trim()
            .rsplit('=')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let moved = fingerprint(
        &cx.old
            .run(&[
                "openssl",
                "x509",
                "-noout",
                "-fingerprint",
                "-sha256",
                "-in",
                &cert,
            ])
            .await?,
    );
    let domain = cx.config.domain.trim_end_matches('.');
    for (port, starttls) in [("993", ""), ("465", ""), ("25", "smtp")] {
        let served = cx
            .new
            .run(&[
                "sh",
                "-c",
                SERVED_CERT,
                "sh",
                &format!("127.0.0.1:{port}"),
                domain,
                starttls,
            ])
            .await
            .with_context(|| format!("reading the certificate new serves on port {port}"))?;
        if fingerprint(&served) != moved {
            bail!(
                "new serves another certificate on port {port} than old's {cert}\nhint: check the TLS settings of Postfix and Dovecot on new"
            );
        }
    }
    Ok(format!(
        "ports 993, 465 and 25 (STARTTLS) serve old's certificate (SHA-256 {})",
        &moved.chars().take(23).collect::<String>()
    ))
}

/// Prints the SHA-256 fingerprint of the certificate served at $1 for name $2, with
/// STARTTLS protocol $3 when not empty.
const SERVED_CERT: &str = r#"set -e
if [ -n "$3" ]; then tls="-starttls $3"; else tls=""; fi
echo | openssl s_client -connect "$1" -servername "$2" $tls 2>/dev/null | openssl x509 -noout -fingerprint -sha256
"#;

/// The DKIM key on new is the one DNS publishes: its public half (only that leaves the
/// host) compared with the `p=` of the selector's TXT record.
async fn dkim_key_published(cx: &Cx) -> Result<String> {
    let key = cx.profile.dkim_key.to_string_lossy().into_owned();
    let public = cx
        .new
        .run(&[
            "sh",
            "-c",
            "openssl pkey -in \"$1\" -pubout -outform DER | base64 -w0",
            "sh",
            &key,
        ])
        .await
        .with_context(|| format!("reading the public half of {key} on new"))?;
    let names = crate::dns::status::Names::of(&cx.config)?;
    match crate::dns::checks::published_dkim_key(&cx.config, &names).await? {
        Some(p) if p == public.trim() => Ok(format!(
            "the DKIM key on new is the one {} publishes",
            names.dkim
        )),
        Some(_) => bail!(
            "the DKIM key on new ({key}) is not the one {} publishes: new would sign mail receivers cannot verify\nhint: `relaymove rollback`, then check /etc/dkimkeys on old",
            names.dkim
        ),
        None => Ok(format!("no DKIM key published at {}; not compared", names.dkim)),
    }
}
