//! The real outpost binary's MQTT uplink against a real mosquitto (mutual
//! TLS): what it publishes matches the JSON Schemas, the state is retained
//! and the last will marks it offline after kill -9, and `seq` carries on
//! across the restart (it is kept in the store).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_tests::mosquitto::{validate, Broker, Mode, Msg, Subscriber};
use serde_json::Value;

const NODE: &str = "e2e-uplink-1";
const WAIT: Duration = Duration::from_secs(20);

struct Agent(Child);

impl Agent {
    fn start(config: &Path) -> Agent {
        let bin = outpost_tests::nspawn::outpost_binary().expect("outpost binary");
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start outpost");
        Agent(child)
    }

    fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn schema(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../schemas/{name}.schema.json"))
}

fn json(m: &Msg) -> Value {
    m.json().expect("every message is JSON")
}

fn of_type<'a>(msgs: &'a [Msg], kind: &str) -> Vec<&'a Msg> {
    msgs.iter()
        .filter(|m| m.json().is_ok_and(|v| v["type"] == kind))
        .collect()
}

fn max_seq(msgs: &[Msg]) -> u64 {
    msgs.iter()
        .filter_map(|m| m.json().ok()?["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn uplink_publishes_valid_messages_and_seq_survives_kill_9() {
    let broker = Broker::start(Mode::MutualTls).expect("broker");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nnode_id = \"{NODE}\"\nstate_dir = \"{}\"\nsample_interval_ms = 200\n\n\
             [features]\nwindow = \"2s\"\nstep = \"1s\"\n\n{}summary_interval = \"1s\"\n\
             reconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n\n[fleet]\ngroup = \"hall-1\"\n",
            dir.path().join("state").display(),
            broker.mqtt_toml()
        ),
    )
    .expect("config");
    let sub = Subscriber::connect(&broker, &[&format!("outpost/v1/nodes/{NODE}/#")]).expect("sub");
    let mut agent = Agent::start(&config);

    let msgs = sub
        .wait_for(
            |m| {
                of_type(m, "summary").len() >= 2
                    && of_type(m, "state")
                        .iter()
                        .any(|s| json(s)["body"]["online"] == true)
            },
            WAIT,
        )
        .expect("state and summaries from the agent");
    for m in &msgs {
        let v = json(m);
        let kind = v["type"].as_str().expect("type").to_string();
        validate(schema(&kind), &v).unwrap_or_else(|e| panic!("{kind}: {e}\n{v:#}"));
        assert_eq!(v["node"], NODE);
        let level = m.topic.rsplit('/').next().expect("level");
        let expect = if kind == "event" {
            "events"
        } else {
            kind.as_str()
        };
        assert_eq!(level, expect, "{kind} on {}", m.topic);
    }
    let state = json(of_type(&msgs, "state")[0]);
    assert_eq!(state["body"]["group"], "hall-1");
    let seqs: Vec<u64> = msgs
        .iter()
        .filter_map(|m| json(m)["seq"].as_u64())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in seq order: {seqs:?}"
    );
    let before = max_seq(&sub.messages());

    // kill -9: the broker publishes the last will, a retained offline state.
    agent.kill9();
    let msgs = sub
        .wait_for(
            |m| of_type(m, "state").iter().any(|s| json(s)["seq"].is_null()),
            Duration::from_secs(60),
        )
        .expect("the last will after kill -9");
    let will = of_type(&msgs, "state")
        .into_iter()
        .map(json)
        .find(|v| v["seq"].is_null())
        .expect("will");
    assert_eq!(will["body"]["online"], false);
    validate(schema("state"), &will).expect("the will matches the state schema");

    // Restarted, the node carries on numbering where it stopped.
    let _agent = Agent::start(&config);
    let msgs = sub
        .wait_for(
            |m| {
                m.iter().any(|x| {
                    x.json().is_ok_and(|v| {
                        v["type"] == "state"
                            && v["body"]["online"] == true
                            && v["seq"].as_u64().is_some_and(|s| s > before)
                    })
                })
            },
            WAIT,
        )
        .expect("online again");
    let after: Vec<u64> = msgs
        .iter()
        .filter_map(|m| json(m)["seq"].as_u64())
        .filter(|s| *s > before)
        .collect();
    assert!(!after.is_empty());
    // A newcomer gets the retained state: the node is online.
    let late = Subscriber::connect(&broker, &[&format!("outpost/v1/nodes/{NODE}/state")])
        .expect("late subscriber");
    let retained = late
        .wait_for(|m| m.iter().any(|m| m.retain), WAIT)
        .expect("a retained state");
    let r = retained.iter().find(|m| m.retain).expect("retained");
    assert_eq!(json(r)["body"]["online"], true);
    assert!(
        after.iter().all(|s| *s > before),
        "seq went back after the restart: {before} then {after:?}"
    );
}
