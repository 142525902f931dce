//! Host metrics from procfs and sysfs, sampled once a second.
//!
//! This is the hot path. The collector reads every file into one reused
//! buffer, builds each signal name once (when a device first shows up) and
//! keeps per-device state in maps keyed by the kernel's name, so a steady
//! sample allocates little beyond what procfs-core's parsers allocate inside.
//! Files are parsed with procfs-core (`KernelStats`, `LoadAverage`,
//! `DiskStat`, `InterfaceDeviceStatus`, pressure records, `MountEntry`),
//! except `/proc/meminfo`: see [`parse_meminfo`].
//!
//! Signals (rates per second, percentages 0-100, sizes in MiB):
//!
//! | name | source |
//! |---|---|
//! | `host.cpu.{busy,user,system,iowait,steal}_pct` | deltas of the `cpu` line of `/proc/stat`; `user` includes nice, `system` includes irq and softirq, so `busy = user + system + steal` |
//! | `host.load.{1m,5m,15m}` | `/proc/loadavg` |
//! | `host.procs.count` | `/proc/loadavg`: kernel scheduling entities (processes and threads) |
//! | `host.mem.{available_mb,used_mb,used_pct}`, `host.swap.used_mb` | `/proc/meminfo`; used = total - available |
//! | `host.psi.{cpu.some,memory.some,memory.full,io.some,io.full}_avg10` | `/proc/pressure/*` |
//! | `host.disk.{mount}.{used_pct,avail_mb}` | `statvfs` of block-device mounts in `/proc/mounts` (as `df`: used / (used + available to users)) |
//! | `host.diskio.{dev}.{read,write}_bps` | `/proc/diskstats`, whole disks only, bytes per second |
//! | `host.net.{iface}.{rx,tx}_bps`, `{rx,tx}_errors_ps`, `{rx,tx}_drops_ps` | `/proc/net/dev`, every interface but `lo`, bytes per second |
//! | `host.thermal.zone{N}.temp_c` | `/sys/class/thermal/thermal_zone{N}/temp` |
//!
//! Every source may be missing (a container without `/proc/pressure`, a VM
//! without thermal zones, an unreadable file): it is logged once when it goes
//! away and once when it comes back, and its signals are absent meanwhile.
//! A counter that goes backwards (wrap, device reset) gives no rate for that
//! sample; devices, interfaces and mounts that appear later are picked up and
//! ones that vanish are dropped.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use procfs_core::net::InterfaceDeviceStatus;
use procfs_core::{
    parse_pressure_record, CpuTime, DiskStat, ExplicitSystemInfo, FromBufRead, FromBufReadSI,
    FromRead, KernelStats, LoadAverage, MountEntry, ProcError,
};

use super::{sanitize_segment, Availability, Sample, SignalName};

/// How often the mount list and the thermal zones are re-read.
const REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// Upper bound on watched mounts, so a host with hundreds of bind mounts of
/// distinct devices cannot flood the sample.
const MAX_MOUNTS: usize = 32;
/// `/proc/diskstats` counts 512-byte sectors whatever the device's sector size.
const SECTOR_BYTES: f64 = 512.0;
const MIB: f64 = 1024.0 * 1024.0;

/// procfs-core wants system info to parse `/proc/stat`; it only uses it to
/// convert ticks to time, and the percentages here are ratios of ticks.
const SYSTEM_INFO: ExplicitSystemInfo = ExplicitSystemInfo {
    boot_time_secs: 0,
    ticks_per_second: 100,
    page_size: 4096,
    is_little_endian: cfg!(target_endian = "little"),
};

/// File systems that live on storage the operator cares about. Network file
/// systems are left out on purpose: `statvfs` on a hung NFS server blocks.
const STORAGE_FS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "bcachefs", "vfat", "msdos", "exfat", "f2fs", "zfs",
    "jfs", "reiserfs", "ntfs", "ntfs3", "fuseblk", "nilfs2", "hfsplus", "ubifs", "jffs2",
];

/// Block devices that are never interesting: loop devices (snaps), RAM
/// disks, zram swap, network block devices, floppies and optical drives.
const SKIP_DISK_PREFIXES: &[&str] = &["loop", "ram", "zram", "nbd", "fd", "sr"];

#[derive(Debug, thiserror::Error)]
enum SourceError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("cannot parse: {0}")]
    Parse(#[from] ProcError),
    #[error("not UTF-8")]
    Utf8(#[from] std::str::Utf8Error),
    #[error("no {0} field")]
    Missing(&'static str),
}

/// Interfaces that are not watched: loopback, and the per-container and
/// per-VM ends (veth, calico, tap, vnet) that come and go with every
/// container: each would add and drop six signals, and every such change
/// is a new feature schema in the store.
const SKIPPED_INTERFACE_PREFIXES: [&str; 5] = ["veth", "cali", "tap", "vnet", "lxc"];

fn skip_interface(name: &str) -> bool {
    name == "lo"
        || SKIPPED_INTERFACE_PREFIXES
            .iter()
            .any(|p| name.starts_with(p))
}

/// `statvfs(2)` figures for one mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FsUsage {
    /// Fragment size: the unit of the block counts.
    pub frsize: u64,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
}

type StatvfsFn = fn(&Path) -> io::Result<FsUsage>;

/// `statvfs(2)` of a mount point.
fn statvfs(path: &Path) -> io::Result<FsUsage> {
    let st = rustix::fs::statvfs(path)?;
    Ok(FsUsage {
        frsize: st.f_frsize,
        blocks: st.f_blocks,
        bfree: st.f_bfree,
        bavail: st.f_bavail,
    })
}

/// One file (or directory of files) that feeds some signals, with its
/// log-once availability.
struct Source {
    path: PathBuf,
    what: &'static str,
    /// Optional sources (pressure, thermal) are missing on many hosts: their
    /// absence is logged at INFO, a core source's at WARN.
    optional: bool,
    avail: Availability,
}

impl Source {
    fn new(path: PathBuf, what: &'static str, optional: bool) -> Self {
        Source {
            path,
            what,
            optional,
            avail: Availability::default(),
        }
    }

    fn ok(&mut self) {
        if self.avail.ok() {
            tracing::info!(source = self.what, path = %self.path.display(), "host metric source available again");
        }
    }

    fn fail(&mut self, err: &dyn fmt::Display) {
        if self.avail.fail() {
            if self.optional {
                tracing::info!(source = self.what, path = %self.path.display(), error = %err, "host metric source not available; its signals are skipped");
            } else {
                tracing::warn!(source = self.what, path = %self.path.display(), error = %err, "host metric source not available; its signals are skipped");
            }
        }
    }

    fn track<T>(&mut self, r: Result<T, SourceError>) -> Option<T> {
        match r {
            Ok(v) => {
                self.ok();
                Some(v)
            }
            Err(e) => {
                self.fail(&e);
                None
            }
        }
    }
}

/// Reads a whole file into `buf`, reusing its allocation.
fn read_file(path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    File::open(path)?.read_to_end(buf)?;
    Ok(())
}

fn read_text<'b>(path: &Path, buf: &'b mut Vec<u8>) -> Result<&'b str, SourceError> {
    read_file(path, buf)?;
    Ok(std::str::from_utf8(buf)?)
}

/// Load averages and PSI averages are printed with two decimals; procfs-core
/// parses them into `f32`, which would turn 0.26 into 0.25999999.
fn two_decimals(v: f32) -> f64 {
    (f64::from(v) * 100.0).round() / 100.0
}

fn sig(name: &str) -> SignalName {
    Arc::from(name)
}

/// Seconds between two instants; `None` when time did not move forward.
fn seconds(prev: Instant, now: Instant) -> Option<f64> {
    let dt = now.saturating_duration_since(prev).as_secs_f64();
    (dt > 0.0).then_some(dt)
}

/// Per-second rate of a counter; `None` when it went backwards.
fn rate(prev: u64, cur: u64, dt: f64) -> Option<f64> {
    cur.checked_sub(prev).map(|d| d as f64 / dt)
}

/// The fixed signal names, built once.
struct Names {
    cpu_busy: SignalName,
    cpu_user: SignalName,
    cpu_system: SignalName,
    cpu_iowait: SignalName,
    cpu_steal: SignalName,
    load_1m: SignalName,
    load_5m: SignalName,
    load_15m: SignalName,
    procs_count: SignalName,
    mem_available: SignalName,
    mem_used: SignalName,
    mem_used_pct: SignalName,
    swap_used: SignalName,
    psi_cpu_some: SignalName,
    psi_memory_some: SignalName,
    psi_memory_full: SignalName,
    psi_io_some: SignalName,
    psi_io_full: SignalName,
}

impl Names {
    fn new() -> Self {
        Names {
            cpu_busy: sig("host.cpu.busy_pct"),
            cpu_user: sig("host.cpu.user_pct"),
            cpu_system: sig("host.cpu.system_pct"),
            cpu_iowait: sig("host.cpu.iowait_pct"),
            cpu_steal: sig("host.cpu.steal_pct"),
            load_1m: sig("host.load.1m"),
            load_5m: sig("host.load.5m"),
            load_15m: sig("host.load.15m"),
            procs_count: sig("host.procs.count"),
            mem_available: sig("host.mem.available_mb"),
            mem_used: sig("host.mem.used_mb"),
            mem_used_pct: sig("host.mem.used_pct"),
            swap_used: sig("host.swap.used_mb"),
            psi_cpu_some: sig("host.psi.cpu.some_avg10"),
            psi_memory_some: sig("host.psi.memory.some_avg10"),
            psi_memory_full: sig("host.psi.memory.full_avg10"),
            psi_io_some: sig("host.psi.io.some_avg10"),
            psi_io_full: sig("host.psi.io.full_avg10"),
        }
    }
}

/// The `cpu` line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CpuTicks {
    user: u64,
    nice: u64,
    system: u64,
    idle: u64,
    iowait: u64,
    irq: u64,
    softirq: u64,
    steal: u64,
}

impl CpuTicks {
    fn from_cpu_time(t: &CpuTime) -> Self {
        CpuTicks {
            user: t.user,
            nice: t.nice,
            system: t.system,
            idle: t.idle,
            iowait: t.iowait.unwrap_or(0),
            irq: t.irq.unwrap_or(0),
            softirq: t.softirq.unwrap_or(0),
            steal: t.steal.unwrap_or(0),
        }
    }

    /// Guest time is already inside user time, so it is not added again.
    fn total(&self) -> u64 {
        self.user
            .saturating_add(self.nice)
            .saturating_add(self.system)
            .saturating_add(self.idle)
            .saturating_add(self.iowait)
            .saturating_add(self.irq)
            .saturating_add(self.softirq)
            .saturating_add(self.steal)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuPcts {
    busy: f64,
    user: f64,
    system: f64,
    iowait: f64,
    steal: f64,
}

/// Percentages between two readings. `None` when the total went backwards
/// (CPU hot-unplug) or did not move. A single field going backwards (iowait
/// does, per proc(5)) counts as zero rather than dropping the sample.
fn cpu_pcts(prev: &CpuTicks, cur: &CpuTicks) -> Option<CpuPcts> {
    if cur.total() < prev.total() {
        return None;
    }
    let user = cur.user.saturating_sub(prev.user) + cur.nice.saturating_sub(prev.nice);
    let system = cur.system.saturating_sub(prev.system)
        + cur.irq.saturating_sub(prev.irq)
        + cur.softirq.saturating_sub(prev.softirq);
    let steal = cur.steal.saturating_sub(prev.steal);
    let iowait = cur.iowait.saturating_sub(prev.iowait);
    let idle = cur.idle.saturating_sub(prev.idle);
    let total = user + system + steal + iowait + idle;
    if total == 0 {
        return None;
    }
    let pct = |v: u64| v as f64 * 100.0 / total as f64;
    Some(CpuPcts {
        busy: pct(user + system + steal),
        user: pct(user),
        system: pct(system),
        iowait: pct(iowait),
        steal: pct(steal),
    })
}

/// A block device line of `/proc/diskstats`. `io` is `None` for devices that
/// are skipped (partitions), so they are classified once, not every sample.
struct Disk {
    io: Option<DiskIo>,
    seen: u64,
}

struct DiskIo {
    read_bps: SignalName,
    write_bps: SignalName,
    /// Sectors read, sectors written, when.
    prev: Option<(u64, u64, Instant)>,
}

/// One interface of `/proc/net/dev`.
struct Iface {
    /// rx_bps, tx_bps, rx_errors_ps, tx_errors_ps, rx_drops_ps, tx_drops_ps.
    names: [SignalName; 6],
    /// The matching counters, and when they were read.
    prev: Option<([u64; 6], Instant)>,
    seen: u64,
}

/// One watched mount.
struct Mount {
    path: PathBuf,
    spec: String,
    segment: String,
    used_pct: SignalName,
    avail_mb: SignalName,
    avail: Availability,
}

/// One thermal zone.
struct Zone {
    temp: PathBuf,
    name: SignalName,
}

/// Host metrics collector.
pub struct HostCollector {
    names: Names,
    buf: Vec<u8>,
    generation: u64,

    stat: Source,
    /// Percentages are ratios of ticks, so no timestamp is needed.
    cpu_prev: Option<CpuTicks>,
    loadavg: Source,
    meminfo: Source,

    pressure: Source,
    pressure_files: [PathBuf; 3],

    diskstats: Source,
    sys_block: PathBuf,
    disks: HashMap<String, Disk>,

    netdev: Source,
    ifaces: HashMap<String, Iface>,

    mounts_src: Source,
    mounts: Vec<Mount>,
    mounts_at: Option<Instant>,
    statvfs: StatvfsFn,

    thermal: Source,
    zones: Vec<Zone>,
    zones_at: Option<Instant>,
}

impl HostCollector {
    pub fn new(proc_root: &Path, sys_root: &Path) -> Self {
        let pressure = proc_root.join("pressure");
        HostCollector {
            names: Names::new(),
            buf: Vec::with_capacity(16 * 1024),
            generation: 0,
            stat: Source::new(proc_root.join("stat"), "cpu", false),
            cpu_prev: None,
            loadavg: Source::new(proc_root.join("loadavg"), "load", false),
            meminfo: Source::new(proc_root.join("meminfo"), "memory", false),
            pressure_files: [
                pressure.join("cpu"),
                pressure.join("memory"),
                pressure.join("io"),
            ],
            pressure: Source::new(pressure, "pressure", true),
            diskstats: Source::new(proc_root.join("diskstats"), "disk io", false),
            sys_block: sys_root.join("block"),
            disks: HashMap::new(),
            netdev: Source::new(proc_root.join("net/dev"), "network", false),
            ifaces: HashMap::new(),
            mounts_src: Source::new(proc_root.join("mounts"), "mounts", false),
            mounts: Vec::new(),
            mounts_at: None,
            statvfs,
            thermal: Source::new(sys_root.join("class/thermal"), "thermal", true),
            zones: Vec::new(),
            zones_at: None,
        }
    }

    /// `now` is a monotonic instant used for rates; the first call yields no rates.
    pub fn collect(&mut self, now: Instant, sample: &mut Sample) {
        self.generation = self.generation.wrapping_add(1);
        self.collect_cpu(sample);
        self.collect_load(sample);
        self.collect_memory(sample);
        self.collect_pressure(sample);
        self.collect_disk_usage(now, sample);
        self.collect_disk_io(now, sample);
        self.collect_net(now, sample);
        self.collect_thermal(now, sample);
    }

    fn collect_cpu(&mut self, sample: &mut Sample) {
        let parsed = read_file(&self.stat.path, &mut self.buf)
            .map_err(SourceError::from)
            .and_then(|()| {
                <KernelStats as FromBufReadSI>::from_buf_read(&self.buf[..], &SYSTEM_INFO)
                    .map_err(SourceError::from)
            });
        let Some(stats) = self.stat.track(parsed) else {
            self.cpu_prev = None;
            return;
        };
        let cur = CpuTicks::from_cpu_time(&stats.total);
        if let Some(prev) = self.cpu_prev {
            if let Some(p) = cpu_pcts(&prev, &cur) {
                let n = &self.names;
                sample.push(&n.cpu_busy, p.busy);
                sample.push(&n.cpu_user, p.user);
                sample.push(&n.cpu_system, p.system);
                sample.push(&n.cpu_iowait, p.iowait);
                sample.push(&n.cpu_steal, p.steal);
            }
        }
        self.cpu_prev = Some(cur);
    }

    fn collect_load(&mut self, sample: &mut Sample) {
        let parsed = read_file(&self.loadavg.path, &mut self.buf)
            .map_err(SourceError::from)
            .and_then(|()| LoadAverage::from_read(&self.buf[..]).map_err(SourceError::from));
        let Some(load) = self.loadavg.track(parsed) else {
            return;
        };
        let n = &self.names;
        sample.push(&n.load_1m, two_decimals(load.one));
        sample.push(&n.load_5m, two_decimals(load.five));
        sample.push(&n.load_15m, two_decimals(load.fifteen));
        sample.push(&n.procs_count, f64::from(load.max));
    }

    fn collect_memory(&mut self, sample: &mut Sample) {
        let parsed = read_text(&self.meminfo.path, &mut self.buf)
            .and_then(|text| parse_meminfo(text).ok_or(SourceError::Missing("MemTotal")));
        let Some(mem) = self.meminfo.track(parsed) else {
            return;
        };
        let used = mem.total - mem.available;
        let n = &self.names;
        sample.push(&n.mem_available, mem.available as f64 / MIB);
        sample.push(&n.mem_used, used as f64 / MIB);
        if mem.total > 0 {
            sample.push(&n.mem_used_pct, used as f64 * 100.0 / mem.total as f64);
        }
        sample.push(&n.swap_used, mem.swap_used as f64 / MIB);
    }

    fn collect_pressure(&mut self, sample: &mut Sample) {
        let mut failure: Option<SourceError> = None;
        for (i, path) in self.pressure_files.iter().enumerate() {
            let text = match read_text(path, &mut self.buf) {
                Ok(t) => t,
                Err(e) => {
                    failure.get_or_insert(e);
                    continue;
                }
            };
            let (some, full) = match i {
                0 => (Some(&self.names.psi_cpu_some), None),
                1 => (
                    Some(&self.names.psi_memory_some),
                    Some(&self.names.psi_memory_full),
                ),
                _ => (Some(&self.names.psi_io_some), Some(&self.names.psi_io_full)),
            };
            for line in text.lines() {
                // parse_pressure_record slices past "some "; never hand it less.
                let name = if line.starts_with("some ") {
                    some
                } else if line.starts_with("full ") {
                    full
                } else {
                    None
                };
                let Some(name) = name else { continue };
                match parse_pressure_record(line) {
                    Ok(rec) => sample.push(name, two_decimals(rec.avg10)),
                    Err(e) => {
                        failure.get_or_insert(e.into());
                    }
                }
            }
        }
        match failure {
            None => self.pressure.ok(),
            Some(e) => self.pressure.fail(&e),
        }
    }

    fn collect_disk_usage(&mut self, now: Instant, sample: &mut Sample) {
        if self
            .mounts_at
            .is_none_or(|at| now.saturating_duration_since(at) >= REFRESH_INTERVAL)
        {
            self.refresh_mounts();
            self.mounts_at = Some(now);
        }
        for m in &mut self.mounts {
            match (self.statvfs)(&m.path) {
                Ok(u) => {
                    if m.avail.ok() {
                        tracing::info!(mount = %m.path.display(), "disk usage available again");
                    }
                    let used = u.blocks.saturating_sub(u.bfree);
                    let denom = used.saturating_add(u.bavail);
                    if denom > 0 {
                        sample.push(&m.used_pct, used as f64 * 100.0 / denom as f64);
                    }
                    sample.push(&m.avail_mb, u.bavail as f64 * u.frsize as f64 / MIB);
                }
                // Unmounted since the last refresh, or a fixture proc root
                // naming paths this host does not have.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    if m.avail.fail() {
                        tracing::warn!(mount = %m.path.display(), error = %e, "cannot read disk usage; skipping this mount");
                    }
                }
            }
        }
    }

    fn refresh_mounts(&mut self) {
        let parsed = read_file(&self.mounts_src.path, &mut self.buf)
            .map_err(SourceError::from)
            .and_then(|()| {
                <Vec<MountEntry> as FromBufRead>::from_buf_read(&self.buf[..])
                    .map_err(SourceError::from)
            });
        let Some(entries) = self.mounts_src.track(parsed) else {
            // Keep the previous list: a transient read failure should not
            // make every disk signal vanish for a minute.
            return;
        };
        let mut old = std::mem::take(&mut self.mounts);
        let mut next: Vec<Mount> = Vec::new();
        for e in entries {
            if next.len() >= MAX_MOUNTS {
                tracing::debug!(
                    max = MAX_MOUNTS,
                    "more storage mounts than watched; ignoring the rest"
                );
                break;
            }
            let mount_point = unescape_mount(&e.fs_file);
            if !is_storage_mount(&e.fs_vfstype, &mount_point) {
                continue;
            }
            // Bind mounts and btrfs subvolumes repeat a device: same figures.
            if next.iter().any(|m| m.spec == e.fs_spec) {
                continue;
            }
            let path = PathBuf::from(mount_point);
            if let Some(pos) = old
                .iter()
                .position(|m| m.path == path && m.spec == e.fs_spec)
            {
                next.push(old.swap_remove(pos));
                continue;
            }
            let segment = sanitize_segment(&path.to_string_lossy());
            if next.iter().any(|m| m.segment == segment) {
                tracing::debug!(mount = %path.display(), segment = %segment, "mount name collides with another; ignoring it");
                continue;
            }
            next.push(Mount {
                used_pct: sig(&format!("host.disk.{segment}.used_pct")),
                avail_mb: sig(&format!("host.disk.{segment}.avail_mb")),
                path,
                spec: e.fs_spec,
                segment,
                avail: Availability::default(),
            });
        }
        self.mounts = next;
    }

    fn collect_disk_io(&mut self, now: Instant, sample: &mut Sample) {
        let text = match read_text(&self.diskstats.path, &mut self.buf) {
            Ok(t) => {
                self.diskstats.ok();
                t
            }
            Err(e) => {
                self.diskstats.fail(&e);
                return;
            }
        };
        let generation = self.generation;
        for line in text.lines() {
            let Some(name) = line.split_whitespace().nth(2) else {
                continue;
            };
            if SKIP_DISK_PREFIXES.iter().any(|p| name.starts_with(p)) {
                continue;
            }
            if !self.disks.contains_key(name) {
                let io = is_whole_disk(&self.sys_block, name).then(|| {
                    let seg = sanitize_segment(name);
                    DiskIo {
                        read_bps: sig(&format!("host.diskio.{seg}.read_bps")),
                        write_bps: sig(&format!("host.diskio.{seg}.write_bps")),
                        prev: None,
                    }
                });
                self.disks.insert(name.to_owned(), Disk { io, seen: 0 });
            }
            let Some(disk) = self.disks.get_mut(name) else {
                continue;
            };
            disk.seen = generation;
            let Some(io) = disk.io.as_mut() else { continue };
            let stat = match DiskStat::from_line(line) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(device = name, error = %e, "unparsable diskstats line");
                    io.prev = None;
                    continue;
                }
            };
            if let Some((r, w, at)) = io.prev {
                if let Some(dt) = seconds(at, now) {
                    if let Some(v) = rate(r, stat.sectors_read, dt) {
                        sample.push(&io.read_bps, v * SECTOR_BYTES);
                    }
                    if let Some(v) = rate(w, stat.sectors_written, dt) {
                        sample.push(&io.write_bps, v * SECTOR_BYTES);
                    }
                }
            }
            io.prev = Some((stat.sectors_read, stat.sectors_written, now));
        }
        self.disks.retain(|_, d| d.seen == generation);
    }

    fn collect_net(&mut self, now: Instant, sample: &mut Sample) {
        let parsed = read_file(&self.netdev.path, &mut self.buf)
            .map_err(SourceError::from)
            .and_then(|()| {
                <InterfaceDeviceStatus as FromBufRead>::from_buf_read(&self.buf[..])
                    .map_err(SourceError::from)
            });
        let Some(status) = self.netdev.track(parsed) else {
            return;
        };
        let generation = self.generation;
        for (name, dev) in &status.0 {
            if skip_interface(name) {
                continue;
            }
            let iface = self.ifaces.entry(name.clone()).or_insert_with(|| {
                let seg = sanitize_segment(name);
                Iface {
                    names: [
                        sig(&format!("host.net.{seg}.rx_bps")),
                        sig(&format!("host.net.{seg}.tx_bps")),
                        sig(&format!("host.net.{seg}.rx_errors_ps")),
                        sig(&format!("host.net.{seg}.tx_errors_ps")),
                        sig(&format!("host.net.{seg}.rx_drops_ps")),
                        sig(&format!("host.net.{seg}.tx_drops_ps")),
                    ],
                    prev: None,
                    seen: 0,
                }
            });
            iface.seen = generation;
            let cur = [
                dev.recv_bytes,
                dev.sent_bytes,
                dev.recv_errs,
                dev.sent_errs,
                dev.recv_drop,
                dev.sent_drop,
            ];
            if let Some((prev, at)) = iface.prev {
                if let Some(dt) = seconds(at, now) {
                    for ((name, p), c) in iface.names.iter().zip(prev).zip(cur) {
                        if let Some(v) = rate(p, c, dt) {
                            sample.push(name, v);
                        }
                    }
                }
            }
            iface.prev = Some((cur, now));
        }
        self.ifaces.retain(|_, i| i.seen == generation);
    }

    fn collect_thermal(&mut self, now: Instant, sample: &mut Sample) {
        if self
            .zones_at
            .is_none_or(|at| now.saturating_duration_since(at) >= REFRESH_INTERVAL)
        {
            self.refresh_zones();
            self.zones_at = Some(now);
        }
        for z in &self.zones {
            // A zone whose sensor is off (EINVAL, ENODATA) just has no value.
            let Ok(text) = read_text(&z.temp, &mut self.buf) else {
                continue;
            };
            if let Ok(milli) = text.trim().parse::<i64>() {
                sample.push(&z.name, milli as f64 / 1000.0);
            }
        }
    }

    fn refresh_zones(&mut self) {
        let listed = std::fs::read_dir(&self.thermal.path).map(|rd| {
            let mut dirs: Vec<(u32, PathBuf)> = rd
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name();
                    let idx = name.to_str()?.strip_prefix("thermal_zone")?.parse().ok()?;
                    Some((idx, e.path()))
                })
                .collect();
            dirs.sort_unstable_by_key(|(i, _)| *i);
            dirs
        });
        let dirs = match listed {
            Ok(d) if d.is_empty() => {
                self.thermal.fail(&"no thermal zones");
                self.zones.clear();
                return;
            }
            Ok(d) => d,
            Err(e) => {
                self.thermal.fail(&e);
                self.zones.clear();
                return;
            }
        };
        self.thermal.ok();
        let mut old = std::mem::take(&mut self.zones);
        for (idx, dir) in dirs {
            let temp = dir.join("temp");
            if let Some(pos) = old.iter().position(|z| z.temp == temp) {
                self.zones.push(old.swap_remove(pos));
            } else {
                self.zones.push(Zone {
                    name: sig(&format!("host.thermal.zone{idx}.temp_c")),
                    temp,
                });
            }
        }
    }
}

/// The `/proc/meminfo` figures used here, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemFigures {
    total: u64,
    available: u64,
    swap_used: u64,
}

/// Reads the handful of `/proc/meminfo` lines used here. procfs-core's
/// `Meminfo` builds a map of all ~55 lines each call (over a hundred
/// allocations a second) and refuses files that lack fields this collector
/// never reads (gVisor's, for one); this needs only `MemTotal`.
fn parse_meminfo(text: &str) -> Option<MemFigures> {
    let (mut total, mut free, mut available, mut buffers, mut cached) = (None, 0, None, 0, 0);
    let (mut swap_total, mut swap_free) = (0u64, 0u64);
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut words = rest.split_ascii_whitespace();
        let Some(value) = words.next().and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        let bytes = match words.next() {
            Some("kB") => value.saturating_mul(1024),
            None => value,
            Some(_) => continue,
        };
        match key {
            "MemTotal" => total = Some(bytes),
            "MemFree" => free = bytes,
            "MemAvailable" => available = Some(bytes),
            "Buffers" => buffers = bytes,
            "Cached" => cached = bytes,
            "SwapTotal" => swap_total = bytes,
            "SwapFree" => swap_free = bytes,
            _ => {}
        }
    }
    let total = total?;
    // Kernels before 3.14 have no MemAvailable: estimate it as free(1) did.
    let available = available
        .unwrap_or_else(|| free.saturating_add(buffers).saturating_add(cached))
        .min(total);
    Some(MemFigures {
        total,
        available,
        swap_used: swap_total.saturating_sub(swap_free),
    })
}

/// `/proc/mounts` escapes space, tab, newline and backslash as octal;
/// procfs-core undoes all but the space.
fn unescape_mount(s: &str) -> String {
    if s.contains("\\040") {
        s.replace("\\040", " ")
    } else {
        s.to_owned()
    }
}

/// Whether a mount holds real storage: a block-device file system, or the
/// overlay that is the root of a container host.
fn is_storage_mount(fstype: &str, mount_point: &str) -> bool {
    STORAGE_FS.contains(&fstype) || (fstype == "overlay" && mount_point == "/")
}

/// Whether a `/proc/diskstats` name is a whole disk (not a partition). With
/// sysfs, a whole disk is exactly what has an entry in `/sys/block`; without
/// it, names are judged by shape: `sda1`, `nvme0n1p1` and `mmcblk0p1` are
/// partitions.
fn is_whole_disk(sys_block: &Path, name: &str) -> bool {
    if name.starts_with("mmcblk") && (name.contains("boot") || name.ends_with("rpmb")) {
        // eMMC boot areas and replay-protected blocks: never interesting.
        return false;
    }
    if sys_block.is_dir() {
        // sysfs spells `/` in device names (cciss/c0d0) as `!`.
        return sys_block.join(name.replace('/', "!")).exists();
    }
    !looks_like_partition(name)
}

fn looks_like_partition(name: &str) -> bool {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    if stem.len() == name.len() {
        return false; // no trailing number: sda, vdb
    }
    // nvme0n1p1, mmcblk0p1, md0p1: a number, `p`, a number.
    if let Some(before) = stem.strip_suffix('p') {
        if before.ends_with(|c: char| c.is_ascii_digit()) {
            return true;
        }
    }
    // sda1, vdb2, xvda1, hdc3: letters of a classic disk, then a number.
    ["sd", "vd", "xvd", "hd"].iter().any(|p| {
        stem.starts_with(p)
            && stem.len() > p.len()
            && stem[p.len()..].bytes().all(|b| b.is_ascii_lowercase())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn container_interfaces_are_skipped() {
        for name in ["lo", "veth4835bb59", "cali1234", "tap0", "vnet3", "lxc1a2b"] {
            assert!(skip_interface(name), "{name}");
        }
        for name in [
            "eth0", "enp0s3", "wlan0", "docker0", "podman0", "br0", "wg0",
        ] {
            assert!(!skip_interface(name), "{name}");
        }
    }

    const STAT_1: &str = "cpu  15154 0 4506 122390 582 0 61 179 0 0
cpu0 6603 0 1980 62677 70 0 8 90 0 0
cpu1 8551 0 2525 59712 511 0 53 89 0 0
intr 200766 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 1 15 0 0 0 0 143 94 0 24
ctxt 300508
btime 1795322246
processes 7275
procs_running 1
procs_blocked 1
softirq 127441 0 18716 5 11092 29073 0 600 33069 0 34886
";

    /// STAT_1 plus, over 1 s on 2 CPUs (200 ticks): user +30, nice +10,
    /// system +20, idle +100, iowait +20, irq +5, softirq +5, steal +10.
    const STAT_2: &str = "cpu  15184 10 4526 122490 602 5 66 189 0 0
cpu0 6618 5 1990 62727 80 3 11 95 0 0
cpu1 8566 5 2535 59762 521 2 55 94 0 0
intr 200900 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 1 15 0 0 0 0 143 94 0 24
ctxt 300700
btime 1795322246
processes 7280
procs_running 2
procs_blocked 0
softirq 127500 0 18716 5 11092 29073 0 600 33069 0 34886
";

    const MEMINFO: &str = "MemTotal:        8388608 kB
MemFree:         5242880 kB
MemAvailable:    6291456 kB
Buffers:            2572 kB
Cached:           100568 kB
SwapCached:            0 kB
Active:            23172 kB
Inactive:         120000 kB
Active(anon):       1536 kB
Inactive(anon):    47376 kB
Active(file):      21636 kB
Inactive(file):    72624 kB
Unevictable:       13600 kB
Mlocked:           12640 kB
SwapTotal:       2097152 kB
SwapFree:        1048576 kB
Zswap:                 0 kB
Zswapped:              0 kB
Dirty:               140 kB
Writeback:             0 kB
AnonPages:         53600 kB
Mapped:            32696 kB
Shmem:              8872 kB
KReclaimable:      44872 kB
Slab:              66608 kB
SReclaimable:      44872 kB
SUnreclaim:        21736 kB
KernelStack:        1508 kB
PageTables:         1872 kB
SecPageTables:         0 kB
NFS_Unstable:          0 kB
Bounce:                0 kB
WritebackTmp:          0 kB
CommitLimit:    12342040 kB
Committed_AS:     108716 kB
VmallocTotal:   34359738367 kB
VmallocUsed:       14284 kB
VmallocChunk:          0 kB
Percpu:              664 kB
AnonHugePages:         0 kB
ShmemHugePages:        0 kB
ShmemPmdMapped:        0 kB
FileHugePages:         0 kB
FilePmdMapped:         0 kB
Balloon:               0 kB
HugePages_Total:       0
HugePages_Free:        0
HugePages_Rsvd:        0
HugePages_Surp:        0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
DirectMap4k:       28672 kB
DirectMap2M:     2068480 kB
DirectMap1G:    25165824 kB
";

    const LOADAVG: &str = "0.04 0.26 0.17 1/84 7232\n";

    fn diskstats(sda_read: u64, sda_written: u64, nvme_written: u64) -> String {
        format!(
            "   7       0 loop0 120 0 2400 10 0 0 0 0 0 8 10 0 0 0 0 0 0
   7       1 loop1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
   8       0 sda 28897 9506 {sda_read} 27730 4941 22385 {sda_written} 11130 0 8696 39479 5431 38 487560 615 42 1
   8       1 sda1 28000 9000 {sda_read} 27000 4900 22000 {sda_written} 11000 0 8600 39000 5400 38 487560 615 0 0
 259       0 nvme0n1 1000 0 80000 500 2000 0 {nvme_written} 900 0 700 1400 0 0 0 0 10 2
 259       1 nvme0n1p1 900 0 70000 400 1900 0 {nvme_written} 800 0 600 1200 0 0 0 0 0 0
 179       0 mmcblk0 500 0 4000 100 50 0 400 20 0 90 120 0 0 0 0 0 0
 179       1 mmcblk0p1 400 0 3000 90 40 0 300 10 0 80 100 0 0 0 0 0 0
 179       8 mmcblk0boot0 4 0 32 1 0 0 0 0 0 1 1 0 0 0 0 0 0
 253       0 dm-0 700 0 9000 40 800 0 16000 300 0 200 340 0 0 0 0 0 0
 252       0 zram0 10 0 80 0 20 0 160 0 0 0 0 0 0 0 0 0 0
"
        )
    }

    fn netdev(eth0_rx: u64, eth0_tx: u64, eth0_rx_errs: u64, wlan_rx: u64) -> String {
        format!(
            "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    3193      29    0    0    0     0          0         0     3193      29    0    0    0     0       0          0
  eth0: {eth0_rx}   13299    {eth0_rx_errs}    7    0     0          0         0   {eth0_tx}    7670    0    1    0     0       0          0
 wlan0: {wlan_rx}     120    0    0    0     0          0         0     9000      80    0    0    0     0       0          0
"
        )
    }

    const MOUNTS: &str = "proc /proc proc rw,relatime 0 0
sysfs /sys sysfs rw,relatime 0 0
devtmpfs /dev devtmpfs rw,relatime,size=12334460k,nr_inodes=3083615,mode=755 0 0
tmpfs /run tmpfs rw,nosuid,nodev,size=1634324k,mode=755 0 0
/dev/vda / ext4 rw,relatime,discard 0 0
/dev/vdb1 /var/lib/data xfs rw,relatime 0 0
/dev/vdb1 /srv/bind xfs rw,relatime 0 0
/dev/mmcblk0p1 /boot/firmware vfat rw,relatime,fmask=0022 0 0
/dev/loop3 /snap/core/17200 squashfs ro,nodev,relatime 0 0
overlay /var/lib/docker/overlay2/abc/merged overlay rw,relatime 0 0
cgroup2 /sys/fs/cgroup cgroup2 rw,relatime 0 0
/dev/sdc1 /media/usb\\040stick exfat rw,relatime 0 0
server:/export /mnt/nfs nfs4 rw,relatime 0 0
";

    const PSI_CPU: &str = "some avg10=1.50 avg60=0.15 avg300=0.88 total=11099269
full avg10=0.00 avg60=0.00 avg300=0.00 total=0
";
    const PSI_MEMORY: &str = "some avg10=0.27 avg60=0.69 avg300=0.60 total=5058357
full avg10=0.25 avg60=0.66 avg300=0.55 total=4688183
";
    const PSI_IO: &str = "some avg10=3.00 avg60=0.00 avg300=0.00 total=0
full avg10=2.50 avg60=0.00 avg300=0.00 total=0
";

    struct Fixture {
        _dir: tempfile::TempDir,
        proc_root: PathBuf,
        sys_root: PathBuf,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let proc_root = dir.path().join("proc");
            let sys_root = dir.path().join("sys");
            fs::create_dir_all(proc_root.join("net")).unwrap();
            fs::create_dir_all(&sys_root).unwrap();
            let f = Fixture {
                _dir: dir,
                proc_root,
                sys_root,
            };
            f.proc("stat", STAT_1);
            f.proc("meminfo", MEMINFO);
            f.proc("loadavg", LOADAVG);
            f.proc("diskstats", &diskstats(5_751_090, 3_302_608, 10_000));
            f.proc("net/dev", &netdev(227_803_486, 776_982, 0, 5000));
            f.proc("mounts", MOUNTS);
            f
        }

        fn proc(&self, rel: &str, text: &str) {
            let p = self.proc_root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }

        fn sys(&self, rel: &str, text: &str) {
            let p = self.sys_root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }

        fn pressure(&self) {
            self.proc("pressure/cpu", PSI_CPU);
            self.proc("pressure/memory", PSI_MEMORY);
            self.proc("pressure/io", PSI_IO);
        }

        fn collector(&self) -> HostCollector {
            let mut c = HostCollector::new(&self.proc_root, &self.sys_root);
            c.statvfs = fake_statvfs;
            c
        }
    }

    /// `/` is a quarter used (of the part users may have), `/var/lib/data`
    /// is full, everything else does not exist on this "host".
    fn fake_statvfs(path: &Path) -> io::Result<FsUsage> {
        match path.to_str() {
            // 1000 blocks of 4 KiB: 250 used, 50 reserved for root, 700 free to users.
            Some("/") => Ok(FsUsage {
                frsize: 4096,
                blocks: 1000,
                bfree: 750,
                bavail: 700,
            }),
            Some("/var/lib/data") => Ok(FsUsage {
                frsize: 1024,
                blocks: 2048,
                bfree: 0,
                bavail: 0,
            }),
            Some("/boot/firmware") => Err(io::Error::from(io::ErrorKind::PermissionDenied)),
            _ => Err(io::Error::from(io::ErrorKind::NotFound)),
        }
    }

    fn get(s: &Sample, name: &str) -> f64 {
        s.get(name)
            .unwrap_or_else(|| panic!("{name} missing from {:?}", names(s)))
    }

    fn names(s: &Sample) -> Vec<&str> {
        s.values.iter().map(|(n, _)| &**n).collect()
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() < 1e-9,
            "expected {expected}, got {actual}"
        );
    }

    fn assert_unique(s: &Sample) {
        let mut n = names(s);
        n.sort_unstable();
        let len = n.len();
        n.dedup();
        assert_eq!(n.len(), len, "duplicate signal names");
    }

    #[test]
    fn cpu_percentages_from_two_snapshots() {
        let f = Fixture::new();
        let mut c = f.collector();
        let t0 = Instant::now();
        let mut s = Sample::new(0);
        c.collect(t0, &mut s);
        assert_eq!(s.get("host.cpu.busy_pct"), None, "first call has no rates");

        f.proc("stat", STAT_2);
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(1), &mut s);
        assert_close(get(&s, "host.cpu.busy_pct"), 40.0);
        assert_close(get(&s, "host.cpu.user_pct"), 20.0);
        assert_close(get(&s, "host.cpu.system_pct"), 15.0);
        assert_close(get(&s, "host.cpu.iowait_pct"), 10.0);
        assert_close(get(&s, "host.cpu.steal_pct"), 5.0);
    }

    #[test]
    fn cpu_total_going_backwards_gives_no_rate() {
        let f = Fixture::new();
        let mut c = f.collector();
        let t0 = Instant::now();
        f.proc("stat", STAT_2);
        c.collect(t0, &mut Sample::new(0));
        f.proc("stat", STAT_1);
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(1), &mut s);
        assert_eq!(s.get("host.cpu.busy_pct"), None);
        // and the next sample rates against the new baseline
        f.proc("stat", STAT_2);
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(2), &mut s);
        assert_close(get(&s, "host.cpu.busy_pct"), 40.0);
    }

    #[test]
    fn cpu_iowait_going_backwards_counts_as_zero() {
        let prev = CpuTicks {
            user: 100,
            nice: 0,
            system: 100,
            idle: 1000,
            iowait: 50,
            irq: 0,
            softirq: 0,
            steal: 0,
        };
        let cur = CpuTicks {
            user: 150,
            idle: 1150,
            iowait: 40,
            ..prev
        };
        let p = cpu_pcts(&prev, &cur).unwrap();
        assert_close(p.busy, 25.0);
        assert_close(p.iowait, 0.0);
    }

    #[test]
    fn meminfo_without_mem_available() {
        let old = "MemTotal:  1000 kB\nMemFree:  100 kB\nBuffers:  50 kB\nCached:  250 kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\nHugePages_Total: 0\n";
        assert_eq!(
            parse_meminfo(old),
            Some(MemFigures {
                total: 1000 * 1024,
                available: 400 * 1024,
                swap_used: 0,
            })
        );
        assert_eq!(parse_meminfo("MemFree: 100 kB\n"), None);
        assert_eq!(parse_meminfo(""), None);
    }

    #[test]
    fn load_memory_and_procs() {
        let f = Fixture::new();
        let mut c = f.collector();
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert_close(get(&s, "host.load.1m"), 0.04);
        assert_close(get(&s, "host.load.5m"), 0.26);
        assert_close(get(&s, "host.load.15m"), 0.17);
        assert_close(get(&s, "host.procs.count"), 84.0);
        assert_close(get(&s, "host.mem.available_mb"), 6144.0);
        assert_close(get(&s, "host.mem.used_mb"), 2048.0);
        assert_close(get(&s, "host.mem.used_pct"), 25.0);
        assert_close(get(&s, "host.swap.used_mb"), 1024.0);
        assert_unique(&s);
    }

    #[test]
    fn pressure_when_present_and_absent() {
        let f = Fixture::new();
        let mut c = f.collector();
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert!(
            !names(&s).iter().any(|n| n.starts_with("host.psi.")),
            "no pressure dir, no psi signals"
        );
        assert!(c.pressure.avail.is_down());

        f.pressure();
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert!(!c.pressure.avail.is_down());
        assert_close(get(&s, "host.psi.cpu.some_avg10"), 1.5);
        assert_close(get(&s, "host.psi.memory.some_avg10"), 0.27);
        assert_close(get(&s, "host.psi.memory.full_avg10"), 0.25);
        assert_close(get(&s, "host.psi.io.some_avg10"), 3.0);
        assert_close(get(&s, "host.psi.io.full_avg10"), 2.5);
        assert_eq!(s.get("host.psi.cpu.full_avg10"), None);
        assert_unique(&s);
    }

    #[test]
    fn pressure_cpu_without_full_line() {
        // Kernels 4.20 to 5.12 print only the `some` line for CPU.
        let f = Fixture::new();
        f.pressure();
        f.proc(
            "pressure/cpu",
            "some avg10=4.50 avg60=0.91 avg300=0.00 total=681245\n",
        );
        let mut c = f.collector();
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert_close(get(&s, "host.psi.cpu.some_avg10"), 4.5);
        assert!(!c.pressure.avail.is_down());
    }

    #[test]
    fn disk_io_rates_whole_disks_only() {
        let f = Fixture::new();
        let mut c = f.collector();
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));

        // 2 s later: sda read 4096 sectors and wrote 2048 per second.
        f.proc(
            "diskstats",
            &diskstats(5_751_090 + 8192, 3_302_608 + 4096, 10_000 + 100),
        );
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(2), &mut s);
        assert_close(get(&s, "host.diskio.sda.read_bps"), 4096.0 * 512.0);
        assert_close(get(&s, "host.diskio.sda.write_bps"), 2048.0 * 512.0);
        assert_close(get(&s, "host.diskio.nvme0n1.write_bps"), 50.0 * 512.0);
        assert_close(get(&s, "host.diskio.mmcblk0.read_bps"), 0.0);
        assert_close(get(&s, "host.diskio.dm_0.write_bps"), 0.0);
        let io: Vec<&str> = names(&s)
            .into_iter()
            .filter(|n| n.starts_with("host.diskio.") && n.ends_with(".read_bps"))
            .collect();
        assert_eq!(
            io.len(),
            4,
            "sda, nvme0n1, mmcblk0, dm-0 and nothing else: {io:?}"
        );
        assert_unique(&s);
    }

    #[test]
    fn disk_partitions_from_sysfs_when_present() {
        let f = Fixture::new();
        // With /sys/block, exactly its entries are whole disks: here sda1 is
        // listed (odd, but sysfs is the authority) and nvme0n1 is not.
        for d in ["sda", "sda1", "mmcblk0", "dm-0", "loop0"] {
            fs::create_dir_all(f.sys_root.join("block").join(d)).unwrap();
        }
        let mut c = f.collector();
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(1), &mut s);
        assert!(s.get("host.diskio.sda1.read_bps").is_some());
        assert!(s.get("host.diskio.sda.read_bps").is_some());
        assert_eq!(s.get("host.diskio.nvme0n1.read_bps"), None);
        assert_eq!(s.get("host.diskio.loop0.read_bps"), None, "loop skipped");
    }

    #[test]
    fn partition_shapes() {
        for p in [
            "sda1",
            "vdb12",
            "xvda1",
            "hdc3",
            "nvme0n1p1",
            "mmcblk0p2",
            "md0p1",
        ] {
            assert!(looks_like_partition(p), "{p}");
        }
        for d in [
            "sda", "vdb", "nvme0n1", "mmcblk0", "dm-0", "md0", "sdaa", "xvdf",
        ] {
            assert!(!looks_like_partition(d), "{d}");
        }
    }

    #[test]
    fn counters_going_backwards_give_no_rate() {
        let f = Fixture::new();
        let mut c = f.collector();
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));

        // sda was reset (counters back near zero), nvme carries on; eth0's
        // counters were reset, wlan0 carries on.
        f.proc("diskstats", &diskstats(100, 200, 10_500));
        f.proc("net/dev", &netdev(1000, 2000, 0, 6000));
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(1), &mut s);
        assert_eq!(s.get("host.diskio.sda.read_bps"), None);
        assert_eq!(s.get("host.diskio.sda.write_bps"), None);
        assert_close(get(&s, "host.diskio.nvme0n1.write_bps"), 500.0 * 512.0);
        assert_eq!(s.get("host.net.eth0.rx_bps"), None);
        assert_eq!(s.get("host.net.eth0.tx_bps"), None);
        assert_close(get(&s, "host.net.eth0.rx_errors_ps"), 0.0);
        assert_close(get(&s, "host.net.wlan0.rx_bps"), 1000.0);

        // The next sample rates from the new baseline.
        f.proc("diskstats", &diskstats(1124, 200, 10_500));
        f.proc("net/dev", &netdev(3000, 2000, 0, 6000));
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(2), &mut s);
        assert_close(get(&s, "host.diskio.sda.read_bps"), 1024.0 * 512.0);
        assert_close(get(&s, "host.net.eth0.rx_bps"), 2000.0);
    }

    #[test]
    fn network_rates_skip_loopback() {
        let f = Fixture::new();
        let mut c = f.collector();
        let t0 = Instant::now();
        let mut s = Sample::new(0);
        c.collect(t0, &mut s);
        assert!(!names(&s).iter().any(|n| n.starts_with("host.net.")));

        f.proc(
            "net/dev",
            &netdev(227_803_486 + 500_000, 776_982 + 40_000, 6, 5000),
        );
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_millis(500), &mut s);
        assert_close(get(&s, "host.net.eth0.rx_bps"), 1_000_000.0);
        assert_close(get(&s, "host.net.eth0.tx_bps"), 80_000.0);
        assert_close(get(&s, "host.net.eth0.rx_errors_ps"), 12.0);
        assert_close(get(&s, "host.net.eth0.tx_errors_ps"), 0.0);
        assert_close(get(&s, "host.net.eth0.rx_drops_ps"), 0.0);
        assert_close(get(&s, "host.net.eth0.tx_drops_ps"), 0.0);
        assert_close(get(&s, "host.net.wlan0.rx_bps"), 0.0);
        assert!(!names(&s).iter().any(|n| n.starts_with("host.net.lo.")));
        assert_unique(&s);
    }

    #[test]
    fn interfaces_and_devices_come_and_go() {
        let f = Fixture::new();
        let mut c = f.collector();
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));

        // wlan0 and nvme0n1 vanish; usb0 appears.
        f.proc(
            "net/dev",
            "Inter-|   Receive |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
  eth0: 227803486   13299    0    7    0     0          0         0   776982    7670    0    1    0     0       0          0
  usb0: 100 1 0 0 0 0 0 0 200 2 0 0 0 0 0 0
",
        );
        let text = diskstats(5_751_090, 3_302_608, 0)
            .lines()
            .filter(|l| !l.contains("nvme"))
            .collect::<Vec<_>>()
            .join("\n");
        f.proc("diskstats", &text);
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(1), &mut s);
        assert!(!c.ifaces.contains_key("wlan0"));
        assert!(c.ifaces.contains_key("usb0"));
        assert!(!c.disks.contains_key("nvme0n1"));
        assert_eq!(s.get("host.net.wlan0.rx_bps"), None);
        assert_eq!(s.get("host.net.usb0.rx_bps"), None, "new: no rate yet");
        assert!(s.get("host.net.eth0.rx_bps").is_some());

        f.proc(
            "net/dev",
            "Inter-|   Receive |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
  eth0: 227803486   13299    0    7    0     0          0         0   776982    7670    0    1    0     0       0          0
  usb0: 1100 1 0 0 0 0 0 0 200 2 0 0 0 0 0 0
",
        );
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(2), &mut s);
        assert_close(get(&s, "host.net.usb0.rx_bps"), 1000.0);
    }

    #[test]
    fn disk_usage_for_storage_mounts() {
        let f = Fixture::new();
        let mut c = f.collector();
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        let watched: Vec<&str> = c.mounts.iter().map(|m| m.segment.as_str()).collect();
        assert_eq!(
            watched,
            ["root", "var_lib_data", "boot_firmware", "media_usb_stick"],
            "ext4, xfs once despite the bind mount, vfat, exfat with an escaped space"
        );
        assert_close(get(&s, "host.disk.root.used_pct"), 250.0 * 100.0 / 950.0);
        assert_close(get(&s, "host.disk.root.avail_mb"), 700.0 * 4096.0 / MIB);
        assert_close(get(&s, "host.disk.var_lib_data.used_pct"), 100.0);
        assert_close(get(&s, "host.disk.var_lib_data.avail_mb"), 0.0);
        // statvfs failed (EACCES): logged once, no value.
        assert_eq!(s.get("host.disk.boot_firmware.used_pct"), None);
        // no such path on this host: skipped quietly.
        assert_eq!(s.get("host.disk.media_usb_stick.used_pct"), None);
        assert!(!names(&s)
            .iter()
            .any(|n| n.contains("snap") || n.contains("nfs")));
        assert_unique(&s);
    }

    #[test]
    fn overlay_root_counts_as_storage() {
        assert!(is_storage_mount("overlay", "/"));
        assert!(!is_storage_mount(
            "overlay",
            "/var/lib/docker/overlay2/x/merged"
        ));
        assert!(!is_storage_mount("tmpfs", "/"));
        assert!(!is_storage_mount("nfs4", "/mnt"));
        assert!(is_storage_mount("btrfs", "/home"));
    }

    #[test]
    fn mounts_refresh_at_most_every_minute() {
        let f = Fixture::new();
        let mut c = f.collector();
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));
        assert_eq!(c.mounts.len(), 4);
        f.proc("mounts", "/dev/vda / ext4 rw,relatime 0 0\n");
        c.collect(t0 + Duration::from_secs(30), &mut Sample::new(0));
        assert_eq!(c.mounts.len(), 4, "not re-read yet");
        let root = Arc::clone(&c.mounts[0].used_pct);
        c.collect(t0 + Duration::from_secs(61), &mut Sample::new(0));
        assert_eq!(c.mounts.len(), 1);
        assert!(Arc::ptr_eq(&root, &c.mounts[0].used_pct), "names kept");
    }

    #[test]
    fn thermal_zones() {
        let f = Fixture::new();
        let mut c = f.collector();
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert!(!names(&s).iter().any(|n| n.starts_with("host.thermal.")));
        assert!(c.thermal.avail.is_down());

        let f = Fixture::new();
        f.sys("class/thermal/thermal_zone0/temp", "48250\n");
        f.sys("class/thermal/thermal_zone0/type", "cpu-thermal\n");
        f.sys("class/thermal/thermal_zone10/temp", "-5000\n");
        f.sys("class/thermal/thermal_zone2/type", "iwlwifi_1\n"); // no temp: skipped
        f.sys("class/thermal/cooling_device0/type", "Processor\n");
        let mut c = f.collector();
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert_close(get(&s, "host.thermal.zone0.temp_c"), 48.25);
        assert_close(get(&s, "host.thermal.zone10.temp_c"), -5.0);
        assert_eq!(s.get("host.thermal.zone2.temp_c"), None);
        assert!(!c.thermal.avail.is_down());
    }

    #[test]
    fn empty_proc_root_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = HostCollector::new(&dir.path().join("proc"), &dir.path().join("sys"));
        let t0 = Instant::now();
        for i in 0..3 {
            let mut s = Sample::new(0);
            c.collect(t0 + Duration::from_secs(i), &mut s);
            assert!(s.values.is_empty(), "{:?}", names(&s));
        }
        assert!(c.stat.avail.is_down());
        assert!(c.meminfo.avail.is_down());
        assert!(c.netdev.avail.is_down());
    }

    #[test]
    fn garbage_files_never_panic() {
        let f = Fixture::new();
        f.pressure();
        let mut c = f.collector();
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));
        for rel in [
            "stat",
            "meminfo",
            "loadavg",
            "diskstats",
            "net/dev",
            "mounts",
            "pressure/cpu",
            "pressure/io",
        ] {
            f.proc(rel, "some\nfull \n\u{0}\u{ff}garbage (x) 1 2\n");
        }
        fs::write(f.proc_root.join("stat"), [0xff, 0xfe, b'\n']).unwrap();
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(61), &mut s);
        assert!(c.stat.avail.is_down());
        assert!(c.meminfo.avail.is_down());
        assert!(c.pressure.avail.is_down());
    }

    fn count(log: &str, needle: &str) -> usize {
        log.lines().filter(|l| l.contains(needle)).count()
    }

    #[test]
    fn vanished_sources_are_logged_once_and_the_rest_keeps_flowing() {
        let f = Fixture::new();
        f.pressure();
        let mut c = f.collector();
        let t0 = Instant::now();
        let ((), log) = crate::collect::capture_logs(|| {
            c.collect(t0, &mut Sample::new(0));
            // /proc/net/dev and /proc/pressure go away for ten samples.
            fs::remove_file(f.proc_root.join("net/dev")).unwrap();
            fs::remove_dir_all(f.proc_root.join("pressure")).unwrap();
            for i in 1..=10 {
                let mut s = Sample::new(0);
                c.collect(t0 + Duration::from_secs(i), &mut s);
                assert_close(get(&s, "host.mem.used_pct"), 25.0);
                assert_close(get(&s, "host.load.1m"), 0.04);
                assert!(s.get("host.diskio.sda.read_bps").is_some());
                assert!(
                    !names(&s)
                        .iter()
                        .any(|n| n.starts_with("host.net.") || n.starts_with("host.psi.")),
                    "{:?}",
                    names(&s)
                );
            }
            assert!(c.netdev.avail.is_down());
            assert!(c.pressure.avail.is_down());
            // Back: eth0 received 11 000 bytes in the 11 s since its last
            // reading, and the rate says so.
            f.proc("net/dev", &netdev(227_803_486 + 11_000, 776_982, 0, 5000));
            f.pressure();
            let mut s = Sample::new(0);
            c.collect(t0 + Duration::from_secs(11), &mut s);
            assert_close(get(&s, "host.net.eth0.rx_bps"), 1000.0);
            assert_close(get(&s, "host.psi.cpu.some_avg10"), 1.5);
        });
        assert!(!c.netdev.avail.is_down());
        assert!(!c.pressure.avail.is_down());
        // Once when each went, once when each came back; a core source at
        // WARN, an optional one at INFO.
        for (source, level) in [("network", "WARN"), ("pressure", "INFO")] {
            let lines = |message: &str| {
                log.lines()
                    .filter(|l| l.contains(message) && l.contains(&format!("source=\"{source}\"")))
                    .collect::<Vec<_>>()
            };
            let gone = lines("host metric source not available");
            assert_eq!(gone.len(), 1, "{source}:\n{log}");
            assert!(gone[0].contains(level), "{source}:\n{log}");
            assert_eq!(
                lines("host metric source available again").len(),
                1,
                "{source}:\n{log}"
            );
        }
    }

    #[test]
    fn files_cut_short_never_panic_and_recover() {
        let f = Fixture::new();
        f.pressure();
        let whole: Vec<(&str, String)> = vec![
            ("stat", STAT_1.to_string()),
            ("meminfo", MEMINFO.to_string()),
            ("loadavg", LOADAVG.to_string()),
            ("diskstats", diskstats(5_751_090, 3_302_608, 10_000)),
            ("net/dev", netdev(227_803_486, 776_982, 0, 5000)),
            ("mounts", MOUNTS.to_string()),
            ("pressure/cpu", PSI_CPU.to_string()),
            ("pressure/memory", PSI_MEMORY.to_string()),
            ("pressure/io", PSI_IO.to_string()),
        ];
        let mut c = f.collector();
        let mut t = Instant::now();
        c.collect(t, &mut Sample::new(0));
        for (rel, text) in &whole {
            // Every length, from empty to one byte short (all ASCII). Each
            // step is past the mount refresh so /proc/mounts is re-read.
            for cut in 0..text.len() {
                f.proc(rel, &text[..cut]);
                t += REFRESH_INTERVAL;
                let mut s = Sample::new(0);
                c.collect(t, &mut s);
                assert_unique(&s);
                for name in ["host.cpu.busy_pct", "host.mem.used_pct"] {
                    if let Some(v) = s.get(name) {
                        assert!((0.0..=100.0).contains(&v), "{rel} cut at {cut}: {name} {v}");
                    }
                }
            }
            f.proc(rel, text);
        }
        // Whole again: every source is back.
        for _ in 0..2 {
            t += REFRESH_INTERVAL;
            c.collect(t, &mut Sample::new(0));
        }
        for (what, src) in [
            ("stat", &c.stat),
            ("meminfo", &c.meminfo),
            ("loadavg", &c.loadavg),
            ("diskstats", &c.diskstats),
            ("net/dev", &c.netdev),
            ("mounts", &c.mounts_src),
            ("pressure", &c.pressure),
        ] {
            assert!(!src.avail.is_down(), "{what} still down");
        }
        assert_eq!(c.mounts.len(), 4);
        let mut s = Sample::new(0);
        f.proc("net/dev", &netdev(227_803_486 + 1000, 776_982, 0, 5000));
        c.collect(t + Duration::from_secs(1), &mut s);
        assert_close(get(&s, "host.net.eth0.rx_bps"), 1000.0);
        assert_close(get(&s, "host.mem.used_pct"), 25.0);
    }

    #[test]
    fn a_thermal_zone_vanishing_after_the_listing_is_skipped_quietly() {
        let f = Fixture::new();
        f.sys("class/thermal/thermal_zone0/temp", "48250\n");
        f.sys("class/thermal/thermal_zone1/temp", "51000\n");
        let mut c = f.collector();
        let t0 = Instant::now();
        let ((), log) = crate::collect::capture_logs(|| {
            let mut s = Sample::new(0);
            c.collect(t0, &mut s);
            assert_close(get(&s, "host.thermal.zone1.temp_c"), 51.0);
            // Unplugged (a USB sensor, a hot-removed device): listed at the
            // last refresh, gone when read.
            fs::remove_dir_all(f.sys_root.join("class/thermal/thermal_zone1")).unwrap();
            for i in 1..=5 {
                let mut s = Sample::new(0);
                c.collect(t0 + Duration::from_secs(i), &mut s);
                assert_close(get(&s, "host.thermal.zone0.temp_c"), 48.25);
                assert_eq!(s.get("host.thermal.zone1.temp_c"), None);
            }
            // The next listing drops it.
            c.collect(t0 + REFRESH_INTERVAL, &mut Sample::new(0));
            assert_eq!(c.zones.len(), 1);
        });
        assert!(!c.thermal.avail.is_down());
        assert_eq!(count(&log, "thermal"), 0, "{log}");
    }

    /// Against this machine's own /proc and /sys.
    #[test]
    fn real_proc_and_sys() {
        let mut c = HostCollector::new(Path::new("/proc"), Path::new("/sys"));
        let t0 = Instant::now();
        let mut s = Sample::new(0);
        c.collect(t0, &mut s);
        assert_eq!(s.get("host.cpu.busy_pct"), None);
        std::thread::sleep(Duration::from_millis(300));
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert_unique(&s);
        let busy = get(&s, "host.cpu.busy_pct");
        assert!((0.0..=100.0).contains(&busy), "busy {busy}");
        for n in ["user", "system", "iowait", "steal"] {
            let v = get(&s, &format!("host.cpu.{n}_pct"));
            assert!((0.0..=100.0).contains(&v), "{n} {v}");
        }
        assert!(get(&s, "host.mem.available_mb") > 0.0);
        let used = get(&s, "host.mem.used_pct");
        assert!((0.0..=100.0).contains(&used), "mem used {used}");
        assert!(get(&s, "host.load.1m") >= 0.0);
        assert!(get(&s, "host.procs.count") >= 1.0);
        assert!(!c.stat.avail.is_down());
        assert!(!c.meminfo.avail.is_down());
        assert!(!c.loadavg.avail.is_down());
        assert!(!c.diskstats.avail.is_down());
        assert!(!c.netdev.avail.is_down());
        assert!(!c.mounts_src.avail.is_down());
        for (n, v) in &s.values {
            assert!(v.is_finite() && *v >= -273.0, "{n} = {v}");
        }
        // Disk usage, where statvfs is built in: every watched mount that
        // statvfs can read has both signals.
        for m in &c.mounts {
            if statvfs(&m.path).is_ok() {
                let used = get(&s, &m.used_pct);
                assert!((0.0..=100.0).contains(&used), "{} used {used}", m.segment);
                assert!(get(&s, &m.avail_mb) >= 0.0);
            }
        }
    }
}
