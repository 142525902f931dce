//! outpost against a real systemd, booted in a container with
//! systemd-nspawn (see `outpost_tests::nspawn`). Needs root; fails, never
//! skips, when it cannot boot the container.
//!
//! The tests run in parallel threads, so each boots its own container; that
//! also checks that concurrent containers do not collide.

use std::path::Path;
use std::time::{Duration, Instant};

use outpost::collect::systemd::SystemdCollector;
use outpost::collect::Sample;
use outpost_tests::nspawn::{outpost_binary, Systemd};

const DEMO_OK: &str = "\
[Unit]
Description=outpost test: a service that stays up

[Service]
ExecStart=/bin/sleep infinity
";

const DEMO_FAIL: &str = "\
[Unit]
Description=outpost test: a service that fails at once

[Service]
ExecStart=/bin/false
Restart=no
";

/// Polls `check` until it returns Some, or panics with the last value.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `ActiveState/SubState` of a unit inside.
fn unit_state(sd: &Systemd, unit: &str) -> String {
    let p = sd
        .unit_properties(unit, &["ActiveState", "SubState"])
        .expect("systemctl show");
    format!("{}/{}", p[0], p[1])
}

#[test]
fn harness_boots_an_isolated_container_and_cleans_up() {
    let host_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let sd = Systemd::boot().expect("boot systemd in nspawn");
    let root = sd.root().to_path_buf();
    let leader = sd.leader_pid();

    // PID 1 inside is systemd, and the container is its own machine.
    assert_eq!(sd.sh("cat /proc/1/comm").expect("comm").trim(), "systemd");
    let id = sd.sh("cat /etc/machine-id").expect("machine-id");
    let id = id.trim();
    assert_eq!(id.len(), 32, "machine-id {id:?}");
    assert_ne!(
        id,
        host_id.trim(),
        "the container reuses the host's machine id"
    );
    assert_eq!(sd.sh("hostname").expect("hostname").trim(), sd.name());
    assert_eq!(
        sd.sh("systemd-detect-virt --container")
            .expect("detect-virt")
            .trim(),
        "systemd-nspawn"
    );

    // Files written from the host show up inside, under /run (tmpfs) too,
    // and files written inside show up in the overlay root.
    sd.write_file("/run/outpost-test/hello", "from the host\n")
        .expect("write under /run");
    assert_eq!(
        sd.sh("cat /run/outpost-test/hello").expect("cat"),
        "from the host\n"
    );
    sd.sh("echo from inside > /etc/outpost-test-marker")
        .expect("write inside");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/outpost-test-marker")).expect("read marker"),
        "from inside\n"
    );
    assert!(
        !Path::new("/etc/outpost-test-marker").exists(),
        "a write inside leaked to the host"
    );
    // The freshly built binary is visible inside at the same path.
    let bin = outpost_binary().expect("outpost binary");
    sd.sh(&format!("test -x {}", bin.display()))
        .expect("the outpost binary is visible inside");

    // sh reports failures with their output.
    let err = sd
        .sh("echo to-stderr >&2; exit 3")
        .expect_err("exit 3 must fail");
    assert!(format!("{err:#}").contains("to-stderr"), "{err:#}");

    drop(sd);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&*root.to_string_lossy()),
        "overlay still mounted"
    );
    assert!(!root.exists(), "scratch dir {} left behind", root.display());
    assert!(
        !Path::new(&format!("/proc/{leader}")).exists(),
        "container PID 1 ({leader}) still alive"
    );
}

#[test]
fn systemd_collector_reads_units_over_the_containers_bus() {
    let sd = Systemd::boot().expect("boot systemd in nspawn");
    sd.install_unit("demo-ok.service", DEMO_OK)
        .expect("install demo-ok");
    sd.install_unit("demo-fail.service", DEMO_FAIL)
        .expect("install demo-fail");
    sd.sh("systemctl start demo-ok.service")
        .expect("start demo-ok");
    // Type=simple: the start job succeeds, then /bin/false exits 1.
    let _ = sd.exec(&["systemctl", "start", "demo-fail.service"]);
    wait_for(
        "demo-fail to fail",
        Duration::from_secs(20),
        || match unit_state(&sd, "demo-fail.service").as_str() {
            "failed/failed" => Ok(()),
            s => Err(s.to_string()),
        },
    );
    assert_eq!(unit_state(&sd, "demo-ok.service"), "active/running");
    let mem_inside = sd
        .unit_properties("demo-ok.service", &["MemoryCurrent"])
        .expect("MemoryCurrent")
        .remove(0);
    let mem_known = mem_inside.parse::<u64>().is_ok();
    eprintln!("demo-ok MemoryCurrent inside: {mem_inside}");

    // The collector connects to "the system bus"; point it at the
    // container's. This test binary is its own process, and the harness
    // runs commands inside with a clean environment, so this reaches only
    // the host-side client.
    std::env::set_var("DBUS_SYSTEM_BUS_ADDRESS", sd.system_bus_address());

    let cfg = outpost::config::parse_str(
        r#"
[[target]]
name = "ok"
kind = "systemd"
unit = "demo-ok.service"

[[target]]
name = "bad"
kind = "systemd"
unit = "demo-fail.service"

[[target]]
name = "gone"
kind = "systemd"
unit = "no-such-unit-outpost-test.service"
"#,
        "test",
    )
    .expect("config");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sample = rt.block_on(async {
        let mut collector = SystemdCollector::new(&cfg.targets);
        // Two rounds: rates such as cpu_pct need a previous reading.
        let mut sample = Sample::new(0);
        collector.collect(Instant::now(), &mut sample).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let mut sample = Sample::new(1);
        collector.collect(Instant::now(), &mut sample).await;
        sample
    });
    eprintln!("values: {:?}", sample.values);
    eprintln!("targets: {:#?}", sample.targets);

    let status = |name: &str| {
        sample
            .targets
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no status for target {name}: {:?}", sample.targets))
            .clone()
    };

    let ok = status("ok");
    assert_eq!(ok.kind, "systemd");
    assert_eq!(ok.state, "active/running", "{ok:?}");
    assert!(ok.up, "{ok:?}");
    assert_eq!(sample.get("target.ok.up"), Some(1.0));
    assert_eq!(sample.get("target.ok.restarts"), Some(0.0));
    match sample.get("target.ok.mem_mb") {
        Some(mb) => assert!(mb > 0.0 && mb < 1024.0, "mem_mb {mb}"),
        None => assert!(
            !mem_known,
            "systemd knows MemoryCurrent={mem_inside} but the collector gave no mem_mb"
        ),
    }
    if let Some(cpu) = sample.get("target.ok.cpu_pct") {
        assert!(cpu >= 0.0, "cpu_pct {cpu}");
    }

    let bad = status("bad");
    assert!(bad.state.starts_with("failed"), "{bad:?}");
    assert!(!bad.up, "{bad:?}");
    assert_eq!(sample.get("target.bad.up"), Some(0.0));

    let gone = status("gone");
    assert_eq!(gone.state, "not found", "{gone:?}");
    assert!(!gone.up, "{gone:?}");
    assert_ne!(sample.get("target.gone.up"), Some(1.0));
}

#[test]
fn outpost_runs_as_a_notify_service_under_real_systemd() {
    let bin = outpost_binary().expect("outpost binary");
    let sd = Systemd::boot().expect("boot systemd in nspawn");
    sd.install_unit("demo-ok.service", DEMO_OK)
        .expect("install demo-ok");
    sd.sh("systemctl start demo-ok.service")
        .expect("start demo-ok");
    sd.write_file(
        "/etc/outpost/outpost.toml",
        r#"
[agent]
node_id = "nspawn-test"
state_dir = "/var/lib/outpost"
sample_interval_ms = 500

[[target]]
name = "ok"
kind = "systemd"
unit = "demo-ok.service"

[[target]]
name = "gone"
kind = "systemd"
unit = "no-such-unit-outpost-test.service"
"#,
    )
    .expect("write config");
    sd.install_unit(
        "outpost.service",
        &format!(
            "\
[Unit]
Description=outpost agent (test)

[Service]
Type=notify
ExecStart={} run --config /etc/outpost/outpost.toml
WatchdogSec=5
TimeoutStartSec=30
Restart=no
",
            bin.display()
        ),
    )
    .expect("install outpost.service");

    // Type=notify: `systemctl start` returns once READY=1 arrived (or fails).
    let started = sd
        .exec(&["systemctl", "start", "outpost.service"])
        .expect("systemctl");
    if !started.status.success() {
        panic!(
            "outpost.service did not start: {}\n{}",
            String::from_utf8_lossy(&started.stderr),
            sd.journal_tail(80)
        );
    }
    assert_eq!(
        unit_state(&sd, "outpost.service"),
        "active/running",
        "{}",
        sd.journal_tail(80)
    );
    let status_text = wait_for("a StatusText with signals", Duration::from_secs(20), || {
        let t = sd
            .unit_properties("outpost.service", &["StatusText"])
            .map_err(|e| format!("{e:#}"))?
            .remove(0);
        if t.contains("signals") {
            Ok(t)
        } else {
            Err(t)
        }
    });
    eprintln!("StatusText: {status_text}");

    // Under systemd the logs go to the journal with structured fields:
    // tracing's `signals = N` on the "collecting" line becomes SIGNALS=N.
    let journal = wait_for(
        "structured log fields in the journal",
        Duration::from_secs(10),
        || {
            let out = sd
                .sh("journalctl -u outpost.service -o verbose --no-pager")
                .map_err(|e| format!("{e:#}"))?;
            if out.contains("MESSAGE=collecting") && out.contains("SIGNALS=") {
                Ok(out)
            } else {
                Err(out)
            }
        },
    );
    assert!(journal.contains("SYSLOG_IDENTIFIER=outpost"), "{journal}");

    // `outpost status --json` inside talks to the running agent.
    let doc = wait_for(
        "live status with both targets",
        Duration::from_secs(20),
        || {
            let out = sd
                .sh(&format!(
                    "{} status --json --config /etc/outpost/outpost.toml",
                    bin.display()
                ))
                .map_err(|e| format!("{e:#}"))?;
            let doc: serde_json::Value =
                serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
            let n = doc["live"]["targets"].as_array().map_or(0, Vec::len);
            if doc["running"] == true && n == 2 {
                Ok(doc)
            } else {
                Err(out)
            }
        },
    );
    let targets = doc["live"]["targets"].as_array().expect("targets");
    let find = |name: &str| {
        targets
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {doc:#}"))
    };
    assert_eq!(find("ok")["state"], "active/running", "{doc:#}");
    assert_eq!(find("ok")["up"], true, "{doc:#}");
    assert_eq!(find("gone")["state"], "not found", "{doc:#}");
    assert_eq!(find("gone")["up"], false, "{doc:#}");

    // WatchdogSec=5: an agent that stopped pinging would be killed with
    // Result=watchdog by now.
    assert_eq!(
        sd.unit_properties("outpost.service", &["WatchdogUSec"])
            .expect("show")[0],
        "5s"
    );
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        unit_state(&sd, "outpost.service"),
        "active/running",
        "watchdog: {}",
        sd.journal_tail(80)
    );
    let restarts = sd
        .unit_properties("outpost.service", &["NRestarts", "Result"])
        .expect("show");
    assert_eq!(restarts, ["0", "success"], "{}", sd.journal_tail(80));

    // A clean stop: SIGTERM, and the agent exits within TimeoutStopSec.
    sd.sh("systemctl stop outpost.service").expect("stop");
    let after = sd
        .unit_properties("outpost.service", &["ActiveState", "Result"])
        .expect("show");
    assert_eq!(after, ["inactive", "success"], "{}", sd.journal_tail(80));
}
