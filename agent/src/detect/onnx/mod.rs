//! ONNX model packages under tract: loading, verification and scoring.
//!
//! [`load_package`] reads a package (a directory or a `.tar` of one),
//! checks its manifest (every feature one the agent computes), the sha256
//! of model.onnx, loads the graph with tract-onnx (plus outpost's extra
//! operators, [`ops`]), fixes its input to f32 `[1, N]`, checks its output
//! shapes, optimizes it, spawns ONE plan state that every step reuses, and
//! runs every self-test within its tolerance. Anything wrong refuses the
//! whole package with a [`PackageError`] naming the file and the field.

pub mod manifest;
pub mod ops;
mod package;
pub mod signals;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

pub use manifest::{Feature, Manifest, Selftest};
pub use package::{MAX_MANIFEST_BYTES, MAX_ONNX_BYTES};

use super::engine::{ModelOutput, Scorer};
use super::lifecycle::PackageInfo;

/// Why a package is refused, or an inference failed.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The package's files: missing, extra, links, bad tar entries, sizes.
    #[error("{path}: {what}")]
    Layout { path: String, what: String },
    /// model.toml breaks format 1.
    #[error("{path}: {field}: {what}")]
    Manifest {
        path: String,
        field: String,
        what: String,
    },
    /// model.toml names a feature the agent does not compute.
    #[error("{path}: {field}: {what}")]
    UnknownFeature {
        path: String,
        field: String,
        feature: String,
        what: String,
    },
    #[error("{path}: sha256 {actual} does not match onnx.sha256 {expected} in the manifest")]
    Digest {
        path: String,
        expected: String,
        actual: String,
    },
    /// tract cannot parse, type or optimize the graph.
    #[error("{path}: tract cannot load the graph: {what}")]
    Graph { path: String, what: String },
    /// The graph's inputs or outputs do not match the manifest.
    #[error("{path}: {what}")]
    Shape { path: String, what: String },
    /// A self-test does not reproduce under tract.
    #[error("{path}: selftest[{index}]: {what}")]
    Selftest {
        path: String,
        index: usize,
        what: String,
    },
    #[error("inference failed: {0}")]
    Inference(String),
}

/// What loading measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadReport {
    /// Reading, checking, optimizing, and the self-tests.
    pub load_time: Duration,
    pub selftests: usize,
    /// The largest difference between an expected self-test value (score
    /// or contribution) and tract's.
    pub selftest_max_diff: f32,
    /// Mean wall time of one inference over the self-tests.
    pub inference_time: Duration,
}

/// A verified package, loaded and ready to score one vector per step.
pub struct LoadedModel {
    manifest: Manifest,
    names: Vec<String>,
    /// The one state spawned from the optimized plan, reused every step.
    state: TypedSimpleState,
    report: LoadReport,
    /// Scratch input for the attribution.
    probe: Vec<f32>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.manifest.name)
            .field("version", &self.manifest.version)
            .field("features", &self.names.len())
            .finish_non_exhaustive()
    }
}

fn tract_msg(e: &TractError) -> String {
    format!("{e:#}")
}

/// The hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Loads and verifies the package at `path` (a directory or a `.tar` of
/// one).
pub fn load_package(path: &Path) -> Result<LoadedModel, PackageError> {
    let start = Instant::now();
    let files = package::read(path)?;
    let manifest = manifest::parse(&files.manifest).map_err(|p| match p.unknown_feature {
        Some(feature) => PackageError::UnknownFeature {
            path: files.manifest_at.clone(),
            field: p.field,
            feature,
            what: p.what,
        },
        None => PackageError::Manifest {
            path: files.manifest_at.clone(),
            field: p.field,
            what: p.what,
        },
    })?;
    let actual = sha256_hex(&files.onnx);
    if actual != manifest.sha256 {
        return Err(PackageError::Digest {
            path: files.onnx_at,
            expected: manifest.sha256,
            actual,
        });
    }
    let state = build(&files.onnx_at, &files.onnx, &manifest)?;
    let names = manifest.features.iter().map(|f| f.name.clone()).collect();
    let n = manifest.features.len();
    let mut model = LoadedModel {
        manifest,
        names,
        state,
        report: LoadReport {
            load_time: Duration::ZERO,
            selftests: 0,
            selftest_max_diff: 0.0,
            inference_time: Duration::ZERO,
        },
        probe: Vec::with_capacity(n),
    };
    model.selftest(&files.manifest_at)?;
    model.report.load_time = start.elapsed();
    Ok(model)
}

/// The first output of `g` (or of a subgraph in it) that nothing in that
/// graph produces. tract-onnx 0.23 looks graph outputs up by name without
/// checking, and panics on such a graph; the release build aborts on a
/// panic, so one bad package would take the whole agent down. Found by the
/// `model_package` fuzz target (its input is in
/// `agent/fuzz/regressions/model_package/`).
fn unproduced_output(g: &tract_onnx::pb::GraphProto) -> Option<String> {
    let mut produced: std::collections::HashSet<&str> =
        g.input.iter().map(|i| i.name.as_str()).collect();
    produced.extend(g.initializer.iter().map(|t| t.name.as_str()));
    produced.extend(
        g.sparse_initializer
            .iter()
            .filter_map(|t| t.values.as_ref())
            .map(|t| t.name.as_str()),
    );
    for node in &g.node {
        produced.extend(
            node.output
                .iter()
                .filter(|o| !o.is_empty())
                .map(String::as_str),
        );
        for a in &node.attribute {
            if let Some(bad) = a.g.iter().chain(&a.graphs).find_map(unproduced_output) {
                return Some(bad);
            }
        }
    }
    g.output
        .iter()
        .find(|o| !produced.contains(o.name.as_str()))
        .map(|o| o.name.clone())
}

/// Parses, checks and optimizes the graph; spawns its state.
fn build(at: &str, bytes: &[u8], m: &Manifest) -> Result<TypedSimpleState, PackageError> {
    let graph = |e: TractError| PackageError::Graph {
        path: at.to_string(),
        what: tract_msg(&e),
    };
    let shape = |what: String| PackageError::Shape {
        path: at.to_string(),
        what,
    };
    let n = m.features.len();
    let mut onnx = tract_onnx::onnx();
    ops::register(&mut onnx);
    let proto = onnx
        .proto_model_for_read(&mut &bytes[..])
        .context("Reading proto model")
        .map_err(graph)?;
    if let Some(name) = proto.graph.as_ref().and_then(unproduced_output) {
        return Err(shape(format!(
            "the graph's output {name:?} is produced by no node, input or initializer"
        )));
    }
    let mut model = onnx
        .model_for_proto_model(&proto)
        .context("Translating proto model to model")
        .map_err(graph)?;

    let inputs = model.input_outlets().map_err(graph)?.to_vec();
    let input_names: Vec<String> = inputs
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    if input_names.len() != 1 {
        return Err(shape(format!(
            "the graph has {} inputs ({}); format 1 takes exactly one",
            input_names.len(),
            input_names.join(", ")
        )));
    }
    if input_names[0] != m.input {
        return Err(shape(format!(
            "onnx.input: the graph has no input named {:?} (its input is {:?})",
            m.input, input_names[0]
        )));
    }
    {
        let fact = model.input_fact(0).map_err(graph)?;
        let declared = format!("{fact:?}");
        if let Some(dt) = fact.datum_type.concretize() {
            if dt != f32::datum_type() {
                return Err(shape(format!(
                    "input {:?} is {dt:?} ({declared}), not float32 [1, {n}]",
                    m.input
                )));
            }
        }
        if let Some(rank) = fact.shape.rank().concretize() {
            if rank != 2 {
                return Err(shape(format!(
                    "input {:?} has rank {rank} ({declared}), not float32 [1, {n}]",
                    m.input
                )));
            }
        }
        let dim = |i: usize| {
            fact.shape
                .dim(i)
                .and_then(|d| d.concretize())
                .and_then(|d| d.to_i64().ok())
        };
        if let Some(b) = dim(0) {
            if b != 1 {
                return Err(shape(format!(
                    "input {:?} has batch {b} ({declared}); the agent runs batch 1",
                    m.input
                )));
            }
        }
        if let Some(w) = dim(1) {
            if w != n as i64 {
                return Err(shape(format!(
                    "input {:?} takes {w} features ({declared}) but the manifest names {n}",
                    m.input
                )));
            }
        }
    }
    model = model
        .with_input_fact(0, f32::fact([1, n]).into())
        .map_err(graph)?;

    let outputs = model.output_outlets().map_err(graph)?.to_vec();
    let output_names: Vec<String> = outputs
        .iter()
        .map(|o| model.outlet_label(*o).unwrap_or("?").to_string())
        .collect();
    let find = |field: &str, name: &str| -> Result<OutletId, PackageError> {
        outputs
            .iter()
            .zip(&output_names)
            .find(|(_, l)| l.as_str() == name)
            .map(|(o, _)| *o)
            .ok_or_else(|| {
                shape(format!(
                    "{field}: the graph has no output named {name:?} (its outputs: {})",
                    output_names.join(", ")
                ))
            })
    };
    let mut wanted = vec![find("onnx.score", &m.score_output)?];
    if let Some(c) = &m.contributions_output {
        wanted.push(find("onnx.contributions", c)?);
    }
    model.select_output_outlets(&wanted).map_err(graph)?;
    let typed = model.into_optimized().map_err(graph)?;

    let check = |i: usize, name: &str, ok: &[&[usize]], want: &str| {
        let fact = typed.output_fact(i).map_err(graph)?;
        let concrete = fact.shape.as_concrete();
        let fits =
            fact.datum_type == f32::datum_type() && concrete.is_some_and(|s| ok.contains(&s));
        if fits {
            Ok(())
        } else {
            Err(shape(format!(
                "output {name:?} is {fact:?}, not {want} for float32 [1, {n}] input"
            )))
        }
    };
    check(
        0,
        &m.score_output,
        &[&[1, 1], &[1]],
        "float32 [1, 1] or [1]",
    )?;
    if let Some(c) = &m.contributions_output {
        check(1, c, &[&[1, n]], &format!("float32 [1, {n}]"))?;
    }
    let plan = typed.into_runnable().map_err(graph)?;
    plan.spawn().map_err(graph)
}

impl LoadedModel {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    pub fn info(&self) -> PackageInfo {
        PackageInfo {
            name: self.manifest.name.clone(),
            version: self.manifest.version.clone(),
            sha256: self.manifest.sha256.clone(),
            features: self.names.clone(),
        }
    }

    pub fn has_contributions(&self) -> bool {
        self.manifest.contributions_output.is_some()
    }

    /// The raw score mapped on [low, high], not clamped.
    fn unit(&self, raw: f32) -> f32 {
        let (lo, hi) = (self.manifest.score_low, self.manifest.score_high);
        ((f64::from(raw) - lo) / (hi - lo)) as f32
    }

    /// Runs the graph on one vector: the raw score and, when the graph has
    /// them, the contributions.
    fn run(&mut self, x: &[f32], contrib: bool) -> Result<(f32, Option<Vec<f32>>), PackageError> {
        let n = self.names.len();
        if x.len() != n {
            return Err(PackageError::Inference(format!(
                "{} values for {n} features",
                x.len()
            )));
        }
        let err = |e: TractError| PackageError::Inference(tract_msg(&e));
        let input = Tensor::from_shape(&[1, n], x).map_err(err)?;
        let out = self.state.run(tvec![input.into_tvalue()]).map_err(err)?;
        let raw = *out[0]
            .to_plain_array_view::<f32>()
            .map_err(err)?
            .iter()
            .next()
            .ok_or_else(|| PackageError::Inference("empty score output".into()))?;
        let contributions = if contrib && out.len() > 1 {
            Some(
                out[1]
                    .to_plain_array_view::<f32>()
                    .map_err(err)?
                    .iter()
                    .copied()
                    .collect(),
            )
        } else {
            None
        };
        Ok((raw, contributions))
    }

    /// Scores one vector (the manifest's features, in order): the raw
    /// score, score01 = clamp((raw - low) / (high - low), 0, 1), and the
    /// contributions when the graph has them.
    pub fn score(&mut self, x: &[f32]) -> Result<ModelOutput, PackageError> {
        let (raw, contributions) = self.run(x, true)?;
        Ok(ModelOutput {
            score: self.unit(raw).clamp(0.0, 1.0),
            raw,
            contributions,
        })
    }

    /// Per-feature attribution by perturbation: feature i is put back to
    /// its healthy median and the drop of the (unclamped) score is its
    /// share. Positive = the feature pushed the score up.
    pub fn attribution(&mut self, x: &[f32]) -> Result<Vec<f32>, PackageError> {
        let (raw, _) = self.run(x, false)?;
        let base = self.unit(raw);
        let mut probe = std::mem::take(&mut self.probe);
        probe.clear();
        probe.extend_from_slice(x);
        let mut out = Vec::with_capacity(x.len());
        let mut result = Ok(());
        for i in 0..x.len() {
            probe[i] = self.manifest.features[i].median;
            match self.run(&probe, false) {
                Ok((r, _)) => out.push(base - self.unit(r)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            probe[i] = x[i];
        }
        self.probe = probe;
        result.map(|()| out)
    }

    /// Runs every self-test; records the largest difference and the mean
    /// inference time.
    fn selftest(&mut self, at: &str) -> Result<(), PackageError> {
        let tests = self.manifest.selftests.clone();
        let mut max_diff = 0f32;
        let mut spent = Duration::ZERO;
        for (index, t) in tests.iter().enumerate() {
            let fail = |what: String| PackageError::Selftest {
                path: at.to_string(),
                index,
                what,
            };
            let began = Instant::now();
            let (raw, contributions) = self.run(&t.input, true).map_err(|e| fail(e.to_string()))?;
            spent += began.elapsed();
            let diff = (raw - t.score).abs();
            // Written so a NaN difference fails the self-test.
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            if !(diff <= t.tolerance) {
                return Err(fail(format!(
                    "score {raw:.9} under tract, expected {:.9} (tolerance {})",
                    t.score, t.tolerance
                )));
            }
            max_diff = max_diff.max(diff);
            if let Some(expected) = &t.contributions {
                let got = contributions.unwrap_or_default();
                if got.len() != expected.len() {
                    return Err(fail(format!(
                        "{} contributions under tract, expected {}",
                        got.len(),
                        expected.len()
                    )));
                }
                for (j, (g, e)) in got.iter().zip(expected).enumerate() {
                    let d = (g - e).abs();
                    #[allow(clippy::neg_cmp_op_on_partial_ord)]
                    if !(d <= t.tolerance) {
                        return Err(fail(format!(
                            "contributions[{j}] ({}) {g:.9} under tract, expected {e:.9} (tolerance {})",
                            self.names[j], t.tolerance
                        )));
                    }
                    max_diff = max_diff.max(d);
                }
            }
        }
        self.report.selftests = tests.len();
        self.report.selftest_max_diff = max_diff;
        self.report.inference_time = spent / tests.len().max(1) as u32;
        Ok(())
    }
}

impl Scorer for LoadedModel {
    fn label(&self) -> String {
        format!("{}@{}", self.manifest.name, self.manifest.version)
    }

    fn feature_names(&self) -> &[String] {
        &self.names
    }

    fn threshold(&self) -> f32 {
        self.manifest.threshold
    }

    fn score(&mut self, x: &[f32]) -> Result<ModelOutput, String> {
        LoadedModel::score(self, x).map_err(|e| e.to_string())
    }

    fn attribution(&mut self, x: &[f32]) -> Result<Vec<f32>, String> {
        LoadedModel::attribution(self, x).map_err(|e| e.to_string())
    }

    fn normal_range(&self, i: usize) -> (f32, f32) {
        self.manifest
            .features
            .get(i)
            .map_or((f32::NAN, f32::NAN), |f| (f.low, f.high))
    }
}

#[cfg(test)]
mod tests {
    use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, ValueInfoProto};

    use super::unproduced_output;

    fn value(name: &str) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            ..Default::default()
        }
    }

    fn node(input: &str, output: &str) -> NodeProto {
        NodeProto {
            op_type: "Relu".into(),
            input: vec![input.into()],
            output: vec![output.into()],
            ..Default::default()
        }
    }

    #[test]
    fn an_output_nothing_produces_is_named() {
        let mut g = GraphProto {
            input: vec![value("input")],
            node: vec![node("input", "score")],
            output: vec![value("score")],
            ..Default::default()
        };
        assert_eq!(unproduced_output(&g), None);
        g.output.push(value("nowhere"));
        assert_eq!(unproduced_output(&g).as_deref(), Some("nowhere"));
        // A graph input may be an output too.
        g.output = vec![value("input")];
        assert_eq!(unproduced_output(&g), None);
    }

    #[test]
    fn subgraphs_are_checked_too() {
        let body = GraphProto {
            output: vec![value("from_outside")],
            ..Default::default()
        };
        let mut outer = node("input", "score");
        outer.attribute.push(AttributeProto {
            name: "then_branch".into(),
            g: Some(body),
            ..Default::default()
        });
        let g = GraphProto {
            input: vec![value("input"), value("from_outside")],
            node: vec![outer],
            output: vec![value("score")],
            ..Default::default()
        };
        assert_eq!(unproduced_output(&g).as_deref(), Some("from_outside"));
    }
}
