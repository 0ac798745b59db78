//! Reaching the hosts: where an endpoint is, SSH sessions, how the agent gets there and is
//! started, the small protocol the controller and agents speak, a mirror driven through two
//! agents, and the agent's own request loop (`serve`), which hands file system work to
//! `sync/`.

pub mod agent;
pub mod cleanup;
pub mod endpoint;
pub mod mirror;
pub mod platform;
pub mod protocol;
pub mod serve;
pub mod ssh;
