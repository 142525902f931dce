//! The uplink against misbehaving brokers, each case with the real `outpost`
//! binary (JSON logs) and, to finish, a real mosquitto
//! (tests/src/mosquitto.rs):
//!
//! 1. A broker that stalls. A fake on the broker's port first accepts the
//!    TCP connection and never sends a CONNACK, then answers CONNECT with a
//!    valid CONNACK and never answers again (no PUBACK, no PINGRESP). The
//!    agent gives up on each connection after its connect timeout or one
//!    unanswered keepalive, logs why ("stalled: no CONNACK within 5s…",
//!    "stalled: no PINGRESP within one keepalive…"), waits at least
//!    `reconnect_min` between attempts and does not reset its backoff for a
//!    CONNACK alone; its memory stays flat over the cycles. Then the real
//!    mosquitto comes back on the same port and every event queued since the
//!    agent started arrives, seq 1 onwards with no gap.
//! 2. A broker that sends garbage: random bytes, a bad CONNACK, a reserved
//!    packet type, a malformed length, a PUBLISH announcing 256 MiB followed
//!    by 32 MiB of bytes, and one announcing 16 MiB that never comes. The
//!    agent never crashes, drops each connection, says "protocol error" and
//!    why, never reads the 256 MiB, keeps its memory flat, and delivers
//!    everything once the real broker is back.
//! 3. A real mosquitto that refuses the agent's password (PasswordAcl). The
//!    agent says "auth refused", retries within what its backoff allows (the
//!    broker's log counts the attempts), keeps sampling and acting locally,
//!    and connects without a restart once the password file is fixed: it
//!    reads the file again before every reconnect.
//!
//! The three run in parallel, each with its own broker and agent: about a
//! minute in all.

// Test helpers fail loudly.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use outpost::sync::backoff::Backoff;
use outpost_tests::agent::{
    actions, status, status_output, wait_until, write_probed_node, Agent, Flapper, LogFormat,
};
use outpost_tests::fleet::{check_seqs, event_audit_ids, kept_session_opts, online, Gaps, PREFIX};
use outpost_tests::mosquitto::{Broker, ClientOpts, Mode, Subscriber, NODE_USER};
use serde_json::Value;

/// Deadlines for conditions that normally hold within seconds.
const WAIT: Duration = Duration::from_secs(45);
/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(100);
/// The agent's keepalive here: the smallest `mqtt.keepalive` the config
/// takes (config/mqtt.rs MIN_KEEPALIVE).
const KEEPALIVE: Duration = Duration::from_secs(5);
/// How much the agent's resident memory (now, and at its peak) may grow
/// over the reconnect cycles after the first ones. A connection that held
/// on to its buffers, or a 16 or 256 MiB packet read into memory, is far
/// more.
const RSS_GROWTH_KIB: u64 = 6 * 1024;

// ---- the agent -----------------------------------------------------------

/// Resident memory of a process, KiB: now and its peak.
#[derive(Clone, Copy, Debug)]
struct Memory {
    rss: u64,
    hwm: u64,
}

/// The agent's VmRSS and VmHWM from /proc/PID/status.
fn memory(agent: &Agent) -> Memory {
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    Memory {
        rss: kib("VmRSS:"),
        hwm: kib("VmHWM:"),
    }
}

/// The uplink's "down" lines in the agent's JSON log: (state, reason,
/// failures).
fn down_lines(agent: &Agent) -> Vec<(String, String, u64)> {
    agent
        .log_fields()
        .into_iter()
        .filter(|f| {
            f["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("mqtt uplink down"))
        })
        .map(|f| {
            (
                f["state"].as_str().unwrap_or_default().to_string(),
                f["reason"].as_str().unwrap_or_default().to_string(),
                f["failures"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

/// `outpost status --json` of the running agent: its live view.
fn live_status(config: &Path) -> Value {
    let v = status(config);
    assert_eq!(v["running"], true, "{v}");
    v["live"].clone()
}

/// The running agent's live sample count.
fn live_samples(config: &Path) -> u64 {
    live_status(config)["samples"].as_u64().unwrap()
}

/// The node's audit row ids (`outpost actions --json`).
fn audit_ids(config: &Path) -> BTreeSet<u64> {
    actions(config, 100_000)
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect()
}

/// A config for `node` with the `[mqtt]` section `mqtt` (keepalive and
/// backoff appended) and a `suggest` rule on a probe of `port`.
fn write_config(dir: &Path, node: &str, mqtt: &str, port: u16, backoff: (&str, &str)) -> PathBuf {
    let uplink = format!(
        "{mqtt}keepalive = \"{}s\"\nreconnect_min = \"{}\"\nreconnect_max = \"{}\"\n",
        KEEPALIVE.as_secs(),
        backoff.0,
        backoff.1,
    );
    write_probed_node(dir, node, port, &uplink)
}

// ---- what the subscriber got ---------------------------------------------

/// Makes a session the broker keeps for `node`'s messages (clean session
/// off, subscribed, then disconnected) and returns the options that resume
/// it.
fn kept_session(broker: &Broker, node: &str) -> ClientOpts {
    let opts = kept_session_opts(broker, node, "faults");
    let sub =
        Subscriber::connect_with(broker, &opts, &[&format!("{PREFIX}/nodes/{node}/#")]).unwrap();
    drop(sub);
    // The DISCONNECT goes out from the subscriber's thread.
    thread::sleep(Duration::from_millis(300));
    opts
}

/// After a fault phase: the real broker is back. Waits for the node to come
/// online, stops the events, and checks that every audit row's event
/// arrived and seq has no gap from 1.
fn delivers_everything(
    broker: &Broker,
    opts: &ClientOpts,
    node: &str,
    config: &Path,
    agent: &Agent,
    flapper: Flapper,
) {
    let sub = Subscriber::connect_with(broker, opts, &[]).unwrap();
    sub.wait_for(online, WAIT)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    drop(flapper);
    thread::sleep(Duration::from_secs(1));
    let audit = audit_ids(config);
    assert!(audit.len() >= 3, "only {} audit rows", audit.len());
    let msgs = sub
        .wait_for(|m| event_audit_ids(m).is_superset(&audit), WAIT)
        .unwrap_or_else(|e| {
            panic!(
                "the events of audit rows {audit:?} did not all arrive: {e}\nagent log:\n{}",
                agent.log()
            )
        });
    let seqs = check_seqs(&msgs, node, Gaps::NoneFromOne);
    eprintln!(
        "{node}: {} audit rows delivered, seqs 1..={}",
        audit.len(),
        seqs.last().unwrap()
    );
}

// ---- the fake broker -------------------------------------------------------

/// What the fake does with each new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Reads the CONNECT and everything after it; never answers.
    Silent,
    /// Answers the CONNECT with a valid CONNACK, then reads and never
    /// answers again.
    ConnAckThenStall,
    /// Answers the CONNECT with the next of [`garbage`], in turn.
    Garbage,
}

/// How many garbage answers [`garbage`] has.
const GARBAGE_KINDS: usize = 6;
/// The announced-256-MiB answer streams this much after its header.
const FLOOD_BYTES: usize = 32 << 20;
const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// Garbage answer `i`: its name, the bytes, and how many more bytes to
/// stream after them.
fn garbage(i: usize) -> (&'static str, Vec<u8>, usize) {
    let with_connack = |tail: &[u8]| [&CONNACK[..], tail].concat();
    match i % GARBAGE_KINDS {
        0 => {
            // xorshift64, fixed seed: the same 4 KiB every run.
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let bytes = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            ("random bytes", bytes, 0)
        }
        1 => (
            "CONNACK with return code 7",
            vec![0x20, 0x02, 0x00, 0x07],
            0,
        ),
        2 => ("reserved packet type 0", with_connack(&[0x00, 0x00]), 0),
        3 => (
            "malformed remaining length",
            with_connack(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
            0,
        ),
        4 => (
            "PUBLISH announcing 256 MiB",
            with_connack(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F]),
            FLOOD_BYTES,
        ),
        // 16 MiB: under the default mqtt.max_packet_kb (16392), so the
        // agent waits for it, until its keepalive gives up.
        _ => (
            "PUBLISH announcing 16 MiB, never sent",
            with_connack(&[0x30, 0x80, 0x80, 0x80, 0x08]),
            0,
        ),
    }
}

/// One connection the fake took.
#[derive(Clone, Debug)]
struct Conn {
    fault: Fault,
    /// The garbage answer's name.
    garbage: Option<&'static str>,
    client_id: Option<String>,
    /// MQTT packet types the agent sent after its CONNECT.
    packets: Vec<u8>,
    opened: Instant,
    /// When the agent closed or reset it.
    closed: Option<Instant>,
    /// Bytes of a garbage answer's stream written before the agent left.
    streamed: usize,
}

type Conns = Arc<Mutex<Vec<Conn>>>;

/// A TCP listener on a port the real broker left, doing [`Fault`] to every
/// connection. On drop it stops and closes every connection.
struct FakeBroker {
    fault: Arc<Mutex<Fault>>,
    conns: Conns,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeBroker {
    fn bind(port: u16, fault: Fault) -> FakeBroker {
        let listener = wait_until(
            "binding the fake broker",
            Duration::from_secs(10),
            POLL,
            || format!("port {port}"),
            || TcpListener::bind(("127.0.0.1", port)).ok(),
        );
        listener.set_nonblocking(true).unwrap();
        let fault = Arc::new(Mutex::new(fault));
        let conns: Conns = Arc::default();
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (f, c, s, st) = (fault.clone(), conns.clone(), streams.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut garbage_next = 0;
            while !st.load(Ordering::SeqCst) {
                let stream = match listener.accept() {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                stream.set_nonblocking(false).unwrap();
                s.lock().unwrap().push(stream.try_clone().unwrap());
                let fault = *f.lock().unwrap();
                let answer = (fault == Fault::Garbage).then(|| {
                    garbage_next += 1;
                    garbage(garbage_next - 1)
                });
                let index = {
                    let mut conns = c.lock().unwrap();
                    conns.push(Conn {
                        fault,
                        garbage: answer.as_ref().map(|a| a.0),
                        client_id: None,
                        packets: Vec::new(),
                        opened: Instant::now(),
                        closed: None,
                        streamed: 0,
                    });
                    conns.len() - 1
                };
                let (conns, stop) = (c.clone(), st.clone());
                thread::spawn(move || serve(stream, fault, answer, &conns, index, &stop));
            }
        });
        FakeBroker {
            fault,
            conns,
            streams,
            stop,
            thread: Some(thread),
        }
    }

    fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn conns(&self) -> Vec<Conn> {
        self.conns.lock().unwrap().clone()
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Reads one MQTT packet: `None` at EOF or on an error.
fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte).ok()?;
    let kind = byte[0] >> 4;
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).ok()?;
        len |= usize::from(b[0] & 0x7F) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    assert!(len <= 1 << 20, "the agent sent a packet of {len} bytes");
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((kind, body))
}

/// The client id of a CONNECT body (MQTT 3.1.1).
fn client_id(body: &[u8]) -> Option<String> {
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let at = 2 + name_len + 4; // level, flags, keepalive
    let id_len = usize::from(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    String::from_utf8(body.get(at + 2..at + 2 + id_len)?.to_vec()).ok()
}

fn serve(
    mut s: TcpStream,
    fault: Fault,
    answer: Option<(&'static str, Vec<u8>, usize)>,
    conns: &Conns,
    index: usize,
    stop: &AtomicBool,
) {
    let update = |f: &dyn Fn(&mut Conn)| f(&mut conns.lock().unwrap()[index]);
    let mut open = true;
    match read_packet(&mut s) {
        Some((1, body)) => update(&|c| c.client_id = client_id(&body)),
        _ => open = false,
    }
    if open {
        match (fault, &answer) {
            (Fault::Silent, _) => {}
            (Fault::ConnAckThenStall, _) => open = s.write_all(&CONNACK).is_ok(),
            (Fault::Garbage, Some((_, bytes, flood))) => {
                open = s.write_all(bytes).is_ok();
                let chunk = vec![0x41u8; 64 << 10];
                let mut streamed = 0;
                while open && streamed < *flood && !stop.load(Ordering::SeqCst) {
                    match s.write(&chunk) {
                        Ok(n) if n > 0 => streamed += n,
                        _ => open = false,
                    }
                }
                update(&|c| c.streamed = streamed);
            }
            (Fault::Garbage, None) => unreachable!(),
        }
    }
    // Never answer again; note what the agent sends until it leaves.
    while open {
        match read_packet(&mut s) {
            Some((kind, _)) => update(&|c| c.packets.push(kind)),
            None => open = false,
        }
    }
    if !stop.load(Ordering::SeqCst) {
        update(&|c| c.closed = Some(Instant::now()));
    }
}

/// Samples the agent's memory while waiting for `pred` over the fake's
/// connections.
fn wait_conns(
    what: &str,
    fake: &FakeBroker,
    agent: &mut Agent,
    samples: &mut Vec<Memory>,
    pred: impl Fn(&[Conn]) -> bool,
) -> Vec<Conn> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(agent.alive(), "the agent died\nlog:\n{}", agent.log());
        samples.push(memory(agent));
        let conns = fake.conns();
        if pred(&conns) {
            return conns;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not within 60 s; connections: {conns:#?}\nagent log:\n{}",
                agent.log()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Neither the agent's resident memory nor its peak grew by more than
/// [`RSS_GROWTH_KIB`] from `baseline` over `samples`.
fn memory_stayed_flat(what: &str, baseline: Memory, samples: &[Memory]) {
    let max_rss = samples.iter().map(|m| m.rss).max().unwrap();
    let hwm = samples.iter().map(|m| m.hwm).max().unwrap();
    eprintln!(
        "{what}: VmRSS {} KiB at the baseline, at most {max_rss} KiB after ({} samples); VmHWM {} -> {hwm} KiB",
        baseline.rss,
        samples.len(),
        baseline.hwm
    );
    assert!(
        max_rss <= baseline.rss + RSS_GROWTH_KIB,
        "{what}: VmRSS grew from {} to {max_rss} KiB",
        baseline.rss
    );
    assert!(
        hwm <= baseline.hwm.max(baseline.rss) + RSS_GROWTH_KIB,
        "{what}: VmHWM grew from {} to {hwm} KiB",
        baseline.hwm
    );
}

/// Every connection but the last (which may still be open) was closed by
/// the agent, and it came back no sooner than `reconnect_min` after each.
fn closed_and_retried_with_backoff(conns: &[Conn], reconnect_min: Duration) {
    for pair in conns.windows(2) {
        let closed = pair[0]
            .closed
            .unwrap_or_else(|| panic!("a connection the agent left open: {:?}", pair[0]));
        let gap = pair[1].opened.saturating_duration_since(closed);
        // The fake notices the close a moment after the agent's backoff
        // timer starts: allow a little.
        assert!(
            gap >= reconnect_min.mul_f64(0.8),
            "reconnected {gap:?} after a close, under reconnect_min {reconnect_min:?}: {pair:#?}"
        );
    }
}

// ---- 1. a broker that stalls ----------------------------------------------

#[test]
fn a_stalled_broker_is_given_up_on_reported_and_retried_and_the_queue_survives() {
    const NODE: &str = "stall-1";
    let reconnect_min = Duration::from_millis(500);
    let mut broker = Broker::start(Mode::Plain).unwrap();
    let session = kept_session(&broker, NODE);
    broker.stop().unwrap();
    let fake = FakeBroker::bind(broker.port(), Fault::Silent);
    let dir = tempfile::tempdir().unwrap();
    let flapper = Flapper::start(Duration::from_secs(1));
    let config = write_config(
        dir.path(),
        NODE,
        &broker.mqtt_toml(),
        flapper.port,
        ("500ms", "2s"),
    );
    let mut agent = Agent::start(&config, LogFormat::Json);
    let mut samples = Vec::new();

    // 1a: no CONNACK. Three connections, each given up on.
    let silent = wait_conns(
        "three silent connections closed",
        &fake,
        &mut agent,
        &mut samples,
        |c| c.iter().filter(|c| c.closed.is_some()).count() >= 3,
    );
    let baseline = *samples.last().unwrap();
    samples.clear();
    for c in silent.iter().filter(|c| c.closed.is_some()) {
        assert_eq!(c.client_id.as_deref(), Some(NODE), "{c:?}");
        let held = c.closed.unwrap() - c.opened;
        assert!(
            held >= Duration::from_secs(4),
            "the agent gave up after {held:?}, before its 5 s connect timeout"
        );
        assert!(
            c.packets.is_empty(),
            "sent more than CONNECT without a CONNACK: {c:?}"
        );
    }
    closed_and_retried_with_backoff(&silent[..3], reconnect_min);
    let down = down_lines(&agent);
    assert!(
        down.iter()
            .any(|(s, r, _)| s == "stalled" && r == "no CONNACK within 5s of connecting"),
        "no stalled state in the log: {down:?}"
    );

    // 1b: a CONNACK, then silence.
    fake.set_fault(Fault::ConnAckThenStall);
    let conns = wait_conns(
        "two stalled sessions closed",
        &fake,
        &mut agent,
        &mut samples,
        |c| {
            c.iter()
                .filter(|c| c.fault == Fault::ConnAckThenStall && c.closed.is_some())
                .count()
                >= 2
        },
    );
    let stalled: Vec<&Conn> = conns
        .iter()
        .filter(|c| c.fault == Fault::ConnAckThenStall && c.closed.is_some())
        .collect();
    for c in &stalled {
        // It published (state, queued events) and subscribed into the void,
        // pinged once a keepalive, and left when the ping went unanswered.
        assert!(c.packets.contains(&3), "no PUBLISH: {c:?}");
        assert!(c.packets.contains(&8), "no SUBSCRIBE: {c:?}");
        assert!(c.packets.contains(&12), "no PINGREQ: {c:?}");
        let held = c.closed.unwrap() - c.opened;
        assert!(held >= KEEPALIVE, "left a silent session after {held:?}");
    }
    let closed: Vec<Conn> = conns
        .iter()
        .filter(|c| c.closed.is_some())
        .cloned()
        .collect();
    closed_and_retried_with_backoff(&closed, reconnect_min);
    let down = down_lines(&agent);
    let ping = down
        .iter()
        .find(|(s, r, _)| s == "stalled" && r == "no PINGRESP within one keepalive (5s)")
        .unwrap_or_else(|| panic!("no PINGRESP stall in the log: {down:?}"));
    // A CONNACK alone does not reset the backoff: the count went on from
    // the silent connections' (a reset would make it 1).
    assert!(
        ping.2 > 3,
        "failures back to {} after a CONNACK from a stalled broker",
        ping.2
    );
    assert!(agent.logged("mqtt connected") >= 2);
    memory_stayed_flat("stalled broker", baseline, &samples);

    // The real broker again, on the same port.
    drop(fake);
    broker.restart().unwrap();
    delivers_everything(&broker, &session, NODE, &config, &agent, flapper);
    assert!(agent.alive());
}

// ---- 2. a broker that sends garbage ---------------------------------------

#[test]
fn garbage_from_the_broker_is_dropped_logged_and_retried_with_flat_memory() {
    const NODE: &str = "garbage-1";
    let reconnect_min = Duration::from_millis(200);
    let mut broker = Broker::start(Mode::Plain).unwrap();
    let session = kept_session(&broker, NODE);
    broker.stop().unwrap();
    let fake = FakeBroker::bind(broker.port(), Fault::Garbage);
    let dir = tempfile::tempdir().unwrap();
    let flapper = Flapper::start(Duration::from_secs(1));
    let config = write_config(
        dir.path(),
        NODE,
        &broker.mqtt_toml(),
        flapper.port,
        ("200ms", "1s"),
    );
    let mut agent = Agent::start(&config, LogFormat::Json);
    let mut samples = Vec::new();

    // One round of every answer to warm up (the 16 MiB one waits out a
    // keepalive), the baseline, then a second round and the quick ones of
    // a third.
    wait_conns("a round of garbage", &fake, &mut agent, &mut samples, |c| {
        c.iter().filter(|c| c.closed.is_some()).count() >= GARBAGE_KINDS
    });
    let baseline = *samples.last().unwrap();
    samples.clear();
    let rounds = 3 * GARBAGE_KINDS - 1;
    let conns = wait_conns(
        "two more rounds of garbage",
        &fake,
        &mut agent,
        &mut samples,
        |c| c.iter().filter(|c| c.closed.is_some()).count() >= rounds,
    );
    let closed: Vec<Conn> = conns
        .iter()
        .filter(|c| c.closed.is_some())
        .cloned()
        .collect();
    for c in &closed {
        assert_eq!(c.client_id.as_deref(), Some(NODE), "{c:?}");
    }
    closed_and_retried_with_backoff(&closed, reconnect_min);
    for c in closed.iter().filter(|c| c.garbage == Some(garbage(4).0)) {
        assert!(
            c.streamed < FLOOD_BYTES,
            "the agent read {} bytes of a packet announced at 256 MiB",
            c.streamed
        );
    }
    let down = down_lines(&agent);
    for (state, words) in [
        ("protocol error", "Invalid Connect return code: 7"),
        ("protocol error", "Invalid packet type: 0"),
        ("protocol error", "Malformed remaining length"),
        (
            "protocol error",
            "packet of 268435455 bytes, over mqtt.max_packet_kb",
        ),
        ("stalled", "no PINGRESP within one keepalive (5s)"),
    ] {
        assert!(
            down.iter().any(|(s, r, _)| s == state && r.contains(words)),
            "no {state:?} line with {words:?} in the log: {down:#?}"
        );
    }
    memory_stayed_flat("garbage", baseline, &samples);

    drop(fake);
    broker.restart().unwrap();
    delivers_everything(&broker, &session, NODE, &config, &agent, flapper);
    assert!(agent.alive());
}

// ---- 3. a broker that refuses the password ---------------------------------

/// How many connections the broker has refused as not authorised
/// (`Sending CONNACK to ADDR (0, 5)`: mosquitto names no client id then;
/// the test's subscriber is let in, so every one is the agent's).
fn refusals(broker: &Broker) -> usize {
    broker
        .log_text()
        .lines()
        .filter(|l| l.contains("Sending CONNACK to ") && l.ends_with(", 5)"))
        .count()
}

#[test]
fn a_refused_password_is_reported_retried_with_backoff_and_a_fixed_file_is_used_without_restart() {
    use std::os::unix::fs::PermissionsExt;
    let reconnect_min = Duration::from_secs(2);
    let broker = Broker::start(Mode::PasswordAcl).unwrap();
    let right = broker.user(NODE_USER).unwrap().password.clone();
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("mqtt.password");
    std::fs::write(&password_file, "not-the-password\n").unwrap();
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mqtt = format!(
        "[mqtt]\nurl = \"{}\"\nusername = \"{NODE_USER}\"\npassword_file = \"{}\"\n",
        broker.url(),
        password_file.display()
    );
    let flapper = Flapper::start(Duration::from_secs(1));
    let config = write_config(dir.path(), NODE_USER, &mqtt, flapper.port, ("2s", "8s"));
    let sub = Subscriber::connect(&broker, &[&format!("{PREFIX}/nodes/{NODE_USER}/#")]).unwrap();
    let mut agent = Agent::start(&config, LogFormat::Json);
    let pid = agent.pid();

    wait_until(
        "the first refused CONNECT",
        WAIT,
        POLL,
        || {
            format!(
                "broker log:\n{}\nagent log:\n{}",
                broker.log_text(),
                agent.log()
            )
        },
        || (refusals(&broker) >= 1).then_some(()),
    );
    let first = refusals(&broker);
    let samples_before = live_samples(&config);
    let audit_before = audit_ids(&config).len();
    let window = Duration::from_secs(20);
    thread::sleep(window);
    let attempts = refusals(&broker) - first + 1;
    eprintln!("auth refused: {attempts} attempts in {window:?}");

    // Clear state, in the log.
    let down = down_lines(&agent);
    assert!(
        down.iter().any(|(s, r, _)| s == "auth refused"
            && r.contains("check mqtt.username and mqtt.password_file")),
        "no auth refused state in the log: {down:?}\nagent log:\n{}",
        agent.log()
    );
    // No tight loop: never more attempts than the backoff's floor allows...
    let most = Backoff::new(reconnect_min, Duration::from_secs(8)).most_attempts(window);
    assert!(
        (2..=most as usize).contains(&attempts),
        "{attempts} CONNECTs in {window:?}; the backoff allows 2..={most}\nbroker log:\n{}",
        broker.log_text()
    );
    // ...and fewer than a delay stuck at reconnect_min would make (10 or
    // 11): the delay grows with each refusal. (Nine in 20 s would need eight
    // jittered delays, their caps doubling to 8 s, all within 4 s in sum of
    // their 2 s floor: odds about 1 in 30,000.)
    assert!(
        attempts <= 8,
        "{attempts} CONNECTs in {window:?}: the backoff does not grow on refusals\nbroker log:\n{}",
        broker.log_text()
    );
    // Clear state, in `outpost status`: down, why, how often, when next.
    let uplink = live_status(&config)["uplink"].clone();
    assert_eq!(uplink["state"], "down", "{uplink}");
    assert_eq!(uplink["kind"], "auth refused", "{uplink}");
    assert!(
        uplink["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not authorized (CONNACK 5)")),
        "{uplink}"
    );
    assert!(uplink["failures"].as_u64().unwrap() >= 2, "{uplink}");
    assert!(uplink["retry_in_s"].as_u64().unwrap() <= 8, "{uplink}");
    assert_eq!(uplink["broker"], broker.url(), "{uplink}");
    let human = status_output(&config, false);
    assert!(
        human.lines().any(|l| l
            .starts_with("uplink:   down (auth refused: not authorized (CONNACK 5)")
            && l.contains(" failures, ")
            && l.ends_with(&format!("; broker {}", broker.url()))),
        "no uplink line in `outpost status`:\n{human}"
    );
    // Local work goes on: samples and audit rows, none of them delivered.
    assert!(live_samples(&config) >= samples_before + 50);
    assert!(audit_ids(&config).len() > audit_before);
    assert!(
        sub.messages().is_empty(),
        "a message from a node the broker refused"
    );

    // The operator fixes the file (write and rename, as tools do); the
    // agent reads it again before its next attempt.
    let tmp = dir.path().join("mqtt.password.new");
    std::fs::write(&tmp, format!("{right}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&tmp, &password_file).unwrap();
    sub.wait_for(online, WAIT)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    assert_eq!(
        agent.logged("mqtt.password_file changed"),
        1,
        "{}",
        agent.log()
    );
    assert!(agent.alive());
    assert_eq!(agent.pid(), pid, "not restarted");
    // Status follows: connected, no reason, no retry pending.
    let uplink = wait_until(
        "outpost status says connected",
        WAIT,
        POLL,
        || format!("{}", live_status(&config)["uplink"]),
        || {
            let u = live_status(&config)["uplink"].clone();
            (u["state"] == "connected").then_some(u)
        },
    );
    assert!(uplink["reason"].is_null(), "{uplink}");
    assert!(uplink["retry_in_s"].is_null(), "{uplink}");
    assert_eq!(uplink["broker"], broker.url(), "{uplink}");
    let human = status_output(&config, false);
    assert!(
        human
            .lines()
            .any(|l| l == format!("uplink:   connected to {}", broker.url())),
        "{human}"
    );
    drop(flapper);
    thread::sleep(Duration::from_secs(1));
    let audit = audit_ids(&config);
    let msgs = sub
        .wait_for(|m| event_audit_ids(m).is_superset(&audit), WAIT)
        .unwrap_or_else(|e| {
            panic!(
                "events of {audit:?} missing: {e}\nagent log:\n{}",
                agent.log()
            )
        });
    check_seqs(&msgs, NODE_USER, Gaps::NoneFromOne);
}
