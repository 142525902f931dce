//! `outpost model …`: install, list, promote and roll back detector models
//! on this node. Changes go through the registry under the state directory
//! (see `detect::lifecycle`); a running agent is told over its control
//! socket and does promotions and rollbacks itself, so its in-memory trial
//! state stays right.

use std::path::{Path, PathBuf};

use clap::Subcommand;

use crate::cli::{StatePlace, EXIT_BAD_INPUT, EXIT_OK, EXIT_RUNTIME};
use crate::collect::sampler::now_ms;
use crate::config::Config;
use crate::control::{self, Request};
use crate::detect::engine::HOST_TARGET;
use crate::detect::lifecycle::{self, LifecycleError, PackageInfo};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Verify a model package and install it in shadow: it scores beside the
    /// running detectors, its would-be incidents are recorded as shadow, and
    /// nothing acts on it until it is promoted.
    Install {
        #[command(flatten)]
        place: StatePlace,
        /// The package directory (model.onnx + model.toml).
        dir: PathBuf,
        /// The target its incidents belong to.
        #[arg(long, default_value = HOST_TARGET)]
        target: String,
    },
    /// Installed models, their roles, and (from a running agent) their counts.
    List {
        #[command(flatten)]
        place: StatePlace,
        #[arg(long)]
        json: bool,
    },
    /// Make the shadow model active; the active one becomes the previous.
    Promote {
        #[command(flatten)]
        place: StatePlace,
    },
    /// Retire the active model and bring the previous one back.
    Rollback {
        #[command(flatten)]
        place: StatePlace,
    },
    /// Load a model package with tract as the agent does and run its
    /// self-test: exit 0 with a short report, or 2 with why it is refused.
    /// Needs no config and changes nothing.
    Verify {
        /// The package: a directory holding model.onnx and model.toml, or a
        /// .tar of one.
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub fn execute(cmd: ModelCommand) -> u8 {
    let place = match &cmd {
        ModelCommand::Verify { dir, json } => return verify(dir, *json),
        ModelCommand::Install { place, .. }
        | ModelCommand::List { place, .. }
        | ModelCommand::Promote { place }
        | ModelCommand::Rollback { place } => place,
    };
    let cfg = match place.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_BAD_INPUT;
        }
    };
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
    rt.block_on(async {
        match cmd {
            ModelCommand::Install { dir, target, .. } => install(&cfg, &dir, &target).await,
            ModelCommand::List { json, .. } => list(&cfg, json).await,
            ModelCommand::Promote { .. } => {
                change(&cfg, Request::ModelPromote, |d| {
                    lifecycle::promote(d, now_ms(), "local")
                        .map(|e| format!("{} promoted", e.label()))
                })
                .await
            }
            ModelCommand::Verify { .. } => EXIT_OK,
            ModelCommand::Rollback { .. } => {
                change(&cfg, Request::ModelRollback, |d| {
                    lifecycle::rollback(d, now_ms(), "local").map(|(r, b)| match b {
                        Some(b) => format!("{} rolled back; {} active", r.label(), b.label()),
                        None => format!("{} rolled back; baseline only", r.label()),
                    })
                })
                .await
            }
        }
    })
}

/// Inferences timed for the report.
const VERIFY_RUNS: usize = 200;

/// `outpost model verify`.
fn verify(path: &Path, json: bool) -> u8 {
    let mut model = match crate::detect::onnx::load_package(path) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("refused: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    // Per-inference time: the median of a few hundred steps on the first
    // self-test vector, through the same call the daemon makes.
    let x = model.manifest().selftests[0].input.clone();
    let mut times = Vec::with_capacity(VERIFY_RUNS);
    for _ in 0..VERIFY_RUNS {
        let t = std::time::Instant::now();
        if let Err(e) = model.score(&x) {
            eprintln!("{}: {e}", path.display());
            return EXIT_RUNTIME;
        }
        times.push(t.elapsed());
    }
    times.sort();
    let per = times[times.len() / 2];
    let m = model.manifest();
    let r = model.report();
    if json {
        let v = serde_json::json!({
            "ok": true,
            "name": m.name,
            "version": m.version,
            "kind": m.kind,
            "sha256": m.sha256,
            "features": m.features.iter().map(|f| &f.name).collect::<Vec<_>>(),
            "contributions": m.contributions_output.is_some(),
            "selftests": r.selftests,
            "selftest_max_diff": r.selftest_max_diff,
            "load_ms": r.load_time.as_secs_f64() * 1e3,
            "inference_us": per.as_secs_f64() * 1e6,
        });
        println!("{v}");
    } else {
        println!("{}@{} ({}): ok", m.name, m.version, m.kind);
        println!(
            "features:   {} ({}{})",
            m.features.len(),
            m.features
                .iter()
                .take(3)
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if m.features.len() > 3 { ", …" } else { "" }
        );
        println!(
            "self-test:  {} vectors, max diff {:.3e}",
            r.selftests, r.selftest_max_diff
        );
        println!(
            "load:       {:.1} ms; inference {:.1} µs per step (median of {VERIFY_RUNS})",
            r.load_time.as_secs_f64() * 1e3,
            per.as_secs_f64() * 1e6
        );
        println!("sha256:     {}", m.sha256);
    }
    EXIT_OK
}

fn fail(e: &LifecycleError) -> u8 {
    eprintln!("{e}");
    if e.is_bad_input() {
        EXIT_BAD_INPUT
    } else {
        EXIT_RUNTIME
    }
}

/// The feature names this node computes (from its newest stored vectors).
fn node_features(cfg: &Config) -> Vec<String> {
    let db = cfg.db_path();
    if !db.exists() {
        return Vec::new();
    }
    crate::store::Reader::open(&db)
        .and_then(|r| r.latest_feature_names())
        .unwrap_or_default()
}

/// Verifies a package for this node: it loads and passes its self-test,
/// and (once the node has stored features) every feature it consumes is
/// one the node computes.
pub fn verify_for_node(dir: &Path, node: &[String]) -> Result<PackageInfo, String> {
    let info = crate::detect::stage::verify_package(dir)?;
    if !node.is_empty() {
        let missing: Vec<&String> = info
            .features
            .iter()
            .filter(|f| node.binary_search(f).is_err())
            .collect();
        if let Some(first) = missing.first() {
            return Err(format!(
                "{}: feature {first:?} is not computed on this node ({} of {} features missing)",
                dir.join("model.toml").display(),
                missing.len(),
                info.features.len()
            ));
        }
    }
    Ok(info)
}

async fn install(cfg: &Config, dir: &Path, target: &str) -> u8 {
    let mut node = node_features(cfg);
    node.sort();
    let state_dir = &cfg.agent.state_dir;
    let result = lifecycle::install(state_dir, dir, target, now_ms(), "local", &|d| {
        verify_for_node(d, &node)
    });
    let entry = match result {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    give_to_state_owner(state_dir);
    println!("{} installed in shadow (target {target})", entry.label());
    match control::request(&cfg.socket_path(), &Request::ModelsChanged).await {
        Ok(reply) if reply.ok => println!("agent: {}", reply.message),
        Ok(reply) => eprintln!("agent: {}", reply.message),
        Err(_) => println!("the agent is not running; it loads the model when it starts"),
    }
    EXIT_OK
}

/// When root installs into a state directory owned by the agent's user,
/// the files become that user's, so the agent can replace them.
fn give_to_state_owner(state_dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(state_dir) else {
        return;
    };
    if rustix::process::geteuid().as_raw() != 0 || meta.uid() == 0 {
        return;
    }
    let (uid, gid) = (Some(meta.uid()), Some(meta.gid()));
    let models = lifecycle::models_dir(state_dir);
    let mut stack = vec![models];
    while let Some(p) = stack.pop() {
        let _ = std::os::unix::fs::chown(&p, uid, gid);
        if p.is_dir() {
            if let Ok(list) = std::fs::read_dir(&p) {
                stack.extend(list.flatten().map(|d| d.path()));
            }
        }
    }
}

/// Promote or roll back: by the running agent when there is one, else on
/// the registry directly.
async fn change(
    cfg: &Config,
    req: Request,
    offline: impl FnOnce(&Path) -> Result<String, LifecycleError>,
) -> u8 {
    let socket = cfg.socket_path();
    if control::query(&socket).await.is_some() {
        return match control::request(&socket, &req).await {
            Ok(r) if r.ok => {
                println!("{}", r.message);
                EXIT_OK
            }
            Ok(r) => {
                eprintln!("refused: {}", r.message);
                EXIT_BAD_INPUT
            }
            Err(e) => {
                eprintln!("{e}");
                EXIT_RUNTIME
            }
        };
    }
    match offline(&cfg.agent.state_dir) {
        Ok(msg) => {
            println!("{msg}");
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

async fn list(cfg: &Config, json: bool) -> u8 {
    let reg = match lifecycle::load(&cfg.agent.state_dir) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let live = control::query(&cfg.socket_path())
        .await
        .map(|s| s.models)
        .unwrap_or_default();
    if json {
        let v = serde_json::json!({ "registry": reg, "running": live });
        println!("{v}");
        return EXIT_OK;
    }
    println!(
        "{:<9} {:<32} {:<10} {:>8} {:>7}",
        "ROLE", "MODEL", "TARGET", "STEPS", "ALERTS"
    );
    for (role, e) in [
        ("active", &reg.active),
        ("shadow", &reg.shadow),
        ("previous", &reg.previous),
    ] {
        let Some(e) = e else { continue };
        let l = live.iter().find(|m| m.label == e.label() && m.role == role);
        let (steps, alerts) = l.map_or(("-".into(), "-".into()), |m| {
            (m.steps.to_string(), m.alerts.to_string())
        });
        println!(
            "{:<9} {:<32} {:<10} {:>8} {:>7}",
            role,
            e.label(),
            e.target,
            steps,
            alerts
        );
    }
    if reg.active.is_none() && reg.shadow.is_none() {
        println!("(no models installed: the baseline detector watches alone)");
    }
    EXIT_OK
}
