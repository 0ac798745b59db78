//! The sync engine: scan both trees, plan the delta, stream what changed, apply it safely.
//! Nothing here knows about SSH or processes; `remote/` moves the bytes, `commands/sync.rs`
//! drives the phases.

pub mod beneath;
pub mod changes;
pub mod compress;
pub mod filter;
pub mod hash_cache;
pub mod lister;
pub mod manifest;
pub mod plan;
pub mod receive;
pub mod scan;
pub mod send;
pub mod settle;
pub mod stream;
pub mod verify;
