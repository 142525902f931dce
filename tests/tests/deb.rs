//! The amd64 package, installed with dpkg under a real systemd (nspawn):
//! it creates the user and directories, writes the polkit rule, and
//! `systemctl enable --now outpost` brings the agent up to READY as the
//! unprivileged user on the packaged default config. Removing it stops the
//! agent and takes the rule away; purging takes the state and config.
//!
//! Needs root and the package: `PROFILE=ci-cross scripts/build-debs amd64`
//! (or `OUTPOST_DEB=path`). Fails, never skips, when either is missing.
//!
//! Also checks that the configs the package and the DaemonSet example ship
//! are valid outpost configs.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use outpost_tests::nspawn::Systemd;
use outpost_tests::remediation::poll;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTPOST_DEB") {
        return PathBuf::from(p);
    }
    let p = workspace().join("target/debian/outpost_amd64.deb");
    assert!(
        p.is_file(),
        "no {}: build it first with `PROFILE=ci-cross scripts/build-debs amd64`",
        p.display()
    );
    p
}

fn load(text: &str) -> Result<outpost::config::Config, String> {
    let mut f = tempfile::NamedTempFile::new().expect("tmp");
    f.write_all(text.as_bytes()).expect("write");
    outpost::config::Config::load(f.path()).map_err(|e| e.to_string())
}

#[test]
fn packaged_and_daemonset_configs_are_valid() {
    let packaged = std::fs::read_to_string(workspace().join("agent/debian/outpost.toml"))
        .expect("agent/debian/outpost.toml");
    let cfg = load(&packaged).expect("the packaged default config");
    assert!(
        cfg.rules.is_empty(),
        "the default config must act on nothing"
    );

    // The ConfigMap's `outpost.toml: |` block, de-indented.
    let yaml =
        std::fs::read_to_string(workspace().join("config/examples/kubernetes-daemonset.yaml"))
            .expect("daemonset");
    let mut lines = yaml
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("outpost.toml: |"));
    lines
        .next()
        .expect("an outpost.toml block in the ConfigMap");
    let block: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .collect();
    assert!(block.len() > 5, "{block:?}");
    let toml: String = block
        .iter()
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let cfg = load(&toml).expect("the DaemonSet's config");
    assert_eq!(cfg.collect.proc_root, PathBuf::from("/host/proc"));
    assert_eq!(cfg.collect.sys_root, PathBuf::from("/host/sys"));
}

#[test]
fn the_package_installs_and_the_unit_comes_up() {
    let deb = deb();
    let sd = Systemd::boot().expect("boot systemd in nspawn");
    let journal = || sd.journal_tail(80);
    let deb = deb.canonicalize().expect("deb path");
    assert!(
        sd.exec(&["getent", "passwd", "outpost"])
            .expect("getent")
            .stdout
            .is_empty(),
        "the container has an outpost user before the package"
    );

    let info = sd
        .sh(&format!(
            "dpkg-deb --info {} && dpkg-deb --contents {}",
            deb.display(),
            deb.display()
        ))
        .expect("dpkg-deb");
    for want in [
        "Architecture: amd64",
        "./usr/bin/outpost",
        "./usr/lib/systemd/system/outpost.service",
        "./usr/lib/sysusers.d/outpost.conf",
        "./usr/lib/tmpfiles.d/outpost.conf",
        "./etc/outpost/outpost.toml",
        "./usr/share/doc/outpost/examples/outpost.toml",
        "./usr/share/doc/outpost/examples/kubernetes-daemonset.yaml",
        "./usr/share/doc/outpost/examples/container-socket.conf",
    ] {
        assert!(info.contains(want), "{want} not in the package:\n{info}");
    }

    let installed = sd
        .exec(&["dpkg", "-i", &deb.to_string_lossy()])
        .expect("dpkg");
    assert!(
        installed.status.success(),
        "dpkg -i failed:\n{}\n{}",
        String::from_utf8_lossy(&installed.stdout),
        String::from_utf8_lossy(&installed.stderr)
    );
    sd.sh("getent passwd outpost")
        .expect("the package made the user");
    assert_eq!(
        sd.sh("stat -c '%a %U:%G' /etc/outpost /etc/outpost/outpost.toml")
            .expect("stat"),
        "750 root:outpost\n640 root:outpost\n"
    );
    // polkitd is on the host image: the postinst wrote the rule, granting
    // nothing on the act-on-nothing default config.
    let rule = sd
        .sh("cat /etc/polkit-1/rules.d/50-outpost.rules")
        .expect("the polkit rule");
    assert!(rule.contains("var allowed = {};"), "{rule}");
    assert_eq!(
        sd.sh("systemctl is-enabled outpost.service || true")
            .expect("is-enabled")
            .trim(),
        "disabled"
    );

    let up = sd
        .exec(&["systemctl", "enable", "--now", "outpost"])
        .expect("systemctl");
    assert!(
        up.status.success(),
        "systemctl enable --now outpost: {}\n{}",
        String::from_utf8_lossy(&up.stderr),
        journal()
    );
    // Type=notify: `--now` returned after READY=1.
    let p = sd
        .unit_properties(
            "outpost.service",
            &["ActiveState", "SubState", "UnitFileState", "User"],
        )
        .expect("show");
    assert_eq!(
        p,
        ["active", "running", "enabled", "outpost"],
        "{}",
        journal()
    );
    let status = poll(
        "a StatusText",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            let t = sd
                .unit_properties("outpost.service", &["StatusText"])
                .map_err(|e| format!("{e:#}"))?
                .remove(0);
            if t.contains("signals") {
                Ok(t)
            } else {
                Err(t)
            }
        },
    )
    .expect("status");
    eprintln!("StatusText: {status}");
    let live = sd
        .sh("outpost status --json --state-dir /var/lib/outpost")
        .expect("outpost status");
    assert!(
        live.contains("\"running\": true") || live.contains("\"running\":true"),
        "{live}"
    );

    // Remove: the agent stops, the unit and the rule go, the config stays.
    let removed = sd.exec(&["dpkg", "-r", "outpost"]).expect("dpkg -r");
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert_eq!(
        sd.sh("systemctl is-active outpost.service || true")
            .expect("is-active")
            .trim(),
        "inactive"
    );
    sd.sh("test ! -e /usr/bin/outpost && test ! -e /etc/polkit-1/rules.d/50-outpost.rules && test -f /etc/outpost/outpost.toml")
        .expect("remove left the right things");
    sd.sh("dpkg -P outpost && test ! -e /etc/outpost && test ! -e /var/lib/outpost")
        .expect("purge");
}
