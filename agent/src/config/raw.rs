//! The config as written: serde types with `deny_unknown_fields`, and the
//! validation that turns them into the checked [`Config`](super::Config).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::*;

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
    #[serde(default, rename = "target")]
    pub targets: Vec<RawTarget>,
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
    pub(super) fn validate(self) -> Result<Config, Errors> {
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

        if errs.is_empty() {
            Ok(Config {
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
                collect,
                targets,
            })
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
