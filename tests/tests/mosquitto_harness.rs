//! Proves the mosquitto harness (tests/src/mosquitto.rs) against a real
//! broker in each mode, so a sync test that fails points at the daemon, not
//! at the harness.

use std::time::{Duration, Instant};

use outpost_tests::mosquitto::{
    publish, publish_with, try_connect, validate, Broker, Mode, Subscriber, FLEET_USER, NODE_USER,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn timed<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    eprintln!("{name}: {:?}", start.elapsed());
    out
}

#[test]
fn plain_pub_sub_and_retain_flag() {
    timed("plain", || {
        let broker = Broker::start(Mode::Plain).unwrap();
        assert!(broker.url().starts_with("mqtt://127.0.0.1:"));
        assert!(broker.mqtt_toml().contains(&broker.url()));

        // Retained before anyone listens: delivered with the retain flag.
        publish(&broker, "t/retained", b"kept", true).unwrap();
        let sub = Subscriber::connect(&broker, &["t/#"]).unwrap();
        publish(&broker, "t/live", br#"{"n":1}"#, false).unwrap();
        let msgs = sub
            .wait_for(|m| m.iter().any(|m| m.topic == "t/live"), WAIT)
            .unwrap();
        let kept = msgs.iter().find(|m| m.topic == "t/retained").unwrap();
        assert_eq!(kept.payload, b"kept");
        assert!(
            kept.retain,
            "a retained message sent on subscribe has retain set"
        );
        let live = msgs.iter().find(|m| m.topic == "t/live").unwrap();
        assert!(!live.retain, "a live message has retain clear");
        assert_eq!(live.json().unwrap(), json!({"n": 1}));

        // Not subscribed: never seen.
        publish(&broker, "other/x", b"no", false).unwrap();
        publish(&broker, "t/after", b"yes", false).unwrap();
        let msgs = sub
            .wait_for(|m| m.iter().any(|m| m.topic == "t/after"), WAIT)
            .unwrap();
        assert!(msgs.iter().all(|m| m.topic != "other/x"));
        assert!(broker.log_text().contains("running"));
    });
}

#[test]
fn tls_needs_the_ca() {
    timed("tls", || {
        let broker = Broker::start(Mode::Tls).unwrap();
        let tls = broker.tls().unwrap().clone();
        assert!(broker.url().starts_with("mqtts://127.0.0.1:"));
        let toml = broker.mqtt_toml();
        assert!(
            toml.contains("ca_file") && !toml.contains("cert_file"),
            "{toml}"
        );
        assert!(std::fs::read_to_string(&tls.ca)
            .unwrap()
            .contains("BEGIN CERTIFICATE"));

        // With the CA (and no client certificate): works.
        let sub = Subscriber::connect(&broker, &["s/#"]).unwrap();
        publish(&broker, "s/1", b"over tls", false).unwrap();
        let m = sub.wait_for_topic("s/1", WAIT).unwrap();
        assert_eq!(m.payload, b"over tls");

        // Without the CA: the handshake fails.
        let mut no_ca = broker.client();
        no_ca.tls.as_mut().unwrap().ca = None;
        let err = try_connect(&broker, &no_ca).unwrap_err().to_string();
        assert!(err.to_lowercase().contains("certificate"), "{err}");

        // Plain MQTT to the TLS port: no CONNACK.
        let mut plain = broker.client();
        plain.tls = None;
        assert!(try_connect(&broker, &plain).is_err());
    });
}

#[test]
fn mutual_tls_refuses_a_client_without_a_certificate() {
    timed("mtls", || {
        let broker = Broker::start(Mode::MutualTls).unwrap();
        let toml = broker.mqtt_toml();
        assert!(
            toml.contains("cert_file") && toml.contains("key_file"),
            "{toml}"
        );

        try_connect(&broker, &broker.client()).unwrap();

        let mut no_cert = broker.client();
        no_cert.tls.as_mut().unwrap().cert_key = None;
        try_connect(&broker, &no_cert).unwrap_err();

        // A certificate not signed by the broker's CA: refused too.
        let other = Broker::start(Mode::MutualTls).unwrap();
        let foreign = other.tls().unwrap();
        let mut wrong_cert = broker.client();
        wrong_cert.tls.as_mut().unwrap().cert_key =
            Some((foreign.client_cert.clone(), foreign.client_key.clone()));
        try_connect(&broker, &wrong_cert).unwrap_err();

        // The good client still gets through after the refusals.
        let sub = Subscriber::connect(&broker, &["m/#"]).unwrap();
        publish(&broker, "m/1", b"mtls", false).unwrap();
        sub.wait_for_topic("m/1", WAIT).unwrap();
    });
}

#[test]
fn password_and_acl() {
    timed("password+acl", || {
        let broker = Broker::start(Mode::PasswordAcl).unwrap();
        let node = broker.user(NODE_USER).unwrap().clone();
        assert_eq!(
            std::fs::read_to_string(&node.password_file).unwrap().trim(),
            node.password
        );
        let toml = broker.mqtt_toml();
        assert!(toml.contains("username = \"node-a\""), "{toml}");
        assert!(toml.contains("password_file"), "{toml}");

        // Wrong password and no credentials: refused.
        let wrong = broker
            .client()
            .with_credentials(NODE_USER, "not-the-password");
        let err = try_connect(&broker, &wrong).unwrap_err().to_string();
        assert!(err.contains("Refused"), "{err}");
        let mut anonymous = broker.client();
        anonymous.credentials = None;
        try_connect(&broker, &anonymous).unwrap_err();

        // The fleet (reads everything) watches; node-a publishes outside its
        // ACL first, then inside it: the first is dropped, the second
        // delivered, in order on one connection.
        let fleet = Subscriber::connect(&broker, &["#"]).unwrap();
        let as_node = broker.client_as(NODE_USER).unwrap();
        publish_with(
            &broker,
            &as_node,
            "outpost/v1/nodes/node-b/state",
            b"forged",
            false,
        )
        .unwrap();
        publish_with(&broker, &as_node, "outpost/v1/fleet/cmd", b"forged", false).unwrap();
        publish_with(
            &broker,
            &as_node,
            "outpost/v1/nodes/node-a/state",
            b"mine",
            true,
        )
        .unwrap();
        let msgs = fleet
            .wait_for_topic("outpost/v1/nodes/node-a/state", WAIT)
            .map(|_| fleet.messages())
            .unwrap();
        let topics: Vec<&str> = msgs.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["outpost/v1/nodes/node-a/state"], "{msgs:?}");
        assert!(broker.log_text().contains("Denied PUBLISH"));

        // node-a reads its cmd topic, written by the fleet; it cannot read
        // another node's.
        let node_sub = Subscriber::connect_with(
            &broker,
            &as_node,
            &["outpost/v1/nodes/node-a/cmd", "outpost/v1/nodes/node-b/cmd"],
        );
        // mosquitto 2.0 grants the subscription and filters on delivery.
        let node_sub = node_sub.unwrap();
        publish(&broker, "outpost/v1/nodes/node-b/cmd", b"for b", false).unwrap();
        publish(&broker, "outpost/v1/nodes/node-a/cmd", b"for a", false).unwrap();
        let msgs = node_sub
            .wait_for(|m| m.iter().any(|m| m.payload == b"for a"), WAIT)
            .unwrap();
        assert!(msgs.iter().all(|m| m.payload != b"for b"), "{msgs:?}");
        assert!(broker.user(FLEET_USER).is_some());
    });
}

#[test]
fn retained_message_and_session_survive_a_restart() {
    timed("restart", || {
        let mut broker = Broker::start(Mode::Plain).unwrap();
        let port = broker.port();
        publish(&broker, "r/state", b"before", true).unwrap();

        // A persistent session with a subscription, then away.
        let mut opts = broker.client().with_id("outpost-test-persistent");
        opts.clean_session = false;
        drop(Subscriber::connect_with(&broker, &opts, &["q/#"]).unwrap());

        // A live subscriber rides through the outage by reconnecting.
        let live = Subscriber::connect(&broker, &["live/#"]).unwrap();

        broker.stop().unwrap();
        assert!(!broker.is_running());
        assert!(publish(&broker, "r/x", b"down", false).is_err());
        broker.restart().unwrap();
        assert_eq!(broker.port(), port);
        assert!(broker.is_running());

        let sub = Subscriber::connect(&broker, &["r/#"]).unwrap();
        let m = sub.wait_for_topic("r/state", WAIT).unwrap();
        assert_eq!(m.payload, b"before");
        assert!(m.retain);

        // Queued for the persistent session while it was away.
        publish(&broker, "q/1", b"queued", false).unwrap();
        let back = Subscriber::connect_with(&broker, &opts, &[]).unwrap();
        let m = back.wait_for_topic("q/1", WAIT).unwrap();
        assert_eq!(m.payload, b"queued");

        // The live subscriber reconnected and subscribed again.
        live.wait_connections(2, WAIT).unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            publish(&broker, "live/1", b"again", false).unwrap();
            if live
                .wait_for(
                    |m| m.iter().any(|m| m.topic == "live/1"),
                    Duration::from_millis(500),
                )
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "live subscriber never resubscribed"
            );
        }

        // A crash (SIGKILL) after a clean restart keeps what the last stop saved.
        broker.kill().unwrap();
        broker.restart().unwrap();
        let sub = Subscriber::connect(&broker, &["r/#"]).unwrap();
        sub.wait_for_topic("r/state", WAIT).unwrap();
    });
}

#[test]
fn schema_validation() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("common.schema.json"),
        r#"{"$defs": {"hex32": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}}"#,
    )
    .unwrap();
    let schema = dir.path().join("msg.schema.json");
    std::fs::write(
        &schema,
        r#"{
          "$schema": "https://json-schema.org/draft/2020-12/schema",
          "type": "object",
          "required": ["v", "id", "seq"],
          "additionalProperties": false,
          "properties": {
            "v": {"const": 1},
            "id": {"$ref": "common.schema.json#/$defs/hex32"},
            "seq": {"type": ["integer", "null"], "minimum": 1}
          }
        }"#,
    )
    .unwrap();
    let good = json!({"v": 1, "id": "0123456789abcdef0123456789abcdef", "seq": 42});
    validate(&schema, &good).unwrap();
    validate(
        &schema,
        &json!({"v": 1, "id": "0123456789abcdef0123456789abcdef", "seq": null}),
    )
    .unwrap();

    let err = validate(
        &schema,
        &json!({"v": 2, "id": "XYZ", "seq": 0, "extra": true}),
    )
    .unwrap_err();
    for at in ["/v", "/id", "/seq", "extra"] {
        assert!(err.contains(at), "{at} missing from: {err}");
    }
    assert!(validate(&schema, &json!({"v": 1}))
        .unwrap_err()
        .contains("required"));
    assert!(validate(dir.path().join("missing.schema.json"), &good).is_err());
    std::fs::write(dir.path().join("bad.schema.json"), r#"{"type": 12}"#).unwrap();
    assert!(validate(dir.path().join("bad.schema.json"), &good).is_err());
}
