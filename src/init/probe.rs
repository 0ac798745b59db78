//! What `relaymove init` asks the hosts, over SSH, read-only: their addresses
//! (`hostname -I`), on old which profile runs (`migrate::profile` says what to look for),
//! Postfix's `myhostname` (the mail domain), and, through old's resolver with `dig` or
//! `host`, the zone above the mail domain with its primary and nameservers. Nothing is
//! installed or changed on a host; whatever cannot be learned is reported, not guessed.

use super::{HostFacts, Learned, Probed, ZoneFacts};
use crate::migrate::profile::{self, ProfileFacts};
use crate::remote::agent::{Host, SshOptions};
use crate::remote::endpoint::parse_ssh_target;
use std::net::IpAddr;
use std::path::PathBuf;

/// Prints `addr ADDRESS` for each address of the host, `exists PATH` for each argument
/// that exists, and Dovecot's `mail_location` and Postfix's `myhostname` when installed.
const HOST_PROBE: &str = r#"PATH=$PATH:/usr/sbin:/sbin
for a in $(hostname -I 2>/dev/null); do printf 'addr\t%s\n' "$a"; done
for p in "$@"; do [ -e "$p" ] && printf 'exists\t%s\n' "$p"; done
if command -v doveconf >/dev/null 2>&1; then printf 'mail_location\t%s\n' "$(doveconf -h mail_location 2>/dev/null)"; fi
if command -v postconf >/dev/null 2>&1; then printf 'myhostname\t%s\n' "$(postconf -h myhostname 2>/dev/null)"; fi
exit 0
"#;

/// For the domain `$1`: `tool dig|host` (or `tool none`), then the closest zone above it
/// that has an SOA (`zone Z`), its SOA primary (`primary NAME`), its NS (`ns NAME`) and
/// their addresses (`addr NAME ADDRESS`).
const DNS_PROBE: &str = r#"PATH=$PATH:/usr/sbin:/sbin
if command -v dig >/dev/null 2>&1; then tool=dig
elif command -v host >/dev/null 2>&1; then tool=host
else echo "tool	none"; exit 0; fi
printf 'tool\t%s\n' "$tool"
# ask TYPE NAME: the data of NAME's records of TYPE, one per line.
ask() {
  if [ $tool = dig ]; then
    dig +noall +answer +time=3 +tries=2 -t "$1" "$2" 2>/dev/null | while read -r owner ttl class type data; do
      [ "$type" = "$1" ] && [ "${owner%.}" = "${2%.}" ] && printf '%s\n' "$data"
    done
  else
    host -W 3 -t "$1" "$2" 2>/dev/null | while read -r line; do
      case $1 in
      SOA) case $line in "${2%.} has SOA record "*) printf '%s\n' "${line#* has SOA record }";; esac;;
      NS) case $line in *" name server "*) printf '%s\n' "${line##* name server }";; esac;;
      A) case $line in *" has address "*) printf '%s\n' "${line##* has address }";; esac;;
      AAAA) case $line in *" has IPv6 address "*) printf '%s\n' "${line##* has IPv6 address }";; esac;;
      esac
    done
  fi
}
addrs() { for a in $(ask A "$1") $(ask AAAA "$1"); do printf 'addr\t%s\t%s\n' "$1" "$a"; done; }
z=${1%.}
while :; do
  soa=$(ask SOA "$z" | head -n 1)
  [ -n "$soa" ] && break
  # Not above the registrable name: a zone has two labels at least.
  case $z in *.*.*) z=${z#*.};; *) exit 0;; esac
done
printf 'zone\t%s\n' "$z"
m=${soa%% *}
printf 'primary\t%s\n' "$m"
addrs "$m"
for n in $(ask NS "$z"); do printf 'ns\t%s\n' "$n"; addrs "$n"; done
exit 0
"#;

/// Asks both hosts (concurrently) and old's resolver.
pub async fn learn(old: &str, new: &str, ssh: &SshOptions) -> Learned {
    let (o, n) = tokio::join!(host_facts(old, ssh), host_facts(new, ssh));
    let mut learned = Learned::default();
    let (old_probed, old_raw) = o;
    let (new_probed, _) = n;
    for p in [&old_probed, &new_probed] {
        if let Err(why) = &p.facts {
            learned.missing.push(format!("{}: {why}", p.target));
        }
    }
    learned.old = Some(old_probed);
    learned.new = Some(new_probed);
    let Some((host, raw)) = old_raw else {
        return learned;
    };
    learned.profile = raw.profile.recognise();
    if learned.profile.is_none() {
        learned
            .missing
            .push("the profile: old shows neither chatmail's traces nor Dovecot".into());
    }
    match raw.myhostname.as_deref().map(str::trim) {
        Some(name) if name.contains('.') => {
            learned.domain = Some((
                name.trim_end_matches('.').to_string(),
                "postconf myhostname on old".into(),
            ))
        }
        Some(name) => learned.missing.push(format!(
            "the mail domain: Postfix's myhostname on old is {name:?}, not a domain"
        )),
        None => learned
            .missing
            .push("the mail domain: Postfix (postconf) is not installed on old".into()),
    }
    if let Some((domain, _)) = &learned.domain {
        let zone = match host
            .run(&["sh", "-c", DNS_PROBE, "relaymove", domain])
            .await
        {
            Ok(out) => parse_zone(&out),
            Err(e) => Err(format!("the zone: {e}")),
        };
        match zone {
            Ok(Some(zone)) => learned.zone = Some(zone),
            Ok(None) => learned.missing.push(format!(
                "the zone: no SOA found above {domain} through old's resolver"
            )),
            Err(why) => learned.missing.push(why),
        }
    }
    host.close().await;
    learned
}

/// What the host probe printed, beyond the addresses.
struct RawFacts {
    profile: ProfileFacts,
    myhostname: Option<String>,
}

/// Connects to `target` and runs the host probe. The open host comes back (for the DNS
/// probe on old) along with what it printed; `Err` in the facts says why not.
async fn host_facts(target: &str, ssh: &SshOptions) -> (Probed, Option<(Host, RawFacts)>) {
    let fail = |why: String| Probed {
        target: target.to_string(),
        facts: Err(why),
    };
    let host = match Host::connect_target(target, ssh).await {
        Ok(h) => h,
        Err(e) => return (fail(format!("{e:#}")), None),
    };
    let mut argv = vec!["sh", "-c", HOST_PROBE, "relaymove"];
    argv.extend(profile::markers());
    let out = match host.run(&argv).await {
        Ok(out) => out,
        Err(e) => {
            host.close().await;
            return (fail(e.to_string()), None);
        }
    };
    let (facts, raw) = parse_host(target, &out);
    (
        Probed {
            target: target.to_string(),
            facts: Ok(facts),
        },
        Some((host, raw)),
    )
}

fn parse_host(target: &str, out: &str) -> (HostFacts, RawFacts) {
    let mut addrs = Vec::new();
    let mut raw = RawFacts {
        profile: ProfileFacts::default(),
        myhostname: None,
    };
    for line in out.lines() {
        match line.split_once('\t') {
            Some(("addr", a)) => addrs.extend(a.parse::<IpAddr>().ok()),
            Some(("exists", p)) => raw.profile.existing.push(PathBuf::from(p)),
            Some(("mail_location", l)) if !l.trim().is_empty() => {
                raw.profile.mail_location = Some(l.trim().to_string())
            }
            Some(("myhostname", h)) if !h.trim().is_empty() => {
                raw.myhostname = Some(h.trim().to_string())
            }
            _ => {}
        }
    }
    // An address in the ssh target is the one the operator reaches the host by.
    let given = parse_ssh_target(target)
        .ok()
        .and_then(|r| r.host.parse::<IpAddr>().ok());
    (addresses(given, addrs), raw)
}

/// Picks one address per family: the ssh target's, else the first public one, else the
/// first private one; loopback and link-local never. The rest are listed as `others`.
fn addresses(given: Option<IpAddr>, all: Vec<IpAddr>) -> HostFacts {
    let rank = |a: &IpAddr| -> Option<u8> {
        match a {
            _ if Some(*a) == given => Some(0),
            IpAddr::V4(v) if v.is_loopback() || v.is_link_local() || v.is_unspecified() => None,
            IpAddr::V6(v) if v.is_loopback() || v.is_unicast_link_local() || v.is_unspecified() => {
                None
            }
            IpAddr::V4(v)
                if v.is_private() || (v.octets()[0] == 100 && v.octets()[1] & 0xc0 == 64) =>
            {
                Some(2)
            }
            IpAddr::V6(v) if v.is_unique_local() => Some(2),
            _ => Some(1),
        }
    };
    let mut usable: Vec<(u8, IpAddr)> = given
        .into_iter()
        .chain(all)
        .filter_map(|a| Some((rank(&a)?, a)))
        .collect();
    usable.sort_by_key(|(r, _)| *r);
    let mut unique: Vec<IpAddr> = Vec::new();
    for (_, a) in usable {
        if !unique.contains(&a) {
            unique.push(a);
        }
    }
    let ipv4 = unique.iter().find_map(|a| match a {
        IpAddr::V4(v) => Some(*v),
        _ => None,
    });
    let ipv6 = unique.iter().find_map(|a| match a {
        IpAddr::V6(v) => Some(*v),
        _ => None,
    });
    let chosen = [ipv4.map(IpAddr::V4), ipv6.map(IpAddr::V6)];
    HostFacts {
        ipv4,
        ipv6,
        source: match given {
            Some(_) => "the ssh target and hostname -I".into(),
            None => "hostname -I".into(),
        },
        others: unique
            .into_iter()
            .filter(|a| !chosen.contains(&Some(*a)))
            .collect(),
    }
}

/// The DNS probe's output; `Ok(None)` when no zone was found, `Err` when no tool was there.
fn parse_zone(out: &str) -> Result<Option<ZoneFacts>, String> {
    let mut zone: Option<ZoneFacts> = None;
    for line in out.lines() {
        let mut fields = line.split('\t');
        match (fields.next(), fields.next(), fields.next()) {
            (Some("tool"), Some("none"), _) => {
                return Err("the zone: neither dig nor host is installed on old (apt-get install bind9-dnsutils, or bind9-host)".into())
            }
            (Some("zone"), Some(z), _) => {
                zone = Some(ZoneFacts {
                    zone: z.trim_end_matches('.').to_string(),
                    ..ZoneFacts::default()
                })
            }
            (Some("primary"), Some(name), _) => {
                if let Some(z) = &mut zone {
                    z.primary = Some((name.to_string(), Vec::new()));
                }
            }
            (Some("ns"), Some(name), _) => {
                if let Some(z) = &mut zone {
                    z.nameservers.push((name.to_string(), Vec::new()));
                }
            }
            (Some("addr"), Some(name), Some(a)) => {
                let (Some(z), Ok(a)) = (&mut zone, a.parse::<IpAddr>()) else {
                    continue;
                };
                let named = z
                    .nameservers
                    .iter_mut()
                    .chain(z.primary.as_mut())
                    .filter(|(n, _)| n == name);
                for (_, addrs) in named {
                    if !addrs.contains(&a) {
                        addrs.push(a);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(zone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_ssh_targets_address_then_public_before_private_and_never_loopback() {
        let all: Vec<IpAddr> = [
            "10.0.0.5",
            "198.51.100.10",
            "fe80::1",
            "fd00::5",
            "2001:db8::10",
            "127.0.0.1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let f = addresses(None, all.clone());
        assert_eq!(f.ipv4, Some("198.51.100.10".parse().unwrap()));
        assert_eq!(f.ipv6, Some("2001:db8::10".parse().unwrap()));
        assert_eq!(
            f.others,
            [
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let f = addresses(Some("10.0.0.5".parse().unwrap()), all);
        assert_eq!(f.ipv4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(f.source, "the ssh target and hostname -I");
        let f = addresses(None, vec!["127.0.0.1".parse().unwrap()]);
        assert_eq!((f.ipv4, f.ipv6), (None, None));
    }

    #[test]
    fn reads_the_host_probe() {
        let (f, raw) = parse_host(
            "root@old",
            "addr\t198.51.100.10\naddr\t2001:db8::10\nexists\t/home/vmail/mail\nmail_location\tmaildir:/home/vmail/mail/%d/%u\nmyhostname\tmail.example.org\n",
        );
        assert_eq!(f.ipv4, Some("198.51.100.10".parse().unwrap()));
        assert_eq!(raw.myhostname.as_deref(), Some("mail.example.org"));
        assert_eq!(raw.profile.existing, [PathBuf::from("/home/vmail/mail")]);
        assert_eq!(
            raw.profile.recognise().map(|r| r.profile),
            Some(crate::config::ProfileName::Chatmail)
        );
    }

    #[test]
    fn reads_the_dns_probe() {
        let out = "tool\tdig\nzone\texample.org\nprimary\tns1.example.org.\naddr\tns1.example.org.\t198.51.100.53\n\
                   ns\tns1.example.org.\naddr\tns1.example.org.\t198.51.100.53\naddr\tns1.example.org.\tmail.example.org.\n\
                   ns\tns2.example.org.\naddr\tns2.example.org.\t2001:db8::54\n";
        let z = parse_zone(out).unwrap().unwrap();
        assert_eq!(z.zone, "example.org");
        let ns1 = (
            "ns1.example.org.".to_string(),
            vec!["198.51.100.53".parse().unwrap()],
        );
        assert_eq!(z.primary, Some(ns1.clone()));
        assert_eq!(
            z.nameservers,
            [
                ns1,
                (
                    "ns2.example.org.".into(),
                    vec!["2001:db8::54".parse().unwrap()]
                )
            ]
        );
        assert_eq!(parse_zone("tool\tdig\n"), Ok(None));
        assert!(parse_zone("tool\tnone\n")
            .unwrap_err()
            .contains("apt-get install"));
    }
}
