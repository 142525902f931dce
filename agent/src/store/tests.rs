//! Store tests: real SQLite files in temporary directories, through the real
//! writer thread.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::*;
use crate::collect::ProbeStatus;

/// xorshift64*: a small deterministic generator for randomized tests.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in [0, 1).
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Roughly normal (Irwin–Hall of 4), mean 0, sd 1.
    pub(crate) fn normal(&mut self) -> f64 {
        let s: f64 = (0..4).map(|_| self.unit()).sum();
        (s - 2.0) * (3.0f64).sqrt()
    }
}

fn test_config(dir: &Path) -> Config {
    let mut c = Config::builtin();
    c.agent.state_dir = dir.join("state");
    c.agent.node_id = "test-node".into();
    // Only explicit flushes (and the first vector) unless a test says so.
    c.store.flush_interval = Duration::from_secs(3600);
    c
}

fn names(list: &[&str]) -> Arc<[String]> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.sort();
    Arc::from(v)
}

fn fv(ts_ms: i64, names: &Arc<[String]>, values: Vec<f32>) -> FeatureVector {
    assert_eq!(names.len(), values.len());
    FeatureVector {
        ts_ms,
        names: names.clone(),
        values,
    }
}

fn assert_same(got: &[FeatureVector], want: &[FeatureVector]) {
    assert_eq!(got.len(), want.len(), "vector count");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.ts_ms, w.ts_ms);
        assert_eq!(g.names, w.names);
        let gb: Vec<u32> = g.values.iter().map(|v| v.to_bits()).collect();
        let wb: Vec<u32> = w.values.iter().map(|v| v.to_bits()).collect();
        assert_eq!(gb, wb, "values at {}", g.ts_ms);
    }
}

fn plain(path: &Path) -> Connection {
    Connection::open(path).expect("open plain connection")
}

fn pragma_i64(c: &Connection, p: &str) -> i64 {
    c.pragma_query_value(None, p, |r| r.get(0)).expect(p)
}

fn feature_rows(path: &Path) -> Vec<(i64, i64, i64)> {
    let c = plain(path);
    let mut s = c
        .prepare("SELECT schema_id, n, ts_first_ms FROM features ORDER BY id")
        .expect("prepare");
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<Vec<_>, _>>()
        .expect("rows")
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Store>();
}

/// SECURITY.md's file table: the state directory is the agent's alone
/// (0700) and the database and its WAL are readable by the agent only
/// (0600), whatever the umask allows.
#[tokio::test]
async fn state_dir_and_database_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let store = Store::open(&cfg).expect("open");
    let n = names(&["a"]);
    store.record_features(fv(1, &n, vec![1.0]));
    store.flush().await.expect("flush");
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&cfg.agent.state_dir), 0o700, "state directory");
    assert_eq!(mode(&cfg.db_path()), 0o600, "database");
    let wal = cfg.db_path().with_extension("db-wal");
    assert!(wal.exists(), "the flush left a WAL");
    assert_eq!(mode(&wal), 0o600, "WAL");
    store.close().await.expect("close");
}

#[tokio::test]
async fn malformed_vector_is_dropped_not_retried_forever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let store = Store::open(&cfg).expect("open");
    let n = names(&["a", "b"]);
    store.record_features(fv(1, &n, vec![1.0, 2.0]));
    store.record_features(FeatureVector {
        ts_ms: 2,
        names: n.clone(),
        values: vec![1.0],
    });
    store.record_features(fv(3, &n, vec![3.0, 4.0]));
    store
        .flush()
        .await
        .expect("flush succeeds despite the bad vector");
    assert_eq!(store.dropped(), 1);
    let reader = Reader::open(&cfg.db_path()).expect("reader");
    let got: Vec<i64> = reader
        .features_since(0)
        .expect("read")
        .iter()
        .map(|v| v.ts_ms)
        .collect();
    assert_eq!(got, [1, 3]);
    store.close().await.expect("close");
}

#[tokio::test]
async fn open_twice_migrates_once_with_wal_and_incremental_vacuum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let store = Store::open(&cfg).expect("open");
    store.close().await.expect("close");
    let store = Store::open(&cfg).expect("reopen");

    let c = plain(&cfg.db_path());
    assert_eq!(pragma_i64(&c, "user_version"), schema::latest_version());
    assert_eq!(pragma_i64(&c, "auto_vacuum"), 2, "INCREMENTAL");
    assert_eq!(pragma_i64(&c, "page_size"), schema::PAGE_SIZE);
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    let tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .expect("prepare")
        .query_map([], |r| r.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    for t in [
        "actions",
        "agent_status",
        "feature_schemas",
        "features",
        "guard_state",
        "incidents",
        "meta",
        "outbox",
        "signals",
        "target_state",
    ] {
        assert!(
            tables.iter().any(|n| n == t),
            "missing table {t}: {tables:?}"
        );
    }
    let meta: Vec<(String, String)> = c
        .prepare("SELECT key, value FROM meta ORDER BY key")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let keys: Vec<&str> = meta.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["created_ms", "node_id", "schema"]);
    assert!(meta.contains(&("node_id".into(), "test-node".into())));
    // Migrating an up-to-date database is a no-op.
    schema::migrate(&c).expect("migrate again");
    assert_eq!(pragma_i64(&c, "user_version"), schema::latest_version());
    drop(c);

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cfg.agent.state_dir)
        .expect("state dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let mode = std::fs::metadata(cfg.db_path())
        .expect("db")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "db readable by others: {mode:o}");
    store.close().await.expect("close");
}

#[tokio::test]
async fn record_flush_read_and_export_csv() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let store = Store::open(&cfg).expect("open");
    let a = names(&["cpu.mean_60s", "mem.last_60s", "zero.max_60s"]);
    let b = names(&["cpu.mean_60s", "disk.mean_60s"]);
    let t0 = 1_700_000_000_000i64;
    let mut want = Vec::new();
    for i in 0..6 {
        want.push(fv(
            t0 + i * 10_000,
            &a,
            vec![i as f32 * 0.5, 1e9 + i as f32, 0.0],
        ));
    }
    // The schema changes mid-batch, then changes back.
    for i in 6..9 {
        want.push(fv(t0 + i * 10_000, &b, vec![-(i as f32), 7.25]));
    }
    want.push(fv(t0 + 90_000, &a, vec![f32::MIN_POSITIVE, -0.0, 0.0]));
    for v in &want {
        store.record_features(v.clone());
    }
    store.flush().await.expect("flush");

    // The first vector went out on its own; the rest in one row per run.
    let rows = feature_rows(&cfg.db_path());
    let ns: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(ns, [1, 5, 3, 1]);
    assert_eq!(rows[0].0, rows[1].0);
    assert_ne!(rows[1].0, rows[2].0);
    assert_eq!(rows[1].0, rows[3].0, "schema a reused");

    let reader = Reader::open(&cfg.db_path()).expect("reader");
    assert_same(&reader.features_since(0).expect("read"), &want);
    assert_same(
        &reader.features_since(t0 + 50_000).expect("read"),
        &want[5..],
    );
    assert!(reader
        .features_since(t0 + 100_000)
        .expect("read")
        .is_empty());

    let mut csv = Vec::new();
    let n = reader.export_csv(t0 + 40_000, &mut csv).expect("csv");
    assert_eq!(n, 6);
    let csv = String::from_utf8(csv).expect("utf8");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "ts_ms,cpu.mean_60s,disk.mean_60s,mem.last_60s,zero.max_60s"
    );
    assert_eq!(lines.len(), 7);
    assert_eq!(lines[1], format!("{},2,,1000000000,0", t0 + 40_000));
    assert_eq!(lines[3], format!("{},-6,7.25,,", t0 + 60_000));
    assert_eq!(
        lines[6],
        format!(
            "{},0.000000000000000000000000000000000000011754944,,-0,0",
            t0 + 90_000
        )
    );
    // Every cell parses back to the same f32.
    let back: f32 = "0.000000000000000000000000000000000000011754944"
        .parse()
        .expect("parse");
    assert_eq!(back.to_bits(), f32::MIN_POSITIVE.to_bits());

    // Only schema b's rows in range: its names only.
    let mut csv = Vec::new();
    reader.export_csv(t0 + 65_000, &mut csv).expect("csv");
    let csv = String::from_utf8(csv).expect("utf8");
    assert!(csv.starts_with("ts_ms,cpu.mean_60s,disk.mean_60s,mem.last_60s,zero.max_60s\n"));
    assert_eq!(csv.lines().count(), 1 + 3);

    // The signal catalog knows every name once.
    let c = plain(&cfg.db_path());
    let signals: i64 = c
        .query_row("SELECT count(*) FROM signals", [], |r| r.get(0))
        .expect("count");
    assert_eq!(signals, 4);
    let schemas: i64 = c
        .query_row("SELECT count(*) FROM feature_schemas", [], |r| r.get(0))
        .expect("count");
    assert_eq!(schemas, 2);
    store.close().await.expect("close");
}

#[tokio::test]
async fn close_persists_buffered_vectors_quickly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let store = Store::open(&cfg).expect("open");
    let n = names(&["a", "b"]);
    let want: Vec<FeatureVector> = (0..50)
        .map(|i| fv(1_000 + i * 10, &n, vec![i as f32, 2.0]))
        .collect();
    for v in &want {
        store.record_features(v.clone());
    }
    let started = Instant::now();
    store.close().await.expect("close");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Closing the last connection checkpointed and removed the WAL.
    assert!(!wal_path(&cfg.db_path()).exists());
    let reader = Reader::open(&cfg.db_path()).expect("reader");
    assert_same(&reader.features_since(i64::MIN).expect("read"), &want);
}

#[tokio::test]
async fn first_vector_is_flushed_promptly_then_periodically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = test_config(dir.path());
    cfg.store.flush_interval = Duration::from_millis(300);
    let store = Store::open(&cfg).expect("open");
    let reader = Reader::open(&cfg.db_path()).expect("reader");
    let n = names(&["x"]);
    store.record_features(fv(1, &n, vec![1.0]));
    let wait_for = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = reader.features_since(0).expect("read").len();
            if got >= count || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(wait_for(1), 1, "first vector stored without a flush");
    store.record_features(fv(2, &n, vec![2.0]));
    store.record_features(fv(3, &n, vec![3.0]));
    // Buffered: not yet visible right away...
    assert_eq!(reader.features_since(0).expect("read").len(), 1);
    // ...but within the flush interval.
    assert_eq!(wait_for(3), 3, "periodic flush");
    store.close().await.expect("close");
}

#[tokio::test]
async fn status_reports_agent_targets_and_features() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let store = Store::open(&cfg).expect("open");
    let web = TargetStatus {
        name: "web".into(),
        kind: "systemd".into(),
        state: "active/running".into(),
        up: true,
        probe: Some(ProbeStatus {
            ok: true,
            latency_ms: 1.5,
            ts_ms: 42,
            error: None,
        }),
        detail: None,
    };
    let gone = TargetStatus {
        name: "old".into(),
        kind: "process".into(),
        state: "not found".into(),
        up: false,
        probe: None,
        detail: Some("no such process".into()),
    };
    store.record_targets(vec![web.clone(), gone.clone()]);
    let n = names(&["a"]);
    store.record_features(fv(5_000, &n, vec![1.0]));
    store.record_features(fv(15_000, &n, vec![1.0]));
    store.flush().await.expect("flush");

    let reader = Reader::open(&cfg.db_path()).expect("reader");
    let st = reader.status().expect("status");
    assert_eq!(st.node_id, "test-node");
    assert_eq!(st.pid, std::process::id());
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert!(st.last_flush_ms.is_some());
    assert!(st.started_ms > 0);
    // By name.
    assert_eq!(st.targets, vec![gone, web.clone()]);
    assert_eq!(st.newest_feature_ms, Some(15_000));
    assert_eq!(st.feature_vectors, 2);
    assert!(st.db_bytes > 0);
    serde_json::to_string(&st).expect("serializes");

    // The latest set replaces the old one.
    store.record_targets(vec![web.clone()]);
    store.flush().await.expect("flush");
    assert_eq!(reader.status().expect("status").targets, vec![web]);
    store.close().await.expect("close");
}

#[test]
fn reader_on_missing_file_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.db");
    let err = Reader::open(&path).expect_err("must fail");
    assert!(matches!(err, StoreError::Missing { .. }), "{err}");
    assert!(!path.exists(), "the reader must not create the file");
    // An empty (non-outpost) database is refused too.
    let other = dir.path().join("other.db");
    plain(&other)
        .execute_batch("CREATE TABLE t (x)")
        .expect("create");
    let err = Reader::open(&other).expect_err("must fail");
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
}

/// Noisy values: every f32 bit pattern different, so batches are large.
fn noisy_vectors(rng: &mut Rng, n: &Arc<[String]>, ts: &[i64]) -> Vec<FeatureVector> {
    ts.iter()
        .map(|&t| {
            fv(
                t,
                n,
                (0..n.len()).map(|_| rng.unit() as f32 * 1000.0).collect(),
            )
        })
        .collect()
}

#[tokio::test]
async fn retention_by_age_at_open_and_hourly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let day = 86_400_000i64;
    let now = now_ms();
    let n: Arc<[String]> = Arc::from((0..200).map(|i| format!("f{i:03}")).collect::<Vec<_>>());
    let mut rng = Rng(7);
    let store = Store::open(&cfg).expect("open");
    // 20, 16 and 10 days old, then now; 14 days is the default retention.
    for age_days in [20, 16, 10, 0] {
        let ts: Vec<i64> = (0..30).map(|i| now - age_days * day + i * 10_000).collect();
        for v in noisy_vectors(&mut rng, &n, &ts) {
            store.record_features(v);
        }
        store.flush().await.expect("flush");
    }
    // Hourly pass, run now: 20- and 16-day-old rows go (1 + 29 + 30 vectors).
    let rep = store
        .exec(move |w| w.retention(now_ms()))
        .await
        .expect("exec")
        .expect("retention");
    assert_eq!(rep.aged_rows, 3);
    assert_eq!(rep.aged_vectors, 60);
    assert_eq!(rep.oversize_rows, 0);
    let reader = Reader::open(&cfg.db_path()).expect("reader");
    let left = reader.features_since(i64::MIN).expect("read");
    assert_eq!(left.len(), 60);
    assert!(left.iter().all(|v| v.ts_ms >= now - 14 * day));
    store.close().await.expect("close");

    // At open: with a 5-day retention the 10-day-old batch goes too.
    let mut cfg5 = cfg.clone();
    cfg5.store.retention = Duration::from_secs(5 * 86_400);
    let store = Store::open(&cfg5).expect("open");
    store.flush().await.expect("barrier");
    let left = reader.features_since(i64::MIN).expect("read");
    assert_eq!(left.len(), 30);
    assert!(left.iter().all(|v| v.ts_ms >= now - day));
    store.close().await.expect("close");
}

#[tokio::test]
async fn retention_by_size_deletes_oldest_and_gives_space_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let now = now_ms();
    let n: Arc<[String]> = Arc::from((0..450).map(|i| format!("f{i:03}")).collect::<Vec<_>>());
    let mut rng = Rng(11);
    let store = Store::open(&cfg).expect("open");
    let mut all = Vec::new();
    for batch in 0..40i64 {
        let ts: Vec<i64> = (0..30)
            .map(|i| now - 3_600_000 + (batch * 30 + i) * 1_000)
            .collect();
        for v in noisy_vectors(&mut rng, &n, &ts) {
            all.push(v.clone());
            store.record_features(v);
        }
        store.flush().await.expect("flush");
    }
    let db = cfg.db_path();
    let (used_before, pages_before) = store
        .exec(|w| {
            w.conn()
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .expect("checkpoint");
            (
                writer::used_bytes(w.conn()).expect("used"),
                pragma_i64(w.conn(), "page_count"),
            )
        })
        .await
        .expect("exec");
    assert!(used_before > 1_500_000, "used {used_before}");
    let limit = 512 * 1024u64;
    let (rep, pages_after) = store
        .exec(move |w| {
            w.limits.max_db_bytes = limit;
            let rep = w.retention(now_ms()).expect("retention");
            w.conn()
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .expect("checkpoint");
            (rep, pragma_i64(w.conn(), "page_count"))
        })
        .await
        .expect("exec");
    assert_eq!(rep.aged_rows, 0);
    assert!(rep.oversize_rows > 0);
    assert!(rep.used_bytes <= limit, "{rep:?}");
    assert!(rep.vacuumed_pages > 0, "{rep:?}");
    assert!(
        pages_after < pages_before / 2,
        "{pages_after} of {pages_before}"
    );
    let file = std::fs::metadata(&db).expect("db").len();
    assert!(file <= limit + 64 * 1024, "file {file} after vacuum");

    // What is left is the newest, intact.
    let reader = Reader::open(&db).expect("reader");
    let left = reader.features_since(i64::MIN).expect("read");
    assert!(!left.is_empty());
    assert_eq!(
        left.len() as u64 + rep.oversize_vectors,
        all.len() as u64,
        "{rep:?}"
    );
    assert_same(&left, &all[all.len() - left.len()..]);
    store.close().await.expect("close");
}

#[tokio::test]
async fn full_queue_drops_and_counts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let store = Store::open(&cfg).expect("open");
    let n = names(&["a"]);
    // Hold the writer until the queue has overflowed.
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let holder = store.clone();
    let hold = tokio::spawn(async move {
        holder
            .exec(move |_| {
                let _ = held_tx.send(());
                let _ = go_rx.recv_timeout(Duration::from_secs(10));
            })
            .await
    });
    held_rx.await.expect("writer held");
    let total = 200i64;
    for i in 0..total {
        store.record_features(fv(i, &n, vec![i as f32]));
    }
    let dropped = store.dropped();
    assert!(dropped > 0 && dropped < total as u64, "dropped {dropped}");
    go_tx.send(()).expect("release");
    hold.await.expect("join").expect("exec");
    store.flush().await.expect("flush");
    let reader = Reader::open(&cfg.db_path()).expect("reader");
    let stored = reader.features_since(i64::MIN).expect("read").len() as u64;
    assert_eq!(stored + dropped, total as u64);
    store.close().await.expect("close");
}

#[tokio::test]
async fn durable_transaction_switches_synchronous_for_one_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let store = Store::open(&cfg).expect("open");
    let (inside, after) = store
        .exec(|w| {
            let inside = schema::durable_transaction(w.conn(), |tx| {
                tx.execute(
                    "INSERT INTO guard_state (key, value, updated_ms) VALUES ('k', '1', 1)",
                    [],
                )?;
                Ok(pragma_i64(tx, "synchronous"))
            })
            .expect("durable");
            (inside, pragma_i64(w.conn(), "synchronous"))
        })
        .await
        .expect("exec");
    assert_eq!(inside, 2, "FULL inside");
    assert_eq!(after, 1, "NORMAL after");
    store.close().await.expect("close");
}

// ---------------------------------------------------------------------------
// The disk budget: a simulated day of realistic feature vectors.

/// One simulated 1 Hz signal.
#[derive(Clone, Copy)]
enum Kind {
    /// Error counters, drops, swap, restarts: always 0.
    Zero,
    /// Totals and capacities.
    Constant(f64),
    /// Process, thread, connection counts: integers, rarely changing.
    Count(f64),
    /// Temperatures, memory and disk use: slow random walk plus noise.
    Gauge { level: f64, noise: f64 },
    /// CPU busy, network and disk rates: noisy around a drifting mean.
    Rate { mean: f64, noise: f64 },
}

const STATS: [&str; 6] = ["last", "max", "mean", "min", "slope", "std"];
const WINDOW_BLOCKS: usize = 6; // 60 s window of 10 s steps
const STEP_SAMPLES: usize = 10;

/// Per 10-sample block: what the window statistics need.
#[derive(Clone, Copy, Default)]
struct Block {
    sum: f64,
    sumsq: f64,
    /// Σ j·y with j the sample's index within the block.
    sum_jy: f64,
    min: f64,
    max: f64,
    last: f64,
}

struct Sim {
    rng: Rng,
    kinds: Vec<Kind>,
    blocks: Vec<[Block; WINDOW_BLOCKS]>,
    names: Arc<[String]>,
    /// For each name (sorted), (signal, stat).
    order: Vec<(usize, usize)>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let mut kinds = Vec::new();
        for i in 0..75 {
            kinds.push(match i {
                0..=19 => Kind::Zero,
                20..=27 => Kind::Constant([3.98e9, 4.0, 1.2e11, 1500.0][i % 4]),
                28..=39 => Kind::Count((20 + rng.below(300)) as f64),
                40..=59 => Kind::Gauge {
                    level: 10.0 + rng.unit() * 1e4,
                    noise: 0.01 + rng.unit(),
                },
                _ => Kind::Rate {
                    mean: 1.0 + rng.unit() * 1e5,
                    noise: 0.05,
                },
            });
        }
        let mut named: Vec<(String, usize, usize)> = Vec::new();
        for (s, _) in kinds.iter().enumerate() {
            for (k, stat) in STATS.iter().enumerate() {
                named.push((format!("sig{s:02}.{stat}_60s"), s, k));
            }
        }
        named.sort();
        let names: Arc<[String]> = Arc::from(named.iter().map(|n| n.0.clone()).collect::<Vec<_>>());
        let order = named.iter().map(|n| (n.1, n.2)).collect();
        let mut sim = Sim {
            rng,
            blocks: vec![[Block::default(); WINDOW_BLOCKS]; kinds.len()],
            kinds,
            names,
            order,
        };
        for _ in 0..WINDOW_BLOCKS {
            sim.advance();
        }
        sim
    }

    fn sample(&mut self, s: usize) -> f64 {
        let r = &mut self.rng;
        match &mut self.kinds[s] {
            Kind::Zero => 0.0,
            Kind::Constant(v) => *v,
            Kind::Count(v) => {
                if r.below(200) == 0 {
                    *v = (*v + if r.below(2) == 0 { 1.0 } else { -1.0 }).max(0.0);
                }
                *v
            }
            Kind::Gauge { level, noise } => {
                *level += r.normal() * *noise * 0.1;
                *level + r.normal() * *noise
            }
            Kind::Rate { mean, noise } => {
                *mean *= 1.0 + r.normal() * 0.001;
                (*mean * (1.0 + r.normal() * *noise)).max(0.0)
            }
        }
    }

    /// Ten new samples per signal: the window slides one block.
    fn advance(&mut self) {
        for s in 0..self.kinds.len() {
            let mut b = Block {
                min: f64::INFINITY,
                max: f64::NEG_INFINITY,
                ..Block::default()
            };
            for j in 0..STEP_SAMPLES {
                let y = self.sample(s);
                b.sum += y;
                b.sumsq += y * y;
                b.sum_jy += j as f64 * y;
                b.min = b.min.min(y);
                b.max = b.max.max(y);
                b.last = y;
            }
            let w = &mut self.blocks[s];
            w.rotate_left(1);
            w[WINDOW_BLOCKS - 1] = b;
        }
    }

    fn vector(&mut self, ts_ms: i64) -> FeatureVector {
        self.advance();
        let n = (WINDOW_BLOCKS * STEP_SAMPLES) as f64;
        let stats: Vec<[f32; 6]> = self
            .blocks
            .iter()
            .map(|w| {
                let (mut sum, mut sumsq, mut sxy) = (0.0, 0.0, 0.0);
                let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
                for (k, b) in w.iter().enumerate() {
                    sum += b.sum;
                    sumsq += b.sumsq;
                    sxy += b.sum_jy + (k * STEP_SAMPLES) as f64 * b.sum;
                    min = min.min(b.min);
                    max = max.max(b.max);
                }
                let mean = sum / n;
                let var = (sumsq / n - mean * mean).max(0.0);
                let x_mean = (n - 1.0) / 2.0;
                let sxx = n * (n * n - 1.0) / 12.0;
                let slope = (sxy - n * x_mean * mean) / sxx;
                let last = w[WINDOW_BLOCKS - 1].last;
                // STATS order: last, max, mean, min, slope, std.
                [last, max, mean, min, slope, var.sqrt()].map(|v| v as f32)
            })
            .collect();
        let values = self.order.iter().map(|&(s, k)| stats[s][k]).collect();
        FeatureVector {
            ts_ms,
            names: self.names.clone(),
            values,
        }
    }
}

/// This thread's I/O counters: (wchar, write_bytes). Per thread, because
/// the test harness runs other tests in this process at the same time.
fn thread_io() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/thread-self/io").ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    Some((field("wchar:")?, field("write_bytes:")?))
}

#[test]
fn realistic_vectors_compress_well() {
    let mut sim = Sim::new(1);
    let t0 = 1_700_000_000_000i64;
    let mut raw = 0usize;
    let mut packed = 0usize;
    let mut plain_zstd = 0usize;
    for batch in 0..20 {
        let vs: Vec<FeatureVector> = (0..30)
            .map(|i| sim.vector(t0 + (batch * 30 + i) * 10_000))
            .collect();
        let ts: Vec<i64> = vs.iter().map(|v| v.ts_ms).collect();
        let blob = codec::encode(&ts, vs.iter().map(|v| v.values.as_slice()), 450).expect("enc");
        let d = codec::decode(&blob, 30, 450).expect("dec");
        for (i, v) in vs.iter().enumerate() {
            assert!(d
                .row(i)
                .iter()
                .zip(&v.values)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
        raw += 30 * (450 * 4 + 8);
        packed += blob.len();
        // For comparison: the same bytes row-major, zstd alone.
        let mut rm = Vec::new();
        for v in &vs {
            rm.extend_from_slice(&v.ts_ms.to_le_bytes());
            for x in &v.values {
                rm.extend_from_slice(&x.to_le_bytes());
            }
        }
        plain_zstd += zstd::bulk::compress(&rm, 9).expect("zstd").len();
    }
    let ratio = raw as f64 / packed as f64;
    println!(
        "codec: 20 batches of 30 vectors x 450 features: raw {raw} B, xor+shuffle+zstd {packed} B \
         (ratio {ratio:.2}), plain zstd row-major {plain_zstd} B (ratio {:.2})",
        raw as f64 / plain_zstd as f64
    );
    assert!(ratio > 3.0, "ratio {ratio:.2}");
    assert!(packed < plain_zstd);
}

#[tokio::test]
async fn simulated_day_stays_within_disk_budget() {
    const VECTORS: usize = 8_640; // one day at the default 10 s step
                                  // The default 300 s flush interval; OUTPOST_BUDGET_FLUSH_EVERY=90 shows
                                  // what a 900 s interval would cost.
    let per_flush: usize = std::env::var("OUTPOST_BUDGET_FLUSH_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    const BUDGET_PER_DAY: u64 = 20_000_000;

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let db = cfg.db_path();
    let store = Store::open(&cfg).expect("open");
    let mut sim = Sim::new(42);
    let t0 = now_ms() - 86_400_000;
    let targets: Vec<TargetStatus> = ["web", "broker", "plc-bridge"]
        .iter()
        .map(|n| TargetStatus {
            name: n.to_string(),
            kind: "systemd".into(),
            state: "active/running".into(),
            up: true,
            probe: Some(ProbeStatus {
                ok: true,
                latency_ms: 1.25,
                ts_ms: t0,
                error: None,
            }),
            detail: None,
        })
        .collect();

    let before = store.exec(|_| thread_io()).await.expect("exec");
    let started = Instant::now();
    for i in 0..VECTORS {
        store.record_features(sim.vector(t0 + i as i64 * 10_000));
        if (i + 1) % per_flush == 0 {
            let mut t = targets.clone();
            for s in &mut t {
                if let Some(p) = &mut s.probe {
                    p.ts_ms = t0 + i as i64 * 10_000;
                    p.latency_ms = 1.0 + (i % 7) as f64 * 0.1;
                }
            }
            store.record_targets(t);
            store.flush().await.expect("flush");
            // Between commits 300 s apart the kernel writes back the dirty
            // pages of the mmapped -shm file (dirty_expire is 30 s); do it
            // now so that re-dirtying them is counted in write_bytes.
            let mut shm = db.as_os_str().to_owned();
            shm.push("-shm");
            std::fs::File::open(&shm)
                .expect("shm")
                .sync_data()
                .expect("sync shm");
        }
    }
    // Count the checkpoint that the WAL's remaining frames will cost.
    let after = store
        .exec(|w| {
            w.conn()
                .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
                .expect("checkpoint");
            thread_io()
        })
        .await
        .expect("exec");
    let elapsed = started.elapsed();
    assert_eq!(store.dropped(), 0);

    let c = plain(&db);
    let (rows, blob_bytes, vectors): (i64, i64, i64) = c
        .query_row(
            "SELECT count(*), sum(length(data)), sum(n) FROM features",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("sums");
    drop(c);
    let db_size = std::fs::metadata(&db).expect("db").len();
    assert_eq!(vectors as usize, VECTORS);
    let raw = (VECTORS * (450 * 4 + 8)) as u64;

    // write_bytes: 4 KiB page-cache pages the writer thread dirtied in the
    // WAL, the database file and the mmapped -shm (each commit and the shm
    // are synced above, as the kernel would between commits 300 s apart):
    // what the block device gets. wchar: bytes passed to write(2), i.e. WAL
    // frames and checkpoint pages only.
    let files = db_size
        + std::fs::metadata(wal_path(&db))
            .map(|m| m.len())
            .unwrap_or(0);
    let (how, written) = match (before, after) {
        (Some((wc0, wb0)), Some((wc1, wb1))) => {
            let (wchar, wbytes) = (wc1.saturating_sub(wc0), wb1.saturating_sub(wb0));
            println!("budget: writer thread wchar {wchar} B, write_bytes {wbytes} B");
            if wbytes > 0 {
                ("write_bytes (/proc/thread-self/io)", wbytes)
            } else {
                eprintln!("budget: write_bytes is 0 here (tmpfs?); using wchar");
                ("wchar (/proc/thread-self/io)", wchar)
            }
        }
        _ => {
            eprintln!("budget: /proc/thread-self/io unavailable; using file sizes");
            ("file sizes", files)
        }
    };
    assert!(written > 0, "nothing measured");
    let per_day = written * 8_640 / VECTORS as u64;
    println!(
        "budget: {VECTORS} vectors x 450 features, flush every {per_flush}: {rows} rows, \
         blobs {blob_bytes} B (raw {raw} B, ratio {:.2}), db file {db_size} B, \
         written {written} B via {how} => {:.2} MB/day ({:.1}% of 20 MB), {:.1} B/vector written; \
         took {:.2?}",
        raw as f64 / blob_bytes as f64,
        per_day as f64 / 1e6,
        per_day as f64 / BUDGET_PER_DAY as f64 * 100.0,
        written as f64 / VECTORS as f64,
        elapsed
    );
    assert!(
        per_day < BUDGET_PER_DAY,
        "{per_day} B/day written, budget {BUDGET_PER_DAY}"
    );
    store.close().await.expect("close");
}

fn audit_entry(i: u64) -> audit::AuditEntry {
    audit::AuditEntry {
        ts_ms: i as i64,
        decision_id: i,
        rule: Some("web-down".into()),
        target: "web".into(),
        action: "notify".into(),
        decision: "suggested".into(),
        reason: format!("probe_failed for 1 sample, episode {i}: would notify (mode = suggest)"),
        detail: serde_json::json!({"episode": i}),
    }
}

fn outbox_events(store_rows: &[outbox::OutboxRow]) -> Vec<serde_json::Value> {
    store_rows
        .iter()
        .map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).expect("json"))
        .filter(|m| m["type"] == "event")
        .collect()
}

/// SQLite answers SQLITE_FULL at `max_page_count` as on a full disk: the
/// writer must take the room from stored features, never from audit rows or
/// events, say so in `meta`, and go back to normal when there is room.
#[tokio::test]
async fn a_full_database_gives_feature_pages_to_audit_rows_and_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    let store = Store::open(&cfg).expect("open");
    store.configure_outbox(Some(outbox::OutboxConfig::new("p", "n1", 1000)));
    let n = names(
        &(0..200)
            .map(|i| format!("f{i:03}"))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let mut rng = Rng(7);
    for t in 0..150 {
        let values = (0..200).map(|_| rng.unit() as f32).collect();
        store.record_features(fv(t, &n, values));
        store.flush().await.expect("flush");
    }
    assert_eq!(feature_rows(&cfg.db_path()).len(), 150);
    // The file may not grow any more: every page from now on comes from
    // somewhere inside it.
    store
        .exec(|w| {
            let pages = pragma_i64(w.conn(), "page_count");
            w.conn()
                .pragma_update(None, "max_page_count", pages)
                .expect("cap");
        })
        .await
        .expect("exec");
    for i in 1..=30 {
        store
            .audit(audit_entry(i))
            .await
            .unwrap_or_else(|e| panic!("audit row {i} on a full database: {e}"));
    }
    assert!(store.exec(|w| w.disk_full()).await.expect("exec"));
    let left = feature_rows(&cfg.db_path()).len();
    assert!(left < 150, "no feature batch was deleted ({left} left)");
    // New features still go in, in the room old ones leave.
    for t in 150..155 {
        store.record_features(fv(t, &n, vec![0.5; 200]));
        store.flush().await.expect("flush on a full database");
    }
    let reader = Reader::open(&cfg.db_path()).expect("reader");
    let report = reader.verify_chain().expect("verify");
    assert!(report.ok && report.rows == 30, "{report:?}");
    let since = reader.status().expect("status").disk_full_since_ms;
    assert!(since.is_some(), "the full disk is not in the status");
    let events = outbox_events(&store.outbox_pending(0, 1000).await.expect("pending"));
    assert_eq!(events.len(), 30, "an event was lost");

    // A restart keeps the state (the cap was the old connection's).
    store.close().await.expect("close");
    let store = Store::open(&cfg).expect("reopen");
    store.configure_outbox(Some(outbox::OutboxConfig::new("p", "n1", 1000)));
    assert!(store.exec(|w| w.disk_full()).await.expect("exec"));
    assert_eq!(reader.status().expect("status").disk_full_since_ms, since);

    // Room again: back to normal, with a store.recovered event.
    store
        .exec(|w| {
            w.check_room();
            w.disk_full()
        })
        .await
        .map(|full| assert!(!full, "still full with room"))
        .expect("exec");
    assert_eq!(reader.status().expect("status").disk_full_since_ms, None);
    assert!(faults::reserve_path(&cfg.db_path()).is_file());
    let events = outbox_events(&store.outbox_pending(0, 1000).await.expect("pending"));
    let last = &events.last().expect("events")["body"];
    assert_eq!(last["event"], "store.recovered", "{last}");
    assert_eq!(last["cause"], "disk_full");
    assert_eq!(last["since_ms"].as_i64(), since);
    store.close().await.expect("close");
}

/// A file that is not a database is moved aside, not overwritten; the
/// fresh store's seq starts above any the old one can have used, and the
/// `store.recovered` event waits for the outbox.
#[tokio::test]
async fn a_corrupt_file_is_set_aside_and_reported_once_the_outbox_is_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = test_config(dir.path());
    std::fs::create_dir_all(&cfg.agent.state_dir).expect("dir");
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(cfg.db_path(), &garbage).expect("garbage");
    let before = now_ms();
    let store = Store::open(&cfg).expect("open over a corrupt file");
    let aside: Vec<_> = std::fs::read_dir(&cfg.agent.state_dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).expect("kept"), garbage);
    assert!(Reader::open(&cfg.db_path())
        .expect("fresh")
        .status()
        .is_ok());

    store.configure_outbox(Some(outbox::OutboxConfig::new("p", "n1", 100)));
    store.flush().await.expect("flush");
    let rows = store.outbox_pending(0, 10).await.expect("pending");
    let events = outbox_events(&rows);
    assert_eq!(events.len(), 1, "{events:?}");
    let body = &events[0]["body"];
    assert_eq!(body["event"], "store.recovered");
    assert_eq!(body["cause"], "corrupt");
    assert_eq!(body["moved_to"], aside[0].display().to_string());
    assert!(
        rows[0].seq > before as u64,
        "seq {} restarted low",
        rows[0].seq
    );
    store.close().await.expect("close");

    // A good store is never moved.
    let store = Store::open(&cfg).expect("reopen");
    store.close().await.expect("close");
    let n = std::fs::read_dir(&cfg.agent.state_dir)
        .expect("ls")
        .filter(|e| {
            e.as_ref()
                .expect("entry")
                .path()
                .to_string_lossy()
                .contains(".corrupt-")
        })
        .count();
    assert_eq!(n, 1);
}

/// The bundled SQLite is built as `.cargo/config.toml` says: no extension
/// loading, no full-text search or R-tree; JSON (the store's queries use
/// json_each) stays.
#[test]
fn bundled_sqlite_has_only_what_the_store_uses() {
    let c = Connection::open_in_memory().expect("sqlite");
    let used = |opt: &str| -> i64 {
        c.query_row("SELECT sqlite_compileoption_used(?1)", [opt], |r| r.get(0))
            .expect("compile option")
    };
    assert_eq!(used("OMIT_LOAD_EXTENSION"), 1);
    for absent in [
        "ENABLE_FTS3",
        "ENABLE_FTS5",
        "ENABLE_RTREE",
        "ENABLE_DBSTAT_VTAB",
    ] {
        assert_eq!(used(absent), 0, "{absent}");
    }
    let err = c
        .execute_batch("CREATE VIRTUAL TABLE t USING fts5(x)")
        .expect_err("no fts5");
    assert!(err.to_string().contains("no such module"), "{err}");
    let n: i64 = c
        .query_row("SELECT count(*) FROM json_each('[1,2,3]')", [], |r| {
            r.get(0)
        })
        .expect("json_each");
    assert_eq!(n, 3);
}
