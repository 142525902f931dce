//! systemd unit targets, read over D-Bus from the system bus.
//!
//! The collector connects lazily on the first `collect` and calls
//! `Manager.Subscribe()` so systemd sends `PropertiesChanged` for its units;
//! the unit proxies cache the properties that emit changes (ActiveState,
//! SubState, NRestarts, MainPID), so a sample costs two D-Bus calls per
//! active service (CPUUsageNSec and MemoryCurrent, which never emit changes).
//!
//! Every sample has one deadline ([`CALL_TIMEOUT`]) for all its calls, so a
//! stuck bus never stalls sampling. Without a system bus or systemd, the
//! targets report `not available`, one line is logged, and the connection is
//! retried after [`RETRY_FIRST`], then less and less often, at most every
//! [`RETRY_INTERVAL`] (see [`Retry`]); a connection that breaks (the bus
//! daemon restarted) is re-established the same way, at once if it had
//! lasted, and one line says when systemd is back.
//!
//! A unit that does not exist (never did, or its file was removed and
//! systemd reloaded) reports `not found`; that is logged once when it
//! happens and once when the unit is back, and the unit is looked up afresh
//! every sample meanwhile, so a restored unit is read from scratch.

use std::time::{Duration, Instant};

use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};
use zbus_systemd::zbus;

use super::{target_signal, Availability, Retry, Sample, SignalName, TargetStatus};
use crate::config::{Target, TargetKind};

/// The budget for all D-Bus calls of one `collect`.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The first wait before connecting again to a missing or broken bus; it
/// doubles with every failed attempt, up to [`RETRY_INTERVAL`].
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two attempts to connect to the bus.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(30);
/// After this many samples in a row whose calls ran out of time, the
/// connection is considered stuck and replaced.
const MAX_TIMEOUTS_IN_A_ROW: u32 = 3;

const KIND: &str = "systemd";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
const MIB: f64 = 1024.0 * 1024.0;

/// Why systemd could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot connect to the system bus: {0}")]
    Connect(#[source] zbus::Error),
    #[error("systemd does not answer on the system bus: {0}")]
    Subscribe(#[source] zbus::Error),
    #[error("no answer from the system bus within {} ms", CALL_TIMEOUT.as_millis())]
    Timeout,
    #[error("D-Bus: {0}")]
    Bus(#[from] zbus::Error),
}

impl SystemdError {
    /// True when the error means the connection itself is gone.
    fn is_disconnect(&self) -> bool {
        matches!(self, SystemdError::Bus(zbus::Error::InputOutput(_)))
    }
}

/// Reads systemd unit targets.
pub struct SystemdCollector {
    units: Vec<UnitTarget>,
    /// `None`: the system bus (honours `DBUS_SYSTEM_BUS_ADDRESS`).
    address: Option<String>,
    bus: Option<Bus>,
    retry: Retry,
    availability: Availability,
    /// Why systemd is not available, for the targets' `detail`.
    reason: String,
    timeouts_in_a_row: u32,
}

/// A connection to systemd with `Manager.Subscribe()` done (the actuators
/// share this with the collector's way of connecting).
#[derive(Clone)]
pub(crate) struct Bus {
    pub(crate) conn: zbus::Connection,
    pub(crate) manager: ManagerProxy<'static>,
}

struct UnitTarget {
    name: String,
    unit: String,
    sig_up: SignalName,
    sig_restarts: SignalName,
    sig_cpu: SignalName,
    sig_mem: SignalName,
    proxies: Option<UnitProxies>,
    /// The last CPUUsageNSec reading, for the rate.
    last_cpu: Option<(Instant, u64)>,
    /// Whether the unit was last seen `not found` (logged once).
    missing: bool,
}

struct UnitProxies {
    unit: UnitProxy<'static>,
    /// Only for `.service` units.
    service: Option<ServiceProxy<'static>>,
}

/// What one unit looks like right now.
#[derive(Debug, Clone, PartialEq)]
struct Reading {
    load_state: Option<String>,
    active_state: String,
    sub_state: String,
    restarts: Option<u32>,
    main_pid: Option<u32>,
    cpu_ns: Option<u64>,
    mem_bytes: Option<u64>,
}

impl std::fmt::Debug for SystemdCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemdCollector")
            .field(
                "units",
                &self.units.iter().map(|u| &u.unit).collect::<Vec<_>>(),
            )
            .field("connected", &self.bus.is_some())
            .field("reason", &self.reason)
            .finish()
    }
}

impl SystemdCollector {
    /// Targets of kind Systemd. Connects to the system bus lazily on the
    /// first `collect`; without systemd or a bus, the targets report
    /// `not available` and the connection is retried with a back-off of
    /// 1 s doubling up to 30 s.
    pub fn new(targets: &[Target]) -> Self {
        Self::build(targets, None)
    }

    /// Like [`SystemdCollector::new`], on the bus at `address` (a D-Bus
    /// address such as `unix:path=/run/dbus/system_bus_socket`), e.g. the
    /// bus of a container under test.
    pub fn with_bus_address(targets: &[Target], address: impl Into<String>) -> Self {
        Self::build(targets, Some(address.into()))
    }

    fn build(targets: &[Target], address: Option<String>) -> Self {
        let units = targets
            .iter()
            .filter_map(|t| match &t.kind {
                TargetKind::Systemd { unit } => Some(UnitTarget {
                    name: t.name.clone(),
                    unit: unit.clone(),
                    sig_up: target_signal(&t.name, "up"),
                    sig_restarts: target_signal(&t.name, "restarts"),
                    sig_cpu: target_signal(&t.name, "cpu_pct"),
                    sig_mem: target_signal(&t.name, "mem_mb"),
                    proxies: None,
                    last_cpu: None,
                    missing: false,
                }),
                _ => None,
            })
            .collect();
        SystemdCollector {
            units,
            address,
            bus: None,
            retry: Retry::new(RETRY_FIRST, RETRY_INTERVAL),
            availability: Availability::default(),
            reason: "not connected yet".to_string(),
            timeouts_in_a_row: 0,
        }
    }

    /// Whether the collector holds a live connection to systemd.
    pub fn connected(&self) -> bool {
        self.bus.as_ref().is_some_and(|b| !b.conn.is_closed())
    }

    /// Reads every systemd target and adds its signals and status.
    pub async fn collect(&mut self, now: Instant, sample: &mut Sample) {
        if self.units.is_empty() {
            return;
        }
        if self.bus.as_ref().is_some_and(|b| b.conn.is_closed()) {
            self.disconnect(now, "the system bus connection closed".to_string());
        }
        // One budget for the whole sample, connecting included.
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        if self.bus.is_none() {
            self.try_connect(now, deadline).await;
        }
        let Some(bus) = &self.bus else {
            for unit in &self.units {
                sample.targets.push(status(
                    unit,
                    "not available",
                    false,
                    Some(self.reason.clone()),
                ));
            }
            return;
        };

        let mut lost: Option<String> = None;
        let mut timed_out = false;
        for unit in &mut self.units {
            if let Some(reason) = &lost {
                sample
                    .targets
                    .push(status(unit, "not available", false, Some(reason.clone())));
                continue;
            }
            let result = match tokio::time::timeout_at(deadline, read_unit(bus, unit)).await {
                Ok(r) => r,
                Err(_) => Err(SystemdError::Timeout),
            };
            match result {
                Ok(reading) => report(unit, &reading, now, sample),
                Err(e) => {
                    // A proxy whose cache failed to fill stays broken: rebuild
                    // it next time.
                    unit.proxies = None;
                    unit.last_cpu = None;
                    let text = e.to_string();
                    let state = if matches!(e, SystemdError::Timeout) {
                        timed_out = true;
                        lost = Some(text.clone());
                        "not available"
                    } else if e.is_disconnect() || bus.conn.is_closed() {
                        lost = Some(text.clone());
                        "not available"
                    } else {
                        tracing::debug!(unit = %unit.unit, error = %text, "cannot read unit");
                        "error"
                    };
                    sample.targets.push(status(unit, state, false, Some(text)));
                }
            }
        }

        if timed_out {
            self.timeouts_in_a_row += 1;
        } else {
            self.timeouts_in_a_row = 0;
        }
        match lost {
            Some(reason) if !timed_out => self.disconnect(now, reason),
            Some(reason) if self.timeouts_in_a_row >= MAX_TIMEOUTS_IN_A_ROW => {
                self.disconnect(now, reason)
            }
            _ => {}
        }
    }

    /// Drops the connection. A later `collect` connects again when the
    /// back-off says so (see [`Retry::lost`]).
    fn disconnect(&mut self, now: Instant, reason: String) {
        if self.availability.fail() {
            tracing::warn!(
                error = %reason,
                "lost systemd; systemd targets report \"not available\" until it is back"
            );
        }
        self.reason = reason;
        self.bus = None;
        self.retry.lost(now);
        self.timeouts_in_a_row = 0;
        for unit in &mut self.units {
            unit.proxies = None;
            unit.last_cpu = None;
        }
    }

    async fn try_connect(&mut self, now: Instant, deadline: tokio::time::Instant) {
        if !self.retry.attempt(now) {
            return;
        }
        let result = match tokio::time::timeout_at(deadline, connect(self.address.as_deref())).await
        {
            Ok(r) => r,
            Err(_) => Err(SystemdError::Timeout),
        };
        match result {
            Ok(bus) => {
                if self.availability.ok() {
                    tracing::info!("systemd available again");
                } else {
                    tracing::debug!("connected to systemd");
                }
                self.retry.connected(now);
                self.bus = Some(bus);
            }
            Err(e) => {
                self.retry.failed();
                if self.availability.fail() {
                    tracing::warn!(
                        error = %e,
                        "systemd not available; systemd targets report \"not available\""
                    );
                }
                self.reason = e.to_string();
            }
        }
    }
}

pub(crate) async fn connect(address: Option<&str>) -> Result<Bus, SystemdError> {
    let builder = match address {
        Some(a) => zbus::connection::Builder::address(a),
        None => zbus::connection::Builder::system(),
    };
    let conn = builder
        .method_timeout(CALL_TIMEOUT)
        .build()
        .await
        .map_err(SystemdError::Connect)?;
    let manager = ManagerProxy::new(&conn)
        .await
        .map_err(SystemdError::Subscribe)?;
    // Without a subscriber systemd sends no PropertiesChanged, and the
    // cached unit properties would never change.
    manager.subscribe().await.map_err(SystemdError::Subscribe)?;
    Ok(Bus { conn, manager })
}

async fn read_unit(bus: &Bus, unit: &mut UnitTarget) -> Result<Reading, SystemdError> {
    let proxies = match &unit.proxies {
        Some(p) => p,
        None => unit.proxies.insert(make_proxies(bus, &unit.unit).await?),
    };
    let active_state = proxies.unit.active_state().await?;
    let sub_state = proxies.unit.sub_state().await?;
    // LoadState never emits changes, so it is read fresh, and only when
    // it matters: an active unit is loaded.
    let load_state = if active_state == "active" || active_state == "reloading" {
        None
    } else {
        Some(proxies.unit.load_state().await?)
    };
    let mut reading = Reading {
        load_state,
        active_state,
        sub_state,
        restarts: None,
        main_pid: None,
        cpu_ns: None,
        mem_bytes: None,
    };
    if let Some(service) = &proxies.service {
        if reading.load_state.as_deref() != Some("not-found") {
            reading.restarts = Some(service.n_restarts().await?);
            reading.main_pid = Some(service.main_pid().await?).filter(|p| *p != 0);
            // A unit without processes has no cgroup to account.
            if reading.active_state != "inactive" && reading.active_state != "failed" {
                reading.cpu_ns = Some(service.cpu_usage_n_sec().await?).filter(|v| *v != u64::MAX);
                reading.mem_bytes =
                    Some(service.memory_current().await?).filter(|v| *v != u64::MAX);
            }
        }
    }
    Ok(reading)
}

async fn make_proxies(bus: &Bus, unit: &str) -> Result<UnitProxies, SystemdError> {
    let path = match bus.manager.get_unit(unit.to_string()).await {
        Ok(path) => path,
        // Not loaded right now: loading it tells whether it exists
        // (LoadState "not-found" when it does not).
        Err(zbus::Error::MethodError(name, _, _)) if name.as_str() == NO_SUCH_UNIT => {
            bus.manager.load_unit(unit.to_string()).await?
        }
        Err(e) => return Err(e.into()),
    };
    let unit_proxy = UnitProxy::builder(&bus.conn)
        .path(path.clone())
        .uncached_properties(&["LoadState"])
        .build()
        .await?;
    let service = if unit.ends_with(".service") {
        Some(ServiceProxy::builder(&bus.conn).path(path).build().await?)
    } else {
        None
    };
    Ok(UnitProxies {
        unit: unit_proxy,
        service,
    })
}

/// Adds the signals and status for one reading; logs once when the unit
/// goes missing and once when it is back.
fn report(unit: &mut UnitTarget, r: &Reading, now: Instant, sample: &mut Sample) {
    if r.load_state.as_deref() == Some("not-found") {
        if !unit.missing {
            unit.missing = true;
            tracing::warn!(
                target_name = %unit.name,
                unit = %unit.unit,
                "systemd unit not found; the target reports \"not found\" until it is back"
            );
        }
        unit.last_cpu = None;
        // systemd unloads a unit that is not found, and may load it afresh
        // (same object path) once its file is back: look it up again then,
        // rather than trust properties cached from the old one.
        unit.proxies = None;
        sample.push(&unit.sig_up, 0.0);
        sample.targets.push(status(
            unit,
            "not found",
            false,
            Some(format!("no unit {}", unit.unit)),
        ));
        return;
    }
    if unit.missing {
        unit.missing = false;
        tracing::info!(
            target_name = %unit.name,
            unit = %unit.unit,
            state = %format_args!("{}/{}", r.active_state, r.sub_state),
            "systemd unit found again"
        );
    }
    let up = r.active_state == "active";
    sample.push(&unit.sig_up, if up { 1.0 } else { 0.0 });
    if let Some(n) = r.restarts {
        sample.push(&unit.sig_restarts, f64::from(n));
    }
    match r.cpu_ns {
        Some(ns) => {
            if let Some(pct) = unit
                .last_cpu
                .and_then(|(t, prev)| cpu_pct(t, prev, now, ns))
            {
                sample.push(&unit.sig_cpu, pct);
            }
            unit.last_cpu = Some((now, ns));
        }
        None => unit.last_cpu = None,
    }
    if let Some(bytes) = r.mem_bytes {
        sample.push(&unit.sig_mem, bytes as f64 / MIB);
    }
    let detail = match (&r.load_state, r.main_pid) {
        (Some(load), _) if load != "loaded" => Some(format!("load state {load}")),
        (_, Some(pid)) => Some(format!("main pid {pid}")),
        _ => None,
    };
    let state = format!("{}/{}", r.active_state, r.sub_state);
    sample.targets.push(status(unit, &state, up, detail));
}

/// CPU time used between two readings as a percentage of one core; `None`
/// when the counter went backwards (the unit restarted) or no time passed.
fn cpu_pct(prev_at: Instant, prev_ns: u64, now: Instant, ns: u64) -> Option<f64> {
    let wall = now.checked_duration_since(prev_at)?.as_nanos();
    if wall == 0 || ns < prev_ns {
        return None;
    }
    Some((ns - prev_ns) as f64 / wall as f64 * 100.0)
}

fn status(unit: &UnitTarget, state: &str, up: bool, detail: Option<String>) -> TargetStatus {
    TargetStatus {
        name: unit.name.clone(),
        kind: KIND.to_string(),
        state: state.to_string(),
        up,
        probe: None,
        detail,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn target(name: &str, unit: &str) -> Target {
        Target {
            name: name.into(),
            kind: TargetKind::Systemd { unit: unit.into() },
            probe: None,
        }
    }

    fn unit_target(name: &str) -> UnitTarget {
        let c = SystemdCollector::new(&[target(name, &format!("{name}.service"))]);
        c.units.into_iter().next().unwrap()
    }

    #[test]
    fn cpu_rate() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        // 1 s of CPU in 2 s of wall time: half a core.
        assert_eq!(cpu_pct(t0, 1_000_000_000, t1, 2_000_000_000), Some(50.0));
        assert_eq!(cpu_pct(t0, 5, t1, 4), None);
        assert_eq!(cpu_pct(t0, 5, t0, 6), None);
    }

    #[test]
    fn active_service_signals_and_status() {
        let mut unit = unit_target("web");
        let t0 = Instant::now();
        let mut reading = Reading {
            load_state: None,
            active_state: "active".into(),
            sub_state: "running".into(),
            restarts: Some(2),
            main_pid: Some(1234),
            cpu_ns: Some(1_000_000_000),
            mem_bytes: Some(64 * 1024 * 1024),
        };
        let mut sample = Sample::new(0);
        report(&mut unit, &reading, t0, &mut sample);
        assert_eq!(sample.get("target.web.up"), Some(1.0));
        assert_eq!(sample.get("target.web.restarts"), Some(2.0));
        assert_eq!(sample.get("target.web.mem_mb"), Some(64.0));
        // No rate from a single reading.
        assert_eq!(sample.get("target.web.cpu_pct"), None);
        assert!(sample.get("target.web.main_pid").is_none());
        assert_eq!(
            sample.targets,
            vec![TargetStatus {
                name: "web".into(),
                kind: "systemd".into(),
                state: "active/running".into(),
                up: true,
                probe: None,
                detail: Some("main pid 1234".into()),
            }]
        );

        reading.cpu_ns = Some(1_250_000_000);
        let mut sample = Sample::new(0);
        report(
            &mut unit,
            &reading,
            t0 + Duration::from_secs(1),
            &mut sample,
        );
        let cpu = sample.get("target.web.cpu_pct").unwrap();
        assert!((cpu - 25.0).abs() < 1e-9, "{cpu}");
    }

    #[test]
    fn failed_and_missing_units() {
        let mut unit = unit_target("db");
        let reading = Reading {
            load_state: Some("loaded".into()),
            active_state: "failed".into(),
            sub_state: "failed".into(),
            restarts: Some(5),
            main_pid: None,
            cpu_ns: None,
            mem_bytes: None,
        };
        let mut sample = Sample::new(0);
        report(&mut unit, &reading, Instant::now(), &mut sample);
        assert_eq!(sample.get("target.db.up"), Some(0.0));
        assert_eq!(sample.get("target.db.restarts"), Some(5.0));
        assert_eq!(sample.targets[0].state, "failed/failed");
        assert!(!sample.targets[0].up);

        let missing = Reading {
            load_state: Some("not-found".into()),
            active_state: "inactive".into(),
            sub_state: "dead".into(),
            restarts: None,
            main_pid: None,
            cpu_ns: None,
            mem_bytes: None,
        };
        let mut sample = Sample::new(0);
        report(&mut unit, &missing, Instant::now(), &mut sample);
        assert_eq!(sample.get("target.db.up"), Some(0.0));
        assert_eq!(sample.targets[0].state, "not found");
        assert!(!sample.targets[0].up);
        assert!(unit.missing, "logged once, not every sample");
        assert!(unit.proxies.is_none(), "looked up afresh next time");

        // The unit file is back and the unit started: read as usual.
        let mut sample = Sample::new(0);
        report(&mut unit, &reading, Instant::now(), &mut sample);
        assert!(!unit.missing);
        assert_eq!(sample.targets[0].state, "failed/failed");
    }

    #[tokio::test]
    async fn no_bus_means_not_available_quickly() {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix:path={}", dir.path().join("no-bus").display());
        let targets = vec![
            target("web", "nginx.service"),
            Target {
                name: "host".into(),
                kind: TargetKind::Host,
                probe: None,
            },
        ];
        let mut c = SystemdCollector::with_bus_address(&targets, address);
        let now = Instant::now();
        let started = Instant::now();
        let ms = Duration::from_millis;
        // Attempts back off: at 0, 1 s later, 2 s after that.
        for (at, attempted) in [(0, 0), (500, 0), (1000, 1000), (2000, 1000), (3000, 3000)] {
            let mut sample = Sample::new(0);
            c.collect(now + ms(at), &mut sample).await;
            assert_eq!(sample.targets.len(), 1);
            let t = &sample.targets[0];
            assert_eq!(t.name, "web");
            assert_eq!(t.kind, "systemd");
            assert_eq!(t.state, "not available");
            assert!(!t.up);
            assert!(t.detail.is_some());
            assert!(sample.values.is_empty());
            assert_eq!(
                c.retry.last_attempt(),
                Some(now + ms(attempted)),
                "at {at} ms"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(!c.connected());
        assert!(c.availability.is_down());
        // Never more than RETRY_INTERVAL apart.
        let mut sample = Sample::new(0);
        c.collect(now + ms(3000) + RETRY_INTERVAL, &mut sample)
            .await;
        assert_eq!(
            c.retry.last_attempt(),
            Some(now + ms(3000) + RETRY_INTERVAL)
        );
    }

    #[tokio::test]
    async fn a_bus_that_never_answers_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent-bus");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut c = SystemdCollector::with_bus_address(
            &[target("web", "nginx.service")],
            format!("unix:path={}", path.display()),
        );
        let started = Instant::now();
        let mut sample = Sample::new(0);
        c.collect(Instant::now(), &mut sample).await;
        assert!(started.elapsed() < CALL_TIMEOUT + Duration::from_secs(1));
        assert_eq!(sample.targets[0].state, "not available");
        assert!(!c.connected());
    }

    #[tokio::test]
    async fn default_system_bus_never_panics() {
        // Whatever this machine has (no bus, a bus without systemd, or
        // systemd), collect answers within the budget with a status.
        let mut c = SystemdCollector::new(&[target("x", "outpost-test-nonexistent.service")]);
        let started = Instant::now();
        let mut sample = Sample::new(0);
        c.collect(Instant::now(), &mut sample).await;
        assert!(started.elapsed() < CALL_TIMEOUT + Duration::from_secs(1));
        assert_eq!(sample.targets.len(), 1);
        let state = &sample.targets[0].state;
        assert!(state == "not available" || state == "not found", "{state}");
        assert!(!sample.targets[0].up);
    }

    #[tokio::test]
    async fn no_systemd_targets_does_nothing() {
        let mut c = SystemdCollector::new(&[]);
        let mut sample = Sample::new(0);
        c.collect(Instant::now(), &mut sample).await;
        assert!(sample.targets.is_empty());
        assert!(c.retry.last_attempt().is_none());
    }
}
