//! The 1 Hz sampler is the hot path. This compares outpost's procfs
//! collectors with sysinfo refreshing the same information, so the choice
//! between them is measured, not guessed.
//!
//!   cargo bench -p outpost --bench sampler

use std::path::Path;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use outpost::collect::host::HostCollector;
use outpost::collect::process::ProcessCollector;
use outpost::collect::Sample;
use outpost::config::parse_str;
use sysinfo::{
    Components, CpuRefreshKind, Disks, MemoryRefreshKind, Networks, ProcessRefreshKind,
    ProcessesToUpdate, System,
};

fn host(c: &mut Criterion) {
    let mut g = c.benchmark_group("host");
    let mut collector = HostCollector::new(Path::new("/proc"), Path::new("/sys"));
    collector.collect(Instant::now(), &mut Sample::new(0));
    g.bench_function("outpost_procfs", |b| {
        b.iter(|| {
            let mut s = Sample::new(0);
            collector.collect(Instant::now(), &mut s);
            s
        })
    });

    // The same signals from sysinfo: CPU usage, memory, load, disks,
    // networks and thermal components, with targeted refreshes.
    let mut sys = System::new().expect("sysinfo");
    let mut disks = Disks::new_with_refreshed_list().expect("disks");
    let mut nets = Networks::new_with_refreshed_list().expect("networks");
    let mut comps = Components::new_with_refreshed_list().expect("components");
    g.bench_function("sysinfo_targeted", |b| {
        b.iter(|| {
            sys.refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
            sys.refresh_memory_specifics(MemoryRefreshKind::everything());
            let load = System::load_average();
            disks.refresh(true);
            nets.refresh(true);
            comps.refresh(true);
            (sys.global_cpu_usage(), sys.available_memory(), load.is_ok())
        })
    });
    g.finish();
}

fn processes(c: &mut Criterion) {
    let mut g = c.benchmark_group("process_targets_5");
    let names = ["sshd", "systemd", "cargo", "bash", "outpost"];
    let toml: String = names
        .iter()
        .map(|n| format!("[[target]]\nname = \"{n}\"\nkind = \"process\"\nprocess = \"{n}\"\n"))
        .collect();
    let cfg = parse_str(&toml, "bench").expect("config");
    let mut collector = ProcessCollector::new(Path::new("/proc"), &cfg.targets);
    collector.collect(Instant::now(), &mut Sample::new(0));
    g.bench_function("outpost_procfs", |b| {
        b.iter(|| {
            let mut s = Sample::new(0);
            collector.collect(Instant::now(), &mut s);
            s
        })
    });

    // sysinfo must refresh every process to find the matching ones.
    let mut sys = System::new().expect("sysinfo");
    let kind = ProcessRefreshKind::nothing().with_cpu().with_memory();
    sys.refresh_processes_specifics(ProcessesToUpdate::All, true, kind);
    g.bench_function("sysinfo_all_processes", |b| {
        b.iter(|| {
            sys.refresh_processes_specifics(ProcessesToUpdate::All, true, kind);
            names
                .iter()
                .map(|n| sys.processes_by_exact_name(n.as_ref()).count())
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, host, processes);
criterion_main!(benches);
