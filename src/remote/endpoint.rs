//! `PATH` or `[user@]host[:port]:PATH`, as rsync and scp users expect. A colon before any
//! slash makes it remote; `./a:b` and `/a:b` stay local. IPv6 hosts go in brackets.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Local(PathBuf),
    Remote(RemotePath),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePath {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub path: PathBuf,
}

impl fmt::Display for RemotePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            write!(f, "{}", self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write!(f, ":{}", self.path.display())
    }
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if s.is_empty() {
            return Err("empty path".into());
        }
        let colon = match s.find(':') {
            Some(i) if !s[..i].contains('/') => i,
            _ => return Ok(Endpoint::Local(PathBuf::from(s))),
        };
        let (user, rest) = match s[..colon].rfind('@') {
            Some(at) => (Some(s[..at].to_string()), &s[at + 1..]),
            None => (None, s),
        };
        let (host, after) = if let Some(stripped) = rest.strip_prefix('[') {
            let end = stripped
                .find(']')
                .ok_or_else(|| format!("{s}: missing `]` after an IPv6 address"))?;
            let after = stripped[end + 1..]
                .strip_prefix(':')
                .ok_or_else(|| format!("{s}: expected `:` after `]`"))?;
            (stripped[..end].to_string(), after)
        } else {
            let i = rest
                .find(':')
                .ok_or_else(|| format!("{s}: expected host:PATH"))?;
            (rest[..i].to_string(), &rest[i + 1..])
        };
        if host.is_empty() {
            return Err(format!("{s}: empty host name"));
        }
        if user.as_deref() == Some("") {
            return Err(format!("{s}: empty user name"));
        }
        let (port, path) = match after.split_once(':') {
            Some((p, path)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| format!("{s}: port {p} is out of range"))?;
                (Some(port), path)
            }
            _ => (None, after),
        };
        if !path.starts_with('/') {
            return Err(format!(
                "{s}: the remote path must be absolute (like host:/home/vmail/mail)"
            ));
        }
        Ok(Endpoint::Remote(RemotePath {
            user,
            host,
            port,
            path: PathBuf::from(path),
        }))
    }
}

/// A config's `ssh = "[user@]host[:port]"` (IPv6 hosts in brackets), as the host part of a
/// remote endpoint with `/` as its path.
pub fn parse_ssh_target(s: &str) -> Result<RemotePath, String> {
    if s.is_empty() || s.contains('/') {
        return Err(format!("{s:?}: expected [user@]host[:port]"));
    }
    match Endpoint::parse(&format!("{s}:/"))? {
        Endpoint::Remote(r) => Ok(r),
        Endpoint::Local(_) => Err(format!("{s:?}: expected [user@]host[:port]")),
    }
}

/// Where the sending host reaches the receiving host's sshd for a direct transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferAddress {
    pub host: String,
    pub port: u16,
}

impl TransferAddress {
    /// `host[:port]` (IPv6 in brackets), port 22 unless given.
    pub fn parse(s: &str) -> Result<TransferAddress, String> {
        let r = parse_ssh_target(s).map_err(|_| format!("{s:?}: expected host[:port]"))?;
        if r.user.is_some() {
            return Err(format!(
                "{s:?}: a transfer address has no user (the receiving agent's user logs in)"
            ));
        }
        Ok(TransferAddress {
            host: r.host,
            port: r.port.unwrap_or(22),
        })
    }
}

impl fmt::Display for TransferAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(user: Option<&str>, host: &str, port: Option<u16>, path: &str) -> Endpoint {
        Endpoint::Remote(RemotePath {
            user: user.map(String::from),
            host: host.into(),
            port,
            path: path.into(),
        })
    }

    #[test]
    fn parses_the_forms_users_type() {
        assert_eq!(
            Endpoint::parse("/var/mail").unwrap(),
            Endpoint::Local("/var/mail".into())
        );
        assert_eq!(
            Endpoint::parse("rel/a:b").unwrap(),
            Endpoint::Local("rel/a:b".into())
        );
        assert_eq!(
            Endpoint::parse("plain").unwrap(),
            Endpoint::Local("plain".into())
        );
        assert_eq!(
            Endpoint::parse("old:/home/vmail").unwrap(),
            remote(None, "old", None, "/home/vmail")
        );
        assert_eq!(
            Endpoint::parse("root@mail.example.org:2222:/x").unwrap(),
            remote(Some("root"), "mail.example.org", Some(2222), "/x")
        );
        assert_eq!(
            Endpoint::parse("[2001:db8::1]:/x").unwrap(),
            remote(None, "2001:db8::1", None, "/x")
        );
        assert_eq!(
            Endpoint::parse("u@[2001:db8::1]:22:/x").unwrap(),
            remote(Some("u"), "2001:db8::1", Some(22), "/x")
        );
    }

    #[test]
    fn parses_ssh_targets_of_the_config() {
        assert_eq!(
            Endpoint::Remote(parse_ssh_target("root@old.example.org:2222").unwrap()),
            remote(Some("root"), "old.example.org", Some(2222), "/")
        );
        assert_eq!(
            Endpoint::Remote(parse_ssh_target("[2001:db8::1]").unwrap()),
            remote(None, "2001:db8::1", None, "/")
        );
        assert!(parse_ssh_target("old:/x").is_err());
        assert!(parse_ssh_target("").is_err());
    }

    #[test]
    fn parses_transfer_addresses() {
        let a = |host: &str, port| TransferAddress {
            host: host.into(),
            port,
        };
        assert_eq!(
            TransferAddress::parse("10.0.0.2").unwrap(),
            a("10.0.0.2", 22)
        );
        assert_eq!(
            TransferAddress::parse("[2001:db8::20]:2222").unwrap(),
            a("2001:db8::20", 2222)
        );
        assert_eq!(a("2001:db8::20", 22).to_string(), "[2001:db8::20]:22");
        assert!(TransferAddress::parse("root@new").is_err());
        assert!(TransferAddress::parse("new:/x").is_err());
    }

    #[test]
    fn refuses_what_would_surprise() {
        assert!(Endpoint::parse("").is_err());
        assert!(Endpoint::parse("host:relative").is_err());
        assert!(Endpoint::parse(":/x").is_err());
        assert!(Endpoint::parse("host:99999:/x").is_err());
        assert!(Endpoint::parse("[::1/x").is_err());
    }
}
