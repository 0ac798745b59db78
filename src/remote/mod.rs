//! Reaching the hosts: where an endpoint is, SSH sessions, how the agent gets there and is
//! started, the small protocol the controller and agents speak, a mirror driven through two
//! agents, and the agent's own request loop (`serve`), which hands file system work to
//! `sync/`.

pub mod agent;
pub mod cleanup;
pub mod direct;
pub mod endpoint;
pub mod mirror;
pub mod platform;
pub mod protocol;
pub mod serve;
pub mod ssh;

/// `sh` for tests of the host scripts: as uid and gid 65534 (through `setpriv`) when
/// `as_nobody`, since the tests run as root and the scripts behave differently for root.
#[cfg(test)]
pub fn test_shell(as_nobody: bool) -> std::process::Command {
    if as_nobody {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
        ]);
        c
    } else {
        std::process::Command::new("sh")
    }
}
