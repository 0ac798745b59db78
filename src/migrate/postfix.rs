//! Postfix's modes during a move, so that no sender ever meets a refusal or a 4xx:
//!
//! - `freeze`: Postfix keeps listening and accepting, but delivers nothing (every delivery
//!   transport in `defer_transports`): the mailboxes stop changing while old stays reachable.
//! - `forward`: every message for the domain goes to the other host's address through a
//!   dedicated `smtp` transport, and the rest is delivered as usual. Used on old after the
//!   cutover (senders still resolving old's address), and on new during a rollback.
//! - `trust`, on top of either or none: the other host's addresses pass the client, HELO,
//!   sender and recipient checks (an SPF policy would refuse mail the other host forwards:
//!   the original sender's SPF does not name it), never the relay check.
//! - `restore`: the configuration as it was before the first mode, and nothing of ours left.
//!
//! Each mode starts from the kept original (`main.cf` and `master.cf`, copied once, root-only)
//! and is applied with `postfix reload`: the listening sockets stay open throughout, where a
//! restart would refuse connections. A mode is one shell script run over SSH; it is idempotent.
//!
//! Why the forward transport looks the way it does (research/migrate.md §3): a bracketed
//! address, because an MX lookup would find the forwarding host itself while DNS still names
//! it; its own `myhostname`, because both hosts share the domain as `myhostname` and Postfix's
//! loop check ("mail for X loops back to myself") compares the peer's banner with it; TLS
//! required but not verified, because the peer is named by address.

use crate::migrate::Node;
use anyhow::{bail, Context, Result};
use std::net::IpAddr;

/// The transport's name in master.cf and in the logs (`postfix/relaymove-forward/smtp`).
pub const FORWARD: &str = "relaymove-forward";

/// Where the original configuration and the current mode are kept on a host.
const KEEP: &str = "/var/lib/relaymove/migrate/postfix";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Not changed by relaymove (or restored).
    Normal,
    Freeze,
    Forward,
}

impl Mode {
    fn parse(s: &str) -> Option<Mode> {
        match s.trim() {
            "normal" => Some(Mode::Normal),
            "freeze" => Some(Mode::Freeze),
            "forward" => Some(Mode::Forward),
            _ => None,
        }
    }
}

/// `sh -c SCRIPT sh ACTION ARGS...`. `set -e` stops at the first failing command, before the
/// mode is recorded; `postfix check` runs before the reload so a broken change is never loaded.
/// The configuration is always rebuilt from the kept original: the mode (`freeze` or
/// `forward`, whose arguments are kept too) and, independently, `trust`.
const SCRIPT: &str = r#"set -euf
keep=$KEEP
action=$1; shift
# The original, kept once: master.cf first, main.cf last by rename, so that a kept main.cf
# means a complete copy.
keep_original() {
    [ -f "$keep/main.cf" ] && return 0
    (umask 077 && mkdir -p "$keep")
    chmod 0700 "$keep"
    cp -p /etc/postfix/master.cf "$keep/master.cf"
    cp -p /etc/postfix/main.cf "$keep/main.cf.new"
    mv "$keep/main.cf.new" "$keep/main.cf"
}
put_back() {
    cp -p "$keep/main.cf" /etc/postfix/main.cf
    cp -p "$keep/master.cf" /etc/postfix/master.cf
}
reload_if_running() {
    if postfix status >/dev/null 2>&1; then postfix reload 2>&1; fi
}
# apply MODE [DOMAIN NEXTHOP HELO] [TRUSTED...]: the original, then the mode, then the trust.
apply() {
    mode=$1; shift
    put_back
    case $mode in
    freeze)
        # Every transport that delivers somewhere: into a mailbox (lmtp, local, virtual, pipe)
        # or to another host (smtp, relay).
        transports=$(postconf -M | awk '$2 == "unix" && ($8 == "smtp" || $8 == "lmtp" || $8 == "local" || $8 == "virtual" || $8 == "pipe") { printf "%s ", $1 }')
        postconf -e "defer_transports = $transports" ;;
    forward)
        domain=$1 nexthop=$2 helo=$3; shift 3
        maps=$(postconf -h transport_maps)
        postconf -e "transport_maps = inline:{$domain=relaymove-forward:$nexthop:25}${maps:+, $maps}"
        postconf -M "relaymove-forward/unix=relaymove-forward unix - - n - - smtp"
        postconf -P "relaymove-forward/unix/myhostname=$helo" \
            "relaymove-forward/unix/smtp_tls_security_level=encrypt" \
            "relaymove-forward/unix/syslog_name=postfix/relaymove-forward" ;;
    esac
    if [ $# -gt 0 ]; then
        # The other host hands over mail it accepted for the domain from the original senders:
        # their SPF (and any other check of the client, HELO or sender) does not describe it.
        # OK in these lists does not permit relaying: smtpd_relay_restrictions are evaluated
        # on their own, and must guard relaying for this to be safe.
        relay=$(postconf -h smtpd_relay_restrictions)
        case $relay in
        *reject_unauth_destination*|*defer_unauth_destination*) ;;
        *) echo "smtpd_relay_restrictions ($relay) does not end relaying with reject_unauth_destination or defer_unauth_destination: letting the other host past the recipient checks could open the relay; fix: set smtpd_relay_restrictions = permit_mynetworks permit_sasl_authenticated defer_unauth_destination (Postfix's default)" >&2
           exit 3 ;;
        esac
        map="inline:{"
        for a in "$@"; do map="$map $a=OK,"; done
        map="${map%,} }"
        for list in smtpd_client_restrictions smtpd_helo_restrictions smtpd_sender_restrictions smtpd_recipient_restrictions; do
            now=$(postconf -h "$list")
            postconf -e "$list = check_client_access $map${now:+, $now}"
        done
    fi
    postfix check
    reload_if_running
}
trusted() { if [ -f "$keep/trust" ]; then cat "$keep/trust"; fi; }
forward_args() { if [ -f "$keep/forward" ]; then cat "$keep/forward"; fi; }
current() { if [ -f "$keep/mode" ]; then cat "$keep/mode"; else echo normal; fi; }
case $action in
freeze)
    keep_original
    apply freeze $(trusted)
    echo freeze > "$keep/mode" ;;
forward)
    keep_original
    apply forward "$1" "$2" "$3" $(trusted)
    echo "$1 $2 $3" > "$keep/forward"
    echo forward > "$keep/mode"
    # What waited during the freeze goes now, not at the next queue run.
    if postfix status >/dev/null 2>&1; then postqueue -f; fi ;;
trust)
    keep_original
    mode=$(current)
    if [ "$mode" = forward ]; then apply forward $(forward_args) "$@"; else apply "$mode" "$@"; fi
    echo "$@" > "$keep/trust"
    [ -f "$keep/mode" ] || echo normal > "$keep/mode" ;;
restore)
    if [ -f "$keep/main.cf" ]; then
        put_back
        postfix check
        reload_if_running
        rm -rf "$keep"
    fi ;;
mode)
    current ;;
esac
"#;

async fn script(node: &Node, args: &[&str]) -> Result<String> {
    let script = SCRIPT.replace("$KEEP", KEEP);
    let mut argv = vec!["sh", "-c", &script, "sh"];
    argv.extend_from_slice(args);
    node.run(&argv).await
}

/// The mode relaymove left Postfix in on `node`.
pub async fn mode(node: &Node) -> Result<Mode> {
    let out = script(node, &["mode"]).await?;
    Mode::parse(&out).with_context(|| {
        format!(
            "{}: {KEEP}/mode says {:?}, not a mode relaymove writes",
            node.role,
            out.trim()
        )
    })
}

/// Postfix on `node` accepts mail and delivers none.
pub async fn freeze(node: &Node) -> Result<()> {
    script(node, &["freeze"])
        .await
        .with_context(|| format!("putting Postfix on {} in receive-and-hold mode", node.role))?;
    Ok(())
}

/// Postfix on `node` sends every message for `domain` to `to`, saying `helo`.
pub async fn forward(node: &Node, domain: &str, to: IpAddr, helo: &str) -> Result<()> {
    script(node, &["forward", domain, &nexthop(to), helo])
        .await
        .with_context(|| format!("making Postfix on {} forward {domain} to {to}", node.role))?;
    Ok(())
}

/// Postfix on `node` lets mail from `from` (the other host, forwarding) past its client,
/// HELO, sender and recipient checks (the original senders' SPF names not that host), on
/// top of its mode. Refused when `smtpd_relay_restrictions` does not guard relaying.
pub async fn trust(node: &Node, from: &[IpAddr]) -> Result<()> {
    let addrs: Vec<String> = from.iter().map(|a| a.to_string()).collect();
    let mut argv = vec!["trust"];
    argv.extend(addrs.iter().map(|a| a.as_str()));
    script(node, &argv).await.with_context(|| {
        format!(
            "letting mail forwarded from {} past Postfix's client checks on {}",
            addrs.join(", "),
            node.role
        )
    })?;
    Ok(())
}

/// Postfix on `node` as it was before relaymove changed it (a no-op if it never did).
pub async fn restore(node: &Node) -> Result<()> {
    script(node, &["restore"])
        .await
        .with_context(|| format!("restoring Postfix's configuration on {}", node.role))?;
    Ok(())
}

/// Postfix's bracketed next hop for an address: no MX lookup.
fn nexthop(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[ipv6:{v6}]"),
    }
}

/// The name the forwarding host gives itself: its own FQDN when it has one that differs
/// from the domain, else a name under the domain. Never the domain: see the module's doc.
pub async fn helo_name(node: &Node, domain: &str) -> Result<String> {
    let fqdn = node
        .status(&["hostname", "--fqdn"])
        .await?
        .stdout
        .trim()
        .to_ascii_lowercase();
    Ok(choose_helo(&fqdn, node.role, domain))
}

fn choose_helo(fqdn: &str, role: &str, domain: &str) -> String {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let usable = fqdn.contains('.')
        && fqdn != domain
        && fqdn
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if usable {
        fqdn.to_string()
    } else {
        format!("relaymove-{role}.{domain}")
    }
}

/// One message in a Postfix queue, as `postqueue -j` reports it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Queued {
    pub queue_name: String,
    pub queue_id: String,
}

/// The messages in `node`'s queue, held ones included.
pub async fn queue(node: &Node) -> Result<Vec<Queued>> {
    let out = node.run(&["postqueue", "-j"]).await?;
    parse_queue(&out).with_context(|| format!("reading `postqueue -j` on {}", node.role))
}

fn parse_queue(text: &str) -> Result<Vec<Queued>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).context("a line that is not a queue entry"))
        .collect()
}

/// Messages on `node` still to be delivered (not on hold).
pub async fn waiting(node: &Node) -> Result<usize> {
    Ok(queue(node)
        .await?
        .iter()
        .filter(|q| q.queue_name != "hold")
        .count())
}

/// Waits up to `limit` for `node`'s queue to have nothing but held mail; fails with what is
/// left.
pub async fn wait_drained(node: &Node, limit: std::time::Duration) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        let left: Vec<Queued> = queue(node)
            .await?
            .into_iter()
            .filter(|q| q.queue_name != "hold")
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= limit {
            let ids: Vec<String> = left
                .iter()
                .take(10)
                .map(|q| format!("{} ({})", q.queue_id, q.queue_name))
                .collect();
            bail!(
                "{} message(s) still in the queue on {} after {}s: {}\nhint: `postqueue -p` and `journalctl -u postfix@-` on {} say why",
                left.len(),
                node.role,
                limit.as_secs(),
                ids.join(", "),
                node.role
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarder_never_calls_itself_by_the_domain() {
        assert_eq!(
            choose_helo("old.example.net", "old", "chat.example.org"),
            "old.example.net"
        );
        // The host's name is the domain (chatmail's myhostname): the loop check would fire.
        assert_eq!(
            choose_helo("chat.example.org", "old", "Chat.Example.org."),
            "relaymove-old.chat.example.org"
        );
        // No FQDN, or one with characters a HELO name cannot have.
        assert_eq!(choose_helo("old", "old", "d.org"), "relaymove-old.d.org");
        assert_eq!(choose_helo("a b.c", "new", "d.org"), "relaymove-new.d.org");
    }

    #[test]
    fn nexthops_are_bracketed_addresses() {
        assert_eq!(nexthop("192.0.2.7".parse().unwrap()), "[192.0.2.7]");
        assert_eq!(
            nexthop("2001:db8::7".parse().unwrap()),
            "[ipv6:2001:db8::7]"
        );
    }

    #[test]
    fn postqueue_json_lines_are_read() {
        let text = r#"{"queue_name": "deferred", "queue_id": "4F1A2", "arrival_time": 1, "message_size": 9, "forced_expire": false, "sender": "a@b", "recipients": [{"address": "x@d.org", "delay_reason": "deferred transport"}]}
{"queue_name": "hold", "queue_id": "5B", "arrival_time": 1, "message_size": 9, "forced_expire": false, "sender": "", "recipients": [{"address": "y@d.org"}]}
"#;
        let q = parse_queue(text).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[0].queue_id, "4F1A2");
        assert_eq!(q[1].queue_name, "hold");
        assert!(parse_queue("not json").is_err());
        assert!(parse_queue("").unwrap().is_empty());
    }

    #[test]
    fn every_mode_the_script_records_is_known() {
        for m in ["normal", "freeze", "forward"] {
            assert!(Mode::parse(m).is_some(), "{m}");
            assert!(SCRIPT.contains(&format!("echo {m}")), "{m}");
        }
        assert_eq!(Mode::parse("garbage"), None);
    }
}
