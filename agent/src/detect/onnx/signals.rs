//! Which feature names the agent computes: a feature is
//! `SIGNAL.STAT_Ns` (see [`crate::detect::features::feature_name`]) over one
//! of the collectors' signals. The patterns follow the collectors
//! (`collect::host`, `collect::systemd`, `collect::container`,
//! `collect::process`, `collect::probe`); a model package that names any
//! other feature could never score, so it is refused at load.

use crate::detect::features::STATS;

/// Host signals with a fixed name.
const HOST_FIXED: &[&str] = &[
    "host.cpu.busy_pct",
    "host.cpu.user_pct",
    "host.cpu.system_pct",
    "host.cpu.iowait_pct",
    "host.cpu.steal_pct",
    "host.load.1m",
    "host.load.5m",
    "host.load.15m",
    "host.procs.count",
    "host.mem.available_mb",
    "host.mem.used_mb",
    "host.mem.used_pct",
    "host.swap.used_mb",
    "host.psi.cpu.some_avg10",
    "host.psi.memory.some_avg10",
    "host.psi.memory.full_avg10",
    "host.psi.io.some_avg10",
    "host.psi.io.full_avg10",
];

/// Host signals per device: `host.{group}.{segment}.{suffix}`.
const HOST_PER_DEVICE: &[(&str, &[&str])] = &[
    ("disk", &["used_pct", "avail_mb"]),
    ("diskio", &["read_bps", "write_bps"]),
    (
        "net",
        &[
            "rx_bps",
            "tx_bps",
            "rx_errors_ps",
            "tx_errors_ps",
            "rx_drops_ps",
            "tx_drops_ps",
        ],
    ),
];

/// Per-target signals: `target.{name}.{suffix}` (systemd units, containers,
/// process groups, probes).
const TARGET_SUFFIXES: &[&str] = &[
    "up",
    "restarts",
    "cpu_pct",
    "mem_mb",
    "healthy",
    "procs",
    "rss_mb",
    "threads",
    "fds",
    "probe.ok",
    "probe.latency_ms",
];

/// A device segment as `collect::sanitize_segment` makes it.
fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A target name as the config accepts it.
fn is_target_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether some collector of the agent produces the signal `name`.
pub fn is_known_signal(name: &str) -> bool {
    if HOST_FIXED.contains(&name) {
        return true;
    }
    if let Some(rest) = name.strip_prefix("host.thermal.zone") {
        if let Some(idx) = rest.strip_suffix(".temp_c") {
            return !idx.is_empty() && idx.bytes().all(|b| b.is_ascii_digit());
        }
        return false;
    }
    if let Some(rest) = name.strip_prefix("host.") {
        for (group, suffixes) in HOST_PER_DEVICE {
            if let Some(dev) = rest.strip_prefix(group).and_then(|r| r.strip_prefix('.')) {
                return suffixes.iter().any(|s| {
                    dev.strip_suffix(s)
                        .and_then(|seg| seg.strip_suffix('.'))
                        .is_some_and(is_segment)
                });
            }
        }
        return false;
    }
    if let Some(rest) = name.strip_prefix("target.") {
        return TARGET_SUFFIXES.iter().any(|s| {
            rest.strip_suffix(s)
                .and_then(|t| t.strip_suffix('.'))
                .is_some_and(is_target_name)
        });
    }
    false
}

/// Why `feature` is not a feature the agent computes over a `window_s`
/// window, or `None` when it is.
pub fn feature_problem(feature: &str, window_s: u64) -> Option<String> {
    let Some((signal, stat_window)) = feature.rsplit_once('.') else {
        return Some("not SIGNAL.STAT_Ns".into());
    };
    let Some((stat, window)) = stat_window.split_once('_') else {
        return Some("not SIGNAL.STAT_Ns".into());
    };
    if !STATS.contains(&stat) {
        return Some(format!(
            "statistic {stat:?} is not one of {}",
            STATS.join(", ")
        ));
    }
    let secs = window
        .strip_suffix('s')
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse::<u64>().ok());
    match secs {
        None => return Some(format!("window {window:?} is not N s (e.g. `60s`)")),
        Some(w) if w != window_s => {
            return Some(format!(
                "its window is {w}s but window.window_s is {window_s}"
            ))
        }
        Some(_) => {}
    }
    if !is_known_signal(signal) {
        return Some(format!(
            "no collector of the agent produces signal {signal:?}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_the_collectors_produce() {
        for s in [
            "host.cpu.busy_pct",
            "host.psi.io.full_avg10",
            "host.disk.var_lib.used_pct",
            "host.disk.root.avail_mb",
            "host.diskio.nvme0n1.read_bps",
            "host.net.eth0.rx_drops_ps",
            "host.thermal.zone0.temp_c",
            "target.web.probe.latency_ms",
            "target.my-db.restarts",
            "target.worker_1.fds",
        ] {
            assert!(is_known_signal(s), "{s}");
        }
        for s in [
            "host.not_a_signal",
            "host.cpu",
            "host.disk.used_pct",
            "host.disk.Var.used_pct",
            "host.net.eth0.rx_packets",
            "host.thermal.zonex.temp_c",
            "target.web.latency",
            "target..up",
            "value",
            "other.cpu.busy_pct",
        ] {
            assert!(!is_known_signal(s), "{s}");
        }
    }

    #[test]
    fn feature_names_follow_the_windows() {
        assert_eq!(feature_problem("host.cpu.busy_pct.mean_60s", 60), None);
        assert_eq!(
            feature_problem("target.web.probe.ok.slope_5s", 5),
            None,
            "a dotted target suffix"
        );
        assert!(feature_problem("host.cpu.busy_pct.mean_60s", 5)
            .unwrap()
            .contains("window.window_s is 5"));
        assert!(feature_problem("host.cpu.busy_pct.median_60s", 60)
            .unwrap()
            .contains("statistic \"median\""));
        assert!(feature_problem("host.not_a_signal.mean_5s", 5)
            .unwrap()
            .contains("\"host.not_a_signal\""));
        assert!(feature_problem("nodots", 5).is_some());
        assert!(feature_problem("host.cpu.busy_pct.mean_s", 5).is_some());
    }
}
