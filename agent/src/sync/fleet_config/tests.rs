use super::*;

const KEY: &str = "ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
const OTHER_KEY: &str = "ed25519:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// The local policy: restart nginx (auto, escalating to exec:flush-cache),
/// restart the mosquitto container on approval, flush-cache as its only
/// command, postgresql protected on top of the built-in list.
fn local_toml() -> String {
    format!(
        r#"
[agent]
node_id = "n1"
state_dir = "/var/lib/outpost"

[[target]]
name = "web"
kind = "systemd"
unit = "nginx.service"
probe = {{ http = "http://127.0.0.1:8080/healthz" }}

[[target]]
name = "broker"
kind = "container"
container = "mosquitto"

[[target]]
name = "db"
kind = "systemd"
unit = "postgresql.service"

[[command]]
name = "flush-cache"
argv = ["/usr/bin/redis-cli", "FLUSHALL"]
timeout = "10s"

[[rule]]
name = "web-hung"
target = "web"
when = "probe_failed"
do = "restart"
mode = "auto"
escalate = "exec:flush-cache"

[[rule]]
name = "broker-down"
target = "broker"
when = "container_exited"
do = "restart"
mode = "approve"

[guard]
protected_units = ["postgresql.service"]

[fleet]
group = "hall-1"
trusted_keys = ["{KEY}"]
"#
    )
}

fn parse(text: &str, name: &str) -> Config {
    let mut c = crate::config::parse_str(text, name)
        .unwrap_or_else(|e| panic!("{name} does not parse:\n{e}\n{text}"));
    c.source = Some(PathBuf::from(name));
    c
}

fn local() -> Config {
    parse(&local_toml(), "/etc/outpost/outpost.toml")
}

fn pushed(text: &str) -> Config {
    parse(text, "fleet-config.toml")
}

/// The violations of the local config with `from` replaced by `to`
/// (which must occur in it).
fn edit(from: &str, to: &str) -> Vec<String> {
    let text = local_toml();
    assert!(text.contains(from), "{from:?} is not in the local config");
    violations(&local(), &pushed(&text.replacen(from, to, 1)))
}

/// Some violation mentions `needle`.
fn has(v: &[String], needle: &str) {
    assert!(
        v.iter().any(|p| p.contains(needle)),
        "no violation mentions {needle:?}: {v:#?}"
    );
}

fn one(v: &[String], needle: &str) {
    assert_eq!(
        v.len(),
        1,
        "expected one violation about {needle:?}: {v:#?}"
    );
    assert!(
        v[0].contains(needle),
        "{:?} does not mention {needle:?}",
        v[0]
    );
}

#[test]
fn the_local_config_itself_and_narrower_ones_are_within_the_policy() {
    assert_eq!(violations(&local(), &local()), Vec::<String>::new());
    assert!(check(&local(), &local()).is_ok());
    // The fleet's own settings: sampling, group, keys (rotation), MQTT.
    let mut text = local_toml()
        .replace(
            "node_id = \"n1\"",
            "node_id = \"n1\"\nsample_interval_ms = 250",
        )
        .replace("group = \"hall-1\"", "group = \"hall-2\"")
        .replace(
            &format!("trusted_keys = [\"{KEY}\"]"),
            &format!("trusted_keys = [\"{OTHER_KEY}\"]"),
        );
    text.push_str("\n[mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n");
    assert_eq!(violations(&local(), &pushed(&text)), Vec::<String>::new());
    // Fewer rules, a stricter mode, no escalation, more protection.
    let narrower = local_toml()
        .replace("mode = \"auto\"", "mode = \"approve\"")
        .replace("escalate = \"exec:flush-cache\"\n", "")
        .replace(
            "protected_units = [\"postgresql.service\"]",
            "protected_units = [\"postgresql.service\", \"nginx.service\"]",
        );
    let narrower = narrower
        .split("[[rule]]\nname = \"broker-down\"")
        .next()
        .unwrap()
        .to_string()
        + "[guard]\nprotected_units = [\"postgresql.service\", \"cron.service\"]\n"
        + &format!("[fleet]\ntrusted_keys = [\"{KEY}\"]\n");
    assert_eq!(
        violations(&local(), &pushed(&narrower)),
        Vec::<String>::new()
    );
}

#[test]
fn a_rule_on_a_unit_outside_the_local_rules_is_refused() {
    let v = edit("unit = \"nginx.service\"", "unit = \"apache2.service\"");
    // Both the restart and its escalation now act on apache2.
    assert_eq!(v.len(), 2, "{v:#?}");
    assert!(
        v[0].contains("restart on apache2.service (auto): no local rule does this"),
        "{v:#?}"
    );
    assert!(
        v[1].contains("exec:flush-cache on apache2.service"),
        "{v:#?}"
    );
    let e = check(
        &local(),
        &pushed(&local_toml().replace("nginx.service", "apache2.service")),
    )
    .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with(
            "outside the local policy of /etc/outpost/outpost.toml:\n  - rule \"web-hung\""
        ),
        "{text}"
    );
}

#[test]
fn another_verb_on_an_allowed_unit_is_refused() {
    one(
        &edit(
            "do = \"restart\"\nmode = \"auto\"",
            "do = \"stop\"\nmode = \"auto\"",
        ),
        "stop on nginx.service (auto): no local rule does this",
    );
    // An escalation counts as an action too.
    one(
        &edit("escalate = \"exec:flush-cache\"", "escalate = \"stop\""),
        "stop on nginx.service",
    );
    // A local escalation allows that action as a `do`.
    assert_eq!(
        edit(
            "do = \"restart\"\nmode = \"auto\"",
            "do = \"exec:flush-cache\"\nmode = \"auto\""
        ),
        Vec::<String>::new()
    );
}

#[test]
fn a_push_cannot_drop_the_approval_step() {
    one(
        &edit(
            "do = \"restart\"\nmode = \"approve\"",
            "do = \"restart\"\nmode = \"auto\"",
        ),
        "restart on container mosquitto (auto): the local rules do this only in approve mode",
    );
    // Suggest is always narrower.
    assert_eq!(
        edit(
            "do = \"restart\"\nmode = \"approve\"",
            "do = \"restart\"\nmode = \"suggest\""
        ),
        Vec::<String>::new()
    );
}

#[test]
fn containers_and_hosts_are_checked_like_units() {
    one(
        &edit("container = \"mosquitto\"", "container = \"vault\""),
        "restart on container vault (approve): no local rule does this",
    );
    let text = local_toml().replace(
        "[guard]",
        "[[target]]\nname = \"box\"\nkind = \"host\"\n\n[[rule]]\nname = \"h\"\ntarget = \"box\"\n\
         when = \"host.mem.used_pct > 95\"\ndo = \"exec:flush-cache\"\nmode = \"auto\"\n\n[guard]",
    );
    one(
        &violations(&local(), &pushed(&text)),
        "exec:flush-cache on the host (auto): no local rule does this",
    );
    // Notify changes nothing on the host: allowed anywhere.
    let text = local_toml().replace(
        "[guard]",
        "[[rule]]\nname = \"n\"\ntarget = \"db\"\nwhen = \"unit_failed\"\ndo = \"notify\"\n\n[guard]",
    );
    assert_eq!(violations(&local(), &pushed(&text)), Vec::<String>::new());
}

#[test]
fn the_command_list_is_local() {
    one(
        &edit("\"FLUSHALL\"]", "\"FLUSHALL\", \"ASYNC\"]"),
        "[[command]] \"flush-cache\": differs from the local one",
    );
    let text = local_toml().replacen(
        "[[rule]]",
        "[[command]]\nname = \"wipe\"\nargv = [\"/bin/rm\", \"-rf\", \"/srv\"]\n\n[[rule]]",
        1,
    );
    one(
        &violations(&local(), &pushed(&text)),
        "[[command]] \"wipe\": not in the local config",
    );
}

#[test]
fn a_push_cannot_open_the_node_to_unsigned_or_unknown_signers() {
    let keys = format!("trusted_keys = [\"{KEY}\"]");
    // (Also no key: both are said.)
    has(
        &edit(&keys, "allow_unsigned = true"),
        "fleet.allow_unsigned: the local policy does not take unsigned commands",
    );
    let v = edit(&keys, "trusted_keys = []");
    one(
        &v,
        "fleet.trusted_keys: the local policy takes only signed commands",
    );
    let v = edit(&keys, "");
    one(&v, "names no trusted key");

    // A local policy that takes no fleet commands stays closed.
    let closed = parse(
        &local_toml().replace(&keys, ""),
        "/etc/outpost/outpost.toml",
    );
    one(
        &violations(&closed, &local()),
        "the local policy takes no fleet commands",
    );
    let open_push = pushed(&local_toml().replace(&keys, "allow_unsigned = true"));
    has(&violations(&closed, &open_push), "fleet.allow_unsigned");
    assert_eq!(violations(&closed, &closed), Vec::<String>::new());

    // Only a local allow_unsigned lets the push choose.
    let open = parse(
        &local_toml().replace(&keys, "allow_unsigned = true"),
        "/etc/outpost/outpost.toml",
    );
    assert_eq!(violations(&open, &local()), Vec::<String>::new());
    assert_eq!(violations(&open, &open_push), Vec::<String>::new());
}

#[test]
fn protected_units_stay_protected() {
    // Dropping a local protection (the pattern, and the target's unit).
    let v = edit(
        "protected_units = [\"postgresql.service\"]",
        "protected_units = []",
    );
    has(&v, "guard: \"postgresql.service\" is protected locally");
    has(&v, "target \"db\": postgresql.service is protected locally");
    // Unprotecting a built-in entry or carving a unit out of a built-in glob.
    let v = edit("[guard]", "[guard]\nunprotect = [\"ssh.service\"]");
    has(&v, "guard.unprotect: \"ssh.service\" is protected locally");
    has(&v, "guard: \"ssh.service\" is protected locally");
    let v = edit(
        "[guard]",
        "[guard]\nunprotect = [\"systemd-resolved.service\"]",
    );
    one(&v, "guard.unprotect: \"systemd-resolved.service\"");
    // What the local config unprotects, the push may too.
    let local = parse(
        &local_toml().replace("[guard]", "[guard]\nunprotect = [\"ssh.service\"]"),
        "/etc/outpost/outpost.toml",
    );
    assert_eq!(violations(&local, &local), Vec::<String>::new());
    assert_eq!(violations(&local, &self::local()), Vec::<String>::new());
    // Dry run stays on.
    let dry = parse(
        &local_toml().replace("[guard]", "[guard]\ndry_run = true"),
        "/etc/outpost/outpost.toml",
    );
    one(&violations(&dry, &self::local()), "guard.dry_run");
    assert_eq!(violations(&dry, &dry), Vec::<String>::new());
}

#[test]
fn the_state_directory_and_the_pause_switch_are_local() {
    // The default pause file moves with it: both are said.
    let v = edit(
        "state_dir = \"/var/lib/outpost\"",
        "state_dir = \"/tmp/elsewhere\"",
    );
    has(&v, "agent.state_dir: /var/lib/outpost is local");
    has(&v, "guard.pause_file");
    one(
        &edit("[guard]", "[guard]\npause_file = \"/tmp/no-pause\""),
        "guard.pause_file: /var/lib/outpost/pause is the local pause switch",
    );
    one(
        &edit(
            "[[target]]",
            "[collect]\ncontainer_socket = \"/run/docker.sock\"\n\n[[target]]",
        ),
        "collect.container_socket",
    );
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn select_runs_the_pushed_config_only_when_it_is_valid_and_within_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let text = local_toml().replace("/var/lib/outpost", &state.display().to_string());
    let local_path = write(dir.path(), "outpost.toml", &text);
    let load_local = || Config::load(&local_path).unwrap();

    // Nothing pushed: the local config.
    let (cfg, sel) = select(load_local(), &state);
    assert_eq!(sel, Selection::Local);
    assert_eq!(cfg.source.as_deref(), Some(local_path.as_path()));
    assert!(sel.refusal_event().is_none());

    // A pushed config within the policy runs, with its own settings.
    let within = text.replace("group = \"hall-1\"", "group = \"hall-2\"");
    let fleet = write(&state, FILE, &within);
    let (cfg, sel) = select(load_local(), &state);
    assert_eq!(sel, Selection::Fleet(fleet.clone()));
    assert_eq!(cfg.source.as_deref(), Some(fleet.as_path()));
    assert_eq!(cfg.fleet.group.as_deref(), Some("hall-2"));

    // Outside the policy: the local config, and why.
    write(
        &state,
        FILE,
        &text.replace("nginx.service", "apache2.service"),
    );
    let (cfg, sel) = select(load_local(), &state);
    assert_eq!(cfg.source.as_deref(), Some(local_path.as_path()));
    assert_eq!(cfg.fleet.group.as_deref(), Some("hall-1"));
    match &sel {
        Selection::Refused { path, why } => {
            assert_eq!(path, &fleet);
            assert!(why.contains("apache2.service"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    let ev = sel.refusal_event().expect("an event");
    assert_eq!(ev.event, "config.refused");
    assert!(ev.fields["error"]
        .as_str()
        .unwrap()
        .contains("outside the local policy"));

    // Not a valid config: the local config, and the parse error.
    write(&state, FILE, "[agent]\nbogus = 1\n");
    let (cfg, sel) = select(load_local(), &state);
    assert_eq!(cfg.source.as_deref(), Some(local_path.as_path()));
    assert!(
        matches!(&sel, Selection::Refused { why, .. } if why.contains("bogus")),
        "{sel:?}"
    );

    // The built-in default has no policy file: a pushed file is not looked at.
    write(&state, FILE, &within);
    let (cfg, sel) = select(Config::builtin(), &state);
    assert_eq!(sel, Selection::Local);
    assert_eq!(cfg.source, None);
}
