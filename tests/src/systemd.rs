//! A real systemd for whole-system tests, without booting a machine: a
//! `systemd --user` manager with its own runtime directory, config
//! directory and socket-activated D-Bus (dbus-user-session), speaking the
//! same `org.freedesktop.systemd1` API as PID 1.
//!
//! systemd refuses to run a user manager unless `/run/systemd/system`
//! exists (the host was booted with systemd); the manager runs in a private
//! mount namespace where a tmpfs on `/run/systemd` provides it, so the host
//! is left alone. Stopped with SIGTERM on drop, which stops its units too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::apt::have;

pub const SYSTEMD: &str = "/lib/systemd/systemd";
/// The user units that socket-activate the session bus.
const DBUS_SOCKET_UNIT: &str = "/usr/lib/systemd/user/dbus.socket";

/// Installs systemd, dbus and dbus-user-session with apt when missing.
pub fn ensure_installed() -> Result<()> {
    let ok = Path::new(SYSTEMD).exists()
        && Path::new(DBUS_SOCKET_UNIT).exists()
        && have("busctl", "--version")
        && have("unshare", "--version")
        && have("dbus-daemon", "--version");
    if !ok {
        crate::apt::install(&["systemd", "dbus", "dbus-user-session", "util-linux"])
            .context("installing systemd and dbus")?;
    }
    for (what, present) in [
        (SYSTEMD, Path::new(SYSTEMD).exists()),
        (DBUS_SOCKET_UNIT, Path::new(DBUS_SOCKET_UNIT).exists()),
        ("busctl", have("busctl", "--version")),
        ("unshare", have("unshare", "--version")),
    ] {
        if !present {
            bail!("{what} is still missing after apt-get install");
        }
    }
    Ok(())
}

/// A running `systemd --user` with its bus.
pub struct UserManager {
    child: Child,
    dir: tempfile::TempDir,
}

impl UserManager {
    /// Starts the manager and waits (up to 30 s) until it owns
    /// `org.freedesktop.systemd1` on its bus.
    pub fn start() -> Result<UserManager> {
        ensure_installed()?;
        let dir = tempfile::Builder::new()
            .prefix("outpost-systemd-")
            .tempdir()
            .context("tempdir for systemd --user")?;
        let runtime = dir.path().join("run");
        let units = dir.path().join("config/systemd/user");
        std::fs::create_dir_all(&runtime)?;
        std::fs::create_dir_all(&units)?;
        let log = std::fs::File::create(dir.path().join("systemd.log"))?;
        let script = format!(
            "mount -t tmpfs outpost-test /run/systemd && mkdir -p /run/systemd/system && \
             exec {SYSTEMD} --user --log-target=console"
        );
        let child = Command::new("unshare")
            .args(["--mount", "sh", "-c", &script])
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("XDG_RUNTIME_DIR", &runtime)
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start systemd --user under unshare")?;
        let mut manager = UserManager { child, dir };
        manager.wait_ready(Duration::from_secs(30))?;
        Ok(manager)
    }

    fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("systemd --user exited ({status}): {}", self.log());
            }
            if self.bus_path().exists() {
                // Connecting socket-activates dbus-daemon; systemd then
                // joins it and takes its name.
                match self.busctl(&["list", "--no-pager", "--no-legend"]) {
                    Ok(list) => {
                        let owned = list.lines().any(|l| {
                            let mut cols = l.split_whitespace();
                            cols.next() == Some("org.freedesktop.systemd1")
                                && cols.next().is_some_and(|pid| pid != "-")
                        });
                        if owned {
                            return Ok(());
                        }
                        last = list;
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "systemd --user did not appear on its bus within {within:?}: {last}\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn bus_path(&self) -> PathBuf {
        self.dir.path().join("run/bus")
    }

    /// The D-Bus address of the manager's bus.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.bus_path().display())
    }

    /// Runs `busctl --address=BUS ARGS…`, returning stdout.
    pub fn busctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("busctl")
            .arg(format!("--address={}", self.bus_address()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run busctl")?;
        if !out.status.success() {
            bail!(
                "busctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    fn manager_call(&self, method: &str, signature: &str, args: &[&str]) -> Result<String> {
        let mut all = vec![
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            method,
        ];
        if !signature.is_empty() {
            all.push(signature);
        }
        all.extend_from_slice(args);
        self.busctl(&all)
    }

    /// Writes a unit file and reloads the manager.
    pub fn write_unit(&self, name: &str, contents: &str) -> Result<()> {
        let path = self.dir.path().join("config/systemd/user").join(name);
        std::fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
        self.manager_call("Reload", "", &[])?;
        Ok(())
    }

    pub fn start_unit(&self, name: &str) -> Result<()> {
        self.manager_call("StartUnit", "ss", &[name, "replace"])
            .map(drop)
    }

    pub fn stop_unit(&self, name: &str) -> Result<()> {
        self.manager_call("StopUnit", "ss", &[name, "replace"])
            .map(drop)
    }

    /// A unit property as busctl prints it (`s "active"`, `u 1234`).
    pub fn property(&self, unit: &str, interface: &str, property: &str) -> Result<String> {
        let path = self.manager_call("LoadUnit", "s", &[unit])?;
        let path = path.trim_start_matches("o ").trim_matches('"').to_string();
        self.busctl(&[
            "get-property",
            "org.freedesktop.systemd1",
            &path,
            &format!("org.freedesktop.systemd1.{interface}"),
            property,
        ])
    }

    /// Waits until `ActiveState` of `unit` is `want`.
    pub fn wait_active_state(&self, unit: &str, want: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.property(unit, "Unit", "ActiveState")?;
            if got == format!("s \"{want}\"") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{unit}: ActiveState is {got}, expected {want:?} within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What systemd printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("systemd.log")).unwrap_or_default()
    }
}

impl Drop for UserManager {
    fn drop(&mut self) {
        // SIGTERM lets the manager stop its units and its bus; SIGKILL if
        // it does not exit in time.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
