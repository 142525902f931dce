//! The shipped `systemd/outpost.service`, unchanged, under a real systemd
//! booted in a container (see `outpost_tests::nspawn`), with the user from
//! `systemd/outpost.sysusers` and the directories from
//! `systemd/outpost.tmpfiles`. Needs root; fails, never skips.
//!
//! One test, in stages, because each stage needs the previous one: the
//! hardened unit starts and runs unprivileged; the watchdog pings keep it
//! up; a frozen agent is killed by the watchdog and restarted; and the
//! `systemd-analyze security` exposure stays where it was measured.

use std::time::{Duration, Instant};

use outpost_tests::nspawn::{outpost_binary, Systemd};

/// The real files, read at compile time: the test checks what ships.
const UNIT: &str = include_str!("../../systemd/outpost.service");
const SYSUSERS: &str = include_str!("../../systemd/outpost.sysusers");
const TMPFILES: &str = include_str!("../../systemd/outpost.tmpfiles");

/// Shortens the watchdog so the test runs in seconds; the only change to
/// the shipped unit.
const WATCHDOG_DROP_IN: &str = "\
[Service]
WatchdogSec=3s
Environment=OUTPOST_PAGE_RELEASE_AFTER=2
";

/// The watchdog period the drop-in sets.
const WATCHDOG: Duration = Duration::from_secs(3);

/// `systemd-analyze security` overall exposure measured for the shipped unit
/// on systemd 252 (Debian 12): 1.4 ("OK"). The test fails when a change
/// raises it above this (with room for rounding across systemd versions).
const MAX_EXPOSURE: f64 = 1.5;

const CONFIG: &str = r#"
[agent]
node_id = "unit-file-test"
sample_interval_ms = 500

# Read over the system bus: proves D-Bus works from inside the sandbox.
[[target]]
name = "journald"
kind = "systemd"
unit = "systemd-journald.service"
"#;

/// Polls `check` until it returns Ok, or panics with the last value.
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

/// `ActiveState/SubState`, `MainPID` and `NRestarts` of outpost.service.
fn service(sd: &Systemd) -> (String, u32, u32) {
    let p = sd
        .unit_properties(
            "outpost.service",
            &["ActiveState", "SubState", "MainPID", "NRestarts"],
        )
        .expect("systemctl show");
    (
        format!("{}/{}", p[0], p[1]),
        p[2].parse().expect("MainPID"),
        p[3].parse().expect("NRestarts"),
    )
}

/// The real uid of a process inside, from /proc/PID/status.
fn uid_of(sd: &Systemd, pid: u32) -> String {
    let status = sd
        .sh(&format!("cat /proc/{pid}/status"))
        .expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn shipped_unit_runs_hardened_and_the_watchdog_restarts_a_frozen_agent() {
    let bin = outpost_binary().expect("outpost binary");
    let sd = Systemd::boot().expect("boot systemd in nspawn");
    let journal = || sd.journal_tail(80);

    // Install as a package would: binary, user, directories, config, unit.
    sd.sh(&format!(
        "install -m 0755 {} /usr/bin/outpost",
        bin.display()
    ))
    .expect("install the binary");
    sd.write_file("/usr/lib/sysusers.d/outpost.conf", SYSUSERS)
        .expect("write sysusers");
    sd.sh("systemd-sysusers outpost.conf").expect("sysusers");
    let pw = sd.sh("getent passwd outpost").expect("user outpost");
    sd.sh("getent group outpost").expect("group outpost");
    assert!(pw.trim_end().ends_with(":/:/usr/sbin/nologin"), "{pw}");
    let uid = pw.split(':').nth(2).expect("uid").to_string();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u > 0 && u < 1000),
        "not a system uid: {pw}"
    );
    sd.write_file("/usr/lib/tmpfiles.d/outpost.conf", TMPFILES)
        .expect("write tmpfiles");
    sd.sh("systemd-tmpfiles --create outpost.conf")
        .expect("tmpfiles");
    assert_eq!(
        sd.sh("stat -c '%a %U:%G' /etc/outpost")
            .expect("stat")
            .trim(),
        "750 root:outpost"
    );
    sd.write_file("/etc/outpost/outpost.toml", CONFIG)
        .expect("write config");
    sd.install_unit("outpost.service", UNIT)
        .expect("install outpost.service");
    let verify = sd
        .exec(&["systemd-analyze", "verify", "outpost.service"])
        .expect("systemd-analyze verify");
    assert!(
        verify.status.success(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // (d) The exposure figure of the shipped unit, before any drop-in.
    let security = sd
        .sh("systemd-analyze security --no-pager outpost.service")
        .expect("systemd-analyze security");
    let overall = security
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("→ Overall exposure level for outpost.service:")
        })
        .unwrap_or_else(|| panic!("no overall exposure in:\n{security}"));
    let exposure: f64 = overall
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("odd exposure line {overall:?}"));
    eprintln!("systemd-analyze security: overall exposure {overall}");
    assert!(
        exposure <= MAX_EXPOSURE,
        "exposure {exposure} > {MAX_EXPOSURE}:\n{security}"
    );

    sd.write_file(
        "/etc/systemd/system/outpost.service.d/watchdog.conf",
        WATCHDOG_DROP_IN,
    )
    .expect("write drop-in");
    sd.sh("systemctl daemon-reload").expect("daemon-reload");

    // (a) Type=notify: `systemctl start` returns once READY=1 arrived.
    let started = sd
        .exec(&["systemctl", "start", "outpost.service"])
        .expect("systemctl");
    assert!(
        started.status.success(),
        "outpost.service did not start: {}\n{}",
        String::from_utf8_lossy(&started.stderr),
        journal()
    );
    let (state, pid, restarts) = service(&sd);
    assert_eq!(state, "active/running", "{}", journal());
    assert_eq!(restarts, 0);
    // The drop-in took (WatchdogUSec reads "infinity" until the unit runs).
    assert_eq!(
        sd.unit_properties("outpost.service", &["WatchdogUSec"])
            .expect("show")[0],
        "3s"
    );
    assert_eq!(uid_of(&sd, pid), uid, "not running as outpost");
    // The systemd target is read over D-Bus and found up.
    let status_text = wait_for("a StatusText with signals", Duration::from_secs(20), || {
        let t = sd
            .unit_properties("outpost.service", &["StatusText"])
            .map_err(|e| format!("{e:#}"))?
            .remove(0);
        if t.contains("signals") && t.contains("1/1 targets up") {
            Ok(t)
        } else {
            Err(t)
        }
    });
    eprintln!("StatusText: {status_text}");
    // StateDirectory: the store and the control socket, private to outpost.
    let state_dir = sd
        .sh("stat -c '%a %U:%G' /var/lib/outpost; ls /var/lib/outpost")
        .expect("state dir");
    assert!(state_dir.starts_with("700 outpost:outpost"), "{state_dir}");
    assert!(state_dir.contains("outpost.db"), "{state_dir}");
    // The control socket works through the sandbox (root client, as an
    // operator would run it; outside the unit there is no $STATE_DIRECTORY
    // and the config leaves state_dir to its default).
    let live = sd
        .sh("STATE_DIRECTORY=/var/lib/outpost outpost status --json --config /etc/outpost/outpost.toml")
        .expect("outpost status");
    let doc: serde_json::Value = serde_json::from_str(&live).expect("status json");
    assert_eq!(doc["running"], true, "{live}");

    // (b) Past twice the watchdog period, still the same process, never
    // restarted: the WATCHDOG=1 pings arrive.
    std::thread::sleep(WATCHDOG * 2 + Duration::from_secs(1));
    // Still the first process, running, never restarted.
    let same_agent = || {
        let (state, same_pid, restarts) = service(&sd);
        assert_eq!(
            (state.as_str(), same_pid, restarts),
            ("active/running", pid, 0),
            "{}",
            journal()
        );
    };
    same_agent();

    // The start-up page release (madvise, two seconds after start here)
    // runs under the unit's system-call filter and the agent keeps going.
    let released = wait_for("the start-up page release", Duration::from_secs(20), || {
        let log = sd
            .sh("journalctl -b --no-pager -o cat _SYSTEMD_UNIT=outpost.service SYSLOG_IDENTIFIER=outpost")
            .map_err(|e| format!("{e:#}"))?;
        if log.contains("start-up pages released") {
            Ok(log)
        } else {
            Err(log)
        }
    });
    assert!(!released.contains("could not release"), "{released}");
    same_agent();

    // The sandbox denies no required source: the agent logged no warning
    // (a /proc or /sys file it cannot read, a socket it may not open);
    // missing optional sources (pressure, thermal) log at info.
    let info = sd
        .sh("journalctl -b --no-pager -o cat _SYSTEMD_UNIT=outpost.service SYSLOG_IDENTIFIER=outpost")
        .expect("journal");
    assert!(info.contains("collecting"), "{info}");
    let warnings = sd
        .sh("journalctl -b --no-pager -o cat -p warning _SYSTEMD_UNIT=outpost.service SYSLOG_IDENTIFIER=outpost")
        .expect("journal");
    assert_eq!(
        warnings.trim(),
        "",
        "{}",
        sd.sh("journalctl -b --no-pager -o verbose _SYSTEMD_UNIT=outpost.service")
            .unwrap_or_default()
    );

    // ExecReload: SIGHUP re-reads the config in place.
    sd.sh("systemctl reload outpost.service").expect("reload");
    std::thread::sleep(Duration::from_secs(1));
    same_agent();

    // (c) A frozen agent stops pinging: systemd kills it on the watchdog
    // and Restart=always brings up a new one after RestartSec.
    sd.sh(&format!("kill -STOP {pid}")).expect("SIGSTOP");
    let new_pid = wait_for("a watchdog restart", Duration::from_secs(20), || {
        let (state, new_pid, restarts) = service(&sd);
        if state == "active/running" && restarts == 1 && new_pid != pid && new_pid != 0 {
            Ok(new_pid)
        } else {
            Err(format!("{state} pid {new_pid} restarts {restarts}"))
        }
    });
    let log = sd
        .sh("journalctl -u outpost.service --no-pager")
        .expect("journal");
    assert!(log.contains("Watchdog timeout"), "{log}");
    assert_eq!(uid_of(&sd, new_pid), uid);
    eprintln!("watchdog restart: pid {pid} -> {new_pid}");

    sd.sh("systemctl stop outpost.service").expect("stop");
    let after = sd
        .unit_properties("outpost.service", &["ActiveState", "Result"])
        .expect("show");
    assert_eq!(after, ["inactive", "success"], "{}", journal());
}
