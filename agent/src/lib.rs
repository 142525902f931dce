//! outpost: a small daemon that watches an edge host and the services on it,
//! detects what goes wrong, fixes what it may, and tells the fleet.
//!
//! `main` is thin: it parses the command line ([`cli`]) and calls [`run`],
//! which tests call in-process too.

pub mod act;
pub mod cli;
pub mod collect;
pub mod config;
pub mod control;
pub mod decide;
#[cfg(feature = "demo")]
pub mod demo;
pub mod detect;
pub mod fleet;
pub mod logging;
pub mod memtrim;
pub mod model_cli;
pub mod notify;
pub mod pipeline;
pub mod polkit;
pub mod remediate;
pub mod store;
pub mod sync;

pub use pipeline::run;
