//! Changing the mail domain's addresses and TTLs: the cutover, its rollback, and TTL
//! staging before it. Each change is planned from what the zone holds, applied through the
//! configured provider in one atomic step, then confirmed at every authoritative server.

use crate::config::{read_tsig_secret, Config, Provider, TsigAlgorithm};
use crate::dns::server::{parse_server, Server};
use crate::dns::status::{authoritative, rr_of, rrset, Names};
use crate::dns::update::{update_message, RrsetChange};
use anyhow::{anyhow, bail, Context, Result};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::tsig::TsigAlgorithm as HickoryTsig;
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType, TSigner};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where progress and the manual provider's instructions go: the caller decides (stderr
/// lines, or events).
pub type Say<'a> = &'a (dyn Fn(&str) + Sync);

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The server changes are read from and, for rfc2136, sent to.
pub fn primary(config: &Config, authorities: &[SocketAddr]) -> Result<SocketAddr> {
    match (&config.dns.server, authorities.first()) {
        (Some(s), _) => parse_server(s),
        (None, Some(a)) => Ok(*a),
        (None, None) => bail!("no authoritative server known for zone {}", config.dns.zone),
    }
}

/// The RRset at (name, type) as the primary holds it. A CNAME there is an error: the
/// addresses of a CNAME's owner cannot be swapped.
pub async fn current(server: &Server, names: &Names, rtype: RecordType) -> Result<Vec<Record>> {
    let answer = server.query(&names.domain, rtype).await?;
    authoritative(&answer, &server.addr, &names.domain)?;
    if let Some(cname) = rrset(&answer, &names.domain, RecordType::CNAME).first() {
        bail!(
            "{} is a CNAME to {} on {}: it cannot have its own addresses; point the CNAME's target instead, or replace the CNAME by A/AAAA records",
            names.domain,
            cname.data,
            server.addr
        );
    }
    Ok(rrset(&answer, &names.domain, rtype))
}

fn record(name: &Name, ttl: u32, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), ttl, data)
}

fn values(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| r.data.to_string()).collect()
}

/// Plans replacing `from` by `to` in the (domain, rtype) RRset, keeping other values and
/// the TTL. `None` when the zone already holds the result.
pub fn plan_swap(
    name: &Name,
    rtype: RecordType,
    current: Vec<Record>,
    from: Option<IpAddr>,
    to: Option<IpAddr>,
    new_ttl: u32,
) -> Result<Option<RrsetChange>> {
    let has = |ip: IpAddr| {
        current
            .iter()
            .any(|r| crate::dns::status::address(&r.data) == Some(ip))
    };
    let ttl = current.first().map(|r| r.ttl).unwrap_or(new_ttl);
    let done = match (from, to) {
        (Some(f), Some(t)) => !has(f) && has(t),
        (None, Some(t)) => has(t),
        (Some(f), None) => !has(f),
        (None, None) => true,
    };
    if done {
        return Ok(None);
    }
    if let Some(f) = from {
        if !has(f) {
            bail!(
                "{rtype} {name} holds [{}], not the expected {f}; nothing changed\nhint: check [hosts] in the config against the zone",
                values(&current).join(", ")
            );
        }
    } else if !current.is_empty() {
        bail!(
            "{rtype} {name} holds [{}] but the config gives no {rtype} address to replace; nothing changed",
            values(&current).join(", ")
        );
    }
    let mut desired: Vec<Record> = current
        .iter()
        .filter(|r| crate::dns::status::address(&r.data) != from)
        .map(|r| {
            record(
                name,
                ttl,
                crate::dns::status::address(&r.data).unwrap_or(IpAddr::from([0, 0, 0, 0])),
            )
        })
        .collect();
    if let Some(t) = to {
        desired.push(record(name, ttl, t));
    }
    Ok(Some(RrsetChange {
        name: name.clone(),
        rtype,
        current,
        desired,
    }))
}

fn tsig_signer(config: &Config) -> Result<TSigner> {
    let dns = &config.dns;
    let (Some(key), Some(file)) = (&dns.tsig_key, &dns.tsig_secret_file) else {
        bail!("[dns] tsig_key and tsig_secret_file are required with provider = \"rfc2136\"");
    };
    let secret = read_tsig_secret(file)?;
    let algorithm = match dns.tsig_algorithm {
        TsigAlgorithm::HmacSha256 => HickoryTsig::HmacSha256,
        TsigAlgorithm::HmacSha512 => HickoryTsig::HmacSha512,
    };
    let name = crate::dns::status::fqdn(key)?;
    // Fudge 300 s: the clock skew RFC 8945 §5.2.3 suggests servers accept.
    TSigner::new(secret, algorithm, name, 300).map_err(|e| anyhow!("TSIG key {key}: {e}"))
}

/// Applies `changes` through the configured provider. `action` names it for people and for
/// the command provider's environment.
pub async fn apply(
    config: &Config,
    names: &Names,
    primary: SocketAddr,
    changes: &[RrsetChange],
    action: &str,
    say: Say<'_>,
) -> Result<()> {
    match config.dns.provider {
        Provider::Rfc2136 => {
            let server = Server::new(primary, Some(tsig_signer(config)?));
            let rcode = match server.update(update_message(&names.zone, changes)).await {
                Ok(rcode) => rcode,
                // A server that cannot verify our signature answers unsigned or with an empty
                // MAC (RFC 8945 §5.2), which the client rejects before we see the NOTAUTH.
                Err(e)
                    if format!("{e:#}").contains("HMAC") || format!("{e:#}").contains("TSIG") =>
                {
                    ResponseCode::NotAuth
                }
                Err(e) => return Err(e),
            };
            match rcode {
                ResponseCode::NoError => Ok(()),
                ResponseCode::NXRRSet | ResponseCode::YXRRSet | ResponseCode::YXDomain | ResponseCode::NXDomain => {
                    let plain = Server::new(primary, None);
                    let mut holds = Vec::new();
                    for c in changes {
                        let now = current(&plain, names, c.rtype).await.unwrap_or_default();
                        holds.push(format!("{} {} = [{}]", c.rtype, c.name, values(&now).join(", ")));
                    }
                    bail!(
                        "the zone changed underneath ({rcode} from {primary}): it now holds {}; nothing changed\nhint: run `relaymove dns status` and try again",
                        holds.join("; ")
                    )
                }
                ResponseCode::NotAuth => bail!(
                    "{primary} rejected the TSIG signature of the update (NOTAUTH): wrong key name or secret, or the clocks differ by more than 5 minutes; nothing changed"
                ),
                ResponseCode::Refused => bail!(
                    "{primary} refused the update (REFUSED): is key {} allowed to update zone {}?; nothing changed",
                    config.dns.tsig_key.as_deref().unwrap_or("?"),
                    names.zone
                ),
                ResponseCode::NotZone => bail!("{primary} does not serve zone {} (NOTZONE); nothing changed", names.zone),
                other => bail!("{primary} answered {other} to the update; nothing changed"),
            }
        }
        Provider::Manual => {
            say(&format!(
                "{action}: set these records in zone {} at your DNS provider:",
                names.zone
            ));
            for c in changes {
                let current: Vec<String> = c.current.iter().map(zone_line).collect();
                say(&format!(
                    "  delete: {}",
                    if current.is_empty() {
                        "(nothing)".to_string()
                    } else {
                        current.join("; ")
                    }
                ));
                for r in &c.desired {
                    say(&format!("  set:    {}", zone_line(r)));
                }
            }
            say("waiting until every authoritative server serves them (Ctrl-C to stop)");
            Ok(())
        }
        Provider::Command => {
            let argv = config.dns.command.clone().unwrap_or_default();
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| anyhow!("[dns] command is empty"))?;
            let mut cmd = tokio::process::Command::new(program);
            // Its stdout goes to our stderr: with --json our stdout is for the report only.
            cmd.args(args)
                .stdout(std::io::stderr())
                .env("RELAYMOVE_ACTION", action)
                .env("RELAYMOVE_ZONE", names.zone.to_ascii())
                .env("RELAYMOVE_NAME", names.domain.to_ascii());
            for c in changes {
                let t = c.rtype.to_string();
                cmd.env(format!("RELAYMOVE_{t}_OLD"), values(&c.current).join(" "))
                    .env(format!("RELAYMOVE_{t}_NEW"), values(&c.desired).join(" "))
                    .env(
                        format!("RELAYMOVE_{t}_TTL"),
                        c.desired
                            .first()
                            .or(c.current.first())
                            .map(|r| r.ttl)
                            .unwrap_or(config.dns.low_ttl)
                            .to_string(),
                    );
            }
            let status = cmd
                .status()
                .await
                .with_context(|| format!("running {program}"))?;
            if !status.success() {
                bail!("{program} failed ({status}); check its output above. The change may be partly applied: run `relaymove dns status`");
            }
            Ok(())
        }
    }
}

fn zone_line(r: &Record) -> String {
    let rr = rr_of(r);
    // For people: a record value could carry terminal escapes.
    crate::report::printable(&format!(
        "{} {} IN {} {}",
        rr.name, rr.ttl, rr.rtype, rr.value
    ))
}

/// Polls every authoritative server until each serves `changes`' desired RRsets (values and
/// TTL), or the configured wait runs out. Reports laggards as it goes.
pub async fn wait_for(
    config: &Config,
    authorities: &[SocketAddr],
    changes: &[RrsetChange],
    say: Say<'_>,
) -> Result<Duration> {
    let start = Instant::now();
    let limit = Duration::from_secs(config.dns.wait_seconds);
    let servers: Vec<Server> = authorities.iter().map(|a| Server::new(*a, None)).collect();
    // Quiet for the first seconds: a secondary usually catches up within one NOTIFY.
    let mut last_report = Instant::now();
    loop {
        let mut lagging = Vec::new();
        for server in &servers {
            for c in changes {
                let got = match server.query(&c.name, c.rtype).await {
                    Ok(answer) => rrset(&answer, &c.name, c.rtype),
                    Err(e) => {
                        lagging.push(format!("{e:#}"));
                        continue;
                    }
                };
                let key = |rs: &[Record]| {
                    let mut v: Vec<(u32, String)> =
                        rs.iter().map(|r| (r.ttl, r.data.to_string())).collect();
                    v.sort();
                    v
                };
                if key(&got) != key(&c.desired) {
                    lagging.push(format!(
                        "{} still serves {} {} [{}]",
                        server.addr,
                        c.rtype,
                        c.name,
                        values(&got).join(", ")
                    ));
                }
            }
        }
        if lagging.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            bail!(
                "after {}s not every authoritative server serves the change: {}\nhint: a secondary that does not transfer the zone (NOTIFY, ACL, TSIG for AXFR) needs fixing; the primary already has the change",
                limit.as_secs(),
                lagging.join("; ")
            );
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            say(&format!(
                "waiting for {} ({}s so far)",
                lagging.join("; "),
                start.elapsed().as_secs()
            ));
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Which way the mail domain's addresses move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the old host's addresses to the new host's.
    Cutover,
    /// Back from the new host's addresses to the old host's.
    Rollback,
}

impl Direction {
    pub fn action(self) -> &'static str {
        match self {
            Direction::Cutover => "cutover",
            Direction::Rollback => "rollback",
        }
    }
}

/// A switch that was applied and is served by every authoritative server.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Switched {
    pub changed: Vec<String>,
    /// Seconds until every authoritative server served the change.
    pub propagation_s: f64,
    /// Until when resolvers may still hand out the previous answer (Unix seconds).
    pub old_answers_until: Option<u64>,
}

/// How many RRsets `switch` would change (0: the zone already points where `direction`
/// leads). Changes nothing.
pub async fn pending(config: &Config, direction: Direction) -> Result<usize> {
    Ok(plan_switch(config, direction).await?.3.len())
}

/// The changes `switch` would make, one line each (`describe`). Changes nothing.
pub async fn plan_changes(config: &Config, direction: Direction) -> Result<Vec<String>> {
    Ok(describe(&plan_switch(config, direction).await?.3))
}

/// The RRset changes that move the domain's A/AAAA in `direction`, read from the primary.
async fn plan_switch(
    config: &Config,
    direction: Direction,
) -> Result<(Names, Vec<SocketAddr>, SocketAddr, Vec<RrsetChange>)> {
    let names = Names::of(config)?;
    let authorities = crate::dns::status::authorities(config, &names).await?;
    let primary = primary(config, &authorities)?;
    let server = Server::new(primary, None);
    let (from, to) = match direction {
        Direction::Cutover => (&config.hosts.old, &config.hosts.new),
        Direction::Rollback => (&config.hosts.new, &config.hosts.old),
    };
    let mut changes = Vec::new();
    for (rtype, f, t) in [
        (
            RecordType::A,
            from.ipv4.map(IpAddr::V4),
            to.ipv4.map(IpAddr::V4),
        ),
        (
            RecordType::AAAA,
            from.ipv6.map(IpAddr::V6),
            to.ipv6.map(IpAddr::V6),
        ),
    ] {
        let now = current(&server, &names, rtype).await?;
        if let Some(c) = plan_swap(&names.domain, rtype, now, f, t, config.dns.low_ttl)? {
            changes.push(c);
        }
    }
    Ok((names, authorities, primary, changes))
}

/// Swaps the domain's A/AAAA between the hosts' addresses (compare-and-swap at the
/// primary), then waits until every authoritative server serves the result. `None` when
/// the zone already points where `direction` leads.
pub async fn switch(
    config: &Config,
    direction: Direction,
    say: Say<'_>,
) -> Result<Option<Switched>> {
    let (names, authorities, primary, changes) = plan_switch(config, direction).await?;
    if changes.is_empty() {
        return Ok(None);
    }
    // Resolvers hold the replaced records for their TTL; where the switch adds a type the
    // domain had none of (an AAAA only new has), they hold the "no such record" answer for
    // the zone's negative-cache time (RFC 2308) and keep going to the old address meanwhile.
    let negative_ttl = if changes.iter().any(|c| c.current.is_empty()) {
        crate::dns::status::view(primary, &names).await.negative_ttl
    } else {
        None
    };
    let old_ttl = changes
        .iter()
        .flat_map(|c| c.current.iter().map(|r| r.ttl))
        .chain(negative_ttl)
        .max();
    apply(config, &names, primary, &changes, direction.action(), say).await?;
    let applied = now_unix();
    let took = wait_for(config, &authorities, &changes, say).await?;
    Ok(Some(Switched {
        changed: describe(&changes),
        propagation_s: took.as_secs_f64(),
        old_answers_until: old_ttl.map(|t| applied + u64::from(t)),
    }))
}

/// One line per RRset change: `A name: [before] → [after]`.
pub fn describe(changes: &[RrsetChange]) -> Vec<String> {
    changes
        .iter()
        .map(|c| {
            let v = |rs: &[hickory_proto::rr::Record]| {
                rs.iter()
                    .map(|r| format!("{} (TTL {})", r.data, r.ttl))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "{} {}: [{}] → [{}]",
                c.rtype,
                c.name,
                v(&c.current),
                v(&c.desired)
            )
        })
        .collect()
}

/// What TTL staging recorded, kept beside the config.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct StagingState {
    /// TTL each record type had before `lower-ttl`.
    pub previous_ttl: BTreeMap<String, u32>,
    pub low_ttl: u32,
    /// When every authoritative server served the low TTL (Unix seconds).
    pub served_everywhere_at: u64,
}

/// Margin after the old TTL has run out, for resolvers that fetched just before.
pub const SAFETY_MARGIN: u64 = 60;

impl StagingState {
    pub fn load(path: &std::path::Path) -> Result<Option<StagingState>> {
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("reading {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// The earliest moment the cutover is safe: every resolver that cached a record with its
    /// old TTL has let it expire (old TTL after the low TTL was served everywhere, plus a
    /// margin).
    pub fn safe_cutover_at(&self) -> u64 {
        let longest = self.previous_ttl.values().copied().max().unwrap_or(0) as u64;
        self.served_everywhere_at + longest + SAFETY_MARGIN
    }
}

/// Plans setting the TTL of the domain's A and AAAA RRsets to `ttl` (values unchanged).
pub async fn plan_ttl(
    primary: &Server,
    names: &Names,
    ttl: u32,
) -> Result<(Vec<RrsetChange>, BTreeMap<String, u32>)> {
    let mut changes = Vec::new();
    let mut previous = BTreeMap::new();
    for rtype in [RecordType::A, RecordType::AAAA] {
        let now = current(primary, names, rtype).await?;
        let Some(first) = now.first() else { continue };
        previous.insert(rtype.to_string(), first.ttl);
        let desired: Vec<Record> = now
            .iter()
            .map(|r| {
                let mut d = r.clone();
                d.ttl = ttl;
                d
            })
            .collect();
        let change = RrsetChange {
            name: names.domain.clone(),
            rtype,
            current: now,
            desired,
        };
        if !change.is_noop() {
            changes.push(change);
        }
    }
    Ok((changes, previous))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn name() -> Name {
        Name::from_str("mail.example.org.").unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_safe_time_is_the_old_ttl_plus_a_margin_after_the_low_ttl_was_everywhere() {
        let state = StagingState {
            previous_ttl: [("A".to_string(), 3600), ("AAAA".to_string(), 86400)].into(),
            low_ttl: 300,
            served_everywhere_at: 1_000_000,
        };
        assert_eq!(state.safe_cutover_at(), 1_000_000 + 86400 + SAFETY_MARGIN);
    }

    #[test]
    fn swap_keeps_other_values_and_the_ttl() {
        let current = vec![
            record(&name(), 3600, ip("198.51.100.10")),
            record(&name(), 3600, ip("198.51.100.99")),
        ];
        let c = plan_swap(
            &name(),
            RecordType::A,
            current,
            Some(ip("198.51.100.10")),
            Some(ip("198.51.100.20")),
            300,
        )
        .unwrap()
        .unwrap();
        let mut got = values(&c.desired);
        got.sort();
        assert_eq!(got, vec!["198.51.100.20", "198.51.100.99"]);
        assert!(c.desired.iter().all(|r| r.ttl == 3600));
    }

    #[test]
    fn swap_refuses_a_zone_that_holds_something_else_and_skips_a_done_one() {
        let other = vec![record(&name(), 300, ip("203.0.113.5"))];
        let err = plan_swap(
            &name(),
            RecordType::A,
            other,
            Some(ip("198.51.100.10")),
            Some(ip("198.51.100.20")),
            300,
        )
        .unwrap_err();
        assert!(err.to_string().contains("203.0.113.5"), "{err}");
        let done = vec![record(&name(), 300, ip("198.51.100.20"))];
        assert!(plan_swap(
            &name(),
            RecordType::A,
            done,
            Some(ip("198.51.100.10")),
            Some(ip("198.51.100.20")),
            300
        )
        .unwrap()
        .is_none());
    }

    #[test]
    fn adding_aaaa_uses_the_low_ttl() {
        let c = plan_swap(
            &name(),
            RecordType::AAAA,
            vec![],
            None,
            Some(ip("2001:db8::20")),
            300,
        )
        .unwrap()
        .unwrap();
        assert!(c.current.is_empty());
        assert_eq!(c.desired[0].ttl, 300);
    }
}

#[cfg(test)]
#[path = "../../tests/common/knot.rs"]
mod knot;

#[cfg(test)]
mod server_tests {
    use super::*;

    /// The race `plan_swap` cannot see: the zone changes between reading it and updating it.
    /// The server's prerequisite check must refuse the stale swap, atomically.
    #[tokio::test]
    async fn the_server_refuses_a_stale_compare_and_swap() {
        if let Some(why) = knot::missing() {
            assert!(
                std::env::var("RELAYMOVE_REQUIRE_DNS").as_deref() != Ok("1"),
                "{why}"
            );
            eprintln!("skipping: {why}");
            return;
        }
        let k = tokio::task::spawn_blocking(|| knot::Knot::start("v=DKIM1;k=rsa;p=AAAA"))
            .await
            .unwrap();
        let config = Config::load(&k.config("mail.example.org", knot::SECRET, "")).unwrap();
        let names = Names::of(&config).unwrap();
        let primary: SocketAddr = format!("127.0.0.1:{}", k.primary).parse().unwrap();
        let now = current(&Server::new(primary, None), &names, RecordType::A)
            .await
            .unwrap();
        let (old, new) = (
            config.hosts.old.ipv4.map(IpAddr::V4),
            config.hosts.new.ipv4.map(IpAddr::V4),
        );
        let stale = plan_swap(&names.domain, RecordType::A, now, old, new, 300)
            .unwrap()
            .unwrap();
        k.nsupdate(
            "update delete mail.example.org. A\nupdate add mail.example.org. 3600 A 203.0.113.5",
        );
        let err = apply(&config, &names, primary, &[stale], "cutover", &|_: &str| {})
            .await
            .unwrap_err();
        let said = format!("{err:#}");
        assert!(
            said.contains("changed underneath") && said.contains("203.0.113.5"),
            "{said}"
        );
        assert_eq!(
            k.dig(k.primary, "mail.example.org.", "A"),
            vec!["203.0.113.5"]
        );
    }
}
