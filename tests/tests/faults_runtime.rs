//! Faults at run time, injected into real parts while the real `outpost`
//! binary watches them: a systemd unit deleted and restored, the system bus
//! daemon restarted (systemd booted in nspawn, `outpost_tests::nspawn`), the
//! podman API service stopped and started again on the same socket, a
//! container removed and re-created (`outpost_tests::podman`), and
//! processes, network interfaces and /proc files vanishing while the host
//! collector samples ten times a second.
//!
//! Each fault must be survived the same way: the agent keeps running (and
//! exits 0 on SIGTERM at the end), the affected target reports what is true
//! (`not found`, `not available`), one line is logged when the fault starts
//! and one when it ends, never one per sample (counted in the agent's
//! `--log-format json` stderr), and collection (and acting, for the
//! actuators) resumes on its own.
//!
//! Needs root; fails, never skips, when nspawn, podman or iproute2 cannot be
//! had. Build the binary first: `cargo build -p outpost --bin outpost`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_tests::agent::{check_config, outpost};
use outpost_tests::nspawn::Systemd;
use outpost_tests::podman::{self, Containers};
use outpost_tests::remediation::{format_rows, parse_actions, AuditRow};
use serde_json::Value;

/// How long any one awaited change may take (generous: the machine is busy).
const WAIT: Duration = Duration::from_secs(45);

/// The real agent, `outpost --log-format json run --config FILE`, as a
/// child process with its config, state and stderr in a temporary
/// directory. Killed on drop; [`Agent::stop`] stops it with SIGTERM and
/// checks that it exited 0.
struct Agent {
    child: Option<Child>,
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Agent {
    /// Writes `config` (`{STATE_DIR}` stands for a fresh state directory),
    /// checks it, and starts the agent as `wrap… outpost …` with `env`,
    /// then waits until its control socket answers.
    fn start(config: &str, wrap: &[&str], env: &[(&str, String)]) -> Agent {
        let bin = outpost();
        let dir = tempfile::Builder::new()
            .prefix("outpost-faults-")
            .tempdir()
            .expect("tempdir");
        let state = dir.path().join("state");
        let config_path = dir.path().join("outpost.toml");
        let text = config.replace("{STATE_DIR}", &state.to_string_lossy());
        fs::write(&config_path, &text).expect("write config");
        check_config(&config_path);
        let log = dir.path().join("agent.log");
        let file = fs::File::create(&log).expect("log file");
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args([
            "--log-format",
            "json",
            "--log-level",
            "info",
            "run",
            "--config",
        ])
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
        .env_remove("DOCKER_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start outpost run");
        let mut agent = Agent {
            child: Some(child),
            bin,
            config: config_path,
            log,
            dir,
        };
        agent.wait("the agent's control socket", WAIT, |doc| {
            (doc["running"] == true && doc["live"]["samples"].as_u64() > Some(0)).then_some(())
        });
        agent
    }

    /// The agent's pid (after `unshare`'s exec, the agent itself).
    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("agent running")
    }

    /// `outpost status --json`, parsed; `Null` when it cannot be had.
    fn status(&self) -> Value {
        let out = Command::new(&self.bin)
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .expect("outpost status");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Polls the live status until `check` accepts it. Fails at once if the
    /// agent exits, and with the last status and the log on timeout.
    fn wait<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut check: impl FnMut(&Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            self.assert_running();
            let doc = self.status();
            if let Some(v) = check(&doc) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {within:?} waiting for {what}\n--- last status ---\n{}\n{}",
                    serde_json::to_string_pretty(&doc["live"]).unwrap_or_default(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until target `name` is in `state`.
    fn wait_state(&mut self, name: &str, state: &str) -> Value {
        self.wait(&format!("target {name} in state {state:?}"), WAIT, |doc| {
            let t = target(doc, name)?;
            (t["state"] == state).then(|| t.clone())
        })
    }

    /// Waits until at least `n` more samples were taken.
    fn wait_samples(&mut self, n: u64) {
        let start = samples(&self.status());
        self.wait(&format!("{n} more samples"), WAIT, |doc| {
            (samples(doc) >= start + n).then_some(())
        });
    }

    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait().expect("wait for outpost") {
                panic!("outpost exited ({status}):\n{}", self.log_tail());
            }
        }
    }

    /// SIGTERM, then a clean exit 0 within 15 s.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("agent running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait for outpost") {
                assert!(
                    status.success(),
                    "outpost exited with {status} on SIGTERM\n{}",
                    self.log_tail()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("outpost ignored SIGTERM for 15 s\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every stderr line, parsed. A line that is not JSON (a panic, a
    /// backtrace) fails the test: with `--log-format json` every line the
    /// agent writes is one JSON object.
    fn logs(&self) -> Vec<Value> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|_| {
                    panic!("a stderr line that is not JSON: {l}\n{}", self.log_tail())
                })
            })
            .collect()
    }

    /// Log lines whose message contains `message` and whose fields include
    /// every `(key, value)` of `fields` (compared as strings).
    fn count(&self, message: &str, fields: &[(&str, &str)]) -> usize {
        self.logs()
            .iter()
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(message))
                    && fields.iter().all(|(k, v)| field(l, k) == *v)
            })
            .count()
    }

    /// Log lines at `level` (`WARN`, `ERROR`), as text.
    fn at_level(&self, level: &str) -> Vec<String> {
        self.logs()
            .iter()
            .filter(|l| l["level"] == level)
            .map(Value::to_string)
            .collect()
    }

    /// The audit trail, oldest first.
    fn actions(&self) -> Vec<AuditRow> {
        let out = Command::new(&self.bin)
            .args(["actions", "--json", "--limit", "100000", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .expect("outpost actions");
        assert!(
            out.status.success(),
            "outpost actions failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_actions(&String::from_utf8_lossy(&out.stdout)).expect("parse actions")
    }

    /// Waits until `rule` has `n` decisions that were acted on and then
    /// verified.
    fn wait_remediated(&mut self, rule: &str, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.assert_running();
            let rows = self.actions();
            let verified = rows
                .iter()
                .filter(|a| a.is(rule, "acted"))
                .filter(|a| {
                    rows.iter()
                        .any(|v| v.is(rule, "verify_ok") && v.decision_id == a.decision_id)
                })
                .count();
            if verified >= n {
                let bad: Vec<&AuditRow> = rows
                    .iter()
                    .filter(|r| {
                        ["action_failed", "verify_failed", "escalated"]
                            .iter()
                            .any(|d| r.is(rule, d))
                    })
                    .collect();
                assert!(bad.is_empty(), "{bad:#?}\n{}", format_rows(&rows));
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {rule} to be acted on and verified {n} times\n{}{}",
                    format_rows(&rows),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last 80 lines of the agent's stderr.
    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- outpost log ({}) ---\n{}",
            self.dir.path().display(),
            lines[lines.len().saturating_sub(80)..].join("\n")
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A log line's field as a string (`fields.KEY`, or the top-level `target`
/// and `level`).
fn field(line: &Value, key: &str) -> String {
    let v = match key {
        "target" | "level" => &line[key],
        _ => &line["fields"][key],
    };
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn target<'a>(doc: &'a Value, name: &str) -> Option<&'a Value> {
    doc["live"]["targets"]
        .as_array()?
        .iter()
        .find(|t| t["name"] == name)
}

fn samples(doc: &Value) -> u64 {
    doc["live"]["samples"].as_u64().unwrap_or(0)
}

fn signals(doc: &Value) -> u64 {
    doc["live"]["signals"].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------
// systemd: a unit deleted and restored, the bus daemon restarted.

const SLEEPER: &str = "\
[Unit]
Description=outpost fault test: a service that stays up

[Service]
ExecStart=/bin/sleep infinity
Restart=no
";

/// `ActiveState/SubState` as systemctl inside sees it.
fn unit_state(sd: &Systemd, unit: &str) -> String {
    let p = sd
        .unit_properties(unit, &["ActiveState", "SubState"])
        .expect("systemctl show");
    format!("{}/{}", p[0], p[1])
}

fn main_pid(sd: &Systemd, unit: &str) -> String {
    sd.unit_properties(unit, &["MainPID"])
        .expect("systemctl show")
        .remove(0)
}

#[test]
fn systemd_unit_deleted_and_bus_restarted() {
    let sd = Systemd::boot().expect("boot systemd in nspawn");
    sd.install_unit("fault-web.service", SLEEPER)
        .expect("install fault-web");
    sd.install_unit("fault-kept.service", SLEEPER)
        .expect("install fault-kept");
    sd.sh("systemctl start fault-web.service fault-kept.service")
        .expect("start the units");

    // The agent runs on the host and reaches the container's systemd over
    // its system bus, for the collector and the actuator alike.
    let config = r#"
[agent]
node_id = "faults-systemd"
state_dir = "{STATE_DIR}"
sample_interval_ms = 250

[[target]]
name = "web"
kind = "systemd"
unit = "fault-web.service"

[[target]]
name = "kept"
kind = "systemd"
unit = "fault-kept.service"

[[rule]]
name = "kept-restart"
target = "kept"
when = "unit_failed"
for = "2 samples"
do = "restart"
mode = "auto"
cooldown = "1s"
max_per_hour = 10
verify = "unit_active within 10s"
escalate = "notify"

[guard]
max_actions_per_hour = 20
"#;
    let mut agent = Agent::start(
        config,
        &[],
        &[("DBUS_SYSTEM_BUS_ADDRESS", sd.system_bus_address())],
    );
    agent.wait_state("web", "active/running");
    agent.wait_state("kept", "active/running");

    // The actuator works before any fault (and keeps its bus connection).
    sd.sh("systemctl kill --signal=KILL fault-kept.service")
        .expect("kill fault-kept");
    agent.wait_remediated("kept-restart", 1);
    assert_eq!(unit_state(&sd, "fault-kept.service"), "active/running");

    // 1. The unit file is deleted while the unit runs, systemd reloads, and
    //    the unit is stopped: it no longer exists.
    sd.sh(
        "rm /etc/systemd/system/fault-web.service && systemctl daemon-reload && \
         systemctl stop fault-web.service",
    )
    .expect("delete fault-web");
    let t = agent.wait_state("web", "not found");
    assert_eq!(t["up"], false, "{t}");
    agent.wait_samples(20);
    let doc = agent.status();
    assert_eq!(
        target(&doc, "web").map(|t| t["state"].clone()),
        Some("not found".into())
    );
    assert_eq!(
        target(&doc, "kept").map(|t| t["state"].clone()),
        Some("active/running".into()),
        "the other unit's state went with the deleted one"
    );
    let not_found = |agent: &Agent| {
        agent.count(
            "systemd unit not found",
            &[("unit", "fault-web.service"), ("level", "WARN")],
        )
    };
    assert_eq!(not_found(&agent), 1, "{}", agent.log_tail());

    //    Restored: picked up again, read afresh.
    sd.install_unit("fault-web.service", SLEEPER)
        .expect("restore fault-web");
    sd.sh("systemctl start fault-web.service")
        .expect("start fault-web");
    let t = agent.wait_state("web", "active/running");
    assert_eq!(t["up"], true, "{t}");
    assert_eq!(
        t["detail"],
        format!("main pid {}", main_pid(&sd, "fault-web.service")),
        "{t}"
    );
    agent.wait_samples(8);
    assert_eq!(
        agent.count("systemd unit found again", &[("unit", "fault-web.service")]),
        1,
        "{}",
        agent.log_tail()
    );
    assert_eq!(not_found(&agent), 1, "{}", agent.log_tail());

    // 2. The system bus daemon restarts. systemd (PID 1) reconnects by
    //    itself; the agent must too.
    let bus_pid = main_pid(&sd, "dbus.service");
    sd.sh("systemctl restart dbus.service")
        .expect("restart dbus");
    let new_bus_pid = main_pid(&sd, "dbus.service");
    assert_ne!(bus_pid, new_bus_pid, "dbus-daemon was not restarted");
    assert_eq!(unit_state(&sd, "dbus.service"), "active/running");
    // Collection resumes on the new bus: a change made after the restart
    // shows, so these are fresh readings, not ones cached from before.
    sd.sh("systemctl stop fault-web.service")
        .expect("stop fault-web");
    agent.wait_state("web", "inactive/dead");
    sd.sh("systemctl start fault-web.service")
        .expect("start fault-web");
    let t = agent.wait_state("web", "active/running");
    assert_eq!(
        t["detail"],
        format!("main pid {}", main_pid(&sd, "fault-web.service")),
        "{t}"
    );
    // And the actuator acts over the new bus.
    sd.sh("systemctl kill --signal=KILL fault-kept.service")
        .expect("kill fault-kept again");
    agent.wait_remediated("kept-restart", 2);
    assert_eq!(unit_state(&sd, "fault-kept.service"), "active/running");
    agent.wait_samples(8);

    // Logged once when the bus went, once when it came back.
    let lost = agent.count("lost systemd", &[("level", "WARN")]);
    let back = agent.count("systemd available again", &[("level", "INFO")]);
    assert_eq!((lost, back), (1, 1), "{}", agent.log_tail());
    let warns = agent.at_level("WARN");
    assert_eq!(
        warns.len(),
        2,
        "one warning for the deleted unit, one for the bus:\n{warns:#?}"
    );
    let errors = agent.at_level("ERROR");
    assert!(errors.is_empty(), "{errors:#?}");
    let rows = agent.actions();
    assert_eq!(
        rows.iter()
            .filter(|r| r.is("kept-restart", "acted"))
            .count(),
        2,
        "{}",
        format_rows(&rows)
    );
    agent.stop();
}

// ---------------------------------------------------------------------------
// Containers: the API service stopped and started again, a container
// removed and re-created.

/// `podman system service` on a socket that stays the same across
/// [`ApiService::down`] and [`ApiService::up`], as the podman.socket unit's
/// would. Killed on drop.
struct ApiService {
    socket: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ApiService {
    fn start() -> ApiService {
        let dir = tempfile::Builder::new()
            .prefix("outpost-faults-podman-")
            .tempdir()
            .expect("tempdir");
        let mut s = ApiService {
            socket: dir.path().join("podman.sock"),
            dir,
            child: None,
        };
        s.up();
        s
    }

    fn up(&mut self) {
        assert!(self.child.is_none(), "already up");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("service.log"))
            .expect("service log");
        let child = Command::new("podman")
            .args(["--runtime", "runc", "system", "service", "--time=0"])
            .arg(format!("unix://{}", self.socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start podman system service");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while !podman::ping(&self.socket) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("podman system service exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "podman system service did not answer: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, and wait until it is gone.
    fn down(&mut self) {
        let mut child = self.child.take().expect("service up");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!podman::ping(&self.socket), "the API still answers");
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("service.log")).unwrap_or_default()
    }
}

impl Drop for ApiService {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// PID 1 is a shell: without a TERM trap it would ignore SIGTERM.
const BOX_SCRIPT: &str = "trap 'exit 0' TERM; sleep 600 & wait";

#[test]
fn container_socket_goes_away_and_comes_back() {
    podman::ensure_installed().expect("podman must be installable");
    podman::busybox_image().expect("busybox image");
    let mut api = ApiService::start();
    let mut containers = Containers::new();
    let name = Containers::unique("outpost-fault-box");
    containers
        .run(&name, &[], BOX_SCRIPT)
        .expect("run the container");

    let config = format!(
        r#"
[agent]
node_id = "faults-containers"
state_dir = "{{STATE_DIR}}"
sample_interval_ms = 250

[collect]
container_socket = "{socket}"

[[target]]
name = "box"
kind = "container"
container = "{name}"

[[rule]]
name = "box-restart"
target = "box"
when = "container_exited"
for = "2 samples"
do = "restart"
mode = "auto"
cooldown = "1s"
max_per_hour = 10
verify = "container_running within 15s"
escalate = "notify"

[guard]
max_actions_per_hour = 20
"#,
        socket = api.socket.display(),
    );
    let mut agent = Agent::start(&config, &[], &[]);
    agent.wait_state("box", "running");

    // The actuator works before any fault (and keeps its client).
    podman::podman(&["kill", &name]).expect("podman kill");
    agent.wait_remediated("box-restart", 1);

    // 1. The API service goes away.
    api.down();
    let t = agent.wait_state("box", "not available");
    assert_eq!(t["up"], false, "{t}");
    assert!(
        t["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "says why: {t}"
    );
    // Down for a while: many samples, several reconnection attempts.
    agent.wait_samples(24);
    assert_eq!(
        agent.count("container runtime stopped answering", &[("level", "WARN")]),
        1,
        "{}",
        agent.log_tail()
    );
    let doc = agent.status();
    assert_eq!(
        target(&doc, "box").map(|t| t["state"].clone()),
        Some("not available".into())
    );

    //    And comes back on the same socket: state resumes.
    api.up();
    let t = agent.wait_state("box", "running");
    assert_eq!(t["up"], true, "{t}");
    agent.wait_samples(8);
    assert_eq!(
        agent.count("container runtime available again", &[("level", "INFO")]),
        1,
        "{}",
        agent.log_tail()
    );
    // The actuator reaches the restarted service too.
    podman::podman(&["kill", &name]).expect("podman kill again");
    agent.wait_remediated("box-restart", 2);
    agent.wait_state("box", "running");

    // 2. The container is removed, then created again under its name.
    podman::podman(&["rm", "-f", "-t", "0", &name]).expect("podman rm");
    agent.wait_state("box", "not found");
    agent.wait_samples(20);
    let gone = |agent: &Agent| agent.count("container not found", &[("container", &name)]);
    assert_eq!(gone(&agent), 1, "{}", agent.log_tail());
    containers
        .run(&name, &[], BOX_SCRIPT)
        .expect("run the container again");
    agent.wait_state("box", "running");
    agent.wait_samples(8);
    assert_eq!(
        agent.count("container found again", &[("container", &name)]),
        1,
        "{}",
        agent.log_tail()
    );
    assert_eq!(gone(&agent), 1, "{}", agent.log_tail());

    // Nothing else complained: one warning for the socket, one for the
    // removed container; never an error.
    let warns = agent.at_level("WARN");
    assert_eq!(warns.len(), 2, "{warns:#?}");
    let errors = agent.at_level("ERROR");
    assert!(errors.is_empty(), "{errors:#?}");
    agent.stop();
    drop(containers);
}

// ---------------------------------------------------------------------------
// The host: processes and network interfaces that vanish between listing
// and reading, and /proc files that go away under a configured proc root.

/// A command run to its end in the background; [`Churn::finish`] waits
/// for it and fails the test unless it succeeded.
struct Churn {
    what: &'static str,
    child: Child,
}

impl Churn {
    fn start(what: &'static str, argv: &[&str]) -> Churn {
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {what} churn: {e}"));
        Churn { what, child }
    }

    fn done(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn finish(self) {
        let out = self.child.wait_with_output().expect("churn");
        assert!(
            out.status.success(),
            "the {} churn failed ({}): {}",
            self.what,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A copy of `/bin/sleep` named `name` in `dir`, so its processes have
/// that command name.
fn named_sleep(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    fs::copy("/bin/sleep", &path).expect("copy /bin/sleep");
    path
}

#[test]
fn processes_and_interfaces_vanishing_mid_sample() {
    if !outpost_tests::apt::have("ip", "-V") || !outpost_tests::apt::have("nsenter", "--version") {
        outpost_tests::apt::install(&["iproute2", "util-linux"]).expect("install iproute2");
    }
    let tools = tempfile::tempdir().expect("tempdir");
    let churn_bin = named_sleep(tools.path(), "fault-churn");
    let steady_bin = named_sleep(tools.path(), "fault-steady");
    let mut steady = Command::new(&steady_bin)
        .arg("600")
        .spawn()
        .expect("start fault-steady");

    // Ten samples a second, and a short feature window so the series of
    // vanished interfaces age out within the test.
    let config = r#"
[agent]
node_id = "faults-host"
state_dir = "{STATE_DIR}"
sample_interval_ms = 100

[features]
window = "3s"
step = "1s"

[[target]]
name = "host"
kind = "host"

[[target]]
name = "churn"
kind = "process"
process = "fault-churn"

[[target]]
name = "steady"
kind = "process"
process = "fault-steady"
"#;
    // In a network namespace of its own, so interfaces can come and go
    // without touching the host's.
    let mut agent = Agent::start(config, &["unshare", "--net", "--"], &[]);
    let pid = agent.pid().to_string();
    agent.wait_state("steady", "1 process");
    agent.wait_state("churn", "not found");
    // Settled: rates need two readings, and the window must have filled.
    agent.wait_samples(40);
    let baseline = signals(&agent.status());
    let log_lines_before = agent.logs().len();

    // Interfaces (veth pairs, not skipped as container ends: `flt…`) that
    // live for a few samples each, and processes living 50 to 300 ms.
    let nets = Churn::start(
        "interface",
        &[
            "nsenter",
            "-t",
            &pid,
            "-n",
            "sh",
            "-ec",
            "i=0; while [ $i -lt 30 ]; do \
               ip link add flt${i}a type veth peer name flt${i}b; \
               ip link set flt${i}a up; ip link set flt${i}b up; \
               sleep 0.4; ip link del flt${i}a; sleep 0.05; i=$((i+1)); \
             done",
        ],
    );
    let script = format!(
        "i=0; while [ $i -lt 120 ]; do \
           '{b}' 0.3 & '{b}' 0.05 & '{b}' 0.12 & sleep 0.1; i=$((i+1)); \
         done; wait",
        b = churn_bin.display()
    );
    let mut procs = Churn::start("process", &["sh", "-ec", &script]);

    let mut nets = Some(nets);
    let mut peak_signals = baseline;
    let mut churn_seen = 0;
    let mut last_samples = samples(&agent.status());
    let mut polls = 0;
    while !(procs.done() && nets.as_mut().is_none_or(Churn::done)) {
        std::thread::sleep(Duration::from_secs(1));
        agent.assert_running();
        let doc = agent.status();
        polls += 1;
        let n = samples(&doc);
        assert!(
            n > last_samples,
            "no new sample in a second ({n})\n{}",
            agent.log_tail()
        );
        last_samples = n;
        peak_signals = peak_signals.max(signals(&doc));
        let state = |name: &str| target(&doc, name).map(|t| t["state"].clone());
        assert_eq!(state("steady"), Some("1 process".into()), "{doc}");
        assert_eq!(state("host"), Some("up".into()), "{doc}");
        if state("churn").is_some_and(|s| s != "not found") {
            churn_seen += 1;
        }
        assert!(polls < 120, "the churn never finished");
    }
    procs.finish();
    nets.take().expect("nets").finish();
    eprintln!(
        "churn: {polls} polls, churn target up in {churn_seen}, signals {baseline} -> peak \
         {peak_signals}"
    );
    // The churn really reached the collectors: the short-lived processes
    // were counted, the interfaces' rates were signals.
    assert!(churn_seen > 0, "the churned processes were never seen");
    assert!(
        peak_signals >= baseline + 12,
        "no interface signals during the churn: {baseline} -> {peak_signals}"
    );

    // Afterwards the vanished interfaces' series are gone again, and the
    // churned processes' state with them.
    agent.wait_state("churn", "not found");
    agent.wait("the signal count back to where it was", WAIT, |doc| {
        (signals(doc) == baseline).then_some(())
    });

    // No warnings, no errors, and nothing from the collectors: processes
    // and interfaces that vanish are the normal life of a host.
    let after: Vec<Value> = agent.logs().split_off(log_lines_before);
    let noisy: Vec<&Value> = after
        .iter()
        .filter(|l| {
            l["level"] == "WARN"
                || l["level"] == "ERROR"
                || field(l, "target").starts_with("outpost::collect")
        })
        .collect();
    assert!(noisy.is_empty(), "{noisy:#?}");
    eprintln!(
        "{} log lines during the churn: {:?}",
        after.len(),
        after
            .iter()
            .map(|l| field(l, "message"))
            .collect::<std::collections::BTreeSet<_>>()
    );
    // Whatever else was logged is bounded by the churn, not by the samples
    // taken (a few hundred of them).
    assert!(
        after.len() <= 2 * 30,
        "{} log lines during the churn:\n{after:#?}",
        after.len()
    );
    agent.stop();
    let _ = steady.kill();
    let _ = steady.wait();
}

/// Copies this host's /proc files the host collector reads into `root`.
fn copy_proc(root: &Path) {
    for rel in [
        "stat",
        "loadavg",
        "meminfo",
        "diskstats",
        "net/dev",
        "mounts",
    ] {
        let to = root.join(rel);
        fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        let text = fs::read(Path::new("/proc").join(rel)).expect("read /proc");
        fs::write(&to, text).expect("write fixture");
    }
}

#[test]
fn proc_files_vanishing_under_a_configured_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let proc_root = dir.path().join("proc");
    let sys_root = dir.path().join("sys");
    copy_proc(&proc_root);
    let zone = sys_root.join("class/thermal/thermal_zone0");
    fs::create_dir_all(&zone).expect("mkdir zone");
    fs::write(zone.join("temp"), "45000\n").expect("write temp");
    let config = format!(
        r#"
[agent]
node_id = "faults-proc"
state_dir = "{{STATE_DIR}}"
sample_interval_ms = 100

[features]
window = "2s"
step = "1s"

[collect]
proc_root = "{proc}"
sys_root = "{sys}"

[[target]]
name = "host"
kind = "host"
"#,
        proc = proc_root.display(),
        sys = sys_root.display(),
    );
    let mut agent = Agent::start(&config, &[], &[]);
    agent.wait_samples(30);
    let whole = signals(&agent.status());

    // /proc/meminfo and /proc/net/dev vanish, and the thermal zone (listed
    // once a minute) is unplugged after the listing.
    fs::remove_file(proc_root.join("meminfo")).expect("rm meminfo");
    fs::remove_file(proc_root.join("net/dev")).expect("rm net/dev");
    fs::remove_dir_all(&zone).expect("rm zone");
    agent.wait_samples(40);
    let less = agent.wait("the memory signals to age out", WAIT, |doc| {
        let n = signals(doc);
        (n < whole).then_some(n)
    });
    assert!(less > 0, "every signal went with two files");
    let lost = |agent: &Agent, source: &str| {
        agent.count(
            "host metric source not available",
            &[("source", source), ("level", "WARN")],
        )
    };
    assert_eq!(
        (lost(&agent, "memory"), lost(&agent, "network")),
        (1, 1),
        "{}",
        agent.log_tail()
    );

    // Back: the signals return.
    copy_proc(&proc_root);
    agent.wait("the signals to return", WAIT, |doc| {
        (signals(doc) >= whole - 1).then_some(())
    });
    agent.wait_samples(10);
    let back = |agent: &Agent, source: &str| {
        agent.count(
            "host metric source available again",
            &[("source", source), ("level", "INFO")],
        )
    };
    assert_eq!(
        (back(&agent, "memory"), back(&agent, "network")),
        (1, 1),
        "{}",
        agent.log_tail()
    );
    assert_eq!(
        lost(&agent, "memory") + lost(&agent, "network"),
        2,
        "{}",
        agent.log_tail()
    );
    assert_eq!(
        agent.count("", &[("source", "thermal")]),
        0,
        "a zone that vanished after the listing is skipped quietly\n{}",
        agent.log_tail()
    );
    assert!(agent.at_level("ERROR").is_empty(), "{}", agent.log_tail());
    agent.stop();
}
