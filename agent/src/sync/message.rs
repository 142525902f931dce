//! What a node publishes (schemas/PROTOCOL.md): one envelope
//! ([`Message`]) around a body per message type, and the topics.

use serde::{Deserialize, Serialize};

/// The protocol version in every message (`v`).
pub const PROTOCOL_VERSION: u32 = 1;

/// The four kinds of message a node publishes (`type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    State,
    Summary,
    Event,
    Reply,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::State => "state",
            Kind::Summary => "summary",
            Kind::Event => "event",
            Kind::Reply => "reply",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "state" => Kind::State,
            "summary" => Kind::Summary,
            "event" => Kind::Event,
            "reply" => Kind::Reply,
            _ => return None,
        })
    }

    /// The last path level of this kind's topic.
    pub fn topic_level(self) -> &'static str {
        match self {
            Kind::State => "state",
            Kind::Summary => "summary",
            Kind::Event => "events",
            Kind::Reply => "reply",
        }
    }

    /// Only the state is retained.
    pub fn retained(self) -> bool {
        self == Kind::State
    }

    /// Which rows a full outbox gives up first (lowest first): summaries,
    /// then states, then replies, events last.
    pub fn drop_rank(self) -> u8 {
        match self {
            Kind::Summary => 0,
            Kind::State => 1,
            Kind::Reply => 2,
            Kind::Event => 3,
        }
    }
}

/// Topic names under a prefix (`[mqtt] topic_prefix`, no trailing `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub prefix: String,
    pub node: String,
}

impl Topics {
    pub fn new(prefix: &str, node: &str) -> Topics {
        Topics {
            prefix: prefix.trim_end_matches('/').to_string(),
            node: node.to_string(),
        }
    }
    /// `P/nodes/{node}/{state|summary|events|reply}`.
    pub fn outgoing(&self, kind: Kind) -> String {
        format!("{}/nodes/{}/{}", self.prefix, self.node, kind.topic_level())
    }
    pub fn state(&self) -> String {
        self.outgoing(Kind::State)
    }
    /// `P/nodes/{node}/cmd`.
    pub fn node_cmd(&self) -> String {
        format!("{}/nodes/{}/cmd", self.prefix, self.node)
    }
    /// `P/groups/{group}/cmd`.
    pub fn group_cmd(&self, group: &str) -> String {
        format!("{}/groups/{group}/cmd", self.prefix)
    }
    /// `P/fleet/cmd`.
    pub fn fleet_cmd(&self) -> String {
        format!("{}/fleet/cmd", self.prefix)
    }
    /// Which command scope a topic is, if it is one of this node's.
    pub fn scope_of(&self, topic: &str, group: Option<&str>) -> Option<super::command::Scope> {
        use super::command::Scope;
        if topic == self.node_cmd() {
            Some(Scope::Node)
        } else if topic == self.fleet_cmd() {
            Some(Scope::Fleet)
        } else {
            let g = group?;
            (topic == self.group_cmd(g)).then(|| Scope::Group(g.to_string()))
        }
    }
}

/// The envelope of every message a node publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub v: u32,
    #[serde(rename = "type")]
    pub kind: Kind,
    /// 32 lowercase hex characters, unique per message.
    pub id: String,
    /// `null` only in the last will (the broker publishes it).
    pub seq: Option<u64>,
    pub node: String,
    pub ts_ms: i64,
    pub body: serde_json::Value,
}

impl Message {
    pub fn new(
        kind: Kind,
        node: &str,
        seq: Option<u64>,
        ts_ms: i64,
        body: serde_json::Value,
    ) -> Self {
        Message {
            v: PROTOCOL_VERSION,
            kind,
            id: new_id(),
            seq,
            node: node.to_string(),
            ts_ms,
            body,
        }
    }

    /// The JSON bytes published.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

/// 128 random bits as 32 lowercase hex characters.
pub fn new_id() -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the full outbox dropped since the last state message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub summaries: u64,
    pub states: u64,
    pub replies: u64,
    pub events: u64,
}

impl Dropped {
    pub fn add(&mut self, kind: Kind, n: u64) {
        match kind {
            Kind::Summary => self.summaries += n,
            Kind::State => self.states += n,
            Kind::Reply => self.replies += n,
            Kind::Event => self.events += n,
        }
    }
    pub fn total(&self) -> u64 {
        self.summaries + self.states + self.replies + self.events
    }
}

/// A target in a state message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateTarget {
    pub name: String,
    pub kind: String,
    /// `up`, `down`.
    pub health: String,
    /// The latest anomaly score, when a detector scores the target.
    pub score: Option<f32>,
}

/// A loaded model in a state message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateModel {
    pub label: String,
    pub role: String,
    pub target: String,
}

/// `type = "state"`: retained on `P/nodes/{node}/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateBody {
    pub online: bool,
    pub version: String,
    pub started_ms: i64,
    pub uptime_s: u64,
    pub group: Option<String>,
    pub paused: bool,
    pub targets: Vec<StateTarget>,
    pub models: Vec<StateModel>,
    pub open_incidents: u64,
    /// Filled in by the outbox when the message is written.
    pub dropped: Dropped,
}

impl StateBody {
    /// The last will: the same shape, `online: false`.
    pub fn offline(version: &str, started_ms: i64, group: Option<String>) -> StateBody {
        StateBody {
            online: false,
            version: version.to_string(),
            started_ms,
            uptime_s: 0,
            group,
            paused: false,
            targets: Vec::new(),
            models: Vec::new(),
            open_incidents: 0,
            dropped: Dropped::default(),
        }
    }

    /// Whether two states differ in something an operator watches (not
    /// uptime or drop counts).
    pub fn changed_from(&self, other: &StateBody) -> bool {
        self.online != other.online
            || self.group != other.group
            || self.paused != other.paused
            || self.version != other.version
            || self.open_incidents != other.open_incidents
            || self.models != other.models
            || self.targets.len() != other.targets.len()
            || self
                .targets
                .iter()
                .zip(&other.targets)
                .any(|(a, b)| a.name != b.name || a.health != b.health)
    }
}

/// A target in a summary. Summaries are most of a node's bytes on the wire
/// (one a minute), so what carries no information is left out: a zero
/// `failing_samples`, and scores beyond three decimals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryTarget {
    pub name: String,
    /// Health at the end of the interval: `up` or `down`.
    pub health: String,
    pub samples: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failing_samples: u64,
    #[serde(serialize_with = "three_decimals")]
    pub score_mean: Option<f64>,
    #[serde(serialize_with = "three_decimals")]
    pub score_max: Option<f64>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A score in [0, 1] to three decimals: `0.412`, not `0.41234567890123456`.
fn three_decimals<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(x) if x.is_finite() => s.serialize_some(&((x * 1000.0).round() / 1000.0)),
        Some(_) | None => s.serialize_none(),
    }
}

/// Counts over a summary interval; left out of the summary when all zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryCounts {
    pub incidents_opened: u64,
    pub incidents_closed: u64,
    pub actions: u64,
    pub events: u64,
    pub commands: u64,
}

/// `type = "summary"` on `P/nodes/{node}/summary`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryBody {
    pub interval_s: u64,
    pub targets: Vec<SummaryTarget>,
    #[serde(default, skip_serializing_if = "SummaryCounts::is_zero")]
    pub counts: SummaryCounts,
}

impl SummaryCounts {
    pub fn is_zero(&self) -> bool {
        *self == SummaryCounts::default()
    }
}

/// The `event` names (PROTOCOL.md).
pub mod events {
    pub const INCIDENT_OPENED: &str = "incident.opened";
    pub const INCIDENT_UPDATED: &str = "incident.updated";
    pub const INCIDENT_CLOSED: &str = "incident.closed";
    pub const ACTION_PROPOSED: &str = "action.proposed";
    pub const ACTION_AWAITING_APPROVAL: &str = "action.awaiting_approval";
    pub const ACTION_APPROVED: &str = "action.approved";
    pub const ACTION_DENIED: &str = "action.denied";
    pub const ACTION_EXPIRED: &str = "action.expired";
    pub const ACTION_EXECUTED: &str = "action.executed";
    pub const ACTION_VERIFIED: &str = "action.verified";
    pub const ACTION_FAILED: &str = "action.failed";
    pub const ACTION_SUPPRESSED: &str = "action.suppressed";
    pub const ACTION_ESCALATED: &str = "action.escalated";
    pub const MODEL_INSTALLED: &str = "model.installed";
    pub const MODEL_PROMOTED: &str = "model.promoted";
    pub const MODEL_ROLLED_BACK: &str = "model.rolled_back";
    pub const CONFIG_APPLIED: &str = "config.applied";
    pub const CONFIG_REFUSED: &str = "config.refused";
    pub const STORE_RECOVERED: &str = "store.recovered";
}

/// `type = "event"` on `P/nodes/{node}/events`: `event` and its fields,
/// flat in one object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    pub event: String,
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl EventBody {
    pub fn new(event: &str, fields: serde_json::Value) -> EventBody {
        let fields = match fields {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                let mut m = serde_json::Map::new();
                m.insert("value".into(), other);
                m
            }
        };
        EventBody {
            event: event.to_string(),
            fields,
        }
    }

    /// The event for an audit row (`None` for a decision with no event).
    pub fn from_audit(row: &crate::store::audit::AuditRow) -> Option<EventBody> {
        use events::*;
        let e = &row.entry;
        let name = match e.decision.as_str() {
            "suggested" => ACTION_PROPOSED,
            "awaiting_approval" => ACTION_AWAITING_APPROVAL,
            "approved" => ACTION_APPROVED,
            "denied" => ACTION_DENIED,
            "expired" => ACTION_EXPIRED,
            "acted" => ACTION_EXECUTED,
            "verify_ok" => ACTION_VERIFIED,
            "action_failed" | "verify_failed" => ACTION_FAILED,
            "suppressed" => ACTION_SUPPRESSED,
            "escalated" => ACTION_ESCALATED,
            _ => return None,
        };
        let mut f = serde_json::json!({
            "audit_id": row.id,
            "decision_id": e.decision_id,
            "rule": e.rule,
            "target": e.target,
            "action": e.action,
            "decision": e.decision,
            "reason": e.reason,
            "detail": e.detail,
        });
        if name == ACTION_SUPPRESSED {
            // The guard that held the action back, in the operator's words.
            f["guard"] = serde_json::Value::String(e.reason.clone());
        }
        Some(EventBody::new(name, f))
    }

    /// `incident.opened` / `incident.closed` for an incident row.
    pub fn incident(name: &str, inc: &crate::store::audit::Incident) -> EventBody {
        EventBody::new(
            name,
            serde_json::json!({
                "incident_id": inc.id,
                "target": inc.target,
                "opened_ms": inc.opened_ms,
                "closed_ms": inc.closed_ms,
                "score": inc.score,
                "explanation": inc.explanation,
            }),
        )
    }
}

/// `type = "reply"`: the command handler's reply.
pub type ReplyBody = super::command::CommandReply;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_and_scopes() {
        use crate::sync::command::Scope;
        let t = Topics::new("outpost/v1/", "n1");
        assert_eq!(t.outgoing(Kind::Event), "outpost/v1/nodes/n1/events");
        assert_eq!(t.state(), "outpost/v1/nodes/n1/state");
        assert_eq!(
            t.scope_of("outpost/v1/nodes/n1/cmd", None),
            Some(Scope::Node)
        );
        assert_eq!(t.scope_of("outpost/v1/fleet/cmd", None), Some(Scope::Fleet));
        assert_eq!(
            t.scope_of("outpost/v1/groups/g/cmd", Some("g")),
            Some(Scope::Group("g".into()))
        );
        assert_eq!(t.scope_of("outpost/v1/groups/h/cmd", Some("g")), None);
        assert_eq!(t.scope_of("outpost/v1/nodes/n2/cmd", None), None);
    }

    #[test]
    fn envelope_shape() {
        let m = Message::new(Kind::Summary, "n1", Some(7), 5, serde_json::json!({}));
        let v: serde_json::Value =
            serde_json::from_slice(&m.to_bytes().expect("json")).expect("parse");
        assert_eq!(v["v"], 1);
        assert_eq!(v["type"], "summary");
        assert_eq!(v["seq"], 7);
        let id = v["id"].as_str().expect("id");
        assert_eq!(id.len(), 32);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(id, new_id());
    }

    #[test]
    fn event_body_is_flat() {
        let e = EventBody::new("model.promoted", serde_json::json!({"label": "m@1"}));
        let v = serde_json::to_value(&e).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"event": "model.promoted", "label": "m@1"})
        );
    }
}

#[cfg(test)]
mod summary_size_tests {
    use super::*;

    fn target(name: &str, failing: u64, mean: Option<f64>, max: Option<f64>) -> SummaryTarget {
        SummaryTarget {
            name: name.into(),
            health: "up".into(),
            samples: 60,
            failing_samples: failing,
            score_mean: mean,
            score_max: max,
        }
    }

    #[test]
    fn summaries_leave_out_what_says_nothing() {
        let body = SummaryBody {
            interval_s: 60,
            targets: vec![
                target("web", 0, Some(0.412_345_678_901_234_5), Some(0.987_654_321)),
                target("db", 3, None, Some(f64::NAN)),
            ],
            counts: SummaryCounts::default(),
        };
        let v = serde_json::to_value(&body).expect("json");
        assert!(
            v.get("counts").is_none(),
            "all-zero counts are left out: {v}"
        );
        let web = &v["targets"][0];
        assert!(web.get("failing_samples").is_none(), "{web}");
        assert_eq!(web["score_mean"], serde_json::json!(0.412));
        assert_eq!(web["score_max"], serde_json::json!(0.988));
        let db = &v["targets"][1];
        assert_eq!(db["failing_samples"], serde_json::json!(3));
        assert!(
            db["score_mean"].is_null() && db["score_max"].is_null(),
            "{db}"
        );

        // What is left out reads back as zero.
        let back: SummaryBody = serde_json::from_value(v).expect("reads back");
        assert_eq!(back.counts, SummaryCounts::default());
        assert_eq!(back.targets[0].failing_samples, 0);

        // Counts that say something are kept.
        let mut busy = back.clone();
        busy.counts.actions = 2;
        let v = serde_json::to_value(&busy).expect("json");
        assert_eq!(v["counts"]["actions"], serde_json::json!(2));
    }

    #[test]
    fn a_five_target_summary_fits_the_daily_byte_budget() {
        // 1 MB/day at one summary a minute leaves ~690 B per summary on the
        // wire; the payload must stay well inside that with 5 targets.
        let body = SummaryBody {
            interval_s: 60,
            targets: (0..5)
                .map(|i| {
                    target(
                        &format!("target-{i}"),
                        0,
                        Some(0.123_456_7),
                        Some(0.456_789_1),
                    )
                })
                .collect(),
            counts: SummaryCounts::default(),
        };
        let msg = Message::new(
            Kind::Summary,
            "press-line-7",
            Some(123_456),
            1_765_000_000_000,
            serde_json::to_value(&body).expect("json"),
        );
        let bytes = msg.to_bytes().expect("bytes");
        assert!(
            bytes.len() <= 600,
            "{} B: {}",
            bytes.len(),
            String::from_utf8_lossy(&bytes)
        );
    }
}
