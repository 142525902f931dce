//! What the store does about a full disk and a corrupt database file.
//!
//! Full disk. In WAL mode every write, a `DELETE` included, appends to the
//! `-wal` file, and a checkpoint that grows the database file needs room
//! too: once the file system is full, SQLite cannot even delete rows to
//! make room. So the store keeps [`RESERVE_BYTES`] in `outpost.db.reserve`
//! (allocated, never written to) and gives it up at the first `SQLITE_FULL`;
//! that is enough for SQLite to checkpoint its WAL and for the writer to
//! delete the oldest feature batches, whose pages then hold the audit rows,
//! events and newer features that follow (see `writer.rs`, "disk full").
//! Features are the expendable data; audit rows and outbox events are not.
//!
//! Corrupt file. A database SQLite calls "not a database" or "malformed"
//! when the store opens is moved aside (kept, for whoever investigates) as
//! `outpost.db.corrupt-<unix ms>` with its `-wal`, and a fresh store is
//! started; the agent reports it upstream with a `store.recovered` event.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::ErrorCode;

use super::StoreError;

/// Bytes the reserve file holds: more than a full WAL (`schema::
/// WAL_AUTOCHECKPOINT_FRAMES` frames of a 1 KiB page plus its 24-byte
/// header, ~0.9 MiB), which is the most a pending checkpoint can grow the
/// database file by.
pub const RESERVE_BYTES: u64 = 1024 * 1024;

/// The reserve is (re)created, and a full disk counts as having room
/// again, only when the file system has this much available: then creating
/// it does not fill the disk itself.
pub const ROOM_BYTES: u64 = 3 * RESERVE_BYTES;

/// Whether an error is SQLite running out of disk space.
pub fn is_disk_full(e: &StoreError) -> bool {
    sqlite_code(e) == Some(ErrorCode::DiskFull)
}

/// Whether an error says the file is not a database or is damaged: the
/// cases where moving it aside and starting afresh is the only way on.
/// (A store from a newer outpost is not corrupt and is never moved.)
pub fn is_corrupt(e: &StoreError) -> bool {
    matches!(
        sqlite_code(e),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    )
}

fn sqlite_code(e: &StoreError) -> Option<ErrorCode> {
    let source = match e {
        StoreError::Sqlite(s) | StoreError::Migration { source: s, .. } => s,
        _ => return None,
    };
    match source {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
        _ => None,
    }
}

/// `DIR/outpost.db` → `DIR/outpost.db.corrupt-<unix ms>`.
pub fn aside_path(db: &Path, now_ms: i64) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(format!(".corrupt-{now_ms}"));
    PathBuf::from(s)
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Moves a corrupt database aside, its `-wal` beside it (a WAL must never
/// be replayed into the fresh file), and removes its `-shm` (an index SQLite
/// rebuilds). Returns where the database went.
pub fn set_aside(db: &Path, now_ms: i64) -> std::io::Result<PathBuf> {
    let mut to = aside_path(db, now_ms);
    let mut n = 1;
    while to.exists() {
        to = with_suffix(&aside_path(db, now_ms), &format!(".{n}"));
        n += 1;
    }
    std::fs::rename(db, &to)?;
    let wal = with_suffix(db, "-wal");
    if wal.exists() {
        std::fs::rename(&wal, with_suffix(&to, "-wal"))?;
    }
    match std::fs::remove_file(with_suffix(db, "-shm")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(to)
}

/// `DIR/outpost.db.reserve`.
pub fn reserve_path(db: &Path) -> PathBuf {
    with_suffix(db, ".reserve")
}

/// Bytes available to an unprivileged writer on the file system holding
/// `dir` (`None` when it cannot be asked).
pub fn available_bytes(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Creates the reserve if it is missing and there is room for it. Returns
/// whether a reserve is in place afterwards.
pub fn ensure_reserve(db: &Path) -> bool {
    let path = reserve_path(db);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES) {
        return true;
    }
    let dir = db.parent().unwrap_or(Path::new("."));
    if available_bytes(dir).is_none_or(|a| a < ROOM_BYTES) {
        return false;
    }
    match allocate(&path, RESERVE_BYTES) {
        Ok(()) => true,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            tracing::warn!(path = %path.display(), error = %e, "cannot create the store's disk reserve");
            false
        }
    }
}

/// Allocates `len` bytes: `fallocate` (no data written), else zeros where
/// the file system does not support it.
fn allocate(path: &Path, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    match rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => {}
        Err(rustix::io::Errno::OPNOTSUPP) => {
            let zeros = vec![0u8; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n])?;
                left -= n as u64;
            }
        }
        Err(e) => return Err(e.into()),
    }
    f.sync_all()
}

/// Deletes the reserve; returns whether there was one.
pub fn release_reserve(db: &Path) -> bool {
    std::fs::remove_file(reserve_path(db)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: std::ffi::c_int) -> StoreError {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            None,
        ))
    }

    #[test]
    fn errors_are_classified_by_their_sqlite_code() {
        use rusqlite::ffi;
        assert!(is_disk_full(&failure(ffi::SQLITE_FULL)));
        assert!(!is_disk_full(&failure(ffi::SQLITE_IOERR)));
        assert!(is_corrupt(&failure(ffi::SQLITE_NOTADB)));
        assert!(is_corrupt(&failure(ffi::SQLITE_CORRUPT)));
        assert!(is_corrupt(&StoreError::Migration {
            to: 1,
            source: rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_NOTADB), None),
        }));
        // A busy database, a newer schema or a missing directory is not
        // corrupt: moving the file aside would lose a good store.
        assert!(!is_corrupt(&failure(ffi::SQLITE_BUSY)));
        assert!(!is_corrupt(&StoreError::TooNew {
            found: 9,
            supported: 2
        }));
        assert!(!is_corrupt(&StoreError::Io(std::io::Error::other("x"))));
    }

    #[test]
    fn a_corrupt_file_is_kept_with_its_wal_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("outpost.db");
        std::fs::write(&db, b"garbage").expect("db");
        std::fs::write(dir.path().join("outpost.db-wal"), b"wal").expect("wal");
        std::fs::write(dir.path().join("outpost.db-shm"), b"shm").expect("shm");
        let to = set_aside(&db, 1234).expect("aside");
        assert_eq!(to, dir.path().join("outpost.db.corrupt-1234"));
        assert_eq!(std::fs::read(&to).expect("moved"), b"garbage");
        assert_eq!(
            std::fs::read(dir.path().join("outpost.db.corrupt-1234-wal")).expect("wal moved"),
            b"wal"
        );
        assert!(!db.exists());
        assert!(!dir.path().join("outpost.db-wal").exists());
        assert!(!dir.path().join("outpost.db-shm").exists());
        // The same millisecond again: a new name, the first file untouched.
        std::fs::write(&db, b"again").expect("db");
        let second = set_aside(&db, 1234).expect("aside");
        assert_eq!(second, dir.path().join("outpost.db.corrupt-1234.1"));
        assert_eq!(std::fs::read(&to).expect("first"), b"garbage");
    }

    #[test]
    fn the_reserve_is_created_once_and_released() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("outpost.db");
        // Assumes the test machine's temp dir has a few MiB free.
        assert!(ensure_reserve(&db));
        let len = std::fs::metadata(reserve_path(&db)).expect("reserve").len();
        assert_eq!(len, RESERVE_BYTES);
        assert!(ensure_reserve(&db), "an existing reserve is kept");
        assert!(release_reserve(&db));
        assert!(!release_reserve(&db), "nothing left to release");
    }
}
