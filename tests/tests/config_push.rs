//! A fleet config push under the shipped, hardened `outpost.service`
//! (unchanged: `User=outpost`, `ProtectSystem=strict`, `/etc/outpost`
//! read-only) in a real systemd booted with nspawn, with a real mosquitto
//! inside the container and pushes signed by `outpost fleet push-config`.
//!
//! The local config in `/etc/outpost/outpost.toml` is the policy: a push
//! within it is stored in `/var/lib/outpost/fleet-config.toml` and runs
//! (after the reload, and again after a restart), its `[fleet]` change
//! restarts the uplink without restarting the agent; a push naming a unit
//! outside the local rules is refused and changes nothing; the polkit grant
//! always comes from the local config. Needs root; fails, never skips.

use std::time::Duration;

use outpost_tests::nspawn::{outpost_binary, Systemd};
use outpost_tests::remediation::poll;

/// The real files, read at compile time: the test checks what ships.
const UNIT: &str = include_str!("../../systemd/outpost.service");
const SYSUSERS: &str = include_str!("../../systemd/outpost.sysusers");
const TMPFILES: &str = include_str!("../../systemd/outpost.tmpfiles");

const NODE: &str = "push-test";
const BROKER: &str = "mqtt://127.0.0.1:1883";
const LOCAL: &str = "/etc/outpost/outpost.toml";
const PUSHED: &str = "/var/lib/outpost/fleet-config.toml";
const RULES: &str = "/etc/polkit-1/rules.d/50-outpost.rules";
const KEY: &str = "/root/fleet.key";
const EVENTS: &str = "/var/tmp/outpost-events.log";

const BROKER_CONF: &str = "\
user root
persistence false
allow_anonymous true
listener 1883 127.0.0.1
log_dest stderr
";

/// A unit that just runs, for the rules' targets.
const IDLE_UNIT: &str = "[Service]\nExecStart=/bin/sleep infinity\n";

/// The local policy: restart demo-web when it fails; other-web is watched
/// only. `@KEY@` is the fleet's public key.
const LOCAL_CONFIG: &str = r#"[agent]
node_id = "push-test"
sample_interval_ms = 500

[[target]]
name = "web"
kind = "systemd"
unit = "demo-web.service"

[[target]]
name = "other"
kind = "systemd"
unit = "other-web.service"

[[rule]]
name = "web-down"
target = "web"
when = "unit_failed"
do = "restart"
mode = "auto"

[mqtt]
url = "mqtt://127.0.0.1:1883"
reconnect_min = "200ms"
reconnect_max = "1s"
summary_interval = "5s"

[fleet]
group = "hall-a"
trusted_keys = ["@KEY@"]
"#;

/// `outpost fleet ARGS` inside the container (the broker listens on the
/// container's `lo`): (exit code, stdout, stderr).
fn fleet(sd: &Systemd, args: &[&str]) -> (i32, String, String) {
    let mut argv = vec!["outpost", "fleet", "--broker", BROKER, "--key", KEY];
    argv.extend_from_slice(args);
    let out = sd.exec(&argv).expect("outpost fleet");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The node's live status over the fleet (`status` command).
fn status(sd: &Systemd) -> Result<serde_json::Value, String> {
    let (code, out, err) = fleet(sd, &["--json", "status", NODE]);
    if code != 0 {
        return Err(format!("exit {code}: {out} {err}"));
    }
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).map_err(|e| format!("{e}: {out}"))?;
    Ok(v["result"].clone())
}

/// MainPID and NRestarts of outpost.service.
fn process(sd: &Systemd) -> (String, String) {
    let p = sd
        .unit_properties("outpost.service", &["MainPID", "NRestarts"])
        .expect("systemctl show");
    (p[0].clone(), p[1].clone())
}

/// The events the node published, one JSON body per line.
fn events(sd: &Systemd) -> Vec<serde_json::Value> {
    sd.sh(&format!("cat {EVENTS} 2>/dev/null || true"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["body"].clone())
        .collect()
}

fn wait_event(sd: &Systemd, name: &str, source: &str, what: &str) -> serde_json::Value {
    poll(
        what,
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let all = events(sd);
            all.iter()
                .find(|e| e["event"] == name && e["source"] == source)
                .cloned()
                .ok_or_else(|| format!("{all:?}"))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", sd.journal_tail(60)))
}

#[test]
fn a_pushed_config_runs_within_the_local_policy_under_the_shipped_unit() {
    outpost_tests::mosquitto::ensure_installed().expect("mosquitto on the host");
    let bin = outpost_binary().expect("outpost binary (cargo build -p outpost --bin outpost)");
    let sd = Systemd::boot().expect("boot systemd in nspawn");
    let journal = || sd.journal_tail(80);

    // Install as the package does; a polkit rules directory so the unit's
    // ExecStartPre/ExecReload write the grant (no polkitd needed for that).
    sd.sh(&format!(
        "install -m 0755 {} /usr/bin/outpost",
        bin.display()
    ))
    .expect("install the binary");
    sd.write_file("/usr/lib/sysusers.d/outpost.conf", SYSUSERS)
        .expect("sysusers");
    sd.write_file("/usr/lib/tmpfiles.d/outpost.conf", TMPFILES)
        .expect("tmpfiles");
    sd.sh("systemd-sysusers outpost.conf && systemd-tmpfiles --create outpost.conf && mkdir -p /etc/polkit-1/rules.d")
        .expect("user and directories");
    for unit in ["demo-web.service", "other-web.service"] {
        sd.install_unit(unit, IDLE_UNIT).expect("idle unit");
        sd.sh(&format!("systemctl start {unit}")).expect("start");
    }

    // The broker, inside (the container has only `lo`), and a subscriber
    // that logs the node's events.
    sd.write_file("/etc/outpost-test-broker.conf", BROKER_CONF)
        .expect("broker conf");
    sd.sh("systemd-run --unit=test-broker /usr/sbin/mosquitto -c /etc/outpost-test-broker.conf")
        .expect("start mosquitto");
    poll(
        "mosquitto to listen",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            sd.sh("mosquitto_pub -h 127.0.0.1 -p 1883 -t probe -m x")
                .map_err(|e| format!("{e:#}"))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", journal()));
    sd.sh(&format!(
        "systemd-run --unit=test-events sh -c 'exec mosquitto_sub -h 127.0.0.1 -p 1883 -q 1 \
         -t outpost/v1/nodes/{NODE}/events > {EVENTS}'"
    ))
    .expect("start the event subscriber");

    // The fleet's key, trusted by the local config.
    let public = sd
        .sh(&format!("outpost fleet keygen --out {KEY}"))
        .expect("keygen")
        .trim()
        .to_string();
    assert!(public.starts_with("ed25519:"), "{public}");
    let local = LOCAL_CONFIG.replace("@KEY@", &public);
    sd.write_file(LOCAL, &local).expect("local config");
    sd.install_unit("outpost.service", UNIT)
        .expect("install outpost.service");
    let started = sd
        .exec(&["systemctl", "start", "outpost.service"])
        .expect("systemctl");
    assert!(
        started.status.success(),
        "outpost.service did not start: {}\n{}",
        String::from_utf8_lossy(&started.stderr),
        journal()
    );
    let before = poll(
        "the node to answer status over the broker",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || status(&sd),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", journal()));
    assert_eq!(before["config"], LOCAL, "{before}");
    assert_eq!(before["group"], "hall-a", "{before}");
    assert_eq!(before["sample_interval_ms"], 500, "{before}");
    let (pid, restarts) = process(&sd);
    let grant = sd.sh(&format!("cat {RULES}")).expect("the polkit rule");
    assert!(
        grant.contains(r#""demo-web.service": ["reset-failed", "restart"],"#),
        "{grant}"
    );
    assert!(!grant.contains("other-web.service"), "{grant}");
    // The agent cannot write the local policy (the old config.apply failed
    // here).
    let denied = sd
        .exec(&[
            "setpriv",
            "--reuid=outpost",
            "--regid=outpost",
            "--init-groups",
            "--",
            "sh",
            "-c",
            &format!("echo x >> {LOCAL}"),
        ])
        .expect("setpriv");
    assert!(
        !denied.status.success(),
        "the outpost user can write {LOCAL}"
    );

    // A push within the policy: slower sampling, another group, the rule
    // needs approval, the watched-only target gone.
    let within = local
        .replace("sample_interval_ms = 500", "sample_interval_ms = 700")
        .replace("group = \"hall-a\"", "group = \"hall-b\"")
        .replace("mode = \"auto\"", "mode = \"approve\"")
        .replace(
            "[[target]]\nname = \"other\"\nkind = \"systemd\"\nunit = \"other-web.service\"\n\n",
            "",
        );
    assert!(!within.contains("other-web") && within.contains("hall-b"));
    sd.write_file("/root/within.toml", &within).expect("write");
    let (code, out, err) = fleet(&sd, &["push-config", NODE, "/root/within.toml"]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", journal());
    assert!(out.contains(&format!("config stored as {PUSHED}")), "{out}");
    assert_eq!(sd.sh(&format!("cat {PUSHED}")).expect("cat"), within);
    assert_eq!(
        sd.sh(&format!("stat -c '%a %U' {PUSHED}"))
            .expect("stat")
            .trim(),
        "600 outpost"
    );
    assert_eq!(sd.sh(&format!("cat {LOCAL}")).expect("cat"), local);
    // The reload took it, [fleet] included (the uplink restarted in the
    // running agent: same process).
    let after = poll(
        "the node to run the pushed config",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let s = status(&sd)?;
            // The target list is the latest sample's: wait for the first
            // sample under the pushed config.
            if s["config"] == PUSHED
                && s["group"] == "hall-b"
                && s["sample_interval_ms"] == 700
                && s["targets"].as_array().map(Vec::len) == Some(1)
            {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", journal()));
    eprintln!(
        "running the pushed config: {} targets",
        after["targets"].as_array().map_or(0, Vec::len)
    );
    assert_eq!(
        after["targets"].as_array().map(Vec::len),
        Some(1),
        "{after}"
    );
    assert_eq!(
        process(&sd),
        (pid.clone(), restarts.clone()),
        "the agent restarted"
    );
    wait_event(&sd, "config.applied", PUSHED, "a config.applied event");
    // Commands on the new group's topic reach it.
    let (code, out, err) = fleet(&sd, &["pause", "--group", "hall-b"]);
    assert_eq!(code, 0, "{out}\n{err}");
    sd.sh("test -f /var/lib/outpost/pause").expect("paused");
    let (code, out, err) = fleet(&sd, &["resume", NODE]);
    assert_eq!(code, 0, "{out}\n{err}");

    // A push that acts on a unit the local rules do not: refused, nothing
    // written, nothing changed.
    let outside = within.replace(
        "[mqtt]",
        "[[target]]\nname = \"other\"\nkind = \"systemd\"\nunit = \"other-web.service\"\n\n\
         [[rule]]\nname = \"other-down\"\ntarget = \"other\"\nwhen = \"unit_failed\"\n\
         do = \"restart\"\nmode = \"auto\"\n\n[mqtt]",
    );
    sd.write_file("/root/outside.toml", &outside)
        .expect("write");
    let (code, out, err) = fleet(&sd, &["push-config", NODE, "/root/outside.toml"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("REFUSED"), "{out}");
    assert!(
        out.contains(&format!("outside the local policy of {LOCAL}")),
        "{out}"
    );
    assert!(
        out.contains("restart on other-web.service (auto): no local rule does this"),
        "{out}"
    );
    assert_eq!(sd.sh(&format!("cat {PUSHED}")).expect("cat"), within);
    assert_eq!(sd.sh(&format!("cat {LOCAL}")).expect("cat"), local);
    let refused = wait_event(&sd, "config.refused", PUSHED, "a config.refused event");
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("other-web.service")),
        "{refused}"
    );
    let still = status(&sd).expect("status");
    assert_eq!(still["config"], PUSHED, "{still}");
    assert_eq!(
        still["targets"].as_array().map(Vec::len),
        Some(1),
        "{still}"
    );

    // The grant is the local config's, whatever runs: a reload rewrites it
    // from /etc/outpost, and the pushed config keeps running.
    sd.sh("systemctl reload outpost.service").expect("reload");
    assert_eq!(sd.sh(&format!("cat {RULES}")).expect("rule"), grant);
    // A restart starts on the pushed config.
    let old_pid: u64 = pid.parse().expect("MainPID");
    sd.sh("systemctl restart outpost.service").expect("restart");
    let restarted = poll(
        "the restarted node to run the pushed config",
        Duration::from_secs(30),
        Duration::from_millis(300),
        || {
            let s = status(&sd)?;
            if s["pid"].as_u64() != Some(old_pid) && s["config"] == PUSHED {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", journal()));
    assert_eq!(restarted["group"], "hall-b", "{restarted}");
    assert_eq!(restarted["sample_interval_ms"], 700, "{restarted}");
    assert_eq!(sd.sh(&format!("cat {RULES}")).expect("rule"), grant);
    let logged = sd
        .sh("journalctl -b --no-pager -o cat _SYSTEMD_UNIT=outpost.service")
        .expect("journal");
    assert!(logged.contains("running the fleet config"), "{logged}");
}
