//! Command-line interface: one clap struct per subcommand, defined next to its command.
//! Parsing only validates; it never opens a connection.

use clap::{Parser, Subcommand};

/// `relaymove --version`: which build runs on a host matters when agents and controllers meet.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RELAYMOVE_COMMIT"),
    ")"
);

/// Move a self-hosted mail server from one Debian host to another, verified.
#[derive(Parser, Debug)]
#[command(
    name = "relaymove",
    version = VERSION,
    about,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    Init(crate::commands::init::InitCmd),
    Plan(crate::commands::migrate::PlanCmd),
    Migrate(crate::commands::migrate::MigrateCmd),
    Status(crate::commands::migrate::StatusCmd),
    Rollback(crate::commands::migrate::RollbackCmd),
    Sync(crate::commands::sync::SyncCmd),
    Dns(crate::commands::dns::DnsCmd),
    Cleanup(crate::commands::cleanup::CleanupCmd),
    #[command(hide = true)]
    Agent(crate::commands::agent::AgentCmd),
    #[command(hide = true)]
    Generate(crate::commands::generate::GenerateCmd),
}
