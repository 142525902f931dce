//! Evaluating a rule's condition, and a verification check, against one
//! sample. Three-valued: a missing signal or a target whose state cannot be
//! read is [`Truth::Unknown`], and outpost never acts on unknown.

use crate::collect::{Sample, TargetStatus};

use super::policy::{Condition, VerifyCheck};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    True,
    False,
    /// The data needed is missing. Never a reason to act, and never a
    /// reason to think a problem has cleared.
    Unknown,
}

impl Truth {
    fn from_bool(b: bool) -> Truth {
        if b {
            Truth::True
        } else {
            Truth::False
        }
    }
}

/// What a condition reads besides the rule: the sample (signals and target
/// states) and the detectors' anomaly scores.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub sample: &'a Sample,
    /// Latest anomaly score per target name; a target without one is unknown.
    pub anomaly: &'a [(String, f32)],
}

impl Observation<'_> {
    fn signal(&self, name: &str) -> Option<f64> {
        self.sample.get(name)
    }

    fn target_signal(&self, target: &str, suffix: &str) -> Option<f64> {
        self.signal(&format!("target.{target}.{suffix}"))
    }

    /// The target's status, if its state is known: `not available`, `error`
    /// and `unknown` mean the collector could not tell.
    fn status(&self, target: &str) -> Option<&TargetStatus> {
        self.sample
            .targets
            .iter()
            .find(|t| t.name == target)
            .filter(|t| !matches!(t.state.as_str(), "not available" | "error" | "unknown" | ""))
    }

    fn state_starts_with(&self, target: &str, prefix: &str) -> Truth {
        match self.status(target) {
            Some(s) => Truth::from_bool(s.state.starts_with(prefix)),
            None => Truth::Unknown,
        }
    }

    fn signal_is(&self, target: &str, suffix: &str, want: f64) -> Truth {
        match self.target_signal(target, suffix) {
            Some(v) => Truth::from_bool(v == want),
            None => Truth::Unknown,
        }
    }

    pub fn anomaly_score(&self, target: &str) -> Option<f32> {
        self.anomaly
            .iter()
            .find(|(t, _)| t == target)
            .map(|(_, s)| *s)
            .filter(|s| s.is_finite())
    }
}

/// Whether `cond` holds for `target` in this observation.
pub fn evaluate(cond: &Condition, target: &str, obs: &Observation<'_>) -> Truth {
    match cond {
        Condition::ProbeFailed => obs.signal_is(target, "probe.ok", 0.0),
        Condition::UnitFailed => obs.state_starts_with(target, "failed"),
        Condition::UnitInactive => obs.signal_is(target, "up", 0.0),
        Condition::ContainerExited => obs.state_starts_with(target, "exited"),
        Condition::ContainerUnhealthy => obs.signal_is(target, "healthy", 0.0),
        Condition::Anomaly { op, score } => match obs.anomaly_score(target) {
            Some(s) => Truth::from_bool(op.holds(f64::from(s), *score)),
            None => Truth::Unknown,
        },
        Condition::Threshold { signal, op, value } => match obs.signal(signal) {
            Some(v) => Truth::from_bool(op.holds(v, *value)),
            None => Truth::Unknown,
        },
    }
}

/// Whether a verification check passes; `cond` is the rule's condition, for
/// `condition_clear`.
pub fn check(check: VerifyCheck, cond: &Condition, target: &str, obs: &Observation<'_>) -> Truth {
    match check {
        VerifyCheck::ProbeOk => obs.signal_is(target, "probe.ok", 1.0),
        VerifyCheck::UnitActive => obs.signal_is(target, "up", 1.0),
        VerifyCheck::ContainerRunning => obs.state_starts_with(target, "running"),
        VerifyCheck::ConditionClear => match evaluate(cond, target, obs) {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            Truth::Unknown => Truth::Unknown,
        },
    }
}
