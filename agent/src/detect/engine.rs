//! The detection stage of the daemon: every feature vector goes through the
//! built-in baseline (one per target) and through the installed models
//! (active, shadow, and the previous one while a promotion is on trial);
//! hysteresis turns scores into incidents, each with the top three signals
//! that drove it and their learned normal range.
//!
//! Pure apart from the models' inference: no I/O, no clock. The pipeline
//! runs [`Detectors::step`] on a blocking thread and records what it returns.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::baseline::{Baseline, BaselineConfig, Score};
use super::features::FeatureVector;
use super::incident::{KOfN, Tracker, Transition};

/// The target that host signals (and signals of no target) belong to.
pub const HOST_TARGET: &str = "host";
/// How many signals an incident names.
pub const TOP: usize = 3;

/// Which target a feature belongs to: `target.NAME.…` to `NAME`, anything
/// else to the host.
pub fn target_of(feature: &str) -> &str {
    feature
        .strip_prefix("target.")
        .and_then(|rest| rest.split_once('.'))
        .map_or(HOST_TARGET, |(name, _)| name)
}

/// Detection settings (`[detect]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DetectConfig {
    /// A baseline step at or over this score counts towards an incident.
    pub threshold: f32,
    /// Baseline: how many of the last steps over the threshold open an
    /// incident. The baseline widens its range the moment a value leaves it,
    /// so an excursion is typically one step long: 1 of 1 by default.
    pub open: KOfN,
    /// Models score every step on a fixed range: 2 of 3 by default.
    pub model_open: KOfN,
    /// Clean steps in a row that close an incident.
    pub close_after: u32,
    pub baseline: BaselineConfig,
    pub lifecycle: LifecycleConfig,
}

/// When a shadow model is promoted and a promoted one rolled back.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleConfig {
    /// A shadow model is promoted by itself after this many steps in shadow
    /// (`None`: only by command).
    pub promote_after_steps: Option<u64>,
    /// ...if its alert rate (steps over threshold / steps) in shadow is at
    /// most this.
    pub shadow_max_alert_rate: f64,
    /// After a promotion the previous model keeps scoring beside the new one
    /// for this many steps; the new one is rolled back if over that trial
    /// its alerts exceed `rollback_alert_ratio` times the previous model's
    /// (or the baseline's when there was no previous model).
    pub trial_steps: u64,
    pub rollback_alert_ratio: f64,
    /// Alerts below this count never trigger a rollback (a handful of
    /// alerts is noise, not misbehaviour).
    pub rollback_min_alerts: u64,
}

pub const DEFAULT_THRESHOLD: f32 = 0.5;
pub const DEFAULT_CLOSE_AFTER: u32 = 6;
pub const DEFAULT_SHADOW_MAX_ALERT_RATE: f64 = 0.02;
pub const DEFAULT_TRIAL_STEPS: u64 = 360;
pub const DEFAULT_ROLLBACK_ALERT_RATIO: f64 = 3.0;
pub const DEFAULT_ROLLBACK_MIN_ALERTS: u64 = 5;

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            threshold: DEFAULT_THRESHOLD,
            open: KOfN { k: 1, n: 1 },
            model_open: KOfN { k: 2, n: 3 },
            close_after: DEFAULT_CLOSE_AFTER,
            baseline: BaselineConfig::default(),
            lifecycle: LifecycleConfig::default(),
        }
    }
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            promote_after_steps: None,
            shadow_max_alert_rate: DEFAULT_SHADOW_MAX_ALERT_RATE,
            trial_steps: DEFAULT_TRIAL_STEPS,
            rollback_alert_ratio: DEFAULT_ROLLBACK_ALERT_RATIO,
            rollback_min_alerts: DEFAULT_ROLLBACK_MIN_ALERTS,
        }
    }
}

/// What a model gives for one input vector.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelOutput {
    /// In [0, 1]: the manifest's mapping of the raw score.
    pub score: f32,
    pub raw: f32,
    /// Per-feature contributions when the model has them.
    pub contributions: Option<Vec<f32>>,
}

/// A loaded detector model, as the engine sees it. The ONNX packages
/// implement it (see `detect::model`); tests use doubles.
pub trait Scorer: Send {
    /// `name@version`.
    fn label(&self) -> String;
    /// The input features, in input order.
    fn feature_names(&self) -> &[String];
    /// In score units: a step at or over it is over the threshold.
    fn threshold(&self) -> f32;
    fn score(&mut self, x: &[f32]) -> Result<ModelOutput, String>;
    /// Per-feature attribution for a model without a contributions output.
    fn attribution(&mut self, x: &[f32]) -> Result<Vec<f32>, String>;
    /// The learned normal range of input `i`.
    fn normal_range(&self, i: usize) -> (f32, f32);
}

/// A model's place in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Its incidents are real and its score feeds the rules.
    Active,
    /// Scores and would-be incidents are recorded; nothing acts on them.
    Shadow,
    /// The model a promotion replaced, still scoring during the trial.
    Previous,
}

/// One signal behind an incident.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Driver {
    pub feature: String,
    pub value: f32,
    /// The learned normal range.
    pub normal: [f32; 2],
    /// Its share of the score (detector units: per-signal score for the
    /// baseline, reconstruction error or attribution for models).
    pub contribution: f32,
}

/// An incident opened or closed by a detector.
#[derive(Debug, Clone, PartialEq)]
pub enum IncidentEvent {
    Opened {
        target: String,
        detector: String,
        shadow: bool,
        score: f32,
        drivers: Vec<Driver>,
    },
    Closed {
        target: String,
        detector: String,
        shadow: bool,
    },
}

/// A lifecycle change the engine decided on its own.
#[derive(Debug, Clone, PartialEq)]
pub enum LifecycleEvent {
    Promoted { label: String, why: String },
    RolledBack { label: String, why: String },
    TrialPassed { label: String },
}

/// Per-model counts, for promotion and rollback decisions and `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ModelStats {
    /// Steps scored in the current role.
    pub steps: u64,
    /// Of those, steps over the threshold.
    pub alerts: u64,
    /// Steps skipped because a feature the model needs was missing.
    pub missing: u64,
    /// Inference errors.
    pub errors: u64,
    pub last_score: f32,
}

/// What one step produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// The anomaly score per target that `anomaly >= X` rules see: the
    /// largest of the baseline's and the active model's.
    pub anomaly: Vec<(String, f32)>,
    pub incidents: Vec<IncidentEvent>,
    pub lifecycle: Vec<LifecycleEvent>,
}

struct TargetBaseline {
    baseline: Baseline,
    tracker: Tracker,
    names: Arc<[String]>,
    /// Indices into the feature vector of this target's features.
    index: Vec<usize>,
    values: Vec<f32>,
    score: Score,
    /// Baseline alerts during the current model trial.
    trial_alerts: u64,
}

/// A loaded model and its state.
pub struct ModelSlot {
    pub scorer: Box<dyn Scorer>,
    pub role: Role,
    /// The target its incidents and score belong to.
    pub target: String,
    pub stats: ModelStats,
    tracker: Tracker,
    /// Input index into the current feature vector, per model input;
    /// `None` while a feature is missing.
    index: Option<Vec<usize>>,
    input: Vec<f32>,
    missing_logged: bool,
}

impl ModelSlot {
    pub fn new(scorer: Box<dyn Scorer>, role: Role, target: String, cfg: &DetectConfig) -> Self {
        ModelSlot {
            scorer,
            role,
            target,
            stats: ModelStats::default(),
            tracker: Tracker::new(cfg.model_open, cfg.close_after),
            index: None,
            input: Vec::new(),
            missing_logged: false,
        }
    }
}

/// Every detector of the host.
pub struct Detectors {
    cfg: DetectConfig,
    baselines: BTreeMap<String, TargetBaseline>,
    /// The feature names the partition was computed for.
    names: Option<Arc<[String]>>,
    models: Vec<ModelSlot>,
    /// A promotion is on trial (the active model may be rolled back by
    /// itself). Not kept across a restart: a restarted agent keeps the
    /// model it was running.
    on_trial: bool,
}

impl Detectors {
    pub fn new(cfg: DetectConfig) -> Detectors {
        Detectors {
            cfg,
            baselines: BTreeMap::new(),
            names: None,
            models: Vec::new(),
            on_trial: false,
        }
    }

    pub fn config(&self) -> &DetectConfig {
        &self.cfg
    }

    /// New settings (a reload); what the detectors learned is kept.
    pub fn reconfigure(&mut self, cfg: DetectConfig) {
        if cfg.baseline != self.cfg.baseline {
            self.baselines.clear();
            self.names = None;
        }
        self.cfg = cfg;
    }

    pub fn models(&self) -> &[ModelSlot] {
        &self.models
    }

    /// Puts `slot` in place of any model with the same role.
    pub fn set_model(&mut self, slot: ModelSlot) {
        self.models.retain(|m| m.role != slot.role);
        self.models.push(slot);
        self.names = None;
    }

    /// Removes the model with `role`, if any, and gives it back.
    pub fn take_model(&mut self, role: Role) -> Option<ModelSlot> {
        let i = self.models.iter().position(|m| m.role == role)?;
        Some(self.models.swap_remove(i))
    }

    /// Shadow becomes active; active becomes previous (on trial).
    pub fn promote(&mut self) -> Result<String, String> {
        let Some(mut shadow) = self.take_model(Role::Shadow) else {
            return Err("no model in shadow".into());
        };
        self.take_model(Role::Previous);
        if let Some(mut active) = self.take_model(Role::Active) {
            active.role = Role::Previous;
            active.stats = ModelStats::default();
            active.tracker = Tracker::new(self.cfg.model_open, self.cfg.close_after);
            self.models.push(active);
        }
        for b in self.baselines.values_mut() {
            b.trial_alerts = 0;
        }
        let label = shadow.scorer.label();
        shadow.role = Role::Active;
        shadow.stats = ModelStats::default();
        shadow.tracker = Tracker::new(self.cfg.model_open, self.cfg.close_after);
        self.models.push(shadow);
        self.names = None;
        self.on_trial = true;
        Ok(label)
    }

    /// Active is dropped; previous (if any) becomes active again.
    pub fn rollback(&mut self) -> Result<String, String> {
        let Some(active) = self.take_model(Role::Active) else {
            return Err("no active model".into());
        };
        if let Some(mut prev) = self.take_model(Role::Previous) {
            prev.role = Role::Active;
            prev.stats = ModelStats::default();
            self.models.push(prev);
        }
        self.names = None;
        self.on_trial = false;
        Ok(active.scorer.label())
    }

    /// Scores one feature vector with every detector.
    pub fn step(&mut self, v: &FeatureVector) -> StepOutput {
        let mut out = StepOutput::default();
        let same = self
            .names
            .as_ref()
            .is_some_and(|n| Arc::ptr_eq(n, &v.names));
        if !same {
            self.partition(&v.names);
        }
        let threshold = self.cfg.threshold;
        for (target, b) in self.baselines.iter_mut() {
            b.values.clear();
            b.values.extend(b.index.iter().map(|&i| v.values[i]));
            b.baseline.update_into(&b.names, &b.values, &mut b.score);
            let s = b.score.raw;
            let over = s >= threshold;
            if over {
                b.trial_alerts += 1;
            }
            out.anomaly.push((target.clone(), s));
            match b.tracker.push(over) {
                Some(Transition::Opened) => out.incidents.push(IncidentEvent::Opened {
                    target: target.clone(),
                    detector: "baseline".into(),
                    shadow: false,
                    score: s,
                    drivers: b
                        .score
                        .top
                        .iter()
                        .take(TOP)
                        .map(|c| Driver {
                            feature: c.name.clone(),
                            value: c.value,
                            normal: [c.lo, c.hi],
                            contribution: c.score,
                        })
                        .collect(),
                }),
                Some(Transition::Closed) => out.incidents.push(IncidentEvent::Closed {
                    target: target.clone(),
                    detector: "baseline".into(),
                    shadow: false,
                }),
                None => {}
            }
        }

        for m in self.models.iter_mut() {
            let Some(index) = &m.index else {
                m.stats.missing += 1;
                if !m.missing_logged {
                    m.missing_logged = true;
                    tracing::warn!(
                        model = %m.scorer.label(),
                        "a feature the model needs is missing; it does not score until it is back"
                    );
                }
                continue;
            };
            m.input.clear();
            m.input.extend(index.iter().map(|&i| v.values[i]));
            let result = m.scorer.score(&m.input);
            let o = match result {
                Ok(o) if o.score.is_finite() => o,
                Ok(_) | Err(_) => {
                    m.stats.errors += 1;
                    if m.stats.errors == 1 {
                        tracing::error!(model = %m.scorer.label(), "model inference failed");
                    }
                    continue;
                }
            };
            let over = o.score >= m.scorer.threshold();
            m.stats.steps += 1;
            m.stats.alerts += u64::from(over);
            m.stats.last_score = o.score;
            if m.role == Role::Active {
                match out.anomaly.iter_mut().find(|(t, _)| *t == m.target) {
                    Some((_, s)) => *s = s.max(o.score),
                    None => out.anomaly.push((m.target.clone(), o.score)),
                }
            }
            if m.role == Role::Previous {
                continue;
            }
            let shadow = m.role == Role::Shadow;
            match m.tracker.push(over) {
                Some(Transition::Opened) => {
                    let drivers = model_drivers(m, &o);
                    out.incidents.push(IncidentEvent::Opened {
                        target: m.target.clone(),
                        detector: m.scorer.label(),
                        shadow,
                        score: o.score,
                        drivers,
                    });
                }
                Some(Transition::Closed) => out.incidents.push(IncidentEvent::Closed {
                    target: m.target.clone(),
                    detector: m.scorer.label(),
                    shadow,
                }),
                None => {}
            }
        }
        self.lifecycle(&mut out);
        out
    }

    /// Automatic promotion of a shadow and rollback of a misbehaving
    /// promotion.
    fn lifecycle(&mut self, out: &mut StepOutput) {
        let lc = self.cfg.lifecycle.clone();
        if let Some(after) = lc.promote_after_steps {
            let ready = self
                .models
                .iter()
                .find(|m| m.role == Role::Shadow)
                .filter(|m| m.stats.steps >= after.max(1))
                .map(|m| {
                    let rate = m.stats.alerts as f64 / m.stats.steps as f64;
                    (m.scorer.label(), rate)
                });
            if let Some((label, rate)) = ready {
                if rate <= lc.shadow_max_alert_rate {
                    if self.promote().is_ok() {
                        out.lifecycle.push(LifecycleEvent::Promoted {
                            label,
                            why: format!(
                                "alert rate {rate:.4} in shadow is within {}",
                                lc.shadow_max_alert_rate
                            ),
                        });
                    }
                    return;
                }
            }
        }
        if !self.on_trial {
            return;
        }
        let Some(active) = self.models.iter().find(|m| m.role == Role::Active) else {
            self.on_trial = false;
            return;
        };
        if active.stats.steps == 0 {
            return;
        }
        // The yardstick: the previous model over the same steps, or the
        // baseline of the model's target when it replaced none.
        let on_trial = self.models.iter().find(|m| m.role == Role::Previous);
        let (reference, what) = match on_trial {
            Some(p) => (
                p.stats.alerts,
                format!("previous model {}", p.scorer.label()),
            ),
            None => match self.baselines.get(&active.target) {
                Some(b) => (b.trial_alerts, "the baseline".to_string()),
                None => (0, "the baseline".to_string()),
            },
        };
        let limit = lc.rollback_alert_ratio * reference.max(1) as f64;
        if active.stats.alerts >= lc.rollback_min_alerts && active.stats.alerts as f64 > limit {
            let why = format!(
                "{} alerts in {} steps after promotion, over {} x the {} of {what}",
                active.stats.alerts, active.stats.steps, lc.rollback_alert_ratio, reference
            );
            if let Ok(label) = self.rollback() {
                out.lifecycle
                    .push(LifecycleEvent::RolledBack { label, why });
            }
        } else if active.stats.steps >= lc.trial_steps {
            let label = active.scorer.label();
            self.take_model(Role::Previous);
            self.on_trial = false;
            out.lifecycle.push(LifecycleEvent::TrialPassed { label });
        }
    }

    fn partition(&mut self, names: &Arc<[String]>) {
        let mut by_target: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, n) in names.iter().enumerate() {
            by_target.entry(target_of(n)).or_default().push(i);
        }
        self.baselines
            .retain(|t, _| by_target.contains_key(t.as_str()));
        for (target, index) in by_target {
            let sub: Arc<[String]> = index.iter().map(|&i| names[i].clone()).collect();
            let b = self
                .baselines
                .entry(target.to_string())
                .or_insert_with(|| TargetBaseline {
                    baseline: Baseline::new(self.cfg.baseline.clone()),
                    tracker: Tracker::new(self.cfg.open, self.cfg.close_after),
                    names: sub.clone(),
                    index: Vec::new(),
                    values: Vec::new(),
                    score: Score::default(),
                    trial_alerts: 0,
                });
            b.names = sub;
            b.index = index;
        }
        for m in self.models.iter_mut() {
            let index: Option<Vec<usize>> = m
                .scorer
                .feature_names()
                .iter()
                .map(|f| names.binary_search_by(|n| n.as_str().cmp(f)).ok())
                .collect();
            if index.is_some() && m.missing_logged {
                m.missing_logged = false;
                tracing::info!(model = %m.scorer.label(), "every feature the model needs is back");
            }
            m.index = index;
        }
        self.names = Some(names.clone());
    }
}

/// The top contributions of a model's step, from its contributions output
/// or, without one, its attribution.
fn model_drivers(m: &mut ModelSlot, o: &ModelOutput) -> Vec<Driver> {
    let contrib = match &o.contributions {
        Some(c) => c.clone(),
        None => m.scorer.attribution(&m.input).unwrap_or_default(),
    };
    let mut order: Vec<usize> = (0..contrib.len().min(m.input.len())).collect();
    order.sort_by(|&a, &b| contrib[b].total_cmp(&contrib[a]));
    let names = m.scorer.feature_names();
    order
        .into_iter()
        .filter(|&i| contrib[i] > 0.0)
        .take(TOP)
        .map(|i| {
            let (lo, hi) = m.scorer.normal_range(i);
            Driver {
                feature: names[i].clone(),
                value: m.input[i],
                normal: [lo, hi],
                contribution: contrib[i],
            }
        })
        .collect()
}

/// The explanation stored with an incident.
pub fn explanation(
    detector: &str,
    shadow: bool,
    score: f32,
    drivers: &[Driver],
) -> serde_json::Value {
    serde_json::json!({
        "detector": detector,
        "shadow": shadow,
        "score": score,
        "top": drivers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model scoring the mean of its inputs over a fixed scale.
    struct MeanModel {
        names: Vec<String>,
        scale: f32,
        with_contrib: bool,
    }

    impl Scorer for MeanModel {
        fn label(&self) -> String {
            format!("mean@{}", self.scale)
        }
        fn feature_names(&self) -> &[String] {
            &self.names
        }
        fn threshold(&self) -> f32 {
            0.5
        }
        fn score(&mut self, x: &[f32]) -> Result<ModelOutput, String> {
            let mean = x.iter().sum::<f32>() / x.len() as f32;
            let s = (mean / self.scale).clamp(0.0, 1.0);
            Ok(ModelOutput {
                score: s,
                raw: mean,
                contributions: self.with_contrib.then(|| x.to_vec()),
            })
        }
        fn attribution(&mut self, x: &[f32]) -> Result<Vec<f32>, String> {
            Ok(x.iter().map(|v| v * 2.0).collect())
        }
        fn normal_range(&self, _i: usize) -> (f32, f32) {
            (0.0, self.scale / 2.0)
        }
    }

    fn vector(names: &Arc<[String]>, values: Vec<f32>) -> FeatureVector {
        FeatureVector {
            ts_ms: 0,
            names: names.clone(),
            values,
        }
    }

    fn names(list: &[&str]) -> Arc<[String]> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn quick() -> DetectConfig {
        DetectConfig {
            baseline: BaselineConfig {
                learning_steps: 20,
                ..BaselineConfig::default()
            },
            close_after: 3,
            ..DetectConfig::default()
        }
    }

    #[test]
    fn features_map_to_their_target() {
        assert_eq!(target_of("host.cpu.busy_pct.mean_60s"), "host");
        assert_eq!(target_of("target.web.probe.latency_ms.max_60s"), "web");
        assert_eq!(target_of("target.broken"), "host");
        assert_eq!(target_of("other.x"), "host");
    }

    #[test]
    fn baseline_opens_an_incident_on_the_target_whose_signal_jumps_and_names_it() {
        let n = names(&[
            "host.cpu.busy_pct.mean_60s",
            "target.web.probe.latency_ms.mean_60s",
            "target.web.rss_mb.mean_60s",
        ]);
        let mut d = Detectors::new(quick());
        let mut opened = Vec::new();
        let mut closed = Vec::new();
        for i in 0..300 {
            let wobble = (i % 7) as f32 * 0.1;
            let latency = if (200..203).contains(&i) {
                900.0
            } else {
                20.0 + wobble
            };
            let out = d.step(&vector(&n, vec![10.0 + wobble, latency, 50.0 + wobble]));
            assert_eq!(out.anomaly.len(), 2, "one score per target");
            for e in out.incidents {
                match e {
                    IncidentEvent::Opened { .. } => opened.push((i, e)),
                    IncidentEvent::Closed { .. } => closed.push((i, e)),
                }
            }
        }
        assert_eq!(opened.len(), 1, "{opened:?}");
        let (
            at,
            IncidentEvent::Opened {
                target,
                drivers,
                detector,
                shadow,
                ..
            },
        ) = &opened[0]
        else {
            unreachable!()
        };
        assert_eq!(*at, 200);
        assert_eq!(target, "web");
        assert_eq!(detector, "baseline");
        assert!(!shadow);
        assert_eq!(drivers[0].feature, "target.web.probe.latency_ms.mean_60s");
        assert_eq!(drivers[0].value, 900.0);
        assert!(drivers[0].normal[1] < 900.0 && drivers[0].normal[0] < 21.0);
        assert_eq!(closed.len(), 1);
        assert!(closed[0].0 > 202, "closes only after clean steps");
    }

    fn mean_model(scale: f32, contrib: bool) -> Box<dyn Scorer> {
        Box::new(MeanModel {
            names: vec!["host.a.mean_60s".into(), "host.b.mean_60s".into()],
            scale,
            with_contrib: contrib,
        })
    }

    #[test]
    fn shadow_model_records_incidents_as_shadow_and_does_not_feed_rules() {
        let n = names(&["host.a.mean_60s", "host.b.mean_60s", "host.c.mean_60s"]);
        let mut d = Detectors::new(quick());
        d.set_model(ModelSlot::new(
            mean_model(10.0, true),
            Role::Shadow,
            "host".into(),
            d.config(),
        ));
        let mut out = StepOutput::default();
        for _ in 0..3 {
            out = d.step(&vector(&n, vec![9.0, 8.0, 1.0]));
            if !out.incidents.is_empty() {
                break;
            }
        }
        let host = out.anomaly.iter().find(|(t, _)| t == "host").unwrap().1;
        assert!(
            host < 0.5,
            "a shadow's score does not reach the rules: {host}"
        );
        let IncidentEvent::Opened {
            shadow,
            drivers,
            detector,
            ..
        } = &out.incidents[0]
        else {
            panic!("{out:?}")
        };
        assert!(*shadow);
        assert_eq!(detector, "mean@10");
        assert_eq!(drivers[0].feature, "host.a.mean_60s");
        assert_eq!(drivers[0].normal, [0.0, 5.0]);

        d.promote().unwrap();
        let out = d.step(&vector(&n, vec![9.0, 8.0, 1.0]));
        let host = out.anomaly.iter().find(|(t, _)| t == "host").unwrap().1;
        assert!(
            (host - 0.85).abs() < 1e-6,
            "an active model's score does: {host}"
        );
    }

    #[test]
    fn attribution_is_used_without_contributions_output() {
        let n = names(&["host.a.mean_60s", "host.b.mean_60s"]);
        let mut d = Detectors::new(quick());
        d.set_model(ModelSlot::new(
            mean_model(10.0, false),
            Role::Active,
            "host".into(),
            d.config(),
        ));
        d.step(&vector(&n, vec![3.0, 9.0]));
        let out = d.step(&vector(&n, vec![3.0, 9.0]));
        let IncidentEvent::Opened { drivers, .. } = &out.incidents[0] else {
            panic!("{out:?}")
        };
        assert_eq!(drivers[0].feature, "host.b.mean_60s");
        assert_eq!(drivers[0].contribution, 18.0);
    }

    #[test]
    fn missing_feature_means_no_score_not_a_guess() {
        let n = names(&["host.a.mean_60s"]);
        let mut d = Detectors::new(quick());
        d.set_model(ModelSlot::new(
            mean_model(1.0, true),
            Role::Active,
            "host".into(),
            d.config(),
        ));
        for _ in 0..5 {
            let out = d.step(&vector(&n, vec![100.0]));
            assert!(out.incidents.is_empty());
        }
        assert_eq!(d.models()[0].stats.missing, 5);
        assert_eq!(d.models()[0].stats.steps, 0);
    }

    #[test]
    fn quiet_shadow_is_promoted_after_its_time_and_noisy_one_is_not() {
        let n = names(&["host.a.mean_60s", "host.b.mean_60s"]);
        let mut cfg = quick();
        cfg.lifecycle.promote_after_steps = Some(50);
        let mut d = Detectors::new(cfg.clone());
        d.set_model(ModelSlot::new(
            mean_model(100.0, true),
            Role::Shadow,
            "host".into(),
            &cfg,
        ));
        let mut events = Vec::new();
        for _ in 0..60 {
            events.extend(d.step(&vector(&n, vec![1.0, 2.0])).lifecycle);
        }
        assert!(
            matches!(&events[..], [LifecycleEvent::Promoted { label, .. }] if label == "mean@100")
        );
        assert!(
            d.on_trial,
            "a promotion without a previous model is tried against the baseline"
        );
        assert_eq!(d.models()[0].role, Role::Active);

        let mut d = Detectors::new(cfg.clone());
        d.set_model(ModelSlot::new(
            mean_model(1.0, true),
            Role::Shadow,
            "host".into(),
            &cfg,
        ));
        for _ in 0..200 {
            assert!(d.step(&vector(&n, vec![1.0, 2.0])).lifecycle.is_empty());
        }
        assert_eq!(d.models()[0].role, Role::Shadow);
    }

    #[test]
    fn promoted_model_that_alerts_far_more_than_the_previous_is_rolled_back() {
        let n = names(&["host.a.mean_60s", "host.b.mean_60s"]);
        let cfg = quick();
        let mut d = Detectors::new(cfg.clone());
        d.set_model(ModelSlot::new(
            mean_model(100.0, true),
            Role::Active,
            "host".into(),
            &cfg,
        ));
        d.set_model(ModelSlot::new(
            mean_model(1.0, true),
            Role::Shadow,
            "host".into(),
            &cfg,
        ));
        assert_eq!(d.promote().unwrap(), "mean@1");
        let mut events = Vec::new();
        for _ in 0..20 {
            events.extend(d.step(&vector(&n, vec![1.0, 2.0])).lifecycle);
        }
        assert!(
            matches!(&events[..], [LifecycleEvent::RolledBack { label, .. }] if label == "mean@1"),
            "{events:?}"
        );
        assert_eq!(d.models().len(), 1);
        assert_eq!(d.models()[0].scorer.label(), "mean@100");
        assert_eq!(d.models()[0].role, Role::Active);
    }

    #[test]
    fn promoted_model_that_behaves_passes_its_trial() {
        let n = names(&["host.a.mean_60s", "host.b.mean_60s"]);
        let mut cfg = quick();
        cfg.lifecycle.trial_steps = 30;
        let mut d = Detectors::new(cfg.clone());
        d.set_model(ModelSlot::new(
            mean_model(100.0, true),
            Role::Active,
            "host".into(),
            &cfg,
        ));
        d.set_model(ModelSlot::new(
            mean_model(50.0, true),
            Role::Shadow,
            "host".into(),
            &cfg,
        ));
        d.promote().unwrap();
        let mut events = Vec::new();
        for _ in 0..40 {
            events.extend(d.step(&vector(&n, vec![1.0, 2.0])).lifecycle);
        }
        assert!(
            matches!(&events[..], [LifecycleEvent::TrialPassed { label }] if label == "mean@50")
        );
        assert_eq!(d.models().len(), 1);
    }
}
