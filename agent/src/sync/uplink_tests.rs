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
        Broker::start_with(port, None)
    }

    /// With `user`: anonymous clients refused, that one user and password
    /// allowed (a `mosquitto_passwd` file).
    fn start_with(port: Option<u16>, user: Option<(&str, &str)>) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = port.unwrap_or_else(|| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port")
        });
        let conf = dir.path().join("mosquitto.conf");
        let auth = match user {
            None => "allow_anonymous true\n".to_string(),
            Some((name, password)) => {
                let passwd = dir.path().join("passwd");
                let ok = Command::new("mosquitto_passwd")
                    .args(["-b", "-c"])
                    .arg(&passwd)
                    .args([name, password])
                    .status()
                    .expect("mosquitto_passwd must be installed (apt install mosquitto)");
                assert!(ok.success(), "mosquitto_passwd failed");
                format!(
                    "allow_anonymous false\npassword_file {}\n",
                    passwd.display()
                )
            }
        };
        std::fs::write(
            &conf,
            format!("user root\nlistener {port} 127.0.0.1\n{auth}persistence false\n"),
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

// ---- misbehaving brokers ------------------------------------------------

#[test]
fn connection_errors_are_classified_with_the_limit_they_hit() {
    use super::uplink::{classify, DownKind, CONNECT_TIMEOUT};
    use rumqttc::mqttbytes::Error as Bytes;
    use rumqttc::{ConnectReturnCode, ConnectionError as E, StateError};
    let ka = Duration::from_secs(7);
    let io = |k| std::io::Error::new(k, "x");
    let cases: Vec<(E, DownKind, &str)> = vec![
        (E::NetworkTimeout, DownKind::Stalled, "no CONNACK within 5s"),
        (
            E::MqttState(StateError::AwaitPingResp),
            DownKind::Stalled,
            "no PINGRESP within one keepalive (7s)",
        ),
        (E::FlushTimeout, DownKind::Stalled, "did not drain"),
        (
            E::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
            DownKind::AuthRefused,
            "bad username or password",
        ),
        (
            E::ConnectionRefused(ConnectReturnCode::NotAuthorized),
            DownKind::AuthRefused,
            "not authorized",
        ),
        (
            E::ConnectionRefused(ConnectReturnCode::BadClientId),
            DownKind::Refused,
            "BadClientId",
        ),
        (
            E::MqttState(StateError::Deserialization(
                Bytes::PayloadSizeLimitExceeded(268_435_455),
            )),
            DownKind::Protocol,
            "268435455 bytes, over mqtt.max_packet_kb",
        ),
        (
            E::MqttState(StateError::Deserialization(Bytes::InvalidPacketType(0))),
            DownKind::Protocol,
            "malformed packet from the broker: Invalid packet type: 0",
        ),
        (
            E::MqttState(StateError::Deserialization(Bytes::MalformedRemainingLength)),
            DownKind::Protocol,
            "Malformed remaining length",
        ),
        (
            E::NotConnAck(rumqttc::Packet::PingResp),
            DownKind::Protocol,
            "expected a CONNACK, got a PINGRESP",
        ),
        (
            E::MqttState(StateError::ConnectionAborted),
            DownKind::Closed,
            "closed the connection",
        ),
        (
            E::MqttState(StateError::Deserialization(Bytes::Io(io(
                std::io::ErrorKind::ConnectionReset,
            )))),
            DownKind::Closed,
            "dropped the connection",
        ),
        (
            E::Io(io(std::io::ErrorKind::ConnectionRefused)),
            DownKind::Unreachable,
            "connection refused",
        ),
    ];
    for (e, kind, words) in cases {
        let (k, reason) = classify(&e, ka);
        assert_eq!(k, kind, "{e:?}: {reason}");
        assert!(reason.contains(words), "{e:?}: {reason:?} lacks {words:?}");
    }
    assert_eq!(
        CONNECT_TIMEOUT,
        Duration::from_secs(5),
        "the reason above names it"
    );
}

#[test]
fn the_password_file_is_read_again_and_a_change_reported_once() {
    use super::uplink::PasswordFile;
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("pw");
    std::fs::write(&f, "old\n").expect("write");
    let mut m = MqttConfig::plain("b", 1, "n");
    assert!(
        PasswordFile::new(&m).is_none(),
        "no username: nothing to read"
    );
    m.username = Some("u".into());
    m.password_file = Some(f.clone());
    let mut p = PasswordFile::new(&m).expect("configured");
    assert!(p.refresh().is_none(), "unchanged");
    std::fs::write(&f, "new\n").expect("write");
    let (user, pw) = p.refresh().expect("changed");
    assert_eq!((user.as_str(), pw.expose()), ("u", "new"));
    assert!(p.refresh().is_none(), "reported once");
    std::fs::remove_file(&f).expect("rm");
    assert!(p.refresh().is_none(), "unreadable: the last password stays");
    std::fs::write(&f, "new\n").expect("write");
    assert!(p.refresh().is_none(), "back, and the same as the last one");
}

/// A loopback listener that runs `serve` on each connection (on its own
/// task) and counts them.
async fn fake_broker<F, Fut>(serve: F) -> (u16, Arc<std::sync::atomic::AtomicUsize>)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = count.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(serve(s));
        }
    });
    (port, count)
}

/// Waits until the uplink's state satisfies `pred`; returns it.
async fn state_where(
    rx: &mut tokio::sync::watch::Receiver<super::uplink::UplinkState>,
    what: &str,
    pred: impl Fn(&super::uplink::UplinkState) -> bool,
) -> super::uplink::UplinkState {
    let found = match tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| pred(s))).await
    {
        Ok(Ok(s)) => Some(s.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("no {what} state within 20 s; last: {}", *rx.borrow()))
}

#[tokio::test]
async fn a_broker_that_never_sends_connack_is_reported_stalled_and_retried() {
    use super::uplink::{DownKind, UplinkState};
    use tokio::io::AsyncReadExt;
    let (port, count) = fake_broker(|mut s| async move {
        // Read the CONNECT and whatever follows; never answer.
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path());
    let up = Uplink::new(node(port, "stall-1"), store.clone()).expect("uplink");
    let mut state = up.state();
    assert_eq!(*state.borrow(), UplinkState::Connecting);
    let token = CancellationToken::new();
    let task = tokio::spawn(up.run(Arc::new(FixedView), None, token.clone()));
    let s = state_where(&mut state, "stalled", |s| {
        matches!(
            s,
            UplinkState::Down {
                kind: DownKind::Stalled,
                ..
            }
        )
    })
    .await;
    assert_eq!(s.to_string(), "stalled: no CONNACK within 5s of connecting");
    // And it tries again.
    state_where(
        &mut state,
        "second failure",
        |s| matches!(s, UplinkState::Down { failures, .. } if *failures >= 2),
    )
    .await;
    assert!(count.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    token.cancel();
    task.await.expect("join");
    store.close().await.expect("close");
}

#[tokio::test]
async fn garbage_and_closed_connections_after_connack_do_not_reset_the_backoff() {
    use super::uplink::{DownKind, UplinkState};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A valid CONNACK, then a packet of reserved type 0.
    let (port, count) = fake_broker(|mut s| async move {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s.write_all(&[0x20, 0x02, 0x00, 0x00, 0x00, 0x00]).await;
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path());
    let mut n = node(port, "garbage-1");
    n.mqtt.reconnect_min = Duration::from_millis(20);
    n.mqtt.reconnect_max = Duration::from_millis(200);
    let up = Uplink::new(n, store.clone()).expect("uplink");
    let mut state = up.state();
    let token = CancellationToken::new();
    let task = tokio::spawn(up.run(Arc::new(FixedView), None, token.clone()));
    let s = state_where(&mut state, "fourth protocol failure", |s| {
        matches!(s, UplinkState::Down { kind: DownKind::Protocol, failures, .. } if *failures >= 4)
    })
    .await;
    assert!(
        s.to_string()
            .starts_with("protocol error: malformed packet from the broker"),
        "{s}"
    );
    // Each of those connections got its CONNACK: a backoff reset on CONNACK
    // would show one failure each time, not a growing count.
    assert!(count.load(std::sync::atomic::Ordering::SeqCst) >= 4);
    token.cancel();
    task.await.expect("join");
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_refused_password_is_reported_and_a_fixed_password_file_is_used_without_a_restart() {
    use super::uplink::{DownKind, UplinkState};
    let broker = Broker::start_with(None, Some(("node-pw", "right-pw")));
    let dir = tempfile::tempdir().expect("tempdir");
    let pw = dir.path().join("password");
    std::fs::write(&pw, "wrong-pw\n").expect("write");
    let store = store(dir.path());
    let mut n = node(broker.port, "node-pw");
    n.mqtt.username = Some("node-pw".into());
    n.mqtt.password_file = Some(pw.clone());
    let up = Uplink::new(n, store.clone()).expect("uplink");
    let mut state = up.state();
    let token = CancellationToken::new();
    let task = tokio::spawn(up.run(Arc::new(FixedView), None, token.clone()));
    let s = state_where(&mut state, "auth refused", |s| {
        matches!(
            s,
            UplinkState::Down {
                kind: DownKind::AuthRefused,
                ..
            }
        )
    })
    .await;
    assert!(s.to_string().starts_with("auth refused: "), "{s}");
    event(&store, 1).await;
    // The operator fixes the file (write and rename, as tools do).
    let tmp = dir.path().join("password.new");
    std::fs::write(&tmp, "right-pw\n").expect("write");
    std::fs::rename(&tmp, &pw).expect("rename");
    state_where(&mut state, "connected", |s| *s == UplinkState::Connected).await;
    outbox_empties(&store).await;
    token.cancel();
    task.await.expect("join");
    store.close().await.expect("close");
}
