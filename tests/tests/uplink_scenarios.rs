//! The uplink's harder cases, each with the real `outpost` binary against a
//! real mosquitto of its own (tests/src/mosquitto.rs): the agent over plain
//! MQTT, TLS with only the server's CA, and password + ACL; a broker down
//! for a minute and a kill -9 while messages are queued, with no event lost
//! and no gap in `seq`; refused commands (unsigned, expired, replayed,
//! untrusted, tampered, garbled) answered with why and changing nothing;
//! `outpost fleet push-model` of a good and of corrupt packages; and
//! `outpost fleet watch --json`.
//!
//! Events come from a rule in `suggest` mode on a TCP probe whose port a
//! [`Flapper`] opens and closes every second: each failing episode is one
//! audit row, and so one `action.*` event, every two seconds or so.

// Test helpers fail loudly.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use outpost_tests::agent::{
    actions, now_ms, outpost, write_probed_node, Agent, Flapper, LogFormat,
};
use outpost_tests::fleet::{
    check_seqs, event_audit_ids, fleet, kept_subscriber, keygen, online, Gaps, PREFIX,
};
use outpost_tests::mosquitto::{publish, Broker, Mode, Msg, Subscriber};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// A config for node `node` on `broker` with a target `web` probed on
/// `port` and a `suggest` rule on its failures; `extra` is appended.
fn write_config(dir: &Path, node: &str, broker: &Broker, port: u16, extra: &str) -> PathBuf {
    let uplink = format!(
        "{}reconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n{extra}",
        broker.mqtt_toml()
    );
    write_probed_node(dir, node, port, &uplink)
}

fn json_of(m: &Msg) -> Value {
    m.json().expect("every message is JSON")
}

fn is_event(v: &Value) -> bool {
    v["type"] == "event"
}

/// The node's audit rows (`outpost actions --json`): id and ts_ms.
fn audit_rows(config: &Path) -> Vec<(u64, i64)> {
    actions(config, 100_000)
        .iter()
        .map(|r| (r["id"].as_u64().unwrap(), r["ts_ms"].as_i64().unwrap()))
        .collect()
}

// ---- 1. connection modes ------------------------------------------------

/// The agent as `node-a` over `mode`: it comes online and delivers events,
/// every one schema-valid.
fn agent_delivers_over(mode: Mode) {
    let broker = Broker::start(mode).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flapper = Flapper::start(Duration::from_secs(1));
    let config = write_config(dir.path(), "node-a", &broker, flapper.port, "");
    let sub = Subscriber::connect(&broker, &[&format!("{PREFIX}/nodes/node-a/#")]).unwrap();
    let agent = Agent::start(&config, LogFormat::Text);
    let msgs = sub
        .wait_for(|m| online(m) && event_audit_ids(m).len() >= 2, WAIT)
        .unwrap_or_else(|e| panic!("{mode:?}: {e}\nagent log:\n{}", agent.log()));
    check_seqs(&msgs, "node-a", Gaps::NoneFromFirst);
    drop(flapper);
}

#[test]
fn the_agent_connects_plain_over_tls_and_with_password_and_acl() {
    let modes = [Mode::Plain, Mode::Tls, Mode::PasswordAcl];
    let threads: Vec<_> = modes
        .into_iter()
        .map(|m| (m, thread::spawn(move || agent_delivers_over(m))))
        .collect();
    for (mode, t) in threads {
        if t.join().is_err() {
            panic!("{mode:?} failed (see above)");
        }
    }
}

// ---- 2. a minute without the broker ------------------------------------

#[test]
fn a_minute_without_the_broker_loses_no_event_and_leaves_no_gap() {
    const NODE: &str = "outage-1";
    let mut broker = Broker::start(Mode::Plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flapper = Flapper::start(Duration::from_secs(1));
    let config = write_config(
        dir.path(),
        NODE,
        &broker,
        flapper.port,
        "summary_interval = \"5s\"\n",
    );
    let sub = kept_subscriber(&broker, NODE, "scenario");
    let agent = Agent::start(&config, LogFormat::Text);
    sub.wait_for(|m| online(m) && event_audit_ids(m).len() >= 2, WAIT)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));

    let down_ms = now_ms();
    broker.stop().unwrap();
    thread::sleep(Duration::from_secs(60));
    let up_ms = now_ms();
    broker.restart().unwrap();
    sub.wait_connections(2, WAIT).unwrap();
    // Let it catch up and produce a few more live, then stop the events and
    // take the node's own audit as the truth.
    thread::sleep(Duration::from_secs(6));
    drop(flapper);
    thread::sleep(Duration::from_secs(3));
    let audit = audit_rows(&config);
    let during: Vec<u64> = audit
        .iter()
        .filter(|(_, ts)| (down_ms..up_ms).contains(ts))
        .map(|(id, _)| *id)
        .collect();
    assert!(
        during.len() >= 15,
        "the agent wrote only {} audit rows in the minute the broker was down",
        during.len()
    );
    let all: BTreeSet<u64> = audit.iter().map(|(id, _)| *id).collect();
    let msgs = sub
        .wait_for(|m| event_audit_ids(m).is_superset(&all), WAIT)
        .unwrap_or_else(|e| panic!("missing events of audit rows {all:?}: {e}"));
    let seqs = check_seqs(&msgs, NODE, Gaps::NoneFromFirst);
    // Every event is in the node's seq space, and the outage's were queued,
    // not lost.
    let events = msgs.iter().map(json_of).filter(is_event).count();
    assert!(
        events >= all.len(),
        "{events} events for {} rows",
        all.len()
    );
    eprintln!(
        "outage: {} audit rows, {} during the minute down; seqs {}..={} ({} distinct), {} messages",
        all.len(),
        during.len(),
        seqs.first().unwrap(),
        seqs.last().unwrap(),
        seqs.len(),
        msgs.len()
    );
    drop(agent);
}

// ---- 3. kill -9 with a full outbox --------------------------------------

#[test]
fn events_queued_when_the_agent_is_killed_arrive_after_its_restart() {
    const NODE: &str = "killed-1";
    let mut broker = Broker::start(Mode::Plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flapper = Flapper::start(Duration::from_secs(1));
    let config = write_config(dir.path(), NODE, &broker, flapper.port, "");
    let sub = kept_subscriber(&broker, NODE, "scenario");
    let mut agent = Agent::start(&config, LogFormat::Text);
    sub.wait_for(online, WAIT)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));

    broker.stop().unwrap();
    let down_ms = now_ms();
    thread::sleep(Duration::from_secs(10));
    agent.kill9();
    let queued: BTreeSet<u64> = audit_rows(&config)
        .into_iter()
        .filter(|(_, ts)| *ts >= down_ms)
        .map(|(id, _)| id)
        .collect();
    assert!(
        queued.len() >= 3,
        "only {} audit rows while the broker was down",
        queued.len()
    );
    let before = sub.messages();
    assert!(
        event_audit_ids(&before).is_disjoint(&queued),
        "an event arrived while the broker was down"
    );

    broker.restart().unwrap();
    let agent = Agent::start(&config, LogFormat::Text);
    let msgs = sub
        .wait_for(|m| event_audit_ids(m).is_superset(&queued), WAIT)
        .unwrap_or_else(|e| {
            panic!(
                "the events queued before kill -9 ({queued:?}) did not arrive: {e}\nagent log:\n{}",
                agent.log()
            )
        });
    check_seqs(&msgs, NODE, Gaps::NoneFromFirst);
    drop(flapper);
}

// ---- 4. commands to the real agent --------------------------------------

/// A node with trusted key `public`, online on `broker`, and a subscriber
/// to its replies.
fn commanded_node(
    broker: &Broker,
    dir: &Path,
    node: &str,
    public: &str,
    port: u16,
) -> (Agent, PathBuf, Subscriber) {
    let config = write_config(
        dir,
        node,
        broker,
        port,
        &format!("\n[fleet]\ntrusted_keys = [\"{public}\"]\n"),
    );
    // Not `#`: the command topic carries what the tests publish.
    let topics: Vec<String> = ["state", "summary", "events", "reply"]
        .iter()
        .map(|leaf| format!("{PREFIX}/nodes/{node}/{leaf}"))
        .collect();
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    let sub = Subscriber::connect(broker, &topics).unwrap();
    let agent = Agent::start(&config, LogFormat::Text);
    sub.wait_for(online, WAIT)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    (agent, config, sub)
}

fn replies(msgs: &[Msg]) -> Vec<Value> {
    msgs.iter()
        .map(json_of)
        .filter(|v| v["type"] == "reply")
        .map(|v| v["body"].clone())
        .collect()
}

/// Publishes `payload` on the node's command topic and returns the one
/// new reply.
fn send(broker: &Broker, sub: &Subscriber, node: &str, payload: &[u8]) -> Value {
    let n = replies(&sub.messages()).len();
    publish(
        broker,
        &format!("{PREFIX}/nodes/{node}/cmd"),
        payload,
        false,
    )
    .unwrap();
    sub.wait_for(|m| replies(m).len() > n, WAIT)
        .expect("a reply");
    // Exactly one: a second would show up by now.
    thread::sleep(Duration::from_millis(300));
    let all = replies(&sub.messages());
    assert_eq!(all.len(), n + 1, "one reply per command: {all:?}");
    all[n].clone()
}

fn refused(reply: &Value, why: &str) {
    assert_eq!(reply["ok"], false, "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains(why), "the error should say {why:?}: {reply}");
}

#[test]
fn refused_commands_get_an_error_reply_and_change_nothing() {
    use outpost::fleet::{new_command, seal};
    use outpost::sync::envelope;
    const NODE: &str = "cmd-1";
    let broker = Broker::start(Mode::Plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (key_path, public) = keygen(dir.path(), "fleet.key");
    let key = envelope::read_key_file(&key_path).unwrap();
    let stranger = envelope::generate();
    let (agent, _config, sub) = commanded_node(&broker, dir.path(), NODE, &public, 9);
    let pause_file = dir.path().join("state/pause");
    let valid = Duration::from_secs(60);
    let pause = || new_command("pause", json!({"reason": "test"}), Some(NODE), valid);

    // A signed status executes.
    let status = new_command("status", json!({}), Some(NODE), valid);
    let r = send(&broker, &sub, NODE, &seal(&status, Some(&key)));
    assert_eq!(r["ok"], true, "{r}\nagent log:\n{}", agent.log());
    assert_eq!(r["request_id"], status.id.as_str());
    assert_eq!(r["result"]["node_id"], NODE);
    assert_eq!(r["result"]["paused"], false);

    // Unsigned.
    let c = pause();
    let r = send(&broker, &sub, NODE, &seal(&c, None));
    refused(&r, "unsigned");
    assert!(!pause_file.exists());

    // Expired.
    let mut c = pause();
    c.expires_ms = now_ms() - 60_000;
    let r = send(&broker, &sub, NODE, &seal(&c, Some(&key)));
    refused(&r, "expired");
    assert_eq!(r["request_id"], c.id.as_str());
    assert!(!pause_file.exists());

    // Signed by a key the node does not trust.
    let r = send(&broker, &sub, NODE, &seal(&pause(), Some(&stranger)));
    refused(&r, "trusted_keys");
    assert!(!pause_file.exists());

    // The trusted key, one body byte changed after signing.
    let sealed = seal(&pause(), Some(&key));
    let mut env: Value = serde_json::from_slice(&sealed).unwrap();
    let body = env["body"].as_str().unwrap().to_string();
    // The first base64 digit holds the top six bits of the first byte, `{`.
    assert!(body.starts_with('e'), "{body}");
    env["body"] = Value::String(format!("f{}", &body[1..]));
    let r = send(&broker, &sub, NODE, &serde_json::to_vec(&env).unwrap());
    refused(&r, "bad signature");
    assert!(!pause_file.exists());

    // Garbled: not JSON, and JSON that is not an envelope.
    let r = send(&broker, &sub, NODE, b"\x00\x01 not json at all");
    refused(&r, "not a command envelope");
    assert_eq!(r["request_id"], Value::Null);
    let r = send(&broker, &sub, NODE, br#"{"hello": "world"}"#);
    refused(&r, "not a command envelope");
    assert!(!pause_file.exists());

    // Replayed: a signed pause works once; resumed, the same bytes again
    // are refused and the node stays resumed.
    let p = pause();
    let bytes = seal(&p, Some(&key));
    let r = send(&broker, &sub, NODE, &bytes);
    assert_eq!(r["ok"], true, "{r}");
    assert!(pause_file.exists());
    let resume = new_command("resume", json!({}), Some(NODE), valid);
    let r = send(&broker, &sub, NODE, &seal(&resume, Some(&key)));
    assert_eq!(r["ok"], true, "{r}");
    assert!(!pause_file.exists());
    let r = send(&broker, &sub, NODE, &bytes);
    refused(&r, "replayed");
    assert_eq!(r["request_id"], p.id.as_str());
    assert!(!pause_file.exists());

    // After all that, a status still says not paused.
    let status = new_command("status", json!({}), Some(NODE), valid);
    let r = send(&broker, &sub, NODE, &seal(&status, Some(&key)));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["paused"], false);
    // Every reply was a schema-valid message of the node.
    check_seqs(&sub.messages(), NODE, Gaps::NoneFromFirst);
}

// ---- 5. push-model -------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/packages")
        .join(name)
}

/// `outpost model list --json`'s registry: each role's model as
/// `"name"@"version" on "target"`, and the shadow's digest.
fn models(config: &Path) -> Value {
    let out = Command::new(outpost())
        .args(["model", "list", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "outpost model list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let label = |e: &Value| {
        if e.is_null() {
            Value::Null
        } else {
            json!(format!("{}@{} on {}", e["name"], e["version"], e["target"]))
        }
    };
    let r = &v["registry"];
    json!({
        "active": label(&r["active"]),
        "shadow": label(&r["shadow"]),
        "previous": label(&r["previous"]),
        "shadow_sha256": r["shadow"]["sha256"],
    })
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["model.toml", "model.onnx"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

#[test]
fn push_model_installs_a_good_package_in_shadow_and_refuses_corrupt_ones() {
    const NODE: &str = "model-1";
    let broker = Broker::start(Mode::Plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keygen(dir.path(), "fleet.key");
    let key = key.to_str().unwrap().to_string();
    // The pca fixture reads host signals and target `web`'s probe latency:
    // keep that port open so the probe succeeds.
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = web.local_addr().unwrap().port();
    let (agent, config, _sub) = commanded_node(&broker, dir.path(), NODE, &public, port);
    assert_eq!(models(&config)["shadow"], Value::Null);

    let pca = fixture("pca");
    let out = fleet(
        &broker,
        &[
            "--key",
            &key,
            "push-model",
            NODE,
            pca.to_str().unwrap(),
            "--target",
            "web",
        ],
    );
    assert_eq!(
        out.code,
        0,
        "{}\n{}\nagent log:\n{}",
        out.stdout,
        out.stderr,
        agent.log()
    );
    assert!(out.stdout.contains(NODE), "{}", out.stdout);
    let installed = models(&config);
    assert_eq!(
        installed["shadow"], "\"fixture-pca\"@\"1\" on \"web\"",
        "{installed}"
    );
    assert_eq!(installed["active"], Value::Null);

    // Corrupt packages: model.onnx cut short, and a model.toml whose digest
    // does not match. Each refused by the node (exit 1, its error on the
    // node's line); the models stay as they were.
    let truncated = dir.path().join("truncated");
    copy_dir(&pca, &truncated);
    let onnx = std::fs::read(truncated.join("model.onnx")).unwrap();
    std::fs::write(truncated.join("model.onnx"), &onnx[..onnx.len() / 2]).unwrap();
    let wrong_digest = dir.path().join("wrong-digest");
    copy_dir(&pca, &wrong_digest);
    let toml = std::fs::read_to_string(wrong_digest.join("model.toml")).unwrap();
    let sha = toml
        .lines()
        .find_map(|l| l.strip_prefix("sha256 = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    std::fs::write(
        wrong_digest.join("model.toml"),
        toml.replace(&sha, &"0".repeat(64)),
    )
    .unwrap();
    for bad in [&truncated, &wrong_digest] {
        let out = fleet(
            &broker,
            &[
                "--key",
                &key,
                "push-model",
                NODE,
                bad.to_str().unwrap(),
                "--target",
                "web",
            ],
        );
        assert_eq!(
            out.code,
            1,
            "{}: {}\n{}",
            bad.display(),
            out.stdout,
            out.stderr
        );
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(NODE))
            .unwrap_or_else(|| panic!("no line for {NODE}: {}", out.stdout));
        assert!(
            line.contains("REFUSED") && line.contains("model package refused"),
            "{}",
            out.stdout
        );
        assert_eq!(models(&config), installed, "after {}", bad.display());
    }

    // A package as large as a node takes (8 MiB of tar) goes out with the
    // default --max-packet-kb and reaches the node, which reads it and
    // refuses it for what it is (not a model), not for its size.
    let big = dir.path().join("big");
    copy_dir(&pca, &big);
    std::fs::write(
        big.join("model.onnx"),
        vec![7u8; 8 * 1024 * 1024 - 8 * 1024],
    )
    .unwrap();
    let out = fleet(
        &broker,
        &[
            "--key",
            &key,
            "--timeout",
            "30s",
            "push-model",
            NODE,
            big.to_str().unwrap(),
        ],
    );
    assert_eq!(out.code, 1, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("model package refused") && !out.stdout.contains("NO ANSWER"),
        "{}\n{}\nagent log:\n{}",
        out.stdout,
        out.stderr,
        agent.log()
    );
    assert_eq!(models(&config), installed);
    drop(web);
}

// ---- 6. fleet watch ------------------------------------------------------

#[test]
fn fleet_watch_json_prints_the_agents_events_live() {
    const NODE: &str = "watched-1";
    let broker = Broker::start(Mode::Plain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flapper = Flapper::start(Duration::from_secs(1));
    let config = write_config(dir.path(), NODE, &broker, flapper.port, "");
    let sub = Subscriber::connect(&broker, &[&format!("{PREFIX}/nodes/{NODE}/#")]).unwrap();
    let agent = Agent::start(&config, LogFormat::Text);
    sub.wait_for(online, WAIT)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
    let start = Instant::now();
    let out = fleet(&broker, &["--json", "watch", "--for", "20s"]);
    let took = start.elapsed();
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(
        took >= Duration::from_secs(19) && took < Duration::from_secs(40),
        "watch ran {took:?}"
    );
    let lines: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    for v in &lines {
        assert_eq!(v["node"], NODE, "{v}");
        assert!(v["seq"].as_u64().is_some(), "{v}");
    }
    let events: Vec<&Value> = lines
        .iter()
        .filter(|v| {
            v["type"] == "event"
                && v["body"]["event"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("action.") || e.starts_with("incident."))
        })
        .collect();
    assert!(
        events.len() >= 3,
        "watch printed {} events in 20 s: {}",
        events.len(),
        out.stdout
    );
    // The same events the broker carried, live: each one the subscriber saw.
    let seen: BTreeSet<u64> = sub
        .messages()
        .iter()
        .filter_map(|m| m.json().ok()?["seq"].as_u64())
        .collect();
    for e in events {
        assert!(seen.contains(&e["seq"].as_u64().unwrap()), "{e}");
    }
    drop(flapper);
}
