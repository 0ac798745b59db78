//! DNS for the cutover: what every authoritative server serves (`status`), the atomic
//! address swap and TTL staging (`change`, built on `update`), and the mail-auth checks.
//! `update` builds messages without I/O; `server` is the only place that talks to the net.

pub mod change;
pub mod checks;
pub mod server;
pub mod status;
pub mod update;
