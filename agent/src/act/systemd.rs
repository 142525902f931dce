//! systemd units, over D-Bus: `RestartUnit`, `StopUnit`, `StartUnit` and
//! `ReloadUnit` with mode `replace`.
//!
//! An action goes:
//! 1. refuse a protected unit by the name asked for (no bus needed);
//! 2. `LoadUnit`, and require `LoadState` `loaded`; refuse the unit if any of
//!    its names (aliases included) is protected; read its state (`before`);
//! 3. listen for `JobRemoved` *before* calling, so a job that finishes at
//!    once is not missed (the connection has done `Manager.Subscribe()`);
//! 4. call, and wait for the `JobRemoved` of the returned job path, at most
//!    the job timeout: result `done` is ok; `failed`, `timeout`, `canceled`,
//!    `dependency`, `skipped`… are not;
//! 5. re-read `ActiveState`/`SubState` (and `MainPID`, the service result)
//!    and report them as `after`, whatever they are: a restart job is
//!    `done` even when the service dies right after.
//!
//! The connection is made the way the collector makes it
//! ([`crate::collect::systemd`]), on the first action, and kept; a closed
//! or broken one is replaced on the next action.

use std::future::poll_fn;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};
use zbus_systemd::zbus;
use zbus_systemd::zbus::export::futures_core::Stream;
use zbus_systemd::zbus::proxy::CacheProperties;

use super::{elapsed_ms, ActionOutcome, ActionRequest, Actuator, DEFAULT_JOB_TIMEOUT};
use crate::collect::systemd::{connect, Bus, SystemdError};
use crate::decide::types::{ActionKind, ActionTarget};

/// The job mode of every call: replace a conflicting queued job.
const MODE: &str = "replace";

/// Unit type suffixes: a name without one means `.service` to systemd.
const UNIT_SUFFIXES: &[&str] = &[
    ".service",
    ".socket",
    ".device",
    ".mount",
    ".automount",
    ".swap",
    ".target",
    ".path",
    ".timer",
    ".slice",
    ".scope",
];

/// Restarts, stops, starts and reloads systemd units.
pub struct SystemdActuator {
    /// `None`: the system bus (honours `DBUS_SYSTEM_BUS_ADDRESS`).
    address: Option<String>,
    protected: Vec<String>,
    job_timeout: Duration,
    bus: Mutex<Option<Bus>>,
}

impl std::fmt::Debug for SystemdActuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemdActuator")
            .field("address", &self.address)
            .field("protected", &self.protected)
            .field("job_timeout", &self.job_timeout)
            .finish()
    }
}

/// A unit's state as read over D-Bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    /// For services: the main process, when there is one.
    pub main_pid: Option<u32>,
    /// For services: `success`, `exit-code`, `signal`, `timeout`…
    pub result: Option<String>,
    /// Every name of the unit, aliases included.
    pub names: Vec<String>,
}

impl std::fmt::Display for UnitState {
    /// `active/running (main pid 42)`, `failed/failed (result exit-code)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.active_state, self.sub_state)?;
        match (self.main_pid, self.result.as_deref()) {
            (Some(pid), _) => write!(f, " (main pid {pid})"),
            (None, Some(result)) if result != "success" => write!(f, " (result {result})"),
            _ => Ok(()),
        }
    }
}

impl SystemdActuator {
    /// On the system bus. `protected`: unit name globs never to touch.
    pub fn new(protected: Vec<String>) -> Self {
        Self::build(protected, None)
    }

    /// On the bus at `address` (a D-Bus address such as
    /// `unix:path=/run/dbus/system_bus_socket`), e.g. a container's.
    pub fn with_bus_address(protected: Vec<String>, address: impl Into<String>) -> Self {
        Self::build(protected, Some(address.into()))
    }

    fn build(protected: Vec<String>, address: Option<String>) -> Self {
        SystemdActuator {
            address,
            protected,
            job_timeout: DEFAULT_JOB_TIMEOUT,
            bus: Mutex::new(None),
        }
    }

    /// How long to wait for a job's `JobRemoved`.
    pub fn with_job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    /// Restarts, stops, starts or reloads `unit`; any other action is
    /// refused.
    pub async fn act(&self, unit: &str, action: &ActionKind) -> ActionOutcome {
        let started = Instant::now();
        let unit = &full_name(unit);
        let label = action.label();
        let what = format!("{label} {unit}");
        if !matches!(
            action,
            ActionKind::Restart | ActionKind::Stop | ActionKind::Start | ActionKind::Reload
        ) {
            return ActionOutcome::failed(format!("{what}: not a systemd action"), None, started);
        }
        if let Some(pattern) = protected_by(&self.protected, &[unit.to_string()]) {
            return ActionOutcome::failed(
                format!("{what}: refused: the unit is protected (matches {pattern:?})"),
                None,
                started,
            );
        }
        let bus = match self.bus().await {
            Ok(bus) => bus,
            Err(e) => {
                return ActionOutcome::failed(
                    format!("{what}: systemd not available: {e}"),
                    None,
                    started,
                )
            }
        };

        // Precondition: the unit exists and is loaded; none of its names is
        // protected.
        let before = match self.read_state(&bus, unit).await {
            Ok(state) => state,
            Err(e) => {
                return ActionOutcome::failed(format!("{what}: {}", describe(&e)), None, started)
            }
        };
        if before.load_state != "loaded" {
            let why = match before.load_state.as_str() {
                "not-found" => "no such unit".to_string(),
                "masked" => "the unit is masked".to_string(),
                other => format!("the unit is not loaded (load state {other})"),
            };
            return ActionOutcome::failed(format!("{what}: {why}"), None, started);
        }
        if let Some(pattern) = protected_by(&self.protected, &before.names) {
            return ActionOutcome::failed(
                format!(
                    "{what}: refused: the unit is protected (its names {:?} match {pattern:?})",
                    before.names
                ),
                Some(before.to_string()),
                started,
            );
        }

        let result = self.run_job(&bus, unit, action).await;
        let after = match self.read_state(&bus, unit).await {
            Ok(state) => Some(state.to_string()),
            Err(e) => {
                self.forget_if_broken(&e).await;
                None
            }
        };
        let now = after.as_deref().unwrap_or("state unknown");
        let (ok, summary) = match result {
            Ok(result) if result == "done" => (true, format!("{what}: job done; now {now}")),
            Ok(result) => (false, format!("{what}: job {result}; now {now}")),
            Err(e) => (false, format!("{what}: {e}; now {now}")),
        };
        ActionOutcome {
            ok,
            summary,
            before: Some(before.to_string()),
            after,
            output: None,
            duration_ms: elapsed_ms(started),
        }
    }

    /// The unit's state as `active/running (main pid 42)`, or `None` when
    /// it cannot be read.
    pub async fn observe(&self, unit: &str) -> Option<String> {
        let bus = self.bus().await.ok()?;
        match self.read_state(&bus, &full_name(unit)).await {
            Ok(s) if s.load_state == "not-found" => Some("not found".to_string()),
            Ok(s) => Some(s.to_string()),
            Err(e) => {
                self.forget_if_broken(&e).await;
                None
            }
        }
    }

    /// Issues the job and waits for its `JobRemoved`; returns its result.
    async fn run_job(&self, bus: &Bus, unit: &str, action: &ActionKind) -> Result<String, String> {
        // Listen first: the job may finish before the call returns.
        let mut removed = match bus.manager.receive_job_removed().await {
            Ok(stream) => stream,
            Err(e) => {
                self.forget_if_broken(&e).await;
                return Err(format!("cannot listen for JobRemoved: {}", describe(&e)));
            }
        };
        let call = call(&bus.manager, unit, action).await;
        let job = match call {
            Ok(job) => job,
            Err(e) => {
                self.forget_if_broken(&e).await;
                return Err(describe(&e));
            }
        };
        let wait = async {
            loop {
                let Some(signal) = poll_fn(|cx| Pin::new(&mut removed).poll_next(cx)).await else {
                    return Err("the bus connection closed while waiting for the job".to_string());
                };
                let Ok(args) = signal.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Ok(args.result.clone());
                }
            }
        };
        match tokio::time::timeout(self.job_timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "job {} did not finish within {} s (still queued or running)",
                job.as_str(),
                self.job_timeout.as_secs()
            )),
        }
    }

    async fn read_state(&self, bus: &Bus, unit: &str) -> Result<UnitState, zbus::Error> {
        let path = bus.manager.load_unit(unit.to_string()).await?;
        let proxy = UnitProxy::builder(&bus.conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let load_state = proxy.load_state().await?;
        let mut state = UnitState {
            active_state: proxy.active_state().await?,
            sub_state: proxy.sub_state().await?,
            names: proxy.names().await?,
            load_state,
            main_pid: None,
            result: None,
        };
        if state.load_state == "loaded" && state.names.iter().any(|n| n.ends_with(".service")) {
            let service = ServiceProxy::builder(&bus.conn)
                .path(path)
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            state.main_pid = Some(service.main_pid().await?).filter(|p| *p != 0);
            state.result = Some(service.result().await?);
        }
        Ok(state)
    }

    /// The kept connection, or a new one when there is none or it closed.
    async fn bus(&self) -> Result<Bus, SystemdError> {
        let mut slot = self.bus.lock().await;
        if let Some(bus) = slot.as_ref().filter(|b| !b.conn.is_closed()) {
            return Ok(bus.clone());
        }
        *slot = None;
        let bus = connect(self.address.as_deref()).await?;
        *slot = Some(bus.clone());
        Ok(bus)
    }

    /// Drops the kept connection when an error says it is broken.
    async fn forget_if_broken(&self, e: &zbus::Error) {
        if matches!(e, zbus::Error::InputOutput(_)) {
            *self.bus.lock().await = None;
        }
    }
}

impl Actuator for SystemdActuator {
    async fn execute(&self, req: &ActionRequest) -> ActionOutcome {
        match &req.target {
            ActionTarget::Systemd { unit } => self.act(unit, &req.action).await,
            other => ActionOutcome::failed(
                format!(
                    "{} {}: not a systemd target ({other:?})",
                    req.action.label(),
                    req.target_name
                ),
                None,
                Instant::now(),
            ),
        }
    }
}

async fn call(
    manager: &ManagerProxy<'static>,
    unit: &str,
    action: &ActionKind,
) -> Result<zbus::OwnedObjectPath, zbus::Error> {
    let (name, mode) = (unit.to_string(), MODE.to_string());
    if matches!(action, ActionKind::Restart | ActionKind::Start) {
        // A unit that hit its start limit refuses to start until its failed
        // state is reset, as `systemctl reset-failed` does; the rule's own
        // budget, not systemd's start limit, decides how often outpost acts.
        // Not failed: systemd answers an error, which changes nothing.
        let _ = manager.reset_failed_unit(name.clone()).await;
    }
    match action {
        ActionKind::Restart => manager.restart_unit(name, mode).await,
        ActionKind::Stop => manager.stop_unit(name, mode).await,
        ActionKind::Start => manager.start_unit(name, mode).await,
        ActionKind::Reload => manager.reload_unit(name, mode).await,
        // Refused before the bus is touched.
        ActionKind::Exec(_) | ActionKind::Notify => Err(zbus::Error::Unsupported),
    }
}

/// The error as zbus words it: for a method error, the error name and
/// systemd's message (`…JobTypeNotApplicable: Job type reload is not
/// applicable for unit x.service.`).
fn describe(e: &zbus::Error) -> String {
    e.to_string().trim_end_matches('.').to_string()
}

/// The unit name as systemd's D-Bus API wants it: with its type suffix.
/// Like `systemctl`, a name without one means a service.
pub fn full_name(unit: &str) -> String {
    if has_suffix(unit) {
        unit.to_string()
    } else {
        format!("{unit}.service")
    }
}

fn has_suffix(name: &str) -> bool {
    UNIT_SUFFIXES.iter().any(|suffix| name.ends_with(suffix))
}

/// The first protected pattern that matches any of `names`. A name or a
/// pattern without a unit type suffix also stands for its `.service` (as
/// systemd reads `sshd` as `sshd.service`).
pub fn protected_by<'a>(patterns: &'a [String], names: &[String]) -> Option<&'a str> {
    let expand = |s: &str| -> Vec<String> {
        if has_suffix(s) {
            vec![s.to_string()]
        } else {
            vec![s.to_string(), format!("{s}.service")]
        }
    };
    let names: Vec<String> = names.iter().flat_map(|n| expand(n)).collect();
    patterns.iter().map(String::as_str).find(|pattern| {
        expand(pattern)
            .iter()
            .any(|p| names.iter().any(|n| glob_match(p, n)))
    })
}

/// Shell-style match of the whole `text`: `*` any run of characters
/// (also none), `?` any one character; everything else literally.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it is trying to cover.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn globs() {
        assert!(glob_match("systemd-*", "systemd-journald.service"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*b*c", "acb"));
        assert!(glob_match("ss?d.service", "sshd.service"));
        assert!(!glob_match("sshd.service", "sshd.service.d"));
        assert!(!glob_match("systemd-*", "my-systemd-thing.service"));
        assert!(glob_match("*-protected.*", "demo-protected.service"));
    }

    #[test]
    fn protected_names_and_aliases() {
        let patterns = v(&["sshd.service", "systemd-*", "dbus"]);
        assert_eq!(
            protected_by(&patterns, &v(&["sshd.service"])),
            Some("sshd.service")
        );
        // systemd reads `sshd` as `sshd.service`.
        assert_eq!(protected_by(&patterns, &v(&["sshd"])), Some("sshd.service"));
        assert_eq!(protected_by(&patterns, &v(&["dbus.service"])), Some("dbus"));
        // An alias of a protected unit is protected.
        assert_eq!(
            protected_by(&patterns, &v(&["ssh.service", "sshd.service"])),
            Some("sshd.service")
        );
        assert_eq!(
            protected_by(&patterns, &v(&["systemd-networkd.service"])),
            Some("systemd-*")
        );
        assert_eq!(protected_by(&patterns, &v(&["nginx.service"])), None);
        assert_eq!(protected_by(&patterns, &v(&["dbus.socket"])), None);
        assert_eq!(protected_by(&[], &v(&["sshd.service"])), None);
    }

    #[test]
    fn names_get_their_suffix() {
        assert_eq!(full_name("nginx"), "nginx.service");
        assert_eq!(full_name("nginx.service"), "nginx.service");
        assert_eq!(full_name("backup.timer"), "backup.timer");
        assert_eq!(full_name("getty@tty1"), "getty@tty1.service");
    }

    #[test]
    fn state_text() {
        let mut s = UnitState {
            load_state: "loaded".into(),
            active_state: "active".into(),
            sub_state: "running".into(),
            main_pid: Some(42),
            result: Some("success".into()),
            names: v(&["x.service"]),
        };
        assert_eq!(s.to_string(), "active/running (main pid 42)");
        s.active_state = "failed".into();
        s.sub_state = "failed".into();
        s.main_pid = None;
        s.result = Some("exit-code".into());
        assert_eq!(s.to_string(), "failed/failed (result exit-code)");
        s.result = Some("success".into());
        s.active_state = "inactive".into();
        s.sub_state = "dead".into();
        assert_eq!(s.to_string(), "inactive/dead");
    }
}
