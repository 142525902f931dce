//! The engine's memory: the guard clock, budgets, pending approvals,
//! in-flight verifications and per-rule episodes. Serializable, so the store
//! persists it and a restarted agent cannot act more than its policy allows.
//!
//! # Time
//!
//! Every call hands the engine two readings ([`Clock`]): the wall clock (Unix
//! ms, for the audit and for anything persisted) and a monotonic clock (ms
//! from any origin fixed for the life of the process). The engine keeps its
//! own *guard clock*, in Unix ms, that never goes backwards:
//!
//! - the first call after the state was created or loaded sets it to
//!   `max(persisted guard clock, wall clock)`: a restart never moves it back,
//!   so a wall clock that is behind after a reboot (a Raspberry Pi without
//!   an RTC) cannot free a budget; time spent down counts only as far as the
//!   wall clock shows it;
//! - every later call advances it by the monotonic clock's progress only, so
//!   wall-clock jumps in either direction while running change nothing.
//!
//! Budgets, cooldowns, `for` durations, approval expiry and verification
//! deadlines are all measured on the guard clock. When counting, a
//! timestamp later than "now" counts as now (it cannot happen with the
//! rules above, but a hand-edited or foreign state must not free budget
//! either). The one thing the engine cannot tell from a real pause is a wall
//! clock that jumped *forward* while the agent was down; that frees at most
//! what an hour of real downtime would.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::condition::Truth;
use super::engine::Guard;
use super::policy::{Condition, VerifyCheck};
use super::types::{ActionKind, ActionTarget};

pub const HOUR_MS: i64 = 3_600_000;

/// The two clock readings of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    /// Unix epoch ms (`SystemTime`).
    pub wall_ms: i64,
    /// Monotonic ms (`Instant` since process start, or `CLOCK_BOOTTIME`).
    pub mono_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineState {
    /// The guard clock (see the module docs).
    clock_ms: i64,
    /// The monotonic reading of the last call; not persisted, so the first
    /// call after a load re-anchors on the wall clock.
    #[serde(skip)]
    last_mono_ms: Option<u64>,
    /// The next decision id.
    next_id: u64,
    /// Guard-clock times of host-changing actions in the last hour.
    global: Vec<i64>,
    /// Per rule, by rule name.
    rules: BTreeMap<String, RuleState>,
    pending: Vec<PendingApproval>,
    verifying: Vec<Verification>,
}

/// What the engine remembers about one rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuleState {
    /// Guard-clock time of the rule's last action.
    pub(super) last_action: Option<i64>,
    /// Guard-clock times of the rule's actions in the last hour.
    pub(super) actions: Vec<i64>,
    /// Set when the rule escalated: it does not act again until its
    /// condition clears or an hour has passed (its whole hourly budget has
    /// freed up by then).
    pub(super) exhausted: Option<Exhausted>,
    /// An escalation owed (the action failed or did not verify, and outpost
    /// will not try again); raised at the next `decide`.
    pub(super) escalate_due: Option<Due>,
    /// The operator denied a request in this episode: no new request until
    /// the condition clears.
    pub(super) denied: bool,
    /// When the last approval request expired unanswered: the next request
    /// waits a cooldown after it.
    pub(super) last_expired: Option<i64>,
    /// When the last suggestion was recorded.
    pub(super) last_suggest: Option<i64>,

    // Episode tracking is not persisted: after a restart a condition must
    // hold for its whole `for` again.
    /// Consecutive samples the condition was true.
    #[serde(skip)]
    pub(super) streak: u32,
    /// Guard-clock time since when the condition has been true.
    #[serde(skip)]
    pub(super) true_since: Option<i64>,
    /// The suppression already recorded in this episode.
    #[serde(skip)]
    pub(super) note: Option<Guard>,
    /// A suggestion was recorded in this episode.
    #[serde(skip)]
    pub(super) suggested: bool,
    /// The last evaluation, for `status`.
    #[serde(skip)]
    pub(super) last_truth: Option<Truth>,
}

/// How a decision hangs together with earlier ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The decision this one follows up.
    pub follows: u64,
    /// The first decision about the same action.
    pub thread: u64,
}

/// An escalation owed, and the failure it follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Due {
    pub why: String,
    pub link: Link,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exhausted {
    /// Guard-clock time of the escalation.
    pub at: i64,
    pub why: String,
}

/// An action waiting for an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingApproval {
    /// The id of the `AwaitApproval` decision: what `approve ID` names.
    pub id: u64,
    pub rule: String,
    pub target: String,
    pub action: ActionKind,
    pub action_target: ActionTarget,
    /// Wall-clock times, for people.
    pub created_ms: i64,
    pub expires_ms: i64,
    /// Guard-clock times, for the engine.
    pub created_at: i64,
    pub expires_at: i64,
}

/// An action whose effect is being checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// The id of the `Act` decision.
    pub action_id: u64,
    /// The first decision about this action (the approval request, or the
    /// act itself).
    #[serde(default)]
    pub thread: u64,
    pub rule: String,
    pub target: String,
    pub action: ActionKind,
    pub action_target: ActionTarget,
    pub mode: super::types::Mode,
    pub check: VerifyCheck,
    pub within_ms: i64,
    /// The rule's condition, for `condition_clear` (kept with the
    /// verification so a config reload does not change what is checked).
    pub condition: Condition,
    pub phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// The actuator has not reported yet; past `result_by` the action counts
    /// as failed.
    Executing { result_by: i64 },
    /// The actuator reported success (at `since`); the check must pass
    /// before `deadline`.
    Watching { since: i64, deadline: i64 },
}

/// Counts timestamps within the hour before `now`; a timestamp in the future
/// counts as now.
pub(super) fn in_last_hour(ts: &[i64], now: i64) -> usize {
    ts.iter().filter(|&&t| now - t.min(now) < HOUR_MS).count()
}

fn prune(ts: &mut Vec<i64>, now: i64) {
    ts.retain(|&t| now - t.min(now) < HOUR_MS);
}

impl EngineState {
    pub fn new() -> EngineState {
        EngineState::default()
    }

    /// Advances the guard clock with this call's readings and returns it.
    pub(super) fn advance(&mut self, clock: Clock) -> i64 {
        match self.last_mono_ms {
            None => self.clock_ms = self.clock_ms.max(clock.wall_ms),
            Some(prev) => {
                let step = clock.mono_ms.saturating_sub(prev);
                self.clock_ms = self
                    .clock_ms
                    .saturating_add(i64::try_from(step).unwrap_or(i64::MAX));
            }
        }
        self.last_mono_ms = Some(clock.mono_ms);
        let now = self.clock_ms;
        prune(&mut self.global, now);
        for rs in self.rules.values_mut() {
            prune(&mut rs.actions, now);
        }
        now
    }

    pub(super) fn take_id(&mut self) -> u64 {
        self.next_id = self.next_id.max(1);
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The guard clock as of the last call (Unix ms, never decreasing).
    pub fn clock_ms(&self) -> i64 {
        self.clock_ms
    }

    /// Approval requests still open.
    pub fn pending_approvals(&self) -> &[PendingApproval] {
        &self.pending
    }

    /// Actions being verified.
    pub fn verifications(&self) -> &[Verification] {
        &self.verifying
    }

    /// Host-changing actions in the hour before the last call.
    pub fn actions_last_hour(&self) -> usize {
        in_last_hour(&self.global, self.clock_ms)
    }

    /// One rule's state, if the engine has seen the rule act or fire.
    pub fn rule(&self, name: &str) -> Option<&RuleState> {
        self.rules.get(name)
    }

    pub(super) fn rules_mut(&mut self) -> &mut BTreeMap<String, RuleState> {
        &mut self.rules
    }

    pub(super) fn global(&self) -> &[i64] {
        &self.global
    }

    pub(super) fn global_mut(&mut self) -> &mut Vec<i64> {
        &mut self.global
    }

    pub(super) fn pending_mut(&mut self) -> &mut Vec<PendingApproval> {
        &mut self.pending
    }

    pub(super) fn verifying_mut(&mut self) -> &mut Vec<Verification> {
        &mut self.verifying
    }
}

impl RuleState {
    /// Actions in the hour before `now`.
    pub fn actions_last_hour(&self, now: i64) -> usize {
        in_last_hour(&self.actions, now)
    }

    pub fn last_action(&self) -> Option<i64> {
        self.last_action
    }

    pub fn exhausted(&self) -> Option<&Exhausted> {
        self.exhausted.as_ref()
    }

    /// Whether the condition held at the last evaluation (`None`: unknown or
    /// not evaluated since start).
    pub fn condition_true(&self) -> Option<bool> {
        match self.last_truth {
            Some(Truth::True) => Some(true),
            Some(Truth::False) => Some(false),
            _ => None,
        }
    }
}
