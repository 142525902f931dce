use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::collect::{Sample, TargetStatus};

const T0: i64 = 1_700_000_000_000;
const SEC: u64 = 1000;

fn status(name: &str, kind: &str, state: &str) -> TargetStatus {
    TargetStatus {
        name: name.into(),
        kind: kind.into(),
        state: state.into(),
        up: state.starts_with("active") || state.starts_with("running"),
        probe: None,
        detail: None,
    }
}

fn sample(values: &[(&str, f64)], targets: &[TargetStatus]) -> Sample {
    let mut s = Sample::new(0);
    for (n, v) in values {
        s.push(&Arc::from(*n), *v);
    }
    s.targets = targets.to_vec();
    s
}

fn probe(ok: bool) -> Sample {
    sample(&[("target.web.probe.ok", if ok { 1.0 } else { 0.0 })], &[])
}

fn nginx() -> ActionTarget {
    ActionTarget::Systemd {
        unit: "nginx.service".into(),
    }
}

fn rule(name: &str, when: Condition, action: ActionKind, mode: Mode) -> Rule {
    Rule {
        name: name.into(),
        target: "web".into(),
        action_target: nginx(),
        when,
        persist: Persist::Samples(1),
        action,
        mode,
        cooldown: Duration::from_secs(60),
        max_per_hour: 3,
        verify: Verify {
            check: VerifyCheck::ProbeOk,
            within: Duration::from_secs(20),
        },
        escalate: ActionKind::Notify,
    }
}

fn web_hung() -> Rule {
    Rule {
        persist: Persist::Samples(3),
        ..rule(
            "web-hung",
            Condition::ProbeFailed,
            ActionKind::Restart,
            Mode::Auto,
        )
    }
}

fn guard() -> GuardConfig {
    GuardConfig::with_state_dir(std::path::Path::new("/tmp/outpost-test"))
}

/// Drives the engine the way the pipeline does.
struct Harness {
    state: EngineState,
    rules: Vec<Rule>,
    guard: GuardConfig,
    wall: i64,
    mono: u64,
    paused: bool,
    dry_run: bool,
    anomaly: Vec<(String, f32)>,
    /// Report every Act as done (ok) right after it is decided.
    auto_ok: bool,
    log: Vec<Decision>,
}

impl Harness {
    fn new(rules: Vec<Rule>) -> Harness {
        Harness {
            state: EngineState::new(),
            rules,
            guard: guard(),
            wall: T0,
            mono: 0,
            paused: false,
            dry_run: false,
            anomaly: Vec::new(),
            auto_ok: true,
            log: Vec::new(),
        }
    }

    fn clock(&self) -> Clock {
        Clock {
            wall_ms: self.wall,
            mono_ms: self.mono,
        }
    }

    fn step_with(&mut self, dt_ms: u64, s: &Sample, approvals: &[Approval]) -> Vec<Decision> {
        self.wall += dt_ms as i64;
        self.mono += dt_ms;
        let input = Input {
            clock: self.clock(),
            sample: s,
            anomaly: &self.anomaly,
            approvals,
            paused: self.paused,
            dry_run: self.dry_run,
        };
        let mut out = decide(&input, &self.rules, &self.guard, &mut self.state);
        if self.auto_ok {
            let acts: Vec<u64> = out
                .iter()
                .filter(|d| d.outcome == Outcome::Act)
                .map(|d| d.id)
                .collect();
            let clock = self.clock();
            for id in acts {
                out.extend(on_action_result(&mut self.state, id, Ok(()), clock));
            }
        }
        self.log.extend(out.iter().cloned());
        out
    }

    fn step(&mut self, dt_ms: u64, s: &Sample) -> Vec<Decision> {
        self.step_with(dt_ms, s, &[])
    }

    /// `n` samples one second apart.
    fn run(&mut self, n: usize, s: &Sample) -> Vec<Decision> {
        (0..n).flat_map(|_| self.step(SEC, s)).collect()
    }

    fn count(&self, label: &str) -> usize {
        self.log
            .iter()
            .filter(|d| d.outcome.label() == label)
            .count()
    }
}

fn labels(ds: &[Decision]) -> Vec<String> {
    ds.iter().map(|d| d.outcome.label()).collect()
}

// ---------------------------------------------------------------- conditions

#[test]
fn condition_table() {
    let web_sys = |state: &str| status("web", "systemd", state);
    let web_ctr = |state: &str| status("web", "container", state);
    let th = |signal: &str, op, value| Condition::Threshold {
        signal: signal.into(),
        op,
        value,
    };
    let cases: Vec<(Condition, Sample, Truth)> = vec![
        (Condition::ProbeFailed, probe(false), Truth::True),
        (Condition::ProbeFailed, probe(true), Truth::False),
        (Condition::ProbeFailed, sample(&[], &[]), Truth::Unknown),
        (
            Condition::UnitFailed,
            sample(&[], &[web_sys("failed/failed")]),
            Truth::True,
        ),
        (
            Condition::UnitFailed,
            sample(&[], &[web_sys("active/running")]),
            Truth::False,
        ),
        (
            Condition::UnitFailed,
            sample(&[], &[web_sys("not available")]),
            Truth::Unknown,
        ),
        (Condition::UnitFailed, sample(&[], &[]), Truth::Unknown),
        (
            Condition::UnitInactive,
            sample(&[("target.web.up", 0.0)], &[]),
            Truth::True,
        ),
        (
            Condition::UnitInactive,
            sample(&[("target.web.up", 1.0)], &[]),
            Truth::False,
        ),
        (Condition::UnitInactive, sample(&[], &[]), Truth::Unknown),
        (
            Condition::ContainerExited,
            sample(&[], &[web_ctr("exited (code 3)")]),
            Truth::True,
        ),
        (
            Condition::ContainerExited,
            sample(&[], &[web_ctr("running (healthy)")]),
            Truth::False,
        ),
        (
            Condition::ContainerExited,
            sample(&[], &[web_ctr("error")]),
            Truth::Unknown,
        ),
        (
            Condition::ContainerUnhealthy,
            sample(&[("target.web.healthy", 0.0)], &[]),
            Truth::True,
        ),
        (
            Condition::ContainerUnhealthy,
            sample(&[("target.web.healthy", 1.0)], &[]),
            Truth::False,
        ),
        (
            Condition::ContainerUnhealthy,
            sample(&[("target.web.up", 1.0)], &[]),
            Truth::Unknown,
        ),
        (
            th("target.web.rss_mb", CmpOp::Gt, 500.0),
            sample(&[("target.web.rss_mb", 501.0)], &[]),
            Truth::True,
        ),
        (
            th("target.web.rss_mb", CmpOp::Gt, 500.0),
            sample(&[("target.web.rss_mb", 500.0)], &[]),
            Truth::False,
        ),
        (
            th("target.web.rss_mb", CmpOp::Ge, 500.0),
            sample(&[("target.web.rss_mb", 500.0)], &[]),
            Truth::True,
        ),
        (
            th("host.mem.used_pct", CmpOp::Lt, 10.0),
            sample(&[("host.mem.used_pct", 5.0)], &[]),
            Truth::True,
        ),
        (
            th("host.mem.used_pct", CmpOp::Le, 10.0),
            sample(&[("host.mem.used_pct", 11.0)], &[]),
            Truth::False,
        ),
        (
            th("target.web.up", CmpOp::Eq, 0.0),
            sample(&[("target.web.up", 0.0)], &[]),
            Truth::True,
        ),
        (
            th("target.web.up", CmpOp::Ne, 0.0),
            sample(&[("target.web.up", 0.0)], &[]),
            Truth::False,
        ),
        (
            th("host.mem.used_pct", CmpOp::Gt, 90.0),
            sample(&[("host.cpu.busy_pct", 99.0)], &[]),
            Truth::Unknown,
        ),
    ];
    for (cond, s, want) in cases {
        let obs = Observation {
            sample: &s,
            anomaly: &[],
        };
        assert_eq!(condition::evaluate(&cond, "web", &obs), want, "{cond}");
    }

    let s = sample(&[], &[]);
    let anomaly = Condition::Anomaly {
        op: CmpOp::Ge,
        score: 0.8,
    };
    for (scores, want) in [
        (vec![("web".to_string(), 0.9f32)], Truth::True),
        (vec![("web".to_string(), 0.8f32)], Truth::True),
        (vec![("web".to_string(), 0.5f32)], Truth::False),
        (vec![("db".to_string(), 0.9f32)], Truth::Unknown),
        (vec![("web".to_string(), f32::NAN)], Truth::Unknown),
        (vec![], Truth::Unknown),
    ] {
        let obs = Observation {
            sample: &s,
            anomaly: &scores,
        };
        assert_eq!(
            condition::evaluate(&anomaly, "web", &obs),
            want,
            "{scores:?}"
        );
    }
}

#[test]
fn verify_check_table() {
    let cases = [
        (VerifyCheck::ProbeOk, probe(true), Truth::True),
        (VerifyCheck::ProbeOk, probe(false), Truth::False),
        (VerifyCheck::ProbeOk, sample(&[], &[]), Truth::Unknown),
        (
            VerifyCheck::UnitActive,
            sample(&[("target.web.up", 1.0)], &[]),
            Truth::True,
        ),
        (
            VerifyCheck::UnitActive,
            sample(&[("target.web.up", 0.0)], &[]),
            Truth::False,
        ),
        (
            VerifyCheck::ContainerRunning,
            sample(&[], &[status("web", "container", "running (healthy)")]),
            Truth::True,
        ),
        (
            VerifyCheck::ContainerRunning,
            sample(&[], &[status("web", "container", "exited (code 1)")]),
            Truth::False,
        ),
        (VerifyCheck::ConditionClear, probe(true), Truth::True),
        (VerifyCheck::ConditionClear, probe(false), Truth::False),
        (
            VerifyCheck::ConditionClear,
            sample(&[], &[]),
            Truth::Unknown,
        ),
    ];
    for (c, s, want) in cases {
        let obs = Observation {
            sample: &s,
            anomaly: &[],
        };
        assert_eq!(
            condition::check(c, &Condition::ProbeFailed, "web", &obs),
            want,
            "{c:?}"
        );
    }
}

// ------------------------------------------------------------------- for

#[test]
fn for_counts_consecutive_samples_and_missing_data_restarts_it() {
    let mut h = Harness::new(vec![web_hung()]);
    assert!(h.step(SEC, &probe(false)).is_empty());
    assert!(h.step(SEC, &probe(false)).is_empty());
    // Missing data: never act on it, and the count starts again.
    assert!(h.step(SEC, &sample(&[], &[])).is_empty());
    assert!(h.step(SEC, &probe(false)).is_empty());
    assert!(h.step(SEC, &probe(false)).is_empty());
    let d = h.step(SEC, &probe(false));
    assert_eq!(labels(&d), ["act"]);
    assert_eq!(d[0].action, ActionKind::Restart);
    assert_eq!(d[0].action_target, nginx());
    assert!(
        d[0].reason.contains("probe_failed for 3 samples"),
        "{}",
        d[0].reason
    );
    assert!(d[0].reason.contains("1 of 3"), "{}", d[0].reason);
}

#[test]
fn for_duration_needs_the_condition_continuously() {
    let mut r = web_hung();
    r.persist = Persist::Duration(Duration::from_secs(30));
    let mut h = Harness::new(vec![r]);
    // True for 20 s, one good sample, then true again: the clock restarts.
    h.run(20, &probe(false));
    h.step(SEC, &probe(true));
    assert!(h.run(30, &probe(false)).is_empty());
    assert_eq!(labels(&h.step(SEC, &probe(false))), ["act"]);
}

// ---------------------------------------------------------------- guards

#[test]
fn verification_passes_and_cooldown_holds_the_next_action() {
    let mut h = Harness::new(vec![web_hung()]);
    h.run(3, &probe(false));
    assert_eq!(h.count("act"), 1);
    // While the restart is checked, the rule waits (recorded once).
    let d = h.run(5, &probe(false));
    assert_eq!(labels(&d), ["suppressed:verifying"]);
    let d = h.step(SEC, &probe(true));
    assert_eq!(labels(&d), ["verify_ok"]);
    assert!(d[0].reason.starts_with("probe_ok"), "{}", d[0].reason);
    assert_eq!(d[0].follows, Some(h.log[0].id));
    // It breaks again 10 s later: cooldown (60 s from the action), once.
    let d = h.run(40, &probe(false));
    assert_eq!(labels(&d), ["suppressed:cooldown"]);
    assert!(d[0].reason.contains("cooldown is 1m"), "{}", d[0].reason);
    let d = h.run(20, &probe(false));
    assert_eq!(labels(&d), ["act", "suppressed:verifying"]);
}

#[test]
fn rule_budget_escalates_once_then_stays_quiet() {
    let mut r = web_hung();
    r.cooldown = Duration::from_secs(1);
    r.persist = Persist::Samples(1);
    let mut h = Harness::new(vec![r]);
    // Each restart works, but the fault keeps coming back.
    for _ in 0..10 {
        h.step(SEC, &probe(false));
        h.step(SEC, &probe(true));
    }
    assert_eq!(h.count("act"), 3);
    assert_eq!(h.count("verify_ok"), 3);
    assert_eq!(h.count("suppressed:rule_budget"), 1);
    assert_eq!(h.count("escalate:notify"), 1);
    // The flapping fault is recorded as exhausted once, not once per flap.
    assert_eq!(h.count("suppressed:exhausted"), 1);
    let esc = h
        .log
        .iter()
        .find(|d| matches!(d.outcome, Outcome::Escalate { .. }))
        .expect("escalation");
    assert!(
        esc.reason.contains("rule budget spent: 3 actions"),
        "{}",
        esc.reason
    );
    // Later in the hour: still over budget, no action, no new escalation.
    for _ in 0..100 {
        h.step(10 * SEC, &probe(false));
        h.step(SEC, &probe(true));
    }
    assert_eq!(h.count("act"), 3);
    assert_eq!(h.count("escalate:notify"), 1);
    // Once the hour has passed and the fault is gone, the rule is back.
    h.step(HOUR_MS as u64, &probe(true));
    assert_eq!(labels(&h.step(SEC, &probe(false))), ["act"]);
}

#[test]
fn global_budget_binds_across_rules() {
    let mut a = web_hung();
    a.persist = Persist::Samples(1);
    let mut b = a.clone();
    b.name = "web-other".into();
    b.action = ActionKind::Exec("fix".into());
    let mut h = Harness::new(vec![a, b]);
    h.guard.max_actions_per_hour = 1;
    let d = h.step(SEC, &probe(false));
    assert_eq!(
        labels(&d),
        ["act", "suppressed:global_budget", "escalate:notify"]
    );
    assert!(
        d[1].reason.contains("guard.max_actions_per_hour = 1"),
        "{}",
        d[1].reason
    );
}

#[test]
fn notify_does_not_spend_the_global_budget() {
    let mut a = web_hung();
    a.persist = Persist::Samples(1);
    let mut n = rule(
        "tell",
        Condition::ProbeFailed,
        ActionKind::Notify,
        Mode::Auto,
    );
    n.max_per_hour = 5;
    let mut h = Harness::new(vec![n, a]);
    h.guard.max_actions_per_hour = 1;
    let d = h.step(SEC, &probe(false));
    assert_eq!(labels(&d), ["act", "act"]);
    assert_eq!(h.state.actions_last_hour(), 1);
    // Nothing to verify for notify.
    assert_eq!(h.state.verifications().len(), 1);
}

#[test]
fn protected_unit_is_never_touched_and_says_so_once_per_episode() {
    let mut r = rule(
        "ssh-down",
        Condition::ProbeFailed,
        ActionKind::Restart,
        Mode::Auto,
    );
    r.action_target = ActionTarget::Systemd {
        unit: "sshd.service".into(),
    };
    let mut exec = r.clone();
    exec.name = "ssh-exec".into();
    exec.action = ActionKind::Exec("fix".into());
    let mut h = Harness::new(vec![r, exec]);
    let d = h.run(50, &probe(false));
    assert_eq!(labels(&d), ["suppressed:protected", "suppressed:protected"]);
    assert!(d[0].reason.contains("sshd.service is a protected unit"));
    h.step(SEC, &probe(true));
    let d = h.run(5, &probe(false));
    assert_eq!(labels(&d).len(), 2, "a new episode is recorded again");
    assert_eq!(h.count("act"), 0);

    // systemd-* is a built-in glob; unprotecting one unit carves it out.
    let mut r = rule("j", Condition::ProbeFailed, ActionKind::Restart, Mode::Auto);
    r.action_target = ActionTarget::Systemd {
        unit: "systemd-resolved.service".into(),
    };
    let mut h = Harness::new(vec![r]);
    assert_eq!(
        labels(&h.step(SEC, &probe(false))),
        ["suppressed:protected"]
    );
    let mut h2 = Harness::new(h.rules.clone());
    h2.guard.protected =
        ProtectedUnits::new(vec![], vec!["systemd-resolved.service".into()]).expect("valid");
    assert_eq!(labels(&h2.step(SEC, &probe(false))), ["act"]);
}

#[test]
fn pause_and_dry_run_suppress_once_then_act_when_lifted() {
    let mut h = Harness::new(vec![web_hung()]);
    h.paused = true;
    let d = h.run(100, &probe(false));
    assert_eq!(labels(&d), ["suppressed:paused"]);
    h.paused = false;
    h.dry_run = true;
    let d = h.run(100, &probe(false));
    assert_eq!(labels(&d), ["suppressed:dry_run"]);
    assert!(d[0].reason.contains("would restart nginx.service"));
    h.dry_run = false;
    h.guard.dry_run = true;
    assert!(
        h.run(10, &probe(false)).is_empty(),
        "same reason, no new record"
    );
    h.guard.dry_run = false;
    assert_eq!(labels(&h.step(SEC, &probe(false))), ["act"]);
}

#[test]
fn suggest_mode_suggests_once_per_episode_and_never_acts() {
    let r = rule(
        "web-suggest",
        Condition::ProbeFailed,
        ActionKind::Restart,
        Mode::Suggest,
    );
    let mut h = Harness::new(vec![r]);
    let d = h.run(50, &probe(false));
    assert_eq!(labels(&d), ["suggest"]);
    assert!(d[0]
        .reason
        .contains("would restart nginx.service (mode = suggest)"));
    h.step(SEC, &probe(true));
    // A new episode within the cooldown is not suggested again.
    assert!(h.run(5, &probe(false)).is_empty());
    h.step(SEC, &probe(true));
    h.step(60 * SEC, &probe(true));
    assert_eq!(labels(&h.step(SEC, &probe(false))), ["suggest"]);
    assert_eq!(h.count("act"), 0);
}

// ------------------------------------------------------- crash loop, failures

#[test]
fn crash_loop_acts_max_per_hour_then_escalates_once_then_stays_suppressed() {
    let mut h = Harness::new(vec![web_hung()]);
    // The probe never recovers; every restart "succeeds" but does not help.
    for _ in 0..3000 {
        h.step(SEC, &probe(false));
    }
    assert_eq!(h.count("act"), 3);
    assert_eq!(h.count("verify_failed"), 3);
    assert_eq!(h.count("escalate:notify"), 1);
    let esc_at = h
        .log
        .iter()
        .position(|d| matches!(d.outcome, Outcome::Escalate { .. }))
        .expect("escalated");
    let esc = &h.log[esc_at];
    assert!(
        esc.reason
            .contains("probe_failed still holds after 3 action(s)"),
        "{}",
        esc.reason
    );
    assert!(esc.reason.contains("escalating: notify"), "{}", esc.reason);
    // After the escalation: one suppression saying why, then silence.
    let after: Vec<&Decision> = h.log[esc_at + 1..].iter().collect();
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].outcome.label(), "suppressed:exhausted");
    assert!(after[0].reason.contains("escalated"), "{}", after[0].reason);
    assert!(after[0].reason.contains("until the condition clears"));

    // An hour after the escalation its budget has freed up: it tries
    // again, at most max_per_hour times, and escalates once more.
    for _ in 0..1200 {
        h.step(SEC, &probe(false));
    }
    assert_eq!(h.count("act"), 6);
    assert_eq!(h.count("escalate:notify"), 2);
}

#[test]
fn crash_loop_escalation_can_run_a_command() {
    let mut r = web_hung();
    r.escalate = ActionKind::Exec("reboot-modem".into());
    let mut h = Harness::new(vec![r]);
    for _ in 0..400 {
        h.step(SEC, &probe(false));
    }
    assert_eq!(h.count("escalate:exec:reboot-modem"), 1);
    assert_eq!(
        h.state.actions_last_hour(),
        4,
        "three restarts and the command"
    );
}

#[test]
fn escalation_that_would_touch_the_host_is_guarded() {
    let mut r = web_hung();
    r.escalate = ActionKind::Exec("reboot-modem".into());
    let mut h = Harness::new(vec![r]);
    h.guard.max_actions_per_hour = 3;
    for _ in 0..400 {
        h.step(SEC, &probe(false));
    }
    assert_eq!(h.count("escalate:exec:reboot-modem"), 0);
    let esc = h
        .log
        .iter()
        .find(|d| d.outcome.label() == "escalate:notify")
        .expect("escalated");
    assert!(
        esc.reason
            .contains("exec:reboot-modem not run: global budget spent"),
        "{}",
        esc.reason
    );
}

#[test]
fn failed_action_escalates_at_once() {
    let mut h = Harness::new(vec![web_hung()]);
    h.auto_ok = false;
    let act = h.run(3, &probe(false)).remove(0);
    let clock = h.clock();
    let d = on_action_result(
        &mut h.state,
        act.id,
        Err("Unit nginx.service not found."),
        clock,
    )
    .expect("action_failed");
    assert_eq!(d.outcome, Outcome::ActionFailed);
    assert_eq!(d.follows, Some(act.id));
    assert_eq!(d.thread, act.id);
    assert!(
        d.reason.contains("restart nginx.service failed: Unit"),
        "{}",
        d.reason
    );
    let failure = d.id;
    let d = h.step(SEC, &probe(false));
    assert_eq!(labels(&d), ["escalate:notify"]);
    assert_eq!((d[0].follows, d[0].thread), (Some(failure), act.id));
    assert!(h
        .run(100, &probe(false))
        .iter()
        .all(|d| d.outcome.label() == "suppressed:exhausted"));
    assert_eq!(h.count("suppressed:exhausted"), 1);
    // The failed call counted against the budget.
    assert_eq!(
        h.state
            .rule("web-hung")
            .expect("state")
            .actions_last_hour(h.state.clock_ms()),
        1
    );
    // The condition clears: the episode ends, and the next one acts again.
    h.step(SEC, &probe(true));
    h.step(60 * SEC, &probe(true));
    let d = h.run(3, &probe(false));
    assert_eq!(labels(&d), ["act"]);
}

#[test]
fn lost_actuator_result_counts_as_failed() {
    let mut h = Harness::new(vec![web_hung()]);
    h.auto_ok = false;
    h.run(3, &probe(false));
    let d = h.step(ACTUATOR_RESULT_TIMEOUT.as_millis() as u64, &probe(false));
    assert_eq!(labels(&d), ["action_failed", "escalate:notify"]);
    assert!(d[0].reason.contains("no result from the actuator"));
}

#[test]
fn verify_failure_after_the_condition_cleared_escalates() {
    // Triggered by the unit failing, verified by the probe: the unit comes
    // back but the probe never passes, so nothing will try again.
    let mut r = rule(
        "unit",
        Condition::UnitFailed,
        ActionKind::Restart,
        Mode::Auto,
    );
    r.verify.check = VerifyCheck::ProbeOk;
    let mut h = Harness::new(vec![r]);
    let failed = sample(
        &[("target.web.probe.ok", 0.0)],
        &[status("web", "systemd", "failed/failed")],
    );
    let running = sample(
        &[("target.web.probe.ok", 0.0)],
        &[status("web", "systemd", "active/running")],
    );
    assert_eq!(labels(&h.step(SEC, &failed)), ["act"]);
    h.run(25, &running);
    assert_eq!(h.count("verify_failed"), 1);
    assert_eq!(h.count("escalate:notify"), 1);
}

// ------------------------------------------------------------- approvals

fn approve_rule() -> Rule {
    rule(
        "web-approve",
        Condition::ProbeFailed,
        ActionKind::Restart,
        Mode::Approve,
    )
}

fn yes(id: u64) -> Approval {
    Approval {
        id,
        approve: true,
        by: "alice".into(),
    }
}

#[test]
fn approval_then_act() {
    let mut h = Harness::new(vec![approve_rule()]);
    let d = h.step(SEC, &probe(false));
    assert_eq!(labels(&d), ["await_approval"]);
    let id = d[0].id;
    assert!(
        d[0].reason.contains(&format!("outpost approve {id}")),
        "{}",
        d[0].reason
    );
    assert_eq!(h.state.pending_approvals().len(), 1);
    let d = h.run(10, &probe(false));
    assert_eq!(labels(&d), ["suppressed:already_pending"]);
    let d = h.step_with(SEC, &probe(false), &[yes(id)]);
    assert_eq!(labels(&d), ["act"]);
    assert_eq!((d[0].follows, d[0].thread), (Some(id), id));
    assert!(d[0].reason.starts_with("alice approved"));
    assert_eq!(d[0].outcome.audit_name(), "acted");
    let act = d[0].id;
    // Approving the same id again does nothing.
    let d = h.step_with(SEC, &probe(true), &[yes(id)]);
    assert_eq!(labels(&d), ["verify_ok"]);
    assert_eq!((d[0].follows, d[0].thread), (Some(act), id));
}

#[test]
fn denial_holds_for_the_episode() {
    let mut h = Harness::new(vec![approve_rule()]);
    let id = h.step(SEC, &probe(false))[0].id;
    let no = Approval {
        id,
        approve: false,
        by: "bob".into(),
    };
    let d = h.step_with(SEC, &probe(false), &[no]);
    assert_eq!(labels(&d), ["denied", "suppressed:denied"]);
    assert!(h.run(100, &probe(false)).is_empty());
    h.step(SEC, &probe(true));
    assert_eq!(labels(&h.step(SEC, &probe(false))), ["await_approval"]);
}

#[test]
fn approval_expires_and_a_late_answer_does_not_act() {
    let mut h = Harness::new(vec![approve_rule()]);
    let id = h.step(SEC, &probe(false))[0].id;
    let timeout = h.guard.approval_timeout.as_millis() as u64;
    // Answered exactly at expiry: too late.
    let d = h.step_with(timeout, &probe(false), &[yes(id)]);
    assert_eq!(labels(&d)[0], "approval_expired");
    assert!(
        d[0].reason.contains("alice answered after"),
        "{}",
        d[0].reason
    );
    assert_eq!(h.count("act"), 0);
    // Unanswered: expires by itself; asks again only after a cooldown.
    let mut h = Harness::new(vec![approve_rule()]);
    h.step(SEC, &probe(false));
    let d = h.step(timeout, &probe(false));
    assert_eq!(labels(&d), ["approval_expired", "suppressed:cooldown"]);
    let d = h.run(60, &probe(false));
    assert_eq!(labels(&d), ["await_approval"]);
}

#[test]
fn request_is_withdrawn_when_the_condition_clears() {
    let mut h = Harness::new(vec![approve_rule()]);
    let id = h.step(SEC, &probe(false))[0].id;
    let d = h.step(SEC, &probe(true));
    assert_eq!(labels(&d), ["withdrawn"]);
    assert!(h.state.pending_approvals().is_empty());
    let d = h.step_with(SEC, &probe(false), &[yes(id)]);
    assert_eq!(labels(&d), ["await_approval"], "the old id is gone");
}

#[test]
fn approved_action_still_passes_the_guards() {
    let mut h = Harness::new(vec![approve_rule()]);
    let id = h.step(SEC, &probe(false))[0].id;
    h.paused = true;
    let d = h.step_with(SEC, &probe(false), &[yes(id)]);
    assert_eq!(labels(&d)[0], "suppressed:paused");
    assert!(d[0].reason.starts_with("alice approved, but paused"));
    assert_eq!(h.count("act"), 0);
}

// ----------------------------------------------------------------- clocks

#[test]
fn wall_clock_jumps_while_running_change_nothing() {
    let mut r = web_hung();
    r.persist = Persist::Samples(1);
    r.cooldown = Duration::from_secs(1);
    let mut h = Harness::new(vec![r]);
    for _ in 0..3 {
        h.step(SEC, &probe(false));
        h.step(SEC, &probe(true));
    }
    assert_eq!(h.count("act"), 3);
    // The wall clock leaps two hours ahead, then a day back: the budget
    // still sees 3 actions in the last (monotonic) hour.
    h.wall += 2 * HOUR_MS;
    h.step(SEC, &probe(false));
    h.wall -= 26 * HOUR_MS;
    h.step(SEC, &probe(false));
    assert_eq!(h.count("act"), 3);
    assert!(h.log.last().expect("decisions").ts_ms < T0);
}

#[test]
fn restart_keeps_budgets_even_with_the_wall_clock_behind() {
    let mut r = web_hung();
    r.persist = Persist::Samples(1);
    r.cooldown = Duration::from_secs(1);
    let mut h = Harness::new(vec![r]);
    for _ in 0..3 {
        h.step(SEC, &probe(false));
        h.step(SEC, &probe(true));
    }
    let before = h.state.clock_ms();
    let json = serde_json::to_string(&h.state).expect("serialize");
    assert!(
        !json.contains("streak"),
        "episode tracking is not persisted"
    );
    // Restart: new process (monotonic origin 0), wall clock a day behind.
    h.state = serde_json::from_str(&json).expect("deserialize");
    h.mono = 0;
    h.wall -= 24 * HOUR_MS;
    h.step(SEC, &probe(false));
    assert_eq!(h.state.clock_ms(), before, "never goes back");
    assert_eq!(h.count("act"), 3);
    assert_eq!(h.count("escalate:notify"), 1);
    // Real time passes: an hour later the budget has freed up.
    for _ in 0..70 {
        h.step(60 * SEC, &probe(true));
    }
    h.step(SEC, &probe(false));
    assert_eq!(h.count("act"), 4);
}

/// Steps one second at a time (at most `max`) until the engine acts;
/// returns the monotonic time of the act.
fn step_until_act(h: &mut Harness, s: &Sample, max: usize) -> u64 {
    for _ in 0..max {
        if h.step(SEC, s).iter().any(|d| d.outcome == Outcome::Act) {
            return h.mono;
        }
    }
    panic!("no act within {max} s: {:?}", labels(&h.log));
}

/// A rule whose action never fixes anything: its check fails after a
/// second, and it acts again once its cooldown (5 s) is over.
fn stubborn() -> Rule {
    let mut r = web_hung();
    r.persist = Persist::Samples(1);
    r.cooldown = Duration::from_secs(5);
    r.max_per_hour = 10;
    r.verify.within = Duration::from_secs(1);
    r
}

#[test]
fn cooldown_runs_on_real_time_whichever_way_the_wall_clock_jumps() {
    let mut h = Harness::new(vec![stubborn()]);
    let fault = probe(false);
    let first = step_until_act(&mut h, &fault, 1);
    // Three hours back right after the action: on the wall the action is
    // in the future, yet the next one still comes one cooldown later.
    h.wall -= 3 * HOUR_MS;
    let second = step_until_act(&mut h, &fault, 20);
    assert_eq!(second - first, 5 * SEC, "{:?}", labels(&h.log));
    // Six hours forward: on the wall the cooldown is long over, but it
    // still has 5 s to run.
    h.wall += 6 * HOUR_MS;
    let d = h.step(SEC, &fault);
    assert!(
        !d.iter().any(|d| d.outcome == Outcome::Act),
        "acted one second into a 5 s cooldown: {:?}",
        labels(&d)
    );
    let third = step_until_act(&mut h, &fault, 20);
    assert_eq!(third - second, 5 * SEC, "{:?}", labels(&h.log));
    // Each suppression says so, in real time.
    let why: Vec<&str> = h
        .log
        .iter()
        .filter(|d| d.outcome.label() == "suppressed:cooldown")
        .map(|d| d.reason.as_str())
        .collect();
    assert_eq!(why.len(), 2, "{why:?}");
    for r in &why {
        let ago = r
            .strip_prefix("cooldown: the last action was ")
            .and_then(|r| r.split_once(" ago, the cooldown is 5s"))
            .map(|(ago, _)| ago);
        assert_eq!(ago, Some("1s"), "{r}");
    }
    // Decisions carry the wall clock as it was, and a guard clock that
    // never goes back.
    let acts: Vec<&Decision> = h.log.iter().filter(|d| d.outcome == Outcome::Act).collect();
    assert_eq!(acts[1].ts_ms - acts[0].ts_ms, 5_000 - 3 * HOUR_MS);
    assert_eq!(acts[2].ts_ms - acts[1].ts_ms, 5_000 + 6 * HOUR_MS);
    assert_eq!(acts[2].clock_ms - acts[0].clock_ms, 10_000);
    assert!(h.log.windows(2).all(|w| w[0].clock_ms <= w[1].clock_ms));
}

#[test]
fn an_escalated_rule_waits_a_real_hour_not_a_wall_clock_hour() {
    let mut r = stubborn();
    r.max_per_hour = 2;
    let mut h = Harness::new(vec![r]);
    let fault = probe(false);
    h.run(20, &fault);
    assert_eq!(h.count("act"), 2);
    assert_eq!(h.count("escalate:notify"), 1);
    // Two hours forward: on the wall the escalation and both actions are
    // over an hour old; on real time they are seconds old.
    h.wall += 2 * HOUR_MS;
    h.run(60, &fault);
    // And a day back: actions in the wall clock's future still count.
    h.wall -= 24 * HOUR_MS;
    h.run(60, &fault);
    assert_eq!(h.count("act"), 2, "{:?}", labels(&h.log));
    assert_eq!(h.count("escalate:notify"), 1);
    // It is back a real hour after the escalation, not before.
    let escalated = h
        .log
        .iter()
        .find(|d| matches!(d.outcome, Outcome::Escalate { .. }))
        .expect("escalated")
        .clock_ms;
    while h.state.clock_ms() + 60_000 < escalated + HOUR_MS {
        h.step(60 * SEC, &fault);
    }
    assert_eq!(h.count("act"), 2, "{:?}", labels(&h.log));
    h.step(60 * SEC, &fault);
    assert_eq!(h.count("act"), 3, "{:?}", labels(&h.log));
}

#[test]
fn approval_expiry_runs_on_real_time_whichever_way_the_wall_clock_jumps() {
    let mut h = Harness::new(vec![approve_rule()]);
    h.guard.approval_timeout = Duration::from_secs(10);
    let fault = probe(false);
    let d = h.step(SEC, &fault);
    assert_eq!(labels(&d), ["await_approval"]);
    let asked = h.mono;
    // For people the request shows the wall-clock expiry of the moment.
    let p = h.state.pending_approvals()[0].clone();
    assert_eq!(p.expires_ms, p.created_ms + 10_000);
    // Three hours forward: not expired.
    h.wall += 3 * HOUR_MS;
    assert!(!labels(&h.step(SEC, &fault)).contains(&"approval_expired".to_string()));
    // Six hours back: it still expires 10 s (real) after it was made.
    h.wall -= 6 * HOUR_MS;
    let mut expired = None;
    for _ in 0..30 {
        if labels(&h.step(SEC, &fault)).contains(&"approval_expired".to_string()) {
            expired = Some(h.mono);
            break;
        }
    }
    assert_eq!(expired, Some(asked + 10 * SEC), "{:?}", labels(&h.log));
    // An answer in time still acts after the jumps.
    let mut h = Harness::new(vec![approve_rule()]);
    let id = h.step(SEC, &fault)[0].id;
    h.wall -= 3 * HOUR_MS;
    let d = h.step_with(SEC, &fault, &[yes(id)]);
    assert_eq!(labels(&d), ["act"]);
}

#[test]
fn verification_deadline_runs_on_real_time_whichever_way_the_wall_clock_jumps() {
    let mut h = Harness::new(vec![web_hung()]);
    let fault = probe(false);
    step_until_act(&mut h, &fault, 3);
    let acted = h.mono;
    // Forward: the 20 s check is not failed at once.
    h.wall += 3 * HOUR_MS;
    assert!(!labels(&h.step(SEC, &fault)).contains(&"verify_failed".to_string()));
    // Back: it is not left waiting for hours either.
    h.wall -= 6 * HOUR_MS;
    let mut failed = None;
    for _ in 0..30 {
        if labels(&h.step(SEC, &fault)).contains(&"verify_failed".to_string()) {
            failed = Some(h.mono);
            break;
        }
    }
    assert_eq!(failed, Some(acted + 20 * SEC), "{:?}", labels(&h.log));
}

#[test]
fn for_duration_runs_on_real_time_whichever_way_the_wall_clock_jumps() {
    let mut r = web_hung();
    r.persist = Persist::Duration(Duration::from_secs(30));
    let mut h = Harness::new(vec![r]);
    let fault = probe(false);
    h.step(SEC, &fault);
    let since = h.mono;
    // Forward: 30 s have not passed.
    h.wall += 3 * HOUR_MS;
    assert!(h.run(5, &fault).is_empty());
    // Back: nor is the condition held for "minus three hours".
    h.wall -= 6 * HOUR_MS;
    let at = step_until_act(&mut h, &fault, 40);
    assert_eq!(at - since, 30 * SEC);
}

#[test]
fn decisions_and_state_serialize() {
    let mut h = Harness::new(vec![approve_rule(), web_hung()]);
    h.run(3, &probe(false));
    let json = serde_json::to_value(&h.log).expect("json");
    assert_eq!(json[0]["outcome"]["outcome"], "await_approval");
    let act = h
        .log
        .iter()
        .position(|d| d.outcome == Outcome::Act)
        .expect("act");
    assert_eq!(json[act]["outcome"]["outcome"], "act");
    assert_eq!(json[act]["action"]["kind"], "restart");
    assert_eq!(json[act]["action_target"]["unit"], "nginx.service");
    let back: Vec<Decision> = serde_json::from_value(json).expect("back");
    assert_eq!(back, h.log);
    let s: EngineState =
        serde_json::from_str(&serde_json::to_string(&h.state).expect("ser")).expect("de");
    assert_eq!(s.pending_approvals(), h.state.pending_approvals());
    assert_eq!(s.verifications(), h.state.verifications());
}

#[test]
fn removed_rule_keeps_its_budget_for_the_hour() {
    let mut r = web_hung();
    r.persist = Persist::Samples(1);
    r.cooldown = Duration::from_secs(1);
    r.max_per_hour = 1;
    let mut h = Harness::new(vec![r.clone()]);
    h.step(SEC, &probe(false));
    h.step(SEC, &probe(true));
    h.rules.clear();
    h.step(SEC, &probe(false));
    h.rules = vec![r];
    let d = h.step(SEC, &probe(false));
    assert_eq!(labels(&d), ["suppressed:rule_budget", "escalate:notify"]);
}

// ------------------------------------------------------------- properties

/// One tick of the simulated world.
#[derive(Debug, Clone)]
struct Tick {
    dt_ms: u64,
    /// Added to the wall clock on top of `dt_ms` (a jump).
    wall_jump_ms: i64,
    restart: bool,
    web_probe: Option<bool>,
    web_up: Option<bool>,
    rss: Option<f64>,
    ssh_state: Option<&'static str>,
    score: Option<f32>,
    paused: bool,
    dry_run: bool,
    /// (index into the open requests, approve?)
    answers: Vec<(usize, bool)>,
    /// Per Act of the previous tick: 0 ok, 1 failed, 2 never reported.
    results: Vec<u8>,
}

fn tick() -> impl Strategy<Value = Tick> {
    (
        prop_oneof![
            4 => 0u64..3_000,
            3 => 3_000u64..120_000,
            1 => 120_000u64..1_800_000,
        ],
        prop_oneof![
            12 => Just(0i64),
            1 => -3 * HOUR_MS..3 * HOUR_MS,
        ],
        prop::bool::weighted(0.03),
        prop::option::weighted(0.9, any::<bool>()),
        prop::option::weighted(0.9, any::<bool>()),
        prop::option::weighted(0.9, 0.0f64..200.0),
        prop::option::of(prop_oneof![
            Just("failed/failed"),
            Just("active/running"),
            Just("not available"),
        ]),
        prop::option::of(0.0f32..1.0),
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.1),
        prop::collection::vec((0usize..3, prop::bool::weighted(0.8)), 0..2),
        prop::collection::vec(0u8..3, 0..8),
    )
        .prop_map(
            |(
                dt_ms,
                wall_jump_ms,
                restart,
                web_probe,
                web_up,
                rss,
                ssh_state,
                score,
                paused,
                dry_run,
                answers,
                results,
            )| Tick {
                dt_ms,
                wall_jump_ms,
                restart,
                web_probe,
                web_up,
                rss,
                ssh_state,
                score,
                paused,
                dry_run,
                answers,
                results,
            },
        )
}

#[derive(Debug, Clone)]
struct Policy {
    max_per_hour: u32,
    cooldown_s: u64,
    global: u32,
    samples: u32,
    within_s: u64,
    escalate_exec: bool,
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        1u32..5,
        1u64..300,
        1u32..8,
        1u32..4,
        1u64..60,
        any::<bool>(),
    )
        .prop_map(
            |(max_per_hour, cooldown_s, global, samples, within_s, escalate_exec)| Policy {
                max_per_hour,
                cooldown_s,
                global,
                samples,
                within_s,
                escalate_exec,
            },
        )
}

fn sim_rules(p: &Policy) -> Vec<Rule> {
    let base = |name: &str, when: Condition, action: ActionKind, mode: Mode| Rule {
        persist: Persist::Samples(p.samples),
        cooldown: Duration::from_secs(p.cooldown_s),
        max_per_hour: p.max_per_hour,
        verify: Verify {
            check: VerifyCheck::ConditionClear,
            within: Duration::from_secs(p.within_s),
        },
        escalate: if p.escalate_exec {
            ActionKind::Exec("fix".into())
        } else {
            ActionKind::Notify
        },
        ..rule(name, when, action, mode)
    };
    let sshd = ActionTarget::Systemd {
        unit: "sshd.service".into(),
    };
    let on_ssh = |mut r: Rule| {
        r.target = "ssh".into();
        r.action_target = sshd.clone();
        r
    };
    vec![
        base(
            "restart",
            Condition::ProbeFailed,
            ActionKind::Restart,
            Mode::Auto,
        ),
        base(
            "exec",
            Condition::Threshold {
                signal: "target.web.rss_mb".into(),
                op: CmpOp::Gt,
                value: 100.0,
            },
            ActionKind::Exec("fix".into()),
            Mode::Auto,
        ),
        on_ssh(base(
            "ssh-restart",
            Condition::UnitFailed,
            ActionKind::Restart,
            Mode::Auto,
        )),
        on_ssh(base(
            "ssh-exec",
            Condition::UnitFailed,
            ActionKind::Exec("fix".into()),
            Mode::Approve,
        )),
        base(
            "suggest",
            Condition::ProbeFailed,
            ActionKind::Stop,
            Mode::Suggest,
        ),
        base(
            "approve",
            Condition::UnitInactive,
            ActionKind::Restart,
            Mode::Approve,
        ),
        base(
            "notify",
            Condition::Anomaly {
                op: CmpOp::Ge,
                score: 0.5,
            },
            ActionKind::Notify,
            Mode::Auto,
        ),
    ]
}

fn sim_sample(t: &Tick) -> Sample {
    let mut values = Vec::new();
    if let Some(ok) = t.web_probe {
        values.push(("target.web.probe.ok", if ok { 1.0 } else { 0.0 }));
    }
    if let Some(up) = t.web_up {
        values.push(("target.web.up", if up { 1.0 } else { 0.0 }));
    }
    if let Some(rss) = t.rss {
        values.push(("target.web.rss_mb", rss));
    }
    let targets: Vec<TargetStatus> = t
        .ssh_state
        .map(|s| status("ssh", "systemd", s))
        .into_iter()
        .collect();
    sample(&values, &targets)
}

/// Runs the ticks and returns every decision with whether its tick was
/// paused or dry-run, and the approvals given in its tick.
fn simulate(p: &Policy, ticks: &[Tick]) -> (Vec<(Decision, bool, Vec<u64>)>, GuardConfig) {
    let rules = sim_rules(p);
    let mut guard = guard();
    guard.max_actions_per_hour = p.global;
    guard.approval_timeout = Duration::from_secs(600);
    let mut state = EngineState::new();
    let (mut wall, mut mono) = (T0, 0u64);
    let mut last_acts: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    let mut last_clock = i64::MIN;
    for t in ticks {
        wall += t.dt_ms as i64 + t.wall_jump_ms;
        mono += t.dt_ms;
        if t.restart {
            let json = serde_json::to_string(&state).expect("serialize");
            state = serde_json::from_str(&json).expect("deserialize");
            mono = t.dt_ms;
        }
        let clock = Clock {
            wall_ms: wall,
            mono_ms: mono,
        };
        let blocked = t.paused || t.dry_run;
        for (id, r) in last_acts.iter().zip(&t.results) {
            let res = match r {
                0 => Some(Ok(())),
                1 => Some(Err("boom")),
                _ => None,
            };
            if let Some(res) = res {
                if let Some(d) = on_action_result(&mut state, *id, res, clock) {
                    out.push((d, blocked, Vec::new()));
                }
            }
        }
        let open: Vec<u64> = state.pending_approvals().iter().map(|p| p.id).collect();
        let approvals: Vec<Approval> = t
            .answers
            .iter()
            .filter_map(|(i, yes)| {
                open.get(*i).map(|id| Approval {
                    id: *id,
                    approve: *yes,
                    by: "prop".into(),
                })
            })
            .collect();
        let given: Vec<u64> = approvals
            .iter()
            .filter(|a| a.approve)
            .map(|a| a.id)
            .collect();
        let s = sim_sample(t);
        let anomaly: Vec<(String, f32)> = t
            .score
            .map(|s| ("web".to_string(), s))
            .into_iter()
            .collect();
        let input = Input {
            clock,
            sample: &s,
            anomaly: &anomaly,
            approvals: &approvals,
            paused: t.paused,
            dry_run: t.dry_run,
        };
        let ds = decide(&input, &rules, &guard, &mut state);
        assert!(state.clock_ms() >= last_clock, "guard clock went back");
        last_clock = state.clock_ms();
        last_acts = ds
            .iter()
            .filter(|d| d.outcome == Outcome::Act)
            .map(|d| d.id)
            .collect();
        out.extend(ds.into_iter().map(|d| (d, blocked, given.clone())));
    }
    (out, guard)
}

/// At most `max` of the sorted times in any half-open hour.
fn within_budget(times: &[i64], max: u32) -> bool {
    let max = max as usize;
    times.windows(max + 1).all(|w| w[max] - w[0] >= HOUR_MS)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn guards_hold_for_any_sequence(
        p in policy(),
        ticks in prop::collection::vec(tick(), 1..400),
    ) {
        let (log, guard) = simulate(&p, &ticks);
        let decisions: Vec<&Decision> = log.iter().map(|(d, _, _)| d).collect();

        // Decision clocks never go back.
        prop_assert!(decisions.windows(2).all(|w| w[0].clock_ms <= w[1].clock_ms));

        // (a) Budgets per rule and globally, by the guard clock.
        for rule in sim_rules(&p) {
            let acts: Vec<i64> = decisions
                .iter()
                .filter(|d| d.rule == rule.name && d.outcome == Outcome::Act)
                .map(|d| d.clock_ms)
                .collect();
            prop_assert!(within_budget(&acts, p.max_per_hour), "rule {} acts {:?}", rule.name, acts);
        }
        let host: Vec<i64> = decisions
            .iter()
            .filter(|d| d.touches_host())
            .map(|d| d.clock_ms)
            .collect();
        prop_assert!(within_budget(&host, p.global), "global {:?}", host);

        let mut awaiting: std::collections::HashMap<u64, i64> = Default::default();
        for (d, blocked, given) in &log {
            // (b) A protected unit is never touched.
            if let ActionTarget::Systemd { unit } = &d.action_target {
                prop_assert!(
                    !(d.touches_host() && guard.protected.is_protected(unit)),
                    "touched {unit}: {d:?}"
                );
            }
            // (c) Paused (or dry run): nothing acts, no host escalation.
            if *blocked {
                prop_assert!(!d.touches_host() && d.outcome != Outcome::Act, "{d:?}");
            }
            // (d) Suggest never acts.
            if d.mode == Mode::Suggest {
                prop_assert!(d.outcome != Outcome::Act, "{d:?}");
            }
            if let Outcome::AwaitApproval { .. } = d.outcome {
                awaiting.insert(d.id, d.clock_ms + 600_000);
            }
            // (e) Approve acts only on an approval given this tick, before
            // the request expired.
            if d.mode == Mode::Approve && d.outcome == Outcome::Act {
                let req = d.follows.expect("an approved act follows its request");
                let expires = awaiting.get(&req).copied().expect("a request");
                prop_assert!(given.contains(&req), "{d:?}");
                prop_assert!(d.clock_ms < expires, "{d:?} after {expires}");
            }
            if d.mode == Mode::Auto && d.outcome == Outcome::Act {
                prop_assert!(d.follows.is_none());
            }
        }
    }

    #[test]
    fn a_crash_loop_never_escalates_twice_in_an_hour(
        max in 1u32..6,
        cooldown_s in 1u64..120,
        steps in prop::collection::vec(500u64..30_000, 100..600),
    ) {
        let mut r = web_hung();
        r.max_per_hour = max;
        r.cooldown = Duration::from_secs(cooldown_s);
        let mut h = Harness::new(vec![r]);
        for dt in steps {
            h.step(dt, &probe(false));
        }
        let esc: Vec<i64> = h
            .log
            .iter()
            .filter(|d| matches!(d.outcome, Outcome::Escalate { .. }))
            .map(|d| d.clock_ms)
            .collect();
        prop_assert!(within_budget(&esc, 1), "{esc:?}");
        let acts: Vec<i64> = h
            .log
            .iter()
            .filter(|d| d.outcome == Outcome::Act)
            .map(|d| d.clock_ms)
            .collect();
        prop_assert!(within_budget(&acts, max));
        // Never more records than samples: suppressions do not flood.
        let suppressed = h
            .log
            .iter()
            .filter(|d| matches!(d.outcome, Outcome::Suppressed { .. }))
            .count();
        prop_assert!(suppressed <= 3 * (acts.len() + esc.len()) + 2, "{suppressed}");
    }
}

/// The property above is not vacuous: over a fixed set of generated runs,
/// every kind of decision it constrains actually happens.
#[test]
fn simulated_runs_exercise_every_path() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        let p = policy().new_tree(&mut runner).expect("policy").current();
        let ticks = prop::collection::vec(tick(), 300..400)
            .new_tree(&mut runner)
            .expect("ticks")
            .current();
        let (log, _) = simulate(&p, &ticks);
        for (d, _, _) in log {
            let key = match (&d.outcome, d.mode) {
                (Outcome::Act, Mode::Approve) => "act:approved".to_string(),
                (o, _) => o.label(),
            };
            *seen.entry(key).or_default() += 1;
        }
    }
    for want in [
        "act",
        "act:approved",
        "suggest",
        "await_approval",
        "approval_expired",
        "denied",
        "withdrawn",
        "verify_ok",
        "verify_failed",
        "action_failed",
        "escalate:notify",
        "escalate:exec:fix",
        "suppressed:protected",
        "suppressed:paused",
        "suppressed:dry_run",
        "suppressed:cooldown",
        "suppressed:rule_budget",
        "suppressed:global_budget",
        "suppressed:exhausted",
    ] {
        assert!(seen.contains_key(want), "never saw {want}: {seen:?}");
    }
}

// ---- manual (fleet `run`) requests: the rules are the allowlist, the
// rule's guards apply.

fn clock_at(ms: i64) -> Clock {
    Clock {
        wall_ms: T0 + ms,
        mono_ms: ms as u64,
    }
}

#[test]
fn a_manual_run_acts_only_through_an_acting_rule_and_its_guards() {
    let rules = vec![web_hung()];
    let g = guard();
    let mut state = EngineState::new();
    let d = engine::manual(
        "web",
        &ActionKind::Restart,
        "fleet:k",
        &rules,
        &g,
        &mut state,
        clock_at(0),
        false,
    )
    .unwrap();
    assert_eq!(d.outcome, Outcome::Act);
    assert_eq!(d.rule, "web-hung");
    assert!(d.reason.contains("fleet:k"), "{}", d.reason);
    assert_eq!(state.actions_last_hour(), 1);
    // Its action is being verified: a second request is refused.
    let (why, audit) = engine::manual(
        "web",
        &ActionKind::Restart,
        "fleet:k",
        &rules,
        &g,
        &mut state,
        clock_at(1_000),
        false,
    )
    .unwrap_err();
    assert!(why.contains("verified"), "{why}");
    assert!(matches!(
        audit.unwrap().outcome,
        Outcome::Suppressed {
            guard: Guard::Verifying
        }
    ));
    // Once it reported, the rule's cooldown still binds.
    on_action_result(&mut state, d.id, Err("boom"), clock_at(2_000));
    let (why, _) = engine::manual(
        "web",
        &ActionKind::Restart,
        "fleet:k",
        &rules,
        &g,
        &mut state,
        clock_at(3_000),
        false,
    )
    .unwrap_err();
    assert!(why.contains("cooldown"), "{why}");
    assert_eq!(state.actions_last_hour(), 1);
}

#[test]
fn a_manual_run_outside_the_allowlist_or_under_a_guard_is_refused() {
    let g = guard();
    let mut state = EngineState::new();
    let rules = vec![web_hung()];
    // An action no rule takes, a target no rule watches.
    for (target, action) in [("web", ActionKind::Stop), ("db", ActionKind::Restart)] {
        let (why, audit) = engine::manual(
            target,
            &action,
            "fleet:k",
            &rules,
            &g,
            &mut state,
            clock_at(0),
            false,
        )
        .unwrap_err();
        assert!(why.contains("not allowed"), "{why}");
        assert!(audit.is_none());
    }
    // A suggest-only rule never acts.
    let suggest = vec![rule(
        "web-suggest",
        Condition::ProbeFailed,
        ActionKind::Restart,
        Mode::Suggest,
    )];
    let (why, _) = engine::manual(
        "web",
        &ActionKind::Restart,
        "fleet:k",
        &suggest,
        &g,
        &mut state,
        clock_at(0),
        false,
    )
    .unwrap_err();
    assert!(why.contains("not allowed"), "{why}");
    // Paused.
    let (why, _) = engine::manual(
        "web",
        &ActionKind::Restart,
        "fleet:k",
        &rules,
        &g,
        &mut state,
        clock_at(0),
        true,
    )
    .unwrap_err();
    assert!(why.contains("paused"), "{why}");
    // A protected unit.
    let mut protected = web_hung();
    protected.action_target = ActionTarget::Systemd {
        unit: "sshd.service".into(),
    };
    let (why, _) = engine::manual(
        "web",
        &ActionKind::Restart,
        "fleet:k",
        &[protected],
        &g,
        &mut state,
        clock_at(0),
        false,
    )
    .unwrap_err();
    assert!(why.contains("protected"), "{why}");
    // The global budget.
    let tight = GuardConfig {
        max_actions_per_hour: 0,
        ..guard()
    };
    let (why, _) = engine::manual(
        "web",
        &ActionKind::Restart,
        "fleet:k",
        &rules,
        &tight,
        &mut state,
        clock_at(0),
        false,
    )
    .unwrap_err();
    assert!(why.contains("global budget"), "{why}");
    assert_eq!(state.actions_last_hour(), 0);
}

#[test]
fn manual_action_names_parse() {
    assert_eq!(
        engine::parse_manual_action("restart"),
        Some(ActionKind::Restart)
    );
    assert_eq!(
        engine::parse_manual_action("exec:flush"),
        Some(ActionKind::Exec("flush".into()))
    );
    assert_eq!(engine::parse_manual_action("exec:"), None);
    assert_eq!(engine::parse_manual_action("notify"), None);
}
