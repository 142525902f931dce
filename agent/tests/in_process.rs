//! `outpost::run` called in-process, as the daemon's tests and embedders do.

use std::time::Duration;

use outpost::config::{parse_str, Config};
use tokio_util::sync::CancellationToken;

fn config(state: &std::path::Path) -> Config {
    parse_str(
        &format!(
            "[agent]\nnode_id = \"inproc\"\nstate_dir = \"{}\"\nsample_interval_ms = 100\n\
             [features]\nwindow = \"1s\"\nstep = \"300ms\"\n[store]\nflush_interval = \"1h\"\n",
            state.display()
        ),
        "test",
    )
    .expect("valid config")
}

#[tokio::test(flavor = "current_thread")]
async fn run_stores_feature_vectors_and_flushes_at_shutdown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(outpost::run(cfg.clone(), shutdown.clone()));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("run stops within 2 s")
        .expect("join")
        .expect("run ok");

    // flush_interval is an hour: everything but the first vector reached the
    // disk only because shutdown flushed it.
    let reader = outpost::store::Reader::open(&cfg.db_path()).expect("store");
    let vectors = reader.features_since(0).expect("features");
    assert!(vectors.len() >= 5, "only {} vectors", vectors.len());
    let v = vectors.last().expect("a vector");
    let busy = v
        .get("host.cpu.busy_pct.mean_1s")
        .expect("cpu busy feature");
    assert!((0.0..=100.0).contains(&busy), "busy {busy}");
    assert!(v.get("host.mem.available_mb.last_1s").expect("mem") > 0.0);
    assert!(vectors.windows(2).all(|w| w[0].ts_ms <= w[1].ts_ms));
    let status = reader.status().expect("status");
    assert_eq!(status.node_id, "inproc");
}
