//! `outpost replay` on a NAB file and on an `outpost export` file.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

fn rows(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("read")
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn replays_a_nab_file_and_an_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A NAB-style series: flat with noise, then a spike.
    let nab = dir.path().join("nab.csv");
    let mut text = String::from("timestamp,value\n");
    for i in 0..600 {
        let v = if i == 500 {
            95.0
        } else {
            10.0 + (i % 7) as f64 * 0.3
        };
        text.push_str(&format!(
            "2014-02-14 {:02}:{:02}:00,{v}\n",
            (i / 60) % 24,
            i % 60
        ));
    }
    std::fs::write(&nab, text).expect("write");
    let out = dir.path().join("scores.csv");
    let run = Command::new(BIN)
        .args(["replay", "--input"])
        .arg(&nab)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("replay");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let lines = rows(&out);
    assert_eq!(lines[0], "timestamp,anomaly_score");
    assert_eq!(lines.len(), 601);
    let scores: Vec<f64> = lines[1..]
        .iter()
        .map(|l| {
            l.rsplit(',')
                .next()
                .expect("score")
                .parse()
                .expect("number")
        })
        .collect();
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));
    let peak = scores
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .expect("scores");
    assert!(
        (500..510).contains(&peak.0) && *peak.1 > 0.5,
        "peak {peak:?}"
    );
    assert!(
        scores[200..500].iter().all(|s| *s < 0.5),
        "false alarms on the flat part"
    );

    // An export file: ts_ms and feature columns, empty cells missing.
    let export = dir.path().join("export.csv");
    let mut text = String::from("ts_ms,a.mean_60s,b.max_60s\n");
    for i in 0..300 {
        let b = if i % 10 == 0 {
            String::new()
        } else {
            format!("{}", 1.0 + (i % 3) as f64)
        };
        text.push_str(&format!(
            "{},{},{b}\n",
            1_790_000_000_000i64 + i * 10_000,
            5.0
        ));
    }
    std::fs::write(&export, text).expect("write");
    let out2 = dir.path().join("scores2.csv");
    let run = Command::new(BIN)
        .args(["replay", "--detector", "baseline", "--input"])
        .arg(&export)
        .arg("--output")
        .arg(&out2)
        .output()
        .expect("replay");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(rows(&out2).len(), 301);
}

#[test]
fn bad_input_is_refused_with_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "timestamp,value\n2014-01-01 00:00:00,1\n2014-01-01 00:05:00,x\n",
    )
    .expect("write");
    let out = dir.path().join("out.csv");
    let run = Command::new(BIN)
        .args(["replay", "--input"])
        .arg(&bad)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("replay");
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains(":3:"));
    assert!(!out.exists(), "no output for bad input");
    let run = Command::new(BIN)
        .args(["replay", "--detector", "magic", "--input"])
        .arg(&bad)
        .arg("--output")
        .arg(&out)
        .output()
        .expect("replay");
    assert_eq!(run.status.code(), Some(2));
}
