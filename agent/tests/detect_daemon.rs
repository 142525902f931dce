//! Detection in the running daemon: the baseline learns a target's signals,
//! a probe that starts failing opens an incident on that target naming the
//! probe's features with their normal range, and an `anomaly >= X` rule
//! acts on the score.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::Daemon;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

fn json(args: &[&str], state: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("run outpost");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

#[test]
fn failing_probe_opens_an_explained_incident_and_feeds_anomaly_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let marks = dir.path().join("marks");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let serving = Arc::new(AtomicBool::new(true));
    let accept = {
        let serving = serving.clone();
        std::thread::spawn(move || {
            while serving.load(Ordering::Relaxed) {
                let _ = listener.accept();
                std::thread::sleep(Duration::from_millis(5));
            }
            // The listener drops here: the port refuses from now on.
        })
    };
    let cfg = dir.path().join("outpost.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[agent]
node_id = "t"
state_dir = "{state}"
sample_interval_ms = 100

[features]
window = "1s"
step = "200ms"

[store]
flush_interval = "1s"

[detect]
close_after = 3

[detect.baseline]
learning_steps = 15

[[target]]
name = "svc"
kind = "host"
probe = {{ tcp = "127.0.0.1:{port}", interval_ms = 100, timeout_ms = 100 }}

[[command]]
name = "mark"
argv = ["/bin/sh", "-c", "echo acted >> {marks}"]
timeout = "5s"

[[rule]]
name = "svc-anomalous"
target = "svc"
when = "anomaly >= 0.5"
do = "exec:mark"
mode = "auto"
cooldown = "1h"
"#,
            state = state.display(),
            marks = marks.display(),
        ),
    )
    .expect("write config");

    let mut daemon = Daemon(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&cfg)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );

    // Learn the healthy probe for well past the learning period. (The
    // probe's latency wobbles on loopback, so an incident on svc may open
    // before the failure too; the one asserted on opens after it and names
    // the probe's ok signal, which was constant until then.)
    std::thread::sleep(Duration::from_secs(7));
    let status = json(&["status", "--json"], &state);
    let scores = status["live"]["anomaly"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        scores.iter().any(|s| s[0] == "svc") && scores.iter().any(|s| s[0] == "host"),
        "a score per target: {status:#}"
    );
    let failed_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    serving.store(false, Ordering::Relaxed);
    accept.join().expect("accept thread");

    let deadline = Instant::now() + Duration::from_secs(20);
    let incident = loop {
        let rows = json(&["incidents", "--json"], &state);
        let found = rows.as_array().and_then(|rows| {
            rows.iter()
                .find(|i| {
                    i["target"] == "svc"
                        && i["explanation"]["detector"] == "baseline"
                        && i["opened_ms"]
                            .as_i64()
                            .is_some_and(|t| t >= failed_at_ms - 300)
                })
                .cloned()
        });
        if let Some(i) = found {
            break i;
        }
        assert!(Instant::now() < deadline, "no incident on svc: {rows:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let top = incident["explanation"]["top"].as_array().expect("top");
    assert!(!top.is_empty() && top.len() <= 3, "{incident:#}");
    let probe_driver = top
        .iter()
        .find(|d| {
            d["feature"]
                .as_str()
                .is_some_and(|f| f.starts_with("target.svc.probe.ok."))
        })
        .unwrap_or_else(|| panic!("the probe's ok signal drove it: {incident:#}"));
    let normal = probe_driver["normal"].as_array().expect("normal range");
    let value = probe_driver["value"].as_f64().expect("value");
    assert!(
        value < normal[0].as_f64().expect("lo"),
        "its value left the learned range: {probe_driver}"
    );
    assert_eq!(incident["explanation"]["shadow"], false);

    // The rule saw the score and acted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !marks.exists() {
        assert!(Instant::now() < deadline, "the anomaly rule never acted");
        std::thread::sleep(Duration::from_millis(100));
    }
    let actions = json(&["actions", "--json"], &state);
    assert!(
        actions
            .as_array()
            .expect("rows")
            .iter()
            .any(|a| a["rule"] == "svc-anomalous" && a["decision"] == "acted"),
        "{actions:#}"
    );

    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();
}
