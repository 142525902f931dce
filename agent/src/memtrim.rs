//! Start-up code out of the resident set.
//!
//! A minute after start (and after every reload) outpost drops its page-table
//! entries for its own executable's read-only mappings: the code and
//! constants that parsing the config, opening the store and compiling models
//! touched once. What runs every second maps itself back in at its next use,
//! from the page cache; what ran once stays out. Without this, the start-up
//! code stays mapped for the life of the process and counts in its RSS
//! (about 1.7 MiB of a 10.9 MiB RSS, BENCHMARKS.md), and the kernel keeps
//! mapped executable pages in memory in preference to other page cache.
//!
//! Only mappings that are read-only, private, backed by outpost's own
//! executable and hold no copied-on-write page are released: every page of
//! such a mapping equals the file's, so dropping and re-reading it changes
//! nothing. The relocated read-only data (RELRO) holds copied pages and is
//! never touched, nor is anything writable.
//!
//! The same release runs after each periodic store flush (at most once a
//! minute): what a flush runs (SQLite's write path, zstd) is needed a few
//! times an hour and otherwise only holds memory.
//!
//! The heap: glibc's malloc serves a request above its mmap threshold with
//! a mapping of its own that goes back to the kernel when freed, but by
//! default it raises that threshold to the size of every such block freed,
//! so from the second store flush on, zstd's ~0.8 MiB compression tables
//! came from the heap and stayed resident after the flush (measured:
//! BENCHMARKS.md "Footprint"). [`fix_mmap_threshold`] pins the threshold,
//! which also turns the raising off.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How long after a start or a reload the start-up pages are released: by
/// then the first samples, probes, steps and store writes have run.
pub const DELAY: Duration = Duration::from_secs(60);

/// Environment variable: seconds after a start or reload before the
/// release ([`DELAY`] when unset or not a number); `0` turns it off.
pub const DELAY_ENV: &str = "OUTPOST_PAGE_RELEASE_AFTER";

fn delay_from(value: Option<&str>) -> Option<Duration> {
    match value.map(|v| v.trim().parse::<u64>()) {
        Some(Ok(0)) => None,
        Some(Ok(s)) => Some(Duration::from_secs(s)),
        _ => Some(DELAY),
    }
}

/// One mapping from `/proc/self/smaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    path: String,
    rss_kib: u64,
    anonymous_kib: u64,
}

/// Parses `/proc/PID/smaps`: a header line per mapping
/// (`START-END PERMS OFFSET DEV INODE [PATH]`) followed by `Key: N kB` lines.
fn parse_smaps(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                let perms = fields.next().unwrap_or_default().to_string();
                // offset, device, inode; the path is the rest of the line
                // (it may contain spaces).
                let mut rest = line;
                for _ in 0..5 {
                    rest = rest.trim_start();
                    rest = rest.find(char::is_whitespace).map_or("", |i| &rest[i..]);
                }
                out.push(Mapping {
                    start,
                    end,
                    perms,
                    path: rest.trim().to_string(),
                    rss_kib: 0,
                    anonymous_kib: 0,
                });
                continue;
            }
        }
        let Some(m) = out.last_mut() else { continue };
        let value = || fields.clone().next().and_then(|v| v.parse::<u64>().ok());
        match first {
            "Rss:" => m.rss_kib = value().unwrap_or(0),
            "Anonymous:" => m.anonymous_kib = value().unwrap_or(u64::MAX),
            _ => {}
        }
    }
    out
}

/// The mappings that can be released: `exe`'s, read-only, private, with
/// resident pages and none of them a private copy.
fn releasable(mappings: Vec<Mapping>, exe: &str) -> Vec<Mapping> {
    mappings
        .into_iter()
        .filter(|m| {
            let p = m.perms.as_bytes();
            m.path == exe
                && p.len() == 4
                && p[0] == b'r'
                && p[1] == b'-'
                && p[3] == b'p'
                && m.anonymous_kib == 0
                && m.rss_kib > 0
                && m.end > m.start
        })
        .collect()
}

#[allow(unsafe_code)]
fn dont_need(m: &Mapping) -> io::Result<()> {
    // SAFETY: `m` is a whole mapping of this process's own executable that is
    // read-only and private and holds no copied-on-write page (smaps
    // `Anonymous: 0 kB`; a read-only mapping cannot gain one), so every page
    // in it equals the file's contents, and a running executable's file
    // cannot be written (ETXTBSY). MADV_DONTNEED on such a mapping only
    // drops page-table entries: the next access maps the same bytes from
    // the page cache (or the file). No memory any Rust value refers to
    // changes, and nothing writable is passed.
    unsafe {
        rustix::mm::madvise(
            std::ptr::without_provenance_mut(m.start),
            m.end - m.start,
            rustix::mm::Advice::LinuxDontNeed,
        )
    }
    .map_err(io::Error::from)
}

/// Releases this process's start-up pages (see the module docs). Returns
/// the resident KiB released.
pub fn release_startup_pages() -> io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_string_lossy();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = 0;
    for m in releasable(parse_smaps(&smaps), &exe) {
        dont_need(&m)?;
        released += m.rss_kib;
    }
    Ok(released)
}

/// Requests of at least this many bytes get a mapping of their own from
/// glibc's malloc, returned to the kernel when freed (glibc's initial
/// default, kept fixed).
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Pins glibc's mmap threshold at [`MMAP_THRESHOLD`] (see the module docs).
/// Call before other threads start. Returns whether the allocator took it
/// (always false off glibc, where there is nothing to fix).
pub fn fix_mmap_threshold() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    {
        // SAFETY: mallopt only changes a tuning parameter of glibc's
        // allocator (it takes the allocator's lock); no memory is touched
        // and blocks already allocated keep working whatever the threshold.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Set by [`schedule`]: only the daemon releases pages after its flushes.
static AFTER_FLUSH: AtomicBool = AtomicBool::new(false);
/// When pages were last released after a flush (ms since the epoch).
static LAST_AFTER_FLUSH_MS: AtomicU64 = AtomicU64::new(0);
/// Flush-time releases are at least this far apart.
const AFTER_FLUSH_EVERY_MS: u64 = 60_000;

/// Called by the store's writer after a periodic flush: releases the
/// executable's clean pages again (see the module docs), in the daemon only,
/// when the release is on and at most once a minute. Returns the KiB
/// released.
pub fn after_flush() -> Option<u64> {
    if !AFTER_FLUSH.load(Ordering::Relaxed) {
        return None;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let last = LAST_AFTER_FLUSH_MS.load(Ordering::Relaxed);
    if now.saturating_sub(last) < AFTER_FLUSH_EVERY_MS
        || LAST_AFTER_FLUSH_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return None;
    }
    match release_startup_pages() {
        Ok(kib) => {
            tracing::debug!(kib, "pages released after the store flush");
            Some(kib)
        }
        Err(e) => {
            tracing::debug!(error = %e, "could not release pages after the store flush");
            None
        }
    }
}

/// Releases the start-up pages after [`DELAY`] (or [`DELAY_ENV`]), in the
/// background, logging what it released; from then on the store's
/// periodic flushes release them again ([`after_flush`]).
pub fn schedule() {
    let Some(delay) = delay_from(std::env::var(DELAY_ENV).ok().as_deref()) else {
        return;
    };
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        AFTER_FLUSH.store(true, Ordering::Relaxed);
        match release_startup_pages() {
            Ok(kib) => tracing::info!(kib, "start-up pages released"),
            Err(e) => tracing::warn!(error = %e, "could not release start-up pages"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SMAPS: &str = "\
55e0f4e15000-55e0f5370000 r--p 00000000 fd:01 1234                       /usr/bin/outpost
Size:               5484 kB
Rss:                2604 kB
Anonymous:             0 kB
VmFlags: rd mr mw me dw sd
55e0f5370000-55e0f6e5a000 r-xp 0055a000 fd:01 1234                       /usr/bin/outpost
Size:              27560 kB
Rss:                8128 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me dw sd
55e0f6e5a000-55e0f6f61000 r--p 02044000 fd:01 1234                       /usr/bin/outpost
Rss:                1052 kB
Anonymous:          1052 kB
55e0f6f61000-55e0f6f6c000 rw-p 0214b000 fd:01 1234                       /usr/bin/outpost
Rss:                  44 kB
Anonymous:            44 kB
55e0f6f6c000-55e0f6f6d000 rw-p 00000000 00:00 0 
Rss:                   4 kB
Anonymous:             4 kB
7f0000000000-7f0000001000 r-xp 00000000 fd:01 99                         /usr/lib/libc.so.6
Rss:                   4 kB
Anonymous:             0 kB
7f0000002000-7f0000003000 r-xp 00000000 fd:01 77                         /opt/my tools/out post
Rss:                   4 kB
Anonymous:             0 kB
";

    #[test]
    fn parses_headers_paths_and_sizes() {
        let m = parse_smaps(SMAPS);
        assert_eq!(m.len(), 7);
        assert_eq!(m[1].start, 0x55e0f5370000);
        assert_eq!(m[1].end, 0x55e0f6e5a000);
        assert_eq!(m[1].perms, "r-xp");
        assert_eq!(m[1].path, "/usr/bin/outpost");
        assert_eq!((m[1].rss_kib, m[1].anonymous_kib), (8128, 0));
        assert_eq!(m[4].path, "");
        assert_eq!(m[6].path, "/opt/my tools/out post");
    }

    #[test]
    fn releases_only_clean_read_only_mappings_of_the_executable() {
        let r = releasable(parse_smaps(SMAPS), "/usr/bin/outpost");
        let perms: Vec<_> = r.iter().map(|m| (m.perms.as_str(), m.rss_kib)).collect();
        // The constants and the code; not the relocated RELRO (copied
        // pages), not .data, not anonymous memory, not libc.
        assert_eq!(perms, vec![("r--p", 2604), ("r-xp", 8128)]);
        let spaced = releasable(parse_smaps(SMAPS), "/opt/my tools/out post");
        assert_eq!(spaced.len(), 1);
    }

    #[test]
    fn the_delay_comes_from_the_environment_and_zero_turns_it_off() {
        assert_eq!(delay_from(None), Some(DELAY));
        assert_eq!(delay_from(Some("5")), Some(Duration::from_secs(5)));
        assert_eq!(delay_from(Some("0")), None);
        assert_eq!(delay_from(Some("soon")), Some(DELAY));
    }

    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    static NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

    fn exe_text_rss_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        releasable(parse_smaps(&smaps), &exe.to_string_lossy())
            .iter()
            .map(|m| m.rss_kib)
            .sum()
    }

    #[test]
    fn releasing_shrinks_the_resident_code_and_changes_nothing() {
        COUNTER.store(41, Ordering::SeqCst);
        let heap = vec![7u8; 1 << 20];
        let before = exe_text_rss_kib();
        assert!(before > 0, "the test binary's code is resident");
        let released = release_startup_pages().expect("release");
        assert!(released > 0);
        // Right after, less of the code is mapped than before (other tests
        // run beside this one and map what they run back in)...
        let after = exe_text_rss_kib();
        assert!(after < before, "before {before} KiB, after {after} KiB");
        // ...and everything still works: code runs, statics (and the
        // relocated pointers in NAMES) and the heap are intact.
        COUNTER.fetch_add(1, Ordering::SeqCst);
        assert_eq!(COUNTER.load(Ordering::SeqCst), 42);
        assert_eq!(NAMES.join(","), "alpha,beta,gamma");
        assert!(heap.iter().all(|&b| b == 7));
        let again = parse_smaps(&std::fs::read_to_string("/proc/self/smaps").expect("smaps"));
        assert!(!again.is_empty());
    }
}
