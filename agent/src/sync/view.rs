//! The daemon's [`NodeView`]: the state from the live status the pipeline
//! keeps, and summaries from per-sample health and anomaly scores the
//! pipeline feeds to a [`Telemetry`] handle (an in-memory accumulator, a
//! few numbers per target; nothing here touches the disk).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::message::{
    Dropped, StateBody, StateModel, StateTarget, SummaryBody, SummaryCounts, SummaryTarget,
};
use super::uplink::NodeView;
use crate::collect::TargetStatus;
use crate::control::SharedStatus;

#[derive(Debug, Default, Clone)]
struct TargetAcc {
    up: bool,
    samples: u64,
    failing: u64,
    score_sum: f64,
    score_n: u64,
    score_max: Option<f64>,
}

/// Per-target statistics over the current summary interval.
#[derive(Debug, Default, Clone)]
pub struct Telemetry {
    acc: Arc<Mutex<BTreeMap<String, TargetAcc>>>,
}

impl Telemetry {
    /// One sample: each target's health and the latest anomaly scores.
    pub fn observe(&self, targets: &[TargetStatus], anomaly: &[(String, f32)]) {
        let mut acc = self.acc.lock().unwrap_or_else(|p| p.into_inner());
        for t in targets {
            let a = acc.entry(t.name.clone()).or_default();
            a.up = t.up;
            a.samples += 1;
            if !t.up {
                a.failing += 1;
            }
        }
        for (name, score) in anomaly {
            if let Some(a) = acc.get_mut(name) {
                let s = f64::from(*score);
                if s.is_finite() {
                    a.score_sum += s;
                    a.score_n += 1;
                    a.score_max = Some(a.score_max.map_or(s, |m| m.max(s)));
                }
            }
        }
    }

    /// The interval's targets; starts a new interval.
    pub fn take(&self) -> Vec<SummaryTarget> {
        let acc = std::mem::take(&mut *self.acc.lock().unwrap_or_else(|p| p.into_inner()));
        acc.into_iter()
            .map(|(name, a)| SummaryTarget {
                name,
                health: health(a.up).to_string(),
                samples: a.samples,
                failing_samples: a.failing,
                score_mean: (a.score_n > 0).then(|| a.score_sum / a.score_n as f64),
                score_max: a.score_max,
            })
            .collect()
    }
}

fn health(up: bool) -> &'static str {
    if up {
        "up"
    } else {
        "down"
    }
}

/// The running daemon, as the uplink sees it.
pub struct DaemonView {
    pub status: SharedStatus,
    pub telemetry: Telemetry,
    pub group: Option<String>,
    pub pause_file: PathBuf,
}

impl NodeView for DaemonView {
    fn state(&self) -> StateBody {
        let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::store::now_ms();
        StateBody {
            online: true,
            version: s.version.clone(),
            started_ms: s.started_ms,
            uptime_s: (now.saturating_sub(s.started_ms).max(0) / 1000) as u64,
            group: self.group.clone(),
            paused: self.pause_file.exists(),
            targets: s
                .targets
                .iter()
                .map(|t| StateTarget {
                    name: t.name.clone(),
                    kind: t.kind.clone(),
                    health: health(t.up).to_string(),
                    score: s
                        .anomaly
                        .iter()
                        .find(|(n, _)| n == &t.name)
                        .map(|(_, v)| *v)
                        .filter(|v| v.is_finite()),
                })
                .collect(),
            models: s
                .models
                .iter()
                .map(|m| StateModel {
                    label: m.label.clone(),
                    role: m.role.clone(),
                    target: m.target.clone(),
                })
                .collect(),
            open_incidents: s.open_incidents as u64,
            dropped: Dropped::default(),
        }
    }

    fn summary(&self, interval: Duration) -> SummaryBody {
        SummaryBody {
            interval_s: interval.as_secs_f64().round() as u64,
            targets: self.telemetry.take(),
            counts: SummaryCounts::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, up: bool) -> TargetStatus {
        TargetStatus {
            name: name.into(),
            kind: "systemd".into(),
            state: "x".into(),
            up,
            probe: None,
            detail: None,
        }
    }

    #[test]
    fn telemetry_counts_failing_samples_and_score_stats() {
        let tel = Telemetry::default();
        tel.observe(&[t("web", true)], &[("web".into(), 0.2)]);
        tel.observe(&[t("web", false)], &[("web".into(), 0.8)]);
        tel.observe(&[t("web", false)], &[]);
        let s = tel.take();
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].samples, s[0].failing_samples), (3, 2));
        assert_eq!(s[0].health, "down");
        assert!((s[0].score_mean.expect("mean") - 0.5).abs() < 1e-6);
        assert!((s[0].score_max.expect("max") - 0.8).abs() < 1e-6);
        assert!(tel.take().is_empty(), "take starts a new interval");
    }
}
