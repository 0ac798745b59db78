//! How results and progress reach people and scripts. Logic never prints; it hands data here.

pub mod events;
pub mod finding;
pub mod progress;
