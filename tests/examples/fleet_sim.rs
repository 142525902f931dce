//! Fleet-scale simulator for the uplink (BENCHMARKS.md, "Fleet scale").
//!
//! `fleet`: N lightweight nodes in one process against one local mosquitto
//! that this program starts. Each node is the uplink's protocol with the
//! real pieces: `outpost::sync::uplink::mqtt_options` (client id, keepalive,
//! persistent session, retained last will, inflight window), the real
//! `Backoff`, and the real outbox functions over its own in-memory SQLite
//! (the store's schema, migrated by `outpost::store::schema::migrate`):
//! every message is an outbox row first, published in seq order with at
//! most `WINDOW` unacknowledged, and deleted on its PUBACK. On every
//! CONNACK a node enqueues its retained state and subscribes to its command
//! topics, as the uplink does. The full `Store` is not used here: it costs
//! a writer thread per node.
//!
//! While the nodes run it measures the broker's `$SYS` byte counters over a
//! steady-state window, and times the real `outpost fleet nodes --json`.
//!
//! `drain`: one node with the real `Store` and the real `Uplink` in this
//! process: the outbox is filled with events (the real outbox code) while
//! the broker is down, then the broker starts and the time until the outbox
//! is empty is measured. `drain-agent`: the same with the real daemon,
//! `outpost run --config` (the binary given by `--outpost`).
//!
//! Run by `benches/fleet.sh`; prints `key value` figures and one JSON line.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use outpost::config::MqttConfig;
use outpost::store::outbox::{self, OutboxConfig};
use outpost::sync::backoff::Backoff;
use outpost::sync::message::{
    events, EventBody, Kind, StateBody, StateModel, StateTarget, SummaryBody, SummaryCounts,
    SummaryTarget,
};
use outpost::sync::uplink::{mqtt_options, NodeConfig, NodeView, Uplink, WINDOW};
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use rusqlite::Connection;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const TARGETS: [(&str, &str); 5] = [
    ("web", "process"),
    ("exporter", "process"),
    ("monit", "process"),
    ("sleeper", "process"),
    ("host-web", "host"),
];
const ACK_BATCH: usize = 64;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = args
        .split_first()
        .ok_or_else(|| anyhow!("usage: fleet_sim fleet|drain|drain-agent [--key value]..."))?;
    let opts = Opts::parse(rest)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match mode.as_str() {
        "fleet" => rt.block_on(fleet(opts)),
        "drain" => rt.block_on(drain(opts)),
        "drain-agent" => drain_agent(opts),
        other => bail!("unknown mode {other}: fleet, drain or drain-agent"),
    }
}

/// `--key value` pairs.
struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut m = HashMap::new();
        let mut it = args.iter();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("expected --key, got {k}"))?;
            let v = it.next().ok_or_else(|| anyhow!("--{key} needs a value"))?;
            m.insert(key.to_string(), v.clone());
        }
        Ok(Opts(m))
    }

    fn num(&self, key: &str, default: f64) -> Result<f64> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v.parse().with_context(|| format!("--{key} {v}")),
        }
    }

    fn str(&self, key: &str, default: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A mosquitto child on a loopback port, configured like the test harness's
/// `Mode::Plain` but without per-packet logging, with `$SYS` every second
/// and no limit on connections or queued messages.
struct Mosquitto {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn new() -> Result<Mosquitto> {
        let dir = tempfile::Builder::new()
            .prefix("outpost-fleet-sim-")
            .tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nper_listener_settings false\nlog_dest stderr\nlog_type error\n\
                 log_type warning\npersistence false\nset_tcp_nodelay true\nsys_interval 1\n\
                 max_queued_messages 0\nallow_anonymous true\n\
                 listener {port} 127.0.0.1\nmax_connections -1\n"
            ),
        )?;
        Ok(Mosquitto {
            child: None,
            port,
            conf,
            _dir: dir,
        })
    }

    fn start(&mut self) -> Result<()> {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start mosquitto (apt-get install mosquitto)")?;
        self.child = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("mosquitto did not listen on {}", self.port)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU seconds (user + system) and RSS/HWM in KiB of a process.
fn proc_usage(pid: u32) -> (f64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime), counted from after the ")".
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Bytes of an MQTT remaining-length field.
fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A QoS 1 PUBLISH on the wire (MQTT 3.1.1).
fn publish_wire(topic: &str, payload: usize) -> usize {
    let rem = 2 + topic.len() + 2 + payload;
    1 + varint_len(rem) + rem
}

/// A SUBSCRIBE of one filter.
fn subscribe_wire(filter: &str) -> usize {
    let rem = 2 + 2 + filter.len() + 1;
    1 + varint_len(rem) + rem
}

/// A CONNECT with a will (no credentials).
fn connect_wire(client_id: &str, will_topic: &str, will_payload: usize) -> usize {
    let rem = 10 + 2 + client_id.len() + 2 + will_topic.len() + 2 + will_payload;
    1 + varint_len(rem) + rem
}

const PUBACK: usize = 4;
const CONNACK: usize = 4;
const SUBACK: usize = 5;
const PING: usize = 2;

/// Fleet-wide counters.
#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    connacks: AtomicU64,
    errors: AtomicU64,
    /// Per kind (state, summary, event): messages handed to rumqttc and
    /// their PUBLISH bytes.
    msgs: [AtomicU64; 3],
    wire: [AtomicU64; 3],
    acked: AtomicU64,
    pings: AtomicU64,
    /// CONNECT + CONNACK + SUBSCRIBE + SUBACK bytes.
    session_wire: AtomicU64,
    /// Connection errors by message.
    error_kinds: Mutex<HashMap<String, u64>>,
}

fn kind_idx(k: Kind) -> usize {
    match k {
        Kind::State => 0,
        Kind::Summary => 1,
        _ => 2,
    }
}

impl Stats {
    /// Every byte on the wire both ways, as computed from the packets.
    fn computed_wire(&self) -> u64 {
        let publishes: u64 = self.wire.iter().map(|w| w.load(Relaxed)).sum();
        publishes
            + self.acked.load(Relaxed) * PUBACK as u64
            + self.pings.load(Relaxed) * 2 * PING as u64
            + self.session_wire.load(Relaxed)
    }
}

struct SimCfg {
    host: String,
    port: u16,
    summary: Duration,
    keepalive: Duration,
    event_every_s: f64,
}

/// A cheap per-node random stream (xorshift), seeded by the node number.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponentially distributed, mean `mean_s`.
    fn exp(&mut self, mean_s: f64) -> Duration {
        Duration::from_secs_f64(-mean_s * (1.0 - self.unit()).ln())
    }
}

/// The node's state as the daemon's view builds it: 5 targets with scores,
/// one model.
fn state_body(version: &str, started_ms: i64, group: &str, rng: &mut Rng) -> StateBody {
    StateBody {
        online: true,
        version: version.to_string(),
        started_ms,
        uptime_s: ((now_ms() - started_ms) / 1000).max(0) as u64,
        group: Some(group.to_string()),
        paused: false,
        targets: TARGETS
            .iter()
            .map(|(n, k)| StateTarget {
                name: n.to_string(),
                kind: k.to_string(),
                health: "up".into(),
                score: Some(rng.unit() as f32),
            })
            .collect(),
        models: vec![StateModel {
            label: "iforest-2026-12-01".into(),
            role: "active".into(),
            target: "*".into(),
        }],
        open_incidents: 0,
        dropped: Default::default(),
    }
}

/// A summary as `DaemonView` + `Telemetry` build it: per target, 1 Hz
/// samples and the mean/max of f32 anomaly scores.
fn summary_body(interval: Duration, events: u64, rng: &mut Rng) -> SummaryBody {
    let samples = interval.as_secs_f64().round() as u64;
    SummaryBody {
        interval_s: samples,
        targets: TARGETS
            .iter()
            .map(|(n, _)| {
                let a = rng.unit() as f32;
                let b = rng.unit() as f32;
                SummaryTarget {
                    name: n.to_string(),
                    health: "up".into(),
                    samples,
                    failing_samples: 0,
                    score_mean: Some((f64::from(a) + f64::from(b)) / 2.0),
                    score_max: Some(f64::from(a.max(b))),
                }
            })
            .collect(),
        counts: SummaryCounts {
            events,
            ..Default::default()
        },
    }
}

/// The events a node sends, in turn: an incident opens, the remedy runs
/// and is verified, the incident closes.
fn event_body(n: u64, rng: &mut Rng) -> EventBody {
    let target = TARGETS[(n as usize / 4) % TARGETS.len()].0;
    let incident = json!({
        "incident_id": n / 4 + 1,
        "target": target,
        "opened_ms": now_ms() - 30_000,
        "closed_ms": null,
        "score": rng.unit(),
        "explanation": {"top": [["cpu_pct", 4.2], ["rss_mb", 2.9]], "threshold": 0.62},
    });
    let action = |decision: &str| {
        json!({
            "audit_id": n + 1,
            "decision_id": format!("{:032x}", n),
            "rule": "restart-on-crash",
            "target": target,
            "action": "restart",
            "decision": decision,
            "reason": "process not found for 3 samples",
            "detail": null,
        })
    };
    match n % 4 {
        0 => EventBody::new(events::INCIDENT_OPENED, incident),
        1 => EventBody::new(events::ACTION_EXECUTED, action("acted")),
        2 => EventBody::new(events::ACTION_VERIFIED, action("verify_ok")),
        _ => {
            let mut i = incident;
            i["closed_ms"] = json!(now_ms());
            EventBody::new(events::INCIDENT_CLOSED, i)
        }
    }
}

/// The outbox of a simulated node: the store's schema in memory.
fn open_outbox() -> Result<Connection> {
    let conn = Connection::open_in_memory()?;
    conn.pragma_update(None, "page_size", outpost::store::schema::PAGE_SIZE)?;
    outpost::store::schema::migrate(&conn)?;
    Ok(conn)
}

enum LoopEvent {
    Connected,
    Lost,
    Mqtt(Event),
}

/// The node's event-loop task, as the uplink's: polls, forwards, and after
/// an error clears rumqttc's replay queue and sleeps with the real backoff.
async fn event_loop(
    mut el: rumqttc::EventLoop,
    mut backoff: Backoff,
    tx: mpsc::Sender<LoopEvent>,
    stats: Arc<Stats>,
    token: CancellationToken,
) {
    loop {
        let polled = tokio::select! {
            _ = token.cancelled() => return,
            p = el.poll() => p,
        };
        let out = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                LoopEvent::Connected
            }
            Ok(ev) => LoopEvent::Mqtt(ev),
            Err(e) => {
                stats.errors.fetch_add(1, Relaxed);
                *stats
                    .error_kinds
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(e.to_string())
                    .or_default() += 1;
                el.clean();
                el.pending.clear();
                if tx.send(LoopEvent::Lost).await.is_err() {
                    return;
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                el.clean();
                el.pending.clear();
                continue;
            }
        };
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

/// One simulated node.
struct SimNode {
    node: NodeConfig,
    ocfg: OutboxConfig,
    conn: Connection,
    client: AsyncClient,
    connected: bool,
    fifo: VecDeque<u64>,
    inflight: HashMap<u16, u64>,
    next_from: u64,
    more: bool,
    acked: Vec<u64>,
    events_since_summary: u64,
    events_sent: u64,
    rng: Rng,
    stats: Arc<Stats>,
    /// The last will's payload (the offline state), bytes.
    will_len: usize,
}

impl SimNode {
    fn enqueue(&mut self, kind: Kind, body: serde_json::Value) {
        match outbox::enqueue_one(&self.conn, &self.ocfg, kind, now_ms(), body) {
            Ok(_) => self.more = true,
            Err(e) => eprintln!("{}: enqueue: {e}", self.node.node),
        }
    }

    fn on_event(&mut self, ev: LoopEvent) {
        match ev {
            LoopEvent::Connected => {
                let s = &self.stats;
                if !self.connected {
                    s.connected.fetch_add(1, Relaxed);
                }
                s.connacks.fetch_add(1, Relaxed);
                let topics = self.node.topics();
                let mut session =
                    connect_wire(&self.node.mqtt.client_id, &topics.state(), self.will_len)
                        + CONNACK;
                let mut filters = vec![topics.node_cmd(), topics.fleet_cmd()];
                if let Some(g) = &self.node.group {
                    filters.push(topics.group_cmd(g));
                }
                for f in filters {
                    session += subscribe_wire(&f) + SUBACK;
                    let _ = self.client.try_subscribe(f, QoS::AtLeastOnce);
                }
                s.session_wire.fetch_add(session as u64, Relaxed);
                self.connected = true;
                self.fifo.clear();
                self.inflight.clear();
                self.flush_acks();
                self.next_from = 0;
                self.more = true;
                let started = self.node.started_ms;
                let group = self.node.group.clone().unwrap_or_default();
                let state = state_body(&self.node.version, started, &group, &mut self.rng);
                match serde_json::to_value(&state) {
                    Ok(v) => self.enqueue(Kind::State, v),
                    Err(e) => eprintln!("state: {e}"),
                }
            }
            LoopEvent::Lost => {
                if self.connected {
                    self.stats.connected.fetch_sub(1, Relaxed);
                }
                self.connected = false;
                self.fifo.clear();
                self.inflight.clear();
            }
            LoopEvent::Mqtt(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(seq) = self.fifo.pop_front() {
                    self.inflight.insert(pkid, seq);
                }
            }
            LoopEvent::Mqtt(Event::Outgoing(Outgoing::PingReq)) => {
                self.stats.pings.fetch_add(1, Relaxed);
            }
            LoopEvent::Mqtt(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(seq) = self.inflight.remove(&ack.pkid) {
                    self.stats.acked.fetch_add(1, Relaxed);
                    self.acked.push(seq);
                    if self.acked.len() >= ACK_BATCH || self.inflight.is_empty() {
                        self.flush_acks();
                    }
                }
            }
            LoopEvent::Mqtt(_) => {}
        }
    }

    fn flush_acks(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.acked);
        if let Err(e) = outbox::ack(&self.conn, &seqs) {
            eprintln!("{}: ack: {e}", self.node.node);
        }
    }

    /// Publishes outbox rows from `next_from` while the window has room.
    fn pump(&mut self) {
        while self.connected && self.more {
            let room = WINDOW.saturating_sub(self.fifo.len() + self.inflight.len());
            if room == 0 {
                return;
            }
            let rows = match outbox::pending(&self.conn, self.next_from, room) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{}: pending: {e}", self.node.node);
                    return;
                }
            };
            let full = rows.len() == room;
            self.more = full;
            for row in rows {
                let i = kind_idx(row.kind);
                let wire = publish_wire(&row.topic, row.payload.len());
                match self.client.try_publish(
                    row.topic,
                    QoS::AtLeastOnce,
                    row.retained,
                    row.payload,
                ) {
                    Ok(()) => {
                        self.stats.msgs[i].fetch_add(1, Relaxed);
                        self.stats.wire[i].fetch_add(wire as u64, Relaxed);
                        self.fifo.push_back(row.seq);
                        self.next_from = row.seq + 1;
                    }
                    Err(_) => {
                        self.more = true;
                        return;
                    }
                }
            }
            if !full {
                return;
            }
        }
    }
}

async fn run_node(i: usize, cfg: Arc<SimCfg>, stats: Arc<Stats>, token: CancellationToken) {
    if let Err(e) = run_node_inner(i, cfg, stats, token).await {
        eprintln!("node {i}: {e:#}");
    }
}

async fn run_node_inner(
    i: usize,
    cfg: Arc<SimCfg>,
    stats: Arc<Stats>,
    token: CancellationToken,
) -> Result<()> {
    let name = format!("sim-{i:05}");
    let mut mqtt = MqttConfig::plain(&cfg.host, cfg.port, &name);
    mqtt.summary_interval = cfg.summary;
    mqtt.keepalive = cfg.keepalive;
    let node = NodeConfig {
        node: name.clone(),
        group: Some(format!("site-{:02}", i % 20)),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_ms: now_ms(),
        mqtt,
    };
    let options = mqtt_options(&node)?;
    let will_len = options.last_will().map_or(0, |w| w.message.len());
    let ocfg = OutboxConfig::new(
        &node.mqtt.topic_prefix,
        &node.node,
        node.mqtt.outbox_max_rows,
    );
    let conn = open_outbox()?;
    let (client, el) = AsyncClient::new(options, WINDOW + 8);
    let (tx, mut rx) = mpsc::channel(64);
    let backoff = Backoff::new(node.mqtt.reconnect_min, node.mqtt.reconnect_max);
    tokio::spawn(event_loop(el, backoff, tx, stats.clone(), token.clone()));
    let summary_every = node.mqtt.summary_interval;
    let mut n = SimNode {
        node,
        ocfg,
        conn,
        client,
        connected: false,
        fifo: VecDeque::new(),
        inflight: HashMap::new(),
        next_from: 0,
        more: true,
        acked: Vec::new(),
        events_since_summary: 0,
        events_sent: 0,
        will_len,
        rng: Rng(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)),
        stats,
    };
    let mut summary =
        tokio::time::interval_at(tokio::time::Instant::now() + summary_every, summary_every);
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_summary = Instant::now();
    let first = n.rng.exp(cfg.event_every_s);
    let event_timer = tokio::time::sleep(first);
    tokio::pin!(event_timer);
    loop {
        tokio::select! {
            biased;
            _ = token.cancelled() => break,
            ev = rx.recv() => match ev {
                Some(ev) => n.on_event(ev),
                None => break,
            },
            _ = summary.tick() => {
                let interval = last_summary.elapsed();
                last_summary = Instant::now();
                let events = std::mem::take(&mut n.events_since_summary);
                let body = summary_body(interval, events, &mut n.rng);
                match serde_json::to_value(&body) {
                    Ok(v) => n.enqueue(Kind::Summary, v),
                    Err(e) => eprintln!("summary: {e}"),
                }
            }
            _ = &mut event_timer => {
                let ev = event_body(n.events_sent, &mut n.rng);
                n.events_sent += 1;
                n.events_since_summary += 1;
                match serde_json::to_value(&ev) {
                    Ok(v) => n.enqueue(Kind::Event, v),
                    Err(e) => eprintln!("event: {e}"),
                }
                let next = n.rng.exp(cfg.event_every_s);
                event_timer.as_mut().reset(tokio::time::Instant::now() + next);
            }
        }
        n.pump();
    }
    Ok(())
}

/// The broker's `$SYS` counters, kept up to date by a subscriber.
type SysValues = Arc<Mutex<HashMap<String, f64>>>;

async fn sys_monitor(port: u16, values: SysValues, token: CancellationToken) {
    let mut o = rumqttc::MqttOptions::new("fleet-sim-sys", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 10);
    let _ = client
        .subscribe("$SYS/broker/bytes/#", QoS::AtMostOnce)
        .await;
    let _ = client
        .subscribe("$SYS/broker/clients/connected", QoS::AtMostOnce)
        .await;
    let _ = client
        .subscribe("$SYS/broker/messages/#", QoS::AtMostOnce)
        .await;
    let _ = client
        .subscribe("$SYS/broker/publish/messages/#", QoS::AtMostOnce)
        .await;
    loop {
        let polled = tokio::select! {
            _ = token.cancelled() => return,
            p = el.poll() => p,
        };
        match polled {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Ok(v) = std::str::from_utf8(&p.payload).unwrap_or("").trim().parse() {
                    values
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(p.topic.clone(), v);
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn sys(values: &SysValues, key: &str) -> f64 {
    values
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&format!("$SYS/broker/{key}"))
        .copied()
        .unwrap_or(f64::NAN)
}

/// Waits for the next `$SYS` update (published every second) so a reading
/// is fresh.
async fn fresh_sys(values: &SysValues) -> (f64, f64) {
    let before = (sys(values, "bytes/received"), sys(values, "bytes/sent"));
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = (sys(values, "bytes/received"), sys(values, "bytes/sent"));
        if now != before {
            return now;
        }
    }
    before
}

async fn fleet(o: Opts) -> Result<()> {
    let nodes = o.num("nodes", 1000.0)? as usize;
    let ramp_per_s = o.num("connect-rate", 500.0)?;
    let measure = Duration::from_secs_f64(o.num("measure-s", 120.0)?);
    let cli_runs = o.num("cli-runs", 3.0)? as usize;
    let outpost_bin = o.str("outpost", "target/release/outpost");
    let mut broker = Mosquitto::new()?;
    broker.start()?;
    let cfg = Arc::new(SimCfg {
        host: "127.0.0.1".into(),
        port: broker.port,
        summary: Duration::from_secs_f64(o.num("summary-s", 60.0)?),
        keepalive: Duration::from_secs_f64(o.num("keepalive-s", 30.0)?),
        event_every_s: o.num("event-every-s", 300.0)?,
    });
    let mosq_pid = broker.pid().unwrap_or(0);
    let me = std::process::id();
    println!(
        "broker 127.0.0.1:{} nodes {nodes} summary_s {} keepalive_s {} event_every_s {} loadavg {}",
        cfg.port,
        cfg.summary.as_secs_f64(),
        cfg.keepalive.as_secs_f64(),
        cfg.event_every_s,
        loadavg()
    );
    let token = CancellationToken::new();
    let sysv: SysValues = Arc::default();
    tokio::spawn(sys_monitor(cfg.port, sysv.clone(), token.clone()));
    let stats = Arc::new(Stats::default());
    let t0 = Instant::now();
    for i in 0..nodes {
        let due = t0 + Duration::from_secs_f64(i as f64 / ramp_per_s);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        tokio::spawn(run_node(i, cfg.clone(), stats.clone(), token.clone()));
        if (i + 1) % 1000 == 0 {
            println!(
                "ramp t={:.0}s spawned {} connected {}",
                t0.elapsed().as_secs_f64(),
                i + 1,
                stats.connected.load(Relaxed)
            );
        }
    }
    // Every node connected and its state acknowledged.
    let deadline = Instant::now() + Duration::from_secs(300);
    while (stats.connected.load(Relaxed) as usize) < nodes
        || stats.acked.load(Relaxed) < stats.msgs[0].load(Relaxed)
    {
        if Instant::now() > deadline {
            println!("warning: not every node connected within 300 s after the ramp");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connect_s = t0.elapsed().as_secs_f64();
    let connected = stats.connected.load(Relaxed);
    let (r0, s0) = fresh_sys(&sysv).await;
    let connect_wire = stats.computed_wire();
    for (e, n) in stats
        .error_kinds
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        println!("connect_error {n} x {e}");
    }
    println!(
        "connected {connected}/{nodes} in {connect_s:.1}s connacks {} errors {} computed_connect_bytes {connect_wire} \
         sys_bytes_received {r0} sys_bytes_sent {s0} sys_clients_connected {}",
        stats.connacks.load(Relaxed),
        stats.errors.load(Relaxed),
        sys(&sysv, "clients/connected")
    );

    // Steady state.
    let (mc0, _, _) = proc_usage(mosq_pid);
    let (sc0, _, _) = proc_usage(me);
    let w0 = stats.computed_wire();
    let counts0: Vec<u64> = stats.msgs.iter().map(|m| m.load(Relaxed)).collect();
    let pings0 = stats.pings.load(Relaxed);
    let tm0 = Instant::now();
    let load0 = loadavg();
    while tm0.elapsed() < measure {
        tokio::time::sleep(Duration::from_secs(10)).await;
        println!(
            "steady t={:.0}s connected {} states {} summaries {} events {} acked {} pings {} errors {}",
            tm0.elapsed().as_secs_f64(),
            stats.connected.load(Relaxed),
            stats.msgs[0].load(Relaxed),
            stats.msgs[1].load(Relaxed),
            stats.msgs[2].load(Relaxed),
            stats.acked.load(Relaxed),
            stats.pings.load(Relaxed),
            stats.errors.load(Relaxed),
        );
    }
    let (r1, s1) = fresh_sys(&sysv).await;
    let secs = tm0.elapsed().as_secs_f64();
    let (mc1, mrss, mhwm) = proc_usage(mosq_pid);
    let (sc1, srss, shwm) = proc_usage(me);
    let w1 = stats.computed_wire();
    let n = nodes as f64;
    let sys_per_node_day = ((r1 - r0) + (s1 - s0)) / n / secs * 86_400.0;
    let computed_per_node_day = (w1 - w0) as f64 / n / secs * 86_400.0;
    let d = |i: usize| (stats.msgs[i].load(Relaxed) - counts0[i]) as f64;
    // Mean PUBLISH size per kind over the whole run (states are mostly
    // sent at connect, before the window).
    let mean = |i: usize| {
        let (c, w) = (stats.msgs[i].load(Relaxed), stats.wire[i].load(Relaxed));
        if c > 0 {
            w as f64 / c as f64
        } else {
            f64::NAN
        }
    };
    println!(
        "steady_window_s {secs:.1} loadavg_start {load0} loadavg_end {}",
        loadavg()
    );
    println!(
        "steady_msgs states {} summaries {} events {} pings {}",
        d(0),
        d(1),
        d(2),
        stats.pings.load(Relaxed) - pings0
    );
    println!(
        "publish_wire_mean_bytes state {:.0} summary {:.0} event {:.0}",
        mean(0),
        mean(1),
        mean(2)
    );
    println!(
        "bytes_per_node_day_sys {sys_per_node_day:.0} bytes_per_node_day_computed {computed_per_node_day:.0} (both directions, at this run's rates)"
    );
    println!(
        "mosquitto cpu_pct {:.1} rss_kib {mrss} hwm_kib {mhwm}; simulator cpu_pct {:.1} rss_kib {srss} hwm_kib {shwm}",
        (mc1 - mc0) / secs * 100.0,
        (sc1 - sc0) / secs * 100.0
    );
    // A day at defaults with this run's measured message sizes: one connect,
    // a state per connect plus 10 changes, a summary a minute, pings every
    // keepalive, and `events_per_day` events.
    let events_per_day = o.num("events-per-day", 100.0)?;
    let per_connect = connect_wire as f64 / connected.max(1) as f64;
    let day_defaults = per_connect
        + 11.0 * (mean(0) + PUBACK as f64)
        + 1440.0 * (mean(1) + PUBACK as f64)
        + events_per_day * (mean(2) + PUBACK as f64)
        + 86_400.0 / 30.0 * 2.0 * PING as f64;
    println!(
        "day_at_defaults_bytes {day_defaults:.0} (connect+state {per_connect:.0}, 11 states, 1440 summaries, {events_per_day} events, 2880 ping pairs)"
    );

    // The fleet CLI while the nodes run.
    let mut cli = Vec::new();
    for k in 0..cli_runs {
        let bin = outpost_bin.clone();
        let url = format!("mqtt://127.0.0.1:{}", cfg.port);
        let (wall, code, listed, online, warn) = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let out = Command::new(&bin)
                .args(["fleet", "--broker", &url, "nodes", "--json"])
                .stdin(Stdio::null())
                .output();
            let wall = t.elapsed().as_secs_f64();
            match out {
                Ok(out) => {
                    let rows: Vec<serde_json::Value> =
                        serde_json::from_slice(&out.stdout).unwrap_or_default();
                    let online = rows.iter().filter(|r| r["online"] == json!(true)).count();
                    let warn = String::from_utf8_lossy(&out.stderr).trim().to_string();
                    (
                        wall,
                        out.status.code().unwrap_or(-1),
                        rows.len(),
                        online,
                        warn,
                    )
                }
                Err(e) => (wall, -1, 0, 0, format!("{bin}: {e}")),
            }
        })
        .await?;
        println!(
            "fleet_nodes run {k} wall_s {wall:.3} exit {code} listed {listed} online {online} stderr {warn:?}"
        );
        cli.push(json!({"wall_s": wall, "exit": code, "listed": listed, "online": online}));
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    println!(
        "{}",
        json!({
            "mode": "fleet", "nodes": nodes, "connected": connected, "connect_s": connect_s,
            "steady_s": secs, "bytes_per_node_day_sys": sys_per_node_day,
            "bytes_per_node_day_computed": computed_per_node_day,
            "day_at_defaults_bytes": day_defaults,
            "publish_wire_mean": [mean(0), mean(1), mean(2)],
            "mosquitto_cpu_pct": (mc1 - mc0) / secs * 100.0, "mosquitto_hwm_kib": mhwm,
            "sim_cpu_pct": (sc1 - sc0) / secs * 100.0, "sim_hwm_kib": shwm,
            "fleet_nodes": cli,
        })
    );
    token.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(broker);
    Ok(())
}

/// The drain node's view: online, 5 targets; summaries are not due in a
/// drain run.
struct DrainView {
    started_ms: i64,
}

impl NodeView for DrainView {
    fn state(&self) -> StateBody {
        state_body(
            env!("CARGO_PKG_VERSION"),
            self.started_ms,
            "drain",
            &mut Rng(7),
        )
    }

    fn summary(&self, interval: Duration) -> SummaryBody {
        summary_body(interval, 0, &mut Rng(11))
    }
}

async fn drain(o: Opts) -> Result<()> {
    let events = o.num("events", 20_000.0)? as u64;
    let down = Duration::from_secs_f64(o.num("down-s", 3.0)?);
    let mut broker = Mosquitto::new()?;
    let dir = tempfile::Builder::new()
        .prefix("outpost-fleet-drain-")
        .tempdir()?;
    let max_rows = o.num("outbox-max-rows", events.max(10_000) as f64 + 100.0)? as u64;
    let text = format!(
        "[agent]\nnode_id = \"drain\"\nstate_dir = \"{}\"\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\noutbox_max_rows = {max_rows}\n",
        dir.path().display(),
        broker.port
    );
    let cfg = outpost::config::parse_str(&text, "drain.toml")?;
    let mqtt = cfg.mqtt.clone().ok_or_else(|| anyhow!("no [mqtt]"))?;
    let node = NodeConfig::from_config(&cfg, &mqtt, now_ms());
    println!(
        "drain events {events} outbox_max_rows {max_rows} broker 127.0.0.1:{} loadavg {}",
        broker.port,
        loadavg()
    );

    // Fill through the real outbox code (as the daemon would over a long
    // outage, only faster to set up).
    fill_outbox(
        &cfg.db_path(),
        &node.node,
        &mqtt.topic_prefix,
        events,
        max_rows,
    )?;

    let store = outpost::store::Store::open(&cfg)?;
    let uplink = Uplink::new(node.clone(), store.clone())?;
    let mut connected = uplink.connected();
    let token = CancellationToken::new();
    let view = Arc::new(DrainView {
        started_ms: node.started_ms,
    });
    let run = tokio::spawn(uplink.run(view, None, token.clone()));
    // The broker is down: the uplink retries with backoff.
    tokio::time::sleep(down).await;
    let (rows, _, _) = store.outbox_stats().await?;
    println!("after {down:?} with the broker down: {rows} rows waiting");
    let t_start = Instant::now();
    broker.start()?;
    let mosq_pid = broker.pid().unwrap_or(0);
    let (mc0, _, _) = proc_usage(mosq_pid);
    let (sc0, _, _) = proc_usage(std::process::id());
    connected.wait_for(|c| *c).await?;
    let t_conn = Instant::now();
    let mut left;
    loop {
        (left, _, _) = store.outbox_stats().await?;
        if left == 0 {
            break;
        }
        if t_conn.elapsed() > Duration::from_secs(300) {
            bail!("outbox not empty after 300 s: {left} rows left");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t_empty = Instant::now();
    let (mc1, _, _) = proc_usage(mosq_pid);
    let (sc1, srss, shwm) = proc_usage(std::process::id());
    let from_conn = (t_empty - t_conn).as_secs_f64();
    let from_start = (t_empty - t_start).as_secs_f64();
    // The rows: the events, plus the state written on connect.
    let published = events + 1;
    println!(
        "broker_start_to_connack_s {:.2} connack_to_empty_s {from_conn:.2} broker_start_to_empty_s {from_start:.2}",
        (t_conn - t_start).as_secs_f64()
    );
    println!(
        "drain_rate_msgs_per_s {:.0} (from CONNACK) {:.0} (from broker start)",
        published as f64 / from_conn,
        published as f64 / from_start
    );
    println!(
        "cpu_s during drain: mosquitto {:.2} this process {:.2}; this process rss_kib {srss} hwm_kib {shwm}; loadavg {}",
        mc1 - mc0,
        sc1 - sc0,
        loadavg()
    );
    println!(
        "{}",
        json!({
            "mode": "drain", "events": events, "connack_to_empty_s": from_conn,
            "broker_start_to_empty_s": from_start,
            "rate_from_connack": published as f64 / from_conn,
            "rate_from_broker_start": published as f64 / from_start,
        })
    );
    token.cancel();
    let _ = run.await;
    store.close().await?;
    drop(broker);
    Ok(())
}

/// Fills a store's outbox with `events` events through the real outbox
/// code, in one durable transaction on the store's own database file.
fn fill_outbox(
    db: &std::path::Path,
    node: &str,
    prefix: &str,
    events: u64,
    max_rows: u64,
) -> Result<()> {
    if let Some(p) = db.parent() {
        std::fs::create_dir_all(p)?;
    }
    let t = Instant::now();
    let conn = outpost::store::schema::open_rw(db)?;
    let ocfg = OutboxConfig::new(prefix, node, max_rows);
    let mut rng = Rng(3);
    outpost::store::schema::durable_transaction(&conn, |tx| {
        for n in 0..events {
            let body = serde_json::to_value(event_body(n, &mut rng))?;
            outbox::enqueue(tx, &ocfg, Kind::Event, now_ms(), body)?;
        }
        Ok(())
    })?;
    println!(
        "filled {} rows in {:.2}s (one transaction)",
        outbox::len(&conn)?,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The drain with the real daemon: `outpost run` (the binary given) with
/// an `[mqtt]` section, its outbox filled while the broker is down; times
/// from the broker's start and from the first acknowledged row until the
/// outbox is empty, reading the store read-only as the CLI does.
fn drain_agent(o: Opts) -> Result<()> {
    let events = o.num("events", 20_000.0)? as u64;
    let down = Duration::from_secs_f64(o.num("down-s", 3.0)?);
    let bin = o.str("outpost", "target/release/outpost");
    let mut broker = Mosquitto::new()?;
    let dir = tempfile::Builder::new()
        .prefix("outpost-fleet-drain-agent-")
        .tempdir()?;
    let max_rows = o.num("outbox-max-rows", events.max(10_000) as f64 + 100.0)? as u64;
    let text = format!(
        "[agent]\nnode_id = \"drain\"\nstate_dir = \"{}\"\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\noutbox_max_rows = {max_rows}\n",
        dir.path().display(),
        broker.port
    );
    let conf = dir.path().join("outpost.toml");
    std::fs::write(&conf, &text)?;
    let cfg = outpost::config::parse_str(&text, "outpost.toml")?;
    let mqtt = cfg.mqtt.clone().ok_or_else(|| anyhow!("no [mqtt]"))?;
    println!(
        "drain-agent {bin} events {events} outbox_max_rows {max_rows} broker 127.0.0.1:{} loadavg {}",
        broker.port,
        loadavg()
    );
    fill_outbox(
        &cfg.db_path(),
        "drain",
        &mqtt.topic_prefix,
        events,
        max_rows,
    )?;
    let log = std::fs::File::create(dir.path().join("outpost.log"))?;
    let mut agent = Command::new(&bin)
        .args(["--log-format", "text", "run", "--config"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let result = (|| -> Result<()> {
        std::thread::sleep(down);
        let ro = outpost::store::schema::open_ro(&cfg.db_path())?;
        let count = || -> Result<u64> { Ok(outbox::len(&ro)?) };
        let at_start = count()?;
        println!("after {down:?} with the broker down: {at_start} rows waiting");
        let t_start = Instant::now();
        broker.start()?;
        let mut t_first = None;
        loop {
            let left = count()?;
            if left < at_start && t_first.is_none() {
                t_first = Some(Instant::now());
            }
            if left == 0 {
                break;
            }
            if t_start.elapsed() > Duration::from_secs(300) {
                bail!("outbox not empty after 300 s: {left} rows left");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let t_empty = Instant::now();
        let t_first = t_first.unwrap_or(t_start);
        let from_first = (t_empty - t_first).as_secs_f64();
        let from_start = (t_empty - t_start).as_secs_f64();
        let (cpu, rss, hwm) = proc_usage(agent.id());
        println!(
            "broker_start_to_first_ack_s {:.2} first_ack_to_empty_s {from_first:.2} broker_start_to_empty_s {from_start:.2}",
            (t_first - t_start).as_secs_f64()
        );
        println!(
            "drain_rate_msgs_per_s {:.0} (from the first deleted row) {:.0} (from broker start)",
            at_start as f64 / from_first,
            at_start as f64 / from_start
        );
        println!(
            "agent cpu_s total {cpu:.2} rss_kib {rss} hwm_kib {hwm}; loadavg {}",
            loadavg()
        );
        println!(
            "{}",
            json!({
                "mode": "drain-agent", "events": events, "rows": at_start,
                "first_ack_to_empty_s": from_first, "broker_start_to_empty_s": from_start,
                "rate_from_first_ack": at_start as f64 / from_first,
                "rate_from_broker_start": at_start as f64 / from_start,
                "agent_hwm_kib": hwm,
            })
        );
        Ok(())
    })();
    let _ = agent.kill();
    let _ = agent.wait();
    if result.is_err() {
        let log = std::fs::read_to_string(dir.path().join("outpost.log")).unwrap_or_default();
        eprintln!("outpost log:\n{log}");
    }
    result
}
