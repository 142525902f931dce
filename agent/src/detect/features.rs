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
