//! Faults in the local SQLite store, each against the real `outpost` binary
//! with an `[mqtt]` uplink to a real mosquitto (tests/src/mosquitto.rs):
//!
//! 1. Disk full: the state directory is a small tmpfs that a filler file
//!    fills while the agent runs. The agent keeps sampling, deciding and
//!    answering its control socket; it deletes stored features, never audit
//!    rows or events; it says so once in its log and in `outpost status
//!    --json`; and when the filler goes, it goes back to normal and reports
//!    a `store.recovered` event.
//! 2. A corrupt store at start (garbage, a broken header, a truncated file):
//!    the file is kept aside as `outpost.db.corrupt-<ms>`, a fresh store is
//!    started, the agent runs on, and `store.recovered` reaches the broker
//!    with a seq above every seq the old store used.
//! 3. Power loss: 100 `kill -9` at random points while the agent writes
//!    features, audit rows and outbox messages as fast as its config lets
//!    it. Afterwards the store is intact, the audit chain verifies, and
//!    every message the outbox ever committed reaches the broker: no gap in
//!    seq from 1 to the last one handed out.
//!
//! Audit rows come from a `suggest` rule on a TCP probe whose port a
//! [`Flapper`] opens and closes: one failing episode, one audit row and one
//! `action.*` event.

// Test helpers fail loudly.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use outpost_tests::agent::{
    actions, check_config, now_ms, schema, status, verify_chain, wait_until, Agent, Flapper,
    LogFormat, ProbedNode,
};
use outpost_tests::fleet::{check_seqs, event_audit_ids, events_of, kept_subscriber, Gaps};
use outpost_tests::mosquitto::{validate, Broker, Mode, Msg};
use serde_json::Value;

/// Deadlines for conditions that normally hold within seconds.
const WAIT: Duration = Duration::from_secs(60);
/// How often those conditions are polled.
const POLL: Duration = Duration::from_millis(200);

// ---- the agent -----------------------------------------------------------

/// How fast the agent samples and writes.
struct Pace {
    sample_ms: u64,
    window: &'static str,
    step: &'static str,
    flush: &'static str,
}

/// A config for `node` with its state in `state`, a target `web` probed
/// on `port` with a `suggest` rule on its failures, and `broker` as uplink.
fn write_config(
    dir: &Path,
    node: &str,
    state: &Path,
    broker: &Broker,
    port: u16,
    pace: &Pace,
) -> PathBuf {
    let sections = format!(
        "[store]\nflush_interval = \"{}\"\n\n[features]\nwindow = \"{}\"\nstep = \"{}\"\n\n",
        pace.flush, pace.window, pace.step
    );
    let uplink = format!(
        "{}reconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n",
        broker.mqtt_toml()
    );
    let config = ProbedNode {
        node,
        state,
        sample_ms: pace.sample_ms,
        sections: &sections,
        port,
        uplink: &uplink,
    }
    .write(dir);
    check_config(&config);
    config
}

/// The live sample count, when the agent answers its control socket.
fn live_samples(config: &Path) -> Option<u64> {
    let s = status(config);
    (s["running"] == true).then(|| s["live"]["samples"].as_u64().unwrap())
}

/// The audit rows' ids (`outpost actions --json`).
fn audit_ids(config: &Path) -> Vec<u64> {
    actions(config, 1_000_000)
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect()
}

/// Read-only SQL on the store (the agent may be running: WAL readers do
/// not block it).
fn query<T>(db: &Path, sql: &str, f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>) -> T {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row(sql, [], f).unwrap()
}

/// Feature vectors stored with a timestamp before `ms`, and in all.
fn vectors_before(db: &Path, ms: i64) -> (i64, i64) {
    query(
        db,
        &format!(
            "SELECT coalesce(sum(CASE WHEN ts_first_ms < {ms} THEN n ELSE 0 END), 0),
                    coalesce(sum(n), 0) FROM features"
        ),
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

// ---- messages ------------------------------------------------------------

fn recovered_events(msgs: &[Msg], cause: &str) -> Vec<Value> {
    events_of(msgs)
        .into_iter()
        .filter(|v| v["body"]["event"] == "store.recovered" && v["body"]["cause"] == cause)
        .collect()
}

/// The distinct seqs among `msgs` (no checks: for polling).
fn seqs_of(msgs: &[Msg]) -> BTreeSet<u64> {
    msgs.iter()
        .filter_map(|m| m.json().ok())
        .filter_map(|v| v["seq"].as_u64())
        .collect()
}

// ---- 1. disk full ------------------------------------------------------

/// A tmpfs mounted for the test, unmounted on drop (panics included).
struct Tmpfs {
    at: PathBuf,
}

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount tmpfs (the tests run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            at: at.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.at).status();
        }
    }
}

/// Writes `path` until the file system is full (the first ENOSPC: a short
/// write fills the last page). Returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 256 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filler: {e}"),
        }
    }
    written
}

#[test]
fn a_full_disk_sheds_features_keeps_audit_rows_and_events_and_recovers() {
    const NODE: &str = "disk-full-1";
    let broker = Broker::start(Mode::Plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tmpfs = Tmpfs::mount(&state, "16m");
    let db = state.join("outpost.db");
    let flapper = Flapper::start(Duration::from_millis(500));
    let pace = Pace {
        sample_ms: 100,
        window: "2s",
        step: "500ms",
        flush: "1s",
    };
    let config = write_config(dir.path(), NODE, &state, &broker, flapper.port, &pace);
    let sub = kept_subscriber(&broker, NODE, "faults");
    let mut agent = Agent::start(&config, LogFormat::Text);
    let log = |a: &Agent| format!("agent log:\n{}", a.log());

    // A store with features and audit rows in it, and its reserve.
    wait_until(
        "10 stored feature vectors and 2 audit rows",
        WAIT,
        POLL,
        || log(&agent),
        || {
            if !db.exists() {
                return None;
            }
            let (_, vectors) = vectors_before(&db, i64::MAX);
            (vectors >= 10 && audit_ids(&config).len() >= 2).then_some(())
        },
    );
    assert!(
        state.join("outpost.db.reserve").is_file(),
        "no disk reserve beside the store"
    );

    // Fill the disk.
    let filled_ms = now_ms();
    let (kept_before, _) = vectors_before(&db, filled_ms);
    let filler = state.join("filler");
    let bytes = fill(&filler);
    eprintln!("disk full: {bytes} filler bytes, {kept_before} vectors stored before");
    let audit_at_fill = audit_ids(&config);

    // Reported in the store's status...
    let since = wait_until(
        "status --json shows the full disk",
        WAIT,
        POLL,
        || log(&agent),
        || status(&config)["store"]["disk_full_since_ms"].as_i64(),
    );
    assert!(
        since >= filled_ms - 1000,
        "full since {since}, filled at {filled_ms}"
    );

    // ...while it keeps sampling, deciding and answering: audit rows keep
    // coming, each with its event; the live sample count grows.
    let samples = wait_until(
        "a live status",
        WAIT,
        POLL,
        || log(&agent),
        || live_samples(&config),
    );
    let during = wait_until(
        "6 audit rows written on the full disk",
        WAIT,
        POLL,
        || log(&agent),
        || {
            let ids = audit_ids(&config);
            (ids.len() >= audit_at_fill.len() + 6).then_some(ids)
        },
    );
    wait_until(
        "the live sample count to grow on the full disk",
        WAIT,
        POLL,
        || log(&agent),
        || live_samples(&config).filter(|s| *s > samples),
    );
    assert!(
        agent.alive(),
        "the agent stopped on a full disk\n{}",
        log(&agent)
    );
    assert!(
        std::fs::metadata(&filler).is_ok(),
        "the filler is still there"
    );
    // Features were shed; no audit row was: the chain is whole and holds
    // every row from before the disk filled.
    let (kept_now, _) = vectors_before(&db, filled_ms);
    assert!(
        kept_now < kept_before,
        "no stored feature was deleted on the full disk ({kept_now} of {kept_before} left)"
    );
    verify_chain(&config);
    assert!(
        audit_at_fill.iter().all(|id| during.contains(id)),
        "an audit row went missing: {audit_at_fill:?} then {during:?}"
    );
    let msgs = sub
        .wait_for(
            |m| {
                let got = event_audit_ids(m);
                during.iter().all(|id| got.contains(id))
            },
            WAIT,
        )
        .unwrap_or_else(|e| {
            panic!(
                "events of audit rows {during:?} missing: {e}\n{}",
                log(&agent)
            )
        });
    assert!(recovered_events(&msgs, "disk_full").is_empty());

    // Space comes back: the agent notices, says so once upstream, and
    // stores features again.
    std::fs::remove_file(&filler).unwrap();
    wait_until(
        "status --json to clear the full disk",
        WAIT,
        POLL,
        || log(&agent),
        || {
            status(&config)["store"]["disk_full_since_ms"]
                .is_null()
                .then_some(())
        },
    );
    let msgs = sub
        .wait_for(|m| !recovered_events(m, "disk_full").is_empty(), WAIT)
        .unwrap_or_else(|e| panic!("no store.recovered event: {e}\n{}", log(&agent)));
    let ev = &recovered_events(&msgs, "disk_full")[0];
    validate(schema("event"), ev).unwrap();
    assert_eq!(ev["body"]["since_ms"].as_i64(), Some(since), "{ev}");
    assert!(ev["body"]["shed_vectors"].as_u64().unwrap() > 0, "{ev}");
    let (_, at_recovery) = vectors_before(&db, i64::MAX);
    wait_until(
        "10 more stored feature vectors after the disk emptied",
        WAIT,
        POLL,
        || log(&agent),
        || {
            let (_, n) = vectors_before(&db, i64::MAX);
            (n >= at_recovery + 10).then_some(())
        },
    );
    assert!(
        state.join("outpost.db.reserve").is_file(),
        "the reserve was not recreated"
    );

    let text = agent.log();
    let full_lines = text.matches("disk full: deleting the oldest").count();
    assert_eq!(full_lines, 1, "the full disk is logged once:\n{text}");
    assert!(text.contains("disk has room again"), "{text}");
    for failed in [
        "cannot write the audit trail",
        "cannot record incident",
        "cannot persist guard state",
        "cannot enqueue",
    ] {
        assert!(
            !text.contains(failed),
            "a write was lost ({failed}):\n{text}"
        );
    }
    let seqs = check_seqs(&sub.messages(), NODE, Gaps::Allowed);
    assert!(!seqs.is_empty());
    let exit = agent.terminate();
    assert!(exit.success(), "outpost exited with {exit}\n{text}");
    verify_chain(&config);
    drop(flapper);
    drop(tmpfs);
}

// ---- 2. a corrupt store at start ----------------------------------------

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Random bytes over the whole file.
    Garbage,
    /// The 16-byte magic at the start of the header.
    Header,
    /// The second half cut off.
    Truncated,
}

fn damage(db: &Path, how: Damage) -> Vec<u8> {
    let mut bytes = std::fs::read(db).unwrap();
    match how {
        Damage::Garbage => {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for b in bytes.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        Damage::Header => {
            for b in &mut bytes[..16] {
                *b ^= 0x5a;
            }
        }
        Damage::Truncated => bytes.truncate(bytes.len() / 2),
    }
    std::fs::write(db, &bytes).unwrap();
    bytes
}

fn corrupt_store_at_start(broker: &Broker, how: Damage) {
    let node = format!("corrupt-{how:?}").to_lowercase();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let db = state.join("outpost.db");
    let flapper = Flapper::start(Duration::from_millis(500));
    let pace = Pace {
        sample_ms: 100,
        window: "2s",
        step: "500ms",
        flush: "1s",
    };
    let config = write_config(dir.path(), &node, &state, broker, flapper.port, &pace);
    let sub = kept_subscriber(broker, &node, "faults");

    // A first run that leaves a store with messages in the node's seq space.
    let mut agent = Agent::start(&config, LogFormat::Text);
    sub.wait_for(|m| event_audit_ids(m).len() >= 2, WAIT)
        .unwrap_or_else(|e| panic!("{how:?}: {e}\nagent log:\n{}", agent.log()));
    let exit = agent.terminate();
    assert!(exit.success(), "{how:?}: first run exited with {exit}");
    let old_max = *check_seqs(&sub.messages(), &node, Gaps::Allowed)
        .last()
        .unwrap();
    let before = std::fs::read(&db).unwrap();
    assert!(
        before.len() > 4096,
        "{how:?}: a store of {} bytes",
        before.len()
    );
    let damaged = damage(&db, how);

    // Second run on the damaged file.
    let started_ms = now_ms();
    let mut agent = Agent::start(&config, LogFormat::Text);
    let msgs = sub
        .wait_for(|m| !recovered_events(m, "corrupt").is_empty(), WAIT)
        .unwrap_or_else(|e| {
            panic!(
                "{how:?}: no store.recovered event: {e}\nagent log:\n{}",
                agent.log()
            )
        });
    let ev = recovered_events(&msgs, "corrupt").remove(0);
    validate(schema("event"), &ev).unwrap_or_else(|e| panic!("{how:?}: {e}"));
    assert!(
        ev["seq"].as_u64().unwrap() > old_max,
        "{how:?}: the fresh store's seq {} is not above the old store's {old_max}",
        ev["seq"]
    );
    assert!(
        ev["body"]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{ev}"
    );
    // The damaged file is kept, byte for byte, under its new name.
    let moved = PathBuf::from(ev["body"]["moved_to"].as_str().unwrap());
    assert_eq!(moved.parent(), Some(state.as_path()), "{ev}");
    let name = moved.file_name().unwrap().to_str().unwrap().to_string();
    let ms: i64 = name
        .strip_prefix("outpost.db.corrupt-")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{how:?}: moved to {name}"));
    assert!(ms >= started_ms - 1000, "{name}");
    assert!(
        std::fs::read(&moved).unwrap() == damaged,
        "{how:?}: {} is not the damaged file",
        moved.display()
    );

    // The agent runs on a fresh store: it answers, keeps deciding (new
    // events after the recovery), and its new audit chain verifies.
    wait_until(
        "live status on the fresh store",
        WAIT,
        POLL,
        || agent.log(),
        || live_samples(&config),
    );
    sub.wait_for(
        |m| {
            events_of(m).iter().any(|v| {
                v["seq"].as_u64().unwrap_or(0) > ev["seq"].as_u64().unwrap()
                    && v["body"]["event"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("action.")
            })
        },
        WAIT,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{how:?}: no action after the recovery: {e}\n{}",
            agent.log()
        )
    });
    let fresh = status(&config);
    assert_eq!(fresh["store"]["node_id"], node.as_str(), "{fresh}");
    verify_chain(&config);
    let text = agent.log();
    assert!(
        text.contains("the store is corrupt"),
        "{how:?}: not in the log:\n{text}"
    );
    assert!(agent.alive(), "{how:?}: the agent stopped\n{text}");
    let exit = agent.terminate();
    assert!(exit.success(), "{how:?}: exited with {exit}\n{text}");
    // The old store's messages and the new ones share one seq space.
    check_seqs(&sub.messages(), &node, Gaps::Allowed);
    drop(flapper);
}

#[test]
fn a_corrupt_store_is_kept_aside_replaced_and_reported() {
    let broker = Broker::start(Mode::Plain).unwrap();
    for how in [Damage::Garbage, Damage::Header, Damage::Truncated] {
        corrupt_store_at_start(&broker, how);
    }
}

// ---- 3. power loss -------------------------------------------------------

/// splitmix64: the kill points, reproducible from the run number.
fn splitmix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn a_hundred_kill_9s_lose_no_committed_message_and_break_no_chain() {
    const NODE: &str = "power-loss-1";
    const RUNS: u64 = 100;
    let broker = Broker::start(Mode::Plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let db = state.join("outpost.db");
    let flapper = Flapper::start(Duration::from_millis(120));
    // As fast as the config allows: a sample every 50 ms, a feature vector
    // every 100 ms, a commit every 200 ms; an audit row and its event on
    // every failing episode of the probe.
    let pace = Pace {
        sample_ms: 50,
        window: "1s",
        step: "100ms",
        flush: "200ms",
    };
    let config = write_config(dir.path(), NODE, &state, &broker, flapper.port, &pace);
    let sub = kept_subscriber(&broker, NODE, "faults");

    let mut kills = Vec::new();
    for i in 0..RUNS {
        let mut agent = Agent::start(&config, LogFormat::Text);
        let after = Duration::from_millis(50 + splitmix(i) % 401);
        thread::sleep(after);
        assert!(
            agent.alive(),
            "run {i}: the agent exited before its kill\n{}",
            agent.log()
        );
        agent.kill9();
        kills.push(after.as_millis() as u64);
    }
    let audit = audit_ids(&config);
    let (_, vectors) = vectors_before(&db, i64::MAX);
    eprintln!(
        "{RUNS} kills after {}..={} ms: {} audit rows, {vectors} stored vectors",
        kills.iter().min().unwrap(),
        kills.iter().max().unwrap(),
        audit.len()
    );
    // The loop did write (else it proves nothing): most runs live ~100 ms
    // past their start-up.
    assert!(audit.len() >= 10, "only {} audit rows", audit.len());
    assert!(vectors >= 50, "only {vectors} stored vectors");
    let integrity: String = query(&db, "PRAGMA integrity_check", |r| r.get(0));
    assert_eq!(integrity, "ok");
    verify_chain(&config);

    // One last run to completion: no new events once the flapper stops
    // (the probe stays down, one episode), so the outbox drains.
    drop(flapper);
    let mut agent = Agent::start(&config, LogFormat::Text);
    let last_seq = wait_until(
        "the outbox to drain and every seq to arrive",
        Duration::from_secs(90),
        POLL,
        || {
            let got = seqs_of(&sub.messages());
            let last: i64 = query(
                &db,
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'outbox_seq'",
                |r| r.get(0),
            );
            let missing: Vec<u64> = (1..=last as u64).filter(|s| !got.contains(s)).collect();
            format!(
                "last seq {last}, {} missing: {:?}\nagent log:\n{}",
                missing.len(),
                &missing[..missing.len().min(50)],
                agent.log()
            )
        },
        || {
            let (rows, last): (i64, i64) = query(
                &db,
                "SELECT (SELECT count(*) FROM outbox),
                        (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'outbox_seq')",
                |r| Ok((r.get(0)?, r.get(1)?)),
            );
            let got = seqs_of(&sub.messages());
            (rows == 0 && (1..=last as u64).all(|s| got.contains(&s))).then_some(last as u64)
        },
    );
    agent.kill9();
    // Every audit row's event arrived, and nothing arrived that the store
    // did not hand out.
    let audit = audit_ids(&config);
    let msgs = sub.messages();
    let got = event_audit_ids(&msgs);
    let missing: Vec<u64> = audit
        .iter()
        .copied()
        .filter(|id| !got.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "events of audit rows {missing:?} never arrived"
    );
    let seqs = check_seqs(&msgs, NODE, Gaps::Allowed);
    assert_eq!(seqs.first(), Some(&1));
    eprintln!(
        "delivered seqs 1..={last_seq} without a gap ({} messages with duplicates and wills)",
        msgs.len()
    );
    let integrity: String = query(&db, "PRAGMA integrity_check", |r| r.get(0));
    assert_eq!(integrity, "ok");
    verify_chain(&config);
}
