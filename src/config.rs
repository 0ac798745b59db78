//! `relaymove.toml`: what the whole migration reads. Parsed strictly: an unknown key or a
//! wrong type is an error naming the key and its line. Secrets are never in this file; it
//! names files that hold them, and those files must not be readable by group or others.
//!
//! ```toml
//! domain = "mail.example.org"          # the mail domain; its A/AAAA move to the new host
//! profile = "chatmail"                 # what moves: "chatmail" or "classic" (Postfix + Dovecot + OpenDKIM)
//! ssh_config = "/root/.ssh/config"     # optional: used instead of ~/.ssh/config
//!
//! [hosts.old]
//! ssh = "root@old.example.org"
//! ipv4 = "198.51.100.10"
//! ipv6 = "2001:db8::10"
//!
//! [hosts.new]
//! ssh = "root@new.example.org"
//! ipv4 = "198.51.100.20"
//! ipv6 = "2001:db8::20"
//!
//! [dns]
//! provider = "rfc2136"                 # or "manual", or "command"
//! zone = "example.org"
//! server = "198.51.100.53"             # where updates go (rfc2136)
//! tsig_key = "relaymove."
//! tsig_algorithm = "hmac-sha256"       # or hmac-sha512
//! tsig_secret_file = "/etc/relaymove/tsig.secret"
//!
//! [migrate]                            # optional
//! configure_command = ["cmdeploy", "run", "--ssh-host", "{new}"]  # run on this machine before old stops
//! extra_trees = ["/etc/mailman3"]      # more directories to move, as they are
//! mail_root = "/var/vmail"             # classic: where the Maildirs are
//! route = "direct"                     # or "controller": the data passes through this machine
//! bwlimit = "20M"                      # the first copy at most 20 MiB/s (final sync: full speed)
//! ```
//!
//! `[hosts.new] transfer_address = "10.0.0.20:22"` (optional): where old reaches new's sshd
//! on the direct route, when that differs from how this machine reaches it.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The mail domain: the name whose A and AAAA records point at the mail server.
    pub domain: String,
    /// What a migration moves (trees, units, checks).
    #[serde(default)]
    pub profile: ProfileName,
    /// ssh_config file used instead of `~/.ssh/config` (relative: to this file's directory).
    pub ssh_config: Option<PathBuf>,
    pub hosts: Hosts,
    pub dns: DnsConfig,
    #[serde(default)]
    pub migrate: MigrateConfig,
    /// Where the file was read from; state files go beside it.
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    /// A chatmail relay deployed by cmdeploy.
    #[default]
    Chatmail,
    /// Debian's Postfix + Dovecot + OpenDKIM with ACME certificates.
    Classic,
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct MigrateConfig {
    /// Run on the controller after new is stopped and before old is disabled; `{new}` and
    /// `{old}` in an argument become the hosts' ssh targets.
    pub configure_command: Option<Vec<String>>,
    /// More directories moved like the profile's own (absolute paths).
    #[serde(default)]
    pub extra_trees: Vec<PathBuf>,
    /// classic: the directory holding the Maildirs (default /var/vmail).
    pub mail_root: Option<PathBuf>,
    /// `direct` (default: the hosts copy to each other over SSH with a one-time key) or
    /// `controller` (the data passes through this machine).
    pub route: Option<crate::commands::sync::RouteChoice>,
    /// The first copy (presync, while old serves mail) at most this fast: KiB a second, or
    /// `500K`, `20M`, `1G`. The final sync always runs at full speed.
    pub bwlimit: Option<String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Hosts {
    pub old: HostConfig,
    pub new: HostConfig,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// SSH target, `[user@]host[:port]`.
    pub ssh: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// `host[:port]` where the other host reaches this one's sshd for the direct route;
    /// default: the `ssh` target as this machine's ssh config resolves it.
    pub transfer_address: Option<String>,
}

impl HostConfig {
    pub fn addresses(&self) -> Vec<IpAddr> {
        let v4 = self.ipv4.map(IpAddr::V4);
        let v6 = self.ipv6.map(IpAddr::V6);
        v4.into_iter().chain(v6).collect()
    }
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// RFC 2136 dynamic updates signed with TSIG.
    Rfc2136,
    /// Print the records to set; the operator changes them by hand.
    Manual,
    /// Run a command (lexicon, octoDNS, a provider's CLI) with the change in its environment.
    Command,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TsigAlgorithm {
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub provider: Provider,
    /// The zone holding the mail domain's records.
    pub zone: String,
    /// The zone's authoritative servers (`ip` or `ip:port`). Empty: the zone's NS records,
    /// looked up through `resolver`.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// A recursive resolver (`ip` or `ip:port`) for NS discovery and the mail checks.
    /// Default: the first `nameserver` in /etc/resolv.conf.
    pub resolver: Option<String>,
    /// rfc2136: the primary server that takes updates (`ip` or `ip:port`).
    pub server: Option<String>,
    /// rfc2136: the TSIG key's name.
    pub tsig_key: Option<String>,
    #[serde(default)]
    pub tsig_algorithm: TsigAlgorithm,
    /// rfc2136: file holding the base64 TSIG secret (a bare line, or `tsig-keygen` output).
    pub tsig_secret_file: Option<PathBuf>,
    /// command: the program and its arguments; the change is in its environment.
    pub command: Option<Vec<String>>,
    /// The low TTL the records carry around the cutover, in seconds.
    #[serde(default = "default_low_ttl")]
    pub low_ttl: u32,
    /// How long to wait for every authoritative server to serve a change, in seconds.
    #[serde(default = "default_wait")]
    pub wait_seconds: u64,
    /// DKIM selector whose TXT record is checked.
    #[serde(default = "default_selector")]
    pub dkim_selector: String,
    /// The DKIM private key the new host will sign with (checked against DNS).
    pub dkim_private_key: Option<PathBuf>,
    /// The ACME account URI the new host will use (checked against CAA `accounturi`).
    pub acme_account: Option<String>,
}

fn default_low_ttl() -> u32 {
    300
}
fn default_wait() -> u64 {
    600
}
fn default_selector() -> String {
    "opendkim".to_string()
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading {}\nhint: pass --config FILE, or create relaymove.toml (see README)",
                path.display()
            )
        })?;
        let mut config = Config::parse(&text).with_context(|| format!("in {}", path.display()))?;
        config.path = path.to_path_buf();
        if let Some(ssh) = &config.ssh_config {
            let dir = path.parent().unwrap_or(Path::new("."));
            config.ssh_config = Some(dir.join(ssh));
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config> {
        // toml's message names the key, the line and the column.
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let dns = &self.dns;
        let need = |value: bool, key: &str| -> Result<()> {
            if !value {
                bail!(
                    "[dns] {key} is required with provider = \"{}\"",
                    match dns.provider {
                        Provider::Rfc2136 => "rfc2136",
                        Provider::Manual => "manual",
                        Provider::Command => "command",
                    }
                );
            }
            Ok(())
        };
        match dns.provider {
            Provider::Rfc2136 => {
                need(dns.server.is_some(), "server")?;
                need(dns.tsig_key.is_some(), "tsig_key")?;
                need(dns.tsig_secret_file.is_some(), "tsig_secret_file")?;
            }
            Provider::Command => {
                need(
                    dns.command.as_ref().is_some_and(|c| !c.is_empty()),
                    "command",
                )?;
            }
            Provider::Manual => {}
        }
        let zone = dns.zone.trim_end_matches('.');
        let domain = self.domain.trim_end_matches('.');
        if !(domain == zone || domain.ends_with(&format!(".{zone}"))) {
            bail!("domain {domain:?} is not in [dns] zone {zone:?}");
        }
        for (name, host) in [("old", &self.hosts.old), ("new", &self.hosts.new)] {
            if host.addresses().is_empty() {
                bail!("[hosts.{name}] needs ipv4, ipv6 or both: the addresses DNS points at");
            }
            crate::remote::endpoint::parse_ssh_target(&host.ssh)
                .map_err(|e| anyhow::anyhow!("[hosts.{name}] ssh: {e}"))?;
            if let Some(t) = &host.transfer_address {
                crate::remote::endpoint::TransferAddress::parse(t)
                    .map_err(|e| anyhow::anyhow!("[hosts.{name}] transfer_address: {e}"))?;
            }
        }
        if let Some(rate) = &self.migrate.bwlimit {
            crate::commands::sync::parse_rate(rate)
                .map_err(|e| anyhow::anyhow!("[migrate] bwlimit: {e}"))?;
        }
        if self
            .migrate
            .configure_command
            .as_ref()
            .is_some_and(|c| c.is_empty())
        {
            bail!("[migrate] configure_command is empty: give the program and its arguments, or remove the key");
        }
        for tree in &self.migrate.extra_trees {
            if !tree.is_absolute() || tree.parent().is_none() {
                bail!(
                    "[migrate] extra_trees: {} must be an absolute path below /",
                    tree.display()
                );
            }
        }
        Ok(())
    }

    /// A file beside the config: `relaymove.toml` + `suffix`.
    pub fn beside(&self, suffix: &str) -> PathBuf {
        let mut name = self
            .path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "relaymove.toml".into());
        name.push(suffix);
        self.path.with_file_name(name)
    }

    /// Where DNS staging state is kept: beside the config file.
    pub fn state_path(&self) -> PathBuf {
        self.beside(".dns-state.json")
    }
}

/// Reads a TSIG secret: refuses a file group or others can read, never shows its content.
pub fn read_tsig_secret(path: &Path) -> Result<Vec<u8>> {
    use base64::Engine as _;
    let md = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if md.mode() & 0o077 != 0 {
        bail!(
            "the TSIG secret file {} can be read by group or others (mode {:o}); run: chmod 600 {}",
            path.display(),
            md.mode() & 0o777,
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // A bare base64 line, or `secret "…";` as tsig-keygen writes it, or `secret: …` (Knot).
    let token = match text.find("secret") {
        Some(i) => text[i + "secret".len()..]
            .trim_start_matches([' ', '\t', ':', '"'])
            .split(['"', ';', '\n', ' '])
            .next()
            .unwrap_or(""),
        None => text.trim(),
    };
    let secret = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .map_err(|_| {
            anyhow::anyhow!(
                "{} does not hold a base64 TSIG secret (expected a bare line or tsig-keygen output)",
                path.display()
            )
        })?;
    if secret.is_empty() {
        bail!("{} holds an empty TSIG secret", path.display());
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
domain = "mail.example.org"
[hosts.old]
ssh = "root@old"
ipv4 = "198.51.100.10"
[hosts.new]
ssh = "root@new"
ipv4 = "198.51.100.20"
ipv6 = "2001:db8::20"
[dns]
provider = "rfc2136"
zone = "example.org"
server = "127.0.0.1:5300"
tsig_key = "relaymove."
tsig_secret_file = "/x"
"#;

    #[test]
    fn parses_a_good_file() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.dns.provider, Provider::Rfc2136);
        assert_eq!(c.dns.low_ttl, 300);
        assert_eq!(c.hosts.new.addresses().len(), 2);
    }

    /// The .deb ships it as the starting point: it must stay a config relaymove accepts.
    #[test]
    fn the_shipped_example_parses() {
        let c = Config::parse(include_str!("../examples/relaymove.toml")).unwrap();
        assert_eq!(c.domain, "mail.example.org");
        assert_eq!(c.hosts.old.addresses().len(), 2);
        assert_eq!(c.dns.provider, Provider::Rfc2136);
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let text = GOOD.replace("zone = ", "zonee = \"x\"\nzone = ");
        let err = format!("{:#}", Config::parse(&text).unwrap_err());
        assert!(err.contains("zonee") && err.contains("line 12"), "{err}");
    }

    #[test]
    fn a_wrong_type_is_named_with_its_line() {
        let text = GOOD.replace("ipv4 = \"198.51.100.10\"", "ipv4 = 5");
        let err = format!("{:#}", Config::parse(&text).unwrap_err());
        assert!(err.contains("line 5") && err.contains("ipv4"), "{err}");
    }

    #[test]
    fn profile_defaults_to_chatmail_and_ssh_targets_are_checked() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.profile, ProfileName::Chatmail);
        let text = GOOD.replace("ssh = \"root@new\"", "ssh = \"root@new:/x\"");
        let err = format!("{:#}", Config::parse(&text).unwrap_err());
        assert!(err.contains("[hosts.new] ssh"), "{err}");
        let text = GOOD.replace("[dns]", "[migrate]\nextra_trees = [\"etc\"]\n[dns]");
        let err = format!("{:#}", Config::parse(&text).unwrap_err());
        assert!(err.contains("extra_trees"), "{err}");
    }

    #[test]
    fn provider_fields_are_required() {
        let text = GOOD.replace("server = \"127.0.0.1:5300\"\n", "");
        let err = format!("{:#}", Config::parse(&text).unwrap_err());
        assert!(err.contains("[dns] server is required"), "{err}");
    }

    #[test]
    fn a_readable_secret_is_refused_and_never_shown() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("k");
        std::fs::write(&f, "key \"relaymove.\" {\n algorithm hmac-sha256;\n secret \"c2VjcmV0LWtleS1ieXRlcw==\";\n};\n").unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let err = format!("{:#}", read_tsig_secret(&f).unwrap_err());
        assert!(err.contains("chmod 600") && !err.contains("c2Vj"), "{err}");
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        assert_eq!(read_tsig_secret(&f).unwrap(), b"secret-key-bytes");
        std::fs::write(&f, "c2VjcmV0LWtleS1ieXRlcw==\n").unwrap();
        assert_eq!(read_tsig_secret(&f).unwrap(), b"secret-key-bytes");
    }
}
