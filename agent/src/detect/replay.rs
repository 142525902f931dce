//! Offline replay: runs a detector over a recorded CSV as fast as it can and
//! writes one score per input row, for benchmarks (NAB) and for checking a
//! detector against what a host recorded (`outpost export`).
//!
//! Two input formats, told apart by the header:
//! - NAB style, `timestamp,value` (`2014-02-14 14:30:00,0.132`): one raw
//!   value stream. Each row is one step: the value goes through the
//!   daemon's own [`FeatureWindows`] (a window of [`NAB_WINDOW_ROWS`] rows,
//!   the row number standing in for the clock) and the resulting feature
//!   vector through the detector, exactly as the daemon feeds it.
//! - `outpost export`, `ts_ms,<feature names…>`: each row already is a
//!   feature vector; an empty cell is a missing value.
//!
//! The output is the input's first column (header kept) and
//! `anomaly_score`, in [0, 1]. It is written to a temporary file beside the
//! output and renamed into place at the end, so a malformed input leaves no
//! partial output behind.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::baseline::{Baseline, BaselineConfig, Score};
use super::engine::Scorer;
use super::features::FeatureWindows;
use crate::collect::{Sample, SignalName};

/// Rows in the feature window of a NAB-style value stream (an hour of
/// NAB's 5-minute data).
pub const NAB_WINDOW_ROWS: u64 = 12;
/// The signal name a NAB-style value stream gets; its features are named
/// `value.mean_12s` and so on (one row stands for one second).
pub const VALUE_SIGNAL: &str = "value";

/// The detector to replay.
#[non_exhaustive]
pub enum ReplayDetector {
    /// The built-in baseline detector.
    Baseline(BaselineConfig),
    /// A loaded model (an ONNX package), through the same [`Scorer`] calls
    /// the daemon makes. Each row's features are looked up by name; a row
    /// missing one of them scores 0 (the daemon does not score it either).
    Model(Box<dyn Scorer>),
}

impl std::fmt::Debug for ReplayDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayDetector::Baseline(c) => f.debug_tuple("Baseline").field(c).finish(),
            ReplayDetector::Model(m) => f.debug_tuple("Model").field(&m.label()).finish(),
        }
    }
}

/// The input format, as recognised from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// `timestamp,value`.
    Nab,
    /// `ts_ms,<feature names…>`.
    Export,
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayStats {
    pub format: InputFormat,
    /// Data rows read (and score rows written).
    pub rows: u64,
    /// Rows whose score reached the detector's alert level.
    pub alerts: u64,
    /// Wall time of the whole replay, reading and writing included.
    pub elapsed: Duration,
}

impl ReplayStats {
    pub fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Malformed input; `line` counts from 1, the header included.
    #[error("{}:{line}: {what}", path.display())]
    Parse {
        path: PathBuf,
        line: u64,
        what: String,
    },
    /// The model failed to score a row.
    #[error("{}:{line}: {what}", path.display())]
    Model {
        path: PathBuf,
        line: u64,
        what: String,
    },
}

/// Runs `detector` over `input` and writes `output` (its parent directory
/// is created when missing).
pub fn replay(
    input: &Path,
    output: &Path,
    detector: ReplayDetector,
) -> Result<ReplayStats, ReplayError> {
    let start = Instant::now();
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ReplayError::Io { path, source }
    };
    let reader = BufReader::with_capacity(1 << 16, File::open(input).map_err(io_err(input))?);
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let tmp = temp_path(output);
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let result = run(reader, BufWriter::with_capacity(1 << 16, file), detector)
        .map_err(|e| match e {
            Fail::Read(source) => ReplayError::Io {
                path: input.to_path_buf(),
                source,
            },
            Fail::Write(source) => ReplayError::Io {
                path: tmp.clone(),
                source,
            },
            Fail::Parse { line, what } => ReplayError::Parse {
                path: input.to_path_buf(),
                line,
                what,
            },
            Fail::Model { line, what } => ReplayError::Model {
                path: input.to_path_buf(),
                line,
                what,
            },
        })
        .and_then(|r| {
            fs::rename(&tmp, output).map_err(io_err(output))?;
            Ok(r)
        });
    match result {
        Ok((format, rows, alerts)) => Ok(ReplayStats {
            format,
            rows,
            alerts,
            elapsed: start.elapsed(),
        }),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn temp_path(output: &Path) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    output.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

enum Fail {
    Read(io::Error),
    Write(io::Error),
    Parse { line: u64, what: String },
    Model { line: u64, what: String },
}

fn parse_err(line: u64, what: impl Into<String>) -> Fail {
    Fail::Parse {
        line,
        what: what.into(),
    }
}

/// Turns a row into a feature vector, per input format.
enum Rows {
    Nab {
        windows: FeatureWindows,
        sample: Sample,
        signal: SignalName,
    },
    Export {
        names: Arc<[String]>,
        values: Vec<f32>,
    },
}

enum Detector {
    Baseline(Box<Baseline>, Score),
    Model {
        scorer: Box<dyn Scorer>,
        /// The names `index` was computed for.
        names: Option<Arc<[String]>>,
        /// Per model input, its column; `None` when one is missing.
        index: Option<Vec<usize>>,
        input: Vec<f32>,
    },
}

impl Detector {
    fn new(d: ReplayDetector) -> Detector {
        match d {
            ReplayDetector::Baseline(cfg) => {
                Detector::Baseline(Box::new(Baseline::new(cfg)), Score::default())
            }
            ReplayDetector::Model(scorer) => Detector::Model {
                scorer,
                names: None,
                index: None,
                input: Vec::new(),
            },
        }
    }

    /// Scores a step; returns (score, alert).
    fn step(&mut self, names: &Arc<[String]>, values: &[f32]) -> Result<(f32, bool), String> {
        match self {
            Detector::Baseline(b, out) => {
                b.update_into(names, values, out);
                Ok((out.score, out.score >= b.alert_score()))
            }
            Detector::Model {
                scorer,
                names: seen,
                index,
                input,
            } => {
                if !seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, names)) {
                    *index = scorer
                        .feature_names()
                        .iter()
                        .map(|f| names.iter().position(|n| n == f))
                        .collect();
                    *seen = Some(names.clone());
                }
                let Some(index) = index else {
                    return Ok((0.0, false));
                };
                input.clear();
                input.extend(index.iter().map(|&i| values[i]));
                if input.iter().any(|v| !v.is_finite()) {
                    return Ok((0.0, false));
                }
                let o = scorer.score(input)?;
                if !o.score.is_finite() {
                    return Err(format!("{}: score {} is not finite", scorer.label(), o.raw));
                }
                Ok((o.score, o.score >= scorer.threshold()))
            }
        }
    }

    /// A step with no data (nothing in the feature window yet).
    fn idle(&mut self) -> (f32, bool) {
        (0.0, false)
    }
}

fn run<R: BufRead, W: Write>(
    mut input: R,
    mut out: W,
    detector: ReplayDetector,
) -> Result<(InputFormat, u64, u64), Fail> {
    let mut line = String::with_capacity(256);
    if input.read_line(&mut line).map_err(Fail::Read)? == 0 {
        return Err(parse_err(1, "empty input: expected a header line"));
    }
    let header = line.trim_end_matches(['\n', '\r']);
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let first = cols[0].trim_start_matches('\u{feff}');
    let (format, mut rows) = if first == "timestamp" && cols.len() == 2 && cols[1] == "value" {
        let window = Duration::from_secs(NAB_WINDOW_ROWS);
        (
            InputFormat::Nab,
            Rows::Nab {
                windows: FeatureWindows::new(window),
                sample: Sample::new(0),
                signal: SignalName::from(VALUE_SIGNAL),
            },
        )
    } else if first == "ts_ms" && cols.len() >= 2 {
        let names: Vec<String> = cols[1..].iter().map(|s| s.to_string()).collect();
        if let Some(i) = names.iter().position(|n| n.is_empty()) {
            return Err(parse_err(
                1,
                format!("column {}: empty feature name", i + 2),
            ));
        }
        let mut sorted: Vec<&String> = names.iter().collect();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(parse_err(1, format!("feature {:?} appears twice", w[0])));
        }
        let n = names.len();
        if let Some(f) = detector_missing(&detector, &names) {
            return Err(parse_err(
                1,
                format!("no column for feature {f:?}, which the model needs"),
            ));
        }
        (
            InputFormat::Export,
            Rows::Export {
                names: Arc::from(names),
                values: Vec::with_capacity(n),
            },
        )
    } else {
        return Err(parse_err(
            1,
            format!(
                "unrecognised header {header:?}: expected `timestamp,value` (NAB) \
                 or `ts_ms,<feature names…>` (outpost export)"
            ),
        ));
    };
    writeln!(out, "{first},anomaly_score").map_err(Fail::Write)?;

    let mut detector = Detector::new(detector);
    let (mut lineno, mut n, mut alerts) = (1u64, 0u64, 0u64);
    loop {
        line.clear();
        if input.read_line(&mut line).map_err(Fail::Read)? == 0 {
            break;
        }
        lineno += 1;
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        let (ts, rest) = text.split_once(',').unwrap_or((text, ""));
        let (score, alert) = match &mut rows {
            Rows::Nab {
                windows,
                sample,
                signal,
            } => {
                if !is_timestamp(ts) {
                    return Err(parse_err(
                        lineno,
                        format!("timestamp: expected `YYYY-MM-DD HH:MM:SS`, found {ts:?}"),
                    ));
                }
                let value = rest.trim();
                let mono_ms = n as i64 * 1000;
                sample.values.clear();
                if !value.is_empty() {
                    match value.parse::<f64>() {
                        Ok(v) if v.is_finite() => sample.push(signal, v),
                        _ => {
                            return Err(parse_err(
                                lineno,
                                format!("value: expected a number, found {value:?}"),
                            ))
                        }
                    }
                }
                windows.push(mono_ms, sample);
                match windows.compute(mono_ms, mono_ms) {
                    Some(fv) => detector.step(&fv.names, &fv.values),
                    None => Ok(detector.idle()),
                }
            }
            Rows::Export { names, values } => {
                if ts.trim().parse::<i64>().is_err() {
                    return Err(parse_err(
                        lineno,
                        format!("ts_ms: expected an integer, found {ts:?}"),
                    ));
                }
                values.clear();
                for cell in rest.split(',') {
                    let cell = cell.trim();
                    let v = if cell.is_empty() {
                        f32::NAN
                    } else {
                        match cell.parse::<f32>() {
                            Ok(v) => v,
                            Err(_) => {
                                return Err(parse_err(
                                    lineno,
                                    format!(
                                        "column {}: expected a number, found {cell:?}",
                                        values.len() + 2
                                    ),
                                ))
                            }
                        }
                    };
                    values.push(v);
                }
                if values.len() != names.len() {
                    return Err(parse_err(
                        lineno,
                        format!(
                            "{} columns, the header has {}",
                            values.len() + 1,
                            names.len() + 1
                        ),
                    ));
                }
                detector.step(names, values)
            }
        }
        .map_err(|what| Fail::Model { line: lineno, what })?;
        n += 1;
        alerts += u64::from(alert);
        writeln!(out, "{ts},{score}").map_err(Fail::Write)?;
    }
    out.flush().map_err(Fail::Write)?;
    Ok((format, n, alerts))
}

fn detector_missing(d: &ReplayDetector, names: &[String]) -> Option<String> {
    match d {
        ReplayDetector::Baseline(_) => None,
        ReplayDetector::Model(m) => m
            .feature_names()
            .iter()
            .find(|f| !names.contains(f))
            .cloned(),
    }
}

/// `YYYY-MM-DD HH:MM:SS`, optionally with `T` for the space and a
/// fraction of a second.
fn is_timestamp(s: &str) -> bool {
    let b = s.trim().as_bytes();
    if b.len() < 19 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b' ' || b[10] == b'T')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && (b.len() == 19 || (b[19] == b'.' && b.len() > 20 && digits(20..b.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline() -> ReplayDetector {
        ReplayDetector::Baseline(BaselineConfig::default())
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).expect("write input");
        p
    }

    fn read_rows(p: &Path) -> Vec<(String, f32)> {
        let text = fs::read_to_string(p).expect("read output");
        let mut lines = text.lines();
        let header = lines.next().expect("header");
        assert!(header.ends_with(",anomaly_score"), "{header}");
        lines
            .map(|l| {
                let (ts, s) = l.split_once(',').expect("two columns");
                (ts.to_string(), s.parse().expect("score"))
            })
            .collect()
    }

    fn nab_text(rows: usize, spike_at: usize) -> String {
        let mut s = String::from("timestamp,value\n");
        for i in 0..rows {
            let (d, h, m) = (1 + i / 288, (i / 12) % 24, (i % 12) * 5);
            let v = if i == spike_at {
                90.0
            } else {
                20.0 + (i * 7 % 11) as f64 * 0.3
            };
            s.push_str(&format!("2014-02-{d:02} {h:02}:{m:02}:00,{v}\n"));
        }
        s
    }

    #[test]
    fn nab_file_one_row_per_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = write(dir.path(), "in.csv", &nab_text(2000, 1500));
        let output = dir.path().join("out/sub/in.csv");
        let stats = replay(&input, &output, baseline()).expect("replay");
        assert_eq!(stats.format, InputFormat::Nab);
        assert_eq!(stats.rows, 2000);
        let rows = read_rows(&output);
        assert_eq!(rows.len(), 2000);
        assert_eq!(rows[0].0, "2014-02-01 00:00:00");
        assert!(fs::read_to_string(&output)
            .expect("read")
            .starts_with("timestamp,anomaly_score\n"));
        assert!(rows.iter().all(|(_, s)| (0.0..=1.0).contains(s)));
        // Quiet while learning, an alert at the spike, and it is the only one.
        assert!(rows[..150].iter().all(|(_, s)| *s == 0.0));
        assert!(rows[1500].1 >= 0.5, "{:?}", &rows[1495..1505]);
        assert_eq!(stats.alerts, 1);
        // No temporary file left behind.
        let left: Vec<_> = fs::read_dir(dir.path().join("out/sub"))
            .expect("dir")
            .collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn export_file_with_missing_cells() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = String::from("ts_ms,a.mean_60s,b.max_60s\n");
        for i in 0..600i64 {
            let a = 1.0 + (i % 5) as f32 * 0.1;
            let b = if i == 500 {
                40.0
            } else {
                10.0 + (i % 3) as f32
            };
            if i % 50 == 7 {
                text.push_str(&format!("{},,{b}\n", 1_700_000_000_000 + i * 1000));
            } else {
                text.push_str(&format!("{},{a},{b}\r\n", 1_700_000_000_000 + i * 1000));
            }
        }
        text.push('\n');
        let input = write(dir.path(), "export.csv", &text);
        let output = dir.path().join("scores.csv");
        let stats = replay(&input, &output, baseline()).expect("replay");
        assert_eq!(stats.format, InputFormat::Export);
        assert_eq!(stats.rows, 600);
        let rows = read_rows(&output);
        assert_eq!(rows.len(), 600);
        assert_eq!(rows[0].0, "1700000000000");
        assert!(fs::read_to_string(&output)
            .expect("read")
            .starts_with("ts_ms,anomaly_score\n"));
        assert!(rows[500].1 > 0.9, "{:?}", rows[500]);
        assert_eq!(stats.alerts, 1);
    }

    fn replay_err(text: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = write(dir.path(), "bad.csv", text);
        let output = dir.path().join("out.csv");
        let e = replay(&input, &output, baseline()).expect_err("must fail");
        assert!(!output.exists(), "no output for bad input");
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 1);
        let msg = e.to_string();
        let prefix = format!("{}:", input.display());
        assert!(msg.starts_with(&prefix), "{msg}");
        msg[prefix.len()..].to_string()
    }

    #[test]
    fn malformed_input_names_the_line() {
        assert_eq!(replay_err(""), "1: empty input: expected a header line");
        assert!(replay_err("time,x,y\n1,2,3\n").starts_with("1: unrecognised header"));
        assert_eq!(
            replay_err("timestamp,value\n2014-02-14 14:30:00,1\n2014-02-14 14:35:00,abc\n"),
            "3: value: expected a number, found \"abc\""
        );
        assert_eq!(
            replay_err("timestamp,value\n2014-02-14 14:30:00,1\nyesterday,2\n"),
            "3: timestamp: expected `YYYY-MM-DD HH:MM:SS`, found \"yesterday\""
        );
        assert_eq!(
            replay_err("ts_ms,a,b\n1000,1,2\n2000,1\n"),
            "3: 2 columns, the header has 3"
        );
        assert_eq!(
            replay_err("ts_ms,a,b\n1000,1,2\n2000,1,x\n"),
            "3: column 3: expected a number, found \"x\""
        );
        assert_eq!(
            replay_err("ts_ms,a,b\n1000,1,2\n20s,1,2\n"),
            "3: ts_ms: expected an integer, found \"20s\""
        );
        assert_eq!(replay_err("ts_ms,a,a\n"), "1: feature \"a\" appears twice");
    }

    #[test]
    fn missing_input_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = replay(
            &dir.path().join("nope.csv"),
            &dir.path().join("out.csv"),
            baseline(),
        )
        .expect_err("must fail");
        assert!(matches!(e, ReplayError::Io { .. }), "{e}");
        assert!(e.to_string().contains("nope.csv"));
    }

    #[test]
    fn timestamps() {
        assert!(is_timestamp("2014-02-14 14:30:00"));
        assert!(is_timestamp("2014-02-14T14:30:00.000000"));
        assert!(!is_timestamp("2014-02-14 14:30"));
        assert!(!is_timestamp("2014-02-14 14:30:00."));
        assert!(!is_timestamp("2014/02/14 14:30:00"));
    }
}
