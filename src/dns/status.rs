//! What every authoritative server of the zone says about the mail domain: SOA serial,
//! negative-caching time, and the A, AAAA, MX, TXT (SPF, DKIM, DMARC, MTA-STS) and CAA
//! records with their TTLs, asked of each server directly (never through a cache).

use crate::config::Config;
use crate::dns::server::{parse_server, system_resolver, Answer, Server};
use anyhow::{anyhow, bail, Context, Result};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde::Serialize;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// The names the cutover and the mail checks care about.
#[derive(Debug, Clone)]
pub struct Names {
    pub zone: Name,
    pub domain: Name,
    pub dkim: Name,
    pub dmarc: Name,
    pub mta_sts: Name,
}

pub fn fqdn(s: &str) -> Result<Name> {
    let mut name = Name::from_str(s).with_context(|| format!("{s:?} is not a domain name"))?;
    name.set_fqdn(true);
    Ok(name)
}

impl Names {
    pub fn of(config: &Config) -> Result<Names> {
        let domain = fqdn(&config.domain)?;
        let d = domain.to_ascii();
        Ok(Names {
            zone: fqdn(&config.dns.zone)?,
            dkim: fqdn(&format!("{}._domainkey.{d}", config.dns.dkim_selector))?,
            dmarc: fqdn(&format!("_dmarc.{d}"))?,
            mta_sts: fqdn(&format!("_mta-sts.{d}"))?,
            domain,
        })
    }

    /// Every (name, type) that `dns status` shows.
    fn questions(&self) -> Vec<(Name, RecordType)> {
        use RecordType::*;
        vec![
            (self.domain.clone(), A),
            (self.domain.clone(), AAAA),
            (self.domain.clone(), MX),
            (self.domain.clone(), TXT),
            (self.domain.clone(), CAA),
            (self.dkim.clone(), TXT),
            (self.dmarc.clone(), TXT),
            (self.mta_sts.clone(), TXT),
        ]
    }
}

/// One record, as people read it and as servers are compared.
#[derive(Serialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rr {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub ttl: u32,
    pub value: String,
}

/// TXT character-strings joined into the one logical value (a DKIM key is split in
/// 255-byte strings).
pub fn txt_value(rdata: &RData) -> Option<String> {
    match rdata {
        RData::TXT(txt) => Some(
            txt.txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<String>(),
        ),
        _ => None,
    }
}

pub fn rr_of(record: &Record) -> Rr {
    let value = match &record.data {
        RData::A(a) => a.0.to_string(),
        RData::AAAA(a) => a.0.to_string(),
        data @ RData::TXT(_) => txt_value(data).unwrap_or_default(),
        other => other.to_string(),
    };
    Rr {
        name: record.name.to_ascii(),
        rtype: record.record_type().to_string(),
        ttl: record.ttl,
        value,
    }
}

/// What one authoritative server serves.
#[derive(Serialize, Debug, Clone)]
pub struct ServerView {
    pub server: String,
    pub serial: Option<u32>,
    /// How long resolvers may cache "no such record" (RFC 2308: min(SOA TTL, SOA MINIMUM)).
    pub negative_ttl: Option<u32>,
    pub records: Vec<Rr>,
    pub error: Option<String>,
}

/// The zone's authoritative servers: from the config, or the zone's NS records.
pub async fn authorities(config: &Config, names: &Names) -> Result<Vec<SocketAddr>> {
    if !config.dns.nameservers.is_empty() {
        return config
            .dns
            .nameservers
            .iter()
            .map(|s| parse_server(s))
            .collect();
    }
    let resolver = resolver_addr(config)?;
    let server = Server::new(resolver, None);
    let ns = server.query(&names.zone, RecordType::NS).await?;
    let targets: Vec<Name> = ns
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::NS(ns) => Some(ns.0.clone()),
            _ => None,
        })
        .collect();
    if targets.is_empty() {
        bail!(
            "{resolver} knows no NS records for zone {}: is the zone name right?\nhint: or list the servers in [dns] nameservers",
            names.zone
        );
    }
    let mut out = Vec::new();
    for target in targets {
        for rtype in [RecordType::A, RecordType::AAAA] {
            let a = server.query(&target, rtype).await?;
            out.extend(
                a.answers
                    .iter()
                    .filter_map(|r| address(&r.data))
                    .map(|ip| SocketAddr::new(ip, 53)),
            );
        }
    }
    Ok(out)
}

pub fn resolver_addr(config: &Config) -> Result<SocketAddr> {
    match &config.dns.resolver {
        Some(s) => parse_server(s),
        None => system_resolver(),
    }
}

pub fn address(data: &RData) -> Option<IpAddr> {
    match data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    }
}

/// The records of `answer` that answer (name, type) itself, not CNAME targets or extras.
pub fn rrset(answer: &Answer, name: &Name, rtype: RecordType) -> Vec<Record> {
    answer
        .answers
        .iter()
        .filter(|r| &r.name == name && r.record_type() == rtype)
        .cloned()
        .collect()
}

/// Checks that a server answered with authority; an error otherwise, naming it.
pub fn authoritative(answer: &Answer, server: &SocketAddr, name: &Name) -> Result<()> {
    match answer.rcode {
        ResponseCode::NoError | ResponseCode::NXDomain if answer.authoritative => Ok(()),
        ResponseCode::NoError | ResponseCode::NXDomain => Err(anyhow!(
            "{server} is not authoritative for {name} (a lame delegation, or a resolver given as a nameserver)"
        )),
        ResponseCode::Refused | ResponseCode::NotAuth => Err(anyhow!(
            "{server} refuses queries for {name} ({}): it does not serve this zone",
            answer.rcode
        )),
        other => Err(anyhow!("{server} answered {other} for {name}")),
    }
}

pub async fn view(addr: SocketAddr, names: &Names) -> ServerView {
    let server = Server::new(addr, None);
    let mut view = ServerView {
        server: addr.to_string(),
        serial: None,
        negative_ttl: None,
        records: Vec::new(),
        error: None,
    };
    let result: Result<()> = async {
        let soa = server.query(&names.zone, RecordType::SOA).await?;
        authoritative(&soa, &addr, &names.zone)?;
        let record = rrset(&soa, &names.zone, RecordType::SOA)
            .into_iter()
            .next()
            .ok_or_else(|| {
                anyhow!(
                    "{addr} has no SOA for zone {}: it does not serve this zone",
                    names.zone
                )
            })?;
        if let RData::SOA(s) = &record.data {
            view.serial = Some(s.serial);
            view.negative_ttl = Some(record.ttl.min(s.minimum));
        }
        for (name, rtype) in names.questions() {
            let answer = server.query(&name, rtype).await?;
            authoritative(&answer, &addr, &name)?;
            // A CNAME at the mail domain breaks MX, SPF and the address swap: show it.
            let cname = rrset(&answer, &name, RecordType::CNAME);
            view.records.extend(cname.iter().map(rr_of));
            view.records
                .extend(rrset(&answer, &name, rtype).iter().map(rr_of));
        }
        Ok(())
    }
    .await;
    view.records.sort();
    view.records.dedup();
    view.error = result.err().map(|e| format!("{e:#}"));
    view
}

/// Whether the servers serve the same records; the differences otherwise.
pub fn agreement(views: &[ServerView]) -> Vec<String> {
    let mut diffs = Vec::new();
    let Some(first) = views.iter().find(|v| v.error.is_none()) else {
        return vec!["no server answered".to_string()];
    };
    let base: BTreeSet<&Rr> = first.records.iter().collect();
    for v in views {
        if let Some(e) = &v.error {
            diffs.push(format!("{}: {e}", v.server));
            continue;
        }
        if v.serial != first.serial {
            diffs.push(format!(
                "{} has serial {:?}, {} has {:?}",
                v.server, v.serial, first.server, first.serial
            ));
        }
        let other: BTreeSet<&Rr> = v.records.iter().collect();
        for missing in base.difference(&other) {
            diffs.push(format!(
                "{} lacks {} {} {} {}",
                v.server, missing.name, missing.rtype, missing.ttl, missing.value
            ));
        }
        for extra in other.difference(&base) {
            diffs.push(format!(
                "{} also has {} {} {} {}",
                v.server, extra.name, extra.rtype, extra.ttl, extra.value
            ));
        }
    }
    diffs
}
