//! `relaymove generate man|completions DIR`: the hidden subcommand packaging runs to write man
//! pages and shell completions from the clap tree, so they never drift from the options.

use crate::cli::{Cli, VERSION};
use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Subcommand};
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// Internal: write man pages or shell completions (for packaging).
#[derive(Args, Debug)]
pub struct GenerateCmd {
    #[command(subcommand)]
    pub what: GenerateWhat,
}

#[derive(Subcommand, Debug)]
pub enum GenerateWhat {
    /// relaymove.1 and one relaymove-SUBCOMMAND.1 per subcommand, into DIR.
    Man { dir: PathBuf },
    /// relaymove.bash, _relaymove (zsh) and relaymove.fish, into DIR.
    Completions { dir: PathBuf },
}

pub fn run(cmd: GenerateCmd) -> Result<i32> {
    match cmd.what {
        GenerateWhat::Man { dir } => man(&dir)?,
        GenerateWhat::Completions { dir } => completions(&dir)?,
    }
    Ok(0)
}

fn create(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Hidden subcommands (agent, generate) get no page: people do not run them.
fn man(dir: &Path) -> Result<()> {
    create(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))
}

fn completions(dir: &Path) -> Result<()> {
    create(dir)?;
    let mut cli = visible_tree();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cli, "relaymove", dir)
            .with_context(|| format!("writing {shell} completions into {}", dir.display()))?;
    }
    Ok(())
}

/// The clap tree without its hidden subcommands, which the completion generators would offer
/// (people never run `agent` or `generate`). clap cannot remove a subcommand, so the root is
/// rebuilt around the visible ones; its own options are only --help and --version.
fn visible_tree() -> clap::Command {
    let full = Cli::command();
    clap::Command::new("relaymove")
        .version(VERSION)
        .propagate_version(true)
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}
