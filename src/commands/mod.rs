//! Subcommands: thin layers that read options, call the engine and pick the output format.

pub mod agent;
pub mod dns;
pub mod sync;

use crate::cli::{Cli, Command};

/// Runs the chosen subcommand and returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Sync(cmd) => sync::run(cmd),
        Command::Dns(cmd) => dns::run(cmd),
        Command::Agent(cmd) => agent::run(cmd),
    }
}
