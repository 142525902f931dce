//! Clock jumps: the real `outpost` daemon runs under libfaketime (Debian's
//! `faketime`, preloaded) reading a timestamp file that this test rewrites
//! while the agent runs, so the wall clock the agent reads (`SystemTime`:
//! its audit stamps, its records) leaps hours forward and back while
//! `CLOCK_MONOTONIC` (`Instant`: its timers and the engine's guard clock)
//! keeps real time, as on a host whose NTP steps the clock.
//!
//! - An `auto` rule with a 5 s cooldown and 3 actions an hour, on a port
//!   that stays closed: after its first action the wall clock goes 3 h back
//!   (the next action must still come, one cooldown later, not 3 h later),
//!   after its second 6 h forward (the cooldown must not expire at once, nor
//!   the budget free up); after the third and the escalation, more jumps
//!   either way change nothing, and neither does a restart with the clock
//!   3 h behind. The command times each action itself from /proc/uptime,
//!   which libfaketime does not touch.
//! - An `approve` rule: its request must neither expire at once when the
//!   clock leaps 3 h forward nor wait for ever when it leaps back; the next
//!   request is approved and acted on.
//!
//! Throughout: the agent keeps running, the audit chain verifies, every
//! audit row carries the host's wall clock as it was (jumped), and the
//! persisted guard clock never goes back and advances with real time only.

// Test helpers fail loudly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

// `now_ms` is the test's own (real) wall clock: this process is not
// preloaded.
use outpost_tests::agent::{free_port, now_ms as real_ms, outpost, try_actions, verify_chain};
use serde_json::Value;

const HOUR_MS: i64 = 3_600_000;
/// How far a stamp may stray from the window it was taken in (the file is
/// read at every call, so this is only the test's own reading slack).
const SLACK_MS: i64 = 2_000;
/// A generous deadline for anything the agent should do within seconds.
const WAIT: Duration = Duration::from_secs(30);
const COOLDOWN: Duration = Duration::from_secs(5);

/// libfaketime.so.1 from Debian's package (installed with apt if missing).
fn libfaketime() -> PathBuf {
    fn find() -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        dirs.push(PathBuf::from("/usr/lib"));
        dirs.into_iter()
            .map(|d| d.join("faketime/libfaketime.so.1"))
            .find(|p| p.is_file())
    }
    if let Some(p) = find() {
        return p;
    }
    outpost_tests::apt::install(&["faketime"]).expect("install faketime");
    find().expect("faketime is installed but libfaketime.so.1 is nowhere under /usr/lib")
}

/// The wall clock of the processes started with [`FakeClock::apply`]: an
/// offset from real time in the timestamp file, read at every clock call.
struct FakeClock {
    lib: PathBuf,
    file: PathBuf,
}

impl FakeClock {
    fn new(dir: &Path) -> FakeClock {
        let c = FakeClock {
            lib: libfaketime(),
            file: dir.join("faketime.rc"),
        };
        c.set("+0");
        c
    }

    /// `+3h`, `-3h`, `+0`: the wall clock from now on is real time plus
    /// this. Written whole and renamed into place, so a reader never sees
    /// half a file.
    fn set(&self, offset: &str) {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{offset}\n")).unwrap();
        std::fs::rename(&tmp, &self.file).unwrap();
    }

    fn apply(&self, cmd: &mut Command) {
        cmd.env("LD_PRELOAD", &self.lib)
            .env("FAKETIME_TIMESTAMP_FILE", &self.file)
            .env("FAKETIME_NO_CACHE", "1")
            // Only the wall clock jumps: Instant (CLOCK_MONOTONIC) and so
            // tokio's timers keep real time.
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env_remove("FAKETIME");
    }
}

/// The real daemon under the fake clock, its stderr in `agent-N.log`;
/// killed on drop if a test fails before stopping it.
struct Agent(outpost_tests::agent::Agent);

impl Agent {
    fn start(config: &Path, clock: &FakeClock, n: u32) -> Agent {
        let mut cmd = Command::new(outpost());
        cmd.args(["--log-format", "text", "run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM");
        clock.apply(&mut cmd);
        let log = config.with_file_name(format!("agent-{n}.log"));
        Agent(outpost_tests::agent::Agent::spawn(cmd, log))
    }

    fn log(&self) -> String {
        self.0.log()
    }

    /// Fails the test when the agent has exited.
    fn assert_running(&mut self) {
        self.0.assert_running();
    }

    /// SIGTERM, and a clean exit within 10 s.
    fn stop(mut self) {
        self.assert_running();
        let status = self.0.terminate();
        assert!(status.success(), "outpost exited {status}:\n{}", self.log());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.0.kill9();
        // libfaketime removes its shared memory on a clean exit only; what
        // a killed agent leaves would trip a later process with its pid.
        let pid = self.0.pid();
        let _ = std::fs::remove_file(format!("/dev/shm/faketime_shm_{pid}"));
        let _ = std::fs::remove_file(format!("/dev/shm/sem.faketime_sem_{pid}"));
    }
}

/// A host target probed on a closed port and one rule on its failure that
/// runs a command recording /proc/uptime (real time since boot) in
/// `marks`; `mode` is `auto` or `approve`.
fn write_config(dir: &Path, mode: &str, cooldown: &str) -> PathBuf {
    let config = dir.join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
node_id = "clock"
state_dir = "{state}"
sample_interval_ms = 200

[[target]]
name = "svc"
kind = "host"
probe = {{ tcp = "127.0.0.1:{port}", interval_ms = 200, timeout_ms = 100 }}

[[command]]
name = "mark"
argv = ["/bin/sh", "-c", "read up rest < /proc/uptime; echo $up >> {marks}"]
timeout = "5s"

[[rule]]
name = "svc-down"
target = "svc"
when = "probe_failed"
for = "2 samples"
do = "exec:mark"
mode = "{mode}"
cooldown = "{cooldown}"
max_per_hour = 3
verify = "probe_ok within 1s"
escalate = "notify"

[guard]
max_actions_per_hour = 10
approval_timeout = "6s"
"#,
            state = dir.join("state").display(),
            port = free_port(),
            marks = dir.join("marks").display(),
        ),
    )
    .unwrap();
    config
}

/// When the command ran, in real seconds since boot.
fn marks(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("marks"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

/// The whole audit trail (`outpost actions --json`).
fn actions(config: &Path) -> Vec<Value> {
    // The store may not exist yet right after the start.
    try_actions(config, 100_000).unwrap_or_default()
}

fn count(rows: &[Value], decision: &str) -> usize {
    rows.iter().filter(|r| r["decision"] == decision).count()
}

fn nth<'a>(rows: &'a [Value], decision: &str, n: usize) -> &'a Value {
    rows.iter()
        .filter(|r| r["decision"] == decision)
        .nth(n)
        .unwrap_or_else(|| panic!("no {decision} row #{n}: {rows:#?}"))
}

fn ts(row: &Value) -> i64 {
    row["ts_ms"].as_i64().unwrap()
}

/// Readings of the guard clock the agent persists with its engine state
/// (`guard_state`, key `engine`), each with when the test read it.
struct GuardClock {
    db: PathBuf,
    seen: Vec<(Instant, i64)>,
}

impl GuardClock {
    fn new(dir: &Path) -> GuardClock {
        GuardClock {
            db: dir.join("state/outpost.db"),
            seen: Vec::new(),
        }
    }

    fn read(&mut self) {
        let Ok(conn) = rusqlite::Connection::open_with_flags(
            &self.db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        ) else {
            return;
        };
        let _ = conn.busy_timeout(Duration::from_secs(2));
        let json: Option<String> = conn
            .query_row(
                "SELECT value FROM guard_state WHERE key = 'engine'",
                [],
                |r| r.get(0),
            )
            .ok();
        if let Some(json) = json {
            let v: Value = serde_json::from_str(&json).unwrap();
            let clock = v["clock_ms"]
                .as_i64()
                .expect("clock_ms in the engine state");
            self.seen.push((Instant::now(), clock));
        }
    }

    /// Never back; over the whole run, no more than the real time that
    /// passed (a wall-clock guard would have gained hours); and near real
    /// time, whatever the agent's wall clock said.
    fn check(&self) {
        assert!(self.seen.len() >= 3, "guard clock read {:?}", self.seen);
        for w in self.seen.windows(2) {
            assert!(
                w[0].1 <= w[1].1,
                "the guard clock went back: {} then {}",
                w[0].1,
                w[1].1
            );
        }
        let (t0, c0) = self.seen[0];
        let (t1, c1) = *self.seen.last().unwrap();
        let real = t1.duration_since(t0).as_millis() as i64;
        assert!(
            c1 - c0 <= real + SLACK_MS,
            "the guard clock gained {} ms in {real} ms of real time",
            c1 - c0
        );
        let off = (c1 - real_ms()).abs();
        assert!(
            off < 60_000,
            "the guard clock is {off} ms away from real time"
        );
    }
}

/// Polls the audit trail (and the guard clock) until `done`, failing after
/// [`WAIT`] or when the agent exits.
fn wait_for(
    agent: &mut Agent,
    config: &Path,
    guard: &mut GuardClock,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        agent.assert_running();
        guard.read();
        let rows = actions(config);
        if done(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {rows:#?}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lets `d` pass while watching the agent stay up.
fn hold(agent: &mut Agent, guard: &mut GuardClock, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        agent.assert_running();
        guard.read();
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every stamp is a wall-clock time the agent could have read: within the
/// run's real span widened by the largest jump, never 0 or garbage.
fn assert_stamps_sane(rows: &[Value], start: i64, max_jump_ms: i64) {
    let end = real_ms();
    for r in rows {
        let t = ts(r);
        assert!(
            t >= start - max_jump_ms - SLACK_MS && t <= end + max_jump_ms + SLACK_MS,
            "stamp {t} outside [{start}, {end}] ± {max_jump_ms} ms: {r}"
        );
    }
    let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    let want: Vec<u64> = (1..=rows.len() as u64).collect();
    assert_eq!(ids, want, "audit ids are contiguous from 1");
}

fn in_window(t: i64, from: i64, to: i64) -> bool {
    t >= from - SLACK_MS && t <= to + SLACK_MS
}

#[test]
fn cooldown_and_budget_hold_across_wall_clock_jumps() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let clock = FakeClock::new(dir);
    let config = write_config(dir, "auto", "5s");
    let mut guard = GuardClock::new(dir);
    let start = real_ms();
    let mut agent = Agent::start(&config, &clock, 1);

    // The first action, on real time.
    let rows = wait_for(&mut agent, &config, &mut guard, "the first action", |r| {
        count(r, "acted") >= 1
    });
    let seen1 = real_ms();
    assert!(
        in_window(ts(nth(&rows, "acted", 0)), start, seen1),
        "{rows:#?}"
    );

    // Three hours back: the cooldown must still end 5 s after the first
    // action (on a wall-clock cooldown it would end in 3 h).
    clock.set("-3h");
    let back = real_ms();
    let rows = wait_for(
        &mut agent,
        &config,
        &mut guard,
        "the second action after the wall clock went 3 h back",
        |r| count(r, "acted") >= 2,
    );
    let seen2 = real_ms();
    let t2 = ts(nth(&rows, "acted", 1));
    assert!(
        in_window(t2, back - 3 * HOUR_MS, seen2 - 3 * HOUR_MS),
        "the second action is stamped {t2}, not 3 h behind [{back}, {seen2}]: \
         the fake clock did not take"
    );

    // Six hours forward (+3 h from real time): on a wall-clock guard the
    // cooldown would be over at once and the hour's budget free again.
    clock.set("+3h");
    let fwd = real_ms();
    let rows = wait_for(
        &mut agent,
        &config,
        &mut guard,
        "the third action after the wall clock went 6 h forward",
        |r| count(r, "acted") >= 3,
    );
    let seen3 = real_ms();
    let t3 = ts(nth(&rows, "acted", 2));
    assert!(
        in_window(t3, fwd + 3 * HOUR_MS, seen3 + 3 * HOUR_MS),
        "the third action is stamped {t3}, not 3 h ahead of [{fwd}, {seen3}]"
    );

    // The budget (3 an hour) is spent: one escalation, then quiet.
    wait_for(&mut agent, &config, &mut guard, "the escalation", |r| {
        count(r, "escalated") >= 1
    });
    // Two more hours forward (an hour past the escalation, on the wall),
    // then back behind every action taken: still nothing.
    clock.set("+5h");
    hold(&mut agent, &mut guard, Duration::from_secs(7));
    clock.set("-5h");
    hold(&mut agent, &mut guard, Duration::from_secs(3));
    agent.assert_running();

    let rows = actions(&config);
    assert_eq!(count(&rows, "acted"), 3, "acted past the budget: {rows:#?}");
    assert_eq!(count(&rows, "escalated"), 1, "{rows:#?}");
    assert_eq!(count(&rows, "action_failed"), 0, "{rows:#?}");
    assert_eq!(count(&rows, "verify_failed"), 3, "{rows:#?}");
    let m = marks(dir);
    assert_eq!(m.len(), 3, "the command ran {} times: {m:?}", m.len());
    // The cooldown held on real time across both jumps: 5 s apart, less a
    // second for the time between deciding and the command reading the
    // clock on a loaded machine (a cooldown a jump cut short shows as
    // actions about 1 s apart, one failed check after the other).
    let min_gap = COOLDOWN.as_secs_f64() - 1.0;
    for w in m.windows(2) {
        assert!(
            w[1] - w[0] >= min_gap,
            "actions {:.2} s apart, the cooldown is {COOLDOWN:?}: {m:?}",
            w[1] - w[0]
        );
    }
    assert_stamps_sane(&rows, start, 5 * HOUR_MS);
    verify_chain(&config);
    agent.stop();

    // A restart with the wall clock 3 h behind every stamp of the last run:
    // the persisted guard clock does not go back, so the budget holds.
    clock.set("-3h");
    let restart = real_ms();
    let before = rows.len();
    let mut agent = Agent::start(&config, &clock, 2);
    let rows = wait_for(
        &mut agent,
        &config,
        &mut guard,
        "the restarted agent's first decision",
        |r| r.len() > before,
    );
    hold(&mut agent, &mut guard, Duration::from_secs(3));
    let rows_after = actions(&config);
    agent.stop();
    assert_eq!(
        count(&rows_after, "acted"),
        3,
        "acted again after a restart with the clock behind: {rows_after:#?}"
    );
    assert_eq!(marks(dir).len(), 3);
    let new = &rows[before];
    assert_eq!(new["decision"], "suppressed", "{new}");
    assert!(
        in_window(ts(new), restart - 3 * HOUR_MS, real_ms() - 3 * HOUR_MS),
        "{new}"
    );
    assert_stamps_sane(&rows_after, start, 5 * HOUR_MS);
    verify_chain(&config);
    guard.check();
}

#[test]
fn approval_expiry_holds_across_wall_clock_jumps() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let clock = FakeClock::new(dir);
    let config = write_config(dir, "approve", "2s");
    let mut guard = GuardClock::new(dir);
    let start = real_ms();
    let mut agent = Agent::start(&config, &clock, 1);

    wait_for(
        &mut agent,
        &config,
        &mut guard,
        "an approval request",
        |r| count(r, "awaiting_approval") >= 1,
    );
    let asked = Instant::now();

    // Three hours forward: the 6 s request must not expire at once.
    clock.set("+3h");
    hold(&mut agent, &mut guard, Duration::from_millis(2500));
    let rows = actions(&config);
    assert_eq!(
        count(&rows, "expired"),
        0,
        "the request expired when the wall clock jumped: {rows:#?}"
    );

    // Three hours back from the real time: it must still expire on time,
    // not in hours.
    clock.set("-3h");
    let rows = wait_for(
        &mut agent,
        &config,
        &mut guard,
        "the request to expire after the wall clock went 6 h back",
        |r| count(r, "expired") >= 1,
    );
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_secs(5),
        "the 6 s request expired after {waited:?}: {rows:#?}"
    );

    // A cooldown later it asks again; an approval still acts.
    let rows = wait_for(&mut agent, &config, &mut guard, "a second request", |r| {
        count(r, "awaiting_approval") >= 2
    });
    let id = nth(&rows, "awaiting_approval", 1)["decision_id"]
        .as_u64()
        .unwrap();
    let out = Command::new(outpost())
        .args(["approve", "--config"])
        .arg(&config)
        .arg(id.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "outpost approve {id}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = wait_for(
        &mut agent,
        &config,
        &mut guard,
        "the approved action",
        |r| count(r, "acted") >= 1,
    );
    assert_eq!(marks(dir).len(), 1);
    assert_eq!(count(&rows, "expired"), 1, "{rows:#?}");
    assert_stamps_sane(&rows, start, 3 * HOUR_MS);
    verify_chain(&config);
    agent.stop();
    guard.check();
}
