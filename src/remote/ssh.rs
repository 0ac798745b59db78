//! The cipher order relaymove asks ssh for, and why an SSH connection failed, in ssh's own
//! words, with the next step that fits the reason.
//!
//! ssh reports a failed connection only as text on its stderr (the `openssh` crate keeps it
//! as the error's source), so the reason is recognised from that text. Pure functions: the
//! caller supplies the settings ssh actually used (`ssh -G`), this module builds the message.

use std::path::PathBuf;

/// OpenSSH's default ciphers with AES-GCM first, for a CPU with AES instructions.
///
/// OpenSSH lists chacha20-poly1305 first because it is fast everywhere, also without them.
/// With them AES-GCM takes half the CPU (measured: 1 GB through ssh in 1.7 s against 3.1 s),
/// and a first copy spends about as much CPU in ssh and sshd as in either agent (on a
/// 2-core host the whole copy took 12% less time). The same ciphers in another order: sshd
/// still takes the first one it allows, and a `Ciphers` line in the user's config wins.
pub fn cipher_order() -> Option<&'static str> {
    has_aes().then_some(
        "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,\
         aes128-ctr,aes192-ctr,aes256-ctr",
    )
}

/// AES rounds and the carry-less multiply GCM needs, in hardware.
fn has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// What ssh used for a connection, as `ssh -G` resolves it from the command line and config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effective {
    pub hostname: String,
    pub port: u16,
    pub user: String,
    pub known_hosts: Option<String>,
}

impl Effective {
    /// Parses `ssh -G` output; a key it lacks keeps the value of `fallback`.
    pub fn parse(text: &str, fallback: Effective) -> Effective {
        let mut out = fallback;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("hostname", v)) => out.hostname = v.to_string(),
                Some(("port", v)) => out.port = v.parse().unwrap_or(out.port),
                Some(("user", v)) => out.user = v.to_string(),
                Some(("userknownhostsfile", v)) => {
                    out.known_hosts = v.split_whitespace().next().map(str::to_string)
                }
                _ => {}
            }
        }
        out
    }
}

/// The reasons a user can act on, recognised from ssh's stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    UnknownHostKey,
    ChangedHostKey,
    Refused,
    PermissionDenied,
    NoSuchHost,
    Unreachable,
    Other,
}

impl Reason {
    pub fn of(ssh_said: &str) -> Reason {
        let has = |s: &str| ssh_said.contains(s);
        if has("REMOTE HOST IDENTIFICATION HAS CHANGED") || has("Offending ") {
            Reason::ChangedHostKey
        } else if has("Host key verification failed") || has("host key is known") {
            Reason::UnknownHostKey
        } else if has("Connection refused") {
            Reason::Refused
        } else if has("Permission denied") || has("Too many authentication failures") {
            Reason::PermissionDenied
        } else if has("Could not resolve hostname") {
            Reason::NoSuchHost
        } else if has("timed out") || has("No route to host") || has("Network is unreachable") {
            Reason::Unreachable
        } else {
            Reason::Other
        }
    }
}

/// ssh's stderr as one line: the banner of `@` lines dropped, the rest joined.
pub fn condense(ssh_said: &str) -> String {
    ssh_said
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('@'))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The message for a failed connection to `label`: ssh's reason, what was used, what to do.
/// `config` is the user's ssh config file relaymove included (None: only the system one).
pub fn connect_failure(
    label: &str,
    ssh_said: &str,
    used: &Effective,
    config: Option<&PathBuf>,
) -> String {
    let config_text = match config {
        Some(c) => c.display().to_string(),
        None => "/etc/ssh/ssh_config only".to_string(),
    };
    // Where a host's settings belong: the user's config, or the one ssh would read next.
    let edit = match config {
        Some(c) => c.display().to_string(),
        None => "~/.ssh/config".to_string(),
    };
    let f_arg = config
        .map(|c| format!("-F {} ", c.display()))
        .unwrap_or_default();
    let check = format!(
        "ssh {f_arg}-p {} {}@{} true",
        used.port, used.user, used.hostname
    );
    let known_hosts = used.known_hosts.as_deref().unwrap_or("~/.ssh/known_hosts");
    let key_name = if used.port == 22 {
        used.hostname.clone()
    } else {
        format!("[{}]:{}", used.hostname, used.port)
    };
    let (host, port) = (&used.hostname, used.port);
    let hint = match Reason::of(ssh_said) {
        Reason::UnknownHostKey => format!(
            "{key_name} is not in {known_hosts} (relaymove checks host keys strictly): compare the fingerprint \
             of `ssh-keyscan -p {port} {host} | ssh-keygen -lf -` with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` \
             on the host, then add it: `ssh-keyscan -p {port} {host} >> {known_hosts}`"
        ),
        Reason::ChangedHostKey => format!(
            "the host key of {key_name} differs from the one in {known_hosts}: if the host was reinstalled, check \
             its new fingerprint on the host, then `ssh-keygen -R '{key_name}' -f {known_hosts}` and add the new key; \
             otherwise do not connect"
        ),
        Reason::Refused => format!(
            "nothing accepts SSH connections on {host} port {port}: is sshd running there, and is the port right? \
             (give it as host:PORT:/path, or as Port in {edit})"
        ),
        Reason::PermissionDenied => format!(
            "{host} port {port} refused the login as {user}: relaymove cannot answer prompts; load the key into \
             ssh-agent or set IdentityFile for this host in {edit}, and check the host's authorized_keys; \
             `{check}` must work without a prompt",
            user = used.user
        ),
        Reason::NoSuchHost => format!(
            "{host} does not resolve: check the name, or set HostName for it in {edit}"
        ),
        Reason::Unreachable => format!(
            "{host} port {port} did not answer: check the address, the port and the firewall; `{check}` must work"
        ),
        Reason::Other => format!(
            "check that `{check}` works without a prompt (ssh config {config_text}, host keys in {known_hosts}, \
             checked strictly)"
        ),
    };
    let said = condense(ssh_said);
    let said = if said.is_empty() {
        "ssh gave no reason".to_string()
    } else {
        said
    };
    format!(
        "cannot connect to {label} over SSH (port {port}, ssh config {config_text}): {said}\nhint: {hint}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used() -> Effective {
        Effective {
            hostname: "127.0.0.1".into(),
            port: 2299,
            user: "root".into(),
            known_hosts: Some("/k/known_hosts".into()),
        }
    }

    #[test]
    fn each_reason_gets_its_own_hint_naming_the_port_and_config() {
        let config = PathBuf::from("/c/ssh_config");
        for (said, wants) in [
            (
                "No ED25519 host key is known for [127.0.0.1]:2299 and you have requested strict checking.\r\nHost key verification failed.",
                "ssh-keyscan -p 2299 127.0.0.1 >> /k/known_hosts",
            ),
            (
                "@@@@@@@@\r\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\r\nOffending ED25519 key in /k/known_hosts:1\r\nHost key verification failed.",
                "ssh-keygen -R '[127.0.0.1]:2299'",
            ),
            (
                "ssh: connect to host 127.0.0.1 port 2299: Connection refused",
                "is sshd running there",
            ),
            (
                "root@127.0.0.1: Permission denied (publickey).",
                "set IdentityFile for this host in /c/ssh_config",
            ),
            (
                "ssh: Could not resolve hostname nosuch.invalid: Name or service not known",
                "does not resolve",
            ),
            (
                "ssh: connect to host 10.9.9.9 port 22: Connection timed out",
                "did not answer",
            ),
        ] {
            let msg = connect_failure("root@x", said, &used(), Some(&config));
            assert!(msg.contains(wants), "{msg}");
            assert!(
                msg.contains("port 2299, ssh config /c/ssh_config"),
                "{msg}"
            );
            assert!(!msg.contains("@@"), "{msg}");
        }
    }

    #[test]
    fn ssh_g_output_fills_what_ssh_used() {
        let e = Effective::parse(
            "user root\nhostname 10.0.0.1\nport 2298\nuserknownhostsfile /a /b\n",
            Effective::default(),
        );
        assert_eq!(
            e,
            Effective {
                hostname: "10.0.0.1".into(),
                port: 2298,
                user: "root".into(),
                known_hosts: Some("/a".into())
            }
        );
    }
}
