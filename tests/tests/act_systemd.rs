//! The systemd actuator against a real systemd, booted in a container with
//! systemd-nspawn (see `outpost_tests::nspawn`), over the container's
//! system bus from the host. Every effect is checked with `systemctl`
//! inside, not with outpost's own reading.
//!
//! Needs root; fails, never skips, when it cannot boot the container.

use std::time::Duration;

use outpost::act::{ActionOutcome, ActionRequest, Actuator, Actuators, ActuatorsConfig};
use outpost::decide::types::{ActionKind, ActionTarget};
use outpost_tests::nspawn::Systemd;

const STAYS_UP: &str = "\
[Unit]
Description=outpost test: a service that stays up

[Service]
ExecStart=/bin/sleep infinity
";

/// Its start job fails: a oneshot whose ExecStart exits 1.
const START_FAILS: &str = "\
[Unit]
Description=outpost test: a service whose start fails

[Service]
Type=oneshot
ExecStart=/bin/false
";

/// Its start job is done as soon as the process is forked; the process
/// then exits 1.
const DIES_AFTER_START: &str = "\
[Unit]
Description=outpost test: a service that dies right after starting

[Service]
ExecStart=/bin/sh -c 'sleep 0.3; exit 1'
";

/// Its start job takes 30 s.
const SLOW_START: &str = "\
[Unit]
Description=outpost test: a service that takes long to start

[Service]
Type=oneshot
ExecStart=/bin/sleep 30
";

const PROTECTED: &str = "demo-protected.service";

fn boot() -> Systemd {
    Systemd::boot().expect("boot systemd in nspawn")
}

fn actuators(sd: &Systemd, protected: &[&str]) -> Actuators {
    Actuators::new(ActuatorsConfig {
        protected: protected.iter().map(|s| s.to_string()).collect(),
        system_bus: Some(sd.system_bus_address()),
        job_timeout: Duration::from_secs(30),
        ..ActuatorsConfig::default()
    })
}

async fn act(a: &Actuators, unit: &str, action: ActionKind) -> ActionOutcome {
    let out = a
        .execute(&ActionRequest {
            id: 1,
            target_name: "web".into(),
            target: ActionTarget::Systemd { unit: unit.into() },
            action,
            command: None,
        })
        .await;
    eprintln!("{out:#?}");
    out
}

/// `ActiveState/SubState`, as systemctl inside sees it.
fn state(sd: &Systemd, unit: &str) -> String {
    let p = sd
        .unit_properties(unit, &["ActiveState", "SubState"])
        .expect("systemctl show");
    format!("{}/{}", p[0], p[1])
}

fn main_pid(sd: &Systemd, unit: &str) -> String {
    sd.unit_properties(unit, &["MainPID"])
        .expect("systemctl show")
        .remove(0)
}

#[tokio::test]
async fn restart_start_and_stop_change_the_unit() {
    let sd = boot();
    sd.install_unit("demo-ok.service", STAYS_UP)
        .expect("install demo-ok");
    sd.install_unit("demo-stopped.service", STAYS_UP)
        .expect("install demo-stopped");
    sd.sh("systemctl start demo-ok.service")
        .expect("start demo-ok");
    let a = actuators(&sd, &["systemd-*", "dbus.service"]);

    // Restart: a new main process, active/running again.
    let pid_before = main_pid(&sd, "demo-ok.service");
    let out = act(&a, "demo-ok.service", ActionKind::Restart).await;
    let pid_after = main_pid(&sd, "demo-ok.service");
    assert!(out.ok, "{out:?}\n{}", sd.journal_tail(30));
    assert_ne!(pid_after, pid_before, "restart kept the main process");
    assert_ne!(pid_after, "0");
    assert_eq!(state(&sd, "demo-ok.service"), "active/running");
    assert_eq!(
        out.before.as_deref(),
        Some(format!("active/running (main pid {pid_before})").as_str())
    );
    assert_eq!(
        out.after.as_deref(),
        Some(format!("active/running (main pid {pid_after})").as_str())
    );
    assert_eq!(
        out.summary,
        format!("restart demo-ok.service: job done; now active/running (main pid {pid_after})")
    );

    // Start a stopped unit.
    assert_eq!(state(&sd, "demo-stopped.service"), "inactive/dead");
    let out = act(&a, "demo-stopped.service", ActionKind::Start).await;
    assert!(out.ok, "{out:?}");
    assert_eq!(out.before.as_deref(), Some("inactive/dead"));
    assert_eq!(state(&sd, "demo-stopped.service"), "active/running");
    let pid = main_pid(&sd, "demo-stopped.service");
    assert_eq!(
        out.after.as_deref(),
        Some(format!("active/running (main pid {pid})").as_str())
    );

    // Stop.
    let out = act(&a, "demo-ok.service", ActionKind::Stop).await;
    assert!(out.ok, "{out:?}");
    assert_eq!(out.after.as_deref(), Some("inactive/dead"));
    assert_eq!(
        out.summary,
        "stop demo-ok.service: job done; now inactive/dead"
    );
    assert_eq!(state(&sd, "demo-ok.service"), "inactive/dead");

    // A unit name without a suffix means .service, as for systemctl.
    let out = act(&a, "demo-ok", ActionKind::Start).await;
    assert!(out.ok, "{out:?}");
    assert_eq!(state(&sd, "demo-ok.service"), "active/running");

    // Reload of a unit without ExecReload: systemd says why, nothing
    // changes.
    let pid = main_pid(&sd, "demo-ok.service");
    let out = act(&a, "demo-ok.service", ActionKind::Reload).await;
    assert!(!out.ok);
    assert!(
        out.summary.starts_with(
            "reload demo-ok.service: org.freedesktop.systemd1.JobTypeNotApplicable: \
             Job type reload is not applicable for unit demo-ok.service; now active/running"
        ),
        "{}",
        out.summary
    );
    assert_eq!(main_pid(&sd, "demo-ok.service"), pid);
}

#[tokio::test]
async fn refusals_and_failed_jobs() {
    let sd = boot();
    sd.install_unit(PROTECTED, STAYS_UP)
        .expect("install demo-protected");
    // An alias of the protected unit, as `Alias=` + enable would make it.
    sd.sh(&format!(
        "ln -s /etc/systemd/system/{PROTECTED} /etc/systemd/system/demo-alias.service && \
         systemctl daemon-reload"
    ))
    .expect("alias");
    sd.install_unit("demo-fail.service", START_FAILS)
        .expect("install demo-fail");
    sd.install_unit("demo-dies.service", DIES_AFTER_START)
        .expect("install demo-dies");
    sd.install_unit("demo-slow.service", SLOW_START)
        .expect("install demo-slow");
    sd.sh(&format!("systemctl start {PROTECTED}"))
        .expect("start demo-protected");
    let a = actuators(&sd, &[PROTECTED, "systemd-*"]);

    // A unit that does not exist.
    let out = act(&a, "no-such-outpost-unit.service", ActionKind::Restart).await;
    assert!(!out.ok);
    assert_eq!(
        out.summary,
        "restart no-such-outpost-unit.service: no such unit"
    );
    assert_eq!(out.before, None);
    assert_eq!(out.after, None);

    // Protected units are refused and left alone: by name, by glob, and
    // through an alias (known only after asking systemd for its names).
    let pid = main_pid(&sd, PROTECTED);
    for unit in [PROTECTED, "demo-protected", "demo-alias.service"] {
        for action in [ActionKind::Restart, ActionKind::Stop] {
            let out = act(&a, unit, action).await;
            assert!(!out.ok);
            assert!(
                out.summary.contains("refused: the unit is protected"),
                "{}",
                out.summary
            );
        }
    }
    let out = act(&a, "systemd-journald.service", ActionKind::Restart).await;
    assert!(!out.ok);
    assert!(out.summary.contains("\"systemd-*\""), "{}", out.summary);
    assert_eq!(
        main_pid(&sd, PROTECTED),
        pid,
        "a protected unit was touched"
    );
    assert_eq!(state(&sd, PROTECTED), "active/running");

    // A start job that fails is reported as failed, with the state after.
    let out = act(&a, "demo-fail.service", ActionKind::Restart).await;
    assert!(!out.ok);
    assert_eq!(
        out.summary,
        "restart demo-fail.service: job failed; now failed/failed (result exit-code)"
    );
    assert_eq!(state(&sd, "demo-fail.service"), "failed/failed");

    // A simple service's restart job is done once the process is forked,
    // even though it dies right after: ok, and the after-state is whatever
    // systemd says then (verification is decide's job).
    let out = act(&a, "demo-dies.service", ActionKind::Restart).await;
    assert!(out.ok, "{out:?}");
    assert!(
        out.summary
            .starts_with("restart demo-dies.service: job done; now "),
        "{}",
        out.summary
    );
    assert!(out.after.is_some());

    // A job that outlasts the job timeout: not ok, and the state says it
    // is still starting.
    let impatient = Actuators::new(ActuatorsConfig {
        system_bus: Some(sd.system_bus_address()),
        job_timeout: Duration::from_secs(1),
        ..ActuatorsConfig::default()
    });
    let out = act(&impatient, "demo-slow.service", ActionKind::Start).await;
    assert!(!out.ok);
    assert!(
        out.summary.contains("did not finish within 1 s"),
        "{}",
        out.summary
    );
    let after = out.after.clone().unwrap_or_default();
    assert!(after.starts_with("activating/start"), "{after}");
    assert!(out.duration_ms >= 1000 && out.duration_ms < 5000, "{out:?}");
}
