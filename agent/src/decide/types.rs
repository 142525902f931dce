//! The vocabulary shared by config, decide, act and the audit trail.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a rule does when it fires.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "command")]
pub enum ActionKind {
    Restart,
    Stop,
    Start,
    Reload,
    /// An operator-defined command from `[[command]]`, by name.
    Exec(String),
    /// Raise it; change nothing on the host.
    Notify,
}

impl ActionKind {
    /// `restart`, `exec:NAME`, …: the form used in config and the audit.
    pub fn label(&self) -> String {
        match self {
            ActionKind::Restart => "restart".into(),
            ActionKind::Stop => "stop".into(),
            ActionKind::Start => "start".into(),
            ActionKind::Reload => "reload".into(),
            ActionKind::Exec(name) => format!("exec:{name}"),
            ActionKind::Notify => "notify".into(),
        }
    }

    /// Whether the action changes anything on the host.
    pub fn touches_host(&self) -> bool {
        !matches!(self, ActionKind::Notify)
    }
}

/// How a rule acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Act at once (within the guards).
    Auto,
    /// Wait for `outpost approve ID` (or a fleet approval); expire after the
    /// guard's approval timeout.
    Approve,
    /// Record what would be done; never act.
    Suggest,
}

/// The target an action applies to, as the actuators need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ActionTarget {
    Systemd {
        unit: String,
    },
    Container {
        container: String,
    },
    /// Host and process targets take only exec and notify.
    Host,
    Process {
        process: String,
    },
}

/// An operator-defined command: argv without a shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandSpec {
    pub name: String,
    pub argv: Vec<String>,
    pub timeout: Duration,
}
