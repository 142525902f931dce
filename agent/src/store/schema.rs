//! Opening the database, its pragmas, and the versioned migrations.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::StoreError;

/// How long a statement waits for another connection's lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Database page size, set before the file is created. Every commit rewrites
/// a few whole pages whatever it holds (page 1, the pointer map, the
/// features b-tree's interior page and last leaf, the status row): at
/// 1 KiB they cost a quarter of what 4 KiB pages do. Measured on a simulated
/// day (see `simulated_day_stays_within_disk_budget`): 4 KiB 20.8 MB/day,
/// 2 KiB 18.8, 1 KiB 18.5.
pub const PAGE_SIZE: i64 = 1024;

/// WAL frames at which SQLite checkpoints on its own. Under ~990 frames the
/// WAL-index's frame map stays in the first page of the `-shm` file, next to
/// its header, so a commit dirties one mmapped page fewer (the kernel writes
/// those back to disk too); a page rewritten by many commits still reaches
/// the database file only once per checkpoint.
pub const WAL_AUTOCHECKPOINT_FRAMES: i64 = 900;

/// The writer's page cache, negative as SQLite wants KiB.
const WRITER_CACHE_KIB: i64 = -256;

/// After a checkpoint the WAL file is truncated to this many bytes.
const JOURNAL_SIZE_LIMIT: i64 = 2 * 1024 * 1024;

/// The migrations, in order. Migration `i` (0-based) takes the schema from
/// `user_version = i` to `i + 1`. Append only; never edit a released step.
pub const MIGRATIONS: &[&str] = &[
    // 1: everything the agent needs up to the outbox.
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE signals (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL
);

CREATE TABLE feature_schemas (
    id    INTEGER PRIMARY KEY,
    hash  TEXT NOT NULL UNIQUE,
    names TEXT NOT NULL  -- JSON array of feature names, in vector order
);

-- One row per flush and schema: n vectors encoded column-major into data
-- (see store/codec.rs). Rows are appended in time order, so id order is
-- time order.
CREATE TABLE features (
    id          INTEGER PRIMARY KEY,
    ts_first_ms INTEGER NOT NULL,
    ts_last_ms  INTEGER NOT NULL,
    schema_id   INTEGER NOT NULL REFERENCES feature_schemas(id),
    n           INTEGER NOT NULL,
    codec       INTEGER NOT NULL,
    data        BLOB NOT NULL
);

CREATE TABLE target_state (
    name   TEXT PRIMARY KEY NOT NULL,
    kind   TEXT NOT NULL,
    state  TEXT NOT NULL,
    up     INTEGER NOT NULL,
    detail TEXT,
    probe  TEXT,           -- JSON ProbeStatus, or NULL
    ts_ms  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE agent_status (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    node_id       TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    started_ms    INTEGER NOT NULL,
    last_flush_ms INTEGER,
    version       TEXT NOT NULL
);

CREATE TABLE incidents (
    id          INTEGER PRIMARY KEY,
    target      TEXT NOT NULL,
    opened_ms   INTEGER NOT NULL,
    closed_ms   INTEGER,
    score       REAL NOT NULL,
    explanation TEXT NOT NULL   -- JSON
);
CREATE INDEX incidents_opened ON incidents(opened_ms);

CREATE TABLE actions (
    id        INTEGER PRIMARY KEY,
    ts_ms     INTEGER NOT NULL,
    decision_id INTEGER NOT NULL,
    rule      TEXT,
    target    TEXT NOT NULL,
    action    TEXT NOT NULL,
    decision  TEXT NOT NULL,
    reason    TEXT NOT NULL,
    detail    TEXT,             -- JSON
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL UNIQUE
);

CREATE TABLE guard_state (
    key        TEXT PRIMARY KEY NOT NULL,
    value      TEXT NOT NULL,   -- JSON
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT NOT NULL,
    kind       TEXT NOT NULL,
    payload    BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
"#,
    // 2: the outbox as the uplink uses it (store/outbox.rs). The seq is the
    // message's own, assigned from `meta.outbox_seq` so it never goes back
    // (the version-1 table was never written).
    r#"
DROP TABLE outbox;
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY NOT NULL,
    kind       TEXT NOT NULL,       -- state | summary | event | reply
    topic      TEXT NOT NULL,
    retained   INTEGER NOT NULL,
    payload    BLOB NOT NULL,       -- the JSON message as published
    created_ms INTEGER NOT NULL
);
CREATE INDEX outbox_kind ON outbox(kind, seq);
"#,
];

/// The schema version this build writes and reads.
pub fn latest_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Opens (creating if needed) the database for writing: sets the pragmas and
/// applies pending migrations.
pub fn open_rw(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Must precede the first CREATE TABLE; a no-op on an existing database.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Pragma {
            pragma: "journal_mode",
            wanted: "wal",
            got: mode,
        });
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_FRAMES)?;
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // The writer appends; it rarely rereads. A small page cache keeps the
    // daemon's memory flat as the database grows (SQLite's default is 2 MiB).
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Opens an existing database read-only (the CLI, while the daemon runs).
pub fn open_ro(path: &Path) -> Result<Connection, StoreError> {
    if !path.is_file() {
        return Err(StoreError::Missing {
            path: path.to_path_buf(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version = user_version(&conn)?;
    if version == 0 {
        return Err(StoreError::NotAStore {
            path: path.to_path_buf(),
        });
    }
    if version > latest_version() {
        return Err(StoreError::TooNew {
            found: version,
            supported: latest_version(),
        });
    }
    Ok(conn)
}

pub fn user_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

/// Applies every migration past the current `user_version`, each in its own
/// transaction together with its version bump.
pub fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let current = user_version(conn)?;
    if current > latest_version() {
        return Err(StoreError::TooNew {
            found: current,
            supported: latest_version(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let to = i as i64 + 1;
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the lock.
        if user_version(&tx)? >= to {
            continue;
        }
        tx.execute_batch(sql)
            .map_err(|source| StoreError::Migration { to, source })?;
        tx.pragma_update(None, "user_version", to)?;
        tx.commit()?;
        tracing::info!(version = to, "store schema migrated");
    }
    Ok(())
}

/// Runs `f` in a transaction that is on stable storage when this returns
/// (`synchronous = FULL` for this commit, `NORMAL` again afterwards).
/// For the audit chain and the outbox, whose rows must survive a power cut;
/// feature batches use the cheaper `NORMAL`, where a power cut may lose the
/// last commits but never corrupts the database.
///
/// The store's connection is owned by one thread that never nests
/// transactions, hence `&Connection` and an unchecked transaction.
pub fn durable_transaction<T>(
    conn: &Connection,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    conn.pragma_update(None, "synchronous", "FULL")?;
    let result = (|| -> Result<T, StoreError> {
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    })();
    let restored = conn.pragma_update(None, "synchronous", "NORMAL");
    let out = result?;
    restored?;
    Ok(out)
}
