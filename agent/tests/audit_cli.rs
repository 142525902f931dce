//! `outpost actions --verify-chain` against a real store: a clean chain
//! passes; an edited or deleted row makes it exit 1 and say where.

use std::process::Command;

use outpost::store::audit::AuditEntry;
use outpost::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

fn entry(i: u64, decision: &str) -> AuditEntry {
    AuditEntry {
        ts_ms: 1_790_000_000_000 + i as i64 * 1000,
        decision_id: i,
        rule: Some("web-hung".into()),
        target: "web".into(),
        action: "restart".into(),
        decision: decision.into(),
        reason: format!("probe failed for 3 samples (#{i})"),
        detail: serde_json::json!({ "after": "active/running" }),
    }
}

fn verify(state: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(["actions", "--verify-chain", "--state-dir"])
        .arg(state)
        .output()
        .expect("run outpost");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "current_thread")]
async fn verify_chain_catches_a_tampered_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let cfg = outpost::config::parse_str(
        &format!("[agent]\nstate_dir = \"{}\"\n", state.display()),
        "test",
    )
    .expect("config");
    let store = Store::open(&cfg).expect("store");
    for (i, d) in ["suppressed", "acted", "verify_ok", "acted", "verify_failed"]
        .iter()
        .enumerate()
    {
        store.audit(entry(i as u64 + 1, d)).await.expect("audit");
    }
    store.close().await.expect("close");

    let (code, out) = verify(&state);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ok: 5 rows"), "{out}");

    // The readable listing and the JSON both show every decision.
    let out = Command::new(BIN)
        .args(["actions", "--json", "--state-dir"])
        .arg(&state)
        .output()
        .expect("run");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rows.as_array().expect("array").len(), 5);
    assert_eq!(rows[1]["decision"], "acted");

    // Someone with write access hides that the agent acted.
    let db = rusqlite::Connection::open(cfg.db_path()).expect("open db");
    db.execute("UPDATE actions SET decision = 'suggested' WHERE id = 2", [])
        .expect("tamper");
    let (code, out) = verify(&state);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("BROKEN") && out.contains("row 2"), "{out}");

    // Put it back, then delete a row instead.
    db.execute("UPDATE actions SET decision = 'acted' WHERE id = 2", [])
        .expect("restore");
    assert_eq!(verify(&state).0, Some(0));
    db.execute("DELETE FROM actions WHERE id = 4", [])
        .expect("delete");
    let (code, out) = verify(&state);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("row 4"), "{out}");
}
