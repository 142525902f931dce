//! The audit trail: every decision (acted, suggested, awaiting approval,
//! expired, suppressed and by which guard, verified or not) is one row of the
//! append-only `actions` table. Rows are hash-chained: each stores the
//! SHA-256 of its own content and of the previous row's hash, and `meta`
//! keeps the head, so an edited, deleted or truncated row breaks the chain
//! that [`verify_chain`] walks.
//!
//! Incidents (an episode of a rule's condition or of an anomaly) live in
//! `incidents`, opened and closed by the pipeline.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::outbox::event_in;
use super::schema::durable_transaction;
use super::{Store, StoreError};
use crate::sync::message::{events, EventBody, Kind};

/// The hash a chain starts from.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HEAD_KEY: &str = "audit_head";

/// One decision, as the pipeline records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub ts_ms: i64,
    /// The decision this row is about; several rows share one (awaiting
    /// approval, then acted, then verified).
    pub decision_id: u64,
    pub rule: Option<String>,
    pub target: String,
    /// `restart`, `exec:NAME`, …
    pub action: String,
    /// `acted`, `suggested`, `awaiting_approval`, `approved`, `denied`,
    /// `expired`, `suppressed`, `action_failed`, `verify_ok`,
    /// `verify_failed`, `escalated`.
    pub decision: String,
    /// Why, in words an operator reads: which guard, what the actuator said.
    pub reason: String,
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// A stored row: the entry with its place in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    pub id: i64,
    #[serde(flatten)]
    pub entry: AuditEntry,
    pub prev_hash: String,
    pub hash: String,
}

/// What [`verify_chain`] found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChainReport {
    pub rows: u64,
    pub ok: bool,
    /// The first problem: the row id (or the head) and what is wrong.
    pub problem: Option<String>,
}

fn row_hash(id: i64, e: &AuditEntry, prev: &str) -> String {
    // A fixed field order; serde_json::Value prints object keys sorted.
    let canonical = serde_json::json!([
        id,
        e.ts_ms,
        e.decision_id,
        e.rule,
        e.target,
        e.action,
        e.decision,
        e.reason,
        e.detail,
        prev
    ]);
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Appends one row in its own durable (synchronous=FULL) transaction.
pub fn append(conn: &Connection, entry: &AuditEntry) -> Result<AuditRow, StoreError> {
    durable_transaction(conn, |tx| append_in(tx, entry))
}

/// Appends one row inside `tx` (with its outbox event, say).
pub fn append_in(
    tx: &rusqlite::Transaction<'_>,
    entry: &AuditEntry,
) -> Result<AuditRow, StoreError> {
    {
        let last: Option<(i64, String)> = tx
            .query_row(
                "SELECT id, hash FROM actions ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (id, prev) = match last {
            Some((id, hash)) => (id + 1, hash),
            None => (1, GENESIS.to_string()),
        };
        let hash = row_hash(id, entry, &prev);
        tx.execute(
            "INSERT INTO actions (id, ts_ms, decision_id, rule, target, action, decision, reason, detail, prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                id,
                entry.ts_ms,
                entry.decision_id as i64,
                entry.rule,
                entry.target,
                entry.action,
                entry.decision,
                entry.reason,
                serde_json::to_string(&entry.detail)?,
                prev,
                hash
            ],
        )?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![HEAD_KEY, format!("{id}:{hash}")],
        )?;
        Ok(AuditRow {
            id,
            entry: entry.clone(),
            prev_hash: prev,
            hash,
        })
    }
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRow> {
    let detail: Option<String> = r.get(8)?;
    Ok(AuditRow {
        id: r.get(0)?,
        entry: AuditEntry {
            ts_ms: r.get(1)?,
            decision_id: r.get::<_, i64>(2)? as u64,
            rule: r.get(3)?,
            target: r.get(4)?,
            action: r.get(5)?,
            decision: r.get(6)?,
            reason: r.get(7)?,
            detail: detail
                .and_then(|d| serde_json::from_str(&d).ok())
                .unwrap_or(serde_json::Value::Null),
        },
        prev_hash: r.get(9)?,
        hash: r.get(10)?,
    })
}

const SELECT: &str = "SELECT id, ts_ms, decision_id, rule, target, action, decision, reason, detail, prev_hash, hash FROM actions";

/// The newest `limit` rows, oldest first.
pub fn recent(conn: &Connection, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT * FROM ({SELECT} ORDER BY id DESC LIMIT ?1) ORDER BY id"
    ))?;
    let rows = stmt
        .query_map([limit], read_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Walks the whole chain: every row's hash must match its content and the
/// previous row's hash, ids must be contiguous, and the last row must be the
/// head recorded in `meta`.
pub fn verify_chain(conn: &Connection) -> Result<ChainReport, StoreError> {
    let mut stmt = conn.prepare(&format!("{SELECT} ORDER BY id"))?;
    let mut rows = stmt.query([])?;
    let mut prev = GENESIS.to_string();
    let mut expected_id = 1i64;
    let mut n = 0u64;
    let fail = |n, why: String| ChainReport {
        rows: n,
        ok: false,
        problem: Some(why),
    };
    while let Some(r) = rows.next()? {
        let row = read_row(r)?;
        n += 1;
        if row.id != expected_id {
            return Ok(fail(
                n,
                format!("row {expected_id} is missing (next row is {})", row.id),
            ));
        }
        if row.prev_hash != prev {
            return Ok(fail(
                n,
                format!("row {}: previous-hash link broken", row.id),
            ));
        }
        if row_hash(row.id, &row.entry, &row.prev_hash) != row.hash {
            return Ok(fail(
                n,
                format!("row {}: content does not match its hash (edited)", row.id),
            ));
        }
        prev = row.hash;
        expected_id += 1;
    }
    let head: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [HEAD_KEY], |r| {
            r.get(0)
        })
        .optional()?;
    let last = format!("{}:{}", expected_id - 1, prev);
    match head {
        None if n == 0 => {}
        Some(h) if h == last => {}
        Some(h) => {
            return Ok(fail(
                n,
                format!(
                    "the chain ends at row {} but its head says {h} (rows removed from the end)",
                    expected_id - 1
                ),
            ))
        }
        None => return Ok(fail(n, "the chain's head record is missing".into())),
    }
    Ok(ChainReport {
        rows: n,
        ok: true,
        problem: None,
    })
}

/// An incident: an episode of a rule's condition or of an anomaly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub id: i64,
    pub target: String,
    pub opened_ms: i64,
    pub closed_ms: Option<i64>,
    pub score: f64,
    pub explanation: serde_json::Value,
}

fn insert_incident(
    tx: &rusqlite::Transaction<'_>,
    target: &str,
    opened_ms: i64,
    score: f64,
    explanation: &serde_json::Value,
) -> Result<i64, StoreError> {
    tx.execute(
        "INSERT INTO incidents (target, opened_ms, score, explanation) VALUES (?1, ?2, ?3, ?4)",
        params![
            target,
            opened_ms,
            score,
            serde_json::to_string(explanation)?
        ],
    )?;
    Ok(tx.last_insert_rowid())
}

fn incident_by_id(conn: &Connection, id: i64) -> Result<Option<Incident>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT id, target, opened_ms, closed_ms, score, explanation FROM incidents WHERE id = ?1",
            [id],
            |r| {
                let e: String = r.get(5)?;
                Ok(Incident {
                    id: r.get(0)?,
                    target: r.get(1)?,
                    opened_ms: r.get(2)?,
                    closed_ms: r.get(3)?,
                    score: r.get(4)?,
                    explanation: serde_json::from_str(&e).unwrap_or(serde_json::Value::Null),
                })
            },
        )
        .optional()?)
}

pub fn open_incident(
    conn: &Connection,
    target: &str,
    opened_ms: i64,
    score: f64,
    explanation: &serde_json::Value,
) -> Result<i64, StoreError> {
    durable_transaction(conn, |tx| {
        tx.execute(
            "INSERT INTO incidents (target, opened_ms, score, explanation) VALUES (?1, ?2, ?3, ?4)",
            params![
                target,
                opened_ms,
                score,
                serde_json::to_string(explanation)?
            ],
        )?;
        Ok(tx.last_insert_rowid())
    })
}

pub fn close_incident(conn: &Connection, id: i64, closed_ms: i64) -> Result<(), StoreError> {
    durable_transaction(conn, |tx| {
        tx.execute(
            "UPDATE incidents SET closed_ms = MAX(?2, opened_ms) WHERE id = ?1 AND closed_ms IS NULL",
            params![id, closed_ms],
        )?;
        Ok(())
    })
}

/// Closes every incident a detector opened that is still open (a restart
/// starts the detectors afresh); returns how many.
pub fn close_detector_incidents(conn: &Connection, closed_ms: i64) -> Result<usize, StoreError> {
    durable_transaction(conn, |tx| {
        Ok(tx.execute(
            "UPDATE incidents SET closed_ms = MAX(?1, opened_ms)
             WHERE closed_ms IS NULL AND json_extract(explanation, '$.detector') IS NOT NULL",
            params![closed_ms],
        )?)
    })
}

/// The newest `limit` incidents, oldest first.
pub fn incidents(conn: &Connection, limit: u32) -> Result<Vec<Incident>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT * FROM (SELECT id, target, opened_ms, closed_ms, score, explanation
         FROM incidents ORDER BY id DESC LIMIT ?1) ORDER BY id",
    )?;
    let rows = stmt
        .query_map([limit], |r| {
            let e: String = r.get(5)?;
            Ok(Incident {
                id: r.get(0)?,
                target: r.get(1)?,
                opened_ms: r.get(2)?,
                closed_ms: r.get(3)?,
                score: r.get(4)?,
                explanation: serde_json::from_str(&e).unwrap_or(serde_json::Value::Null),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Saves a piece of guard state (JSON) durably: budgets and cooldowns must
/// survive a restart so a restarted agent cannot act more than its policy
/// allows.
pub fn save_guard(conn: &Connection, key: &str, json: &str, now_ms: i64) -> Result<(), StoreError> {
    durable_transaction(conn, |tx| {
        tx.execute(
            "INSERT INTO guard_state (key, value, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
            params![key, json, now_ms],
        )?;
        Ok(())
    })
}

pub fn load_guard(conn: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM guard_state WHERE key = ?1", [key], |r| {
            r.get(0)
        })
        .optional()?)
}

impl super::Reader {
    /// The newest `limit` audit rows, oldest first.
    pub fn actions(&self, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        recent(&self.conn, limit)
    }

    pub fn verify_chain(&self) -> Result<ChainReport, StoreError> {
        verify_chain(&self.conn)
    }

    /// The newest `limit` incidents, oldest first.
    pub fn incidents(&self, limit: u32) -> Result<Vec<Incident>, StoreError> {
        incidents(&self.conn, limit)
    }
}

impl Store {
    /// Appends an audit row; resolves once it is durably on disk.
    ///
    /// With the outbox on, the row's event (`action.*`) is written in the
    /// same transaction: an action the audit knows about is never missing
    /// from the uplink.
    pub async fn audit(&self, entry: AuditEntry) -> Result<AuditRow, StoreError> {
        let cfg = self.outbox_config();
        let (row, queued) = self
            .exec(move |w| {
                w.with_room(|w| {
                    durable_transaction(w.conn(), |tx| {
                        let row = append_in(tx, &entry)?;
                        let queued = match EventBody::from_audit(&row) {
                            Some(ev) => event_in(tx, cfg.as_ref(), &ev, row.entry.ts_ms)?
                                .then_some(ev.event),
                            None => None,
                        };
                        Ok((row, queued))
                    })
                })
            })
            .await??;
        if let Some(name) = queued {
            self.shared.outbox.stored(Kind::Event, Some(&name));
        }
        Ok(row)
    }

    pub async fn open_incident(
        &self,
        target: String,
        opened_ms: i64,
        score: f64,
        explanation: serde_json::Value,
    ) -> Result<i64, StoreError> {
        let cfg = self.outbox_config();
        let (id, queued) = self
            .exec(move |w| {
                w.with_room(|w| {
                    durable_transaction(w.conn(), |tx| {
                        let id = insert_incident(tx, &target, opened_ms, score, &explanation)?;
                        let inc = Incident {
                            id,
                            target: target.clone(),
                            opened_ms,
                            closed_ms: None,
                            score,
                            explanation: explanation.clone(),
                        };
                        let ev = EventBody::incident(events::INCIDENT_OPENED, &inc);
                        Ok((id, event_in(tx, cfg.as_ref(), &ev, opened_ms)?))
                    })
                })
            })
            .await??;
        if queued {
            self.shared
                .outbox
                .stored(Kind::Event, Some(events::INCIDENT_OPENED));
        }
        Ok(id)
    }

    pub async fn close_detector_incidents(&self, closed_ms: i64) -> Result<usize, StoreError> {
        self.exec(move |w| w.with_room(|w| close_detector_incidents(w.conn(), closed_ms)))
            .await?
    }

    pub async fn close_incident(&self, id: i64, closed_ms: i64) -> Result<(), StoreError> {
        let cfg = self.outbox_config();
        let queued = self
            .exec(move |w| {
                w.with_room(|w| {
                    durable_transaction(w.conn(), |tx| {
                        let n = tx.execute(
                        "UPDATE incidents SET closed_ms = MAX(?2, opened_ms) WHERE id = ?1 AND closed_ms IS NULL",
                        params![id, closed_ms],
                    )?;
                        if n == 0 {
                            return Ok(false);
                        }
                        let inc = incident_by_id(tx, id)?;
                        match inc {
                            Some(inc) => {
                                let ev = EventBody::incident(events::INCIDENT_CLOSED, &inc);
                                event_in(tx, cfg.as_ref(), &ev, closed_ms)
                            }
                            None => Ok(false),
                        }
                    })
                })
            })
            .await??;
        if queued {
            self.shared
                .outbox
                .stored(Kind::Event, Some(events::INCIDENT_CLOSED));
        }
        Ok(())
    }

    pub async fn save_guard(
        &self,
        key: String,
        json: String,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.exec(move |w| w.with_room(|w| save_guard(w.conn(), &key, &json, now_ms)))
            .await?
    }

    pub async fn load_guard(&self, key: String) -> Result<Option<String>, StoreError> {
        self.exec(move |w| load_guard(w.conn(), &key)).await?
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

    fn entry(i: u64) -> AuditEntry {
        AuditEntry {
            ts_ms: 1_000 + i as i64,
            decision_id: i,
            rule: Some("web-hung".into()),
            target: "web".into(),
            action: "restart".into(),
            decision: "acted".into(),
            reason: format!("probe failed 3 samples ({i})"),
            detail: serde_json::json!({"after": "active/running", "n": i}),
        }
    }

    #[test]
    fn chain_verifies_and_links() {
        let (_d, c) = conn();
        assert!(verify_chain(&c).expect("verify").ok, "empty chain is fine");
        let a = append(&c, &entry(1)).expect("append");
        let b = append(&c, &entry(2)).expect("append");
        assert_eq!(a.prev_hash, GENESIS);
        assert_eq!(b.prev_hash, a.hash);
        let r = verify_chain(&c).expect("verify");
        assert_eq!((r.rows, r.ok), (2, true));
        assert_eq!(recent(&c, 10).expect("recent"), vec![a, b]);
    }

    #[test]
    fn edited_row_is_caught() {
        let (_d, c) = conn();
        for i in 1..=5 {
            append(&c, &entry(i)).expect("append");
        }
        c.execute("UPDATE actions SET decision = 'suggested' WHERE id = 3", [])
            .expect("tamper");
        let r = verify_chain(&c).expect("verify");
        assert!(!r.ok);
        assert!(r.problem.expect("problem").contains("row 3"));
    }

    #[test]
    fn deleted_rows_are_caught() {
        let (_d, c) = conn();
        for i in 1..=5 {
            append(&c, &entry(i)).expect("append");
        }
        c.execute("DELETE FROM actions WHERE id = 2", [])
            .expect("delete");
        let r = verify_chain(&c).expect("verify");
        assert!(!r.ok && r.problem.expect("problem").contains("row 2"));

        let (_d, c) = conn();
        for i in 1..=5 {
            append(&c, &entry(i)).expect("append");
        }
        c.execute("DELETE FROM actions WHERE id = 5", [])
            .expect("delete");
        let r = verify_chain(&c).expect("verify");
        assert!(!r.ok, "truncation must be caught");
    }

    #[test]
    fn rehashed_edit_still_breaks_the_next_link() {
        // An attacker who edits a row and recomputes its hash still breaks
        // the next row's previous-hash link.
        let (_d, c) = conn();
        for i in 1..=3 {
            append(&c, &entry(i)).expect("append");
        }
        let mut row = recent(&c, 10).expect("rows").remove(1);
        row.entry.reason = "nothing happened".into();
        let forged = row_hash(row.id, &row.entry, &row.prev_hash);
        c.execute(
            "UPDATE actions SET reason = ?1, hash = ?2 WHERE id = ?3",
            params![row.entry.reason, forged, row.id],
        )
        .expect("forge");
        let r = verify_chain(&c).expect("verify");
        assert!(!r.ok && r.problem.expect("problem").contains("row 3"));
    }

    #[test]
    fn incidents_and_guard_state() {
        let (_d, c) = conn();
        let id =
            open_incident(&c, "web", 10, 1.0, &serde_json::json!({"rule": "r"})).expect("open");
        close_incident(&c, id, 20).expect("close");
        let all = incidents(&c, 10).expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].closed_ms, Some(20));
        // The wall clock stepped back between open and close: the close is
        // clamped to the open time, never before it.
        let id =
            open_incident(&c, "web", 5_000, 1.0, &serde_json::json!({"rule": "r"})).expect("open");
        close_incident(&c, id, 1_000).expect("close");
        let all = incidents(&c, 10).expect("list");
        assert_eq!(all[1].closed_ms, Some(5_000));
        assert_eq!(load_guard(&c, "engine").expect("load"), None);
        save_guard(&c, "engine", "{\"a\":1}", 5).expect("save");
        save_guard(&c, "engine", "{\"a\":2}", 6).expect("save");
        assert_eq!(
            load_guard(&c, "engine").expect("load").as_deref(),
            Some("{\"a\":2}")
        );
    }
}
