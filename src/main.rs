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
    // glibc raises its mmap threshold to the size of any large block freed (up to 32 MiB):
    // after the 16 MB agent upload, later big allocations (manifests, plans) came from the
    // heap, which keeps what is freed (measured: a 56k-file first copy's controller peaked at
    // 56 MB instead of 46). A fixed threshold keeps blocks of 1 MiB and up in mappings of
    // their own, returned when freed; it also took 1-2 MB off each process's peak.
    // SAFETY: before any other thread exists; it only sets an allocator parameter.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
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
