//! The config as written: serde types with `deny_unknown_fields`, and the
//! validation that turns them into the checked [`Config`](super::Config).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::*;
use crate::decide::{
    policy, ActionKind, ActionTarget, Condition, Mode, Persist, ProtectedUnits, Verify, VerifyCheck,
};

/// (dotted key, what is wrong)
pub(super) type Errors = Vec<(String, String)>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub features: RawFeatures,
    #[serde(default)]
    pub collect: RawCollect,
    #[serde(default)]
    pub detect: RawDetect,
    #[serde(default, rename = "target")]
    pub targets: Vec<RawTarget>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub guard: RawGuard,
    #[serde(default, rename = "command")]
    pub commands: Vec<RawCommand>,
    /// Absent: MQTT off.
    pub mqtt: Option<super::mqtt::RawMqtt>,
    #[serde(default)]
    pub fleet: super::mqtt::RawFleet,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    pub target: String,
    pub when: String,
    #[serde(rename = "for")]
    pub persist: Option<String>,
    #[serde(rename = "do")]
    pub action: String,
    pub mode: Option<Mode>,
    pub cooldown: Option<String>,
    pub max_per_hour: Option<u32>,
    pub verify: Option<String>,
    pub escalate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuard {
    pub max_actions_per_hour: Option<u32>,
    pub protected_units: Option<Vec<String>>,
    pub unprotect: Option<Vec<String>>,
    pub pause_file: Option<PathBuf>,
    pub dry_run: Option<bool>,
    pub approval_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCommand {
    pub name: String,
    pub argv: Vec<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    pub node_id: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub sample_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub retention: Option<String>,
    pub max_db_mb: Option<u64>,
    pub flush_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeatures {
    pub window: Option<String>,
    pub step: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDetect {
    pub threshold: Option<f32>,
    pub open: Option<String>,
    pub model_open: Option<String>,
    pub close_after: Option<u32>,
    pub promote_after: Option<String>,
    pub shadow_max_alert_rate: Option<f64>,
    pub trial: Option<String>,
    pub rollback_alert_ratio: Option<f64>,
    pub rollback_min_alerts: Option<u64>,
    pub baseline: Option<crate::detect::baseline::BaselineConfig>,
}

impl RawDetect {
    fn validate(self, step: Duration, errs: &mut Errors) -> DetectConfig {
        use crate::detect::engine as e;
        let d = DetectConfig::default();
        let threshold = self.threshold.unwrap_or(e::DEFAULT_THRESHOLD);
        if !(threshold > 0.0 && threshold <= 1.0) {
            errs.push((
                "detect.threshold".into(),
                format!("must be in (0, 1], got {threshold}"),
            ));
        }
        let k_of_n = |errs: &mut Errors, key: &str, v: Option<String>, default| match v {
            None => default,
            Some(s) => s.parse().unwrap_or_else(|what: String| {
                errs.push((format!("detect.{key}"), what));
                default
            }),
        };
        let open = k_of_n(errs, "open", self.open, d.open);
        let model_open = k_of_n(errs, "model_open", self.model_open, d.model_open);
        let close_after = self.close_after.unwrap_or(e::DEFAULT_CLOSE_AFTER);
        if close_after == 0 {
            errs.push((
                "detect.close_after".into(),
                "must be at least 1 step".into(),
            ));
        }
        let step_ms = step.as_millis().max(1) as u64;
        let steps = |errs: &mut Errors, key: &str, v: &Option<String>| -> Option<u64> {
            let v = v.as_ref()?;
            match humantime::parse_duration(v) {
                Ok(dur) => Some((dur.as_millis() as u64).div_ceil(step_ms)),
                Err(err) => {
                    errs.push((
                        format!("detect.{key}"),
                        format!("expected a duration such as \"24h\": {err}"),
                    ));
                    None
                }
            }
        };
        let promote_after_steps =
            steps(errs, "promote_after", &self.promote_after).filter(|&s| s > 0);
        let trial_steps = steps(errs, "trial", &self.trial).unwrap_or(e::DEFAULT_TRIAL_STEPS);
        let rate = self
            .shadow_max_alert_rate
            .unwrap_or(e::DEFAULT_SHADOW_MAX_ALERT_RATE);
        if !(0.0..=1.0).contains(&rate) {
            errs.push((
                "detect.shadow_max_alert_rate".into(),
                format!("must be in [0, 1], got {rate}"),
            ));
        }
        let ratio = self
            .rollback_alert_ratio
            .unwrap_or(e::DEFAULT_ROLLBACK_ALERT_RATIO);
        if !(ratio.is_finite() && ratio >= 1.0) {
            errs.push((
                "detect.rollback_alert_ratio".into(),
                format!("must be a number >= 1, got {ratio}"),
            ));
        }
        let baseline = self.baseline.unwrap_or_default();
        if let Err(e) = baseline.validate() {
            errs.push((format!("detect.baseline.{}", e.key), e.what.to_string()));
        }
        DetectConfig {
            threshold,
            open,
            model_open,
            close_after,
            baseline,
            lifecycle: crate::detect::engine::LifecycleConfig {
                promote_after_steps,
                shadow_max_alert_rate: rate,
                trial_steps,
                rollback_alert_ratio: ratio,
                rollback_min_alerts: self
                    .rollback_min_alerts
                    .unwrap_or(e::DEFAULT_ROLLBACK_MIN_ALERTS),
            },
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCollect {
    pub proc_root: Option<PathBuf>,
    pub sys_root: Option<PathBuf>,
    pub container_socket: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub name: String,
    pub kind: RawKind,
    pub unit: Option<String>,
    pub container: Option<String>,
    pub process: Option<String>,
    pub probe: Option<RawProbe>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RawKind {
    Host,
    Systemd,
    Container,
    Process,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
}

fn duration(errs: &mut Errors, key: &str, v: &Option<String>, default: Duration) -> Duration {
    match v {
        None => default,
        Some(s) => match parse_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                errs.push((key.to_string(), "must be longer than zero".to_string()));
                default
            }
            Err(e) => {
                errs.push((key.to_string(), e));
                default
            }
        },
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl RawConfig {
    /// The checked config and its warnings, or every problem found.
    pub(super) fn validate(self) -> Result<(Config, Errors), Errors> {
        let mut errs = Errors::new();

        let node_id = match self.agent.node_id {
            Some(id) if id.trim().is_empty() => {
                errs.push(("agent.node_id".into(), "must not be empty".into()));
                String::new()
            }
            Some(id) if id.contains(['/', '+', '#']) || id.chars().any(char::is_control) => {
                errs.push((
                    "agent.node_id".into(),
                    "must not contain '/', '+', '#' or control characters (it is an MQTT topic level)"
                        .into(),
                ));
                id
            }
            Some(id) => id,
            None => default_node_id(),
        };
        let state_dir = self.agent.state_dir.unwrap_or_else(default_state_dir);
        let interval_ms = self
            .agent
            .sample_interval_ms
            .unwrap_or(DEFAULT_SAMPLE_INTERVAL_MS);
        if interval_ms < MIN_SAMPLE_INTERVAL_MS {
            errs.push((
                "agent.sample_interval_ms".into(),
                format!("must be at least {MIN_SAMPLE_INTERVAL_MS}, got {interval_ms}"),
            ));
        }
        let sample_interval = Duration::from_millis(interval_ms.max(MIN_SAMPLE_INTERVAL_MS));

        let retention = duration(
            &mut errs,
            "store.retention",
            &self.store.retention,
            DEFAULT_RETENTION,
        );
        let flush_interval = duration(
            &mut errs,
            "store.flush_interval",
            &self.store.flush_interval,
            DEFAULT_FLUSH_INTERVAL,
        );
        let max_db_mb = self.store.max_db_mb.unwrap_or(DEFAULT_MAX_DB_MB);
        if max_db_mb < 4 {
            errs.push((
                "store.max_db_mb".into(),
                format!("must be at least 4, got {max_db_mb}"),
            ));
        }

        let window = duration(
            &mut errs,
            "features.window",
            &self.features.window,
            DEFAULT_FEATURE_WINDOW,
        );
        let step = duration(
            &mut errs,
            "features.step",
            &self.features.step,
            DEFAULT_FEATURE_STEP,
        );
        if step > window {
            errs.push((
                "features.step".into(),
                format!(
                    "must not be longer than features.window ({})",
                    humantime::format_duration(window)
                ),
            ));
        }
        if window < sample_interval * 2 {
            errs.push((
                "features.window".into(),
                "must hold at least two samples (window >= 2 x agent.sample_interval_ms)".into(),
            ));
        }
        if !window.as_millis().is_multiple_of(1000) {
            errs.push((
                "features.window".into(),
                "must be a whole number of seconds (it is part of every feature name)".into(),
            ));
        }

        let detect = self.detect.validate(step, &mut errs);

        let collect = CollectConfig {
            proc_root: self
                .collect
                .proc_root
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PROC_ROOT)),
            sys_root: self
                .collect
                .sys_root
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SYS_ROOT)),
            container_socket: self.collect.container_socket,
        };

        if self.targets.len() > MAX_TARGETS {
            errs.push((
                "target".into(),
                format!("at most {MAX_TARGETS} targets, got {}", self.targets.len()),
            ));
        }
        let mut names = HashSet::new();
        let mut targets = Vec::with_capacity(self.targets.len());
        for (i, t) in self.targets.into_iter().enumerate() {
            let at = format!("target[{i}]");
            if !valid_name(&t.name) {
                errs.push((
                    format!("{at}.name"),
                    format!(
                        "{:?} is not a valid name: use 1 to 64 of a-z, A-Z, 0-9, '_' and '-'",
                        t.name
                    ),
                ));
            } else if !names.insert(t.name.clone()) {
                errs.push((
                    format!("{at}.name"),
                    format!("{:?} is used by another target", t.name),
                ));
            }
            if let Some(target) = t.validate(&at, &mut errs) {
                targets.push(target);
            }
        }

        let mqtt = self.mqtt.and_then(|m| m.validate(&node_id, &mut errs));
        let fleet = self.fleet.validate(&mut errs);

        let mut warnings = Errors::new();
        let commands = validate_commands(self.commands, &mut errs);
        let guard = self.guard.validate(&state_dir, &mut errs, &mut warnings);
        let rules = validate_rules(
            self.rules,
            &RuleContext {
                targets: &targets,
                target_names: &names,
                commands: &commands,
                guard: &guard,
            },
            &mut errs,
            &mut warnings,
        );

        if errs.is_empty() {
            Ok((
                Config {
                    source: None,
                    agent: AgentConfig {
                        node_id,
                        state_dir,
                        sample_interval,
                    },
                    store: StoreConfig {
                        retention,
                        max_db_bytes: max_db_mb.saturating_mul(1024 * 1024),
                        flush_interval,
                    },
                    features: FeaturesConfig { window, step },
                    detect,
                    collect,
                    targets,
                    rules,
                    guard,
                    commands,
                    mqtt,
                    fleet,
                    warnings: Vec::new(),
                },
                warnings,
            ))
        } else {
            Err(errs)
        }
    }
}

impl RawTarget {
    fn validate(self, at: &str, errs: &mut Errors) -> Option<Target> {
        let fields = [
            ("unit", self.unit.is_some(), RawKind::Systemd),
            ("container", self.container.is_some(), RawKind::Container),
            ("process", self.process.is_some(), RawKind::Process),
        ];
        for (field, present, kind) in fields {
            if present && kind != self.kind {
                errs.push((
                    format!("{at}.{field}"),
                    format!(
                        "only a target of kind \"{}\" takes `{field}`",
                        format!("{kind:?}").to_lowercase()
                    ),
                ));
            }
        }
        let required = |field: &str, v: Option<String>, errs: &mut Errors| match v {
            Some(s) if !s.trim().is_empty() => Some(s),
            Some(_) => {
                errs.push((format!("{at}.{field}"), "must not be empty".into()));
                None
            }
            None => {
                errs.push((
                    format!("{at}.kind"),
                    format!("a target of this kind needs `{field}`"),
                ));
                None
            }
        };
        let kind = match self.kind {
            RawKind::Host => Some(TargetKind::Host),
            RawKind::Systemd => required("unit", self.unit, errs).map(|unit| {
                if !unit.contains('.') {
                    errs.push((
                        format!("{at}.unit"),
                        format!("{unit:?} needs its type suffix, e.g. \"{unit}.service\""),
                    ));
                }
                TargetKind::Systemd { unit }
            }),
            RawKind::Container => required("container", self.container, errs)
                .map(|container| TargetKind::Container { container }),
            RawKind::Process => required("process", self.process, errs)
                .map(|process| TargetKind::Process { process }),
        };
        let probe = self
            .probe
            .and_then(|p| p.validate(&format!("{at}.probe"), errs));
        Some(Target {
            name: self.name,
            kind: kind?,
            probe,
        })
    }
}

impl RawProbe {
    fn validate(self, at: &str, errs: &mut Errors) -> Option<Probe> {
        let interval_ms = self.interval_ms.unwrap_or(DEFAULT_PROBE_INTERVAL_MS);
        let timeout_ms = self
            .timeout_ms
            .unwrap_or(DEFAULT_PROBE_TIMEOUT_MS.min(interval_ms));
        if interval_ms < MIN_SAMPLE_INTERVAL_MS {
            errs.push((
                format!("{at}.interval_ms"),
                format!("must be at least {MIN_SAMPLE_INTERVAL_MS}, got {interval_ms}"),
            ));
        }
        if timeout_ms == 0 || timeout_ms > interval_ms {
            errs.push((
                format!("{at}.timeout_ms"),
                format!("must be between 1 and interval_ms ({interval_ms}), got {timeout_ms}"),
            ));
        }
        let check = match (self.http, self.tcp) {
            (Some(_), Some(_)) => {
                errs.push((
                    format!("{at}.tcp"),
                    "a probe is either `http` or `tcp`, not both".into(),
                ));
                return None;
            }
            (None, None) => {
                errs.push((
                    at.to_string(),
                    "needs `http = \"URL\"` or `tcp = \"HOST:PORT\"`".into(),
                ));
                return None;
            }
            (Some(url), None) => match parse_http_url(&url) {
                Ok((host, port, path)) => ProbeCheck::Http {
                    url,
                    host,
                    port,
                    path,
                },
                Err(e) => {
                    errs.push((format!("{at}.http"), e));
                    return None;
                }
            },
            (None, Some(addr)) => match split_host_port(&addr) {
                Some(_) => ProbeCheck::Tcp { addr },
                None => {
                    errs.push((
                        format!("{at}.tcp"),
                        format!("expected HOST:PORT, got {addr:?}"),
                    ));
                    return None;
                }
            },
        };
        Some(Probe {
            check,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}

/// Splits `host:port` (or `[v6]:port`); the port must be a number.
pub(crate) fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty() && port != 0).then(|| (host.to_string(), port))
}

/// Accepts `http://host[:port][/path]`. Health endpoints are local, so
/// plain HTTP is what probes speak.
fn parse_http_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = if let Some(rest) = url.strip_prefix("http://") {
        rest
    } else if url.starts_with("https://") {
        return Err("https probes are not supported; probe the service's local http port".into());
    } else {
        return Err(format!(
            "expected a URL such as \"http://127.0.0.1:8080/healthz\", got {url:?}"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?} has no usable host"));
    }
    let (host, port) = if authority.ends_with(']') || !authority.contains(':') {
        (
            authority
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            80,
        )
    } else {
        split_host_port(authority).ok_or_else(|| format!("{url:?} has a bad port"))?
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((host, port, path.to_string()))
}

fn validate_commands(raw: Vec<RawCommand>, errs: &mut Errors) -> Vec<CommandSpec> {
    if raw.len() > policy::MAX_COMMANDS {
        errs.push((
            "command".into(),
            format!(
                "at most {} commands, got {}",
                policy::MAX_COMMANDS,
                raw.len()
            ),
        ));
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let at = format!("command[{i}]");
        let mut ok = true;
        if !valid_name(&c.name) {
            errs.push((
                format!("{at}.name"),
                format!(
                    "{:?} is not a valid name: use 1 to 64 of a-z, A-Z, 0-9, '_' and '-'",
                    c.name
                ),
            ));
            ok = false;
        } else if !names.insert(c.name.clone()) {
            errs.push((
                format!("{at}.name"),
                format!("{:?} is used by another command", c.name),
            ));
            ok = false;
        }
        match c.argv.first() {
            None => {
                errs.push((
                    format!("{at}.argv"),
                    "needs at least the program: argv = [\"/usr/bin/program\", \"arg\", …]".into(),
                ));
                ok = false;
            }
            Some(prog) if !prog.starts_with('/') => {
                errs.push((
                    format!("{at}.argv[0]"),
                    format!(
                        "{prog:?} must be an absolute path (commands run without a shell or PATH)"
                    ),
                ));
                ok = false;
            }
            Some(_) => {}
        }
        for (j, arg) in c.argv.iter().enumerate() {
            if arg.contains('\0') {
                errs.push((
                    format!("{at}.argv[{j}]"),
                    "must not contain a NUL character".into(),
                ));
                ok = false;
            }
        }
        let timeout = duration(
            errs,
            &format!("{at}.timeout"),
            &c.timeout,
            policy::DEFAULT_COMMAND_TIMEOUT,
        );
        if timeout > policy::MAX_COMMAND_TIMEOUT {
            errs.push((
                format!("{at}.timeout"),
                format!(
                    "at most {}",
                    humantime::format_duration(policy::MAX_COMMAND_TIMEOUT)
                ),
            ));
        }
        if ok {
            out.push(CommandSpec {
                name: c.name,
                argv: c.argv,
                timeout,
            });
        }
    }
    out
}

impl RawGuard {
    fn validate(
        self,
        state_dir: &std::path::Path,
        errs: &mut Errors,
        warnings: &mut Errors,
    ) -> GuardConfig {
        let mut guard = GuardConfig::with_state_dir(state_dir);
        if let Some(n) = self.max_actions_per_hour {
            if n == 0 {
                errs.push((
                    "guard.max_actions_per_hour".into(),
                    "must be at least 1 (to never act, set dry_run = true or use mode = \"suggest\")"
                        .into(),
                ));
            } else {
                guard.max_actions_per_hour = n;
            }
        }
        let extra = self.protected_units.unwrap_or_default();
        for (i, u) in extra.iter().enumerate() {
            if let Err(e) = unit_pattern(u) {
                errs.push((format!("guard.protected_units[{i}]"), e));
            }
        }
        let unprotect = self.unprotect.unwrap_or_default();
        for (i, u) in unprotect.iter().enumerate() {
            if extra.contains(u) {
                errs.push((
                    format!("guard.unprotect[{i}]"),
                    format!("{u:?} is also in guard.protected_units; it cannot be both"),
                ));
            }
        }
        match ProtectedUnits::new(extra, unprotect.clone()) {
            Ok(p) => {
                for (i, u) in unprotect.iter().enumerate() {
                    warnings.push((
                        format!("guard.unprotect[{i}]"),
                        format!(
                            "{u} is removed from the built-in protected list: rules may act on it"
                        ),
                    ));
                }
                guard.protected = p;
            }
            Err((i, e)) => errs.push((format!("guard.unprotect[{i}]"), e)),
        }
        if let Some(p) = self.pause_file {
            if p.as_os_str().is_empty() {
                errs.push(("guard.pause_file".into(), "must not be empty".into()));
            } else {
                guard.pause_file = p;
            }
        }
        guard.dry_run = self.dry_run.unwrap_or(false);
        guard.approval_timeout = duration(
            errs,
            "guard.approval_timeout",
            &self.approval_timeout,
            policy::DEFAULT_APPROVAL_TIMEOUT,
        );
        guard
    }
}

/// A unit name with its type suffix, or a glob (`systemd-*`).
fn unit_pattern(u: &str) -> Result<(), String> {
    if u.is_empty()
        || u.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        Err(format!("{u:?} is not a unit name or pattern"))
    } else if !u.contains('.') && !u.ends_with('*') {
        Err(format!(
            "{u:?} needs its type suffix, e.g. \"{u}.service\" (or end it in * to match any)"
        ))
    } else {
        Ok(())
    }
}

struct RuleContext<'a> {
    targets: &'a [Target],
    /// Every target name written, valid or not.
    target_names: &'a HashSet<String>,
    commands: &'a [CommandSpec],
    guard: &'a GuardConfig,
}

fn validate_rules(
    raw: Vec<RawRule>,
    cx: &RuleContext<'_>,
    errs: &mut Errors,
    warnings: &mut Errors,
) -> Vec<Rule> {
    if raw.len() > policy::MAX_RULES {
        errs.push((
            "rule".into(),
            format!("at most {} rules, got {}", policy::MAX_RULES, raw.len()),
        ));
    }
    let mut names = HashSet::new();
    let mut out = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("rule[{i}]");
        if !valid_name(&r.name) {
            errs.push((
                format!("{at}.name"),
                format!(
                    "{:?} is not a valid name: use 1 to 64 of a-z, A-Z, 0-9, '_' and '-'",
                    r.name
                ),
            ));
        } else if !names.insert(r.name.clone()) {
            errs.push((
                format!("{at}.name"),
                format!("{:?} is used by another rule", r.name),
            ));
        }
        if let Some(rule) = r.validate(&at, cx, errs, warnings) {
            out.push(rule);
        }
    }
    out
}

impl RawRule {
    fn validate(
        self,
        at: &str,
        cx: &RuleContext<'_>,
        errs: &mut Errors,
        warnings: &mut Errors,
    ) -> Option<Rule> {
        let Some(target) = cx.targets.iter().find(|t| t.name == self.target) else {
            // A target that is written but invalid has its own errors.
            if !cx.target_names.contains(&self.target) {
                let known: Vec<&str> = cx.targets.iter().map(|t| t.name.as_str()).collect();
                errs.push((
                    format!("{at}.target"),
                    if known.is_empty() {
                        format!(
                            "no [[target]] named {:?} (there are no targets)",
                            self.target
                        )
                    } else {
                        format!(
                            "no [[target]] named {:?}; targets are: {}",
                            self.target,
                            known.join(", ")
                        )
                    },
                ));
            }
            return None;
        };
        let kind = target.kind.as_str();
        let action_target = match &target.kind {
            TargetKind::Host => ActionTarget::Host,
            TargetKind::Systemd { unit } => ActionTarget::Systemd { unit: unit.clone() },
            TargetKind::Container { container } => ActionTarget::Container {
                container: container.clone(),
            },
            TargetKind::Process { process } => ActionTarget::Process {
                process: process.clone(),
            },
        };
        let errors_before = errs.len();

        let when = match Condition::parse(&self.when, &target.name, kind) {
            Ok(c) => {
                let needs = match c {
                    Condition::ProbeFailed if target.probe.is_none() => {
                        Some("a target with a probe")
                    }
                    Condition::UnitFailed | Condition::UnitInactive if kind != "systemd" => {
                        Some("a systemd target")
                    }
                    Condition::ContainerExited | Condition::ContainerUnhealthy
                        if kind != "container" =>
                    {
                        Some("a container target")
                    }
                    _ => None,
                };
                if let Some(needs) = needs {
                    errs.push((
                        format!("{at}.when"),
                        format!(
                            "{c} needs {needs}; target {:?} is a {kind} target{}",
                            target.name,
                            if target.probe.is_none() {
                                " without a probe"
                            } else {
                                ""
                            }
                        ),
                    ));
                }
                Some(c)
            }
            Err(e) => {
                errs.push((format!("{at}.when"), e));
                None
            }
        };

        let persist = match self.persist.as_deref().map(Persist::parse) {
            None => Persist::default(),
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                errs.push((format!("{at}.for"), e));
                Persist::default()
            }
        };

        let action = self.check_action(&self.action, "do", at, target, cx, errs);
        let mode = self.mode.unwrap_or(Mode::Suggest);
        let cooldown = duration(
            errs,
            &format!("{at}.cooldown"),
            &self.cooldown,
            policy::DEFAULT_COOLDOWN,
        );
        let max_per_hour = self.max_per_hour.unwrap_or(policy::DEFAULT_MAX_PER_HOUR);
        if !(1..=policy::MAX_PER_HOUR_LIMIT).contains(&max_per_hour) {
            errs.push((
                format!("{at}.max_per_hour"),
                format!(
                    "must be between 1 and {} (to never act, use mode = \"suggest\"), got {max_per_hour}",
                    policy::MAX_PER_HOUR_LIMIT
                ),
            ));
        }

        let is_notify = action.as_ref() == Some(&ActionKind::Notify);
        let verify = match self.verify.as_deref() {
            None => Verify::default(),
            Some(_) if is_notify => {
                errs.push((
                    format!("{at}.verify"),
                    "a rule that does \"notify\" changes nothing, so there is nothing to verify"
                        .into(),
                ));
                Verify::default()
            }
            Some(text) => match Verify::parse(text) {
                Ok(v) => {
                    let needs = match v.check {
                        VerifyCheck::ProbeOk if target.probe.is_none() => {
                            Some("a target with a probe")
                        }
                        VerifyCheck::UnitActive if kind != "systemd" => Some("a systemd target"),
                        VerifyCheck::ContainerRunning if kind != "container" => {
                            Some("a container target")
                        }
                        _ => None,
                    };
                    if let Some(needs) = needs {
                        errs.push((
                            format!("{at}.verify"),
                            format!(
                                "{} needs {needs}; target {:?} is a {kind} target",
                                v.check.label(),
                                target.name
                            ),
                        ));
                    }
                    v
                }
                Err(e) => {
                    errs.push((format!("{at}.verify"), e));
                    Verify::default()
                }
            },
        };
        let escalate = match self.escalate.as_deref() {
            None => Some(ActionKind::Notify),
            Some(_) if is_notify => {
                errs.push((
                    format!("{at}.escalate"),
                    "a rule that does \"notify\" never escalates: nothing was tried".into(),
                ));
                None
            }
            Some(text) => self.check_action(text, "escalate", at, target, cx, errs),
        };

        if let (Some(action), TargetKind::Systemd { unit }) = (&action, &target.kind) {
            if cx.guard.protected.is_protected(unit) {
                let escalation = escalate.as_ref().filter(|e| e.touches_host());
                if action.touches_host() || escalation.is_some() {
                    warnings.push((
                        format!("{at}.target"),
                        format!(
                            "{unit} is a protected unit: outpost will never {} it; every match \
                             is recorded as suppressed (protected)",
                            if action.touches_host() {
                                action.label()
                            } else {
                                escalation.map(ActionKind::label).unwrap_or_default()
                            }
                        ),
                    ));
                }
            }
        }

        if errs.len() > errors_before {
            return None;
        }
        Some(Rule {
            name: self.name,
            target: target.name.clone(),
            action_target,
            when: when?,
            persist,
            action: action?,
            mode,
            cooldown,
            max_per_hour,
            verify,
            escalate: escalate?,
        })
    }

    /// Parses `do` or `escalate` and checks it fits the target and names a
    /// known command.
    fn check_action(
        &self,
        text: &str,
        field: &str,
        at: &str,
        target: &Target,
        cx: &RuleContext<'_>,
        errs: &mut Errors,
    ) -> Option<ActionKind> {
        let key = format!("{at}.{field}");
        let action = match ActionKind::parse(text) {
            Ok(a) => a,
            Err(e) => {
                errs.push((key, e));
                return None;
            }
        };
        let kind = target.kind.as_str();
        if action.is_lifecycle() && !matches!(kind, "systemd" | "container") {
            errs.push((
                key,
                format!(
                    "{} needs a systemd or container target; target {:?} is a {kind} target \
                     (use exec:NAME or notify)",
                    action.label(),
                    target.name
                ),
            ));
            return None;
        }
        if let ActionKind::Exec(name) = &action {
            if !cx.commands.iter().any(|c| &c.name == name) {
                let known: Vec<&str> = cx.commands.iter().map(|c| c.name.as_str()).collect();
                errs.push((
                    key,
                    if known.is_empty() {
                        format!("no [[command]] named {name:?} (there are no commands)")
                    } else {
                        format!(
                            "no [[command]] named {name:?}; commands are: {}",
                            known.join(", ")
                        )
                    },
                ));
                return None;
            }
        }
        Some(action)
    }
}
