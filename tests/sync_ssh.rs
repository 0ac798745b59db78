//! `relaymove sync` over SSH against a real sshd the test starts on loopback with throwaway
//! keys: local→remote, remote→local, remote→remote, a wrong host key, a connection killed
//! mid-stream followed by a successful re-run, and hosts the agent could not run on (an older
//! glibc, another architecture: sshd's `SetEnv PATH` puts stand-ins for `getconf` and
//! `uname` first) refused before the upload.
//!
//! Needs root and OpenSSH's sshd. Without them the tests say why and pass, unless
//! `RELAYMOVE_REQUIRE_SSH=1` (set by `tests/run-all`), which turns the skip into a failure.

mod common;

use common::{assert_mirror, bin, snapshot};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Sshd {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running a helper command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts sshd on a free loopback port, or explains why it cannot.
fn sshd() -> Option<Sshd> {
    start_sshd(false, "")
}

/// Like `sshd`, but the host it serves has a /var/lib, a /run and a home of its own:
/// `host/varlib`, `host/run` and `host/home` in its directory, bound there in a mount and pid namespace of its own.
/// The agent, its caches and locks then land there, apart from this machine's (which other
/// tests and builds use), and that host's /proc shows only its own processes.
fn isolated_sshd() -> Option<Sshd> {
    start_sshd(true, "")
}

/// `sshd()` with `extra` lines in its sshd_config.
fn sshd_with(extra: &str) -> Option<Sshd> {
    start_sshd(false, extra)
}

fn start_sshd(isolated: bool, extra: &str) -> Option<Sshd> {
    let required = std::env::var("RELAYMOVE_REQUIRE_SSH").as_deref() == Ok("1");
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not running as root")
    } else if !Path::new("/usr/sbin/sshd").exists() {
        Some("/usr/sbin/sshd is not installed (apt-get install openssh-server)")
    } else {
        None
    };
    if let Some(why) = why {
        assert!(!required, "SSH tests required but {why}");
        eprintln!("skipping SSH test: {why}");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("host_key")));
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(d.join("client_key")));
    fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    fs::write(
        d.join("sshd_config"),
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys .ssh/authorized_keys\n\
             PidFile {d}/sshd.pid\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n\
             MaxSessions 30\nAllowAgentForwarding no\nLogLevel ERROR\n{extra}",
            d = d.display()
        ),
    )
    .unwrap();
    let host_pub = fs::read_to_string(d.join("host_key.pub")).unwrap();
    fs::write(
        d.join("known_hosts"),
        format!("[127.0.0.1]:{port} {host_pub}"),
    )
    .unwrap();
    write_client_config(d, port, &d.join("known_hosts"));
    if !isolated {
        fs::create_dir_all("/run/sshd").unwrap();
    }
    let mut cmd = if isolated {
        let host = d.join("host");
        for sub in ["varlib", "run/sshd", "home"] {
            fs::create_dir_all(host.join(sub)).unwrap();
        }
        // --kill-child: when the test kills unshare, the namespace's first process and with
        // it every process of that host dies.
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "--",
            "sh",
            "-c",
            "mount --bind \"$1/home\" ~ && mount --bind \"$1/varlib\" /var/lib && mount --bind \"$1/run\" /run && exec /usr/sbin/sshd -D -e -f \"$2\"",
            "sh",
        ])
        .arg(&host)
        .arg(d.join("sshd_config"));
        cmd
    } else {
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"]).arg(d.join("sshd_config"));
        cmd
    };
    let child = cmd.stderr(Stdio::null()).spawn().expect("starting sshd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "sshd did not start listening on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(Sshd { dir, child, port })
}

fn write_client_config(d: &Path, port: u16, known_hosts: &Path) {
    fs::write(
        d.join("ssh_config"),
        format!(
            "Host rmtest\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {d}/client_key\n  \
             IdentitiesOnly yes\n  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  BatchMode yes\n",
            d = d.display(),
            kh = known_hosts.display()
        ),
    )
    .unwrap();
}

impl Sshd {
    fn sync(&self, src: &str, dest: &str, cache: &Path) -> Command {
        let mut cmd = Command::new(bin());
        cmd.args(["sync", "--json", "--no-progress", src, dest])
            .arg("--ssh-config")
            .arg(self.dir.path().join("ssh_config"))
            .env("RELAYMOVE_CACHE_DIR", cache);
        cmd
    }
}

fn ok(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "sync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn remote(path: &Path) -> String {
    format!("rmtest:{}", path.display())
}

#[test]
fn syncs_in_all_three_directions() {
    let Some(sshd) = sshd() else { return };
    let t = tempfile::tempdir().unwrap();
    let (src, cache) = (t.path().join("src"), t.path().join("cache"));
    common::maildir::generate(&src, 3, 300);
    fs::create_dir_all(src.join("weird name\n-x")).unwrap();
    fs::write(
        src.join("weird name\n-x/'quote\"$(x)"),
        b"shell metacharacters in names",
    )
    .unwrap();

    let a = t.path().join("a");
    let out = sshd
        .sync(src.to_str().unwrap(), &remote(&a), &cache)
        .arg("-v")
        .output()
        .unwrap();
    // An adaptive stream reports the data it took at each level; a tree this small is sent
    // before the first window, at the starting level 1.
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        said.contains(
            "relaymove: stream: zstd level adapted to the link, data taken at each level: 1: "
        ),
        "{said}"
    );
    let r = ok(out);
    assert_eq!(r["verified"], true);
    assert_mirror(&src, &a);

    let b = t.path().join("b");
    ok(sshd
        .sync(&remote(&a), b.to_str().unwrap(), &cache)
        .output()
        .unwrap());
    assert_mirror(&src, &b);

    // Remote → remote goes host to host by default: DEST's agent authorizes a one-time key
    // in the user's ~/.ssh/authorized_keys (sshd's default, also read by this test's sshd)
    // and leaves the file as it was. `--route controller` relays through this process.
    let authorized = Path::new(&std::env::var("HOME").unwrap()).join(".ssh/authorized_keys");
    let before = fs::read(&authorized).ok();
    let c = t.path().join("c");
    ok(sshd
        .sync(&remote(&b), &remote(&c), &cache)
        .output()
        .unwrap());
    assert_mirror(&src, &c);
    assert_eq!(
        fs::read(&authorized).ok(),
        before,
        "{}",
        authorized.display()
    );
    let relayed = t.path().join("relayed");
    ok(sshd
        .sync(&remote(&b), &remote(&relayed), &cache)
        .args(["--route", "controller"])
        .output()
        .unwrap());
    assert_mirror(&src, &relayed);

    // The agent was uploaded once, root-only, and is reused.
    let bin_dir = Path::new("/var/lib/relaymove/bin");
    let mode = fs::metadata(bin_dir.parent().unwrap()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o077,
        0
    );
    let r = ok(sshd
        .sync(&remote(&b), &remote(&c), &cache)
        .output()
        .unwrap());
    assert_eq!(r["sent"], 0);
}

#[test]
fn a_changed_host_key_is_refused() {
    let Some(sshd) = sshd() else { return };
    let t = tempfile::tempdir().unwrap();
    let d = sshd.dir.path();
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(t.path().join("other")));
    let other = fs::read_to_string(t.path().join("other.pub")).unwrap();
    let wrong = t.path().join("known_hosts");
    fs::write(&wrong, format!("[127.0.0.1]:{} {other}", sshd.port)).unwrap();
    write_client_config(d, sshd.port, &wrong);
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let dest = t.path().join("dest");
    let out = sshd
        .sync(
            src.to_str().unwrap(),
            &remote(&dest),
            &t.path().join("cache"),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("cannot connect to rmtest") && msg.contains("host key"),
        "{msg}"
    );
    assert!(!dest.exists());
}

/// Runs a sync of a one-file SRC to `dest_spec` (given `dest` under `t`) and returns its
/// exit code and stderr.
fn failed_sync(sshd: &Sshd, t: &Path, dest_spec: &str) -> (Option<i32>, String) {
    let src = t.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let out = sshd
        .sync(src.to_str().unwrap(), dest_spec, &t.join("cache"))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_refused_port_says_connection_refused_and_names_the_port_and_config() {
    let Some(sshd) = sshd() else { return };
    let t = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dest = t.path().join("dest");
    let (code, msg) = failed_sync(
        &sshd,
        t.path(),
        &format!("rmtest:{closed}:{}", dest.display()),
    );
    assert_eq!(code, Some(1), "{msg}");
    let config = sshd.dir.path().join("ssh_config");
    assert!(msg.contains("Connection refused"), "{msg}");
    assert!(
        msg.contains(&format!("port {closed}, ssh config {}", config.display())),
        "{msg}"
    );
    assert!(msg.contains("is sshd running there"), "{msg}");
    assert!(!dest.exists());
}

#[test]
fn an_unknown_host_key_says_so_and_how_to_add_it_for_that_port() {
    let Some(sshd) = sshd() else { return };
    let t = tempfile::tempdir().unwrap();
    let empty = t.path().join("known_hosts");
    fs::write(&empty, b"").unwrap();
    write_client_config(sshd.dir.path(), sshd.port, &empty);
    let dest = t.path().join("dest");
    let (code, msg) = failed_sync(&sshd, t.path(), &remote(&dest));
    assert_eq!(code, Some(1), "{msg}");
    assert!(msg.contains("Host key verification failed"), "{msg}");
    assert!(
        msg.contains(&format!(
            "ssh-keyscan -p {} 127.0.0.1 >> {}",
            sshd.port,
            empty.display()
        )),
        "{msg}"
    );
    assert!(!dest.exists());
}

#[test]
fn a_connection_killed_mid_stream_leaves_dest_consistent_and_a_rerun_finishes() {
    let Some(sshd) = sshd() else { return };
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    common::maildir::generate(&src, 11, 6000);
    let mut child = sshd
        .sync(src.to_str().unwrap(), &remote(&dest), &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until files are landing, then kill every sshd session process: the TCP
    // connection dies with the stream half sent.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let landed = walkdir::WalkDir::new(&dest)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .count();
        if landed > 200 {
            break;
        }
        assert!(Instant::now() < deadline, "nothing landed in DEST");
        if let Some(status) = child.try_wait().unwrap() {
            let mut said = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut said).unwrap();
            panic!("the sync ended ({status}) before it could be interrupted: {said}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    run(Command::new("pkill").args(["-KILL", "-P", &sshd.child.id().to_string()]));
    let waited = Instant::now();
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "interrupted sync said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        waited.elapsed() < Duration::from_secs(20),
        "the interrupted sync took {:?} to give up",
        waited.elapsed()
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every file under its real name is complete: identical to SRC.
    let before = snapshot(&src);
    let after = snapshot(&dest);
    let mut complete = 0;
    for (path, seen) in &after {
        if seen.kind != "file" {
            continue;
        }
        let name = String::from_utf8_lossy(path);
        if name
            .rsplit('/')
            .next()
            .unwrap_or("")
            .starts_with(".relaymove-tmp.")
        {
            continue; // a temporary name; the next run removes it
        }
        let original = before
            .get(path)
            .unwrap_or_else(|| panic!("{name} is not in SRC"));
        assert_eq!(original.sha256, seen.sha256, "{name} is partial");
        complete += 1;
    }
    assert!(
        complete < before.values().filter(|s| s.kind == "file").count(),
        "the kill came too late"
    );

    let rerun = Instant::now();
    let r = ok(sshd
        .sync(src.to_str().unwrap(), &remote(&dest), &cache)
        .output()
        .unwrap());
    eprintln!("re-run took {:?}", rerun.elapsed());
    assert_eq!(r["verified"], true);
    assert_mirror(&src, &dest);
    let _: PathBuf = dest;
}

/// The `ssh -M` master of a connection to `port`: its pid and its full command line.
fn master_for(port: u16) -> Option<(i32, Vec<String>)> {
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(raw) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let port = port.to_string();
        if args.first().is_some_and(|a| a == "ssh")
            && args.iter().any(|a| a == "-M")
            && args.windows(2).any(|w| w[0] == "-p" && w[1] == port)
        {
            return Some((pid, args));
        }
    }
    None
}

#[test]
fn sigterm_during_a_sync_closes_the_ssh_master_removes_temp_files_and_exits_130() {
    let Some(sshd) = sshd() else { return };
    let t = tempfile::tempdir().unwrap();
    let (src, dest, cache) = (
        t.path().join("src"),
        t.path().join("dest"),
        t.path().join("cache"),
    );
    common::maildir::generate(&src, 5, 6000);
    // The port on the command line tells this test's master from other tests' masters.
    let target = format!("rmtest:{}:{}", sshd.port, dest.display());
    let child = sshd
        .sync(src.to_str().unwrap(), &target, &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (master, args) = loop {
        let landed = walkdir::WalkDir::new(&dest)
            .into_iter()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .count();
        if landed > 200 {
            if let Some(m) = master_for(sshd.port) {
                break m;
            }
        }
        assert!(Instant::now() < deadline, "nothing landed in DEST");
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: kill(2) on the sync this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{msg}");
    assert!(msg.contains("interrupted (SIGTERM)"), "{msg}");
    assert!(
        msg.contains("run the same command again to continue"),
        "{msg}"
    );
    let gone = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{master}")).exists() {
        assert!(
            Instant::now() < gone,
            "ssh master {master} still runs: {args:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = args
        .windows(2)
        .find(|w| w[0] == "-F")
        .map(|w| PathBuf::from(&w[1]))
        .expect("the master's -F config");
    assert!(!config.exists(), "{} was left behind", config.display());
    for e in walkdir::WalkDir::new(&dest)
        .into_iter()
        .filter_map(|e| e.ok())
    {
        let name = e.file_name().to_string_lossy();
        assert!(!name.starts_with(".relaymove-"), "{name} left in DEST");
    }
    // A rerun finishes.
    let r = ok(sshd
        .sync(src.to_str().unwrap(), &remote(&dest), &cache)
        .output()
        .unwrap());
    assert_eq!(r["verified"], true);
    assert_mirror(&src, &dest);
}

impl Sshd {
    /// `relaymove cleanup ARGS… rmtest` against this host.
    fn cleanup(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("cleanup")
            .args(args)
            .arg("--ssh-config")
            .arg(self.dir.path().join("ssh_config"))
            .arg("rmtest")
            .output()
            .unwrap()
    }

    /// A path of the isolated host's own /var/lib or /run, as this machine sees it.
    fn host(&self, rel: &str) -> PathBuf {
        self.dir.path().join("host").join(rel)
    }

    /// Runs `argv` on the host with stdin piped: it ends when the test closes it.
    fn hold(&self, argv: &str) -> Child {
        let mut child = Command::new("ssh")
            .arg("-F")
            .arg(self.dir.path().join("ssh_config"))
            .args(["rmtest", argv])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line, "held\n");
        child
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every path under `root` with its type, size and mtime (cheaper than `snapshot`, which
/// hashes a debug build's agent of some 180 MB).
fn listing(root: &Path) -> Vec<(PathBuf, String)> {
    walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .map(|e| {
            let e = e.unwrap();
            let md = e.path().symlink_metadata().unwrap();
            let seen = format!(
                "{:?} {} {:?}",
                md.file_type(),
                md.len(),
                md.modified().unwrap()
            );
            (e.path().to_path_buf(), seen)
        })
        .collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn cleanup_removes_what_syncs_left_refuses_while_a_migration_holds_its_lock_and_keeps_the_rest() {
    let Some(sshd) = isolated_sshd() else { return };
    let t = tempfile::tempdir().unwrap();
    let (src, cache) = (t.path().join("src"), t.path().join("cache"));
    common::maildir::generate(&src, 2, 50);
    let a = t.path().join("a");
    ok(sshd
        .sync(src.to_str().unwrap(), &remote(&a), &cache)
        .output()
        .unwrap());
    ok(sshd
        .sync(&remote(&a), t.path().join("b").to_str().unwrap(), &cache)
        .output()
        .unwrap());
    let agent_dir = sshd.host("varlib/relaymove");
    assert_eq!(names(&agent_dir), ["bin", "cache"]);
    assert_eq!(names(&agent_dir.join("bin")).len(), 1);
    assert!(!names(&agent_dir.join("cache")).is_empty());
    assert_eq!(names(&sshd.host("run/relaymove")).len(), 1, "one tree lock");
    let neighbour = sshd.host("varlib/other-tool");
    fs::write(&neighbour, b"not relaymove's").unwrap();

    // A migration holds its lock on this host: refused, nothing removed.
    let mut migration =
        sshd.hold("flock /run/relaymove-migrate.lock sh -c 'echo held; cat >/dev/null'");
    let out = sshd.cleanup(&[]);
    let msg = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("/run/relaymove-migrate.lock is held by pid")
            && msg.contains("a migration runs")
            && msg.contains("nothing was removed")
            && msg.contains("on rmtest"),
        "{msg}"
    );
    assert_eq!(names(&agent_dir), ["bin", "cache"]);
    drop(migration.stdin.take());
    migration.wait().unwrap();

    // Now stale: listed with the rest, and a dry run removes nothing.
    let before = listing(&sshd.host(""));
    let out = sshd.cleanup(&["--dry-run", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listing(&sshd.host("")),
        before,
        "a dry run changed the host"
    );
    let kinds = |report: &serde_json::Value| {
        let mut v: Vec<String> = report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                format!(
                    "{} {}",
                    f["type"].as_str().unwrap(),
                    f["kind"].as_str().unwrap_or("")
                )
            })
            .collect();
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(
        kinds(&listed),
        ["remove agent", "remove cache", "remove lock", "rmdir "]
    );
    assert_eq!(listed["dry_run"], true);

    let out = sshd.cleanup(&["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let removed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(removed["findings"], listed["findings"]);
    assert!(
        removed["bytes"].as_u64().unwrap() > 1_000_000,
        "the agent counts"
    );
    assert_eq!(names(&sshd.host("varlib")), ["other-tool"]);
    assert_eq!(names(&sshd.host("run")), ["sshd"]);
    assert_eq!(fs::read(&neighbour).unwrap(), b"not relaymove's");

    // Nothing left: a no-op that uploads nothing.
    let out = sshd.cleanup(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "nothing of relaymove's on rmtest\n");
    assert_eq!(names(&sshd.host("varlib")), ["other-tool"]);

    // Planted among ours: a file and a symlink named like a cache. Both stay, the symlink's
    // target is untouched; `old` of a config names the host.
    ok(sshd
        .sync(src.to_str().unwrap(), &remote(&t.path().join("c")), &cache)
        .output()
        .unwrap());
    let notes = agent_dir.join("bin/notes");
    fs::write(&notes, b"mine").unwrap();
    let victim = t.path().join("victim");
    fs::write(&victim, b"keep me").unwrap();
    let planted = agent_dir.join("cache/00000000000000000000000000000000.hashes");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    let config = t.path().join("relaymove.toml");
    fs::write(
        &config,
        format!(
            "domain = \"mail.example.org\"\nssh_config = \"{}\"\n[hosts.old]\nssh = \"rmtest\"\nipv4 = \"198.51.100.10\"\n\
             [hosts.new]\nssh = \"new\"\nipv4 = \"198.51.100.20\"\n[dns]\nprovider = \"manual\"\nzone = \"example.org\"\n",
            sshd.dir.path().join("ssh_config").display()
        ),
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["cleanup", "-c"])
        .arg(&config)
        .arg("old")
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("removed on rmtest ("), "{stdout}");
    assert!(
        stdout.contains("/var/lib/relaymove/bin/relaymove-"),
        "{stdout}"
    );
    assert!(
        stderr.contains("kept /var/lib/relaymove/bin: 1 entry is not relaymove's")
            && stderr.contains(&format!(
                "left {}",
                Path::new("/var/lib/relaymove/cache/00000000000000000000000000000000.hashes")
                    .display()
            )),
        "{stderr}"
    );
    assert_eq!(names(&agent_dir), ["bin", "cache"]);
    assert_eq!(names(&agent_dir.join("bin")), ["notes"]);
    assert_eq!(
        names(&agent_dir.join("cache")),
        ["00000000000000000000000000000000.hashes"]
    );
    assert_eq!(fs::read(&victim).unwrap(), b"keep me");
    assert!(!sshd.host("run/relaymove").exists());
}

#[test]
fn init_over_ssh_learns_the_addresses_and_writes_a_private_config_that_reaches_the_hosts() {
    let Some(sshd) = isolated_sshd() else { return };
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("relaymove.toml");
    let ssh_config = sshd.dir.path().join("ssh_config");
    let init = || {
        Command::new(bin())
            .args(["init", "--old", "rmtest", "--new", "rmtest", "--ssh-config"])
            .arg(&ssh_config)
            .arg("-o")
            .arg(&file)
            .output()
            .unwrap()
    };
    let out = init();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mode = fs::metadata(&file).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let written = fs::read_to_string(&file).unwrap();
    assert!(
        written.contains("\n[hosts.old]\nssh = \"rmtest\" "),
        "{written}"
    );
    // This machine's own addresses, as the host (this machine) reports them.
    let own = text(&run(Command::new("hostname").arg("-I")).stdout);
    let ipv4 = written
        .lines()
        .find(|l| l.starts_with("ipv4 = "))
        .and_then(|l| l.split('"').nth(1))
        .unwrap();
    if own
        .split_whitespace()
        .any(|a| a.contains('.') && !a.starts_with("127."))
    {
        assert!(
            own.split_whitespace().any(|a| a == ipv4),
            "{ipv4} not in {own}\n{written}"
        );
        assert!(written.contains("# learned: hostname -I"), "{written}");
    }
    // The written config loads, and its ssh_config reaches old.
    let out = Command::new(bin())
        .args(["cleanup", "--dry-run", "-c"])
        .arg(&file)
        .arg("old")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}\n{written}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "nothing of relaymove's on rmtest\n");

    // Never over an existing file.
    let out = init();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("exists; nothing was written"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), written);
}

/// Syncs to an sshd whose sessions find `command` (a script printing `says`) before the real
/// one, with a copy of relaymove that no host has as its agent yet (a byte appended: another
/// SHA-256, the same program), so the start asks for an upload. Returns the exit code, stderr,
/// and whether that copy's agent file exists on the host afterwards.
fn sync_to_a_host_whose(command: &str, says: &str) -> Option<(Option<i32>, String, bool)> {
    use sha2::Digest as _;
    let t = tempfile::tempdir().unwrap();
    let fake = t.path().join("fakebin");
    fs::create_dir(&fake).unwrap();
    fs::write(fake.join(command), format!("#!/bin/sh\necho '{says}'\n")).unwrap();
    let exe = t.path().join("relaymove");
    let mut bytes = fs::read(bin()).unwrap();
    bytes.extend_from_slice(format!("{command} {says}").as_bytes());
    fs::write(&exe, &bytes).unwrap();
    for p in [fake.join(command), exe.clone()] {
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "SetEnv PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
        fake.display()
    );
    let sshd = sshd_with(&path)?;
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("file"), b"content").unwrap();
    let out = Command::new(&exe)
        .args(["sync", "--no-progress"])
        .arg(&src)
        .arg(remote(&t.path().join("dest")))
        .arg("--ssh-config")
        .arg(sshd.dir.path().join("ssh_config"))
        .env("RELAYMOVE_CACHE_DIR", t.path().join("cache"))
        .output()
        .unwrap();
    assert!(!t.path().join("dest").exists(), "DEST was created");
    let digest: String = sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let uploaded = Path::new(&format!("/var/lib/relaymove/bin/relaymove-{digest}")).exists();
    Some((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        uploaded,
    ))
}

// See: issue 12 (an agent built on Debian 12 failed inside the loader on Debian 11, after
// the upload: "version `GLIBC_2.34' not found").
#[test]
fn a_host_with_an_older_glibc_is_refused_before_the_upload() {
    let Some((code, stderr, uploaded)) = sync_to_a_host_whose("getconf", "glibc 2.17") else {
        return;
    };
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("the agent cannot run on rmtest: this relaymove needs glibc 2.")
            && stderr.contains(" or newer and rmtest has glibc 2.17; nothing was uploaded\nhint: "),
        "{stderr}"
    );
    assert!(stderr.contains("packaging/build-deb"), "{stderr}");
    assert!(!uploaded, "the agent was uploaded: {stderr}");
}

#[test]
fn a_host_of_another_architecture_is_refused_before_the_upload() {
    let Some((code, stderr, uploaded)) = sync_to_a_host_whose("uname", "riscv64") else {
        return;
    };
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("and rmtest is riscv64; nothing was uploaded\nhint: "),
        "{stderr}"
    );
    assert!(!uploaded, "the agent was uploaded: {stderr}");
}
