//! The container actuator against a real podman API service: a container
//! that exited is brought back by restart and by start, a running one is
//! restarted (a new process) and stopped, a missing one is a clear failure.
//! Every effect is checked with `podman inspect`, not with outpost's own
//! reading.
//!
//! The harness installs podman when it is missing; if podman cannot be
//! installed or started, these tests fail.

use std::time::Duration;

use outpost::act::{ActionOutcome, ActionRequest, Actuator, Actuators, ActuatorsConfig};
use outpost::decide::types::{ActionKind, ActionTarget};
use outpost_tests::podman::{self, Containers, Service};

/// Exits with code 3 the first time; on every later start it stays up and
/// ends at once on SIGTERM (so a stop does not wait for SIGKILL).
const EXITS_FIRST: &str = "trap 'exit 0' TERM; \
    if [ -e /tmp/ran ]; then sleep 600 & wait; else : > /tmp/ran; exit 3; fi";
/// Stays up; ends at once on SIGTERM.
const STAYS_UP: &str = "trap 'exit 0' TERM; sleep 600 & wait";

fn start_service() -> Service {
    podman::ensure_installed().expect("podman must be installable");
    podman::busybox_image().expect("busybox image");
    Service::start().expect("podman system service must start")
}

fn actuators(service: &Service) -> Actuators {
    Actuators::new(ActuatorsConfig {
        container_socket: Some(service.socket().to_path_buf()),
        container_stop_timeout: Duration::from_secs(5),
        ..ActuatorsConfig::default()
    })
}

async fn act(a: &Actuators, container: &str, action: ActionKind) -> ActionOutcome {
    let out = a
        .execute(&ActionRequest {
            id: 1,
            target_name: "broker".into(),
            target: ActionTarget::Container {
                container: container.into(),
            },
            action,
            command: None,
        })
        .await;
    eprintln!("{out:#?}");
    out
}

fn inspect(name: &str, field: &str) -> String {
    podman::podman(&["inspect", "--format", field, name]).expect("podman inspect")
}

#[tokio::test]
async fn restart_and_start_bring_exited_containers_up() {
    let service = start_service();
    let a = actuators(&service);
    let mut containers = Containers::new();
    let for_restart = Containers::unique("outpost-act-restart");
    let for_start = Containers::unique("outpost-act-start");
    for name in [&for_restart, &for_start] {
        containers.run(name, &[], EXITS_FIRST).expect("run");
    }
    for name in [&for_restart, &for_start] {
        containers
            .wait_for(name, "{{.State.Status}}", "exited", Duration::from_secs(30))
            .expect("the container exits");
    }

    for (name, action) in [
        (&for_restart, ActionKind::Restart),
        (&for_start, ActionKind::Start),
    ] {
        let out = act(&a, name, action.clone()).await;
        assert!(out.ok, "{out:?}\n{}", service.log());
        assert_eq!(out.before.as_deref(), Some("exited (code 3)"));
        let after = out.after.as_deref().unwrap_or_default();
        assert!(after.starts_with("running"), "{after}");
        assert_eq!(
            out.summary,
            format!("{} {name}: done; now {after}", action.label())
        );
        // The runtime agrees, and the container is really up.
        assert_eq!(inspect(name, "{{.State.Status}}"), "running");
        let pid = inspect(name, "{{.State.Pid}}");
        assert!(pid.parse::<u32>().is_ok_and(|p| p > 0), "pid {pid}");
        assert!(
            after.contains(&format!("pid {pid}")),
            "{after} vs pid {pid}"
        );
    }
}

#[tokio::test]
async fn restart_and_stop_a_running_container() {
    let service = start_service();
    let a = actuators(&service);
    let mut containers = Containers::new();
    let name = Containers::unique("outpost-act-running");
    containers
        .run(
            &name,
            &["--health-cmd", "true", "--health-interval", "1h"],
            STAYS_UP,
        )
        .expect("run");
    containers
        .wait_for(
            &name,
            "{{.State.Status}}",
            "running",
            Duration::from_secs(30),
        )
        .expect("the container runs");
    podman::podman(&["healthcheck", "run", &name]).expect("a passing healthcheck");
    containers
        .wait_for(
            &name,
            "{{.State.Health.Status}}",
            "healthy",
            Duration::from_secs(10),
        )
        .expect("the container is healthy");
    let pid_before = inspect(&name, "{{.State.Pid}}");
    let started_before = inspect(&name, "{{.State.StartedAt}}");

    // Restart: a new process; health is reported.
    let out = act(&a, &name, ActionKind::Restart).await;
    assert!(out.ok, "{out:?}\n{}", service.log());
    assert_eq!(
        out.before.as_deref(),
        Some(format!("running (healthy); pid {pid_before}").as_str())
    );
    assert_eq!(inspect(&name, "{{.State.Status}}"), "running");
    let pid_after = inspect(&name, "{{.State.Pid}}");
    assert_ne!(pid_after, pid_before, "restart kept the same process");
    assert_ne!(inspect(&name, "{{.State.StartedAt}}"), started_before);
    let after = out.after.clone().unwrap_or_default();
    assert!(after.starts_with("running ("), "no health in {after}");
    assert!(after.ends_with(&format!("; pid {pid_after}")), "{after}");

    // Stop: exited, and the runtime agrees. SIGTERM ended it (code 0),
    // well within the stop timeout.
    let out = act(&a, &name, ActionKind::Stop).await;
    assert!(out.ok, "{out:?}\n{}", service.log());
    assert_eq!(out.after.as_deref(), Some("exited (code 0)"));
    assert_eq!(
        out.summary,
        format!("stop {name}: done; now exited (code 0)")
    );
    assert_eq!(inspect(&name, "{{.State.Status}}"), "exited");
    assert!(out.duration_ms < 5000, "{out:?}");

    // Stopping a stopped container is fine (the API answers 304).
    let out = act(&a, &name, ActionKind::Stop).await;
    assert!(out.ok, "{out:?}");
    assert_eq!(inspect(&name, "{{.State.Status}}"), "exited");
}

#[tokio::test]
async fn a_missing_container_is_a_clear_failure() {
    let service = start_service();
    let a = actuators(&service);
    let name = Containers::unique("outpost-act-missing");
    let _ = podman::podman_output(&["rm", "-f", "-t", "0", &name]);
    for action in [ActionKind::Restart, ActionKind::Stop, ActionKind::Start] {
        let out = act(&a, &name, action.clone()).await;
        assert!(!out.ok);
        assert_eq!(
            out.summary,
            format!("{} {name}: no such container", action.label())
        );
        assert_eq!(out.before, None);
        assert_eq!(out.after, None);
    }
    // Nothing was created along the way.
    let out = podman::podman_output(&["container", "exists", &name]).expect("podman");
    assert_eq!(out.status.code(), Some(1));
}
