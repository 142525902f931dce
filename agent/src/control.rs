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

/// Binds the socket (replacing a stale one) and answers every connection
/// with the live status as one JSON document.
pub fn serve(
    path: &Path,
    status: SharedStatus,
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
                    Ok((mut stream, _)) => {
                        let body = {
                            let s = status.lock().unwrap_or_else(|p| p.into_inner());
                            serde_json::to_vec(&*s).unwrap_or_default()
                        };
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                                let _ = stream.write_all(&body).await;
                                let _ = stream.shutdown().await;
                            })
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

/// Asks a running agent for its live status; `None` when none answers.
pub async fn query(path: &Path) -> Option<LiveStatus> {
    let fut = async {
        let mut stream = UnixStream::connect(path).await.ok()?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.ok()?;
        serde_json::from_slice(&buf).ok()
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}
