//! The MQTT uplink: topics, messages, the outbox-driven publisher, and fleet
//! commands in (schemas/PROTOCOL.md).
//!
//! For a node without the daemon (the fleet simulator, tests): open a
//! [`Store`](crate::store::Store), build a [`NodeConfig`], then
//! `Uplink::new(node, store)?.run(view, handler, shutdown)`.

pub mod backoff;
pub mod command;
pub mod envelope;
pub mod fleet_config;
pub mod message;
pub mod tls;
pub mod uplink;
pub mod view;

pub use message::{Dropped, EventBody, Kind, Message, StateBody, SummaryBody, Topics};
pub use uplink::{CommandHandler, NodeConfig, NodeView, SyncError, Uplink};
pub use view::{DaemonView, Telemetry};

#[cfg(test)]
mod schema_tests;

#[cfg(test)]
mod uplink_tests;
