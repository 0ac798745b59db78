//! `relaymove agent serve`: the hidden subcommand the controller starts on each host; the
//! request loop itself is `remote::serve`.

use anyhow::Result;
use clap::{Args, Subcommand};

/// Internal: the per-host half of a sync (started by the controller, not by people).
#[derive(Args, Debug)]
pub struct AgentCmd {
    #[command(subcommand)]
    pub action: AgentAction,
}

#[derive(Subcommand, Debug)]
pub enum AgentAction {
    /// Answer protocol requests on stdin until it closes.
    Serve,
    /// The forced command of a direct transfer's one-time key: hand stdin to the waiting
    /// receiver.
    Accept { token: String },
}

pub fn run(cmd: AgentCmd) -> Result<i32> {
    match cmd.action {
        AgentAction::Serve => crate::remote::serve::serve(),
        AgentAction::Accept { token } => crate::remote::direct::accept(&token),
    }
}
