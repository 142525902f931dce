//! `[mqtt]` (the uplink) and `[fleet]` (who may command this node): raw
//! serde types and their validation into [`MqttConfig`] and [`FleetConfig`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::raw::Errors;
use super::{parse_duration, Secret};

pub const DEFAULT_TOPIC_PREFIX: &str = "outpost/v1";
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);
pub const DEFAULT_SUMMARY_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_OUTBOX_MAX_ROWS: u64 = 10_000;
/// Big enough for a model push of a full-size package: `model.install`
/// carries an 8 MiB tar base64'd twice (about 14.3 MiB), and the envelope a
/// node reads is at most 16 MiB (`MAX_ENVELOPE_BYTES`); 8 KiB more leaves
/// room for the topic and the MQTT header.
pub const DEFAULT_MAX_PACKET_KB: u64 = 16 * 1024 + 8;
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(60);
pub const MIN_KEEPALIVE: Duration = Duration::from_secs(5);
pub const MIN_SUMMARY_INTERVAL: Duration = Duration::from_secs(1);
pub const MIN_OUTBOX_MAX_ROWS: u64 = 16;
pub const MIN_MAX_PACKET_KB: u64 = 16;
/// rumqttc's (and MQTT's) limit is 256 MiB.
pub const MAX_MAX_PACKET_KB: u64 = 256 * 1024 - 1;
pub const DEFAULT_MQTT_PORT: u16 = 1883;
pub const DEFAULT_MQTTS_PORT: u16 = 8883;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub url: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub client_id: Option<String>,
    pub keepalive: Option<String>,
    pub topic_prefix: Option<String>,
    pub summary_interval: Option<String>,
    pub outbox_max_rows: Option<u64>,
    pub max_packet_kb: Option<u64>,
    pub reconnect_min: Option<String>,
    pub reconnect_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    pub group: Option<String>,
    pub trusted_keys: Option<Vec<String>>,
    pub allow_unsigned: Option<bool>,
}

/// The checked `[mqtt]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// CA bundle (PEM) the broker's certificate must chain to; `None`: the
    /// bundled web PKI roots are not shipped, so TLS needs a CA file.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mTLS, both or neither.
    pub client_auth: Option<(PathBuf, PathBuf)>,
    pub username: Option<String>,
    /// Read when the uplink starts ([`MqttConfig::password`]) and again
    /// before every reconnect, so a rotated password is used without a
    /// restart; while it cannot be read, the last password read is used.
    pub password_file: Option<PathBuf>,
    pub client_id: String,
    pub keepalive: Duration,
    /// Without a trailing `/`.
    pub topic_prefix: String,
    pub summary_interval: Duration,
    pub outbox_max_rows: u64,
    /// Incoming and outgoing MQTT packet limit, bytes.
    pub max_packet_bytes: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl MqttConfig {
    /// A plain-TCP config for a broker at `host:port` with every default,
    /// for tests and the fleet simulator.
    pub fn plain(host: &str, port: u16, client_id: &str) -> MqttConfig {
        MqttConfig {
            url: format!("mqtt://{host}:{port}"),
            tls: false,
            host: host.to_string(),
            port,
            ca_file: None,
            client_auth: None,
            username: None,
            password_file: None,
            client_id: client_id.to_string(),
            keepalive: DEFAULT_KEEPALIVE,
            topic_prefix: DEFAULT_TOPIC_PREFIX.to_string(),
            summary_interval: DEFAULT_SUMMARY_INTERVAL,
            outbox_max_rows: DEFAULT_OUTBOX_MAX_ROWS,
            max_packet_bytes: (DEFAULT_MAX_PACKET_KB * 1024) as usize,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
        }
    }

    /// Reads `password_file` (trailing newline removed); `None` without one.
    pub fn password(&self) -> std::io::Result<Option<Secret>> {
        match &self.password_file {
            None => Ok(None),
            Some(p) => {
                let s = std::fs::read_to_string(p)?;
                Ok(Some(Secret::new(s.trim_end_matches(['\n', '\r']))))
            }
        }
    }
}

/// The checked `[fleet]` section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FleetConfig {
    pub group: Option<String>,
    /// `ed25519:BASE64` as written; each decodes to 32 bytes.
    pub trusted_keys: Vec<String>,
    /// With no trusted keys: take unsigned commands (a lab network only).
    /// Ignored when keys are set. Default false: no keys, no commands.
    pub allow_unsigned: bool,
}

impl FleetConfig {
    /// The trusted keys' raw bytes (validated at load, so none is skipped).
    pub fn trusted_key_bytes(&self) -> Vec<[u8; 32]> {
        self.trusted_keys
            .iter()
            .filter_map(|k| decode_key(k).ok())
            .collect()
    }
}

/// Decodes `ed25519:BASE64` into the 32 key bytes.
pub fn decode_key(s: &str) -> Result<[u8; 32], String> {
    use base64::Engine;
    let Some(b64) = s.strip_prefix("ed25519:") else {
        return Err(format!("{s:?}: expected \"ed25519:BASE64\""));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("{s:?}: not base64 ({e})"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{s:?}: an ed25519 key is 32 bytes, got {}", bytes.len()))
}

/// A topic level: non-empty, no `/`, `+`, `#` or control characters.
fn topic_level_ok(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '+', '#']) && !s.chars().any(char::is_control)
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

fn path(errs: &mut Errors, key: &str, p: Option<PathBuf>) -> Option<PathBuf> {
    let p = p?;
    if p.as_os_str().is_empty() {
        errs.push((key.into(), "must not be empty".into()));
        return None;
    }
    Some(p)
}

/// Splits `mqtt://host:port` / `mqtts://host:port` into (tls, host, port).
fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(format!(
            "{url:?}: expected mqtt://HOST:PORT or mqtts://HOST:PORT"
        ));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "{url:?}: only a host and a port (no path, query or user info)"
        ));
    }
    let default_port = if tls {
        DEFAULT_MQTTS_PORT
    } else {
        DEFAULT_MQTT_PORT
    };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((h, after)) = v6.split_once(']') else {
            return Err(format!("{url:?}: unterminated IPv6 address"));
        };
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            None if after.is_empty() => default_port,
            None => return Err(format!("{url:?}: bad port")),
        };
        (h.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            ),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    if port == 0 {
        return Err(format!("{url:?}: port 0"));
    }
    Ok((tls, host, port))
}

impl RawMqtt {
    pub(super) fn validate(self, node_id: &str, errs: &mut Errors) -> Option<MqttConfig> {
        let before = errs.len();
        let (tls, host, port) = match &self.url {
            None => {
                errs.push((
                    "mqtt.url".into(),
                    "required when [mqtt] is present (mqtt://HOST:PORT or mqtts://HOST:PORT)"
                        .into(),
                ));
                (false, String::new(), 0)
            }
            Some(u) => parse_url(u.trim()).unwrap_or_else(|e| {
                errs.push(("mqtt.url".into(), e));
                (false, String::new(), 0)
            }),
        };
        let ca_file = path(errs, "mqtt.ca_file", self.ca_file);
        let cert = path(errs, "mqtt.cert_file", self.cert_file);
        let key = path(errs, "mqtt.key_file", self.key_file);
        let client_auth = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                errs.push((
                    "mqtt.cert_file".into(),
                    "needs mqtt.key_file too (mTLS takes both or neither)".into(),
                ));
                None
            }
            (None, Some(_)) => {
                errs.push((
                    "mqtt.key_file".into(),
                    "needs mqtt.cert_file too (mTLS takes both or neither)".into(),
                ));
                None
            }
        };
        if !tls && (ca_file.is_some() || client_auth.is_some()) && errs.len() == before {
            errs.push((
                "mqtt.url".into(),
                "ca_file, cert_file and key_file need an mqtts:// url".into(),
            ));
        }
        if tls && ca_file.is_none() && errs.len() == before {
            errs.push((
                "mqtt.ca_file".into(),
                "required with mqtts:// (the CA the broker's certificate chains to)".into(),
            ));
        }
        let password_file = path(errs, "mqtt.password_file", self.password_file);
        if password_file.is_some() && self.username.is_none() {
            errs.push(("mqtt.password_file".into(), "needs mqtt.username".into()));
        }
        if let Some(u) = &self.username {
            if u.is_empty() {
                errs.push(("mqtt.username".into(), "must not be empty".into()));
            }
        }
        let client_id = match self.client_id {
            Some(c) if c.is_empty() || c.len() > 128 || c.chars().any(char::is_control) => {
                errs.push((
                    "mqtt.client_id".into(),
                    "must be 1 to 128 characters, no control characters".into(),
                ));
                c
            }
            Some(c) => c,
            None => node_id.to_string(),
        };
        let keepalive = duration(errs, "mqtt.keepalive", &self.keepalive, DEFAULT_KEEPALIVE);
        if keepalive < MIN_KEEPALIVE || keepalive > Duration::from_secs(u64::from(u16::MAX)) {
            errs.push((
                "mqtt.keepalive".into(),
                format!(
                    "must be between {} and 65535s",
                    humantime::format_duration(MIN_KEEPALIVE)
                ),
            ));
        }
        let topic_prefix = self
            .topic_prefix
            .unwrap_or_else(|| DEFAULT_TOPIC_PREFIX.to_string());
        let topic_prefix = topic_prefix.trim_end_matches('/').to_string();
        if topic_prefix.is_empty()
            || topic_prefix.starts_with('/')
            || !topic_prefix.split('/').all(topic_level_ok)
        {
            errs.push((
                "mqtt.topic_prefix".into(),
                format!(
                    "{topic_prefix:?}: levels separated by '/', none empty, no '+', '#' or control characters"
                ),
            ));
        }
        let summary_interval = duration(
            errs,
            "mqtt.summary_interval",
            &self.summary_interval,
            DEFAULT_SUMMARY_INTERVAL,
        );
        if summary_interval < MIN_SUMMARY_INTERVAL {
            errs.push(("mqtt.summary_interval".into(), "must be at least 1s".into()));
        }
        let outbox_max_rows = self.outbox_max_rows.unwrap_or(DEFAULT_OUTBOX_MAX_ROWS);
        if outbox_max_rows < MIN_OUTBOX_MAX_ROWS {
            errs.push((
                "mqtt.outbox_max_rows".into(),
                format!("must be at least {MIN_OUTBOX_MAX_ROWS}, got {outbox_max_rows}"),
            ));
        }
        let max_packet_kb = self.max_packet_kb.unwrap_or(DEFAULT_MAX_PACKET_KB);
        if !(MIN_MAX_PACKET_KB..=MAX_MAX_PACKET_KB).contains(&max_packet_kb) {
            errs.push((
                "mqtt.max_packet_kb".into(),
                format!(
                    "must be between {MIN_MAX_PACKET_KB} and {MAX_MAX_PACKET_KB}, got {max_packet_kb}"
                ),
            ));
        }
        let reconnect_min = duration(
            errs,
            "mqtt.reconnect_min",
            &self.reconnect_min,
            DEFAULT_RECONNECT_MIN,
        );
        let reconnect_max = duration(
            errs,
            "mqtt.reconnect_max",
            &self.reconnect_max,
            DEFAULT_RECONNECT_MAX,
        );
        if reconnect_max < reconnect_min {
            errs.push((
                "mqtt.reconnect_max".into(),
                "must not be shorter than mqtt.reconnect_min".into(),
            ));
        }
        if errs.len() != before {
            return None;
        }
        Some(MqttConfig {
            url: self.url.unwrap_or_default(),
            tls,
            host,
            port,
            ca_file,
            client_auth,
            username: self.username,
            password_file,
            client_id,
            keepalive,
            topic_prefix,
            summary_interval,
            outbox_max_rows,
            max_packet_bytes: (max_packet_kb * 1024) as usize,
            reconnect_min,
            reconnect_max,
        })
    }
}

impl RawFleet {
    pub(super) fn validate(self, errs: &mut Errors) -> FleetConfig {
        if let Some(g) = &self.group {
            if !topic_level_ok(g) || g.len() > 128 {
                errs.push((
                    "fleet.group".into(),
                    format!(
                        "{g:?}: 1 to 128 characters, no '/', '+', '#' or control characters (it is an MQTT topic level)"
                    ),
                ));
            }
        }
        let keys = self.trusted_keys.unwrap_or_default();
        for (i, k) in keys.iter().enumerate() {
            if let Err(e) = decode_key(k) {
                errs.push((format!("fleet.trusted_keys[{i}]"), e));
            }
        }
        let allow_unsigned = self.allow_unsigned.unwrap_or(false);
        if allow_unsigned && !keys.is_empty() {
            errs.push((
                "fleet.allow_unsigned".into(),
                "contradicts fleet.trusted_keys (with keys, unsigned commands are always refused)"
                    .into(),
            ));
        }
        FleetConfig {
            group: self.group,
            trusted_keys: keys,
            allow_unsigned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://broker:1884"),
            Ok((false, "broker".into(), 1884))
        );
        assert_eq!(
            parse_url("mqtts://b.example.net"),
            Ok((true, "b.example.net".into(), 8883))
        );
        assert_eq!(parse_url("mqtt://[::1]:1"), Ok((false, "::1".into(), 1)));
        assert!(parse_url("http://x:1").is_err());
        assert!(parse_url("mqtt://:1").is_err());
        assert!(parse_url("mqtt://x:0").is_err());
        assert!(parse_url("mqtt://x:1/path").is_err());
    }

    #[test]
    fn keys() {
        use base64::Engine;
        let k = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(decode_key(&format!("ed25519:{k}")), Ok([7u8; 32]));
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 31]);
        assert!(decode_key(&format!("ed25519:{short}"))
            .expect_err("short")
            .contains("32 bytes"));
        assert!(decode_key(&k).is_err());
    }

    #[test]
    fn defaults_and_off() {
        let off = crate::config::parse_str("", "x.toml").expect("valid");
        assert_eq!(off.mqtt, None, "no [mqtt]: MQTT off");
        let c = crate::config::parse_str(
            "[agent]\nnode_id = \"n1\"\n[mqtt]\nurl = \"mqtt://b\"\n[fleet]\ngroup = \"g\"\n",
            "x.toml",
        )
        .expect("valid");
        let m = c.mqtt.expect("mqtt on");
        assert_eq!((m.host.as_str(), m.port, m.tls), ("b", 1883, false));
        assert_eq!(m.client_id, "n1");
        assert_eq!(m.topic_prefix, DEFAULT_TOPIC_PREFIX);
        assert_eq!(m.keepalive, DEFAULT_KEEPALIVE);
        assert_eq!(m.max_packet_bytes, 16392 * 1024);
        assert_eq!(
            (m.reconnect_min, m.reconnect_max),
            (DEFAULT_RECONNECT_MIN, DEFAULT_RECONNECT_MAX)
        );
        assert_eq!(c.fleet.group.as_deref(), Some("g"));
    }

    #[test]
    fn password_is_read_and_never_printed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pw");
        std::fs::write(&f, "hunter2\n").expect("write");
        let mut m = MqttConfig::plain("b", 1, "n");
        m.username = Some("u".into());
        m.password_file = Some(f);
        let pw = m.password().expect("read").expect("some");
        assert_eq!(pw.expose(), "hunter2");
        assert!(!format!("{pw:?} {pw} {m:?}").contains("hunter2"));
    }
}
