//! Feature windows: every step, per signal, mean, min, max, std, last and
//! slope over the window. The names (`host.cpu.busy_pct.mean_60s`) are the
//! contract model packages reference.

use std::sync::Arc;

/// One feature vector: the features of every signal at the end of a step.
/// Values are f32 because that is what is stored and what models consume, so
/// training and serving see the same numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureVector {
    pub ts_ms: i64,
    /// Feature names, sorted. Shared between vectors while the set of signals
    /// does not change.
    pub names: Arc<[String]>,
    pub values: Vec<f32>,
}

impl FeatureVector {
    pub fn get(&self, name: &str) -> Option<f32> {
        self.names
            .binary_search_by(|n| n.as_str().cmp(name))
            .ok()
            .map(|i| self.values[i])
    }
}

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::collect::{Sample, SignalName};

/// The statistics computed per signal, in the order they are named.
pub const STATS: [&str; 6] = ["mean", "min", "max", "std", "last", "slope"];

/// The feature name of a signal's statistic over a window:
/// `feature_name("host.cpu.busy_pct", "mean", 60s)` is
/// `host.cpu.busy_pct.mean_60s`.
pub fn feature_name(signal: &str, stat: &str, window: Duration) -> String {
    format!("{signal}.{stat}_{}s", window.as_secs())
}

/// Summary statistics of one window of `(t_ms, value)` points.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Population standard deviation.
    pub std: f64,
    pub last: f64,
    /// Least-squares slope in units per second; 0 with fewer than two points
    /// or no spread in time.
    pub slope: f64,
}

impl Stats {
    /// `None` for an empty window.
    pub fn of(points: impl IntoIterator<Item = (i64, f64)>) -> Option<Stats> {
        // Welford for the variance; sums centred on the first time stamp for
        // the slope, so large epoch values do not cost precision.
        let mut n = 0f64;
        let (mut mean, mut m2) = (0f64, 0f64);
        let (mut min, mut max, mut last) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
        let mut t0 = None;
        let (mut st, mut stt, mut sty) = (0f64, 0f64, 0f64);
        let mut sum_y = 0f64;
        for (t_ms, y) in points {
            let t0 = *t0.get_or_insert(t_ms);
            let t = (t_ms - t0) as f64 / 1000.0;
            n += 1.0;
            let d = y - mean;
            mean += d / n;
            m2 += d * (y - mean);
            min = min.min(y);
            max = max.max(y);
            last = y;
            st += t;
            stt += t * t;
            sty += t * y;
            sum_y += y;
        }
        if n == 0.0 {
            return None;
        }
        let denom = n * stt - st * st;
        let slope = if n >= 2.0 && denom.abs() > f64::EPSILON {
            (n * sty - st * sum_y) / denom
        } else {
            0.0
        };
        Some(Stats {
            mean,
            min,
            max,
            std: (m2 / n).max(0.0).sqrt(),
            last,
            slope,
        })
    }

    fn get(&self, i: usize) -> f64 {
        match i {
            0 => self.mean,
            1 => self.min,
            2 => self.max,
            3 => self.std,
            4 => self.last,
            _ => self.slope,
        }
    }
}

/// Sliding windows over every signal, turned into a [`FeatureVector`] every
/// step. Window arithmetic uses a monotonic clock so a wall-clock jump
/// neither empties nor stretches a window; vectors are stamped with wall time.
#[derive(Debug)]
pub struct FeatureWindows {
    window_ms: i64,
    window: Duration,
    series: BTreeMap<SignalName, VecDeque<(i64, f64)>>,
    /// The signals behind the current `names`, and for each feature (in
    /// signal-major, STATS order) its index in the sorted name list.
    layout: Vec<SignalName>,
    perm: Vec<usize>,
    names: Arc<[String]>,
}

impl FeatureWindows {
    pub fn new(window: Duration) -> FeatureWindows {
        FeatureWindows {
            window_ms: window.as_millis().min(i64::MAX as u128) as i64,
            window,
            series: BTreeMap::new(),
            layout: Vec::new(),
            perm: Vec::new(),
            names: Arc::from(Vec::new()),
        }
    }

    /// Adds a sample taken at monotonic time `mono_ms`.
    pub fn push(&mut self, mono_ms: i64, sample: &Sample) {
        for (name, v) in &sample.values {
            if !v.is_finite() {
                continue;
            }
            match self.series.get_mut(name) {
                Some(buf) => buf.push_back((mono_ms, *v)),
                None => {
                    let mut buf = VecDeque::with_capacity(8);
                    buf.push_back((mono_ms, *v));
                    self.series.insert(name.clone(), buf);
                }
            }
        }
        self.evict(mono_ms);
    }

    fn evict(&mut self, mono_ms: i64) {
        let oldest = mono_ms.saturating_sub(self.window_ms);
        self.series.retain(|_, buf| {
            while buf.front().is_some_and(|(t, _)| *t <= oldest) {
                buf.pop_front();
            }
            !buf.is_empty()
        });
    }

    /// Number of signals currently in the windows.
    pub fn signals(&self) -> usize {
        self.series.len()
    }

    /// The feature vector at monotonic time `mono_ms`, stamped `ts_ms`.
    /// `None` when no signal has a point in the window.
    pub fn compute(&mut self, mono_ms: i64, ts_ms: i64) -> Option<FeatureVector> {
        self.evict(mono_ms);
        if self.series.is_empty() {
            return None;
        }
        if !self.series.keys().eq(self.layout.iter()) {
            self.relayout();
        }
        let mut values = vec![0f32; self.perm.len()];
        for (si, buf) in self.series.values().enumerate() {
            let Some(stats) = Stats::of(buf.iter().copied()) else {
                continue;
            };
            for k in 0..STATS.len() {
                values[self.perm[si * STATS.len() + k]] = stats.get(k) as f32;
            }
        }
        Some(FeatureVector {
            ts_ms,
            names: self.names.clone(),
            values,
        })
    }

    fn relayout(&mut self) {
        self.layout = self.series.keys().cloned().collect();
        let raw: Vec<String> = self
            .layout
            .iter()
            .flat_map(|s| STATS.iter().map(|stat| feature_name(s, stat, self.window)))
            .collect();
        let mut order: Vec<usize> = (0..raw.len()).collect();
        order.sort_by(|a, b| raw[*a].cmp(&raw[*b]));
        self.perm = vec![0; raw.len()];
        for (sorted_pos, raw_idx) in order.iter().enumerate() {
            self.perm[*raw_idx] = sorted_pos;
        }
        let mut raw = raw;
        let names: Vec<String> = order.iter().map(|i| std::mem::take(&mut raw[*i])).collect();
        self.names = Arc::from(names);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(values: &[(&str, f64)]) -> Sample {
        let mut s = Sample::new(0);
        for (n, v) in values {
            s.push(&SignalName::from(*n), *v);
        }
        s
    }

    #[test]
    fn stats_of_a_line() {
        // y = 2t + 1 sampled each second for 5 s.
        let pts: Vec<(i64, f64)> = (0..5).map(|t| (1_000 * t, 2.0 * t as f64 + 1.0)).collect();
        let s = Stats::of(pts).expect("non-empty");
        assert_eq!(s.mean, 5.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 9.0);
        assert_eq!(s.last, 9.0);
        assert!((s.slope - 2.0).abs() < 1e-12);
        // population std of 1,3,5,7,9 is sqrt(8)
        assert!((s.std - 8f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn stats_single_point_and_empty() {
        let s = Stats::of([(5, 3.5)]).expect("one point");
        assert_eq!(
            (s.mean, s.min, s.max, s.std, s.last, s.slope),
            (3.5, 3.5, 3.5, 0.0, 3.5, 0.0)
        );
        assert!(Stats::of(std::iter::empty()).is_none());
    }

    #[test]
    fn stats_keep_precision_at_epoch_times() {
        let base = 1_790_000_000_000i64;
        let pts: Vec<(i64, f64)> = (0..60)
            .map(|t| (base + 1_000 * t, 0.5 * t as f64))
            .collect();
        let s = Stats::of(pts).expect("non-empty");
        assert!((s.slope - 0.5).abs() < 1e-9, "slope {}", s.slope);
    }

    #[test]
    fn names_are_stable_and_sorted() {
        let mut w = FeatureWindows::new(Duration::from_secs(60));
        w.push(
            0,
            &sample(&[("host.cpu.busy_pct", 10.0), ("a.b", 1.0), ("a", 2.0)]),
        );
        w.push(
            1000,
            &sample(&[("host.cpu.busy_pct", 30.0), ("a.b", 1.0), ("a", 2.0)]),
        );
        let v = w.compute(1000, 42).expect("vector");
        assert_eq!(v.ts_ms, 42);
        assert_eq!(v.names.len(), 18);
        assert!(v.names.windows(2).all(|p| p[0] < p[1]), "{:?}", v.names);
        assert_eq!(v.get("host.cpu.busy_pct.mean_60s"), Some(20.0));
        assert_eq!(v.get("host.cpu.busy_pct.max_60s"), Some(30.0));
        assert_eq!(v.get("host.cpu.busy_pct.min_60s"), Some(10.0));
        assert_eq!(v.get("host.cpu.busy_pct.last_60s"), Some(30.0));
        assert_eq!(v.get("host.cpu.busy_pct.slope_60s"), Some(20.0));
        assert_eq!(v.get("host.cpu.busy_pct.std_60s"), Some(10.0));
        assert_eq!(v.get("a.mean_60s"), Some(2.0));
        assert_eq!(v.get("a.b.last_60s"), Some(1.0));
        // Same signals: the very same name list is shared.
        w.push(
            2000,
            &sample(&[("host.cpu.busy_pct", 30.0), ("a.b", 1.0), ("a", 2.0)]),
        );
        let v2 = w.compute(2000, 43).expect("vector");
        assert!(Arc::ptr_eq(&v.names, &v2.names));
    }

    #[test]
    fn window_slides_and_signals_expire() {
        let mut w = FeatureWindows::new(Duration::from_secs(10));
        for t in 0..10 {
            w.push(t * 1000, &sample(&[("x", t as f64), ("gone", 1.0)]));
        }
        for t in 10..25 {
            w.push(t * 1000, &sample(&[("x", t as f64)]));
        }
        let v = w.compute(24_000, 0).expect("vector");
        // Window (14 s, 24 s] holds x = 15..=24.
        assert_eq!(v.get("x.min_10s"), Some(15.0));
        assert_eq!(v.get("x.max_10s"), Some(24.0));
        assert_eq!(v.get("gone.mean_10s"), None);
        assert_eq!(w.signals(), 1);
        // Nothing left once the window has passed with no new points.
        assert!(w.compute(60_000, 0).is_none());
    }

    #[test]
    fn non_finite_values_are_ignored() {
        let mut w = FeatureWindows::new(Duration::from_secs(60));
        let mut s = Sample::new(0);
        s.values.push((SignalName::from("x"), f64::NAN));
        s.values.push((SignalName::from("y"), 1.0));
        w.push(0, &s);
        let v = w.compute(0, 0).expect("vector");
        assert_eq!(v.get("x.mean_60s"), None);
        assert_eq!(v.get("y.mean_60s"), Some(1.0));
    }
}
