//! What still reaches old while it forwards: the split-delivery watch of the DNS playbook
//! (seeds/003). Every message Postfix's smtpd accepts is logged as `QUEUEID: client=NAME[IP]`;
//! counted per sending host from old's journal since forwarding began. Mail old hands to
//! itself (content filters reinjecting from loopback) is not a sender and is left out.

use crate::migrate::Node;
use anyhow::{Context, Result};
use std::collections::BTreeMap;

/// Messages one sending host delivered to old.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    /// `name[address]` as Postfix logs it.
    pub client: String,
    pub messages: usize,
    /// Unix time of the last one.
    pub last: u64,
}

/// Sending hosts that delivered to `node` since Unix time `since`, from the journal of
/// Postfix's `unit`, busiest first.
pub async fn since(node: &Node, unit: &str, since: u64) -> Result<Vec<Arrival>> {
    let log = node
        .run(&[
            "journalctl",
            "--unit",
            unit,
            "--since",
            &format!("@{since}"),
            "--output",
            "short-unix",
            "--no-pager",
            "--quiet",
        ])
        .await
        .with_context(|| format!("reading Postfix's log on {}", node.role))?;
    Ok(count(&log))
}

fn count(log: &str) -> Vec<Arrival> {
    let mut by: BTreeMap<String, Arrival> = BTreeMap::new();
    for line in log.lines() {
        let Some((_, rest)) = line.split_once(": client=") else {
            continue;
        };
        // Only smtpd logs `client=` after a queue id; cleanup and qmgr do not.
        if !line.contains("/smtpd[") {
            continue;
        }
        let client = rest.split(',').next().unwrap_or_default().trim();
        if client.ends_with("[127.0.0.1]") || client.ends_with("[::1]") {
            continue;
        }
        let at = line
            .split_whitespace()
            .next()
            .and_then(|t| t.parse::<f64>().ok())
            .map(|t| t as u64)
            .unwrap_or(0);
        let entry = by.entry(client.to_string()).or_insert(Arrival {
            client: client.to_string(),
            messages: 0,
            last: 0,
        });
        entry.messages += 1;
        entry.last = entry.last.max(at);
    }
    let mut out: Vec<Arrival> = by.into_values().collect();
    out.sort_by(|a, b| b.messages.cmp(&a.messages).then(a.client.cmp(&b.client)));
    out
}

/// One line: how much came, from whom, and when the last message did.
pub fn describe(arrivals: &[Arrival]) -> String {
    if arrivals.is_empty() {
        return "no sender delivered to old since it began forwarding".into();
    }
    let total: usize = arrivals.iter().map(|a| a.messages).sum();
    let last = arrivals.iter().map(|a| a.last).max().unwrap_or(0);
    let hosts: Vec<String> = arrivals
        .iter()
        .take(5)
        .map(|a| format!("{} ({})", a.client, a.messages))
        .collect();
    format!(
        "old accepted {total} message(s) since it began forwarding, from {}{}; the last at {}",
        hosts.join(", "),
        if arrivals.len() > 5 {
            format!(" and {} more hosts", arrivals.len() - 5)
        } else {
            String::new()
        },
        crate::commands::dns::utc(last)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_messages_are_counted_per_sending_host() {
        let log = "\
1733300000.100000 old postfix/smtpd[901]: connect from sender.lab[10.77.0.5]
1733300000.200000 old postfix/smtpd[901]: 4F1A2: client=sender.lab[10.77.0.5]
1733300000.300000 old postfix/cleanup[902]: 4F1A2: message-id=<1@x>
1733300003.900000 old postfix/smtpd[901]: 5B7C1: client=sender.lab[10.77.0.5]
1733300002.000000 old postfix/submission/smtpd[950]: 6A: client=laptop[192.0.2.9], sasl_method=PLAIN, sasl_username=a@d
1733300004.000000 old postfix/smtpd[960]: 7C: client=localhost[127.0.0.1]
1733300005.000000 old postfix/relaymove-forward/smtp[970]: 4F1A2: to=<a@d>, relay=10.77.0.3[10.77.0.3]:25, status=sent
";
        let got = count(log);
        assert_eq!(
            got,
            [
                Arrival {
                    client: "sender.lab[10.77.0.5]".into(),
                    messages: 2,
                    last: 1733300003
                },
                Arrival {
                    client: "laptop[192.0.2.9]".into(),
                    messages: 1,
                    last: 1733300002
                },
            ]
        );
        let line = describe(&got);
        assert!(line.starts_with("old accepted 3 message(s)"), "{line}");
        assert!(line.contains("sender.lab[10.77.0.5] (2)"), "{line}");
        assert!(describe(&[]).starts_with("no sender"));
    }
}
