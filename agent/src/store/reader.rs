//! The read side for the CLI: a read-only connection, usable while the
//! daemon writes.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::codec::{self, CODEC_XOR_SHUFFLE_ZSTD};
use super::{schema, wal_path, StoreError};
use crate::collect::{ProbeStatus, TargetStatus};
use crate::detect::features::FeatureVector;

/// What the store knows about the agent, for `outpost status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoredStatus {
    pub node_id: String,
    /// The pid of the agent that last opened the store (it may have exited).
    pub pid: u32,
    pub started_ms: i64,
    pub last_flush_ms: Option<i64>,
    pub version: String,
    /// The latest state of every target, by name.
    pub targets: Vec<TargetStatus>,
    pub newest_feature_ms: Option<i64>,
    pub feature_vectors: u64,
    /// Size of the database file plus its `-wal`.
    pub db_bytes: u64,
    /// Since when the disk has been full (the writer is deleting the oldest
    /// features to keep audit rows and events); `None` when it is not.
    pub disk_full_since_ms: Option<i64>,
}

/// A read-only view of the store.
pub struct Reader {
    pub(super) conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("path", &self.path).finish()
    }
}

impl Reader {
    /// Opens an existing store; errors if the file does not exist or is not
    /// an outpost store this build understands.
    pub fn open(db_path: &Path) -> Result<Reader, StoreError> {
        Ok(Reader {
            conn: schema::open_ro(db_path)?,
            path: db_path.to_path_buf(),
        })
    }

    pub fn status(&self) -> Result<StoredStatus, StoreError> {
        // One read transaction: a consistent snapshot across the queries.
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Deferred,
        )?;
        let agent = tx
            .query_row(
                "SELECT node_id, pid, started_ms, last_flush_ms, version
                 FROM agent_status WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((node_id, pid, started_ms, last_flush_ms, version)) = agent else {
            return Err(StoreError::NotAStore {
                path: self.path.clone(),
            });
        };
        let mut targets = Vec::new();
        {
            let mut stmt = tx.prepare(
                "SELECT name, kind, state, up, detail, probe FROM target_state ORDER BY name",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let probe: Option<String> = r.get(5)?;
                let probe: Option<ProbeStatus> = match probe {
                    Some(p) => Some(serde_json::from_str(&p)?),
                    None => None,
                };
                targets.push(TargetStatus {
                    name: r.get(0)?,
                    kind: r.get(1)?,
                    state: r.get(2)?,
                    up: r.get(3)?,
                    detail: r.get(4)?,
                    probe,
                });
            }
        }
        let (newest, vectors): (Option<i64>, i64) = tx.query_row(
            "SELECT max(ts_last_ms), coalesce(sum(n), 0) FROM features",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let disk_full_since_ms: Option<i64> = tx
            .query_row(
                "SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?1",
                [super::writer::DISK_FULL_KEY],
                |r| r.get(0),
            )
            .optional()?;
        drop(tx);
        let file_len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        Ok(StoredStatus {
            node_id,
            pid: u32::try_from(pid).unwrap_or(0),
            started_ms,
            last_flush_ms,
            version,
            targets,
            newest_feature_ms: newest,
            feature_vectors: vectors.max(0) as u64,
            db_bytes: file_len(&self.path) + file_len(&wal_path(&self.path)),
            disk_full_since_ms,
        })
    }

    /// The feature names of the newest stored vectors (empty when none are
    /// stored yet): what a model installed on this node can consume.
    pub fn latest_feature_names(&self) -> Result<Vec<String>, StoreError> {
        let names: Option<String> = self
            .conn
            .query_row(
                "SELECT s.names FROM features f JOIN feature_schemas s ON s.id = f.schema_id
                 ORDER BY f.id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match names {
            Some(json) => serde_json::from_str(&json)?,
            None => Vec::new(),
        })
    }

    /// Feature vectors with ts_ms >= since_ms, oldest first, decoded.
    pub fn features_since(&self, since_ms: i64) -> Result<Vec<FeatureVector>, StoreError> {
        let mut out = Vec::new();
        self.for_each_since(since_ms, |v| {
            out.push(v);
            Ok(())
        })?;
        // Rows are in commit order; a clock step can put a later commit
        // earlier in time. Stable, so equal timestamps keep commit order.
        out.sort_by_key(|v| v.ts_ms);
        Ok(out)
    }

    /// Writes CSV: header `ts_ms,<feature names…>` (the union of names across
    /// schemas, sorted; empty cell when a vector lacks a feature), one row per
    /// vector in commit order; returns the row count. Streams: memory does not
    /// grow with the number of vectors.
    pub fn export_csv(
        &self,
        since_ms: i64,
        out: &mut dyn std::io::Write,
    ) -> Result<u64, StoreError> {
        // One read transaction so the header and the rows see the same data.
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Deferred,
        )?;
        let schemas = load_schemas(&self.conn)?;
        let mut used: Vec<i64> = Vec::new();
        {
            let mut stmt =
                tx.prepare("SELECT DISTINCT schema_id FROM features WHERE ts_last_ms >= ?1")?;
            let mut rows = stmt.query(params![since_ms])?;
            while let Some(r) = rows.next()? {
                used.push(r.get(0)?);
            }
        }
        let mut union = BTreeSet::new();
        for id in &used {
            if let Some(names) = schemas.get(id) {
                union.extend(names.iter().map(String::as_str));
            }
        }
        let columns: Vec<&str> = union.into_iter().collect();
        let index: HashMap<&str, usize> =
            columns.iter().enumerate().map(|(i, n)| (*n, i)).collect();

        let mut w = std::io::BufWriter::new(out);
        let mut line = String::from("ts_ms");
        for c in &columns {
            line.push(',');
            push_csv_field(&mut line, c);
        }
        line.push('\n');
        w.write_all(line.as_bytes())?;

        // Per schema: the CSV column of each of its features.
        let mut col_maps: HashMap<i64, Vec<usize>> = HashMap::new();
        let mut cells: Vec<Option<f32>> = vec![None; columns.len()];
        let mut count = 0u64;
        self.for_each_row(&tx, &schemas, since_ms, |schema_id, v| {
            let map = col_maps.entry(schema_id).or_insert_with(|| {
                v.names
                    .iter()
                    .map(|n| index.get(n.as_str()).copied().unwrap_or(usize::MAX))
                    .collect()
            });
            cells.iter_mut().for_each(|c| *c = None);
            for (&col, &val) in map.iter().zip(v.values.iter()) {
                if let Some(c) = cells.get_mut(col) {
                    *c = Some(val);
                }
            }
            line.clear();
            line.push_str(&v.ts_ms.to_string());
            for c in &cells {
                line.push(',');
                if let Some(val) = c {
                    // Shortest text that parses back to the same f32.
                    line.push_str(&val.to_string());
                }
            }
            line.push('\n');
            w.write_all(line.as_bytes())?;
            count += 1;
            Ok(())
        })?;
        w.flush()?;
        Ok(count)
    }

    fn for_each_since(
        &self,
        since_ms: i64,
        mut f: impl FnMut(FeatureVector) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Deferred,
        )?;
        let schemas = load_schemas(&tx)?;
        self.for_each_row(&tx, &schemas, since_ms, |_, v| f(v))
    }

    /// Decodes every stored vector with `ts_ms >= since_ms`, in commit order.
    fn for_each_row(
        &self,
        conn: &Connection,
        schemas: &HashMap<i64, Arc<[String]>>,
        since_ms: i64,
        mut f: impl FnMut(i64, FeatureVector) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut stmt = conn.prepare(
            "SELECT id, schema_id, n, codec, data FROM features
             WHERE ts_last_ms >= ?1 ORDER BY id",
        )?;
        let mut rows = stmt.query(params![since_ms])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let schema_id: i64 = r.get(1)?;
            let n: i64 = r.get(2)?;
            let codec_id: i64 = r.get(3)?;
            let corrupt = |reason: String| StoreError::Corrupt { id, reason };
            if codec_id != CODEC_XOR_SHUFFLE_ZSTD {
                return Err(corrupt(format!("unknown codec {codec_id}")));
            }
            let names = schemas
                .get(&schema_id)
                .ok_or_else(|| corrupt(format!("unknown schema {schema_id}")))?;
            let n = usize::try_from(n).map_err(|_| corrupt(format!("bad count {n}")))?;
            let blob = r
                .get_ref(4)?
                .as_blob()
                .map_err(|e| corrupt(format!("data: {e}")))?;
            let d = codec::decode(blob, n, names.len()).map_err(|e| corrupt(e.0))?;
            for (i, &ts_ms) in d.ts.iter().enumerate() {
                if ts_ms >= since_ms {
                    f(
                        schema_id,
                        FeatureVector {
                            ts_ms,
                            names: names.clone(),
                            values: d.row(i).to_vec(),
                        },
                    )?;
                }
            }
        }
        Ok(())
    }
}

fn load_schemas(conn: &Connection) -> Result<HashMap<i64, Arc<[String]>>, StoreError> {
    let mut out = HashMap::new();
    let mut stmt = conn.prepare("SELECT id, names FROM feature_schemas")?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let names: String = r.get(1)?;
        let names: Vec<String> = serde_json::from_str(&names)?;
        out.insert(id, Arc::from(names));
    }
    Ok(out)
}

/// Appends `s` as a CSV field, quoted when it needs to be.
fn push_csv_field(line: &mut String, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        line.push('"');
        line.push_str(&s.replace('"', "\"\""));
        line.push('"');
    } else {
        line.push_str(s);
    }
}
