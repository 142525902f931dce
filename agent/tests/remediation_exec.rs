//! Remediation end to end with the exec actuator (real child processes): a
//! rule acts, verifies, escalates when its budget is spent, and a restarted
//! agent does not act again; approve mode waits for `outpost approve`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::Daemon;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

fn spawn(cfg: &Path) -> Daemon {
    Daemon(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(cfg)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn outpost"),
    )
}

fn stop(mut child: Daemon) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    panic!("outpost did not stop");
}

fn actions(state: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["actions", "--json", "--limit", "1000", "--state-dir"])
        .arg(state)
        .output()
        .expect("actions");
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn count(rows: &[serde_json::Value], decision: &str) -> usize {
    rows.iter().filter(|r| r["decision"] == decision).count()
}

fn wait_for(
    state: &Path,
    what: &str,
    f: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = actions(state);
        if f(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {rows:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn config(dir: &Path, mode: &str, closed_port: u16) -> (PathBuf, PathBuf, PathBuf) {
    let state = dir.join("state");
    let marks = dir.join("marks");
    let cfg = dir.join("outpost.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[agent]
node_id = "t"
state_dir = "{state}"
sample_interval_ms = 100

[[target]]
name = "svc"
kind = "host"
probe = {{ tcp = "127.0.0.1:{closed_port}", interval_ms = 100, timeout_ms = 100 }}

[[command]]
name = "mark"
argv = ["/bin/sh", "-c", "echo acted >> {marks}"]
timeout = "5s"

[[rule]]
name = "svc-down"
target = "svc"
when = "probe_failed"
for = "2 samples"
do = "exec:mark"
mode = "{mode}"
cooldown = "300ms"
max_per_hour = 2
verify = "probe_ok within 500ms"
escalate = "notify"

[guard]
approval_timeout = "2s"
"#,
            state = state.display(),
            marks = marks.display(),
        ),
    )
    .expect("write config");
    (cfg, state, marks)
}

fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn marks(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn budget_escalation_and_restart_hold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, state, marks_file) = config(dir.path(), "auto", closed_port());
    let child = spawn(&cfg);
    let rows = wait_for(&state, "an escalation", |rows| {
        count(rows, "escalated") == 1
    });
    std::thread::sleep(Duration::from_millis(800));
    stop(child);
    let rows_after = actions(&state);
    assert_eq!(count(&rows, "acted"), 2, "{rows:#?}");
    assert_eq!(
        count(&rows_after, "acted"),
        2,
        "acted past the budget: {rows_after:#?}"
    );
    assert_eq!(count(&rows_after, "verify_failed"), 2);
    assert_eq!(count(&rows_after, "escalated"), 1);
    assert_eq!(marks(&marks_file), 2, "the command ran exactly twice");
    let acted = rows
        .iter()
        .find(|r| r["decision"] == "acted")
        .expect("acted row");
    assert_eq!(acted["detail"]["ok"], true, "{acted}");

    // A restarted agent must not get a fresh budget.
    let child = spawn(&cfg);
    std::thread::sleep(Duration::from_secs(2));
    stop(child);
    let rows = actions(&state);
    assert_eq!(
        count(&rows, "acted"),
        2,
        "acted again after a restart: {rows:#?}"
    );
    assert_eq!(marks(&marks_file), 2);
    let last = rows.last().expect("rows");
    assert_eq!(last["decision"], "suppressed", "{last}");

    let out = Command::new(BIN)
        .args(["actions", "--verify-chain", "--state-dir"])
        .arg(&state)
        .output()
        .expect("verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let out = Command::new(BIN)
        .args(["incidents", "--json", "--state-dir"])
        .arg(&state)
        .output()
        .expect("incidents");
    let incidents: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(!incidents.as_array().expect("array").is_empty());
    assert_eq!(incidents[0]["target"], "svc");
}

#[test]
fn approve_mode_waits_for_the_operator_and_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, state, marks_file) = config(dir.path(), "approve", closed_port());
    let child = spawn(&cfg);
    let rows = wait_for(&state, "an approval request", |rows| {
        count(rows, "awaiting_approval") >= 1
    });
    assert_eq!(marks(&marks_file), 0, "acted without approval");
    let id = rows
        .iter()
        .find(|r| r["decision"] == "awaiting_approval")
        .and_then(|r| r["decision_id"].as_u64())
        .expect("decision id");

    // An unknown id is refused; the real one is approved.
    let out = Command::new(BIN)
        .args(["approve", "999999", "--config"])
        .arg(&cfg)
        .output()
        .expect("approve");
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["approve", &id.to_string(), "--config"])
        .arg(&cfg)
        .output()
        .expect("approve");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = wait_for(&state, "the approved action", |rows| {
        count(rows, "acted") == 1
    });
    assert_eq!(count(&rows, "approved"), 1);
    assert_eq!(marks(&marks_file), 1);

    // The next request is left alone: it expires and nothing runs.
    let rows = wait_for(&state, "an expired request", |rows| {
        count(rows, "expired") >= 1
    });
    stop(child);
    assert_eq!(count(&rows, "acted"), 1, "{rows:#?}");
    assert_eq!(marks(&marks_file), 1);
}

#[test]
fn pause_stops_every_action_until_resume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, state, marks_file) = config(dir.path(), "auto", closed_port());
    let out = Command::new(BIN)
        .args(["pause", "--reason", "maintenance window", "--config"])
        .arg(&cfg)
        .output()
        .expect("pause");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(state.join("pause").exists());

    let child = spawn(&cfg);
    let rows = wait_for(&state, "a paused suppression", |rows| {
        rows.iter().any(|r| {
            r["decision"] == "suppressed"
                && r["reason"].as_str().is_some_and(|s| s.contains("pause"))
        })
    });
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        count(&actions(&state), "acted"),
        0,
        "acted while paused: {rows:#?}"
    );
    assert_eq!(marks(&marks_file), 0);

    let out = Command::new(BIN)
        .args(["resume", "--config"])
        .arg(&cfg)
        .output()
        .expect("resume");
    assert!(out.status.success());
    wait_for(&state, "an action after resume", |rows| {
        count(rows, "acted") >= 1
    });
    stop(child);
    assert!(marks(&marks_file) >= 1);
}
