//! Starting agents: locally as a child process of this binary, remotely over SSH after
//! making sure the host has this exact binary.
//!
//! SSH is the system OpenSSH through the `openssh` crate, so `~/.ssh/config`, ssh-agent and
//! known_hosts work as users expect. Host keys are checked strictly, and agent forwarding is
//! forced off: our generated config sets `ForwardAgent no` before including the user's
//! configuration, and the first value ssh reads wins.
//!
//! The agent lives at `/var/lib/relaymove/bin/relaymove-<sha256>` (root-only) or, for other
//! users, under `~/.local/lib/relaymove/bin/`. It is uploaded only when absent or different.

use crate::remote::endpoint::{parse_ssh_target, RemotePath};
use crate::remote::protocol::{Hello, PROTOCOL};
use crate::remote::ssh::{connect_failure, Effective};
use anyhow::{anyhow, bail, Context, Result};
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder, Stdio};
use sha2::{Digest as _, Sha256};
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
        /// SHA-256 of this binary: the agent's file name on the host.
        digest: String,
        _config: tempfile::NamedTempFile,
    },
}

/// Writes the config relaymove gives ssh; also returns the user's config file it includes.
fn ssh_config(opts: &SshOptions) -> Result<(tempfile::NamedTempFile, Option<PathBuf>)> {
    let mut file = tempfile::Builder::new()
        .prefix("relaymove-ssh")
        .tempfile()
        .context("creating a temporary ssh config")?;
    let mut text = String::from("# written by relaymove: these first values win over the included ones\nForwardAgent no\nForwardX11 no\n");
    let user_config = match &opts.config {
        Some(p) => Some(
            std::fs::canonicalize(p)
                .with_context(|| format!("reading ssh config {}", p.display()))?,
        ),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".ssh/config"))
            .filter(|p| p.exists()),
    };
    for inc in user_config
        .iter()
        .map(|p| p.as_path())
        .chain([Path::new("/etc/ssh/ssh_config")])
    {
        if inc.exists() {
            text.push_str(&format!("Include \"{}\"\n", inc.display()));
        }
    }
    file.write_all(text.as_bytes())?;
    Ok((file, user_config))
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

/// Starts the agent if this host has this exact version; else exits 97 (upload needed).
/// The check and the start are one command, so a sync costs one round trip for it.
const AGENT_START: &str = r#"if [ "$(id -u)" = 0 ]; then d=/var/lib/relaymove; else d="${HOME:?}/.local/lib/relaymove"; fi
f="$d/bin/relaymove-$1"
if [ -x "$f" ] && [ "$(sha256sum < "$f" | cut -d' ' -f1)" = "$1" ]; then exec "$f" agent serve; fi
exit 97
"#;

/// Installs the agent from stdin, root-only, and removes older versions.
const AGENT_INSTALL: &str = r#"set -e
if [ "$(id -u)" = 0 ]; then d=/var/lib/relaymove; else d="${HOME:?}/.local/lib/relaymove"; fi
umask 077
mkdir -p "$d/bin"
chmod 700 "$d"
f="$d/bin/relaymove-$1"
cat > "$f.part"
chmod 700 "$f.part"
mv "$f.part" "$f"
for old in "$d"/bin/relaymove-*; do [ "$old" = "$f" ] || rm -f "$old"; done
"#;

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
        let exe = std::env::current_exe().context("finding this program's path")?;
        let bytes = tokio::fs::read(&exe)
            .await
            .with_context(|| format!("reading {}", exe.display()))?;
        Ok(Host::Remote {
            session: Arc::new(session),
            label,
            digest: crate::sync::hash_cache::hex(&Sha256::digest(&bytes)),
            _config: config,
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
            Host::Remote {
                session,
                label,
                digest,
                ..
            } => {
                let mut cmd = session.clone().arc_command("sh");
                cmd.arg("-c").arg(AGENT_START).arg("relaymove").arg(digest);
                let mut child = cmd
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .await
                    .with_context(|| format!("starting the agent on {label}"))?;
                let stdin = child
                    .stdin()
                    .take()
                    .map(|s| Box::pin(s) as Pin<Box<dyn AsyncWrite + Send>>);
                let stdout = child
                    .stdout()
                    .take()
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

    pub async fn close(self) {
        if let Host::Remote { session, .. } = self {
            if let Ok(session) = Arc::try_unwrap(session) {
                let _ = session.close().await;
            }
        }
    }
}

impl Host {
    /// Uploads this binary as the agent (see `AGENT_INSTALL`).
    async fn upload(&self) -> Result<()> {
        let Host::Remote {
            session,
            label,
            digest,
            ..
        } = self
        else {
            return Ok(());
        };
        let exe = std::env::current_exe().context("finding this program's path")?;
        let bytes = tokio::fs::read(&exe)
            .await
            .with_context(|| format!("reading {}", exe.display()))?;
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

    /// Sends a request and reads its one-frame answer.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &mut self,
        request: &crate::remote::protocol::Request,
    ) -> Result<T> {
        self.send(request).await?;
        let reply: crate::remote::protocol::Reply<T> =
            crate::remote::protocol::read_frame_async(&mut self.output)
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
        match tokio::time::timeout(Duration::from_secs(30), self.process.finish()).await {
            Ok(r) => r,
            Err(_) => bail!("the agent on {label} did not exit"),
        }
    }
}
