//! Containers, over the Docker Engine API (docker's, or podman's API
//! service): restart, stop and start.
//!
//! An action inspects the container first (it must exist; its state is
//! `before`), calls the API with the stop timeout (SIGTERM, then SIGKILL
//! after that long), and inspects again: `after` is the state and health in
//! the collector's words (`running (healthy)`, `exited (code 1)`). `ok`
//! means the runtime carried out the call; whether the container then
//! stays up is for decide's verification to find out.
//!
//! The socket is found the way the collector finds it
//! ([`crate::collect::container`]), on the first action, and kept; a
//! runtime that stops answering is looked for again on the next action.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::query_parameters::{RestartContainerOptions, StopContainerOptions};
use bollard::Docker;
use tokio::sync::Mutex;

use super::{elapsed_ms, ActionOutcome, ActionRequest, Actuator, DEFAULT_CONTAINER_STOP_TIMEOUT};
use crate::collect::container::{connect_any, read, ContainerError};
use crate::decide::types::{ActionKind, ActionTarget};

/// Time allowed for connecting and for an inspect. More generous than the
/// collector's per-sample budget: an action is rare, and a runtime is
/// often slow exactly when something needs fixing.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a stop or restart call beyond the stop timeout itself.
const CALL_MARGIN: Duration = Duration::from_secs(30);

/// Restarts, stops and starts containers.
pub struct ContainerActuator {
    /// `None`: the usual places.
    socket: Option<PathBuf>,
    stop_timeout: Duration,
    client: Mutex<Option<Docker>>,
}

impl std::fmt::Debug for ContainerActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerActuator")
            .field("socket", &self.socket)
            .field("stop_timeout", &self.stop_timeout)
            .finish()
    }
}

enum Inspect {
    Found(String),
    NotFound,
    /// The runtime answered, but not usefully, or not at all.
    Failed(String),
}

impl ContainerActuator {
    /// `socket`: the API socket; `None`: the first that answers of
    /// `$DOCKER_HOST` (unix://), `/run/docker.sock`, `/var/run/docker.sock`,
    /// `/run/podman/podman.sock`, `$XDG_RUNTIME_DIR/podman/podman.sock`.
    pub fn new(socket: Option<PathBuf>) -> Self {
        ContainerActuator {
            socket,
            stop_timeout: DEFAULT_CONTAINER_STOP_TIMEOUT,
            client: Mutex::new(None),
        }
    }

    /// How long a container gets between SIGTERM and SIGKILL on stop and
    /// restart (whole seconds).
    pub fn with_stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// Restarts, stops or starts `container`; any other action is refused.
    pub async fn act(&self, container: &str, action: &ActionKind) -> ActionOutcome {
        let started = Instant::now();
        let what = format!("{} {container}", action.label());
        if !matches!(
            action,
            ActionKind::Restart | ActionKind::Stop | ActionKind::Start
        ) {
            return ActionOutcome::failed(
                format!("{what}: not supported for containers (restart, stop or start)"),
                None,
                started,
            );
        }
        let docker = match self.client().await {
            Ok(d) => d,
            Err(e) => {
                return ActionOutcome::failed(
                    format!("{what}: container runtime not available: {e}"),
                    None,
                    started,
                )
            }
        };
        let before = match self.inspect(&docker, container).await {
            Inspect::Found(state) => state,
            Inspect::NotFound => {
                return ActionOutcome::failed(format!("{what}: no such container"), None, started)
            }
            Inspect::Failed(e) => {
                return ActionOutcome::failed(format!("{what}: cannot inspect: {e}"), None, started)
            }
        };

        let t = i32::try_from(self.stop_timeout.as_secs()).unwrap_or(i32::MAX);
        let slow = docker.clone().with_timeout(self.stop_timeout + CALL_MARGIN);
        let result = match action {
            ActionKind::Restart => {
                slow.restart_container(
                    container,
                    Some(RestartContainerOptions {
                        t: Some(t),
                        signal: None,
                    }),
                )
                .await
            }
            ActionKind::Stop => {
                slow.stop_container(
                    container,
                    Some(StopContainerOptions {
                        t: Some(t),
                        signal: None,
                    }),
                )
                .await
            }
            _ => slow.start_container(container, None).await,
        };
        if let Err(e) = &result {
            self.forget_if_unreachable(e).await;
        }

        let after = match self.inspect(&docker, container).await {
            Inspect::Found(state) => Some(state),
            Inspect::NotFound => Some("not found".to_string()),
            Inspect::Failed(_) => None,
        };
        let now = after.as_deref().unwrap_or("state unknown");
        let (ok, summary) = match result {
            Ok(()) => (true, format!("{what}: done; now {now}")),
            Err(e) => (
                false,
                format!("{what}: failed: {}; now {now}", describe(&e)),
            ),
        };
        ActionOutcome {
            ok,
            summary,
            before: Some(before),
            after,
            output: None,
            duration_ms: elapsed_ms(started),
        }
    }

    /// The container's state (`running (healthy)`, `exited (code 1)`,
    /// `not found`), or `None` when the runtime cannot be asked.
    pub async fn observe(&self, container: &str) -> Option<String> {
        let docker = self.client().await.ok()?;
        match self.inspect(&docker, container).await {
            Inspect::Found(state) => Some(state),
            Inspect::NotFound => Some("not found".to_string()),
            Inspect::Failed(_) => None,
        }
    }

    async fn inspect(&self, docker: &Docker, container: &str) -> Inspect {
        match tokio::time::timeout(API_TIMEOUT, docker.inspect_container(container, None)).await {
            Err(_) => {
                *self.client.lock().await = None;
                Inspect::Failed(format!("no answer within {} ms", API_TIMEOUT.as_millis()))
            }
            Ok(Ok(info)) => {
                let r = read(&info);
                Inspect::Found(match r.detail {
                    Some(detail) => format!("{}; {detail}", r.state),
                    None => r.state,
                })
            }
            Ok(Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            })) => Inspect::NotFound,
            Ok(Err(e)) => {
                self.forget_if_unreachable(&e).await;
                Inspect::Failed(describe(&e))
            }
        }
    }

    /// The kept client, or a new one.
    async fn client(&self) -> Result<Docker, ContainerError> {
        let mut slot = self.client.lock().await;
        if let Some(docker) = slot.as_ref() {
            return Ok(docker.clone());
        }
        let deadline = tokio::time::Instant::now() + API_TIMEOUT;
        let (docker, socket) = connect_any(self.socket.as_deref(), deadline, API_TIMEOUT).await?;
        tracing::debug!(socket = %socket.display(), "actuator connected to the container runtime");
        *slot = Some(docker.clone());
        Ok(docker)
    }

    /// Drops the kept client when the runtime did not answer at all (not
    /// when it answered with an error).
    async fn forget_if_unreachable(&self, e: &BollardError) {
        if !matches!(
            e,
            BollardError::DockerResponseServerError { .. }
                | BollardError::JsonDataError { .. }
                | BollardError::JsonSerdeError { .. }
        ) {
            *self.client.lock().await = None;
        }
    }
}

impl Actuator for ContainerActuator {
    async fn execute(&self, req: &ActionRequest) -> ActionOutcome {
        match &req.target {
            ActionTarget::Container { container } => self.act(container, &req.action).await,
            other => ActionOutcome::failed(
                format!(
                    "{} {}: not a container target ({other:?})",
                    req.action.label(),
                    req.target_name
                ),
                None,
                Instant::now(),
            ),
        }
    }
}

/// The runtime's own message for an error answer, else bollard's.
fn describe(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => format!("{} (HTTP {status_code})", message.trim()),
        other => other.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_runtime_is_a_clear_failure() {
        let dir = tempfile::tempdir().unwrap();
        let a = ContainerActuator::new(Some(dir.path().join("none.sock")));
        let out = a.act("broker", &ActionKind::Restart).await;
        assert!(!out.ok);
        assert!(
            out.summary
                .starts_with("restart broker: container runtime not available"),
            "{}",
            out.summary
        );
        assert!(out.summary.contains("none.sock"), "{}", out.summary);
        assert_eq!(a.observe("broker").await, None);
    }

    #[tokio::test]
    async fn reload_is_not_a_container_action() {
        let a = ContainerActuator::new(None);
        let out = a.act("broker", &ActionKind::Reload).await;
        assert!(!out.ok);
        assert!(out.summary.contains("not supported"), "{}", out.summary);
    }
}
