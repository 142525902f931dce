//! The uplink against a real broker (mosquitto, started here on a free
//! loopback port): outbox order, acknowledgement, reconnect after the
//! broker dies, commands in and replies out.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::command::{CommandReply, Scope};
use super::message::*;
use super::uplink::{CommandHandler, NodeConfig, NodeView, Uplink};
use crate::config::MqttConfig;
use crate::store::Store;

struct Broker {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    fn start(port: Option<u16>) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port")
        });
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("conf");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto must be installed for the uplink tests (apt install mosquitto)");
        let broker = Broker { child, port, dir };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return broker;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(broker);
        panic!("mosquitto did not listen on {port}");
    }

    fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
        self.port
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct FixedView;

impl NodeView for FixedView {
    fn state(&self) -> StateBody {
        let mut s = StateBody::offline("test", 1, None);
        s.online = true;
        s
    }
    fn summary(&self, interval: Duration) -> SummaryBody {
        SummaryBody {
            interval_s: interval.as_secs(),
            targets: Vec::new(),
            counts: SummaryCounts::default(),
        }
    }
}

/// Collects every message under `outpost/v1/nodes/{node}/#`; resubscribes
/// after the broker restarts.
fn subscriber(port: u16, node: &str) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Value)>) {
    let mut o = MqttOptions::new(format!("sub-{}", new_id()), "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 16);
    let (tx, rx) = mpsc::unbounded_channel();
    let topic = format!("outpost/v1/nodes/{node}/#");
    let c = client.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(v) = serde_json::from_slice(&p.payload) {
                        if tx.send((p.topic.clone(), v)).is_err() {
                            return;
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (client, rx)
}

fn node(port: u16, name: &str) -> NodeConfig {
    let mut m = MqttConfig::plain("127.0.0.1", port, name);
    m.reconnect_min = Duration::from_millis(100);
    m.reconnect_max = Duration::from_millis(400);
    m.summary_interval = Duration::from_secs(3600);
    NodeConfig {
        node: name.to_string(),
        group: Some("g1".into()),
        version: "test".into(),
        started_ms: 1,
        mqtt: m,
    }
}

fn store(dir: &std::path::Path) -> Store {
    let mut cfg = crate::config::Config::builtin();
    cfg.agent.state_dir = dir.to_path_buf();
    Store::open(&cfg).expect("store")
}

async fn event(store: &Store, i: u64) {
    store
        .enqueue(
            Kind::Event,
            json!({"event": "config.applied", "source": "test", "i": i}),
        )
        .await
        .expect("enqueue")
        .expect("outbox on");
}

/// Waits until `n` events arrived; returns their `i` fields in arrival order.
async fn events(rx: &mut mpsc::UnboundedReceiver<(String, Value)>, n: usize) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((topic, v))) if topic.ends_with("/events") => {
                got.push((
                    v["seq"].as_u64().expect("seq"),
                    v["body"]["i"].as_u64().expect("i"),
                ));
            }
            Ok(Some(_)) => {}
            _ => panic!("only {} of {n} events arrived: {got:?}", got.len()),
        }
    }
    got
}

async fn outbox_empties(store: &Store) {
    for _ in 0..60 {
        if store.outbox_stats().await.expect("stats").0 == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "outbox still holds {} rows",
        store.outbox_stats().await.expect("stats").0
    );
}

#[tokio::test]
async fn outbox_is_published_in_order_acked_and_resent_after_a_broker_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(None);
    let port = broker.port;
    let (_sub, mut rx) = subscriber(port, "n1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let store = store(dir.path());
    let up = Uplink::new(node(port, "n1"), store.clone()).expect("uplink");
    let mut connected = up.connected();
    // Written while no connection exists yet: the outbox keeps them.
    for i in 0..40 {
        event(&store, i).await;
    }
    let token = CancellationToken::new();
    let task = tokio::spawn(up.run(Arc::new(FixedView), None, token.clone()));
    let got = events(&mut rx, 40).await;
    assert_eq!(
        got.iter().map(|g| g.1).collect::<Vec<_>>(),
        (0..40).collect::<Vec<_>>(),
        "in seq order, none missing"
    );
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "seq grows: {got:?}"
    );
    outbox_empties(&store).await;
    assert!(*connected.borrow_and_update());

    // The broker dies; what is written meanwhile waits in the outbox.
    let port = broker.kill();
    tokio::time::timeout(Duration::from_secs(10), connected.wait_for(|c| !*c))
        .await
        .expect("sees the disconnect")
        .expect("watch");
    for i in 40..60 {
        event(&store, i).await;
    }
    assert_eq!(store.outbox_stats().await.expect("stats").0, 20);
    let _broker = Broker::start(Some(port));
    let got = events(&mut rx, 20).await;
    let mut is: Vec<u64> = got.iter().map(|g| g.1).collect();
    is.dedup();
    assert_eq!(is, (40..60).collect::<Vec<_>>());
    outbox_empties(&store).await;

    token.cancel();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("uplink stops")
        .expect("join");
    store.close().await.expect("close");
}

#[tokio::test]
async fn commands_reach_the_handler_and_replies_come_back_with_state_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Broker::start(None);
    let (sub, mut rx) = subscriber(broker.port, "n2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let store = store(dir.path());
    let up = Uplink::new(node(broker.port, "n2"), store.clone()).expect("uplink");
    let handler: CommandHandler = Arc::new(|scope, payload| {
        Box::pin(async move {
            let v: Value = serde_json::from_slice(&payload).ok()?;
            Some(CommandReply {
                request_id: v["id"].as_str().map(str::to_string),
                ok: true,
                error: None,
                result: Some(json!({ "scope": format!("{scope:?}") })),
            })
        })
    });
    let token = CancellationToken::new();
    let task = tokio::spawn(up.run(Arc::new(FixedView), Some(handler), token.clone()));
    // The retained online state comes first.
    let (topic, state) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("state in time")
        .expect("message");
    assert_eq!(topic, "outpost/v1/nodes/n2/state");
    assert_eq!(state["body"]["online"], true);
    tokio::time::sleep(Duration::from_millis(300)).await; // subscriptions settle
    for (t, id) in [
        ("outpost/v1/nodes/n2/cmd", "r-node"),
        ("outpost/v1/groups/g1/cmd", "r-group"),
        ("outpost/v1/fleet/cmd", "r-fleet"),
        ("outpost/v1/groups/other/cmd", "r-other"),
    ] {
        sub.publish(t, QoS::AtLeastOnce, false, json!({ "id": id }).to_string())
            .await
            .expect("publish");
    }
    let mut replies = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while replies.len() < 3 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((topic, v))) if topic == "outpost/v1/nodes/n2/reply" => {
                assert_eq!(v["type"], "reply");
                replies.insert(
                    v["body"]["request_id"].as_str().expect("id").to_string(),
                    v["body"]["result"]["scope"]
                        .as_str()
                        .expect("scope")
                        .to_string(),
                );
            }
            Ok(Some(_)) => {}
            _ => panic!("replies so far: {replies:?}"),
        }
    }
    assert_eq!(replies["r-node"], format!("{:?}", Scope::Node));
    assert_eq!(
        replies["r-group"],
        format!("{:?}", Scope::Group("g1".into()))
    );
    assert_eq!(replies["r-fleet"], format!("{:?}", Scope::Fleet));
    assert!(!replies.contains_key("r-other"), "another group's command");

    // On shutdown the node says it is offline (retained).
    token.cancel();
    task.await.expect("join");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((topic, v))) if topic.ends_with("/state") && v["body"]["online"] == false => {
                break
            }
            Ok(Some(_)) => {}
            _ => panic!("no offline state after shutdown"),
        }
    }
    store.close().await.expect("close");
}
