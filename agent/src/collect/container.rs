//! Container targets, read over the Docker Engine API on a unix socket:
//! docker's own, or podman's API service (`podman system service`).
//!
//! The collector connects lazily on the first `collect`, negotiates the API
//! version (podman speaks 1.41), then inspects every configured container
//! once per sample. Health comes from inspect's `State.Health.Status`; the
//! stats API is never called (it is slow). When no runtime answers, the
//! targets report `not available`, one line is logged, and the connection
//! is retried after [`RETRY_FIRST`], then less and less often, at most every
//! [`RETRY_INTERVAL`] (see [`Retry`]); a runtime that stops answering (its
//! API service restarted) is looked for again the same way, and one line
//! says when it is back. A container that is not there (removed) reports
//! `not found`, logged once when it goes and once when it is back.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum};
use bollard::Docker;

use super::{target_signal, Availability, Retry, Sample, SignalName, TargetStatus};
use crate::config::{Target, TargetKind};

/// The budget for all API calls of one `collect`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The first wait before looking again for a missing or broken runtime; it
/// doubles with every failed attempt, up to [`RETRY_INTERVAL`].
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two looks for the runtime.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(30);

const KIND: &str = "container";

/// Why the container runtime could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("no container API socket found (looked at {0})")]
    NoSocket(String),
    #[error("{socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: BollardError,
    },
    #[error("{socket}: no answer within {} ms", within.as_millis())]
    Timeout { socket: String, within: Duration },
}

#[derive(Debug)]
struct ContainerTarget {
    name: String,
    container: String,
    sig_up: SignalName,
    sig_restarts: SignalName,
    sig_healthy: SignalName,
    /// Whether the container was last seen `not found` (logged once).
    missing: bool,
}

/// Reads container targets from docker or podman.
pub struct ContainerCollector {
    targets: Vec<ContainerTarget>,
    configured: Option<PathBuf>,
    client: Option<Client>,
    retry: Retry,
    availability: Availability,
    /// Why the runtime is not available, for the targets' `detail`.
    reason: String,
}

struct Client {
    docker: Docker,
    socket: PathBuf,
}

impl std::fmt::Debug for ContainerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerCollector")
            .field("targets", &self.targets)
            .field("socket", &self.client.as_ref().map(|c| &c.socket))
            .field("reason", &self.reason)
            .finish()
    }
}

/// What one inspect told about a container.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reading {
    pub(crate) state: String,
    pub(crate) up: bool,
    pub(crate) restarts: Option<f64>,
    pub(crate) healthy: Option<bool>,
    pub(crate) detail: Option<String>,
}

enum Outcome {
    Found(Reading),
    NotFound,
    /// The API answered, but not usefully (a 500, an unparsable body).
    Failed(String),
    /// The runtime did not answer: the connection is dropped.
    Unreachable(String),
}

impl ContainerCollector {
    /// Targets of kind Container. `socket`: the configured API socket; when
    /// `None`, the first that answers of `$DOCKER_HOST` (unix:// only),
    /// `/run/docker.sock`, `/var/run/docker.sock`, `/run/podman/podman.sock`
    /// and `$XDG_RUNTIME_DIR/podman/podman.sock`.
    pub fn new(targets: &[Target], socket: Option<&Path>) -> Self {
        let targets = targets
            .iter()
            .filter_map(|t| match &t.kind {
                TargetKind::Container { container } => Some(ContainerTarget {
                    name: t.name.clone(),
                    container: container.clone(),
                    sig_up: target_signal(&t.name, "up"),
                    sig_restarts: target_signal(&t.name, "restarts"),
                    sig_healthy: target_signal(&t.name, "healthy"),
                    missing: false,
                }),
                _ => None,
            })
            .collect();
        ContainerCollector {
            targets,
            configured: socket.map(Path::to_path_buf),
            client: None,
            retry: Retry::new(RETRY_FIRST, RETRY_INTERVAL),
            availability: Availability::default(),
            reason: "not connected yet".to_string(),
        }
    }

    /// Whether a runtime answered and is in use.
    pub fn connected(&self) -> bool {
        self.client.is_some()
    }

    /// The socket in use, once connected.
    pub fn socket(&self) -> Option<&Path> {
        self.client.as_ref().map(|c| c.socket.as_path())
    }

    /// Inspects every container target and adds its signals and status.
    pub async fn collect(&mut self, now: Instant, sample: &mut Sample) {
        if self.targets.is_empty() {
            return;
        }
        // One budget for the whole sample, connecting included.
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        if self.client.is_none() {
            self.try_connect(now, deadline).await;
        }
        let Some(client) = &self.client else {
            self.all_unavailable(sample);
            return;
        };
        let mut lost: Option<String> = None;
        for target in &mut self.targets {
            let outcome = match &lost {
                Some(e) => Outcome::Unreachable(e.clone()),
                None => inspect(&client.docker, &target.container, deadline).await,
            };
            match &outcome {
                Outcome::Found(_) if target.missing => {
                    target.missing = false;
                    tracing::info!(
                        target_name = %target.name,
                        container = %target.container,
                        "container found again"
                    );
                }
                Outcome::NotFound if !target.missing => {
                    target.missing = true;
                    tracing::warn!(
                        target_name = %target.name,
                        container = %target.container,
                        "container not found; the target reports \"not found\" until it is back"
                    );
                }
                _ => {}
            }
            match outcome {
                Outcome::Found(r) => {
                    sample.push(&target.sig_up, if r.up { 1.0 } else { 0.0 });
                    if let Some(n) = r.restarts {
                        sample.push(&target.sig_restarts, n);
                    }
                    if let Some(h) = r.healthy {
                        sample.push(&target.sig_healthy, if h { 1.0 } else { 0.0 });
                    }
                    sample.targets.push(TargetStatus {
                        name: target.name.clone(),
                        kind: KIND.to_string(),
                        state: r.state,
                        up: r.up,
                        probe: None,
                        detail: r.detail,
                    });
                }
                Outcome::NotFound => {
                    sample.push(&target.sig_up, 0.0);
                    sample.targets.push(status(target, "not found", None));
                }
                Outcome::Failed(e) => {
                    sample.targets.push(status(target, "error", Some(e)));
                }
                Outcome::Unreachable(e) => {
                    sample
                        .targets
                        .push(status(target, "not available", Some(e.clone())));
                    lost = Some(e);
                }
            }
        }
        if let Some(e) = lost {
            if self.availability.fail() {
                tracing::warn!(
                    socket = %client.socket.display(),
                    error = %e,
                    "container runtime stopped answering; container targets report \"not available\""
                );
            }
            self.reason = e;
            // A later `collect` connects again when the back-off says so.
            self.client = None;
            self.retry.lost(now);
        }
    }

    async fn try_connect(&mut self, now: Instant, deadline: tokio::time::Instant) {
        if !self.retry.attempt(now) {
            return;
        }
        match self.connect(deadline).await {
            Ok(client) => {
                if self.availability.ok() {
                    tracing::info!(socket = %client.socket.display(), "container runtime available again");
                } else {
                    tracing::debug!(socket = %client.socket.display(), "connected to the container runtime");
                }
                self.retry.connected(now);
                self.client = Some(client);
            }
            Err(e) => {
                self.retry.failed();
                if self.availability.fail() {
                    tracing::warn!(
                        error = %e,
                        "container runtime not available; container targets report \"not available\""
                    );
                }
                self.reason = e.to_string();
            }
        }
    }

    async fn connect(&self, deadline: tokio::time::Instant) -> Result<Client, ContainerError> {
        let (docker, socket) =
            connect_any(self.configured.as_deref(), deadline, CALL_TIMEOUT).await?;
        Ok(Client { docker, socket })
    }

    fn all_unavailable(&self, sample: &mut Sample) {
        for target in &self.targets {
            sample
                .targets
                .push(status(target, "not available", Some(self.reason.clone())));
        }
    }
}

fn status(target: &ContainerTarget, state: &str, detail: Option<String>) -> TargetStatus {
    TargetStatus {
        name: target.name.clone(),
        kind: KIND.to_string(),
        state: state.to_string(),
        up: false,
        probe: None,
        detail,
    }
}

/// Connects to `configured`, or when `None` tries the sockets of
/// [`default_sockets`] in order; the first that answers wins. Returns the
/// client (API version negotiated), whose calls time out after
/// `call_timeout` (whole seconds), and the socket it talks to.
pub(crate) async fn connect_any(
    configured: Option<&Path>,
    deadline: tokio::time::Instant,
    call_timeout: Duration,
) -> Result<(Docker, PathBuf), ContainerError> {
    let candidates = match configured {
        Some(p) => vec![p.to_path_buf()],
        None => default_sockets(
            std::env::var("DOCKER_HOST").ok().as_deref(),
            std::env::var_os("XDG_RUNTIME_DIR")
                .as_deref()
                .map(Path::new),
        ),
    };
    let mut last_err = None;
    for socket in candidates.iter().filter(|p| p.exists()) {
        match connect_to(socket, deadline, call_timeout).await {
            Ok(docker) => return Ok((docker, socket.clone())),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        ContainerError::NoSocket(
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )
    }))
}

/// The sockets looked at, in order, when none is configured.
fn default_sockets(docker_host: Option<&str>, xdg_runtime_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(path) = docker_host.and_then(|h| h.strip_prefix("unix://")) {
        if !path.is_empty() {
            out.push(PathBuf::from(path));
        }
    }
    out.push(PathBuf::from("/run/docker.sock"));
    out.push(PathBuf::from("/var/run/docker.sock"));
    out.push(PathBuf::from("/run/podman/podman.sock"));
    if let Some(dir) = xdg_runtime_dir.filter(|d| !d.as_os_str().is_empty()) {
        out.push(dir.join("podman/podman.sock"));
    }
    out
}

async fn connect_to(
    socket: &Path,
    deadline: tokio::time::Instant,
    call_timeout: Duration,
) -> Result<Docker, ContainerError> {
    let name = socket.display().to_string();
    let docker =
        Docker::connect_with_unix(&name, call_timeout.as_secs(), bollard::API_DEFAULT_VERSION)
            .map_err(|source| ContainerError::Connect {
                socket: name.clone(),
                source,
            })?;
    match tokio::time::timeout_at(deadline, docker.negotiate_version()).await {
        Ok(Ok(docker)) => Ok(docker),
        Ok(Err(source)) => Err(ContainerError::Connect {
            socket: name,
            source,
        }),
        Err(_) => Err(ContainerError::Timeout {
            socket: name,
            within: call_timeout,
        }),
    }
}

async fn inspect(docker: &Docker, container: &str, deadline: tokio::time::Instant) -> Outcome {
    match tokio::time::timeout_at(deadline, docker.inspect_container(container, None)).await {
        Err(_) => Outcome::Unreachable(format!("no answer within {} ms", CALL_TIMEOUT.as_millis())),
        Ok(Ok(info)) => Outcome::Found(read(&info)),
        Ok(Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        })) => Outcome::NotFound,
        Ok(Err(
            e @ (BollardError::DockerResponseServerError { .. }
            | BollardError::JsonDataError { .. }
            | BollardError::JsonSerdeError { .. }),
        )) => Outcome::Failed(e.to_string()),
        Ok(Err(e)) => Outcome::Unreachable(e.to_string()),
    }
}

/// Turns an inspect answer into state, signals and detail.
pub(crate) fn read(info: &ContainerInspectResponse) -> Reading {
    let restarts = info.restart_count.map(|n| n as f64);
    let Some(state) = &info.state else {
        return Reading {
            state: "unknown".to_string(),
            up: false,
            restarts,
            healthy: None,
            detail: None,
        };
    };
    let status = state.status.unwrap_or(ContainerStateStatusEnum::EMPTY);
    // `Running` stays true while paused, so the status decides.
    let running = match status {
        ContainerStateStatusEnum::EMPTY => {
            state.running.unwrap_or(false) && !state.paused.unwrap_or(false)
        }
        s => s == ContainerStateStatusEnum::RUNNING,
    };
    // Podman reports `Health` without a healthcheck, with an empty status.
    let health = state
        .health
        .as_ref()
        .and_then(|h| h.status)
        .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE));
    let healthy = match health {
        Some(HealthStatusEnum::HEALTHY) => Some(true),
        Some(HealthStatusEnum::UNHEALTHY) => Some(false),
        _ => None,
    };
    let up = running && healthy != Some(false);

    let status_text = match status {
        ContainerStateStatusEnum::EMPTY if running => "running".to_string(),
        ContainerStateStatusEnum::EMPTY => "unknown".to_string(),
        s => s.to_string(),
    };
    let state_text = match (status, health) {
        (ContainerStateStatusEnum::EXITED, _) | (ContainerStateStatusEnum::DEAD, _) => {
            format!("{status_text} (code {})", state.exit_code.unwrap_or(0))
        }
        (_, Some(h)) if running => format!("{status_text} ({h})"),
        _ => status_text,
    };

    let error = state
        .error
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    let detail = if healthy == Some(false) {
        let output = state
            .health
            .as_ref()
            .and_then(|h| h.log.as_ref())
            .and_then(|log| log.last())
            .map(|last| {
                let out = last.output.as_deref().unwrap_or("").trim();
                let out: String = out.chars().take(200).collect();
                match (last.exit_code, out.is_empty()) {
                    (Some(code), true) => format!("health check exited with code {code}"),
                    (Some(code), false) => format!("health check exited with code {code}: {out}"),
                    (None, _) => format!("health check: {out}"),
                }
            });
        output.or_else(|| Some("health check failing".to_string()))
    } else if let Some(error) = error {
        Some(error.to_string())
    } else if state.oom_killed == Some(true) {
        Some("killed by the OOM killer".to_string())
    } else if running {
        state.pid.filter(|p| *p > 0).map(|p| format!("pid {p}"))
    } else {
        None
    };

    Reading {
        state: state_text,
        up,
        restarts,
        healthy,
        detail,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bollard::models::{ContainerState, Health, HealthcheckResult};

    fn target(name: &str, container: &str) -> Target {
        Target {
            name: name.into(),
            kind: TargetKind::Container {
                container: container.into(),
            },
            probe: None,
        }
    }

    fn inspect_with(state: ContainerState, restarts: i64) -> ContainerInspectResponse {
        ContainerInspectResponse {
            state: Some(state),
            restart_count: Some(restarts),
            ..Default::default()
        }
    }

    #[test]
    fn running_without_healthcheck_podman_style() {
        let r = read(&inspect_with(
            ContainerState {
                status: Some(ContainerStateStatusEnum::RUNNING),
                running: Some(true),
                pid: Some(42),
                health: Some(Health {
                    status: Some(HealthStatusEnum::EMPTY),
                    failing_streak: Some(0),
                    log: None,
                }),
                ..Default::default()
            },
            2,
        ));
        assert_eq!(r.state, "running");
        assert!(r.up);
        assert_eq!(r.restarts, Some(2.0));
        assert_eq!(r.healthy, None);
        assert_eq!(r.detail.as_deref(), Some("pid 42"));
    }

    #[test]
    fn unhealthy_is_down_and_says_why() {
        let r = read(&inspect_with(
            ContainerState {
                status: Some(ContainerStateStatusEnum::RUNNING),
                running: Some(true),
                health: Some(Health {
                    status: Some(HealthStatusEnum::UNHEALTHY),
                    failing_streak: Some(3),
                    log: Some(vec![HealthcheckResult {
                        exit_code: Some(1),
                        output: Some("connection refused\n".into()),
                        ..Default::default()
                    }]),
                }),
                ..Default::default()
            },
            0,
        ));
        assert_eq!(r.state, "running (unhealthy)");
        assert!(!r.up);
        assert_eq!(r.healthy, Some(false));
        assert_eq!(
            r.detail.as_deref(),
            Some("health check exited with code 1: connection refused")
        );
    }

    #[test]
    fn healthy_and_starting() {
        let mut state = ContainerState {
            status: Some(ContainerStateStatusEnum::RUNNING),
            running: Some(true),
            health: Some(Health {
                status: Some(HealthStatusEnum::HEALTHY),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = read(&inspect_with(state.clone(), 0));
        assert_eq!(r.state, "running (healthy)");
        assert_eq!(r.healthy, Some(true));
        assert!(r.up);

        state.health = Some(Health {
            status: Some(HealthStatusEnum::STARTING),
            ..Default::default()
        });
        let r = read(&inspect_with(state, 0));
        assert_eq!(r.state, "running (starting)");
        assert_eq!(r.healthy, None);
        assert!(r.up);
    }

    #[test]
    fn exited_and_paused() {
        let r = read(&inspect_with(
            ContainerState {
                status: Some(ContainerStateStatusEnum::EXITED),
                running: Some(false),
                exit_code: Some(3),
                ..Default::default()
            },
            1,
        ));
        assert_eq!(r.state, "exited (code 3)");
        assert!(!r.up);
        assert_eq!(r.restarts, Some(1.0));

        let r = read(&inspect_with(
            ContainerState {
                status: Some(ContainerStateStatusEnum::PAUSED),
                running: Some(true),
                paused: Some(true),
                ..Default::default()
            },
            0,
        ));
        assert_eq!(r.state, "paused");
        assert!(!r.up);
    }

    #[test]
    fn socket_search_order() {
        let got = default_sockets(
            Some("unix:///custom/d.sock"),
            Some(Path::new("/run/user/1000")),
        );
        let want: Vec<PathBuf> = [
            "/custom/d.sock",
            "/run/docker.sock",
            "/var/run/docker.sock",
            "/run/podman/podman.sock",
            "/run/user/1000/podman/podman.sock",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(got, want);
        // tcp:// DOCKER_HOST is not ours to use.
        let got = default_sockets(Some("tcp://10.0.0.1:2375"), None);
        assert_eq!(got[0], PathBuf::from("/run/docker.sock"));
        assert_eq!(got.len(), 3);
    }

    #[tokio::test]
    async fn no_socket_means_not_available_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nothing.sock");
        let targets = vec![
            target("broker", "mosquitto"),
            Target {
                name: "host".into(),
                kind: TargetKind::Host,
                probe: None,
            },
        ];
        let mut c = ContainerCollector::new(&targets, Some(&socket));
        let now = Instant::now();
        let started = Instant::now();
        let ms = Duration::from_millis;
        // Attempts back off: at 0, 1 s later, 2 s after that.
        for (at, attempted) in [(0, 0), (500, 0), (1000, 1000), (2000, 1000), (3000, 3000)] {
            let mut sample = Sample::new(0);
            c.collect(now + ms(at), &mut sample).await;
            assert_eq!(sample.targets.len(), 1);
            let t = &sample.targets[0];
            assert_eq!(t.name, "broker");
            assert_eq!(t.kind, "container");
            assert_eq!(t.state, "not available");
            assert!(!t.up);
            assert!(t.detail.as_deref().unwrap().contains("nothing.sock"));
            assert!(sample.values.is_empty());
            assert_eq!(
                c.retry.last_attempt(),
                Some(now + ms(attempted)),
                "at {at} ms"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!c.connected());
        assert!(c.availability.is_down());
        // Never more than RETRY_INTERVAL apart.
        let mut sample = Sample::new(0);
        c.collect(now + ms(3000) + RETRY_INTERVAL, &mut sample)
            .await;
        assert_eq!(
            c.retry.last_attempt(),
            Some(now + ms(3000) + RETRY_INTERVAL)
        );
    }

    #[tokio::test]
    async fn a_socket_that_never_answers_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("silent.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut c = ContainerCollector::new(&[target("broker", "mosquitto")], Some(&socket));
        let started = Instant::now();
        let mut sample = Sample::new(0);
        c.collect(Instant::now(), &mut sample).await;
        assert!(started.elapsed() < CALL_TIMEOUT + Duration::from_secs(1));
        assert_eq!(sample.targets[0].state, "not available");
        assert!(!c.connected());
    }

    #[tokio::test]
    async fn no_container_targets_does_nothing() {
        let mut c = ContainerCollector::new(&[], None);
        let mut sample = Sample::new(0);
        c.collect(Instant::now(), &mut sample).await;
        assert!(sample.targets.is_empty());
        assert!(c.retry.last_attempt().is_none());
    }
}
