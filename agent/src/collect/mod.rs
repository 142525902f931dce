//! Collection: host metrics from procfs/sysfs, per-target state from systemd,
//! the container runtime and the process table, and HTTP/TCP health probes.
//!
//! Every collector writes numeric signals into a [`Sample`] under stable,
//! dotted names (`host.cpu.busy_pct`, `target.web.probe.latency_ms`); the
//! feature windows downstream are computed from those names alone.

pub mod container;
pub mod host;
pub mod probe;
pub mod process;
pub mod sampler;
pub mod systemd;

use std::sync::Arc;

/// A signal name. Collectors keep their names and hand out cheap clones so
/// the 1 Hz sampler does not allocate a string per value.
pub type SignalName = Arc<str>;

/// One reading of every signal, taken at `ts_ms` (Unix epoch milliseconds).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub ts_ms: i64,
    /// Numeric signals. Names are unique within a sample.
    pub values: Vec<(SignalName, f64)>,
    /// The latest human-readable state of every configured target.
    pub targets: Vec<TargetStatus>,
}

impl Sample {
    pub fn new(ts_ms: i64) -> Self {
        Sample {
            ts_ms,
            values: Vec::with_capacity(128),
            targets: Vec::new(),
        }
    }

    pub fn push(&mut self, name: &SignalName, value: f64) {
        if value.is_finite() {
            self.values.push((name.clone(), value));
        }
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.values
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| *v)
    }
}

/// What one target looks like right now, for `outpost status` and the store.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TargetStatus {
    pub name: String,
    /// `host`, `systemd`, `container` or `process`.
    pub kind: String,
    /// A short state: `active/running`, `running (healthy)`, `3 processes`,
    /// `not found`, `not available`.
    pub state: String,
    /// Whether the target looks up (active, running, found) and, when it has
    /// a probe, the probe passes.
    pub up: bool,
    /// The last probe result, when the target has a probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeStatus>,
    /// Extra detail: why a source is not available, the last probe error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeStatus {
    pub ok: bool,
    pub latency_ms: f64,
    pub ts_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Makes a signal name for a target: `target.{name}.{suffix}`.
pub fn target_signal(target: &str, suffix: &str) -> SignalName {
    Arc::from(format!("target.{target}.{suffix}"))
}

/// Turns an arbitrary label (a mount point, an interface, a device) into a
/// name segment made of `[a-z0-9_]`: `/var/lib` becomes `var_lib`, `/` becomes
/// `root`.
pub fn sanitize_segment(label: &str) -> String {
    let trimmed = label.trim_matches('/');
    if trimmed.is_empty() {
        return "root".to_string();
    }
    let mut out = String::with_capacity(trimmed.len());
    for c in trimmed.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    if out.is_empty() {
        "x".to_string()
    } else {
        out
    }
}

/// Logs that a source is not available once, and that it came back once, so
/// a missing systemd or container runtime never floods the log.
#[derive(Debug, Default)]
pub struct Availability {
    down: bool,
}

impl Availability {
    /// Records a failure; returns true the first time (the caller logs then).
    pub fn fail(&mut self) -> bool {
        let first = !self.down;
        self.down = true;
        first
    }

    /// Records a success; returns true when the source was down before.
    pub fn ok(&mut self) -> bool {
        let was_down = self.down;
        self.down = false;
        was_down
    }

    pub fn is_down(&self) -> bool {
        self.down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize() {
        assert_eq!(sanitize_segment("/"), "root");
        assert_eq!(sanitize_segment("/var/lib"), "var_lib");
        assert_eq!(sanitize_segment("eth0"), "eth0");
        assert_eq!(sanitize_segment("br-1a2B.3"), "br_1a2b_3");
        assert_eq!(sanitize_segment("///"), "root");
    }

    #[test]
    fn availability_logs_once() {
        let mut a = Availability::default();
        assert!(a.fail());
        assert!(!a.fail());
        assert!(a.ok());
        assert!(!a.ok());
    }
}
