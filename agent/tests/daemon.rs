//! The daemon as a user runs it: the real binary, real signals, a temporary
//! state directory, and the store read back afterwards.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::Daemon;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

fn outpost(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("STATE_DIRECTORY")
        .env_remove("XDG_STATE_HOME")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .output()
        .expect("run outpost")
}

fn spawn(dir: &Path, args: &[&str]) -> Daemon {
    spawn_env(dir, args, &[])
}

/// [`spawn`] with extra environment variables (set after `RUST_LOG=info`,
/// so they may override it).
fn spawn_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
    Daemon(
        Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .env_remove("STATE_DIRECTORY")
            .env_remove("XDG_STATE_HOME")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost"),
    )
}

/// Stops the daemon with SIGTERM, checks it exited cleanly and returns what
/// it wrote to stderr.
fn stop_and_read_stderr(child: &mut Daemon) -> String {
    kill(child, "TERM");
    let (status, _) = wait_exit(child, Duration::from_secs(5));
    assert!(status.success());
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    stderr
}

fn kill(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// Waits for the child to exit; returns its status and how long it took.
fn wait_exit(child: &mut Child, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status, start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("outpost did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_json(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(extra);
    let out = outpost(dir, &args);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// Polls `f` until it returns Some, or panics after `limit`.
fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn fast_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("outpost.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\nnode_id = \"test-node\"\nstate_dir = \"{}\"\nsample_interval_ms = 100\n\n\
             [features]\nwindow = \"2s\"\nstep = \"500ms\"\n\n[store]\nflush_interval = \"1s\"\n\n{extra}",
            dir.join("state").display()
        ),
    )
    .expect("write config");
    path
}

#[test]
fn zero_config_run_collects_stores_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = spawn(dir.path(), &["run"]);
    // The default state dir is ./outpost-state, and the first feature vector
    // comes after one 10 s step.
    let live = eventually(Duration::from_secs(30), "a live feature vector", || {
        let out = outpost(dir.path(), &["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["running"] == true && v["live"]["feature_vectors"].as_u64()? >= 1).then_some(v)
    });
    assert!(dir.path().join("outpost-state/outpost.db").exists());
    assert!(
        live["live"]["signals"].as_u64().expect("signals") >= 10,
        "{live}"
    );
    assert!(live["live"]["samples"].as_u64().expect("samples") >= 5);
    assert_eq!(live["live"]["pid"].as_u64(), Some(u64::from(child.id())));

    kill(&child, "TERM");
    let (status, took) = wait_exit(&mut child, Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_secs(2), "SIGTERM took {took:?}");

    // After exit the store holds what it saw: status falls back to it.
    let stored = status_json(dir.path(), &[]);
    assert_eq!(stored["running"], false);
    assert!(
        stored["store"]["feature_vectors"].as_u64().expect("count") >= 1,
        "{stored}"
    );
    assert!(stored["store"]["newest_feature_ms"].as_i64().is_some());
    let csv = dir.path().join("features.csv");
    let out = outpost(
        dir.path(),
        &[
            "export",
            "--since",
            "1h",
            "--out",
            csv.to_str().expect("utf8"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&csv).expect("csv");
    let header = text.lines().next().expect("header");
    assert!(header.starts_with("ts_ms,"), "{header}");
    assert!(header.contains("host.cpu.busy_pct.mean_60s"), "{header}");
    assert!(
        header.contains("host.mem.available_mb.last_60s"),
        "{header}"
    );
    assert!(text.lines().count() >= 2);
}

#[test]
fn status_shows_targets_and_probe_results() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A listening socket the TCP probe can reach, and one nobody serves.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let cfg = fast_config(
        dir.path(),
        &format!(
            "[[target]]\nname = \"listener\"\nkind = \"host\"\nprobe = {{ tcp = \"127.0.0.1:{port}\", interval_ms = 100, timeout_ms = 100 }}\n\n\
             [[target]]\nname = \"nobody\"\nkind = \"host\"\nprobe = {{ tcp = \"127.0.0.1:{closed}\", interval_ms = 100, timeout_ms = 100 }}\n\n\
             [[target]]\nname = \"me\"\nkind = \"process\"\nprocess = \"outpost\"\n"
        ),
    );
    let cfg_s = cfg.to_str().expect("utf8");
    let mut child = spawn(dir.path(), &["run", "--config", cfg_s]);
    let v = eventually(Duration::from_secs(15), "probe results", || {
        let out = outpost(dir.path(), &["status", "--json", "--config", cfg_s]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let targets = v["live"]["targets"].as_array()?;
        (targets.len() == 3
            && targets
                .iter()
                .all(|t| t["probe"].is_object() || t["kind"] == "process"))
        .then_some(v)
    });
    let targets = v["live"]["targets"].as_array().expect("targets");
    let by_name = |n: &str| {
        targets
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("no target {n} in {v}"))
    };
    assert_eq!(by_name("listener")["up"], true);
    assert_eq!(by_name("listener")["probe"]["ok"], true);
    assert_eq!(by_name("nobody")["up"], false);
    assert_eq!(by_name("nobody")["probe"]["ok"], false);
    assert_eq!(
        by_name("me")["up"],
        true,
        "the agent itself is a matching process"
    );

    // The readable form names every target.
    let out = outpost(dir.path(), &["status", "--config", cfg_s]);
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["listener", "nobody", "me", "test-node"] {
        assert!(text.contains(name), "{text}");
    }
    kill(&child, "TERM");
    let (status, _) = wait_exit(&mut child, Duration::from_secs(5));
    assert!(status.success());
    drop(listener);
}

#[test]
fn sighup_with_a_bad_config_keeps_the_running_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = fast_config(
        dir.path(),
        "[[target]]\nname = \"first\"\nkind = \"host\"\n",
    );
    let cfg_s = cfg.to_str().expect("utf8").to_string();
    let mut child = spawn(dir.path(), &["run", "--config", &cfg_s]);
    // --state-dir, not --config: the config file is broken half of the time.
    let state = dir.path().join("state");
    let state_s = state.to_str().expect("utf8").to_string();
    let names = |dir: &Path| -> Option<Vec<String>> {
        let out = outpost(dir, &["status", "--json", "--state-dir", &state_s]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(
            v["live"]["targets"]
                .as_array()?
                .iter()
                .filter_map(|t| t["name"].as_str().map(String::from))
                .collect(),
        )
    };
    eventually(Duration::from_secs(10), "first target", || {
        names(dir.path()).filter(|n| n == &["first"])
    });

    // A broken file: refused, the agent keeps running the old config.
    let good = std::fs::read_to_string(&cfg).expect("read");
    std::fs::write(
        &cfg,
        format!("{good}\n[[target]]\nname = \"bad\"\nkind = \"vm\"\n"),
    )
    .expect("write");
    kill(&child, "HUP");
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        child.try_wait().expect("wait").is_none(),
        "agent died on a bad reload"
    );
    assert_eq!(names(dir.path()).expect("live status"), vec!["first"]);

    // A good file: applied.
    std::fs::write(&cfg, good.replace("\"first\"", "\"second\"")).expect("write");
    kill(&child, "HUP");
    eventually(Duration::from_secs(10), "reloaded target", || {
        names(dir.path()).filter(|n| n == &["second"])
    });

    kill(&child, "INT");
    let (status, took) = wait_exit(&mut child, Duration::from_secs(5));
    assert!(status.success());
    assert!(took < Duration::from_secs(2), "SIGINT took {took:?}");
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(stderr.contains("new config refused"), "{stderr}");
    assert!(
        stderr.contains("target[1].kind"),
        "the refusal names the key: {stderr}"
    );
}

#[test]
fn check_config_exit_codes_and_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[agent]\nnode_id = \"n\"\n").expect("write");
    let out = outpost(dir.path(), &["check-config", good.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(0));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[agent]\nnode_id = \"n\"\n\n[features]\nwindow = \"soon\"\n",
    )
    .expect("write");
    let bad_s = bad.to_str().expect("utf8");
    let out = outpost(dir.path(), &["check-config", bad_s]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!(
            "{bad_s}:5:1: features.window: expected a duration"
        )),
        "{err}"
    );

    // `run` with a bad config exits 2 before touching anything.
    let state = dir.path().join("state");
    std::fs::write(
        &bad,
        format!(
            "[agent]\nstate_dir = \"{}\"\nsample_interval_ms = 1\n",
            state.display()
        ),
    )
    .expect("write");
    let out = outpost(dir.path(), &["run", "--config", bad_s]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":3:1: agent.sample_interval_ms:"));
    assert!(
        !state.exists(),
        "a refused config must not create the state dir"
    );
    assert!(!dir.path().join("outpost-state").exists());

    let out = outpost(dir.path(), &["check-config", "/nonexistent/outpost.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let out = outpost(dir.path(), &["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn shipped_example_config_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/outpost.toml");
    let out = outpost(
        Path::new("."),
        &["check-config", root.to_str().expect("utf8")],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = fast_config(dir.path(), "");
    let mut child = spawn(
        dir.path(),
        &[
            "--log-format",
            "json",
            "run",
            "--config",
            cfg.to_str().expect("utf8"),
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let stderr = stop_and_read_stderr(&mut child);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{stderr}");
    let mut messages = Vec::new();
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        messages.push(
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert!(
        messages.iter().any(|m| m == "outpost started"),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "outpost stopped"),
        "{messages:?}"
    );
}

#[test]
fn code_pages_are_released_after_start_up_and_after_store_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = fast_config(dir.path(), "");
    let mut child = spawn_env(
        dir.path(),
        &["run", "--config", cfg.to_str().expect("utf8")],
        &[
            ("RUST_LOG", "outpost=debug"),
            ("OUTPOST_PAGE_RELEASE_AFTER", "1"),
        ],
    );
    // Start-up release at 1 s, then the next periodic flush (every second
    // here) releases again.
    std::thread::sleep(Duration::from_secs(4));
    let stderr = stop_and_read_stderr(&mut child);
    let kib = |what: &str| -> u64 {
        let line = stderr
            .lines()
            .find(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no '{what}' in:\n{stderr}"));
        let v = line.split("kib=").nth(1).expect("kib field");
        v.split_whitespace()
            .next()
            .unwrap_or("")
            .parse()
            .expect("kib")
    };
    assert!(kib("start-up pages released") > 0, "{stderr}");
    assert!(kib("pages released after the store flush") > 0, "{stderr}");
    assert!(!stderr.contains("could not release"), "{stderr}");
}
