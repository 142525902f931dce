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
        self.sd.install_unit(OUTPOST_UNIT, &outpost_unit(&self.bin, rust_log))?;
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
        mut check: impl FnMut(&[AuditRow]) -> Option<T>,
    ) -> Result<T> {
        let mut last = Vec::new();
        let got = poll(what, within, Duration::from_millis(250), || {
            let rows = self.actions().map_err(|e| format!("{e:#}"))?;
            let found = check(&rows);
            last = rows;
            found.ok_or_else(|| "not yet".to_string())
        });
        got.with_context(|| format!("audit so far:\n{}", format_rows(&last)))
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
        format!(
            "--- audit ---\n{audit}{}",
            self.journal(OUTPOST_UNIT, 120)
        )
    }
}
