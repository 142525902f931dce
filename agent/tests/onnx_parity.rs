//! Parity of outpost's extra ONNX operators under tract with onnxruntime.
//!
//! Every fixture in `tests/fixtures/onnx/` (made by
//! `model-tools/scripts/make_op_fixtures.py`) is an ONNX model plus the
//! outputs onnxruntime computed for a set of input rows. Each model is loaded
//! with `tract_onnx::onnx()` plus `outpost::detect::onnx::ops::register`,
//! optimized, and run at batch 1 (one row at a time) and at batch N (every
//! row at once). Every output value must match onnxruntime's within
//! `|tract - ort| <= 1e-5 * max(1, |ort|)`: an absolute 1e-5 for values up
//! to 1 in magnitude, a relative 1e-5 above. NaN must match NaN and
//! infinities must match exactly.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tract_onnx::prelude::*;

const TOLERANCE: f64 = 1e-5;

/// Every fixture the generator writes; the test fails if one is missing.
const FIXTURES: &[&str] = &[
    "iforest",
    "standard_mlp",
    "robust_mlp",
    "pca",
    "mlp",
    "tree_sum",
    "tree_average",
    "tree_min",
    "tree_max",
    "tree_one_target",
    "label_encoder",
];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx")
}

fn framework() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    outpost::detect::onnx::ops::register(&mut onnx);
    onnx
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().expect("finite number"),
        Value::String(s) if s == "nan" => f64::NAN,
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        other => panic!("not a number: {other}"),
    }
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array().expect("a list").iter().map(number).collect()
}

struct Case {
    input: Vec<f32>,
    /// One list per model output, in the model's output order.
    outputs: Vec<Vec<f64>>,
}

struct Fixture {
    name: String,
    features: usize,
    output_names: Vec<String>,
    cases: Vec<Case>,
}

fn read_fixture(name: &str) -> Fixture {
    let path = fixture_dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let doc: Value = serde_json::from_str(&text).expect("fixture json");
    let output_names: Vec<String> = doc["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .map(|v| v.as_str().expect("output name").to_string())
        .collect();
    let cases: Vec<Case> = doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            input: numbers(&c["input"]).into_iter().map(|v| v as f32).collect(),
            outputs: output_names
                .iter()
                .map(|n| numbers(&c["outputs"][n]))
                .collect(),
        })
        .collect();
    assert!(!cases.is_empty(), "{name}: no cases");
    Fixture {
        name: name.to_string(),
        features: doc["features"].as_u64().expect("features") as usize,
        output_names,
        cases,
    }
}

/// The worst absolute difference, and whether every value is within tolerance.
fn compare(got: &[f64], want: &[f64]) -> (f64, bool) {
    assert_eq!(got.len(), want.len(), "output length");
    let mut worst = 0.0f64;
    let mut ok = true;
    for (&g, &w) in got.iter().zip(want) {
        if w.is_nan() || w.is_infinite() {
            ok &= (w.is_nan() && g.is_nan()) || g == w;
            continue;
        }
        let diff = (g - w).abs();
        if diff.is_nan() || diff > TOLERANCE * w.abs().max(1.0) {
            ok = false;
        }
        worst = worst.max(if diff.is_nan() { f64::INFINITY } else { diff });
    }
    (worst, ok)
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    let t = t.cast_to::<f64>().expect("numeric output");
    t.try_as_plain_ram()
        .expect("plain")
        .as_slice::<f64>()
        .expect("f64")
        .to_vec()
}

fn plan(fixture: &Fixture, batch: Option<usize>) -> std::sync::Arc<TypedRunnableModel> {
    let path = fixture_dir().join(format!("{}.onnx", fixture.name));
    let mut model = framework()
        .model_for_path(&path)
        .unwrap_or_else(|e| panic!("{}: load: {e:?}", fixture.name));
    if let Some(n) = batch {
        model = model
            .with_input_fact(0, f32::fact([n, fixture.features]).into())
            .expect("input fact");
    }
    model
        .into_optimized()
        .unwrap_or_else(|e| panic!("{}: optimize: {e:?}", fixture.name))
        .into_runnable()
        .unwrap_or_else(|e| panic!("{}: plan: {e:?}", fixture.name))
}

/// Runs one fixture at batch 1 and at batch N; returns the worst absolute
/// difference per output and the failures.
fn check(fixture: &Fixture) -> (Vec<f64>, Vec<String>) {
    let mut worst = vec![0.0f64; fixture.output_names.len()];
    let mut failures = vec![];

    let single = plan(fixture, Some(1));
    for (i, case) in fixture.cases.iter().enumerate() {
        let input = Tensor::from_shape(&[1, fixture.features], &case.input).expect("input");
        let outputs = single.run(tvec!(input.into())).expect("run batch 1");
        assert_eq!(
            outputs.len(),
            case.outputs.len(),
            "{}: output count",
            fixture.name
        );
        for (o, (got, want)) in outputs.iter().zip(&case.outputs).enumerate() {
            let (diff, ok) = compare(&to_f64(got), want);
            worst[o] = worst[o].max(diff);
            if !ok {
                failures.push(format!(
                    "{} case {i} output {} (batch 1): tract {:?} vs onnxruntime {:?} for input {:?}",
                    fixture.name,
                    fixture.output_names[o],
                    to_f64(got),
                    want,
                    case.input
                ));
            }
        }
    }

    let n = fixture.cases.len();
    // A concrete batch size: the daemon always runs batch 1, and tract
    // 0.23.9 leaves an input with a symbolic batch without a fact.
    let batch = plan(fixture, Some(n));
    let all: Vec<f32> = fixture.cases.iter().flat_map(|c| c.input.clone()).collect();
    let input = Tensor::from_shape(&[n, fixture.features], &all).expect("input");
    let outputs = batch.run(tvec!(input.into())).expect("run batch N");
    for (o, got) in outputs.iter().enumerate() {
        let got = to_f64(got);
        let want: Vec<f64> = fixture
            .cases
            .iter()
            .flat_map(|c| c.outputs[o].clone())
            .collect();
        let (diff, ok) = compare(&got, &want);
        worst[o] = worst[o].max(diff);
        if !ok {
            failures.push(format!(
                "{} output {} (batch {n}): tract {got:?} vs onnxruntime {want:?}",
                fixture.name, fixture.output_names[o]
            ));
        }
    }
    (worst, failures)
}

#[test]
fn every_fixture_matches_onnxruntime() {
    let mut failures = vec![];
    for name in FIXTURES {
        let fixture = read_fixture(name);
        let (worst, mut bad) = check(&fixture);
        let report: Vec<String> = fixture
            .output_names
            .iter()
            .zip(&worst)
            .map(|(n, d)| format!("{n} max abs diff {d:.3e}"))
            .collect();
        println!(
            "{name}: {} cases, {}",
            fixture.cases.len(),
            report.join(", ")
        );
        failures.append(&mut bad);
    }
    assert!(
        failures.is_empty(),
        "parity failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_fixture_folder_holds_exactly_the_known_fixtures() {
    let mut found: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("fixture dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| p.file_stem().expect("stem").to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut known: Vec<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    known.sort();
    assert_eq!(
        found, known,
        "every fixture is checked, and every checked fixture exists"
    );
    for name in FIXTURES {
        assert!(
            fixture_dir().join(format!("{name}.onnx")).is_file(),
            "{name}.onnx"
        );
    }
}

#[test]
fn without_the_extra_ops_the_exports_do_not_load() {
    // The reason outpost registers them: stock tract-onnx refuses these models.
    for (name, op) in [
        ("iforest", "TreeEnsembleRegressor"),
        ("standard_mlp", "Scaler"),
        ("label_encoder", "LabelEncoder"),
    ] {
        let path = fixture_dir().join(format!("{name}.onnx"));
        // Stock tract-onnx either refuses the file or loads the op as a
        // placeholder that can never run.
        match tract_onnx::onnx().model_for_path(&path) {
            Err(err) => assert!(format!("{err:?}").contains(op), "{name}: {err:?}"),
            Ok(model) => {
                let placeholder = format!("Unimplemented({op})");
                assert!(
                    model.nodes().iter().any(|n| n.op.name() == placeholder),
                    "{name}: stock tract-onnx loaded {op} as a real op"
                );
                model
                    .into_optimized()
                    .expect_err("stock tract-onnx should not run this model");
            }
        }
    }
}

/// Loads `name` with one attribute of its first `op` node rewritten.
fn load_with_attr(
    name: &str,
    op: &str,
    edit: impl Fn(&mut tract_onnx::pb::NodeProto),
) -> TractResult<TypedModel> {
    let onnx = framework();
    let mut proto = onnx.proto_model_for_path(fixture_dir().join(format!("{name}.onnx")))?;
    let graph = proto.graph.as_mut().expect("graph");
    let node = graph
        .node
        .iter_mut()
        .find(|n| n.op_type == op)
        .expect("op node");
    edit(node);
    onnx.model_for_proto_model(&proto)?.into_optimized()
}

fn set_string(node: &mut tract_onnx::pb::NodeProto, name: &str, value: &str) {
    let attr = node.attribute.iter_mut().find(|a| a.name == name);
    match attr {
        Some(a) => a.s = value.as_bytes().to_vec(),
        None => node.attribute.push(tract_onnx::pb::AttributeProto {
            name: name.to_string(),
            r#type: tract_onnx::pb::attribute_proto::AttributeType::String as i32,
            s: value.as_bytes().to_vec(),
            ..Default::default()
        }),
    }
}

#[test]
fn unsupported_attribute_values_are_refused_at_load() {
    let err = load_with_attr("tree_sum", "TreeEnsembleRegressor", |n| {
        set_string(n, "post_transform", "PROBIT")
    })
    .expect_err("PROBIT is refused");
    assert!(
        format!("{err:?}").contains("post_transform \"PROBIT\""),
        "{err:?}"
    );

    let err = load_with_attr("tree_sum", "TreeEnsembleRegressor", |n| {
        set_string(n, "aggregate_function", "MEDIAN")
    })
    .expect_err("an unknown aggregate is refused");
    assert!(
        format!("{err:?}").contains("aggregate_function \"MEDIAN\""),
        "{err:?}"
    );

    let err = load_with_attr("tree_sum", "TreeEnsembleRegressor", |n| {
        let modes = n
            .attribute
            .iter_mut()
            .find(|a| a.name == "nodes_modes")
            .expect("modes");
        modes.strings[0] = b"BRANCH_MAYBE".to_vec();
    })
    .expect_err("an unknown mode is refused");
    assert!(format!("{err:?}").contains("BRANCH_MAYBE"), "{err:?}");

    let err = load_with_attr("tree_sum", "TreeEnsembleRegressor", |n| {
        let ids = n
            .attribute
            .iter_mut()
            .find(|a| a.name == "target_ids")
            .expect("ids");
        ids.ints[0] = 7;
    })
    .expect_err("a target id past n_targets is refused");
    assert!(format!("{err:?}").contains("n_targets"), "{err:?}");

    // The trees read three features; a row of two is refused when the plan is built.
    let err = framework()
        .model_for_path(fixture_dir().join("tree_sum.onnx"))
        .and_then(|m| m.with_input_fact(0, f32::fact([1, 2]).into()))
        .and_then(|m| m.into_optimized())
        .expect_err("too few features");
    assert!(
        format!("{err:?}").contains("input has 2 features"),
        "{err:?}"
    );
}
