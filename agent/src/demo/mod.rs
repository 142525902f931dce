//! `outpost demo`: a self-contained tour, no setup. It starts an embedded
//! MQTT broker, a demo HTTP service under a small service manager that
//! restarts it when it exits, the real agent in-process on a generated
//! config (a process target with an HTTP probe, three `auto` rules whose
//! action stops the service, and an `[mqtt]` uplink to the embedded
//! broker), and a fleet subscriber on that broker. Then it injects three
//! faults one after another (hang, leak, spin) and prints a live timeline
//! drawn from the agent's audit trail, incidents and live status and from
//! what the fleet received, and a summary. Exit 0 only when every fault
//! was detected, remediated and reported upstream; it always stops within
//! a minute and removes what it made.

mod broker;
mod fleet;
pub mod service;
mod supervisor;
mod timeline;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cli::{EXIT_OK, EXIT_RUNTIME};
use crate::collect::sampler::now_ms;
use crate::config::{Config, ConfigError};
use crate::store::audit::{AuditRow, Incident};

use self::fleet::FleetMessage;
use self::supervisor::{ServiceEvent, Supervisor};
use self::timeline::{FaultKind, Timeline, TARGET};

/// The faults get this long; with the agent's stop (3 s), the runtime's
/// (1 s) and a control-socket or HTTP call in flight (2 s each) the demo
/// ends within a minute.
pub const DEADLINE: Duration = Duration::from_secs(50);
/// Past this, a watchdog thread ends the process whatever is stuck.
const HARD_DEADLINE: Duration = Duration::from_secs(59);
/// How long the agent has to settle one fault.
const FAULT_WINDOW: Duration = Duration::from_secs(15);
/// How long to wait for the fleet to hear about a settled fault.
const UPSTREAM_WINDOW: Duration = Duration::from_secs(4);
/// A service still unhealthy this long after a fault (the agent did not
/// fix it) ends the demo: the next faults would prove nothing.
const RECOVERY_WINDOW: Duration = Duration::from_secs(10);
/// The service must look healthy to the agent this long before a fault.
const SETTLE: Duration = Duration::from_millis(1000);
const POLL: Duration = Duration::from_millis(100);
/// The longest temp dir the demo works under (see [`TempDir::new`]).
const MAX_TMPDIR_LEN: usize = 64;
const NODE_ID: &str = "outpost-demo";
const SAMPLE_INTERVAL_MS: u64 = 250;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Broker(String),
    #[error("the generated demo config was refused:\n{0}")]
    Config(ConfigError),
    #[error("{0}")]
    Agent(String),
}

/// Options of `outpost demo`.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Show the agent's own logs (at the global --log-level) on stderr.
    pub verbose: bool,
}

/// A private directory under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, DemoError> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        // Unix socket paths (the agent's, the service manager's) must stay
        // under 108 bytes: a long TMPDIR falls back to /tmp.
        let base = Some(std::env::temp_dir())
            .filter(|d| d.as_os_str().len() <= MAX_TMPDIR_LEN)
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        let path = base.join(format!("outpost-demo-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| DemoError::Io {
                what: format!("create {}", path.display()),
                source: e,
            })?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the demo's temp dir");
        }
    }
}

fn free_port() -> Result<u16, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::Io {
            what: "find a free loopback port".into(),
            source: e,
        })
}

/// Runs the demo; the exit code.
pub fn run(opts: &DemoOptions) -> u8 {
    let started = Instant::now();
    let start_ms = now_ms();
    // Last resort: whatever hangs, the process ends. The service is killed
    // by the supervisor's handle; the temp dir goes with it.
    let watchdog_kill: KillSlot = Arc::new(std::sync::Mutex::new(None));
    {
        let kill = watchdog_kill.clone();
        let spawned = std::thread::Builder::new()
            .name("demo-watchdog".into())
            .spawn(move || {
                std::thread::sleep(HARD_DEADLINE);
                eprintln!(
                    "outpost demo: still running after {} s; giving up",
                    HARD_DEADLINE.as_secs()
                );
                if let Some(f) = kill.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    f();
                }
                std::process::exit(i32::from(EXIT_RUNTIME));
            });
        if let Err(e) = spawned {
            eprintln!("outpost demo: cannot start the watchdog thread: {e}");
            return EXIT_RUNTIME;
        }
    }
    let dir = match TempDir::new() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("outpost demo: {e}");
            return EXIT_RUNTIME;
        }
    };
    let code = match run_in(&dir.0, start_ms, started, opts, &watchdog_kill) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("outpost demo: {e}");
            EXIT_RUNTIME
        }
    };
    // Nothing left for the watchdog to kill; the temp dir is removed here.
    watchdog_kill
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    drop(dir);
    code
}

type KillSlot = Arc<std::sync::Mutex<Option<Box<dyn Fn() + Send>>>>;

fn run_in(
    dir: &Path,
    start_ms: i64,
    started: Instant,
    opts: &DemoOptions,
    watchdog_kill: &KillSlot,
) -> Result<u8, DemoError> {
    let exe = std::env::current_exe().map_err(|e| DemoError::Io {
        what: "find the outpost binary".into(),
        source: e,
    })?;
    let broker_port = free_port()?;
    let mut service_port = free_port()?;
    while service_port == broker_port {
        service_port = free_port()?;
    }
    let service_name = format!("demo-svc-{service_port}");
    let mut tl = Timeline::new(start_ms, NODE_ID);
    println!(
        "outpost demo: an embedded broker, a demo service, the real agent, and three faults \
         (over within {} s, whatever happens)",
        HARD_DEADLINE.as_secs() + 1
    );

    if opts.verbose {
        tl.line(
            now_ms(),
            "demo",
            &format!("working in {} (removed at the end)", dir.display()),
        );
    }
    broker::start(broker_port, Duration::from_secs(5))?;
    tl.line(
        now_ms(),
        "broker",
        &format!("embedded MQTT broker (rumqttd) on 127.0.0.1:{broker_port}"),
    );
    tl.print_ready(None);

    let (svc_tx, mut svc_rx) = mpsc::unbounded_channel::<ServiceEvent>();
    let mut sup = Supervisor::start(&exe, service_port, &service_name, dir, svc_tx)?;
    {
        let kill = sup.kill_handle();
        let dir = dir.to_path_buf();
        *watchdog_kill.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(move || {
            kill();
            let _ = std::fs::remove_dir_all(&dir);
        }));
    }
    tl.line(
        now_ms(),
        "service",
        &format!(
            "demo service {service_name} on http://127.0.0.1:{service_port}, restarted when it exits"
        ),
    );
    tl.print_ready(None);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DemoError::Io {
            what: "start the runtime".into(),
            source: e,
        })?;
    let result = rt.block_on(async {
        let cx = Context {
            dir,
            exe: &exe,
            broker_port,
            service_port,
            service_name: &service_name,
            stop_socket: sup.socket(),
        };
        drive(&cx, &mut tl, &mut svc_rx, started + DEADLINE).await
    });
    sup.shutdown();
    // Whatever the agent's tasks still hold is dropped with the runtime.
    rt.shutdown_timeout(Duration::from_secs(1));
    tl.print_ready(None);
    result?;
    let expected = FaultKind::ALL.len();
    println!("{}", tl.summary(expected));
    Ok(if tl.passed(expected) {
        EXIT_OK
    } else {
        EXIT_RUNTIME
    })
}

struct Context<'a> {
    dir: &'a Path,
    exe: &'a Path,
    broker_port: u16,
    service_port: u16,
    service_name: &'a str,
    stop_socket: &'a Path,
}

/// The agent's config for the demo, as an operator would write it.
fn config_text(cx: &Context<'_>) -> String {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let state = cx.dir.join("state");
    let mut t = format!(
        r#"# Generated by `outpost demo`.
[agent]
node_id = {node}
state_dir = {state}
sample_interval_ms = {SAMPLE_INTERVAL_MS}

[[target]]
name = "{TARGET}"
kind = "process"
process = {process}
probe = {{ http = "http://127.0.0.1:{port}/healthz", interval_ms = 250, timeout_ms = 200 }}

# The demo's service manager restarts the service once it is stopped.
[[command]]
name = "stop-svc"
argv = [{exe}, "demo-stop", "--socket", {socket}]
timeout = "5s"

[[rule]]
name = "{hang}"
target = "{TARGET}"
when = "probe_failed"
for = "3 samples"
do = "exec:stop-svc"
mode = "auto"
cooldown = "5s"
max_per_hour = 5
verify = "probe_ok within 10s"
escalate = "notify"

[[rule]]
name = "{leak}"
target = "{TARGET}"
when = "rss_mb > 64"
for = "2 samples"
do = "exec:stop-svc"
mode = "auto"
cooldown = "5s"
max_per_hour = 5
verify = "probe_ok within 10s"
escalate = "notify"

[[rule]]
name = "{spin}"
target = "{TARGET}"
when = "cpu_pct > 15"
for = "3 samples"
do = "exec:stop-svc"
mode = "auto"
cooldown = "5s"
max_per_hour = 5
verify = "probe_ok within 10s"
escalate = "notify"

[guard]
max_actions_per_hour = 20
"#,
        node = q(NODE_ID),
        state = q(&state.display().to_string()),
        process = q(cx.service_name),
        port = cx.service_port,
        exe = q(&cx.exe.display().to_string()),
        socket = q(&cx.stop_socket.display().to_string()),
        hang = FaultKind::Hang.rule(),
        leak = FaultKind::Leak.rule(),
        spin = FaultKind::Spin.rule(),
    );
    t.push_str(&format!(
        r#"
# The uplink: state, summaries and events to the embedded broker.
[mqtt]
url = "mqtt://127.0.0.1:{}"
summary_interval = "2s"
"#,
        cx.broker_port
    ));
    t
}

/// Writes and loads the demo config, through the same validation as an
/// operator's.
fn load_config(cx: &Context<'_>) -> Result<Config, DemoError> {
    let path = cx.dir.join("outpost.toml");
    std::fs::write(&path, config_text(cx)).map_err(|e| DemoError::Io {
        what: format!("write {}", path.display()),
        source: e,
    })?;
    let cfg = Config::load(&path).map_err(DemoError::Config)?;
    if cfg.mqtt.is_none() {
        return Err(DemoError::Agent(
            "the demo config's [mqtt] section did not enable the uplink".into(),
        ));
    }
    Ok(cfg)
}

/// What the store reader thread finds.
enum StoreRow {
    Audit(Box<AuditRow>),
    Incident(Incident),
}

/// Polls the agent's store (read-only) on its own thread and sends every
/// new audit row and incident.
fn spawn_store_reader(
    db: PathBuf,
    out: mpsc::UnboundedSender<StoreRow>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, DemoError> {
    std::thread::Builder::new()
        .name("demo-store-reader".into())
        .spawn(move || {
            let mut reader = None;
            let mut last_audit = 0i64;
            let mut last_incident = 0i64;
            while !stop.load(Ordering::SeqCst) {
                if reader.is_none() && db.exists() {
                    reader = crate::store::Reader::open(&db).ok();
                }
                if let Some(r) = &reader {
                    match r.actions(1000) {
                        Ok(rows) => {
                            let newer: Vec<AuditRow> =
                                rows.into_iter().filter(|r| r.id > last_audit).collect();
                            for row in newer {
                                last_audit = row.id;
                                let _ = out.send(StoreRow::Audit(Box::new(row)));
                            }
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "demo: cannot read the audit trail yet")
                        }
                    }
                    match r.incidents(200) {
                        Ok(rows) => {
                            let newer: Vec<Incident> =
                                rows.into_iter().filter(|i| i.id > last_incident).collect();
                            for inc in newer {
                                last_incident = inc.id;
                                let _ = out.send(StoreRow::Incident(inc));
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "demo: cannot read incidents yet"),
                    }
                }
                std::thread::sleep(POLL);
            }
        })
        .map_err(|e| DemoError::Io {
            what: "start the store reader thread".into(),
            source: e,
        })
}

/// `GET path` on the demo service; its answer's body.
async fn http_get(port: u16, path: &str) -> Result<String, String> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).to_string();
        if !text.starts_with("HTTP/1.1 200") {
            return Err(text.lines().next().unwrap_or("no answer").to_string());
        }
        Ok(text
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .map_err(|_| "no answer within 2 s".to_string())?
}

/// Where the demo is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the agent to see the service healthy.
    Starting,
    /// Waiting (since `.1`) for the service to be healthy for [`SETTLE`]
    /// before fault `i`.
    Settling(usize, Instant),
    /// Fault `i` is in; waiting for the agent to settle it.
    Active(usize),
    /// The agent settled fault `i` at `.1`; waiting for the fleet to hear.
    Reporting(usize, Instant),
    Done,
}

async fn drive(
    cx: &Context<'_>,
    tl: &mut Timeline,
    svc_rx: &mut mpsc::UnboundedReceiver<ServiceEvent>,
    deadline: Instant,
) -> Result<(), DemoError> {
    let deadline = tokio::time::Instant::from_std(deadline);
    let stop = CancellationToken::new();
    let (fleet_tx, mut fleet_rx) = mpsc::unbounded_channel::<FleetMessage>();
    fleet::subscribe(
        cx.broker_port,
        fleet_tx,
        stop.clone(),
        Duration::from_secs(5),
    )
    .await?;
    tl.line(
        now_ms(),
        "fleet",
        &format!(
            "fleet subscriber on {}/nodes/+/{{events,state,summary}}",
            fleet::TOPIC_PREFIX
        ),
    );

    let cfg = load_config(cx)?;
    let socket = cfg.socket_path();
    let db = cfg.db_path();
    let agent_stop = stop.child_token();
    let mut agent = tokio::spawn(crate::run(cfg, agent_stop.clone()));
    tl.line(
        now_ms(),
        "agent",
        &format!(
            "outpost running in-process as node {NODE_ID}: target {TARGET} (process {}, \
             HTTP probe), 3 rules in auto mode, uplink to mqtt://127.0.0.1:{}",
            cx.service_name, cx.broker_port
        ),
    );

    let (store_tx, mut store_rx) = mpsc::unbounded_channel::<StoreRow>();
    let reader_stop = Arc::new(AtomicBool::new(false));
    let reader = spawn_store_reader(db, store_tx, reader_stop.clone())?;

    let result = run_faults(
        cx,
        tl,
        &socket,
        &mut agent,
        svc_rx,
        &mut fleet_rx,
        &mut store_rx,
        deadline,
    )
    .await;

    agent_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(3), &mut agent).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = format!("{e:#}"), "the agent stopped with an error")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "the agent's task failed"),
        Err(_) => {
            tracing::warn!("the agent did not stop within 3 s");
            agent.abort();
        }
    }
    stop.cancel();
    reader_stop.store(true, Ordering::SeqCst);
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    // Late service events (the final stop) are not part of the story.
    while svc_rx.try_recv().is_ok() {}
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_faults(
    cx: &Context<'_>,
    tl: &mut Timeline,
    socket: &Path,
    agent: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
    svc_rx: &mut mpsc::UnboundedReceiver<ServiceEvent>,
    fleet_rx: &mut mpsc::UnboundedReceiver<FleetMessage>,
    store_rx: &mut mpsc::UnboundedReceiver<StoreRow>,
    deadline: tokio::time::Instant,
) -> Result<(), DemoError> {
    let mut phase = Phase::Starting;
    let mut healthy_since: Option<Instant> = None;
    let mut injected_at = Instant::now();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    // SIGTERM too: dying without cleanup would orphan the demo service.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| DemoError::Io {
            what: "install the SIGTERM handler".into(),
            source: e,
        })?;
    while phase != Phase::Done {
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                tl.heading(now_ms(), &format!("the demo's {} s deadline passed", DEADLINE.as_secs()));
                break;
            }
            _ = &mut interrupt => {
                tl.heading(now_ms(), "interrupted (SIGINT)");
                break;
            }
            _ = term.recv() => {
                tl.heading(now_ms(), "interrupted (SIGTERM)");
                break;
            }
            r = &mut *agent => {
                let why = match r {
                    Ok(Ok(())) => "the agent stopped".to_string(),
                    Ok(Err(e)) => format!("the agent failed: {e:#}"),
                    Err(e) => format!("the agent's task failed: {e}"),
                };
                tl.heading(now_ms(), &why);
                return Err(DemoError::Agent(why));
            }
            Some(e) = svc_rx.recv() => tl.on_service(now_ms(), &e),
            Some(m) = fleet_rx.recv() => tl.on_fleet(&m),
            Some(row) = store_rx.recv() => match row {
                StoreRow::Audit(r) => tl.on_audit(&r),
                StoreRow::Incident(i) => tl.on_incident(&i),
            },
            _ = tick.tick() => {
                tl.print_ready(Some(now_ms()));
                let live = crate::control::query(socket).await;
                let targets = live.as_ref().map(|l| l.targets.clone()).unwrap_or_default();
                let samples = live.as_ref().map_or(0, |l| l.samples);
                tl.on_live(&targets);
                let healthy = targets
                    .iter()
                    .find(|t| t.name == TARGET)
                    .is_some_and(|t| t.up && t.probe.as_ref().is_some_and(|p| p.ok));
                if healthy {
                    healthy_since.get_or_insert_with(Instant::now);
                } else {
                    healthy_since = None;
                }
                let settled = healthy_since.is_some_and(|t| t.elapsed() >= SETTLE);
                phase = match phase {
                    Phase::Starting if healthy && samples >= 4 => {
                        tl.line(now_ms(), "agent", &format!("sees {TARGET} healthy (probe ok); injecting faults"));
                        Phase::Settling(0, Instant::now())
                    }
                    Phase::Settling(i, since) if !settled && since.elapsed() >= RECOVERY_WINDOW => {
                        tl.heading(
                            now_ms(),
                            &format!(
                                "{TARGET} is still unhealthy {} s after fault {i}; the remaining faults are not injected",
                                RECOVERY_WINDOW.as_secs()
                            ),
                        );
                        Phase::Done
                    }
                    Phase::Settling(i, _) if settled => {
                        let kind = FaultKind::ALL[i];
                        let at = now_ms();
                        match http_get(cx.service_port, kind.path()).await {
                            Ok(answer) => {
                                injected_at = Instant::now();
                                tl.injected(kind, at, &answer);
                                Phase::Active(i)
                            }
                            Err(e) => {
                                tracing::warn!(fault = kind.label(), error = %e, "cannot inject the fault; retrying");
                                phase
                            }
                        }
                    }
                    Phase::Active(i) => {
                        let settled = tl.current().is_some_and(timeline::FaultRun::settled);
                        if settled || injected_at.elapsed() >= FAULT_WINDOW {
                            Phase::Reporting(i, Instant::now())
                        } else {
                            phase
                        }
                    }
                    Phase::Reporting(i, since) => {
                        let reported = tl.current().is_some_and(timeline::FaultRun::report_settled);
                        if reported || since.elapsed() >= UPSTREAM_WINDOW {
                            tl.close_fault(now_ms());
                            healthy_since = None;
                            if i + 1 < FaultKind::ALL.len() {
                                Phase::Settling(i + 1, Instant::now())
                            } else {
                                Phase::Done
                            }
                        } else {
                            phase
                        }
                    }
                    other => other,
                };
            }
        }
    }
    if matches!(phase, Phase::Active(_) | Phase::Reporting(..)) {
        tl.close_fault(now_ms());
    }
    tl.print_ready(None);
    Ok(())
}
