//! The local SQLite store.
//!
//! One writer thread owns the only read-write [`rusqlite::Connection`]; the
//! async side talks to it through [`Store`], a cheap-to-clone handle whose
//! methods never block on SQLite. The CLI reads through [`Reader`], a
//! separate read-only connection that works while the daemon runs.
//!
//! Disk writes are budgeted (SD cards wear out), so feature vectors are
//! buffered in memory and committed once per `StoreConfig::flush_interval`
//! as one compressed row per flush and schema (see [`codec`]); the first
//! vector after start is committed at once so a short run leaves something
//! behind. See `writer.rs` for what a flush writes.
//!
//! Durability: feature batches commit with `synchronous = NORMAL` (a power
//! cut may lose the last commits, never the database); explicit
//! [`Store::flush`] and [`Store::close`] commit with `FULL`, and
//! [`schema::durable_transaction`] gives the audit chain and the outbox the
//! same.
//!
//! Faults (see [`faults`]): a database SQLite calls corrupt when the store
//! opens is moved aside and a fresh one started (reported upstream as
//! `store.recovered`); on a full disk the writer gives up a reserve file and
//! the oldest feature batches so that audit rows and events keep being
//! written, and goes back to normal when there is room again.

pub mod audit;
pub mod codec;
pub mod faults;
pub mod outbox;
mod reader;
pub mod schema;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::collect::TargetStatus;
use crate::config::Config;
use crate::detect::features::FeatureVector;
use crate::sync::message::EventBody;

pub use reader::{Reader, StoredStatus};

/// Messages queued to the writer; bounded, so a stuck disk costs vectors,
/// not memory.
const DATA_CHANNEL_CAPACITY: usize = 64;

/// `close()` gives up waiting for the writer after this long (the unit's
/// stop timeout is longer; the rest of shutdown needs some of it too).
const CLOSE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: cannot create the state directory: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: no such store", path.display())]
    Missing { path: PathBuf },
    #[error("{}: not an outpost store (schema version 0)", path.display())]
    NotAStore { path: PathBuf },
    #[error("store schema version {found} is newer than this outpost supports ({supported})")]
    TooNew { found: i64, supported: i64 },
    #[error("store migration to version {to} failed: {source}")]
    Migration {
        to: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("PRAGMA {pragma}: wanted {wanted}, got {got}")]
    Pragma {
        pragma: &'static str,
        wanted: &'static str,
        got: String,
    },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("feature batch {id}: {reason}")]
    Corrupt { id: i64, reason: String },
    #[error("the store writer has stopped")]
    Closed,
    #[error("the store writer did not finish within {0:?}")]
    Timeout(Duration),
}

/// To the writer, in order with the feature vectors.
enum Msg {
    Features(FeatureVector),
    /// Look at the control channel.
    Wake,
}

type Reply = oneshot::Sender<Result<(), StoreError>>;

/// To the writer, out of band: never refused for lack of room. Before it
/// handles one, the writer drains every vector already queued, so a flush
/// covers everything recorded before it was asked for.
enum Ctl {
    Flush(Reply),
    Close(Reply),
    /// Runs a job on the writer thread: audit rows, incidents, guard state
    /// (each its own durable transaction), and in tests I/O counters and
    /// retention with other limits.
    Exec(Box<dyn FnOnce(&mut writer::Writer) + Send>),
}

/// The latest target states, waiting for the next flush. A slot rather than
/// a queue: only the newest matters, and it never costs channel room.
type TargetSlot = Arc<Mutex<Option<Vec<TargetStatus>>>>;

struct Shared {
    data: SyncSender<Msg>,
    ctl: mpsc::Sender<Ctl>,
    targets: TargetSlot,
    dropped: Arc<AtomicU64>,
    /// Whether we are in a burst of drops (logged once per burst).
    dropping: AtomicBool,
    outbox: Arc<outbox::OutboxShared>,
}

/// Handle to the store's writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Store {
    /// Creates the state dir (0700) if missing, opens/migrates the DB
    /// synchronously (errors returned), starts the writer thread. A database
    /// SQLite calls corrupt is moved aside and a fresh one started (see
    /// [`faults`]); the `store.recovered` event waits for the outbox.
    pub fn open(cfg: &Config) -> Result<Store, StoreError> {
        create_state_dir(&cfg.agent.state_dir)?;
        let path = cfg.db_path();
        let started_ms = now_ms();
        let node = cfg.agent.node_id.as_str();
        let outbox = Arc::new(outbox::OutboxShared::default());
        let conn = match open_db(&path, node, started_ms) {
            Ok(c) => c,
            Err(e) if faults::is_disk_full(&e) && faults::release_reserve(&path) => {
                tracing::warn!(path = %path.display(), "disk full at start: released the store's reserve");
                open_db(&path, node, started_ms)?
            }
            Err(e) if faults::is_corrupt(&e) => {
                let moved = faults::set_aside(&path, started_ms)?;
                tracing::error!(
                    path = %path.display(),
                    moved_to = %moved.display(),
                    error = %e,
                    "the store is corrupt: moved it aside and started a fresh one"
                );
                let conn = open_db(&path, node, started_ms)?;
                // The old seq is lost with the file; consumers deduplicate
                // on (node, seq), so the new one must start above it.
                outbox::raise_seq(&conn, started_ms.max(0) as u64)?;
                outbox.hold(EventBody::new(
                    crate::sync::message::events::STORE_RECOVERED,
                    serde_json::json!({
                        "cause": "corrupt",
                        "error": e.to_string(),
                        "moved_to": moved.display().to_string(),
                    }),
                ));
                conn
            }
            Err(e) => return Err(e),
        };
        faults::ensure_reserve(&path);

        let (data_tx, data_rx) = mpsc::sync_channel(DATA_CHANNEL_CAPACITY);
        let (ctl_tx, ctl_rx) = mpsc::channel();
        let targets: TargetSlot = Arc::new(Mutex::new(None));
        let dropped = Arc::new(AtomicU64::new(0));
        let w = writer::Writer::new(
            conn,
            path.clone(),
            writer::Limits::from_config(&cfg.store),
            targets.clone(),
            dropped.clone(),
            outbox.clone(),
        );
        std::thread::Builder::new()
            .name("outpost-store".into())
            .spawn(move || w.run(data_rx, ctl_rx))?;
        tracing::info!(path = %path.display(), "store opened");
        Ok(Store {
            shared: Arc::new(Shared {
                data: data_tx,
                ctl: ctl_tx,
                targets,
                dropped,
                dropping: AtomicBool::new(false),
                outbox,
            }),
        })
    }

    /// Non-blocking; if the channel is full the vector is dropped and counted
    /// (logged once per burst).
    pub fn record_features(&self, v: FeatureVector) {
        let s = &self.shared;
        match s.data.try_send(Msg::Features(v)) {
            Ok(()) => {
                if s.dropping.load(Ordering::Relaxed) && s.dropping.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        dropped_total = s.dropped.load(Ordering::Relaxed),
                        "store accepting feature vectors again"
                    );
                }
            }
            Err(e) => {
                let total = s.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if !s.dropping.swap(true, Ordering::Relaxed) {
                    let why = match e {
                        TrySendError::Full(_) => "writer queue full",
                        TrySendError::Disconnected(_) => "writer stopped",
                    };
                    tracing::warn!(
                        dropped_total = total,
                        reason = why,
                        "store dropping feature vectors"
                    );
                }
            }
        }
    }

    /// Latest target states (upserted at the next flush, not immediately).
    pub fn record_targets(&self, t: Vec<TargetStatus>) {
        // Held only for a swap; a poisoned lock still holds valid data.
        let mut slot = match self.shared.targets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *slot = Some(t);
    }

    /// Commits everything buffered; resolves when it is on disk.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.control(Ctl::Flush(tx))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Flushes and stops the writer thread; call once at shutdown. Gives up
    /// after 1.5 s with [`StoreError::Timeout`].
    pub async fn close(self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.control(Ctl::Close(tx))?;
        match tokio::time::timeout(CLOSE_TIMEOUT, rx).await {
            Ok(r) => r.map_err(|_| StoreError::Closed)?,
            Err(_) => Err(StoreError::Timeout(CLOSE_TIMEOUT)),
        }
    }

    /// Feature vectors dropped so far (writer queue full, buffer overflow
    /// while the disk failed, or recorded after close).
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn control(&self, c: Ctl) -> Result<(), StoreError> {
        self.shared.ctl.send(c).map_err(|_| StoreError::Closed)?;
        // If the queue is full the writer is awake and will see `c` after
        // its next message; if it is disconnected, the writer is gone and
        // the reply channel reports it.
        let _ = self.shared.data.try_send(Msg::Wake);
        Ok(())
    }

    /// Runs `f` on the writer thread and returns its result.
    async fn exec<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut writer::Writer) -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.control(Ctl::Exec(Box::new(move |w| {
            let _ = tx.send(f(w));
        })))?;
        rx.await.map_err(|_| StoreError::Closed)
    }
}

/// Opens (creating if needed) and migrates the database and records this
/// process in it.
fn open_db(
    path: &Path,
    node_id: &str,
    started_ms: i64,
) -> Result<rusqlite::Connection, StoreError> {
    create_private_file(path)?;
    let conn = schema::open_rw(path)?;
    writer::record_start(&conn, node_id, started_ms)?;
    Ok(conn)
}

fn create_state_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })
}

/// Creates the database file readable by its owner only (SQLite gives the
/// -wal and -shm files the same mode).
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The `-wal` file next to a database.
fn wal_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push("-wal");
    PathBuf::from(s)
}
