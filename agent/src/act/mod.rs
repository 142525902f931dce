//! Acting on the host: restart, stop, start or reload a systemd unit or a
//! container, or run an operator-defined command.
//!
//! Every backend sits behind one [`Actuator`] trait and follows the same
//! shape: check the precondition (the unit is loaded, the container exists,
//! the command is defined), act, then re-read the world and report it
//! honestly in an [`ActionOutcome`]. An action that ran but left the target
//! down is still reported as what it was (a restart job that finished is
//! `ok`, whatever the service did next): verifying that the fix worked is
//! decide's job, with a probe, later.
//!
//! [`Actuators`] owns one of each backend and dispatches by target and
//! action. Budgets, cooldowns and protected units are decide's job; as
//! defence in depth the systemd backend refuses protected units too.
//! Nothing here rate-limits: decide already does.

pub mod container;
pub mod exec;
pub mod systemd;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::collect::process::ProcessCollector;
use crate::collect::Sample;
use crate::config::{CollectConfig, Target, TargetKind};
use crate::decide::types::{ActionKind, ActionTarget, CommandSpec};

pub use container::ContainerActuator;
pub use exec::ExecActuator;
pub use systemd::SystemdActuator;

/// How long a systemd job may take (from the call to its `JobRemoved`).
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a container gets to stop (SIGTERM, then SIGKILL) on stop and
/// restart.
pub const DEFAULT_CONTAINER_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The most command output (stdout and stderr together) kept per exec.
pub const OUTPUT_CAP: usize = 8 * 1024;

/// One action to take, as decide hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRequest {
    /// The decision's id, for logs and the audit trail.
    pub id: u64,
    /// The configured target's name (`web`), for logs.
    pub target_name: String,
    pub target: ActionTarget,
    pub action: ActionKind,
    /// The command to run, for [`ActionKind::Exec`].
    pub command: Option<CommandSpec>,
}

/// What an action did, for the audit trail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionOutcome {
    /// Whether the action was carried out: the job finished `done`, the
    /// runtime accepted the call, the command exited 0.
    pub ok: bool,
    /// One line: `restart nginx.service: job done; now active/running (main pid 42)`.
    pub summary: String,
    /// The target's state before acting, when it could be read.
    pub before: Option<String>,
    /// The target's state after acting, re-read.
    pub after: Option<String>,
    /// An exec's stdout and stderr, interleaved, at most [`OUTPUT_CAP`] bytes.
    pub output: Option<String>,
    pub duration_ms: u64,
}

impl ActionOutcome {
    /// A refusal or a failed precondition: nothing was done.
    pub(crate) fn failed(summary: String, before: Option<String>, started: Instant) -> Self {
        ActionOutcome {
            ok: false,
            summary,
            before,
            after: None,
            output: None,
            duration_ms: elapsed_ms(started),
        }
    }
}

pub(crate) fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Carries out an action and reports what happened. Never panics and never
/// returns an error: every failure is an outcome with `ok: false`.
pub trait Actuator {
    fn execute(&self, req: &ActionRequest) -> impl Future<Output = ActionOutcome> + Send;
}

/// What [`Actuators`] needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct ActuatorsConfig {
    /// Units never to touch (`sshd.service`, `systemd-*`): `*` and `?` globs.
    pub protected: Vec<String>,
    /// The Docker Engine API socket; `None`: the usual places (see
    /// [`crate::collect::container::ContainerCollector::new`]).
    pub container_socket: Option<PathBuf>,
    /// Where procfs is mounted: process targets' state before and after an
    /// exec is read from here.
    pub proc_root: PathBuf,
    /// The D-Bus address of systemd's bus; `None`: the system bus
    /// (honours `DBUS_SYSTEM_BUS_ADDRESS`).
    pub system_bus: Option<String>,
    pub job_timeout: Duration,
    pub container_stop_timeout: Duration,
}

impl Default for ActuatorsConfig {
    fn default() -> Self {
        ActuatorsConfig {
            protected: Vec::new(),
            container_socket: None,
            proc_root: PathBuf::from("/proc"),
            system_bus: None,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            container_stop_timeout: DEFAULT_CONTAINER_STOP_TIMEOUT,
        }
    }
}

impl ActuatorsConfig {
    /// From the collect config (container socket, proc root) and the
    /// guard's protected units.
    pub fn new(collect: &CollectConfig, protected: Vec<String>) -> Self {
        ActuatorsConfig {
            protected,
            container_socket: collect.container_socket.clone(),
            proc_root: collect.proc_root.clone(),
            ..ActuatorsConfig::default()
        }
    }
}

/// One actuator per backend, dispatched by target and action.
#[derive(Debug)]
pub struct Actuators {
    systemd: SystemdActuator,
    container: ContainerActuator,
    exec: ExecActuator,
    proc_root: PathBuf,
}

impl Actuators {
    /// Connects to nothing yet: each backend connects on its first action.
    pub fn new(config: ActuatorsConfig) -> Self {
        let systemd = match config.system_bus {
            Some(address) => SystemdActuator::with_bus_address(config.protected, address),
            None => SystemdActuator::new(config.protected),
        }
        .with_job_timeout(config.job_timeout);
        Actuators {
            systemd,
            container: ContainerActuator::new(config.container_socket)
                .with_stop_timeout(config.container_stop_timeout),
            exec: ExecActuator::new(),
            proc_root: config.proc_root,
        }
    }

    /// The target's state in the words of `outpost status`, or `None` when
    /// it cannot be read (or the target is the host).
    pub async fn observe(&self, target: &ActionTarget) -> Option<String> {
        match target {
            ActionTarget::Systemd { unit } => self.systemd.observe(unit).await,
            ActionTarget::Container { container } => self.container.observe(container).await,
            ActionTarget::Process { process } => {
                let root = self.proc_root.clone();
                let process = process.clone();
                tokio::task::spawn_blocking(move || process_state(&root, &process))
                    .await
                    .ok()
            }
            ActionTarget::Host => None,
        }
    }

    async fn dispatch(&self, req: &ActionRequest) -> ActionOutcome {
        let started = Instant::now();
        let label = req.action.label();
        match (&req.action, &req.target) {
            (ActionKind::Notify, _) => ActionOutcome {
                ok: true,
                summary: "notified".to_string(),
                before: None,
                after: None,
                output: None,
                duration_ms: elapsed_ms(started),
            },
            (ActionKind::Exec(_), target) => {
                let before = self.observe(target).await;
                let mut outcome = self.exec.execute(req).await;
                outcome.before = before;
                outcome.after = self.observe(target).await;
                outcome.duration_ms = elapsed_ms(started);
                outcome
            }
            (_, ActionTarget::Systemd { .. }) => self.systemd.execute(req).await,
            (_, ActionTarget::Container { .. }) => self.container.execute(req).await,
            (_, ActionTarget::Host) => ActionOutcome::failed(
                format!("{label} {}: not possible on a host target", req.target_name),
                None,
                started,
            ),
            (_, ActionTarget::Process { process }) => ActionOutcome::failed(
                format!("{label} {process}: not possible on a process target (use exec)"),
                None,
                started,
            ),
        }
    }
}

impl Actuator for Actuators {
    async fn execute(&self, req: &ActionRequest) -> ActionOutcome {
        let outcome = self.dispatch(req).await;
        let action = req.action.label();
        if outcome.ok {
            tracing::info!(
                id = req.id,
                target = %req.target_name,
                action = %action,
                duration_ms = outcome.duration_ms,
                "{}",
                outcome.summary
            );
        } else {
            tracing::warn!(
                id = req.id,
                target = %req.target_name,
                action = %action,
                duration_ms = outcome.duration_ms,
                "{}",
                outcome.summary
            );
        }
        outcome
    }
}

/// `1 process`, `3 processes`, `not found`, `not available`: how the
/// process collector sees `process` right now.
fn process_state(proc_root: &std::path::Path, process: &str) -> String {
    let target = Target {
        name: "act".to_string(),
        kind: TargetKind::Process {
            process: process.to_string(),
        },
        probe: None,
    };
    let mut collector = ProcessCollector::new(proc_root, &[target]);
    let mut sample = Sample::new(0);
    collector.collect(Instant::now(), &mut sample);
    sample
        .targets
        .pop()
        .map_or_else(|| "unknown".to_string(), |t| t.state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn req(target: ActionTarget, action: ActionKind) -> ActionRequest {
        ActionRequest {
            id: 1,
            target_name: "t".into(),
            target,
            action,
            command: None,
        }
    }

    #[tokio::test]
    async fn notify_changes_nothing() {
        let a = Actuators::new(ActuatorsConfig::default());
        let out = a
            .execute(&req(
                ActionTarget::Systemd {
                    unit: "sshd.service".into(),
                },
                ActionKind::Notify,
            ))
            .await;
        assert!(out.ok);
        assert_eq!(out.summary, "notified");
        assert_eq!(out.before, None);
    }

    #[tokio::test]
    async fn host_and_process_targets_take_no_restart() {
        let a = Actuators::new(ActuatorsConfig::default());
        let out = a
            .execute(&req(ActionTarget::Host, ActionKind::Restart))
            .await;
        assert!(!out.ok);
        assert!(out.summary.contains("host target"), "{}", out.summary);
        let out = a
            .execute(&req(
                ActionTarget::Process {
                    process: "nginx".into(),
                },
                ActionKind::Stop,
            ))
            .await;
        assert!(!out.ok);
        assert!(out.summary.contains("process target"), "{}", out.summary);
    }

    #[tokio::test]
    async fn exec_on_a_process_target_reads_it_before_and_after() {
        let a = Actuators::new(ActuatorsConfig::default());
        let mut r = req(
            ActionTarget::Process {
                process: "outpost-no-such-process".into(),
            },
            ActionKind::Exec("hello".into()),
        );
        r.command = Some(CommandSpec {
            name: "hello".into(),
            argv: vec!["/bin/echo".into(), "hi".into()],
            timeout: Duration::from_secs(5),
        });
        let out = a.execute(&r).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(out.before.as_deref(), Some("not found"));
        assert_eq!(out.after.as_deref(), Some("not found"));
        assert_eq!(out.output.as_deref(), Some("hi\n"));
    }

    #[tokio::test]
    async fn protected_units_are_refused_without_a_bus() {
        let dir = tempfile::tempdir().unwrap();
        let a = Actuators::new(ActuatorsConfig {
            protected: vec!["systemd-*".into(), "sshd.service".into()],
            system_bus: Some(format!("unix:path={}", dir.path().join("none").display())),
            ..ActuatorsConfig::default()
        });
        for unit in ["systemd-journald.service", "sshd.service", "sshd"] {
            let out = a
                .execute(&req(
                    ActionTarget::Systemd { unit: unit.into() },
                    ActionKind::Restart,
                ))
                .await;
            assert!(!out.ok);
            assert!(out.summary.contains("protected"), "{}", out.summary);
        }
        // Not protected: gets as far as the (missing) bus.
        let out = a
            .execute(&req(
                ActionTarget::Systemd {
                    unit: "nginx.service".into(),
                },
                ActionKind::Restart,
            ))
            .await;
        assert!(!out.ok);
        assert!(
            out.summary.contains("systemd not available"),
            "{}",
            out.summary
        );
    }
}
