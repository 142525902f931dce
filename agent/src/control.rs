//! The local control socket: `outpost status` asks the running agent for
//! its live view here, so status needs no disk writes to stay fresh.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::collect::TargetStatus;
use crate::sync::uplink::UplinkState;

/// What the running agent sees right now.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LiveStatus {
    pub node_id: String,
    pub version: String,
    pub pid: u32,
    pub started_ms: i64,
    pub config: Option<String>,
    pub sample_interval_ms: u64,
    pub samples: u64,
    pub signals: usize,
    pub feature_vectors: u64,
    pub newest_feature_ms: Option<i64>,
    pub store_dropped: u64,
    pub targets: Vec<TargetStatus>,
    /// The latest anomaly score per target (what `anomaly >= X` rules see).
    #[serde(default)]
    pub anomaly: Vec<(String, f32)>,
    /// Incidents the detectors hold open.
    #[serde(default)]
    pub open_incidents: usize,
    /// Loaded models, their role and counts.
    #[serde(default)]
    pub models: Vec<ModelLive>,
    /// The MQTT uplink; `None` without `[mqtt]`.
    #[serde(default)]
    pub uplink: Option<UplinkLive>,
}

/// The MQTT uplink as `outpost status` shows it: the current uplink's
/// [`UplinkState`], followed by the pipeline across reloads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UplinkLive {
    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`; never credentials.
    pub broker: String,
    /// `connecting`, `connected`, `down`, or `not started` (the uplink
    /// could not be built: a TLS or password file; `reason` says which).
    pub state: String,
    /// Why it is down, one word an operator can grep for (`auth refused`,
    /// `stalled`, `unreachable`, ...); `None` unless down.
    pub kind: Option<String>,
    /// The reason in full; `None` while connecting or connected.
    pub reason: Option<String>,
    /// Failed attempts since the connection was last healthy.
    pub failures: u32,
    /// When the next attempt is due, ms since the epoch; `None` unless down.
    pub retry_at_ms: Option<i64>,
    /// Seconds until then (rounded up), as of the answer; `None` unless
    /// down.
    pub retry_in_s: Option<u64>,
}

/// The uplink's states as [`UplinkLive::state`] names them.
pub const UPLINK_CONNECTING: &str = "connecting";
pub const UPLINK_CONNECTED: &str = "connected";
pub const UPLINK_DOWN: &str = "down";
pub const UPLINK_NOT_STARTED: &str = "not started";

impl UplinkLive {
    /// `state` of the uplink to `broker`, observed at `now_ms`.
    pub fn from_state(broker: &str, state: &UplinkState, now_ms: i64) -> UplinkLive {
        let mut u = UplinkLive {
            broker: broker.to_string(),
            state: String::new(),
            kind: None,
            reason: None,
            failures: 0,
            retry_at_ms: None,
            retry_in_s: None,
        };
        match state {
            UplinkState::Connecting => u.state = UPLINK_CONNECTING.to_string(),
            UplinkState::Connected => u.state = UPLINK_CONNECTED.to_string(),
            UplinkState::Down {
                kind,
                reason,
                failures,
                retry_in,
            } => {
                u.state = UPLINK_DOWN.to_string();
                u.kind = Some(kind.as_str().to_string());
                u.reason = Some(reason.clone());
                u.failures = *failures;
                u.retry_at_ms = Some(now_ms.saturating_add(retry_in.as_millis() as i64));
                u.refresh(now_ms);
            }
        }
        u
    }

    /// An uplink that could not be built (`error` says why).
    pub fn not_started(broker: &str, error: &str) -> UplinkLive {
        UplinkLive {
            broker: broker.to_string(),
            state: UPLINK_NOT_STARTED.to_string(),
            kind: None,
            reason: Some(error.to_string()),
            failures: 0,
            retry_at_ms: None,
            retry_in_s: None,
        }
    }

    /// Brings `retry_in_s` up to `now_ms`.
    pub fn refresh(&mut self, now_ms: i64) {
        self.retry_in_s = self
            .retry_at_ms
            .map(|at| (at.saturating_sub(now_ms).max(0) as u64).div_ceil(1000));
    }

    /// The line `outpost status` prints after `uplink:`.
    pub fn line(&self) -> String {
        match self.state.as_str() {
            UPLINK_CONNECTED => format!("connected to {}", self.broker),
            UPLINK_CONNECTING => format!("connecting to {}", self.broker),
            UPLINK_DOWN => {
                let why = match (&self.kind, &self.reason) {
                    (Some(k), Some(r)) => format!("{k}: {r}"),
                    (Some(k), None) => k.clone(),
                    (None, Some(r)) => r.clone(),
                    (None, None) => "no reason given".to_string(),
                };
                let failures = match self.failures {
                    1 => "1 failure".to_string(),
                    n => format!("{n} failures"),
                };
                let retry = match self.retry_in_s {
                    Some(0) => "retrying now".to_string(),
                    Some(s) => format!("retry in {s} s"),
                    None => "no retry scheduled".to_string(),
                };
                format!("down ({why}), {failures}, {retry}; broker {}", self.broker)
            }
            other => match &self.reason {
                Some(r) => format!("{other} ({r}); broker {}", self.broker),
                None => format!("{other}; broker {}", self.broker),
            },
        }
    }
}

/// The broker of an `[mqtt]` section as status shows it:
/// `mqtt[s]://HOST:PORT`, rebuilt from the checked host and port so that
/// nothing else in the configured url (there should be nothing) is shown.
pub fn broker_url(tls: bool, host: &str, port: u16) -> String {
    let scheme = if tls { "mqtts" } else { "mqtt" };
    if host.contains(':') {
        format!("{scheme}://[{host}]:{port}")
    } else {
        format!("{scheme}://{host}:{port}")
    }
}

/// A loaded model as `outpost status` and `outpost model list` show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelLive {
    pub label: String,
    pub role: String,
    pub target: String,
    pub steps: u64,
    pub alerts: u64,
    pub missing: u64,
    pub errors: u64,
    pub last_score: f32,
}

pub type SharedStatus = Arc<Mutex<LiveStatus>>;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A request on the control socket: one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Approve {
        id: u64,
        /// Who answered, for the audit (`fleet:KEY`); absent: `local`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    Deny {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// The model registry changed on disk (`outpost model install`): load
    /// what it names.
    ModelsChanged,
    /// Shadow model to active, active to previous.
    ModelPromote,
    /// Active model out, previous back in.
    ModelRollback,
    /// Take a rule's action by hand (a fleet `run`): allowed only when an
    /// `auto` or `approve` rule on `target` does `action`, and only through
    /// that rule's guards.
    Run {
        target: String,
        /// `restart`, `stop`, `start`, `reload` or `exec:NAME`.
        action: String,
        /// Who asked, for the audit.
        by: String,
    },
}

/// The answer to a request that changes something.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub message: String,
}

/// A request the pipeline must answer, with where to send the answer.
pub type Command = (Request, tokio::sync::oneshot::Sender<Reply>);

/// The longest request line accepted.
const MAX_REQUEST: usize = 4096;

/// Binds the socket (replacing a stale one). A connection that sends
/// nothing, or `{"cmd":"status"}`, gets the live status as one JSON
/// document; other requests go to `commands` and their reply comes back.
pub fn serve(
    path: &Path,
    status: SharedStatus,
    commands: tokio::sync::mpsc::Sender<Command>,
    shutdown: CancellationToken,
) -> Result<(), ControlError> {
    let bind_err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    }
    let path = path.to_path_buf();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let status = status.clone();
                        let commands = commands.clone();
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(
                                Duration::from_secs(5),
                                answer(stream, status, commands),
                            )
                            .await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

async fn answer(
    mut stream: UnixStream,
    status: SharedStatus,
    commands: tokio::sync::mpsc::Sender<Command>,
) {
    // Read one line (or nothing: a bare connect asks for status).
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.contains(&b'\n') || buf.len() > MAX_REQUEST {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let _ = read;
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let request = if line.iter().all(u8::is_ascii_whitespace) {
        Ok(Request::Status)
    } else if buf.len() > MAX_REQUEST {
        Err("request too long".to_string())
    } else {
        serde_json::from_slice::<Request>(line).map_err(|e| format!("bad request: {e}"))
    };
    let body = match request {
        Ok(Request::Status) => {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(u) = s.uplink.as_mut() {
                u.refresh(crate::collect::sampler::now_ms());
            }
            serde_json::to_vec(&*s).unwrap_or_default()
        }
        Ok(req) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let reply = if commands.send((req, tx)).await.is_err() {
                Reply {
                    ok: false,
                    message: "the agent is shutting down".into(),
                }
            } else {
                rx.await.unwrap_or(Reply {
                    ok: false,
                    message: "the agent did not answer".into(),
                })
            };
            serde_json::to_vec(&reply).unwrap_or_default()
        }
        Err(message) => serde_json::to_vec(&Reply { ok: false, message }).unwrap_or_default(),
    };
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

/// Asks a running agent for its live status; `None` when none answers.
pub async fn query(path: &Path) -> Option<LiveStatus> {
    let fut = async {
        let mut stream = UnixStream::connect(path).await.ok()?;
        stream.write_all(b"{\"cmd\":\"status\"}\n").await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        serde_json::from_slice(&buf).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

/// Sends a request that changes something; `Err` when no agent answers.
pub async fn request(path: &Path, req: &Request) -> Result<Reply, String> {
    let fut = async {
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(|e| format!("no agent answers at {}: {e}", path.display()))?;
        let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        stream
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice::<Reply>(&buf).map_err(|e| format!("bad reply: {e}"))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| "the agent did not answer within 5 s".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::uplink::DownKind;

    const BROKER: &str = "mqtts://broker.example:8883";

    fn down(failures: u32, retry_in: Duration) -> UplinkState {
        UplinkState::Down {
            kind: DownKind::AuthRefused,
            reason: "not authorized (CONNACK 5)".to_string(),
            failures,
            retry_in,
        }
    }

    #[test]
    fn uplink_lines() {
        let now = 1_700_000_000_000;
        let connected = UplinkLive::from_state(BROKER, &UplinkState::Connected, now);
        assert_eq!(connected.line(), "connected to mqtts://broker.example:8883");
        assert_eq!(connected.retry_in_s, None);
        assert_eq!(connected.kind, None);
        let connecting = UplinkLive::from_state(BROKER, &UplinkState::Connecting, now);
        assert_eq!(
            connecting.line(),
            "connecting to mqtts://broker.example:8883"
        );
        let d = UplinkLive::from_state(BROKER, &down(3, Duration::from_millis(11_200)), now);
        assert_eq!(d.state, "down");
        assert_eq!(d.kind.as_deref(), Some("auth refused"));
        assert_eq!(d.retry_at_ms, Some(now + 11_200));
        assert_eq!(d.retry_in_s, Some(12));
        assert_eq!(
            d.line(),
            "down (auth refused: not authorized (CONNACK 5)), 3 failures, retry in 12 s; \
             broker mqtts://broker.example:8883"
        );
        let once = UplinkLive::from_state(BROKER, &down(1, Duration::ZERO), now);
        assert_eq!(
            once.line(),
            "down (auth refused: not authorized (CONNACK 5)), 1 failure, retrying now; \
             broker mqtts://broker.example:8883"
        );
        let broken = UplinkLive::not_started(BROKER, "mqtts:// needs mqtt.ca_file");
        assert_eq!(
            broken.line(),
            "not started (mqtts:// needs mqtt.ca_file); broker mqtts://broker.example:8883"
        );
    }

    #[test]
    fn retry_counts_down_and_stops_at_zero() {
        let now = 1_700_000_000_000;
        let mut d = UplinkLive::from_state(BROKER, &down(2, Duration::from_secs(8)), now);
        assert_eq!(d.retry_in_s, Some(8));
        d.refresh(now + 2_500);
        assert_eq!(d.retry_in_s, Some(6));
        d.refresh(now + 8_000);
        assert_eq!(d.retry_in_s, Some(0));
        d.refresh(now + 60_000);
        assert_eq!(d.retry_in_s, Some(0));
        assert!(d.line().contains("retrying now"), "{}", d.line());
    }

    #[test]
    fn broker_urls_carry_no_credentials_and_bracket_ipv6() {
        assert_eq!(broker_url(false, "10.0.0.1", 1883), "mqtt://10.0.0.1:1883");
        assert_eq!(
            broker_url(true, "b.example", 8883),
            "mqtts://b.example:8883"
        );
        assert_eq!(broker_url(false, "::1", 1884), "mqtt://[::1]:1884");
    }

    #[test]
    fn status_json_has_the_uplink_or_null() {
        let mut s = LiveStatus::default();
        let v = serde_json::to_value(&s).unwrap();
        assert!(v["uplink"].is_null(), "{v}");
        s.uplink = Some(UplinkLive::from_state(
            BROKER,
            &down(3, Duration::from_secs(4)),
            0,
        ));
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["uplink"]["state"], "down");
        assert_eq!(v["uplink"]["kind"], "auth refused");
        assert_eq!(v["uplink"]["failures"], 3);
        assert_eq!(v["uplink"]["retry_in_s"], 4);
        assert_eq!(v["uplink"]["broker"], BROKER);
        // What an older agent answers (no `uplink`) still parses.
        let mut old = v.clone();
        old.as_object_mut().unwrap().remove("uplink");
        let parsed: LiveStatus = serde_json::from_value(old).unwrap();
        assert_eq!(parsed.uplink, None);
    }
}
