//! Mail-auth checks before a cutover: will the world accept mail from the new host?
//! Each check is a line with ok, warn or fail and, when not ok, the fix. All checks run and
//! are reported; none stops the others.
//!
//! SPF is evaluated for real by the `mail-auth` crate (RFC 7208: `a`, `mx`, `include`,
//! `ip4`, `ip6`, `redirect`, the 10-lookup limit), through the configured resolver.

use crate::config::Config;
use crate::dns::server::Server;
use crate::dns::status::{address, fqdn, resolver_addr, rrset, txt_value, Names};
use crate::report::finding::{Finding, Level};
use anyhow::{anyhow, Context, Result};
use hickory_proto::rr::{RData, RecordType};
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MessageAuthenticator, SpfResult};
use std::net::{IpAddr, SocketAddr};

fn finding(check: &str, level: Level, detail: String, fix: Option<String>) -> Finding {
    Finding::new(check, level, detail, fix)
}

pub async fn run(config: &Config, names: &Names) -> Result<Vec<Finding>> {
    let resolver = resolver_addr(config)?;
    let server = Server::new(resolver, None);
    let new: Vec<IpAddr> = config.hosts.new.addresses();
    let mut out = Vec::new();
    let domain = names.domain.to_ascii();
    let domain = domain.trim_end_matches('.');
    for ip in &new {
        out.push(spf(resolver, domain, *ip).await);
    }
    out.push(dkim(config, &server, names).await);
    out.push(caa(config, &server, names).await);
    for ip in &new {
        out.push(ptr(&server, names, *ip).await);
    }
    out.push(mx(&server, names).await);
    out.push(dmarc(&server, names).await);
    Ok(out)
}

/// A resolver for mail-auth pointed at `addr` (any port), with no cache between runs.
fn authenticator(addr: SocketAddr) -> Result<MessageAuthenticator> {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
    ns.connections = vec![udp, tcp];
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![ns]), opts)
        .map_err(|e| anyhow!("setting up the SPF resolver {addr}: {e}"))
}

pub async fn spf(resolver: SocketAddr, domain: &str, ip: IpAddr) -> Finding {
    let check = format!("SPF of {domain} for {ip}");
    let auth = match authenticator(resolver) {
        Ok(a) => a,
        Err(e) => return finding(&check, Level::Fail, format!("{e:#}"), None),
    };
    let sender = format!("postmaster@{domain}");
    let output = auth
        .check_host(mail_auth::Parameters::new(SpfParameters::new(
            ip, domain, domain, domain, &sender,
        )))
        .await;
    let add = format!(
        "add `ip{}:{ip}` (or an `a`/`mx` that covers it) to the SPF record of {domain}",
        if ip.is_ipv4() { 4 } else { 6 }
    );
    match output.result() {
        SpfResult::Pass => finding(&check, Level::Ok, "pass: the new host may send for the domain".into(), None),
        SpfResult::Fail => finding(&check, Level::Fail, "fail (-all): receivers will reject mail from the new host".into(), Some(add)),
        SpfResult::SoftFail => finding(&check, Level::Fail, "softfail (~all): mail from the new host will be marked as suspicious".into(), Some(add)),
        SpfResult::Neutral => finding(&check, Level::Warn, "neutral: the record does not cover the new host".into(), Some(add)),
        SpfResult::None => finding(&check, Level::Fail, format!("no SPF record at {domain}"), Some(format!("publish `v=spf1 a mx -all` at {domain}"))),
        SpfResult::PermError => finding(
            &check,
            Level::Fail,
            "permerror: the record is malformed or needs more than 10 DNS lookups (RFC 7208 §4.6.4)".into(),
            Some("flatten `include:` chains or replace them by ip4:/ip6: mechanisms".into()),
        ),
        SpfResult::TempError => finding(&check, Level::Warn, format!("temperror: a lookup failed at {resolver}"), Some("run the check again".into())),
    }
}

/// The public key (SubjectPublicKeyInfo, base64) of an RSA private key in PEM.
pub fn dkim_public_key(pem: &str) -> Result<String> {
    use base64::Engine as _;
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    let key = rsa::RsaPrivateKey::from_pkcs1_pem(pem)
        .or_else(|_| rsa::RsaPrivateKey::from_pkcs8_pem(pem))
        .map_err(|_| anyhow!("not an RSA private key in PEM (PKCS#1 or PKCS#8)"))?;
    let der = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| anyhow!("encoding the public key: {e}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(der.as_bytes()))
}

/// The `p=` tag of a DKIM record, whitespace removed.
pub fn dkim_p_tag(txt: &str) -> Option<String> {
    txt.split(';')
        .map(|t| t.trim())
        .find_map(|t| t.strip_prefix("p="))
        .map(|p| p.chars().filter(|c| !c.is_whitespace()).collect())
}

async fn txt_at(server: &Server, name: &hickory_proto::rr::Name) -> Result<Vec<String>> {
    let answer = server.query(name, RecordType::TXT).await?;
    Ok(rrset(&answer, name, RecordType::TXT)
        .iter()
        .filter_map(|r| txt_value(&r.data))
        .collect())
}

/// The DKIM public key (`p=`) published for the configured selector, through the resolver.
pub async fn published_dkim_key(config: &Config, names: &Names) -> Result<Option<String>> {
    let server = Server::new(resolver_addr(config)?, None);
    Ok(txt_at(&server, &names.dkim)
        .await?
        .iter()
        .find_map(|t| dkim_p_tag(t)))
}

async fn dkim(config: &Config, server: &Server, names: &Names) -> Finding {
    let check = format!("DKIM {}", names.dkim);
    let records = match txt_at(server, &names.dkim).await {
        Ok(r) => r,
        Err(e) => return finding(&check, Level::Fail, format!("{e:#}"), None),
    };
    let Some(published) = records.iter().find_map(|t| dkim_p_tag(t)) else {
        return finding(
            &check,
            Level::Fail,
            "no DKIM key published".into(),
            Some(format!("publish the new host's key at {}", names.dkim)),
        );
    };
    let Some(key_file) = &config.dns.dkim_private_key else {
        return finding(
            &check,
            Level::Warn,
            "a key is published; [dns] dkim_private_key is not set, so it was not compared".into(),
            None,
        );
    };
    let ours = std::fs::read_to_string(key_file)
        .with_context(|| format!("reading {}", key_file.display()))
        .and_then(|pem| dkim_public_key(&pem).with_context(|| key_file.display().to_string()));
    match ours {
        Err(e) => finding(&check, Level::Fail, format!("{e:#}"), None),
        Ok(p) if p == published => finding(&check, Level::Ok, format!("matches {}", key_file.display()), None),
        Ok(_) => finding(
            &check,
            Level::Fail,
            format!("the published key is not the public half of {}", key_file.display()),
            Some("copy the old host's /etc/dkimkeys to the new host (relaymove sync), or publish the new key and wait its TTL".into()),
        ),
    }
}

async fn caa(config: &Config, server: &Server, names: &Names) -> Finding {
    let check = format!("CAA {}", names.domain);
    let answer = match server.query(&names.domain, RecordType::CAA).await {
        Ok(a) => a,
        Err(e) => return finding(&check, Level::Fail, format!("{e:#}"), None),
    };
    let records: Vec<String> = rrset(&answer, &names.domain, RecordType::CAA)
        .iter()
        .map(|r| r.data.to_string())
        .collect();
    let with_account: Vec<&String> = records
        .iter()
        .filter(|r| r.contains("accounturi"))
        .collect();
    if with_account.is_empty() {
        return finding(
            &check,
            Level::Ok,
            if records.is_empty() {
                "no CAA record: any CA may issue".into()
            } else {
                "no accounturi restriction".into()
            },
            None,
        );
    }
    match &config.dns.acme_account {
        None => finding(
            &check,
            Level::Warn,
            "CAA pins an ACME account; [dns] acme_account is not set, so it was not compared"
                .into(),
            None,
        ),
        Some(account) if with_account.iter().any(|r| r.contains(account.as_str())) => finding(
            &check,
            Level::Ok,
            "accounturi matches the new host's ACME account".into(),
            None,
        ),
        Some(account) => finding(
            &check,
            Level::Fail,
            format!(
                "CAA accounturi is not {account}: certificate renewal on the new host will fail"
            ),
            Some("copy /var/lib/acme (it holds the account key) or update the CAA record".into()),
        ),
    }
}

async fn ptr(server: &Server, names: &Names, ip: IpAddr) -> Finding {
    let check = format!("PTR {ip}");
    let rev = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let hex: String = v6.octets().iter().map(|b| format!("{b:02x}")).collect();
            let mut s: String = hex.chars().rev().flat_map(|c| [c, '.']).collect();
            s.push_str("ip6.arpa.");
            s
        }
    };
    let name = match fqdn(&rev) {
        Ok(n) => n,
        Err(e) => return finding(&check, Level::Fail, format!("{e:#}"), None),
    };
    let targets: Vec<String> = match server.query(&name, RecordType::PTR).await {
        Ok(a) => rrset(&a, &name, RecordType::PTR)
            .iter()
            .map(|r| r.data.to_string())
            .collect(),
        Err(e) => return finding(&check, Level::Warn, format!("{e:#}"), None),
    };
    let want = names.domain.to_ascii().to_lowercase();
    let fix = Some(format!(
        "ask the new host's provider to set the reverse DNS of {ip} to {want}"
    ));
    if targets.is_empty() {
        return finding(
            &check,
            Level::Fail,
            "no PTR record: many receivers reject mail from such hosts".into(),
            fix,
        );
    }
    if !targets.iter().any(|t| t.to_lowercase() == want) {
        return finding(
            &check,
            Level::Warn,
            format!("points at {}, not {want}", targets.join(", ")),
            fix,
        );
    }
    // Forward-confirmed: the name must resolve back to the address (true after the cutover).
    let rtype = if ip.is_ipv4() {
        RecordType::A
    } else {
        RecordType::AAAA
    };
    let forward = match server.query(&names.domain, rtype).await {
        Ok(a) => a.answers.iter().any(|r| address(&r.data) == Some(ip)),
        Err(_) => false,
    };
    if forward {
        finding(
            &check,
            Level::Ok,
            format!("{ip} → {want} → {ip} (forward-confirmed)"),
            None,
        )
    } else {
        finding(
            &check,
            Level::Warn,
            format!("{ip} → {want}, but {want} does not resolve to {ip} yet"),
            Some("expected before the cutover; after it this must pass".into()),
        )
    }
}

async fn mx(server: &Server, names: &Names) -> Finding {
    let check = format!("MX {}", names.domain);
    let answer = match server.query(&names.domain, RecordType::MX).await {
        Ok(a) => a,
        Err(e) => return finding(&check, Level::Fail, format!("{e:#}"), None),
    };
    let targets: Vec<hickory_proto::rr::Name> = rrset(&answer, &names.domain, RecordType::MX)
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some(mx.exchange.clone()),
            _ => None,
        })
        .collect();
    if targets.is_empty() {
        return finding(
            &check,
            Level::Fail,
            "no MX record: mail goes to the A record, if any".into(),
            Some(format!("publish `{} MX 10 {}`", names.domain, names.domain)),
        );
    }
    let mut dead = Vec::new();
    for t in &targets {
        let mut found = false;
        for rtype in [RecordType::A, RecordType::AAAA] {
            if let Ok(a) = server.query(t, rtype).await {
                found |= a.answers.iter().any(|r| address(&r.data).is_some());
            }
        }
        if !found {
            dead.push(t.to_ascii());
        }
    }
    if dead.is_empty() {
        finding(
            &check,
            Level::Ok,
            format!("{} target(s) resolve", targets.len()),
            None,
        )
    } else {
        finding(
            &check,
            Level::Fail,
            format!("MX target(s) without an address: {}", dead.join(", ")),
            Some("give each MX target an A or AAAA record".into()),
        )
    }
}

async fn dmarc(server: &Server, names: &Names) -> Finding {
    let check = format!("DMARC {}", names.dmarc);
    match txt_at(server, &names.dmarc).await {
        Ok(t) if t.iter().any(|v| v.starts_with("v=DMARC1")) => {
            finding(&check, Level::Ok, "published".into(), None)
        }
        Ok(_) => finding(
            &check,
            Level::Warn,
            "no DMARC record".into(),
            Some(format!(
                "publish `v=DMARC1;p=reject;adkim=s;aspf=s` at {}",
                names.dmarc
            )),
        ),
        Err(e) => finding(&check, Level::Fail, format!("{e:#}"), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_tag_is_found_in_split_records() {
        assert_eq!(
            dkim_p_tag("v=DKIM1; k=rsa; p=MIIB IjAN;s=email").as_deref(),
            Some("MIIBIjAN")
        );
        assert_eq!(dkim_p_tag("v=DKIM1; k=rsa"), None);
    }
}
