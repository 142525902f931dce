//! Minimal read-only views of what nodes publish (PROTOCOL.md): only the
//! fields the CLI shows, so `nodes` reads 10,000 retained states quickly.

use serde::Deserialize;

use crate::sync::command::CommandReply;

/// A node's retained state message, as far as the table needs it.
#[derive(Debug, Deserialize)]
pub struct StateMsg {
    #[serde(default)]
    pub ts_ms: Option<i64>,
    #[serde(default)]
    pub body: Option<StateBody>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StateBody {
    #[serde(default)]
    pub online: bool,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub paused: Option<bool>,
    #[serde(default)]
    pub open_incidents: Option<u64>,
}

/// One row of `outpost fleet nodes`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeRow {
    pub node: String,
    pub online: bool,
    pub version: Option<String>,
    pub group: Option<String>,
    pub paused: Option<bool>,
    pub open_incidents: Option<u64>,
    pub last_seen_ms: Option<i64>,
}

/// `P/nodes/{node}/{leaf}` → node.
pub fn node_of<'a>(prefix: &str, topic: &'a str, leaf: &str) -> Option<&'a str> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix("/nodes/")?;
    let node = rest.strip_suffix(leaf)?.strip_suffix('/')?;
    (!node.is_empty() && !node.contains('/')).then_some(node)
}

/// A retained state payload into a row; `None` for an empty (cleared) or
/// unreadable one.
pub fn state_row(node: &str, payload: &[u8]) -> Option<NodeRow> {
    if payload.is_empty() {
        return None;
    }
    let m: StateMsg = serde_json::from_slice(payload).ok()?;
    let b = m.body.unwrap_or_default();
    Some(NodeRow {
        node: node.to_string(),
        online: b.online,
        version: b.version,
        group: b.group,
        paused: b.paused,
        open_incidents: b.open_incidents,
        last_seen_ms: m.ts_ms,
    })
}

/// A reply: the node's message envelope with a reply body, or (leniently)
/// a bare reply body.
pub fn reply_of(payload: &[u8]) -> Option<CommandReply> {
    #[derive(Deserialize)]
    struct Msg {
        #[serde(rename = "type")]
        kind: Option<String>,
        body: Option<CommandReply>,
    }
    if let Ok(Msg {
        kind,
        body: Some(body),
    }) = serde_json::from_slice::<Msg>(payload)
    {
        if kind.as_deref().is_none_or(|k| k == "reply") {
            return Some(body);
        }
        return None;
    }
    serde_json::from_slice::<CommandReply>(payload).ok()
}

/// Ages for people: `12s`, `4m`, `3h`, `2d`.
pub fn age(now_ms: i64, then_ms: i64) -> String {
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// The `nodes` table.
pub fn table(rows: &[NodeRow], now_ms: i64) -> String {
    use std::fmt::Write as _;
    let w = rows
        .iter()
        .map(|r| r.node.len())
        .max()
        .unwrap_or(4)
        .clamp(4, 48);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<w$}  {:<7}  {:<10}  {:<14}  {:>9}  LAST SEEN",
        "NODE", "ONLINE", "VERSION", "GROUP", "INCIDENTS"
    );
    for r in rows {
        let online = match (r.online, r.paused) {
            (false, _) => "no",
            (true, Some(true)) => "paused",
            (true, _) => "yes",
        };
        let _ = writeln!(
            out,
            "{:<w$}  {:<7}  {:<10}  {:<14}  {:>9}  {}",
            r.node,
            online,
            r.version.as_deref().unwrap_or("-"),
            r.group.as_deref().unwrap_or("-"),
            r.open_incidents.map_or("-".to_string(), |n| n.to_string()),
            r.last_seen_ms.map_or("-".to_string(), |t| age(now_ms, t)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_their_node() {
        assert_eq!(
            node_of("outpost/v1", "outpost/v1/nodes/press-7/state", "state"),
            Some("press-7")
        );
        assert_eq!(
            node_of("outpost/v1", "outpost/v1/nodes//state", "state"),
            None
        );
        assert_eq!(node_of("outpost/v1", "other/nodes/a/state", "state"), None);
        assert_eq!(
            node_of("outpost/v1", "outpost/v1/nodes/a/reply", "state"),
            None
        );
    }

    #[test]
    fn a_state_message_becomes_a_row_and_unknown_fields_are_skipped() {
        let m = br#"{"v":1,"type":"state","id":"x","seq":3,"node":"n1","ts_ms":1000,
            "body":{"online":true,"version":"0.1.0","started_ms":1,"uptime_s":2,
            "group":"hall","paused":false,"targets":[{"name":"web","kind":"systemd",
            "health":"ok","score":0.1}],"models":[],"open_incidents":2,
            "dropped":{"summaries":0,"events":0}}}"#;
        let r = state_row("n1", m).unwrap();
        assert!(r.online);
        assert_eq!(r.version.as_deref(), Some("0.1.0"));
        assert_eq!(r.group.as_deref(), Some("hall"));
        assert_eq!(r.open_incidents, Some(2));
        assert_eq!(r.last_seen_ms, Some(1000));
        // The last will: offline, seq null.
        let will = br#"{"v":1,"type":"state","id":"y","seq":null,"node":"n1","ts_ms":5,"body":{"online":false}}"#;
        assert!(!state_row("n1", will).unwrap().online);
        assert!(state_row("n1", b"").is_none());
        assert!(state_row("n1", b"garbage").is_none());
        let t = table(&[r], 61_000);
        assert!(
            t.contains("n1") && t.contains("yes") && t.contains("60s ago"),
            "{t}"
        );
    }

    #[test]
    fn replies_are_read_from_the_message_envelope_or_bare() {
        let m = br#"{"v":1,"type":"reply","id":"x","seq":4,"node":"n1","ts_ms":1,
            "body":{"request_id":"r1","ok":false,"error":"replayed"}}"#;
        let r = reply_of(m).unwrap();
        assert_eq!(r.request_id.as_deref(), Some("r1"));
        assert!(!r.ok);
        let bare = br#"{"request_id":"r2","ok":true}"#;
        assert!(reply_of(bare).unwrap().ok);
        let event = br#"{"v":1,"type":"event","body":{"request_id":"r1","ok":true}}"#;
        assert!(reply_of(event).is_none());
    }
}
