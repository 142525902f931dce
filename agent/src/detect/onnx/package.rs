//! Reading a package's two files from a directory or from a `.tar` of one,
//! refusing anything else: a tar is read in memory, never unpacked, and an
//! absolute path, a `..`, a link, a device, an extra file or an oversized
//! entry refuses the whole package.

use std::fs;
use std::io::Read;
use std::path::{Component, Path};

use super::manifest::{MANIFEST_FILE, ONNX_FILE};
use super::PackageError;

/// The largest model.onnx accepted.
pub const MAX_ONNX_BYTES: u64 = 64 << 20;
/// The largest model.toml accepted.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Entries a package tar may hold (two files and a few directories).
const MAX_TAR_ENTRIES: usize = 16;

/// A package's files, read.
pub struct Files {
    /// How messages name model.toml (`DIR/model.toml`, `X.tar:model.toml`).
    pub manifest_at: String,
    /// How messages name model.onnx.
    pub onnx_at: String,
    pub manifest: String,
    pub onnx: Vec<u8>,
}

fn limit(name: &str) -> u64 {
    if name == ONNX_FILE {
        MAX_ONNX_BYTES
    } else {
        MAX_MANIFEST_BYTES
    }
}

fn layout(path: &Path, what: impl Into<String>) -> PackageError {
    PackageError::Layout {
        path: path.display().to_string(),
        what: what.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PackageError + '_ {
    move |source| PackageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads the package at `path`: a directory holding exactly model.onnx and
/// model.toml, or a `.tar` of one.
pub fn read(path: &Path) -> Result<Files, PackageError> {
    let meta = fs::metadata(path).map_err(io(path))?;
    if meta.is_dir() {
        read_dir(path)
    } else if meta.is_file() {
        read_tar(path)
    } else {
        Err(layout(
            path,
            "neither a package directory nor a .tar of one",
        ))
    }
}

fn manifest_text(at: &str, bytes: Vec<u8>) -> Result<String, PackageError> {
    String::from_utf8(bytes).map_err(|_| PackageError::Manifest {
        path: at.to_string(),
        field: "text".into(),
        what: "not UTF-8".into(),
    })
}

fn read_dir(dir: &Path) -> Result<Files, PackageError> {
    let mut extra = Vec::new();
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name != ONNX_FILE && name != MANIFEST_FILE {
            extra.push(name);
        }
    }
    if !extra.is_empty() {
        extra.sort();
        return Err(layout(
            dir,
            format!(
                "a package holds exactly {ONNX_FILE} and {MANIFEST_FILE}; extra: {}",
                extra.join(", ")
            ),
        ));
    }
    let read_one = |name: &str| -> Result<Vec<u8>, PackageError> {
        let p = dir.join(name);
        let meta = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(layout(
                    dir,
                    format!(
                        "a package holds exactly {ONNX_FILE} and {MANIFEST_FILE}; missing {name}"
                    ),
                ))
            }
            Err(e) => return Err(io(&p)(e)),
        };
        if !meta.file_type().is_file() {
            return Err(layout(&p, "not a regular file (links are refused)"));
        }
        if meta.len() > limit(name) {
            return Err(layout(
                &p,
                format!("{} bytes, over the limit of {}", meta.len(), limit(name)),
            ));
        }
        let mut buf = Vec::with_capacity(meta.len() as usize);
        fs::File::open(&p)
            .and_then(|f| f.take(limit(name) + 1).read_to_end(&mut buf))
            .map_err(io(&p))?;
        if buf.len() as u64 > limit(name) {
            return Err(layout(
                &p,
                format!("over the limit of {} bytes", limit(name)),
            ));
        }
        Ok(buf)
    };
    let manifest = read_one(MANIFEST_FILE)?;
    let onnx = read_one(ONNX_FILE)?;
    let manifest_at = dir.join(MANIFEST_FILE).display().to_string();
    Ok(Files {
        manifest: manifest_text(&manifest_at, manifest)?,
        manifest_at,
        onnx_at: dir.join(ONNX_FILE).display().to_string(),
        onnx,
    })
}

fn read_tar(path: &Path) -> Result<Files, PackageError> {
    let file = fs::File::open(path).map_err(io(path))?;
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries()
        .map_err(|e| layout(path, format!("not a tar archive: {e}")))?;
    // The directory the two files sit in (empty for the archive's root).
    let mut parent: Option<Vec<String>> = None;
    let (mut manifest, mut onnx) = (None::<Vec<u8>>, None::<Vec<u8>>);
    for (i, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| layout(path, format!("not a tar archive: {e}")))?;
        if i >= MAX_TAR_ENTRIES {
            return Err(layout(
                path,
                format!("more than {MAX_TAR_ENTRIES} entries: not a model package"),
            ));
        }
        let name = entry
            .path()
            .map_err(|e| layout(path, format!("entry {i}: unreadable path: {e}")))?
            .into_owned();
        let shown = name.display().to_string();
        let mut parts = Vec::new();
        for c in name.components() {
            match c {
                Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return Err(layout(
                        path,
                        format!("entry {shown:?}: absolute paths are refused"),
                    ))
                }
                Component::ParentDir => {
                    return Err(layout(path, format!("entry {shown:?}: `..` is refused")))
                }
            }
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(layout(
                path,
                format!(
                    "entry {shown:?}: not a plain file ({kind:?}); links and devices are refused"
                ),
            ));
        }
        let Some(base) = parts.pop() else {
            return Err(layout(
                path,
                format!("entry {shown:?}: a file with no name"),
            ));
        };
        let slot = match base.as_str() {
            ONNX_FILE => &mut onnx,
            MANIFEST_FILE => &mut manifest,
            _ => {
                return Err(layout(
                    path,
                    format!(
                        "entry {shown:?}: a package holds exactly {ONNX_FILE} and {MANIFEST_FILE}"
                    ),
                ))
            }
        };
        match &parent {
            Some(p) if *p != parts => {
                return Err(layout(
                    path,
                    format!("entry {shown:?}: the package's files must share one directory"),
                ))
            }
            _ => parent = Some(parts),
        }
        if slot.is_some() {
            return Err(layout(path, format!("entry {shown:?}: appears twice")));
        }
        let size = entry.header().size().unwrap_or(u64::MAX);
        if size > limit(&base) {
            return Err(layout(
                path,
                format!(
                    "entry {shown:?}: {size} bytes, over the limit of {}",
                    limit(&base)
                ),
            ));
        }
        let mut buf = Vec::with_capacity(size as usize);
        (&mut entry)
            .take(limit(&base) + 1)
            .read_to_end(&mut buf)
            .map_err(|e| layout(path, format!("entry {shown:?}: {e}")))?;
        if buf.len() as u64 > limit(&base) {
            return Err(layout(
                path,
                format!("entry {shown:?}: over the size limit"),
            ));
        }
        *slot = Some(buf);
    }
    let at = |name: &str| format!("{}:{name}", path.display());
    let (Some(manifest), Some(onnx)) = (manifest, onnx) else {
        return Err(layout(
            path,
            format!("a package holds exactly {ONNX_FILE} and {MANIFEST_FILE}; the tar lacks one"),
        ));
    };
    Ok(Files {
        manifest: manifest_text(&at(MANIFEST_FILE), manifest)?,
        manifest_at: at(MANIFEST_FILE),
        onnx_at: at(ONNX_FILE),
        onnx,
    })
}
