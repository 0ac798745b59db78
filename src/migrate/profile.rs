//! What a move carries for each kind of mail server: the trees, who must own them, the
//! held Postfix queue, and the units in the order they stop and start.
//! The knowledge lives here and nowhere else (sources: research/migrate.md §1.4 and §3).

use crate::config::{Config, ProfileName};
use std::path::{Path, PathBuf};

/// A directory that moves as it is (contents, owners by name, modes, mtimes, links).
#[derive(Debug, Clone)]
pub struct Tree {
    pub path: PathBuf,
    /// Must exist on old; a missing optional tree is skipped and said so.
    pub required: bool,
    /// Why it moves, for `plan`.
    pub why: &'static str,
    /// The owner (`user:group`) its root must have on both hosts.
    pub owner: Option<&'static str>,
}

/// A file whose owner the move must keep, checked after the final sync.
#[derive(Debug, Clone)]
pub struct Owned {
    pub path: PathBuf,
    pub owner: &'static str,
}

pub struct Profile {
    pub name: ProfileName,
    pub trees: Vec<Tree>,
    /// Files whose owner matters to a daemon (OpenDKIM refuses a key it does not own).
    pub owned: Vec<Owned>,
    /// Users and groups whose ids may differ between the hosts; reported.
    pub accounts: &'static [&'static str],
    /// Postfix's hold queue: mail an administrator put on hold, moved in the final sync to
    /// stay held on new. The rest of old's queue stays on old, which forwards it to new
    /// (moving it would need old's Postfix stopped, and senders refused).
    pub hold_queue: PathBuf,
    /// Units in stop order. Postfix first: it stops accepting mail while Dovecot still
    /// takes the last LMTP deliveries of the queue; OpenDKIM last.
    pub stop_order: &'static [&'static str],
    /// Units that keep running on old from the freeze to the finish: Postfix accepts mail
    /// (and forwards it), OpenDKIM is its milter.
    pub accepting: &'static [&'static str],
    /// Units in start order: OpenDKIM before Postfix (its milter socket), Dovecot before
    /// Postfix (auth and LMTP sockets).
    pub start_order: &'static [&'static str],
    /// The unit that actually runs Postfix on Debian (`postfix.service` is a wrapper).
    pub postfix_unit: &'static str,
    /// Ports that answer while the host serves mail.
    pub ports: &'static [u16],
    /// Of `ports`, those Postfix answers on (old keeps them open until the finish).
    pub smtp_ports: &'static [u16],
    /// The certificate the mail daemons serve, relative to the domain (acmetool layout).
    pub certificate: Option<PathBuf>,
    pub dkim_key: PathBuf,
}

const STOP: &[&str] = &["postfix", "dovecot", "opendkim"];
const START: &[&str] = &["opendkim", "dovecot", "postfix"];
const PORTS: &[u16] = &[25, 465, 587, 143, 993];

impl Profile {
    pub fn of(config: &Config) -> Profile {
        let domain = config.domain.trim_end_matches('.');
        let tree = |path: &str, required, why, owner| Tree {
            path: PathBuf::from(path),
            required,
            why,
            owner,
        };
        let mut trees = match config.profile {
            ProfileName::Chatmail => vec![
                tree(
                    "/home/vmail/mail",
                    true,
                    "mailboxes: Maildirs with Dovecot's UID lists, password files (mtime = last login), metadata.json (push tokens), enforceE2EEincoming",
                    Some("vmail:vmail"),
                ),
                tree(
                    "/etc/dkimkeys",
                    true,
                    "the DKIM key DNS publishes",
                    Some("opendkim:opendkim"),
                ),
                tree(
                    "/var/lib/acme",
                    false,
                    "acmetool: certificate and the ACME account that CAA accounturi pins",
                    Some("root:root"),
                ),
            ],
            ProfileName::Classic => {
                let root = config
                    .migrate
                    .mail_root
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/var/vmail"));
                vec![
                    Tree {
                        path: root,
                        required: true,
                        why: "mailboxes",
                        owner: None,
                    },
                    tree(
                        "/etc/dkimkeys",
                        true,
                        "the DKIM key DNS publishes",
                        Some("opendkim:opendkim"),
                    ),
                    tree(
                        "/var/lib/acme",
                        false,
                        "acmetool certificates and account",
                        None,
                    ),
                    tree(
                        "/etc/letsencrypt",
                        false,
                        "certbot certificates and account",
                        None,
                    ),
                ]
            }
        };
        trees.extend(config.migrate.extra_trees.iter().map(|p| Tree {
            path: p.clone(),
            required: true,
            why: "[migrate] extra_trees",
            owner: None,
        }));
        Profile {
            name: config.profile,
            trees,
            owned: vec![Owned {
                path: PathBuf::from("/etc/dkimkeys/opendkim.private"),
                owner: "opendkim:opendkim",
            }],
            accounts: match config.profile {
                ProfileName::Chatmail => &["vmail", "opendkim", "postfix", "postdrop"],
                ProfileName::Classic => &["vmail", "opendkim", "postfix", "postdrop", "dovecot"],
            },
            hold_queue: PathBuf::from("/var/spool/postfix/hold"),
            stop_order: STOP,
            accepting: &["postfix", "opendkim"],
            start_order: START,
            postfix_unit: "postfix@-",
            ports: PORTS,
            smtp_ports: &[25, 465, 587],
            certificate: Some(PathBuf::from(format!(
                "/var/lib/acme/live/{domain}/fullchain"
            ))),
            dkim_key: PathBuf::from("/etc/dkimkeys/opendkim.private"),
        }
    }

    /// The Maildirs: always the first tree (Dovecot's view is read there, and a rollback
    /// carries it back).
    pub fn mailboxes(&self) -> &Path {
        &self.trees[0].path
    }

    /// The units whose state `freeze_old` records and `rollback` restores.
    pub fn units(&self) -> Vec<&'static str> {
        self.stop_order.to_vec()
    }

    /// The units old stops at the freeze: those it needs to neither accept nor sign.
    pub fn stopped_at_freeze(&self) -> Vec<&'static str> {
        self.stop_order
            .iter()
            .copied()
            .filter(|u| !self.accepting.contains(u))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
domain = "mail.example.org"
[hosts.old]
ssh = "old"
ipv4 = "198.51.100.10"
[hosts.new]
ssh = "new"
ipv4 = "198.51.100.20"
[dns]
provider = "manual"
zone = "example.org"
"#;

    #[test]
    fn chatmail_moves_mailboxes_keys_and_acme_and_stops_postfix_first() {
        let p = Profile::of(&Config::parse(BASE).unwrap());
        let trees: Vec<_> = p.trees.iter().map(|t| t.path.to_str().unwrap()).collect();
        assert_eq!(
            trees,
            ["/home/vmail/mail", "/etc/dkimkeys", "/var/lib/acme"]
        );
        assert_eq!(p.stop_order.first(), Some(&"postfix"));
        assert_eq!(p.start_order.last(), Some(&"postfix"));
        assert_eq!(p.stopped_at_freeze(), ["dovecot"]);
    }

    #[test]
    fn classic_takes_its_mail_root_and_extra_trees_from_the_config() {
        let text = BASE
            .replacen("[hosts.old]", "profile = \"classic\"\n[hosts.old]", 1)
            .replace(
                "[dns]",
                "[migrate]\nmail_root = \"/srv/mail\"\nextra_trees = [\"/etc/mailman3\"]\n[dns]",
            );
        let p = Profile::of(&Config::parse(&text).unwrap());
        let trees: Vec<_> = p.trees.iter().map(|t| t.path.to_str().unwrap()).collect();
        assert_eq!(
            trees,
            [
                "/srv/mail",
                "/etc/dkimkeys",
                "/var/lib/acme",
                "/etc/letsencrypt",
                "/etc/mailman3"
            ]
        );
        assert!(p.trees[4].required && !p.trees[3].required);
    }
}
