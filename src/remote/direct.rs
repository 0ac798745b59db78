//! The direct route: remote → remote data flows from old's agent to new's over an SSH
//! connection of their own, and the controller keeps only the control channel.
//!
//! Per transfer, under a random token:
//! 1. old's agent makes a one-time ed25519 key in its runtime directory (root: `/run`, a
//!    tmpfs), root-only, and tells which of its addresses reaches new ([`make_key`]);
//! 2. new's agent adds the public half to its user's `~/.ssh/authorized_keys` (once
//!    `sshd -T` confirms sshd reads that file for old's login) as
//!    `restrict,from="<old's address>",command="<agent> agent accept <token>"` and listens
//!    on a socket in its runtime directory ([`Accepting::open`]); it answers with its SSH
//!    host keys (those its sshd presents, and `/etc/ssh`'s), read through the controller's
//!    verified session;
//! 3. old runs `ssh` with only that key, only those host keys (no trust on first use, no
//!    agent, no forwarding, no config of old's) and writes the chunked stream into it
//!    ([`Connection`]); sshd on new runs `agent accept`, which hands the stream to the
//!    listening receiver ([`accept`]).
//!
//! The key line and socket go as soon as the one connection arrives, and when the agent ends
//! in any other way; the private key goes when its `ssh` ends. `relaymove cleanup` removes
//! what a killed agent left (`remote::cleanup` knows these names).

use crate::remote::serve::lock_dir_for;
use crate::remote::ssh::cipher_order;
use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

/// The comment that ends every key line relaymove adds; `relaymove cleanup` removes lines
/// that end in it and a token.
pub const KEY_COMMENT: &str = "relaymove-direct-";

/// How long new waits for old's connection once the sender was told to connect.
const CONNECT_WAIT: Duration = Duration::from_secs(120);

/// A fresh random token: 16 bytes in hex.
pub fn new_token() -> Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(crate::sync::hash_cache::hex(&bytes))
}

/// A token is 32 lowercase hex digits, nothing else: it becomes part of file names and of
/// the key line's forced command.
pub fn check_token(token: &str) -> Result<()> {
    if token.len() == 32
        && token
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        Ok(())
    } else {
        bail!("bad direct-transfer token {token:?}")
    }
}

/// This user's directory for direct-transfer keys and sockets, created 0700.
fn runtime_dir() -> Result<PathBuf> {
    let base = lock_dir_for(nix::unistd::geteuid().is_root(), |k| std::env::var_os(k))
        .context("neither XDG_RUNTIME_DIR nor HOME is set")?;
    let dir = base.join("direct");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        bail!(
            "{} is not a private directory of this user (a symlink, another owner, or open to others); remove it and run again",
            dir.display()
        );
    }
    Ok(dir)
}

fn socket_path(dir: &Path, token: &str) -> PathBuf {
    dir.join(format!("{token}.sock"))
}

/// What old's agent answers to `DirectKey`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KeyMade {
    /// The public half, one `authorized_keys` line without options.
    pub public_key: String,
    /// New's transfer address as old resolved it: the one `ssh` connects to.
    pub peer: SocketAddr,
    /// Old's own address on the way to `peer`: what new sees, for `from=`.
    pub source: IpAddr,
}

/// The one-time key files on old, removed when dropped.
pub struct KeyFiles {
    dir: PathBuf,
    token: String,
    peer: SocketAddr,
}

impl KeyFiles {
    fn private(&self) -> PathBuf {
        self.dir.join(&self.token)
    }

    fn known_hosts(&self) -> PathBuf {
        self.dir.join(format!("{}.known_hosts", self.token))
    }
}

impl Drop for KeyFiles {
    fn drop(&mut self) {
        for suffix in ["", ".pub", ".known_hosts"] {
            let _ = std::fs::remove_file(self.dir.join(format!("{}{suffix}", self.token)));
        }
    }
}

/// On old: resolves `address`, finds the local address that reaches it, and makes the key.
pub fn make_key(token: &str, address: &str, port: u16) -> Result<(KeyFiles, KeyMade)> {
    check_token(token)?;
    let peer = (address, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving new's transfer address {address}"))?
        .next()
        .ok_or_else(|| anyhow!("new's transfer address {address} resolves to no address"))?;
    let source = source_address(peer)?;
    let dir = runtime_dir()?;
    let files = KeyFiles {
        dir,
        token: token.to_string(),
        peer,
    };
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-C")
        .arg(format!("{KEY_COMMENT}{token}"))
        .arg("-f")
        .arg(files.private())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            anyhow!("running ssh-keygen: {e}; the direct route needs OpenSSH's client (apt install openssh-client)")
        })?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let public_key = std::fs::read_to_string(files.dir.join(format!("{token}.pub")))
        .context("reading the new public key")?
        .trim()
        .to_string();
    Ok((
        files,
        KeyMade {
            public_key,
            peer,
            source,
        },
    ))
}

/// The address this host sends from to reach `peer` (a UDP socket's route choice; nothing
/// is sent).
fn source_address(peer: SocketAddr) -> Result<IpAddr> {
    let any: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(any).context("opening a socket to find the route")?;
    socket
        .connect(peer)
        .with_context(|| format!("no route from this host to {peer}"))?;
    Ok(socket.local_addr()?.ip())
}

/// What new's agent answers to `DirectAccept`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Accepting {
    /// The user old logs in as (the agent's own).
    pub user: String,
    /// New's SSH host keys (`type base64` each), which old's `ssh` requires.
    pub host_keys: Vec<String>,
}

/// On new: the authorized key line and the listening socket of one transfer; both removed
/// when the connection arrives or this is dropped.
pub struct Listening {
    listener: Option<UnixListener>,
    socket: PathBuf,
    line: Option<KeyLine>,
}

impl Listening {
    /// Authorizes `public_key` from `from` for this transfer only, and listens for it.
    pub fn open(token: &str, public_key: &str, from: IpAddr) -> Result<(Listening, Accepting)> {
        check_token(token)?;
        let key = checked_public_key(public_key, token)?;
        let exe = std::env::current_exe().context("finding the agent's own path")?;
        let exe = exe
            .to_str()
            .filter(|p| !p.contains(['\'', '"', '\\', '\n']))
            .ok_or_else(|| {
                anyhow!(
                    "the agent's path {} cannot be put in an authorized_keys command",
                    exe.display()
                )
            })?;
        let dir = runtime_dir()?;
        let socket = socket_path(&dir, token);
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("listening on {}", socket.display()))?;
        let mut listening = Listening {
            listener: Some(listener),
            socket,
            line: None,
        };
        let user = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .ok_or_else(|| anyhow!("this agent's user has no name"))?;
        // sshd's default `AuthorizedKeysFile`.
        let home = agent_home()?;
        let file = home.join(".ssh/authorized_keys");
        check_sshd_reads(&home, &file, &user, from)?;
        let line =
            format!("restrict,from=\"{from}\",command=\"'{exe}' agent accept {token}\" {key}");
        listening.line = Some(KeyLine::add(&file, line)?);
        Ok((
            listening,
            Accepting {
                user,
                host_keys: host_keys()?,
            },
        ))
    }

    /// Waits for old's one connection; gives up when `cancel` (the controller's pipe) becomes
    /// readable or closes, or after [`CONNECT_WAIT`]. The key line and socket go either way.
    pub fn accept(mut self, cancel: &impl AsRawFd) -> Result<UnixStream> {
        let listener = self
            .listener
            .take()
            .ok_or_else(|| anyhow!("bug: accepted twice"))?;
        let got = wait_readable(&listener, cancel, CONNECT_WAIT);
        self.close();
        match got? {
            Ready::Listener => {}
            Ready::Cancel => bail!("the controller cancelled the transfer before old connected"),
            Ready::Timeout => bail!("old did not connect within {} s", CONNECT_WAIT.as_secs()),
        }
        let (stream, _) = listener.accept().context("accepting old's connection")?;
        // Only this user's processes can reach the private directory; checked all the same.
        let cred =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                .context("reading the connecting process's credentials")?;
        if cred.uid() != nix::unistd::geteuid().as_raw() {
            bail!(
                "a process of uid {} connected to the transfer socket; refused",
                cred.uid()
            );
        }
        Ok(stream)
    }

    fn close(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        if let Some(line) = self.line.take() {
            let _ = line.remove();
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.close();
    }
}

enum Ready {
    Listener,
    Cancel,
    Timeout,
}

fn wait_readable(listener: &impl AsRawFd, cancel: &impl AsRawFd, limit: Duration) -> Result<Ready> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: cancel.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(Ready::Timeout);
        }
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, left.as_millis().min(60_000) as i32) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("waiting for old's connection");
        }
        if fds[1].revents != 0 {
            return Ok(Ready::Cancel);
        }
        if fds[0].revents != 0 {
            return Ok(Ready::Listener);
        }
    }
}

/// Only a plain ed25519 public key with this transfer's comment goes into authorized_keys:
/// the text comes from old's agent, and a newline or an option in it would authorize more.
fn checked_public_key(key: &str, token: &str) -> Result<String> {
    let fields: Vec<&str> = key.split(' ').collect();
    let ok = matches!(fields.as_slice(),
        ["ssh-ed25519", b64, comment]
            if !b64.is_empty()
                && b64.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
                && *comment == format!("{KEY_COMMENT}{token}"));
    if !ok {
        bail!("old sent a public key that is not a plain ed25519 key for this transfer; refused");
    }
    Ok(key.to_string())
}

/// Refuses a transfer whose key line sshd would not read: with an `AuthorizedKeysFile` that
/// leaves out `~/.ssh/authorized_keys` (keys kept under `/etc/ssh`, say), old's login would
/// fail and look like a network problem. Asks `sshd -T` for the login old will make, Match
/// blocks included; when sshd cannot say (no sshd here, not root), old's login tells.
fn check_sshd_reads(home: &Path, file: &Path, user: &str, from: IpAddr) -> Result<()> {
    let mut spec = format!("user={user},host={from},addr={from}");
    // Old logs in at the address the controller used, unless a transfer address differs.
    if let Some((address, port)) = std::env::var("SSH_CONNECTION")
        .ok()
        .and_then(|c| serving_end(&c))
    {
        spec.push_str(&format!(",laddr={address},lport={port}"));
    }
    let Ok(out) = Command::new("/usr/sbin/sshd")
        .args(["-T", "-C", &spec])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    else {
        return Ok(());
    };
    let config = String::from_utf8_lossy(&out.stdout);
    let Some(files) = out
        .status
        .success()
        .then(|| key_files(&config, user, home))
        .flatten()
    else {
        return Ok(());
    };
    if files.iter().any(|f| f == file) {
        return Ok(());
    }
    let read = if files.is_empty() {
        "none".to_string()
    } else {
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    bail!(
        "this host's sshd does not read {} when {user} logs in from {from} (its AuthorizedKeysFile: {read}), \
         and that is where the direct route authorizes old's one-time key; nothing was changed\n\
         hint: relay the data through the controller with --route controller (`route = \"controller\"` under \
         [migrate]), or add .ssh/authorized_keys to AuthorizedKeysFile in sshd_config",
        file.display()
    )
}

/// The `authorizedkeysfile` of `sshd -T` output, expanded as sshd does: `%h` the home,
/// `%u` the user, `%U` the uid, `%%` a percent sign, relative paths under the home. `None`
/// when the line is missing.
fn key_files(config: &str, user: &str, home: &Path) -> Option<Vec<PathBuf>> {
    let uid = nix::unistd::geteuid().to_string();
    let line = config
        .lines()
        .find_map(|l| l.strip_prefix("authorizedkeysfile "))?;
    let expand = |pattern: &str| {
        let mut out = String::new();
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            match (c, chars.clone().next()) {
                ('%', Some('h')) => out.push_str(&home.to_string_lossy()),
                ('%', Some('u')) => out.push_str(user),
                ('%', Some('U')) => out.push_str(&uid),
                ('%', Some('%')) => out.push('%'),
                _ => {
                    out.push(c);
                    continue;
                }
            }
            chars.next();
        }
        home.join(out)
    };
    Some(
        line.split_whitespace()
            .filter(|f| *f != "none")
            .map(expand)
            .collect(),
    )
}

/// The agent user's home, where its `~/.ssh/authorized_keys` is.
fn agent_home() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home))
}

/// This host's SSH host public keys (`type base64`): those the sshd serving this agent
/// presents (it is the sshd the controller verified; it may use its own `HostKey` files),
/// then those in `/etc/ssh`. Old trusts any of them and nothing else.
fn host_keys() -> Result<Vec<String>> {
    let mut keys = serving_sshd_keys();
    let dir = Path::new("/etc/ssh");
    let mut names: Vec<_> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| {
                let n = n.as_bytes();
                n.starts_with(b"ssh_host_") && n.ends_with(b"_key.pub")
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).context("reading /etc/ssh"),
    };
    names.sort();
    for name in names {
        let text = std::fs::read_to_string(dir.join(&name))
            .with_context(|| format!("reading /etc/ssh/{}", name.to_string_lossy()))?;
        let mut fields = text.split_whitespace();
        if let (Some(kind), Some(b64)) = (fields.next(), fields.next()) {
            keys.push(format!("{kind} {b64}"));
        }
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));
    if keys.is_empty() {
        bail!("no SSH host key found (asked the sshd serving this agent, read /etc/ssh/ssh_host_*_key.pub), so old could not verify this host; use --route controller");
    }
    Ok(keys)
}

/// The host keys of the sshd this agent runs under, asked at the address and port
/// `SSH_CONNECTION` names (this host's own end of the controller's session). Empty when
/// that is not known (a `sudo` that drops the variable) or `ssh-keyscan` fails.
fn serving_sshd_keys() -> Vec<String> {
    let Some((address, port)) = std::env::var("SSH_CONNECTION")
        .ok()
        .and_then(|c| serving_end(&c))
    else {
        return Vec::new();
    };
    let out = Command::new("ssh-keyscan")
        .args(["-T", "5", "-p", &port.to_string(), &address.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split_whitespace().skip(1);
            Some(format!("{} {}", fields.next()?, fields.next()?))
        })
        .collect()
}

/// The server's address and port in `SSH_CONNECTION` (`client port server port`).
fn serving_end(connection: &str) -> Option<(IpAddr, u16)> {
    let fields: Vec<&str> = connection.split_whitespace().collect();
    match fields[..] {
        [_, _, address, port] => Some((address.parse().ok()?, port.parse().ok()?)),
        _ => None,
    }
}

/// One line added to an `authorized_keys` file, and what must be undone to leave the file
/// byte for byte as it was.
struct KeyLine {
    file: PathBuf,
    line: String,
    created_dir: bool,
    created_file: bool,
    /// The file did not end in a newline: one was added before the line.
    added_newline: bool,
}

impl KeyLine {
    fn add(file: &Path, line: String) -> Result<KeyLine> {
        let dir = file
            .parent()
            .ok_or_else(|| anyhow!("bug: {} has no parent", file.display()))?;
        let created_dir = match std::fs::symlink_metadata(dir) {
            Ok(m) if m.is_dir() => false,
            Ok(_) => bail!(
                "{} is not a directory (a symlink?); refusing to add a key there",
                dir.display()
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                true
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        let _lock = lock_dir(dir)?;
        let (old, meta) = read_nofollow(file)?;
        let mut text = old.clone().unwrap_or_default();
        let added_newline = !text.is_empty() && !text.ends_with(b"\n");
        if added_newline {
            text.push(b'\n');
        }
        text.extend_from_slice(line.as_bytes());
        text.push(b'\n');
        replace(file, &text, meta.as_ref())?;
        Ok(KeyLine {
            file: file.to_path_buf(),
            line,
            created_dir,
            created_file: old.is_none(),
            added_newline,
        })
    }

    fn remove(self) -> Result<()> {
        let dir = self
            .file
            .parent()
            .ok_or_else(|| anyhow!("bug: no parent"))?;
        let lock = lock_dir(dir)?;
        let (Some(mut text), meta) = read_nofollow(&self.file)? else {
            return Ok(());
        };
        let ours = format!("{}\n", self.line);
        let at = text
            .windows(ours.len())
            .position(|w| w == ours.as_bytes())
            .filter(|&i| i == 0 || text[i - 1] == b'\n');
        let Some(at) = at else { return Ok(()) };
        let was_last = at + ours.len() == text.len();
        text.drain(at..at + ours.len());
        if self.added_newline && was_last && text.ends_with(b"\n") {
            text.pop();
        }
        if text.is_empty() && self.created_file {
            std::fs::remove_file(&self.file)
                .with_context(|| format!("removing {}", self.file.display()))?;
        } else {
            replace(&self.file, &text, meta.as_ref())?;
        }
        drop(lock);
        if self.created_dir {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }
}

/// Serializes changes to one `.ssh` directory among relaymove's agents and `relaymove cleanup`
/// (`remote::cleanup`, with `flock` on the same directory).
fn lock_dir(dir: &Path) -> Result<Flock<std::fs::File>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .with_context(|| format!("opening {}", dir.display()))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("locking {}: {e}", dir.display()))
}

fn read_nofollow(file: &Path) -> Result<(Option<Vec<u8>>, Option<std::fs::Metadata>)> {
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(file)
    {
        Ok(mut f) => {
            let meta = f.metadata()?;
            if !meta.is_file() {
                bail!(
                    "{} is not a regular file; refusing to change it",
                    file.display()
                );
            }
            let mut text = Vec::new();
            f.read_to_end(&mut text)
                .with_context(|| format!("reading {}", file.display()))?;
            Ok((Some(text), Some(meta)))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((None, None)),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            bail!("{} is a symlink; refusing to change it", file.display())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// Writes `text` to a temporary file beside `file`, with `file`'s owner and mode (0600 for a
/// new one), makes it durable, and renames it over `file`: sshd never reads half a file.
fn replace(file: &Path, text: &[u8], meta: Option<&std::fs::Metadata>) -> Result<()> {
    let dir = file.parent().ok_or_else(|| anyhow!("bug: no parent"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".relaymove-keys")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(text)?;
    if let Some(m) = meta {
        std::os::unix::fs::fchown(tmp.as_file(), Some(m.uid()), Some(m.gid()))
            .with_context(|| format!("giving the new {} its owner", file.display()))?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(file)
        .map_err(|e| anyhow!("replacing {}: {}", file.display(), e.error))?;
    Ok(())
}

/// On old: `ssh` to new with the one-time key, its stdin the stream.
pub struct Connection {
    child: Child,
    stderr: std::thread::JoinHandle<String>,
    peer: SocketAddr,
    _key: KeyFiles,
}

impl Connection {
    pub fn open(
        key: KeyFiles,
        user: &str,
        host_keys: &[String],
    ) -> Result<(Connection, ChildStdin)> {
        const ALIAS: &str = "relaymove-new";
        let mut known = String::new();
        for k in host_keys {
            if k.contains(['\n', '\r']) {
                bail!("bad host key from the controller");
            }
            known.push_str(&format!("{ALIAS} {k}\n"));
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key.known_hosts())
            .and_then(|mut f| f.write_all(known.as_bytes()))
            .context("writing new's host keys")?;
        let peer = key.peer;
        let mut cmd = Command::new("ssh");
        cmd.arg("-F").arg("/dev/null");
        cmd.arg("-i").arg(key.private());
        cmd.arg("-o").arg(format!(
            "UserKnownHostsFile={}",
            key.known_hosts().display()
        ));
        for o in [
            "GlobalKnownHostsFile=/dev/null",
            "StrictHostKeyChecking=yes",
            "IdentitiesOnly=yes",
            "IdentityAgent=none",
            "BatchMode=yes",
            "PasswordAuthentication=no",
            "KbdInteractiveAuthentication=no",
            "ForwardAgent=no",
            "ForwardX11=no",
            "ClearAllForwardings=yes",
            "ConnectTimeout=15",
            "ServerAliveInterval=10",
            "ServerAliveCountMax=3",
            "LogLevel=ERROR",
        ] {
            cmd.arg("-o").arg(o);
        }
        cmd.arg("-o").arg(format!("HostKeyAlias={ALIAS}"));
        if let Some(ciphers) = cipher_order() {
            cmd.arg("-o").arg(format!("Ciphers={ciphers}"));
        }
        cmd.args(["-T", "-p"]).arg(peer.port().to_string());
        cmd.arg("-l").arg(user).arg("--").arg(peer.ip().to_string());
        // sshd runs the key's forced command whatever is asked; this names the purpose in logs.
        cmd.arg("relaymove-direct");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context(
                "running ssh (the direct route needs OpenSSH's client: apt install openssh-client)",
            )?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("bug: no ssh stdin"))?;
        let mut err = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("bug: no ssh stderr"))?;
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Ok((
            Connection {
                child,
                stderr,
                peer,
                _key: key,
            },
            stdin,
        ))
    }

    /// Ends `ssh` (and so the stream: the receiver then removes its temporary files) as soon
    /// as `input`, the controller's pipe, becomes readable or closes: the controller was
    /// interrupted or went away. Nothing else arrives there while a send runs. Stops
    /// watching when the returned guard is dropped.
    pub fn cancel_on(&self, input: std::os::fd::RawFd) -> CancelWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pid = self.child.id() as libc::pid_t;
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut fd = libc::pollfd {
                fd: input,
                events: libc::POLLIN,
                revents: 0,
            };
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: one valid pollfd for the duration of the call.
                let n = unsafe { libc::poll(&mut fd, 1, 200) };
                if n > 0 && fd.revents != 0 {
                    // SAFETY: `pid` is our own child, not yet waited for (the guard is
                    // dropped before `finish` waits).
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                    return true;
                }
            }
            false
        });
        CancelWatch {
            stop,
            thread: Some(thread),
        }
    }

    /// Waits for `ssh` to end (its stdin must be closed first); an error says why it failed.
    pub fn finish(mut self) -> Result<()> {
        let status = self.child.wait().context("waiting for ssh")?;
        let stderr = self.stderr.join().unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let why = stderr.trim();
        bail!(
            "the SSH connection from this host to new at {} failed ({}){}",
            self.peer,
            status,
            if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            }
        )
    }
}

/// Watches for the controller's cancellation while a direct send runs.
pub struct CancelWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<bool>>,
}

impl CancelWatch {
    /// Stops watching; true when the controller cancelled.
    pub fn end(mut self) -> bool {
        self.stop_now()
    }

    fn stop_now(&mut self) -> bool {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(false))
            .unwrap_or(false)
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// `relaymove agent accept TOKEN`: the forced command of a transfer key on new. Copies its
/// stdin (old's stream) to the waiting receiver and waits until the receiver has read it.
pub fn accept(token: &str) -> Result<i32> {
    check_token(token)?;
    let socket = socket_path(&runtime_dir()?, token);
    let mut stream = UnixStream::connect(&socket).with_context(|| {
        format!(
            "no transfer waits at {} (it ended, or was never started)",
            socket.display()
        )
    })?;
    io::copy(&mut io::stdin().lock(), &mut stream).context("passing the stream on")?;
    stream.shutdown(std::net::Shutdown::Write)?;
    // The receiver closes its end once it has read the whole stream.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_ed25519_key_for_this_token_is_accepted() {
        let token = "0123456789abcdef0123456789abcdef";
        let good = format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB+x/y= {KEY_COMMENT}{token}");
        assert!(checked_public_key(&good, token).is_ok());
        for bad in [
            format!("ssh-rsa AAAA {KEY_COMMENT}{token}"),
            format!("ssh-ed25519 AAAA {KEY_COMMENT}ffffffffffffffffffffffffffffffff"),
            format!("ssh-ed25519 AAAA {KEY_COMMENT}{token}\nssh-ed25519 BBBB x"),
            format!("command=\"sh\" ssh-ed25519 AAAA {KEY_COMMENT}{token}"),
            format!("ssh-ed25519 AA\"AA {KEY_COMMENT}{token}"),
            format!("ssh-ed25519  {KEY_COMMENT}{token}"),
        ] {
            assert!(checked_public_key(&bad, token).is_err(), "{bad}");
        }
    }

    #[test]
    fn sshds_authorized_keys_files_are_expanded_as_sshd_does() {
        let home = Path::new("/home/ann");
        let uid = nix::unistd::geteuid().to_string();
        let config = "port 22\nauthorizedkeysfile .ssh/authorized_keys %h/.ssh/authorized_keys2 /etc/ssh/keys/%u.%U 100%%\nx y\n";
        assert_eq!(
            key_files(config, "ann", home).unwrap(),
            [
                PathBuf::from("/home/ann/.ssh/authorized_keys"),
                PathBuf::from("/home/ann/.ssh/authorized_keys2"),
                PathBuf::from(format!("/etc/ssh/keys/ann.{uid}")),
                PathBuf::from("/home/ann/100%"),
            ]
        );
        assert_eq!(
            key_files("authorizedkeysfile none\n", "ann", home),
            Some(vec![])
        );
        assert_eq!(key_files("port 22\n", "ann", home), None);
    }

    #[test]
    fn the_serving_end_of_ssh_connection_is_the_third_and_fourth_field() {
        assert_eq!(
            serving_end("10.0.0.9 51234 127.0.0.1 43489"),
            Some(("127.0.0.1".parse().unwrap(), 43489))
        );
        assert_eq!(
            serving_end("2001:db8::9 51234 2001:db8::1 22"),
            Some(("2001:db8::1".parse().unwrap(), 22))
        );
        assert_eq!(serving_end("10.0.0.9 51234 127.0.0.1"), None);
        assert_eq!(serving_end("10.0.0.9 51234 not-an-address 22"), None);
    }

    #[test]
    fn tokens_are_32_hex_digits() {
        assert!(check_token(&new_token().unwrap()).is_ok());
        for bad in [
            "",
            "../x",
            "0123456789ABCDEF0123456789abcdef",
            "0123456789abcdef0123456789abcde",
        ] {
            assert!(check_token(bad).is_err(), "{bad}");
        }
    }

    /// A key line added and removed leaves the file byte for byte as it was: with and
    /// without a final newline, empty, missing (and its directory missing), and with a line
    /// added by someone else meanwhile.
    #[test]
    fn a_key_line_leaves_the_file_as_it_was() {
        let home = tempfile::tempdir().unwrap();
        let file = home.path().join(".ssh/authorized_keys");
        for before in [
            None,
            Some(&b""[..]),
            Some(b"ssh-ed25519 A x\n"),
            Some(b"ssh-ed25519 A x"),
        ] {
            if let Some(b) = before {
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, b).unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
            }
            let line =
                KeyLine::add(&file, "restrict ssh-ed25519 B relaymove-direct-t".into()).unwrap();
            let during = std::fs::read(&file).unwrap();
            assert!(during.ends_with(b"restrict ssh-ed25519 B relaymove-direct-t\n"));
            assert!(during.starts_with(before.unwrap_or(b"")));
            line.remove().unwrap();
            match before {
                None => assert!(!file.parent().unwrap().exists(), "the .ssh it made stays"),
                Some(b) => {
                    assert_eq!(std::fs::read(&file).unwrap(), b);
                    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
                    assert_eq!(mode & 0o777, 0o640);
                    std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
                }
            }
        }
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"a\n").unwrap();
        let line = KeyLine::add(&file, "ours".into()).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .unwrap();
        f.write_all(b"theirs\n").unwrap();
        line.remove().unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"a\ntheirs\n");
    }
}
