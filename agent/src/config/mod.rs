//! Configuration: the TOML an operator writes, parsed with
//! `deny_unknown_fields`, then validated into the checked [`Config`] the rest
//! of outpost uses. Every error names the file, line, column and key.

mod locate;
pub mod mqtt;
mod raw;

pub use mqtt::{FleetConfig, MqttConfig};
pub use raw::RawConfig;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use locate::Locator;

pub use crate::decide::{CommandSpec, GuardConfig, Rule};
pub use crate::detect::engine::DetectConfig;

/// Defaults, named so the documented example and the code agree.
pub const DEFAULT_SAMPLE_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_FEATURE_WINDOW: Duration = Duration::from_secs(60);
pub const DEFAULT_FEATURE_STEP: Duration = Duration::from_secs(10);
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);
pub const DEFAULT_MAX_DB_MB: u64 = 256;
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(600);
pub const DEFAULT_PROBE_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_PROBE_TIMEOUT_MS: u64 = 500;
pub const DEFAULT_PROC_ROOT: &str = "/proc";
pub const DEFAULT_SYS_ROOT: &str = "/sys";
pub const MIN_SAMPLE_INTERVAL_MS: u64 = 50;
pub const MAX_TARGETS: usize = 256;

/// The checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this came from; `None` for the built-in default.
    pub source: Option<PathBuf>,
    pub agent: AgentConfig,
    pub store: StoreConfig,
    pub features: FeaturesConfig,
    /// `[detect]`.
    pub detect: DetectConfig,
    pub collect: CollectConfig,
    pub targets: Vec<Target>,
    /// `[[rule]]`, in file order.
    pub rules: Vec<Rule>,
    /// `[guard]`.
    pub guard: GuardConfig,
    /// `[[command]]`: the only commands `exec:NAME` may run.
    pub commands: Vec<CommandSpec>,
    /// `[mqtt]`: the uplink; `None` (no section): MQTT off.
    pub mqtt: Option<MqttConfig>,
    /// `[fleet]`: this node's group and who may sign commands.
    pub fleet: FleetConfig,
    /// Accepted but worth telling the operator: a rule on a protected unit,
    /// a built-in protection removed. `check-config` prints them and the
    /// daemon logs them at load; their line and column are filled in like
    /// errors'.
    pub warnings: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub node_id: String,
    pub state_dir: PathBuf,
    pub sample_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// Feature vectors older than this are deleted.
    pub retention: Duration,
    /// The database is kept under this many bytes (oldest features go first).
    pub max_db_bytes: u64,
    /// How often buffered feature vectors are committed. Longer means fewer
    /// disk writes; shutdown always flushes.
    pub flush_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FeaturesConfig {
    pub window: Duration,
    pub step: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CollectConfig {
    /// Where procfs is mounted (fixture trees in tests).
    pub proc_root: PathBuf,
    /// Where sysfs is mounted.
    pub sys_root: PathBuf,
    /// The Docker Engine API socket (docker's or podman's). `None`: look in
    /// the usual places.
    pub container_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub name: String,
    pub kind: TargetKind,
    pub probe: Option<Probe>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TargetKind {
    Host,
    Systemd {
        unit: String,
    },
    Container {
        container: String,
    },
    /// Matches processes whose command name (`comm`) or executable basename
    /// equals `process`.
    Process {
        process: String,
    },
}

impl TargetKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            TargetKind::Host => "host",
            TargetKind::Systemd { .. } => "systemd",
            TargetKind::Container { .. } => "container",
            TargetKind::Process { .. } => "process",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub check: ProbeCheck,
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProbeCheck {
    /// A GET that must answer 2xx or 3xx within the timeout.
    Http {
        url: String,
        host: String,
        port: u16,
        /// Path and query, starting with `/`.
        path: String,
    },
    /// A TCP connect that must succeed within the timeout.
    Tcp { addr: String },
}

/// A string that never prints: passwords and keys in config.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub col: usize,
    /// Dotted key path, e.g. `target[1].probe.interval_ms`.
    pub key: String,
    pub message: String,
}

/// Why a config was refused. Displays as one `FILE:LINE:COL: key: message`
/// line per problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render(file, problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

fn render(file: &str, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{file}:{}:{}: {}: {}", p.line, p.col, p.key, p.message))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

/// Where the environment says state lives when the config does not:
/// `$STATE_DIRECTORY` (systemd), else `$XDG_STATE_HOME/outpost`, else
/// `./outpost-state`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STATE_DIRECTORY").filter(|v| !v.is_empty()) {
        // systemd may pass several, colon-separated; the first is ours.
        let s = dir.to_string_lossy();
        let first = s.split(':').next().unwrap_or_default();
        return PathBuf::from(first);
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("outpost");
    }
    PathBuf::from("outpost-state")
}

/// The node id when the config names none: `/etc/machine-id`, else the
/// hostname.
pub fn default_node_id() -> String {
    if let Ok(id) = std::fs::read_to_string("/etc/machine-id") {
        let id = id.trim();
        if !id.is_empty() {
            return id.to_string();
        }
    }
    hostname().unwrap_or_else(|| "outpost-node".to_string())
}

fn hostname() -> Option<String> {
    let s = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

impl Config {
    /// The built-in default: watch the host, nothing else.
    pub fn builtin() -> Config {
        // The empty document always validates; `validate` is the one place
        // defaults are applied, so the built-in goes through it too.
        match parse_str("", "<built-in>") {
            Ok(c) => c,
            Err(e) => unreachable_default(e),
        }
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let mut cfg = parse_str(&text, &file)?;
        cfg.source = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// The path of the SQLite store.
    pub fn db_path(&self) -> PathBuf {
        self.agent.state_dir.join("outpost.db")
    }

    /// The path of the local control socket (live status).
    pub fn socket_path(&self) -> PathBuf {
        self.agent.state_dir.join("outpost.sock")
    }
}

#[allow(clippy::panic)]
fn unreachable_default(e: ConfigError) -> Config {
    // A failing built-in default is a programming error caught by the tests.
    panic!("built-in default config is invalid: {e}")
}

/// Parses and validates config text; `file` is only used in messages.
pub fn parse_str(text: &str, file: &str) -> Result<Config, ConfigError> {
    let locator = Locator::new(text);
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let (line, col, key) = locator.at_span(e.span());
            return Err(ConfigError::Invalid {
                file: file.to_string(),
                problems: vec![Problem {
                    line,
                    col,
                    key,
                    message: e.message().trim().to_string(),
                }],
            });
        }
    };
    let locate = |list: raw::Errors| -> Vec<Problem> {
        list.into_iter()
            .map(|(key, message)| {
                let (line, col) = locator.at_key(&key);
                Problem {
                    line,
                    col,
                    key,
                    message,
                }
            })
            .collect()
    };
    match raw.validate() {
        Ok((mut cfg, warnings)) => {
            cfg.warnings = locate(warnings);
            Ok(cfg)
        }
        Err(errs) => Err(ConfigError::Invalid {
            file: file.to_string(),
            problems: locate(errs),
        }),
    }
}

impl Config {
    /// The warnings as `FILE:LINE:COL: warning: key: message` lines.
    pub fn render_warnings(&self, file: &str) -> Vec<String> {
        self.warnings
            .iter()
            .map(|p| {
                format!(
                    "{file}:{}:{}: warning: {}: {}",
                    p.line, p.col, p.key, p.message
                )
            })
            .collect()
    }
}

/// Parses a duration such as `"30s"`, `"5m"`, `"14d"`, `"1h 30m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("expected a duration such as \"30s\", \"5m\" or \"14d\" ({e})"))
}

#[cfg(test)]
mod tests;
