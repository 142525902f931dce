//! Harness helpers for the whole-system tests in `tests/tests/`: each starts
//! the real servers it needs and tears them down, and fails loudly when it
//! cannot.

pub mod agent;
pub mod apt;
pub mod fleet;
pub mod mosquitto;
pub mod nspawn;
pub mod podman;
pub mod remediation;
pub mod systemd;
