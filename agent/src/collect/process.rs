//! Per-target process stats from `/proc/PID`.
//!
//! A process target matches every process whose command name (`comm`, the
//! name in `/proc/PID/stat`) or whose `argv[0]` basename (from
//! `/proc/PID/cmdline`) equals the configured `process`. A `comm` is cut to
//! 15 bytes by the kernel, so a longer name also matches its 15-byte prefix.
//! Zombies never match: they hold no resources and serve nothing.
//!
//! Finding matches means reading every process's `stat` (and `cmdline`), so
//! the whole table is scanned at most every [`RESCAN_INTERVAL`], or at once
//! when a matched PID disappears or is reused (a restart). In between, only
//! the matched PIDs' `stat`, `statm` and `fd/` are read.
//!
//! Signals for a target `name`:
//! `target.{name}.up` (1 when at least one process matches, else 0),
//! `target.{name}.procs`, and while up: `target.{name}.cpu_pct` (sum over
//! matches, percent of one core; from the second sample on, and only over
//! PIDs seen in both samples), `target.{name}.rss_mb`, `target.{name}.threads`
//! and `target.{name}.fds` (left out when any match's `fd/` cannot be read,
//! e.g. another user's process while outpost runs unprivileged).
//!
//! Clock ticks and page size come from `/proc/self/auxv` (`AT_CLKTCK`,
//! `AT_PAGESZ`): `sysconf` would need `unsafe`. When that cannot be read (a
//! fixture proc root) they default to 100 Hz, the `USER_HZ` of every
//! mainstream architecture, and 4 KiB.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use procfs_core::process::{Stat, StatM};
use procfs_core::FromRead;

use super::{target_signal, Availability, Sample, SignalName, TargetStatus};
use crate::config::{Target, TargetKind};

/// The longest gap between two scans of the whole process table.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(5);
/// CPU state kept for a `measure_pids` key nobody asked about for this long
/// is dropped (a unit or container that went away).
const KEY_IDLE_LIMIT: Duration = Duration::from_secs(600);
const DEFAULT_TICKS_PER_SECOND: u64 = 100;
const DEFAULT_PAGE_SIZE: u64 = 4096;
/// `TASK_COMM_LEN - 1`: the kernel cuts `comm` to this many bytes.
const COMM_MAX: usize = 15;
const MIB: f64 = 1024.0 * 1024.0;
const AT_PAGESZ: usize = 6;
const AT_CLKTCK: usize = 17;

/// What a set of PIDs uses right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PidStats {
    /// Live (non-zombie) processes among the PIDs.
    pub count: u32,
    /// Percent of one core, summed; `None` until the key's second call.
    pub cpu_pct: Option<f64>,
    pub rss_mb: f64,
    pub threads: u32,
    /// Open file descriptors of the processes whose `fd/` could be read.
    pub fds: u32,
}

/// One reading of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PidSample {
    /// Start time in ticks after boot: with the PID, identifies a process
    /// across PID reuse.
    starttime: u64,
    /// utime + stime, in ticks.
    cpu_ticks: u64,
    threads: u32,
    rss_pages: u64,
    fds: Option<u32>,
}

/// Reads `/proc/PID/*` with one reused path and one reused buffer.
struct PidReader {
    root: PathBuf,
    path: PathBuf,
    buf: Vec<u8>,
    cmdline: Vec<u8>,
    ticks_per_second: u64,
    page_size: u64,
    /// Whether `stat` of `/proc/PID/fd` reports the number of open fds
    /// (Linux 6.2 and later, on the real procfs): one syscall instead of a
    /// directory listing.
    fd_size_is_count: bool,
}

impl PidReader {
    fn new(root: &Path) -> Self {
        let (clk, page) = read_auxv(&root.join("self/auxv"));
        let ticks_per_second = clk
            .filter(|t| (1..=100_000).contains(t))
            .unwrap_or(DEFAULT_TICKS_PER_SECOND);
        let page_size = page
            .filter(|p| p.is_power_of_two() && *p >= 1024)
            .unwrap_or(DEFAULT_PAGE_SIZE);
        // Only trust the fd directory's size on the procfs we run under:
        // there `self` names our own PID.
        let own_procfs = fs::read_link(root.join("self"))
            .is_ok_and(|p| p.as_os_str() == std::process::id().to_string().as_str());
        let fd_size_is_count =
            own_procfs && fs::metadata(root.join("self/fd")).is_ok_and(|m| m.len() > 0);
        tracing::debug!(
            ticks_per_second,
            page_size,
            fd_size_is_count,
            "process collector system info"
        );
        PidReader {
            root: root.to_path_buf(),
            path: PathBuf::with_capacity(root.as_os_str().len() + 24),
            buf: Vec::with_capacity(1024),
            cmdline: Vec::with_capacity(256),
            ticks_per_second,
            page_size,
            fd_size_is_count,
        }
    }

    /// `{root}/{pid}/{file}` in the reused path buffer.
    fn pid_path(&mut self, pid: u32, file: &str) -> &Path {
        let mut digits = [0u8; 10];
        let s = self.path.as_mut_os_string();
        s.clear();
        s.push(self.root.as_os_str());
        s.push("/");
        s.push(format_u32(pid, &mut digits));
        if !file.is_empty() {
            s.push("/");
            s.push(file);
        }
        &self.path
    }

    fn read_into(&mut self, pid: u32, file: &str) -> io::Result<()> {
        self.pid_path(pid, file);
        self.buf.clear();
        File::open(&self.path)?.read_to_end(&mut self.buf)?;
        Ok(())
    }

    /// A full reading of a live process; `None` when it is gone or a zombie.
    fn read(&mut self, pid: u32) -> Option<PidSample> {
        self.read_into(pid, "stat").ok()?;
        if !stat_head_is_whole(&self.buf) {
            return None;
        }
        let stat = Stat::from_read(&self.buf[..]).ok()?;
        if matches!(stat.state, 'Z' | 'X') {
            return None;
        }
        self.read_into(pid, "statm").ok()?;
        let statm = StatM::from_read(&self.buf[..]).ok()?;
        let fds = self.count_fds(pid);
        Some(PidSample {
            starttime: stat.starttime,
            cpu_ticks: stat.utime.saturating_add(stat.stime),
            threads: u32::try_from(stat.num_threads).unwrap_or(0),
            rss_pages: statm.resident,
            fds,
        })
    }

    fn count_fds(&mut self, pid: u32) -> Option<u32> {
        let size_is_count = self.fd_size_is_count;
        let path = self.pid_path(pid, "fd");
        if size_is_count {
            let len = fs::metadata(path).ok()?.len();
            if len > 0 {
                return Some(u32::try_from(len).unwrap_or(u32::MAX));
            }
        }
        let n = fs::read_dir(path).ok()?.filter(Result::is_ok).count();
        Some(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// The cheap look at a process a scan needs: `comm`, and whether it is a
    /// zombie, and its start time. Borrows the read buffer.
    fn read_brief(&mut self, pid: u32) -> Option<Brief<'_>> {
        self.read_into(pid, "stat").ok()?;
        parse_brief(&self.buf)
    }

    /// The basename of `argv[0]`, read into the cmdline buffer. Empty for
    /// kernel threads and zombies.
    fn read_argv0(&mut self, pid: u32) -> &[u8] {
        self.pid_path(pid, "cmdline");
        self.cmdline.clear();
        let ok = File::open(&self.path)
            .and_then(|f| f.take(4096).read_to_end(&mut self.cmdline))
            .is_ok();
        if !ok {
            return &[];
        }
        let argv0 = self.cmdline.split(|b| *b == 0).next().unwrap_or_default();
        match argv0.iter().rposition(|b| *b == b'/') {
            Some(i) => &argv0[i + 1..],
            None => argv0,
        }
    }
}

/// The part of `/proc/PID/stat` a scan looks at.
struct Brief<'a> {
    comm: &'a [u8],
    zombie: bool,
    starttime: u64,
}

/// `PID (comm) S ppid … starttime …`: comm may hold spaces and parentheses,
/// so it runs from the first `(` to the last `)`.
fn parse_brief(stat: &[u8]) -> Option<Brief<'_>> {
    let open = stat.iter().position(|b| *b == b'(')?;
    let close = stat.iter().rposition(|b| *b == b')')?;
    let comm = stat.get(open + 1..close)?;
    let rest = std::str::from_utf8(stat.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?;
    // After the state come ppid … itrealvalue (18 fields), then starttime.
    let starttime = fields.nth(18)?.parse().ok()?;
    Some(Brief {
        comm,
        zombie: matches!(state, "Z" | "X"),
        starttime,
    })
}

/// Whether `/proc/PID/stat` starts `PID (comm) ` the way procfs-core's
/// `Stat` parser assumes without checking: it slices around the parentheses
/// and panics (an abort, in a release build) on a line cut right after the
/// comm or one that does not start with a PID. The kernel never writes such
/// a line; a fixture root, or a file system pretending to be procfs, might.
fn stat_head_is_whole(stat: &[u8]) -> bool {
    // The same view of the bytes that the parser slices.
    let line = String::from_utf8_lossy(stat);
    let line = line.trim().as_bytes();
    let (Some(open), Some(close)) = (
        line.iter().position(|b| *b == b'('),
        line.iter().rposition(|b| *b == b')'),
    ) else {
        return false;
    };
    open >= 2
        && line[..open - 1].iter().all(u8::is_ascii_digit)
        && line[open - 1] == b' '
        && close > open
        && line.get(close + 1) == Some(&b' ')
        && line.len() > close + 2
}

fn format_u32(mut n: u32, buf: &mut [u8; 10]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// `AT_CLKTCK` and `AT_PAGESZ` from an auxiliary vector: pairs of native
/// words, as wide as this process's `usize`.
fn read_auxv(path: &Path) -> (Option<u64>, Option<u64>) {
    let Ok(bytes) = fs::read(path) else {
        return (None, None);
    };
    parse_auxv(&bytes)
}

fn parse_auxv(bytes: &[u8]) -> (Option<u64>, Option<u64>) {
    const W: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| -> Option<usize> { Some(usize::from_ne_bytes(b.try_into().ok()?)) };
    let (mut clk, mut page) = (None, None);
    for pair in bytes.chunks_exact(2 * W) {
        let (Some(key), Some(value)) = (word(&pair[..W]), word(&pair[W..])) else {
            break;
        };
        match key {
            0 => break, // AT_NULL
            AT_CLKTCK => clk = Some(value as u64),
            AT_PAGESZ => page = Some(value as u64),
            _ => {}
        }
    }
    (clk, page)
}

fn comm_matches(want: &str, comm: &[u8]) -> bool {
    let want = want.as_bytes();
    comm == want || (comm.len() == COMM_MAX && want.len() > COMM_MAX && want.starts_with(comm))
}

/// CPU ticks per PID between two readings of one target or key.
#[derive(Default)]
struct CpuTracker {
    last: Option<Instant>,
    /// PID -> (start time, cpu ticks) at `last`.
    prev: HashMap<u32, (u64, u64)>,
    next: HashMap<u32, (u64, u64)>,
    delta: u64,
    any: bool,
}

impl CpuTracker {
    fn begin(&mut self) {
        self.next.clear();
        self.delta = 0;
        self.any = false;
    }

    /// Records a process; false when the PID was already recorded this time.
    fn add(&mut self, pid: u32, s: &PidSample) -> bool {
        if self.next.contains_key(&pid) {
            return false;
        }
        if let Some(&(start, ticks)) = self.prev.get(&pid) {
            // Same PID and start time: the same process. Its ticks never go
            // backwards; if they do, it is not the process we knew.
            if start == s.starttime && s.cpu_ticks >= ticks {
                self.delta += s.cpu_ticks - ticks;
                self.any = true;
            }
        }
        self.next.insert(pid, (s.starttime, s.cpu_ticks));
        true
    }

    fn finish(&mut self, now: Instant, ticks_per_second: u64) -> Option<f64> {
        let pct = match self.last {
            Some(last) if self.any => {
                let dt = now.saturating_duration_since(last).as_secs_f64();
                (dt > 0.0).then(|| self.delta as f64 * 100.0 / ticks_per_second as f64 / dt)
            }
            _ => None,
        };
        std::mem::swap(&mut self.prev, &mut self.next);
        self.last = Some(now);
        pct
    }
}

/// Sums over the processes of one target or key.
#[derive(Default)]
struct Totals {
    count: u32,
    rss_pages: u64,
    threads: u32,
    fds: u32,
    fds_complete: bool,
}

impl Totals {
    fn new() -> Self {
        Totals {
            fds_complete: true,
            ..Totals::default()
        }
    }

    fn add(&mut self, s: &PidSample) {
        self.count += 1;
        self.rss_pages = self.rss_pages.saturating_add(s.rss_pages);
        self.threads = self.threads.saturating_add(s.threads);
        match s.fds {
            Some(n) => self.fds = self.fds.saturating_add(n),
            None => self.fds_complete = false,
        }
    }

    fn rss_mb(&self, page_size: u64) -> f64 {
        self.rss_pages as f64 * page_size as f64 / MIB
    }
}

struct ProcTarget {
    name: String,
    process: String,
    /// Matches of the last scan: PID and start time.
    pids: Vec<(u32, u64)>,
    cpu: CpuTracker,
    up: SignalName,
    procs: SignalName,
    cpu_pct: SignalName,
    rss_mb: SignalName,
    threads: SignalName,
    fds: SignalName,
}

struct Keyed {
    cpu: CpuTracker,
    used: Instant,
}

/// Process collector.
pub struct ProcessCollector {
    reader: PidReader,
    targets: Vec<ProcTarget>,
    last_scan: Option<Instant>,
    /// Whether the process table could be listed at the last try.
    table: Availability,
    table_error: Option<String>,
    /// Readings of this `collect`, so a PID matched by two targets is read once.
    cache: HashMap<u32, Option<PidSample>>,
    keyed: HashMap<String, Keyed>,
    last_prune: Option<Instant>,
}

impl ProcessCollector {
    /// Watches targets of kind Process (matched by comm, i.e. /proc/PID/stat name, or by the basename of /proc/PID/cmdline's argv[0]).
    pub fn new(proc_root: &Path, targets: &[Target]) -> Self {
        let targets = targets
            .iter()
            .filter_map(|t| match &t.kind {
                TargetKind::Process { process } => Some(ProcTarget {
                    name: t.name.clone(),
                    process: process.clone(),
                    pids: Vec::new(),
                    cpu: CpuTracker::default(),
                    up: target_signal(&t.name, "up"),
                    procs: target_signal(&t.name, "procs"),
                    cpu_pct: target_signal(&t.name, "cpu_pct"),
                    rss_mb: target_signal(&t.name, "rss_mb"),
                    threads: target_signal(&t.name, "threads"),
                    fds: target_signal(&t.name, "fds"),
                }),
                _ => None,
            })
            .collect();
        ProcessCollector {
            reader: PidReader::new(proc_root),
            targets,
            last_scan: None,
            table: Availability::default(),
            table_error: None,
            cache: HashMap::new(),
            keyed: HashMap::new(),
            last_prune: None,
        }
    }

    pub fn collect(&mut self, now: Instant, sample: &mut Sample) {
        if self.targets.is_empty() {
            return;
        }
        self.cache.clear();
        let mut rescan = self
            .last_scan
            .is_none_or(|at| now.saturating_duration_since(at) >= RESCAN_INTERVAL);
        if !rescan {
            // Read the known matches now (they are needed anyway): one gone or
            // reused means a restart, so look for the new process at once.
            for t in &self.targets {
                for &(pid, start) in &t.pids {
                    let reader = &mut self.reader;
                    let s = *self.cache.entry(pid).or_insert_with(|| reader.read(pid));
                    if s.is_none_or(|s| s.starttime != start) {
                        rescan = true;
                    }
                }
            }
        }
        if rescan {
            self.scan(now);
        }
        let tps = self.reader.ticks_per_second;
        let page_size = self.reader.page_size;
        for t in &mut self.targets {
            if self.table.is_down() {
                sample.targets.push(TargetStatus {
                    name: t.name.clone(),
                    kind: "process".to_string(),
                    state: "not available".to_string(),
                    up: false,
                    probe: None,
                    detail: self.table_error.clone(),
                });
                continue;
            }
            t.cpu.begin();
            let mut totals = Totals::new();
            for &(pid, start) in &t.pids {
                let reader = &mut self.reader;
                let Some(s) = *self.cache.entry(pid).or_insert_with(|| reader.read(pid)) else {
                    continue;
                };
                if s.starttime == start && t.cpu.add(pid, &s) {
                    totals.add(&s);
                }
            }
            let cpu = t.cpu.finish(now, tps);
            let up = totals.count > 0;
            sample.push(&t.up, if up { 1.0 } else { 0.0 });
            sample.push(&t.procs, f64::from(totals.count));
            if up {
                if let Some(cpu) = cpu {
                    sample.push(&t.cpu_pct, cpu);
                }
                sample.push(&t.rss_mb, totals.rss_mb(page_size));
                sample.push(&t.threads, f64::from(totals.threads));
                if totals.fds_complete {
                    sample.push(&t.fds, f64::from(totals.fds));
                }
            }
            sample.targets.push(TargetStatus {
                name: t.name.clone(),
                kind: "process".to_string(),
                state: match totals.count {
                    0 => "not found".to_string(),
                    1 => "1 process".to_string(),
                    n => format!("{n} processes"),
                },
                up,
                probe: None,
                detail: None,
            });
        }
    }

    /// Stats for an explicit set of PIDs (used by the systemd and container collectors for a unit's MainPID or a container's PID); CPU rate keyed by `key`.
    pub fn measure_pids(&mut self, key: &str, pids: &[u32], now: Instant) -> Option<PidStats> {
        self.prune_keys(now);
        if !self.keyed.contains_key(key) {
            self.keyed.insert(
                key.to_owned(),
                Keyed {
                    cpu: CpuTracker::default(),
                    used: now,
                },
            );
        }
        let keyed = self.keyed.get_mut(key)?;
        keyed.used = now;
        keyed.cpu.begin();
        let mut totals = Totals::new();
        for &pid in pids {
            let Some(s) = self.reader.read(pid) else {
                continue;
            };
            if keyed.cpu.add(pid, &s) {
                totals.add(&s);
            }
        }
        let cpu_pct = keyed.cpu.finish(now, self.reader.ticks_per_second);
        (totals.count > 0).then(|| PidStats {
            count: totals.count,
            cpu_pct,
            rss_mb: totals.rss_mb(self.reader.page_size),
            threads: totals.threads,
            fds: totals.fds,
        })
    }

    fn prune_keys(&mut self, now: Instant) {
        if self
            .last_prune
            .is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(60))
        {
            return;
        }
        self.last_prune = Some(now);
        self.keyed
            .retain(|_, k| now.saturating_duration_since(k.used) < KEY_IDLE_LIMIT);
    }

    /// Lists the process table and matches every process against every target.
    fn scan(&mut self, now: Instant) {
        let entries = match fs::read_dir(&self.reader.root) {
            Ok(rd) => rd,
            Err(e) => {
                if self.table.fail() {
                    tracing::warn!(path = %self.reader.root.display(), error = %e, "cannot list processes; process targets are not available");
                }
                self.table_error = Some(format!("cannot list {}: {e}", self.reader.root.display()));
                for t in &mut self.targets {
                    t.pids.clear();
                }
                return;
            }
        };
        if self.table.ok() {
            tracing::info!(path = %self.reader.root.display(), "process table readable again");
        }
        self.table_error = None;
        for t in &mut self.targets {
            t.pids.clear();
        }
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            // Gone since the listing: nothing to match.
            let Some(brief) = self.reader.read_brief(pid) else {
                continue;
            };
            if brief.zombie {
                continue;
            }
            let starttime = brief.starttime;
            let mut unmatched = false;
            for t in &mut self.targets {
                if comm_matches(&t.process, brief.comm) {
                    t.pids.push((pid, starttime));
                } else {
                    unmatched = true;
                }
            }
            if !unmatched {
                continue;
            }
            // Some target did not match by comm: try argv[0] (read once).
            let argv0 = self.reader.read_argv0(pid);
            if argv0.is_empty() {
                continue;
            }
            for t in &mut self.targets {
                if argv0 == t.process.as_bytes() && t.pids.last().is_none_or(|(p, _)| *p != pid) {
                    t.pids.push((pid, starttime));
                }
            }
        }
        self.last_scan = Some(now);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    fn process_target(name: &str, process: &str) -> Target {
        Target {
            name: name.to_string(),
            kind: TargetKind::Process {
                process: process.to_string(),
            },
            probe: None,
        }
    }

    struct Proc {
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    /// A `/proc/PID/stat` line like this machine's, with the fields the
    /// collector reads filled in.
    fn stat_line(
        pid: u32,
        comm: &str,
        state: char,
        cpu: (u64, u64),
        threads: u32,
        start: u64,
    ) -> String {
        let (utime, stime) = cpu;
        format!(
            "{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 4194560 31905 337839 0 271 {utime} {stime} 983 611 20 0 {threads} 0 {start} 43122688 3117 18446744073709551615 1 1 0 0 0 0 0 4096 1256 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    impl Proc {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("proc");
            fs::create_dir_all(&root).unwrap();
            // Files that are not processes.
            fs::write(root.join("stat"), "cpu  1 2 3 4\n").unwrap();
            fs::create_dir_all(root.join("sys")).unwrap();
            Proc { _dir: dir, root }
        }

        #[allow(clippy::too_many_arguments)]
        fn add(
            &self,
            pid: u32,
            comm: &str,
            argv: &[&str],
            cpu: (u64, u64),
            threads: u32,
            rss_pages: u64,
            fds: Option<u32>,
            start: u64,
        ) {
            let d = self.root.join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            fs::write(
                d.join("stat"),
                stat_line(pid, comm, 'S', cpu, threads, start),
            )
            .unwrap();
            fs::write(
                d.join("statm"),
                format!("{} {rss_pages} 375 5 0 123 0\n", rss_pages * 2),
            )
            .unwrap();
            let mut cmdline = String::new();
            for a in argv {
                write!(cmdline, "{a}\0").unwrap();
            }
            fs::write(d.join("cmdline"), cmdline).unwrap();
            fs::write(
                d.join("status"),
                format!("Name:\t{comm}\nState:\tS (sleeping)\nThreads:\t{threads}\n"),
            )
            .unwrap();
            if let Some(n) = fds {
                fs::create_dir_all(d.join("fd")).unwrap();
                for i in 0..n {
                    fs::write(d.join("fd").join(i.to_string()), "").unwrap();
                }
            }
        }

        fn set_cpu(&self, pid: u32, comm: &str, cpu: (u64, u64), threads: u32, start: u64) {
            fs::write(
                self.root.join(pid.to_string()).join("stat"),
                stat_line(pid, comm, 'S', cpu, threads, start),
            )
            .unwrap();
        }

        fn zombie(&self, pid: u32, comm: &str) {
            let d = self.root.join(pid.to_string());
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("stat"), stat_line(pid, comm, 'Z', (5, 5), 1, 10)).unwrap();
            fs::write(d.join("statm"), "0 0 0 0 0 0 0\n").unwrap();
            fs::write(d.join("cmdline"), "").unwrap();
        }

        fn remove(&self, pid: u32) {
            fs::remove_dir_all(self.root.join(pid.to_string())).unwrap();
        }
    }

    fn get(s: &Sample, name: &str) -> f64 {
        s.get(name)
            .unwrap_or_else(|| panic!("{name} missing from {:?}", s.values))
    }

    fn status<'a>(s: &'a Sample, name: &str) -> &'a TargetStatus {
        s.targets.iter().find(|t| t.name == name).unwrap()
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() < 1e-9,
            "expected {expected}, got {actual}"
        );
    }

    /// nginx master + worker (comm), a long-named daemon found by argv[0],
    /// a renamed process found by argv[0] only, a zombie and a kernel thread.
    fn fixture() -> Proc {
        let p = Proc::new();
        p.add(
            100,
            "nginx",
            &["nginx: master process /usr/sbin/nginx"],
            (100, 50),
            1,
            1024,
            Some(8),
            5000,
        );
        p.add(
            101,
            "nginx",
            &["nginx: worker process"],
            (300, 100),
            2,
            3072,
            Some(12),
            5001,
        );
        p.add(
            200,
            "systemd-journal",
            &["/usr/lib/systemd/systemd-journald"],
            (10, 10),
            1,
            512,
            Some(30),
            300,
        );
        p.add(
            300,
            "node",
            &["/opt/edge/bin/edge-gateway", "--config", "/etc/gw.toml"],
            (1000, 0),
            11,
            25_600,
            Some(40),
            7000,
        );
        p.add(2, "kthreadd", &[], (0, 0), 1, 0, None, 1);
        p.zombie(400, "nginx");
        p
    }

    fn targets() -> Vec<Target> {
        vec![
            process_target("web", "nginx"),
            process_target("journal", "systemd-journald"),
            process_target("gw", "edge-gateway"),
            process_target("ghost", "nosuchd"),
            Target {
                name: "host".to_string(),
                kind: TargetKind::Host,
                probe: None,
            },
        ]
    }

    #[test]
    fn matches_by_comm_and_argv0() {
        let p = fixture();
        let mut c = ProcessCollector::new(&p.root, &targets());
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);

        assert_eq!(get(&s, "target.web.up"), 1.0);
        assert_eq!(
            get(&s, "target.web.procs"),
            2.0,
            "master + worker, not the zombie"
        );
        assert_eq!(get(&s, "target.web.threads"), 3.0);
        assert_close(get(&s, "target.web.rss_mb"), 4096.0 * 4096.0 / MIB);
        assert_eq!(get(&s, "target.web.fds"), 20.0);
        assert_eq!(s.get("target.web.cpu_pct"), None, "needs two samples");
        assert_eq!(status(&s, "web").state, "2 processes");
        assert!(status(&s, "web").up);
        assert_eq!(status(&s, "web").kind, "process");

        assert_eq!(get(&s, "target.journal.procs"), 1.0, "argv[0] and cut comm");
        assert_eq!(get(&s, "target.gw.procs"), 1.0, "argv[0] basename");
        assert_close(get(&s, "target.gw.rss_mb"), 100.0);
        assert_eq!(get(&s, "target.gw.threads"), 11.0);
        assert_eq!(status(&s, "gw").state, "1 process");

        assert_eq!(get(&s, "target.ghost.up"), 0.0);
        assert_eq!(get(&s, "target.ghost.procs"), 0.0);
        assert_eq!(s.get("target.ghost.rss_mb"), None);
        assert_eq!(
            status(&s, "ghost"),
            &TargetStatus {
                name: "ghost".to_string(),
                kind: "process".to_string(),
                state: "not found".to_string(),
                up: false,
                probe: None,
                detail: None,
            }
        );
        assert_eq!(s.targets.len(), 4, "host targets are not ours");
    }

    #[test]
    fn comm_prefix_match_without_cmdline() {
        // A process that rewrote its cmdline: only the cut comm says who it is.
        let p = Proc::new();
        p.add(
            200,
            "systemd-journal",
            &["journald: busy"],
            (1, 1),
            1,
            1,
            Some(1),
            1,
        );
        let mut c = ProcessCollector::new(&p.root, &[process_target("j", "systemd-journald")]);
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert_eq!(get(&s, "target.j.procs"), 1.0);
        assert!(!comm_matches("systemd-journal", b"systemd-journ"));
        assert!(!comm_matches("nginx", b"nginx-debug"));
    }

    #[test]
    fn cpu_pct_over_two_samples() {
        let p = fixture();
        let mut c = ProcessCollector::new(&p.root, &targets());
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));

        // Over 2 s: master +20 ticks, worker +280 ticks: 300 ticks = 3 s of
        // CPU at 100 Hz in 2 s = 150 % of one core.
        p.set_cpu(100, "nginx", (110, 60), 1, 5000);
        p.set_cpu(101, "nginx", (500, 180), 2, 5001);
        p.set_cpu(300, "node", (1050, 0), 11, 7000);
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(2), &mut s);
        assert_close(get(&s, "target.web.cpu_pct"), 150.0);
        assert_close(get(&s, "target.gw.cpu_pct"), 25.0);
        assert_close(get(&s, "target.journal.cpu_pct"), 0.0);
    }

    #[test]
    fn vanished_pid_rescans_at_once() {
        let p = fixture();
        let mut c = ProcessCollector::new(&p.root, &targets());
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));

        // The gateway restarts: old PID gone, a new one within a second.
        p.remove(300);
        p.add(
            310,
            "node",
            &["/opt/edge/bin/edge-gateway"],
            (5, 5),
            9,
            2560,
            Some(20),
            7100,
        );
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(1), &mut s);
        assert_eq!(get(&s, "target.gw.up"), 1.0);
        assert_eq!(get(&s, "target.gw.threads"), 9.0, "the new process");
        assert_eq!(
            s.get("target.gw.cpu_pct"),
            None,
            "a new process has no rate yet"
        );

        // And it stops for good.
        p.remove(310);
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(2), &mut s);
        assert_eq!(get(&s, "target.gw.up"), 0.0);
        assert_eq!(get(&s, "target.gw.procs"), 0.0);
        assert_eq!(status(&s, "gw").state, "not found");
        // The other targets were unaffected.
        assert_eq!(get(&s, "target.web.procs"), 2.0);
        assert_close(get(&s, "target.web.cpu_pct"), 0.0);
    }

    #[test]
    fn one_of_several_vanishing_keeps_the_rest_rated() {
        let p = fixture();
        let mut c = ProcessCollector::new(&p.root, &[process_target("web", "nginx")]);
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));
        p.remove(101);
        p.set_cpu(100, "nginx", (150, 50), 1, 5000);
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(1), &mut s);
        assert_eq!(get(&s, "target.web.procs"), 1.0);
        assert_close(get(&s, "target.web.cpu_pct"), 50.0);
    }

    #[test]
    fn reused_pid_is_not_the_same_process() {
        let p = fixture();
        let mut c = ProcessCollector::new(&p.root, &[process_target("gw", "edge-gateway")]);
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));
        // PID 300 now belongs to something else that started later.
        p.remove(300);
        p.add(300, "bash", &["-bash"], (1, 1), 1, 100, Some(3), 9000);
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(1), &mut s);
        assert_eq!(get(&s, "target.gw.up"), 0.0);
    }

    #[test]
    fn new_processes_wait_for_the_rescan() {
        let p = fixture();
        let mut c = ProcessCollector::new(&p.root, &[process_target("web", "nginx")]);
        let t0 = Instant::now();
        c.collect(t0, &mut Sample::new(0));
        p.add(
            102,
            "nginx",
            &["nginx: worker process"],
            (0, 0),
            1,
            10,
            Some(1),
            6000,
        );
        let mut s = Sample::new(0);
        c.collect(t0 + Duration::from_secs(2), &mut s);
        assert_eq!(get(&s, "target.web.procs"), 2.0, "no scan yet");
        let mut s = Sample::new(0);
        c.collect(t0 + RESCAN_INTERVAL, &mut s);
        assert_eq!(get(&s, "target.web.procs"), 3.0);
    }

    #[test]
    fn unreadable_fds_are_left_out() {
        let p = fixture();
        // PID 101's fd directory cannot be listed (EACCES for an unprivileged
        // agent; here it is simply not a directory).
        fs::remove_dir_all(p.root.join("101/fd")).unwrap();
        fs::write(p.root.join("101/fd"), "").unwrap();
        let mut c = ProcessCollector::new(&p.root, &targets());
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert_eq!(s.get("target.web.fds"), None);
        assert_eq!(get(&s, "target.web.procs"), 2.0);
        assert_eq!(get(&s, "target.gw.fds"), 40.0);
        let stats = c
            .measure_pids("unit:nginx", &[100, 101], Instant::now())
            .unwrap();
        assert_eq!(stats.fds, 8, "only what could be counted");
    }

    #[test]
    fn measure_pids_by_key() {
        let p = fixture();
        let mut c = ProcessCollector::new(&p.root, &[]);
        let t0 = Instant::now();
        let first = c
            .measure_pids("unit:nginx.service", &[100, 101, 100, 999], t0)
            .unwrap();
        assert_eq!(
            first,
            PidStats {
                count: 2,
                cpu_pct: None,
                rss_mb: 4096.0 * 4096.0 / MIB,
                threads: 3,
                fds: 20,
            }
        );
        p.set_cpu(100, "nginx", (150, 50), 1, 5000);
        let other = c.measure_pids("container:abc", &[100], t0).unwrap();
        assert_eq!(other.cpu_pct, None, "keys keep their own state");
        let second = c
            .measure_pids(
                "unit:nginx.service",
                &[100, 101],
                t0 + Duration::from_millis(500),
            )
            .unwrap();
        assert_close(second.cpu_pct.unwrap(), 100.0);
        assert_eq!(c.measure_pids("unit:gone", &[999], t0), None);
        assert_eq!(c.measure_pids("unit:zombie", &[400], t0), None);
        assert_eq!(c.measure_pids("unit:none", &[], t0), None);
    }

    #[test]
    fn idle_keys_are_dropped() {
        let p = fixture();
        let mut c = ProcessCollector::new(&p.root, &[]);
        let t0 = Instant::now();
        c.measure_pids("a", &[100], t0);
        c.measure_pids("b", &[100], t0 + Duration::from_secs(300));
        c.measure_pids("b", &[100], t0 + KEY_IDLE_LIMIT + Duration::from_secs(60));
        assert!(!c.keyed.contains_key("a"));
        assert!(c.keyed.contains_key("b"));
    }

    #[test]
    fn unreadable_process_table_is_not_available() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ProcessCollector::new(&dir.path().join("nope"), &targets());
        let mut s = Sample::new(0);
        c.collect(Instant::now(), &mut s);
        assert_eq!(s.get("target.web.up"), None, "no data is not 'down'");
        let st = status(&s, "web");
        assert_eq!(st.state, "not available");
        assert!(!st.up);
        assert!(st.detail.as_deref().unwrap().contains("cannot list"));
    }

    #[test]
    fn auxv_gives_ticks_and_page_size() {
        let mut bytes = Vec::new();
        for (k, v) in [
            (33usize, 1usize),
            (AT_PAGESZ, 16384),
            (AT_CLKTCK, 250),
            (0, 0),
            (AT_CLKTCK, 1),
        ] {
            bytes.extend_from_slice(&k.to_ne_bytes());
            bytes.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(parse_auxv(&bytes), (Some(250), Some(16384)));
        assert_eq!(parse_auxv(&bytes[..7]), (None, None));

        // The collector uses them: a 16 KiB-page, 250 Hz machine.
        let p = fixture();
        fs::create_dir_all(p.root.join("self")).unwrap();
        fs::write(p.root.join("self/auxv"), &bytes).unwrap();
        let mut c = ProcessCollector::new(&p.root, &[]);
        let t0 = Instant::now();
        let s = c.measure_pids("k", &[300], t0).unwrap();
        assert_close(s.rss_mb, 400.0);
        p.set_cpu(300, "node", (1250, 0), 11, 7000);
        let s = c
            .measure_pids("k", &[300], t0 + Duration::from_secs(1))
            .unwrap();
        assert_close(s.cpu_pct.unwrap(), 100.0);
    }

    #[test]
    fn brief_stat_parsing() {
        let line = stat_line(7, "a (weird) name", 'R', (1, 2), 3, 424242);
        let b = parse_brief(line.as_bytes()).unwrap();
        assert_eq!(b.comm, b"a (weird) name");
        assert!(!b.zombie);
        assert_eq!(b.starttime, 424242);
        let real = "7276 (cat) R 7272 7272 5190 0 -1 4194304 101 0 0 0 0 0 0 0 20 0 1 0 71867 3133440 384 18446744073709551615 94855251288064 94855251307945 140723978200448 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 94855251323952 94855251325568 94855683665920 140723978201828 140723978201842 140723978201842 140723978203115 0\n";
        let b = parse_brief(real.as_bytes()).unwrap();
        assert_eq!((b.comm, b.starttime), (&b"cat"[..], 71867));
        assert!(parse_brief(b"12 (x").is_none());
        assert!(parse_brief(b"").is_none());
        let mut d = [0u8; 10];
        assert_eq!(format_u32(0, &mut d), "0");
        assert_eq!(format_u32(u32::MAX, &mut d), "4294967295");
    }

    #[test]
    fn a_process_exiting_between_reads_is_skipped_quietly() {
        let p = fixture();
        let mut c = ProcessCollector::new(&p.root, &targets());
        let t0 = Instant::now();
        let ((), log) = crate::collect::capture_logs(|| {
            c.collect(t0, &mut Sample::new(0));
            // PID 101 exited after its stat was read and before its statm;
            // PID 300's stat is cut short (it exited mid-read).
            fs::remove_file(p.root.join("101/statm")).unwrap();
            let line = stat_line(300, "node", 'S', (1000, 0), 11, 7000);
            fs::write(p.root.join("300/stat"), &line[..line.len() / 3]).unwrap();
            for i in 1..=3 {
                let mut s = Sample::new(0);
                c.collect(t0 + Duration::from_secs(i), &mut s);
                assert_eq!(get(&s, "target.web.procs"), 1.0);
                assert_eq!(status(&s, "web").state, "1 process");
                assert_eq!(get(&s, "target.gw.up"), 0.0);
                assert_eq!(status(&s, "gw").state, "not found");
                assert_eq!(get(&s, "target.journal.procs"), 1.0);
            }
        });
        assert!(
            !log.contains("WARN") && !log.contains("ERROR"),
            "vanishing processes are not an operator's problem:\n{log}"
        );
    }

    #[test]
    fn stat_cut_anywhere_never_panics() {
        let line = stat_line(300, "a) (b", 'S', (1000, 20), 11, 7000);
        assert!(stat_head_is_whole(line.as_bytes()));
        for cut in 0..line.len() {
            let bytes = &line.as_bytes()[..cut];
            if let Some(b) = parse_brief(bytes) {
                assert_eq!(b.comm, b"a) (b", "cut at {cut}");
            }
            // procfs-core's parser is only handed what it can slice.
            if stat_head_is_whole(bytes) {
                let _ = Stat::from_read(bytes);
            }
        }
        for bad in [
            &b"(x) S 1"[..],
            b" (x) S 1",
            b"1(x) S 1",
            b"a (x) S 1",
            b"1 ) ( S 1",
            b"1 (x)",
            b"1 (x) ",
            b"1 (x)\xff\xff S",
            b"",
        ] {
            assert!(
                !stat_head_is_whole(bad),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let p = Proc::new();
        p.add(300, "a) (b", &[], (1000, 20), 11, 100, Some(1), 7000);
        let mut c = ProcessCollector::new(&p.root, &[process_target("x", "a) (b")]);
        let t0 = Instant::now();
        for cut in 0..line.len() {
            fs::write(p.root.join("300/stat"), &line[..cut]).unwrap();
            let mut s = Sample::new(0);
            c.collect(t0 + RESCAN_INTERVAL * (cut as u32 + 1), &mut s);
            assert!(get(&s, "target.x.procs") <= 1.0);
        }
        fs::write(p.root.join("300/stat"), &line).unwrap();
        let mut s = Sample::new(0);
        c.collect(t0 + RESCAN_INTERVAL * (line.len() as u32 + 1), &mut s);
        assert_eq!(get(&s, "target.x.procs"), 1.0);
    }

    /// Against this machine's /proc: this test process itself.
    #[test]
    fn real_proc_self() {
        let root = Path::new("/proc");
        let me = std::process::id();
        let comm = fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        let mut c = ProcessCollector::new(root, &[process_target("me", comm.trim())]);
        assert_eq!(c.reader.ticks_per_second, 100);
        assert!(c.reader.page_size >= 4096);

        let t0 = Instant::now();
        let first = c.measure_pids("self", &[me], t0).unwrap();
        assert_eq!(first.count, 1);
        assert!(first.threads >= 1);
        assert!(first.rss_mb > 0.0);
        assert!(first.fds >= 3, "stdin, stdout, stderr at least");

        let mut s = Sample::new(0);
        c.collect(t0, &mut s);
        assert_eq!(get(&s, "target.me.up"), 1.0);
        assert!(get(&s, "target.me.procs") >= 1.0);

        // Burn some CPU so the rate has something to show.
        let until = Instant::now() + Duration::from_millis(200);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert_ne!(x, 1);
        let t1 = Instant::now();
        let second = c.measure_pids("self", &[me], t1).unwrap();
        let cpu = second.cpu_pct.unwrap();
        assert!((0.0..=100.0 * 64.0).contains(&cpu), "cpu {cpu}");
        let mut s = Sample::new(0);
        c.collect(t1, &mut s);
        assert!(get(&s, "target.me.cpu_pct") >= 0.0);
        assert!(get(&s, "target.me.fds") >= 3.0);
    }
}
