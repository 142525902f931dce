//! Fleet commands in: verify the envelope, refuse replays and expired
//! commands, and run the command through the same local functions (and the
//! same guards) an operator on the host would use.
//!
//! The order of checks, each a refusal with an error reply that changes
//! nothing: size (before any parsing), envelope (version, base64, trusted
//! signer, signature), command JSON, `node`/group filter (not for this
//! node: no reply), version, expiry (past, or more than
//! [`MAX_EXPIRY_AHEAD_MS`] ahead), signing policy, arguments, nonce (seen
//! before: refused; new: persisted before anything acts). Then the
//! `max_concurrency` stagger, then the command.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::envelope::{self, EnvelopeError};
use super::fleet_config;
use crate::collect::sampler::now_ms;
use crate::control::{Reply, Request, SharedStatus};
use crate::detect::engine::Role;
use crate::detect::lifecycle;

/// The command schema version.
pub const COMMAND_VERSION: u32 = 1;
/// How far ahead `expires_ms` may be. Nonces are kept until their command
/// expires, so this bounds how long the node remembers them.
pub const MAX_EXPIRY_AHEAD_MS: i64 = 6 * 3_600_000;
/// Nonces of unexpired commands the node remembers; a command that would
/// need more is refused (safe, and only a trusted signer can fill it).
pub const MAX_NONCES: usize = 10_000;
/// The nonce file under the state directory.
pub const NONCE_FILE: &str = "fleet-nonces.json";
/// The largest model package tar `model.install` takes.
pub const MAX_MODEL_TAR_BYTES: usize = 8 << 20;
/// How long `config.apply` waits for the uplink to be connected under the
/// new config before it restores the previous one.
pub const CONFIG_WATCHDOG: Duration = Duration::from_secs(60);
/// After a reload the watchdog ignores the connection state this long, so
/// it does not take the old connection (about to be replaced) for a good one.
pub const CONFIG_GRACE: Duration = Duration::from_secs(5);
/// The longest stagger slot a command may ask for.
pub const MAX_SLOT_MS: u64 = 3_600_000;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("not a command: {0}")]
    Garbled(String),
    #[error("command version {0} is not supported (this node takes v{COMMAND_VERSION})")]
    Version(u32),
    #[error("command expired at {expires_ms} (node clock {now_ms})")]
    Expired { expires_ms: i64, now_ms: i64 },
    #[error(
        "expires_ms {expires_ms} is more than {max_s} s ahead of the node clock {now_ms}: refused",
        max_s = MAX_EXPIRY_AHEAD_MS / 1000
    )]
    TooFarAhead { expires_ms: i64, now_ms: i64 },
    #[error("replayed: nonce {0:?} was already used")]
    Replayed(String),
    #[error("too many unexpired commands remembered ({MAX_NONCES}); try again later")]
    NoncesFull,
    #[error("cannot persist the nonce, so the command is refused: {0}")]
    NoncePersist(String),
    #[error(
        "no [fleet] trusted_keys are configured: `{0}` is refused (configure trusted_keys, \
         or set [fleet] allow_unsigned = true on a lab network)"
    )]
    NotTrusted(String),
    #[error("unknown command {0:?}")]
    Unknown(String),
    #[error("bad args for {cmd}: {what}")]
    Args { cmd: String, what: String },
    #[error("sha256 mismatch: the command says {said}, the content is {actual}")]
    Sha256 { said: String, actual: String },
    #[error("{0}")]
    Refused(String),
    #[error("the agent did not answer: {0}")]
    Agent(String),
}

/// Which command topic a payload arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Node,
    Group(String),
    Fleet,
}

/// Triggers a config reload (the SIGHUP path).
pub type Reload = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// The reload of a running daemon: SIGHUP to itself.
pub fn sighup_self() -> Reload {
    Arc::new(|| {
        use rustix::process::{getpid, kill_process, Signal};
        kill_process(getpid(), Signal::HUP).map_err(|e| e.to_string())
    })
}

/// What the handler keeps between commands.
#[derive(Debug, Default)]
pub struct Shared {
    nonces: Mutex<Option<NonceBook>>,
    watchdog_armed: AtomicBool,
}

/// What the command handler needs from the running agent.
#[derive(Clone)]
pub struct CommandContext {
    pub node_id: String,
    pub group: Option<String>,
    /// `[fleet] trusted_keys` as configured (`ed25519:BASE64`).
    pub trusted_keys: Vec<String>,
    /// `[fleet] allow_unsigned`: with no trusted keys, take unsigned (and
    /// any-key-signed) commands. Ignored when keys are configured.
    pub allow_unsigned: bool,
    /// The pipeline's control channel (approve, deny, run, models, ...).
    pub control: tokio::sync::mpsc::Sender<crate::control::Command>,
    pub state_dir: PathBuf,
    pub store: crate::store::Store,
    /// The local config file the agent was started with (`--config`): the
    /// policy a pushed config must stay within. `config.apply` reads it and
    /// never writes it; the pushed config goes to
    /// [`fleet_config::path`]`(state_dir)`.
    pub config_path: Option<PathBuf>,
    /// The live status (what `outpost status` shows).
    pub status: SharedStatus,
    /// `[guard] pause_file`: `pause`/`resume` create and remove it, as
    /// `outpost pause`/`resume` do.
    pub pause_file: PathBuf,
    /// Whether the uplink is connected to the broker (for the
    /// `config.apply` watchdog); the daemon's follows the uplink across
    /// restarts.
    pub connected: tokio::sync::watch::Receiver<bool>,
    /// Reloads the config; [`sighup_self`] in the daemon.
    pub reload: Reload,
    /// Nonces seen and the config watchdog; one per agent.
    pub shared: Arc<Shared>,
}

impl CommandContext {
    /// Logs what the signing policy lets in; the uplink calls it at start.
    pub fn log_policy(&self) {
        if !self.trusted_keys.is_empty() {
            tracing::info!(
                keys = self.trusted_keys.len(),
                "fleet commands: only those signed by a trusted key are taken"
            );
        } else if self.allow_unsigned {
            tracing::warn!(
                "fleet commands: no [fleet] trusted_keys and allow_unsigned = true: \
                 ANYONE who can publish to the broker can control this node"
            );
        } else {
            tracing::warn!(
                "fleet commands: no [fleet] trusted_keys configured: only `status` is \
                 answered; every command that acts is refused"
            );
        }
    }
}

/// The body of a reply on `nodes/{node}/reply`; the publisher adds the
/// message envelope (schema version, id, seq, node, timestamp).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReply {
    /// The command's id, when it could be read.
    pub request_id: Option<String>,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl CommandReply {
    fn refused(request_id: Option<String>, e: &CommandError) -> CommandReply {
        CommandReply {
            request_id,
            ok: false,
            error: Some(e.to_string()),
            result: None,
        }
    }
}

/// The command JSON (the signed bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Absent means 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub id: String,
    pub cmd: String,
    #[serde(default)]
    pub args: serde_json::Value,
    pub expires_ms: i64,
    pub nonce: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// How many nodes the sender addressed (for the stagger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_size: Option<u32>,
    /// How long one stagger slot is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_ms: Option<u64>,
}

/// A command with its arguments checked.
#[derive(Debug, Clone, PartialEq)]
enum Action {
    Approve(u64),
    Deny(u64),
    Pause(Option<String>),
    Resume,
    Run { target: String, action: String },
    ConfigApply { toml: String, sha256: String },
    ModelInstall { tar: Vec<u8>, target: String },
    ModelPromote(Option<String>),
    ModelRollback(Option<String>),
    Status,
}

impl Action {
    fn acts(&self) -> bool {
        !matches!(self, Action::Status)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdArgs {
    action: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PauseArgs {
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunArgs {
    target: String,
    #[serde(rename = "do")]
    action: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigArgs {
    toml: String,
    sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelArgs {
    package_b64: String,
    sha256: String,
    #[serde(default)]
    target: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetArgs {
    #[serde(default)]
    target: Option<String>,
}

fn args<T: serde::de::DeserializeOwned>(
    cmd: &str,
    v: &serde_json::Value,
) -> Result<T, CommandError> {
    let v = if v.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        v.clone()
    };
    serde_json::from_value(v).map_err(|e| CommandError::Args {
        cmd: cmd.to_string(),
        what: e.to_string(),
    })
}

/// The lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::detect::onnx::sha256_hex(bytes)
}

fn check_sha(said: &str, content: &[u8]) -> Result<(), CommandError> {
    let actual = sha256_hex(content);
    if said.trim().eq_ignore_ascii_case(&actual) {
        Ok(())
    } else {
        Err(CommandError::Sha256 {
            said: said.chars().take(80).collect(),
            actual,
        })
    }
}

fn parse_action(c: &Command) -> Result<Action, CommandError> {
    let cmd = c.cmd.as_str();
    Ok(match cmd {
        "approve" => Action::Approve(args::<IdArgs>(cmd, &c.args)?.action),
        "deny" => Action::Deny(args::<IdArgs>(cmd, &c.args)?.action),
        "pause" => Action::Pause(args::<PauseArgs>(cmd, &c.args)?.reason),
        "resume" => {
            args::<Empty>(cmd, &c.args)?;
            Action::Resume
        }
        "status" => {
            args::<Empty>(cmd, &c.args)?;
            Action::Status
        }
        "run" => {
            let a: RunArgs = args(cmd, &c.args)?;
            Action::Run {
                target: a.target,
                action: a.action,
            }
        }
        "config.apply" => {
            let a: ConfigArgs = args(cmd, &c.args)?;
            check_sha(&a.sha256, a.toml.as_bytes())?;
            Action::ConfigApply {
                toml: a.toml,
                sha256: a.sha256,
            }
        }
        "model.install" => {
            let a: ModelArgs = args(cmd, &c.args)?;
            if a.package_b64.len() > MAX_MODEL_TAR_BYTES.div_ceil(3) * 4 + 4 {
                return Err(CommandError::Args {
                    cmd: cmd.into(),
                    what: format!("package over the limit of {MAX_MODEL_TAR_BYTES} bytes"),
                });
            }
            let tar = B64
                .decode(a.package_b64.as_bytes())
                .map_err(|_| CommandError::Args {
                    cmd: cmd.into(),
                    what: "package_b64 is not valid base64".into(),
                })?;
            check_sha(&a.sha256, &tar)?;
            Action::ModelInstall {
                tar,
                target: a
                    .target
                    .unwrap_or_else(|| crate::detect::engine::HOST_TARGET.to_string()),
            }
        }
        "model.promote" => Action::ModelPromote(args::<TargetArgs>(cmd, &c.args)?.target),
        "model.rollback" => Action::ModelRollback(args::<TargetArgs>(cmd, &c.args)?.target),
        other => return Err(CommandError::Unknown(other.chars().take(64).collect())),
    })
}

/// Best effort: the id of a command whose envelope was refused, so the
/// sender can match the refusal.
fn peek_id(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Env {
        body: String,
    }
    #[derive(Deserialize)]
    struct Id {
        id: String,
    }
    let env: Env = serde_json::from_slice(payload).ok()?;
    let body = B64.decode(env.body.as_bytes()).ok()?;
    serde_json::from_slice::<Id>(&body)
        .ok()
        .map(|i| i.id.chars().take(128).collect())
}

/// FNV-1a, 64 bit: the stagger hash (PROTOCOL.md), simple enough to
/// compute anywhere.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// How long a node waits before it runs a group or fleet command with
/// `max_concurrency = n` sent to `group_size` nodes: slot
/// `fnv1a64(node) mod ceil(group_size / n)`, times `slot_ms`.
pub fn stagger(node: &str, group_size: u32, max_concurrency: u32, slot_ms: u64) -> Duration {
    if max_concurrency == 0 || group_size == 0 {
        return Duration::ZERO;
    }
    let slots = u64::from(group_size.div_ceil(max_concurrency));
    let slot = fnv1a64(node) % slots.max(1);
    Duration::from_millis(slot.saturating_mul(slot_ms.min(MAX_SLOT_MS)))
}

/// Handles one payload from a command topic. `None`: not for this node
/// (another node's or group's command), nothing to reply.
///
/// A group or fleet command with `max_concurrency` waits out its stagger
/// slot inside this call: the uplink should run each call on its own task.
pub async fn handle(ctx: &CommandContext, scope: Scope, payload: &[u8]) -> Option<CommandReply> {
    let (command, signer) = match open(ctx, payload) {
        Ok(x) => x,
        Err((id, e)) => {
            tracing::warn!(error = %e, request_id = ?id, "fleet command refused");
            return Some(CommandReply::refused(id, &e));
        }
    };
    if let Some(node) = &command.node {
        if node != &ctx.node_id {
            return None;
        }
    }
    if let Scope::Group(g) = &scope {
        if ctx.group.as_deref() != Some(g.as_str()) {
            return None;
        }
    }
    let id = Some(command.id.clone());
    let by = format!(
        "fleet:{}",
        signer.as_deref().map_or("unsigned", |s| s
            .strip_prefix(envelope::KEY_PREFIX)
            .unwrap_or(s))
    );
    let action = match admit(ctx, &command, now_ms()) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, request_id = %command.id, cmd = %command.cmd, "fleet command refused");
            return Some(CommandReply::refused(id, &e));
        }
    };
    if scope != Scope::Node {
        if let (Some(n), Some(size)) = (command.max_concurrency, command.group_size) {
            let wait = stagger(&ctx.node_id, size, n, command.slot_ms.unwrap_or(0));
            if !wait.is_zero() {
                tracing::info!(request_id = %command.id, wait_ms = wait.as_millis() as u64, "fleet command staggered");
                tokio::time::sleep(wait).await;
            }
        }
    }
    tracing::info!(request_id = %command.id, cmd = %command.cmd, by = %by, "fleet command");
    let reply = match run(ctx, action, &by).await {
        Ok(result) => CommandReply {
            request_id: id,
            ok: true,
            error: None,
            result: Some(result),
        },
        Err(e) => {
            tracing::warn!(error = %e, request_id = %command.id, cmd = %command.cmd, "fleet command failed");
            CommandReply::refused(id, &e)
        }
    };
    Some(reply)
}

type Refusal = (Option<String>, CommandError);

fn open(ctx: &CommandContext, payload: &[u8]) -> Result<(Command, Option<String>), Refusal> {
    let opened = envelope::open(payload, &ctx.trusted_keys).map_err(|e| {
        let id = if matches!(e, EnvelopeError::TooLarge { .. }) {
            None
        } else {
            peek_id(payload)
        };
        (id, CommandError::from(e))
    })?;
    let command: Command = serde_json::from_slice(&opened.body)
        .map_err(|e| (peek_id(payload), CommandError::Garbled(e.to_string())))?;
    Ok((command, opened.signer))
}

/// Every check that does not act: version, expiry, signing policy,
/// arguments, and finally the nonce (recorded, so a replay is refused).
fn admit(ctx: &CommandContext, c: &Command, now: i64) -> Result<Action, CommandError> {
    let v = c.v.unwrap_or(COMMAND_VERSION);
    if v != COMMAND_VERSION {
        return Err(CommandError::Version(v));
    }
    if c.id.is_empty() || c.id.len() > 128 {
        return Err(CommandError::Garbled(
            "id must be 1 to 128 characters".into(),
        ));
    }
    if c.nonce.len() < 8 || c.nonce.len() > 128 {
        return Err(CommandError::Garbled(
            "nonce must be 8 to 128 characters".into(),
        ));
    }
    if c.expires_ms < now {
        return Err(CommandError::Expired {
            expires_ms: c.expires_ms,
            now_ms: now,
        });
    }
    if c.expires_ms > now.saturating_add(MAX_EXPIRY_AHEAD_MS) {
        return Err(CommandError::TooFarAhead {
            expires_ms: c.expires_ms,
            now_ms: now,
        });
    }
    let action = parse_action(c)?;
    // With trusted keys, `envelope::open` already refused anything not
    // signed by one of them.
    let trusted = !ctx.trusted_keys.is_empty() || ctx.allow_unsigned;
    if action.acts() && !trusted {
        return Err(CommandError::NotTrusted(c.cmd.clone()));
    }
    remember_nonce(ctx, &c.nonce, c.expires_ms, now)?;
    Ok(action)
}

fn remember_nonce(
    ctx: &CommandContext,
    nonce: &str,
    expires_ms: i64,
    now: i64,
) -> Result<(), CommandError> {
    let mut guard = ctx.shared.nonces.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        *guard = Some(NonceBook::load(&ctx.state_dir));
    }
    let Some(book) = guard.as_mut() else {
        return Err(CommandError::NoncePersist("no nonce book".into()));
    };
    book.record(nonce, expires_ms, now)
}

/// Nonces of unexpired commands, persisted in `state_dir/fleet-nonces.json`
/// (written atomically) so a restart does not forget them.
#[derive(Debug, Default)]
pub struct NonceBook {
    path: PathBuf,
    seen: HashMap<String, i64>,
}

#[derive(Serialize, Deserialize)]
struct NonceFile {
    v: u32,
    /// `[nonce, expires_ms]`.
    nonces: Vec<(String, i64)>,
}

impl NonceBook {
    /// Loads the book; an unreadable file is logged and, to stay on the
    /// safe side, every nonce it might have held stays unknown only until
    /// `MAX_EXPIRY_AHEAD_MS`: commands are then refused until that passed.
    pub fn load(state_dir: &Path) -> NonceBook {
        let path = state_dir.join(NONCE_FILE);
        let mut book = NonceBook {
            path,
            seen: HashMap::new(),
        };
        match std::fs::read(&book.path) {
            Ok(bytes) => match serde_json::from_slice::<NonceFile>(&bytes) {
                Ok(f) => book.seen = f.nonces.into_iter().collect(),
                Err(e) => {
                    tracing::error!(path = %book.path.display(), error = %e, "the fleet nonce file is unreadable; replays of commands sent before it was written cannot be told apart");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(path = %book.path.display(), error = %e, "cannot read the fleet nonce file");
            }
        }
        book
    }

    fn record(&mut self, nonce: &str, expires_ms: i64, now: i64) -> Result<(), CommandError> {
        if self.seen.contains_key(nonce) {
            return Err(CommandError::Replayed(nonce.chars().take(64).collect()));
        }
        self.seen.retain(|_, exp| *exp >= now);
        if self.seen.len() >= MAX_NONCES {
            return Err(CommandError::NoncesFull);
        }
        self.seen.insert(nonce.to_string(), expires_ms);
        if let Err(e) = self.save() {
            self.seen.remove(nonce);
            return Err(CommandError::NoncePersist(e.to_string()));
        }
        Ok(())
    }

    fn save(&self) -> std::io::Result<()> {
        let mut nonces: Vec<(String, i64)> =
            self.seen.iter().map(|(n, e)| (n.clone(), *e)).collect();
        nonces.sort_by_key(|(_, e)| *e);
        let bytes =
            serde_json::to_vec(&NonceFile { v: 1, nonces }).map_err(std::io::Error::other)?;
        write_atomically(&self.path, &bytes, 0o600)
    }
}

/// Writes `path` through `path.fleet-tmp` (fsync'ed) and a rename, then
/// fsyncs the directory.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".fleet-tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

async fn control(ctx: &CommandContext, req: Request) -> Result<Reply, CommandError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    ctx.control
        .send((req, tx))
        .await
        .map_err(|_| CommandError::Agent("the agent is shutting down".into()))?;
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .map_err(|_| CommandError::Agent("no answer within 10 s".into()))?
        .map_err(|_| CommandError::Agent("the pipeline dropped the request".into()))
}

fn reply_result(r: Reply) -> Result<serde_json::Value, CommandError> {
    if r.ok {
        Ok(serde_json::json!({ "message": r.message }))
    } else {
        Err(CommandError::Refused(r.message))
    }
}

async fn run(
    ctx: &CommandContext,
    action: Action,
    by: &str,
) -> Result<serde_json::Value, CommandError> {
    match action {
        Action::Approve(id) => reply_result(
            control(
                ctx,
                Request::Approve {
                    id,
                    by: Some(by.to_string()),
                },
            )
            .await?,
        ),
        Action::Deny(id) => reply_result(
            control(
                ctx,
                Request::Deny {
                    id,
                    by: Some(by.to_string()),
                },
            )
            .await?,
        ),
        Action::Run { target, action } => reply_result(
            control(
                ctx,
                Request::Run {
                    target,
                    action,
                    by: by.to_string(),
                },
            )
            .await?,
        ),
        Action::Pause(reason) => pause(ctx, reason.as_deref(), by),
        Action::Resume => resume(ctx),
        Action::Status => {
            let live = ctx.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut v =
                serde_json::to_value(live).map_err(|e| CommandError::Agent(e.to_string()))?;
            if let Some(o) = v.as_object_mut() {
                o.insert("paused".into(), ctx.pause_file.exists().into());
                o.insert("group".into(), ctx.group.clone().into());
            }
            Ok(v)
        }
        Action::ModelPromote(target) => {
            check_model_target(ctx, target.as_deref(), Role::Shadow)?;
            reply_result(control(ctx, Request::ModelPromote).await?)
        }
        Action::ModelRollback(target) => {
            check_model_target(ctx, target.as_deref(), Role::Active)?;
            reply_result(control(ctx, Request::ModelRollback).await?)
        }
        Action::ModelInstall { tar, target } => model_install(ctx, tar, target, by).await,
        Action::ConfigApply { toml, sha256 } => config_apply(ctx, toml, &sha256).await,
    }
}

fn pause(
    ctx: &CommandContext,
    reason: Option<&str>,
    by: &str,
) -> Result<serde_json::Value, CommandError> {
    let path = &ctx.pause_file;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| CommandError::Refused(format!("{}: {e}", dir.display())))?;
    }
    let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let reason = reason.unwrap_or("paused by the fleet").trim();
    let text = format!("{when}\n{reason} ({by})\n");
    write_atomically(path, text.as_bytes(), 0o644)
        .map_err(|e| CommandError::Refused(format!("{}: {e}", path.display())))?;
    Ok(
        serde_json::json!({ "paused": true, "message": format!("paused: nothing acts until resume ({})", path.display()) }),
    )
}

fn resume(ctx: &CommandContext) -> Result<serde_json::Value, CommandError> {
    let path = &ctx.pause_file;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(serde_json::json!({ "paused": false, "message": "resumed" })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(serde_json::json!({ "paused": false, "message": "not paused" }))
        }
        Err(e) => Err(CommandError::Refused(format!("{}: {e}", path.display()))),
    }
}

fn check_model_target(
    ctx: &CommandContext,
    target: Option<&str>,
    role: Role,
) -> Result<(), CommandError> {
    let Some(target) = target else {
        return Ok(());
    };
    let reg = lifecycle::load(&ctx.state_dir).map_err(|e| CommandError::Refused(e.to_string()))?;
    match reg.get(role) {
        Some(e) if e.target == target => Ok(()),
        Some(e) => Err(CommandError::Refused(format!(
            "the {} model {} is for target {:?}, not {target:?}",
            role_name(role),
            e.label(),
            e.target
        ))),
        None => Err(CommandError::Refused(format!(
            "no {} model is installed",
            role_name(role)
        ))),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Active => "active",
        Role::Shadow => "shadow",
        Role::Previous => "previous",
    }
}

/// A fresh private directory under the state directory.
fn temp_dir(state_dir: &Path, what: &str) -> Result<PathBuf, CommandError> {
    use rand_core::RngCore as _;
    use std::os::unix::fs::DirBuilderExt as _;
    let tag = rand_core::OsRng.next_u64();
    let dir = state_dir.join(format!(".fleet-{what}-{tag:016x}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| CommandError::Refused(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// Unpacks a package tar into `dest`: only `model.onnx` and `model.toml`,
/// at the top or under one directory; no absolute paths, no `..`, no links
/// or devices, each file within the package limits.
pub fn unpack_package(tar_bytes: &[u8], dest: &Path) -> Result<(), String> {
    use crate::detect::onnx::{MAX_MANIFEST_BYTES, MAX_ONNX_BYTES};
    use std::io::Read as _;
    use std::path::Component;
    const MAX_ENTRIES: usize = 16;
    let mut archive = tar::Archive::new(tar_bytes);
    let entries = archive.entries().map_err(|e| format!("not a tar: {e}"))?;
    let mut found: Vec<&'static str> = Vec::new();
    for (i, entry) in entries.enumerate() {
        if i >= MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} tar entries"));
        }
        let entry = entry.map_err(|e| format!("not a tar: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("bad tar path: {e}"))?
            .into_owned();
        let mut parts = Vec::new();
        for c in path.components() {
            match c {
                Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
                Component::CurDir => {}
                _ => {
                    return Err(format!(
                        "{}: absolute or `..` paths are refused",
                        path.display()
                    ))
                }
            }
        }
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            if parts.len() > 1 {
                return Err(format!(
                    "{}: nested directories are refused",
                    path.display()
                ));
            }
            continue;
        }
        if !kind.is_file() {
            return Err(format!(
                "{}: only regular files are allowed (links and devices are refused)",
                path.display()
            ));
        }
        if parts.len() > 2 || parts.is_empty() {
            return Err(format!(
                "{}: unexpected path in a model package",
                path.display()
            ));
        }
        let (name, cap): (&'static str, u64) = match parts.last().map(String::as_str) {
            Some("model.onnx") => ("model.onnx", MAX_ONNX_BYTES),
            Some("model.toml") => ("model.toml", MAX_MANIFEST_BYTES),
            _ => {
                return Err(format!(
                    "{}: a package holds only model.onnx and model.toml",
                    path.display()
                ))
            }
        };
        if found.contains(&name) {
            return Err(format!("{name} appears twice"));
        }
        if entry.header().size().unwrap_or(u64::MAX) > cap {
            return Err(format!("{name}: over the limit of {cap} bytes"));
        }
        let mut buf = Vec::new();
        entry
            .take(cap + 1)
            .read_to_end(&mut buf)
            .map_err(|e| format!("{name}: {e}"))?;
        if buf.len() as u64 > cap {
            return Err(format!("{name}: over the limit of {cap} bytes"));
        }
        std::fs::write(dest.join(name), &buf).map_err(|e| format!("{name}: {e}"))?;
        found.push(name);
    }
    if found.len() != 2 {
        return Err("a package holds model.onnx and model.toml; one is missing".into());
    }
    Ok(())
}

async fn model_install(
    ctx: &CommandContext,
    tar: Vec<u8>,
    target: String,
    by: &str,
) -> Result<serde_json::Value, CommandError> {
    let state_dir = ctx.state_dir.clone();
    let by = by.to_string();
    let installed = tokio::task::spawn_blocking(move || {
        let dir = temp_dir(&state_dir, "model")?;
        let result = (|| {
            unpack_package(&tar, &dir)
                .map_err(|e| CommandError::Refused(format!("model package refused: {e}")))?;
            let mut node: Vec<String> = {
                let db = state_dir.join("outpost.db");
                if db.exists() {
                    crate::store::Reader::open(&db)
                        .and_then(|r| r.latest_feature_names())
                        .unwrap_or_default()
                } else {
                    Vec::new()
                }
            };
            node.sort();
            lifecycle::install(&state_dir, &dir, &target, now_ms(), &by, &|d| {
                crate::model_cli::verify_for_node(d, &node)
            })
            .map_err(|e| CommandError::Refused(format!("model package refused: {e}")))
        })();
        let _ = std::fs::remove_dir_all(&dir);
        result
    })
    .await
    .map_err(|e| CommandError::Agent(e.to_string()))??;
    let loaded = control(ctx, Request::ModelsChanged).await?;
    Ok(serde_json::json!({
        "installed": installed.label(),
        "role": "shadow",
        "target": installed.target,
        "sha256": installed.sha256,
        "message": loaded.message,
        "loaded": loaded.ok,
    }))
}

/// The file the previous pushed config is kept in (for the watchdog).
pub fn prev_path(config: &Path) -> PathBuf {
    let mut p = config.as_os_str().to_owned();
    p.push(".prev");
    PathBuf::from(p)
}

fn refuse_config(ctx: &CommandContext, path: &Path, why: String) -> CommandError {
    ctx.store.post_event(super::EventBody::new(
        super::message::events::CONFIG_REFUSED,
        serde_json::json!({ "source": path.display().to_string(), "error": why }),
    ));
    CommandError::Refused(format!("config refused, nothing written: {why}"))
}

/// Stores a pushed config in the state directory ([`fleet_config::FILE`])
/// after checking it against the local policy (the `--config` file, read
/// again now), and reloads. The local config file is never written.
async fn config_apply(
    ctx: &CommandContext,
    toml: String,
    sha256: &str,
) -> Result<serde_json::Value, CommandError> {
    let Some(local_path) = ctx.config_path.clone() else {
        return Err(CommandError::Refused(
            "this agent runs on the built-in default config: there is no local policy to check \
             a pushed config against"
                .into(),
        ));
    };
    let path = fleet_config::path(&ctx.state_dir);
    let pushed = crate::config::parse_str(&toml, &path.display().to_string())
        .map_err(|e| refuse_config(ctx, &path, format!("not a valid config:\n{e}")))?;
    let local = crate::config::Config::load(&local_path)
        .map_err(|e| refuse_config(ctx, &path, format!("the local policy cannot be read:\n{e}")))?;
    fleet_config::check(&local, &pushed).map_err(|e| refuse_config(ctx, &path, e.to_string()))?;
    if ctx
        .shared
        .watchdog_armed
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(CommandError::Refused(
            "a config apply is still being watched; try again in a minute".into(),
        ));
    }
    let prev = prev_path(&path);
    let written = (|| -> std::io::Result<()> {
        match std::fs::read(&path) {
            Ok(current) => write_atomically(&prev, &current, 0o600)?,
            // The first push: restoring means running the local config.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => remove_if_present(&prev)?,
            Err(e) => return Err(e),
        }
        write_atomically(&path, toml.as_bytes(), 0o600)
    })();
    if let Err(e) = written {
        ctx.shared.watchdog_armed.store(false, Ordering::SeqCst);
        return Err(CommandError::Refused(format!(
            "cannot write {}: {e}; the running config is unchanged",
            path.display()
        )));
    }
    if let Err(e) = (ctx.reload)() {
        tracing::error!(error = %e, "cannot trigger the config reload");
    }
    tracing::info!(config = %path.display(), policy = %local_path.display(), sha256 = %sha256, "fleet config stored; watching the uplink for 60 s");
    let connected = ctx.connected.clone();
    let reload = ctx.reload.clone();
    let shared = ctx.shared.clone();
    tokio::spawn(watchdog(
        path.clone(),
        connected,
        reload,
        shared,
        CONFIG_GRACE,
        CONFIG_WATCHDOG,
    ));
    Ok(serde_json::json!({
        "message": format!(
            "config stored as {} (within the local policy of {}) and reloaded; restored unless the uplink is connected within {} s",
            path.display(),
            local_path.display(),
            CONFIG_WATCHDOG.as_secs()
        ),
        "path": path.display().to_string(),
        "sha256": sha256.to_ascii_lowercase(),
    }))
}

fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Waits `grace`, then until `window` (from the apply) ends for the uplink
/// to be connected; if it never is, puts the previous pushed config back
/// (or, after the first push, removes the pushed config so the local one
/// runs) and reloads again.
async fn watchdog(
    path: PathBuf,
    mut connected: tokio::sync::watch::Receiver<bool>,
    reload: Reload,
    shared: Arc<Shared>,
    grace: Duration,
    window: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + window;
    tokio::time::sleep(grace).await;
    let ok = tokio::time::timeout_at(deadline, connected.wait_for(|c| *c))
        .await
        .is_ok_and(|r| r.is_ok());
    if ok {
        tracing::info!(config = %path.display(), "fleet config kept: the uplink is connected");
    } else {
        let prev = prev_path(&path);
        let restored = match std::fs::read(&prev) {
            Ok(old) => write_atomically(&path, &old, 0o600).map(|()| "the previous fleet config"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                remove_if_present(&path).map(|()| "the local config (the fleet config is removed)")
            }
            Err(e) => Err(e),
        };
        match restored {
            Ok(what) => {
                tracing::error!(config = %path.display(), "the uplink did not connect within 60 s of a fleet config apply: back to {what}");
                if let Err(e) = reload() {
                    tracing::error!(error = %e, "cannot trigger the config reload");
                }
            }
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "the uplink did not connect after a fleet config apply and the previous config cannot be restored");
            }
        }
    }
    shared.watchdog_armed.store(false, Ordering::SeqCst);
    ok
}

#[cfg(test)]
mod tests;
