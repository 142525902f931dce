//! Remediation of containers against a real podman API service: the real
//! outpost binary runs on the host as a child process, pointed at podman's
//! socket with `[collect] container_socket`, and restarts a container that
//! exited and one whose healthcheck fails. `podman inspect` is the judge:
//! the container runs again (a new pid, a new start time) and is healthy;
//! the audit shows `acted` then `verify_ok` for each rule.
//!
//! The harness installs podman when it is missing; if podman cannot be
//! installed or started, this test fails. Build the binary first:
//! `cargo build -p outpost --bin outpost`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_tests::nspawn::outpost_binary;
use outpost_tests::podman::{self, Containers, Service};
use outpost_tests::remediation::{format_rows, AuditRow, HostDaemon};

/// Runs `podman healthcheck run` for each container every second: this host
/// has no systemd timers to do it. Stops (and joins) on drop.
struct HealthChecks {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthChecks {
    fn start(names: Vec<String>) -> HealthChecks {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                for n in &names {
                    // A failing check exits 1; a stopped container errors.
                    let _ = podman::podman_output(&["healthcheck", "run", n]);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        HealthChecks {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn inspect(name: &str, field: &str) -> String {
    podman::podman(&["inspect", "--format", field, name]).expect("podman inspect")
}

/// (pid, started at)
fn run_id(name: &str) -> (String, String) {
    (
        inspect(name, "{{.State.Pid}}"),
        inspect(name, "{{.State.StartedAt}}"),
    )
}

fn position(rows: &[AuditRow], from: usize, rule: &str, decision: &str) -> Option<usize> {
    rows.iter()
        .enumerate()
        .skip(from)
        .find(|(_, r)| r.is(rule, decision))
        .map(|(i, _)| i)
}

/// Waits for `acted` then `verify_ok` (same decision) for `rule`.
fn wait_acted_verified(d: &HostDaemon, rule: &str, within: Duration) -> Vec<AuditRow> {
    let got = d.wait_audit(&format!("{rule}: acted, then verify_ok"), within, |rows| {
        let a = position(rows, 0, rule, "acted")?;
        let id = rows[a].decision_id;
        rows[a + 1..]
            .iter()
            .find(|r| r.is(rule, "verify_ok") && r.decision_id == id)?;
        Some(rows.to_vec())
    });
    match got {
        Ok(rows) => rows,
        Err(e) => panic!("{e:#}\n{}", d.diagnostics()),
    }
}

#[test]
fn exited_and_unhealthy_containers_are_restarted_and_verified() {
    podman::ensure_installed().expect("podman must be installable");
    podman::busybox_image().expect("busybox image");
    let bin = outpost_binary().expect("outpost binary (cargo build -p outpost --bin outpost)");
    let service = Service::start().expect("podman system service must start");

    let mut containers = Containers::new();
    let exited = Containers::unique("outpost-rem-exit");
    let sick = Containers::unique("outpost-rem-sick");
    // PID 1 is a shell: without a TERM trap it would ignore SIGTERM and
    // every stop would wait for the runtime's SIGKILL.
    containers
        .run(&exited, &[], "trap 'exit 0' TERM; sleep 600 & wait")
        .expect("run the container that will die");
    // Healthy unless /tmp/sick exists; a (re)start clears it.
    containers
        .run(
            &sick,
            &[
                "--health-cmd",
                "test ! -f /tmp/sick",
                "--health-interval",
                "1s",
                "--health-retries",
                "1",
            ],
            "trap 'exit 0' TERM; /bin/busybox rm -f /tmp/sick; sleep 600 & wait",
        )
        .expect("run the container that will turn unhealthy");
    let _checks = HealthChecks::start(vec![sick.clone()]);
    containers
        .wait_for(
            &sick,
            "{{.State.Health.Status}}",
            "healthy",
            Duration::from_secs(30),
        )
        .expect("healthy at first");

    let config = format!(
        r#"
[agent]
node_id = "n1"
state_dir = "{{STATE_DIR}}"
sample_interval_ms = 500

[collect]
container_socket = "{socket}"

[[target]]
name = "dies"
kind = "container"
container = "{exited}"

[[target]]
name = "sick"
kind = "container"
container = "{sick}"

[[rule]]
name = "dies-restart"
target = "dies"
when = "container_exited"
for = "2 samples"
do = "restart"
mode = "auto"
cooldown = "5s"
max_per_hour = 3
verify = "container_running within 15s"
escalate = "notify"

[[rule]]
name = "sick-restart"
target = "sick"
when = "container_unhealthy"
for = "2 samples"
do = "restart"
mode = "auto"
cooldown = "5s"
max_per_hour = 3
verify = "condition_clear within 20s"
escalate = "notify"

[guard]
max_actions_per_hour = 10
"#,
        socket = service.socket().display(),
    );
    let mut d = HostDaemon::start(&bin, &config).expect("outpost run on the host");

    // Healthy containers are left alone.
    std::thread::sleep(Duration::from_secs(2));
    let rows = d.actions().expect("audit");
    assert!(
        rows.is_empty(),
        "decisions about healthy containers:\n{}",
        format_rows(&rows)
    );

    // 1. A container dies.
    let before = run_id(&exited);
    podman::podman(&["kill", &exited]).expect("podman kill");
    containers
        .wait_for(
            &exited,
            "{{.State.Status}}",
            "exited",
            Duration::from_secs(10),
        )
        .expect("container exits");
    let t0 = Instant::now();
    let rows = wait_acted_verified(&d, "dies-restart", Duration::from_secs(40));
    eprintln!(
        "exited -> verify_ok in {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        format_rows(&rows)
    );
    assert_eq!(inspect(&exited, "{{.State.Status}}"), "running");
    let after = run_id(&exited);
    assert_ne!(before, after, "same pid and start time: not restarted");
    let acted = &rows[position(&rows, 0, "dies-restart", "acted").expect("acted")];
    assert_eq!(acted.action, "restart", "{acted:?}");
    assert_eq!(acted.target, "dies", "{acted:?}");

    // 2. A container turns unhealthy.
    let before = run_id(&sick);
    podman::podman(&["exec", &sick, "sh", "-c", "echo > /tmp/sick"]).expect("make it sick");
    containers
        .wait_for(
            &sick,
            "{{.State.Health.Status}}",
            "unhealthy",
            Duration::from_secs(20),
        )
        .expect("container turns unhealthy");
    let t0 = Instant::now();
    let rows = wait_acted_verified(&d, "sick-restart", Duration::from_secs(60));
    eprintln!(
        "unhealthy -> verify_ok in {:.1} s\n{}",
        t0.elapsed().as_secs_f64(),
        format_rows(&rows)
    );
    assert_eq!(inspect(&sick, "{{.State.Status}}"), "running");
    assert_eq!(inspect(&sick, "{{.State.Health.Status}}"), "healthy");
    assert_ne!(before, run_id(&sick), "same pid and start time");

    // Settled: one action each, nothing failed or escalated.
    std::thread::sleep(Duration::from_secs(3));
    let rows = d.actions().expect("audit");
    for rule in ["dies-restart", "sick-restart"] {
        let n = rows.iter().filter(|r| r.is(rule, "acted")).count();
        assert_eq!(n, 1, "{rule} acted {n} times:\n{}", format_rows(&rows));
        for bad in ["action_failed", "verify_failed", "escalated"] {
            assert!(
                !rows.iter().any(|r| r.is(rule, bad)),
                "{rule} {bad}:\n{}",
                format_rows(&rows)
            );
        }
    }
    assert_eq!(inspect(&exited, "{{.State.Status}}"), "running");
    assert_eq!(inspect(&sick, "{{.State.Health.Status}}"), "healthy");

    d.assert_running().expect("outpost still running");
    let chain = d
        .cli(&["actions", "--verify-chain"])
        .expect("outpost actions --verify-chain");
    eprintln!("{}", chain.trim());
    d.stop().expect("clean stop");
    drop(containers);
}
