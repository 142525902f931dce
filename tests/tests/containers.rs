//! ContainerCollector against a real podman API service: a running
//! container, one that exited with code 3, and one whose healthcheck fails.
//!
//! The harness installs podman when it is missing; if podman cannot be
//! installed or started, this test fails.

use std::time::{Duration, Instant};

use outpost::collect::container::ContainerCollector;
use outpost::collect::{Sample, TargetStatus};
use outpost::config::{Target, TargetKind};
use outpost_tests::podman::{self, Containers, Service};

fn target(name: &str, container: &str) -> Target {
    Target {
        name: name.into(),
        kind: TargetKind::Container {
            container: container.into(),
        },
        probe: None,
    }
}

fn status<'a>(sample: &'a Sample, name: &str) -> &'a TargetStatus {
    sample
        .targets
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no status for {name}: {:?}", sample.targets))
}

#[tokio::test]
async fn podman_running_exited_unhealthy() {
    podman::ensure_installed().expect("podman must be installable");
    podman::busybox_image().expect("busybox image");
    let service = Service::start().expect("podman system service must start");

    let mut containers = Containers::new();
    let running = Containers::unique("outpost-run");
    let exited = Containers::unique("outpost-exit3");
    let sick = Containers::unique("outpost-sick");
    let healthy = Containers::unique("outpost-fine");
    containers
        .run(&running, &[], "sleep 600")
        .expect("run the running container");
    containers
        .run(&exited, &[], "exit 3")
        .expect("run the exiting container");
    let health = |cmd: &'static str| {
        [
            "--health-cmd",
            cmd,
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ]
    };
    containers
        .run(&sick, &health("false"), "sleep 600")
        .expect("run the unhealthy container");
    containers
        .run(&healthy, &health("true"), "sleep 600")
        .expect("run the healthy container");
    containers
        .wait_for(
            &exited,
            "{{.State.Status}}",
            "exited",
            Duration::from_secs(30),
        )
        .expect("container exits");
    // No systemd timers here: run the health checks by hand. A failing
    // check makes `podman healthcheck run` exit 1, which is the point.
    let out = podman::podman_output(&["healthcheck", "run", &sick]).expect("healthcheck run");
    assert!(!out.status.success(), "the failing healthcheck passed");
    podman::podman(&["healthcheck", "run", &healthy]).expect("passing healthcheck");
    containers
        .wait_for(
            &sick,
            "{{.State.Health.Status}}",
            "unhealthy",
            Duration::from_secs(30),
        )
        .expect("container turns unhealthy");

    let targets = vec![
        target("run", &running),
        target("exit", &exited),
        target("sick", &sick),
        target("fine", &healthy),
        target("gone", &Containers::unique("outpost-never-created")),
    ];
    let mut collector = ContainerCollector::new(&targets, Some(service.socket()));
    let started = Instant::now();
    // The collector gives the runtime 2 s per sample so a slow socket never
    // stalls sampling, and retries after RETRY_INTERVAL. With the whole
    // suite starting podman services at once the first handshake can miss
    // that budget: retry as the agent would, on the collector's own clock.
    let mut sample = Sample::new(0);
    let mut clock = Instant::now();
    for attempt in 0..5 {
        sample = Sample::new(0);
        collector.collect(clock, &mut sample).await;
        if collector.connected() {
            break;
        }
        eprintln!("attempt {attempt}: not connected yet: {:?}", sample.targets);
        clock += outpost::collect::container::RETRY_INTERVAL;
    }
    assert!(
        collector.connected(),
        "not connected: {:?}; service log: {}",
        sample.targets,
        service.log()
    );
    // Each attempt is bounded: five of them finish well within 15 s.
    assert!(started.elapsed() < Duration::from_secs(15));
    println!("{:#?}\n{:?}", sample.targets, sample.values);

    let run = status(&sample, "run");
    assert_eq!(run.kind, "container");
    assert_eq!(run.state, "running");
    assert!(run.up);
    assert!(run.detail.as_deref().unwrap_or("").starts_with("pid "));
    assert_eq!(sample.get("target.run.up"), Some(1.0));
    assert_eq!(sample.get("target.run.restarts"), Some(0.0));
    // Podman reports State.Health without a healthcheck: no signal.
    assert_eq!(sample.get("target.run.healthy"), None);

    let exit = status(&sample, "exit");
    assert_eq!(exit.state, "exited (code 3)");
    assert!(!exit.up);
    assert_eq!(sample.get("target.exit.up"), Some(0.0));
    assert_eq!(sample.get("target.exit.restarts"), Some(0.0));
    assert_eq!(sample.get("target.exit.healthy"), None);

    let sick_status = status(&sample, "sick");
    assert_eq!(sick_status.state, "running (unhealthy)");
    assert!(!sick_status.up);
    assert!(
        sick_status
            .detail
            .as_deref()
            .unwrap_or("")
            .contains("health check"),
        "{sick_status:?}"
    );
    assert_eq!(sample.get("target.sick.up"), Some(0.0));
    assert_eq!(sample.get("target.sick.healthy"), Some(0.0));

    let fine = status(&sample, "fine");
    assert_eq!(fine.state, "running (healthy)");
    assert!(fine.up);
    assert_eq!(sample.get("target.fine.up"), Some(1.0));
    assert_eq!(sample.get("target.fine.healthy"), Some(1.0));

    let gone = status(&sample, "gone");
    assert_eq!(gone.state, "not found");
    assert!(!gone.up);
    assert_eq!(sample.get("target.gone.up"), Some(0.0));

    // A container that stops is seen on the next sample.
    podman::podman(&["stop", "-t", "0", &running]).expect("stop");
    let mut sample = Sample::new(0);
    collector.collect(clock, &mut sample).await;
    let run = status(&sample, "run");
    assert!(run.state.starts_with("exited (code "), "{run:?}");
    assert!(!run.up);
    assert_eq!(sample.get("target.run.up"), Some(0.0));

    // The service goes away: the targets become "not available", quickly.
    drop(service);
    let started = Instant::now();
    let mut sample = Sample::new(0);
    collector.collect(clock, &mut sample).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!collector.connected());
    for t in &sample.targets {
        assert_eq!(t.state, "not available", "{t:?}");
        assert!(!t.up);
    }
    assert!(sample.values.is_empty(), "{:?}", sample.values);
}
