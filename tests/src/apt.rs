//! Installing what a whole-system test needs with apt, once per process.

use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

static APT: Mutex<bool> = Mutex::new(false);

/// True when `cmd arg` runs and exits 0.
pub fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `apt-get update` (once per process) and `apt-get install -y PACKAGES`.
/// Fails with apt's output when either fails.
pub fn install(packages: &[&str]) -> Result<()> {
    let mut updated = APT.lock().unwrap_or_else(|e| e.into_inner());
    if !*updated {
        run(&["update"])?;
        *updated = true;
    }
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(packages);
    run(&args)
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .context("cannot run apt-get")?;
    if !out.status.success() {
        bail!(
            "apt-get {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Installs `packages` with apt unless `path` already exists; fails when it
/// is still missing afterwards.
pub fn install_if_missing(path: &str, packages: &[&str]) -> Result<()> {
    if std::path::Path::new(path).exists() {
        return Ok(());
    }
    install(packages)?;
    if !std::path::Path::new(path).exists() {
        bail!(
            "{} installed, but {path} is still missing",
            packages.join(" ")
        );
    }
    Ok(())
}
