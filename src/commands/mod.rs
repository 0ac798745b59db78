//! Subcommands: thin layers that read options, call the engine and pick the output format.

pub mod agent;
pub mod cleanup;
pub mod dns;
pub mod generate;
pub mod init;
pub mod migrate;
pub mod sync;

use crate::cli::{Cli, Command};

/// Runs the chosen subcommand and returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Plan(cmd) => migrate::plan(cmd),
        Command::Migrate(cmd) => migrate::migrate(cmd),
        Command::Status(cmd) => migrate::status(cmd),
        Command::Rollback(cmd) => migrate::rollback(cmd),
        Command::Sync(cmd) => sync::run(cmd),
        Command::Dns(cmd) => dns::run(cmd),
        Command::Init(cmd) => init::run(cmd),
        Command::Cleanup(cmd) => cleanup::run(cmd),
        Command::Agent(cmd) => agent::run(cmd),
        Command::Generate(cmd) => generate::run(cmd),
    }
}
