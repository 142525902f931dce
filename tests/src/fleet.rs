//! The fleet side of the whole-system tests: `outpost fleet` run against a
//! real mosquitto, its signing keys, and checks over what a subscriber got
//! from a node (online, `action.*` events, seq without gaps).

// Test helpers fail loudly.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::agent::{outpost, schema};
use crate::mosquitto::{validate, Broker, ClientOpts, Msg, Subscriber};

/// The topic prefix of protocol v1.
pub const PREFIX: &str = "outpost/v1";

/// What a CLI run printed, and its exit code (-1 when killed).
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// `outpost --log-format text fleet --broker URL ARGS...`.
pub fn fleet(broker: &Broker, args: &[&str]) -> Out {
    let out = Command::new(outpost())
        .args(["--log-format", "text", "fleet", "--broker"])
        .arg(broker.url())
        .args(args)
        .output()
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `outpost fleet keygen --out DIR/NAME`, which must succeed: the key file
/// and the public key line it prints.
pub fn keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = Command::new(outpost())
        .args(["fleet", "keygen", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        path,
        String::from_utf8(out.stdout).unwrap().trim().to_string(),
    )
}

/// Some message is a `state` with `online: true`.
pub fn online(msgs: &[Msg]) -> bool {
    msgs.iter().any(|m| {
        m.json()
            .is_ok_and(|v| v["type"] == "state" && v["body"]["online"] == true)
    })
}

/// The `event` messages among `msgs`.
pub fn events_of(msgs: &[Msg]) -> Vec<Value> {
    msgs.iter()
        .filter_map(|m| m.json().ok())
        .filter(|v| v["type"] == "event")
        .collect()
}

/// The audit ids of the `action.*` events among `msgs`.
pub fn event_audit_ids(msgs: &[Msg]) -> BTreeSet<u64> {
    events_of(msgs)
        .iter()
        .filter(|v| {
            v["body"]["event"]
                .as_str()
                .unwrap_or("")
                .starts_with("action.")
        })
        .filter_map(|v| v["body"]["audit_id"].as_u64())
        .collect()
}

/// Which gaps in seq [`check_seqs`] refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gaps {
    /// None checked.
    Allowed,
    /// None from the first seq received to the last.
    NoneFromFirst,
    /// None from 1 (the first message the node ever queued) to the last.
    NoneFromOne,
}

/// Checks what a subscriber got from one node: every message is JSON that
/// matches its schema and names the node; a seq seen twice is the same
/// message (same id); first copies arrive in seq order; and no gap of
/// `gaps`. Returns the distinct seqs.
pub fn check_seqs(msgs: &[Msg], node: &str, gaps: Gaps) -> BTreeSet<u64> {
    let mut by_seq: BTreeMap<u64, Value> = BTreeMap::new();
    let mut first_order = Vec::new();
    for m in msgs {
        let v = m.json().expect("every message is JSON");
        let kind = v["type"].as_str().unwrap().to_string();
        validate(schema(&kind), &v).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(v["node"], node);
        let Some(seq) = v["seq"].as_u64() else {
            continue; // the last will
        };
        match by_seq.get(&seq) {
            Some(seen) => assert_eq!(seen["id"], v["id"], "seq {seq} names two messages"),
            None => {
                first_order.push(seq);
                by_seq.insert(seq, v);
            }
        }
    }
    assert!(
        first_order.windows(2).all(|w| w[0] < w[1]),
        "not in seq order: {first_order:?}"
    );
    let seqs: BTreeSet<u64> = by_seq.into_keys().collect();
    match gaps {
        Gaps::Allowed => {}
        Gaps::NoneFromFirst => {
            let (lo, hi) = (*seqs.first().unwrap(), *seqs.last().unwrap());
            let missing: Vec<u64> = (lo..=hi).filter(|s| !seqs.contains(s)).collect();
            assert!(missing.is_empty(), "gaps in seq {lo}..={hi}: {missing:?}");
        }
        Gaps::NoneFromOne => {
            let hi = *seqs.last().unwrap();
            let missing: Vec<u64> = (1..=hi).filter(|s| !seqs.contains(s)).collect();
            assert!(missing.is_empty(), "seqs missing in 1..={hi}: {missing:?}");
        }
    }
    seqs
}

/// Client options for a session the broker keeps (clean session off, a
/// stable client id `TAG-NODE-PID`), so nothing published while the
/// subscriber is away is lost.
pub fn kept_session_opts(broker: &Broker, node: &str, tag: &str) -> ClientOpts {
    let mut opts = broker
        .client()
        .with_id(&format!("{tag}-{node}-{}", std::process::id()));
    opts.clean_session = false;
    opts
}

/// A subscriber to everything `node` publishes, on a kept session (see
/// [`kept_session_opts`]).
pub fn kept_subscriber(broker: &Broker, node: &str, tag: &str) -> Subscriber {
    let opts = kept_session_opts(broker, node, tag);
    Subscriber::connect_with(broker, &opts, &[&format!("{PREFIX}/nodes/{node}/#")]).unwrap()
}
