//! The detection stage as the daemon runs it: owns the [`Detectors`], keeps
//! the loaded models in step with the registry on disk, runs every step on a
//! blocking thread (model inference never runs on an async worker), and
//! records the incidents and lifecycle changes it produces.

use crate::sync::message::{events, EventBody};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::engine::{
    explanation, DetectConfig, Detectors, IncidentEvent, LifecycleEvent, ModelSlot, Role, Scorer,
};
use super::features::FeatureVector;
use super::lifecycle::{self, Entry, LifecycleError};
use crate::collect::sampler::now_ms;
use crate::control::{ModelLive, Reply};
use crate::store::Store;

/// Loads an installed package into something that scores.
pub type Loader = fn(&Path) -> Result<Box<dyn Scorer>, String>;

/// The loader the daemon uses: ONNX packages under tract.
pub fn onnx_loader(dir: &Path) -> Result<Box<dyn Scorer>, String> {
    let model = super::onnx::load_package(dir).map_err(|e| e.to_string())?;
    Ok(Box::new(model))
}

/// Loads a package the way the daemon will and runs its self-test.
pub fn verify_package(dir: &Path) -> Result<super::lifecycle::PackageInfo, String> {
    super::onnx::load_package(dir)
        .map(|m| m.info())
        .map_err(|e| e.to_string())
}

pub struct DetectStage {
    /// `None` only while a step runs on the blocking pool.
    detectors: Option<Detectors>,
    /// The registry entry behind each loaded model, by role.
    loaded: HashMap<Role, Entry>,
    state_dir: PathBuf,
    store: Store,
    loader: Loader,
    /// (target, detector) to the open incident's id.
    open: HashMap<(String, String), i64>,
    /// The latest anomaly score per target.
    pub anomaly: Vec<(String, f32)>,
}

impl DetectStage {
    /// Loads the models the registry names; one that fails to load is
    /// logged and skipped (the baseline keeps watching).
    pub async fn new(cfg: DetectConfig, state_dir: &Path, store: Store, loader: Loader) -> Self {
        let mut stage = DetectStage {
            detectors: Some(Detectors::new(cfg)),
            loaded: HashMap::new(),
            state_dir: state_dir.to_path_buf(),
            store,
            loader,
            open: HashMap::new(),
            anomaly: Vec::new(),
        };
        match stage.store.close_detector_incidents(now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(closed = n, "closed incidents left open by the last run"),
            Err(e) => tracing::warn!(error = %e, "cannot close stale incidents"),
        }
        if let Err(e) = stage.sync_registry().await {
            tracing::error!(error = %e, "model registry unreadable; running the baseline only");
        }
        stage
    }

    fn det(&mut self) -> &mut Detectors {
        self.detectors
            .get_or_insert_with(|| Detectors::new(DetectConfig::default()))
    }

    pub fn reconfigure(&mut self, cfg: DetectConfig) {
        self.det().reconfigure(cfg);
    }

    /// Loads what the registry names for active and shadow, unloads what
    /// it no longer names.
    pub async fn sync_registry(&mut self) -> Result<String, LifecycleError> {
        let reg = lifecycle::load(&self.state_dir)?;
        let mut changes = Vec::new();
        for role in [Role::Active, Role::Shadow] {
            let want = reg.get(role).cloned();
            if want.as_ref() == self.loaded.get(&role) {
                continue;
            }
            self.det().take_model(role);
            self.loaded.remove(&role);
            let Some(entry) = want else {
                changes.push(format!("{role:?} unloaded"));
                continue;
            };
            let dir = lifecycle::entry_path(&self.state_dir, &entry);
            let loader = self.loader;
            let loaded = tokio::task::spawn_blocking(move || loader(&dir))
                .await
                .unwrap_or_else(|e| Err(format!("loader panicked: {e}")));
            match loaded {
                Ok(scorer) => {
                    let cfg = self.det().config().clone();
                    let slot = ModelSlot::new(scorer, role, entry.target.clone(), &cfg);
                    self.det().set_model(slot);
                    tracing::info!(model = %entry.label(), role = ?role, target = %entry.target, "model loaded");
                    self.store.post_event(EventBody::new(
                        events::MODEL_INSTALLED,
                        serde_json::json!({
                            "label": entry.label(),
                            "role": format!("{role:?}").to_lowercase(),
                            "target": entry.target,
                        }),
                    ));
                    changes.push(format!("{} loaded as {role:?}", entry.label()));
                    self.loaded.insert(role, entry);
                }
                Err(e) => {
                    tracing::error!(model = %entry.label(), role = ?role, error = %e, "installed model does not load; not running it");
                    changes.push(format!("{} failed to load: {e}", entry.label()));
                }
            }
        }
        if reg.previous.is_none() {
            self.det().take_model(Role::Previous);
        }
        Ok(if changes.is_empty() {
            "models unchanged".into()
        } else {
            changes.join("; ")
        })
    }

    /// Promotes the shadow model, on disk and in memory.
    pub async fn promote(&mut self, by: &str) -> Reply {
        if !self.det().models().iter().any(|m| m.role == Role::Shadow) {
            return Reply {
                ok: false,
                message: "no model is running in shadow".into(),
            };
        }
        match lifecycle::promote(&self.state_dir, now_ms(), by) {
            Ok(entry) => {
                let _ = self.det().promote();
                let prev = self.loaded.remove(&Role::Active);
                self.loaded.remove(&Role::Shadow);
                self.loaded.insert(Role::Active, entry.clone());
                if let Some(p) = prev {
                    self.loaded.insert(Role::Previous, p);
                }
                tracing::info!(model = %entry.label(), by, "model promoted");
                self.store.post_event(EventBody::new(
                    events::MODEL_PROMOTED,
                    serde_json::json!({"label": entry.label(), "target": entry.target, "by": by}),
                ));
                Reply {
                    ok: true,
                    message: format!("{} promoted", entry.label()),
                }
            }
            Err(e) => Reply {
                ok: false,
                message: e.to_string(),
            },
        }
    }

    /// Rolls the active model back to the previous one.
    pub async fn rollback(&mut self, by: &str) -> Reply {
        match lifecycle::rollback(&self.state_dir, now_ms(), by) {
            Ok((retired, back)) => {
                let in_memory = self.det().models().iter().any(|m| m.role == Role::Previous);
                if in_memory {
                    let _ = self.det().rollback();
                    self.loaded.remove(&Role::Active);
                    if let Some(p) = self.loaded.remove(&Role::Previous) {
                        self.loaded.insert(Role::Active, p);
                    }
                } else if let Err(e) = self.sync_registry().await {
                    tracing::error!(error = %e, "cannot reload models after a rollback");
                }
                tracing::warn!(model = %retired.label(), by, "model rolled back");
                self.store.post_event(EventBody::new(
                    events::MODEL_ROLLED_BACK,
                    serde_json::json!({
                        "label": retired.label(),
                        "target": retired.target,
                        "by": by,
                        "active": back.as_ref().map(|b| b.label()),
                    }),
                ));
                Reply {
                    ok: true,
                    message: match back {
                        Some(b) => format!("{} rolled back; {} active", retired.label(), b.label()),
                        None => format!("{} rolled back; baseline only", retired.label()),
                    },
                }
            }
            Err(e) => Reply {
                ok: false,
                message: e.to_string(),
            },
        }
    }

    /// Scores one feature vector and records what came of it.
    pub async fn step(&mut self, v: &FeatureVector) {
        let Some(mut det) = self.detectors.take() else {
            return;
        };
        let vector = v.clone();
        let result = tokio::task::spawn_blocking(move || {
            let out = det.step(&vector);
            (det, out)
        })
        .await;
        let out = match result {
            Ok((det, out)) => {
                self.detectors = Some(det);
                out
            }
            Err(e) => {
                tracing::error!(error = %e, "detection step failed; detectors restarted");
                let cfg = DetectConfig::default();
                self.detectors = Some(Detectors::new(cfg));
                self.loaded.clear();
                return;
            }
        };
        self.anomaly = out.anomaly;
        for e in out.incidents {
            self.record_incident(v.ts_ms, e).await;
        }
        for e in out.lifecycle {
            self.record_lifecycle(e);
        }
    }

    async fn record_incident(&mut self, ts_ms: i64, e: IncidentEvent) {
        match e {
            IncidentEvent::Opened {
                target,
                detector,
                shadow,
                score,
                drivers,
            } => {
                let key = (target.clone(), detector.clone());
                if self.open.contains_key(&key) {
                    return;
                }
                let top: Vec<String> = drivers
                    .iter()
                    .map(|d| {
                        format!(
                            "{}={} (normal {}..{})",
                            d.feature, d.value, d.normal[0], d.normal[1]
                        )
                    })
                    .collect();
                tracing::warn!(target = %target, detector = %detector, shadow, score, drivers = %top.join(", "), "anomaly: incident opened");
                let exp = explanation(&detector, shadow, score, &drivers);
                match self
                    .store
                    .open_incident(target, ts_ms, f64::from(score), exp)
                    .await
                {
                    Ok(id) => {
                        self.open.insert(key, id);
                    }
                    Err(e) => tracing::error!(error = %e, "cannot record incident"),
                }
            }
            IncidentEvent::Closed {
                target, detector, ..
            } => {
                if let Some(id) = self.open.remove(&(target.clone(), detector.clone())) {
                    tracing::info!(target = %target, detector = %detector, "anomaly: incident closed");
                    if let Err(e) = self.store.close_incident(id, ts_ms).await {
                        tracing::error!(error = %e, "cannot close incident");
                    }
                }
            }
        }
    }

    fn record_lifecycle(&mut self, e: LifecycleEvent) {
        let now = now_ms();
        match e {
            LifecycleEvent::Promoted { label, why } => {
                tracing::info!(model = %label, why = %why, "model promoted after its time in shadow");
                self.store.post_event(EventBody::new(
                    events::MODEL_PROMOTED,
                    serde_json::json!({"label": label, "by": "auto", "why": why}),
                ));
                match lifecycle::promote(&self.state_dir, now, "auto") {
                    Ok(entry) => {
                        let prev = self.loaded.remove(&Role::Active);
                        self.loaded.remove(&Role::Shadow);
                        self.loaded.insert(Role::Active, entry);
                        if let Some(p) = prev {
                            self.loaded.insert(Role::Previous, p);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot record the promotion"),
                }
            }
            LifecycleEvent::RolledBack { label, why } => {
                tracing::warn!(model = %label, why = %why, "model rolled back by itself");
                self.store.post_event(EventBody::new(
                    events::MODEL_ROLLED_BACK,
                    serde_json::json!({"label": label, "by": "auto", "why": why}),
                ));
                match lifecycle::rollback(&self.state_dir, now, "auto") {
                    Ok(_) => {
                        self.loaded.remove(&Role::Active);
                        if let Some(p) = self.loaded.remove(&Role::Previous) {
                            self.loaded.insert(Role::Active, p);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot record the rollback"),
                }
            }
            LifecycleEvent::TrialPassed { label } => {
                tracing::info!(model = %label, "promoted model passed its trial");
                self.loaded.remove(&Role::Previous);
                if let Err(e) = lifecycle::record(&self.state_dir, now, "trial passed", "auto") {
                    tracing::error!(error = %e, "cannot record the trial");
                }
            }
        }
    }

    /// For `outpost status`: loaded models and open incidents.
    pub fn live(&self) -> (Vec<ModelLive>, usize) {
        let models = self
            .detectors
            .as_ref()
            .map(|d| {
                d.models()
                    .iter()
                    .map(|m| ModelLive {
                        label: m.scorer.label(),
                        role: format!("{:?}", m.role).to_lowercase(),
                        target: m.target.clone(),
                        steps: m.stats.steps,
                        alerts: m.stats.alerts,
                        missing: m.stats.missing,
                        errors: m.stats.errors,
                        last_score: m.stats.last_score,
                    })
                    .collect()
            })
            .unwrap_or_default();
        (models, self.open.len())
    }
}
