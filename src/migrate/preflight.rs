//! Preflight: everything that can be known before the move changes anything, listed at once
//! (not first-error-only), each finding with its fix. Any failure stops the migration
//! before its first change.

use crate::dns::change::StagingState;
use crate::migrate::trees::present_trees;
use crate::migrate::{now_unix, Cx, Node, StepId};
use crate::report::events::Event;
use crate::report::finding::{Finding, Level};
use crate::report::size;
use anyhow::{bail, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// More than this between two clocks breaks TSIG (RFC 8945 fudge is 300 s) and the journal's
/// times.
const MAX_SKEW: i64 = 300;
/// A certificate that expires sooner is renewed by acmetool on new, against old's address.
const CERT_DAYS: u64 = 30;

/// Prints `key=value` lines about the host: OS, root, clock, package versions, units.
const FACTS: &str = r#"
. /etc/os-release 2>/dev/null
printf 'os_id=%s\nos_version=%s\nos_name=%s\nuid=%s\nnow=%s\n' "$ID" "$VERSION_ID" "$PRETTY_NAME" "$(id -u)" "$(date +%s)"
for p in postfix dovecot-core opendkim; do printf 'pkg.%s=%s\n' "$p" "$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null)"; done
for u in "$@"; do printf 'unit.%s=%s\n' "$u" "$(systemctl show -P LoadState "$u" 2>/dev/null)"; done
"#;

/// Prints `path<TAB>bytes<TAB>inodes` of each existing directory argument.
const SIZES: &str = r#"
for t in "$@"; do
  if [ -d "$t" ]; then printf '%s\t%s\t%s\n' "$t" "$(du -sB1 "$t" | cut -f1)" "$(du -s --inodes "$t" | cut -f1)"; fi
done
"#;

/// Prints `path<TAB>avail-bytes avail-inodes mountpoint` for the file system each argument
/// would land on (its nearest existing ancestor).
const FREE: &str = r#"
for t in "$@"; do
  d=$t; while [ ! -d "$d" ]; do d=$(dirname "$d"); done
  printf '%s\t%s\n' "$t" "$(df -B1 --output=avail,iavail,target "$d" | tail -n 1)"
done
"#;

async fn facts(node: &Node, units: &[&str]) -> Result<BTreeMap<String, String>> {
    let mut argv = vec!["sh", "-c", FACTS, "sh"];
    argv.extend_from_slice(units);
    let text = node.run(&argv).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// `major.minor` of a Debian package version (`1:2.3.19.1+dfsg1-2.1` → `2.3`).
fn major_minor(version: &str) -> Option<String> {
    let upstream = version.split_once(':').map(|(_, v)| v).unwrap_or(version);
    let mut parts = upstream.split(['.', '-', '+', '~']);
    Some(format!("{}.{}", parts.next()?, parts.next()?))
}

/// `path → (bytes, inodes)` of each existing directory of `paths` on `node`.
async fn sizes(node: &Node, paths: &[String]) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut argv = vec!["sh", "-c", SIZES, "sh"];
    argv.extend(paths.iter().map(String::as_str));
    let text = node.run(&argv).await?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut it = l.split('\t');
            let path = it.next()?.to_string();
            let bytes = it.next()?.parse::<u64>().ok()?;
            let inodes = it.next()?.parse::<u64>().ok()?;
            Some((path, (bytes, inodes)))
        })
        .collect())
}

/// Runs every check; returns the findings and what was measured (for `plan`).
pub async fn check(cx: &mut Cx) -> Result<(Vec<Finding>, Value)> {
    let mut f = Vec::new();
    let units: Vec<&str> = cx.profile.units();
    let (old, new) = (facts(&cx.old, &units).await?, facts(&cx.new, &units).await?);
    let domain = cx.config.domain.trim_end_matches('.');

    for (node, facts) in [(&cx.old, &old), (&cx.new, &new)] {
        let name = node.label();
        let get = |k: &str| facts.get(k).map(String::as_str).unwrap_or("");
        if get("uid") == "0" {
            f.push(Finding::ok(
                "root",
                format!("{name}: reachable over SSH as root, host key verified"),
            ));
        } else {
            f.push(Finding::fail(
                "root",
                format!("{name}: logged in as uid {}, not root", get("uid")),
                "set ssh = \"root@HOST\" in [hosts] (relaymove stops services and writes system trees)",
            ));
        }
        if get("os_id") == "debian" {
            f.push(Finding::ok("system", format!("{name}: {}", get("os_name"))));
        } else {
            f.push(Finding::fail(
                "system",
                format!(
                    "{name}: {} is not Debian",
                    if get("os_name").is_empty() {
                        "the system"
                    } else {
                        get("os_name")
                    }
                ),
                "relaymove moves Debian mail servers; both hosts must run Debian",
            ));
        }
        let clock: i64 = get("now").parse().unwrap_or(0);
        let skew = clock - now_unix() as i64;
        if skew.abs() > MAX_SKEW {
            f.push(Finding::fail(
                "clock",
                format!("{name}: clock is {skew}s off this machine's"),
                "set up NTP (systemd-timesyncd) on both hosts and here: TSIG updates and the journal need clocks within 5 min",
            ));
        }
        for unit in &units {
            if get(&format!("unit.{unit}")) != "loaded" {
                f.push(Finding::fail(
                    "units",
                    format!("{name}: {unit}.service is not installed"),
                    "install and configure the mail packages on new first (for chatmail: CMDEPLOY_STAGES=install,configure cmdeploy run --ssh-host NEW)",
                ));
            }
        }
    }
    for pkg in ["dovecot-core", "postfix"] {
        let (o, n) = (
            old.get(&format!("pkg.{pkg}")).cloned().unwrap_or_default(),
            new.get(&format!("pkg.{pkg}")).cloned().unwrap_or_default(),
        );
        match (major_minor(&o), major_minor(&n)) {
            (Some(a), Some(b)) if pkg == "dovecot-core" && a.starts_with("2.3") && b.starts_with("2.4") => f.push(Finding::fail(
                "versions",
                format!("Dovecot {a} on old, {b} on new: 2.4 does not read 2.3's configuration (and dropped the dict passdb chatmail uses)"),
                "install new with the Debian release old runs (Debian 12 for chatmail), or translate the Dovecot configuration first",
            )),
            (Some(a), Some(b)) => f.push(Finding::ok("versions", format!("{pkg} {a} on old, {b} on new"))),
            (None, _) => f.push(Finding::fail("versions", format!("{pkg} is not installed on old"), "is old the mail server? check [hosts.old]")),
            (_, None) => f.push(Finding::fail("versions", format!("{pkg} is not installed on new"), "install and configure the mail packages on new first")),
        }
    }
    if domain.parse::<std::net::IpAddr>().is_ok() || domain.starts_with('[') {
        f.push(Finding::fail(
            "domain",
            format!("{domain} is an address: the accounts are user@[IP], and that address cannot move to another host"),
            "an IP-only relay cannot be moved; set up the new relay under a domain name",
        ));
    }

    // Trees, their sizes on old, and room for them on new.
    let trees = match present_trees(cx).await {
        Ok(t) => t,
        Err(e) => {
            f.push(Finding::fail(
                "trees",
                format!("{e:#}"),
                "fix the profile or [migrate] in the config",
            ));
            Vec::new()
        }
    };
    let paths: Vec<String> = trees
        .iter()
        .map(|t| t.path.to_string_lossy().into_owned())
        .chain([cx.profile.hold_queue.to_string_lossy().into_owned()])
        .collect();
    let (old_sizes, new_sizes) = (sizes(&cx.old, &paths).await?, sizes(&cx.new, &paths).await?);
    let mut argv = vec!["sh", "-c", FREE, "sh"];
    argv.extend(paths.iter().map(String::as_str));
    let free_text = cx.new.run(&argv).await?;
    // Per file system on new: what the trees still need there, and what it has.
    let mut need: BTreeMap<String, (u64, u64, u64, u64)> = BTreeMap::new();
    for line in free_text.lines() {
        let Some((path, rest)) = line.split_once('\t') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let [avail, iavail, target] = fields[..] else {
            continue;
        };
        let (ob, oi) = old_sizes.get(path).copied().unwrap_or_default();
        let (nb, ni) = new_sizes.get(path).copied().unwrap_or_default();
        let e = need.entry(target.to_string()).or_default();
        e.0 += ob.saturating_sub(nb);
        e.1 += oi.saturating_sub(ni);
        e.2 = avail.parse().unwrap_or(0);
        e.3 = iavail.parse().unwrap_or(0);
    }
    for (fs, (bytes, inodes, avail, iavail)) in &need {
        // 10% and 256 MiB of margin: logs, the queue growing, Dovecot's indexes.
        let want = bytes + bytes / 10 + (256 << 20);
        if avail < &want || iavail < &(inodes + inodes / 10) {
            f.push(Finding::fail(
                "space",
                format!(
                    "new's {fs} has {} and {iavail} inodes free; the move needs {} and {inodes} inodes more (with margin)",
                    size(*avail),
                    size(want)
                ),
                "grow the file system on new, or free space there",
            ));
        } else {
            f.push(Finding::ok(
                "space",
                format!(
                    "new's {fs}: {} free, {} to copy",
                    size(*avail),
                    size(*bytes)
                ),
            ));
        }
    }

    // Old forwards with an inline: transport map from forward_old on (Postfix 3.0 and later).
    let maps = cx.old.run(&["postconf", "-m"]).await?;
    if maps.lines().any(|m| m.trim() == "inline") {
        f.push(Finding::ok(
            "forwarding",
            "old's Postfix has inline: maps: it can hold mail during the freeze and forward it to new".to_string(),
        ));
    } else {
        f.push(Finding::fail(
            "forwarding",
            "old's Postfix has no inline: map type (`postconf -m`): it cannot forward to new after the cutover".to_string(),
            "upgrade Postfix on old to 3.0 or later",
        ));
    }

    // New must not already be a live mail server: the final pass would replace its mail.
    let serving = crate::migrate::services::units_stopped(&cx.new, &cx.profile).await?;
    let new_ip = cx.config.hosts.new.addresses().first().copied();
    let open = match new_ip {
        Some(ip) => crate::migrate::services::open_ports(ip, cx.profile.ports).await,
        None => Vec::new(),
    };
    if serving.is_some() && open.contains(&25) {
        f.push(Finding::fail(
            "new",
            format!("new already serves mail: {} and port 25 answers", serving.unwrap_or_default()),
            "relaymove will not overwrite a live mail server; if new is a fresh install, stop it: systemctl disable --now postfix dovecot opendkim",
        ));
    } else {
        f.push(Finding::ok(
            "new",
            match serving {
                Some(s) => format!("{s} (stock config, port 25 closed); prepare_new stops it"),
                None => "no mail daemon runs on new".into(),
            },
        ));
    }

    // Certificate lifetime on old.
    if let Some(cert) = &cx.profile.certificate {
        let cert = cert.to_string_lossy().into_owned();
        if cx.old.test(&["test", "-e", &cert]).await? {
            let secs = (CERT_DAYS * 86400).to_string();
            if cx
                .old
                .test(&[
                    "openssl",
                    "x509",
                    "-checkend",
                    &secs,
                    "-noout",
                    "-in",
                    &cert,
                ])
                .await?
            {
                f.push(Finding::ok(
                    "certificate",
                    format!("{cert} on old is valid for more than {CERT_DAYS} days"),
                ));
            } else {
                f.push(Finding::warn(
                    "certificate",
                    format!("{cert} on old expires within {CERT_DAYS} days: acmetool on new would renew it against old's address"),
                    "renew on old first (acmetool --batch reconcile), then move",
                ));
            }
        } else {
            f.push(Finding::warn(
                "certificate",
                format!("no {cert} on old"),
                "a self-signed or external certificate must be copied by [migrate] extra_trees",
            ));
        }
    }

    // DNS: TTL staging, SPF and PTR of new's addresses.
    match StagingState::load(&cx.config.state_path())? {
        None => f.push(Finding::warn(
            "ttl",
            format!("the TTL of {domain} was not lowered: migrate stops before taking mail down"),
            "run `relaymove dns lower-ttl` now; the cutover is safe after the old TTL has run out",
        )),
        Some(s) => {
            let at = s.safe_cutover_at();
            if at <= now_unix() {
                f.push(Finding::ok(
                    "ttl",
                    format!(
                        "TTL {}s served everywhere; the cutover is safe now",
                        s.low_ttl
                    ),
                ));
            } else {
                f.push(Finding::warn(
                    "ttl",
                    format!("the cutover is safe from {} (in {}s); migrate waits for it before taking mail down", crate::commands::dns::utc(at), at - now_unix()),
                    "start the presync now; nothing goes down before then",
                ));
            }
        }
    }
    let names = crate::dns::status::Names::of(&cx.config)?;
    match crate::dns::checks::run(&cx.config, &names).await {
        Ok(found) => {
            for finding in found
                .into_iter()
                .filter(|x| x.check.starts_with("SPF") || x.check.starts_with("PTR"))
            {
                // Receivers' opinions, not the move's correctness: never a reason to stop.
                let level = finding.level.min(Level::Warn);
                f.push(Finding { level, ..finding });
            }
        }
        Err(e) => f.push(Finding::warn(
            "dns",
            format!("{e:#}"),
            "check [dns] resolver",
        )),
    }
    let measured = json!({
        "trees": trees.iter().map(|t| json!({
            "path": t.path, "why": t.why,
            "bytes": old_sizes.get(&*t.path.to_string_lossy()).map(|s| s.0),
            "inodes": old_sizes.get(&*t.path.to_string_lossy()).map(|s| s.1),
        })).collect::<Vec<_>>(),
    });
    Ok((f, measured))
}

pub async fn apply(cx: &mut Cx) -> Result<Value> {
    let (findings, measured) = check(cx).await?;
    for finding in &findings {
        cx.out.emit(Event::Finding {
            step: StepId::Preflight.id(),
            finding,
        });
    }
    let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
    if failed > 0 {
        bail!("{failed} preflight check(s) failed (listed above); nothing was changed");
    }
    let warnings = findings.iter().filter(|f| f.level == Level::Warn).count();
    Ok(json!({
        "summary": format!("{} checks, {warnings} warnings", findings.len()),
        "measured": measured,
        "findings": findings,
    }))
}

#[cfg(test)]
mod tests {
    use super::major_minor;

    #[test]
    fn versions_compare_by_upstream_major_minor() {
        assert_eq!(
            major_minor("1:2.3.19.1+dfsg1-2.1+deb12u1").as_deref(),
            Some("2.3")
        );
        assert_eq!(major_minor("2.4.1+dfsg1-6").as_deref(), Some("2.4"));
        assert_eq!(major_minor("3.7.11-0+deb12u1").as_deref(), Some("3.7"));
        assert_eq!(major_minor(""), None);
    }
}
