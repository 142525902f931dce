//! SystemdCollector against a real systemd (a `systemd --user` manager on
//! its own bus): a running service, a failed one, a flapping one, a missing
//! one; a stop seen through the cached properties (PropertiesChanged after
//! Subscribe), and the manager going away.
//!
//! The harness installs systemd and dbus when missing; if the manager
//! cannot be started, this test fails.

use std::time::{Duration, Instant};

use outpost::collect::systemd::SystemdCollector;
use outpost::collect::{Sample, TargetStatus};
use outpost::config::{Target, TargetKind};
use outpost_tests::systemd::UserManager;

fn target(name: &str, unit: &str) -> Target {
    Target {
        name: name.into(),
        kind: TargetKind::Systemd { unit: unit.into() },
        probe: None,
    }
}

fn status(sample: &Sample, name: &str) -> TargetStatus {
    sample
        .targets
        .iter()
        .find(|t| t.name == name)
        .cloned()
        .unwrap_or_else(|| panic!("no status for {name}: {:?}", sample.targets))
}

async fn collect(c: &mut SystemdCollector) -> Sample {
    let mut sample = Sample::new(0);
    let started = Instant::now();
    c.collect(Instant::now(), &mut sample).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "collect took {:?}",
        started.elapsed()
    );
    sample
}

/// Collects until `name` reports `state` (the cache follows signals, which
/// arrive shortly after the change).
async fn collect_until(c: &mut SystemdCollector, name: &str, state: &str) -> Sample {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sample = collect(c).await;
        if status(&sample, name).state == state {
            return sample;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {state:?}: {:?}",
            status(&sample, name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn real_systemd_units() {
    let manager = UserManager::start().expect("systemd --user must start");
    manager
        .write_unit(
            "outpost-ok.service",
            "[Service]\nExecStart=/bin/sleep 600\n",
        )
        .expect("write unit");
    manager
        .write_unit(
            "outpost-fail.service",
            "[Service]\nExecStart=/bin/sh -c 'exit 3'\n",
        )
        .expect("write unit");
    manager
        .write_unit(
            "outpost-flap.service",
            "[Unit]\nStartLimitIntervalSec=0\n\n[Service]\nExecStart=/bin/sh -c 'sleep 0.2; exit 1'\nRestart=always\nRestartSec=100ms\n",
        )
        .expect("write unit");
    manager.start_unit("outpost-ok.service").expect("start ok");
    manager
        .start_unit("outpost-fail.service")
        .expect("start fail");
    manager
        .start_unit("outpost-flap.service")
        .expect("start flap");
    manager
        .wait_active_state("outpost-ok.service", "active", Duration::from_secs(10))
        .expect("ok starts");
    manager
        .wait_active_state("outpost-fail.service", "failed", Duration::from_secs(10))
        .expect("fail fails");

    let targets = vec![
        target("ok", "outpost-ok.service"),
        target("fail", "outpost-fail.service"),
        target("flap", "outpost-flap.service"),
        target("missing", "outpost-missing.service"),
    ];
    let mut c = SystemdCollector::with_bus_address(&targets, manager.bus_address());
    let sample = collect(&mut c).await;
    assert!(c.connected(), "{:?}\n{}", sample.targets, manager.log());
    println!("{:#?}\n{:?}", sample.targets, sample.values);

    let ok = status(&sample, "ok");
    assert_eq!(ok.kind, "systemd");
    assert_eq!(ok.state, "active/running");
    assert!(ok.up);
    let pid = manager
        .property("outpost-ok.service", "Service", "MainPID")
        .expect("MainPID");
    assert_eq!(
        ok.detail.as_deref(),
        Some(format!("main pid {}", pid.trim_start_matches("u ")).as_str())
    );
    assert_eq!(sample.get("target.ok.up"), Some(1.0));
    assert_eq!(sample.get("target.ok.restarts"), Some(0.0));
    // Memory accounting works for user services here; CPU accounting may
    // not (CPUUsageNSec is u64::MAX then, and the signal is left out).
    let mem = sample.get("target.ok.mem_mb");
    if manager
        .property("outpost-ok.service", "Service", "MemoryCurrent")
        .expect("MemoryCurrent")
        != "t 18446744073709551615"
    {
        assert!(mem.is_some_and(|m| m > 0.0 && m < 100.0), "{mem:?}");
    } else {
        assert_eq!(mem, None);
    }

    let fail = status(&sample, "fail");
    assert_eq!(fail.state, "failed/failed");
    assert!(!fail.up);
    assert_eq!(sample.get("target.fail.up"), Some(0.0));

    let missing = status(&sample, "missing");
    assert_eq!(missing.state, "not found");
    assert!(!missing.up);
    assert_eq!(sample.get("target.missing.up"), Some(0.0));

    // The flapping service's restart counter climbs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sample = collect(&mut c).await;
        let restarts = sample.get("target.flap.restarts").unwrap_or(0.0);
        if restarts >= 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flap restarts stuck at {restarts}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A stop reaches the cached properties.
    manager.stop_unit("outpost-ok.service").expect("stop");
    let sample = collect_until(&mut c, "ok", "inactive/dead").await;
    assert!(!status(&sample, "ok").up);
    assert_eq!(sample.get("target.ok.up"), Some(0.0));
    assert_eq!(sample.get("target.ok.mem_mb"), None);

    // And so does a start.
    manager
        .start_unit("outpost-ok.service")
        .expect("start again");
    let sample = collect_until(&mut c, "ok", "active/running").await;
    assert!(status(&sample, "ok").up);

    // A unit installed after the first look is found.
    manager
        .write_unit(
            "outpost-missing.service",
            "[Service]\nExecStart=/bin/sleep 600\n",
        )
        .expect("write unit");
    manager
        .start_unit("outpost-missing.service")
        .expect("start the late unit");
    let sample = collect_until(&mut c, "missing", "active/running").await;
    assert!(status(&sample, "missing").up);

    // The manager goes away: "not available", quickly, no panic.
    drop(manager);
    let sample = collect(&mut c).await;
    for t in &sample.targets {
        assert_eq!(t.state, "not available", "{t:?}");
        assert!(!t.up);
    }
    assert!(sample.values.is_empty(), "{:?}", sample.values);
    assert!(!c.connected());
}
