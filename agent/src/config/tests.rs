use super::*;

fn problems(text: &str) -> Vec<Problem> {
    match parse_str(text, "t.toml") {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.problems().to_vec(),
    }
}

#[test]
fn builtin_default_is_valid() {
    let c = Config::builtin();
    assert_eq!(c.agent.sample_interval, Duration::from_millis(1000));
    assert_eq!(c.features.window, DEFAULT_FEATURE_WINDOW);
    assert_eq!(c.features.step, DEFAULT_FEATURE_STEP);
    assert!(c.targets.is_empty());
    assert!(!c.agent.node_id.is_empty());
}

#[test]
fn full_config_parses() {
    let c = parse_str(
        r#"
[agent]
node_id = "press-line-7"
state_dir = "/var/lib/outpost"
sample_interval_ms = 500

[store]
retention = "7d"
max_db_mb = 64
flush_interval = "2m"

[features]
window = "30s"
step = "5s"

[[target]]
name = "web"
kind = "systemd"
unit = "nginx.service"
probe = { http = "http://127.0.0.1:8080/healthz", interval_ms = 500, timeout_ms = 300 }

[[target]]
name = "broker"
kind = "container"
container = "mosquitto"
probe = { tcp = "127.0.0.1:1883" }

[[target]]
name = "app"
kind = "process"
process = "python3"
"#,
        "t.toml",
    )
    .expect("valid");
    assert_eq!(c.agent.node_id, "press-line-7");
    assert_eq!(c.agent.sample_interval, Duration::from_millis(500));
    assert_eq!(c.store.retention, Duration::from_secs(7 * 86400));
    assert_eq!(c.store.max_db_bytes, 64 * 1024 * 1024);
    assert_eq!(c.store.flush_interval, Duration::from_secs(120));
    assert_eq!(c.features.window, Duration::from_secs(30));
    assert_eq!(c.targets.len(), 3);
    assert_eq!(
        c.targets[0].kind,
        TargetKind::Systemd {
            unit: "nginx.service".into()
        }
    );
    let probe = c.targets[0].probe.as_ref().expect("probe");
    assert_eq!(
        probe.check,
        ProbeCheck::Http {
            url: "http://127.0.0.1:8080/healthz".into(),
            host: "127.0.0.1".into(),
            port: 8080,
            path: "/healthz".into()
        }
    );
    assert_eq!(probe.interval, Duration::from_millis(500));
    assert_eq!(probe.timeout, Duration::from_millis(300));
    let probe = c.targets[1].probe.as_ref().expect("probe");
    assert_eq!(
        probe.timeout,
        Duration::from_millis(DEFAULT_PROBE_TIMEOUT_MS)
    );
}

#[test]
fn unknown_key_points_at_line_and_key() {
    let p = problems("[agent]\nnode_id = \"a\"\nsample_intervl_ms = 5\n");
    assert_eq!(p.len(), 1);
    assert_eq!((p[0].line, p[0].col), (3, 1));
    assert_eq!(p[0].key, "agent.sample_intervl_ms");
    assert!(p[0].message.contains("unknown field"), "{}", p[0].message);
}

#[test]
fn wrong_type_points_at_value() {
    let p = problems("[agent]\nsample_interval_ms = \"fast\"\n");
    assert_eq!(p[0].line, 2);
    assert_eq!(p[0].key, "agent.sample_interval_ms");
}

#[test]
fn unknown_key_in_target_array() {
    let p = problems(
        "[[target]]\nname = \"a\"\nkind = \"host\"\n\n[[target]]\nname = \"b\"\nkind = \"process\"\nprocess = \"x\"\nport = 3\n",
    );
    assert_eq!(p[0].line, 9);
    assert_eq!(p[0].key, "target[1].port");
}

#[test]
fn bad_enum_value() {
    let p = problems("[[target]]\nname = \"a\"\nkind = \"vm\"\n");
    assert_eq!(p[0].line, 3);
    assert_eq!(p[0].key, "target[0].kind");
}

#[test]
fn semantic_errors_name_their_key() {
    let p = problems(
        r#"[agent]
sample_interval_ms = 10

[features]
window = "ten seconds"

[[target]]
name = "web"
kind = "systemd"
probe = { http = "ftp://x", interval_ms = 100, timeout_ms = 300 }

[[target]]
name = "web"
kind = "process"
process = "x"
unit = "y.service"
"#,
    );
    let keys: Vec<(&str, usize)> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
    assert!(keys.contains(&("agent.sample_interval_ms", 2)), "{keys:?}");
    assert!(keys.contains(&("features.window", 5)), "{keys:?}");
    assert!(keys.contains(&("target[0].kind", 9)), "{keys:?}");
    assert!(keys.contains(&("target[0].probe.http", 10)), "{keys:?}");
    assert!(
        keys.contains(&("target[0].probe.timeout_ms", 10)),
        "{keys:?}"
    );
    assert!(keys.contains(&("target[1].name", 13)), "{keys:?}");
    assert!(keys.contains(&("target[1].unit", 16)), "{keys:?}");
}

#[test]
fn rendered_error_has_file_line_col_key() {
    let err =
        parse_str("[store]\nmax_db_mb = 1\n", "/etc/outpost/outpost.toml").expect_err("invalid");
    assert_eq!(
        err.to_string(),
        "/etc/outpost/outpost.toml:2:1: store.max_db_mb: must be at least 4, got 1"
    );
}

#[test]
fn syntax_error_is_located() {
    let p = problems("[agent]\nnode_id = \"unterminated\n");
    assert_eq!(p[0].line, 2);
}

#[test]
fn secret_never_prints() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s:?}"), "***");
    assert_eq!(format!("{s}"), "***");
    assert_eq!(s.expose(), "hunter2");
}

#[test]
fn http_urls() {
    assert!(parse_str(
        "[[target]]\nname='a'\nkind='host'\nprobe={http='http://[::1]:9000'}\n",
        "t"
    )
    .is_ok());
    let c = parse_str(
        "[[target]]\nname='a'\nkind='host'\nprobe={http='http://localhost'}\n",
        "t",
    )
    .expect("valid");
    match &c.targets[0].probe.as_ref().expect("probe").check {
        ProbeCheck::Http {
            host, port, path, ..
        } => {
            assert_eq!(
                (host.as_str(), *port, path.as_str()),
                ("localhost", 80, "/")
            )
        }
        other => panic!("{other:?}"),
    }
}

fn files_in(dir: &str) -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no .toml files", root.display());
    files
}

#[test]
fn every_shipped_and_valid_config_parses() {
    let mut files = files_in("../config");
    files.extend(files_in("../config/examples"));
    files.extend(files_in("tests/configs/valid"));
    for f in files {
        if let Err(e) = Config::load(&f) {
            panic!("{} should be valid:\n{e}", f.display());
        }
    }
}

#[test]
fn every_invalid_config_is_refused_with_a_location() {
    for f in files_in("tests/configs/invalid") {
        let text = std::fs::read_to_string(&f).expect("read");
        // Each file says what it must be refused for: `# expect: KEY`.
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks a `# expect: KEY` line", f.display()))
            .trim()
            .to_string();
        match Config::load(&f) {
            Ok(_) => panic!("{} should be refused", f.display()),
            Err(e) => {
                assert!(
                    e.problems().iter().any(|p| p.key == expect && p.line > 1),
                    "{}: expected a problem at {expect}, got:\n{e}",
                    f.display()
                );
            }
        }
    }
}

// ------------------------------------------------------- rules and guard

use crate::decide::{
    ActionKind, ActionTarget, CmpOp, Condition, Mode, Persist, Verify, VerifyCheck,
};

const TARGETS: &str = r#"
[[target]]
name = "web"
kind = "systemd"
unit = "nginx.service"
probe = { http = "http://127.0.0.1:8080/healthz" }

[[target]]
name = "broker"
kind = "container"
container = "mosquitto"

[[target]]
name = "app"
kind = "process"
process = "python3"

[[command]]
name = "flush-cache"
argv = ["/usr/bin/redis-cli", "FLUSHALL"]
timeout = "10s"
"#;

fn with_targets(extra: &str) -> String {
    format!("{TARGETS}\n{extra}")
}

/// The key of every problem, with its line.
fn keys(text: &str) -> Vec<(String, usize)> {
    problems(text)
        .into_iter()
        .map(|p| (p.key, p.line))
        .collect()
}

#[test]
fn rule_with_every_key_parses() {
    let c = parse_str(
        &with_targets(
            r#"
[[rule]]
name = "web-hung"
target = "web"
when = "probe_failed"
for = "3 samples"
do = "restart"
mode = "auto"
cooldown = "90s"
max_per_hour = 2
verify = "probe_ok within 20s"
escalate = "exec:flush-cache"

[guard]
max_actions_per_hour = 5
protected_units = ["postgresql.service"]
pause_file = "/run/outpost/pause"
dry_run = true
approval_timeout = "5m"
"#,
        ),
        "t.toml",
    )
    .expect("valid");
    assert_eq!(c.rules.len(), 1);
    let r = &c.rules[0];
    assert_eq!(r.name, "web-hung");
    assert_eq!(r.target, "web");
    assert_eq!(
        r.action_target,
        ActionTarget::Systemd {
            unit: "nginx.service".into()
        }
    );
    assert_eq!(r.when, Condition::ProbeFailed);
    assert_eq!(r.persist, Persist::Samples(3));
    assert_eq!(r.action, ActionKind::Restart);
    assert_eq!(r.mode, Mode::Auto);
    assert_eq!(r.cooldown, Duration::from_secs(90));
    assert_eq!(r.max_per_hour, 2);
    assert_eq!(
        r.verify,
        Verify {
            check: VerifyCheck::ProbeOk,
            within: Duration::from_secs(20)
        }
    );
    assert_eq!(r.escalate, ActionKind::Exec("flush-cache".into()));
    assert_eq!(c.guard.max_actions_per_hour, 5);
    assert!(c.guard.protected.is_protected("postgresql.service"));
    assert!(
        c.guard.protected.is_protected("sshd.service"),
        "added to, not replacing, the built-in list"
    );
    assert_eq!(c.guard.pause_file, PathBuf::from("/run/outpost/pause"));
    assert!(c.guard.dry_run);
    assert_eq!(c.guard.approval_timeout, Duration::from_secs(300));
    assert_eq!(c.commands.len(), 1);
    assert_eq!(c.commands[0].argv, ["/usr/bin/redis-cli", "FLUSHALL"]);
    assert_eq!(c.commands[0].timeout, Duration::from_secs(10));
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn rule_defaults_are_safe() {
    let c = parse_str(
        &with_targets(
            "[agent]\nstate_dir = \"/var/lib/outpost\"\n\n[[rule]]\nname = \"r\"\ntarget = \"app\"\nwhen = \"process.rss_mb > 500\"\ndo = \"notify\"\n",
        ),
        "t.toml",
    )
    .expect("valid");
    let r = &c.rules[0];
    assert_eq!(r.mode, Mode::Suggest);
    assert_eq!(r.persist, Persist::Samples(1));
    assert_eq!(r.cooldown, crate::decide::DEFAULT_COOLDOWN);
    assert_eq!(r.max_per_hour, 3);
    assert_eq!(r.verify, Verify::default());
    assert_eq!(r.escalate, ActionKind::Notify);
    assert_eq!(
        r.when,
        Condition::Threshold {
            signal: "target.app.rss_mb".into(),
            op: CmpOp::Gt,
            value: 500.0
        }
    );
    assert_eq!(c.guard.max_actions_per_hour, 10);
    assert_eq!(c.guard.pause_file, PathBuf::from("/var/lib/outpost/pause"));
    assert!(!c.guard.dry_run);
    assert_eq!(c.guard.approval_timeout, Duration::from_secs(15 * 60));

    let b = Config::builtin();
    assert!(b.rules.is_empty() && b.commands.is_empty() && b.warnings.is_empty());
    assert_eq!(b.guard.pause_file, b.agent.state_dir.join("pause"));
}

#[test]
fn rule_errors_name_their_key() {
    let text = with_targets(
        r#"
[[rule]]
name = "a"
target = "nope"
when = "unit_failed"
do = "restart"

[[rule]]
name = "b"
target = "app"
when = "unit_failed"
for = "0 samples"
do = "restart"
cooldown = "soon"
max_per_hour = 0

[[rule]]
name = "c"
target = "web"
when = "target.broker.up == 0"
do = "exec:nothing"
verify = "container_running"
escalate = "reboot"

[[rule]]
name = "c"
target = "broker"
when = "container_exited"
do = "notify"
verify = "container_running"
escalate = "notify"

[[rule]]
name = "e"
target = "app"
when = "anomaly >= 0.5"
do = "start"
"#,
    );
    let k = keys(&text);
    let has = |key: &str| k.iter().any(|(kk, line)| kk == key && *line > 1);
    for key in [
        "rule[0].target",
        "rule[1].when",
        "rule[1].for",
        "rule[1].do",
        "rule[1].cooldown",
        "rule[1].max_per_hour",
        "rule[2].when",
        "rule[2].do",
        "rule[2].verify",
        "rule[2].escalate",
        "rule[3].name",
        "rule[3].verify",
        "rule[3].escalate",
        "rule[4].do",
    ] {
        assert!(has(key), "no problem at {key}: {k:?}");
    }
    let p = problems(&text);
    let msg = |key: &str| {
        p.iter()
            .find(|p| p.key == key)
            .map(|p| p.message.clone())
            .unwrap_or_default()
    };
    assert!(msg("rule[0].target").contains("targets are: web, broker, app"));
    assert!(msg("rule[1].when").contains("needs a systemd target"));
    assert!(msg("rule[1].do").contains("needs a systemd or container target"));
    assert!(msg("rule[2].when").contains("not a signal of target \"web\""));
    assert!(msg("rule[2].do").contains("commands are: flush-cache"));
    assert!(msg("rule[2].verify").contains("needs a container target"));
    assert!(msg("rule[3].verify").contains("nothing to verify"));
}

#[test]
fn rule_key_errors_are_located() {
    let text = with_targets(
        "[[rule]]\nname = \"r\"\ntarget = \"web\"\nwhen = \"unit_failed\"\ndo = \"restart\"\nmode = \"yolo\"\n",
    );
    let p = problems(&text);
    assert_eq!(p[0].key, "rule[0].mode");
    assert!(p[0].message.contains("unknown variant"), "{}", p[0].message);
    let line = text
        .lines()
        .position(|l| l.starts_with("mode"))
        .expect("mode")
        + 1;
    assert_eq!(p[0].line, line);

    let p = problems(&with_targets(
        "[[rule]]\nname = \"r\"\ntarget = \"web\"\nwhen = \"unit_failed\"\ndo = \"restart\"\nverfy = \"probe_ok\"\n",
    ));
    assert_eq!(p[0].key, "rule[0].verfy");
    let p = problems(&with_targets(
        "[[rule]]\nname = \"r\"\ntarget = \"web\"\nwhen = \"unit_failed\"\n",
    ));
    assert!(
        p[0].message.contains("missing field `do`"),
        "{}",
        p[0].message
    );
}

#[test]
fn command_errors() {
    let k = keys(
        r#"
[[command]]
name = "a"
argv = []

[[command]]
name = "b"
argv = ["bin/x"]
timeout = "1h"

[[command]]
name = "b"
argv = ["/bin/x"]
"#,
    );
    for key in [
        "command[0].argv",
        "command[1].argv[0]",
        "command[1].timeout",
        "command[2].name",
    ] {
        assert!(k.iter().any(|(kk, _)| kk == key), "{key}: {k:?}");
    }
}

#[test]
fn guard_errors() {
    let k = keys(
        r#"
[guard]
max_actions_per_hour = 0
protected_units = ["sshd", "ok.service"]
unprotect = ["outpost.service"]
approval_timeout = "0s"
"#,
    );
    for key in [
        "guard.max_actions_per_hour",
        "guard.protected_units[0]",
        "guard.unprotect[0]",
        "guard.approval_timeout",
    ] {
        assert!(k.iter().any(|(kk, _)| kk == key), "{key}: {k:?}");
    }
    let p = problems("[guard]\nprotected_units = [\"a.service\"]\nunprotect = [\"a.service\"]\n");
    assert_eq!(p[0].key, "guard.unprotect[0]");
}

#[test]
fn protected_target_and_unprotect_are_warnings_not_errors() {
    let text = r#"[[target]]
name = "ssh"
kind = "systemd"
unit = "sshd.service"

[[target]]
name = "net"
kind = "systemd"
unit = "networking.service"

[[rule]]
name = "ssh-failed"
target = "ssh"
when = "unit_failed"
do = "restart"

[[rule]]
name = "net-failed"
target = "net"
when = "unit_failed"
do = "restart"

[guard]
unprotect = ["networking.service"]
"#;
    let c = parse_str(text, "t.toml").expect("accepted");
    let w: Vec<(&str, usize)> = c
        .warnings
        .iter()
        .map(|p| (p.key.as_str(), p.line))
        .collect();
    assert_eq!(w, [("guard.unprotect[0]", 24), ("rule[0].target", 13)]);
    assert!(c.warnings[1]
        .message
        .contains("sshd.service is a protected unit"));
    assert!(!c.guard.protected.is_protected("networking.service"));
    assert!(c.guard.protected.is_protected("sshd.service"));
    assert_eq!(c.guard.protected.unprotected(), ["networking.service"]);
    assert_eq!(
        c.render_warnings("t.toml")[0],
        "t.toml:24:14: warning: guard.unprotect[0]: networking.service is removed from the \
         built-in protected list: rules may act on it"
    );
}

#[test]
fn detect_section_turns_durations_into_steps() {
    let cfg = parse_str(
        "[features]\nstep = \"10s\"\n[detect]\nopen = \"2 of 3\"\npromote_after = \"1h\"\ntrial = \"30m\"\n",
        "x.toml",
    )
    .expect("valid");
    assert_eq!(
        cfg.detect.open,
        crate::detect::incident::KOfN { k: 2, n: 3 }
    );
    assert_eq!(cfg.detect.lifecycle.promote_after_steps, Some(360));
    assert_eq!(cfg.detect.lifecycle.trial_steps, 180);
    let default = parse_str("", "x.toml").expect("valid");
    assert_eq!(default.detect.lifecycle.promote_after_steps, None);
    assert_eq!(
        default.detect.open,
        crate::detect::incident::KOfN { k: 1, n: 1 }
    );
}
