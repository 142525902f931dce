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
use std::time::{Duration, Instant};

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

/// When to try a lost connection (the system bus, the container runtime)
/// again: at once when a connection that had lasted went away, then after
/// `first`, twice that, and so on up to `max`. A bus or runtime that
/// restarts is back within seconds; one that is gone for good costs one
/// attempt per `max`; one that accepts and then drops every connection
/// backs off the same way, so it cannot flood the log.
#[derive(Debug, Clone)]
pub struct Retry {
    first: Duration,
    max: Duration,
    /// How long after the last attempt the next one is due.
    delay: Duration,
    last_attempt: Option<Instant>,
    connected_at: Option<Instant>,
}

impl Retry {
    pub fn new(first: Duration, max: Duration) -> Self {
        Retry {
            first,
            max: max.max(first),
            delay: Duration::ZERO,
            last_attempt: None,
            connected_at: None,
        }
    }

    /// Whether an attempt is due at `now`; when it is, it counts as made.
    pub fn attempt(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last_attempt {
            if now.saturating_duration_since(last) < self.delay {
                return false;
            }
        }
        self.last_attempt = Some(now);
        true
    }

    /// The attempt failed: wait longer before the next.
    pub fn failed(&mut self) {
        self.delay = (self.delay * 2).clamp(self.first, self.max);
    }

    /// The attempt connected.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The connection went away: try again at once if it had lasted at
    /// least `max`, else keep backing off.
    pub fn lost(&mut self, now: Instant) {
        let lasted = self
            .connected_at
            .take()
            .is_some_and(|at| now.saturating_duration_since(at) >= self.max);
        if lasted {
            self.delay = Duration::ZERO;
        } else {
            self.failed();
        }
    }

    /// The last attempt, made or not.
    pub fn last_attempt(&self) -> Option<Instant> {
        self.last_attempt
    }

    /// How long after the last attempt the next is due.
    pub fn delay(&self) -> Duration {
        self.delay
    }
}

/// Runs `f` with every log event at DEBUG and above written to a string, one
/// line each (no timestamps, no colours), for tests that count log lines.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .without_time()
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, text)
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
    fn retry_backs_off_and_starts_over_after_a_lasting_connection() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        let mut r = Retry::new(s(1), s(30));
        assert!(r.attempt(t0), "the first attempt is due at once");
        r.failed();
        assert!(!r.attempt(t0 + Duration::from_millis(900)));
        assert!(r.attempt(t0 + s(1)));
        r.failed();
        assert_eq!(r.delay(), s(2));
        assert!(!r.attempt(t0 + s(2)));
        assert!(r.attempt(t0 + s(3)));
        for _ in 0..10 {
            r.failed();
        }
        assert_eq!(r.delay(), s(30), "capped");
        assert_eq!(r.last_attempt(), Some(t0 + s(3)));

        // Connected for a minute, then lost: at once, then from 1 s again.
        assert!(r.attempt(t0 + s(40)));
        r.connected(t0 + s(40));
        r.lost(t0 + s(100));
        assert!(r.attempt(t0 + s(100)));
        r.failed();
        assert_eq!(r.delay(), s(1));

        // A connection that drops at once keeps backing off.
        assert!(r.attempt(t0 + s(101)));
        r.connected(t0 + s(101));
        r.lost(t0 + s(101));
        assert_eq!(r.delay(), s(2));
        assert!(!r.attempt(t0 + s(102)));
        assert!(r.attempt(t0 + s(103)));
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
