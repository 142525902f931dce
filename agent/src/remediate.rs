//! Remediation wiring: feeds each sample to the pure `decide` engine, carries
//! out what it decides through the actuators (off the sampling path), folds
//! their results back in, writes every decision to the audit chain, keeps
//! incidents, and persists the engine state so budgets survive a restart.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::act::{ActionOutcome, ActionRequest, Actuator, Actuators, ActuatorsConfig};
use crate::collect::sampler::now_ms;
use crate::collect::Sample;
use crate::config::Config;
use crate::control::Reply;
use crate::decide::{
    decide, on_action_result, Approval, Clock, CommandSpec, Decision, EngineState, GuardConfig,
    Input, Outcome, Rule,
};
use crate::store::audit::AuditEntry;
use crate::store::Store;

/// The guard-state key the engine is persisted under.
const ENGINE_KEY: &str = "engine";

/// An actuator's report, back to the pipeline.
pub type ActionResult = (Decision, ActionOutcome);

pub struct Remediator {
    rules: Vec<Rule>,
    guard: GuardConfig,
    commands: HashMap<String, CommandSpec>,
    state: EngineState,
    actuators: Arc<Actuators>,
    store: Store,
    approvals: Vec<Approval>,
    results: mpsc::UnboundedSender<ActionResult>,
    /// Rule name → open incident id.
    incidents: HashMap<String, i64>,
    base: Instant,
}

impl Remediator {
    /// Loads the persisted engine state (a fresh one if none or unreadable)
    /// and returns the receiver the pipeline polls for actuator results.
    pub async fn new(
        cfg: &Config,
        store: Store,
    ) -> (Remediator, mpsc::UnboundedReceiver<ActionResult>) {
        let state = match store.load_guard(ENGINE_KEY.to_string()).await {
            Ok(Some(json)) => match serde_json::from_str::<EngineState>(&json) {
                Ok(s) => s,
                Err(e) => {
                    // Never silently reset budgets: say so loudly.
                    tracing::error!(error = %e, "stored guard state is unreadable; starting with empty budgets");
                    EngineState::new()
                }
            },
            Ok(None) => EngineState::new(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read stored guard state; starting with empty budgets");
                EngineState::new()
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut r = Remediator {
            rules: Vec::new(),
            guard: cfg.guard.clone(),
            commands: HashMap::new(),
            state,
            actuators: Arc::new(Actuators::new(ActuatorsConfig::default())),
            store,
            approvals: Vec::new(),
            results: tx,
            incidents: HashMap::new(),
            base: Instant::now(),
        };
        r.reconfigure(cfg);
        (r, rx)
    }

    /// Takes a new config's rules, guard and commands; budgets, pending
    /// approvals and verifications carry over.
    pub fn reconfigure(&mut self, cfg: &Config) {
        self.rules = cfg.rules.clone();
        self.guard = cfg.guard.clone();
        self.commands = cfg
            .commands
            .iter()
            .map(|c| (c.name.clone(), c.clone()))
            .collect();
        let protected = cfg.guard.protected.patterns().map(String::from).collect();
        self.actuators = Arc::new(Actuators::new(ActuatorsConfig::new(
            &cfg.collect,
            protected,
        )));
    }

    pub fn has_rules(&self) -> bool {
        !self.rules.is_empty() || !self.state.pending_approvals().is_empty()
    }

    fn clock(&self) -> Clock {
        Clock {
            wall_ms: now_ms(),
            mono_ms: u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// An operator's answer from the control socket (or, later, the fleet).
    pub fn answer(&mut self, id: u64, approve: bool, by: &str) -> Reply {
        match self.state.pending_approvals().iter().find(|p| p.id == id) {
            Some(p) => {
                let what = format!("{} {} ({})", p.action.label(), p.target, p.rule);
                self.approvals.push(Approval {
                    id,
                    approve,
                    by: by.to_string(),
                });
                Reply {
                    ok: true,
                    message: if approve {
                        format!("approved #{id}: {what}; acting at the next sample")
                    } else {
                        format!("denied #{id}: {what}")
                    },
                }
            }
            None => Reply {
                ok: false,
                message: format!("no decision #{id} is awaiting approval"),
            },
        }
    }

    /// An operator's request to take a rule's action now (a fleet `run`):
    /// the rules are the allowlist and the rule's guards apply
    /// (`decide::manual`); a refusal by a guard is audited as suppressed.
    pub async fn manual(&mut self, target: &str, action: &str, by: &str) -> Reply {
        let Some(kind) = crate::decide::engine::parse_manual_action(action) else {
            return Reply {
                ok: false,
                message: format!(
                    "unknown action {action:?}: expected restart, stop, start, reload or exec:NAME"
                ),
            };
        };
        let paused = self.guard.pause_file.exists();
        let clock = self.clock();
        match crate::decide::engine::manual(
            target,
            &kind,
            by,
            &self.rules,
            &self.guard,
            &mut self.state,
            clock,
            paused,
        ) {
            Ok(d) => {
                let message = format!("#{}: {}", d.thread, d.reason);
                tracing::info!(target = %target, action = %action, by = %by, "manual action");
                self.handle(d).await;
                self.persist().await;
                Reply { ok: true, message }
            }
            Err((why, decision)) => {
                tracing::warn!(target = %target, action = %action, by = %by, reason = %why, "manual action refused");
                if let Some(d) = decision {
                    self.handle(*d).await;
                    self.persist().await;
                }
                Reply {
                    ok: false,
                    message: why,
                }
            }
        }
    }

    /// One sample through the engine.
    pub async fn step(&mut self, sample: &Sample, anomaly: &[(String, f32)]) {
        if !self.has_rules() {
            return;
        }
        let paused = self.guard.pause_file.exists();
        let approvals = std::mem::take(&mut self.approvals);
        let input = Input {
            clock: self.clock(),
            sample,
            anomaly,
            approvals: &approvals,
            paused,
            dry_run: false,
        };
        let decisions = decide(&input, &self.rules, &self.guard, &mut self.state);
        let changed = !decisions.is_empty();
        for d in decisions {
            self.handle(d).await;
        }
        self.close_incidents().await;
        if changed {
            self.persist().await;
        }
    }

    /// An actuator finished.
    pub async fn on_result(&mut self, (decision, outcome): ActionResult) {
        let ok = outcome.ok;
        let detail = serde_json::to_value(&outcome).unwrap_or_default();
        let acted = AuditEntry {
            ts_ms: now_ms(),
            decision_id: decision.thread,
            rule: Some(decision.rule.clone()),
            target: decision.target.clone(),
            action: action_label(&decision),
            decision: if ok { "acted" } else { "action_failed" }.to_string(),
            reason: format!("{} — {}", decision.reason, outcome.summary),
            detail,
        };
        if ok {
            tracing::info!(rule = %decision.rule, target = %decision.target, id = decision.id, summary = %outcome.summary, "acted");
        } else {
            tracing::warn!(rule = %decision.rule, target = %decision.target, id = decision.id, summary = %outcome.summary, "action failed");
        }
        self.audit(acted).await;
        if matches!(decision.outcome, Outcome::Act) {
            let result = if ok {
                Ok(())
            } else {
                Err(outcome.summary.as_str())
            };
            let clock = self.clock();
            if let Some(follow) = on_action_result(&mut self.state, decision.id, result, clock) {
                // A failed action was audited just above, with the actuator's
                // own account; the engine's ActionFailed would say it twice.
                if matches!(follow.outcome, Outcome::ActionFailed) {
                    self.open_incident(&follow).await;
                } else {
                    self.handle(follow).await;
                }
            }
            self.persist().await;
        }
    }

    async fn handle(&mut self, d: Decision) {
        self.open_incident(&d).await;
        match &d.outcome {
            Outcome::Act => {
                if d.follows.is_some() {
                    // The approval that let this act through.
                    self.audit(entry(&d, "approved", d.reason.clone())).await;
                }
                if d.action.touches_host() {
                    self.execute(d, None);
                } else {
                    tracing::warn!(rule = %d.rule, target = %d.target, reason = %d.reason, "notify");
                    let outcome = ActionOutcome {
                        ok: true,
                        summary: "notified".into(),
                        before: None,
                        after: None,
                        output: None,
                        duration_ms: 0,
                    };
                    let _ = self.results.send((d, outcome));
                }
            }
            Outcome::Escalate { action } => {
                tracing::warn!(rule = %d.rule, target = %d.target, action = %action.label(), reason = %d.reason, "escalated");
                self.audit(entry(&d, "escalated", d.reason.clone())).await;
                if action.touches_host() {
                    let action = action.clone();
                    self.execute(d, Some(action));
                }
            }
            other => {
                match other {
                    Outcome::Suppressed { .. } | Outcome::Suggest => {
                        tracing::info!(rule = %d.rule, target = %d.target, decision = %other.label(), reason = %d.reason, "decision")
                    }
                    Outcome::VerifyFailed | Outcome::ActionFailed | Outcome::ApprovalExpired => {
                        tracing::warn!(rule = %d.rule, target = %d.target, decision = %other.label(), reason = %d.reason, "decision")
                    }
                    _ => {
                        tracing::info!(rule = %d.rule, target = %d.target, id = d.thread, decision = %other.label(), reason = %d.reason, "decision")
                    }
                }
                let name = other.audit_name();
                self.audit(entry(&d, name, d.reason.clone())).await;
            }
        }
    }

    /// Runs an action on its own task; the result comes back through the
    /// results channel.
    fn execute(&self, d: Decision, escalation: Option<crate::decide::ActionKind>) {
        let action = escalation.unwrap_or_else(|| d.action.clone());
        let command = match &action {
            crate::decide::ActionKind::Exec(name) => self.commands.get(name).cloned(),
            _ => None,
        };
        let req = ActionRequest {
            id: d.id,
            target_name: d.target.clone(),
            target: d.action_target.clone(),
            action,
            command,
        };
        let actuators = self.actuators.clone();
        let results = self.results.clone();
        tokio::spawn(async move {
            let outcome = actuators.execute(&req).await;
            let _ = results.send((d, outcome));
        });
    }

    async fn open_incident(&mut self, d: &Decision) {
        if self.incidents.contains_key(&d.rule) {
            return;
        }
        let explanation = serde_json::json!({
            "rule": d.rule,
            "action": d.action.label(),
            "mode": d.mode,
            "reason": d.reason,
        });
        match self
            .store
            .open_incident(d.target.clone(), d.ts_ms, 1.0, explanation)
            .await
        {
            Ok(id) => {
                self.incidents.insert(d.rule.clone(), id);
            }
            Err(e) => tracing::error!(error = %e, "cannot record incident"),
        }
    }

    async fn close_incidents(&mut self) {
        let clear: Vec<String> = self
            .incidents
            .keys()
            .filter(|rule| {
                let state = self.state.rule(rule);
                let verifying = self.state.verifications().iter().any(|v| &v.rule == *rule);
                !verifying && state.is_none_or(|s| s.condition_true() == Some(false))
            })
            .cloned()
            .collect();
        for rule in clear {
            if let Some(id) = self.incidents.remove(&rule) {
                if let Err(e) = self.store.close_incident(id, now_ms()).await {
                    tracing::error!(error = %e, "cannot close incident");
                }
            }
        }
    }

    async fn audit(&self, e: AuditEntry) {
        if let Err(err) = self.store.audit(e).await {
            tracing::error!(error = %err, "cannot write the audit trail");
        }
    }

    async fn persist(&self) {
        match serde_json::to_string(&self.state) {
            Ok(json) => {
                if let Err(e) = self
                    .store
                    .save_guard(ENGINE_KEY.to_string(), json, now_ms())
                    .await
                {
                    tracing::error!(error = %e, "cannot persist guard state");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot serialize guard state"),
        }
    }
}

fn action_label(d: &Decision) -> String {
    match &d.outcome {
        Outcome::Escalate { action } => action.label(),
        _ => d.action.label(),
    }
}

fn entry(d: &Decision, decision: &str, reason: String) -> AuditEntry {
    AuditEntry {
        ts_ms: d.ts_ms,
        decision_id: d.thread,
        rule: Some(d.rule.clone()),
        target: d.target.clone(),
        action: action_label(d),
        decision: decision.to_string(),
        reason,
        detail: serde_json::json!({
            "id": d.id,
            "follows": d.follows,
            "mode": d.mode,
            "outcome": d.outcome,
            "target": d.action_target,
        }),
    }
}
