//! The fleet's config: what `config.apply` stores, and what `outpost run`
//! runs when it is within the local policy.
//!
//! The config file the agent is started with (`--config`, root-owned
//! `/etc/outpost/outpost.toml` under the shipped unit) is the **local
//! policy**: the polkit grant and the vetted `[[command]]` list come from it
//! only, and the agent cannot write it. A config pushed with `config.apply`
//! is stored in the agent's state directory as [`FILE`] (0600, written
//! atomically, the one it replaced kept as `FILE.prev` for the watchdog).
//! At start and at every reload the agent runs the pushed config when there
//! is one, it validates, and it is [within](check) the local policy;
//! otherwise it logs why and runs the local config.
//!
//! Within the local policy means ([`violations`]):
//! - every action a pushed rule can take (`do` and `escalate`, on the unit,
//!   container, process or host its target names) is one some local rule
//!   takes on the same target, in a mode at least as permissive (`auto` >
//!   `approve` > `suggest`): a push cannot add a unit, container or verb,
//!   nor drop the approval step the local policy asks for;
//! - every pushed `[[command]]` is the local one of that name, unchanged;
//! - signing: with local `trusted_keys`, the push must name keys (it cannot
//!   turn on `allow_unsigned` nor empty the list); a local policy that takes
//!   no fleet commands cannot be opened by a push; only a local
//!   `allow_unsigned` lets the push choose freely;
//! - every unit protected locally stays protected (every local protected
//!   pattern is kept, `guard.unprotect` removes nothing the local config does
//!   not), and a local `dry_run` stays on;
//! - `agent.state_dir`, `guard.pause_file` (the local pause switch) and
//!   `collect.container_socket` are the local ones.
//!
//! `[mqtt]`, the rest of `[fleet]`, targets, probes, detection, budgets and
//! rules within the above are the fleet's to change.

use std::path::{Path, PathBuf};

use crate::config::{Config, TargetKind};
use crate::decide::types::{ActionKind, ActionTarget, Mode};

/// The pushed config's file name, in the state directory.
pub const FILE: &str = "fleet-config.toml";

/// Where `config.apply` stores the pushed config.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// Why a pushed config is not within the local policy: one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("outside the local policy of {local}:\n{}", render(problems))]
pub struct OutsidePolicy {
    /// The local config's file (or `<built-in>`).
    pub local: String,
    pub problems: Vec<String>,
}

fn render(problems: &[String]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `Ok` when `pushed` is within the policy of `local`.
pub fn check(local: &Config, pushed: &Config) -> Result<(), OutsidePolicy> {
    let problems = violations(local, pushed);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(OutsidePolicy {
            local: local
                .source
                .as_ref()
                .map_or("<built-in>".to_string(), |p| p.display().to_string()),
            problems,
        })
    }
}

fn rank(m: Mode) -> u8 {
    match m {
        Mode::Suggest => 0,
        Mode::Approve => 1,
        Mode::Auto => 2,
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Suggest => "suggest",
        Mode::Approve => "approve",
        Mode::Auto => "auto",
    }
}

fn target_name(t: &ActionTarget) -> String {
    match t {
        ActionTarget::Systemd { unit } => unit.clone(),
        ActionTarget::Container { container } => format!("container {container}"),
        ActionTarget::Host => "the host".into(),
        ActionTarget::Process { process } => format!("process {process}"),
    }
}

/// The most permissive mode of the local rules that take `action` (as `do`
/// or `escalate`) on `target`; `None`: no local rule does.
fn local_mode(local: &Config, target: &ActionTarget, action: &ActionKind) -> Option<Mode> {
    local
        .rules
        .iter()
        .filter(|r| &r.action_target == target && (&r.action == action || &r.escalate == action))
        .map(|r| r.mode)
        .max_by_key(|m| rank(*m))
}

/// Every way `pushed` goes beyond the policy of `local`, one sentence each;
/// empty when it stays within it. Pure: the config files are not read.
pub fn violations(local: &Config, pushed: &Config) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |s: String| {
        if !out.contains(&s) {
            out.push(s);
        }
    };

    // What the rules act on, and how.
    for rule in &pushed.rules {
        for action in [&rule.action, &rule.escalate] {
            if !action.touches_host() {
                continue;
            }
            let what = format!(
                "rule {:?}: {} on {} ({})",
                rule.name,
                action.label(),
                target_name(&rule.action_target),
                mode_name(rule.mode)
            );
            match local_mode(local, &rule.action_target, action) {
                None => add(format!("{what}: no local rule does this")),
                Some(m) if rank(m) < rank(rule.mode) => add(format!(
                    "{what}: the local rules do this only in {} mode",
                    mode_name(m)
                )),
                Some(_) => {}
            }
        }
    }

    // The vetted commands are the local ones.
    for c in &pushed.commands {
        match local.commands.iter().find(|l| l.name == c.name) {
            None => add(format!(
                "[[command]] {:?}: not in the local config (the command list is local)",
                c.name
            )),
            Some(l) if l != c => add(format!(
                "[[command]] {:?}: differs from the local one (argv or timeout; the command list is local)",
                c.name
            )),
            Some(_) => {}
        }
    }

    // Who may command the node.
    let (lk, pk) = (&local.fleet.trusted_keys, &pushed.fleet.trusted_keys);
    let local_open = lk.is_empty() && local.fleet.allow_unsigned;
    if !local_open {
        if pk.is_empty() && pushed.fleet.allow_unsigned {
            add("fleet.allow_unsigned: the local policy does not take unsigned commands".into());
        }
        if !lk.is_empty() && pk.is_empty() {
            add(
                "fleet.trusted_keys: the local policy takes only signed commands; the pushed \
                 config names no trusted key"
                    .into(),
            );
        }
        if lk.is_empty() && !pk.is_empty() {
            add(
                "fleet.trusted_keys: the local policy takes no fleet commands; a pushed config \
                 cannot add keys"
                    .into(),
            );
        }
    }

    // Protected units stay protected.
    let (lp, pp) = (&local.guard.protected, &pushed.guard.protected);
    for p in lp.patterns() {
        if !pp.patterns().any(|q| q == p) {
            add(format!(
                "guard: {p:?} is protected locally; the pushed config must keep it protected"
            ));
        }
    }
    for u in pp.unprotected() {
        if !lp.unprotected().contains(u) {
            add(format!(
                "guard.unprotect: {u:?} is protected locally; a pushed config cannot unprotect it"
            ));
        }
    }
    for t in &pushed.targets {
        if let TargetKind::Systemd { unit } = &t.kind {
            if lp.is_protected(unit) && !pp.is_protected(unit) {
                add(format!(
                    "target {:?}: {unit} is protected locally; the pushed config must keep it protected",
                    t.name
                ));
            }
        }
    }
    if local.guard.dry_run && !pushed.guard.dry_run {
        add("guard.dry_run: on locally; a pushed config cannot turn it off".into());
    }

    // Local settings.
    if pushed.agent.state_dir != local.agent.state_dir {
        add(format!(
            "agent.state_dir: {} is local (the pushed config says {})",
            local.agent.state_dir.display(),
            pushed.agent.state_dir.display()
        ));
    }
    if pushed.guard.pause_file != local.guard.pause_file {
        add(format!(
            "guard.pause_file: {} is the local pause switch (the pushed config says {})",
            local.guard.pause_file.display(),
            pushed.guard.pause_file.display()
        ));
    }
    if pushed.collect.container_socket != local.collect.container_socket {
        add("collect.container_socket: the container socket is local".into());
    }
    out
}

/// Which config `outpost run` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// No pushed config (or no local config file to check one against).
    Local,
    /// The pushed config, at this path.
    Fleet(PathBuf),
    /// A pushed config exists but is refused; the local config runs.
    Refused { path: PathBuf, why: String },
}

impl Selection {
    /// Logs the choice (a refusal as an error, with every reason).
    pub fn log(&self) {
        match self {
            Selection::Local => {}
            Selection::Fleet(path) => {
                tracing::info!(config = %path.display(), "running the fleet config (within the local policy)");
            }
            Selection::Refused { path, why } => {
                for line in why.lines() {
                    tracing::error!(config = %path.display(), error = %line, "fleet config refused; running the local config");
                }
            }
        }
    }

    /// The `config.refused` event for a refusal.
    pub fn refusal_event(&self) -> Option<super::EventBody> {
        match self {
            Selection::Refused { path, why } => Some(super::EventBody::new(
                super::message::events::CONFIG_REFUSED,
                serde_json::json!({ "source": path.display().to_string(), "error": why }),
            )),
            _ => None,
        }
    }
}

/// The config to run: the pushed one in `state_dir` when it exists,
/// validates and is within the policy of `local`; else `local`. A local
/// config without a file (the built-in default) has no pushed config.
pub fn select(local: Config, state_dir: &Path) -> (Config, Selection) {
    if local.source.is_none() {
        return (local, Selection::Local);
    }
    let path = path(state_dir);
    match std::fs::metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (local, Selection::Local),
        Err(e) => {
            let why = format!("{}: {e}", path.display());
            return (local, Selection::Refused { path, why });
        }
    }
    let pushed = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            let why = e.to_string();
            return (local, Selection::Refused { path, why });
        }
    };
    match check(&local, &pushed) {
        Ok(()) => (pushed, Selection::Fleet(path)),
        Err(e) => (
            local,
            Selection::Refused {
                path,
                why: e.to_string(),
            },
        ),
    }
}

#[cfg(test)]
mod tests;
