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
            let s = status.lock().unwrap_or_else(|p| p.into_inner());
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
