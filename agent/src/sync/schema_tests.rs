//! Every message type, as the real code produces it, against its JSON
//! Schema in `schemas/`.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::command::{Command, CommandReply};
use super::message::*;
use crate::store::audit::{AuditEntry, AuditRow, Incident};
use crate::store::outbox::{self, OutboxConfig};

fn schema(name: &str) -> jsonschema::Validator {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas")
        .join(format!("{name}.schema.json"));
    let text = std::fs::read_to_string(&path).expect("schema file");
    let v: Value = serde_json::from_str(&text).expect("schema json");
    jsonschema::draft202012::new(&v).expect("compiles")
}

#[track_caller]
fn valid(name: &str, v: &Value) {
    let s = schema(name);
    let errors: Vec<String> = s.iter_errors(v).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{name}: {errors:?}\n{v:#}");
}

#[track_caller]
fn invalid(name: &str, v: &Value) {
    assert!(!schema(name).is_valid(v), "{name} accepted {v:#}");
}

/// Messages as the outbox writes them (seq, id, dropped filled in).
fn through_outbox(kind: Kind, body: Value) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = crate::store::schema::open_rw(&dir.path().join("a.db")).expect("open");
    let cfg = OutboxConfig::new("outpost/v1", "press-line-7", 100);
    outbox::enqueue_one(&c, &cfg, kind, 1_765_000_000_000, body).expect("enqueue");
    let rows = outbox::pending(&c, 0, 1).expect("pending");
    serde_json::from_slice(&rows[0].payload).expect("json")
}

fn audit_row(decision: &str, reason: &str) -> AuditRow {
    AuditRow {
        id: 7,
        entry: AuditEntry {
            ts_ms: 1,
            decision_id: 3,
            rule: Some("web-hung".into()),
            target: "web".into(),
            action: "restart".into(),
            decision: decision.into(),
            reason: reason.into(),
            detail: json!({"attempt": 1}),
        },
        prev_hash: String::new(),
        hash: String::new(),
    }
}

#[test]
fn state_and_last_will_match_the_schema() {
    let mut s = StateBody::offline("0.1.0", 5, Some("hall-2".into()));
    s.online = true;
    s.targets.push(StateTarget {
        name: "web".into(),
        kind: "systemd".into(),
        health: "up".into(),
        score: Some(0.3),
    });
    s.models.push(StateModel {
        label: "m@1".into(),
        role: "active".into(),
        target: "web".into(),
    });
    let msg = through_outbox(Kind::State, serde_json::to_value(&s).expect("json"));
    valid("state", &msg);
    let will = Message::new(
        Kind::State,
        "press-line-7",
        None,
        1,
        serde_json::to_value(StateBody::offline("0.1.0", 5, None)).expect("json"),
    );
    valid("state", &serde_json::to_value(&will).expect("json"));
    // The schema is not a rubber stamp.
    let mut broken = msg.clone();
    broken["body"]["targets"][0]["health"] = json!("fine");
    invalid("state", &broken);
    let mut broken = msg;
    broken["id"] = json!("ABC");
    invalid("state", &broken);
}

#[test]
fn summary_matches_the_schema() {
    let tel = super::view::Telemetry::default();
    tel.observe(
        &[crate::collect::TargetStatus {
            name: "web".into(),
            kind: "systemd".into(),
            state: "active/running".into(),
            up: true,
            probe: None,
            detail: None,
        }],
        &[("web".into(), 0.4)],
    );
    let body = SummaryBody {
        interval_s: 60,
        targets: tel.take(),
        counts: SummaryCounts {
            incidents_opened: 1,
            ..SummaryCounts::default()
        },
    };
    let msg = through_outbox(Kind::Summary, serde_json::to_value(&body).expect("json"));
    valid("summary", &msg);
    let mut broken = msg;
    broken["body"]["interval_s"] = json!(-1);
    invalid("summary", &broken);
}

#[test]
fn events_match_the_schema() {
    let mut bodies: Vec<EventBody> = [
        ("suggested", "rule says suggest"),
        ("awaiting_approval", "mode approve"),
        ("acted", "restarted"),
        ("verify_ok", "probe ok"),
        ("verify_failed", "probe still failing"),
        ("suppressed", "cooldown: 42s left"),
        ("denied", "denied by fleet"),
    ]
    .iter()
    .map(|(d, r)| EventBody::from_audit(&audit_row(d, r)).expect("event"))
    .collect();
    let inc = Incident {
        id: 1,
        target: "web".into(),
        opened_ms: 10,
        closed_ms: None,
        score: 0.9,
        explanation: json!({"detector": "baseline", "top": ["cpu=9 (normal 1..2)"]}),
    };
    bodies.push(EventBody::incident(events::INCIDENT_OPENED, &inc));
    bodies.push(EventBody::incident(
        events::INCIDENT_CLOSED,
        &Incident {
            closed_ms: Some(20),
            ..inc
        },
    ));
    bodies.push(EventBody::new(
        events::MODEL_PROMOTED,
        json!({"label": "m@2", "by": "auto", "why": "shadow ok"}),
    ));
    bodies.push(EventBody::new(
        events::CONFIG_REFUSED,
        json!({"source": "/etc/outpost/outpost.toml", "error": "x.toml:1:1: k: bad"}),
    ));
    bodies.push(EventBody::new(
        events::CONFIG_APPLIED,
        json!({"source": "x"}),
    ));
    for b in bodies {
        let msg = through_outbox(Kind::Event, serde_json::to_value(&b).expect("json"));
        valid("event", &msg);
    }
    let suppressed = EventBody::from_audit(&audit_row("suppressed", "rate")).expect("event");
    let mut v = through_outbox(
        Kind::Event,
        serde_json::to_value(&suppressed).expect("json"),
    );
    v["body"].as_object_mut().expect("obj").remove("guard");
    invalid("event", &v);
    invalid(
        "event",
        &through_outbox(Kind::Event, json!({"event": "incident.exploded"})),
    );
}

#[test]
fn replies_match_the_schema() {
    let ok = CommandReply {
        request_id: Some("r1".into()),
        ok: true,
        error: None,
        result: Some(json!({"paused": true})),
    };
    let err = CommandReply {
        request_id: None,
        ok: false,
        error: Some("signature does not verify".into()),
        result: None,
    };
    for r in [&ok, &err] {
        valid(
            "reply",
            &through_outbox(Kind::Reply, serde_json::to_value(r).expect("json")),
        );
    }
    invalid(
        "reply",
        &through_outbox(Kind::Reply, json!({"request_id": "r", "ok": false})),
    );
}

#[test]
fn commands_and_envelopes_match_the_schema() {
    let key = super::envelope::generate();
    let cmds = [
        json!({"id": "a", "cmd": "approve", "args": {"action": 4}, "expires_ms": 1, "nonce": "n1"}),
        json!({"id": "b", "cmd": "run", "args": {"target": "web", "do": "restart"}, "expires_ms": 1, "nonce": "n2", "node": "press-line-7"}),
        json!({"id": "c", "cmd": "config.apply", "args": {"toml": "", "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}, "expires_ms": 1, "nonce": "n3", "max_concurrency": 5, "group_size": 40, "slot_ms": 30000}),
        json!({"id": "d", "cmd": "status", "args": {}, "expires_ms": 1, "nonce": "n4"}),
    ];
    for c in &cmds {
        // The handler's own type reads it, and the schema accepts it.
        let parsed: Command = serde_json::from_value(c.clone()).expect("command");
        valid("command", &serde_json::to_value(&parsed).expect("json"));
        let bytes = serde_json::to_vec(c).expect("bytes");
        for env in [
            super::envelope::sign(&bytes, &key),
            super::envelope::Envelope::unsigned(&bytes),
        ] {
            let v: Value = serde_json::from_slice(&env.to_json()).expect("json");
            valid("command-envelope", &v);
        }
    }
    invalid(
        "command",
        &json!({"id": "x", "cmd": "format-disk", "expires_ms": 1, "nonce": "n"}),
    );
    invalid(
        "command",
        &json!({"id": "x", "cmd": "run", "args": {"target": "web", "do": "rm -rf"}, "expires_ms": 1, "nonce": "n"}),
    );
    invalid(
        "command-envelope",
        &json!({"v": 1, "body": "AA==", "key": "ed25519:AA=="}),
    );
}
