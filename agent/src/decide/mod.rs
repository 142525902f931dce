//! Rules and guardrails. `decide` is a pure function of (observations,
//! rules, guard state, clock): no I/O, so it is tested exhaustively.
//!
//! The pipeline calls [`decide`] once per sample and carries out what it
//! returns: an [`Outcome::Act`] (then reports with [`on_action_result`]) or a
//! host-changing [`Outcome::Escalate`]; every decision goes to the audit. It
//! persists the [`EngineState`] (serde) so budgets survive a restart; how the
//! engine keeps time across restarts and clock jumps is described in
//! [`state`].
//!
//! What a rule does when its condition has held for its `for`, in order:
//! already escalated → suppressed (`exhausted`); last action still being
//! verified → `verifying`; an approval request open → `already_pending`; the
//! operator denied it in this episode → `denied`; then, for `suggest`, one
//! suggestion per episode (a protected target is reported as `protected`);
//! for `auto` and `approve`: `protected`, `paused`, `cooldown`, rule budget,
//! global budget (both escalate once), `dry_run`, and finally the action
//! (`auto`) or an approval request (`approve`), whose approval passes the
//! same guards again. A suppression is recorded once per episode, when it
//! starts or its reason changes; an episode ends when the condition is seen
//! false (missing data does not end it).
//!
//! After an action: the actuator's failure (or silence) is `action_failed`
//! and escalates at once; otherwise the `verify` check is watched until it
//! passes (`verify_ok`) or its time is up (`verify_failed`). A failed check
//! escalates when outpost will not try again (the condition is gone, or a
//! budget is spent); an escalated rule stays quiet until its condition
//! clears with budget to spare, or for an hour.

pub mod condition;
pub mod engine;
pub mod policy;
pub mod state;
pub mod types;

pub use condition::{Observation, Truth};
pub use engine::{decide, on_action_result, Approval, Decision, Guard, Input, Outcome};
pub use policy::*;
pub use state::{
    Clock, Due, EngineState, Exhausted, Link, PendingApproval, Phase, RuleState, Verification,
    HOUR_MS,
};
pub use types::*;

#[cfg(test)]
mod tests;
