//! `relaymove dns …` against real Knot DNS servers the tests start on loopback: a primary
//! taking TSIG-signed RFC 2136 updates and a secondary that follows it by SOA refresh (no
//! NOTIFY), so propagation really lags. Needs knotd, kdig, knsupdate and openssl; without
//! them the tests say why and pass, unless `RELAYMOVE_REQUIRE_DNS=1` (set by tests/run-all).

mod common;

use common::knot::{Knot, SECRET, WRONG_SECRET};
use std::path::Path;
use std::process::{Command, Output};

fn ready() -> bool {
    let missing = common::knot::missing().or_else(|| {
        (!Path::new("/usr/bin/openssl").exists()).then_some("openssl is not installed")
    });
    match missing {
        Some(why) => {
            assert!(
                std::env::var("RELAYMOVE_REQUIRE_DNS").as_deref() != Ok("1"),
                "DNS tests required but {why}"
            );
            eprintln!("skipping DNS test: {why}");
            false
        }
        None => true,
    }
}

fn dns(config: &Path, args: &[&str]) -> Output {
    Command::new(common::bin())
        .arg("dns")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("running relaymove")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// An RSA key in PEM and its DKIM record, made by openssl (not by the code under test).
fn dkim_key(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let pem = dir.join(format!("{name}.pem"));
    let ok = Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&pem)
        .arg("2048")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let der = Command::new("openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    assert!(der.status.success());
    use base64::Engine as _;
    let p = base64::engine::general_purpose::STANDARD.encode(&der.stdout);
    (pem, format!("v=DKIM1;k=rsa;p={p}"))
}

#[test]
fn status_lists_every_server_with_serial_and_records() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    let config = knot.config("mail.example.org", SECRET, "");
    let out = dns(&config, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["servers"].as_array().unwrap().len(), 2);
    assert_eq!(v["servers"][0]["serial"], 2026112201);
    assert_eq!(v["servers"][0]["negative_ttl"], 60);
    assert_eq!(v["agree"], true, "{v}");
    assert_eq!(v["addresses"][0]["value"], "198.51.100.10");
    assert_eq!(v["addresses"][0]["points_at"], "old host");
    assert_eq!(v["new_types"][0], "AAAA");
    let records = v["servers"][1]["records"].as_array().unwrap();
    let has = |t: &str, needle: &str| {
        records
            .iter()
            .any(|r| r["type"] == t && r["value"].as_str().unwrap().contains(needle))
    };
    assert!(has("MX", "mail.example.org."), "{v}");
    assert!(
        has("TXT", "v=DMARC1") && has("TXT", "v=STSv1") && has("CAA", "accounturi"),
        "{v}"
    );
    let human = dns(&config, &["status"]);
    eprintln!("{}", text(&human));
    assert!(
        text(&human).contains("all 2 servers agree"),
        "{}",
        text(&human)
    );
}

#[test]
fn cutover_waits_for_the_lagging_secondary_then_rollback_restores() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    let config = knot.config("mail.example.org", SECRET, "");
    let out = dns(&config, &["cutover"]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    // The secondary has no NOTIFY: it served the old address for a while, and relaymove waited.
    assert!(
        said.contains("every authoritative server serves it"),
        "{said}"
    );
    for port in [knot.primary, knot.secondary] {
        assert_eq!(
            knot.dig(port, "mail.example.org.", "A"),
            vec!["198.51.100.20"]
        );
        assert_eq!(
            knot.dig(port, "mail.example.org.", "AAAA"),
            vec!["2001:db8::20"]
        );
    }
    assert!(
        said.contains("resolvers may hand out the previous answer until"),
        "{said}"
    );
    let again = dns(&config, &["cutover"]);
    assert!(
        text(&again).contains("already points at the new host"),
        "{}",
        text(&again)
    );
    let back = dns(&config, &["rollback"]);
    assert!(back.status.success(), "{}", text(&back));
    for port in [knot.primary, knot.secondary] {
        assert_eq!(
            knot.dig(port, "mail.example.org.", "A"),
            vec!["198.51.100.10"]
        );
        assert!(knot.dig(port, "mail.example.org.", "AAAA").is_empty());
    }
}

#[test]
fn a_wrong_tsig_secret_changes_nothing_and_says_why() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    let config = knot.config("mail.example.org", WRONG_SECRET, "");
    let out = dns(&config, &["cutover"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("TSIG") && said.contains("nothing changed"),
        "{said}"
    );
    assert!(!said.contains(WRONG_SECRET), "the secret was printed");
    assert_eq!(
        knot.dig(knot.primary, "mail.example.org.", "A"),
        vec!["198.51.100.10"]
    );
}

#[test]
fn a_zone_changed_underneath_is_refused_with_what_it_holds() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    knot.nsupdate(
        "update delete mail.example.org. A\nupdate add mail.example.org. 3600 A 203.0.113.5",
    );
    let config = knot.config("mail.example.org", SECRET, "");
    let out = dns(&config, &["cutover"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("203.0.113.5") && said.contains("nothing changed"),
        "{said}"
    );
    assert_eq!(
        knot.dig(knot.primary, "mail.example.org.", "A"),
        vec!["203.0.113.5"]
    );
}

#[test]
fn lower_ttl_records_the_safe_time_and_raise_ttl_restores() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    let config = knot.config("mail.example.org", SECRET, "");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let out = dns(&config, &["lower-ttl", "--to", "120"]);
    assert!(out.status.success(), "{}", text(&out));
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(config.with_file_name(format!(
            "{}.dns-state.json",
            config.file_name().unwrap().to_string_lossy()
        )))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(state["previous_ttl"]["A"], 3600);
    assert_eq!(state["low_ttl"], 120);
    let served = state["served_everywhere_at"].as_u64().unwrap();
    assert!(served >= before);
    let status = dns(&config, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["safe_cutover_at"].as_u64().unwrap(), served + 3600 + 60);
    assert_eq!(v["addresses"][0]["ttl"], 120);
    for port in [knot.primary, knot.secondary] {
        let full = Command::new("kdig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "mail.example.org.",
                "A",
                "+noall",
                "+answer",
            ])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&full.stdout).contains("\t120\t"),
            "{}",
            String::from_utf8_lossy(&full.stdout)
        );
    }
    let out = dns(&config, &["raise-ttl"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value =
        serde_json::from_slice(&dns(&config, &["status", "--json"]).stdout).unwrap();
    assert_eq!(v["addresses"][0]["ttl"], 3600);
    assert!(v["staging"].is_null());
}

#[test]
fn mail_checks_evaluate_spf_dkim_caa_ptr_mx_dmarc() {
    if !ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (good_key, dkim_txt) = dkim_key(dir.path(), "good");
    let (other_key, _) = dkim_key(dir.path(), "other");
    let knot = Knot::start(&dkim_txt);
    let extra = format!(
        "dkim_private_key = \"{}\"\nacme_account = \"https://acme.example/acct/1\"",
        good_key.display()
    );
    let config = knot.config("mail.example.org", SECRET, &extra);
    let out = dns(&config, &["check", "--json"]);
    let findings: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    let level = |needle: &str| -> String {
        findings
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"].as_str().unwrap().contains(needle))
            .map(|f| f["level"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("no {needle} in {findings}"))
    };
    // Before the cutover `a` covers only the old host and the include ends in -all: ~all applies.
    assert_eq!(level("SPF of mail.example.org for 198.51.100.20"), "fail");
    assert!(findings.to_string().contains("softfail"), "{findings}");
    assert_eq!(level("DKIM"), "ok", "{findings}");
    assert_eq!(level("CAA"), "ok");
    // The PTR is right, but before the cutover the name still resolves to the old host.
    assert_eq!(level("PTR 198.51.100.20"), "warn");
    assert_eq!(level("MX"), "ok");
    assert_eq!(level("DMARC"), "ok");
    assert_eq!(out.status.code(), Some(1));
    // After the cutover, `a` authorizes the new addresses.
    assert!(dns(&config, &["cutover"]).status.success());
    let after: serde_json::Value =
        serde_json::from_slice(&dns(&config, &["check", "--json"]).stdout).unwrap();
    for f in after.as_array().unwrap().iter().filter(|f| {
        let c = f["check"].as_str().unwrap();
        c.starts_with("SPF") || c == "PTR 198.51.100.20"
    }) {
        assert_eq!(f["level"], "ok", "{f}");
    }
    // A different key and a different ACME account are caught.
    let wrong = format!(
        "dkim_private_key = \"{}\"\nacme_account = \"https://acme.example/acct/2\"",
        other_key.display()
    );
    let config = knot.config("mail.example.org", SECRET, &wrong);
    let v: serde_json::Value =
        serde_json::from_slice(&dns(&config, &["check", "--json"]).stdout).unwrap();
    let lvl = |n: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"].as_str().unwrap().contains(n))
            .unwrap()["level"]
            .clone()
    };
    assert_eq!(lvl("DKIM"), "fail");
    assert_eq!(lvl("CAA"), "fail");
}

#[test]
fn spf_include_chains_hard_fail_and_the_lookup_limit() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    let spf_level = |domain: &str| -> String {
        let config = knot.config(domain, SECRET, "");
        let v: serde_json::Value =
            serde_json::from_slice(&dns(&config, &["check", "--json"]).stdout).unwrap();
        let f = v
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"].as_str().unwrap().contains("for 198.51.100.20"))
            .unwrap()
            .clone();
        format!(
            "{} {}",
            f["level"].as_str().unwrap(),
            f["detail"].as_str().unwrap()
        )
    };
    let chain = spf_level("chain.example.org");
    assert!(
        chain.starts_with("ok"),
        "two nested includes reach ip4:198.51.100.20: {chain}"
    );
    let hard = spf_level("hard.example.org");
    assert!(hard.starts_with("fail") && hard.contains("-all"), "{hard}");
    let many = spf_level("many.example.org");
    assert!(
        many.starts_with("fail") && many.contains("permerror"),
        "11 includes exceed the 10-lookup limit: {many}"
    );
}

#[test]
fn faults_are_named_cname_missing_zone_and_unreachable_server() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    let cname = knot.config("web.example.org", SECRET, "");
    let out = dns(&cname, &["cutover"]);
    assert!(text(&out).contains("is a CNAME"), "{}", text(&out));
    // A zone the servers do not serve.
    let other = knot.config("mail.example.org", SECRET, "");
    let body = std::fs::read_to_string(&other)
        .unwrap()
        .replace("zone = \"example.org\"", "zone = \"example.org.invalid\"")
        .replace(
            "domain = \"mail.example.org\"",
            "domain = \"mail.example.org.invalid\"",
        );
    std::fs::write(&other, body).unwrap();
    let out = dns(&other, &["status", "--json"]);
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
    let err = v["servers"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("does not serve this zone"), "{v}");
    assert_eq!(out.status.code(), Some(1));
    // Nothing listens on this port.
    let dead = knot.config("mail.example.org", SECRET, "");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let body = std::fs::read_to_string(&dead).unwrap().replace(
        &format!("server = \"127.0.0.1:{}\"", knot.primary),
        &format!("server = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&dead, body).unwrap();
    let out = dns(&dead, &["cutover"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains(&format!("127.0.0.1:{port}")), "{said}");
    assert_eq!(
        knot.dig(knot.primary, "mail.example.org.", "A"),
        vec!["198.51.100.10"]
    );
}

/// A config whose command provider runs `first` and then applies the change with knsupdate.
fn command_provider_config(knot: &Knot, first: &str) -> std::path::PathBuf {
    let script = format!(
        "{first} \
         {{ echo \"server 127.0.0.1 {port}\"; echo \"zone $RELAYMOVE_ZONE\"; \
            for ip in $RELAYMOVE_A_OLD; do echo \"update delete $RELAYMOVE_NAME A $ip\"; done; \
            for ip in $RELAYMOVE_A_NEW; do echo \"update add $RELAYMOVE_NAME $RELAYMOVE_A_TTL A $ip\"; done; \
            for ip in $RELAYMOVE_AAAA_NEW; do echo \"update add $RELAYMOVE_NAME $RELAYMOVE_AAAA_TTL AAAA $ip\"; done; \
            echo send; }} | knsupdate -y hmac-sha256:relaymove.:{SECRET}",
        port = knot.primary
    );
    let extra = format!(
        "command = [\"sh\", \"-c\", {}]",
        serde_json::to_string(&script).unwrap()
    );
    let config = knot.config("mail.example.org", SECRET, &extra);
    let body = std::fs::read_to_string(&config)
        .unwrap()
        .replace("provider = \"rfc2136\"", "provider = \"command\"");
    std::fs::write(&config, body).unwrap();
    config
}

#[test]
fn the_command_provider_gets_the_change_and_relaymove_confirms_it() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    let seen = knot.path("seen-env");
    let first = format!("env | grep ^RELAYMOVE_ | sort > {};", seen.display());
    let config = command_provider_config(&knot, &first);
    let out = dns(&config, &["cutover"]);
    assert!(out.status.success(), "{}", text(&out));
    let env = std::fs::read_to_string(&seen).unwrap();
    for line in [
        "RELAYMOVE_ACTION=cutover",
        "RELAYMOVE_A_OLD=198.51.100.10",
        "RELAYMOVE_A_NEW=198.51.100.20",
        "RELAYMOVE_AAAA_NEW=2001:db8::20",
        "RELAYMOVE_ZONE=example.org.",
    ] {
        assert!(env.contains(line), "{line} missing from:\n{env}");
    }
    assert_eq!(
        knot.dig(knot.secondary, "mail.example.org.", "A"),
        vec!["198.51.100.20"]
    );
}

#[test]
fn the_command_providers_output_goes_to_stderr_and_json_stdout_stays_parseable() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    let config = command_provider_config(&knot, "echo provider-chatter;");
    let out = dns(&config, &["cutover", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: Result<serde_json::Value, _> = serde_json::from_slice(&out.stdout);
    assert!(report.is_ok(), "stdout is not JSON: {}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("provider-chatter"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_manual_provider_prints_the_records_and_waits_for_them() {
    if !ready() {
        return;
    }
    let knot = Knot::start("v=DKIM1;k=rsa;p=AAAA");
    let config = knot.config("mail.example.org", SECRET, "");
    let body = std::fs::read_to_string(&config)
        .unwrap()
        .replace("provider = \"rfc2136\"", "provider = \"manual\"");
    std::fs::write(&config, body).unwrap();
    let mut child = Command::new(common::bin())
        .args(["dns", "cutover", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read the instructions, then do what they say, as an operator at a web panel would.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    while !said.contains("waiting until every authoritative server") {
        let mut line = String::new();
        assert!(
            std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0,
            "{said}"
        );
        said.push_str(&line);
    }
    assert!(
        said.contains("set:    mail.example.org. 3600 IN A 198.51.100.20"),
        "{said}"
    );
    assert!(
        said.contains("set:    mail.example.org. 300 IN AAAA 2001:db8::20"),
        "{said}"
    );
    knot.nsupdate(
        "update delete mail.example.org. A\nupdate add mail.example.org. 3600 A 198.51.100.20\nupdate add mail.example.org. 300 AAAA 2001:db8::20",
    );
    let status = child.wait().unwrap();
    assert!(status.success());
}
