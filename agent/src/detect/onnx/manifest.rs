//! `model.toml`, format 1 (model-tools/README.md, "Package format (1)"):
//! parsed with serde, then checked into a [`Manifest`] whose every field
//! is known good.

use serde::Deserialize;

use super::signals::feature_problem;

pub const FORMAT: i64 = 1;
pub const ONNX_FILE: &str = "model.onnx";
pub const MANIFEST_FILE: &str = "model.toml";
/// The kinds model-tools writes; `other` for graphs made elsewhere.
pub const KINDS: [&str; 4] = ["iforest", "autoencoder", "pca", "other"];
/// A self-test without its own tolerance gets this one.
pub const DEFAULT_TOLERANCE: f64 = 1e-4;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    format: i64,
    name: String,
    version: String,
    kind: String,
    created_ms: i64,
    #[serde(default)]
    description: Option<String>,
    onnx: RawOnnx,
    window: RawWindow,
    score: RawScore,
    #[serde(default)]
    feature: Vec<RawFeature>,
    #[serde(default)]
    selftest: Vec<RawSelftest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnnx {
    file: String,
    sha256: String,
    input: String,
    score: String,
    #[serde(default)]
    contributions: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    window_s: i64,
    step_s: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScore {
    low: f64,
    high: f64,
    threshold: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeature {
    name: String,
    median: f64,
    low: f64,
    high: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelftest {
    input: Vec<f64>,
    score: f64,
    #[serde(default)]
    contributions: Option<Vec<f64>>,
    #[serde(default)]
    tolerance: Option<f64>,
}

/// One input feature.
#[derive(Debug, Clone, PartialEq)]
pub struct Feature {
    pub name: String,
    /// Healthy median (what the attribution puts in a feature's place).
    pub median: f32,
    /// The learned normal range (1st and 99th percentiles).
    pub low: f32,
    pub high: f32,
}

/// One self-test vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Selftest {
    pub input: Vec<f32>,
    pub score: f32,
    pub contributions: Option<Vec<f32>>,
    pub tolerance: f32,
}

/// A checked manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub kind: String,
    pub created_ms: i64,
    pub description: String,
    /// Lowercase hex sha256 of model.onnx.
    pub sha256: String,
    pub input: String,
    pub score_output: String,
    pub contributions_output: Option<String>,
    pub window_s: u64,
    pub step_s: u64,
    /// Raw score mapped to 0 and to 1.
    pub score_low: f64,
    pub score_high: f64,
    /// In score01 units.
    pub threshold: f32,
    pub features: Vec<Feature>,
    pub selftests: Vec<Selftest>,
}

/// A manifest problem: the field (`feature[3].name`) and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub field: String,
    pub what: String,
    /// The feature that is not one the agent computes, for that error.
    pub unknown_feature: Option<String>,
}

fn problem(field: impl Into<String>, what: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        what: what.into(),
        unknown_feature: None,
    }
}

fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'_' || b == b'-'
        })
}

/// A finite f64 that is also finite as f32.
fn finite32(v: f64) -> bool {
    v.is_finite() && (v as f32).is_finite()
}

/// Parses and checks `model.toml`'s text.
pub fn parse(text: &str) -> Result<Manifest, Problem> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        let at = e
            .span()
            .map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}")
            })
            .unwrap_or_else(|| "toml".into());
        problem(at, msg)
    })?;
    if raw.format != FORMAT {
        return Err(problem(
            "format",
            format!("{}, only format {FORMAT} is understood", raw.format),
        ));
    }
    if !valid_name(&raw.name) {
        return Err(problem(
            "name",
            format!("{:?} is not [a-z0-9._-]{{1,64}}", raw.name),
        ));
    }
    if !(1..=64).contains(&raw.version.len()) || raw.version.chars().any(char::is_whitespace) {
        return Err(problem(
            "version",
            format!(
                "{:?} must be 1..64 characters without whitespace",
                raw.version
            ),
        ));
    }
    if !KINDS.contains(&raw.kind.as_str()) {
        return Err(problem(
            "kind",
            format!("{:?} is not one of {}", raw.kind, KINDS.join(", ")),
        ));
    }
    let o = raw.onnx;
    if o.file != ONNX_FILE {
        return Err(problem(
            "onnx.file",
            format!("{:?}: must be {ONNX_FILE:?}", o.file),
        ));
    }
    let sha = o.sha256.to_ascii_lowercase();
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(problem("onnx.sha256", "must be 64 hexadecimal digits"));
    }
    for (field, v) in [("onnx.input", &o.input), ("onnx.score", &o.score)] {
        if v.is_empty() {
            return Err(problem(field, "must name a tensor of the graph"));
        }
    }
    if o.contributions.as_deref() == Some("") {
        return Err(problem(
            "onnx.contributions",
            "must name a tensor of the graph (or be left out)",
        ));
    }
    let w = raw.window;
    if w.window_s <= 0 {
        return Err(problem("window.window_s", "must be positive"));
    }
    if w.step_s <= 0 {
        return Err(problem("window.step_s", "must be positive"));
    }
    let s = raw.score;
    if !finite32(s.low) || !finite32(s.high) {
        return Err(problem("score", "low and high must be finite"));
    }
    if s.low == s.high {
        return Err(problem(
            "score",
            format!("low == high ({}): no range to map the raw score on", s.low),
        ));
    }
    if !(s.threshold > 0.0 && s.threshold <= 1.0) {
        return Err(problem(
            "score.threshold",
            format!("{}: must be in (0, 1]", s.threshold),
        ));
    }
    if raw.feature.is_empty() {
        return Err(problem("feature", "at least one [[feature]] is needed"));
    }
    let window_s = w.window_s as u64;
    let mut features = Vec::with_capacity(raw.feature.len());
    for (i, f) in raw.feature.iter().enumerate() {
        if let Some(why) = feature_problem(&f.name, window_s) {
            return Err(Problem {
                field: format!("feature[{i}].name"),
                what: format!("{:?} is not a feature the agent computes: {why}", f.name),
                unknown_feature: Some(f.name.clone()),
            });
        }
        if features.iter().any(|g: &Feature| g.name == f.name) {
            return Err(problem(
                format!("feature[{i}].name"),
                format!("{:?} appears twice", f.name),
            ));
        }
        if !finite32(f.median) || !finite32(f.low) || !finite32(f.high) {
            return Err(problem(
                format!("feature[{i}]"),
                "median, low and high must be finite",
            ));
        }
        if f.low > f.high {
            return Err(problem(
                format!("feature[{i}]"),
                format!("low {} is above high {}", f.low, f.high),
            ));
        }
        features.push(Feature {
            name: f.name.clone(),
            median: f.median as f32,
            low: f.low as f32,
            high: f.high as f32,
        });
    }
    let n = features.len();
    if raw.selftest.is_empty() {
        return Err(problem("selftest", "at least one [[selftest]] is needed"));
    }
    let mut selftests = Vec::with_capacity(raw.selftest.len());
    for (i, t) in raw.selftest.into_iter().enumerate() {
        let at = |k: &str| format!("selftest[{i}].{k}");
        if t.input.len() != n {
            return Err(problem(
                at("input"),
                format!("{} values, the model has {n} features", t.input.len()),
            ));
        }
        if !t.input.iter().all(|v| finite32(*v)) {
            return Err(problem(at("input"), "values must be finite"));
        }
        if !finite32(t.score) {
            return Err(problem(at("score"), "must be finite"));
        }
        let tolerance = t.tolerance.unwrap_or(DEFAULT_TOLERANCE);
        if !(tolerance.is_finite() && tolerance >= 0.0) {
            return Err(problem(at("tolerance"), "must be a finite number >= 0"));
        }
        let contributions = match (&o.contributions, t.contributions) {
            (Some(_), Some(c)) => {
                if c.len() != n {
                    return Err(problem(
                        at("contributions"),
                        format!("{} values, the model has {n} features", c.len()),
                    ));
                }
                if !c.iter().all(|v| finite32(*v)) {
                    return Err(problem(at("contributions"), "values must be finite"));
                }
                Some(c.iter().map(|v| *v as f32).collect())
            }
            (Some(_), None) => {
                return Err(problem(
                    at("contributions"),
                    "missing: the manifest names a contributions output",
                ))
            }
            (None, Some(_)) => {
                return Err(problem(
                    at("contributions"),
                    "set but the manifest names no contributions output",
                ))
            }
            (None, None) => None,
        };
        selftests.push(Selftest {
            input: t.input.iter().map(|v| *v as f32).collect(),
            score: t.score as f32,
            contributions,
            tolerance: tolerance as f32,
        });
    }
    Ok(Manifest {
        name: raw.name,
        version: raw.version,
        kind: raw.kind,
        created_ms: raw.created_ms,
        description: raw.description.unwrap_or_default(),
        sha256: sha,
        input: o.input,
        score_output: o.score,
        contributions_output: o.contributions,
        window_s,
        step_s: w.step_s as u64,
        score_low: s.low,
        score_high: s.high,
        threshold: s.threshold as f32,
        features,
        selftests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
format = 1
name = "web-ae"
version = "2026.12.02-1"
kind = "autoencoder"
created_ms = 1
description = "test"

[onnx]
file = "model.onnx"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
input = "input"
score = "score"
contributions = "contributions"

[window]
window_s = 60
step_s = 10

[score]
low = 0.1
high = 2.0
threshold = 0.5

[[feature]]
name = "host.cpu.busy_pct.mean_60s"
median = 10.0
low = 1.0
high = 20.0

[[feature]]
name = "target.web.probe.latency_ms.max_60s"
median = 10.0
low = 1.0
high = 20.0

[[selftest]]
input = [1.0, 2.0]
score = 0.5
contributions = [0.1, 0.2]
tolerance = 1e-4
"#;

    fn err(from: &str, to: &str) -> Problem {
        let text = GOOD.replace(from, to);
        assert_ne!(text, GOOD, "{from:?} not in the manifest");
        parse(&text).expect_err("must be refused")
    }

    #[test]
    fn good_manifest_parses() {
        let m = parse(GOOD).expect("good");
        assert_eq!(m.name, "web-ae");
        assert_eq!(m.features.len(), 2);
        assert_eq!(m.features[1].name, "target.web.probe.latency_ms.max_60s");
        assert_eq!(m.contributions_output.as_deref(), Some("contributions"));
        assert_eq!(m.selftests[0].contributions, Some(vec![0.1, 0.2]));
        assert_eq!(m.window_s, 60);
    }

    #[test]
    fn each_broken_field_is_named() {
        let cases = [
            ("format = 1", "format = 2", "format"),
            ("name = \"web-ae\"", "name = \"Web AE\"", "name"),
            ("kind = \"autoencoder\"", "kind = \"svm\"", "kind"),
            ("file = \"model.onnx\"", "file = \"../x.onnx\"", "onnx.file"),
            ("sha256 = \"0000", "sha256 = \"zz00", "onnx.sha256"),
            ("window_s = 60", "window_s = 0", "window.window_s"),
            ("high = 2.0", "high = 0.1", "score"),
            ("threshold = 0.5", "threshold = 1.5", "score.threshold"),
            (
                "name = \"host.cpu.busy_pct.mean_60s\"",
                "name = \"host.cpu.busy_pct.mean_5s\"",
                "feature[0].name",
            ),
            (
                "name = \"target.web.probe.latency_ms.max_60s\"",
                "name = \"host.cpu.busy_pct.mean_60s\"",
                "feature[1].name",
            ),
            ("input = [1.0, 2.0]", "input = [1.0]", "selftest[0].input"),
            (
                "contributions = [0.1, 0.2]\n",
                "\n",
                "selftest[0].contributions",
            ),
        ];
        for (from, to, field) in cases {
            let p = err(from, to);
            assert_eq!(p.field, field, "{from:?} -> {to:?}: {p:?}");
        }
    }

    #[test]
    fn unknown_feature_is_reported_as_such() {
        let p = err("host.cpu.busy_pct.mean_60s", "host.not_a_signal.mean_60s");
        assert_eq!(
            p.unknown_feature.as_deref(),
            Some("host.not_a_signal.mean_60s")
        );
        assert!(p.what.contains("not a feature the agent computes"), "{p:?}");
    }

    #[test]
    fn unknown_keys_and_bad_toml_name_a_line() {
        let p = err(
            "kind = \"autoencoder\"",
            "kind = \"autoencoder\"\nextra = 1",
        );
        assert!(p.field.starts_with("line "), "{p:?}");
        assert!(p.what.contains("extra"), "{p:?}");
        let p = parse("format = ").expect_err("bad toml");
        assert_eq!(p.field, "line 1");
    }
}
