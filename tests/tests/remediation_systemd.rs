//! Remediation end to end under a real systemd: outpost runs as a
//! `Type=notify` service (as root) in an nspawn container, watches demo
//! units there, and acts on them through systemd's D-Bus API. Every test
//! reads the audit back through the real CLI (`outpost actions --json`),
//! checks the world (MainPID, HTTP, the process table) rather than trusting
//! the audit alone, and records every job request sent to systemd with a
//! `busctl monitor` as independent evidence of what outpost touched.
//!
//! Needs root; fails, never skips, when it cannot boot the container. Build
//! the binary first: `cargo build -p outpost --bin outpost`.

use std::time::{Duration, Instant};

use outpost_tests::nspawn::outpost_binary;
use outpost_tests::remediation::{
    decisions_of, format_rows, poll, AuditRow, BusWatch, Rig, CONFIG_PATH, WEB_PORT,
};

const WEB: &str = "demo-web.service";
const WEB_URL: &str = "http://127.0.0.1:8080/";

const HEAD: &str = r#"
[agent]
node_id = "n1"
state_dir = "/var/lib/outpost"
sample_interval_ms = 500
"#;

const WEB_TARGET: &str = r#"
[[target]]
name = "web"
kind = "systemd"
unit = "demo-web.service"
probe = { http = "http://127.0.0.1:8080/", interval_ms = 500, timeout_ms = 300 }
"#;

/// Unwraps, or panics with the error and what outpost did (audit, journal).
fn must<T>(rig: &Rig, what: &str, r: anyhow::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:#}\n{}", rig.diagnostics()),
    }
}

fn boot() -> Rig {
    let bin = outpost_binary().expect("outpost binary (cargo build -p outpost --bin outpost)");
    Rig::boot(bin).expect("boot systemd in nspawn")
}

fn count(rows: &[AuditRow], rule: &str, decision: &str) -> usize {
    rows.iter().filter(|r| r.is(rule, decision)).count()
}

/// The position of the first row of `rule` with `decision` (and, if given,
/// `decision_id`) after position `from`.
fn position(
    rows: &[AuditRow],
    from: usize,
    rule: &str,
    decision: &str,
    id: Option<u64>,
) -> Option<usize> {
    rows.iter()
        .enumerate()
        .skip(from)
        .find(|(_, r)| r.is(rule, decision) && id.is_none_or(|id| r.decision_id == id))
        .map(|(i, _)| i)
}

/// Stops outpost cleanly and checks the audit chain: the last word of every
/// test.
fn finish(rig: &Rig) {
    must(
        rig,
        "outpost is still running",
        rig.assert_outpost_running(),
    );
    let chain = must(rig, "outpost actions --verify-chain", rig.verify_chain());
    eprintln!("{}", chain.trim());
    must(rig, "stopping outpost", rig.stop_outpost());
}

/// (a) A hung HTTP service (SIGSTOP: it still accepts connections but never
/// answers) is restarted by outpost and verified healthy.
#[test]
fn hung_http_service_is_restarted_and_verified() {
    let rig = boot();
    let first = must(&rig, "demo web", rig.start_web(WEB, WEB_PORT));
    let bus = must(&rig, "bus monitor", BusWatch::start(&rig.sd));
    let config = format!(
        r#"{HEAD}{WEB_TARGET}
[[rule]]
name = "web-hung"
target = "web"
when = "probe_failed"
for = "2 samples"
do = "restart"
mode = "auto"
cooldown = "5s"
max_per_hour = 3
verify = "probe_ok within 10s"
escalate = "notify"

[guard]
max_actions_per_hour = 10
protected_units = ["demo-protected.service"]
approval_timeout = "20s"
"#
    );
    must(&rig, "start outpost", rig.start_outpost(&config));
    must(
        &rig,
        "outpost sees the service",
        rig.wait_probe_ok("web", Duration::from_secs(30)),
    );

    // A healthy service is left alone.
    std::thread::sleep(Duration::from_secs(2));
    let rows = must(&rig, "audit", rig.actions());
    assert!(
        decisions_of(&rows, "web-hung").is_empty(),
        "outpost decided something about a healthy service:\n{}",
        format_rows(&rows)
    );
    assert_eq!(must(&rig, "MainPID", rig.main_pid(WEB)), first);

    let hung = must(&rig, "SIGSTOP", rig.hang(WEB));
    let t0 = Instant::now();
    assert_eq!(rig.proc_state(hung).as_deref(), Some("T"), "not stopped");
    assert!(!rig.http_ok(WEB_URL), "a stopped server still answers");

    let rows = must(
        &rig,
        "acted then verify_ok for web-hung",
        rig.wait_audit(
            "web-hung: acted, then verify_ok",
            Duration::from_secs(30),
            |rows| {
                let acted = position(rows, 0, "web-hung", "acted", None)?;
                let id = rows[acted].decision_id;
                position(rows, acted + 1, "web-hung", "verify_ok", Some(id))?;
                Some(rows.to_vec())
            },
        ),
    );
    eprintln!(
        "hang to verify_ok in the audit: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    eprint!("{}", format_rows(&rows));

    // The world agrees: a new process answers, the hung one is gone.
    let now = must(&rig, "MainPID", rig.main_pid(WEB));
    assert!(
        now != hung && now != 0,
        "MainPID is {now} (hung pid {hung}):\n{}",
        rig.diagnostics()
    );
    assert!(rig.http_ok(WEB_URL), "the service does not answer");
    assert_eq!(
        rig.proc_state(hung),
        None,
        "the hung process is still there"
    );

    let acted = &rows[position(&rows, 0, "web-hung", "acted", None).expect("acted")];
    assert_eq!(acted.action, "restart", "{acted:?}");
    assert_eq!(acted.target, "web", "{acted:?}");

    // And stays done: one action, nothing failed or escalated.
    std::thread::sleep(Duration::from_secs(3));
    let rows = must(&rig, "audit", rig.actions());
    assert_eq!(
        count(&rows, "web-hung", "acted"),
        1,
        "{}",
        format_rows(&rows)
    );
    for bad in ["action_failed", "verify_failed", "escalated"] {
        assert_eq!(
            count(&rows, "web-hung", bad),
            0,
            "{bad}:\n{}",
            format_rows(&rows)
        );
    }
    assert_eq!(must(&rig, "MainPID", rig.main_pid(WEB)), now);
    let calls = must(&rig, "bus calls", bus.calls(WEB));
    assert_eq!(calls, ["RestartUnit"], "what outpost asked systemd to do");

    // The episode was one incident, closed once the service was verified.
    let incident = must(
        &rig,
        "a closed incident for web",
        poll(
            "a closed incident for web",
            Duration::from_secs(10),
            Duration::from_millis(250),
            || {
                let out = rig
                    .outpost_ok("incidents", &["--json"])
                    .map_err(|e| format!("{e:#}"))?;
                let doc: serde_json::Value =
                    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
                let web: Vec<&serde_json::Value> = doc
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|i| i["target"] == "web")
                    .collect();
                match web.as_slice() {
                    [one] if one["closed_ms"].is_i64() => Ok((*one).clone()),
                    _ => Err(out),
                }
            },
        ),
    );
    eprintln!("incident: {incident}");
    finish(&rig);
}

const CRASH: &str = "demo-crash.service";

/// A unit that never stays up; systemd restarts it forever (no start
/// limit), so it never reaches `failed` and only a probe sees it is broken.
const CRASH_LOOP_UNIT: &str = "\
[Unit]
Description=outpost test: a crash loop
StartLimitIntervalSec=0

[Service]
ExecStart=/bin/sh -c 'sleep 1; exit 1'
Restart=always
RestartSec=1
";

/// A unit that runs for a second and fails; nothing but outpost restarts it.
const FAILING_UNIT: &str = "\
[Unit]
Description=outpost test: fails after a second
StartLimitIntervalSec=0

[Service]
ExecStart=/bin/sh -c 'sleep 1; exit 1'
Restart=no
";

/// Runs `rule` (max_per_hour = 2, cooldown 2 s) against `unit` until it
/// escalated, watches 8 s more, and checks: exactly two `acted`, then one
/// `escalated` (notify), suppressions naming the budget, no action after the
/// escalation, and exactly two restart requests on the bus.
fn budget_trips(unit_text: &str, probe: &str, when: &str, verify: &str) {
    let rig = boot();
    must(
        &rig,
        "install the unit",
        rig.sd.install_unit(CRASH, unit_text),
    );
    let _ = rig.sd.exec(&["systemctl", "start", CRASH]);
    let bus = must(&rig, "bus monitor", BusWatch::start(&rig.sd));
    let config = format!(
        r#"{HEAD}
[[target]]
name = "crash"
kind = "systemd"
unit = "{CRASH}"
{probe}

[[rule]]
name = "crash-loop"
target = "crash"
when = "{when}"
for = "2 samples"
do = "restart"
mode = "auto"
cooldown = "2s"
max_per_hour = 2
verify = "{verify}"
escalate = "notify"

[guard]
max_actions_per_hour = 10
"#
    );
    let restarts = || -> u64 {
        must(
            &rig,
            "NRestarts",
            rig.sd.unit_properties(CRASH, &["NRestarts"]),
        )[0]
        .parse()
        .expect("NRestarts")
    };
    let n_before = restarts();
    must(&rig, "start outpost", rig.start_outpost(&config));

    must(
        &rig,
        "escalated",
        rig.wait_audit(
            "crash-loop: two acted, then escalated",
            Duration::from_secs(60),
            |rows| position(rows, 0, "crash-loop", "escalated", None),
        ),
    );
    // Keep watching: the condition still holds, and nothing more happens.
    let rows_then = must(&rig, "audit", rig.actions());
    std::thread::sleep(Duration::from_secs(8));
    let rows = must(&rig, "audit", rig.actions());
    eprint!("{}", format_rows(&rows));
    for rows in [&rows_then, &rows] {
        let acted = count(rows, "crash-loop", "acted");
        assert_eq!(acted, 2, "acted rows:\n{}", format_rows(rows));
        assert_eq!(
            count(rows, "crash-loop", "escalated"),
            1,
            "escalated rows:\n{}",
            format_rows(rows)
        );
        assert_eq!(
            count(rows, "crash-loop", "action_failed"),
            0,
            "{}",
            format_rows(rows)
        );
    }
    // Order: both actions, then the escalation.
    let second = position(&rows, 0, "crash-loop", "acted", None)
        .and_then(|first| position(&rows, first + 1, "crash-loop", "acted", None))
        .expect("two acted rows");
    let escalated = position(&rows, 0, "crash-loop", "escalated", None).expect("escalated");
    assert!(
        second < escalated,
        "escalated before the budget was spent:\n{}",
        format_rows(&rows)
    );
    assert_eq!(rows[escalated].action, "notify", "{:?}", rows[escalated]);
    // Suppressed because of the budget, and said so.
    assert!(
        rows[second + 1..]
            .iter()
            .any(|r| r.is("crash-loop", "suppressed") && r.reason.contains("budget")),
        "no suppression naming the budget:\n{}",
        format_rows(&rows)
    );
    for r in rows[escalated + 1..]
        .iter()
        .filter(|r| r.is("crash-loop", "suppressed"))
    {
        assert!(
            r.reason.contains("budget"),
            "a suppression after the escalation that does not name the budget: {r:?}"
        );
    }
    // A restarted agent does not get a fresh budget: the spent budget and
    // the escalation are persisted, so it stays quiet.
    must(
        &rig,
        "restart outpost",
        rig.sd.sh("systemctl restart outpost.service"),
    );
    std::thread::sleep(Duration::from_secs(5));
    let after_restart = must(&rig, "audit", rig.actions());
    for (decision, n) in [("acted", 2), ("escalated", 1)] {
        assert_eq!(
            count(&after_restart, "crash-loop", decision),
            n,
            "{decision} after restarting outpost:\n{}",
            format_rows(&after_restart)
        );
    }
    // systemd saw exactly two restart requests for the unit.
    let calls = must(&rig, "bus calls", bus.calls(CRASH));
    assert_eq!(
        calls,
        ["RestartUnit", "RestartUnit"],
        "what outpost asked systemd to do"
    );
    eprintln!(
        "{CRASH}: NRestarts (systemd's own) {n_before} -> {}; restarts asked by outpost: 2",
        restarts()
    );
    finish(&rig);
}

/// (b) A crash-looping unit (Restart=always) whose probe never passes trips
/// the rule's budget: two restarts, each verified and failed, then one
/// escalation and suppression naming the budget.
#[test]
fn crash_loop_trips_the_budget_and_escalates_once() {
    budget_trips(
        CRASH_LOOP_UNIT,
        r#"probe = { http = "http://127.0.0.1:8081/", interval_ms = 500, timeout_ms = 300 }"#,
        "probe_failed",
        "probe_ok within 4s",
    );
}

/// (b') A unit that keeps failing (`unit_failed`): each restart is
/// verified active, it fails again, and the third episode meets the spent
/// budget: suppressed (rule budget) and escalated once.
#[test]
fn failing_unit_trips_the_budget_and_escalates_once() {
    budget_trips(FAILING_UNIT, "", "unit_failed", "unit_active within 5s");
}

const BROKEN: &str = "demo-broken.service";

/// A unit that cannot start: its start job always fails.
const BROKEN_UNIT: &str = "\
[Unit]
Description=outpost test: cannot start
StartLimitIntervalSec=0

[Service]
ExecStartPre=/bin/false
ExecStart=/bin/sleep infinity
";

/// (e) An action that fails (systemd's restart job fails) is audited as
/// `action_failed`, once, escalates at once, and is not retried.
#[test]
fn failed_restart_is_audited_once_and_escalated() {
    let rig = boot();
    must(
        &rig,
        "install the unit",
        rig.sd.install_unit(BROKEN, BROKEN_UNIT),
    );
    let _ = rig.sd.exec(&["systemctl", "start", BROKEN]);
    must(
        &rig,
        "the unit to fail",
        poll(
            "the unit to be failed",
            Duration::from_secs(20),
            Duration::from_millis(200),
            || {
                let p = rig
                    .sd
                    .unit_properties(BROKEN, &["ActiveState"])
                    .map_err(|e| format!("{e:#}"))?;
                if p[0] == "failed" {
                    Ok(())
                } else {
                    Err(p[0].clone())
                }
            },
        ),
    );
    let bus = must(&rig, "bus monitor", BusWatch::start(&rig.sd));
    let config = format!(
        r#"{HEAD}
[[target]]
name = "broken"
kind = "systemd"
unit = "{BROKEN}"

[[rule]]
name = "broken-restart"
target = "broken"
when = "unit_failed"
for = "2 samples"
do = "restart"
mode = "auto"
cooldown = "1s"
max_per_hour = 5
verify = "unit_active within 5s"
escalate = "notify"

[guard]
max_actions_per_hour = 10
"#
    );
    must(&rig, "start outpost", rig.start_outpost(&config));
    must(
        &rig,
        "escalated",
        rig.wait_audit(
            "broken-restart: escalated",
            Duration::from_secs(30),
            |rows| position(rows, 0, "broken-restart", "escalated", None),
        ),
    );
    std::thread::sleep(Duration::from_secs(6));
    let rows = must(&rig, "audit", rig.actions());
    eprint!("{}", format_rows(&rows));
    let calls = must(&rig, "bus calls", bus.calls(BROKEN));
    assert_eq!(calls, ["RestartUnit"], "what outpost asked systemd to do");
    let failed: Vec<&AuditRow> = rows
        .iter()
        .filter(|r| r.is("broken-restart", "action_failed"))
        .collect();
    assert!(
        failed.first().is_some_and(|r| r.reason.contains("failed")),
        "no action_failed saying what failed:\n{}",
        format_rows(&rows)
    );
    assert_eq!(
        count(&rows, "broken-restart", "acted"),
        0,
        "{}",
        format_rows(&rows)
    );
    assert_eq!(
        count(&rows, "broken-restart", "escalated"),
        1,
        "{}",
        format_rows(&rows)
    );
    assert_eq!(
        failed.len(),
        1,
        "one refused restart, audited {} times as action_failed:\n{}",
        failed.len(),
        format_rows(&rows)
    );
    assert_eq!(
        must(
            &rig,
            "state",
            rig.sd.unit_properties(BROKEN, &["ActiveState"])
        )[0],
        "failed"
    );
    finish(&rig);
}

const PROTECTED: &str = "demo-protected.service";

const PROTECTED_UNIT: &str = "\
[Unit]
Description=outpost test: a protected service

[Service]
ExecStart=/bin/sleep infinity
";

/// (c) A rule in auto mode whose condition holds, on a unit in
/// `guard.protected_units`: outpost records why it does not act and never
/// touches the unit.
#[test]
fn protected_unit_is_never_touched() {
    let rig = boot();
    must(
        &rig,
        "install demo-protected",
        rig.sd.install_unit(PROTECTED, PROTECTED_UNIT),
    );
    must(
        &rig,
        "start demo-protected",
        rig.sd.sh(&format!("systemctl start {PROTECTED}")),
    );
    let pid = must(&rig, "MainPID", rig.main_pid(PROTECTED));
    assert_ne!(pid, 0);
    let bus = must(&rig, "bus monitor", BusWatch::start(&rig.sd));
    // Nothing listens on port 9: probe_failed is true from the first sample.
    let config = format!(
        r#"{HEAD}
[[target]]
name = "guarded"
kind = "systemd"
unit = "{PROTECTED}"
probe = {{ tcp = "127.0.0.1:9", interval_ms = 500, timeout_ms = 300 }}

[[rule]]
name = "restart-protected"
target = "guarded"
when = "probe_failed"
for = "2 samples"
do = "restart"
mode = "auto"
cooldown = "1s"
max_per_hour = 100
verify = "unit_active within 5s"
escalate = "restart"

[guard]
max_actions_per_hour = 100
protected_units = ["{PROTECTED}"]
"#
    );
    // A rule on a protected unit is valid, with a warning.
    must(&rig, "start outpost", rig.start_outpost(&config));
    let check = rig
        .outpost(&["check-config", CONFIG_PATH])
        .expect("check-config");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    eprintln!("check-config: {}", said.trim());

    let row = must(
        &rig,
        "suppressed (protected)",
        rig.wait_audit(
            "restart-protected: suppressed",
            Duration::from_secs(30),
            |rows| {
                rows.iter()
                    .find(|r| r.is("restart-protected", "suppressed"))
                    .cloned()
            },
        ),
    );
    assert!(
        row.reason.contains("protected"),
        "the suppression does not say why: {row:?}"
    );
    assert_eq!(row.action, "restart", "{row:?}");
    // Several seconds with the condition true and cooldown 1 s.
    std::thread::sleep(Duration::from_secs(8));
    let rows = must(&rig, "audit", rig.actions());
    eprint!("{}", format_rows(&rows));
    let decisions = decisions_of(&rows, "restart-protected");
    assert!(
        decisions.iter().all(|d| *d == "suppressed"),
        "a protected unit got more than a suppression: {decisions:?}\n{}",
        format_rows(&rows)
    );
    for r in rows
        .iter()
        .filter(|r| r.is("restart-protected", "suppressed"))
    {
        assert!(r.reason.contains("protected"), "{r:?}");
    }
    assert_eq!(
        must(&rig, "MainPID", rig.main_pid(PROTECTED)),
        pid,
        "the protected unit was restarted"
    );
    let props = must(
        &rig,
        "properties",
        rig.sd
            .unit_properties(PROTECTED, &["ActiveState", "NRestarts"]),
    );
    assert_eq!(props, ["active", "0"]);
    let calls = must(&rig, "bus calls", bus.calls(PROTECTED));
    assert!(
        calls.is_empty(),
        "outpost asked systemd to act on a protected unit: {calls:?}"
    );
    finish(&rig);
}

/// (d) Approve mode: the first hang waits for `outpost approve ID`, then is
/// restarted and verified; the second is left unanswered and expires after
/// `guard.approval_timeout` without anything being touched.
#[test]
fn approve_mode_acts_only_when_approved_and_expires_otherwise() {
    let rig = boot();
    must(&rig, "demo web", rig.start_web(WEB, WEB_PORT));
    let bus = must(&rig, "bus monitor", BusWatch::start(&rig.sd));
    let config = format!(
        r#"{HEAD}{WEB_TARGET}
[[rule]]
name = "web-approve"
target = "web"
when = "probe_failed"
for = "2 samples"
do = "restart"
mode = "approve"
cooldown = "1s"
max_per_hour = 10
verify = "probe_ok within 10s"
escalate = "notify"

[guard]
max_actions_per_hour = 10
approval_timeout = "10s"
"#
    );
    must(&rig, "start outpost", rig.start_outpost(&config));
    must(
        &rig,
        "outpost sees the service",
        rig.wait_probe_ok("web", Duration::from_secs(30)),
    );

    // Episode 1: approved.
    let hung = must(&rig, "SIGSTOP", rig.hang(WEB));
    let waiting = must(
        &rig,
        "awaiting_approval",
        rig.wait_audit(
            "web-approve: awaiting_approval",
            Duration::from_secs(20),
            |rows| {
                rows.iter()
                    .find(|r| r.is("web-approve", "awaiting_approval"))
                    .cloned()
            },
        ),
    );
    let id = waiting.decision_id;
    eprintln!("awaiting approval: {waiting:?}");
    // Nothing happens while it waits.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(must(&rig, "MainPID", rig.main_pid(WEB)), hung);
    assert_eq!(rig.proc_state(hung).as_deref(), Some("T"));
    let rows = must(&rig, "audit", rig.actions());
    assert_eq!(
        count(&rows, "web-approve", "acted"),
        0,
        "acted without approval:\n{}",
        format_rows(&rows)
    );

    let answer = must(
        &rig,
        "outpost approve",
        rig.outpost_ok("approve", &[&id.to_string()]),
    );
    eprintln!("outpost approve {id}: {}", answer.trim());
    let rows = must(
        &rig,
        "approved, acted, verify_ok",
        rig.wait_audit(
            "web-approve: approved, acted, verify_ok",
            Duration::from_secs(30),
            |rows| {
                let a = position(rows, 0, "web-approve", "approved", Some(id))?;
                let b = position(rows, a + 1, "web-approve", "acted", Some(id))?;
                position(rows, b + 1, "web-approve", "verify_ok", Some(id))?;
                Some(rows.to_vec())
            },
        ),
    );
    eprint!("{}", format_rows(&rows));
    let restarted = must(&rig, "MainPID", rig.main_pid(WEB));
    assert!(restarted != hung && restarted != 0, "MainPID {restarted}");
    assert!(rig.http_ok(WEB_URL));
    assert_eq!(
        must(&rig, "bus calls", bus.calls(WEB)),
        ["RestartUnit"],
        "what outpost asked systemd to do"
    );

    // Episode 2: nobody answers. Let outpost see the service healthy first,
    // so this is a new episode.
    must(
        &rig,
        "healthy again",
        rig.wait_probe_ok("web", Duration::from_secs(20)),
    );
    std::thread::sleep(Duration::from_secs(2));
    let hung2 = must(&rig, "SIGSTOP", rig.hang(WEB));
    let waiting2 = must(
        &rig,
        "second awaiting_approval",
        rig.wait_audit(
            "web-approve: a second awaiting_approval",
            Duration::from_secs(20),
            |rows| {
                rows.iter()
                    .find(|r| r.is("web-approve", "awaiting_approval") && r.decision_id != id)
                    .cloned()
            },
        ),
    );
    let id2 = waiting2.decision_id;
    let t_wait = Instant::now();
    let expired = must(
        &rig,
        "expired",
        rig.wait_audit("web-approve: expired", Duration::from_secs(30), |rows| {
            rows.iter()
                .find(|r| r.is("web-approve", "expired") && r.decision_id == id2)
                .cloned()
        }),
    );
    eprintln!(
        "expired {:.1} s after the request was seen: {expired:?}",
        t_wait.elapsed().as_secs_f64()
    );
    let waited_ms = expired.ts_ms - waiting2.ts_ms;
    assert!(
        (9_000..=15_000).contains(&waited_ms),
        "expired {waited_ms} ms after the request; approval_timeout is 10 s"
    );
    // Answering too late changes nothing.
    let late = rig
        .outpost(&["approve", "--config", CONFIG_PATH, &id2.to_string()])
        .expect("outpost approve");
    assert!(
        !late.status.success(),
        "approving an expired request succeeded: {}",
        String::from_utf8_lossy(&late.stdout)
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        must(&rig, "MainPID", rig.main_pid(WEB)),
        hung2,
        "restarted without approval:\n{}",
        rig.diagnostics()
    );
    assert_eq!(rig.proc_state(hung2).as_deref(), Some("T"));
    let rows = must(&rig, "audit", rig.actions());
    eprint!("{}", format_rows(&rows));
    assert_eq!(
        count(&rows, "web-approve", "acted"),
        1,
        "{}",
        format_rows(&rows)
    );
    assert!(
        rows.iter()
            .filter(|r| r.decision_id == id2)
            .all(|r| !matches!(r.decision.as_str(), "approved" | "acted")),
        "the expired request acted:\n{}",
        format_rows(&rows)
    );
    assert_eq!(
        must(&rig, "bus calls", bus.calls(WEB)),
        ["RestartUnit"],
        "outpost touched the unit without approval"
    );
    finish(&rig);
}
