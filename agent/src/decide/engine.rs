//! One step of the engine: [`decide`] turns an observation, the rules and
//! the guard into decisions, and [`on_action_result`] folds in what the
//! actuator reported. Both are pure: time comes in as arguments.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::collect::Sample;

use super::condition::{self, Observation, Truth};
use super::policy::{describe_target, GuardConfig, Persist, Rule, ACTUATOR_RESULT_TIMEOUT};
use super::state::{
    in_last_hour, Clock, Due, EngineState, Exhausted, Link, PendingApproval, Phase, RuleState,
    Verification, HOUR_MS,
};
use super::types::{ActionKind, ActionTarget, Mode};

/// Everything `decide` reads besides the rules, the guard and its state.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub clock: Clock,
    pub sample: &'a Sample,
    /// The detectors' latest anomaly score per target name. A target
    /// without a score is unknown to `anomaly >= X` conditions.
    pub anomaly: &'a [(String, f32)],
    /// Operator answers to approval requests since the last call.
    pub approvals: &'a [Approval],
    /// The pause file exists, or the fleet paused this node.
    pub paused: bool,
    /// Dry run for this call (OR'ed with `guard.dry_run`).
    pub dry_run: bool,
}

/// An operator's answer to an approval request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The id of the `AwaitApproval` decision.
    pub id: u64,
    pub approve: bool,
    /// Who answered (`local`, a fleet key id), for the audit.
    pub by: String,
}

/// Why a rule did not act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guard {
    /// The rule acted less than `cooldown` ago.
    Cooldown,
    /// The rule's `max_per_hour` is spent.
    RuleBudget,
    /// `guard.max_actions_per_hour` is spent.
    GlobalBudget,
    /// The target unit is on the protected list.
    Protected,
    /// The pause file exists or the fleet paused the node.
    Paused,
    /// Dry run: the action would have run.
    DryRun,
    /// An approval request for this rule is open.
    AlreadyPending,
    /// The rule's last action is still being verified.
    Verifying,
    /// The rule escalated; it waits for its condition to clear.
    Exhausted,
    /// The operator denied this rule's request in this episode.
    Denied,
}

impl Guard {
    pub fn label(self) -> &'static str {
        match self {
            Guard::Cooldown => "cooldown",
            Guard::RuleBudget => "rule_budget",
            Guard::GlobalBudget => "global_budget",
            Guard::Protected => "protected",
            Guard::Paused => "paused",
            Guard::DryRun => "dry_run",
            Guard::AlreadyPending => "already_pending",
            Guard::Verifying => "verifying",
            Guard::Exhausted => "exhausted",
            Guard::Denied => "denied",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// Run `action` on `action_target` now, then report with
    /// [`on_action_result`] (the id is the decision's).
    Act,
    /// Mode `suggest`: what would be done. Changes nothing.
    Suggest,
    /// Mode `approve`: waiting for `approve ID` until `expires_ms` (wall).
    AwaitApproval { expires_ms: i64 },
    /// The request expired (or an answer came too late).
    ApprovalExpired,
    /// The operator said no.
    Denied { by: String },
    /// The request was dropped: the condition cleared or the rule changed.
    Withdrawn,
    /// Did not act, and why.
    Suppressed { guard: Guard },
    /// The action did not work and outpost will not try again: run
    /// `action` (`notify`, or a host action the guards allowed).
    Escalate { action: ActionKind },
    /// The action's check passed.
    VerifyOk,
    /// The action's check did not pass in time.
    VerifyFailed,
    /// The actuator reported the action failed, or never reported at all.
    /// The action still counted against the budgets; the rule escalates.
    ActionFailed,
}

impl Outcome {
    /// `act`, `suppressed:cooldown`, `escalate:notify`, …: for logs and the
    /// audit table.
    pub fn label(&self) -> String {
        match self {
            Outcome::Act => "act".into(),
            Outcome::Suggest => "suggest".into(),
            Outcome::AwaitApproval { .. } => "await_approval".into(),
            Outcome::ApprovalExpired => "approval_expired".into(),
            Outcome::Denied { .. } => "denied".into(),
            Outcome::Withdrawn => "withdrawn".into(),
            Outcome::Suppressed { guard } => format!("suppressed:{}", guard.label()),
            Outcome::Escalate { action } => format!("escalate:{}", action.label()),
            Outcome::VerifyOk => "verify_ok".into(),
            Outcome::VerifyFailed => "verify_failed".into(),
            Outcome::ActionFailed => "action_failed".into(),
        }
    }

    /// The audit table's `decision` column (`store::audit::AuditEntry`):
    /// `acted`, `suggested`, `awaiting_approval`, `expired`, `denied`,
    /// `withdrawn`, `suppressed`, `escalated`, `verify_ok`, `verify_failed`,
    /// `action_failed`. The guard and the escalation's action are in the
    /// decision itself.
    pub fn audit_name(&self) -> &'static str {
        match self {
            Outcome::Act => "acted",
            Outcome::Suggest => "suggested",
            Outcome::AwaitApproval { .. } => "awaiting_approval",
            Outcome::ApprovalExpired => "expired",
            Outcome::Denied { .. } => "denied",
            Outcome::Withdrawn => "withdrawn",
            Outcome::Suppressed { .. } => "suppressed",
            Outcome::Escalate { .. } => "escalated",
            Outcome::VerifyOk => "verify_ok",
            Outcome::VerifyFailed => "verify_failed",
            Outcome::ActionFailed => "action_failed",
        }
    }
}

/// One decision, for the actuator (when it is `Act` or a host-changing
/// `Escalate`) and always for the audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Unique within the engine state's life (a counter in the state).
    pub id: u64,
    /// The decision this one follows up: the `Act` a `Verify*` checks, the
    /// `AwaitApproval` an approval answers, the failure an `Escalate`
    /// follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<u64>,
    /// The first decision about the same action: the request, then the act,
    /// its verification and escalation all carry the request's id (the
    /// audit's `decision_id`). A decision on its own has its own id.
    pub thread: u64,
    /// Wall clock, Unix ms.
    pub ts_ms: i64,
    /// Guard clock, Unix ms (never decreasing; see [`super::state`]).
    pub clock_ms: i64,
    pub rule: String,
    pub target: String,
    /// The rule's action.
    pub action: ActionKind,
    pub action_target: ActionTarget,
    pub mode: Mode,
    pub outcome: Outcome,
    /// Why, for people.
    pub reason: String,
}

impl Decision {
    /// Whether this decision changes something on the host when carried out.
    pub fn touches_host(&self) -> bool {
        match &self.outcome {
            Outcome::Act => self.action.touches_host(),
            Outcome::Escalate { action } => action.touches_host(),
            _ => false,
        }
    }
}

/// The rule, target and action a decision is about.
struct Subject {
    rule: String,
    target: String,
    action: ActionKind,
    action_target: ActionTarget,
    mode: Mode,
}

impl Subject {
    fn of(rule: &Rule) -> Subject {
        Subject {
            rule: rule.name.clone(),
            target: rule.target.clone(),
            action: rule.action.clone(),
            action_target: rule.action_target.clone(),
            mode: rule.mode,
        }
    }

    fn of_pending(p: &PendingApproval) -> Subject {
        Subject {
            rule: p.rule.clone(),
            target: p.target.clone(),
            action: p.action.clone(),
            action_target: p.action_target.clone(),
            mode: Mode::Approve,
        }
    }

    fn of_verification(v: &Verification) -> Subject {
        Subject {
            rule: v.rule.clone(),
            target: v.target.clone(),
            action: v.action.clone(),
            action_target: v.action_target.clone(),
            mode: v.mode,
        }
    }
}

struct Ctx<'a> {
    /// Guard clock.
    now: i64,
    wall: i64,
    paused: bool,
    dry_run: bool,
    guard: &'a GuardConfig,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn fmt_ms(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    let d = if ms >= 1000 {
        Duration::from_secs(ms / 1000)
    } else {
        Duration::from_millis(ms)
    };
    humantime::format_duration(d).to_string()
}

fn fmt_wall(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn what(action: &ActionKind, target: &ActionTarget) -> String {
    match action {
        ActionKind::Notify => "notify".into(),
        ActionKind::Exec(_) => format!("{} (for {})", action.label(), describe_target(target)),
        _ => format!("{} {}", action.label(), describe_target(target)),
    }
}

fn make(
    state: &mut EngineState,
    now: i64,
    wall: i64,
    s: Subject,
    outcome: Outcome,
    reason: String,
    link: Option<Link>,
) -> Decision {
    let id = state.take_id();
    Decision {
        id,
        follows: link.map(|l| l.follows),
        thread: link.map_or(id, |l| l.thread),
        ts_ms: wall,
        clock_ms: now,
        rule: s.rule,
        target: s.target,
        action: s.action,
        action_target: s.action_target,
        mode: s.mode,
        outcome,
        reason,
    }
}

fn take_rs(state: &mut EngineState, rule: &str) -> RuleState {
    state.rules_mut().remove(rule).unwrap_or_default()
}

fn put_rs(state: &mut EngineState, rule: &str, rs: RuleState) {
    state.rules_mut().insert(rule.to_string(), rs);
}

/// The protected unit a host-changing action would touch, if any. A rule
/// on a protected unit can only notify: lifecycle actions and commands
/// alike are refused.
fn protected_unit<'a>(
    action: &ActionKind,
    target: &'a ActionTarget,
    guard: &GuardConfig,
) -> Option<&'a str> {
    match target {
        ActionTarget::Systemd { unit }
            if action.touches_host() && guard.protected.is_protected(unit) =>
        {
            Some(unit)
        }
        _ => None,
    }
}

/// The guards every action passes just before it runs, in order.
fn blocked(rule: &Rule, rs: &RuleState, global: &[i64], ctx: &Ctx<'_>) -> Option<(Guard, String)> {
    let what = what(&rule.action, &rule.action_target);
    if let Some(unit) = protected_unit(&rule.action, &rule.action_target, ctx.guard) {
        return Some((
            Guard::Protected,
            format!("{unit} is a protected unit: outpost never touches it (would {what})"),
        ));
    }
    if ctx.paused {
        return Some((
            Guard::Paused,
            format!("paused (pause file or fleet pause): would {what}"),
        ));
    }
    if let Some(last) = rs.last_action {
        let ago = ctx.now - last.min(ctx.now);
        let cooldown = ms(rule.cooldown);
        if ago < cooldown {
            return Some((
                Guard::Cooldown,
                format!(
                    "cooldown: the last action was {} ago, the cooldown is {} (would {what})",
                    fmt_ms(ago),
                    fmt_ms(cooldown)
                ),
            ));
        }
    }
    let n = rs.actions_last_hour(ctx.now);
    if n >= rule.max_per_hour as usize {
        return Some((
            Guard::RuleBudget,
            format!(
                "rule budget spent: {n} actions in the last hour (max_per_hour = {})",
                rule.max_per_hour
            ),
        ));
    }
    if rule.action.touches_host() {
        let n = in_last_hour(global, ctx.now);
        if n >= ctx.guard.max_actions_per_hour as usize {
            return Some((
                Guard::GlobalBudget,
                format!(
                    "global budget spent: {n} actions in the last hour \
                     (guard.max_actions_per_hour = {})",
                    ctx.guard.max_actions_per_hour
                ),
            ));
        }
    }
    if ctx.dry_run {
        return Some((Guard::DryRun, format!("dry run: would {what}")));
    }
    None
}

/// Runs the rule's action: counts it against both budgets and starts its
/// verification.
fn act(
    rule: &Rule,
    rs: &mut RuleState,
    ctx: &Ctx<'_>,
    state: &mut EngineState,
    link: Option<Link>,
    reason: String,
) -> Decision {
    let now = ctx.now;
    rs.actions.push(now);
    rs.last_action = Some(now);
    rs.streak = 0;
    rs.true_since = None;
    rs.note = None;
    if rule.action.touches_host() {
        state.global_mut().push(now);
    }
    let d = make(
        state,
        now,
        ctx.wall,
        Subject::of(rule),
        Outcome::Act,
        reason,
        link,
    );
    if rule.action != ActionKind::Notify {
        state.verifying_mut().push(Verification {
            action_id: d.id,
            thread: d.thread,
            rule: rule.name.clone(),
            target: rule.target.clone(),
            action: rule.action.clone(),
            action_target: rule.action_target.clone(),
            mode: rule.mode,
            check: rule.verify.check,
            within_ms: ms(rule.verify.within),
            condition: rule.when.clone(),
            phase: Phase::Executing {
                result_by: now.saturating_add(ms(ACTUATOR_RESULT_TIMEOUT)),
            },
        });
    }
    d
}

/// Raises the rule's escalation once and marks the rule exhausted. A
/// host-changing escalation passes the guards (protected, pause, dry run,
/// global budget) and falls back to `notify` when one refuses.
fn escalate(
    rule: &Rule,
    rs: &mut RuleState,
    ctx: &Ctx<'_>,
    state: &mut EngineState,
    why: String,
    link: Option<Link>,
) -> Decision {
    let planned = rule.escalate.clone();
    let refused = if planned.touches_host() {
        if let Some(unit) = protected_unit(&planned, &rule.action_target, ctx.guard) {
            Some(format!("{unit} is protected"))
        } else if ctx.paused {
            Some("paused".to_string())
        } else if ctx.dry_run {
            Some("dry run".to_string())
        } else if in_last_hour(state.global(), ctx.now) >= ctx.guard.max_actions_per_hour as usize {
            Some("global budget spent".to_string())
        } else {
            None
        }
    } else {
        None
    };
    let tail = "not acting on this rule again until its condition clears or an hour has passed";
    let (action, reason) = match refused {
        Some(no) => (
            ActionKind::Notify,
            format!(
                "{why}; escalating: notify ({} not run: {no}); {tail}",
                planned.label()
            ),
        ),
        None => {
            let reason = format!("{why}; escalating: {}; {tail}", planned.label());
            (planned, reason)
        }
    };
    if action.touches_host() {
        state.global_mut().push(ctx.now);
    }
    rs.exhausted = Some(Exhausted {
        at: ctx.now,
        why: why.clone(),
    });
    rs.escalate_due = None;
    rs.note = None;
    make(
        state,
        ctx.now,
        ctx.wall,
        Subject::of(rule),
        Outcome::Escalate { action },
        reason,
        link,
    )
}

/// Records a suppression once per episode: when it starts or its reason
/// changes.
fn note(
    rule: &Rule,
    rs: &mut RuleState,
    ctx: &Ctx<'_>,
    state: &mut EngineState,
    out: &mut Vec<Decision>,
    (guard, reason): (Guard, String),
) {
    if rs.note == Some(guard) {
        return;
    }
    rs.note = Some(guard);
    out.push(make(
        state,
        ctx.now,
        ctx.wall,
        Subject::of(rule),
        Outcome::Suppressed { guard },
        reason,
        None,
    ));
}

/// Whether the rule describes the same action as the request.
fn same_subject(rule: &Rule, p: &PendingApproval) -> bool {
    rule.mode == Mode::Approve
        && rule.target == p.target
        && rule.action == p.action
        && rule.action_target == p.action_target
}

/// One step: evaluates every rule on this observation and returns what to
/// do and what to record. Call it once per sample, with every approval
/// answer received since the last call.
pub fn decide(
    input: &Input<'_>,
    rules: &[Rule],
    guard: &GuardConfig,
    state: &mut EngineState,
) -> Vec<Decision> {
    let now = state.advance(input.clock);
    let ctx = Ctx {
        now,
        wall: input.clock.wall_ms,
        paused: input.paused,
        dry_run: input.dry_run || guard.dry_run,
        guard,
    };
    let obs = Observation {
        sample: input.sample,
        anomaly: input.anomaly,
    };
    let truths: Vec<Truth> = rules
        .iter()
        .map(|r| condition::evaluate(&r.when, &r.target, &obs))
        .collect();
    let mut out = Vec::new();

    answer_approvals(input.approvals, rules, &truths, &ctx, state, &mut out);
    expire_requests(rules, &truths, &ctx, state, &mut out);
    check_verifications(rules, &truths, &obs, &ctx, state, &mut out);
    for (rule, truth) in rules.iter().zip(&truths) {
        step_rule(rule, *truth, &ctx, state, &mut out);
    }
    // A rule that is gone keeps its budget for the rest of the hour (a rule
    // removed and added back must not start afresh), then is forgotten.
    state
        .rules_mut()
        .retain(|name, rs| rules.iter().any(|r| &r.name == name) || !rs.actions.is_empty());
    out
}

fn answer_approvals(
    approvals: &[Approval],
    rules: &[Rule],
    truths: &[Truth],
    ctx: &Ctx<'_>,
    state: &mut EngineState,
    out: &mut Vec<Decision>,
) {
    for a in approvals {
        let Some(at) = state.pending_approvals().iter().position(|p| p.id == a.id) else {
            // Unknown or already answered: the caller checks
            // `pending_approvals()` to tell the operator.
            continue;
        };
        let p = state.pending_mut().remove(at);
        let (now, wall) = (ctx.now, ctx.wall);
        let follows = Some(Link {
            follows: p.id,
            thread: p.id,
        });
        let what = what(&p.action, &p.action_target);
        if now >= p.expires_at {
            state
                .rules_mut()
                .entry(p.rule.clone())
                .or_default()
                .last_expired = Some(now);
            let reason = format!(
                "{} answered after the request to {what} expired at {}",
                a.by,
                fmt_wall(p.expires_ms)
            );
            out.push(make(
                state,
                now,
                wall,
                Subject::of_pending(&p),
                Outcome::ApprovalExpired,
                reason,
                follows,
            ));
            continue;
        }
        let found = rules
            .iter()
            .position(|r| r.name == p.rule)
            .filter(|&i| same_subject(&rules[i], &p));
        let Some(i) = found else {
            let reason = format!(
                "rule {} changed or was removed since it asked to {what}",
                p.rule
            );
            out.push(make(
                state,
                now,
                wall,
                Subject::of_pending(&p),
                Outcome::Withdrawn,
                reason,
                follows,
            ));
            continue;
        };
        let rule = &rules[i];
        let mut rs = take_rs(state, &rule.name);
        if !a.approve {
            rs.denied = true;
            rs.note = None;
            let reason = format!("{} denied: {what}", a.by);
            out.push(make(
                state,
                now,
                wall,
                Subject::of(rule),
                Outcome::Denied { by: a.by.clone() },
                reason,
                follows,
            ));
        } else if truths[i] == Truth::False {
            let reason = format!(
                "{} approved, but {} no longer holds: not {what}",
                a.by, rule.when
            );
            out.push(make(
                state,
                now,
                wall,
                Subject::of(rule),
                Outcome::Withdrawn,
                reason,
                follows,
            ));
        } else if state.verifications().iter().any(|v| v.rule == rule.name) {
            let reason = format!(
                "{} approved, but the rule's last action is still being verified: not {what}",
                a.by
            );
            out.push(make(
                state,
                now,
                wall,
                Subject::of(rule),
                Outcome::Suppressed {
                    guard: Guard::Verifying,
                },
                reason,
                follows,
            ));
        } else if let Some((guard, why)) = blocked(rule, &rs, state.global(), ctx) {
            let reason = format!("{} approved, but {why}", a.by);
            out.push(make(
                state,
                now,
                wall,
                Subject::of(rule),
                Outcome::Suppressed { guard },
                reason,
                follows,
            ));
        } else {
            let reason = format!("{} approved: {what}", a.by);
            let d = act(rule, &mut rs, ctx, state, follows, reason);
            out.push(d);
        }
        put_rs(state, &rule.name, rs);
    }
}

/// Expires open requests, and withdraws those whose condition cleared or
/// whose rule changed.
fn expire_requests(
    rules: &[Rule],
    truths: &[Truth],
    ctx: &Ctx<'_>,
    state: &mut EngineState,
    out: &mut Vec<Decision>,
) {
    let open = std::mem::take(state.pending_mut());
    let mut keep = Vec::with_capacity(open.len());
    for p in open {
        let what = what(&p.action, &p.action_target);
        let found = rules
            .iter()
            .position(|r| r.name == p.rule)
            .filter(|&i| same_subject(&rules[i], &p));
        let (outcome, reason) = if ctx.now >= p.expires_at {
            state
                .rules_mut()
                .entry(p.rule.clone())
                .or_default()
                .last_expired = Some(ctx.now);
            (
                Outcome::ApprovalExpired,
                format!(
                    "nobody approved the request to {what} by {}",
                    fmt_wall(p.expires_ms)
                ),
            )
        } else if let Some(i) = found {
            if truths[i] != Truth::False {
                keep.push(p);
                continue;
            }
            (
                Outcome::Withdrawn,
                format!(
                    "{} no longer holds: the request to {what} is withdrawn",
                    rules[i].when
                ),
            )
        } else {
            (
                Outcome::Withdrawn,
                format!(
                    "rule {} changed or was removed: the request to {what} is withdrawn",
                    p.rule
                ),
            )
        };
        let d = make(
            state,
            ctx.now,
            ctx.wall,
            Subject::of_pending(&p),
            outcome,
            reason,
            Some(Link {
                follows: p.id,
                thread: p.id,
            }),
        );
        out.push(d);
    }
    *state.pending_mut() = keep;
}

fn check_verifications(
    rules: &[Rule],
    truths: &[Truth],
    obs: &Observation<'_>,
    ctx: &Ctx<'_>,
    state: &mut EngineState,
    out: &mut Vec<Decision>,
) {
    let now = ctx.now;
    let list = std::mem::take(state.verifying_mut());
    let mut keep = Vec::with_capacity(list.len());
    for v in list {
        let what = what(&v.action, &v.action_target);
        let failed = match v.phase {
            Phase::Executing { result_by } => {
                if now < result_by {
                    keep.push(v);
                    continue;
                }
                // No result at all: treat it as a failed action.
                let reason = format!(
                    "no result from the actuator within {} of {what}",
                    fmt_ms(ms(ACTUATOR_RESULT_TIMEOUT))
                );
                (reason, true)
            }
            Phase::Watching { since, deadline } => {
                let passed = condition::check(v.check, &v.condition, &v.target, obs);
                if passed == Truth::True {
                    let reason = format!(
                        "{} {} after {what}",
                        v.check.label(),
                        fmt_ms(now - since.min(now))
                    );
                    let rule = v.rule.clone();
                    let d = make(
                        state,
                        now,
                        ctx.wall,
                        Subject::of_verification(&v),
                        Outcome::VerifyOk,
                        reason,
                        Some(Link {
                            follows: v.action_id,
                            thread: v.thread,
                        }),
                    );
                    out.push(d);
                    if let Some(rs) = state.rules_mut().get_mut(&rule) {
                        rs.note = None;
                    }
                    continue;
                }
                if now < deadline {
                    keep.push(v);
                    continue;
                }
                let seen = if passed == Truth::Unknown {
                    "no data to check"
                } else {
                    "still failing"
                };
                let reason = format!(
                    "{} not seen within {} of {what} ({seen})",
                    v.check.label(),
                    fmt_ms(v.within_ms)
                );
                (reason, false)
            }
        };
        let (reason, actuator_failed) = failed;
        let d = make(
            state,
            now,
            ctx.wall,
            Subject::of_verification(&v),
            if actuator_failed {
                Outcome::ActionFailed
            } else {
                Outcome::VerifyFailed
            },
            reason.clone(),
            Some(Link {
                follows: v.action_id,
                thread: v.thread,
            }),
        );
        let link = Link {
            follows: d.id,
            thread: v.thread,
        };
        out.push(d);
        // Escalate unless the rule will try again: its condition still
        // holds and both budgets have room. A lost actuator result always
        // escalates.
        let Some(i) = rules.iter().position(|r| r.name == v.rule) else {
            continue;
        };
        let rule = &rules[i];
        let global_room = !rule.action.touches_host()
            || in_last_hour(state.global(), now) < ctx.guard.max_actions_per_hour as usize;
        let rs = state.rules_mut().entry(rule.name.clone()).or_default();
        let retry = !actuator_failed
            && truths[i] == Truth::True
            && rs.actions_last_hour(now) < rule.max_per_hour as usize
            && global_room;
        rs.note = None;
        if !retry {
            let why = if actuator_failed {
                reason
            } else if truths[i] == Truth::True {
                format!(
                    "{} still holds after {} action(s) in the last hour and the budget is spent",
                    rule.when,
                    rs.actions_last_hour(now)
                )
            } else {
                format!("{what} did not pass its check ({reason})")
            };
            rs.escalate_due = Some(Due { why, link });
        }
    }
    *state.verifying_mut() = keep;
}

fn step_rule(
    rule: &Rule,
    truth: Truth,
    ctx: &Ctx<'_>,
    state: &mut EngineState,
    out: &mut Vec<Decision>,
) {
    let now = ctx.now;
    let mut rs = take_rs(state, &rule.name);
    rs.last_truth = Some(truth);
    match truth {
        Truth::True => {
            rs.streak = rs.streak.saturating_add(1);
            rs.true_since.get_or_insert(now);
        }
        Truth::False => {
            // The episode is over.
            rs.streak = 0;
            rs.true_since = None;
            rs.suggested = false;
            rs.denied = false;
        }
        Truth::Unknown => {
            // Missing data is no evidence either way: the streak restarts,
            // the episode (and an escalation) stays.
            rs.streak = 0;
            rs.true_since = None;
        }
    }
    // An escalated rule acts again once its condition has cleared and its
    // budgets have room (a fault that flaps while the budget is spent is
    // escalated once, not once per flap), or an hour after the escalation,
    // when every action it took before has left its hourly window.
    if let Some(e) = &rs.exhausted {
        let room = rs.actions_last_hour(now) < rule.max_per_hour as usize
            && (!rule.action.touches_host()
                || in_last_hour(state.global(), now) < ctx.guard.max_actions_per_hour as usize);
        if now - e.at.min(now) >= HOUR_MS || (truth == Truth::False && room) {
            rs.exhausted = None;
            rs.note = None;
        }
    }
    if truth == Truth::False && rs.exhausted.is_none() {
        rs.note = None;
    }
    if let Some(due) = rs.escalate_due.take() {
        let d = escalate(rule, &mut rs, ctx, state, due.why, Some(due.link));
        out.push(d);
    }
    // An approval acted for this rule in this very call.
    let acted_now = rs.last_action == Some(now);
    let fired = truth == Truth::True
        && !acted_now
        && match rule.persist {
            Persist::Samples(n) => rs.streak >= n,
            Persist::Duration(d) => rs
                .true_since
                .is_some_and(|since| now - since.min(now) >= ms(d)),
        };
    if fired {
        fire(rule, &mut rs, ctx, state, out);
    }
    put_rs(state, &rule.name, rs);
}

/// The rule's condition has held for its `for`: act, ask, suggest, or
/// record why not.
fn fire(
    rule: &Rule,
    rs: &mut RuleState,
    ctx: &Ctx<'_>,
    state: &mut EngineState,
    out: &mut Vec<Decision>,
) {
    let now = ctx.now;
    let what = what(&rule.action, &rule.action_target);
    let held = format!("{} for {}", rule.when, rule.persist);
    if let Some(e) = &rs.exhausted {
        let reason = format!(
            "escalated {} ago ({}); not acting again until the condition clears or an hour \
             after the escalation",
            fmt_ms(now - e.at.min(now)),
            e.why
        );
        return note(rule, rs, ctx, state, out, (Guard::Exhausted, reason));
    }
    if let Some(v) = state.verifications().iter().find(|v| v.rule == rule.name) {
        let reason = format!(
            "checking action {} ({} within {})",
            v.action_id,
            v.check.label(),
            fmt_ms(v.within_ms)
        );
        return note(rule, rs, ctx, state, out, (Guard::Verifying, reason));
    }
    if rule.mode == Mode::Approve {
        if let Some(p) = state
            .pending_approvals()
            .iter()
            .find(|p| p.rule == rule.name)
        {
            let reason = format!(
                "waiting for approval {} (expires {})",
                p.id,
                fmt_wall(p.expires_ms)
            );
            return note(rule, rs, ctx, state, out, (Guard::AlreadyPending, reason));
        }
        if rs.denied {
            let reason = format!(
                "the operator denied {what} in this episode; not asking again until the \
                 condition clears"
            );
            return note(rule, rs, ctx, state, out, (Guard::Denied, reason));
        }
    }
    if rule.mode == Mode::Suggest {
        if let Some(unit) = protected_unit(&rule.action, &rule.action_target, ctx.guard) {
            let reason = format!("{unit} is a protected unit: outpost never touches it");
            return note(rule, rs, ctx, state, out, (Guard::Protected, reason));
        }
        let rested = rs
            .last_suggest
            .is_none_or(|t| now - t.min(now) >= ms(rule.cooldown));
        if !rs.suggested && rested {
            rs.suggested = true;
            rs.last_suggest = Some(now);
            rs.note = None;
            let reason = format!("{held}: would {what} (mode = suggest)");
            out.push(make(
                state,
                now,
                ctx.wall,
                Subject::of(rule),
                Outcome::Suggest,
                reason,
                None,
            ));
        }
        return;
    }
    match blocked(rule, rs, state.global(), ctx) {
        Some((guard @ (Guard::RuleBudget | Guard::GlobalBudget), why)) => {
            note(rule, rs, ctx, state, out, (guard, why.clone()));
            let why = format!("{held}, {why}");
            let d = escalate(rule, rs, ctx, state, why, None);
            out.push(d);
        }
        Some(blocked) => note(rule, rs, ctx, state, out, blocked),
        None if rule.mode == Mode::Auto => {
            let n = rs.actions_last_hour(now) + 1;
            let reason = format!("{held}: {what} ({n} of {} this hour)", rule.max_per_hour);
            let d = act(rule, rs, ctx, state, None, reason);
            out.push(d);
        }
        None => {
            if let Some(t) = rs.last_expired {
                let ago = now - t.min(now);
                if ago < ms(rule.cooldown) {
                    let reason = format!(
                        "the last request expired {} ago; asking again after the cooldown ({})",
                        fmt_ms(ago),
                        fmt_ms(ms(rule.cooldown))
                    );
                    return note(rule, rs, ctx, state, out, (Guard::Cooldown, reason));
                }
            }
            let timeout = ms(ctx.guard.approval_timeout);
            let expires_ms = ctx.wall.saturating_add(timeout);
            let d = make(
                state,
                now,
                ctx.wall,
                Subject::of(rule),
                Outcome::AwaitApproval { expires_ms },
                format!(
                    "{held}: {what} needs approval: `outpost approve ID` before {}",
                    fmt_wall(expires_ms)
                ),
                None,
            );
            let d = Decision {
                reason: d.reason.replace("ID", &d.id.to_string()),
                ..d
            };
            state.pending_mut().push(PendingApproval {
                id: d.id,
                rule: rule.name.clone(),
                target: rule.target.clone(),
                action: rule.action.clone(),
                action_target: rule.action_target.clone(),
                created_ms: ctx.wall,
                expires_ms,
                created_at: now,
                expires_at: now.saturating_add(timeout),
            });
            rs.note = None;
            out.push(d);
        }
    }
}

/// Folds in the actuator's report on an `Act` decision. Success starts the
/// verification window; failure ends the verification at once (`ActionFailed`,
/// returned for the audit) and the rule escalates at the next [`decide`]. The
/// action counted against the budgets when it was decided, whatever the
/// result. Reports for unknown ids (escalations, a restarted engine) are
/// ignored.
pub fn on_action_result(
    state: &mut EngineState,
    decision_id: u64,
    result: Result<(), &str>,
    clock: Clock,
) -> Option<Decision> {
    let now = state.advance(clock);
    let at = state
        .verifications()
        .iter()
        .position(|v| v.action_id == decision_id && matches!(v.phase, Phase::Executing { .. }))?;
    match result {
        Ok(()) => {
            let v = &mut state.verifying_mut()[at];
            v.phase = Phase::Watching {
                since: now,
                deadline: now.saturating_add(v.within_ms),
            };
            None
        }
        Err(e) => {
            let v = state.verifying_mut().remove(at);
            let reason = format!("{} failed: {e}", what(&v.action, &v.action_target));
            let d = make(
                state,
                now,
                clock.wall_ms,
                Subject::of_verification(&v),
                Outcome::ActionFailed,
                reason.clone(),
                Some(Link {
                    follows: decision_id,
                    thread: v.thread,
                }),
            );
            let rs = state.rules_mut().entry(v.rule.clone()).or_default();
            rs.escalate_due = Some(Due {
                why: reason,
                link: Link {
                    follows: d.id,
                    thread: v.thread,
                },
            });
            rs.note = None;
            Some(d)
        }
    }
}

/// Reads `restart`, `stop`, `start`, `reload` or `exec:NAME`: the actions an
/// operator may ask for by hand (`notify` changes nothing, so it is not one).
pub fn parse_manual_action(s: &str) -> Option<ActionKind> {
    match s {
        "restart" => Some(ActionKind::Restart),
        "stop" => Some(ActionKind::Stop),
        "start" => Some(ActionKind::Start),
        "reload" => Some(ActionKind::Reload),
        _ => s
            .strip_prefix("exec:")
            .filter(|n| !n.is_empty())
            .map(|n| ActionKind::Exec(n.to_string())),
    }
}

/// An operator's explicit request (a fleet `run`) to take `action` on the
/// target named `target` now. The rules are the allowlist: some rule in
/// `auto` or `approve` mode on that target must have that very action; the
/// request then passes the same guards as the rule's own action would
/// (verifying, protected, pause, cooldown, rule budget, global budget, dry
/// run) and counts against the same budgets. `Ok`: an `Act` decision of that
/// rule, to carry out like any other (its result goes to
/// [`on_action_result`] and its `verify` is watched). `Err`: why not, with a
/// `Suppressed` decision for the audit when a rule matched.
#[allow(clippy::too_many_arguments)]
pub fn manual(
    target: &str,
    action: &ActionKind,
    by: &str,
    rules: &[Rule],
    guard: &GuardConfig,
    state: &mut EngineState,
    clock: Clock,
    paused: bool,
) -> Result<Decision, (String, Option<Box<Decision>>)> {
    let Some(rule) = rules
        .iter()
        .find(|r| r.target == target && &r.action == action && r.mode != Mode::Suggest)
    else {
        return Err((
            format!(
                "not allowed: no auto or approve rule on target {target:?} does {}",
                action.label()
            ),
            None,
        ));
    };
    let now = state.advance(clock);
    let ctx = Ctx {
        now,
        wall: clock.wall_ms,
        paused,
        dry_run: guard.dry_run,
        guard,
    };
    let mut rs = take_rs(state, &rule.name);
    let refusal = if state.verifications().iter().any(|v| v.rule == rule.name) {
        Some((
            Guard::Verifying,
            format!(
                "rule {}: its last action is still being verified",
                rule.name
            ),
        ))
    } else {
        blocked(rule, &rs, state.global(), &ctx)
    };
    let result = match refusal {
        Some((guard, why)) => {
            let reason = format!("{by} asked to {}: refused: {why}", rule.action.label());
            let d = make(
                state,
                now,
                ctx.wall,
                Subject::of(rule),
                Outcome::Suppressed { guard },
                reason.clone(),
                None,
            );
            Err((reason, Some(Box::new(d))))
        }
        None => {
            let reason = format!(
                "{by} asked to {} (rule {})",
                what(&rule.action, &rule.action_target),
                rule.name
            );
            Ok(act(rule, &mut rs, &ctx, state, None, reason))
        }
    };
    put_rs(state, &rule.name, rs);
    result
}
