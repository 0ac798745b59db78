//! Real authoritative DNS for the tests: a Knot primary that takes TSIG-signed updates and a
//! secondary that follows it by SOA refresh only (no NOTIFY), so it lags a couple of seconds.
//! Both listen on loopback ports; the zones are written here.
#![allow(dead_code)] // shared by tests that each use a part

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SECRET: &str = "cmVsYXltb3ZlLXRlc3Qta2V5LWJ5dGVzLTMyYnl0ZXM=";
pub const WRONG_SECRET: &str = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktIQ==";

pub struct Knot {
    pub dir: tempfile::TempDir,
    pub primary: u16,
    pub secondary: u16,
    children: Vec<Child>,
}

impl Drop for Knot {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    // A port free for both UDP and TCP on loopback.
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Why these tests cannot run here, if they cannot.
pub fn missing() -> Option<&'static str> {
    if !Path::new("/usr/sbin/knotd").exists() {
        Some("knotd is not installed (apt-get install knot knot-dnsutils)")
    } else if !Path::new("/usr/bin/kdig").exists() {
        Some("kdig is not installed (apt-get install knot-dnsutils)")
    } else {
        None
    }
}

pub fn zone(dkim_txt: &str) -> String {
    // DKIM keys exceed 255 bytes: split into character-strings as zone files must.
    let chunks: Vec<String> = dkim_txt
        .as_bytes()
        .chunks(200)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    let includes: String = (1..=11)
        .map(|i| format!(" include:_l{i}.example.org"))
        .collect();
    let leaves: String = (1..=11)
        .map(|i| format!("_l{i} TXT \"v=spf1 ip4:192.0.2.{i} -all\"\n"))
        .collect();
    format!(
        "$ORIGIN example.org.\n$TTL 3600\n\
@ SOA ns1.example.org. hostmaster.example.org. 2026112201 2 1 600 60\n\
@ NS ns1\n@ NS ns2\nns1 A 127.0.0.1\nns2 A 127.0.0.1\n\
mail 3600 A 198.51.100.10\n\
mail MX 10 mail.example.org.\n\
mail TXT \"v=spf1 a include:_spf.example.org ~all\"\n\
_spf TXT \"v=spf1 ip4:192.0.2.0/24 -all\"\n\
opendkim._domainkey.mail TXT {}\n\
_dmarc.mail TXT \"v=DMARC1;p=reject\"\n\
_mta-sts.mail TXT \"v=STSv1; id=1\"\n\
mail CAA 0 issue \"letsencrypt.org;accounturi=https://acme.example/acct/1\"\n\
web CNAME mail.example.org.\n\
chain TXT \"v=spf1 include:_c1.example.org -all\"\n\
chain A 198.51.100.10\n\
_c1 TXT \"v=spf1 include:_c2.example.org -all\"\n\
_c2 TXT \"v=spf1 ip4:198.51.100.20 ip6:2001:db8::/64 -all\"\n\
hard TXT \"v=spf1 -all\"\n\
hard A 198.51.100.10\n\
many TXT \"v=spf1{includes} -all\"\n\
many A 198.51.100.10\n\
{leaves}",
        chunks.join(" ")
    )
}

const REVERSE: &str = "$ORIGIN 100.51.198.in-addr.arpa.\n$TTL 3600\n\
@ SOA ns1.example.org. hostmaster.example.org. 1 2 1 600 60\n@ NS ns1.example.org.\n\
20 PTR mail.example.org.\n10 PTR old.example.net.\n";

impl Knot {
    pub fn start(dkim_txt: &str) -> Knot {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let (primary, secondary) = (free_port(), free_port());
        for role in ["p", "s"] {
            fs::create_dir_all(d.join(role).join("db")).unwrap();
        }
        fs::write(d.join("p/example.org.zone"), zone(dkim_txt)).unwrap();
        fs::write(d.join("p/rev.zone"), REVERSE).unwrap();
        let common = |role: &str, port: u16| {
            [
                "server:".to_string(),
                format!("  rundir: \"{}/{role}\"", d.display()),
                format!("  listen: 127.0.0.1@{port}"),
                "database:".to_string(),
                format!("  storage: \"{}/{role}/db\"", d.display()),
                "log:".to_string(),
                "  - target: stderr".to_string(),
                "    any: warning".to_string(),
                "key:".to_string(),
                "  - id: relaymove.".to_string(),
                "    algorithm: hmac-sha256".to_string(),
                format!("    secret: {SECRET}"),
                "template:".to_string(),
                "  - id: default".to_string(),
                format!("    storage: \"{}/{role}\"", d.display()),
            ]
            .join("\n")
        };
        let primary_conf = [
            common("p", primary),
            "acl:".into(),
            "  - id: update".into(),
            "    key: relaymove.".into(),
            "    action: update".into(),
            "  - id: transfer".into(),
            "    address: 127.0.0.0/8".into(),
            "    action: transfer".into(),
            "zone:".into(),
            "  - domain: example.org".into(),
            "    file: example.org.zone".into(),
            "    acl: [update, transfer]".into(),
            "  - domain: 100.51.198.in-addr.arpa".into(),
            "    file: rev.zone".into(),
            "    acl: [transfer]".into(),
            String::new(),
        ]
        .join("\n");
        let secondary_conf = [
            common("s", secondary),
            "remote:".into(),
            "  - id: primary".into(),
            format!("    address: 127.0.0.1@{primary}"),
            "zone:".into(),
            "  - domain: example.org".into(),
            "    master: primary".into(),
            "  - domain: 100.51.198.in-addr.arpa".into(),
            "    master: primary".into(),
            String::new(),
        ]
        .join("\n");
        fs::write(d.join("primary.conf"), primary_conf).unwrap();
        fs::write(d.join("secondary.conf"), secondary_conf).unwrap();
        let mut knot = Knot {
            dir,
            primary,
            secondary,
            children: Vec::new(),
        };
        // The primary first: a secondary that finds no primary backs off for a while.
        let deadline = Instant::now() + Duration::from_secs(30);
        for (conf, port) in [("primary.conf", primary), ("secondary.conf", secondary)] {
            let log = fs::File::create(d.join(format!("{conf}.log"))).unwrap();
            let child = Command::new("/usr/sbin/knotd")
                .arg("-c")
                .arg(d.join(conf))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting knotd");
            knot.children.push(child);
            while knot.soa_serial(port).is_none() {
                assert!(
                    Instant::now() < deadline,
                    "knotd on port {port} did not serve example.org:\n{}\n{}",
                    fs::read_to_string(d.join("primary.conf.log")).unwrap_or_default(),
                    fs::read_to_string(d.join("secondary.conf.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        knot
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `kdig` at one server: the answer section's values, one per line.
    pub fn dig(&self, port: u16, name: &str, rtype: &str) -> Vec<String> {
        let out = Command::new("kdig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                name,
                rtype,
                "+short",
                "+norec",
                "+timeout=2",
            ])
            .output()
            .expect("running kdig");
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    pub fn soa_serial(&self, port: u16) -> Option<u32> {
        self.dig(port, "example.org.", "SOA")
            .first()?
            .split_whitespace()
            .nth(2)?
            .parse()
            .ok()
    }

    /// Changes the zone behind relaymove's back, the way another admin would.
    pub fn nsupdate(&self, commands: &str) {
        let script = format!(
            "server 127.0.0.1 {}\nzone example.org.\n{commands}\nsend\n",
            self.primary
        );
        let mut child = Command::new("knsupdate")
            .args(["-y", &format!("hmac-sha256:relaymove.:{SECRET}")])
            .stdin(Stdio::piped())
            .spawn()
            .expect("running knsupdate");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "knsupdate failed");
    }

    /// A relaymove.toml for this pair of servers, for the mail domain `domain`.
    pub fn config(&self, domain: &str, secret: &str, extra: &str) -> PathBuf {
        let secret_file = self.path(&format!("secret-{}", &secret[..8]));
        fs::write(&secret_file, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(
            &secret_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let config = self.path(&format!("{domain}-{}.toml", &secret[..8]));
        fs::write(
            &config,
            format!(
                "domain = \"{domain}\"\n\
[hosts.old]\nssh = \"root@old\"\nipv4 = \"198.51.100.10\"\n\
[hosts.new]\nssh = \"root@new\"\nipv4 = \"198.51.100.20\"\nipv6 = \"2001:db8::20\"\n\
[dns]\nprovider = \"rfc2136\"\nzone = \"example.org\"\n\
nameservers = [\"127.0.0.1:{p}\", \"127.0.0.1:{s}\"]\nresolver = \"127.0.0.1:{p}\"\n\
server = \"127.0.0.1:{p}\"\ntsig_key = \"relaymove.\"\ntsig_secret_file = \"{f}\"\n\
wait_seconds = 30\n{extra}\n",
                p = self.primary,
                s = self.secondary,
                f = secret_file.display()
            ),
        )
        .unwrap();
        config
    }
}
