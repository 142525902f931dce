//! The command line. `main` parses it and calls [`execute`]; every command
//! returns its exit code: 0 ok, 1 runtime failure, 2 bad input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::collect::sampler::now_ms;
use crate::config::{self, Config};
use crate::logging::LogFormat;

pub const EXIT_OK: u8 = 0;
pub const EXIT_RUNTIME: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "outpost",
    version,
    about = "A small self-healing agent for edge hosts"
)]
pub struct Cli {
    /// Where logs go: auto (the journal under systemd, else text), text, json.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `outpost=debug`; RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent. With no config it watches the host on built-in defaults.
    Run {
        /// The local config: the node's policy. A config the fleet pushed
        /// (STATE_DIR/fleet-config.toml) runs instead while it is within it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file: exit 0, or 2 with FILE:LINE:COL: key: problem lines.
    CheckConfig { file: PathBuf },
    /// What the agent sees: live from the running agent, else from the store.
    Status {
        #[command(flatten)]
        place: StatePlace,
        #[arg(long)]
        json: bool,
    },
    /// The audit trail: every decision, acted on or not, and why.
    Actions {
        #[command(flatten)]
        place: StatePlace,
        #[arg(long)]
        json: bool,
        /// How many of the newest rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Walk the whole hash chain; exit 1 if a row was edited or removed.
        #[arg(long)]
        verify_chain: bool,
    },
    /// Incidents: episodes of a rule's condition or of an anomaly.
    Incidents {
        #[command(flatten)]
        place: StatePlace,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Approve a decision that is waiting for approval.
    Approve {
        #[command(flatten)]
        place: StatePlace,
        id: u64,
    },
    /// Stop every action on this node until `outpost resume` (creates the
    /// guard's pause file; decisions are still made and audited as
    /// suppressed).
    Pause {
        #[command(flatten)]
        place: StatePlace,
        /// Why, kept in the pause file for whoever looks next.
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
    },
    /// Lift a pause (removes the guard's pause file).
    Resume {
        #[command(flatten)]
        place: StatePlace,
    },
    /// Deny a decision that is waiting for approval.
    Deny {
        #[command(flatten)]
        place: StatePlace,
        id: u64,
    },
    /// Run a detector over a recorded CSV (an `outpost export` file, or a
    /// NAB-style `timestamp,value` file) as fast as it can; writes one row per
    /// input row with `anomaly_score` in [0, 1].
    Replay {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// `baseline` (the built-in detector) or a model package (a
        /// directory or .tar), run through the same calls as in the daemon.
        #[arg(long, default_value = "baseline")]
        detector: String,
    },
    /// Detector models on this node: install (in shadow), list, promote,
    /// roll back.
    Model {
        #[command(subcommand)]
        cmd: crate::model_cli::ModelCommand,
    },
    /// Write stored feature vectors as CSV (a header of feature names).
    Export {
        #[command(flatten)]
        place: StatePlace,
        /// How far back, e.g. `1h`, `7d`.
        #[arg(long, default_value = "1d")]
        since: String,
        /// Output file; `-` for stdout.
        #[arg(long)]
        out: PathBuf,
    },
    /// A one-minute tour: three faults injected, detected and fixed live.
    ///
    /// No setup: an embedded MQTT broker, a demo service under a small
    /// service manager, the real agent in-process and a fleet subscriber.
    /// Prints a timeline from the agent's audit trail and the fleet's
    /// messages; exit 0 when every fault was detected, remediated and
    /// reported upstream.
    #[cfg(feature = "demo")]
    Demo {
        /// Also show the agent's own logs (at --log-level) on stderr.
        #[arg(long)]
        verbose: bool,
    },
    /// A one-minute tour; not in this build (the packages leave out the
    /// demo's embedded broker): run it from a source checkout with
    /// `cargo run --release -p outpost -- demo`.
    #[cfg(not(feature = "demo"))]
    Demo {
        #[arg(long, hide = true)]
        verbose: bool,
    },
    /// The demo's HTTP service (started by `outpost demo`).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    DemoService {
        #[arg(long)]
        port: u16,
    },
    /// Asks the demo's service manager to stop the demo service (the
    /// demo's remediation command).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    DemoStop {
        #[arg(long)]
        socket: PathBuf,
    },
    /// The operator's view of the fleet over the broker: nodes, live
    /// events, and signed commands (approve, pause, push-config, ...).
    Fleet(Box<crate::fleet::FleetArgs>),
    /// Print the polkit rule (JavaScript) that lets the agent's user manage
    /// exactly the systemd units the config's rules act on.
    PolkitRules {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The user the agent runs as.
        #[arg(long, default_value = crate::polkit::DEFAULT_USER)]
        user: String,
        /// Write the rule to this file (atomically, mode 0644) instead of
        /// stdout, e.g. /etc/polkit-1/rules.d/50-outpost.rules.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// With --output: when its directory does not exist (polkit is not
        /// installed), say so and exit 0 without writing.
        #[arg(long, requires = "output")]
        skip_missing_dir: bool,
    },
}

/// Where a reading command finds the agent's state.
#[derive(Debug, clap::Args)]
pub struct StatePlace {
    /// The agent's config file (its state_dir is used).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The state directory, overriding the config's.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

impl StatePlace {
    pub(crate) fn config(&self) -> Result<Config, config::ConfigError> {
        let mut cfg = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::builtin(),
        };
        if let Some(dir) = &self.state_dir {
            cfg.agent.state_dir = dir.clone();
        }
        Ok(cfg)
    }
}

fn bad_config(e: &config::ConfigError) -> u8 {
    eprintln!("{e}");
    EXIT_BAD_INPUT
}

/// Runs a parsed command line.
pub fn execute(cli: Cli) -> u8 {
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                for w in cfg.render_warnings(&file.display().to_string()) {
                    eprintln!("{w}");
                }
                println!(
                    "{}: ok ({} targets, node {})",
                    file.display(),
                    cfg.targets.len(),
                    cfg.agent.node_id
                );
                EXIT_OK
            }
            Err(e) => bad_config(&e),
        },
        Command::Run { config } => {
            let cfg = match config {
                Some(p) => match Config::load(&p) {
                    Ok(c) => c,
                    Err(e) => return bad_config(&e),
                },
                None => Config::builtin(),
            };
            // Before any other thread exists (see memtrim).
            crate::memtrim::fix_mmap_threshold();
            crate::logging::init(cli.log_format, &cli.log_level);
            run_daemon(cfg)
        }
        Command::Status { place, json } => {
            let cfg = match place.config() {
                Ok(c) => c,
                Err(e) => return bad_config(&e),
            };
            status(&cfg, json)
        }
        Command::Actions {
            place,
            json,
            limit,
            verify_chain,
        } => match place.config() {
            Ok(cfg) => actions(&cfg, json, limit, verify_chain),
            Err(e) => bad_config(&e),
        },
        Command::Incidents { place, json, limit } => match place.config() {
            Ok(cfg) => incidents(&cfg, json, limit),
            Err(e) => bad_config(&e),
        },
        Command::Approve { place, id } => match place.config() {
            Ok(cfg) => decide_request(&cfg, crate::control::Request::Approve { id, by: None }),
            Err(e) => bad_config(&e),
        },
        Command::Deny { place, id } => match place.config() {
            Ok(cfg) => decide_request(&cfg, crate::control::Request::Deny { id, by: None }),
            Err(e) => bad_config(&e),
        },
        Command::Pause { place, reason } => match place.config() {
            Ok(cfg) => pause(&cfg, &reason),
            Err(e) => bad_config(&e),
        },
        Command::Resume { place } => match place.config() {
            Ok(cfg) => resume(&cfg),
            Err(e) => bad_config(&e),
        },
        Command::Replay {
            input,
            output,
            detector,
        } => replay(&input, &output, &detector),
        Command::Model { cmd } => crate::model_cli::execute(cmd),
        Command::Export { place, since, out } => {
            let cfg = match place.config() {
                Ok(c) => c,
                Err(e) => return bad_config(&e),
            };
            let since = match config::parse_duration(&since) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("--since: {e}");
                    return EXIT_BAD_INPUT;
                }
            };
            export(&cfg, since, &out)
        }
        #[cfg(feature = "demo")]
        Command::Demo { verbose } => {
            if verbose {
                crate::logging::init(cli.log_format, &cli.log_level);
            } else {
                // The timeline is the output; only what an operator must
                // act on is logged (the broker's per-connection noise never).
                crate::logging::init(LogFormat::Text, "error,rumqttd=off");
            }
            crate::demo::run(&crate::demo::DemoOptions { verbose })
        }
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => {
            eprintln!(
                "outpost demo is not in this build: the packages leave out its embedded \
                 MQTT broker. Run it from a source checkout: \
                 cargo run --release -p outpost -- demo"
            );
            EXIT_BAD_INPUT
        }
        #[cfg(feature = "demo")]
        Command::DemoService { port } => crate::demo::service::serve(port),
        #[cfg(feature = "demo")]
        Command::DemoStop { socket } => crate::demo::service::stop(&socket),
        Command::Fleet(args) => {
            crate::logging::init(cli.log_format, &cli.log_level);
            crate::fleet::execute(*args)
        }
        Command::PolkitRules {
            config,
            user,
            output,
            skip_missing_dir,
        } => polkit_rules(
            config.as_deref(),
            &user,
            output.as_deref(),
            skip_missing_dir,
        ),
    }
}

fn polkit_rules(
    config: Option<&Path>,
    user: &str,
    output: Option<&Path>,
    skip_missing_dir: bool,
) -> u8 {
    let cfg = match config {
        Some(p) => match Config::load(p) {
            Ok(c) => c,
            Err(e) => return bad_config(&e),
        },
        None => Config::builtin(),
    };
    if !crate::polkit::valid_user(user) {
        eprintln!("--user: {user:?} is not a user name");
        return EXIT_BAD_INPUT;
    }
    let js = crate::polkit::render(&cfg, user);
    let Some(out) = output else {
        print!("{js}");
        return EXIT_OK;
    };
    if skip_missing_dir {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                eprintln!(
                    "{} does not exist (polkit is not installed?): no polkit rule written",
                    dir.display()
                );
                return EXIT_OK;
            }
        }
    }
    match write_atomically(out, js.as_bytes(), 0o644) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("cannot write {}: {e:#}", out.display());
            EXIT_RUNTIME
        }
    }
}

/// Writes `path` through a temporary file in the same directory and a
/// rename, so a reader (polkit's file monitor) never sees half a file.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(data).context("write")?;
    tmp.1
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .context("chmod")?;
    tmp.1.sync_all().context("fsync")?;
    std::fs::rename(&tmp.0, path).context("rename")?;
    Ok(())
}

/// A new file `.NAME.tmp-PID` in `dir`, created exclusively.
fn tempfile_in(dir: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    use anyhow::Context as _;
    let p = dir.join(format!(".outpost-polkit.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)
        .with_context(|| format!("create {}", p.display()))?;
    Ok((p, f))
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    // One thread: the agent's work is small and latency-tolerant; SQLite has
    // its own thread.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start the runtime: {e}");
            EXIT_RUNTIME
        })
}

fn run_daemon(cfg: Config) -> u8 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install SIGTERM/SIGINT handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
                _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
            }
            signals.cancel();
        });
        match crate::run(cfg, shutdown).await {
            Ok(()) => EXIT_OK,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "outpost failed");
                eprintln!("outpost: {e:#}");
                EXIT_RUNTIME
            }
        }
    })
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn db_bytes(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    file_size(db) + file_size(Path::new(&wal))
}

fn fmt_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn status(cfg: &Config, json: bool) -> u8 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let db = cfg.db_path();
    let live = rt.block_on(crate::control::query(&cfg.socket_path()));
    let store = match crate::store::Reader::open(&db).and_then(|r| r.status()) {
        Ok(s) => Some(s),
        Err(e) => {
            if live.is_none() {
                eprintln!(
                    "no running agent answers at {} and the store cannot be read: {e}",
                    cfg.socket_path().display()
                );
                return EXIT_RUNTIME;
            }
            None
        }
    };
    let bytes = db_bytes(&db);
    if json {
        let doc = serde_json::json!({
            "running": live.is_some(),
            "live": live,
            "store": store,
            "store_path": db.display().to_string(),
            "store_bytes": bytes,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return EXIT_OK;
    }
    let mut out = std::io::stdout().lock();
    let (node, targets, newest) = if let Some(l) = &live {
        (l.node_id.clone(), l.targets.clone(), l.newest_feature_ms)
    } else if let Some(s) = &store {
        (s.node_id.clone(), s.targets.clone(), s.newest_feature_ms)
    } else {
        return EXIT_RUNTIME;
    };
    let _ = writeln!(out, "node:     {node}");
    match &live {
        Some(l) => {
            let up = (now_ms() - l.started_ms).max(0) / 1000;
            let _ = writeln!(
                out,
                "agent:    running, pid {}, up {}, {} signals, {} samples",
                l.pid,
                humantime::format_duration(Duration::from_secs(up as u64)),
                l.signals,
                l.samples
            );
        }
        None => {
            let _ = writeln!(out, "agent:    not running (state from the store)");
        }
    }
    if let Some(l) = &live {
        let uplink = l
            .uplink
            .as_ref()
            .map_or("none (no [mqtt] section)".to_string(), |u| u.line());
        let _ = writeln!(out, "uplink:   {uplink}");
    }
    let _ = writeln!(
        out,
        "features: newest {}",
        newest.map_or("none yet".to_string(), fmt_ms)
    );
    let _ = writeln!(out, "store:    {} ({} bytes)", db.display(), bytes);
    if targets.is_empty() {
        let _ = writeln!(out, "targets:  none configured (watching the host)");
    } else {
        let _ = writeln!(out, "targets:");
        for t in targets {
            let probe = t.probe.as_ref().map_or(String::new(), |p| {
                if p.ok {
                    format!(", probe ok {:.1} ms", p.latency_ms)
                } else {
                    format!(", probe FAILED: {}", p.error.clone().unwrap_or_default())
                }
            });
            let _ = writeln!(
                out,
                "  {:<16} {:<10} {:<4} {}{}",
                t.name,
                t.kind,
                if t.up { "up" } else { "DOWN" },
                t.state,
                probe
            );
        }
    }
    if let Some(l) = &live {
        let scores: Vec<String> = l
            .anomaly
            .iter()
            .map(|(t, s)| format!("{t} {s:.2}"))
            .collect();
        let _ = writeln!(
            out,
            "anomaly:  {} ({} incidents open)",
            if scores.is_empty() {
                "no scores yet".to_string()
            } else {
                scores.join(", ")
            },
            l.open_incidents
        );
        let models: Vec<String> = l
            .models
            .iter()
            .map(|m| {
                format!(
                    "{} {} ({} steps, {} alerts)",
                    m.role, m.label, m.steps, m.alerts
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "models:   {}",
            if models.is_empty() {
                "none (baseline only)".to_string()
            } else {
                models.join("; ")
            }
        );
    }
    EXIT_OK
}

fn export(cfg: &Config, since: Duration, out: &Path) -> u8 {
    let reader = match crate::store::Reader::open(&cfg.db_path()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: {e}", cfg.db_path().display());
            return EXIT_RUNTIME;
        }
    };
    let since_ms = now_ms() - since.as_millis() as i64;
    let result = if out == Path::new("-") {
        let mut w = std::io::BufWriter::new(std::io::stdout().lock());
        reader.export_csv(since_ms, &mut w).and_then(|n| {
            w.flush().map_err(crate::store::StoreError::from)?;
            Ok(n)
        })
    } else {
        // Write beside the target and rename, so a failed export never
        // leaves a half-written file where a good one is expected.
        let tmp = out.with_extension("partial");
        let written = std::fs::File::create(&tmp)
            .map_err(crate::store::StoreError::from)
            .and_then(|f| {
                let mut w = std::io::BufWriter::new(f);
                let n = reader.export_csv(since_ms, &mut w)?;
                w.flush().map_err(crate::store::StoreError::from)?;
                Ok(n)
            })
            .and_then(|n| {
                std::fs::rename(&tmp, out).map_err(crate::store::StoreError::from)?;
                Ok(n)
            });
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    };
    match result {
        Ok(n) => {
            eprintln!("exported {n} feature vectors to {}", out.display());
            EXIT_OK
        }
        Err(e) => {
            eprintln!("export failed: {e}");
            EXIT_RUNTIME
        }
    }
}

fn open_reader(cfg: &Config) -> Result<crate::store::Reader, u8> {
    crate::store::Reader::open(&cfg.db_path()).map_err(|e| {
        eprintln!("{}: {e}", cfg.db_path().display());
        EXIT_RUNTIME
    })
}

fn actions(cfg: &Config, json: bool, limit: u32, verify_chain: bool) -> u8 {
    let reader = match open_reader(cfg) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if verify_chain {
        return match reader.verify_chain() {
            Ok(report) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&report).unwrap_or_default()
                    );
                } else if report.ok {
                    println!("audit chain ok: {} rows", report.rows);
                } else {
                    println!(
                        "audit chain BROKEN: {}",
                        report.problem.clone().unwrap_or_default()
                    );
                }
                if report.ok {
                    EXIT_OK
                } else {
                    EXIT_RUNTIME
                }
            }
            Err(e) => {
                eprintln!("cannot read the audit trail: {e}");
                EXIT_RUNTIME
            }
        };
    }
    let rows = match reader.actions(limit) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot read the audit trail: {e}");
            return EXIT_RUNTIME;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return EXIT_OK;
    }
    if rows.is_empty() {
        println!("no decisions recorded");
    }
    for r in rows {
        let e = &r.entry;
        println!(
            "{:>5}  {}  #{:<4} {:<18} {:<12} {:<14} {:<18} {}",
            r.id,
            fmt_ms(e.ts_ms),
            e.decision_id,
            e.rule.as_deref().unwrap_or("-"),
            e.target,
            e.action,
            e.decision,
            e.reason
        );
    }
    EXIT_OK
}

fn incidents(cfg: &Config, json: bool, limit: u32) -> u8 {
    let reader = match open_reader(cfg) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let rows = match reader.incidents(limit) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot read incidents: {e}");
            return EXIT_RUNTIME;
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return EXIT_OK;
    }
    if rows.is_empty() {
        println!("no incidents recorded");
    }
    for i in rows {
        println!(
            "{:>5}  {:<12} opened {}  {}  score {:.2}  {}",
            i.id,
            i.target,
            fmt_ms(i.opened_ms),
            i.closed_ms
                .map_or("OPEN".to_string(), |c| format!("closed {}", fmt_ms(c))),
            i.score,
            i.explanation
        );
    }
    EXIT_OK
}

fn decide_request(cfg: &Config, req: crate::control::Request) -> u8 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(crate::control::request(&cfg.socket_path(), &req)) {
        Ok(reply) if reply.ok => {
            println!("{}", reply.message);
            EXIT_OK
        }
        Ok(reply) => {
            eprintln!("refused: {}", reply.message);
            EXIT_BAD_INPUT
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_RUNTIME
        }
    }
}

fn replay(input: &Path, output: &Path, detector: &str) -> u8 {
    use crate::detect::baseline::BaselineConfig;
    use crate::detect::replay::{ReplayDetector, ReplayError};
    let detector = match detector {
        "baseline" => ReplayDetector::Baseline(BaselineConfig::default()),
        dir => match crate::detect::onnx::load_package(Path::new(dir)) {
            Ok(m) => ReplayDetector::Model(Box::new(m)),
            Err(e) => {
                eprintln!("--detector: expected `baseline` or a model package: {e}");
                return EXIT_BAD_INPUT;
            }
        },
    };
    match crate::detect::replay::replay(input, output, detector) {
        Ok(s) => {
            println!(
                "rows={} alerts={} seconds={:.6} rows_per_sec={:.0}",
                s.rows,
                s.alerts,
                s.elapsed.as_secs_f64(),
                s.rows_per_sec()
            );
            EXIT_OK
        }
        Err(e @ ReplayError::Parse { .. }) => {
            eprintln!("{e}");
            EXIT_BAD_INPUT
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_RUNTIME
        }
    }
}

fn pause(cfg: &Config, reason: &str) -> u8 {
    let path = &cfg.guard.pause_file;
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        // The state directory is private to the agent; create it so.
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            eprintln!("{}: {e}", dir.display());
            return EXIT_RUNTIME;
        }
    }
    let text = format!("{}\n{}\n", fmt_ms(now_ms()), reason.trim());
    match std::fs::write(path, text) {
        Ok(()) => {
            println!(
                "paused: nothing acts until `outpost resume` ({})",
                path.display()
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            EXIT_RUNTIME
        }
    }
}

fn resume(cfg: &Config) -> u8 {
    let path = &cfg.guard.pause_file;
    match std::fs::remove_file(path) {
        Ok(()) => {
            println!("resumed ({} removed)", path.display());
            EXIT_OK
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("not paused");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            EXIT_RUNTIME
        }
    }
}
