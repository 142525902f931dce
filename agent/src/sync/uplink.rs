//! The uplink: one MQTT connection per node, driven by the store's outbox.
//!
//! Two tasks. The event-loop task owns rumqttc's `EventLoop`: it polls,
//! forwards events, and after an error sleeps with jittered exponential
//! backoff (rumqttc itself retries at once, forever). The uplink task owns
//! everything else: it publishes outbox rows in seq order with at most
//! [`WINDOW`] unacknowledged, maps packet ids to seqs (rumqttc reports the
//! packet id of each publish, in the order the publishes were handed to
//! it), deletes a row on its PUBACK, and after a reconnect republishes
//! every row still in the outbox from the lowest seq. rumqttc's own
//! in-memory retransmission queue is cleared on every disconnect: it is
//! lost on restart anyway, and two replay mechanisms would publish twice.
//!
//! A gate (a mutex around "may publish") keeps the two tasks honest: the
//! event-loop task closes it and clears rumqttc's queue under the lock, so
//! no publish from before a disconnect is left to be sent after it.
//!
//! The event-loop task also keeps the uplink's state ([`UplinkState`]:
//! connecting, connected, or down with a kind and a reason such as
//! "stalled: no CONNACK within 5s") in a watch channel and in the log: one
//! line when the state changes, a reminder while it stays down. The backoff
//! is reset only once a connection has proved itself (the broker answered
//! something after its CONNACK), so a broker that accepts and then stalls,
//! or refuses every login, is retried ever more slowly, not at
//! `reconnect_min` forever. The password file is read again before every
//! reconnect: an operator who rotates it needs no restart.
//!
//! The uplink also writes the node's own messages: the state (retained) on
//! connect and when it changes, a summary every `summary_interval`, replies
//! to commands. Detection and remediation never wait on any of it: they
//! write to the store, which wakes the publisher.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, LastWill, MqttOptions, Outgoing,
    Packet, QoS, StateError, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::command::{CommandReply, Scope};
use super::message::{Kind, Message, StateBody, SummaryBody, Topics};
use crate::config::{MqttConfig, Secret};
use crate::store::outbox::OutboxConfig;
use crate::store::{Store, StoreError};

/// Most outbox rows published and not yet acknowledged.
pub const WINDOW: usize = 32;
/// Acknowledged seqs are deleted in batches of this many (or every
/// [`ACK_FLUSH_EVERY`]).
const ACK_BATCH: usize = 64;
const ACK_FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How often the state is compared with the last one published.
const STATE_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Commands handled at the same time; more wait.
const MAX_CONCURRENT_COMMANDS: usize = 4;
/// Shutdown: how long the offline state may take to be acknowledged.
const SHUTDOWN_PUBLISH: Duration = Duration::from_millis(400);
/// How long one connection attempt may take: TCP connect, TLS handshake,
/// CONNECT and its CONNACK. A broker that accepts the connection and never
/// answers is given up on after this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// While the uplink stays down for the same reason, the log repeats it this
/// often (each attempt is logged at debug).
const DOWN_REMINDER: Duration = Duration::from_secs(60);

/// Why the uplink is down, in a word an operator can grep for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownKind {
    /// Nothing answers at the address (refused, no route, DNS).
    Unreachable,
    /// The broker took the connection and then stopped answering: no
    /// CONNACK, no PINGRESP, or a write that never drains.
    Stalled,
    /// The broker refused the username or password (CONNACK 4 or 5).
    AuthRefused,
    /// The broker refused the connection for another reason (CONNACK 1-3).
    Refused,
    /// The broker sent bytes that are not MQTT, or a packet over the limit.
    Protocol,
    /// The broker closed or reset the connection.
    Closed,
    /// The TLS handshake failed.
    Tls,
}

impl DownKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DownKind::Unreachable => "unreachable",
            DownKind::Stalled => "stalled",
            DownKind::AuthRefused => "auth refused",
            DownKind::Refused => "refused",
            DownKind::Protocol => "protocol error",
            DownKind::Closed => "closed",
            DownKind::Tls => "tls error",
        }
    }
}

impl fmt::Display for DownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The uplink's connection as the node sees it ([`Uplink::state`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkState {
    /// The first attempt is under way.
    Connecting,
    /// The broker sent its CONNACK.
    Connected,
    /// The last attempt failed or the connection was lost; the next attempt
    /// is `retry_in` after the failure.
    Down {
        kind: DownKind,
        reason: String,
        /// Failures since the connection was last healthy.
        failures: u32,
        retry_in: Duration,
    },
}

impl fmt::Display for UplinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UplinkState::Connecting => f.write_str("connecting"),
            UplinkState::Connected => f.write_str("connected"),
            UplinkState::Down { kind, reason, .. } => write!(f, "{kind}: {reason}"),
        }
    }
}

/// What a connection error means for the operator: its kind and a reason
/// that names the limit it hit. `keepalive` is the configured one.
pub fn classify(e: &ConnectionError, keepalive: Duration) -> (DownKind, String) {
    match e {
        ConnectionError::NetworkTimeout => (
            DownKind::Stalled,
            format!(
                "no CONNACK within {}s of connecting",
                CONNECT_TIMEOUT.as_secs()
            ),
        ),
        ConnectionError::FlushTimeout => (
            DownKind::Stalled,
            format!(
                "a write to the broker did not drain within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        ),
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => (
                DownKind::AuthRefused,
                "bad username or password (CONNACK 4); check mqtt.username and mqtt.password_file"
                    .to_string(),
            ),
            ConnectReturnCode::NotAuthorized => (
                DownKind::AuthRefused,
                "not authorized (CONNACK 5); check mqtt.username and mqtt.password_file"
                    .to_string(),
            ),
            other => (
                DownKind::Refused,
                format!("the broker refused the connection ({other:?})"),
            ),
        },
        ConnectionError::NotConnAck(p) => (
            DownKind::Protocol,
            format!("expected a CONNACK, got a {}", packet_name(p)),
        ),
        ConnectionError::MqttState(s) => classify_state(s, keepalive),
        ConnectionError::Io(io) => classify_io(io),
        ConnectionError::Tls(t) => (DownKind::Tls, t.to_string()),
        ConnectionError::RequestsDone => (DownKind::Closed, "the uplink is stopping".to_string()),
    }
}

fn classify_state(s: &StateError, keepalive: Duration) -> (DownKind, String) {
    use rumqttc::mqttbytes::Error as Bytes;
    match s {
        StateError::AwaitPingResp => (
            DownKind::Stalled,
            format!(
                "no PINGRESP within one keepalive ({}s)",
                keepalive.as_secs()
            ),
        ),
        StateError::ConnectionAborted => (
            DownKind::Closed,
            "the broker closed the connection".to_string(),
        ),
        StateError::Io(io) | StateError::Deserialization(Bytes::Io(io)) => classify_io(io),
        StateError::Deserialization(Bytes::PayloadSizeLimitExceeded(n)) => (
            DownKind::Protocol,
            format!("the broker announced a packet of {n} bytes, over mqtt.max_packet_kb"),
        ),
        StateError::Deserialization(d) => (
            DownKind::Protocol,
            format!("malformed packet from the broker: {d}"),
        ),
        other => (
            DownKind::Protocol,
            format!("unexpected packet from the broker: {other}"),
        ),
    }
}

fn classify_io(io: &std::io::Error) -> (DownKind, String) {
    use std::io::ErrorKind as K;
    match io.kind() {
        K::ConnectionRefused => (DownKind::Unreachable, "connection refused".to_string()),
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => (
            DownKind::Closed,
            format!("the broker dropped the connection ({io})"),
        ),
        _ => (DownKind::Unreachable, io.to_string()),
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// The broker password as `mqtt.password_file` holds it now. Read again
/// before every reconnect, so a rotated password is used without a
/// restart; while the file cannot be read, the last good password stays.
pub struct PasswordFile {
    username: String,
    mqtt: MqttConfig,
    current: Option<Secret>,
    unreadable: bool,
}

impl PasswordFile {
    /// `None` without `mqtt.username` and `mqtt.password_file`.
    pub fn new(m: &MqttConfig) -> Option<PasswordFile> {
        let username = m.username.clone()?;
        m.password_file.as_ref()?;
        Some(PasswordFile {
            username,
            mqtt: m.clone(),
            current: m.password().ok().flatten(),
            unreadable: false,
        })
    }

    /// Reads the file; `Some((username, password))` when the password
    /// changed since the last read.
    pub fn refresh(&mut self) -> Option<(String, Secret)> {
        let path = self.mqtt.password_file.clone().unwrap_or_default();
        match self.mqtt.password() {
            Ok(Some(pw)) => {
                if self.unreadable {
                    tracing::info!(path = %path.display(), "mqtt.password_file is readable again");
                    self.unreadable = false;
                }
                if self.current.as_ref() == Some(&pw) {
                    return None;
                }
                tracing::info!(
                    path = %path.display(),
                    "mqtt.password_file changed; the next connection uses the new password"
                );
                self.current = Some(pw.clone());
                Some((self.username.clone(), pw))
            }
            Ok(None) => None,
            Err(e) => {
                if !self.unreadable {
                    tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "cannot read mqtt.password_file; reconnecting with the last password read"
                    );
                    self.unreadable = true;
                }
                None
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("mqtt.password_file {}: {source}", path.display())]
    Password {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mqtt TLS: {0}")]
    Tls(#[from] super::tls::TlsError),
    #[error("mqtts:// needs mqtt.ca_file")]
    NoCa,
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// What the uplink of one node needs; the daemon builds it from its config,
/// the fleet simulator builds thousands.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node: String,
    pub group: Option<String>,
    pub version: String,
    pub started_ms: i64,
    pub mqtt: MqttConfig,
}

impl NodeConfig {
    pub fn from_config(cfg: &crate::config::Config, mqtt: &MqttConfig, started_ms: i64) -> Self {
        NodeConfig {
            node: cfg.agent.node_id.clone(),
            group: cfg.fleet.group.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_ms,
            mqtt: mqtt.clone(),
        }
    }

    pub fn topics(&self) -> Topics {
        Topics::new(&self.mqtt.topic_prefix, &self.node)
    }
}

/// Where the uplink reads the node's state and summaries from.
pub trait NodeView: Send + Sync + 'static {
    /// The state now (`online: true`; `dropped` is filled by the outbox).
    fn state(&self) -> StateBody;
    /// The summary of the interval that just ended; resets the interval.
    /// `counts` is filled in by the uplink.
    fn summary(&self, interval: Duration) -> SummaryBody;
}

/// Handles one command payload; `None`: nothing to reply.
pub type CommandHandler = Arc<
    dyn Fn(Scope, Vec<u8>) -> Pin<Box<dyn Future<Output = Option<CommandReply>> + Send>>
        + Send
        + Sync,
>;

/// The MQTT options for a node: stable client id, persistent session,
/// keepalive, retained last will (offline state), packet limits, TLS.
pub fn mqtt_options(node: &NodeConfig) -> Result<MqttOptions, SyncError> {
    let m = &node.mqtt;
    let mut o = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.port);
    o.set_keep_alive(m.keepalive);
    o.set_clean_session(false);
    o.set_max_packet_size(m.max_packet_bytes, m.max_packet_bytes);
    o.set_inflight(WINDOW as u16);
    o.set_request_channel_capacity(WINDOW + 8);
    let will = Message::new(
        Kind::State,
        &node.node,
        None,
        crate::store::now_ms(),
        serde_json::to_value(StateBody::offline(
            &node.version,
            node.started_ms,
            node.group.clone(),
        ))?,
    );
    o.set_last_will(LastWill::new(
        node.topics().state(),
        will.to_bytes()?,
        QoS::AtLeastOnce,
        true,
    ));
    if let Some(user) = &m.username {
        let pw = m.password().map_err(|source| SyncError::Password {
            path: m.password_file.clone().unwrap_or_default(),
            source,
        })?;
        o.set_credentials(
            user.clone(),
            pw.map(|p| p.expose().to_string()).unwrap_or_default(),
        );
    }
    if m.tls {
        let ca = m.ca_file.as_deref().ok_or(SyncError::NoCa)?;
        let auth = m
            .client_auth
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let tls = super::tls::client_config(ca, auth)?;
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    Ok(o)
}

/// One node's uplink, ready to run.
pub struct Uplink {
    node: NodeConfig,
    store: Store,
    options: MqttOptions,
    connected_tx: watch::Sender<bool>,
    connected_rx: watch::Receiver<bool>,
    state_tx: watch::Sender<UplinkState>,
    state_rx: watch::Receiver<UplinkState>,
}

impl Uplink {
    /// Checks the TLS files and the password now (so a bad one fails at
    /// start) and turns the store's outbox on.
    pub fn new(node: NodeConfig, store: Store) -> Result<Uplink, SyncError> {
        let options = mqtt_options(&node)?;
        store.configure_outbox(Some(OutboxConfig::new(
            &node.mqtt.topic_prefix,
            &node.node,
            node.mqtt.outbox_max_rows,
        )));
        let (connected_tx, connected_rx) = watch::channel(false);
        let (state_tx, state_rx) = watch::channel(UplinkState::Connecting);
        Ok(Uplink {
            node,
            store,
            options,
            connected_tx,
            connected_rx,
            state_tx,
            state_rx,
        })
    }

    /// Whether the broker connection is up (for `config.apply`, status).
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected_rx.clone()
    }

    /// The connection's state and, when down, why (for status).
    pub fn state(&self) -> watch::Receiver<UplinkState> {
        self.state_rx.clone()
    }

    /// Runs until `shutdown`; then publishes an offline state (briefly) and
    /// disconnects.
    pub async fn run(
        self,
        view: Arc<dyn NodeView>,
        commands: Option<CommandHandler>,
        shutdown: CancellationToken,
    ) {
        let Uplink {
            node,
            store,
            options,
            connected_tx,
            state_tx,
            ..
        } = self;
        let (client, mut eventloop) = AsyncClient::new(options, WINDOW + 8);
        eventloop
            .network_options
            .set_connection_timeout(CONNECT_TIMEOUT.as_secs());
        let gate = Arc::new(Mutex::new(false));
        let (ev_tx, ev_rx) = mpsc::channel(256);
        // Not a child of `shutdown`: the event loop must outlive the uplink
        // task long enough to send the offline state and the DISCONNECT.
        let loop_token = CancellationToken::new();
        let backoff = Backoff::new(node.mqtt.reconnect_min, node.mqtt.reconnect_max);
        let el = tokio::spawn(event_loop(
            eventloop,
            LoopCtx {
                backoff,
                gate: gate.clone(),
                tx: ev_tx,
                token: loop_token.clone(),
                node: node.node.clone(),
                keepalive: node.mqtt.keepalive,
                password: PasswordFile::new(&node.mqtt),
                state: state_tx,
            },
        ));
        let mut task = Task {
            topics: node.topics(),
            node,
            store,
            client,
            gate,
            connected: false,
            connected_tx,
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            next_from: 0,
            acked: Vec::new(),
            more: true,
            last_state: None,
            commands,
            command_slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_COMMANDS)),
            commands_seen: 0,
            view,
        };
        task.run(ev_rx, &shutdown).await;
        loop_token.cancel();
        let _ = el.await;
    }
}

/// What the event-loop task tells the uplink task.
enum LoopEvent {
    Connected { session_present: bool },
    Lost,
    Mqtt(Event),
}

/// What the event-loop task works with besides rumqttc's `EventLoop`.
struct LoopCtx {
    backoff: Backoff,
    gate: Arc<Mutex<bool>>,
    tx: mpsc::Sender<LoopEvent>,
    token: CancellationToken,
    node: String,
    keepalive: Duration,
    password: Option<PasswordFile>,
    state: watch::Sender<UplinkState>,
}

async fn event_loop(mut eventloop: rumqttc::EventLoop, ctx: LoopCtx) {
    let LoopCtx {
        mut backoff,
        gate,
        tx,
        token,
        node,
        keepalive,
        mut password,
        state,
    } = ctx;
    let close_gate = |eventloop: &mut rumqttc::EventLoop| {
        let mut g = gate.lock().unwrap_or_else(|p| p.into_inner());
        *g = false;
        // Drop rumqttc's replay queue and whatever was still in its request
        // channel: the outbox republishes them.
        eventloop.clean();
        eventloop.pending.clear();
    };
    // The last (kind, reason) logged, and when.
    let mut last_logged: Option<(DownKind, String, Instant)> = None;
    let mut lost_at: Option<Instant> = None;
    // CONNACK came, nothing else yet: the backoff is reset only once the
    // broker answers something more, so one that accepts and then stalls
    // or drops every connection is retried ever more slowly.
    let mut unproven = false;
    loop {
        let polled = tokio::select! {
            _ = token.cancelled() => return,
            p = eventloop.poll() => p,
        };
        let out = match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                unproven = true;
                *gate.lock().unwrap_or_else(|p| p.into_inner()) = true;
                tracing::info!(
                    node = %node,
                    session_present = ack.session_present,
                    down_ms = lost_at.take().map(|t| t.elapsed().as_millis() as u64),
                    state = "connected",
                    "mqtt connected"
                );
                last_logged = None;
                let _ = state.send(UplinkState::Connected);
                LoopEvent::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(ev) => {
                if unproven && matches!(ev, Event::Incoming(_)) {
                    unproven = false;
                    backoff.reset();
                }
                LoopEvent::Mqtt(ev)
            }
            Err(e) => {
                close_gate(&mut eventloop);
                unproven = false;
                let (kind, reason) = classify(&e, keepalive);
                let delay = backoff.next_delay();
                // One line per kind of failure and a reminder while it
                // lasts, not one per attempt.
                let repeat = last_logged.as_ref().is_some_and(|(k, r, at)| {
                    *k == kind && *r == reason && at.elapsed() < DOWN_REMINDER
                });
                if repeat {
                    tracing::debug!(node = %node, state = %kind, reason = %reason, error = %e, retry_in_ms = delay.as_millis() as u64, failures = backoff.failures(), "mqtt retry");
                } else {
                    tracing::warn!(
                        node = %node,
                        state = %kind,
                        reason = %reason,
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        failures = backoff.failures(),
                        "mqtt uplink down ({kind}: {reason}); retrying with backoff"
                    );
                    last_logged = Some((kind, reason.clone(), Instant::now()));
                }
                let _ = state.send(UplinkState::Down {
                    kind,
                    reason,
                    failures: backoff.failures(),
                    retry_in: delay,
                });
                lost_at.get_or_insert_with(Instant::now);
                if tx.send(LoopEvent::Lost).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                // Anything published between the error and now is dropped
                // too; the uplink task republishes after the ConnAck.
                close_gate(&mut eventloop);
                if let Some((user, pw)) = password.as_mut().and_then(PasswordFile::refresh) {
                    eventloop
                        .mqtt_options
                        .set_credentials(user, pw.expose().to_string());
                }
                continue;
            }
        };
        if tx.send(out).await.is_err() {
            return;
        }
    }
}

struct Task {
    node: NodeConfig,
    topics: Topics,
    store: Store,
    client: AsyncClient,
    gate: Arc<Mutex<bool>>,
    connected: bool,
    connected_tx: watch::Sender<bool>,
    /// Seqs handed to rumqttc, waiting for their packet id.
    fifo: VecDeque<u64>,
    /// Packet id -> seq, waiting for the PUBACK.
    inflight: HashMap<u16, u64>,
    /// The lowest seq not yet handed to rumqttc in this connection.
    next_from: u64,
    /// Acknowledged, not yet deleted.
    acked: Vec<u64>,
    /// The outbox may hold rows from `next_from` on (set by the store's
    /// wake-up and on connect; cleared when a read comes back short), so
    /// an idle node does not query the store on every keepalive.
    more: bool,
    last_state: Option<StateBody>,
    commands: Option<CommandHandler>,
    command_slots: Arc<tokio::sync::Semaphore>,
    commands_seen: u64,
    view: Arc<dyn NodeView>,
}

impl Task {
    async fn run(&mut self, mut events: mpsc::Receiver<LoopEvent>, shutdown: &CancellationToken) {
        let notify = self.store.outbox_notify();
        let mut summary = tokio::time::interval_at(
            tokio::time::Instant::now() + self.node.mqtt.summary_interval,
            self.node.mqtt.summary_interval,
        );
        summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first state goes out on connect; from then on, on change.
        let check_every = STATE_CHECK_EVERY.min(self.node.mqtt.summary_interval);
        let mut state_check =
            tokio::time::interval_at(tokio::time::Instant::now() + check_every, check_every);
        state_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ack_flush = tokio::time::interval(ACK_FLUSH_EVERY);
        ack_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut summary_started = Instant::now();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => break,
                },
                _ = notify.notified() => self.more = true,
                _ = ack_flush.tick() => self.flush_acks().await,
                _ = state_check.tick() => self.check_state(false).await,
                _ = summary.tick() => {
                    let interval = summary_started.elapsed();
                    summary_started = Instant::now();
                    self.summary(interval).await;
                }
            }
            self.pump().await;
        }
        self.shutdown(&mut events).await;
    }

    async fn on_event(&mut self, ev: LoopEvent) {
        match ev {
            LoopEvent::Connected { session_present } => {
                self.connected = true;
                let _ = self.connected_tx.send(true);
                self.fifo.clear();
                self.inflight.clear();
                self.flush_acks().await;
                // Republish everything still in the outbox, lowest seq first.
                self.next_from = 0;
                self.more = true;
                self.subscribe(session_present);
                self.check_state(true).await;
            }
            LoopEvent::Lost => {
                if self.connected {
                    self.connected = false;
                    let _ = self.connected_tx.send(false);
                }
                self.fifo.clear();
                self.inflight.clear();
            }
            LoopEvent::Mqtt(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(seq) = self.fifo.pop_front() {
                    self.inflight.insert(pkid, seq);
                }
            }
            LoopEvent::Mqtt(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(seq) = self.inflight.remove(&ack.pkid) {
                    self.acked.push(seq);
                    if self.acked.len() >= ACK_BATCH {
                        self.flush_acks().await;
                    }
                }
            }
            LoopEvent::Mqtt(Event::Incoming(Packet::SubAck(ack))) => {
                use rumqttc::SubscribeReasonCode;
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    tracing::error!(node = %self.node.node, "the broker refused a command subscription (check its ACL)");
                }
            }
            LoopEvent::Mqtt(Event::Incoming(Packet::Publish(p))) => {
                self.on_command(&p.topic, p.payload.to_vec());
            }
            LoopEvent::Mqtt(_) => {}
        }
    }

    fn subscribe(&self, session_present: bool) {
        let mut topics = vec![self.topics.node_cmd(), self.topics.fleet_cmd()];
        if let Some(g) = &self.node.group {
            topics.push(self.topics.group_cmd(g));
        }
        // Even with a resumed session: the group may have changed, and a
        // subscription the broker already holds is simply replaced.
        let _ = session_present;
        let g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        if !*g {
            return;
        }
        for t in topics {
            if let Err(e) = self.client.try_subscribe(t.clone(), QoS::AtLeastOnce) {
                tracing::warn!(topic = %t, error = %e, "cannot subscribe");
            }
        }
    }

    fn on_command(&mut self, topic: &str, payload: Vec<u8>) {
        let Some(scope) = self.topics.scope_of(topic, self.node.group.as_deref()) else {
            tracing::debug!(topic = %topic, "ignoring a publish on a topic that is not a command topic");
            return;
        };
        let Some(handler) = self.commands.clone() else {
            return;
        };
        self.commands_seen += 1;
        let store = self.store.clone();
        let slots = self.command_slots.clone();
        tokio::spawn(async move {
            let Ok(_permit) = slots.acquire_owned().await else {
                return;
            };
            let Some(reply) = handler(scope, payload).await else {
                return;
            };
            let body = match serde_json::to_value(&reply) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot encode a command reply");
                    return;
                }
            };
            if let Err(e) = store.enqueue(Kind::Reply, body).await {
                tracing::warn!(request_id = ?reply.request_id, error = %e, "cannot store a command reply");
            }
        });
    }

    /// Publishes outbox rows from `next_from` while the window has room.
    async fn pump(&mut self) {
        loop {
            if !self.connected || !self.more {
                return;
            }
            let room = WINDOW.saturating_sub(self.fifo.len() + self.inflight.len());
            if room == 0 {
                return;
            }
            let rows = match self.store.outbox_pending(self.next_from, room).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the outbox");
                    return;
                }
            };
            let full = rows.len() == room;
            if !full {
                // Read to the end; the next row written wakes us.
                self.more = false;
            }
            if rows.is_empty() {
                return;
            }
            let g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            for row in rows {
                if !*g {
                    return;
                }
                match self.client.try_publish(
                    row.topic,
                    QoS::AtLeastOnce,
                    row.retained,
                    row.payload,
                ) {
                    Ok(()) => {
                        self.fifo.push_back(row.seq);
                        self.next_from = row.seq + 1;
                    }
                    Err(e) => {
                        tracing::debug!(seq = row.seq, error = %e, "mqtt request queue full; retrying later");
                        self.more = true;
                        return;
                    }
                }
            }
            drop(g);
            if !full {
                return;
            }
        }
    }

    async fn flush_acks(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut self.acked);
        if let Err(e) = self.store.outbox_ack(seqs.clone()).await {
            tracing::warn!(error = %e, rows = seqs.len(), "cannot delete acknowledged outbox rows; they will be published again");
        }
    }

    /// Enqueues the state if it changed (or `force`: on connect).
    async fn check_state(&mut self, force: bool) {
        let state = self.view.state();
        let changed = match &self.last_state {
            None => true,
            Some(last) => state.changed_from(last),
        };
        if !(force || changed) {
            return;
        }
        match serde_json::to_value(&state) {
            Ok(body) => match self.store.enqueue(Kind::State, body).await {
                Ok(_) => self.last_state = Some(state),
                Err(e) => tracing::warn!(error = %e, "cannot store the state message"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot encode the state message"),
        }
    }

    async fn summary(&mut self, interval: Duration) {
        let mut body = self.view.summary(interval);
        body.counts = self.store.take_outbox_counts();
        body.counts.commands = std::mem::take(&mut self.commands_seen);
        match serde_json::to_value(&body) {
            Ok(v) => {
                if let Err(e) = self.store.enqueue(Kind::Summary, v).await {
                    tracing::warn!(error = %e, "cannot store the summary");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode the summary"),
        }
    }

    /// Writes an offline state, gives it a moment to be acknowledged, then
    /// disconnects cleanly (a clean disconnect does not fire the will).
    async fn shutdown(&mut self, events: &mut mpsc::Receiver<LoopEvent>) {
        let mut state = self.view.state();
        state.online = false;
        if let Ok(body) = serde_json::to_value(&state) {
            if let Err(e) = self.store.enqueue(Kind::State, body).await {
                tracing::warn!(error = %e, "cannot store the offline state");
            }
        }
        if self.connected {
            self.more = true;
            self.pump().await;
            let deadline = tokio::time::Instant::now() + SHUTDOWN_PUBLISH;
            while !(self.fifo.is_empty() && self.inflight.is_empty()) {
                match tokio::time::timeout_at(deadline, events.recv()).await {
                    Ok(Some(ev)) => self.on_event(ev).await,
                    _ => break,
                }
            }
            if self.client.try_disconnect().is_ok() {
                let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
                while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.recv()).await {
                    if matches!(ev, LoopEvent::Mqtt(Event::Outgoing(Outgoing::Disconnect))) {
                        break;
                    }
                    self.on_event(ev).await;
                }
            }
        }
        self.flush_acks().await;
        if self.connected {
            let _ = self.connected_tx.send(false);
        }
    }
}
