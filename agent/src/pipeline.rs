//! The daemon: wires collection, feature windows and the store, and handles
//! the lifecycle (readiness, watchdog, reload, shutdown).

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
    /// Per-sample health and scores for the uplink's summaries (MQTT on).
    telemetry: Option<crate::sync::Telemetry>,
    /// READY=1 is due after the next sample (at start and after a reload).
    ready_due: bool,
}

enum Exit {
    Shutdown,
    Reload(Box<Config>),
}

/// Runs the agent until `shutdown` is cancelled. SIGHUP reloads the config
/// file it was started with; a config that fails validation is refused and
/// the running one kept.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = Instant::now();
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
    let uplink = start_uplink(&config, &store, &status, cmd_tx, shutdown.child_token());
    let telemetry = uplink.as_ref().map(|u| u.telemetry.clone());
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
        telemetry,
        ready_due: true,
    };
    let mut config = config;
    loop {
        let generation = shutdown.child_token();
        let exit = agent.pipeline(&config, generation.clone()).await;
        generation.cancel();
        match exit {
            Exit::Shutdown => break,
            Exit::Reload(new) => {
                if new.mqtt != config.mqtt || new.fleet != config.fleet {
                    tracing::warn!(
                        "[mqtt] or [fleet] changed; it takes effect at the next restart"
                    );
                }
                agent.store.post_event(crate::sync::EventBody::new(
                    crate::sync::message::events::CONFIG_APPLIED,
                    serde_json::json!({ "source": config_name(&new) }),
                ));
                if new.agent.state_dir != config.agent.state_dir {
                    tracing::warn!("agent.state_dir changed; it takes effect at the next restart");
                }
                config = Config {
                    agent: crate::config::AgentConfig {
                        state_dir: config.agent.state_dir.clone(),
                        ..new.agent.clone()
                    },
                    ..*new
                };
                tracing::info!(targets = config.targets.len(), "config reloaded");
                agent.remediator.reconfigure(&config);
                agent.detect.reconfigure(config.detect.clone());
                for w in config.render_warnings(&config_name(&config)) {
                    tracing::warn!(warning = %w, "config");
                }
                // READY=1 after the first sample under the new config ends
                // systemd's RELOADING state.
                agent.ready_due = true;
            }
        }
    }

    let Agent {
        store, notifier, ..
    } = agent;
    notifier.stopping();
    if let Some(u) = uplink {
        // The uplink publishes the offline state and disconnects; it has
        // part of the deadline, the store's final flush the rest.
        if tokio::time::timeout(UPLINK_STOP, u.task).await.is_err() {
            tracing::warn!("the uplink did not stop in time");
        }
    }
    match tokio::time::timeout(SHUTDOWN_DEADLINE, store.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "store did not close cleanly"),
        Err(_) => tracing::error!("store flush passed the shutdown deadline"),
    }
    tracing::info!(uptime_s = started.elapsed().as_secs(), "outpost stopped");
    Ok(())
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
                    if let Some(new) = reload(cfg, &self.notifier, &self.store) {
                        return Exit::Reload(Box::new(new));
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let sample = sampler.sample(now).await;
                    let mono_ms = now.duration_since(base).as_millis() as i64;
                    windows.push(mono_ms, &sample);
                    self.remediator.step(&sample, &self.detect.anomaly).await;
                    if let Some(t) = &self.telemetry {
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

/// Loads the config file again; `None` (and an error log) when it is
/// refused, so the caller keeps the running config.
fn reload(cfg: &Config, notifier: &Notifier, store: &Store) -> Option<Config> {
    let Some(path) = cfg.source.as_ref() else {
        tracing::info!("SIGHUP: running on the built-in default, nothing to reload");
        return None;
    };
    notifier.reloading();
    let result = Config::load(path);
    match result {
        Ok(new) => {
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

/// The running uplink.
struct RunningUplink {
    task: tokio::task::JoinHandle<()>,
    telemetry: crate::sync::Telemetry,
}

/// Starts the MQTT uplink when `[mqtt]` is configured. A broken TLS file or
/// password file is logged and the agent runs without the uplink: detection
/// and remediation do not depend on it.
fn start_uplink(
    config: &Config,
    store: &Store,
    status: &SharedStatus,
    control: tokio::sync::mpsc::Sender<control::Command>,
    token: CancellationToken,
) -> Option<RunningUplink> {
    use crate::sync::{command, uplink};
    let mqtt = config.mqtt.as_ref()?;
    let started_ms = status.lock().unwrap_or_else(|p| p.into_inner()).started_ms;
    let node = uplink::NodeConfig::from_config(config, mqtt, started_ms);
    let up = match uplink::Uplink::new(node, store.clone()) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "mqtt uplink not started; running without it");
            return None;
        }
    };
    let ctx = command::CommandContext {
        node_id: config.agent.node_id.clone(),
        group: config.fleet.group.clone(),
        trusted_keys: config.fleet.trusted_keys.clone(),
        allow_unsigned: config.fleet.allow_unsigned,
        control,
        state_dir: config.agent.state_dir.clone(),
        store: store.clone(),
        config_path: config.source.clone(),
        status: status.clone(),
        pause_file: config.guard.pause_file.clone(),
        connected: up.connected(),
        reload: command::sighup_self(),
        shared: Arc::new(command::Shared::default()),
    };
    ctx.log_policy();
    let ctx = Arc::new(ctx);
    let handler: uplink::CommandHandler = Arc::new(move |scope, payload| {
        let ctx = ctx.clone();
        Box::pin(async move { command::handle(&ctx, scope, &payload).await })
    });
    let telemetry = crate::sync::Telemetry::default();
    let view = Arc::new(crate::sync::DaemonView {
        status: status.clone(),
        telemetry: telemetry.clone(),
        group: config.fleet.group.clone(),
        pause_file: config.guard.pause_file.clone(),
    });
    tracing::info!(
        url = %mqtt.url,
        client_id = %mqtt.client_id,
        topic_prefix = %mqtt.topic_prefix,
        "mqtt uplink starting"
    );
    let task = tokio::spawn(up.run(view, Some(handler), token));
    Some(RunningUplink { task, telemetry })
}

fn config_name(cfg: &Config) -> String {
    cfg.source
        .as_ref()
        .map_or("<built-in>".to_string(), |p| p.display().to_string())
}
