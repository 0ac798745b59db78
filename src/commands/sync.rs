//! `relaymove sync SRC DEST`.

use clap::Args;

/// Make DEST an exact, verified mirror of SRC.
#[derive(Args, Debug)]
pub struct SyncCmd {
    /// Source: PATH or [user@]host[:port]:PATH
    pub src: String,
    /// Destination: PATH or [user@]host[:port]:PATH
    pub dest: String,
}

pub fn run(_cmd: SyncCmd) -> anyhow::Result<i32> {
    anyhow::bail!("not implemented yet")
}
