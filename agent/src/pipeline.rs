//! The daemon: wires collection, feature windows and the store, and handles
//! the lifecycle (readiness, watchdog, reload, shutdown).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::collect::sampler::{now_ms, Sampler};
use crate::config::Config;
use crate::control::{self, LiveStatus, SharedStatus};
use crate::detect::features::FeatureWindows;
use crate::detect::stage::{self, DetectStage};
use crate::notify::{Notifier, Progress};
use crate::remediate::{ActionResult, Remediator};
use crate::store::Store;
use crate::sync::fleet_config;

/// How long shutdown may take before outpost gives up flushing. The unit's
/// TimeoutStopSec must be longer.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_millis(1500);

/// What lives for the agent's whole run, across config reloads.
struct Agent {
    store: Store,
    status: SharedStatus,
    notifier: Notifier,
    progress: Progress,
    hup: tokio::signal::unix::Signal,
    commands: tokio::sync::mpsc::Receiver<control::Command>,
    remediator: Remediator,
    results: tokio::sync::mpsc::UnboundedReceiver<ActionResult>,
    detect: DetectStage,
    /// The MQTT uplink (when `[mqtt]` is set), restarted by a reload that
    /// changes what it runs with.
    uplink: UplinkSlot,
    /// The `--config` file: the local policy, read again at every reload.
    local_path: Option<PathBuf>,
    /// READY=1 is due after the next sample (at start and after a reload).
    ready_due: bool,
}

enum Exit {
    Shutdown,
    Reload(Box<Config>),
}

/// Runs the agent until `shutdown` is cancelled. `config` is the local
/// config (`--config`, the policy); the agent runs the config the fleet
/// pushed instead when there is one within that policy
/// ([`fleet_config::select`]). SIGHUP reads both again; a local config that
/// fails validation is refused and the running one kept.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = Instant::now();
    let local_path = config.source.clone();
    let state_dir = config.agent.state_dir.clone();
    let (config, selection) = fleet_config::select(config, &state_dir);
    selection.log();
    let store = Store::open(&config).context("opening the local store")?;
    let status: SharedStatus = Arc::new(Mutex::new(LiveStatus {
        node_id: config.agent.node_id.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: std::process::id(),
        started_ms: now_ms(),
        ..LiveStatus::default()
    }));
    for w in config.render_warnings(&config_name(&config)) {
        tracing::warn!(warning = %w, "config");
    }
    let (remediator, results) = Remediator::new(&config, store.clone()).await;
    let detect = DetectStage::new(
        config.detect.clone(),
        &config.agent.state_dir,
        store.clone(),
        stage::onnx_loader,
    )
    .await;
    let (cmd_tx, commands) = tokio::sync::mpsc::channel::<control::Command>(16);
    control::serve(
        &config.socket_path(),
        status.clone(),
        cmd_tx.clone(),
        shutdown.clone(),
    )?;
    let mut uplink = UplinkSlot::new(
        store.clone(),
        status.clone(),
        cmd_tx,
        local_path.clone(),
        shutdown.clone(),
    );
    uplink.start(&config);
    // After the uplink turned the outbox on, so the fleet hears of it.
    if let Some(ev) = selection.refusal_event() {
        store.post_event(ev);
    }
    let notifier = Notifier::from_env();
    let progress = Progress::default();
    notifier.spawn_watchdog(
        progress.clone(),
        config.agent.sample_interval,
        shutdown.clone(),
    );
    let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tracing::info!(
        node = %config.agent.node_id,
        state_dir = %config.agent.state_dir.display(),
        targets = config.targets.len(),
        config = %config_name(&config),
        "outpost started"
    );

    let mut agent = Agent {
        store,
        status,
        notifier,
        progress,
        hup,
        commands,
        remediator,
        results,
        detect,
        uplink,
        local_path,
        ready_due: true,
    };
    let mut config = config;
    crate::memtrim::schedule();
    loop {
        let generation = shutdown.child_token();
        let exit = agent.pipeline(&config, generation.clone()).await;
        generation.cancel();
        match exit {
            Exit::Shutdown => break,
            Exit::Reload(new) => {
                if new.agent.state_dir != config.agent.state_dir {
                    tracing::warn!("agent.state_dir changed; it takes effect at the next restart");
                }
                let uplink_changed = uplink_settings_changed(&config, &new);
                config = Config {
                    agent: crate::config::AgentConfig {
                        state_dir: config.agent.state_dir.clone(),
                        ..new.agent.clone()
                    },
                    ..*new
                };
                tracing::info!(targets = config.targets.len(), config = %config_name(&config), "config reloaded");
                agent.remediator.reconfigure(&config);
                agent.detect.reconfigure(config.detect.clone());
                if uplink_changed {
                    tracing::info!("[mqtt], [fleet] or the node id changed: restarting the uplink");
                    agent.uplink.restart(&config).await;
                }
                // After a restart, so it goes out under the new settings.
                agent.store.post_event(crate::sync::EventBody::new(
                    crate::sync::message::events::CONFIG_APPLIED,
                    serde_json::json!({ "source": config_name(&config) }),
                ));
                for w in config.render_warnings(&config_name(&config)) {
                    tracing::warn!(warning = %w, "config");
                }
                // READY=1 after the first sample under the new config ends
                // systemd's RELOADING state.
                agent.ready_due = true;
                // What the reload ran (parsing, a model compile) once.
                crate::memtrim::schedule();
            }
        }
    }

    let Agent {
        store,
        notifier,
        mut uplink,
        ..
    } = agent;
    notifier.stopping();
    // The uplink publishes the offline state and disconnects; it has part
    // of the deadline, the store's final flush the rest.
    uplink.stop(UPLINK_STOP).await;
    match tokio::time::timeout(SHUTDOWN_DEADLINE, store.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "store did not close cleanly"),
        Err(_) => tracing::error!("store flush passed the shutdown deadline"),
    }
    tracing::info!(uptime_s = started.elapsed().as_secs(), "outpost stopped");
    Ok(())
}

/// Whether a reload from `old` to `new` changes what the uplink runs with:
/// `[mqtt]`, `[fleet]`, the node id, the pause file (its view shows it).
fn uplink_settings_changed(old: &Config, new: &Config) -> bool {
    old.mqtt != new.mqtt
        || old.fleet != new.fleet
        || old.agent.node_id != new.agent.node_id
        || old.guard.pause_file != new.guard.pause_file
}

impl Agent {
    /// Samples, computes features, decides and stores until shutdown or a
    /// valid reload.
    async fn pipeline(&mut self, cfg: &Config, token: CancellationToken) -> Exit {
        let mut sampler = Sampler::new(cfg, token.clone());
        let mut windows = FeatureWindows::new(cfg.features.window);
        let base = Instant::now();
        let mut tick = tokio::time::interval(cfg.agent.sample_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut next_step = base + cfg.features.step;
        {
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            s.config = cfg.source.as_ref().map(|p| p.display().to_string());
            s.sample_interval_ms = cfg.agent.sample_interval.as_millis() as u64;
            // Until the first sample under this config: no target it
            // dropped (status must not show the new config with old targets).
            s.targets
                .retain(|t| cfg.targets.iter().any(|c| c.name == t.name));
        }
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => return Exit::Shutdown,
                Some((request, reply)) = self.commands.recv() => {
                    let answer = match request {
                        control::Request::Approve { id, by } => {
                            self.remediator.answer(id, true, by.as_deref().unwrap_or("local"))
                        }
                        control::Request::Deny { id, by } => {
                            self.remediator.answer(id, false, by.as_deref().unwrap_or("local"))
                        }
                        control::Request::Status => control::Reply { ok: true, message: "ok".into() },
                        control::Request::ModelsChanged => match self.detect.sync_registry().await {
                            Ok(message) => control::Reply { ok: true, message },
                            Err(e) => control::Reply { ok: false, message: e.to_string() },
                        },
                        control::Request::ModelPromote => self.detect.promote("local").await,
                        control::Request::ModelRollback => self.detect.rollback("local").await,
                        control::Request::Run { target, action, by } => {
                            self.remediator.manual(&target, &action, &by).await
                        }
                    };
                    let _ = reply.send(answer);
                }
                Some(result) = self.results.recv() => {
                    self.remediator.on_result(result).await;
                }
                _ = self.hup.recv() => {
                    if let Some(new) = reload(self.local_path.as_deref(), &cfg.agent.state_dir, &self.notifier, &self.store) {
                        return Exit::Reload(Box::new(new));
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let sample = sampler.sample(now).await;
                    let mono_ms = now.duration_since(base).as_millis() as i64;
                    windows.push(mono_ms, &sample);
                    self.remediator.step(&sample, &self.detect.anomaly).await;
                    if let Some(t) = self.uplink.telemetry() {
                        t.observe(&sample.targets, &self.detect.anomaly);
                    }
                    self.progress.tick();
                    let vector = if now >= next_step {
                        while next_step <= now {
                            next_step += cfg.features.step;
                        }
                        windows.compute(mono_ms, sample.ts_ms)
                    } else {
                        None
                    };
                    if let Some(v) = &vector {
                        self.detect.step(v).await;
                    }
                    let (models, open_incidents) = self.detect.live();
                    let line = {
                        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                        s.anomaly = self.detect.anomaly.clone();
                        s.models = models;
                        s.open_incidents = open_incidents;
                        s.samples += 1;
                        s.signals = windows.signals();
                        s.targets = sample.targets.clone();
                        s.store_dropped = self.store.dropped();
                        if let Some(v) = &vector {
                            s.feature_vectors += 1;
                            s.newest_feature_ms = Some(v.ts_ms);
                        }
                        let up = s.targets.iter().filter(|t| t.up).count();
                        format!(
                            "{} signals, {}/{} targets up, {} feature vectors",
                            s.signals,
                            up,
                            s.targets.len(),
                            s.feature_vectors
                        )
                    };
                    if let Some(v) = vector {
                        self.store.record_features(v);
                        self.store.record_targets(sample.targets);
                        self.notifier.status(&line);
                    }
                    if self.ready_due {
                        self.ready_due = false;
                        self.notifier.ready(&line);
                        tracing::info!(signals = windows.signals(), "collecting");
                    }
                }
            }
        }
    }
}

/// Loads the local config again and chooses what to run
/// ([`fleet_config::select`]); `None` (and an error log) when the local
/// config is refused, so the caller keeps the running config.
fn reload(
    local_path: Option<&Path>,
    state_dir: &Path,
    notifier: &Notifier,
    store: &Store,
) -> Option<Config> {
    let Some(path) = local_path else {
        tracing::info!("SIGHUP: running on the built-in default, nothing to reload");
        return None;
    };
    notifier.reloading();
    let result = Config::load(path);
    match result {
        Ok(local) => {
            let (new, selection) = fleet_config::select(local, state_dir);
            selection.log();
            if let Some(ev) = selection.refusal_event() {
                store.post_event(ev);
            }
            notifier.status("config reloaded");
            Some(new)
        }
        Err(e) => {
            store.post_event(crate::sync::EventBody::new(
                crate::sync::message::events::CONFIG_REFUSED,
                serde_json::json!({ "source": path.display().to_string(), "error": e.to_string() }),
            ));
            for line in e.to_string().lines() {
                tracing::error!(error = %line, "SIGHUP: new config refused; keeping the running one");
            }
            notifier.status("new config refused; running the previous one");
            // READY=1 ends the RELOADING state in systemd even on refusal.
            notifier.ready("new config refused; running the previous one");
            None
        }
    }
}

/// How long shutdown waits for the uplink (offline state, DISCONNECT).
const UPLINK_STOP: Duration = Duration::from_millis(600);

/// How long a restart waits for the old uplink to say goodbye before it
/// aborts it. Sampling waits too, so well under the unit's watchdog.
const UPLINK_RESTART: Duration = Duration::from_secs(2);

/// The running uplink.
struct RunningUplink {
    task: tokio::task::JoinHandle<()>,
    token: CancellationToken,
    telemetry: crate::sync::Telemetry,
}

/// The uplink across reloads: what stays (the store, the command handler's
/// nonces and `config.apply` watchdog, the connection flag the watchdog
/// watches) and the uplink task of the current settings.
struct UplinkSlot {
    running: Option<RunningUplink>,
    store: Store,
    status: SharedStatus,
    control: tokio::sync::mpsc::Sender<control::Command>,
    local_path: Option<PathBuf>,
    shutdown: CancellationToken,
    /// Whether the current uplink is connected; it follows each new uplink,
    /// so a `config.apply` watchdog sees the uplink of the new config.
    connected: Arc<tokio::sync::watch::Sender<bool>>,
    /// Which uplink `connected` follows.
    generation: Arc<AtomicU64>,
    shared: Arc<crate::sync::command::Shared>,
}

impl UplinkSlot {
    fn new(
        store: Store,
        status: SharedStatus,
        control: tokio::sync::mpsc::Sender<control::Command>,
        local_path: Option<PathBuf>,
        shutdown: CancellationToken,
    ) -> UplinkSlot {
        UplinkSlot {
            running: None,
            store,
            status,
            control,
            local_path,
            shutdown,
            connected: Arc::new(tokio::sync::watch::channel(false).0),
            generation: Arc::new(AtomicU64::new(0)),
            shared: Arc::new(crate::sync::command::Shared::default()),
        }
    }

    fn telemetry(&self) -> Option<&crate::sync::Telemetry> {
        self.running.as_ref().map(|u| &u.telemetry)
    }

    /// Starts the uplink of `config` (none without `[mqtt]`, or when it
    /// cannot be built).
    fn start(&mut self, config: &Config) {
        let generation = {
            // Under the status lock, so a follower of the previous uplink
            // cannot write its state over this one's.
            let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            s.uplink = config.mqtt.as_ref().map(|m| {
                control::UplinkLive::from_state(
                    &control::broker_url(m.tls, &m.host, m.port),
                    &crate::sync::uplink::UplinkState::Connecting,
                    now_ms(),
                )
            });
            self.generation.fetch_add(1, Ordering::SeqCst) + 1
        };
        self.connected.send_replace(false);
        let Some(mqtt) = config.mqtt.as_ref() else {
            // No uplink: nothing new goes to the outbox; what is in it stays.
            self.store.configure_outbox(None);
            return;
        };
        let broker = control::broker_url(mqtt.tls, &mqtt.host, mqtt.port);
        let token = self.shutdown.child_token();
        let (running, mut connected, state) = match start_uplink(self, config, token) {
            Ok(started) => started,
            Err(e) => {
                let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                s.uplink = Some(control::UplinkLive::not_started(&broker, &e));
                return;
            }
        };
        let follow = self.connected.clone();
        let current = self.generation.clone();
        tokio::spawn(async move {
            loop {
                let up = *connected.borrow_and_update();
                if current.load(Ordering::SeqCst) != generation {
                    return;
                }
                follow.send_replace(up);
                if connected.changed().await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(follow_state(
            state,
            broker,
            self.status.clone(),
            self.generation.clone(),
            generation,
        ));
        self.running = Some(running);
    }

    /// Stops the uplink: it publishes the offline state and disconnects;
    /// past `within` it is aborted.
    async fn stop(&mut self, within: Duration) {
        let Some(mut u) = self.running.take() else {
            return;
        };
        u.token.cancel();
        if tokio::time::timeout(within, &mut u.task).await.is_err() {
            tracing::warn!("the uplink did not stop in time");
            u.task.abort();
        }
    }

    /// Stops the uplink and starts the one of `config`. The outbox is in
    /// the store, so nothing queued is lost.
    async fn restart(&mut self, config: &Config) {
        self.stop(UPLINK_RESTART).await;
        self.start(config);
    }
}

/// Copies the uplink's state into the live status (what `outpost status`
/// shows) until the uplink of `generation` is replaced or gone.
async fn follow_state(
    mut state: tokio::sync::watch::Receiver<crate::sync::uplink::UplinkState>,
    broker: String,
    status: SharedStatus,
    current: Arc<AtomicU64>,
    generation: u64,
) {
    loop {
        let live = control::UplinkLive::from_state(&broker, &state.borrow_and_update(), now_ms());
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            if current.load(Ordering::SeqCst) != generation {
                return;
            }
            s.uplink = Some(live);
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// The uplink task, its connection flag and its state.
type StartedUplink = (
    RunningUplink,
    tokio::sync::watch::Receiver<bool>,
    tokio::sync::watch::Receiver<crate::sync::uplink::UplinkState>,
);

/// Builds and spawns the MQTT uplink of `config` (which has `[mqtt]`). A
/// broken TLS file or password file is logged (and returned, for status)
/// and the agent runs without the uplink: detection and remediation do not
/// depend on it.
fn start_uplink(
    slot: &UplinkSlot,
    config: &Config,
    token: CancellationToken,
) -> Result<StartedUplink, String> {
    use crate::sync::{command, uplink};
    let Some(mqtt) = config.mqtt.as_ref() else {
        return Err("no [mqtt] section".to_string());
    };
    let started_ms = slot
        .status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .started_ms;
    let node = uplink::NodeConfig::from_config(config, mqtt, started_ms);
    let up = match uplink::Uplink::new(node, slot.store.clone()) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "mqtt uplink not started; running without it");
            return Err(e.to_string());
        }
    };
    let ctx = command::CommandContext {
        node_id: config.agent.node_id.clone(),
        group: config.fleet.group.clone(),
        trusted_keys: config.fleet.trusted_keys.clone(),
        allow_unsigned: config.fleet.allow_unsigned,
        control: slot.control.clone(),
        state_dir: config.agent.state_dir.clone(),
        store: slot.store.clone(),
        config_path: slot.local_path.clone(),
        status: slot.status.clone(),
        pause_file: config.guard.pause_file.clone(),
        connected: slot.connected.subscribe(),
        reload: command::sighup_self(),
        shared: slot.shared.clone(),
    };
    ctx.log_policy();
    let ctx = Arc::new(ctx);
    let handler: uplink::CommandHandler = Arc::new(move |scope, payload| {
        let ctx = ctx.clone();
        Box::pin(async move { command::handle(&ctx, scope, &payload).await })
    });
    let telemetry = crate::sync::Telemetry::default();
    let view = Arc::new(crate::sync::DaemonView {
        status: slot.status.clone(),
        telemetry: telemetry.clone(),
        group: config.fleet.group.clone(),
        pause_file: config.guard.pause_file.clone(),
    });
    tracing::info!(
        url = %mqtt.url,
        client_id = %mqtt.client_id,
        topic_prefix = %mqtt.topic_prefix,
        group = ?config.fleet.group,
        "mqtt uplink starting"
    );
    let connected = up.connected();
    let state = up.state();
    let task = tokio::spawn(up.run(view, Some(handler), token.clone()));
    Ok((
        RunningUplink {
            task,
            token,
            telemetry,
        },
        connected,
        state,
    ))
}

fn config_name(cfg: &Config) -> String {
    cfg.source
        .as_ref()
        .map_or("<built-in>".to_string(), |p| p.display().to_string())
}
