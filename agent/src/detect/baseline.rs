//! The built-in baseline detector: needs no model, learns each host's normal
//! from the host itself, and says which signals drove a score.
//!
//! Streaming, one step at a time, per signal (each feature of a
//! [`FeatureVector`](super::features::FeatureVector), or a raw value column):
//!
//! 1. **Location and scale.** An exponentially weighted mean of the value
//!    and of its absolute deviation, both winsorised: a step moves them by
//!    at most `clip_scales` scales, so the anomalies they learn through
//!    barely move them, while a lasting change (a new level) is absorbed
//!    over a few half-lives because the clip widens as the scale grows.
//! 2. **Normal range `[lo, hi]`.** The extremes the signal has reached,
//!    never narrower than `location ± range_min_scales · scale`, decaying
//!    back towards that band with a half-life of `range_half_life_steps`.
//!    A value beyond the range widens it at once, so the same excursion is
//!    not news the next time (a level shift alerts at its onset, not for as
//!    long as it lasts; a daily spike of the usual height stops alerting).
//! 3. **Signal score.** The excess beyond the range in units of the range's
//!    half-width on that side (`e = (x − hi) / (hi − location)`), mapped to
//!    `1 − exp(−e / excess_scale)`: 0 inside the range, saturating at 1.
//! 4. **Step score.** The maximum over signals (the one most out of range;
//!    the same number whatever the count of quiet signals, and it names its
//!    cause). A signal scores 0 during its first `learning_steps`
//!    observations, so a new host, or a new signal, starts quiet.
//! 5. **Refractory period.** A step scoring at least `alert_score` is an
//!    alert; the `refractory_steps` steps after it report 0, so one incident
//!    is reported once, at its start. [`Score::raw`] keeps the score before
//!    this suppression.
//!
//! Cost: a handful of floating-point operations per signal, no allocation
//! per step (see `benches/baseline.rs`).

use std::collections::HashMap;
use std::sync::Arc;

/// Tuning of the baseline detector. One set of defaults serves every host
/// and every signal: the estimators adapt to each signal's own level and
/// spread, so nothing here is in a signal's units.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BaselineConfig {
    /// Observations of a signal before it may score; it scores 0 until then.
    pub learning_steps: u32,
    /// Half-life, in steps, of the location and scale estimates.
    pub half_life_steps: f64,
    /// Winsorisation: one step moves location and scale by at most this
    /// many scales.
    pub clip_scales: f64,
    /// The normal range is never narrower than location ± this many scales
    /// (the scale is a mean absolute deviation, about 0.8 σ).
    pub range_min_scales: f64,
    /// Half-life, in steps, of the normal range's memory of past extremes.
    pub range_half_life_steps: f64,
    /// The excess beyond the range, in half-widths of the range, at which a
    /// signal scores `1 − 1/e ≈ 0.63`.
    pub excess_scale: f64,
    /// A step scoring at least this is an alert.
    pub alert_score: f32,
    /// Steps after an alert whose score is reported as 0.
    pub refractory_steps: u32,
}

/// Defaults. Chosen on the shared part of NAB (see `benches/nab.sh`),
/// with whole-number choices, not per-file tuning.
pub const DEFAULT_LEARNING_STEPS: u32 = 150;
pub const DEFAULT_HALF_LIFE_STEPS: f64 = 300.0;
pub const DEFAULT_CLIP_SCALES: f64 = 2.5;
pub const DEFAULT_RANGE_MIN_SCALES: f64 = 3.0;
pub const DEFAULT_RANGE_HALF_LIFE_STEPS: f64 = 10_000.0;
pub const DEFAULT_EXCESS_SCALE: f64 = 0.5;
pub const DEFAULT_ALERT_SCORE: f32 = 0.5;
pub const DEFAULT_REFRACTORY_STEPS: u32 = 100;

impl Default for BaselineConfig {
    fn default() -> Self {
        BaselineConfig {
            learning_steps: DEFAULT_LEARNING_STEPS,
            half_life_steps: DEFAULT_HALF_LIFE_STEPS,
            clip_scales: DEFAULT_CLIP_SCALES,
            range_min_scales: DEFAULT_RANGE_MIN_SCALES,
            range_half_life_steps: DEFAULT_RANGE_HALF_LIFE_STEPS,
            excess_scale: DEFAULT_EXCESS_SCALE,
            alert_score: DEFAULT_ALERT_SCORE,
            refractory_steps: DEFAULT_REFRACTORY_STEPS,
        }
    }
}

/// A [`BaselineConfig`] value out of its domain.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("baseline.{key}: {what}")]
pub struct BaselineConfigError {
    pub key: &'static str,
    pub what: &'static str,
}

impl BaselineConfig {
    /// Checks every value is in its domain.
    pub fn validate(&self) -> Result<(), BaselineConfigError> {
        let err = |key, what| Err(BaselineConfigError { key, what });
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !(positive(self.half_life_steps) && self.half_life_steps >= 1.0) {
            return err("half_life_steps", "must be a finite number >= 1");
        }
        if !positive(self.clip_scales) {
            return err("clip_scales", "must be a finite number > 0");
        }
        if !positive(self.range_min_scales) {
            return err("range_min_scales", "must be a finite number > 0");
        }
        if !(positive(self.range_half_life_steps) && self.range_half_life_steps >= 1.0) {
            return err("range_half_life_steps", "must be a finite number >= 1");
        }
        if !positive(self.excess_scale) {
            return err("excess_scale", "must be a finite number > 0");
        }
        if !(self.alert_score > 0.0 && self.alert_score <= 1.0) {
            return err("alert_score", "must be in (0, 1]");
        }
        Ok(())
    }
}

/// One signal's part in a step's score.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Contribution {
    /// The signal (feature) name.
    pub name: String,
    /// Its value at this step.
    pub value: f32,
    /// Its learned normal range before this step.
    pub lo: f32,
    pub hi: f32,
    /// Its score, in [0, 1].
    pub score: f32,
}

/// The baseline's verdict on one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Score {
    /// In [0, 1]; 0 while learning and during the refractory period after
    /// an alert.
    pub score: f32,
    /// In [0, 1]: the score before the refractory period is applied.
    pub raw: f32,
    /// The signals behind `raw`, highest first: at most [`TOP`], only
    /// those scoring above 0.
    pub top: Vec<Contribution>,
}

/// How many contributions a [`Score`] carries.
pub const TOP: usize = 3;

/// Scales below this (absolute) or this fraction of the location's size are
/// rounding noise, not spread: a constant signal keeps a range this narrow.
const MIN_SCALE_ABS: f64 = 1e-9;
const MIN_SCALE_REL: f64 = 1e-3;
/// Steps before winsorisation starts: the first few observations set the
/// scale it clips with.
const WARMUP_STEPS: u32 = 10;

#[derive(Debug, Clone, Copy)]
struct Signal {
    loc: f64,
    scale: f64,
    lo: f64,
    hi: f64,
    seen: u32,
}

impl Signal {
    const NEW: Signal = Signal {
        loc: 0.0,
        scale: 0.0,
        lo: 0.0,
        hi: 0.0,
        seen: 0,
    };
}

/// Per-step constants derived from a [`BaselineConfig`].
#[derive(Debug, Clone, Copy)]
struct Rates {
    /// Weight of a new observation in location and scale.
    alpha: f64,
    /// Per-step decay of the range's excess over its minimum band.
    range_decay: f64,
    clip: f64,
    band: f64,
    inv_excess: f64,
    alert: f32,
    learning: u32,
}

impl Rates {
    fn of(cfg: &BaselineConfig) -> Rates {
        let half_life = |h: f64, default: f64| {
            if h.is_finite() && h >= 1.0 {
                h
            } else {
                default
            }
        };
        let pos = |v: f64, default: f64| if v.is_finite() && v > 0.0 { v } else { default };
        let hl = half_life(cfg.half_life_steps, DEFAULT_HALF_LIFE_STEPS);
        let range_hl = half_life(cfg.range_half_life_steps, DEFAULT_RANGE_HALF_LIFE_STEPS);
        Rates {
            alpha: 1.0 - 0.5f64.powf(1.0 / hl),
            range_decay: 0.5f64.powf(1.0 / range_hl),
            clip: pos(cfg.clip_scales, DEFAULT_CLIP_SCALES),
            band: pos(cfg.range_min_scales, DEFAULT_RANGE_MIN_SCALES),
            inv_excess: 1.0 / pos(cfg.excess_scale, DEFAULT_EXCESS_SCALE),
            alert: if cfg.alert_score > 0.0 && cfg.alert_score <= 1.0 {
                cfg.alert_score
            } else {
                DEFAULT_ALERT_SCORE
            },
            learning: cfg.learning_steps,
        }
    }
}

#[inline]
fn floor_scale(loc: f64, scale: f64) -> f64 {
    scale.max(MIN_SCALE_ABS + MIN_SCALE_REL * loc.abs())
}

impl Signal {
    /// Scores `x` against what was learned so far, then learns from it.
    /// Returns `(score, lo, hi)` with the range as it was before `x`.
    #[inline]
    fn step(&mut self, x: f64, r: &Rates) -> (f64, f64, f64) {
        if self.seen == 0 {
            *self = Signal {
                loc: x,
                scale: 0.0,
                lo: x,
                hi: x,
                seen: 0,
            };
        }
        self.seen = self.seen.saturating_add(1);
        let scale = floor_scale(self.loc, self.scale);
        let (lo, hi) = (
            self.lo.min(self.loc - r.band * scale),
            self.hi.max(self.loc + r.band * scale),
        );

        let excess = if x > hi {
            (x - hi) / (hi - self.loc)
        } else if x < lo {
            (lo - x) / (self.loc - lo)
        } else {
            0.0
        };
        let score = if self.seen > r.learning && excess > 0.0 {
            let s = 1.0 - (-excess * r.inv_excess).exp();
            if s.is_nan() {
                1.0
            } else {
                s.clamp(0.0, 1.0)
            }
        } else {
            0.0
        };

        // Learn: winsorised location and scale (faster while few
        // observations are in), the range absorbs x, then decays towards
        // the band around the new location.
        let d = x - self.loc;
        let alpha = r.alpha.max(1.0 / f64::from(self.seen));
        let lim = if self.seen > WARMUP_STEPS {
            r.clip * scale
        } else {
            f64::INFINITY
        };
        self.loc += alpha * d.clamp(-lim, lim);
        self.scale += alpha * (d.abs().min(lim) - self.scale);
        let scale2 = floor_scale(self.loc, self.scale);
        let (band_lo, band_hi) = (self.loc - r.band * scale2, self.loc + r.band * scale2);
        let (new_lo, new_hi) = (lo.min(x), hi.max(x));
        self.hi = band_hi + (new_hi - band_hi).max(0.0) * r.range_decay;
        self.lo = band_lo - (band_lo - new_lo).max(0.0) * r.range_decay;
        (score, lo, hi)
    }
}

/// The baseline detector over one host's signals.
#[derive(Debug, Clone)]
pub struct Baseline {
    cfg: BaselineConfig,
    rates: Rates,
    names: Arc<[String]>,
    signals: Vec<Signal>,
    /// Steps left in the refractory period.
    quiet: u32,
}

impl Baseline {
    /// A detector that has learned nothing yet. Out-of-domain values (see
    /// [`BaselineConfig::validate`]) fall back to their defaults.
    pub fn new(cfg: BaselineConfig) -> Self {
        Baseline {
            rates: Rates::of(&cfg),
            cfg,
            names: Arc::from(Vec::new()),
            signals: Vec::new(),
            quiet: 0,
        }
    }

    pub fn config(&self) -> &BaselineConfig {
        &self.cfg
    }

    /// The score at or above which a step is an alert (the configured
    /// `alert_score`, or its default when out of its domain).
    pub fn alert_score(&self) -> f32 {
        self.rates.alert
    }

    /// Scores one observation vector (`names[i]` is the name of
    /// `values[i]`, e.g. a [`FeatureVector`](super::features::FeatureVector)'s),
    /// then learns from it. Non-finite values are missing: they neither
    /// score nor teach. A signal not seen before starts learning; a signal
    /// absent from `names` is forgotten.
    pub fn update(&mut self, names: &Arc<[String]>, values: &[f32]) -> Score {
        let mut out = Score::default();
        self.update_into(names, values, &mut out);
        out
    }

    /// [`update`](Self::update) into a reused [`Score`]: no allocation once
    /// `out` has held [`TOP`] contributions with names as long.
    pub fn update_into(&mut self, names: &Arc<[String]>, values: &[f32], out: &mut Score) {
        if !Arc::ptr_eq(names, &self.names) {
            self.relayout(names);
        }
        let r = self.rates;
        // The best TOP (score, index, value, lo, hi), highest first.
        let mut top = [(0f64, 0usize, 0f32, 0f64, 0f64); TOP];
        let mut count = 0usize;
        for (i, (sig, &v)) in self.signals.iter_mut().zip(values).enumerate() {
            if !v.is_finite() {
                continue;
            }
            let (s, lo, hi) = sig.step(f64::from(v), &r);
            if s > 0.0 && (count < TOP || s > top[TOP - 1].0) {
                let mut k = count.min(TOP - 1);
                while k > 0 && top[k - 1].0 < s {
                    top[k] = top[k - 1];
                    k -= 1;
                }
                top[k] = (s, i, v, lo, hi);
                count = (count + 1).min(TOP);
            }
        }

        let raw = if count > 0 { top[0].0 as f32 } else { 0.0 };
        out.raw = raw;
        out.score = if self.quiet > 0 {
            self.quiet -= 1;
            0.0
        } else {
            if raw >= r.alert {
                self.quiet = self.cfg.refractory_steps;
            }
            raw
        };
        out.top.truncate(count);
        for (k, &(s, i, v, lo, hi)) in top[..count].iter().enumerate() {
            let c = Contribution {
                name: String::new(),
                value: v,
                lo: lo as f32,
                hi: hi as f32,
                score: s as f32,
            };
            if k == out.top.len() {
                out.top.push(c);
            } else {
                let name = std::mem::take(&mut out.top[k].name);
                out.top[k] = Contribution { name, ..c };
            }
            let name = &mut out.top[k].name;
            name.clear();
            name.push_str(&self.names[i]);
        }
    }

    /// Follows a new name list: signals keep what they learned by name.
    fn relayout(&mut self, names: &Arc<[String]>) {
        if names.len() == self.names.len() && names.iter().eq(self.names.iter()) {
            self.names = names.clone();
            return;
        }
        let old: HashMap<&str, Signal> = self
            .names
            .iter()
            .map(String::as_str)
            .zip(self.signals.iter().copied())
            .collect();
        let signals = names
            .iter()
            .map(|n| old.get(n.as_str()).copied().unwrap_or(Signal::NEW))
            .collect();
        self.signals = signals;
        self.names = names.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Arc<[String]> {
        list.iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .into()
    }

    /// A deterministic noise source (xorshift), uniform in [-1, 1].
    struct Noise(u64);
    impl Noise {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        }
    }

    #[test]
    fn learning_period_scores_zero() {
        let n = names(&["a", "b"]);
        let mut b = Baseline::new(BaselineConfig::default());
        let mut noise = Noise(7);
        for step in 0..DEFAULT_LEARNING_STEPS {
            // Wild values while learning: still 0.
            let v = if step % 10 == 9 { 1e6 } else { noise.next() };
            let s = b.update(&n, &[v, -v]);
            assert_eq!((s.score, s.raw), (0.0, 0.0), "step {step}");
            assert!(s.top.is_empty());
        }
    }

    #[test]
    fn step_change_scores_high_and_names_the_signal() {
        let n = names(&["cpu.mean", "mem.mean", "net.mean"]);
        let mut b = Baseline::new(BaselineConfig::default());
        let mut noise = Noise(42);
        for _ in 0..1000 {
            let s = b.update(
                &n,
                &[50.0 + noise.next(), 30.0 + noise.next(), 5.0 + noise.next()],
            );
            assert!(s.score < DEFAULT_ALERT_SCORE, "{s:?}");
        }
        // mem jumps by 10 spreads.
        let s = b.update(&n, &[50.0 + noise.next(), 40.0, 5.0 + noise.next()]);
        assert!(s.score > 0.9, "{s:?}");
        assert_eq!(s.top[0].name, "mem.mean");
        assert_eq!(s.top[0].value, 40.0);
        assert!(s.top[0].hi < 40.0 && s.top[0].lo < 30.0 && s.top[0].hi > 30.0);
        assert!(s.top.windows(2).all(|w| w[0].score >= w[1].score));
        // The alert is not repeated while the new level lasts: refractory
        // period first, then the range has absorbed the new level.
        for step in 0..2000 {
            let s = b.update(
                &n,
                &[50.0 + noise.next(), 40.0 + noise.next(), 5.0 + noise.next()],
            );
            assert!(s.score < DEFAULT_ALERT_SCORE, "step {step}: {s:?}");
        }
    }

    #[test]
    fn a_drop_scores_too() {
        let n = names(&["x"]);
        let mut b = Baseline::new(BaselineConfig::default());
        let mut noise = Noise(3);
        for _ in 0..500 {
            b.update(&n, &[100.0 + noise.next()]);
        }
        let s = b.update(&n, &[80.0]);
        assert!(s.score > 0.9, "{s:?}");
        assert!(s.top[0].lo > 80.0 && s.top[0].lo < 100.0);
    }

    #[test]
    fn constant_series_never_alerts() {
        for c in [0.0f32, 1.0, -3.5, 1e9, 1e-9] {
            let n = names(&["c", "zero"]);
            let mut b = Baseline::new(BaselineConfig::default());
            for step in 0..5000 {
                let s = b.update(&n, &[c, 0.0]);
                assert_eq!(s.raw, 0.0, "c={c} step {step}: {s:?}");
            }
        }
    }

    #[test]
    fn scores_stay_in_unit_interval() {
        let n = names(&["a", "b", "c"]);
        let mut b = Baseline::new(BaselineConfig {
            learning_steps: 5,
            ..BaselineConfig::default()
        });
        let mut noise = Noise(99);
        let specials = [
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
        ];
        for step in 0..20_000usize {
            let x = noise.next();
            let v = match step % 97 {
                0 => specials[(step / 97) % specials.len()],
                1 => x * 1e6,
                _ => x,
            };
            let s = b.update(&n, &[v, x.signum() * 1e-20, (step % 13) as f32]);
            for v in [s.score, s.raw] {
                assert!((0.0..=1.0).contains(&v), "step {step}: {s:?}");
            }
            assert!(s.top.len() <= TOP);
            for c in &s.top {
                assert!(c.score > 0.0 && c.score <= 1.0, "{c:?}");
            }
        }
    }

    #[test]
    fn ranges_bracket_typical_values() {
        let n = names(&["x", "y"]);
        let mut b = Baseline::new(BaselineConfig::default());
        let mut noise = Noise(5);
        for _ in 0..2000 {
            b.update(&n, &[10.0 + noise.next(), 0.0 + 0.01 * noise.next()]);
        }
        // Typical values score 0 (inside the range).
        let mut inside = 0;
        for _ in 0..1000 {
            let s = b.update(&n, &[10.0 + noise.next(), 0.01 * noise.next()]);
            inside += usize::from(s.raw == 0.0);
        }
        assert!(inside > 990, "{inside} of 1000 typical steps in range");
        let s = b.update(&n, &[10.0, 1.0]);
        assert_eq!(s.top.len(), 1);
        let c = &s.top[0];
        assert_eq!(c.name, "y");
        assert!(c.lo <= -0.01 && c.hi >= 0.01 && c.hi < 0.1, "{c:?}");
    }

    #[test]
    fn signals_keep_their_state_across_relayouts() {
        let ab = names(&["a", "b"]);
        let abc = names(&["a", "b", "c"]);
        let mut b = Baseline::new(BaselineConfig::default());
        for i in 0..300 {
            b.update(&ab, &[(i % 3) as f32, 5.0]);
        }
        // A new signal learns; the old ones still score at once.
        let s = b.update(&abc, &[1.0, 50.0, 1e9]);
        assert!(s.raw > 0.9);
        assert_eq!(s.top.len(), 1);
        assert_eq!(s.top[0].name, "b");
        // Same names in a different Arc: no relearning.
        let ab2 = names(&["a", "b"]);
        b.update(&ab2, &[1.0, 5.0]);
        assert!(Arc::ptr_eq(&b.names, &ab2));
    }

    #[test]
    fn refractory_period_holds_repeated_alerts() {
        let n = names(&["x"]);
        let cfg = BaselineConfig {
            refractory_steps: 20,
            ..BaselineConfig::default()
        };
        let mut b = Baseline::new(cfg.clone());
        let mut noise = Noise(11);
        for _ in 0..500 {
            b.update(&n, &[noise.next()]);
        }
        let first = b.update(&n, &[100.0]);
        assert!(first.score > 0.9, "{first:?}");
        // Bigger and bigger: raw alerts, the score is held at 0.
        let mut x = 100.0f32;
        for _ in 0..cfg.refractory_steps {
            x *= 4.0;
            let s = b.update(&n, &[x]);
            assert!(s.raw > 0.5 && s.score == 0.0, "{s:?}");
        }
        let s = b.update(&n, &[x * 4.0]);
        assert!(s.score > 0.5, "{s:?}");
    }

    #[test]
    fn update_into_reuses_buffers() {
        let n = names(&["a", "b", "c", "d"]);
        let mut b = Baseline::new(BaselineConfig {
            learning_steps: 10,
            refractory_steps: 0,
            ..BaselineConfig::default()
        });
        let mut out = Score::default();
        for i in 0..50 {
            b.update_into(&n, &[1.0, 2.0, 3.0, (i % 2) as f32], &mut out);
        }
        b.update_into(&n, &[100.0, 200.0, 300.0, 400.0], &mut out);
        assert_eq!(out.top.len(), TOP);
        let ptr = out.top.as_ptr();
        b.update_into(&n, &[1e4, 2e4, 3e4, 4e4], &mut out);
        assert_eq!(out.top.len(), TOP);
        assert_eq!(ptr, out.top.as_ptr());
        assert_eq!(out.top[0].name.len(), 1);
        assert_eq!(b.update(&n, &[1.0, 2.0, 3.0, 0.0]).top.len(), 0);
    }

    #[test]
    fn validate_names_the_key() {
        assert!(BaselineConfig::default().validate().is_ok());
        let e = BaselineConfig {
            excess_scale: 0.0,
            ..BaselineConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.key, "excess_scale");
        assert!(e.to_string().starts_with("baseline.excess_scale:"));
        // Out-of-domain values do not panic.
        let mut b = Baseline::new(BaselineConfig {
            half_life_steps: f64::NAN,
            range_half_life_steps: 0.0,
            excess_scale: -1.0,
            ..BaselineConfig::default()
        });
        let n = names(&["x"]);
        for i in 0..300 {
            let s = b.update(&n, &[i as f32]);
            assert!((0.0..=1.0).contains(&s.score));
        }
    }
}
