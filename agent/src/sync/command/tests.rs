use std::sync::atomic::AtomicUsize;

use ed25519_dalek::SigningKey;

use super::*;
use crate::control::{LiveStatus, Reply, Request};
use crate::sync::envelope::{key_line, sign, Envelope};

struct Harness {
    ctx: CommandContext,
    _dir: tempfile::TempDir,
    requests: Arc<Mutex<Vec<Request>>>,
    reloads: Arc<AtomicUsize>,
    connected: tokio::sync::watch::Sender<bool>,
    key: SigningKey,
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// A context whose control channel is a double: it records every request
/// and approves decision #7 and `run web restart` only.
fn harness(trusted: bool, allow_unsigned: bool) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = crate::config::Config::builtin();
    cfg.agent.state_dir = dir.path().join("state");
    let store = crate::store::Store::open(&cfg).unwrap();
    let k = key(1);
    let config_path = dir.path().join("outpost.toml");
    std::fs::write(
        &config_path,
        local_policy(&cfg.agent.state_dir, &key_line(&k.verifying_key())),
    )
    .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::control::Command>(8);
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Some((req, answer)) = rx.recv().await {
            let ok = matches!(
                &req,
                Request::Approve { id: 7, .. }
                    | Request::Deny { id: 7, .. }
                    | Request::ModelsChanged
                    | Request::ModelPromote
                    | Request::ModelRollback
            ) || matches!(&req, Request::Run { target, action, .. } if target == "web" && action == "restart");
            seen.lock().unwrap().push(req);
            let _ = answer.send(Reply {
                ok,
                message: if ok {
                    "done".into()
                } else {
                    "refused by the double".into()
                },
            });
        }
    });
    let reloads = Arc::new(AtomicUsize::new(0));
    let r = reloads.clone();
    let (connected, connected_rx) = tokio::sync::watch::channel(false);
    let ctx = CommandContext {
        node_id: "n1".into(),
        group: Some("hall-2".into()),
        trusted_keys: if trusted {
            vec![key_line(&k.verifying_key())]
        } else {
            Vec::new()
        },
        allow_unsigned,
        control: tx,
        state_dir: cfg.agent.state_dir.clone(),
        store,
        config_path: Some(config_path),
        status: Arc::new(Mutex::new(LiveStatus {
            node_id: "n1".into(),
            ..LiveStatus::default()
        })),
        pause_file: cfg.agent.state_dir.join("pause"),
        connected: connected_rx,
        reload: Arc::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }),
        shared: Arc::new(Shared::default()),
    };
    Harness {
        ctx,
        _dir: dir,
        requests,
        reloads,
        connected,
        key: k,
    }
}

fn command(cmd: &str, args: serde_json::Value) -> Command {
    use rand_core::RngCore as _;
    Command {
        v: Some(1),
        id: format!("req-{cmd}"),
        cmd: cmd.into(),
        args,
        expires_ms: now_ms() + 10_000,
        nonce: format!(
            "{:032x}",
            u128::from(rand_core::OsRng.next_u64()) << 64 | u128::from(rand_core::OsRng.next_u64())
        ),
        node: None,
        max_concurrency: None,
        group_size: None,
        slot_ms: None,
    }
}

fn signed(c: &Command, k: &SigningKey) -> Vec<u8> {
    sign(&serde_json::to_vec(c).unwrap(), k).to_json()
}

impl Harness {
    async fn send(&self, c: &Command) -> CommandReply {
        handle(&self.ctx, Scope::Node, &signed(c, &self.key))
            .await
            .expect("a reply")
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// The local config (the policy), which `config.apply` never writes.
    fn config_text(&self) -> String {
        std::fs::read_to_string(self.ctx.config_path.as_ref().unwrap()).unwrap()
    }

    /// Where `config.apply` stores a pushed config.
    fn fleet_path(&self) -> PathBuf {
        fleet_config::path(&self.ctx.state_dir)
    }

    fn fleet_text(&self) -> Option<String> {
        std::fs::read_to_string(self.fleet_path()).ok()
    }
}

/// The harness's local config: restart nginx when its probe fails, the
/// harness's key trusted.
fn local_policy(state_dir: &Path, key: &str) -> String {
    format!(
        "[agent]\nnode_id = \"n1\"\nstate_dir = {state:?}\n\n\
         [[target]]\nname = \"web\"\nkind = \"systemd\"\nunit = \"nginx.service\"\n\
         probe = {{ http = \"http://127.0.0.1:8080/\" }}\n\n\
         [[rule]]\nname = \"web-hung\"\ntarget = \"web\"\nwhen = \"probe_failed\"\n\
         do = \"restart\"\nmode = \"auto\"\n\n\
         [fleet]\ntrusted_keys = [{key:?}]\n",
        state = state_dir.display().to_string()
    )
}

fn refused(r: &CommandReply, needle: &str) {
    assert!(!r.ok, "expected a refusal, got {r:?}");
    let e = r.error.clone().unwrap_or_default();
    assert!(
        e.contains(needle),
        "error {e:?} does not mention {needle:?}"
    );
}

#[tokio::test]
async fn an_approval_signed_by_a_trusted_key_reaches_the_control_channel() {
    let h = harness(true, false);
    let r = h
        .send(&command("approve", serde_json::json!({"action": 7})))
        .await;
    assert!(r.ok, "{r:?}");
    assert_eq!(r.request_id.as_deref(), Some("req-approve"));
    match h.requests().as_slice() {
        [Request::Approve {
            id: 7,
            by: Some(by),
        }] => {
            // The signer reaches the audit.
            assert_eq!(
                by,
                &format!("fleet:{}", &key_line(&h.key.verifying_key())[8..])
            );
        }
        other => panic!("{other:?}"),
    }
    let r = h
        .send(&command("deny", serde_json::json!({"action": 9})))
        .await;
    refused(&r, "refused by the double");
    assert!(matches!(
        h.requests().last(),
        Some(Request::Deny { id: 9, .. })
    ));
}

#[tokio::test]
async fn an_unsigned_command_is_refused_when_keys_are_configured() {
    let h = harness(true, false);
    let c = command("pause", serde_json::json!({}));
    let payload = Envelope::unsigned(&serde_json::to_vec(&c).unwrap()).to_json();
    let r = handle(&h.ctx, Scope::Node, &payload).await.unwrap();
    refused(&r, "unsigned");
    assert_eq!(r.request_id.as_deref(), Some("req-pause"));
    assert!(!h.ctx.pause_file.exists());
}

#[tokio::test]
async fn a_command_signed_by_another_key_is_refused() {
    let h = harness(true, false);
    let c = command("pause", serde_json::json!({}));
    let r = handle(&h.ctx, Scope::Node, &signed(&c, &key(2)))
        .await
        .unwrap();
    refused(&r, "not in [fleet] trusted_keys");
    assert!(!h.ctx.pause_file.exists());
}

#[tokio::test]
async fn a_bad_signature_is_refused() {
    let h = harness(true, false);
    let c = command("pause", serde_json::json!({}));
    let mut env = sign(&serde_json::to_vec(&c).unwrap(), &h.key);
    let other = command("resume", serde_json::json!({}));
    env.body = B64.encode(serde_json::to_vec(&other).unwrap());
    let r = handle(&h.ctx, Scope::Node, &env.to_json()).await.unwrap();
    refused(&r, "bad signature");
    assert!(h.requests().is_empty());
}

#[tokio::test]
async fn garbled_payloads_get_an_error_reply_and_change_nothing() {
    let h = harness(true, false);
    let r = handle(&h.ctx, Scope::Node, b"{not json").await.unwrap();
    refused(&r, "not a command envelope");
    assert_eq!(r.request_id, None);
    // A valid signature over something that is not a command.
    let env = sign(b"[1,2,3]", &h.key).to_json();
    let r = handle(&h.ctx, Scope::Node, &env).await.unwrap();
    refused(&r, "not a command");
    // Unknown fields are refused, not ignored.
    let mut v = serde_json::to_value(command("pause", serde_json::json!({}))).unwrap();
    v["surprise"] = true.into();
    let env = sign(&serde_json::to_vec(&v).unwrap(), &h.key).to_json();
    let r = handle(&h.ctx, Scope::Node, &env).await.unwrap();
    refused(&r, "surprise");
    // Arguments of the wrong shape.
    let r = h
        .send(&command("approve", serde_json::json!({"action": "x"})))
        .await;
    refused(&r, "bad args for approve");
    assert!(h.requests().is_empty());
    assert!(!h.ctx.pause_file.exists());
}

#[tokio::test]
async fn an_oversized_payload_is_refused_before_parsing() {
    let h = harness(true, false);
    let big = vec![b'{'; envelope::MAX_ENVELOPE_BYTES + 1];
    let r = handle(&h.ctx, Scope::Node, &big).await.unwrap();
    refused(&r, "over the limit");
    assert_eq!(r.request_id, None);
}

#[tokio::test]
async fn an_unknown_command_is_refused() {
    let h = harness(true, false);
    let r = h.send(&command("reboot", serde_json::json!({}))).await;
    refused(&r, "unknown command \"reboot\"");
    assert!(h.requests().is_empty());
}

#[tokio::test]
async fn expired_and_far_future_commands_are_refused() {
    let h = harness(true, false);
    let mut c = command("pause", serde_json::json!({}));
    c.expires_ms = now_ms() - 1;
    refused(&h.send(&c).await, "expired");
    let mut c = command("pause", serde_json::json!({}));
    c.expires_ms = now_ms() + MAX_EXPIRY_AHEAD_MS + 60_000;
    refused(&h.send(&c).await, "ahead");
    let mut c = command("pause", serde_json::json!({}));
    c.v = Some(2);
    refused(&h.send(&c).await, "version 2");
    assert!(!h.ctx.pause_file.exists());
}

#[tokio::test]
async fn a_replayed_command_is_refused_even_after_a_restart() {
    let h = harness(true, false);
    let c = command("pause", serde_json::json!({}));
    let payload = signed(&c, &h.key);
    let first = handle(&h.ctx, Scope::Node, &payload).await.unwrap();
    assert!(first.ok, "{first:?}");
    std::fs::remove_file(&h.ctx.pause_file).unwrap();
    let again = handle(&h.ctx, Scope::Node, &payload).await.unwrap();
    refused(&again, "replayed");
    assert!(!h.ctx.pause_file.exists());
    // A restarted agent: same state directory, nothing in memory.
    let restarted = CommandContext {
        shared: Arc::new(Shared::default()),
        ..h.ctx.clone()
    };
    let after = handle(&restarted, Scope::Node, &payload).await.unwrap();
    refused(&after, "replayed");
    assert!(!h.ctx.pause_file.exists());
}

#[tokio::test]
async fn the_nonce_book_forgets_expired_nonces_and_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut book = NonceBook::load(dir.path());
    book.record("aaaaaaaa", 1_000, 500).unwrap();
    assert!(matches!(
        book.record("aaaaaaaa", 1_000, 600),
        Err(CommandError::Replayed(_))
    ));
    // Past its expiry the nonce is dropped (its command is refused as
    // expired anyway).
    book.record("bbbbbbbb", 5_000, 2_000).unwrap();
    assert!(!book.seen.contains_key("aaaaaaaa"));
    for i in book.seen.len()..MAX_NONCES {
        book.seen.insert(format!("n{i}"), 10_000);
    }
    assert!(matches!(
        book.record("cccccccc", 10_000, 3_000),
        Err(CommandError::NoncesFull)
    ));
}

#[tokio::test]
async fn pause_and_resume_use_the_local_pause_file() {
    let h = harness(true, false);
    let r = h
        .send(&command(
            "pause",
            serde_json::json!({"reason": "maintenance"}),
        ))
        .await;
    assert!(r.ok, "{r:?}");
    let text = std::fs::read_to_string(&h.ctx.pause_file).unwrap();
    assert!(text.contains("maintenance"), "{text}");
    assert!(text.contains("fleet:"), "{text}");
    let r = h.send(&command("resume", serde_json::json!({}))).await;
    assert!(r.ok, "{r:?}");
    assert!(!h.ctx.pause_file.exists());
}

#[tokio::test]
async fn run_goes_to_the_guarded_manual_path_with_the_signer() {
    let h = harness(true, false);
    let r = h
        .send(&command(
            "run",
            serde_json::json!({"target": "web", "do": "restart"}),
        ))
        .await;
    assert!(r.ok, "{r:?}");
    let r = h
        .send(&command(
            "run",
            serde_json::json!({"target": "db", "do": "stop"}),
        ))
        .await;
    refused(&r, "refused by the double");
    let reqs = h.requests();
    match &reqs[0] {
        Request::Run { target, action, by } => {
            assert_eq!((target.as_str(), action.as_str()), ("web", "restart"));
            assert!(by.starts_with("fleet:") && by.len() > 10, "{by}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn without_keys_only_status_is_answered_unless_unsigned_is_allowed() {
    let h = harness(false, false);
    let c = command("status", serde_json::json!({}));
    let payload = Envelope::unsigned(&serde_json::to_vec(&c).unwrap()).to_json();
    let r = handle(&h.ctx, Scope::Node, &payload).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.result.unwrap()["node_id"], "n1");
    let c = command("pause", serde_json::json!({}));
    let payload = Envelope::unsigned(&serde_json::to_vec(&c).unwrap()).to_json();
    refused(
        &handle(&h.ctx, Scope::Node, &payload).await.unwrap(),
        "no [fleet] trusted_keys",
    );
    // Signed by some key: still nobody is trusted.
    refused(
        &h.send(&command("pause", serde_json::json!({}))).await,
        "no [fleet] trusted_keys",
    );
    assert!(!h.ctx.pause_file.exists());

    let open = harness(false, true);
    let c = command("pause", serde_json::json!({}));
    let payload = Envelope::unsigned(&serde_json::to_vec(&c).unwrap()).to_json();
    let r = handle(&open.ctx, Scope::Node, &payload).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert!(open.ctx.pause_file.exists());
}

#[tokio::test]
async fn commands_for_another_node_or_group_get_no_reply() {
    let h = harness(true, false);
    let mut c = command("pause", serde_json::json!({}));
    c.node = Some("n2".into());
    assert_eq!(
        handle(&h.ctx, Scope::Fleet, &signed(&c, &h.key)).await,
        None
    );
    let c = command("pause", serde_json::json!({}));
    assert_eq!(
        handle(&h.ctx, Scope::Group("hall-9".into()), &signed(&c, &h.key)).await,
        None
    );
    assert!(!h.ctx.pause_file.exists());
    let r = handle(&h.ctx, Scope::Group("hall-2".into()), &signed(&c, &h.key))
        .await
        .unwrap();
    assert!(r.ok, "{r:?}");
}

fn config_cmd(toml: &str, sha: Option<&str>) -> Command {
    let sha = sha.map_or_else(|| sha256_hex(toml.as_bytes()), String::from);
    command(
        "config.apply",
        serde_json::json!({"toml": toml, "sha256": sha}),
    )
}

#[tokio::test]
async fn config_apply_with_a_wrong_sha256_writes_nothing() {
    let h = harness(true, false);
    let before = h.config_text();
    let r = h.send(&config_cmd(&before, Some(&"0".repeat(64)))).await;
    refused(&r, "sha256 mismatch");
    assert_eq!(h.config_text(), before);
    assert_eq!(h.fleet_text(), None);
    assert_eq!(h.reloads.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn config_apply_refuses_an_invalid_config_and_writes_nothing() {
    let h = harness(true, false);
    let before = h.config_text();
    let r = h.send(&config_cmd("[agent]\nbogus_key = 1\n", None)).await;
    refused(&r, "config refused, nothing written: not a valid config");
    refused(&r, "bogus_key");
    assert_eq!(h.config_text(), before);
    assert_eq!(h.fleet_text(), None);
    assert!(!prev_path(&h.fleet_path()).exists());
    assert_eq!(h.reloads.load(Ordering::SeqCst), 0);
    assert!(!h.ctx.shared.watchdog_armed.load(Ordering::SeqCst));
}

#[tokio::test]
async fn config_apply_stores_the_push_in_the_state_dir_and_reloads() {
    use std::os::unix::fs::PermissionsExt as _;
    let h = harness(true, false);
    let local = h.config_text();
    let first = local.replace(
        "node_id = \"n1\"",
        "node_id = \"n1\"\nsample_interval_ms = 2000",
    );
    let r = h.send(&config_cmd(&first, None)).await;
    assert!(r.ok, "{r:?}");
    let result = r.result.unwrap();
    assert_eq!(result["path"], h.fleet_path().display().to_string());
    assert!(
        result["message"]
            .as_str()
            .unwrap()
            .contains("within the local policy"),
        "{result}"
    );
    // Stored in the state directory, private to the agent; the local
    // config (the policy) is untouched, and there is no previous push.
    assert_eq!(h.fleet_text().as_deref(), Some(first.as_str()));
    let mode = std::fs::metadata(h.fleet_path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(h.config_text(), local);
    assert!(!prev_path(&h.fleet_path()).exists());
    assert!(!prev_path(h.ctx.config_path.as_ref().unwrap()).exists());
    assert_eq!(h.reloads.load(Ordering::SeqCst), 1);
    // A second apply while the first is watched is refused.
    let second = local.replace(
        "node_id = \"n1\"",
        "node_id = \"n1\"\nsample_interval_ms = 3000",
    );
    refused(
        &h.send(&config_cmd(&second, None)).await,
        "still being watched",
    );
    assert_eq!(h.fleet_text().as_deref(), Some(first.as_str()));
    // Once the watch is over, the next push keeps the first as .prev.
    h.ctx.shared.watchdog_armed.store(false, Ordering::SeqCst);
    let r = h.send(&config_cmd(&second, None)).await;
    assert!(r.ok, "{r:?}");
    assert_eq!(h.fleet_text().as_deref(), Some(second.as_str()));
    assert_eq!(
        std::fs::read_to_string(prev_path(&h.fleet_path())).unwrap(),
        first
    );
    assert_eq!(h.reloads.load(Ordering::SeqCst), 2);
    assert_eq!(h.config_text(), local);
}

#[tokio::test]
async fn config_apply_refuses_a_push_outside_the_local_policy_and_writes_nothing() {
    let h = harness(true, false);
    let local = h.config_text();
    for (push, why) in [
        // A unit the local rules do not act on.
        (
            local.replace("nginx.service", "sshd-keygen.service"),
            "restart on sshd-keygen.service (auto): no local rule does this",
        ),
        // A verb they do not use.
        (
            local.replace("do = \"restart\"", "do = \"stop\""),
            "stop on nginx.service",
        ),
        // Anyone may command the node.
        (
            local.replace(
                &format!("trusted_keys = [{:?}]", key_line(&h.key.verifying_key())),
                "allow_unsigned = true",
            ),
            "fleet.allow_unsigned",
        ),
        // Nobody's key.
        (
            local.replace(
                &format!("trusted_keys = [{:?}]", key_line(&h.key.verifying_key())),
                "trusted_keys = []",
            ),
            "fleet.trusted_keys",
        ),
        // A built-in protection removed.
        (
            format!("{local}\n[guard]\nunprotect = [\"ssh.service\"]\n"),
            "guard.unprotect",
        ),
    ] {
        assert_ne!(push, local, "the edit for {why:?} changed nothing");
        let r = h.send(&config_cmd(&push, None)).await;
        refused(
            &r,
            "config refused, nothing written: outside the local policy of",
        );
        refused(&r, why);
    }
    assert_eq!(h.config_text(), local);
    assert_eq!(h.fleet_text(), None);
    assert!(!prev_path(&h.fleet_path()).exists());
    assert_eq!(h.reloads.load(Ordering::SeqCst), 0);
    assert!(!h.ctx.shared.watchdog_armed.load(Ordering::SeqCst));
}

#[tokio::test]
async fn config_apply_checks_the_local_policy_as_it_is_now() {
    let h = harness(true, false);
    let old_policy = h.config_text();
    // The operator takes the restart rule out of the local config: a push
    // that still has it is refused without a restart of the agent.
    let cut = old_policy.split("[[rule]]").next().unwrap().to_string()
        + &format!(
            "[fleet]\ntrusted_keys = [{:?}]\n",
            key_line(&h.key.verifying_key())
        );
    std::fs::write(h.ctx.config_path.as_ref().unwrap(), &cut).unwrap();
    let r = h.send(&config_cmd(&old_policy, None)).await;
    refused(
        &r,
        "restart on nginx.service (auto): no local rule does this",
    );
    assert_eq!(h.fleet_text(), None);
    // An unreadable local policy refuses every push.
    std::fs::write(
        h.ctx.config_path.as_ref().unwrap(),
        "[agent]\nnode_id = 7\n",
    )
    .unwrap();
    let r = h.send(&config_cmd(&cut, None)).await;
    refused(&r, "the local policy cannot be read");
    assert_eq!(h.fleet_text(), None);
    assert_eq!(h.reloads.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn config_apply_is_refused_without_a_local_config_file() {
    let mut h = harness(true, false);
    h.ctx.config_path = None;
    let r = h
        .send(&config_cmd("[agent]\nnode_id = \"n1\"\n", None))
        .await;
    refused(&r, "built-in default config");
    assert_eq!(h.fleet_text(), None);
}

#[tokio::test]
async fn the_watchdog_restores_the_previous_push_when_the_uplink_stays_down() {
    let h = harness(true, false);
    let path = h.fleet_path();
    std::fs::write(prev_path(&path), "old\n").unwrap();
    std::fs::write(&path, "new\n").unwrap();
    h.ctx.shared.watchdog_armed.store(true, Ordering::SeqCst);
    let kept = watchdog(
        path.clone(),
        h.ctx.connected.clone(),
        h.ctx.reload.clone(),
        h.ctx.shared.clone(),
        Duration::from_millis(10),
        Duration::from_millis(100),
    )
    .await;
    assert!(!kept);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n");
    assert_eq!(h.reloads.load(Ordering::SeqCst), 1);
    assert!(!h.ctx.shared.watchdog_armed.load(Ordering::SeqCst));
}

#[tokio::test]
async fn the_watchdog_goes_back_to_the_local_config_after_a_first_push() {
    let h = harness(true, false);
    let local = h.config_text();
    let push = local.replace(
        "node_id = \"n1\"",
        "node_id = \"n1\"\nsample_interval_ms = 2000",
    );
    assert!(h.send(&config_cmd(&push, None)).await.ok);
    assert!(h.fleet_path().exists());
    let kept = watchdog(
        h.fleet_path(),
        h.ctx.connected.clone(),
        h.ctx.reload.clone(),
        h.ctx.shared.clone(),
        Duration::from_millis(10),
        Duration::from_millis(100),
    )
    .await;
    assert!(!kept);
    // No previous push: the pushed file goes, so the reload runs the local
    // config, which was never touched.
    assert!(!h.fleet_path().exists());
    assert_eq!(h.config_text(), local);
    assert_eq!(h.reloads.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_watchdog_keeps_the_new_config_once_the_uplink_is_connected() {
    let h = harness(true, false);
    let path = h.fleet_path();
    std::fs::write(prev_path(&path), "old\n").unwrap();
    std::fs::write(&path, "new\n").unwrap();
    let tx = h.connected.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let _ = tx.send(true);
    });
    let kept = watchdog(
        path.clone(),
        h.ctx.connected.clone(),
        h.ctx.reload.clone(),
        h.ctx.shared.clone(),
        Duration::from_millis(10),
        Duration::from_secs(5),
    )
    .await;
    assert!(kept);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
    assert_eq!(h.reloads.load(Ordering::SeqCst), 0);
}

fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut hd = tar::Header::new_gnu();
        hd.set_size(data.len() as u64);
        hd.set_mode(0o644);
        hd.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut hd, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// A tar whose entry name is written raw (the builder refuses `..`).
fn raw_tar(name: &str, kind: tar::EntryType) -> Vec<u8> {
    let mut hd = tar::Header::new_old();
    {
        let old = hd.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
    }
    hd.set_size(0);
    hd.set_mode(0o644);
    hd.set_entry_type(kind);
    if kind == tar::EntryType::Symlink {
        hd.set_link_name("/etc/passwd").unwrap();
    }
    hd.set_cksum();
    let mut out = hd.as_bytes().to_vec();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn unpacking_takes_the_two_files_and_refuses_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let good = tar_of(&[("pkg/model.toml", b"x = 1\n"), ("pkg/model.onnx", b"onnx")]);
    unpack_package(&good, dir.path()).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("model.onnx")).unwrap(),
        b"onnx"
    );

    for (tar, why) in [
        (raw_tar("../model.toml", tar::EntryType::Regular), "`..`"),
        (raw_tar("/model.toml", tar::EntryType::Regular), "absolute"),
        (raw_tar("model.toml", tar::EntryType::Symlink), "links"),
        (
            tar_of(&[("model.toml", b""), ("model.onnx", b""), ("extra", b"")]),
            "only model.onnx",
        ),
        (tar_of(&[("model.toml", b"")]), "missing"),
        (b"garbage that is not a tar".to_vec(), ""),
    ] {
        let d = tempfile::tempdir().unwrap();
        let e = unpack_package(&tar, d.path()).unwrap_err();
        assert!(e.contains(why), "{e:?} should mention {why:?}");
    }
}

#[tokio::test]
async fn model_install_refuses_a_bad_sha256_and_a_corrupt_package() {
    let h = harness(true, false);
    let tar = tar_of(&[
        ("model.toml", b"not a manifest"),
        ("model.onnx", b"not onnx"),
    ]);
    let b64 = B64.encode(&tar);
    let r = h
        .send(&command(
            "model.install",
            serde_json::json!({"package_b64": b64, "sha256": "ab".repeat(32)}),
        ))
        .await;
    refused(&r, "sha256 mismatch");
    let r = h
        .send(&command(
            "model.install",
            serde_json::json!({"package_b64": b64, "sha256": sha256_hex(&tar)}),
        ))
        .await;
    refused(&r, "model package refused");
    // Nothing installed, nothing told to load, no temp directory left.
    assert!(lifecycle::load(&h.ctx.state_dir).unwrap().shadow.is_none());
    assert!(h.requests().is_empty());
    let leftovers: Vec<_> = std::fs::read_dir(&h.ctx.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".fleet-model"))
        .collect();
    assert!(leftovers.is_empty());
}

#[tokio::test]
async fn promote_and_rollback_go_to_the_control_channel() {
    let h = harness(true, false);
    assert!(
        h.send(&command("model.promote", serde_json::json!({})))
            .await
            .ok
    );
    assert!(
        h.send(&command("model.rollback", serde_json::json!({})))
            .await
            .ok
    );
    // A named target must match the installed model (none is).
    let r = h
        .send(&command(
            "model.promote",
            serde_json::json!({"target": "web"}),
        ))
        .await;
    refused(&r, "no shadow model");
    assert_eq!(
        h.requests(),
        vec![Request::ModelPromote, Request::ModelRollback]
    );
}

#[test]
fn the_stagger_is_a_slot_of_the_node_hash() {
    // 10 nodes, 5 at a time: 2 slots.
    let d = stagger("n1", 10, 5, 1000);
    let slot = fnv1a64("n1") % 2;
    assert_eq!(d, Duration::from_millis(slot * 1000));
    // Fewer nodes than the concurrency: everyone at once.
    assert_eq!(stagger("n1", 3, 5, 1000), Duration::ZERO);
    assert_eq!(stagger("n1", 10, 0, 1000), Duration::ZERO);
    // Published test vector for other implementations (PROTOCOL.md).
    assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
    // Spread: 1000 nodes over 10 slots, none empty.
    let mut counts = [0u32; 10];
    for i in 0..1000 {
        counts[(stagger(&format!("node-{i}"), 100, 10, 1).as_millis()) as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
}

#[tokio::test]
async fn model_install_installs_a_good_package_in_shadow_and_tells_the_pipeline() {
    let h = harness(true, false);
    let pkg = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/packages/pca");
    let tar = crate::fleet::package_tar(&pkg).unwrap();
    let r = h
        .send(&command(
            "model.install",
            serde_json::json!({
                "package_b64": B64.encode(&tar),
                "sha256": sha256_hex(&tar),
                "target": "web",
            }),
        ))
        .await;
    assert!(r.ok, "{r:?}");
    let reg = lifecycle::load(&h.ctx.state_dir).unwrap();
    let shadow = reg.shadow.expect("installed in shadow");
    assert_eq!(shadow.target, "web");
    assert!(reg.active.is_none(), "nothing is promoted by an install");
    assert_eq!(h.requests(), vec![Request::ModelsChanged]);
    assert_eq!(r.result.unwrap()["role"], "shadow");
}
