//! relaymove: move a self-hosted mail server between Debian hosts.
//!
//! `main` only parses, dispatches and maps the result to an exit code:
//! 0 success, 1 failure, 2 usage error (clap uses 2 for its own errors too); `sync` adds 3
//! (finished, files left behind).

mod cli;
mod commands;
mod config;
mod dns;
mod init;
mod migrate;
mod remote;
mod report;
mod sync;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    let code = match commands::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("relaymove: {err:#}");
            1
        }
    };
    std::process::exit(code);
}
