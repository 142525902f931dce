//! Models on the node: where installed packages live and which one is
//! active, in shadow, or the previous one (kept for a rollback).
//!
//! `STATE_DIR/models/` holds one directory per installed package
//! (`NAME-VERSION-SHA8/`, a verified copy) and `registry.json`, replaced
//! atomically under an exclusive lock on `models/.lock`, so the CLI, the
//! daemon's own promotions and remote commands never lose each other's
//! changes. A package is verified before it is copied in: a refused package
//! never touches the registry, and the running model keeps running.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::engine::Role;

pub const MODELS_DIR: &str = "models";
const REGISTRY: &str = "registry.json";
const LOCK: &str = ".lock";
/// History rows kept in the registry.
const HISTORY_MAX: usize = 50;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The package was refused (bad input: exit 2).
    #[error("{0}")]
    Refused(String),
    /// The requested change does not apply (bad input: exit 2).
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid model registry: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl LifecycleError {
    /// Whether the error is the caller's input rather than the node's.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            LifecycleError::Refused(_) | LifecycleError::Invalid(_)
        )
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LifecycleError {
    let what = what.into();
    move |source| LifecycleError::Io { what, source }
}

/// What verification of a package reports.
#[derive(Debug, Clone, PartialEq)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub features: Vec<String>,
}

/// One installed model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub version: String,
    /// Of model.onnx.
    pub sha256: String,
    /// Its directory under `models/`.
    pub dir: String,
    /// The target its incidents belong to.
    pub target: String,
    pub installed_ms: i64,
    /// When it took its current role.
    pub since_ms: i64,
}

impl Entry {
    pub fn label(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRow {
    pub ts_ms: i64,
    pub event: String,
    pub model: String,
    pub by: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub active: Option<Entry>,
    pub shadow: Option<Entry>,
    pub previous: Option<Entry>,
    #[serde(default)]
    pub history: Vec<HistoryRow>,
}

impl Registry {
    pub fn get(&self, role: Role) -> Option<&Entry> {
        match role {
            Role::Active => self.active.as_ref(),
            Role::Shadow => self.shadow.as_ref(),
            Role::Previous => self.previous.as_ref(),
        }
    }

    fn log(&mut self, ts_ms: i64, event: &str, e: &Entry, by: &str) {
        self.history.push(HistoryRow {
            ts_ms,
            event: event.into(),
            model: e.label(),
            by: by.into(),
        });
        if self.history.len() > HISTORY_MAX {
            let cut = self.history.len() - HISTORY_MAX;
            self.history.drain(..cut);
        }
    }
}

/// The models directory of a state directory.
pub fn models_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(MODELS_DIR)
}

/// The directory of an installed entry.
pub fn entry_path(state_dir: &Path, e: &Entry) -> PathBuf {
    models_dir(state_dir).join(&e.dir)
}

/// Reads the registry; an absent one is empty.
pub fn load(state_dir: &Path) -> Result<Registry, LifecycleError> {
    let path = models_dir(state_dir).join(REGISTRY);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|source| LifecycleError::Corrupt { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// Holds the registry lock while it lives.
struct Locked {
    _file: fs::File,
    dir: PathBuf,
}

fn lock(state_dir: &Path) -> Result<Locked, LifecycleError> {
    let dir = models_dir(state_dir);
    fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let path = dir.join(LOCK);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    file.lock()
        .map_err(io(format!("locking {}", path.display())))?;
    Ok(Locked { _file: file, dir })
}

impl Locked {
    fn save(&self, reg: &Registry) -> Result<(), LifecycleError> {
        let path = self.dir.join(REGISTRY);
        let tmp = self.dir.join(format!("{REGISTRY}.tmp"));
        let json = serde_json::to_vec_pretty(reg).map_err(|source| LifecycleError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = fs::File::create(&tmp).map_err(io(format!("writing {}", tmp.display())))?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(io(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, &path).map_err(io(format!("replacing {}", path.display())))?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes package directories no role refers to.
    fn prune(&self, reg: &Registry) {
        let keep: Vec<&str> = [&reg.active, &reg.shadow, &reg.previous]
            .into_iter()
            .flatten()
            .map(|e| e.dir.as_str())
            .collect();
        let Ok(list) = fs::read_dir(&self.dir) else {
            return;
        };
        for d in list.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name.starts_with(REGISTRY) || keep.contains(&name.as_str())
            {
                continue;
            }
            if d.path().is_dir() {
                if let Err(e) = fs::remove_dir_all(d.path()) {
                    tracing::warn!(dir = %d.path().display(), error = %e, "cannot remove an old model");
                }
            }
        }
    }
}

/// Verifies the package at `src` with `verify`, copies it under the state
/// directory and makes it the shadow model (replacing any earlier shadow).
/// `verify` loads the package the way the daemon will, so what is installed
/// is what runs.
pub fn install(
    state_dir: &Path,
    src: &Path,
    target: &str,
    now_ms: i64,
    by: &str,
    verify: &dyn Fn(&Path) -> Result<PackageInfo, String>,
) -> Result<Entry, LifecycleError> {
    if !src.is_dir() {
        return Err(LifecycleError::Invalid(format!(
            "{}: a model package is a directory holding model.onnx and model.toml",
            src.display()
        )));
    }
    let info = verify(src).map_err(LifecycleError::Refused)?;
    let locked = lock(state_dir)?;
    let mut reg = load(state_dir)?;
    let short = info.sha256.get(..8).unwrap_or(&info.sha256);
    let dir_name = format!("{}-{}-{short}", info.name, info.version);
    for e in [&reg.active, &reg.shadow].into_iter().flatten() {
        if e.sha256 == info.sha256 && e.name == info.name && e.version == info.version {
            return Err(LifecycleError::Invalid(format!(
                "{} is already installed",
                e.label()
            )));
        }
    }
    let dest = locked.dir.join(&dir_name);
    let tmp = locked.dir.join(format!(".{dir_name}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    copy_package(src, &tmp)?;
    // The copy is what runs: verify it again (a package changed while it was
    // being copied is refused here).
    let copied = verify(&tmp).map_err(|e| {
        let _ = fs::remove_dir_all(&tmp);
        LifecycleError::Refused(e)
    })?;
    if copied.sha256 != info.sha256 {
        let _ = fs::remove_dir_all(&tmp);
        return Err(LifecycleError::Refused(format!(
            "{}: the package changed while it was installed",
            src.display()
        )));
    }
    let _ = fs::remove_dir_all(&dest);
    fs::rename(&tmp, &dest).map_err(io(format!("installing into {}", dest.display())))?;
    let entry = Entry {
        name: info.name,
        version: info.version,
        sha256: info.sha256,
        dir: dir_name,
        target: target.to_string(),
        installed_ms: now_ms,
        since_ms: now_ms,
    };
    reg.shadow = Some(entry.clone());
    reg.log(now_ms, "installed", &entry, by);
    locked.save(&reg)?;
    locked.prune(&reg);
    Ok(entry)
}

/// Copies a package directory's two files to `dest`.
fn copy_package(src: &Path, dest: &Path) -> Result<(), LifecycleError> {
    fs::create_dir_all(dest).map_err(io(format!("creating {}", dest.display())))?;
    for name in ["model.onnx", "model.toml"] {
        let f = src.join(name);
        let to = dest.join(name);
        fs::copy(&f, &to).map_err(io(format!("copying {}", f.display())))?;
        if let Ok(file) = fs::File::open(&to) {
            let _ = file.sync_all();
        }
    }
    Ok(())
}

/// Shadow becomes active, active becomes previous.
pub fn promote(state_dir: &Path, now_ms: i64, by: &str) -> Result<Entry, LifecycleError> {
    let locked = lock(state_dir)?;
    let mut reg = load(state_dir)?;
    let Some(mut shadow) = reg.shadow.take() else {
        return Err(LifecycleError::Invalid("no model is in shadow".into()));
    };
    shadow.since_ms = now_ms;
    if let Some(mut active) = reg.active.take() {
        active.since_ms = now_ms;
        reg.previous = Some(active);
    }
    reg.active = Some(shadow.clone());
    reg.log(now_ms, "promoted", &shadow, by);
    locked.save(&reg)?;
    locked.prune(&reg);
    Ok(shadow)
}

/// The active model is retired; the previous one (if any) is active again.
/// Returns (retired, now active).
pub fn rollback(
    state_dir: &Path,
    now_ms: i64,
    by: &str,
) -> Result<(Entry, Option<Entry>), LifecycleError> {
    let locked = lock(state_dir)?;
    let mut reg = load(state_dir)?;
    let Some(active) = reg.active.take() else {
        return Err(LifecycleError::Invalid("no model is active".into()));
    };
    let back = reg.previous.take().map(|mut p| {
        p.since_ms = now_ms;
        p
    });
    reg.active = back.clone();
    reg.log(now_ms, "rolled back", &active, by);
    locked.save(&reg)?;
    locked.prune(&reg);
    Ok((active, back))
}

/// A trial passed: the previous model is no longer needed in memory, but
/// stays installed for a manual rollback.
pub fn record(state_dir: &Path, now_ms: i64, event: &str, by: &str) -> Result<(), LifecycleError> {
    let locked = lock(state_dir)?;
    let mut reg = load(state_dir)?;
    if let Some(a) = reg.active.clone() {
        reg.log(now_ms, event, &a, by);
        locked.save(&reg)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("model.onnx"), body).unwrap();
        fs::write(p.join("model.toml"), format!("name = \"{name}\"\n")).unwrap();
        p
    }

    /// Accepts a package whose model.onnx does not start with "bad".
    fn verify(p: &Path) -> Result<PackageInfo, String> {
        let body = fs::read_to_string(p.join("model.onnx")).map_err(|e| e.to_string())?;
        if body.starts_with("bad") {
            return Err(format!("{}: refused", p.display()));
        }
        let toml = fs::read_to_string(p.join("model.toml")).map_err(|e| e.to_string())?;
        let name = toml.split('"').nth(1).unwrap_or("x").to_string();
        Ok(PackageInfo {
            name,
            version: "1".into(),
            sha256: format!("{:0>64}", body.len()),
            features: vec![],
        })
    }

    #[test]
    fn install_promote_rollback_round_trip() {
        let src = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let a = pkg(src.path(), "a", "aaaa");
        let b = pkg(src.path(), "b", "bbbbbb");

        let e = install(state.path(), &a, "host", 1, "test", &verify).unwrap();
        assert_eq!(load(state.path()).unwrap().shadow, Some(e.clone()));
        assert!(entry_path(state.path(), &e).join("model.onnx").exists());
        promote(state.path(), 2, "test").unwrap();
        install(state.path(), &b, "host", 3, "test", &verify).unwrap();
        promote(state.path(), 4, "test").unwrap();
        let reg = load(state.path()).unwrap();
        assert_eq!(reg.active.as_ref().unwrap().name, "b");
        assert_eq!(reg.previous.as_ref().unwrap().name, "a");
        assert!(reg.shadow.is_none());

        let (retired, back) = rollback(state.path(), 5, "test").unwrap();
        assert_eq!(retired.name, "b");
        assert_eq!(back.unwrap().name, "a");
        let reg = load(state.path()).unwrap();
        assert_eq!(reg.active.as_ref().unwrap().name, "a");
        assert!(reg.previous.is_none());
        // b's copy is gone; a's stays.
        let dirs: Vec<String> = fs::read_dir(models_dir(state.path()))
            .unwrap()
            .flatten()
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && !n.starts_with(REGISTRY))
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        assert!(dirs[0].starts_with("a-1-"));
        let events: Vec<&str> = reg.history.iter().map(|h| h.event.as_str()).collect();
        assert_eq!(
            events,
            [
                "installed",
                "promoted",
                "installed",
                "promoted",
                "rolled back"
            ]
        );
    }

    #[test]
    fn refused_package_changes_nothing() {
        let src = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let a = pkg(src.path(), "a", "aaaa");
        install(state.path(), &a, "host", 1, "t", &verify).unwrap();
        promote(state.path(), 2, "t").unwrap();
        let before = fs::read(models_dir(state.path()).join(REGISTRY)).unwrap();
        let bad = pkg(src.path(), "bad", "bad model");
        let err = install(state.path(), &bad, "host", 3, "t", &verify).unwrap_err();
        assert!(err.is_bad_input());
        assert_eq!(
            fs::read(models_dir(state.path()).join(REGISTRY)).unwrap(),
            before
        );
        assert!(!models_dir(state.path()).join("bad-1-00000000").exists());
    }

    #[test]
    fn nothing_to_promote_or_roll_back_is_bad_input() {
        let state = tempfile::tempdir().unwrap();
        assert!(promote(state.path(), 1, "t").unwrap_err().is_bad_input());
        assert!(rollback(state.path(), 1, "t").unwrap_err().is_bad_input());
    }

    #[test]
    fn corrupt_registry_is_an_error_not_an_empty_one() {
        let state = tempfile::tempdir().unwrap();
        fs::create_dir_all(models_dir(state.path())).unwrap();
        fs::write(models_dir(state.path()).join(REGISTRY), "{not json").unwrap();
        assert!(matches!(
            load(state.path()),
            Err(LifecycleError::Corrupt { .. })
        ));
    }
}
