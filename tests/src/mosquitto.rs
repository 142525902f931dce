//! A real mosquitto for whole-system tests: installs it when missing, runs it
//! as a child process on a free loopback port with a generated config in a
//! temp dir (plain, TLS, mutual TLS, or password + ACL), stops and restarts
//! it on the same port with its persistence, and kills it on drop.
//!
//! Also a test MQTT client ([`Subscriber`], [`publish`], [`try_connect`]),
//! built on rumqttc with rustls and ring like the agent, and [`validate`], a
//! JSON Schema check for what the daemon publishes.
//!
//! TLS material (a CA, a server certificate for 127.0.0.1 and localhost, a
//! client certificate) is made at run time with the `openssl` CLI: it is on
//! every Debian host already (mosquitto links libssl), costs no crate build
//! on the shared cores, keeps aws-lc out of the tree (rcgen's default
//! backend) and makes the same PEM files an operator makes.
//!
//! Every helper fails loudly: a test that needs mosquitto and cannot get it
//! must fail, not skip.

use std::fs::OpenOptions;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rumqttc::{
    Client, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};

use crate::apt::have;

/// The Debian packages the harness needs.
pub const PACKAGES: &[&str] = &["mosquitto", "mosquitto-clients", "openssl"];

/// The broker binary from the `mosquitto` package.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// `mosquitto_passwd`, from the `mosquitto` package.
pub const MOSQUITTO_PASSWD: &str = "/usr/bin/mosquitto_passwd";

/// `mosquitto_sub`, from the `mosquitto-clients` package (for debugging a
/// test by hand; the harness's own client is rumqttc).
pub const MOSQUITTO_SUB: &str = "/usr/bin/mosquitto_sub";

/// The default topic prefix of the protocol (schemas/PROTOCOL.md).
pub const TOPIC_PREFIX: &str = "outpost/v1";

/// The node user of [`Mode::PasswordAcl`]: may write only
/// `outpost/v1/nodes/node-a/#` and read its command topics.
pub const NODE_USER: &str = "node-a";

/// The fleet user of [`Mode::PasswordAcl`]: reads everything, writes command
/// topics.
pub const FLEET_USER: &str = "fleet";

/// How long [`Broker::start`] and [`Broker::restart`] wait for the broker to
/// accept connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a client helper waits for CONNACK, SUBACK or PUBACK.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the broker is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain MQTT, anonymous clients allowed.
    Plain,
    /// MQTT over TLS with a server certificate signed by the test CA;
    /// anonymous clients allowed, no client certificate asked for.
    Tls,
    /// As [`Mode::Tls`], and a client certificate signed by the test CA is
    /// required (`require_certificate true`).
    MutualTls,
    /// Plain MQTT, no anonymous clients: users [`NODE_USER`] and
    /// [`FLEET_USER`] from a `mosquitto_passwd` file, topics limited by an
    /// ACL file.
    PasswordAcl,
}

impl Mode {
    fn tls(self) -> bool {
        matches!(self, Mode::Tls | Mode::MutualTls)
    }
}

/// The TLS files a test points a client at; all PEM.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The test CA's certificate (`ca_file`).
    pub ca: PathBuf,
    /// A client certificate signed by the test CA, CN `node-a` (`cert_file`).
    pub client_cert: PathBuf,
    /// Its private key, PKCS#8 (`key_file`).
    pub client_key: PathBuf,
}

/// A user of [`Mode::PasswordAcl`].
#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub password: String,
    /// A file holding only `password` (and a newline), mode 0600: what an
    /// outpost config's `password_file` points at.
    pub password_file: PathBuf,
}

/// What a test client connects with. [`Broker::client`] gives the options
/// that work for the broker's mode; tests change them to try what must fail.
#[derive(Clone, Debug)]
pub struct ClientOpts {
    pub client_id: String,
    /// Connect over TLS. `None` connects plain.
    pub tls: Option<ClientTls>,
    /// Username and password.
    pub credentials: Option<(String, String)>,
    /// `false` asks the broker to keep the session (subscriptions and queued
    /// QoS 1 messages) while the client is away, under `client_id`.
    pub clean_session: bool,
}

/// TLS options of a test client.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// CA certificate to trust; `None` trusts nothing, so the handshake fails.
    pub ca: Option<PathBuf>,
    /// Client certificate and key to present.
    pub cert_key: Option<(PathBuf, PathBuf)>,
}

impl ClientOpts {
    /// The same options under another client id.
    pub fn with_id(mut self, client_id: &str) -> Self {
        self.client_id = client_id.to_string();
        self
    }

    /// The same options with these credentials.
    pub fn with_credentials(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.to_string(), password.to_string()));
        self
    }
}

/// Installs mosquitto, its clients and openssl with apt when any is missing.
/// Done once per process.
pub fn ensure_installed() -> Result<()> {
    static DONE: OnceLock<Mutex<bool>> = OnceLock::new();
    let lock = DONE.get_or_init(|| Mutex::new(false));
    let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return Ok(());
    }
    let missing = || {
        let mut m = Vec::new();
        for path in [MOSQUITTO, MOSQUITTO_PASSWD, MOSQUITTO_SUB] {
            if !Path::new(path).exists() {
                m.push(path);
            }
        }
        if !have("openssl", "version") {
            m.push("openssl");
        }
        m
    };
    if !missing().is_empty() {
        crate::apt::install(PACKAGES).context("installing mosquitto")?;
    }
    let still = missing();
    if !still.is_empty() {
        bail!("{} still missing after apt-get install", still.join(" "));
    }
    *done = true;
    Ok(())
}

/// A mosquitto child process on `127.0.0.1:port`, with its config, TLS
/// material, password file, persistence and log in one temp dir. Killed on
/// drop.
pub struct Broker {
    mode: Mode,
    port: u16,
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    tls: Option<TlsFiles>,
    users: Vec<User>,
    dir: tempfile::TempDir,
}

impl Broker {
    /// Writes the config (and certificates, password and ACL files) for
    /// `mode`, starts mosquitto on a free loopback port and waits until it
    /// accepts connections.
    pub fn start(mode: Mode) -> Result<Broker> {
        ensure_installed()?;
        let dir = tempfile::Builder::new()
            .prefix("outpost-mosquitto-")
            .tempdir()
            .context("tempdir for mosquitto")?;
        let tls = if mode.tls() {
            Some(make_certificates(dir.path()).context("making the test certificates")?)
        } else {
            None
        };
        let users = if mode == Mode::PasswordAcl {
            make_users(dir.path()).context("making the password and ACL files")?
        } else {
            Vec::new()
        };
        std::fs::create_dir_all(dir.path().join("data"))?;
        let mut broker = Broker {
            mode,
            port: 0,
            child: None,
            config: dir.path().join("mosquitto.conf"),
            log: dir.path().join("mosquitto.log"),
            tls,
            users,
            dir,
        };
        // The port is free when chosen, but another test may take it before
        // mosquitto binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            broker.port = free_port()?;
            broker.write_config()?;
            match broker.spawn() {
                Ok(()) => return Ok(broker),
                Err(e) => {
                    let in_use = broker.log_text().contains("Address already in use");
                    last = Some(e);
                    if !in_use {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("mosquitto did not start")))
    }

    /// The broker's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The loopback port it listens on; kept across stop and restart.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`, or `mqtts://…` in the TLS modes.
    pub fn url(&self) -> String {
        let scheme = if self.mode.tls() { "mqtts" } else { "mqtt" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The temp dir holding config, certificates, persistence and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The generated `mosquitto.conf`.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The broker's stderr log (all log types), kept across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far, for failure messages.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The TLS files, in [`Mode::Tls`] and [`Mode::MutualTls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// A user of [`Mode::PasswordAcl`] ([`NODE_USER`] or [`FLEET_USER`]).
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The `[mqtt]` section of an outpost config that connects to this
    /// broker as the node (the client certificate in the TLS modes,
    /// [`NODE_USER`] in [`Mode::PasswordAcl`]).
    pub fn mqtt_toml(&self) -> String {
        let mut s = format!("[mqtt]\nurl = {}\n", toml_str(&self.url()));
        if let Some(tls) = &self.tls {
            s += &format!("ca_file = {}\n", toml_path(&tls.ca));
            if self.mode == Mode::MutualTls {
                s += &format!("cert_file = {}\n", toml_path(&tls.client_cert));
                s += &format!("key_file = {}\n", toml_path(&tls.client_key));
            }
        }
        if let Some(user) = self.user(NODE_USER) {
            s += &format!("username = {}\n", toml_str(&user.name));
            s += &format!("password_file = {}\n", toml_path(&user.password_file));
        }
        s
    }

    /// Client options that connect for the broker's mode: the CA in the TLS
    /// modes, the client certificate in [`Mode::MutualTls`], [`FLEET_USER`]
    /// (reads everything) in [`Mode::PasswordAcl`]. A fresh client id each
    /// call.
    pub fn client(&self) -> ClientOpts {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let tls = self.tls.as_ref().map(|t| ClientTls {
            ca: Some(t.ca.clone()),
            cert_key: (self.mode == Mode::MutualTls)
                .then(|| (t.client_cert.clone(), t.client_key.clone())),
        });
        ClientOpts {
            client_id: format!("outpost-test-{}-{n}", std::process::id()),
            tls,
            credentials: self
                .user(FLEET_USER)
                .map(|u| (u.name.clone(), u.password.clone())),
            clean_session: true,
        }
    }

    /// [`Broker::client`] as another user of [`Mode::PasswordAcl`].
    pub fn client_as(&self, user: &str) -> Result<ClientOpts> {
        let u = self
            .user(user)
            .with_context(|| format!("no user {user} in mode {:?}", self.mode))?;
        Ok(self.client().with_credentials(&u.name, &u.password))
    }

    /// True while the mosquitto process runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops mosquitto with SIGTERM, as its service would be, so it writes
    /// its persistence (retained messages, sessions) first. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_none() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .context("cannot run kill")?;
            if !status.success() {
                bail!("kill -TERM {} failed: {status}", child.id());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "mosquitto did not stop within 10 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        if !self.dir.path().join("data/mosquitto.db").exists() {
            bail!(
                "mosquitto stopped without writing its persistence; log:\n{}",
                self.log_text()
            );
        }
        Ok(())
    }

    /// Kills mosquitto with SIGKILL, as a crash would: what it had not yet
    /// saved (it saves on stop only) is lost. Idempotent.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            child.wait().context("waiting for mosquitto")?;
        }
        Ok(())
    }

    /// Starts mosquitto again (stopping it first if it runs) on the same port
    /// with the same config and persistence; waits until it accepts
    /// connections. The port may be held briefly by a stray connection, so
    /// binding is retried for a few seconds.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(e) => {
                    if !self.log_text().contains("Address already in use") {
                        return Err(e);
                    }
                    thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn write_config(&self) -> Result<()> {
        let d = self.dir.path();
        let mut c = String::new();
        c += "# Written by outpost-tests (tests/src/mosquitto.rs).\n";
        // Started as root, mosquitto would drop to the `mosquitto` user, which
        // cannot read this temp dir; as another user this line is ignored.
        c += "user root\n";
        c += "per_listener_settings false\n";
        c += "log_dest stderr\nlog_type all\nconnection_messages true\n";
        c += "log_timestamp_format %H:%M:%S\n";
        c += "persistence true\n";
        c += &format!("persistence_location {}/\n", d.join("data").display());
        c += "persistence_file mosquitto.db\n";
        c += "set_tcp_nodelay true\n";
        if self.mode == Mode::PasswordAcl {
            c += "allow_anonymous false\n";
            c += &format!("password_file {}\n", d.join("passwd").display());
            c += &format!("acl_file {}\n", d.join("acl").display());
        } else {
            c += "allow_anonymous true\n";
        }
        c += &format!("listener {} 127.0.0.1\n", self.port);
        if self.mode.tls() {
            c += &format!("cafile {}\n", d.join("ca.pem").display());
            c += &format!("certfile {}\n", d.join("server.pem").display());
            c += &format!("keyfile {}\n", d.join("server.key").display());
            let require = self.mode == Mode::MutualTls;
            c += &format!("require_certificate {require}\n");
        }
        std::fs::write(&self.config, c).context("writing mosquitto.conf")
    }

    /// Spawns mosquitto (appending to the log) and waits until it accepts
    /// connections; fails with the log when it exits or does not listen.
    fn spawn(&mut self) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("opening the mosquitto log")?;
        let offset = log.metadata()?.len();
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start mosquitto")?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let Some(child) = self.child.as_mut() else {
                bail!("mosquitto child gone");
            };
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "mosquitto exited at start ({status}); log:\n{}",
                    self.log_text()
                );
            }
            // The "running" line comes after every listener is open, so a
            // connection that succeeds then is to this broker, not to
            // another process that took the port.
            let text = self.log_text();
            let running = text
                .get(offset as usize..)
                .is_some_and(|t| t.contains(" running"));
            if running && TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.kill();
                bail!(
                    "mosquitto did not accept connections on 127.0.0.1:{} within {:?}; log:\n{}",
                    self.port,
                    START_TIMEOUT,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn toml_path(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// Runs a command in `dir`, failing with its stderr.
fn run(dir: &Path, program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = outpost-test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
";

/// Makes `ca.pem`/`ca.key`, `server.pem`/`server.key` (127.0.0.1 and
/// localhost) and `client.pem`/`client.key` (CN node-a) in `dir`, P-256
/// keys, valid for two days.
fn make_certificates(dir: &Path) -> Result<TlsFiles> {
    std::fs::write(dir.join("openssl.cnf"), OPENSSL_CNF)?;
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-config",
        "openssl.cnf",
        "-extensions",
        "ca",
    ];
    ca.extend_from_slice(&key);
    ca.extend_from_slice(&[
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=outpost test CA",
    ]);
    run(dir, "openssl", &ca)?;
    for (name, cn) in [("server", "localhost"), ("client", NODE_USER)] {
        let csr = format!("{name}.csr");
        let keyfile = format!("{name}.key");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={cn}");
        let mut req = vec!["req", "-new", "-config", "openssl.cnf"];
        req.extend_from_slice(&key);
        req.extend_from_slice(&["-keyout", &keyfile, "-out", &csr, "-subj", &subj]);
        run(dir, "openssl", &req)?;
        run(
            dir,
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-CAserial",
                "ca.srl",
                "-days",
                "2",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                name,
                "-out",
                &pem,
            ],
        )?;
    }
    Ok(TlsFiles {
        ca: dir.join("ca.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    })
}

/// The ACL of [`Mode::PasswordAcl`].
fn acl() -> String {
    let p = TOPIC_PREFIX;
    format!(
        "user {NODE_USER}\n\
         topic write {p}/nodes/{NODE_USER}/#\n\
         topic read {p}/nodes/{NODE_USER}/cmd\n\
         topic read {p}/groups/+/cmd\n\
         topic read {p}/fleet/cmd\n\
         \n\
         user {FLEET_USER}\n\
         topic read #\n\
         topic write {p}/nodes/+/cmd\n\
         topic write {p}/groups/+/cmd\n\
         topic write {p}/fleet/cmd\n"
    )
}

/// Writes `passwd` (with `mosquitto_passwd -b`), `acl`, and a plain
/// password file per user.
fn make_users(dir: &Path) -> Result<Vec<User>> {
    use std::os::unix::fs::PermissionsExt;
    let mut users = Vec::new();
    for (i, name) in [NODE_USER, FLEET_USER].into_iter().enumerate() {
        let password = format!("{name}-pw-{}", std::process::id());
        let mut args = vec!["-b"];
        if i == 0 {
            args.push("-c");
        }
        args.extend_from_slice(&["passwd", name, &password]);
        run(dir, MOSQUITTO_PASSWD, &args)?;
        let password_file = dir.join(format!("{name}.password"));
        std::fs::write(&password_file, format!("{password}\n"))?;
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))?;
        users.push(User {
            name: name.to_string(),
            password,
            password_file,
        });
    }
    std::fs::write(dir.join("acl"), acl())?;
    Ok(users)
}

/// One message a [`Subscriber`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    /// The retain flag as delivered: set for a retained message sent on
    /// subscribe, clear for a live one.
    pub retain: bool,
}

impl Msg {
    /// The payload as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.payload)
            .with_context(|| format!("payload on {} is not JSON: {}", self.topic, self.text()))
    }
}

#[derive(Default)]
struct Inbox {
    msgs: Vec<Msg>,
    connacks: u64,
    last_error: Option<String>,
}

type Shared = Arc<(Mutex<Inbox>, Condvar)>;

/// A test client subscribed (QoS 1) to some topic filters, collecting what
/// it receives on a background thread. It reconnects by itself when the
/// broker goes away and comes back, and subscribes again when the broker
/// kept no session. Disconnects on drop.
pub struct Subscriber {
    client: Client,
    shared: Shared,
    stop: Arc<AtomicBool>,
    log: PathBuf,
}

impl Subscriber {
    /// Connects with [`Broker::client`] and subscribes to `topics`.
    pub fn connect(broker: &Broker, topics: &[&str]) -> Result<Subscriber> {
        Subscriber::connect_with(broker, &broker.client(), topics)
    }

    /// Connects with `opts` and subscribes to `topics` (none is fine, to
    /// pick up a kept session); fails when the broker refuses the
    /// connection or a subscription, or does not answer in
    /// [`CLIENT_TIMEOUT`].
    pub fn connect_with(broker: &Broker, opts: &ClientOpts, topics: &[&str]) -> Result<Subscriber> {
        let shared: Shared = Arc::default();
        let (client, mut conn) = Client::new(mqtt_options(broker, opts)?, 64);
        let fail = |what: String| anyhow!("{what}; broker log:\n{}", broker.log_text());
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        loop {
            let event = next(&mut conn, deadline).map_err(fail)?;
            record(&shared, &event);
            if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                break;
            }
        }
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        for topic in &topics {
            client
                .subscribe(topic.as_str(), QoS::AtLeastOnce)
                .with_context(|| format!("subscribe {topic}"))?;
        }
        let mut acked = 0;
        while acked < topics.len() {
            match next(&mut conn, deadline).map_err(fail)? {
                Event::Incoming(Packet::SubAck(ack)) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        return Err(fail(format!(
                            "the broker refused a subscription of {topics:?}"
                        )));
                    }
                    acked += 1;
                }
                event => record(&shared, &event),
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread_shared = shared.clone();
        let thread_stop = stop.clone();
        let resubscriber = client.clone();
        thread::Builder::new()
            .name("mqtt-subscriber".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    match conn.recv() {
                        Err(_) => break, // every client handle is gone
                        Ok(Ok(event)) => {
                            if let Event::Incoming(Packet::ConnAck(ack)) = &event {
                                if !ack.session_present {
                                    for topic in &topics {
                                        let _ = resubscriber
                                            .try_subscribe(topic.as_str(), QoS::AtLeastOnce);
                                    }
                                }
                            }
                            record(&thread_shared, &event);
                        }
                        Ok(Err(e)) => {
                            if thread_stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let (lock, cv) = &*thread_shared;
                            lock.lock().unwrap_or_else(|e| e.into_inner()).last_error =
                                Some(e.to_string());
                            cv.notify_all();
                            // rumqttc reconnects on the next poll.
                            thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })
            .context("spawning the subscriber thread")?;
        Ok(Subscriber {
            client,
            shared,
            stop,
            log: broker.log_path().to_path_buf(),
        })
    }

    /// Every message received so far, in order.
    pub fn messages(&self) -> Vec<Msg> {
        self.shared
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .msgs
            .clone()
    }

    /// How many times the broker accepted this client's connection (1 until
    /// it reconnects).
    pub fn connections(&self) -> u64 {
        self.shared
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connacks
    }

    /// Waits until `pred` holds over the messages received so far, and
    /// returns them; fails after `timeout` with what was received, the
    /// client's last error and the broker's log.
    pub fn wait_for(&self, pred: impl Fn(&[Msg]) -> bool, timeout: Duration) -> Result<Vec<Msg>> {
        self.wait(|inbox| pred(&inbox.msgs), timeout)
    }

    /// Waits until the broker has accepted this client's connection `n`
    /// times (2 after one reconnection).
    pub fn wait_connections(&self, n: u64, timeout: Duration) -> Result<()> {
        self.wait(|inbox| inbox.connacks >= n, timeout)
            .with_context(|| format!("waiting for connection number {n}"))
            .map(|_| ())
    }

    fn wait(&self, pred: impl Fn(&Inbox) -> bool, timeout: Duration) -> Result<Vec<Msg>> {
        let (lock, cv) = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut inbox = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if pred(&inbox) {
                return Ok(inbox.msgs.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                let seen: Vec<String> = inbox
                    .msgs
                    .iter()
                    .map(|m| format!("{} retain={} {}", m.topic, m.retain, m.text()))
                    .collect();
                bail!(
                    "condition not met within {timeout:?}; {} connection(s), {} message(s):\n{}\nlast client error: {:?}\nbroker log:\n{}",
                    inbox.connacks,
                    seen.len(),
                    seen.join("\n"),
                    inbox.last_error,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            inbox = cv
                .wait_timeout(inbox, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the first message on `topic` and returns it.
    pub fn wait_for_topic(&self, topic: &str, timeout: Duration) -> Result<Msg> {
        let msgs = self.wait_for(|m| m.iter().any(|m| m.topic == topic), timeout)?;
        msgs.into_iter()
            .find(|m| m.topic == topic)
            .context("message vanished")
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The thread sees the flag on the next event: the DISCONNECT going
        // out, or an error when the broker is gone.
        let _ = self.client.try_disconnect();
    }
}

fn record(shared: &Shared, event: &Event) {
    let (lock, cv) = &**shared;
    let mut inbox = lock.lock().unwrap_or_else(|e| e.into_inner());
    match event {
        Event::Incoming(Packet::Publish(p)) => inbox.msgs.push(Msg {
            topic: p.topic.clone(),
            payload: p.payload.to_vec(),
            retain: p.retain,
        }),
        Event::Incoming(Packet::ConnAck(_)) => inbox.connacks += 1,
        _ => return,
    }
    cv.notify_all();
}

/// The next event before `deadline`; an error for a connection error or a
/// timeout.
fn next(conn: &mut rumqttc::Connection, deadline: Instant) -> std::result::Result<Event, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    match conn.recv_timeout(left) {
        Ok(Ok(event)) => Ok(event),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(format!(
            "no answer from the broker within {CLIENT_TIMEOUT:?}"
        )),
    }
}

fn describe(e: &ConnectionError) -> String {
    format!("connection failed: {e} ({e:?})")
}

/// Connects with `opts` and waits for CONNACK; `Err` says why the broker or
/// the TLS handshake refused it.
pub fn try_connect(broker: &Broker, opts: &ClientOpts) -> Result<()> {
    let (client, mut conn) = Client::new(mqtt_options(broker, opts)?, 8);
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    loop {
        match next(&mut conn, deadline).map_err(|e| anyhow!(e))? {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    // A mutual-TLS refusal shows as an error before CONNACK; past it the
    // connection is good. Leave cleanly so the broker's log stays readable.
    client.try_disconnect().ok();
    loop {
        match next(&mut conn, deadline) {
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
            Ok(_) => continue,
            Err(e) => bail!(e),
        }
    }
}

/// Publishes one QoS 1 message with [`Broker::client`] and waits for PUBACK.
pub fn publish(broker: &Broker, topic: &str, payload: &[u8], retain: bool) -> Result<()> {
    publish_with(broker, &broker.client(), topic, payload, retain)
}

/// Publishes one QoS 1 message with `opts` and waits for PUBACK. mosquitto
/// acknowledges a publish its ACL drops too, so `Ok` does not mean it was
/// delivered.
pub fn publish_with(
    broker: &Broker,
    opts: &ClientOpts,
    topic: &str,
    payload: &[u8],
    retain: bool,
) -> Result<()> {
    let (client, mut conn) = Client::new(mqtt_options(broker, opts)?, 8);
    client
        .publish(topic, QoS::AtLeastOnce, retain, payload.to_vec())
        .context("queueing the publish")?;
    let fail = |what: String| {
        anyhow!(
            "publish to {topic}: {what}; broker log:\n{}",
            broker.log_text()
        )
    };
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    loop {
        if let Event::Incoming(Packet::PubAck(_)) = next(&mut conn, deadline).map_err(fail)? {
            break;
        }
    }
    client.try_disconnect().ok();
    loop {
        match next(&mut conn, deadline) {
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return Ok(()),
            Ok(_) => continue,
        }
    }
}

/// rumqttc options for `opts` against `broker`: keep-alive 5 s, TLS with
/// rustls on ring when asked.
pub fn mqtt_options(broker: &Broker, opts: &ClientOpts) -> Result<MqttOptions> {
    let mut o = MqttOptions::new(&opts.client_id, "127.0.0.1", broker.port());
    o.set_keep_alive(Duration::from_secs(5));
    o.set_clean_session(opts.clean_session);
    if let Some((user, password)) = &opts.credentials {
        o.set_credentials(user, password);
    }
    if let Some(tls) = &opts.tls {
        let config = rustls_config(tls)?;
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(o)
}

fn rustls_config(tls: &ClientTls) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &tls.ca {
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            roots.add(cert.with_context(|| format!("parsing {}", ca.display()))?)?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match &tls.cert_key {
        Some((cert, key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<std::result::Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("reading {}", key.display()))?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// Checks `value` against the JSON Schema in `schema_path` (a `$ref` to a
/// sibling file resolves); `Err` lists every violation with its instance
/// path, or says why the schema itself could not be read or compiled.
pub fn validate(schema_path: impl AsRef<Path>, value: &serde_json::Value) -> Result<(), String> {
    let path = schema_path.as_ref();
    let abs = std::fs::canonicalize(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = std::fs::read_to_string(&abs).map_err(|e| format!("{}: {e}", abs.display()))?;
    let schema: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", abs.display()))?;
    let validator = jsonschema::options()
        .with_base_uri(format!("file://{}", abs.display()))
        .should_validate_formats(true)
        .build(&schema)
        .map_err(|e| format!("{}: not a valid schema: {e}", abs.display()))?;
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            format!("{at}: {e}")
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} does not match {}:\n{}",
            value,
            abs.display(),
            errors.join("\n")
        ))
    }
}
