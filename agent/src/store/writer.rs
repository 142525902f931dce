//! The writer thread: owns the read-write connection, buffers feature
//! vectors, commits them in batches, runs retention.
//!
//! What one periodic flush writes (one transaction): a `features` row per
//! schema present in the batch (its leaf cell plus the compressed BLOB's
//! overflow pages) and `agent_status.last_flush_ms`. Only when something
//! changed: `target_state` rows (a target's state changed, or hourly),
//! `signals.last_seen_ms` (every 6 hours per schema), new schemas and signal
//! names. SQLite adds page 1 and the pointer map page to every commit, and
//! the WAL-index (`-shm`, mmapped, written back by the kernel) a page or
//! more; see `schema::PAGE_SIZE` for why pages are small.
//!
//! Disk full (see `faults.rs` for why a reserve file is needed). Every write
//! goes through [`Writer::with_room`]: at the first `SQLITE_FULL` the writer
//! releases the reserve, logs one error, records `disk_full_since_ms` in
//! `meta` (shown by `outpost status --json`) and lets SQLite checkpoint
//! more often; then it checkpoints and deletes the oldest feature batches
//! until enough of the file is free pages, and tries the write again (up to
//! [`FULL_ATTEMPTS`] times, making twice as much room each time). While the
//! disk stays full, every flush first deletes old batches so the file does
//! not grow: new features replace the oldest, audit rows and events keep
//! their place. Every [`FULL_RECHECK`] the writer looks for room; when the
//! file system has it again it recreates the reserve, leaves the full state
//! and posts a `store.recovered` event (`cause: "disk_full"`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::codec::{self, CODEC_XOR_SHUFFLE_ZSTD};
use super::outbox::OutboxShared;
use super::{faults, now_ms, schema, Ctl, Msg, StoreError, TargetSlot};
use crate::collect::TargetStatus;
use crate::config::StoreConfig;
use crate::detect::features::FeatureVector;

/// How often retention runs after the one at start.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// `signals.last_seen_ms` is refreshed at most this often per schema (and
/// when a schema is first used by this process): the catalog's "last seen"
/// is accurate to 6 hours, and flushes do not rewrite the catalog's pages
/// (450 names: ~5 pages) every time.
const SIGNALS_TOUCH_EVERY_MS: i64 = 6 * 3_600_000;
/// A target's row is rewritten when its state changes (kind, state, up,
/// detail, probe ok/error), and otherwise at most this often: probe latency
/// alone changing does not cost a page write per flush.
const TARGET_REFRESH_MS: i64 = 3_600_000;
/// A flush happens early once this many vectors are buffered (bounds the
/// size of one row when the flush interval is long or the step short).
const MAX_BATCH: usize = 360;
/// While commits fail, at most this many vectors wait in memory; the oldest
/// are dropped (and counted) beyond it.
const MAX_BUFFERED: usize = 2 * MAX_BATCH;
/// After a failed commit, the next attempt waits at least this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// Rows deleted per transaction while the database is over its size limit.
const SIZE_CHUNK_ROWS: i64 = 16;
/// Free pages are given back to the file system only when at least this many
/// bytes and at least 1/`VACUUM_MIN_FREE_FRACTION` of the file are free. Vacuuming
/// moves in-use pages from the end of the file into the holes, which costs
/// about as many writes as it frees; in steady state the pages retention
/// frees are refilled by the next hour's batches at no cost, so the vacuum
/// is for when the limits shrink or a burst of data is deleted.
const VACUUM_MIN_FREE_BYTES: i64 = 1024 * 1024;
const VACUUM_MIN_FREE_FRACTION: i64 = 10;
/// While the disk is full, the oldest feature batches are deleted before
/// each flush until at least this much of the database file is free pages:
/// new rows take those pages, so the file does not grow.
const FULL_HEADROOM_BYTES: i64 = 128 * 1024;
/// A write that fails for want of disk space is tried again this many
/// times, each after making twice as much room as the time before.
const FULL_ATTEMPTS: u32 = 4;
/// While the disk is full, how often the writer looks for room again.
const FULL_RECHECK: Duration = Duration::from_secs(5);
/// While the disk is full, SQLite checkpoints at this many WAL frames
/// (normally `schema::WAL_AUTOCHECKPOINT_FRAMES`): the WAL is then written
/// again from its start before it needs more room than it has.
const FULL_WAL_AUTOCHECKPOINT_FRAMES: i64 = 64;
/// The `meta` key that holds when the disk filled up, while it is full.
pub const DISK_FULL_KEY: &str = "disk_full_since_ms";

/// Retention and flush limits, from `StoreConfig`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub flush_interval: Duration,
    pub retention: Duration,
    pub max_db_bytes: u64,
    pub vacuum_min_free_pages: i64,
}

impl Limits {
    pub fn from_config(c: &StoreConfig) -> Limits {
        Limits {
            flush_interval: c.flush_interval,
            retention: c.retention,
            max_db_bytes: c.max_db_bytes,
            vacuum_min_free_pages: VACUUM_MIN_FREE_BYTES / schema::PAGE_SIZE,
        }
    }
}

/// What one retention pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub aged_rows: u64,
    pub aged_vectors: u64,
    pub oversize_rows: u64,
    pub oversize_vectors: u64,
    pub vacuumed_pages: i64,
    pub used_bytes: u64,
}

/// Records this process in `agent_status` and `meta` (at open, before the
/// writer thread starts). `last_flush_ms` survives restarts.
pub fn record_start(conn: &Connection, node_id: &str, started_ms: i64) -> Result<(), StoreError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO agent_status (id, node_id, pid, started_ms, last_flush_ms, version)
         VALUES (1, ?1, ?2, ?3, NULL, ?4)
         ON CONFLICT(id) DO UPDATE SET node_id = excluded.node_id, pid = excluded.pid,
             started_ms = excluded.started_ms, version = excluded.version",
        params![
            node_id,
            i64::from(std::process::id()),
            started_ms,
            env!("CARGO_PKG_VERSION")
        ],
    )?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('created_ms', ?1) ON CONFLICT(key) DO NOTHING",
        params![started_ms.to_string()],
    )?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('node_id', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value WHERE value <> excluded.value",
        params![node_id],
    )?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('schema', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value WHERE value <> excluded.value",
        params![schema::latest_version().to_string()],
    )?;
    tx.commit()?;
    Ok(())
}

/// A schema the writer knows the id of.
struct KnownSchema {
    names: Arc<[String]>,
    id: i64,
    /// When its signals' `last_seen_ms` was last written (vector time).
    touched_ms: Option<i64>,
}

pub struct Writer {
    conn: Connection,
    path: PathBuf,
    pub(super) limits: Limits,
    buf: Vec<FeatureVector>,
    /// Known schemas by name-list hash.
    schemas: HashMap<u64, Vec<KnownSchema>>,
    targets: TargetSlot,
    /// What `target_state` holds, and when each row was written.
    written_targets: HashMap<String, (TargetStatus, i64)>,
    dropped: Arc<AtomicU64>,
    first_flushed: bool,
    last_flush: Instant,
    retry_at: Option<Instant>,
    failing: bool,
    /// Set while the disk is full.
    full: Option<DiskFull>,
    outbox: Arc<OutboxShared>,
}

/// A full-disk episode.
#[derive(Debug)]
struct DiskFull {
    since_ms: i64,
    /// Feature batches and vectors deleted to make room.
    shed_rows: u64,
    shed_vectors: u64,
    next_check: Instant,
    /// Whether `meta` says so yet.
    recorded: bool,
}

impl DiskFull {
    fn new(since_ms: i64, recorded: bool) -> DiskFull {
        DiskFull {
            since_ms,
            shed_rows: 0,
            shed_vectors: 0,
            next_check: Instant::now() + FULL_RECHECK,
            recorded,
        }
    }
}

impl Writer {
    pub fn new(
        conn: Connection,
        path: PathBuf,
        limits: Limits,
        targets: TargetSlot,
        dropped: Arc<AtomicU64>,
        outbox: Arc<OutboxShared>,
    ) -> Writer {
        // A previous run stopped while the disk was full: carry on in that
        // state until there is room (looked for after FULL_RECHECK, when
        // the uplink has turned the outbox on for the event).
        let full = conn
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1",
                [DISK_FULL_KEY],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .ok()
            .flatten()
            .map(|since_ms| {
                tracing::warn!(since_ms, "store: the disk was full when the agent stopped");
                let _ =
                    conn.pragma_update(None, "wal_autocheckpoint", FULL_WAL_AUTOCHECKPOINT_FRAMES);
                DiskFull::new(since_ms, true)
            });
        Writer {
            conn,
            path,
            limits,
            buf: Vec::new(),
            schemas: HashMap::new(),
            targets,
            written_targets: HashMap::new(),
            dropped,
            first_flushed: false,
            last_flush: Instant::now(),
            retry_at: None,
            failing: false,
            full,
            outbox,
        }
    }

    pub fn run(mut self, data: Receiver<Msg>, ctl: Receiver<Ctl>) {
        self.retention_logged();
        let mut next_retention = Instant::now() + RETENTION_EVERY;
        loop {
            let now = Instant::now();
            let mut deadline = next_retention;
            if self.pending() {
                deadline = deadline.min(self.flush_due());
            }
            if let Some(f) = &self.full {
                deadline = deadline.min(f.next_check);
            }
            match data.recv_timeout(deadline.saturating_duration_since(now)) {
                Ok(Msg::Features(v)) => self.push(v),
                Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Every handle is gone without close(): save what we have.
                    self.drain_ctl_and_exit(&data, &ctl);
                    return;
                }
            }
            while let Ok(c) = ctl.try_recv() {
                self.drain(&data);
                match c {
                    Ctl::Flush(reply) => {
                        let r = self.flush(true);
                        let _ = reply.send(r);
                    }
                    Ctl::Close(reply) => {
                        let r = self.shutdown(&data);
                        let _ = reply.send(r);
                        return;
                    }
                    Ctl::Exec(f) => f(&mut self),
                }
            }
            let now = Instant::now();
            if self.pending() && now >= self.flush_due() && self.flush(false).is_ok() {
                // What the flush ran leaves the resident set until the next.
                crate::memtrim::after_flush();
            }
            if now >= next_retention {
                self.retention_logged();
                next_retention = now + RETENTION_EVERY;
                crate::memtrim::after_flush();
            }
            if self.full.as_ref().is_some_and(|f| now >= f.next_check) {
                self.check_room();
            }
        }
    }

    fn drain_ctl_and_exit(mut self, data: &Receiver<Msg>, ctl: &Receiver<Ctl>) {
        let mut replies = Vec::new();
        while let Ok(c) = ctl.try_recv() {
            match c {
                Ctl::Flush(r) | Ctl::Close(r) => replies.push(r),
                Ctl::Exec(f) => f(&mut self),
            }
        }
        let r = self.shutdown(data);
        let ok = r.is_ok();
        for reply in replies {
            let _ = reply.send(if ok { Ok(()) } else { Err(StoreError::Closed) });
        }
    }

    /// Drains the queue, commits, closes the connection (which checkpoints
    /// the WAL into the database file).
    fn shutdown(mut self, data: &Receiver<Msg>) -> Result<(), StoreError> {
        self.drain(data);
        self.retry_at = None;
        let r = self.flush(true);
        let path = self.path.clone();
        match self.conn.close() {
            Ok(()) => {}
            Err((_, e)) => {
                tracing::warn!(path = %path.display(), error = %e, "store close failed");
            }
        }
        tracing::info!(path = %path.display(), "store closed");
        r
    }

    fn drain(&mut self, data: &Receiver<Msg>) {
        while let Ok(m) = data.try_recv() {
            if let Msg::Features(v) = m {
                self.push(v);
            }
        }
    }

    fn pending(&self) -> bool {
        !self.buf.is_empty() || self.targets_pending()
    }

    fn targets_pending(&self) -> bool {
        match self.targets.lock() {
            Ok(g) => g.is_some(),
            Err(p) => p.into_inner().is_some(),
        }
    }

    fn take_targets(&self) -> Option<Vec<TargetStatus>> {
        match self.targets.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    /// Puts targets back after a failed commit unless newer ones arrived.
    fn restore_targets(&self, t: Vec<TargetStatus>) {
        let mut g = match self.targets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if g.is_none() {
            *g = Some(t);
        }
    }

    fn flush_due(&self) -> Instant {
        let due = self.last_flush + self.limits.flush_interval;
        match self.retry_at {
            Some(r) => due.max(r),
            None => due,
        }
    }

    fn push(&mut self, v: FeatureVector) {
        if v.values.len() != v.names.len() {
            // A bug upstream; storing it would fail this flush and every retry.
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                ts_ms = v.ts_ms,
                values = v.values.len(),
                names = v.names.len(),
                "store dropping a feature vector whose values do not match its names"
            );
            return;
        }
        self.buf.push(v);
        if self.buf.len() > MAX_BUFFERED {
            let excess = self.buf.len() - MAX_BUFFERED;
            self.buf.drain(..excess);
            self.dropped.fetch_add(excess as u64, Ordering::Relaxed);
        }
        let retry_ok = self.retry_at.is_none_or(|r| Instant::now() >= r);
        if (!self.first_flushed || self.buf.len() >= MAX_BATCH) && retry_ok {
            self.first_flushed = true;
            let _ = self.flush(false);
        }
    }

    /// Commits the buffer and the pending targets. `durable`: fsync the WAL
    /// before returning (explicit flush and close).
    pub(super) fn flush(&mut self, durable: bool) -> Result<(), StoreError> {
        let targets = self.take_targets();
        if self.buf.is_empty() && targets.is_none() {
            return Ok(());
        }
        let now = now_ms();
        let buf = std::mem::take(&mut self.buf);
        let started = Instant::now();
        if self.full.is_some() {
            self.shed(FULL_HEADROOM_BYTES);
            self.record_full();
        }
        let result = self.with_room(|w| w.commit(&buf, targets.as_deref(), now, durable));
        self.last_flush = Instant::now();
        match result {
            Ok(rows) => {
                self.retry_at = None;
                if self.failing {
                    self.failing = false;
                    tracing::info!(path = %self.path.display(), "store writes recovered");
                }
                tracing::debug!(
                    vectors = buf.len(),
                    rows,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "store flushed"
                );
                Ok(())
            }
            Err(e) => {
                // Keep the batch for the next attempt.
                let mut kept = buf;
                kept.append(&mut self.buf);
                self.buf = kept;
                if let Some(t) = targets {
                    self.restore_targets(t);
                }
                self.retry_at = Some(Instant::now() + RETRY_AFTER.min(self.limits.flush_interval));
                if !self.failing {
                    self.failing = true;
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        buffered = self.buf.len(),
                        "store commit failed; keeping vectors in memory and retrying"
                    );
                }
                Err(e)
            }
        }
    }

    /// One transaction: feature rows, targets, status. Returns the number of
    /// feature rows written.
    fn commit(
        &mut self,
        buf: &[FeatureVector],
        targets: Option<&[TargetStatus]>,
        now: i64,
        durable: bool,
    ) -> Result<usize, StoreError> {
        // Split into runs of one schema.
        let mut runs: Vec<&[FeatureVector]> = Vec::new();
        let mut start = 0;
        for i in 1..=buf.len() {
            if i == buf.len() || !same_names(&buf[i].names, &buf[start].names) {
                runs.push(&buf[start..i]);
                start = i;
            }
        }
        // Schema ids learnt inside the transaction are remembered only once
        // it commits.
        let mut learnt: Vec<(u64, KnownSchema)> = Vec::new();
        let mut touched: Vec<(i64, i64)> = Vec::new();
        let n_runs = runs.len();
        let mut body = |w: &Writer, tx: &rusqlite::Transaction<'_>| -> Result<(), StoreError> {
            for run in &runs {
                let names = &run[0].names;
                let ts: Vec<i64> = run.iter().map(|v| v.ts_ms).collect();
                let ts_min = ts.iter().copied().min().unwrap_or(0);
                let ts_max = ts.iter().copied().max().unwrap_or(0);
                let hash = names_hash(names);
                let (schema_id, touched_ms) = match w.known(hash, names) {
                    Some(k) => (k.id, k.touched_ms),
                    None => match learnt
                        .iter()
                        .find(|(h, k)| *h == hash && same_names(&k.names, names))
                    {
                        Some((_, k)) => (k.id, k.touched_ms),
                        None => {
                            let id = ensure_schema(tx, hash, names, ts_min)?;
                            learnt.push((
                                hash,
                                KnownSchema {
                                    names: names.clone(),
                                    id,
                                    touched_ms: None,
                                },
                            ));
                            (id, None)
                        }
                    },
                };
                let blob =
                    codec::encode(&ts, run.iter().map(|v| v.values.as_slice()), names.len())?;
                tx.prepare_cached(
                    "INSERT INTO features (ts_first_ms, ts_last_ms, schema_id, n, codec, data)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    ts_min,
                    ts_max,
                    schema_id,
                    run.len() as i64,
                    CODEC_XOR_SHUFFLE_ZSTD,
                    blob
                ])?;
                let stale = touched_ms.is_none_or(|t| ts_max - t >= SIGNALS_TOUCH_EVERY_MS);
                let already = touched.iter().any(|(id, _)| *id == schema_id);
                if stale && !already {
                    tx.prepare_cached(
                        "UPDATE signals SET last_seen_ms = ?1
                         WHERE last_seen_ms < ?1 AND name IN (SELECT value FROM json_each(?2))",
                    )?
                    .execute(params![ts_max, serde_json::to_string(&**names)?])?;
                    touched.push((schema_id, ts_max));
                }
            }
            if let Some(targets) = targets {
                write_targets(tx, targets, &w.written_targets, now)?;
            }
            tx.prepare_cached("UPDATE agent_status SET last_flush_ms = ?1 WHERE id = 1")?
                .execute(params![now])?;
            Ok(())
        };
        let this: &Writer = self;
        if durable {
            schema::durable_transaction(&this.conn, |tx| body(this, tx))?;
        } else {
            let tx =
                rusqlite::Transaction::new_unchecked(&this.conn, TransactionBehavior::Immediate)?;
            body(this, &tx)?;
            tx.commit()?;
        }
        if let Some(targets) = targets {
            remember_targets(&mut self.written_targets, targets, now);
        }
        for (hash, k) in learnt {
            self.schemas.entry(hash).or_default().push(k);
        }
        for (id, ts) in touched {
            if let Some(k) = self.schemas.values_mut().flatten().find(|k| k.id == id) {
                k.touched_ms = Some(ts);
            }
        }
        Ok(n_runs)
    }

    fn known(&self, hash: u64, names: &Arc<[String]>) -> Option<&KnownSchema> {
        self.schemas
            .get(&hash)?
            .iter()
            .find(|k| same_names(&k.names, names))
    }

    fn retention_logged(&mut self) {
        match self.retention(now_ms()) {
            Ok(r) => {
                if r.aged_rows + r.oversize_rows > 0 || r.vacuumed_pages > 0 {
                    tracing::info!(
                        aged_rows = r.aged_rows,
                        aged_vectors = r.aged_vectors,
                        oversize_rows = r.oversize_rows,
                        oversize_vectors = r.oversize_vectors,
                        vacuumed_pages = r.vacuumed_pages,
                        used_bytes = r.used_bytes,
                        "store retention removed old feature batches"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "store retention failed");
            }
        }
    }

    /// Deletes feature rows older than the retention, then the oldest while
    /// the database is over its size limit, then gives free pages back when
    /// there are many.
    pub(super) fn retention(&mut self, now: i64) -> Result<RetentionReport, StoreError> {
        let mut rep = RetentionReport::default();
        let retention_ms = i64::try_from(self.limits.retention.as_millis()).unwrap_or(i64::MAX);
        let cutoff = now.saturating_sub(retention_ms);
        {
            let tx =
                rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
            let (rows, vectors) = delete_returning_n(
                &tx,
                "DELETE FROM features WHERE ts_last_ms < ?1 RETURNING n",
                cutoff,
            )?;
            tx.commit()?;
            rep.aged_rows = rows;
            rep.aged_vectors = vectors;
        }
        loop {
            let used = used_bytes(&self.conn)?;
            rep.used_bytes = used;
            if used <= self.limits.max_db_bytes {
                break;
            }
            let (rows, vectors) = self.delete_oldest()?;
            if rows == 0 {
                tracing::warn!(
                    used_bytes = used,
                    max_db_bytes = self.limits.max_db_bytes,
                    "store over its size limit with no feature batches left to delete"
                );
                break;
            }
            rep.oversize_rows += rows;
            rep.oversize_vectors += vectors;
        }
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let pages: i64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))?;
        // On a full disk the free pages are the room new rows take.
        if self.full.is_none()
            && free > 0
            && free >= self.limits.vacuum_min_free_pages
            && free * VACUUM_MIN_FREE_FRACTION >= pages
        {
            // Each step frees one page: run the statement to completion.
            let mut stmt = self.conn.prepare("PRAGMA incremental_vacuum")?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            let after: i64 = self
                .conn
                .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
            rep.vacuumed_pages = free - after;
        }
        Ok(rep)
    }

    /// Deletes the oldest `SIZE_CHUNK_ROWS` feature batches (one
    /// transaction); returns how many rows and vectors went.
    fn delete_oldest(&self) -> Result<(u64, u64), StoreError> {
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)?;
        let n = delete_returning_n(
            &tx,
            "DELETE FROM features WHERE id IN (SELECT id FROM features ORDER BY id LIMIT ?1)
             RETURNING n",
            SIZE_CHUNK_ROWS,
        )?;
        tx.commit()?;
        Ok(n)
    }

    /// Runs a write; when it fails because the disk is full, makes room
    /// ([`Writer::make_room`]) and runs it again, up to [`FULL_ATTEMPTS`]
    /// times. Every write of the audit trail, the outbox and the guard
    /// state goes through here, and feature flushes too.
    pub(super) fn with_room<T>(
        &mut self,
        mut write: impl FnMut(&mut Writer) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            match write(self) {
                Err(e) if faults::is_disk_full(&e) && attempt < FULL_ATTEMPTS => {
                    self.make_room(attempt);
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    /// Gives SQLite room on a full disk. The first time: releases the
    /// reserve, logs, and checkpoints more often. Every time: checkpoints
    /// (so the WAL is written from its start again) and deletes the oldest
    /// feature batches until `FULL_HEADROOM_BYTES << attempt` is free.
    fn make_room(&mut self, attempt: u32) {
        if self.full.is_none() {
            let released = faults::release_reserve(&self.path);
            tracing::error!(
                path = %self.path.display(),
                released_reserve = released,
                "disk full: deleting the oldest stored features to keep audit rows and events"
            );
            self.full = Some(DiskFull::new(now_ms(), false));
            let _ =
                self.conn
                    .pragma_update(None, "wal_autocheckpoint", FULL_WAL_AUTOCHECKPOINT_FRAMES);
        }
        self.checkpoint();
        self.shed(FULL_HEADROOM_BYTES << attempt.min(8));
        self.record_full();
    }

    /// Puts the full disk in `meta` for `outpost status`, once per episode
    /// (tried again before the next flush if this write fails too).
    fn record_full(&mut self) {
        let Some(f) = &self.full else {
            return;
        };
        if f.recorded {
            return;
        }
        let r = self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![DISK_FULL_KEY, f.since_ms.to_string()],
        );
        match r {
            Ok(_) => {
                if let Some(f) = &mut self.full {
                    f.recorded = true;
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot record the full disk in meta"),
        }
    }

    fn checkpoint(&self) {
        let r = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        if let Err(e) = r {
            tracing::debug!(error = %e, "store checkpoint failed");
        }
    }

    /// Deletes the oldest feature batches until `headroom` bytes of the
    /// database file are free pages, or none are left.
    fn shed(&mut self, headroom: i64) {
        loop {
            let free = self.free_bytes().unwrap_or(0);
            if free >= headroom {
                return;
            }
            match self.delete_oldest() {
                Ok((0, _)) => return,
                Ok((rows, vectors)) => {
                    if let Some(f) = &mut self.full {
                        f.shed_rows += rows;
                        f.shed_vectors += vectors;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "store: cannot delete old features");
                    return;
                }
            }
        }
    }

    fn free_bytes(&self) -> Result<i64, StoreError> {
        let free: i64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let size: i64 = self
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))?;
        Ok(free * size)
    }

    /// While the disk is full: once the file system has room again,
    /// recreates the reserve and leaves the full state (log, `meta`, a
    /// `store.recovered` event).
    pub(super) fn check_room(&mut self) {
        let Some(f) = &mut self.full else {
            return;
        };
        f.next_check = Instant::now() + FULL_RECHECK;
        if !faults::ensure_reserve(&self.path) {
            return;
        }
        let Some(f) = self.full.take() else {
            return;
        };
        let _ = self.conn.pragma_update(
            None,
            "wal_autocheckpoint",
            schema::WAL_AUTOCHECKPOINT_FRAMES,
        );
        if let Err(e) = self.with_room(|w| {
            Ok(w.conn
                .execute("DELETE FROM meta WHERE key = ?1", [DISK_FULL_KEY])?)
        }) {
            tracing::warn!(error = %e, "cannot clear the full disk from meta");
        }
        let full_for_s = (now_ms() - f.since_ms).max(0) / 1000;
        tracing::info!(
            path = %self.path.display(),
            full_for_s,
            shed_rows = f.shed_rows,
            shed_vectors = f.shed_vectors,
            "disk has room again: store writes back to normal"
        );
        let ev = crate::sync::message::EventBody::new(
            crate::sync::message::events::STORE_RECOVERED,
            serde_json::json!({
                "cause": "disk_full",
                "since_ms": f.since_ms,
                "shed_rows": f.shed_rows,
                "shed_vectors": f.shed_vectors,
            }),
        );
        let outbox = self.outbox.clone();
        outbox.post(self, &ev);
    }

    /// Whether the disk is full (for tests).
    #[cfg(test)]
    pub(super) fn disk_full(&self) -> bool {
        self.full.is_some()
    }

    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }
}

fn delete_returning_n(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    arg: i64,
) -> Result<(u64, u64), StoreError> {
    let mut stmt = tx.prepare(sql)?;
    let mut rows = stmt.query(params![arg])?;
    let (mut count, mut vectors) = (0u64, 0u64);
    while let Some(r) = rows.next()? {
        count += 1;
        vectors += r.get::<_, i64>(0)?.max(0) as u64;
    }
    Ok((count, vectors))
}

/// Bytes in pages that hold data: `(page_count - freelist_count) * page_size`.
pub(super) fn used_bytes(conn: &Connection) -> Result<u64, StoreError> {
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let free: i64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    let size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    Ok(((pages - free).max(0) * size) as u64)
}

/// Whether a target's row needs rewriting.
fn target_due(t: &TargetStatus, written: &HashMap<String, (TargetStatus, i64)>, now: i64) -> bool {
    let Some((old, at)) = written.get(&t.name) else {
        return true;
    };
    let probe_key = |s: &TargetStatus| s.probe.as_ref().map(|p| (p.ok, p.error.clone()));
    now - at >= TARGET_REFRESH_MS
        || old.kind != t.kind
        || old.state != t.state
        || old.up != t.up
        || old.detail != t.detail
        || probe_key(old) != probe_key(t)
}

fn write_targets(
    tx: &rusqlite::Transaction<'_>,
    targets: &[TargetStatus],
    written: &HashMap<String, (TargetStatus, i64)>,
    now: i64,
) -> Result<(), StoreError> {
    let mut upsert = tx.prepare_cached(
        "INSERT INTO target_state (name, kind, state, up, detail, probe, ts_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(name) DO UPDATE SET kind = excluded.kind, state = excluded.state,
             up = excluded.up, detail = excluded.detail, probe = excluded.probe,
             ts_ms = excluded.ts_ms",
    )?;
    for t in targets.iter().filter(|t| target_due(t, written, now)) {
        let probe = match &t.probe {
            Some(p) => Some(serde_json::to_string(p)?),
            None => None,
        };
        upsert.execute(params![t.name, t.kind, t.state, t.up, t.detail, probe, now])?;
    }
    let same_set =
        written.len() == targets.len() && targets.iter().all(|t| written.contains_key(&t.name));
    if !same_set {
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        tx.prepare_cached(
            "DELETE FROM target_state WHERE name NOT IN (SELECT value FROM json_each(?1))",
        )?
        .execute(params![serde_json::to_string(&names)?])?;
    }
    Ok(())
}

/// After a commit: what `target_state` now holds.
fn remember_targets(
    written: &mut HashMap<String, (TargetStatus, i64)>,
    targets: &[TargetStatus],
    now: i64,
) {
    let due: Vec<bool> = targets
        .iter()
        .map(|t| target_due(t, written, now))
        .collect();
    written.retain(|name, _| targets.iter().any(|t| &t.name == name));
    for (t, due) in targets.iter().zip(due) {
        if due {
            written.insert(t.name.clone(), (t.clone(), now));
        }
    }
}

/// Finds or creates the schema row for `names` (and the catalog rows of its
/// signals). A hash collision with a different name list gets a suffixed key.
fn ensure_schema(
    tx: &rusqlite::Transaction<'_>,
    hash: u64,
    names: &Arc<[String]>,
    ts_ms: i64,
) -> Result<i64, StoreError> {
    let json = serde_json::to_string(&**names)?;
    for salt in 0u32.. {
        let key = if salt == 0 {
            format!("{hash:016x}")
        } else {
            format!("{hash:016x}-{salt}")
        };
        let found: Option<(i64, String)> = tx
            .prepare_cached("SELECT id, names FROM feature_schemas WHERE hash = ?1")?
            .query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        match found {
            Some((id, stored)) if stored == json => return Ok(id),
            Some(_) => continue,
            None => {
                let mut sig = tx.prepare_cached(
                    "INSERT INTO signals (name, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?2)
                     ON CONFLICT(name) DO NOTHING",
                )?;
                for n in names.iter() {
                    sig.execute(params![n, ts_ms])?;
                }
                tx.prepare_cached("INSERT INTO feature_schemas (hash, names) VALUES (?1, ?2)")?
                    .execute(params![key, json])?;
                let id = tx.last_insert_rowid();
                tracing::info!(
                    schema_id = id,
                    features = names.len(),
                    "store: new feature schema"
                );
                return Ok(id);
            }
        }
    }
    Err(StoreError::Corrupt {
        id: 0,
        reason: "feature schema hash space exhausted".into(),
    })
}

fn same_names(a: &Arc<[String]>, b: &Arc<[String]>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// FNV-1a 64 over the names, each followed by a 0 byte: stable across
/// builds (unlike `DefaultHasher`), so it can be stored.
pub(super) fn names_hash(names: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for n in names {
        for b in n.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
