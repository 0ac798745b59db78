//! The mail daemons: what runs where, stopping and disabling them on old, keeping new's stock
//! daemons quiet until the data is there, and starting new in the order the sockets need.
//! Every unit operation is `systemctl` with arguments, run over SSH; ports are probed from
//! this machine, the way senders see the hosts.

use crate::migrate::journal::Journal;
use crate::migrate::profile::Profile;
use crate::migrate::{forwarded, postfix, Cx, Node, StepId};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// Ports of `ports` that accept a TCP connection within 2 s.
pub async fn open_ports(ip: IpAddr, ports: &[u16]) -> Vec<u16> {
    let mut open = Vec::new();
    for &port in ports {
        let connect = tokio::net::TcpStream::connect(SocketAddr::new(ip, port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), connect).await {
            open.push(port);
        }
    }
    open
}

/// Waits up to `limit` until all of `ports` are open (`all_open`) or none is.
pub async fn wait_ports(ip: IpAddr, ports: &[u16], all_open: bool, limit: Duration) -> Vec<u16> {
    let start = Instant::now();
    loop {
        let open = open_ports(ip, ports).await;
        let done = if all_open {
            open.len() == ports.len()
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

pub async fn freeze_old(cx: &mut Cx, plan: &Value) -> Result<Value> {
    let step = StepId::FreezeOld;
    // Postfix first, by reload (its sockets stay open): from here it accepts mail and
    // delivers none. Then Dovecot, which must be down before the final sync reads the
    // mailboxes; a delivery it was making when Postfix reloaded completes first.
    postfix::freeze(&cx.old).await?;
    let stopping = cx.profile.stopped_at_freeze();
    stop(&cx.old, &cx.profile, &stopping).await?;
    // --no-reload: disabling changes only what starts at boot; a reload costs a second here.
    // Postfix stays enabled: after a reboot of old it comes back in the mode on disk.
    let mut disable = vec!["systemctl", "disable", "--no-reload", "--quiet"];
    disable.extend(stopping.iter().copied());
    cx.old.run(&disable).await?;
    if let Some(why) = still_frozen(cx).await? {
        bail!("{why} after the freeze");
    }
    let ip = mail_address(cx, &cx.old);
    let closed = closed_ports(cx);
    let open = match ip {
        Some(ip) => wait_ports(ip, &closed, false, Duration::from_secs(10)).await,
        None => Vec::new(),
    };
    if !open.is_empty() {
        bail!(
            "old still answers on port(s) {open:?} after Dovecot stopped\nhint: something else listens there (`ss -ltnp` on old); stop it, then run `relaymove migrate` again"
        );
    }
    if let Some(ip) = ip {
        let smtp = open_ports(ip, cx.profile.smtp_ports).await;
        if !smtp.contains(&25) {
            bail!("old does not answer on port 25 after the freeze: senders would be refused\nhint: `journalctl -u postfix@-` on old; `relaymove rollback` restores old's configuration");
        }
    }
    cx.note(
        step,
        &format!(
            "old accepts mail and holds it in its queue; stopped and disabled on old: {}",
            stopping.join(", ")
        ),
    );
    Ok(json!({
        "summary": format!("old accepts mail on port 25 and delivers none; ports {closed:?} closed"),
        "before": plan,
    }))
}

/// The ports of `profile.ports` that are not SMTP: they close at the freeze.
fn closed_ports(cx: &Cx) -> Vec<u16> {
    cx.profile
        .ports
        .iter()
        .copied()
        .filter(|p| !cx.profile.smtp_ports.contains(p))
        .collect()
}

/// `None` while Postfix runs on old in `want` mode, else why not.
async fn old_postfix_in(cx: &Cx, want: postfix::Mode) -> Result<Option<String>> {
    let mode = postfix::mode(&cx.old).await?;
    if mode != want {
        return Ok(Some(format!(
            "Postfix on old is in {mode:?} mode, not {want:?}"
        )));
    }
    if !cx
        .old
        .test(&["systemctl", "is-active", "--quiet", cx.profile.postfix_unit])
        .await?
    {
        return Ok(Some("Postfix does not run on old".into()));
    }
    Ok(None)
}

/// `None` while old is frozen: Postfix runs in receive-and-hold mode, Dovecot is stopped.
pub async fn still_frozen(cx: &Cx) -> Result<Option<String>> {
    if let Some(why) = old_postfix_in(cx, postfix::Mode::Freeze).await? {
        return Ok(Some(why));
    }
    let running = running(&cx.old, &cx.profile).await?;
    let stopped = cx.profile.stopped_at_freeze();
    let wrong: Vec<&str> = running
        .into_iter()
        .filter(|u| stopped.contains(u))
        .collect();
    Ok((!wrong.is_empty()).then(|| format!("{} runs on old", wrong.join(", "))))
}

/// Old's Postfix sends every message for the domain to new: what it accepted during the
/// freeze, and whatever senders still bring to its address after the cutover.
pub async fn forward_old(cx: &mut Cx) -> Result<Value> {
    let step = StepId::ForwardOld;
    let Some(to) = mail_address(cx, &cx.new) else {
        bail!("[hosts.new] has no ipv4 or ipv6 in the config: old cannot forward to it\nhint: add new's address to the config");
    };
    let domain = cx.config.domain.trim_end_matches('.').to_string();
    let helo = postfix::helo_name(&cx.old, &domain).await?;
    // New must take what old forwards even where the original sender's SPF would refuse it.
    let from = forwarder_addresses(&cx.old, cx.config.hosts.old.addresses(), to).await;
    postfix::trust(&cx.new, &from).await?;
    postfix::forward(&cx.old, &domain, to, &helo).await?;
    if let Some(why) = still_forwarding(cx).await? {
        bail!("{why} after switching it to forwarding");
    }
    // What old held during the freeze leaves now; wait a little so the summary can say so.
    let drained = postfix::wait_drained(&cx.old, Duration::from_secs(30)).await;
    let left = postfix::waiting(&cx.old).await?;
    let queue = match &drained {
        Ok(()) => "old's queue is empty (held mail stays held)".to_string(),
        Err(_) => format!("{left} message(s) still in old's queue: drain_old waits for them"),
    };
    cx.note(
        step,
        &format!("old forwards mail for {domain} to [{to}]:25 as {helo}; {queue}"),
    );
    Ok(json!({
        "summary": format!("old forwards {domain} to {to}"),
        "to": to.to_string(),
        "helo": helo,
        "since": crate::migrate::now_unix(),
        "queued": left,
    }))
}

/// The addresses mail forwarded by `node` to `to` comes from: the configured ones and the
/// source address the node's kernel picks for `to` (an outgoing address the config may not
/// name).
pub async fn forwarder_addresses(node: &Node, configured: Vec<IpAddr>, to: IpAddr) -> Vec<IpAddr> {
    let mut from = configured;
    if let Ok(route) = node
        .run(&["ip", "-o", "route", "get", &to.to_string()])
        .await
    {
        let source = route
            .split_whitespace()
            .skip_while(|w| *w != "src")
            .nth(1)
            .and_then(|a| a.parse::<IpAddr>().ok());
        if let Some(a) = source.filter(|a| !from.contains(a)) {
            from.push(a);
        }
    }
    from
}

/// `None` while old's Postfix runs in forwarding mode.
pub async fn still_forwarding(cx: &Cx) -> Result<Option<String>> {
    old_postfix_in(cx, postfix::Mode::Forward).await
}

/// Old keeps forwarding until no resolver can still hold its address (the time the DNS
/// cutover computed: old TTL plus the negative-cache time), and its queue has nothing left
/// to deliver. Waits up to 15 minutes; beyond that it stops and says when to come back.
pub async fn drain_old(cx: &mut Cx, journal: &Journal, stop: &Arc<AtomicBool>) -> Result<Value> {
    const MAX_WAIT: u64 = 15 * 60;
    let step = StepId::DrainOld;
    let until = crate::migrate::old_answers_until(journal.current()).unwrap_or(0);
    let since = crate::migrate::recorded(journal.current(), StepId::ForwardOld, "/since")
        .unwrap_or_else(crate::migrate::now_unix);
    let now = crate::migrate::now_unix();
    if until > now + MAX_WAIT {
        bail!(
            "resolvers may send mail to old until {} (in {} min): old keeps forwarding it to new meanwhile\nhint: run `relaymove migrate` again after that time to finish; `relaymove status` shows what still reaches old",
            crate::commands::dns::utc(until),
            (until - now).div_ceil(60)
        );
    }
    if until > now {
        cx.note(
            step,
            &format!(
                "old forwards until {} ({}s), when no resolver can hold its address any more",
                crate::commands::dns::utc(until),
                until - now
            ),
        );
    }
    while crate::migrate::now_unix() < until {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted while old forwards; run `relaymove migrate` again to finish");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    postfix::wait_drained(&cx.old, Duration::from_secs(60))
        .await
        .context("old forwards until its queue is empty")?;
    let arrivals = forwarded::since(&cx.old, cx.profile.postfix_unit, since).await?;
    let told = forwarded::describe(&arrivals);
    cx.note(step, &told);
    Ok(json!({
        "summary": told,
        "arrivals": arrivals.iter().map(|a| json!({"client": a.client, "messages": a.messages, "last": a.last})).collect::<Vec<_>>(),
    }))
}

/// After the drain: old's Postfix and OpenDKIM stop and are disabled, and Postfix's
/// configuration is as it was before the move (for a rollback, or a reuse of the host).
pub async fn retire_old(cx: &mut Cx) -> Result<()> {
    let accepting: Vec<&str> = cx.profile.accepting.to_vec();
    stop(&cx.old, &cx.profile, &accepting).await?;
    let mut disable = vec!["systemctl", "disable", "--no-reload", "--quiet"];
    disable.extend(accepting.iter().copied());
    cx.old.run(&disable).await?;
    postfix::restore(&cx.old).await?;
    if let Some(why) = units_stopped(&cx.old, &cx.profile).await? {
        bail!("{why} after stopping it");
    }
    // Nothing comes from old any more: new's checks apply to every client again.
    postfix::restore(&cx.new).await?;
    Ok(())
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
        Some(ip) => wait_ports(ip, cx.profile.ports, true, Duration::from_secs(30)).await,
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
