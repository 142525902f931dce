//! A real systemd, booted in a throw-away container with systemd-nspawn, for
//! whole-system tests that need units, a system bus and sd_notify.
//!
//! The container's root is an overlayfs whose lower layer is the host's own
//! root (read-only through the overlay) and whose upper layer lives in a
//! fresh directory under `/var/tmp`, so the container runs the host's
//! systemd, dbus and libraries, sees `/work` and the cargo target directory,
//! and everything it writes disappears with it. It gets a fresh machine id,
//! a private network namespace (only `lo`), its own cgroup subtree and a
//! unique machine name, so several containers can run at once, also from
//! tests running in parallel threads.
//!
//! Units that the host administrator enabled (`/etc/systemd/system/*.wants/`,
//! e.g. postgresql, podman) are masked inside, so the container boots to a
//! clean `running` state in about a second and never touches the host's
//! services; units shipped by packages (`/lib/systemd/system`) are untouched.
//!
//! Paths: [`Systemd::root`] is the overlay on the host side. nspawn mounts
//! tmpfs on `/run` and `/tmp` inside, so those (and `/proc`, `/sys`, `/dev`)
//! are only reachable through [`Systemd::live_path`], which goes through
//! `/proc/<leader>/root`. [`Systemd::write_file`] uses the live view, so it
//! works for every path.
//!
//! D-Bus from the host works: [`Systemd::system_bus_address`] points at the
//! container's bus socket through `/proc/<leader>/root/run/dbus/…`; there is
//! no user namespace, so EXTERNAL auth as uid 0 is root inside.
//!
//! Commands started with [`Systemd::exec`] run in all the container's
//! namespaces but stay in the test process's cgroup; anything long-running
//! belongs in a unit (or `systemd-run`).
//!
//! Every failure is an `Err` with details (the nspawn output, the failed
//! units, the journal tail): a test that needs systemd and cannot get it
//! fails, it does not skip. Dropping a [`Systemd`] (also while a test
//! panics) halts the container, unmounts the overlay and removes every
//! directory it made; leftovers of a test process that was killed are swept
//! by the next boot.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::apt::have;

/// The Debian package that provides `systemd-nspawn`.
pub const PACKAGE: &str = "systemd-container";

/// Where the throw-away layers go: a real disk, never inside an overlay.
const SCRATCH: &str = "/var/tmp";

/// Prefix of every scratch directory: `outpost-nspawn-<test pid>-<n>-<rand>`.
const PREFIX: &str = "outpost-nspawn-";

/// How long the container may take to reach `running` or `degraded`.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an orderly halt may take before the container is killed.
const HALT_TIMEOUT: Duration = Duration::from_secs(20);

/// The environment commands get inside: nothing leaks from the test process
/// (DBUS_SYSTEM_BUS_ADDRESS set for a host-side client must not reach them).
const ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("SYSTEMD_COLORS", "0"),
    ("SYSTEMD_PAGER", ""),
];

/// A booted systemd in a container. Dropping it halts and removes it.
#[derive(Debug)]
pub struct Systemd {
    name: String,
    dir: PathBuf,
    root: PathBuf,
    nspawn: Option<Child>,
    leader: u32,
    cgroups: Vec<PathBuf>,
    mounted: bool,
}

impl Systemd {
    /// Boots a fresh container and waits until systemd reports `running` or
    /// `degraded`. Installs systemd-container with apt when nspawn is missing.
    pub fn boot() -> Result<Systemd> {
        ensure_installed()?;
        sweep_stale();
        let started = Instant::now();
        let mut sd = Systemd::create()?;
        sd.start()?;
        sd.wait_running(started)?;
        eprintln!(
            "nspawn: {} booted in {:.1} s (leader pid {}, root {})",
            sd.name,
            started.elapsed().as_secs_f64(),
            sd.leader,
            sd.root.display()
        );
        Ok(sd)
    }

    /// The machine name, unique per container (also its hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The merged overlay root on the host side. It does not show what the
    /// container mounts itself (`/run`, `/tmp`, `/proc`…); see [`live_path`].
    ///
    /// [`live_path`]: Systemd::live_path
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host pid of the container's PID 1 (systemd).
    pub fn leader_pid(&self) -> u32 {
        self.leader
    }

    /// A host path for `path_in_container` as the container sees it,
    /// including its own mounts: `/proc/<leader>/root/<path>`.
    pub fn live_path(&self, path_in_container: &str) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.leader))
            .join(path_in_container.trim_start_matches('/'))
    }

    /// The container's system bus for a D-Bus client on the host, e.g. as
    /// `DBUS_SYSTEM_BUS_ADDRESS`. Goes through `/proc/<leader>/root` because
    /// `/run` inside is a tmpfs that the overlay root does not show.
    pub fn system_bus_address(&self) -> String {
        format!(
            "unix:path={}",
            self.live_path("/run/dbus/system_bus_socket").display()
        )
    }

    /// Runs `argv` inside (`nsenter -t LEADER -a -- argv…`) with a clean
    /// environment and stdin from /dev/null; returns its output whatever the
    /// exit status.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        if argv.is_empty() {
            bail!("exec: empty argv");
        }
        self.command(argv)
            .output()
            .with_context(|| format!("cannot run nsenter for {}", argv.join(" ")))
    }

    /// Runs `sh -c SCRIPT` inside; returns stdout, or an error with the exit
    /// status, stderr and stdout when it fails.
    pub fn sh(&self, script: &str) -> Result<String> {
        let out = self.exec(&["sh", "-c", script])?;
        if !out.status.success() {
            bail!(
                "in container {}: `{}` failed ({}):\nstderr: {}\nstdout: {}",
                self.name,
                script,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Writes a file inside (creating parent directories), through the live
    /// view so it works under `/run` and `/tmp` too.
    pub fn write_file(&self, path_in_container: &str, contents: &str) -> Result<()> {
        if !path_in_container.starts_with('/') {
            bail!("write_file: {path_in_container:?} is not absolute");
        }
        let path = self.live_path(path_in_container);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Writes `/etc/systemd/system/NAME` and runs `systemctl daemon-reload`.
    pub fn install_unit(&self, name: &str, unit_text: &str) -> Result<()> {
        if name.contains('/') || !name.contains('.') {
            bail!("install_unit: {name:?} is not a unit file name");
        }
        self.write_file(&format!("/etc/systemd/system/{name}"), unit_text)?;
        self.sh("systemctl daemon-reload")?;
        Ok(())
    }

    /// `systemctl show -p PROP UNIT --value` for each property, in order.
    pub fn unit_properties(&self, unit: &str, props: &[&str]) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(props.len());
        for p in props {
            let v = self.sh(&format!("systemctl show -p {p} --value -- {unit}"))?;
            out.push(v.trim_end_matches('\n').to_string());
        }
        Ok(out)
    }

    /// The last `lines` of the container's journal (for failure messages).
    pub fn journal_tail(&self, lines: usize) -> String {
        let n = lines.to_string();
        match self.exec(&["journalctl", "-b", "--no-pager", "-n", &n]) {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("(no journal: {e:#})"),
        }
    }

    fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .arg("--")
            .args(argv)
            .env_clear()
            .envs(ENV.iter().copied())
            .stdin(Stdio::null());
        cmd
    }

    /// Makes the scratch directory and the overlay; no process yet.
    fn create() -> Result<Systemd> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = machine_id()?;
        let name = format!("outpost-{pid}-{n}");
        let dir = Path::new(SCRATCH).join(format!("{PREFIX}{pid}-{n}-{}", &id[..8]));
        fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut sd = Systemd {
            name,
            root: dir.join("root"),
            dir,
            nspawn: None,
            leader: 0,
            cgroups: Vec::new(),
            mounted: false,
        };
        // From here on, Drop cleans up whatever exists.
        let upper = sd.dir.join("upper");
        for d in [&upper, &sd.dir.join("work"), &sd.root] {
            fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
        let etc = upper.join("etc");
        let units = etc.join("systemd/system");
        fs::create_dir_all(&units).with_context(|| format!("cannot create {}", units.display()))?;
        fs::write(etc.join("machine-id"), format!("{id}\n")).context("cannot write machine-id")?;
        fs::write(etc.join("hostname"), format!("{}\n", sd.name))
            .context("cannot write hostname")?;
        for unit in host_enabled_units() {
            let link = units.join(&unit);
            std::os::unix::fs::symlink("/dev/null", &link)
                .with_context(|| format!("cannot mask {unit}"))?;
        }
        let opts = format!(
            "lowerdir=/,upperdir={},workdir={}",
            upper.display(),
            sd.dir.join("work").display()
        );
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(&sd.root),
        )
        .context("cannot mount the overlay root (is overlayfs available?)")?;
        sd.mounted = true;
        Ok(sd)
    }

    /// Starts systemd-nspawn in its own cgroup and finds the container's
    /// PID 1.
    fn start(&mut self) -> Result<()> {
        self.cgroups = make_cgroups(&self.name)?;
        let listed: String = self
            .cgroups
            .iter()
            .map(|c| format!("{}\n", c.display()))
            .collect();
        fs::write(self.dir.join("cgroups"), listed).context("cannot write cgroups")?;
        let log = self.dir.join("console.log");
        let out = fs::File::create(&log).context("cannot create console.log")?;
        let err = out.try_clone().context("cannot dup console.log")?;
        // A shell moves itself into the fresh cgroups, then becomes nspawn:
        // nspawn with --keep-unit puts the container in `<own cgroup>/payload`,
        // which would be shared by every container started from one cgroup.
        let mut script = String::new();
        for cg in &self.cgroups {
            let _ = write!(script, "echo $$ > '{}/cgroup.procs' && ", cg.display());
        }
        script.push_str("exec \"$@\"");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("sh")
            .arg("systemd-nspawn")
            .arg("--quiet")
            .arg("--directory")
            .arg(&self.root)
            .arg(format!("--machine={}", self.name))
            .args([
                "--register=no",
                "--link-journal=no",
                "--keep-unit",
                "--private-network",
                "--console=pipe",
            ]);
        if let Some(bin_dir) = binary_dir() {
            cmd.arg(format!("--bind-ro={}", bin_dir.display()));
        }
        cmd.arg("--boot")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd.spawn().context("cannot start systemd-nspawn")?;
        let nspawn_pid = child.id();
        self.nspawn = Some(child);
        fs::write(self.dir.join("nspawn.pid"), nspawn_pid.to_string())
            .context("cannot write nspawn.pid")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(pid) = container_init(nspawn_pid) {
                self.leader = pid;
                return Ok(());
            }
            self.check_nspawn_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "container {}: no systemd PID 1 under nspawn pid {nspawn_pid} after 20 s\n{}",
                    self.name,
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_running(&mut self, started: Instant) -> Result<()> {
        let deadline = started + BOOT_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            self.check_nspawn_alive()?;
            let left = deadline.saturating_duration_since(Instant::now()).as_secs() + 1;
            // `--wait` blocks while `starting`; before systemd listens on its
            // private socket systemctl fails at once, so poll.
            let out = Command::new("timeout")
                .arg(left.to_string())
                .arg("nsenter")
                .arg("-t")
                .arg(self.leader.to_string())
                .args(["-a", "--", "systemctl", "is-system-running", "--wait"])
                .env_clear()
                .envs(ENV.iter().copied())
                .stdin(Stdio::null())
                .output()
                .context("cannot run nsenter")?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match state.as_str() {
                "running" => return Ok(()),
                "degraded" => {
                    let failed = self
                        .sh("systemctl --failed --no-legend --plain")
                        .unwrap_or_default();
                    eprintln!("nspawn: {} is degraded; failed units:\n{failed}", self.name);
                    return Ok(());
                }
                // "offline" is also what systemctl says before PID 1 has
                // created /run/systemd/system, so it is retried.
                "maintenance" | "stopping" => {
                    last = state;
                    break;
                }
                _ => {
                    last = format!("{state} {}", String::from_utf8_lossy(&out.stderr).trim());
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        bail!(
            "container {} did not reach running within {} s (last: {last})\n{}\n--- journal ---\n{}",
            self.name,
            BOOT_TIMEOUT.as_secs(),
            self.console(),
            self.journal_tail(60)
        )
    }

    fn check_nspawn_alive(&mut self) -> Result<()> {
        let Some(child) = self.nspawn.as_mut() else {
            bail!("nspawn is not running");
        };
        if let Some(status) = child.try_wait().context("cannot wait for nspawn")? {
            self.nspawn = None;
            bail!(
                "systemd-nspawn for {} exited early ({status})\n{}",
                self.name,
                self.console()
            );
        }
        Ok(())
    }

    fn console(&self) -> String {
        let text = fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        format!("--- nspawn output ---\n{}", text.trim_end())
    }

    /// Halts the container: SIGTERM to nspawn asks systemd for an orderly
    /// poweroff; SIGKILL to PID 1 ends the whole pid namespace if it hangs.
    fn halt(&mut self) {
        let Some(mut child) = self.nspawn.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            signal(child.id(), "TERM");
            let deadline = Instant::now() + HALT_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("nspawn: {} did not halt in time; killing it", self.name);
                if self.leader != 0 {
                    signal(self.leader, "KILL");
                }
                std::thread::sleep(Duration::from_millis(500));
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        self.halt();
        let propagate = Path::new("/run/systemd/nspawn/propagate").join(&self.name);
        let _ = fs::remove_dir_all(propagate);
        if self.mounted {
            self.mounted = !unmount(&self.root);
        }
        remove_cgroups(&self.cgroups);
        if self.mounted {
            // Never delete through a mounted overlay: leave it for the sweep.
            eprintln!(
                "nspawn: {} is still mounted; leaving it",
                self.root.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("nspawn: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Installs systemd-container with apt when `systemd-nspawn` is missing.
/// Safe to call from many threads: the work is done once per process.
pub fn ensure_installed() -> Result<()> {
    static DONE: OnceLock<Mutex<bool>> = OnceLock::new();
    let lock = DONE.get_or_init(|| Mutex::new(false));
    let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    if !have("systemd-nspawn", "--version") {
        crate::apt::install(&[PACKAGE]).context("installing systemd-nspawn")?;
        if !have("systemd-nspawn", "--version") {
            bail!("{PACKAGE} is installed but systemd-nspawn does not run");
        }
    }
    for tool in ["nsenter", "mount", "umount", "timeout"] {
        if !have(tool, "--version") {
            bail!("{tool} is missing (util-linux/coreutils)");
        }
    }
    *done = true;
    Ok(())
}

/// The `outpost` binary built next to the running test executable
/// (`target/<profile>/outpost`), else under `$CARGO_TARGET_DIR` or the
/// workspace's `target/debug`. It is visible inside the container at the
/// same path.
pub fn outpost_binary() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = binary_dir() {
        candidates.push(dir.join("outpost"));
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("debug/outpost"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/outpost"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| {
            anyhow!(
                "no outpost binary at any of {candidates:?}; run `cargo build -p outpost --bin outpost` first"
            )
        })
}

/// `target/<profile>` of the running test executable
/// (`target/<profile>/deps/<test>-<hash>`).
fn binary_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    Some(deps.parent()?.to_path_buf())
}

/// Runs a command to completion; an error carries its stderr.
fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// 32 lowercase hex digits, as /etc/machine-id wants, from the kernel.
fn machine_id() -> Result<String> {
    let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").context("cannot read a uuid")?;
    let id: String = uuid.trim().chars().filter(|c| *c != '-').collect();
    if id.len() != 32 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("odd uuid from the kernel: {uuid:?}");
    }
    Ok(id.to_ascii_lowercase())
}

/// Unit names the host administrator enabled (`/etc/systemd/system/*.wants/`),
/// minus targets: these are masked in the container.
fn host_enabled_units() -> Vec<String> {
    let mut units = Vec::new();
    let Ok(dirs) = fs::read_dir("/etc/systemd/system") else {
        return units;
    };
    for d in dirs.flatten() {
        let dname = d.file_name().to_string_lossy().into_owned();
        if !dname.ends_with(".wants") {
            continue;
        }
        let Ok(entries) = fs::read_dir(d.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let unit = e.file_name().to_string_lossy().into_owned();
            if !unit.ends_with(".target") && !units.contains(&unit) {
                units.push(unit);
            }
        }
    }
    units.sort();
    units
}

/// The container's PID 1: a child of nspawn that is pid 1 in its own pid
/// namespace and has become systemd.
fn container_init(nspawn_pid: u32) -> Option<u32> {
    for pid in children(nspawn_pid) {
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let inner_one = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|ids| {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                ids.len() > 1 && ids.last() == Some(&"1")
            });
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if inner_one && comm.trim() == "systemd" {
            return Some(pid);
        }
    }
    None
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Unmounts, retrying briefly, then lazily. True when it is gone.
fn unmount(path: &Path) -> bool {
    for _ in 0..10 {
        if !is_mounted(path) {
            return true;
        }
        let _ = Command::new("umount")
            .arg(path)
            .stderr(Stdio::null())
            .status();
        if !is_mounted(path) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = Command::new("umount").arg("-l").arg(path).status();
    !is_mounted(path)
}

fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| mp == want)
}

/// Creates `<hierarchy>/<own cgroup>/<name>` in the unified hierarchy and,
/// on hybrid hosts, the v1 `name=systemd` one (the two nspawn uses).
fn make_cgroups(name: &str) -> Result<Vec<PathBuf>> {
    let own = fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
    let info = fs::read_to_string("/proc/self/mountinfo").context("cannot read mountinfo")?;
    let mut made = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let mount = if controllers.is_empty() {
            cgroup_mount(&info, |fstype, _| fstype == "cgroup2")
        } else if controllers == "name=systemd" {
            cgroup_mount(&info, |fstype, opts| {
                fstype == "cgroup" && opts.split(',').any(|o| o == "name=systemd")
            })
        } else {
            continue;
        };
        let Some(mount) = mount else { continue };
        let dir = mount
            .join(path.trim_start_matches('/'))
            .join(format!("{PREFIX}{name}"));
        fs::create_dir(&dir).with_context(|| format!("cannot create cgroup {}", dir.display()))?;
        made.push(dir);
    }
    if made.is_empty() {
        bail!("found no cgroup hierarchy for the container in /proc/self/cgroup:\n{own}");
    }
    Ok(made)
}

fn cgroup_mount(mountinfo: &str, is: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(fstype), Some(opts), Some(mp)) =
            (fields.get(sep + 1), fields.get(sep + 3), fields.get(4))
        else {
            continue;
        };
        if is(fstype, opts) {
            return Some(PathBuf::from(mp));
        }
    }
    None
}

/// Removes cgroup trees bottom-up (a cgroup can go once it has no
/// processes; that takes a moment after the container exits).
fn remove_cgroups(roots: &[PathBuf]) {
    for root in roots {
        for _ in 0..20 {
            rmdir_tree(root);
            if !root.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if root.exists() {
            eprintln!("nspawn: cannot remove cgroup {}", root.display());
        }
    }
}

fn rmdir_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Cleans up after test processes that died without dropping their
/// containers: scratch dirs whose owning pid is gone get their nspawn
/// killed, their overlay unmounted and their cgroups and files removed.
fn sweep_stale() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(entries) = fs::read_dir(SCRATCH) else {
            return;
        };
        for e in entries.flatten() {
            let fname = e.file_name().to_string_lossy().into_owned();
            let Some(owner) = fname
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            sweep_one(&e.path());
        }
    });
}

fn sweep_one(dir: &Path) {
    eprintln!("nspawn: sweeping stale {}", dir.display());
    let root = dir.join("root");
    if let Some(pid) = fs::read_to_string(dir.join("nspawn.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&*root.to_string_lossy()) {
            for leader in children(pid) {
                signal(leader, "KILL");
            }
            signal(pid, "KILL");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let cgroups: Vec<PathBuf> = fs::read_to_string(dir.join("cgroups"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("/sys/fs/cgroup/") && l.contains(PREFIX))
        .map(PathBuf::from)
        .collect();
    remove_cgroups(&cgroups);
    // nspawn's image lock, named after the root directory's device and inode.
    if let Ok(meta) = fs::metadata(&root) {
        use std::os::unix::fs::MetadataExt;
        let lock = format!(
            "/run/systemd/nspawn/locks/inode-{}:{}",
            meta.dev(),
            meta.ino()
        );
        let _ = fs::remove_file(lock);
    }
    if !unmount(&root) {
        eprintln!("nspawn: cannot unmount stale {}", root.display());
        return;
    }
    // nspawn's own leftover for this machine name (`outpost-<pid>-<n>`).
    if let Some(machine) = dir
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .and_then(|f| {
            let rest = f.strip_prefix(PREFIX)?;
            let (pid_n, _rand) = rest.rsplit_once('-')?;
            Some(format!("outpost-{pid_n}"))
        })
    {
        let _ = fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(machine));
    }
    let _ = fs::remove_dir_all(dir);
}
