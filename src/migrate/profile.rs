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
                    CHATMAIL_MAILBOXES,
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
                    .unwrap_or_else(|| PathBuf::from(CLASSIC_MAILBOXES));
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

/// What on old says which profile it runs, as `relaymove init` looks for it: the files of
/// `MARKERS` that exist there, and Dovecot's `mail_location`, if Dovecot is installed.
#[derive(Debug, Default, Clone)]
pub struct ProfileFacts {
    pub existing: Vec<PathBuf>,
    pub mail_location: Option<String>,
}

/// chatmail's own units (cmdeploy installs them under /etc/systemd/system).
const CHATMAIL_UNITS: &[&str] = &[
    "/etc/systemd/system/doveauth.service",
    "/etc/systemd/system/filtermail.service",
    "/etc/systemd/system/chatmail-metadata.service",
];
const CHATMAIL_MAILBOXES: &str = "/home/vmail/mail";
const CLASSIC_MAILBOXES: &str = "/var/vmail";

/// Paths whose presence tells the profiles apart.
pub fn markers() -> Vec<&'static str> {
    let roots = [CHATMAIL_MAILBOXES, CLASSIC_MAILBOXES];
    CHATMAIL_UNITS.iter().copied().chain(roots).collect()
}

/// The profile a host's facts point to, why, and for classic where the Maildirs are when
/// that is not the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recognised {
    pub profile: ProfileName,
    pub why: String,
    pub mail_root: Option<PathBuf>,
}

impl ProfileFacts {
    /// Chatmail wins when any of its traces exists (its units, or its mailbox root);
    /// classic needs Dovecot or /var/vmail. `None`: neither.
    pub fn recognise(&self) -> Option<Recognised> {
        let has = |p: &str| self.existing.iter().any(|e| e == Path::new(p));
        if let Some(unit) = CHATMAIL_UNITS.iter().find(|m| has(m)) {
            return Some(Recognised {
                profile: ProfileName::Chatmail,
                why: format!("chatmail's {unit} is installed"),
                mail_root: None,
            });
        }
        if has(CHATMAIL_MAILBOXES) {
            return Some(Recognised {
                profile: ProfileName::Chatmail,
                why: format!("{CHATMAIL_MAILBOXES} holds the mailboxes, as on a chatmail relay"),
                mail_root: None,
            });
        }
        if let Some(location) = &self.mail_location {
            let root = mail_root_of(location);
            return Some(Recognised {
                profile: ProfileName::Classic,
                why: format!("Dovecot's mail_location is {location}"),
                mail_root: root.filter(|r| r != Path::new(CLASSIC_MAILBOXES)),
            });
        }
        has(CLASSIC_MAILBOXES).then(|| Recognised {
            profile: ProfileName::Classic,
            why: format!("{CLASSIC_MAILBOXES} exists"),
            mail_root: None,
        })
    }
}

/// The fixed directory above the per-user Maildirs of a `mail_location` such as
/// `maildir:/srv/mail/%d/%n:LAYOUT=fs`; `None` for home directories (`~/Maildir`).
fn mail_root_of(location: &str) -> Option<PathBuf> {
    let path = location.split(':').nth(1)?;
    let fixed: Vec<&str> = path
        .split('/')
        .take_while(|c| !c.contains('%') && !c.contains('~'))
        .collect();
    let root = PathBuf::from(fixed.join("/"));
    (root.is_absolute() && root.parent().is_some()).then_some(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(existing: &[&str], location: Option<&str>) -> Option<Recognised> {
        ProfileFacts {
            existing: existing.iter().map(PathBuf::from).collect(),
            mail_location: location.map(String::from),
        }
        .recognise()
    }

    #[test]
    fn recognises_chatmail_by_its_units_or_mailboxes_and_classic_by_dovecot() {
        let c = facts(
            &["/etc/systemd/system/doveauth.service", "/var/vmail"],
            Some("maildir:/home/vmail/mail/%d/%u"),
        )
        .unwrap();
        assert_eq!(c.profile, ProfileName::Chatmail);
        assert!(c.why.contains("doveauth"), "{}", c.why);
        let c = facts(&["/home/vmail/mail"], None).unwrap();
        assert_eq!(c.profile, ProfileName::Chatmail);
        let c = facts(&[], Some("maildir:/srv/mail/%d/%n:LAYOUT=fs")).unwrap();
        assert_eq!(
            (c.profile, c.mail_root),
            (ProfileName::Classic, Some(PathBuf::from("/srv/mail")))
        );
        let c = facts(&[], Some("maildir:/var/vmail/%d/%n")).unwrap();
        assert_eq!(c.mail_root, None, "the default is not written out");
        let c = facts(&[], Some("maildir:~/Maildir")).unwrap();
        assert_eq!((c.profile, c.mail_root), (ProfileName::Classic, None));
        assert_eq!(
            facts(&["/var/vmail"], None).map(|r| r.profile),
            Some(ProfileName::Classic)
        );
        assert_eq!(facts(&[], None), None);
    }

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
