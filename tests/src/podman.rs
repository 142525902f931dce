//! Real podman for whole-system tests: installs it when missing, builds a
//! local busybox image (no registry is reachable), runs the Docker-compatible
//! API service on a private socket and cleans up after itself.
//!
//! Every helper fails loudly: a test that needs podman and cannot get it
//! must fail, not skip.
//!
//! On Debian 12 with hybrid cgroups crun fails, so every command runs with
//! `--runtime runc`, and containers get explicit nofile/nproc ulimits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::apt::have;

/// The packages the harness needs.
pub const PACKAGES: &[&str] = &["podman", "runc", "busybox-static"];

/// Where busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The local image every test uses: a static busybox and nothing else.
pub const IMAGE: &str = "localhost/outpost-test-busybox:latest";

/// Applets linked into the image's `/bin` so health commands such as
/// `false` or `sh -c …` resolve.
const APPLETS: &[&str] = &[
    "sh", "true", "false", "sleep", "echo", "cat", "ls", "test", "wget", "nc",
];

/// Runs `podman --runtime runc ARGS…`, returning stdout; fails with stderr.
pub fn podman(args: &[&str]) -> Result<String> {
    let out = podman_output(args)?;
    if !out.status.success() {
        bail!(
            "podman {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs `podman --runtime runc ARGS…` and returns its output, whatever its
/// exit status.
pub fn podman_output(args: &[&str]) -> Result<Output> {
    Command::new("podman")
        .arg("--runtime")
        .arg("runc")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run podman {}", args.join(" ")))
}

/// Installs podman, runc and busybox-static with apt when any is missing.
/// Safe to call from many tests: the work is done once per process.
pub fn ensure_installed() -> Result<()> {
    static DONE: OnceLock<Mutex<bool>> = OnceLock::new();
    let lock = DONE.get_or_init(|| Mutex::new(false));
    let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    let busybox_ok = Path::new(BUSYBOX).exists() && is_static_elf(Path::new(BUSYBOX))?;
    if !(have("podman", "--version") && have("runc", "--version") && busybox_ok) {
        crate::apt::install(PACKAGES).context("installing podman")?;
    }
    if !have("podman", "--version") {
        bail!("podman is still missing after apt-get install");
    }
    if !have("runc", "--version") {
        bail!("runc is still missing after apt-get install");
    }
    if !is_static_elf(Path::new(BUSYBOX))? {
        bail!("{BUSYBOX} is not a static binary; busybox-static is needed");
    }
    *done = true;
    Ok(())
}

/// True when `path` is an ELF file without a program interpreter.
fn is_static_elf(path: &Path) -> Result<bool> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Ok(false);
    }
    let is64 = bytes[4] == 2;
    let le = bytes[5] == 1;
    let rd = |off: usize, len: usize| -> u64 {
        let b = &bytes[off..off + len];
        let mut v = 0u64;
        for i in 0..len {
            let byte = if le { b[len - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        v
    };
    let (phoff, phentsize, phnum) = if is64 {
        (
            rd(0x20, 8) as usize,
            rd(0x36, 2) as usize,
            rd(0x38, 2) as usize,
        )
    } else {
        (
            rd(0x1c, 4) as usize,
            rd(0x2a, 2) as usize,
            rd(0x2c, 2) as usize,
        )
    };
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        if off + 4 > bytes.len() {
            return Ok(false);
        }
        // PT_INTERP = 3
        if rd(off, 4) == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Builds [`IMAGE`] with `podman import` from a tar holding the static
/// busybox (and applet links). Idempotent; done once per process.
pub fn busybox_image() -> Result<&'static str> {
    static DONE: OnceLock<Mutex<bool>> = OnceLock::new();
    let lock = DONE.get_or_init(|| Mutex::new(false));
    let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(IMAGE);
    }
    ensure_installed()?;
    let dir = tempfile::tempdir().context("tempdir for the image")?;
    let root = dir.path().join("rootfs");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(root.join("tmp"))?;
    std::fs::copy(BUSYBOX, bin.join("busybox")).context("copy busybox")?;
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    let tar = dir.path().join("image.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .context("cannot run tar")?;
    if !out.status.success() {
        bail!("tar failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let tar = tar.to_str().context("non-UTF-8 temp path")?;
    podman(&["import", tar, IMAGE]).context("podman import of the busybox image")?;
    *done = true;
    Ok(IMAGE)
}

/// `podman system service` on a private unix socket; killed on drop.
pub struct Service {
    child: Child,
    socket: PathBuf,
    // Holds the socket's directory.
    _dir: tempfile::TempDir,
}

impl Service {
    /// Starts the API service and waits (up to 30 s) until it answers.
    pub fn start() -> Result<Service> {
        ensure_installed()?;
        let dir = tempfile::Builder::new()
            .prefix("outpost-podman-")
            .tempdir()
            .context("tempdir for the podman socket")?;
        let socket = dir.path().join("podman.sock");
        let log = std::fs::File::create(dir.path().join("service.log"))?;
        let child = Command::new("podman")
            .args(["--runtime", "runc", "system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start podman system service")?;
        let mut service = Service {
            child,
            socket,
            _dir: dir,
        };
        service.wait_ready(Duration::from_secs(30))?;
        Ok(service)
    }

    fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "podman system service exited ({status}): {}",
                    self.log().trim()
                );
            }
            if ping(&self.socket) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "podman system service did not answer on {} within {within:?}: {}",
                    self.socket.display(),
                    self.log().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The API socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// What the service wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("service.log")).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when `GET /_ping` on the socket answers `OK`.
pub fn ping(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /_ping HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}

/// Containers created by a test; `podman rm -f` on drop, even when the test
/// panics.
#[derive(Default)]
pub struct Containers {
    names: Vec<String>,
}

impl Containers {
    pub fn new() -> Self {
        Containers::default()
    }

    /// A name unique to this process, so parallel runs never collide.
    pub fn unique(prefix: &str) -> String {
        format!("{prefix}-{}", std::process::id())
    }

    /// `podman run -d` with the ulimits this machine class needs; `extra`
    /// goes before the image (e.g. health flags), `cmd` is the shell script
    /// run by busybox `sh -c`. The container is removed on drop.
    pub fn run(&mut self, name: &str, extra: &[&str], script: &str) -> Result<String> {
        let image = busybox_image()?;
        // A leftover from an earlier, killed run.
        let _ = podman_output(&["rm", "-f", "-t", "0", name]);
        self.names.push(name.to_string());
        let mut args = vec![
            "run",
            "-d",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--name",
            name,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[image, "/bin/busybox", "sh", "-c", script]);
        podman(&args)
    }

    /// Waits until `podman inspect` shows `field` (a Go template such as
    /// `{{.State.Status}}`) equal to `want`.
    pub fn wait_for(&self, name: &str, field: &str, want: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let got = podman(&["inspect", "--format", field, name])?;
            if got == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{name}: {field} is {got:?}, expected {want:?} within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = podman_output(&["rm", "-f", "-t", "0", name]);
        }
    }
}
