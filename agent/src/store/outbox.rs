//! The outbox: every message the node publishes is a row here before it is
//! published, numbered with the node's `seq` (kept in `meta`, so it grows
//! across restarts and `kill -9`), and deleted when the broker acknowledges
//! it. The uplink publishes rows in `seq` order and republishes whatever is
//! left after a reconnect; the table is the source of truth, not the MQTT
//! client's memory.
//!
//! Bounded by `[mqtt] outbox_max_rows`: when full, the oldest summary goes
//! first, then the oldest state, then the oldest reply, and an event only
//! when nothing else is left (an incoming message of a kind ranked below
//! everything left is itself dropped). What was dropped is counted in
//! `meta` and reported in the next state message's `dropped`.
//!
//! Events and replies commit with `synchronous = FULL` (like audit rows);
//! states and summaries with `NORMAL` (a power cut may lose the last one, a
//! newer one follows). Acknowledged rows are deleted in batches with
//! `NORMAL`: a lost delete means one duplicate publish, never a lost row.
//!
//! The seq never goes back, not even when a corrupt store is replaced by a
//! fresh one ([`raise_seq`]): consumers deduplicate on (node, seq).
//!
//! These functions take a connection or a transaction so the audit trail
//! and incidents can enqueue their event in the same transaction as their
//! row; the [`Store`](super::Store) methods at the end run them on the
//! writer thread.

use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use super::schema::durable_transaction;
use super::writer::Writer;
use super::{now_ms, Store, StoreError};
use crate::sync::message::{Dropped, EventBody, Kind, Message, SummaryCounts, Topics};

const SEQ_KEY: &str = "outbox_seq";
const DROPPED_KEY: &str = "outbox_dropped";

/// Which node the outbox writes for and how big it may grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    pub topics: Topics,
    pub max_rows: u64,
}

impl OutboxConfig {
    pub fn new(topic_prefix: &str, node: &str, max_rows: u64) -> OutboxConfig {
        OutboxConfig {
            topics: Topics::new(topic_prefix, node),
            max_rows: max_rows.max(1),
        }
    }
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: u64,
    pub kind: Kind,
    pub topic: String,
    pub retained: bool,
    /// The JSON message, exactly as published.
    pub payload: Vec<u8>,
}

/// What [`enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Stored with this seq.
    Stored(u64),
    /// The outbox was full of rows that rank above this message: dropped
    /// (and counted).
    Dropped,
}

fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()?)
}

fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// The last seq handed out (0 before the first message).
pub fn last_seq(conn: &Connection) -> Result<u64, StoreError> {
    Ok(meta_get(conn, SEQ_KEY)?
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

/// Makes the next seq handed out greater than `at_least` (a fresh store
/// that replaces a corrupt one, whose last seq is lost, starts from the
/// wall clock in milliseconds: above anything the old store can have used
/// at one message per millisecond or less).
pub fn raise_seq(conn: &Connection, at_least: u64) -> Result<(), StoreError> {
    if last_seq(conn)? < at_least {
        meta_set(conn, SEQ_KEY, &at_least.to_string())?;
    }
    Ok(())
}

/// What was dropped since the last state message.
pub fn dropped(conn: &Connection) -> Result<Dropped, StoreError> {
    Ok(meta_get(conn, DROPPED_KEY)?
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default())
}

fn set_dropped(conn: &Connection, d: &Dropped) -> Result<(), StoreError> {
    meta_set(conn, DROPPED_KEY, &serde_json::to_string(d)?)
}

/// Rows in the outbox.
pub fn len(conn: &Connection) -> Result<u64, StoreError> {
    let n: i64 = conn
        .prepare_cached("SELECT count(*) FROM outbox")?
        .query_row([], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

const KINDS_BY_DROP_RANK: [Kind; 4] = [Kind::Summary, Kind::State, Kind::Reply, Kind::Event];

/// Writes one message inside `tx`: makes room by the drop rule, takes the
/// next seq, fills a state's `dropped` (and zeroes the count), inserts.
pub fn enqueue(
    tx: &Transaction<'_>,
    cfg: &OutboxConfig,
    kind: Kind,
    ts_ms: i64,
    mut body: serde_json::Value,
) -> Result<Enqueued, StoreError> {
    let mut n = len(tx)?;
    let mut dropped_now = Dropped::default();
    let mut refused = false;
    while n >= cfg.max_rows {
        let mut victim = None;
        for k in KINDS_BY_DROP_RANK {
            if k.drop_rank() > kind.drop_rank() {
                break;
            }
            let seq: Option<i64> = tx
                .prepare_cached("SELECT seq FROM outbox WHERE kind = ?1 ORDER BY seq LIMIT 1")?
                .query_row([k.as_str()], |r| r.get(0))
                .optional()?;
            if let Some(s) = seq {
                victim = Some((k, s));
                break;
            }
        }
        match victim {
            Some((k, s)) => {
                tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?
                    .execute([s])?;
                dropped_now.add(k, 1);
                n -= 1;
            }
            None => {
                // Everything left ranks above this message.
                dropped_now.add(kind, 1);
                refused = true;
                break;
            }
        }
    }
    let mut dropped_total = dropped(tx)?;
    if dropped_now.total() > 0 {
        dropped_total.add(Kind::Summary, dropped_now.summaries);
        dropped_total.add(Kind::State, dropped_now.states);
        dropped_total.add(Kind::Reply, dropped_now.replies);
        dropped_total.add(Kind::Event, dropped_now.events);
        set_dropped(tx, &dropped_total)?;
        tracing::warn!(
            summaries = dropped_now.summaries,
            states = dropped_now.states,
            replies = dropped_now.replies,
            events = dropped_now.events,
            max_rows = cfg.max_rows,
            "outbox full: dropped messages"
        );
    }
    if refused {
        return Ok(Enqueued::Dropped);
    }
    if kind == Kind::State {
        if let serde_json::Value::Object(m) = &mut body {
            m.insert("dropped".into(), serde_json::to_value(dropped_total)?);
        }
        if dropped_total.total() > 0 {
            set_dropped(tx, &Dropped::default())?;
        }
    }
    let seq = last_seq(tx)? + 1;
    meta_set(tx, SEQ_KEY, &seq.to_string())?;
    let msg = Message::new(kind, &cfg.topics.node, Some(seq), ts_ms, body);
    let payload = msg.to_bytes()?;
    tx.prepare_cached(
        "INSERT INTO outbox (seq, kind, topic, retained, payload, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        seq as i64,
        kind.as_str(),
        cfg.topics.outgoing(kind),
        kind.retained(),
        payload,
        ts_ms
    ])?;
    Ok(Enqueued::Stored(seq))
}

/// [`enqueue`] in its own transaction: durable for events and replies.
pub fn enqueue_one(
    conn: &Connection,
    cfg: &OutboxConfig,
    kind: Kind,
    ts_ms: i64,
    body: serde_json::Value,
) -> Result<Enqueued, StoreError> {
    match kind {
        Kind::Event | Kind::Reply => {
            durable_transaction(conn, |tx| enqueue(tx, cfg, kind, ts_ms, body))
        }
        Kind::State | Kind::Summary => {
            let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
            let r = enqueue(&tx, cfg, kind, ts_ms, body)?;
            tx.commit()?;
            Ok(r)
        }
    }
}

/// Up to `limit` rows with `seq >= from`, in seq order.
pub fn pending(conn: &Connection, from: u64, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, kind, topic, retained, payload FROM outbox
         WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![from as i64, limit as i64], |r| {
            let kind: String = r.get(1)?;
            Ok((
                r.get::<_, i64>(0)?,
                kind,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(seq, kind, topic, retained, payload)| {
            Some(OutboxRow {
                seq: seq as u64,
                kind: Kind::parse(&kind)?,
                topic,
                retained,
                payload,
            })
        })
        .collect())
}

/// Deletes acknowledged rows (one `NORMAL` transaction).
pub fn ack(conn: &Connection, seqs: &[u64]) -> Result<usize, StoreError> {
    if seqs.is_empty() {
        return Ok(0);
    }
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let n = tx
        .prepare_cached("DELETE FROM outbox WHERE seq IN (SELECT value FROM json_each(?1))")?
        .execute([serde_json::to_string(seqs)?])?;
    tx.commit()?;
    Ok(n)
}

/// What the store shares with the uplink: whether the outbox is on, the
/// wake-up for the publisher, counts for the next summary.
#[derive(Default)]
pub(super) struct OutboxShared {
    cfg: Mutex<Option<OutboxConfig>>,
    notify: Arc<tokio::sync::Notify>,
    counts: Mutex<SummaryCounts>,
    /// Events from before the outbox was configured (a store recovered at
    /// open), posted when it is.
    held: Mutex<Vec<EventBody>>,
}

impl OutboxShared {
    pub(super) fn config(&self) -> Option<OutboxConfig> {
        self.cfg.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps `ev` until the outbox is configured.
    pub(super) fn hold(&self, ev: EventBody) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).push(ev);
    }

    /// Enqueues `ev` on the writer thread (its own durable transaction,
    /// making room on a full disk) when the outbox is on. Errors are logged.
    pub(super) fn post(&self, w: &mut Writer, ev: &EventBody) {
        let Some(cfg) = self.config() else {
            return;
        };
        let body = match serde_json::to_value(ev) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode event");
                return;
            }
        };
        match w.with_room(|w| enqueue_one(w.conn(), &cfg, Kind::Event, now_ms(), body.clone())) {
            Ok(Enqueued::Stored(_)) => self.stored(Kind::Event, Some(&ev.event)),
            Ok(Enqueued::Dropped) => {}
            Err(e) => tracing::warn!(event = %ev.event, error = %e, "cannot enqueue event"),
        }
    }

    /// After a commit that stored `kind`: wake the publisher, count it.
    pub(super) fn stored(&self, kind: Kind, event: Option<&str>) {
        if kind == Kind::Event {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            c.events += 1;
            match event {
                Some(e) if e == crate::sync::message::events::INCIDENT_OPENED => {
                    c.incidents_opened += 1
                }
                Some(e) if e == crate::sync::message::events::INCIDENT_CLOSED => {
                    c.incidents_closed += 1
                }
                Some(e) if e.starts_with("action.") => c.actions += 1,
                _ => {}
            }
        }
        self.notify.notify_one();
    }
}

/// Enqueues `ev` in `tx` when the outbox is on; returns whether it was
/// stored (the caller reports it after the commit).
pub(super) fn event_in(
    tx: &Transaction<'_>,
    cfg: Option<&OutboxConfig>,
    ev: &EventBody,
    ts_ms: i64,
) -> Result<bool, StoreError> {
    let Some(cfg) = cfg else {
        return Ok(false);
    };
    Ok(matches!(
        enqueue(tx, cfg, Kind::Event, ts_ms, serde_json::to_value(ev)?)?,
        Enqueued::Stored(_)
    ))
}

impl Store {
    /// Turns the outbox on (the uplink does, at start) or off. While it is
    /// off, nothing is enqueued: events are not kept for an uplink that is
    /// not configured.
    pub fn configure_outbox(&self, cfg: Option<OutboxConfig>) {
        let on = cfg.is_some();
        *self
            .shared
            .outbox
            .cfg
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = cfg;
        if on {
            let held = std::mem::take(
                &mut *self
                    .shared
                    .outbox
                    .held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            for ev in held {
                self.post_event(ev);
            }
        }
    }

    pub fn outbox_config(&self) -> Option<OutboxConfig> {
        self.shared.outbox.config()
    }

    /// Notified after every message stored (the publisher waits on it).
    pub fn outbox_notify(&self) -> Arc<tokio::sync::Notify> {
        self.shared.outbox.notify.clone()
    }

    /// The event counts since the last call (for a summary's `counts`).
    pub fn take_outbox_counts(&self) -> SummaryCounts {
        std::mem::take(
            &mut *self
                .shared
                .outbox
                .counts
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Writes one message; `Ok(None)` when the outbox is off.
    pub async fn enqueue(
        &self,
        kind: Kind,
        body: serde_json::Value,
    ) -> Result<Option<Enqueued>, StoreError> {
        let Some(cfg) = self.outbox_config() else {
            return Ok(None);
        };
        let event = body
            .get("event")
            .and_then(|e| e.as_str())
            .map(str::to_string);
        let r = self
            .exec(move |w| {
                w.with_room(|w| enqueue_one(w.conn(), &cfg, kind, now_ms(), body.clone()))
            })
            .await??;
        if matches!(r, Enqueued::Stored(_)) {
            self.shared.outbox.stored(kind, event.as_deref());
        }
        Ok(Some(r))
    }

    /// Enqueues an event without waiting (for callers that must not wait
    /// on the disk: detection, model lifecycle). Errors are logged.
    pub fn post_event(&self, ev: EventBody) {
        if self.outbox_config().is_none() {
            return;
        }
        let shared = self.shared.outbox.clone();
        let r = self.control(super::Ctl::Exec(Box::new(move |w| shared.post(w, &ev))));
        if r.is_err() {
            tracing::warn!("store closed: event not enqueued");
        }
    }

    /// Up to `limit` rows with `seq >= from`, in seq order.
    pub async fn outbox_pending(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        self.exec(move |w| pending(w.conn(), from, limit)).await?
    }

    /// Deletes acknowledged rows.
    pub async fn outbox_ack(&self, seqs: Vec<u64>) -> Result<usize, StoreError> {
        self.exec(move |w| w.with_room(|w| ack(w.conn(), &seqs)))
            .await?
    }

    /// Rows waiting, the last seq handed out, and what was dropped since
    /// the last state.
    pub async fn outbox_stats(&self) -> Result<(u64, u64, Dropped), StoreError> {
        self.exec(|w| Ok((len(w.conn())?, last_seq(w.conn())?, dropped(w.conn())?)))
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = super::super::schema::open_rw(&dir.path().join("a.db")).expect("open");
        (dir, c)
    }

    fn cfg(max: u64) -> OutboxConfig {
        OutboxConfig::new("outpost/v1", "n1", max)
    }

    fn put(c: &Connection, cfg: &OutboxConfig, kind: Kind) -> Enqueued {
        enqueue_one(c, cfg, kind, 1, serde_json::json!({"k": kind.as_str()})).expect("enqueue")
    }

    fn kinds(c: &Connection) -> Vec<(u64, Kind)> {
        pending(c, 0, 1000)
            .expect("pending")
            .into_iter()
            .map(|r| (r.seq, r.kind))
            .collect()
    }

    #[test]
    fn rows_come_back_in_seq_order_with_their_topic() {
        let (_d, c) = conn();
        let cfg = cfg(100);
        for k in [Kind::State, Kind::Event, Kind::Summary, Kind::Reply] {
            put(&c, &cfg, k);
        }
        let rows = pending(&c, 0, 10).expect("pending");
        assert_eq!(
            rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(rows[0].topic, "outpost/v1/nodes/n1/state");
        assert!(rows[0].retained && !rows[1].retained);
        assert_eq!(rows[1].topic, "outpost/v1/nodes/n1/events");
        let m: Message = serde_json::from_slice(&rows[2].payload).expect("message");
        assert_eq!(
            (m.seq, m.kind, m.node.as_str()),
            (Some(3), Kind::Summary, "n1")
        );
        // A window from the middle.
        let rows = pending(&c, 3, 1).expect("pending");
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3]);
        // Acked rows leave; the rest keep their order.
        assert_eq!(ack(&c, &[1, 3]).expect("ack"), 2);
        assert_eq!(kinds(&c), vec![(2, Kind::Event), (4, Kind::Reply)]);
    }

    #[test]
    fn seq_survives_reopen_and_emptying() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.db");
        let cfg = cfg(100);
        {
            let c = super::super::schema::open_rw(&path).expect("open");
            for _ in 0..3 {
                put(&c, &cfg, Kind::Event);
            }
            ack(&c, &[1, 2, 3]).expect("ack");
            assert_eq!(len(&c).expect("len"), 0);
            // Dropped without a clean close, like kill -9.
            std::mem::forget(c);
        }
        let c = super::super::schema::open_rw(&path).expect("reopen");
        assert_eq!(last_seq(&c).expect("seq"), 3);
        assert_eq!(put(&c, &cfg, Kind::Event), Enqueued::Stored(4));
    }

    #[test]
    fn full_outbox_drops_summaries_first_then_states_replies_events() {
        let (_d, c) = conn();
        let cfg = cfg(4);
        put(&c, &cfg, Kind::Event); // 1
        put(&c, &cfg, Kind::Summary); // 2
        put(&c, &cfg, Kind::Reply); // 3
        put(&c, &cfg, Kind::Summary); // 4
                                      // Full: the oldest summary goes.
        put(&c, &cfg, Kind::Event); // 5
        assert_eq!(
            kinds(&c),
            vec![
                (1, Kind::Event),
                (3, Kind::Reply),
                (4, Kind::Summary),
                (5, Kind::Event)
            ]
        );
        put(&c, &cfg, Kind::Event); // 6: summary 4 goes
        put(&c, &cfg, Kind::Event); // 7: then the reply
        assert_eq!(
            kinds(&c),
            vec![
                (1, Kind::Event),
                (5, Kind::Event),
                (6, Kind::Event),
                (7, Kind::Event)
            ]
        );
        // Only events left: a summary is itself dropped, an event pushes
        // out the oldest event.
        assert_eq!(put(&c, &cfg, Kind::Summary), Enqueued::Dropped);
        assert_eq!(put(&c, &cfg, Kind::Event), Enqueued::Stored(8));
        assert_eq!(
            kinds(&c).iter().map(|k| k.0).collect::<Vec<_>>(),
            vec![5, 6, 7, 8]
        );
        assert_eq!(
            dropped(&c).expect("dropped"),
            Dropped {
                summaries: 3,
                states: 0,
                replies: 1,
                events: 1
            }
        );
        // A state ranks below events: still full, so it is dropped too.
        assert_eq!(put(&c, &cfg, Kind::State), Enqueued::Dropped);
        // Once there is room, the next state reports every drop and resets
        // the count.
        ack(&c, &[5]).expect("ack");
        assert_eq!(put(&c, &cfg, Kind::State), Enqueued::Stored(9));
        let rows = pending(&c, 9, 1).expect("pending");
        let m: Message = serde_json::from_slice(&rows[0].payload).expect("message");
        assert_eq!(
            m.body["dropped"],
            serde_json::json!({"summaries": 3, "states": 1, "replies": 1, "events": 1})
        );
        assert_eq!(dropped(&c).expect("dropped"), Dropped::default());
    }

    #[test]
    fn never_more_rows_than_the_bound() {
        let (_d, c) = conn();
        let cfg = cfg(16);
        let order = [
            Kind::Event,
            Kind::Summary,
            Kind::State,
            Kind::Reply,
            Kind::Summary,
        ];
        for i in 0..200 {
            put(&c, &cfg, order[i % order.len()]);
            assert!(len(&c).expect("len") <= 16);
        }
        // Events were never dropped while anything else was there.
        let left = kinds(&c);
        assert!(left.iter().all(|(_, k)| *k == Kind::Event), "{left:?}");
    }

    #[tokio::test]
    async fn audit_rows_and_incidents_enqueue_their_events_when_the_outbox_is_on() {
        use crate::store::audit::AuditEntry;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = crate::config::Config::builtin();
        cfg.agent.state_dir = dir.path().to_path_buf();
        let store = Store::open(&cfg).expect("open");
        let entry = |decision: &str| AuditEntry {
            ts_ms: 1,
            decision_id: 1,
            rule: Some("r".into()),
            target: "web".into(),
            action: "restart".into(),
            decision: decision.into(),
            reason: "cooldown".into(),
            detail: serde_json::Value::Null,
        };
        // Off: nothing is kept for an uplink that is not configured.
        store.audit(entry("acted")).await.expect("audit");
        assert_eq!(store.outbox_stats().await.expect("stats").0, 0);

        store.configure_outbox(Some(OutboxConfig::new("p", "n1", 100)));
        store.audit(entry("suppressed")).await.expect("audit");
        let id = store
            .open_incident(
                "web".into(),
                5,
                0.9,
                serde_json::json!({"detector": "baseline"}),
            )
            .await
            .expect("open");
        store.close_incident(id, 9).await.expect("close");
        store.post_event(EventBody::new(
            crate::sync::message::events::MODEL_PROMOTED,
            serde_json::json!({"label": "m@1"}),
        ));
        store.flush().await.expect("flush");
        let rows = store.outbox_pending(0, 10).await.expect("pending");
        let names: Vec<String> = rows
            .iter()
            .map(|r| {
                let m: Message = serde_json::from_slice(&r.payload).expect("message");
                m.body["event"].as_str().expect("event").to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "action.suppressed",
                "incident.opened",
                "incident.closed",
                "model.promoted"
            ]
        );
        let m: Message = serde_json::from_slice(&rows[0].payload).expect("message");
        assert_eq!(m.body["guard"], "cooldown");
        let c = store.take_outbox_counts();
        assert_eq!(
            (c.events, c.actions, c.incidents_opened, c.incidents_closed),
            (4, 1, 1, 1)
        );
        store.close().await.expect("close");
    }
}
