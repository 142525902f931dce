//! The operator's side: `outpost fleet ...` over the broker.
//!
//! Every command is a fresh [`Command`] (unique id, random nonce, expiry =
//! now + `--timeout`, plus the stagger for a staggered group command),
//! signed with `--key` into an envelope, published at QoS 1 on the node's,
//! group's or fleet's command topic after subscribing to the replies. The
//! CLI then waits for one reply per addressed node (for a group: the nodes
//! whose retained state names the group) and reports each. Exit 0 only when
//! every node answered ok; 1 when any refused or did not answer, or the
//! broker could not be reached; 2 for bad arguments.

pub mod broker;
pub mod view;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use ed25519_dalek::SigningKey;
use rumqttc::{Event, Packet, QoS};
use tokio::time::Instant;

use crate::cli::{EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME};
use crate::collect::sampler::now_ms;
use crate::sync::command::{sha256_hex, stagger, Command, CommandReply, MAX_MODEL_TAR_BYTES};
use crate::sync::envelope::{self, Envelope};

/// How long `nodes` (and a group command) waits for more retained states
/// once they stop coming.
const SETTLE_IDLE: Duration = Duration::from_millis(300);
/// The longest `nodes` gathers retained states.
const SETTLE_MAX: Duration = Duration::from_millis(1500);
/// How long to wait for the broker to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Bad arguments or unreadable input: exit 2.
    #[error("{0}")]
    Args(String),
    /// The broker or the network: exit 1.
    #[error("broker: {0}")]
    Broker(String),
}

impl FleetError {
    fn exit(&self) -> u8 {
        match self {
            FleetError::Args(_) => EXIT_BAD_INPUT,
            FleetError::Broker(_) => EXIT_RUNTIME,
        }
    }
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    /// The broker: mqtt://HOST[:PORT] or mqtts://HOST[:PORT].
    #[arg(long, global = true, env = "OUTPOST_FLEET_BROKER")]
    pub broker: Option<String>,
    /// CA certificate(s), PEM, for mqtts://.
    #[arg(long, global = true)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate, PEM (with --key-file).
    #[arg(long, global = true)]
    pub cert_file: Option<PathBuf>,
    /// Client private key, PEM (with --cert-file).
    #[arg(long, global = true)]
    pub key_file: Option<PathBuf>,
    #[arg(long, global = true)]
    pub username: Option<String>,
    /// A file holding the broker password.
    #[arg(long, global = true)]
    pub password_file: Option<PathBuf>,
    /// The private key commands are signed with (`outpost fleet keygen`).
    #[arg(long, global = true, env = "OUTPOST_FLEET_KEY")]
    pub key: Option<PathBuf>,
    /// Send commands unsigned (only nodes with `[fleet] allow_unsigned =
    /// true` and no trusted keys take them).
    #[arg(long, global = true)]
    pub unsigned: bool,
    /// The topic prefix the nodes use.
    #[arg(long, global = true, default_value = "outpost/v1")]
    pub prefix: String,
    /// How long a command stays valid and how long replies are awaited.
    #[arg(long, global = true, default_value = "10s")]
    pub timeout: String,
    /// The nodes' `[mqtt] max_packet_kb`: a command that would not fit is
    /// refused here (a node cannot take a larger packet).
    #[arg(long, global = true, default_value_t = crate::config::mqtt::DEFAULT_MAX_PACKET_KB)]
    pub max_packet_kb: u64,
    /// Machine-readable output (one JSON document or line per result).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: FleetCommand,
}

/// Whom a command goes to.
#[derive(Debug, Clone, Args)]
pub struct Addressee {
    /// The node.
    #[arg(required_unless_present_any = ["group", "all"], conflicts_with_all = ["group", "all"])]
    pub node: Option<String>,
    /// Every node of a group (those whose retained state names it).
    #[arg(long, conflicts_with = "all")]
    pub group: Option<String>,
    /// Every node (on the fleet topic; replies awaited from every node
    /// with a retained state).
    #[arg(long)]
    pub all: bool,
    /// With --group or --all: at most this many nodes act at once; node i
    /// acts in slot fnv1a64(node) mod ceil(nodes / N).
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// With --max-concurrency: how long one slot is.
    #[arg(long, default_value = "30s")]
    pub slot: String,
}

/// Whom a model package goes to, and the package: `NODE DIR`, or `DIR`
/// with --group or --all. ([`Addressee`]'s optional NODE cannot come before
/// a required DIR: clap cannot tell them apart.)
#[derive(Debug, Clone, Args)]
pub struct PackageTo {
    /// NODE DIR, or only DIR with --group or --all. DIR holds model.onnx
    /// and model.toml.
    #[arg(required = true, num_args = 1..=2, value_names = ["NODE", "DIR"])]
    pub node_dir: Vec<String>,
    /// Every node of a group (those whose retained state names it).
    #[arg(long, conflicts_with = "all")]
    pub group: Option<String>,
    /// Every node (on the fleet topic).
    #[arg(long)]
    pub all: bool,
    /// With --group or --all: at most this many nodes act at once.
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// With --max-concurrency: how long one slot is.
    #[arg(long, default_value = "30s")]
    pub slot: String,
}

impl PackageTo {
    /// The addressee and the package directory.
    pub fn split(&self) -> Result<(Addressee, PathBuf), FleetError> {
        let many = self.group.is_some() || self.all;
        let (node, dir) = match (many, self.node_dir.as_slice()) {
            (false, [node, dir]) => (Some(node.clone()), dir),
            (true, [dir]) => (None, dir),
            (false, _) => {
                return Err(FleetError::Args(
                    "push-model takes NODE DIR, or DIR with --group or --all".into(),
                ))
            }
            (true, _) => {
                return Err(FleetError::Args(
                    "push-model with --group or --all takes only DIR, no NODE".into(),
                ))
            }
        };
        let to = Addressee {
            node,
            group: self.group.clone(),
            all: self.all,
            max_concurrency: self.max_concurrency,
            slot: self.slot.clone(),
        };
        Ok((to, PathBuf::from(dir)))
    }
}

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// The nodes the broker holds a retained state for: a table.
    Nodes,
    /// Live events (and state changes) as they happen, until Ctrl-C.
    Watch {
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// Stop after this long (e.g. `30s`).
        #[arg(long = "for")]
        duration: Option<String>,
    },
    /// Approve a decision waiting for approval on a node.
    Approve { node: String, id: u64 },
    /// Deny a decision waiting for approval on a node.
    Deny { node: String, id: u64 },
    /// Stop every action on a node or group (its pause file).
    Pause {
        #[command(flatten)]
        to: Addressee,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a pause.
    Resume {
        #[command(flatten)]
        to: Addressee,
    },
    /// Take a rule's action now (still bound by every local guard).
    Run {
        node: String,
        /// The target name.
        target: String,
        /// restart, stop, start, reload or exec:NAME.
        action: String,
    },
    /// Replace a node's config file (validated there, restored when the
    /// node does not reconnect within 60 s).
    PushConfig { node: String, file: PathBuf },
    /// Install a model package (a directory with model.onnx and
    /// model.toml) in shadow on a node or group.
    PushModel {
        #[command(flatten)]
        to: PackageTo,
        /// The target its incidents belong to (default: host).
        #[arg(long)]
        target: Option<String>,
    },
    /// Make a node's shadow model active.
    Promote {
        node: String,
        #[arg(long)]
        target: Option<String>,
    },
    /// Bring a node's previous model back.
    Rollback {
        node: String,
        #[arg(long)]
        target: Option<String>,
    },
    /// A node's live status.
    Status { node: String },
    /// Write a new signing key (mode 0600) and print its public line for
    /// `[fleet] trusted_keys`.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
}

/// Runs `outpost fleet ...`.
pub fn execute(args: FleetArgs) -> u8 {
    if let FleetCommand::Keygen { out } = &args.cmd {
        return keygen(out);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return EXIT_RUNTIME;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            e.exit()
        }
    }
}

fn keygen(out: &Path) -> u8 {
    let key = envelope::generate();
    match envelope::write_key_file(out, &key) {
        Ok(public) => {
            eprintln!(
                "private key written to {} (mode 0600); add this line to [fleet] trusted_keys:",
                out.display()
            );
            println!("{public}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_BAD_INPUT
        }
    }
}

fn duration(flag: &str, s: &str) -> Result<Duration, FleetError> {
    crate::config::parse_duration(s).map_err(|e| FleetError::Args(format!("--{flag}: {e}")))
}

/// A random 128-bit hex string.
fn random_hex() -> String {
    use rand_core::RngCore as _;
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A new command: unique id, random nonce, `expires_ms = now + valid`.
pub fn new_command(
    cmd: &str,
    args: serde_json::Value,
    node: Option<&str>,
    valid: Duration,
) -> Command {
    Command {
        v: Some(crate::sync::command::COMMAND_VERSION),
        id: random_hex(),
        cmd: cmd.to_string(),
        args,
        expires_ms: now_ms().saturating_add(i64::try_from(valid.as_millis()).unwrap_or(i64::MAX)),
        nonce: random_hex(),
        node: node.map(String::from),
        max_concurrency: None,
        group_size: None,
        slot_ms: None,
    }
}

/// The envelope bytes: signed with `key`, or unsigned.
pub fn seal(c: &Command, key: Option<&SigningKey>) -> Vec<u8> {
    let body = serde_json::to_vec(c).unwrap_or_default();
    match key {
        Some(k) => envelope::sign(&body, k).to_json(),
        None => Envelope::unsigned(&body).to_json(),
    }
}

/// A package directory as a tar of its two files (deterministic headers, so
/// the same package always has the same sha256).
pub fn package_tar(dir: &Path) -> Result<Vec<u8>, FleetError> {
    let mut b = tar::Builder::new(Vec::new());
    for name in ["model.toml", "model.onnx"] {
        let p = dir.join(name);
        let data = std::fs::read(&p).map_err(|e| {
            FleetError::Args(format!(
                "{}: {e} (a model package is a directory with model.onnx and model.toml)",
                p.display()
            ))
        })?;
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data.as_slice())
            .map_err(|e| FleetError::Args(format!("tar: {e}")))?;
    }
    let tar = b
        .into_inner()
        .map_err(|e| FleetError::Args(format!("tar: {e}")))?;
    if tar.len() > MAX_MODEL_TAR_BYTES {
        return Err(FleetError::Args(format!(
            "{}: the package is {} bytes, over the {MAX_MODEL_TAR_BYTES} bytes a node takes over MQTT",
            dir.display(),
            tar.len()
        )));
    }
    Ok(tar)
}

/// The command, its arguments and whom it goes to, from the command line.
struct Plan {
    cmd: &'static str,
    args: serde_json::Value,
    to: Addressee,
}

fn node_only(node: &str) -> Addressee {
    Addressee {
        node: Some(node.to_string()),
        group: None,
        all: false,
        max_concurrency: None,
        slot: "0s".into(),
    }
}

fn plan(cmd: &FleetCommand) -> Result<Option<Plan>, FleetError> {
    use serde_json::json;
    let p = |cmd, args, to| Ok(Some(Plan { cmd, args, to }));
    match cmd {
        FleetCommand::Nodes | FleetCommand::Watch { .. } | FleetCommand::Keygen { .. } => Ok(None),
        FleetCommand::Approve { node, id } => p("approve", json!({"action": id}), node_only(node)),
        FleetCommand::Deny { node, id } => p("deny", json!({"action": id}), node_only(node)),
        FleetCommand::Pause { to, reason } => {
            let args = match reason {
                Some(r) => json!({"reason": r}),
                None => json!({}),
            };
            p("pause", args, to.clone())
        }
        FleetCommand::Resume { to } => p("resume", json!({}), to.clone()),
        FleetCommand::Run {
            node,
            target,
            action,
        } => p(
            "run",
            json!({"target": target, "do": action}),
            node_only(node),
        ),
        FleetCommand::PushConfig { node, file } => {
            let toml = std::fs::read_to_string(file)
                .map_err(|e| FleetError::Args(format!("{}: {e}", file.display())))?;
            let sha = sha256_hex(toml.as_bytes());
            p(
                "config.apply",
                json!({"toml": toml, "sha256": sha}),
                node_only(node),
            )
        }
        FleetCommand::PushModel { to, target } => {
            use base64::Engine as _;
            let (to, dir) = to.split()?;
            let tar = package_tar(&dir)?;
            let mut args = json!({
                "package_b64": base64::engine::general_purpose::STANDARD.encode(&tar),
                "sha256": sha256_hex(&tar),
            });
            if let (Some(t), Some(o)) = (target, args.as_object_mut()) {
                o.insert("target".into(), t.clone().into());
            }
            p("model.install", args, to)
        }
        FleetCommand::Promote { node, target } => {
            p("model.promote", target_args(target), node_only(node))
        }
        FleetCommand::Rollback { node, target } => {
            p("model.rollback", target_args(target), node_only(node))
        }
        FleetCommand::Status { node } => p("status", json!({}), node_only(node)),
    }
}

fn target_args(target: &Option<String>) -> serde_json::Value {
    match target {
        Some(t) => serde_json::json!({ "target": t }),
        None => serde_json::json!({}),
    }
}

fn broker_options(a: &FleetArgs) -> Result<broker::BrokerOptions, FleetError> {
    Ok(broker::BrokerOptions {
        url: a
            .broker
            .clone()
            .ok_or_else(|| FleetError::Args("--broker URL is required".into()))?,
        ca_file: a.ca_file.clone(),
        cert_file: a.cert_file.clone(),
        key_file: a.key_file.clone(),
        username: a.username.clone(),
        password_file: a.password_file.clone(),
    })
}

async fn run(a: &FleetArgs) -> Result<u8, FleetError> {
    let timeout = duration("timeout", &a.timeout)?;
    let plan = plan(&a.cmd)?;
    let key = match (&plan, &a.key, a.unsigned) {
        (None, _, _) | (Some(_), _, true) => None,
        (Some(_), Some(path), false) => {
            Some(envelope::read_key_file(path).map_err(|e| FleetError::Args(e.to_string()))?)
        }
        (Some(_), None, false) => {
            return Err(FleetError::Args(
                "commands are signed: pass --key FILE (outpost fleet keygen), or --unsigned".into(),
            ))
        }
    };
    let opts = broker_options(a)?;
    let mut s = Session::connect(&opts).await?;
    let prefix = a.prefix.trim_end_matches('/');
    match (&a.cmd, plan) {
        (FleetCommand::Nodes, _) => {
            let rows = s.states(prefix, SETTLE_MAX).await?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).unwrap_or_default()
                );
            } else if rows.is_empty() {
                println!("no node has a retained state under {prefix}/nodes/");
            } else {
                print!("{}", view::table(&rows, now_ms()));
            }
            Ok(EXIT_OK)
        }
        (FleetCommand::Watch { node, duration: d }, _) => {
            let until = d.as_deref().map(|d| duration("for", d)).transpose()?;
            s.watch(prefix, node.as_deref(), until, a.json).await
        }
        (_, Some(p)) => {
            let o = SendOpts {
                prefix,
                key: key.as_ref(),
                timeout,
                max_packet: usize::try_from(a.max_packet_kb.saturating_mul(1024))
                    .unwrap_or(usize::MAX),
                json: a.json,
            };
            send(&mut s, p, o).await
        }
        (_, None) => Ok(EXIT_OK),
    }
}

/// One node's answer.
#[derive(Debug, Clone, serde::Serialize)]
struct Outcome {
    node: String,
    answered: bool,
    #[serde(flatten)]
    reply: Option<CommandReply>,
}

/// What `send` needs besides the plan.
struct SendOpts<'a> {
    prefix: &'a str,
    key: Option<&'a SigningKey>,
    timeout: Duration,
    max_packet: usize,
    json: bool,
}

/// Whether a PUBLISH of `payload` on `topic` fits a node's packet limit
/// (fixed header, topic, packet id).
pub fn fits(topic: &str, payload: &[u8], max_packet: usize) -> bool {
    payload.len() + topic.len() + 16 <= max_packet
}

async fn send(s: &mut Session, p: Plan, o: SendOpts<'_>) -> Result<u8, FleetError> {
    let SendOpts {
        prefix,
        key,
        timeout,
        max_packet,
        json,
    } = o;
    let (topic, nodes, node_field) = match (&p.to.node, &p.to.group) {
        (Some(node), _) => {
            if node.is_empty() || node.contains(['/', '+', '#']) {
                return Err(FleetError::Args(format!("{node:?} is not a node id")));
            }
            (
                format!("{prefix}/nodes/{node}/cmd"),
                vec![node.clone()],
                Some(node.as_str()),
            )
        }
        (None, Some(group)) => {
            if group.is_empty() || group.contains(['/', '+', '#']) {
                return Err(FleetError::Args(format!("{group:?} is not a group name")));
            }
            let members: Vec<String> = s
                .states(prefix, SETTLE_MAX)
                .await?
                .into_iter()
                .filter(|r| r.group.as_deref() == Some(group.as_str()))
                .map(|r| r.node)
                .collect();
            if members.is_empty() {
                eprintln!("no node's retained state names group {group:?}");
                return Ok(EXIT_RUNTIME);
            }
            (format!("{prefix}/groups/{group}/cmd"), members, None)
        }
        (None, None) if p.to.all => {
            let members: Vec<String> = s
                .states(prefix, SETTLE_MAX)
                .await?
                .into_iter()
                .map(|r| r.node)
                .collect();
            if members.is_empty() {
                eprintln!("no node has a retained state under {prefix}/nodes/");
                return Ok(EXIT_RUNTIME);
            }
            (format!("{prefix}/fleet/cmd"), members, None)
        }
        (None, None) => {
            return Err(FleetError::Args(
                "a node, --group or --all is required".into(),
            ))
        }
    };
    let mut valid = timeout;
    let mut c = new_command(p.cmd, p.args, node_field, timeout);
    if p.to.max_concurrency.is_some() && node_field.is_some() {
        return Err(FleetError::Args(
            "--max-concurrency goes with --group or --all".into(),
        ));
    }
    if let Some(n) = p.to.max_concurrency {
        if n == 0 {
            return Err(FleetError::Args(
                "--max-concurrency must be at least 1".into(),
            ));
        }
        let slot = duration("slot", &p.to.slot)?;
        let size = u32::try_from(nodes.len()).unwrap_or(u32::MAX);
        let longest = nodes
            .iter()
            .map(|node| stagger(node, size, n, slot.as_millis() as u64))
            .max()
            .unwrap_or_default();
        valid += longest;
        c = new_command(p.cmd, c.args, None, valid);
        c.max_concurrency = Some(n);
        c.group_size = Some(size);
        c.slot_ms = Some(slot.as_millis() as u64);
    }
    let payload = seal(&c, key);
    if !fits(&topic, &payload, max_packet) {
        return Err(FleetError::Args(format!(
            "the command is {} bytes, over the nodes' packet limit of {} KiB \
             ([mqtt] max_packet_kb on the nodes; --max-packet-kb here if they allow more)",
            payload.len(),
            max_packet / 1024
        )));
    }
    let reply_filter = match node_field {
        Some(node) => format!("{prefix}/nodes/{node}/reply"),
        None => format!("{prefix}/nodes/+/reply"),
    };
    s.subscribe(&reply_filter, QoS::AtLeastOnce).await?;
    s.client
        .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
        .await
        .map_err(|e| FleetError::Broker(e.to_string()))?;
    tracing::debug!(topic = %topic, id = %c.id, nodes = nodes.len(), "command sent");
    let wanted: BTreeSet<String> = nodes.iter().cloned().collect();
    let mut got: BTreeMap<String, CommandReply> = BTreeMap::new();
    let deadline = Instant::now() + valid + Duration::from_secs(1);
    while got.len() < wanted.len() {
        let Some((t, payload)) = s.next_publish(deadline).await? else {
            break;
        };
        let Some(node) = view::node_of(prefix, &t, "reply") else {
            continue;
        };
        if !wanted.contains(node) {
            continue;
        }
        if let Some(r) = view::reply_of(&payload) {
            if r.request_id.as_deref() == Some(c.id.as_str()) {
                got.insert(node.to_string(), r);
            }
        }
    }
    let _ = s.client.disconnect().await;
    let outcomes: Vec<Outcome> = nodes
        .iter()
        .map(|n| Outcome {
            node: n.clone(),
            answered: got.contains_key(n),
            reply: got.get(n).cloned(),
        })
        .collect();
    let all_ok = outcomes
        .iter()
        .all(|o| o.reply.as_ref().is_some_and(|r| r.ok));
    report(&outcomes, c.cmd.as_str(), valid, json);
    Ok(if all_ok { EXIT_OK } else { EXIT_RUNTIME })
}

fn report(outcomes: &[Outcome], cmd: &str, waited: Duration, json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        for o in outcomes {
            let _ = writeln!(out, "{}", serde_json::to_string(o).unwrap_or_default());
        }
        return;
    }
    let w = outcomes.iter().map(|o| o.node.len()).max().unwrap_or(4);
    for o in outcomes {
        let line = match &o.reply {
            None => format!(
                "NO ANSWER within {}",
                humantime::format_duration(Duration::from_secs(waited.as_secs().max(1)))
            ),
            Some(r) if r.ok => {
                let detail = r.result.as_ref().map_or(String::new(), |v| {
                    if cmd == "status" {
                        serde_json::to_string_pretty(v).unwrap_or_default()
                    } else {
                        v.get("message")
                            .and_then(|m| m.as_str())
                            .map_or_else(|| v.to_string(), String::from)
                    }
                });
                format!("ok       {detail}")
            }
            Some(r) => format!(
                "REFUSED  {}",
                r.error.as_deref().unwrap_or("(no reason given)")
            ),
        };
        let _ = writeln!(out, "{:<w$}  {line}", o.node);
    }
}

/// A connected client and its event loop.
struct Session {
    client: rumqttc::AsyncClient,
    events: rumqttc::EventLoop,
}

impl Session {
    async fn connect(o: &broker::BrokerOptions) -> Result<Session, FleetError> {
        let (client, mut events) = broker::connect(o)?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Err(_) => {
                    return Err(FleetError::Broker(format!(
                        "{}: no CONNACK within {} s",
                        o.url,
                        CONNECT_TIMEOUT.as_secs()
                    )))
                }
                Ok(Err(e)) => return Err(FleetError::Broker(format!("{}: {e}", o.url))),
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    return Ok(Session { client, events })
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Subscribes and waits for the SUBACK.
    async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<(), FleetError> {
        self.client
            .subscribe(filter, qos)
            .await
            .map_err(|e| FleetError::Broker(e.to_string()))?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Err(_) => return Err(FleetError::Broker(format!("no SUBACK for {filter}"))),
                Ok(Err(e)) => return Err(FleetError::Broker(e.to_string())),
                Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        return Err(FleetError::Broker(format!(
                            "the broker refused the subscription to {filter} (ACL?)"
                        )));
                    }
                    return Ok(());
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next PUBLISH (topic, payload, retained) before `deadline`.
    async fn next_publish_full(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(String, Vec<u8>, bool)>, FleetError> {
        loop {
            match tokio::time::timeout_at(deadline, self.events.poll()).await {
                Err(_) => return Ok(None),
                Ok(Err(e)) => return Err(FleetError::Broker(e.to_string())),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    return Ok(Some((p.topic, p.payload.to_vec(), p.retain)))
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn next_publish(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(String, Vec<u8>)>, FleetError> {
        Ok(self
            .next_publish_full(deadline)
            .await?
            .map(|(t, p, _)| (t, p)))
    }

    /// Every retained node state: gathered until none came for
    /// `SETTLE_IDLE`, or `max` passed.
    async fn states(
        &mut self,
        prefix: &str,
        max: Duration,
    ) -> Result<Vec<view::NodeRow>, FleetError> {
        let filter = format!("{prefix}/nodes/+/state");
        self.subscribe(&filter, QoS::AtMostOnce).await?;
        let end = Instant::now() + max;
        let mut rows: BTreeMap<String, view::NodeRow> = BTreeMap::new();
        loop {
            let idle = (Instant::now() + SETTLE_IDLE).min(end);
            let Some((topic, payload)) = self.next_publish(idle).await? else {
                break;
            };
            if let Some(node) = view::node_of(prefix, &topic, "state") {
                match view::state_row(node, &payload) {
                    Some(r) => {
                        rows.insert(node.to_string(), r);
                    }
                    None => {
                        rows.remove(node);
                    }
                }
            }
            if Instant::now() >= end {
                eprintln!(
                    "warning: retained states were still arriving after {} ms; the list may be incomplete",
                    max.as_millis()
                );
                break;
            }
        }
        let _ = self.client.unsubscribe(filter).await;
        Ok(rows.into_values().collect())
    }

    async fn watch(
        &mut self,
        prefix: &str,
        node: Option<&str>,
        until: Option<Duration>,
        json: bool,
    ) -> Result<u8, FleetError> {
        let who = node.unwrap_or("+");
        for leaf in ["events", "state"] {
            self.subscribe(&format!("{prefix}/nodes/{who}/{leaf}"), QoS::AtLeastOnce)
                .await?;
        }
        // Forever, in practice: ten years.
        let end = Instant::now() + until.unwrap_or(Duration::from_secs(315_360_000));
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            let next = tokio::select! {
                _ = &mut ctrl_c => break,
                n = self.next_publish_full(end) => n?,
            };
            let Some((topic, payload, retained)) = next else {
                break;
            };
            if retained {
                // Live only: retained states are `nodes`' business.
                continue;
            }
            let line = if json {
                String::from_utf8_lossy(&payload).into_owned()
            } else {
                describe(prefix, &topic, &payload)
            };
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        let _ = self.client.disconnect().await;
        Ok(EXIT_OK)
    }
}

/// One readable line for a live message.
pub fn describe(prefix: &str, topic: &str, payload: &[u8]) -> String {
    let node = view::node_of(prefix, topic, "events")
        .or_else(|| view::node_of(prefix, topic, "state"))
        .unwrap_or(topic);
    let v: serde_json::Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(_) => return format!("{node}  (unreadable message on {topic})"),
    };
    let when = v
        .get("ts_ms")
        .and_then(serde_json::Value::as_i64)
        .map(|ms| {
            let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
            humantime::format_rfc3339_seconds(t).to_string()
        })
        .unwrap_or_else(|| "-".into());
    let body = v.get("body").cloned().unwrap_or(serde_json::Value::Null);
    match v.get("type").and_then(|t| t.as_str()) {
        Some("state") => {
            let online = body
                .get("online")
                .and_then(|o| o.as_bool())
                .unwrap_or(false);
            format!(
                "{when}  {node}  {}",
                if online { "online" } else { "OFFLINE" }
            )
        }
        _ => {
            let event = body
                .get("event")
                .and_then(|e| e.as_str())
                .unwrap_or("event")
                .to_string();
            let mut rest = body.clone();
            if let Some(o) = rest.as_object_mut() {
                o.remove("event");
            }
            format!("{when}  {node}  {event}  {rest}")
        }
    }
}

#[cfg(test)]
mod tests;
