//! The checked policy `decide` works from: rules, the guard and the
//! operator's commands, plus the grammar of the strings an operator writes in
//! `[[rule]]` (`when`, `for`, `do`, `verify`). Config validation calls the
//! parsers here and attaches the dotted key to whatever they refuse.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::types::{ActionKind, ActionTarget, Mode};

/// Defaults, named so the documented example and the code agree.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_PER_HOUR: u32 = 3;
pub const DEFAULT_VERIFY_WITHIN: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_ACTIONS_PER_HOUR: u32 = 10;
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a `[[command]]` may run. The engine gives up waiting for an
/// actuator result after [`ACTUATOR_RESULT_TIMEOUT`], which is longer.
pub const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long the engine waits for the actuator to report on an action before
/// it counts the action as failed.
pub const ACTUATOR_RESULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Per-rule budgets above this are refused: they are no budget at all.
pub const MAX_PER_HOUR_LIMIT: u32 = 3600;
pub const MAX_RULES: usize = 256;
pub const MAX_COMMANDS: usize = 256;
/// The most samples a `for = "N samples"` may ask for.
pub const MAX_FOR_SAMPLES: u32 = 100_000;

/// The agent's own unit. It is always protected: it cannot be unprotected.
pub const OWN_UNIT: &str = "outpost.service";

/// Units outpost never touches unless `guard.unprotect` names them. Entries
/// may end in `*` (a glob). `guard.protected_units` adds to this list; it
/// never replaces it.
pub const BUILTIN_PROTECTED_UNITS: &[&str] = &[
    OWN_UNIT,
    "ssh.service",
    "sshd.service",
    "dbus.service",
    "dbus-broker.service",
    "systemd-*",
    "networking.service",
    "NetworkManager.service",
    "systemd-networkd.service",
];

/// One checked `[[rule]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    /// The `[[target]]` name the rule watches.
    pub target: String,
    /// What the actuator acts on (resolved from the target).
    pub action_target: ActionTarget,
    pub when: Condition,
    /// `for`: how long the condition must hold before the rule fires.
    pub persist: Persist,
    /// `do`.
    pub action: ActionKind,
    pub mode: Mode,
    /// Minimum time between two of this rule's actions.
    pub cooldown: Duration,
    /// Most actions of this rule in any sliding hour.
    pub max_per_hour: u32,
    /// How to tell the action worked. Not used for `notify`.
    pub verify: Verify,
    /// What to do when the action did not work and outpost will not try
    /// again: `notify`, or an action.
    pub escalate: ActionKind,
}

/// A comparison in a `when` or an anomaly threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Gt,
    Ge,
    Lt,
    Le,
    Eq,
    Ne,
}

impl CmpOp {
    pub fn holds(self, left: f64, right: f64) -> bool {
        match self {
            CmpOp::Gt => left > right,
            CmpOp::Ge => left >= right,
            CmpOp::Lt => left < right,
            CmpOp::Le => left <= right,
            CmpOp::Eq => left == right,
            CmpOp::Ne => left != right,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }

    fn parse(s: &str) -> Option<CmpOp> {
        Some(match s {
            ">" => CmpOp::Gt,
            ">=" => CmpOp::Ge,
            "<" => CmpOp::Lt,
            "<=" => CmpOp::Le,
            "==" => CmpOp::Eq,
            "!=" => CmpOp::Ne,
            _ => return None,
        })
    }
}

/// `when`: what makes a rule's condition true. Every condition reads the
/// current sample only; a signal or state that is missing makes it unknown,
/// and outpost never acts on unknown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Condition {
    /// `target.{t}.probe.ok == 0`.
    ProbeFailed,
    /// The unit's state starts with `failed`.
    UnitFailed,
    /// `target.{t}.up == 0` for a systemd target.
    UnitInactive,
    /// The container's state starts with `exited`.
    ContainerExited,
    /// `target.{t}.healthy == 0`.
    ContainerUnhealthy,
    /// The target's anomaly score (fed by the detectors) compared with a
    /// threshold: `anomaly >= 0.8`.
    Anomaly { op: CmpOp, score: f64 },
    /// A full signal name compared with a value:
    /// `target.web.rss_mb > 500`, `host.mem.used_pct > 90`.
    Threshold {
        signal: String,
        op: CmpOp,
        value: f64,
    },
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::ProbeFailed => f.write_str("probe_failed"),
            Condition::UnitFailed => f.write_str("unit_failed"),
            Condition::UnitInactive => f.write_str("unit_inactive"),
            Condition::ContainerExited => f.write_str("container_exited"),
            Condition::ContainerUnhealthy => f.write_str("container_unhealthy"),
            Condition::Anomaly { op, score } => write!(f, "anomaly {} {score}", op.symbol()),
            Condition::Threshold { signal, op, value } => {
                write!(f, "{signal} {} {value}", op.symbol())
            }
        }
    }
}

const CONDITION_HELP: &str =
    "expected probe_failed, unit_failed, unit_inactive, container_exited, \
     container_unhealthy, \"anomaly >= SCORE\" or \"SIGNAL OP VALUE\" such as \
     \"process.rss_mb > 500\" or \"host.mem.used_pct > 90\" (OP is one of > >= < <= == !=)";

impl Condition {
    /// Parses `when` for a rule on target `target` of kind `kind` (`host`,
    /// `systemd`, `container`, `process`). A signal name that does not start
    /// with `host.` or `target.` is the target's own: `rss_mb` and
    /// `process.rss_mb` (for a process target) both mean
    /// `target.{target}.rss_mb`. Whether the condition fits the target's
    /// kind is checked by the caller.
    pub fn parse(text: &str, target: &str, kind: &str) -> Result<Condition, String> {
        let s = text.trim();
        match s {
            "probe_failed" => return Ok(Condition::ProbeFailed),
            "unit_failed" => return Ok(Condition::UnitFailed),
            "unit_inactive" => return Ok(Condition::UnitInactive),
            "container_exited" => return Ok(Condition::ContainerExited),
            "container_unhealthy" => return Ok(Condition::ContainerUnhealthy),
            _ => {}
        }
        let Some(at) = s.find(['<', '>', '=', '!']) else {
            return Err(format!("{s:?} is not a condition: {CONDITION_HELP}"));
        };
        let name = s[..at].trim();
        let rest = &s[at..];
        let op_len = rest
            .find(|c: char| !matches!(c, '<' | '>' | '=' | '!'))
            .unwrap_or(rest.len());
        let Some(op) = CmpOp::parse(&rest[..op_len]) else {
            return Err(format!(
                "{:?} is not a comparison: use one of > >= < <= == !=",
                &rest[..op_len]
            ));
        };
        let number = rest[op_len..].trim();
        let value: f64 = match number.parse::<f64>() {
            Ok(v) if v.is_finite() => v,
            _ => {
                return Err(format!(
                    "{number:?} is not a number: write a condition as \"SIGNAL {} VALUE\"",
                    op.symbol()
                ))
            }
        };
        if name.is_empty() {
            return Err(format!(
                "no signal before {:?}: {CONDITION_HELP}",
                op.symbol()
            ));
        }
        if name == "anomaly" {
            if !matches!(op, CmpOp::Ge | CmpOp::Gt) {
                return Err("an anomaly condition is a minimum score: \"anomaly >= 0.8\"".into());
            }
            if value < 0.0 {
                return Err(format!("an anomaly score is never negative, got {value}"));
            }
            return Ok(Condition::Anomaly { op, score: value });
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            || name.starts_with('.')
            || name.ends_with('.')
            || name.contains("..")
        {
            return Err(format!(
                "{name:?} is not a signal name: use dotted names such as host.mem.used_pct or rss_mb"
            ));
        }
        let signal = if name.starts_with("host.") {
            name.to_string()
        } else if let Some(rest) = name.strip_prefix("target.") {
            let owner = rest.split('.').next().unwrap_or_default();
            if owner != target || !rest.contains('.') {
                return Err(format!(
                    "{name:?} is not a signal of target {target:?}: a rule reads its own target's \
                     signals (target.{target}.…) or the host's (host.…)"
                ));
            }
            name.to_string()
        } else {
            let own = name
                .strip_prefix(kind)
                .and_then(|r| r.strip_prefix('.'))
                .or_else(|| {
                    (kind == "systemd")
                        .then(|| name.strip_prefix("unit."))
                        .flatten()
                })
                .unwrap_or(name);
            format!("target.{target}.{own}")
        };
        Ok(Condition::Threshold { signal, op, value })
    }
}

/// `for`: how long a condition must hold before the rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Persist {
    /// True in this many consecutive samples.
    Samples(u32),
    /// Continuously true for this long.
    Duration(Duration),
}

impl Default for Persist {
    fn default() -> Self {
        Persist::Samples(1)
    }
}

impl fmt::Display for Persist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Persist::Samples(1) => f.write_str("1 sample"),
            Persist::Samples(n) => write!(f, "{n} samples"),
            Persist::Duration(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

impl Persist {
    /// `"3 samples"`, `"1 sample"` or a duration such as `"30s"`.
    pub fn parse(text: &str) -> Result<Persist, String> {
        let s = text.trim();
        let count = s
            .strip_suffix("samples")
            .or_else(|| s.strip_suffix("sample"));
        if let Some(n) = count {
            return match n.trim().parse::<u32>() {
                Ok(n) if (1..=MAX_FOR_SAMPLES).contains(&n) => Ok(Persist::Samples(n)),
                _ => Err(format!(
                    "expected a count of samples from 1 to {MAX_FOR_SAMPLES}, such as \"3 samples\", got {s:?}"
                )),
            };
        }
        match humantime::parse_duration(s) {
            Ok(d) if !d.is_zero() => Ok(Persist::Duration(d)),
            Ok(_) => Err("must be longer than zero".into()),
            Err(_) => Err(format!(
                "expected a count of samples such as \"3 samples\" or a duration such as \"30s\", got {s:?}"
            )),
        }
    }
}

/// `verify`: what must become true after an action, and by when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verify {
    pub check: VerifyCheck,
    pub within: Duration,
}

impl Default for Verify {
    fn default() -> Self {
        Verify {
            check: VerifyCheck::ConditionClear,
            within: DEFAULT_VERIFY_WITHIN,
        }
    }
}

impl fmt::Display for Verify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} within {}",
            self.check.label(),
            humantime::format_duration(self.within)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyCheck {
    /// `target.{t}.probe.ok == 1`.
    ProbeOk,
    /// `target.{t}.up == 1` for a systemd target.
    UnitActive,
    /// The container's state starts with `running`.
    ContainerRunning,
    /// The rule's own condition is false (known, not missing).
    ConditionClear,
}

impl VerifyCheck {
    pub fn label(self) -> &'static str {
        match self {
            VerifyCheck::ProbeOk => "probe_ok",
            VerifyCheck::UnitActive => "unit_active",
            VerifyCheck::ContainerRunning => "container_running",
            VerifyCheck::ConditionClear => "condition_clear",
        }
    }
}

impl Verify {
    /// `"probe_ok within 20s"`; `within` defaults to 30 s.
    pub fn parse(text: &str) -> Result<Verify, String> {
        let s = text.trim();
        let (check, within) = match s.split_once(" within ") {
            Some((c, w)) => (c.trim(), Some(w.trim())),
            None => (s, None),
        };
        let check = match check {
            "probe_ok" => VerifyCheck::ProbeOk,
            "unit_active" => VerifyCheck::UnitActive,
            "container_running" => VerifyCheck::ContainerRunning,
            "condition_clear" => VerifyCheck::ConditionClear,
            other => {
                return Err(format!(
                    "{other:?} is not a check: expected probe_ok, unit_active, container_running \
                     or condition_clear, optionally followed by \"within DURATION\""
                ))
            }
        };
        let within = match within {
            None => DEFAULT_VERIFY_WITHIN,
            Some(w) => match humantime::parse_duration(w) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    return Err(format!(
                        "expected \"{} within DURATION\" such as \"{} within 20s\", got {s:?}",
                        check.label(),
                        check.label()
                    ))
                }
            },
        };
        Ok(Verify { check, within })
    }
}

impl ActionKind {
    /// `restart`, `stop`, `start`, `reload`, `exec:NAME` or `notify`.
    /// Whether the action fits the target, and whether `NAME` is a
    /// `[[command]]`, is checked by the caller.
    pub fn parse(text: &str) -> Result<ActionKind, String> {
        let s = text.trim();
        Ok(match s {
            "restart" => ActionKind::Restart,
            "stop" => ActionKind::Stop,
            "start" => ActionKind::Start,
            "reload" => ActionKind::Reload,
            "notify" => ActionKind::Notify,
            _ => match s.strip_prefix("exec:") {
                Some(name) if !name.trim().is_empty() => ActionKind::Exec(name.trim().to_string()),
                _ => {
                    return Err(format!(
                        "{s:?} is not an action: expected restart, stop, start, reload, \
                         exec:NAME (a [[command]]) or notify"
                    ))
                }
            },
        })
    }

    /// Whether the action works on a unit or container itself (and so needs
    /// a systemd or container target).
    pub fn is_lifecycle(&self) -> bool {
        matches!(
            self,
            ActionKind::Restart | ActionKind::Stop | ActionKind::Start | ActionKind::Reload
        )
    }
}

/// Units outpost must not touch: the built-in list (minus what
/// `guard.unprotect` explicitly removes) plus `guard.protected_units`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedUnits {
    /// Built-in entries still in force.
    builtin: Vec<String>,
    /// The operator's additions.
    extra: Vec<String>,
    /// Unit names carved out of a built-in glob (`systemd-resolved.service`
    /// out of `systemd-*`).
    exceptions: Vec<String>,
    /// What `guard.unprotect` removed, as written: kept so it stays visible.
    unprotected: Vec<String>,
}

impl Default for ProtectedUnits {
    fn default() -> Self {
        ProtectedUnits {
            builtin: BUILTIN_PROTECTED_UNITS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            extra: Vec::new(),
            exceptions: Vec::new(),
            unprotected: Vec::new(),
        }
    }
}

impl ProtectedUnits {
    /// The built-in list plus `extra`, minus `unprotect`. Each `unprotect`
    /// entry is either a built-in entry (removed) or a unit a built-in glob
    /// matches (carved out). Returns the problem with the first entry that is
    /// neither, or that tries to unprotect outpost's own unit, as (index,
    /// message).
    pub fn new(extra: Vec<String>, unprotect: Vec<String>) -> Result<Self, (usize, String)> {
        let mut p = ProtectedUnits {
            extra,
            ..ProtectedUnits::default()
        };
        for (i, u) in unprotect.iter().enumerate() {
            if u == OWN_UNIT {
                return Err((
                    i,
                    format!("{OWN_UNIT} is outpost itself; it is always protected"),
                ));
            }
            if let Some(at) = p.builtin.iter().position(|b| b == u) {
                p.builtin.remove(at);
            } else if BUILTIN_PROTECTED_UNITS.iter().any(|b| glob_match(b, u)) {
                p.exceptions.push(u.clone());
            } else {
                return Err((
                    i,
                    format!(
                        "{u:?} is not on the built-in protected list ({}); only built-in \
                         entries can be unprotected",
                        BUILTIN_PROTECTED_UNITS.join(", ")
                    ),
                ));
            }
        }
        p.unprotected = unprotect;
        Ok(p)
    }

    pub fn is_protected(&self, unit: &str) -> bool {
        self.extra.iter().any(|p| glob_match(p, unit))
            || (self.builtin.iter().any(|p| glob_match(p, unit))
                && !self.exceptions.iter().any(|e| e == unit))
    }

    /// Every pattern in force: built-in first, then the operator's.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.builtin
            .iter()
            .chain(self.extra.iter())
            .map(String::as_str)
    }

    /// What `guard.unprotect` removed.
    pub fn unprotected(&self) -> &[String] {
        &self.unprotected
    }
}

/// `*` matches any run of characters, `?` any one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The checked `[guard]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardConfig {
    /// Most host-changing actions (all rules, escalations included) in any
    /// sliding hour.
    pub max_actions_per_hour: u32,
    pub protected: ProtectedUnits,
    /// While this file exists nothing acts (checked by the pipeline, passed
    /// to `decide` as `Input::paused`).
    pub pause_file: PathBuf,
    /// Decide as usual but never act: every action is recorded as
    /// suppressed (dry run).
    pub dry_run: bool,
    /// How long an approval request stays open.
    pub approval_timeout: Duration,
}

impl GuardConfig {
    /// The defaults, with the pause file under `state_dir`.
    pub fn with_state_dir(state_dir: &std::path::Path) -> GuardConfig {
        GuardConfig {
            max_actions_per_hour: DEFAULT_MAX_ACTIONS_PER_HOUR,
            protected: ProtectedUnits::default(),
            pause_file: state_dir.join("pause"),
            dry_run: false,
            approval_timeout: DEFAULT_APPROVAL_TIMEOUT,
        }
    }
}

/// How a target is named in reasons: the unit, the container, …
pub fn describe_target(t: &ActionTarget) -> String {
    match t {
        ActionTarget::Systemd { unit } => unit.clone(),
        ActionTarget::Container { container } => format!("container {container}"),
        ActionTarget::Host => "the host".into(),
        ActionTarget::Process { process } => format!("process {process}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("systemd-*", "systemd-journald.service"));
        assert!(glob_match("systemd-*", "systemd-"));
        assert!(!glob_match("systemd-*", "xsystemd-a"));
        assert!(glob_match("*.service", "a.service"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("sshd.service", "sshd.service"));
        assert!(!glob_match("sshd.service", "sshd.socket"));
    }

    #[test]
    fn protected_list_adds_and_carves() {
        let p = ProtectedUnits::default();
        for u in [
            "outpost.service",
            "sshd.service",
            "systemd-journald.service",
            "NetworkManager.service",
        ] {
            assert!(p.is_protected(u), "{u}");
        }
        assert!(!p.is_protected("nginx.service"));

        let p = ProtectedUnits::new(
            vec!["postgres*.service".into()],
            vec!["systemd-resolved.service".into(), "ssh.service".into()],
        )
        .expect("valid");
        assert!(p.is_protected("postgresql.service"));
        assert!(!p.is_protected("systemd-resolved.service"));
        assert!(p.is_protected("systemd-journald.service"));
        assert!(!p.is_protected("ssh.service"));
        assert!(p.is_protected("sshd.service"));
        assert_eq!(p.unprotected().len(), 2);

        assert_eq!(
            ProtectedUnits::new(vec![], vec!["outpost.service".into()])
                .expect_err("own unit")
                .0,
            0
        );
        assert!(
            ProtectedUnits::new(vec![], vec!["ok.service".into(), "nginx.service".into()])
                .expect_err("not built-in")
                .1
                .contains("not on the built-in")
        );
    }

    #[test]
    fn conditions_parse() {
        let ok = |s: &str, kind: &str| Condition::parse(s, "web", kind).expect(s);
        assert_eq!(ok("probe_failed", "systemd"), Condition::ProbeFailed);
        assert_eq!(
            ok("anomaly >= 0.8", "systemd"),
            Condition::Anomaly {
                op: CmpOp::Ge,
                score: 0.8
            }
        );
        assert_eq!(
            ok("process.rss_mb > 500", "process"),
            Condition::Threshold {
                signal: "target.web.rss_mb".into(),
                op: CmpOp::Gt,
                value: 500.0
            }
        );
        assert_eq!(
            ok("rss_mb>500", "process"),
            ok("process.rss_mb > 500", "process")
        );
        assert_eq!(
            ok("host.mem.used_pct > 90", "host"),
            Condition::Threshold {
                signal: "host.mem.used_pct".into(),
                op: CmpOp::Gt,
                value: 90.0
            }
        );
        assert_eq!(
            ok("probe.latency_ms >= 250", "systemd"),
            Condition::Threshold {
                signal: "target.web.probe.latency_ms".into(),
                op: CmpOp::Ge,
                value: 250.0
            }
        );
        assert_eq!(
            ok("unit.mem_mb != 0", "systemd"),
            ok("target.web.mem_mb != 0", "systemd")
        );
        for op in ["<", "<=", "==", "!="] {
            assert!(Condition::parse(&format!("up {op} 1"), "web", "systemd").is_ok());
        }
        for bad in [
            "probe_fails",
            "rss_mb => 5",
            "rss_mb > lots",
            "> 5",
            "anomaly < 0.5",
            "anomaly >= -1",
            "target.db.up == 0",
            "target.web == 0",
            "rss mb > 5",
            "rss_mb > inf",
        ] {
            assert!(Condition::parse(bad, "web", "systemd").is_err(), "{bad}");
        }
    }

    #[test]
    fn persist_verify_action_parse() {
        assert_eq!(Persist::parse("3 samples"), Ok(Persist::Samples(3)));
        assert_eq!(Persist::parse("1 sample"), Ok(Persist::Samples(1)));
        assert_eq!(
            Persist::parse("30s"),
            Ok(Persist::Duration(Duration::from_secs(30)))
        );
        for bad in ["0 samples", "three samples", "0s", "soon", "-1 samples"] {
            assert!(Persist::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Verify::parse("probe_ok within 20s"),
            Ok(Verify {
                check: VerifyCheck::ProbeOk,
                within: Duration::from_secs(20)
            })
        );
        assert_eq!(
            Verify::parse("unit_active"),
            Ok(Verify {
                check: VerifyCheck::UnitActive,
                within: DEFAULT_VERIFY_WITHIN
            })
        );
        for bad in [
            "probe_ok within",
            "probe_ok within 0s",
            "works",
            "probe_ok in 5s",
        ] {
            assert!(Verify::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(ActionKind::parse("restart"), Ok(ActionKind::Restart));
        assert_eq!(
            ActionKind::parse("exec:flush-cache"),
            Ok(ActionKind::Exec("flush-cache".into()))
        );
        for bad in ["exec:", "reboot", "Restart"] {
            assert!(ActionKind::parse(bad).is_err(), "{bad}");
        }
    }
}
