//! `outpost demo` end to end: the real binary, its embedded broker, demo
//! service and in-process agent. It must handle all three faults (and the
//! fleet must hear about them), print every stage of the timeline, stop
//! well within a minute and leave no process or file behind.

#![cfg(feature = "demo")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
/// The demo promises to end within a minute, whatever happens.
const LIMIT: Duration = Duration::from_secs(60);

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

fn run_demo(tmp: &std::path::Path) -> Run {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("demo")
        .env("TMPDIR", tmp)
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outpost demo");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st.code();
        }
        if started.elapsed() > LIMIT + Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Run {
        code,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
        took: started.elapsed(),
    }
}

/// PIDs whose argv[0] is `name`.
fn processes_named(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if argv0 == name.as_bytes() {
            pids.push(pid);
        }
    }
    pids
}

#[test]
fn demo_detects_remediates_and_reports_three_faults() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let run = run_demo(tmp.path());
    let all = format!("stdout:\n{}\nstderr:\n{}", run.stdout, run.stderr);
    eprintln!("outpost demo took {:.1} s\n{all}", run.took.as_secs_f64());

    assert_eq!(run.code, Some(0), "outpost demo failed\n{all}");
    assert!(run.took < LIMIT, "took {:?}\n{all}", run.took);

    // The timeline: every fault went through every stage, in order, each
    // stage line taken from the agent's records or the fleet's messages.
    let stages = [
        "injected", "detected", "decided", "acted", "verified", "reported",
    ];
    let faults = ["hang", "leak", "spin"];
    let sections: Vec<&str> = run.stdout.split("── fault ").skip(1).collect();
    assert_eq!(sections.len(), faults.len(), "{all}");
    for (i, (fault, section)) in faults.iter().zip(&sections).enumerate() {
        assert!(
            section.starts_with(&format!("{}/3: {fault}", i + 1)),
            "fault order: {section}"
        );
        let mut last = 0;
        for stage in stages {
            let at = section
                .lines()
                .position(|l| l.split_whitespace().nth(1) == Some(stage))
                .unwrap_or_else(|| panic!("{fault}: no {stage} line\n{all}"));
            assert!(at >= last, "{fault}: {stage} out of order\n{section}");
            last = at;
            let line = section.lines().nth(at).unwrap_or_default();
            assert!(
                !line.contains("NOT SEEN")
                    && !line.contains("FAILED")
                    && !line.contains("not checked"),
                "{fault}: {line}\n{all}"
            );
        }
        // Drawn from the agent's own records: the audit trail's rows and
        // the service manager's account of the kill.
        assert!(section.contains("audit #"), "{fault}: {section}");
        assert!(section.contains("exec:stop-svc"), "{fault}: {section}");
        assert!(section.contains("killed (SIGKILL) on request"), "{section}");
        assert!(section.contains("fleet received"), "{section}");
    }

    // The summary table: one row per fault, each detected, remediated,
    // verified and reported.
    let summary = run
        .stdout
        .split("\nsummary")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary\n{all}"));
    assert!(summary.contains("detected after"), "{summary}");
    assert!(summary.contains("remediated after"), "{summary}");
    assert!(summary.contains("reported upstream"), "{summary}");
    for fault in faults {
        let row = summary
            .lines()
            .find(|l| l.split_whitespace().next() == Some(fault))
            .unwrap_or_else(|| panic!("no summary row for {fault}\n{summary}"));
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert!(cols[1].ends_with('s'), "{fault} detected: {row}");
        assert!(cols[2].ends_with('s'), "{fault} remediated: {row}");
        assert_eq!(cols[3], "yes", "{fault} verified: {row}");
        assert!(row.contains(" yes ("), "{fault} reported upstream: {row}");
    }
    assert!(
        summary
            .contains("result: PASS — 3 of 3 faults detected and remediated, 3 reported upstream"),
        "{summary}"
    );

    // Nothing left behind: no demo service, no temp dir.
    let name = run
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("demo-svc-"))
        .unwrap_or_else(|| panic!("no service name\n{all}"));
    assert_eq!(
        processes_named(name),
        Vec::<u32>::new(),
        "{name} still runs"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("read tmp")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
