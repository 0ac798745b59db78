//! Starting agents: locally as a child process of this binary, remotely over SSH after
//! making sure the host has this exact binary.
//!
//! SSH is the system OpenSSH through the `openssh` crate, so `~/.ssh/config`, ssh-agent and
//! known_hosts work as users expect. Host keys are checked strictly, and agent forwarding is
//! forced off: our generated config sets `ForwardAgent no` before including the user's
//! configuration, and the first value ssh reads wins.
//!
//! The agent lives at `/var/lib/relaymove/bin/relaymove-<sha256>` (root-only) or, for other
//! users, under `~/.local/lib/relaymove/bin/`. It is uploaded only when absent or different,
//! and neither started nor installed in a directory another user could change. Before an
//! upload the host's architecture and glibc are compared with what this binary needs
//! (`platform.rs`): a host that could not run it is refused with the fix, and gets nothing.

use crate::remote::endpoint::{parse_ssh_target, RemotePath, TransferAddress};
use crate::remote::platform::{
    mismatch, BinaryNeeds, HostLibc, HostPlatform, Mismatch, PLATFORM_PROBE,
};
use crate::remote::protocol::{widen_pipe, Hello, PROTOCOL};
use crate::remote::ssh::{cipher_order, connect_failure, Effective};
use anyhow::{anyhow, bail, Context, Result};
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A command run on a host that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// It ran and exited non-zero: callers may branch on the status.
    #[error("`{command}` on {host} failed (exit status {status}){}", if stderr.is_empty() { String::new() } else { format!(": {stderr}") })]
    Failed {
        host: String,
        command: String,
        status: i32,
        stderr: String,
    },
    /// It could not run, or its connection broke: the host's state is unknown.
    #[error("running `{command}` on {host}: {detail}")]
    Unreachable {
        host: String,
        command: String,
        detail: String,
    },
}

/// What a command printed, and its exit status.
pub struct Ran {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    /// Used instead of `~/.ssh/config` (`ssh -F`).
    pub config: Option<PathBuf>,
}

pub enum Host {
    Local {
        exe: PathBuf,
    },
    Remote {
        session: Arc<Session>,
        label: String,
        /// Where it was asked to connect, before ssh's config resolved it.
        target: RemotePath,
        config: tempfile::NamedTempFile,
    },
}

/// Writes the config relaymove gives ssh; also returns the user's config file it includes.
fn ssh_config(opts: &SshOptions) -> Result<(tempfile::NamedTempFile, Option<PathBuf>)> {
    let mut file = tempfile::Builder::new()
        .prefix("relaymove-ssh")
        .tempfile()
        .context("creating a temporary ssh config")?;
    let user_config = match &opts.config {
        Some(p) => Some(
            std::fs::canonicalize(p)
                .with_context(|| format!("reading ssh config {}", p.display()))?,
        ),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".ssh/config"))
            .filter(|p| p.exists()),
    };
    let includes: Vec<&Path> = user_config
        .iter()
        .map(|p| p.as_path())
        .chain([Path::new("/etc/ssh/ssh_config")])
        .filter(|p| p.exists())
        .collect();
    let text = config_text(&includes);
    file.write_all(text.as_bytes())?;
    Ok((file, user_config))
}

/// relaymove's settings, the `includes` in order, then the cipher order for every host.
fn config_text(includes: &[&Path]) -> String {
    let mut text = String::from("# written by relaymove: these first values win over the included ones\nForwardAgent no\nForwardX11 no\n");
    for inc in includes {
        text.push_str(&format!("Include \"{}\"\n", inc.display()));
    }
    // After the includes: a cipher list the user chose comes first and wins. A Host block an
    // included file ends in does not reach past its Include (the test checks it).
    if let Some(ciphers) = cipher_order() {
        text.push_str(&format!("Ciphers {ciphers}\n"));
    }
    text
}

/// Port, host name, user and known_hosts file as ssh resolves them for `remote` (`ssh -G`
/// reads the config without connecting); what relaymove knew itself when that fails.
async fn effective(remote: &RemotePath, config: &Path) -> Effective {
    let fallback = Effective {
        hostname: remote.host.clone(),
        port: remote.port.unwrap_or(22),
        user: remote.user.clone().unwrap_or_else(|| "root".into()),
        known_hosts: None,
    };
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.arg("-G").arg("-F").arg(config);
    if let Some(p) = remote.port {
        cmd.arg("-p").arg(p.to_string());
    }
    if let Some(u) = &remote.user {
        cmd.arg("-l").arg(u);
    }
    cmd.arg("--")
        .arg(&remote.host)
        .stdin(std::process::Stdio::null());
    match tokio::time::timeout(Duration::from_secs(5), cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => {
            Effective::parse(&String::from_utf8_lossy(&out.stdout), fallback)
        }
        _ => fallback,
    }
}

/// ssh's own reason for a failed connection: the innermost error of the chain (the
/// `openssh` crate keeps ssh's stderr there and says only "failed to connect" itself).
fn ssh_reason(e: &openssh::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    text
}

/// Sets `$d` to the agent directory of the login user: the one place that says where agents
/// live on a host (the agent scripts here and `remote::cleanup` start with it). A macro, not
/// a const, so `concat!` can join it to each script.
macro_rules! agent_dir {
    () => {
        r#"if [ "$(id -u)" = 0 ]; then d=/var/lib/relaymove; else d="${HOME:?}/.local/lib/relaymove"; fi
"#
    };
}
pub(crate) use agent_dir;

/// The start of both agent scripts: picks the agent directory `$d` and defines `safe DIR`,
/// which refuses a DIR that anyone but the login user could change (a symlink, another
/// owner, group- or other-writable). The scripts hash the agent and then exec it by path,
/// so a user who can write the directory could swap the file in between: as root that is
/// code execution as root.
macro_rules! agent_dir_prologue {
    () => {
        concat!(
            agent_dir!(),
            r#"safe() {
  why=
  if [ -L "$1" ]; then why="is a symlink"
  elif [ ! -d "$1" ]; then why="is not a directory"
  elif [ "$(stat -c %u "$1")" != "$(id -u)" ]; then why="is owned by uid $(stat -c %u "$1"), not by uid $(id -u) who runs the agent"
  else case $(stat -c %A "$1") in ?????w*|????????w*) why="is writable by group or others";; esac
  fi
  [ -z "$why" ] && return 0
  echo "the agent directory $1 $why, so another user could replace the agent before it runs; fix: remove it (rm -r $1) and relaymove recreates it, or make it yours and private (chown $(id -u) $1 && chmod 700 $1)" >&2
  exit 96
}
"#
        )
    };
}

/// Starts the agent if this host has this exact version; else exits 97 (upload needed).
/// The check and the start are one command, so a sync costs one round trip for it.
/// The file's name is its SHA-256, checked before it was renamed into place and made
/// durable first (`AGENT_INSTALL`), in a directory only its owner can change: hashing it
/// again at each start would cost 0.06 s of every re-sync and prove nothing more. A file
/// that is not the owner's own, private regular file (a symlink, another owner, writable by
/// group or others) is not started but replaced, as if missing.
const AGENT_START: &str = concat!(
    agent_dir_prologue!(),
    r#"f="$d/bin/relaymove-$1"
if [ -e "$d" ] || [ -L "$d" ]; then safe "$d"; fi
if [ -e "$d/bin" ] || [ -L "$d/bin" ]; then safe "$d/bin"; fi
if [ -f "$f" ] && [ ! -L "$f" ] && [ -x "$f" ]; then
  case $(stat -c '%u %A' "$f") in
    "$(id -u) "?????w*|"$(id -u) "????????w*) ;;
    "$(id -u) "*) exec "$f" agent serve;;
  esac
fi
exit 97
"#
);

/// Installs the agent from stdin, private to the login user, and removes older versions.
/// Each upload writes its own temporary file and renames it into place only once its hash
/// is right, so concurrent first syncs to one host cannot truncate or delete each other's
/// upload, and a running agent's file is never rewritten (no "Text file busy").
const AGENT_INSTALL: &str = concat!(
    agent_dir_prologue!(),
    r#"set -e
umask 077
f="$d/bin/relaymove-$1"
if [ -L "$d" ]; then safe "$d"; fi
mkdir -p "$d"
safe "$d"
if [ -L "$d/bin" ]; then safe "$d/bin"; fi
mkdir -p "$d/bin"
safe "$d/bin"
t=$(mktemp "$d/bin/.upload.XXXXXX")
trap 'rm -f "$t"' EXIT
cat > "$t"
if [ "$(sha256sum < "$t" | cut -d' ' -f1)" != "$1" ]; then echo "the agent uploaded to $t does not have SHA-256 $1 (upload cut short?); run relaymove again" >&2; exit 1; fi
chmod 700 "$t"
# Durable before it is renamed: after a crash the name holds either nothing or all of it.
sync "$t"
mv -f "$t" "$f"
for old in "$d"/bin/relaymove-*; do
  v=${old##*/relaymove-}
  # Only other versions' agents: never a file someone else put here under another name.
  case $v in "$1"|*[!0-9a-f]*) continue;; esac
  if [ ${#v} = 64 ]; then rm -f "$old"; fi
done
"#
);

/// Seconds an SSH master with no open channel stays up (every command and agent of a run
/// is a channel, so a live run never idles this long).
const MASTER_IDLE: std::num::NonZeroUsize = match std::num::NonZeroUsize::new(60) {
    Some(n) => n,
    None => panic!("zero"),
};

/// Exit status of `AGENT_START` when the agent must be uploaded first.
const AGENT_MISSING: i32 = 97;

impl Host {
    pub fn local() -> Result<Host> {
        Ok(Host::Local {
            exe: std::env::current_exe().context("finding this program's path")?,
        })
    }

    pub fn label(&self) -> &str {
        match self {
            Host::Local { .. } => "this host",
            Host::Remote { label, .. } => label,
        }
    }

    pub async fn connect(remote: &RemotePath, opts: &SshOptions) -> Result<Host> {
        let label = match &remote.user {
            Some(u) => format!("{u}@{}", remote.host),
            None => remote.host.clone(),
        };
        let (config, user_config) = ssh_config(opts)?;
        let mut builder = SessionBuilder::default();
        builder
            .known_hosts_check(KnownHosts::Strict)
            .config_file(config.path())
            .control_directory(std::env::temp_dir())
            .connect_timeout(Duration::from_secs(15))
            // A controller killed outright (SIGKILL, power loss) cannot close its master; an
            // idle master then ends by itself instead of running forever.
            .control_persist(ControlPersist::IdleFor(MASTER_IDLE))
            .server_alive_interval(Duration::from_secs(10));
        if let Some(u) = &remote.user {
            builder.user(u.clone());
        }
        if let Some(p) = remote.port {
            builder.port(p);
        }
        let session = match builder.connect_mux(&remote.host).await {
            Ok(s) => s,
            Err(e) => {
                let used = effective(remote, config.path()).await;
                bail!(connect_failure(
                    &label,
                    &ssh_reason(&e),
                    &used,
                    user_config.as_ref()
                ));
            }
        };
        Ok(Host::Remote {
            session: Arc::new(session),
            label,
            target: remote.clone(),
            config,
        })
    }

    /// Starts `relaymove agent serve` on this host with piped stdin, stdout and stderr.
    async fn spawn_agent(&self) -> Result<AgentProcess> {
        let what = "agent serve".to_string();
        match self {
            Host::Local { exe } => {
                let mut child = tokio::process::Command::new(exe)
                    .args(["agent", "serve"])
                    // Out of the terminal's process group: Ctrl-C reaches the controller
                    // only, which closes the agent's input; a receiver then removes its
                    // temporary files before it ends.
                    .process_group(0)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .with_context(|| format!("starting {}", exe.display()))?;
                let stdin = child
                    .stdin
                    .take()
                    .map(|s| Box::pin(s) as Pin<Box<dyn AsyncWrite + Send>>);
                let stdout = child
                    .stdout
                    .take()
                    .map(|s| Box::pin(s) as Pin<Box<dyn AsyncRead + Send>>);
                let stderr = child
                    .stderr
                    .take()
                    .map(|s| Box::pin(s) as Pin<Box<dyn AsyncRead + Send>>);
                Ok(AgentProcess::new(
                    stdin,
                    stdout,
                    stderr,
                    Waiter::Local(child),
                    self.label(),
                    what,
                ))
            }
            Host::Remote { session, label, .. } => {
                let digest = own_digest().await?;
                let mut cmd = session.clone().arc_command("sh");
                cmd.arg("-c").arg(AGENT_START).arg("relaymove").arg(digest);
                let mut child = cmd
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .await
                    .with_context(|| format!("starting the agent on {label}"))?;
                // The agent widens its own ends (`serve`); these pipes lead to ssh instead.
                let stdin = child
                    .stdin()
                    .take()
                    .inspect(|p| widen_pipe(p))
                    .map(|s| Box::pin(s) as Pin<Box<dyn AsyncWrite + Send>>);
                let stdout = child
                    .stdout()
                    .take()
                    .inspect(|p| widen_pipe(p))
                    .map(|s| Box::pin(s) as Pin<Box<dyn AsyncRead + Send>>);
                let stderr = child
                    .stderr()
                    .take()
                    .map(|s| Box::pin(s) as Pin<Box<dyn AsyncRead + Send>>);
                Ok(AgentProcess::new(
                    stdin,
                    stdout,
                    stderr,
                    Waiter::Remote(child),
                    label,
                    what,
                ))
            }
        }
    }

    /// Connects to a host given as a config's `ssh = "[user@]host[:port]"`.
    pub async fn connect_target(target: &str, opts: &SshOptions) -> Result<Host> {
        let remote = parse_ssh_target(target).map_err(|e| anyhow!("ssh target {e}"))?;
        Host::connect(&remote, opts).await
    }

    /// Runs `argv` on the host (each argument passed as it is, no shell) and returns its
    /// stdout; a non-zero exit is `RunError::Failed` with what it printed on stderr.
    pub async fn run(&self, argv: &[&str]) -> Result<String, RunError> {
        let ran = self.run_status(argv).await?;
        if ran.status == 0 {
            Ok(ran.stdout)
        } else {
            Err(RunError::Failed {
                host: self.label().to_string(),
                command: argv.join(" "),
                status: ran.status,
                stderr: ran.stderr.trim().to_string(),
            })
        }
    }

    /// Runs `argv` and returns its exit status and output whatever the status.
    pub async fn run_status(&self, argv: &[&str]) -> Result<Ran, RunError> {
        let unreachable = |detail: String| RunError::Unreachable {
            host: self.label().to_string(),
            command: argv.join(" "),
            detail,
        };
        let (program, args) = argv
            .split_first()
            .ok_or_else(|| unreachable("bug: empty command".into()))?;
        let out = match self {
            Host::Local { .. } => tokio::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .map_err(|e| unreachable(e.to_string()))?,
            Host::Remote { session, .. } => session
                .command(*program)
                .args(args.iter().copied())
                .stdin(Stdio::null())
                .output()
                .await
                .map_err(|e| unreachable(e.to_string()))?,
        };
        // ssh reports a lost connection as 255 with nothing from the command itself.
        let status = out.status.code().ok_or_else(|| {
            unreachable("the command was killed or the connection was lost".into())
        })?;
        Ok(Ran {
            status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Where another host reaches this one's sshd by default for a direct transfer: the host
    /// name and port ssh's configuration resolves its target to (an alias in the
    /// controller's `~/.ssh/config` means nothing elsewhere). None for this host.
    pub async fn transfer_address(&self) -> Option<TransferAddress> {
        match self {
            Host::Local { .. } => None,
            Host::Remote { target, config, .. } => {
                let used = effective(target, config.path()).await;
                Some(TransferAddress {
                    host: used.hostname,
                    port: used.port,
                })
            }
        }
    }

    pub async fn close(self) {
        if let Host::Remote { session, .. } = self {
            if let Ok(session) = Arc::try_unwrap(session) {
                let _ = session.close().await;
            }
        }
    }
}

/// SHA-256 of this binary, in hex: the agent's file name on a host. Computed once, when an
/// agent is first needed (commands that only run commands, `cleanup` and `init`, skip it);
/// callers about to start agents call it while they connect, so the hash (0.05 s for 16 MB)
/// overlaps the SSH handshake.
pub async fn own_digest() -> Result<&'static str> {
    static DIGEST: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    DIGEST
        .get_or_try_init(hash_own_binary)
        .await
        .map(String::as_str)
}

/// Read in pieces: a whole copy of the binary (16 MB) freed on one thread's heap stayed
/// resident beside the manifests decoded on another (measured: 16 MB more peak RSS on the
/// controller).
async fn hash_own_binary() -> Result<String> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    let digest = tokio::task::spawn_blocking(move || {
        std::fs::File::open(&exe)
            .and_then(|mut f| crate::sync::scan::hash_reader(&mut f))
            .with_context(|| format!("reading {}", exe.display()))
    })
    .await
    .context("hashing this program")??;
    Ok(crate::sync::hash_cache::hex(&digest))
}

impl Host {
    /// Uploads this binary as the agent (see `AGENT_INSTALL`).
    async fn upload(&self) -> Result<()> {
        let Host::Remote { session, label, .. } = self else {
            return Ok(());
        };
        let exe = std::env::current_exe().context("finding this program's path")?;
        let bytes = tokio::fs::read(&exe)
            .await
            .with_context(|| format!("reading {}", exe.display()))?;
        let needs = BinaryNeeds::from_elf(&bytes).map_err(|e| {
            anyhow!(
                "reading {} to upload it: {e} (a bug in relaymove, or the file was replaced)",
                exe.display()
            )
        })?;
        self.check_platform(&needs).await?;
        let digest = own_digest().await?;
        let mut child = session
            .command("sh")
            .arg("-c")
            .arg(AGENT_INSTALL)
            .arg("relaymove")
            .arg(digest)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .await
            .with_context(|| format!("uploading the agent to {label}"))?;
        let mut stdin = child
            .stdin()
            .take()
            .ok_or_else(|| anyhow!("bug: no stdin for the upload"))?;
        stdin
            .write_all(&bytes)
            .await
            .with_context(|| format!("uploading the agent to {label}"))?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "uploading the agent to {label} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Refuses a host that could not run this binary (see `platform.rs`).
    async fn check_platform(&self, needs: &BinaryNeeds) -> Result<()> {
        let label = self.label();
        let probe = self.run(&["sh", "-c", PLATFORM_PROBE]).await?;
        let host = HostPlatform::parse(&probe).ok_or_else(|| {
            anyhow!(
                "`uname -m` on {label} printed nothing; is it a Linux host? Nothing was uploaded"
            )
        })?;
        match mismatch(needs, &host) {
            None => Ok(()),
            Some(m) => bail!(refusal(label, &m)),
        }
    }
}

/// The oldest glibc the binary from `packaging/build-deb` runs on (its `GLIBC_FLOOR`; a test
/// keeps the two equal).
const PACKAGED_GLIBC: &str = "2.31";

/// What the host has, what the agent needs, and the fix.
fn refusal(label: &str, m: &Mismatch) -> String {
    match m {
        Mismatch::Arch { binary, host } => format!(
            "the agent cannot run on {label}: this relaymove is built for {binary} and {label} is {host}; nothing was uploaded\n\
             hint: relaymove uploads its own binary as the agent: reach {label} with a relaymove built for {host}, run from a {host} machine"
        ),
        Mismatch::Glibc { needs, host: HostLibc::Glibc(has) } => format!(
            "the agent cannot run on {label}: this relaymove needs glibc {needs} or newer and {label} has glibc {has}; nothing was uploaded\n\
             hint: install the .deb that packaging/build-deb makes (its relaymove runs on glibc {PACKAGED_GLIBC} and newer), \
             or build relaymove on a system whose glibc is {has} or older"
        ),
        Mismatch::Glibc { needs, host } => format!(
            "the agent cannot run on {label}: this relaymove needs glibc {needs} or newer and {label} has {host}; nothing was uploaded\n\
             hint: relaymove supports Debian-like hosts with glibc {PACKAGED_GLIBC} or newer"
        ),
    }
}

enum Waiter {
    Local(tokio::process::Child),
    Remote(openssh::Child<Arc<Session>>),
}

pub struct AgentProcess {
    pub stdin: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    pub stdout: Option<Pin<Box<dyn AsyncRead + Send>>>,
    stderr: JoinHandle<String>,
    waiter: Waiter,
    pub label: String,
    pub what: String,
}

impl AgentProcess {
    fn new(
        stdin: Option<Pin<Box<dyn AsyncWrite + Send>>>,
        stdout: Option<Pin<Box<dyn AsyncRead + Send>>>,
        stderr: Option<Pin<Box<dyn AsyncRead + Send>>>,
        waiter: Waiter,
        label: &str,
        what: String,
    ) -> AgentProcess {
        // Read stderr concurrently so a chatty agent never blocks on a full pipe.
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            if let Some(mut s) = stderr {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                text = String::from_utf8_lossy(&buf).into_owned();
            }
            text
        });
        AgentProcess {
            stdin,
            stdout,
            stderr,
            waiter,
            label: label.to_string(),
            what,
        }
    }

    pub fn take_stdin(&mut self) -> Result<Pin<Box<dyn AsyncWrite + Send>>> {
        self.stdin
            .take()
            .ok_or_else(|| anyhow!("bug: agent stdin already taken"))
    }

    pub fn take_stdout(&mut self) -> Result<Pin<Box<dyn AsyncRead + Send>>> {
        self.stdout
            .take()
            .ok_or_else(|| anyhow!("bug: agent stdout already taken"))
    }

    /// Waits for the agent to exit; a failure carries what it printed on stderr.
    /// Waits for the process; returns its exit code (None when killed or the connection
    /// dropped) and what it wrote on stderr.
    async fn exit_code(mut self) -> (Option<i32>, String) {
        drop(self.stdin.take());
        let status = match self.waiter {
            Waiter::Local(mut child) => child.wait().await.ok().and_then(|s| s.code()),
            Waiter::Remote(child) => child.wait().await.ok().and_then(|s| s.code()),
        };
        (status, self.stderr.await.unwrap_or_default())
    }

    pub async fn finish(mut self) -> Result<()> {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush().await;
        }
        let status = match self.waiter {
            Waiter::Local(mut child) => child.wait().await.map_err(|e| anyhow!(e)),
            Waiter::Remote(child) => child.wait().await.map_err(|e| anyhow!(e)),
        };
        let stderr = self.stderr.await.unwrap_or_default();
        let stderr = stderr.trim();
        let (label, what) = (&self.label, &self.what);
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => {
                let detail = if stderr.is_empty() {
                    format!("exit status {s}")
                } else {
                    stderr.to_string()
                };
                bail!(
                    "{what} on {label} failed: {}",
                    detail.trim_start_matches("relaymove: ")
                )
            }
            Err(e) => bail!(
                "{what} on {label}: connection lost ({e}){}",
                if stderr.is_empty() {
                    String::new()
                } else {
                    format!(": {stderr}")
                }
            ),
        }
    }
}

/// A running `relaymove agent serve`: requests go in on its stdin, answers come back on its
/// stdout, one at a time.
pub struct Agent {
    pub input: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    pub output: Pin<Box<dyn AsyncRead + Send>>,
    process: AgentProcess,
    /// Stopped by `abort`: how it ends is not news.
    aborted: bool,
    /// The encoded request sent by [`Agent::ask_ahead`], until the call that makes it.
    asked_ahead: Option<Vec<u8>>,
}

impl Agent {
    /// Starts the agent on `host`, uploading it first when the host lacks this version.
    pub async fn start(host: &Host) -> Result<Agent> {
        let mut uploaded = false;
        loop {
            let mut process = host.spawn_agent().await?;
            let mut output = process.take_stdout()?;
            match crate::remote::protocol::read_frame_async::<Hello>(&mut output).await {
                Ok(hello) if hello.protocol == PROTOCOL => {
                    let input = Some(process.take_stdin()?);
                    return Ok(Agent {
                        input,
                        output,
                        process,
                        aborted: false,
                        asked_ahead: None,
                    });
                }
                Ok(hello) => bail!(
                    "the agent on {} speaks protocol {}, this relaymove {PROTOCOL}",
                    host.label(),
                    hello.protocol
                ),
                Err(e) => {
                    let (code, stderr) = process.exit_code().await;
                    if code == Some(AGENT_MISSING) && !uploaded {
                        host.upload().await?;
                        uploaded = true;
                        continue;
                    }
                    let stderr = stderr.trim();
                    bail!(
                        "starting the agent on {} failed: {}",
                        host.label(),
                        if stderr.is_empty() {
                            format!("{e:#}")
                        } else {
                            stderr.to_string()
                        }
                    );
                }
            }
        }
    }

    pub fn label(&self) -> &str {
        &self.process.label
    }

    /// Sends a request without waiting for its answer.
    pub async fn send<T: serde::Serialize>(&mut self, request: &T) -> Result<()> {
        let input = self
            .input
            .as_mut()
            .ok_or_else(|| anyhow!("bug: request to a closed agent"))?;
        crate::remote::protocol::write_frame_async(input, request)
            .await
            .with_context(|| format!("sending a request to the agent on {}", self.process.label))
    }

    /// Sends `request` before its turn: the call that makes the same request later reads
    /// its answer instead of sending it again. With [`Agent::read_ahead`] the agent then works
    /// while this process still waits for something else.
    pub async fn ask_ahead(
        &mut self,
        request: &crate::remote::protocol::Request<'_>,
    ) -> Result<()> {
        self.send(request).await?;
        self.asked_ahead = Some(crate::remote::protocol::encode(request)?);
        Ok(())
    }

    /// Sends `request` unless [`Agent::ask_ahead`] sent it already.
    async fn ask(&mut self, request: &crate::remote::protocol::Request<'_>) -> Result<()> {
        let Some(ahead) = self.asked_ahead.take() else {
            return self.send(request).await;
        };
        if ahead != crate::remote::protocol::encode(request)? {
            bail!(
                "bug: the agent on {} was asked ahead for something else than what is now asked",
                self.process.label
            );
        }
        Ok(())
    }

    /// Reads what the agent answers into memory, up to `limit` bytes, while `until` runs:
    /// an agent [asked ahead](Agent::ask_ahead) then keeps working instead of stopping at a
    /// full pipe. The answers are read later as if they had just arrived.
    pub async fn read_ahead<T>(
        &mut self,
        until: impl std::future::Future<Output = T>,
        limit: usize,
    ) -> T {
        let mut until = std::pin::pin!(until);
        let mut ahead = ReadAhead::default();
        let mut piece = vec![0; READ_AHEAD_PIECE];
        let mut held = 0;
        let done = loop {
            let reading = ahead.failed.is_none() && !ahead.ended && held < limit;
            tokio::select! {
                done = &mut until => break done,
                n = self.output.read(&mut piece), if reading => match n {
                    Ok(0) => ahead.ended = true,
                    Ok(n) => {
                        held += n;
                        ahead.pieces.push_back(piece[..n].to_vec());
                    }
                    Err(e) => ahead.failed = Some(e),
                },
            }
        };
        if held > 0 || ahead.failed.is_some() {
            ahead.rest = Some(std::mem::replace(
                &mut self.output,
                Box::pin(tokio::io::empty()),
            ));
            self.output = Box::pin(ahead);
        }
        done
    }

    /// Sends a request and reads its one-frame answer.
    pub async fn call<T: serde::de::DeserializeOwned + Send + 'static>(
        &mut self,
        request: &crate::remote::protocol::Request<'_>,
    ) -> Result<T> {
        self.ask(request).await?;
        let reply: crate::remote::protocol::Reply<T> =
            crate::remote::protocol::read_frame_async(&mut self.output)
                .await
                .with_context(|| {
                    format!("reading the answer of the agent on {}", self.process.label)
                })?;
        reply.map_err(|msg| anyhow!("{msg}"))
    }

    /// [`Agent::call`] for a `Scan`: the manifest's entries go to `batch` as they are decoded
    /// (`manifest::EachBatch`); the manifest returned has none.
    pub async fn scan_each(
        &mut self,
        request: &crate::remote::protocol::Request<'_>,
        batch: impl FnMut(Vec<crate::sync::manifest::Entry>) -> bool + Send + 'static,
    ) -> Result<crate::sync::manifest::Manifest> {
        use crate::remote::protocol::{read_frame_seed_async, ReplySeed};
        self.ask(request).await?;
        let seed = ReplySeed(crate::sync::manifest::EachBatch(batch));
        let reply = read_frame_seed_async(&mut self.output, seed)
            .await
            .with_context(|| {
                format!("reading the answer of the agent on {}", self.process.label)
            })?;
        reply.map_err(|msg| anyhow!("{msg}"))
    }

    /// Abandons the request in progress (a failure elsewhere made it pointless): both pipes
    /// are closed, so an agent writing a stream gets EPIPE and ends instead of producing
    /// the rest of it. No further request can be sent.
    pub fn abort(&mut self) {
        self.aborted = true;
        self.input = None;
        self.output = Box::pin(tokio::io::empty());
    }

    /// Closes the agent's input and waits for it to exit; a failure carries its stderr.
    /// An aborted agent is not waited for (a local one is killed when dropped; a remote one
    /// ends with its SSH channel).
    pub async fn close(mut self) -> Result<()> {
        if self.aborted {
            return Ok(());
        }
        drop(self.input.take());
        // An agent stuck writing an answer nobody reads (after a failure elsewhere) gets
        // EPIPE and exits instead of waiting forever.
        self.output = Box::pin(tokio::io::empty());
        let label = self.process.label.clone();
        // Asked ahead and never read, an answer ends in a broken pipe: not the agent's failure.
        let unread = self.asked_ahead.is_some();
        // An agent saves its hash caches as it ends: a few seconds for a million files.
        match tokio::time::timeout(Duration::from_secs(120), self.process.finish()).await {
            Ok(_) if unread => Ok(()),
            Ok(r) => r,
            Err(_) => bail!("the agent on {label} did not exit"),
        }
    }
}

/// How much [`Agent::read_ahead`] asks for at a time: a full pipe.
const READ_AHEAD_PIECE: usize = 64 << 10;

/// An agent's output with what [`Agent::read_ahead`] read first: its pieces, each freed once
/// read, then the error or end it met, then the rest of the output.
#[derive(Default)]
struct ReadAhead {
    pieces: std::collections::VecDeque<Vec<u8>>,
    at: usize,
    failed: Option<std::io::Error>,
    ended: bool,
    rest: Option<Pin<Box<dyn AsyncRead + Send>>>,
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(front) = this.pieces.front() {
            let n = (front.len() - this.at).min(buf.remaining());
            buf.put_slice(&front[this.at..this.at + n]);
            this.at += n;
            if this.at == front.len() {
                this.pieces.pop_front();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        if let Some(e) = this.failed.take() {
            this.ended = true;
            return std::task::Poll::Ready(Err(e));
        }
        match (&mut this.rest, this.ended) {
            (Some(rest), false) => rest.as_mut().poll_read(cx, buf),
            _ => std::task::Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The agent scripts run by `sh` on this host, as a user other than root (root's agent
    //! directory is the host's real `/var/lib/relaymove`): HOME is a temporary directory.
    use super::*;
    use sha2::{Digest as _, Sha256};
    use std::os::unix::fs::PermissionsExt;
    use std::process::Output;

    /// A temporary HOME for the scripts, owned by the user they run as (nobody when the
    /// tests run as root).
    struct Home {
        dir: tempfile::TempDir,
        as_nobody: bool,
    }

    const NOBODY: u32 = 65534;

    impl Home {
        fn new() -> Home {
            let dir = tempfile::tempdir().unwrap();
            let as_nobody = nix::unistd::geteuid().is_root();
            if as_nobody {
                std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
            }
            Home { dir, as_nobody }
        }

        fn agent_dir(&self) -> PathBuf {
            self.dir.path().join(".local/lib/relaymove")
        }

        /// Runs `script` with `sh -c script relaymove ARG` as the home's user.
        fn sh(&self, script: &str, arg: &str, stdin: &[u8]) -> Output {
            let mut cmd = crate::remote::test_shell(self.as_nobody);
            cmd.args(["-c", script, "relaymove", arg])
                .env("HOME", self.dir.path())
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let mut child = cmd.spawn().expect("running sh");
            let mut input = child.stdin.take().unwrap();
            let bytes = stdin.to_vec();
            let writer = std::thread::spawn(move || {
                let _ = input.write_all(&bytes);
            });
            let out = child.wait_with_output().unwrap();
            writer.join().unwrap();
            out
        }
    }

    /// A stand-in agent: a script that says it started, padded to `pad` bytes.
    fn fake_agent(pad: usize) -> (Vec<u8>, String) {
        let mut bytes = b"#!/bin/sh\necho \"started $*\"\n#".to_vec();
        bytes.resize(bytes.len() + pad, b'x');
        bytes.push(b'\n');
        let digest = crate::sync::hash_cache::hex(&Sha256::digest(&bytes));
        (bytes, digest)
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// The ciphers `ssh -G` resolves for mail.example.org through the config relaymove
    /// writes around `user_config` alone (not this machine's /etc/ssh/ssh_config, which may
    /// set ciphers or end in a `Host *` block of its own); None when no ssh client runs here
    /// (then required in CI).
    fn resolved_ciphers(user_config: &str) -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        let (user, config) = (dir.path().join("user"), dir.path().join("config"));
        std::fs::write(&user, user_config).unwrap();
        std::fs::write(&config, config_text(&[user.as_path()])).unwrap();
        let out = std::process::Command::new("ssh")
            .arg("-G")
            .arg("-F")
            .arg(&config)
            .arg("mail.example.org")
            .output();
        let out = match out {
            Ok(out) => out,
            Err(e) if std::env::var("RELAYMOVE_REQUIRE_SSH").as_deref() == Ok("1") => {
                panic!("ssh -G: {e}")
            }
            Err(_) => return None,
        };
        assert!(out.status.success(), "{}", text(&out.stderr));
        let said = text(&out.stdout);
        let line = said.lines().find_map(|l| l.strip_prefix("ciphers "));
        Some(line.expect("ssh -G prints ciphers").to_string())
    }

    /// A stand-in agent: once a byte of request comes in (or its input ends), it writes an
    /// answer larger than a pipe holds and fails if nobody reads it all (`head` gets EPIPE).
    fn answering_agent() -> Agent {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "head -c 1 >/dev/null; head -c 1000000 /dev/zero"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let process = AgentProcess::new(
            None,
            None,
            stderr.map(|e| Box::pin(e) as Pin<Box<dyn AsyncRead + Send>>),
            Waiter::Local(child),
            "the test host",
            "the agent".to_string(),
        );
        Agent {
            input: stdin.map(|i| Box::pin(i) as Pin<Box<dyn AsyncWrite + Send>>),
            output: Box::pin(stdout.unwrap()),
            process,
            aborted: false,
            asked_ahead: None,
        }
    }

    #[tokio::test]
    async fn an_answer_asked_ahead_and_never_read_does_not_fail_the_agent_as_it_closes() {
        let low = crate::remote::protocol::Request::Priority { low: true };
        let mut agent = answering_agent();
        agent.ask_ahead(&low).await.unwrap();
        agent
            .close()
            .await
            .expect("the unread answer's broken pipe is no failure");

        // The same agent, its answer not asked for: the broken pipe is its failure.
        let e = answering_agent().close().await.unwrap_err();
        assert!(
            e.to_string().contains("the agent on the test host failed"),
            "{e:#}"
        );
    }

    #[tokio::test]
    async fn a_call_that_is_not_what_was_asked_ahead_is_refused() {
        use crate::remote::protocol::Request;
        let mut agent = answering_agent();
        agent
            .ask_ahead(&Request::Priority { low: true })
            .await
            .unwrap();
        let e = agent
            .call::<()>(&Request::Priority { low: false })
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("was asked ahead for something else"),
            "{e:#}"
        );
        agent.abort();
    }

    #[tokio::test]
    async fn what_was_read_ahead_comes_first_then_the_error_it_met_and_nothing_after() {
        let mut ahead = ReadAhead::default();
        ahead.pieces.extend([b"ab".to_vec(), b"cde".to_vec()]);
        ahead.rest = Some(Box::pin(&b"fg"[..]));
        let mut out = Vec::new();
        ahead.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"abcdefg");

        let mut cut = ReadAhead {
            failed: Some(std::io::Error::other("connection reset")),
            rest: Some(Box::pin(&b"never read"[..])),
            ..ReadAhead::default()
        };
        cut.pieces.push_back(b"ab".to_vec());
        let mut out = vec![0; 2];
        cut.read_exact(&mut out).await.unwrap();
        assert_eq!(out, b"ab");
        let e = cut.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(e.to_string(), "connection reset");
        let mut after = Vec::new();
        cut.read_to_end(&mut after).await.unwrap();
        assert!(after.is_empty(), "the output after the error was read");
    }

    #[test]
    fn ssh_is_asked_for_aes_gcm_on_aes_hardware_unless_the_user_chose_ciphers() {
        // The user's config ends inside a block for another host: ours still applies.
        let Some(ours) = resolved_ciphers("Host other.example.org\n  Port 2222\n") else {
            return;
        };
        match cipher_order() {
            Some(order) => assert_eq!(ours, order),
            None => assert!(ours.starts_with("chacha20-poly1305@openssh.com,"), "{ours}"),
        }
        let theirs = resolved_ciphers("Host mail.example.org\n  Ciphers aes256-ctr\n");
        assert_eq!(theirs.as_deref(), Some("aes256-ctr"));
    }

    #[test]
    fn a_host_with_an_older_glibc_is_refused_naming_both_versions_and_the_fix() {
        let v = |t| crate::remote::platform::GlibcVersion::parse(t).unwrap();
        let msg = refusal(
            "root@old.example.org",
            &Mismatch::Glibc {
                needs: v("2.34"),
                host: HostLibc::Glibc(v("2.31")),
            },
        );
        assert!(msg.starts_with("the agent cannot run on root@old.example.org: this relaymove needs glibc 2.34 or newer and root@old.example.org has glibc 2.31; nothing was uploaded\nhint: "), "{msg}");
        assert!(msg.contains("packaging/build-deb"), "{msg}");
        let msg = refusal(
            "alpine",
            &Mismatch::Glibc {
                needs: v("2.31"),
                host: HostLibc::Other("musl libc (x86_64)".into()),
            },
        );
        assert!(
            msg.contains("alpine has no GNU libc (musl libc (x86_64))"),
            "{msg}"
        );
        let msg = refusal(
            "pi",
            &Mismatch::Arch {
                binary: "x86_64".into(),
                host: "aarch64".into(),
            },
        );
        assert!(
            msg.contains("built for x86_64 and pi is aarch64; nothing was uploaded\nhint: "),
            "{msg}"
        );
    }

    #[test]
    fn the_packaged_glibc_named_in_the_hint_is_the_one_build_deb_targets_and_the_deb_depends_on() {
        let script = include_str!("../../packaging/build-deb");
        assert!(
            script.contains(&format!("\nGLIBC_FLOOR={PACKAGED_GLIBC}\n")),
            "packaging/build-deb sets another GLIBC_FLOOR than {PACKAGED_GLIBC}"
        );
        let manifest = include_str!("../../Cargo.toml");
        assert!(
            manifest.contains(&format!("\ndepends = \"libc6 (>= {PACKAGED_GLIBC}), ")),
            "Cargo.toml's [package.metadata.deb] depends on another libc6 than {PACKAGED_GLIBC}"
        );
    }

    #[test]
    fn a_fresh_home_gets_a_private_agent_dir_and_the_agent_starts() {
        let home = Home::new();
        let (bytes, digest) = fake_agent(10);
        let out = home.sh(AGENT_START, &digest, b"");
        assert_eq!(
            out.status.code(),
            Some(AGENT_MISSING),
            "{}",
            text(&out.stderr)
        );
        let out = home.sh(AGENT_INSTALL, &digest, &bytes);
        assert!(out.status.success(), "{}", text(&out.stderr));
        for dir in [home.agent_dir(), home.agent_dir().join("bin")] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
        }
        let out = home.sh(AGENT_START, &digest, b"");
        assert_eq!(
            text(&out.stdout),
            "started agent serve\n",
            "{}",
            text(&out.stderr)
        );
    }

    /// Installs the fake agent, then lets `spoil` change the agent directory: both scripts
    /// must then refuse (exit 96) with a message naming `named` and the fix, and not run it.
    #[test]
    fn an_installed_agent_others_could_change_is_replaced_not_started() {
        let home = Home::new();
        let (bytes, digest) = fake_agent(10);
        let out = home.sh(AGENT_INSTALL, &digest, &bytes);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let agent = home.agent_dir().join(format!("bin/relaymove-{digest}"));
        for mode in [0o720, 0o702] {
            std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(mode)).unwrap();
            let out = home.sh(AGENT_START, &digest, b"");
            assert_eq!(out.status.code(), Some(AGENT_MISSING), "mode {mode:o}");
            assert_eq!(text(&out.stdout), "", "mode {mode:o}");
        }
        let out = home.sh(AGENT_INSTALL, &digest, &bytes);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mode = std::fs::metadata(&agent).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let out = home.sh(AGENT_START, &digest, b"");
        assert_eq!(text(&out.stdout), "started agent serve\n");
    }

    fn assert_refused(home: &Home, spoil: &str, named: &Path) {
        let (bytes, digest) = fake_agent(10);
        let out = home.sh(AGENT_INSTALL, &digest, &bytes);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = home.sh(spoil, "", b"");
        assert!(out.status.success(), "{}", text(&out.stderr));
        for script in [AGENT_START, AGENT_INSTALL] {
            let out = home.sh(script, &digest, &bytes);
            let msg = text(&out.stderr);
            assert_eq!(out.status.code(), Some(96), "{msg}");
            assert_eq!(text(&out.stdout), "", "the agent ran: {msg}");
            assert!(
                msg.contains(&format!("agent directory {} ", named.display())),
                "{msg}"
            );
            assert!(msg.contains("fix: remove it"), "{msg}");
        }
    }

    #[test]
    fn a_group_or_world_writable_agent_dir_is_refused() {
        let home = Home::new();
        assert_refused(
            &home,
            "chmod 777 \"$HOME/.local/lib/relaymove\"",
            &home.agent_dir(),
        );
    }

    #[test]
    fn a_group_writable_bin_dir_is_refused() {
        let home = Home::new();
        let bin = home.agent_dir().join("bin");
        assert_refused(&home, "chmod 770 \"$HOME/.local/lib/relaymove/bin\"", &bin);
    }

    #[test]
    fn a_symlinked_agent_dir_is_refused() {
        let home = Home::new();
        let spoil =
            "cd \"$HOME/.local/lib\" && mv relaymove elsewhere && ln -s elsewhere relaymove";
        assert_refused(&home, spoil, &home.agent_dir());
    }

    #[test]
    fn an_agent_dir_owned_by_another_user_is_refused() {
        let home = Home::new();
        if !home.as_nobody {
            eprintln!("skipping: only root can give the directory another owner");
            return;
        }
        std::fs::create_dir_all(home.dir.path().join(".local/lib")).unwrap();
        std::os::unix::fs::chown(home.dir.path().join(".local"), Some(NOBODY), Some(NOBODY))
            .unwrap();
        std::os::unix::fs::chown(
            home.dir.path().join(".local/lib"),
            Some(NOBODY),
            Some(NOBODY),
        )
        .unwrap();
        // Root-owned and 0755: nobody cannot write it, but root could swap the agent.
        std::fs::create_dir(home.agent_dir()).unwrap();
        std::fs::set_permissions(home.agent_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (bytes, digest) = fake_agent(10);
        for script in [AGENT_START, AGENT_INSTALL] {
            let out = home.sh(script, &digest, &bytes);
            let msg = text(&out.stderr);
            assert_eq!(out.status.code(), Some(96), "{msg}");
            assert!(msg.contains("is owned by uid 0, not by uid 65534"), "{msg}");
        }
    }

    #[test]
    fn concurrent_first_uploads_all_succeed_and_leave_one_intact_agent() {
        let home = std::sync::Arc::new(Home::new());
        let (bytes, digest) = fake_agent(2 << 20);
        let bytes = std::sync::Arc::new(bytes);
        let uploads: Vec<_> = (0..6)
            .map(|_| {
                let (home, bytes, digest) = (home.clone(), bytes.clone(), digest.clone());
                std::thread::spawn(move || home.sh(AGENT_INSTALL, &digest, &bytes))
            })
            .collect();
        for u in uploads {
            let out = u.join().unwrap();
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        let bin = home.agent_dir().join("bin");
        let names: Vec<_> = std::fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [format!("relaymove-{digest}")]);
        let out = home.sh(AGENT_START, &digest, b"");
        assert_eq!(
            text(&out.stdout),
            "started agent serve\n",
            "{}",
            text(&out.stderr)
        );
    }

    #[test]
    fn a_cut_short_upload_is_not_installed_and_other_versions_alone_are_removed() {
        let home = Home::new();
        let (old, old_digest) = fake_agent(1);
        let out = home.sh(AGENT_INSTALL, &old_digest, &old);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = home.sh(
            "touch \"$HOME/.local/lib/relaymove/bin/relaymove-notes\"",
            "",
            b"",
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let (bytes, digest) = fake_agent(100);
        let out = home.sh(AGENT_INSTALL, &digest, &bytes[..50]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out.stderr).contains("upload cut short"),
            "{}",
            text(&out.stderr)
        );
        let out = home.sh(AGENT_INSTALL, &digest, &bytes);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let mut names: Vec<_> = std::fs::read_dir(home.agent_dir().join("bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [format!("relaymove-{digest}"), "relaymove-notes".into()]
        );
    }
}
