//! Reaching the hosts: where an endpoint is, how the agent gets there and is started, and
//! the small protocol the controller and agents speak. No file system work happens here.

pub mod agent;
pub mod endpoint;
pub mod mirror;
pub mod protocol;
pub mod ssh;
