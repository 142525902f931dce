//! outpost: a small daemon that watches an edge host and the services on it,
//! detects what goes wrong, fixes what it may, and tells the fleet.

pub mod collect;
pub mod config;
pub mod detect;
pub mod store;
