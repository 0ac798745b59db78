//! `relaymove init`: write a commented relaymove.toml, filled from the hosts when they are
//! given. The text is `init::render`'s; this file asks the hosts and writes the file: never
//! over an existing one without --force, mode 0600 from its creation (it may name TSIG key
//! files), and only once the text parses as a config.

use crate::config::Config;
use crate::init::{self, Learned};
use crate::remote::agent::SshOptions;
use crate::remote::endpoint::parse_ssh_target;
use anyhow::{anyhow, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write a commented relaymove.toml for moving the mail server from OLD to NEW.
///
/// With --old and --new, both are asked over SSH (read-only) for their addresses, and old
/// for the profile it runs (chatmail or classic), its mail domain (Postfix's myhostname) and,
/// through its resolver (dig or host), the zone, its primary and nameservers. Each learned
/// value says where it came from; what could not be learned keeps the example value, marked
/// CHANGE. Without them, the documented template.
#[derive(Args, Debug)]
pub struct InitCmd {
    /// Where to write the config.
    #[arg(
        short = 'o',
        long,
        value_name = "FILE",
        default_value = "relaymove.toml"
    )]
    pub output: PathBuf,
    /// The host that serves mail now: [user@]host[:port].
    #[arg(long, value_name = "TARGET", requires = "new", value_parser = ssh_target)]
    pub old: Option<String>,
    /// The host that takes over: [user@]host[:port].
    #[arg(long, value_name = "TARGET", requires = "old", value_parser = ssh_target)]
    pub new: Option<String>,
    /// Replace FILE if it exists.
    #[arg(long)]
    pub force: bool,
    /// ssh_config file to use instead of ~/.ssh/config (written into the config too).
    #[arg(long, env = "RELAYMOVE_SSH_CONFIG", value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
}

fn ssh_target(s: &str) -> Result<String, String> {
    parse_ssh_target(s).map(|_| s.to_string())
}

pub fn run(cmd: InitCmd) -> Result<i32> {
    let out = &cmd.output;
    if !cmd.force && out.symlink_metadata().is_ok() {
        return Err(exists(out));
    }
    let ssh_config = cmd
        .ssh_config
        .as_ref()
        .map(|p| {
            std::fs::canonicalize(p).with_context(|| format!("reading ssh config {}", p.display()))
        })
        .transpose()?;
    let learned = match (&cmd.old, &cmd.new) {
        (Some(old), Some(new)) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let ssh = SshOptions {
                config: ssh_config.clone(),
            };
            let mut learned = runtime.block_on(init::probe::learn(old, new, &ssh));
            learned.ssh_config = ssh_config;
            learned
        }
        _ => Learned::default(),
    };
    let text = init::render(&learned)?;
    Config::parse(&text).context("bug: the config relaymove init wrote does not parse")?;
    write_new(out, text.as_bytes(), cmd.force)?;
    eprintln!("relaymove: wrote {} (mode 600)", out.display());
    for m in &learned.missing {
        eprintln!("relaymove: not learned: {m}");
    }
    eprintln!(
        "hint: {}then run `relaymove plan -c {}`",
        if learned.old.is_some() {
            "check each value (the ones marked CHANGE are examples), "
        } else {
            "replace the example names and addresses with yours, "
        },
        out.display()
    );
    Ok(0)
}

fn exists(path: &Path) -> anyhow::Error {
    anyhow!(
        "{} exists; nothing was written\nhint: pass --force to replace it, or -o FILE to write another",
        path.display()
    )
}

/// Writes `bytes` to `path` through a temporary file in the same directory (mode 0600 from
/// its creation), renamed into place: without `replace`, only if `path` still does not exist.
fn write_new(path: &Path, bytes: &[u8], replace: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".relaymove-init")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    let placed = if replace {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    match placed {
        Ok(_) => Ok(()),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Err(exists(path)),
        Err(e) => Err(e.error).with_context(|| format!("writing {}", path.display())),
    }
}
