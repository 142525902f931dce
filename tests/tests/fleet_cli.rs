//! `outpost fleet` (the real binary) through a real mosquitto: keygen, the
//! nodes table from retained states, and signed approve/pause round trips.
//!
//! The node side is the agent's own command handler
//! (`outpost::sync::command::handle`) run in-process behind a small relay
//! that plays the uplink: it takes payloads from the command topics, hands
//! them to the handler and publishes the reply message. So what is proved
//! here is the CLI, the broker path, the envelope and the handler together;
//! the daemon's uplink has its own tests.

// Test helpers fail loudly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost::control::{LiveStatus, Reply, Request};
use outpost::sync::command::{handle, CommandContext, Scope, Shared};
use outpost_tests::agent::{outpost, schema, Agent};
use outpost_tests::fleet::{fleet, online, PREFIX};
use outpost_tests::mosquitto::{publish, validate, Broker, Mode, Subscriber};
use serde_json::json;

fn hex_id(n: u64) -> String {
    format!("{n:032x}")
}

fn state_msg(node: &str, group: Option<&str>, online: bool, incidents: u64) -> serde_json::Value {
    json!({
        "v": 1, "type": "state", "id": hex_id(7), "seq": 1, "node": node,
        "ts_ms": 1_765_000_000_000_i64,
        "body": {
            "online": online, "version": "0.1.0", "started_ms": 1_765_000_000_000_i64,
            "uptime_s": 5, "group": group, "paused": false, "targets": [],
            "models": [], "open_incidents": incidents,
            "dropped": {"summaries": 0, "events": 0, "states": 0, "replies": 0}
        }
    })
}

/// One simulated node: the real handler with a recording control channel.
struct SimNode {
    ctx: CommandContext,
    requests: Arc<Mutex<Vec<Request>>>,
    _dir: tempfile::TempDir,
}

fn sim_node(node: &str, group: Option<&str>, trusted: &str) -> SimNode {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = outpost::config::Config::builtin();
    cfg.agent.state_dir = dir.path().join("state");
    cfg.agent.node_id = node.to_string();
    let store = outpost::store::Store::open(&cfg).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<outpost::control::Command>(8);
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Some((req, answer)) = rx.recv().await {
            let ok = matches!(req, Request::Approve { id: 7, .. });
            seen.lock().unwrap().push(req);
            let _ = answer.send(Reply {
                ok,
                message: if ok {
                    "approved #7".into()
                } else {
                    "no decision is awaiting approval".into()
                },
            });
        }
    });
    let (_connected_tx, connected) = tokio::sync::watch::channel(true);
    let ctx = CommandContext {
        node_id: node.to_string(),
        group: group.map(String::from),
        trusted_keys: vec![trusted.to_string()],
        allow_unsigned: false,
        control: tx,
        state_dir: cfg.agent.state_dir.clone(),
        store,
        config_path: None,
        status: Arc::new(Mutex::new(LiveStatus {
            node_id: node.to_string(),
            ..LiveStatus::default()
        })),
        pause_file: cfg.agent.state_dir.join("pause"),
        connected,
        reload: Arc::new(|| Ok(())),
        shared: Arc::new(Shared::default()),
    };
    SimNode {
        ctx,
        requests,
        _dir: dir,
    }
}

/// A simulated node's name, the requests its control channel got, and its
/// pause file.
type NodeInfo = (String, Arc<Mutex<Vec<Request>>>, PathBuf);

/// Relays command topics to the nodes' handlers and publishes their
/// replies (schema-checked) until dropped.
struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    nodes: Arc<Mutex<Vec<NodeInfo>>>,
}

impl Relay {
    fn start(
        broker: &Broker,
        nodes: Vec<(&'static str, Option<&'static str>)>,
        trusted: String,
    ) -> Relay {
        let sub = Subscriber::connect(
            broker,
            &[
                &format!("{PREFIX}/nodes/+/cmd"),
                &format!("{PREFIX}/groups/+/cmd"),
                &format!("{PREFIX}/fleet/cmd"),
            ],
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let info = Arc::new(Mutex::new(Vec::new()));
        let (stop2, info2) = (stop.clone(), info.clone());
        let port = broker.port();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            // The control doubles run on `rt` while a handler is driven by
            // `block_on`; replies are published outside it.
            let sims: Vec<SimNode> = rt.block_on(async {
                nodes
                    .iter()
                    .map(|(n, g)| sim_node(n, *g, &trusted))
                    .collect()
            });
            for s in &sims {
                info2.lock().unwrap().push((
                    s.ctx.node_id.clone(),
                    s.requests.clone(),
                    s.ctx.pause_file.clone(),
                ));
            }
            let mut done = 0;
            let mut seq = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                let msgs = sub.messages();
                for m in msgs.iter().skip(done) {
                    for s in &sims {
                        let node = &s.ctx.node_id;
                        let scope = if m.topic == format!("{PREFIX}/nodes/{node}/cmd") {
                            Scope::Node
                        } else if let Some(g) = m
                            .topic
                            .strip_prefix(&format!("{PREFIX}/groups/"))
                            .and_then(|r| r.strip_suffix("/cmd"))
                        {
                            Scope::Group(g.to_string())
                        } else if m.topic == format!("{PREFIX}/fleet/cmd") {
                            Scope::Fleet
                        } else {
                            continue;
                        };
                        let Some(reply) = rt.block_on(handle(&s.ctx, scope, &m.payload)) else {
                            continue;
                        };
                        seq += 1;
                        let msg = json!({
                            "v": 1, "type": "reply", "id": hex_id(seq), "seq": seq,
                            "node": node, "ts_ms": 1_765_000_000_000_i64,
                            "body": reply,
                        });
                        validate(schema("reply"), &msg)
                            .unwrap_or_else(|e| panic!("reply off schema: {e}\n{msg}"));
                        publish_to(port, &format!("{PREFIX}/nodes/{node}/reply"), &msg);
                    }
                }
                done = msgs.len();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Relay {
            stop,
            thread: Some(thread),
            nodes: info,
        }
    }

    fn node(&self, name: &str) -> (Arc<Mutex<Vec<Request>>>, PathBuf) {
        for _ in 0..200 {
            if let Some((_, r, p)) = self
                .nodes
                .lock()
                .unwrap()
                .iter()
                .find(|(n, _, _)| n == name)
            {
                return (r.clone(), p.clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no simulated node {name}");
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Publishes at QoS 1 with a short-lived plain client (the relay thread has
/// only the broker's port).
fn publish_to(port: u16, topic: &str, msg: &serde_json::Value) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(
        format!("relay-{}-{}", std::process::id(), next_client()),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(o, 8);
    client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            serde_json::to_vec(msg).unwrap(),
        )
        .unwrap();
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("relay publish: {e}"),
        }
    }
    let _ = client.disconnect();
}

/// A client id suffix unique within the test process.
fn next_client() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    N.fetch_add(1, Ordering::SeqCst)
}

/// `outpost fleet keygen`, and what it makes: an ed25519 public key line
/// and a key file only its owner reads.
fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let (path, public) = outpost_tests::fleet::keygen(dir, name);
    assert!(
        public.starts_with("ed25519:") && public.len() == 52,
        "{public}"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    (path, public)
}

#[test]
fn keygen_nodes_and_signed_round_trips_through_mosquitto() {
    let broker = Broker::start(Mode::Plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path(), "fleet.key");
    let (other_key, _) = keygen(dir.path(), "other.key");
    let key_s = key.to_str().unwrap();

    // Retained states of three nodes (one offline), schema-checked.
    for (node, group, online, incidents) in [
        ("node-a", Some("hall"), true, 2),
        ("node-b", Some("hall"), true, 0),
        ("node-c", None, false, 0),
    ] {
        let m = state_msg(node, group, online, incidents);
        validate(schema("state"), &m).unwrap();
        publish(
            &broker,
            &format!("{PREFIX}/nodes/{node}/state"),
            &serde_json::to_vec(&m).unwrap(),
            true,
        )
        .unwrap();
    }
    let out = fleet(&broker, &["nodes", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0]["node"], "node-a");
    assert_eq!(rows[0]["open_incidents"], 2);
    assert_eq!(rows[0]["group"], "hall");
    assert_eq!(rows[2]["online"], false);
    let table = fleet(&broker, &["nodes"]);
    assert!(
        table.stdout.contains("node-c") && table.stdout.contains("VERSION"),
        "{}",
        table.stdout
    );

    let relay = Relay::start(
        &broker,
        vec![("node-a", Some("hall")), ("node-b", Some("hall"))],
        public.clone(),
    );
    let (a_requests, a_pause) = relay.node("node-a");
    let (_, b_pause) = relay.node("node-b");

    // A signed approval reaches node-a's control channel; the CLI says ok.
    let out = fleet(&broker, &["--key", key_s, "approve", "node-a", "7"]);
    assert_eq!(out.code, 0, "stdout {}\nstderr {}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("node-a") && out.stdout.contains("ok"),
        "{}",
        out.stdout
    );
    assert_eq!(
        a_requests.lock().unwrap().as_slice(),
        &[Request::Approve {
            id: 7,
            by: Some(format!("fleet:{}", &public[8..]))
        }]
    );

    // The node refuses an approval it has nothing for: exit 1, the reason shown.
    let out = fleet(&broker, &["--key", key_s, "approve", "node-a", "8"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("REFUSED"), "{}", out.stdout);

    // Signed by a key the node does not trust: refused, nothing reaches it.
    let before = a_requests.lock().unwrap().len();
    let out = fleet(
        &broker,
        &[
            "--key",
            other_key.to_str().unwrap(),
            "approve",
            "node-a",
            "7",
        ],
    );
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("trusted_keys"), "{}", out.stdout);
    assert_eq!(a_requests.lock().unwrap().len(), before);

    // Unsigned: refused.
    let out = fleet(&broker, &["--unsigned", "pause", "node-a"]);
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("unsigned"), "{}", out.stdout);
    assert!(!a_pause.exists());

    // Pause the group: both nodes answer, both pause files appear.
    let out = fleet(
        &broker,
        &[
            "--key",
            key_s,
            "pause",
            "--group",
            "hall",
            "--reason",
            "maintenance",
        ],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("node-a") && out.stdout.contains("node-b"),
        "{}",
        out.stdout
    );
    assert!(a_pause.exists() && b_pause.exists());
    assert!(std::fs::read_to_string(&a_pause)
        .unwrap()
        .contains("maintenance"));

    // Resume one node.
    let out = fleet(&broker, &["--key", key_s, "resume", "node-a"]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert!(!a_pause.exists() && b_pause.exists());

    // Every node, one at a time (slot 300 ms): the two live nodes answer
    // ok and node-b resumes; node-c (offline, retained state only) cannot
    // answer, so the exit is 1.
    let out = fleet(
        &broker,
        &[
            "--key",
            key_s,
            "resume",
            "--all",
            "--max-concurrency",
            "1",
            "--slot",
            "300ms",
        ],
    );
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    let line = |n: &str| {
        out.stdout
            .lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("node-a").contains("ok"), "{}", out.stdout);
    assert!(line("node-b").contains("ok"), "{}", out.stdout);
    assert!(line("node-c").contains("NO ANSWER"), "{}", out.stdout);
    assert!(!b_pause.exists());

    // A node that does not exist does not answer: exit 1.
    let out = fleet(
        &broker,
        &["--key", key_s, "--timeout", "1s", "approve", "node-z", "1"],
    );
    assert_eq!(out.code, 1);
    assert!(out.stdout.contains("NO ANSWER"), "{}", out.stdout);

    // Bad arguments: exit 2.
    let out = fleet(&broker, &["approve", "node-a", "7"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    drop(relay);
}

/// Publishes `n` retained node states through one client, waiting for
/// every PUBACK.
fn publish_states(broker: &Broker, n: usize) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(
        format!("states-{}", std::process::id()),
        "127.0.0.1",
        broker.port(),
    );
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(200);
    let (client, mut conn) = Client::new(o, 1000);
    let pub_thread = std::thread::spawn(move || {
        for i in 0..n {
            let node = format!("node-{i:05}");
            let group = if i % 2 == 0 { "even" } else { "odd" };
            let m = state_msg(&node, Some(group), i % 10 != 0, (i % 3) as u64);
            client
                .publish(
                    format!("{PREFIX}/nodes/{node}/state"),
                    QoS::AtLeastOnce,
                    true,
                    serde_json::to_vec(&m).unwrap(),
                )
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked += 1;
                if acked == n {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => panic!("publishing states: {e}"),
        }
    }
    let client = pub_thread.join().unwrap();
    let _ = client.disconnect();
}

#[test]
fn nodes_lists_10000_retained_states_within_2_seconds() {
    let broker = Broker::start(Mode::Plain).unwrap();
    publish_states(&broker, 10_000);
    let start = std::time::Instant::now();
    let out = fleet(&broker, &["nodes", "--json"]);
    let took = start.elapsed();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 10_000, "every retained state is listed");
    assert_eq!(rows[0]["node"], "node-00000");
    assert_eq!(rows[0]["online"], false);
    assert_eq!(rows[1]["group"], "odd");
    eprintln!("nodes over 10,000 retained states: {took:?}");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn the_real_agent_takes_signed_commands_from_outpost_fleet() {
    let broker = Broker::start(Mode::Plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path(), "fleet.key");
    let key_s = key.to_str().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("outpost.toml");
    let toml = format!(
        "[agent]\nnode_id = \"real-1\"\nstate_dir = \"{}\"\nsample_interval_ms = 200\n\n{}\
         reconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n\n[fleet]\ngroup = \"hall\"\n\
         trusted_keys = [\"{public}\"]\n",
        state.display(),
        broker.mqtt_toml()
    );
    std::fs::write(&config, &toml).unwrap();
    let mut cmd = Command::new(outpost());
    cmd.args(["run", "--config"]).arg(&config);
    let _agent = Agent::spawn(cmd, dir.path().join("agent.log"));
    let sub = Subscriber::connect(&broker, &[&format!("{PREFIX}/nodes/real-1/state")]).unwrap();
    sub.wait_for(online, Duration::from_secs(20)).unwrap();

    // The table shows it online, in its group.
    let out = fleet(&broker, &["nodes", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == "real-1")
        .cloned()
        .unwrap_or_else(|| panic!("real-1 not listed: {}", out.stdout));
    assert_eq!(row["online"], true);
    assert_eq!(row["group"], "hall");

    // Pause through the group topic: the agent's pause file appears.
    let pause_file = state.join("pause");
    let out = fleet(&broker, &["--key", key_s, "pause", "--group", "hall"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(pause_file.exists());
    // Status answers live, and says paused.
    let out = fleet(&broker, &["--key", key_s, "--json", "status", "real-1"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["result"]["node_id"], "real-1");
    assert_eq!(v["result"]["paused"], true);
    // Approving a decision that is not pending: answered, refused, exit 1.
    let out = fleet(&broker, &["--key", key_s, "approve", "real-1", "424242"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("no decision #424242"), "{}", out.stdout);
    // Resume.
    let out = fleet(&broker, &["--key", key_s, "resume", "real-1"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(!pause_file.exists());
    // A config push that does not validate: refused, file unchanged.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[agent]\nno_such_key = 1\n").unwrap();
    let out = fleet(
        &broker,
        &[
            "--key",
            key_s,
            "push-config",
            "real-1",
            bad.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("no_such_key"), "{}", out.stdout);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), toml);
    // A run no rule allows: refused by the node's allowlist.
    let out = fleet(
        &broker,
        &["--key", key_s, "run", "real-1", "web", "restart"],
    );
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stdout.contains("not allowed"), "{}", out.stdout);
    // A good config: written, the old one kept as .prev, the agent reloads
    // and stays connected.
    let good_toml = toml.replace("sample_interval_ms = 200", "sample_interval_ms = 300");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, &good_toml).unwrap();
    let out = fleet(
        &broker,
        &[
            "--key",
            key_s,
            "push-config",
            "real-1",
            good.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    // Stored in the state directory; the local config (the policy) is
    // never written.
    assert_eq!(
        std::fs::read_to_string(state.join("fleet-config.toml")).unwrap(),
        good_toml
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), toml);
    assert!(!dir.path().join("outpost.toml.prev").exists());
    // The reload is asynchronous (SIGHUP): ask until it shows, for 5 s.
    let mut interval = serde_json::Value::Null;
    for _ in 0..10 {
        let out = fleet(&broker, &["--key", key_s, "--json", "status", "real-1"]);
        assert_eq!(out.code, 0, "{}", out.stdout);
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
        interval = v["result"]["sample_interval_ms"].clone();
        if interval == 300 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(interval, 300, "the reload took the new config");
}
