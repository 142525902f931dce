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
