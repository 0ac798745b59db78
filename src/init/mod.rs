//! `relaymove init`: a commented relaymove.toml for two hosts. The text is always the
//! documented template (`examples/relaymove.toml`, the one the package ships); what the
//! hosts told `probe` replaces the template's example values line by line, each with a
//! comment saying where it came from, and what could not be learned keeps its example value
//! marked `CHANGE`. No I/O here: `probe` asks the hosts, `commands/init` writes the file.

pub mod probe;

use crate::migrate::profile::Recognised;
use anyhow::{bail, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The documented config, as shipped.
pub const TEMPLATE: &str = include_str!("../../examples/relaymove.toml");

/// What one host showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// Where the addresses came from (`hostname -I`, the ssh target).
    pub source: String,
    /// Its other addresses, for the reader to pick from.
    pub others: Vec<IpAddr>,
}

/// The zone of the mail domain as old's resolver sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZoneFacts {
    pub zone: String,
    /// The SOA MNAME and its addresses: the usual target of dynamic updates.
    pub primary: Option<(String, Vec<IpAddr>)>,
    /// NS names and their addresses.
    pub nameservers: Vec<(String, Vec<IpAddr>)>,
}

/// A host given on the command line and what was learned from it.
#[derive(Debug, Clone)]
pub struct Probed {
    pub target: String,
    /// `Err`: why nothing could be learned (unreachable, say).
    pub facts: Result<HostFacts, String>,
}

/// Everything `init` knows beyond the template.
#[derive(Debug, Clone, Default)]
pub struct Learned {
    pub old: Option<Probed>,
    pub new: Option<Probed>,
    /// The mail domain and how it was found.
    pub domain: Option<(String, String)>,
    pub profile: Option<Recognised>,
    pub zone: Option<ZoneFacts>,
    /// What was tried and not learned, for the file's head.
    pub missing: Vec<String>,
    /// The ssh_config the hosts were reached with (absolute).
    pub ssh_config: Option<std::path::PathBuf>,
}

/// The template with `learned` filled in. Without hosts it is the template unchanged.
pub fn render(learned: &Learned) -> Result<String> {
    let mut doc = Doc::new(TEMPLATE);
    if learned.old.is_none() && learned.new.is_none() {
        return Ok(doc.text());
    }
    let mut head = vec![
        "#".to_string(),
        "# Written by `relaymove init` from what the hosts showed: each value it learned says"
            .into(),
        "# where from (\"learned: …\"); each it could not learn keeps the example and says CHANGE."
            .into(),
    ];
    head.extend(
        learned
            .missing
            .iter()
            .map(|m| format!("# Not learned: {m}")),
    );
    doc.insert_after_header(&head);

    if let Some(path) = &learned.ssh_config {
        let path = quote(&path.display().to_string());
        doc.set("", "ssh_config", &path, "given to `relaymove init`")?;
    }
    for (section, probed) in [("hosts.old", &learned.old), ("hosts.new", &learned.new)] {
        let Some(p) = probed else { continue };
        doc.set_value(section, "ssh", &quote(&p.target))?;
        match &p.facts {
            Ok(f) if f.ipv4.is_some() || f.ipv6.is_some() => {
                let others = if f.others.is_empty() {
                    String::new()
                } else {
                    let list: Vec<String> = f.others.iter().map(|a| a.to_string()).collect();
                    format!("; also there: {}", list.join(", "))
                };
                let why = format!("learned: {}{others}", f.source);
                for (key, value) in [
                    ("ipv4", f.ipv4.map(|a| a.to_string())),
                    ("ipv6", f.ipv6.map(|a| a.to_string())),
                ] {
                    match value {
                        Some(v) => doc.set(section, key, &quote(&v), &why)?,
                        None => doc.comment_out(section, key, &format!("none in {}", f.source))?,
                    }
                }
            }
            Ok(f) => {
                doc.change(section, "ipv4", &format!("no address in {}", f.source))?;
                doc.change(section, "ipv6", "")?;
            }
            Err(why) => {
                doc.change(section, "ipv4", why)?;
                doc.change(section, "ipv6", "")?;
            }
        }
    }
    if learned.old.is_some() {
        match &learned.domain {
            Some((domain, source)) => doc.set(
                "",
                "domain",
                &quote(domain),
                &format!("learned: {source}; its A and AAAA move to new"),
            )?,
            None => doc.change("", "domain", "")?,
        }
        match &learned.profile {
            Some(r) => {
                let name = match r.profile {
                    crate::config::ProfileName::Chatmail => "chatmail",
                    crate::config::ProfileName::Classic => "classic",
                };
                doc.set("", "profile", &quote(name), &format!("learned: {}", r.why))?;
                if let Some(root) = &r.mail_root {
                    doc.uncomment_section("migrate")?;
                    doc.set(
                        "migrate",
                        "mail_root",
                        &quote(&root.display().to_string()),
                        "learned: Dovecot's mail_location on old",
                    )?;
                }
            }
            None => doc.change("", "profile", "chatmail or classic")?,
        }
        doc.change(
            "dns",
            "tsig_key",
            "the TSIG key the primary takes updates with; its secret goes in tsig_secret_file",
        )?;
        match &learned.zone {
            Some(z) => {
                doc.set(
                    "dns",
                    "zone",
                    &quote(&z.zone),
                    "learned: the SOA above the mail domain, through old's resolver",
                )?;
                match z.primary.as_ref().and_then(|(n, a)| Some((n, pick(a)?))) {
                    Some((name, addr)) => doc.set(
                        "dns",
                        "server",
                        &quote(&addr.to_string()),
                        &format!(
                            "learned: the SOA primary {name}; it must take TSIG-signed updates"
                        ),
                    )?,
                    None => doc.change("dns", "server", "the zone's primary did not resolve")?,
                }
                let (names, addrs): (Vec<&str>, Vec<IpAddr>) = z
                    .nameservers
                    .iter()
                    .filter_map(|(n, a)| Some((n.as_str(), pick(a)?)))
                    .unzip();
                if !addrs.is_empty() {
                    let list = toml::Value::Array(
                        addrs
                            .iter()
                            .map(|a| toml::Value::String(a.to_string()))
                            .collect(),
                    );
                    doc.set(
                        "dns",
                        "nameservers",
                        &list.to_string(),
                        &format!("learned: NS {}", names.join(" ")),
                    )?;
                }
            }
            None => {
                // The domain must be in the zone: without a learned zone, its parent.
                match &learned.domain {
                    Some((domain, _)) => {
                        let parent = domain.split_once('.').map_or(domain.as_str(), |(_, p)| p);
                        let zone = if parent.contains('.') { parent } else { domain };
                        doc.set(
                            "dns",
                            "zone",
                            &quote(zone),
                            "CHANGE: guessed from the mail domain; the zone that holds its A/AAAA",
                        )?
                    }
                    None => doc.change("dns", "zone", "")?,
                }
                doc.change("dns", "server", "")?;
            }
        }
    }
    Ok(doc.text())
}

/// An IPv4 address if there is one (the controller reaches those most often), else IPv6.
fn pick(addrs: &[IpAddr]) -> Option<IpAddr> {
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The template as lines, edited in place by section and key.
struct Doc {
    lines: Vec<String>,
}

/// Where the value comments of the template start.
const COMMENT_COLUMN: usize = 37;

impl Doc {
    fn new(text: &str) -> Doc {
        Doc {
            lines: text.lines().map(String::from).collect(),
        }
    }

    fn text(&self) -> String {
        let mut t = self.lines.join("\n");
        t.push('\n');
        t
    }

    /// Adds `head` after the template's opening comment block.
    fn insert_after_header(&mut self, head: &[String]) {
        let at = self
            .lines
            .iter()
            .position(|l| !l.starts_with('#'))
            .unwrap_or(self.lines.len());
        self.lines.splice(at..at, head.iter().cloned());
    }

    /// The index of `key = …` (commented out or not) in `section` ("" for the top).
    fn find(&self, section: &str, key: &str) -> Result<usize> {
        let mut current = String::new();
        for (i, line) in self.lines.iter().enumerate() {
            let bare = line.trim_start_matches('#').trim_start();
            if let Some(name) = bare.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                current = name.to_string();
            } else if current == section
                && bare
                    .strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with('='))
            {
                return Ok(i);
            }
        }
        bail!("bug: the config template has no `{key}` in [{section}]")
    }

    /// The value of line `i` without its comment (the template's values hold no `#`).
    fn value(&self, i: usize) -> String {
        let line = self.lines[i].trim_start_matches('#').trim_start();
        let value = line.split_once('=').map(|(_, v)| v).unwrap_or("");
        value.split(" #").next().unwrap_or("").trim().to_string()
    }

    fn write(&mut self, i: usize, prefix: &str, key: &str, value: &str, comment: &str) {
        let line = format!("{prefix}{key} = {value}");
        self.lines[i] = if comment.is_empty() {
            line
        } else {
            format!("{line:<w$} # {comment}", w = COMMENT_COLUMN - 1)
        };
    }

    fn set(&mut self, section: &str, key: &str, value: &str, comment: &str) -> Result<()> {
        let i = self.find(section, key)?;
        self.write(i, "", key, value, comment);
        Ok(())
    }

    /// Like `set`, keeping the template's comment.
    fn set_value(&mut self, section: &str, key: &str, value: &str) -> Result<()> {
        let i = self.find(section, key)?;
        let comment = self.lines[i]
            .split_once(" # ")
            .map(|(_, c)| c.trim().to_string())
            .unwrap_or_default();
        self.write(i, "", key, value, &comment);
        Ok(())
    }

    /// Keeps the example value, marked for the reader to replace.
    fn change(&mut self, section: &str, key: &str, why: &str) -> Result<()> {
        let i = self.find(section, key)?;
        let value = self.value(i);
        let prefix = if self.lines[i].starts_with('#') {
            "# "
        } else {
            ""
        };
        let comment = if why.is_empty() {
            "CHANGE: an example value".to_string()
        } else {
            format!("CHANGE: an example value ({why})")
        };
        self.write(i, prefix, key, &value, &comment);
        Ok(())
    }

    fn comment_out(&mut self, section: &str, key: &str, why: &str) -> Result<()> {
        let i = self.find(section, key)?;
        let value = self.value(i);
        self.write(i, "# ", key, &value, why);
        Ok(())
    }

    fn uncomment_section(&mut self, section: &str) -> Result<()> {
        let header = format!("# [{section}]");
        match self.lines.iter_mut().find(|l| **l == header) {
            Some(line) => {
                *line = format!("[{section}]");
                Ok(())
            }
            None => bail!("bug: the config template has no commented [{section}]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ProfileName};
    use std::path::PathBuf;

    fn host(v4: &str, v6: Option<&str>) -> HostFacts {
        HostFacts {
            ipv4: Some(v4.parse().unwrap()),
            ipv6: v6.map(|a| a.parse().unwrap()),
            source: "hostname -I".into(),
            others: vec!["10.0.0.5".parse().unwrap()],
        }
    }

    fn probed(target: &str, facts: Result<HostFacts, String>) -> Option<Probed> {
        Some(Probed {
            target: target.into(),
            facts,
        })
    }

    #[test]
    fn without_hosts_it_is_the_documented_template() {
        let text = render(&Learned::default()).unwrap();
        assert_eq!(text, TEMPLATE);
        Config::parse(&text).unwrap();
    }

    #[test]
    fn what_the_hosts_showed_replaces_the_examples_and_parses() {
        let learned = Learned {
            old: probed(
                "root@203.0.113.7",
                Ok(host("203.0.113.7", Some("2001:db8:7::1"))),
            ),
            new: probed("admin@new.example.net:2222", Ok(host("203.0.113.8", None))),
            domain: Some((
                "chat.example.net".into(),
                "postconf myhostname on old".into(),
            )),
            profile: Some(Recognised {
                profile: ProfileName::Classic,
                why: "Dovecot's mail_location is maildir:/srv/mail/%d/%n".into(),
                mail_root: Some(PathBuf::from("/srv/mail")),
            }),
            zone: Some(ZoneFacts {
                zone: "example.net".into(),
                primary: Some((
                    "ns1.example.net.".into(),
                    vec![
                        "2001:db8::53".parse().unwrap(),
                        "203.0.113.53".parse().unwrap(),
                    ],
                )),
                nameservers: vec![
                    (
                        "ns1.example.net.".into(),
                        vec!["203.0.113.53".parse().unwrap()],
                    ),
                    (
                        "ns2.example.net.".into(),
                        vec!["2001:db8::54".parse().unwrap()],
                    ),
                    ("ns3.example.net.".into(), vec![]),
                ],
            }),
            missing: vec!["dig and host are not installed on old".into()],
            ssh_config: Some(PathBuf::from("/etc/relaymove/ssh_config")),
        };
        let text = render(&learned).unwrap();
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        assert_eq!(c.domain, "chat.example.net");
        assert_eq!(c.profile, ProfileName::Classic);
        assert_eq!(c.migrate.mail_root, Some(PathBuf::from("/srv/mail")));
        assert_eq!(c.hosts.old.ssh, "root@203.0.113.7");
        assert_eq!(c.hosts.old.ipv6, Some("2001:db8:7::1".parse().unwrap()));
        assert_eq!(c.hosts.new.ssh, "admin@new.example.net:2222");
        assert_eq!(
            c.hosts.new.ipv6, None,
            "a family the host lacks is left out"
        );
        assert_eq!(c.dns.zone, "example.net");
        assert_eq!(c.dns.server.as_deref(), Some("203.0.113.53"));
        assert_eq!(c.dns.nameservers, ["203.0.113.53", "2001:db8::54"]);
        assert_eq!(
            c.ssh_config,
            Some(PathBuf::from("/etc/relaymove/ssh_config"))
        );
        assert!(text.contains("# also there: 10.0.0.5") || text.contains("also there: 10.0.0.5"));
        assert!(text.contains("# Not learned: dig and host are not installed on old"));
        assert!(
            text.contains("learned: the SOA primary ns1.example.net."),
            "{text}"
        );
        // The template's comments stay.
        assert!(text.contains("# How the A/AAAA records change"));
    }

    #[test]
    fn unreachable_hosts_keep_the_examples_marked_change_and_still_parse() {
        let learned = Learned {
            old: probed(
                "root@old.example.org",
                Err("old: connection refused".into()),
            ),
            new: probed(
                "root@new.example.org",
                Ok(HostFacts {
                    source: "hostname -I".into(),
                    ..HostFacts::default()
                }),
            ),
            missing: vec!["old could not be reached".into()],
            ..Learned::default()
        };
        let text = render(&learned).unwrap();
        let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        assert_eq!(c.hosts.old.ssh, "root@old.example.org");
        assert_eq!(c.domain, "mail.example.org");
        for line in [
            r#"ipv4 = "198.51.100.10"               # CHANGE: an example value (old: connection refused)"#,
            r#"ipv4 = "198.51.100.20"               # CHANGE: an example value (no address in hostname -I)"#,
            r#"domain = "mail.example.org"          # CHANGE: an example value"#,
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert!(text.contains(r#"profile = "chatmail""#) && text.contains("chatmail or classic"));
    }
}
