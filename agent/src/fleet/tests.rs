use super::*;
use crate::sync::envelope::{key_line, open};

#[test]
fn a_sealed_command_opens_on_a_node_trusting_the_key() {
    let k = envelope::generate();
    let c = new_command(
        "approve",
        serde_json::json!({"action": 3}),
        Some("n1"),
        Duration::from_secs(10),
    );
    let opened = open(&seal(&c, Some(&k)), &[key_line(&k.verifying_key())]).unwrap();
    let back: Command = serde_json::from_slice(&opened.body).unwrap();
    assert_eq!(back, c);
    assert_eq!(back.node.as_deref(), Some("n1"));
    let left = back.expires_ms - now_ms();
    assert!((9_000..=10_000).contains(&left), "{left}");
    // Ids and nonces are unique.
    let d = new_command(
        "approve",
        serde_json::json!({}),
        None,
        Duration::from_secs(1),
    );
    assert_ne!(c.id, d.id);
    assert_ne!(c.nonce, d.nonce);
    assert_eq!(c.nonce.len(), 32);
}

#[test]
fn a_package_tar_is_deterministic_and_unpacks_on_the_node() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model.toml"), "name = \"m\"\n").unwrap();
    std::fs::write(dir.path().join("model.onnx"), b"\x08\x01onnx").unwrap();
    let a = package_tar(dir.path()).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let b = package_tar(dir.path()).unwrap();
    assert_eq!(sha256_hex(&a), sha256_hex(&b));
    let out = tempfile::tempdir().unwrap();
    crate::sync::command::unpack_package(&a, out.path()).unwrap();
    assert_eq!(
        std::fs::read(out.path().join("model.onnx")).unwrap(),
        b"\x08\x01onnx"
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        package_tar(empty.path()),
        Err(FleetError::Args(_))
    ));
}

#[test]
fn plans_carry_the_protocol_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("outpost.toml");
    std::fs::write(&f, "[agent]\n").unwrap();
    let p = plan(&FleetCommand::PushConfig {
        node: "n1".into(),
        file: f,
    })
    .unwrap()
    .unwrap();
    assert_eq!(p.cmd, "config.apply");
    assert_eq!(p.args["toml"], "[agent]\n");
    assert_eq!(p.args["sha256"], sha256_hex(b"[agent]\n"));
    let p = plan(&FleetCommand::Run {
        node: "n1".into(),
        target: "web".into(),
        action: "restart".into(),
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        p.args,
        serde_json::json!({"target": "web", "do": "restart"})
    );
    assert!(plan(&FleetCommand::Nodes).unwrap().is_none());
}

#[test]
fn the_whole_command_line_passes_clap_s_own_checks() {
    // clap checks a subcommand's definition only when it is used, and
    // panics then (debug builds): `push-model` once did, on every use.
    use clap::CommandFactory as _;
    crate::cli::Cli::command().debug_assert();
}

#[test]
fn push_model_takes_node_and_dir_or_a_group_and_dir() {
    use clap::Parser as _;
    let push = |args: &[&str]| {
        let cli =
            crate::cli::Cli::try_parse_from(["outpost", "fleet", "push-model"].iter().chain(args))
                .map_err(|e| e.to_string())?;
        match cli.command {
            crate::cli::Command::Fleet(a) => match a.cmd {
                FleetCommand::PushModel { to, .. } => to.split().map_err(|e| e.to_string()),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    };
    let (to, dir) = push(&["n1", "pkg/web"]).unwrap();
    assert_eq!(
        (to.node.as_deref(), to.group, dir),
        (Some("n1"), None, PathBuf::from("pkg/web"))
    );
    let (to, dir) = push(&["--group", "hall", "--max-concurrency", "5", "pkg/web"]).unwrap();
    assert_eq!(
        (to.node, to.group.as_deref(), to.max_concurrency, dir),
        (None, Some("hall"), Some(5), PathBuf::from("pkg/web"))
    );
    let (to, _) = push(&["pkg/web", "--all"]).unwrap();
    assert!(to.all && to.node.is_none());
    assert!(push(&["pkg/web"]).is_err(), "a node or a group is needed");
    assert!(push(&["n1", "pkg/web", "--group", "g"]).is_err());
    assert!(push(&["n1", "pkg/web", "extra"]).is_err());
}

#[test]
fn the_command_line_parses_and_bad_arguments_exit_2() {
    use clap::Parser as _;
    let cli = crate::cli::Cli::try_parse_from([
        "outpost",
        "fleet",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "pause",
        "--group",
        "hall",
        "--max-concurrency",
        "5",
    ])
    .unwrap();
    match cli.command {
        crate::cli::Command::Fleet(a) => match a.cmd {
            FleetCommand::Pause { to, .. } => {
                assert_eq!(to.group.as_deref(), Some("hall"));
                assert_eq!(to.max_concurrency, Some(5));
                assert_eq!(to.node, None);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let cli = crate::cli::Cli::try_parse_from(["outpost", "fleet", "resume", "--all"]).unwrap();
    match cli.command {
        crate::cli::Command::Fleet(a) => match a.cmd {
            FleetCommand::Resume { to } => assert!(to.all && to.node.is_none()),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    assert!(
        crate::cli::Cli::try_parse_from(["outpost", "fleet", "resume", "n1", "--all"]).is_err()
    );
    // Node and group together, or neither, are refused by clap.
    assert!(
        crate::cli::Cli::try_parse_from(["outpost", "fleet", "pause", "n1", "--group", "g"])
            .is_err()
    );
    assert!(crate::cli::Cli::try_parse_from(["outpost", "fleet", "pause"]).is_err());
    // A command without a key (and not --unsigned) is a bad argument.
    let a = FleetArgs {
        broker: Some("mqtt://127.0.0.1:1".into()),
        ca_file: None,
        cert_file: None,
        key_file: None,
        username: None,
        password_file: None,
        key: None,
        unsigned: false,
        prefix: "outpost/v1".into(),
        timeout: "1s".into(),
        max_packet_kb: crate::config::mqtt::DEFAULT_MAX_PACKET_KB,
        json: false,
        cmd: FleetCommand::Approve {
            node: "n1".into(),
            id: 1,
        },
    };
    assert_eq!(execute(a), EXIT_BAD_INPUT);
}

#[test]
fn keygen_writes_a_usable_private_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k");
    assert_eq!(keygen(&out), EXIT_OK);
    let k = envelope::read_key_file(&out).unwrap();
    let c = new_command(
        "status",
        serde_json::json!({}),
        None,
        Duration::from_secs(5),
    );
    assert!(open(&seal(&c, Some(&k)), &[key_line(&k.verifying_key())]).is_ok());
    // Never overwrites.
    assert_eq!(keygen(&out), EXIT_BAD_INPUT);
}

#[test]
fn live_lines_name_the_node_and_the_event() {
    let m = br#"{"v":1,"type":"event","id":"x","seq":9,"node":"n1","ts_ms":0,
        "body":{"event":"action.executed","target":"web"}}"#;
    let line = describe("outpost/v1", "outpost/v1/nodes/n1/events", m);
    assert!(
        line.contains("n1") && line.contains("action.executed") && line.contains("web"),
        "{line}"
    );
    let will =
        br#"{"v":1,"type":"state","seq":null,"node":"n1","ts_ms":0,"body":{"online":false}}"#;
    assert!(describe("outpost/v1", "outpost/v1/nodes/n1/state", will).contains("OFFLINE"));
}

#[test]
fn the_largest_package_the_cli_takes_fits_the_node_limit_it_is_told() {
    use base64::Engine as _;
    let tar = vec![0u8; MAX_MODEL_TAR_BYTES];
    let args = serde_json::json!({
        "package_b64": base64::engine::general_purpose::STANDARD.encode(&tar),
        "sha256": sha256_hex(&tar),
    });
    let c = new_command("model.install", args, Some("n1"), Duration::from_secs(10));
    let payload = seal(&c, Some(&envelope::generate()));
    // Within what a node parses at all…
    assert!(payload.len() <= envelope::MAX_ENVELOPE_BYTES);
    // …and within the default packet limit, so a full-size package is
    // sent with no --max-packet-kb…
    let default = crate::config::mqtt::DEFAULT_MAX_PACKET_KB as usize * 1024;
    assert!(fits("outpost/v1/nodes/n1/cmd", &payload, default));
    // …and so is the largest envelope a node reads at all.
    let largest = vec![0u8; envelope::MAX_ENVELOPE_BYTES];
    assert!(fits("outpost/v1/groups/some-group/cmd", &largest, default));
    // A node told 8 MiB cannot take it: the CLI refuses it up front.
    assert!(!fits("outpost/v1/nodes/n1/cmd", &payload, 8192 * 1024));
}
