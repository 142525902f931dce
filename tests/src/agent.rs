//! The real `outpost` binary as the whole-system tests run it: its path,
//! the daemon started on a config with its stderr captured (and its JSON
//! log lines read back), its CLI (`status --json`, `actions --json`,
//! `actions --verify-chain`, `check-config`), a config with a probed target
//! and an `[mqtt]` section, and the polling, clock and port helpers the
//! tests share.

// Test helpers fail loudly.
#![allow(clippy::unwrap_used)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The `outpost` binary under test (`target/debug/outpost`).
pub fn outpost() -> PathBuf {
    crate::nspawn::outpost_binary().expect("the outpost binary")
}

/// The JSON Schema of message type `kind` (`state`, `event`, `reply`, ...)
/// in the repository's `schemas/`.
pub fn schema(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../schemas/{kind}.schema.json"))
}

/// This process's wall clock, in ms since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A loopback port that nothing listens on (bound once, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every `every` until it returns `Some`, or panics after
/// `timeout` with `what` and `context()`.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not within {timeout:?}\n{}", context());
        }
        thread::sleep(every);
    }
}

/// The agent's `--log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The real daemon, its stderr appended to a log file; killed with SIGKILL
/// on drop.
pub struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// `outpost --log-format FORMAT run --config FILE`, its stderr appended
    /// to `agent.log` beside the config.
    pub fn start(config: &Path, format: LogFormat) -> Agent {
        let format = match format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let mut cmd = Command::new(outpost());
        cmd.args(["--log-format", format, "run", "--config"])
            .arg(config);
        Agent::spawn(cmd, config.with_file_name("agent.log"))
    }

    /// Spawns `cmd` (an `outpost` command line) with no stdin or stdout and
    /// its stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Agent {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start outpost");
        Agent { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Still running (not crashed, not exited).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Fails the test when the agent has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("outpost exited ({status}):\n{}", self.log());
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and its exit status (it must exit within 10 s).
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "outpost did not stop within 10 s of SIGTERM\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its stderr so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `fields` of every JSON log line (with [`LogFormat::Json`]).
    pub fn log_fields(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["fields"].clone())
            .collect()
    }

    /// How many JSON log lines have a message starting with
    /// `message_prefix`.
    pub fn logged(&self, message_prefix: &str) -> usize {
        self.log_fields()
            .iter()
            .filter(|f| {
                f["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message_prefix))
            })
            .count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `outpost check-config FILE` accepts the test's config.
pub fn check_config(config: &Path) {
    let out = Command::new(outpost())
        .arg("check-config")
        .arg(config)
        .output()
        .expect("outpost check-config");
    assert!(
        out.status.success(),
        "outpost check-config refused the test config:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(config).unwrap_or_default()
    );
}

/// `outpost status` of the agent, with `--json` or without; must succeed.
pub fn status_output(config: &Path, json: bool) -> String {
    let mut cmd = Command::new(outpost());
    cmd.arg("status");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.arg("--config").arg(config).output().unwrap();
    assert!(
        out.status.success(),
        "outpost status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `outpost status --json`, parsed.
pub fn status(config: &Path) -> Value {
    serde_json::from_str(&status_output(config, true)).unwrap()
}

/// The audit trail (`outpost actions --json --limit LIMIT`), or the
/// command's stderr when it fails (as before the store exists).
pub fn try_actions(config: &Path, limit: u64) -> Result<Vec<Value>, String> {
    let out = Command::new(outpost())
        .args([
            "actions",
            "--json",
            "--limit",
            &limit.to_string(),
            "--config",
        ])
        .arg(config)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap())
}

/// The audit trail, which must be readable.
pub fn actions(config: &Path, limit: u64) -> Vec<Value> {
    try_actions(config, limit).unwrap_or_else(|e| panic!("outpost actions: {e}"))
}

/// `outpost actions --verify-chain` succeeds; returns its output.
pub fn verify_chain(config: &Path) -> String {
    let out = Command::new(outpost())
        .args(["actions", "--verify-chain", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "audit chain broken: {text}");
    text
}

/// A node whose one target `web` is probed over TCP on `port`, with a
/// `suggest` rule (1 s cooldown) on its failures: each failing probe after
/// the cooldown writes an audit row and an `action.*` event.
pub struct ProbedNode<'a> {
    pub node: &'a str,
    pub state: &'a Path,
    /// The sample interval, and the probe's (timeout half of it).
    pub sample_ms: u64,
    /// Sections placed between `[agent]` and the target (`[store]`, ...).
    pub sections: &'a str,
    pub port: u16,
    /// Appended last: the `[mqtt]` section and its settings, and more.
    pub uplink: &'a str,
}

impl ProbedNode<'_> {
    /// Writes the config as `outpost.toml` in `dir`.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let config = dir.join("outpost.toml");
        let Self {
            node,
            state,
            sample_ms,
            sections,
            port,
            uplink,
        } = self;
        std::fs::write(
            &config,
            format!(
                "[agent]\nnode_id = \"{node}\"\nstate_dir = \"{}\"\nsample_interval_ms = {sample_ms}\n\n\
                 {sections}\
                 [[target]]\nname = \"web\"\nkind = \"host\"\n\
                 probe = {{ tcp = \"127.0.0.1:{port}\", interval_ms = {sample_ms}, timeout_ms = {} }}\n\n\
                 [[rule]]\nname = \"web-down\"\ntarget = \"web\"\nwhen = \"probe_failed\"\n\
                 do = \"notify\"\nmode = \"suggest\"\ncooldown = \"1s\"\n\n\
                 {uplink}",
                state.display(),
                (sample_ms / 2).max(1),
            ),
        )
        .unwrap();
        config
    }
}

/// A [`ProbedNode`] sampled and probed every 200 ms, its state in
/// `dir/state`, with no other sections: written as `dir/outpost.toml`.
pub fn write_probed_node(dir: &Path, node: &str, port: u16, uplink: &str) -> PathBuf {
    ProbedNode {
        node,
        state: &dir.join("state"),
        sample_ms: 200,
        sections: "",
        port,
        uplink,
    }
    .write(dir)
}

/// Opens and closes a TCP listener on a loopback port, `half` each, until
/// dropped: a probe of that port fails every other `half`.
pub struct Flapper {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Flapper {
    pub fn start(half: Duration) -> Flapper {
        let port = free_port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                // Another process may hold the port for a moment: then this
                // half simply fails too.
                let listener = TcpListener::bind(("127.0.0.1", port)).ok();
                thread::sleep(half);
                drop(listener);
                thread::sleep(half);
            }
        });
        Flapper {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Flapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
