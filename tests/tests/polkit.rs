//! Least privilege under a real systemd and a real polkitd: the shipped
//! `outpost.service` (as the unprivileged `outpost` user) writes its polkit
//! rule from the config before it starts, and from then on the `outpost`
//! user may restart exactly the unit its config's rule restarts, with
//! exactly the verbs the rule uses, and is refused for every other unit and
//! verb. The agent itself restarts the allowed unit when it hangs.
//!
//! Needs root and polkitd (installed with apt when missing); fails, never
//! skips. Build the binary first: `cargo build -p outpost --bin outpost`.

use std::time::Duration;

use outpost_tests::nspawn::outpost_binary;
use outpost_tests::remediation::{format_rows, poll, Rig, CONFIG_PATH};

/// The real files, read at compile time: the test checks what ships.
const UNIT: &str = include_str!("../../systemd/outpost.service");
const SYSUSERS: &str = include_str!("../../systemd/outpost.sysusers");
const TMPFILES: &str = include_str!("../../systemd/outpost.tmpfiles");

const RULES: &str = "/etc/polkit-1/rules.d/50-outpost.rules";

const ALLOWED: &str = "demo-web.service";
const OTHER: &str = "other-web.service";

const CONFIG: &str = r#"
[agent]
node_id = "polkit-test"
state_dir = "/var/lib/outpost"
sample_interval_ms = 500

[[target]]
name = "web"
kind = "systemd"
unit = "demo-web.service"
probe = { http = "http://127.0.0.1:8080/", interval_ms = 500, timeout_ms = 300 }

# Watched, never acted on: no rule, so no grant.
[[target]]
name = "other"
kind = "systemd"
unit = "other-web.service"

[[rule]]
name = "web-hung"
target = "web"
when = "probe_failed"
for = "3 samples"
do = "restart"
mode = "auto"
cooldown = "5s"
verify = "probe_ok within 20s"
"#;

/// `systemctl --no-ask-password VERB UNIT` as the outpost user, over the
/// system bus (so polkit decides). Ok(()) if systemd ran the job, Err with
/// systemctl's message if it refused.
fn as_outpost(rig: &Rig, verb: &str, unit: &str) -> Result<(), String> {
    let out = rig
        .sd
        .exec(&[
            "setpriv",
            "--reuid=outpost",
            "--regid=outpost",
            "--init-groups",
            "--",
            "systemctl",
            "--no-ask-password",
            verb,
            unit,
        ])
        .expect("setpriv");
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn refused(rig: &Rig, verb: &str, unit: &str) {
    match as_outpost(rig, verb, unit) {
        Ok(()) => panic!(
            "the outpost user could `systemctl {verb} {unit}`; rule:\n{}",
            rig.sd.sh(&format!("cat {RULES}")).unwrap_or_default()
        ),
        Err(msg) => assert!(
            msg.contains("Access denied") || msg.contains("authentication required"),
            "systemctl {verb} {unit} failed, but not for lack of authorization: {msg}"
        ),
    }
}

#[test]
fn the_outpost_user_manages_only_the_units_its_rules_act_on() {
    outpost_tests::apt::install_if_missing("/usr/lib/polkit-1/polkitd", &["polkitd"])
        .expect("polkitd");
    let bin = outpost_binary().expect("outpost binary (cargo build -p outpost --bin outpost)");
    let rig = Rig::boot(bin.clone()).expect("boot systemd in nspawn");
    let sd = &rig.sd;

    // Install as the package does.
    sd.sh(&format!(
        "install -m 0755 {} /usr/bin/outpost",
        bin.display()
    ))
    .expect("install the binary");
    sd.write_file("/usr/lib/sysusers.d/outpost.conf", SYSUSERS)
        .expect("sysusers");
    sd.write_file("/usr/lib/tmpfiles.d/outpost.conf", TMPFILES)
        .expect("tmpfiles");
    sd.sh("systemd-sysusers outpost.conf && systemd-tmpfiles --create outpost.conf")
        .expect("user and directories");
    sd.write_file(CONFIG_PATH, CONFIG).expect("config");
    sd.install_unit("outpost.service", UNIT)
        .expect("install outpost.service");
    rig.start_web(ALLOWED, 8080)
        .expect("start the allowed web unit");
    rig.start_web(OTHER, 8081)
        .expect("start the other web unit");

    // Without the rule, the outpost user may not even touch the unit its
    // config names: the rule is what grants it.
    assert!(
        !sd.live_path(RULES).exists(),
        "a rule exists before outpost ran"
    );
    refused(&rig, "restart", ALLOWED);

    let started = sd
        .exec(&["systemctl", "start", "outpost.service"])
        .expect("systemctl");
    assert!(
        started.status.success(),
        "outpost.service did not start: {}\n{}",
        String::from_utf8_lossy(&started.stderr),
        rig.journal("outpost.service", 60)
    );

    // ExecStartPre wrote exactly what `outpost polkit-rules` prints.
    let written = sd.sh(&format!("cat {RULES}")).expect("the rule file");
    let printed = rig
        .outpost_ok("polkit-rules", &[])
        .expect("outpost polkit-rules");
    assert_eq!(written, printed);
    assert!(
        written.contains(r#""demo-web.service": ["reset-failed", "restart"],"#),
        "{written}"
    );
    assert!(!written.contains(OTHER), "{written}");
    assert_eq!(
        sd.sh(&format!("stat -c '%a %U' {RULES}"))
            .expect("stat")
            .trim(),
        "644 root"
    );

    // polkitd picks the new file up through its file monitor.
    let before = rig.main_pid(ALLOWED).expect("pid");
    poll(
        "polkit to allow the outpost user to restart demo-web",
        Duration::from_secs(15),
        Duration::from_millis(300),
        || as_outpost(&rig, "restart", ALLOWED),
    )
    .expect("restart allowed");
    let after = rig.main_pid(ALLOWED).expect("pid");
    assert!(after != 0 && after != before, "{before} -> {after}");

    // Only the verbs the rule uses, only on that unit.
    refused(&rig, "stop", ALLOWED);
    refused(&rig, "reload", ALLOWED);
    refused(&rig, "restart", OTHER);
    refused(&rig, "stop", OTHER);
    refused(&rig, "restart", "systemd-journald.service");
    refused(&rig, "start", "outpost-nonexistent.service");
    assert_eq!(
        sd.unit_properties(OTHER, &["ActiveState"]).expect("show")[0],
        "active"
    );

    // The agent (running as outpost under the shipped sandbox) restarts the
    // allowed unit when it hangs, through the same grant.
    rig.wait_probe_ok("web", Duration::from_secs(30))
        .expect("web probe ok");
    let hung = rig.hang(ALLOWED).expect("SIGSTOP demo-web");
    let rows = rig
        .wait_audit(
            "web-hung restart verified",
            Duration::from_secs(60),
            |rows| {
                rows.iter()
                    .any(|r| r.is("web-hung", "verify_ok"))
                    .then(|| rows.to_vec())
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.diagnostics()));
    let now = rig.main_pid(ALLOWED).expect("pid");
    assert!(now != 0 && now != hung, "not restarted: {hung} -> {now}");
    assert!(rig.http_ok("http://127.0.0.1:8080/"));
    eprintln!("{}", format_rows(&rows));
    let agent_uid = sd
        .sh("systemctl show -p UID --value outpost.service")
        .expect("uid");
    let outpost_uid = sd.sh("id -u outpost").expect("id");
    assert_eq!(agent_uid.trim(), outpost_uid.trim());

    // A reload regenerates the rule from the new config: drop the rule and
    // the grant is gone.
    let notify_only = CONFIG
        .replace("do = \"restart\"", "do = \"notify\"")
        .replace("verify = \"probe_ok within 20s\"\n", "");
    sd.write_file(CONFIG_PATH, &notify_only).expect("config");
    sd.sh("systemctl reload outpost.service").expect("reload");
    let rewritten = sd.sh(&format!("cat {RULES}")).expect("rule");
    assert!(rewritten.contains("var allowed = {};"), "{rewritten}");
    poll(
        "polkit to drop the grant",
        Duration::from_secs(15),
        Duration::from_millis(300),
        || match as_outpost(&rig, "restart", ALLOWED) {
            Ok(()) => Err("still allowed".to_string()),
            Err(e) => Ok(e),
        },
    )
    .expect("grant dropped");
    refused(&rig, "restart", ALLOWED);

    // A bad config fails the reload and leaves the rule as it was.
    sd.write_file(CONFIG_PATH, "[agent]\nnode_id = 7\n")
        .expect("config");
    let bad = sd
        .exec(&["systemctl", "reload", "outpost.service"])
        .expect("systemctl");
    assert!(!bad.status.success(), "a bad config reloaded");
    assert_eq!(sd.sh(&format!("cat {RULES}")).expect("rule"), rewritten);
    assert_eq!(
        sd.unit_properties("outpost.service", &["ActiveState"])
            .expect("show")[0],
        "active"
    );
}
