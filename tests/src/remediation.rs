//! Shared pieces of the remediation tests and the recovery benchmark: a
//! demo HTTP service unit, outpost as a `Type=notify` service inside a
//! [`Systemd`] container, and the audit trail read back through the real
//! CLI (`outpost actions --json`).
//!
//! Everything returns `Err` with details (the audit, the journal) instead of
//! panicking, so a caller can add context and fail loudly.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::apt::have;
use crate::nspawn::Systemd;

/// Where the config lives inside the container.
pub const CONFIG_PATH: &str = "/etc/outpost/outpost.toml";

/// The unit outpost runs as inside the container.
pub const OUTPOST_UNIT: &str = "outpost.service";

/// The demo web service's port (inside the container's own network
/// namespace, so it never collides with the host or another container).
pub const WEB_PORT: u16 = 8080;

/// How the demo web service serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebServer {
    /// `python3 -m http.server` (Debian's /usr/bin/python3).
    Python,
    /// `busybox httpd -f`.
    Busybox,
}

/// Debian's python3, never a shim from a version manager (those need an
/// environment the container's units do not have).
pub const PYTHON: &str = "/usr/bin/python3";

/// Picks the server the host can run inside the container: python3, else
/// busybox (installed with apt when neither is there). Also makes sure
/// `curl` is there for the HTTP checks run inside.
pub fn ensure_tools() -> Result<WebServer> {
    if !have("curl", "--version") {
        crate::apt::install(&["curl"]).context("installing curl")?;
    }
    if Path::new(PYTHON).is_file() {
        return Ok(WebServer::Python);
    }
    if !Path::new("/bin/busybox").is_file() {
        crate::apt::install(&["busybox"]).context("installing busybox")?;
    }
    if Path::new("/bin/busybox").is_file() {
        Ok(WebServer::Busybox)
    } else {
        bail!("neither {PYTHON} nor /bin/busybox is available for the demo HTTP service")
    }
}

/// A simple service serving `/srv/www` on 127.0.0.1:`port`.
pub fn web_unit(server: WebServer, description: &str, port: u16) -> String {
    let exec = match server {
        WebServer::Python => {
            format!("{PYTHON} -m http.server {port} --bind 127.0.0.1 --directory /srv/www")
        }
        WebServer::Busybox => format!("/bin/busybox httpd -f -p 127.0.0.1:{port} -h /srv/www"),
    };
    format!(
        "\
[Unit]
Description={description}

[Service]
ExecStart={exec}
Restart=no
"
    )
}

/// The `outpost.service` unit for `binary`: `Type=notify` with a watchdog,
/// as root, never restarted by systemd (a crash must show). `rust_log` is
/// its `RUST_LOG`.
pub fn outpost_unit(binary: &Path, rust_log: &str) -> String {
    format!(
        "\
[Unit]
Description=outpost agent (remediation test)

[Service]
Type=notify
ExecStart={} run --config {CONFIG_PATH}
Environment=RUST_LOG={rust_log}
WatchdogSec=5
TimeoutStartSec=30
Restart=no
",
        binary.display()
    )
}

/// One row of the audit trail, as `outpost actions --json` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRow {
    pub id: i64,
    pub ts_ms: i64,
    pub decision_id: u64,
    pub rule: Option<String>,
    pub target: String,
    pub action: String,
    pub decision: String,
    pub reason: String,
    pub detail: Value,
    pub prev_hash: String,
    pub hash: String,
}

impl AuditRow {
    fn from_json(v: &Value) -> Result<AuditRow> {
        let s = |k: &str| -> Result<String> {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("audit row without string `{k}`: {v}"))
        };
        let i = |k: &str| -> Result<i64> {
            v[k].as_i64()
                .ok_or_else(|| anyhow!("audit row without integer `{k}`: {v}"))
        };
        Ok(AuditRow {
            id: i("id")?,
            ts_ms: i("ts_ms")?,
            decision_id: v["decision_id"]
                .as_u64()
                .ok_or_else(|| anyhow!("audit row without decision_id: {v}"))?,
            rule: v["rule"].as_str().map(str::to_string),
            target: s("target")?,
            action: s("action")?,
            decision: s("decision")?,
            reason: s("reason")?,
            detail: v["detail"].clone(),
            prev_hash: s("prev_hash")?,
            hash: s("hash")?,
        })
    }

    /// True for a row of `rule` with this decision.
    pub fn is(&self, rule: &str, decision: &str) -> bool {
        self.rule.as_deref() == Some(rule) && self.decision == decision
    }
}

/// Parses the output of `outpost actions --json`.
pub fn parse_actions(json: &str) -> Result<Vec<AuditRow>> {
    let doc: Value = serde_json::from_str(json)
        .with_context(|| format!("`outpost actions --json` is not JSON: {json}"))?;
    let rows = doc
        .as_array()
        .ok_or_else(|| anyhow!("`outpost actions --json` is not an array: {doc}"))?;
    rows.iter().map(AuditRow::from_json).collect()
}

/// Audit rows as a readable table, for failure messages.
pub fn format_rows(rows: &[AuditRow]) -> String {
    let mut s = String::new();
    for r in rows {
        let _ = writeln!(
            s,
            "  {:>4} {} #{:<3} {:<14} {:<8} {:<8} {:<18} {} {}",
            r.id,
            r.ts_ms,
            r.decision_id,
            r.rule.as_deref().unwrap_or("-"),
            r.target,
            r.action,
            r.decision,
            r.reason,
            if r.detail.is_null() {
                String::new()
            } else {
                r.detail.to_string()
            }
        );
    }
    if s.is_empty() {
        s.push_str("  (no audit rows)\n");
    }
    s
}

/// The decisions of `rule`, in order.
pub fn decisions_of<'a>(rows: &'a [AuditRow], rule: &str) -> Vec<&'a str> {
    rows.iter()
        .filter(|r| r.rule.as_deref() == Some(rule))
        .map(|r| r.decision.as_str())
        .collect()
}

/// Polls `check` every `every` until it returns `Ok`, or fails after
/// `within` with what it last said.
pub fn poll<T>(
    what: &str,
    within: Duration,
    every: Duration,
    mut check: impl FnMut() -> std::result::Result<T, String>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() >= deadline => {
                bail!("timed out after {within:?} waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// A booted container with outpost's binary at hand.
pub struct Rig {
    pub sd: Systemd,
    pub bin: PathBuf,
    pub web: WebServer,
}

impl Rig {
    /// Boots a container, checks the tools the tests use and that `bin`
    /// is visible inside.
    pub fn boot(bin: PathBuf) -> Result<Rig> {
        let web = ensure_tools()?;
        let sd = Systemd::boot()?;
        sd.sh(&format!("test -x {}", bin.display()))
            .context("the outpost binary is not visible inside the container")?;
        sd.sh("mkdir -p /srv/www && echo ok > /srv/www/index.html")?;
        Ok(Rig { sd, bin, web })
    }

    /// Installs and starts a demo web service on `port`, and waits until it
    /// answers.
    pub fn start_web(&self, unit: &str, port: u16) -> Result<u32> {
        self.sd.install_unit(
            unit,
            &web_unit(self.web, &format!("demo web on {port}"), port),
        )?;
        self.sd.sh(&format!("systemctl start {unit}"))?;
        let url = format!("http://127.0.0.1:{port}/");
        poll(
            &format!("{unit} to answer on {url}"),
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                if self.http_ok(&url) {
                    Ok(())
                } else {
                    Err("no answer".into())
                }
            },
        )
        .with_context(|| self.journal(unit, 30))?;
        self.main_pid(unit)
    }

    /// Writes the config, checks it with `outpost check-config` and starts
    /// outpost.service (returns once it sent READY=1).
    pub fn start_outpost(&self, config: &str) -> Result<()> {
        self.start_outpost_with(config, "outpost=debug,info")
    }

    /// [`Rig::start_outpost`] with another `RUST_LOG`.
    pub fn start_outpost_with(&self, config: &str, rust_log: &str) -> Result<()> {
        self.sd.write_file(CONFIG_PATH, config)?;
        let check = self.outpost(&["check-config", CONFIG_PATH])?;
        if !check.status.success() {
            bail!(
                "outpost check-config refused the test config ({}):\n{}{}\n--- config ---\n{config}",
                check.status,
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        self.sd
            .install_unit(OUTPOST_UNIT, &outpost_unit(&self.bin, rust_log))?;
        let out = self.sd.exec(&["systemctl", "start", OUTPOST_UNIT])?;
        if !out.status.success() {
            bail!(
                "{OUTPOST_UNIT} did not start: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.journal(OUTPOST_UNIT, 60)
            );
        }
        Ok(())
    }

    /// Stops outpost.service; fails when it did not stop cleanly.
    pub fn stop_outpost(&self) -> Result<()> {
        self.sd.sh(&format!("systemctl stop {OUTPOST_UNIT}"))?;
        let p = self
            .sd
            .unit_properties(OUTPOST_UNIT, &["ActiveState", "Result"])?;
        if p != ["inactive", "success"] {
            bail!(
                "{OUTPOST_UNIT} did not stop cleanly: {p:?}\n{}",
                self.journal(OUTPOST_UNIT, 60)
            );
        }
        Ok(())
    }

    /// Fails unless outpost.service is still active/running.
    pub fn assert_outpost_running(&self) -> Result<()> {
        let p = self
            .sd
            .unit_properties(OUTPOST_UNIT, &["ActiveState", "SubState", "NRestarts"])?;
        if p[0] != "active" || p[1] != "running" {
            bail!(
                "{OUTPOST_UNIT} is {}/{}:\n{}",
                p[0],
                p[1],
                self.journal(OUTPOST_UNIT, 80)
            );
        }
        Ok(())
    }

    /// Runs the outpost binary inside with `args`.
    pub fn outpost(&self, args: &[&str]) -> Result<Output> {
        let bin = self.bin.to_string_lossy().into_owned();
        let mut argv = vec![bin.as_str()];
        argv.extend_from_slice(args);
        self.sd.exec(&argv)
    }

    /// Runs `outpost SUBCOMMAND --config CONFIG_PATH ARGS…` inside and
    /// returns stdout; fails with the output on a non-zero exit.
    pub fn outpost_ok(&self, subcommand: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec![subcommand, "--config", CONFIG_PATH];
        argv.extend_from_slice(args);
        let out = self.outpost(&argv)?;
        if !out.status.success() {
            bail!(
                "outpost {} failed ({}):\nstdout: {}\nstderr: {}",
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The whole audit trail, oldest first.
    pub fn actions(&self) -> Result<Vec<AuditRow>> {
        parse_actions(&self.outpost_ok("actions", &["--json", "--limit", "100000"])?)
    }

    /// Polls the audit trail until `check` accepts it.
    pub fn wait_audit<T>(
        &self,
        what: &str,
        within: Duration,
        check: impl FnMut(&[AuditRow]) -> Option<T>,
    ) -> Result<T> {
        wait_audit_with(what, within, || self.actions(), check)
    }

    /// Waits until the running agent reports `target` with a passing probe
    /// (`outpost status --json`), so a rule has seen it healthy.
    pub fn wait_probe_ok(&self, target: &str, within: Duration) -> Result<()> {
        poll(
            &format!("outpost to see target {target} with a passing probe"),
            within,
            Duration::from_millis(250),
            || {
                let out = self
                    .outpost_ok("status", &["--json"])
                    .map_err(|e| format!("{e:#}"))?;
                let doc: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
                let ok = doc["live"]["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t["name"] == target && t["probe"]["ok"] == true);
                if ok {
                    Ok(())
                } else {
                    Err(out)
                }
            },
        )
        .with_context(|| self.journal(OUTPOST_UNIT, 40))
    }

    /// `outpost actions --verify-chain` must exit 0.
    pub fn verify_chain(&self) -> Result<String> {
        self.outpost_ok("actions", &["--verify-chain"])
    }

    /// The unit's main pid (0 when it has none).
    pub fn main_pid(&self, unit: &str) -> Result<u32> {
        let v = self.sd.unit_properties(unit, &["MainPID"])?;
        v[0].parse()
            .with_context(|| format!("MainPID of {unit} is {:?}", v[0]))
    }

    /// SIGSTOPs the unit's main process: it keeps its socket and accepts
    /// connections but never answers. Returns the pid.
    pub fn hang(&self, unit: &str) -> Result<u32> {
        let pid = self.main_pid(unit)?;
        if pid == 0 {
            bail!("{unit} has no main process to hang");
        }
        self.sd.sh(&format!("kill -STOP {pid}"))?;
        Ok(pid)
    }

    /// The process state letter of `pid` inside (`T` when stopped), or None
    /// when it is gone.
    pub fn proc_state(&self, pid: u32) -> Option<String> {
        let status = self
            .sd
            .sh(&format!("cat /proc/{pid}/status 2>/dev/null"))
            .ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_string)
    }

    /// True when `url` answers 2xx within a second (curl inside).
    pub fn http_ok(&self, url: &str) -> bool {
        self.sd
            .exec(&["curl", "-fsS", "-m", "1", "-o", "/dev/null", url])
            .is_ok_and(|o| o.status.success())
    }

    /// The unit's journal (inside), for failure messages.
    pub fn journal(&self, unit: &str, lines: usize) -> String {
        let n = lines.to_string();
        match self
            .sd
            .exec(&["journalctl", "-b", "--no-pager", "-n", &n, "-u", unit])
        {
            Ok(o) => format!(
                "--- journal of {unit} ---\n{}",
                String::from_utf8_lossy(&o.stdout)
            ),
            Err(e) => format!("(no journal for {unit}: {e:#})"),
        }
    }

    /// What went on: the audit and outpost's journal.
    pub fn diagnostics(&self) -> String {
        let audit = match self.actions() {
            Ok(rows) => format_rows(&rows),
            Err(e) => format!("(cannot read the audit: {e:#})"),
        };
        format!("--- audit ---\n{audit}{}", self.journal(OUTPOST_UNIT, 120))
    }
}

/// Where [`BusWatch`] writes the messages it sees, inside.
const BUS_WATCH_LOG: &str = "/run/outpost-test-bus-watch.jsonl";
const BUS_WATCH_UNIT: &str = "outpost-test-bus-watch.service";

/// Manager methods that queue a job for (or signal) the unit in their first
/// argument.
const MANAGER_JOB_METHODS: &[&str] = &[
    "StartUnit",
    "StartUnitReplace",
    "StopUnit",
    "RestartUnit",
    "ReloadUnit",
    "TryRestartUnit",
    "ReloadOrRestartUnit",
    "ReloadOrTryRestartUnit",
    "KillUnit",
    "EnqueueUnitJob",
];

/// The same on a unit's own object (`org.freedesktop.systemd1.Unit`).
const UNIT_JOB_METHODS: &[&str] = &[
    "Start",
    "Stop",
    "Restart",
    "Reload",
    "TryRestart",
    "ReloadOrRestart",
    "ReloadOrTryRestart",
    "Kill",
    "EnqueueJob",
];

/// A `busctl monitor` inside the container recording every method call to
/// systemd: independent evidence of which units anyone (outpost) asked
/// systemd to start, stop, restart or signal, whatever the audit says.
/// `systemctl` run as root inside uses systemd's private socket, so the
/// tests' own commands do not show up here.
pub struct BusWatch<'a> {
    sd: &'a Systemd,
}

impl<'a> BusWatch<'a> {
    /// Starts the monitor as a transient unit and waits until it listens.
    pub fn start(sd: &'a Systemd) -> Result<BusWatch<'a>> {
        sd.sh(&format!(
            "systemd-run --quiet --unit={BUS_WATCH_UNIT} \
             -p StandardOutput=file:{BUS_WATCH_LOG} -p StandardError=journal \
             busctl monitor --json=short \
             --match \"type='method_call',destination='org.freedesktop.systemd1'\""
        ))?;
        let watch = BusWatch { sd };
        // busctl's output is flushed per message: ping systemd over the bus
        // until the ping shows up, so no later call can be missed.
        poll(
            "busctl monitor to see a ping",
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                sd.sh(
                    "busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 \
                     org.freedesktop.DBus.Peer Ping",
                )
                .map_err(|e| format!("{e:#}"))?;
                let log = sd
                    .sh(&format!("cat {BUS_WATCH_LOG} 2>/dev/null || true"))
                    .map_err(|e| format!("{e:#}"))?;
                if log.contains("\"Ping\"") {
                    Ok(())
                } else {
                    Err(format!("log: {log:?}"))
                }
            },
        )?;
        Ok(watch)
    }

    /// Every job-creating or signalling call about `unit` so far, as
    /// `Member` names in order.
    pub fn calls(&self, unit: &str) -> Result<Vec<String>> {
        let log = self.sd.sh(&format!("cat {BUS_WATCH_LOG}"))?;
        let unit_path = format!("/org/freedesktop/systemd1/unit/{}", bus_label(unit));
        let mut calls = Vec::new();
        for line in log.lines().filter(|l| l.starts_with('{')) {
            let Ok(msg) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let member = msg["member"].as_str().unwrap_or_default();
            let interface = msg["interface"].as_str().unwrap_or_default();
            let about_unit = match interface {
                "org.freedesktop.systemd1.Manager" => {
                    MANAGER_JOB_METHODS.contains(&member)
                        && msg["payload"]["data"][0].as_str() == Some(unit)
                }
                "org.freedesktop.systemd1.Unit" => {
                    UNIT_JOB_METHODS.contains(&member)
                        && msg["path"].as_str() == Some(unit_path.as_str())
                }
                _ => false,
            };
            if about_unit {
                calls.push(member.to_string());
            }
        }
        Ok(calls)
    }
}

/// sd-bus's object path label for a unit name: bytes other than
/// `[A-Za-z0-9]` become `_xx` (lowercase hex).
pub fn bus_label(name: &str) -> String {
    let mut s = String::new();
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()) {
            s.push(char::from(b));
        } else {
            let _ = write!(s, "_{b:02x}");
        }
    }
    s
}

/// Polls `read` (an audit reader) until `check` accepts the rows; on timeout
/// the error carries the last rows seen.
pub fn wait_audit_with<T>(
    what: &str,
    within: Duration,
    mut read: impl FnMut() -> Result<Vec<AuditRow>>,
    mut check: impl FnMut(&[AuditRow]) -> Option<T>,
) -> Result<T> {
    let mut last = Vec::new();
    let got = poll(what, within, Duration::from_millis(250), || {
        let rows = read().map_err(|e| format!("{e:#}"))?;
        let found = check(&rows);
        last = rows;
        found.ok_or_else(|| "not yet".to_string())
    });
    got.with_context(|| format!("audit so far:\n{}", format_rows(&last)))
}

/// `outpost run` as a child process on the host, with its config and state
/// in a temporary directory. Killed on drop; [`HostDaemon::stop`] stops it
/// cleanly and checks that it exited 0.
pub struct HostDaemon {
    child: Option<std::process::Child>,
    bin: PathBuf,
    config: PathBuf,
    dir: tempfile::TempDir,
}

impl HostDaemon {
    /// Writes `config` (where `{STATE_DIR}` stands for a fresh state
    /// directory), checks it with `outpost check-config`, starts the agent
    /// and waits until its control socket answers.
    pub fn start(bin: &Path, config: &str) -> Result<HostDaemon> {
        let dir = tempfile::Builder::new()
            .prefix("outpost-daemon-")
            .tempdir()
            .context("tempdir for the agent")?;
        let state = dir.path().join("state");
        let text = config.replace("{STATE_DIR}", &state.to_string_lossy());
        let config_path = dir.path().join("outpost.toml");
        std::fs::write(&config_path, &text).context("writing the config")?;
        let check = std::process::Command::new(bin)
            .arg("check-config")
            .arg(&config_path)
            .output()
            .context("running outpost check-config")?;
        if !check.status.success() {
            bail!(
                "outpost check-config refused the test config ({}):\n{}{}\n--- config ---\n{text}",
                check.status,
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let log = std::fs::File::create(dir.path().join("outpost.log")).context("log file")?;
        let child = std::process::Command::new(bin)
            .args(["--log-format", "text", "--log-level", "outpost=debug,info"])
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().context("dup log")?)
            .stderr(log)
            .spawn()
            .context("starting outpost run")?;
        let mut d = HostDaemon {
            child: Some(child),
            bin: bin.to_path_buf(),
            config: config_path,
            dir,
        };
        poll(
            "the agent's control socket",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                if let Some(c) = d.child.as_mut() {
                    if let Ok(Some(status)) = c.try_wait() {
                        return Err(format!("outpost exited early ({status})"));
                    }
                }
                let out = d.cli(&["status", "--json"]).map_err(|e| format!("{e:#}"))?;
                let doc: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
                if doc["running"] == true {
                    Ok(())
                } else {
                    Err(out)
                }
            },
        )
        .with_context(|| d.log())?;
        Ok(d)
    }

    /// The config file the agent runs with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Runs `outpost SUBCOMMAND --config FILE ARGS…`; stdout, or an error
    /// with the output.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self.cli_output(args)?;
        if !out.status.success() {
            bail!(
                "outpost {} failed ({}):\nstdout: {}\nstderr: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Like [`HostDaemon::cli`], whatever the exit status.
    pub fn cli_output(&self, args: &[&str]) -> Result<Output> {
        let (sub, rest) = args.split_first().ok_or_else(|| anyhow!("no subcommand"))?;
        std::process::Command::new(&self.bin)
            .arg(sub)
            .arg("--config")
            .arg(&self.config)
            .args(rest)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running outpost {}", args.join(" ")))
    }

    /// The whole audit trail, oldest first.
    pub fn actions(&self) -> Result<Vec<AuditRow>> {
        parse_actions(&self.cli(&["actions", "--json", "--limit", "100000"])?)
    }

    /// Polls the audit trail until `check` accepts it.
    pub fn wait_audit<T>(
        &self,
        what: &str,
        within: Duration,
        check: impl FnMut(&[AuditRow]) -> Option<T>,
    ) -> Result<T> {
        wait_audit_with(what, within, || self.actions(), check)
    }

    /// Fails unless the agent is still running.
    pub fn assert_running(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait().context("wait for outpost")? {
                bail!("outpost exited ({status}):\n{}", self.log());
            }
        }
        Ok(())
    }

    /// SIGTERM, then waits (up to 10 s) for a clean exit 0.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("outpost is not running");
        };
        let pid = child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().context("wait for outpost")? {
                if !status.success() {
                    bail!("outpost exited with {status} on SIGTERM:\n{}", self.log());
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "outpost did not stop within 10 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far (last 150 lines).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("outpost.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(150)..].join("\n");
        format!("--- outpost log ---\n{tail}")
    }

    /// The audit and the log, for failure messages.
    pub fn diagnostics(&self) -> String {
        let audit = match self.actions() {
            Ok(rows) => format_rows(&rows),
            Err(e) => format!("(cannot read the audit: {e:#})"),
        };
        format!("--- audit ---\n{audit}{}", self.log())
    }
}

impl Drop for HostDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
