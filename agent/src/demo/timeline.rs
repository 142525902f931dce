//! The demo's timeline: what was injected, and what the agent and the
//! fleet did about it, each stage taken from the agent's own records (the
//! audit trail and incidents in its store, its live status on the control
//! socket) or from what the fleet subscriber received, never assumed.

use std::fmt::Write as _;
use std::io::Write as _;

use crate::collect::TargetStatus;
use crate::store::audit::{AuditRow, Incident};

use super::fleet::FleetMessage;
use super::supervisor::ServiceEvent;

/// The demo target's name in the generated config.
pub const TARGET: &str = "svc";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Hang,
    Leak,
    Spin,
}

impl FaultKind {
    pub const ALL: [FaultKind; 3] = [FaultKind::Hang, FaultKind::Leak, FaultKind::Spin];

    pub fn label(self) -> &'static str {
        match self {
            FaultKind::Hang => "hang",
            FaultKind::Leak => "leak",
            FaultKind::Spin => "spin",
        }
    }

    /// The demo service's endpoint that injects it.
    pub fn path(self) -> &'static str {
        match self {
            FaultKind::Hang => "/fault/hang",
            FaultKind::Leak => "/fault/leak",
            FaultKind::Spin => "/fault/spin",
        }
    }

    /// The rule in the generated config that handles it.
    pub fn rule(self) -> &'static str {
        match self {
            FaultKind::Hang => "svc-hung",
            FaultKind::Leak => "svc-leak",
            FaultKind::Spin => "svc-spin",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            FaultKind::Hang => "the service stops answering /healthz",
            FaultKind::Leak => "the service's memory grows by tens of MiB",
            FaultKind::Spin => "the service burns a whole core",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Injected,
    Detected,
    Decided,
    Acted,
    Verified,
    Reported,
}

impl Stage {
    const ALL: [Stage; 6] = [
        Stage::Injected,
        Stage::Detected,
        Stage::Decided,
        Stage::Acted,
        Stage::Verified,
        Stage::Reported,
    ];

    fn label(self) -> &'static str {
        match self {
            Stage::Injected => "injected",
            Stage::Detected => "detected",
            Stage::Decided => "decided",
            Stage::Acted => "acted",
            Stage::Verified => "verified",
            Stage::Reported => "reported",
        }
    }
}

/// One stage as seen: when (Unix ms), whether it went well, what it said.
#[derive(Debug, Clone)]
struct Seen {
    ts_ms: i64,
    ok: bool,
    text: String,
}

/// One injected fault and what happened to it.
#[derive(Debug)]
pub struct FaultRun {
    pub kind: FaultKind,
    stages: [Option<Seen>; 6],
    /// Stages printed so far (in order).
    printed: usize,
    /// Event types the fleet received about it.
    upstream_events: Vec<String>,
    /// The agent gave up on it (verification failed, escalated).
    gave_up: bool,
}

impl FaultRun {
    fn stage(&self, s: Stage) -> Option<&Seen> {
        self.stages[s as usize].as_ref()
    }

    fn set(&mut self, s: Stage, seen: Seen) {
        let slot = &mut self.stages[s as usize];
        if slot.is_none() {
            *slot = Some(seen);
        }
    }

    fn injected_ms(&self) -> i64 {
        self.stage(Stage::Injected).map_or(0, |s| s.ts_ms)
    }

    fn after(&self, s: Stage) -> Option<f64> {
        self.stage(s)
            .filter(|x| x.ok)
            .map(|x| (x.ts_ms - self.injected_ms()).max(0) as f64 / 1000.0)
    }

    pub fn detected(&self) -> bool {
        self.stage(Stage::Detected).is_some()
    }

    pub fn remediated(&self) -> bool {
        self.stage(Stage::Acted).is_some_and(|s| s.ok)
            && self.stage(Stage::Verified).is_some_and(|s| s.ok)
    }

    /// The fleet received the event that the fix was verified.
    pub fn reported(&self) -> bool {
        self.stage(Stage::Reported).is_some_and(|s| s.ok)
    }

    /// The fleet received the event of the agent's last word on it.
    pub fn report_settled(&self) -> bool {
        self.stage(Stage::Reported).is_some()
    }

    /// The agent is done with it: verified, or it gave up, or the action failed.
    pub fn settled(&self) -> bool {
        self.stage(Stage::Verified).is_some()
            || self.gave_up
            || self.stage(Stage::Acted).is_some_and(|s| !s.ok)
    }
}

/// The timeline: prints as it learns, keeps what the summary needs.
pub struct Timeline {
    /// Unix ms the demo started; every line's time is relative to it.
    pub start_ms: i64,
    pub node: String,
    pub faults: Vec<FaultRun>,
    /// Decisions of rules while another fault was being handled, or before
    /// any: shown, never counted.
    pub other_decisions: usize,
    state_seen: bool,
    upstream_messages: usize,
    /// Lines not printed yet: (time, order of arrival, line). Sources
    /// report with different delays (the store is polled, the service
    /// manager reports at once), so lines wait [`PRINT_LAG_MS`] and go out
    /// in time order.
    pending: Vec<(i64, u64, String)>,
    arrivals: u64,
}

/// How long a line waits for earlier ones from slower sources.
pub const PRINT_LAG_MS: i64 = 400;

impl Timeline {
    pub fn new(start_ms: i64, node: &str) -> Self {
        Timeline {
            start_ms,
            node: node.to_string(),
            faults: Vec::new(),
            other_decisions: 0,
            state_seen: false,
            upstream_messages: 0,
            pending: Vec::new(),
            arrivals: 0,
        }
    }

    /// Queues one timeline line.
    pub fn line(&mut self, ts_ms: i64, what: &str, text: &str) {
        let t = (ts_ms - self.start_ms).max(0) as f64 / 1000.0;
        self.queue(ts_ms, format!("{t:>7.2}s  {what:<9} {text}"));
    }

    /// Queues a heading, placed at `ts_ms`.
    pub fn heading(&mut self, ts_ms: i64, text: &str) {
        self.queue(ts_ms, format!("── {text}"));
    }

    fn queue(&mut self, ts_ms: i64, line: String) {
        self.arrivals += 1;
        self.pending.push((ts_ms, self.arrivals, line));
    }

    /// Prints the queued lines older than `now_ms - PRINT_LAG_MS` (all of
    /// them with `None`), in time order.
    pub fn print_ready(&mut self, now_ms: Option<i64>) {
        self.pending.sort_by_key(|(ts, n, _)| (*ts, *n));
        let cut = match now_ms {
            Some(now) => self
                .pending
                .iter()
                .position(|(ts, _, _)| *ts > now - PRINT_LAG_MS)
                .unwrap_or(self.pending.len()),
            None => self.pending.len(),
        };
        if cut == 0 {
            return;
        }
        let mut out = std::io::stdout().lock();
        for (_, _, line) in self.pending.drain(..cut) {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    fn active(&mut self) -> Option<&mut FaultRun> {
        self.faults.last_mut().filter(|f| !f.done_printing())
    }

    pub fn current(&self) -> Option<&FaultRun> {
        self.faults.last()
    }

    /// A fault was injected at `ts_ms`.
    pub fn injected(&mut self, kind: FaultKind, ts_ms: i64, answer: &str) {
        let n = self.faults.len() + 1;
        self.heading(
            ts_ms,
            &format!(
                "fault {n}/{}: {} ({})",
                FaultKind::ALL.len(),
                kind.label(),
                kind.describe()
            ),
        );
        let mut run = FaultRun {
            kind,
            stages: Default::default(),
            printed: 0,
            upstream_events: Vec::new(),
            gave_up: false,
        };
        run.set(
            Stage::Injected,
            Seen {
                ts_ms,
                ok: true,
                text: format!("GET {} → {}", kind.path(), answer.trim()),
            },
        );
        self.faults.push(run);
        self.flush();
    }

    /// The agent's live status (control socket).
    pub fn on_live(&mut self, targets: &[TargetStatus]) {
        let Some(run) = self.active() else {
            return;
        };
        if run.kind != FaultKind::Hang || run.detected() {
            return;
        }
        let injected = run.injected_ms();
        let failed = targets
            .iter()
            .find(|t| t.name == TARGET)
            .and_then(|t| t.probe.as_ref())
            .filter(|p| !p.ok && p.ts_ms >= injected);
        if let Some(p) = failed {
            run.set(
                Stage::Detected,
                Seen {
                    ts_ms: p.ts_ms,
                    ok: true,
                    text: format!(
                        "agent's probe of {TARGET} failed: {}",
                        p.error.as_deref().unwrap_or("no answer")
                    ),
                },
            );
            self.flush();
        }
    }

    /// An incident the agent opened.
    pub fn on_incident(&mut self, inc: &Incident) {
        let rule = inc.explanation["rule"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let reason = inc.explanation["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let action = inc.explanation["action"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        let mode = inc.explanation["mode"].as_str().unwrap_or("?").to_string();
        let matched = self
            .active()
            .filter(|r| r.kind.rule() == rule && inc.opened_ms >= r.injected_ms());
        match matched {
            Some(run) => {
                // The engine's reason: "CONDITION for PERSIST: WHAT (BUDGET)".
                let (held, what) = reason
                    .split_once(": ")
                    .map_or((reason.as_str(), action.as_str()), |(h, w)| (h, w));
                run.set(
                    Stage::Detected,
                    Seen {
                        ts_ms: inc.opened_ms,
                        ok: true,
                        text: format!("incident #{} on {}: {held}", inc.id, inc.target),
                    },
                );
                run.set(
                    Stage::Decided,
                    Seen {
                        ts_ms: inc.opened_ms,
                        ok: true,
                        text: format!("rule {rule} ({mode} mode): {what}"),
                    },
                );
                self.flush();
            }
            None => {
                self.other_decisions += 1;
                let what = if rule.is_empty() {
                    format!("incident #{} on {} (detector)", inc.id, inc.target)
                } else {
                    format!("incident #{} rule {rule}: {reason}", inc.id)
                };
                self.line(inc.opened_ms, "agent", &what);
            }
        }
    }

    /// A row of the agent's audit trail.
    pub fn on_audit(&mut self, row: &AuditRow) {
        let e = &row.entry;
        let rule = e.rule.clone().unwrap_or_default();
        let Some(run) = self
            .active()
            .filter(|r| r.kind.rule() == rule && e.ts_ms >= r.injected_ms())
        else {
            // A fault already closed still has its rule's later rows (an
            // escalation, say); they are its story, not another decision.
            if !self.faults.iter().any(|f| f.kind.rule() == rule) {
                self.other_decisions += 1;
            }
            self.line(
                e.ts_ms,
                "agent",
                &format!("rule {rule}: {} {} — {}", e.decision, e.action, e.reason),
            );
            return;
        };
        let summary = e
            .reason
            .rsplit(" — ")
            .next()
            .unwrap_or(&e.reason)
            .to_string();
        let output = e.detail["output"]
            .as_str()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| format!(": {}", s.lines().next().unwrap_or_default()))
            .unwrap_or_default();
        match e.decision.as_str() {
            "acted" | "action_failed" => run.set(
                Stage::Acted,
                Seen {
                    ts_ms: e.ts_ms,
                    ok: e.decision == "acted",
                    text: format!("audit #{}: {summary}{output}", row.id),
                },
            ),
            "verify_ok" | "verify_failed" => run.set(
                Stage::Verified,
                Seen {
                    ts_ms: e.ts_ms,
                    ok: e.decision == "verify_ok",
                    text: format!("audit #{}: {}", row.id, e.reason),
                },
            ),
            "escalated" => {
                run.gave_up = true;
                self.line(
                    e.ts_ms,
                    "agent",
                    &format!("audit #{}: escalated: {}", row.id, e.reason),
                );
            }
            other => {
                self.line(
                    e.ts_ms,
                    "agent",
                    &format!("audit #{}: {other}: {}", row.id, e.reason),
                );
            }
        }
        self.flush();
    }

    /// A message the fleet subscriber received.
    pub fn on_fleet(&mut self, m: &FleetMessage) {
        self.upstream_messages += 1;
        let kind = m.body["type"].as_str().unwrap_or("?");
        let seq = m.body["seq"]
            .as_i64()
            .map_or(String::new(), |s| format!(" seq {s}"));
        if m.topic.ends_with("/state") {
            if !self.state_seen {
                self.state_seen = true;
                let online = m.body["body"]["online"].as_bool().unwrap_or(false);
                self.line(
                    m.received_ms,
                    "fleet",
                    &format!(
                        "node {} is {} (retained state{seq} on {})",
                        m.body["node"].as_str().unwrap_or("?"),
                        if online { "online" } else { "offline" },
                        m.topic
                    ),
                );
            }
            return;
        }
        if !m.topic.ends_with("/events") {
            return;
        }
        let event = m.body["body"]["event"]
            .as_str()
            .or_else(|| m.body["event"].as_str())
            .unwrap_or(kind)
            .to_string();
        let text = m.body.to_string();
        let Some(run) = self.active().filter(|r| {
            m.received_ms >= r.injected_ms() && text.contains(&format!("\"{}\"", r.kind.rule()))
        }) else {
            return;
        };
        run.upstream_events.push(event.clone());
        // The fleet knows the fault is handled when it gets the
        // verification's event; what came before is shown as it arrives.
        let outcome = match event.as_str() {
            "action.verified" => Some(true),
            "action.failed" => Some(false),
            _ => None,
        };
        match outcome {
            Some(ok) => {
                run.set(
                    Stage::Reported,
                    Seen {
                        ts_ms: m.received_ms,
                        ok,
                        text: format!("fleet received {event}{seq} on {}", m.topic),
                    },
                );
                self.flush();
            }
            None => self.line(m.received_ms, "fleet", &format!("received {event}{seq}")),
        }
    }

    pub fn on_service(&mut self, ts_ms: i64, e: &ServiceEvent) {
        let text = match e {
            ServiceEvent::Started { pid } => format!("demo service running, pid {pid}"),
            ServiceEvent::Exited { pid, how } => format!("pid {pid} {how}"),
            ServiceEvent::StopRequested { pid: Some(pid) } => {
                format!("stop requested for pid {pid} (by outpost demo-stop)")
            }
            ServiceEvent::StopRequested { pid: None } => {
                "stop requested while the service was down".to_string()
            }
        };
        self.line(ts_ms, "service", &text);
    }

    /// Prints the active fault's stages that are known, in order.
    fn flush(&mut self) {
        let Some(run) = self.faults.last_mut() else {
            return;
        };
        let mut lines = Vec::new();
        while run.printed < Stage::ALL.len() {
            let s = Stage::ALL[run.printed];
            match run.stage(s) {
                Some(seen) => {
                    let mark = if seen.ok { "" } else { "FAILED: " };
                    lines.push((seen.ts_ms, s.label(), format!("{mark}{}", seen.text)));
                    run.printed += 1;
                }
                None => break,
            }
        }
        for (ts, what, text) in lines {
            self.line(ts, what, &text);
        }
    }

    /// Prints what is missing for the active fault and closes it.
    pub fn close_fault(&mut self, now_ms: i64) {
        self.flush();
        let Some(run) = self.faults.last_mut() else {
            return;
        };
        let mut lines = Vec::new();
        let mut prev_ts = Stage::ALL[..run.printed]
            .iter()
            .filter_map(|s| run.stage(*s).map(|x| x.ts_ms))
            .max()
            .unwrap_or(now_ms);
        while run.printed < Stage::ALL.len() {
            let s = Stage::ALL[run.printed];
            let text = match run.stage(s) {
                Some(seen) => format!("{}{}", if seen.ok { "" } else { "FAILED: " }, seen.text),
                None if s == Stage::Verified && run.stage(Stage::Acted).is_some_and(|a| !a.ok) => {
                    "NOT SEEN: nothing to verify, the action failed".to_string()
                }
                None => "NOT SEEN".to_string(),
            };
            // A missing stage goes right after the last one seen, so the
            // time order keeps the stage order.
            let ts = run.stage(s).map_or(prev_ts, |x| x.ts_ms);
            prev_ts = ts;
            lines.push((ts, s.label(), text));
            run.printed += 1;
        }
        for (ts, what, text) in lines {
            self.line(ts, what, &text);
        }
    }

    /// Whether every fault was injected, detected, remediated, verified and
    /// reported upstream.
    pub fn passed(&self, expected: usize) -> bool {
        self.faults.len() == expected
            && self
                .faults
                .iter()
                .all(|f| f.detected() && f.remediated() && f.reported())
    }

    /// The summary table and the verdict.
    pub fn summary(&self, expected: usize) -> String {
        let secs = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.2}s"));
        let mut s = String::new();
        let _ = writeln!(s, "\nsummary (node {})", self.node);
        let _ = writeln!(
            s,
            "{}",
            row([
                "fault",
                "detected after",
                "remediated after",
                "verified",
                "reported upstream"
            ])
        );
        for f in &self.faults {
            let verified = match f.stage(Stage::Verified) {
                Some(v) if v.ok => format!("yes {}", secs(f.after(Stage::Verified))),
                Some(_) => "FAILED".to_string(),
                None => "no".to_string(),
            };
            let reported = if f.reported() {
                let mut events = f.upstream_events.clone();
                events.dedup();
                format!("yes ({})", events.join(", "))
            } else if f.upstream_events.is_empty() {
                "NO".to_string()
            } else {
                format!("NO (only {})", f.upstream_events.join(", "))
            };
            let detected = if f.detected() {
                secs(f.after(Stage::Detected))
            } else {
                "NOT DETECTED".to_string()
            };
            let remediated = if f.stage(Stage::Acted).is_some_and(|a| a.ok) {
                secs(f.after(Stage::Acted))
            } else {
                "NOT REMEDIATED".to_string()
            };
            let _ = writeln!(
                s,
                "{}",
                row([f.kind.label(), &detected, &remediated, &verified, &reported])
            );
        }
        for k in FaultKind::ALL.iter().skip(self.faults.len()) {
            let _ = writeln!(s, "  {:<6} not injected", k.label());
        }
        if self.other_decisions > 0 {
            let _ = writeln!(
                s,
                "  ({} decisions of the agent outside the injected faults, shown above as `agent` lines)",
                self.other_decisions
            );
        }
        let ok = self.passed(expected);
        let handled = self
            .faults
            .iter()
            .filter(|f| f.detected() && f.remediated())
            .count();
        let _ = write!(
            s,
            "result: {} — {handled} of {expected} faults detected and remediated",
            if ok { "PASS" } else { "FAIL" }
        );
        let reported = self.faults.iter().filter(|f| f.reported()).count();
        let _ = write!(
            s,
            ", {reported} reported upstream ({} messages received by the fleet)",
            self.upstream_messages
        );
        s
    }
}

/// One row of the summary table.
fn row(cols: [&str; 5]) -> String {
    let [fault, detected, remediated, verified, reported] = cols;
    format!("  {fault:<6} {detected:<15} {remediated:<18} {verified:<10} {reported}")
}

impl FaultRun {
    fn done_printing(&self) -> bool {
        self.printed >= Stage::ALL.len()
    }
}
