//! HTTP and TCP health probes.
//!
//! Every target with a probe gets its own tokio task that probes on the
//! target's interval and publishes the latest result through a `watch`
//! channel, so a slow or hanging probe never delays the sampler: `collect`
//! only reads the latest result.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{target_signal, ProbeStatus, Sample, SignalName, TargetStatus};
use crate::config::{ProbeCheck, Target, TargetKind};

/// At most this much of a response body is read; the rest is ignored.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why one probe failed. Its text is what operators see in `detail`.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
}

/// The running probe tasks and their latest results.
#[derive(Debug)]
pub struct Probes {
    entries: Vec<Entry>,
    /// A child of the shutdown token: cancelled on shutdown or when these
    /// probes are dropped (a config reload replaces them).
    stop: CancellationToken,
}

#[derive(Debug)]
struct Entry {
    name: String,
    kind: &'static str,
    sig_ok: SignalName,
    sig_latency: SignalName,
    latest: watch::Receiver<Option<ProbeStatus>>,
}

impl Probes {
    /// Spawns one task per target that has a probe; tasks stop when
    /// `shutdown` is cancelled (or these probes are dropped). Must be called
    /// from within a tokio runtime.
    pub fn spawn(targets: &[Target], shutdown: CancellationToken) -> Probes {
        let stop = shutdown.child_token();
        let mut entries = Vec::new();
        for target in targets {
            let Some(probe) = &target.probe else {
                continue;
            };
            let (tx, rx) = watch::channel(None);
            let check = probe.check.clone();
            let interval = probe.interval.max(Duration::from_millis(1));
            let timeout = probe.timeout;
            let token = stop.clone();
            let name = target.name.clone();
            tokio::spawn(async move {
                run_probe(name, check, interval, timeout, tx, token).await;
            });
            entries.push(Entry {
                name: target.name.clone(),
                kind: target.kind.as_str(),
                sig_ok: target_signal(&target.name, "probe.ok"),
                sig_latency: target_signal(&target.name, "probe.latency_ms"),
                latest: rx,
            });
        }
        Probes { entries, stop }
    }

    /// Adds `target.{name}.probe.ok` and `target.{name}.probe.latency_ms` for
    /// every probe that has a result, and records the result on the target's
    /// status (adding one when no collector reported the target).
    pub fn collect(&self, sample: &mut Sample) {
        for entry in &self.entries {
            let Some(status) = entry.latest.borrow().clone() else {
                continue;
            };
            sample.push(&entry.sig_ok, if status.ok { 1.0 } else { 0.0 });
            sample.push(&entry.sig_latency, status.latency_ms);
            let existing = sample.targets.iter_mut().find(|t| t.name == entry.name);
            match existing {
                Some(target) => {
                    target.up &= status.ok;
                    if let Some(error) = &status.error {
                        target.detail = Some(error.clone());
                    }
                    target.probe = Some(status);
                }
                None => {
                    let is_host = entry.kind == TargetKind::Host.as_str();
                    sample.targets.push(TargetStatus {
                        name: entry.name.clone(),
                        kind: entry.kind.to_string(),
                        state: if is_host { "up" } else { "unknown" }.to_string(),
                        up: status.ok,
                        detail: status.error.clone(),
                        probe: Some(status),
                    });
                }
            }
        }
    }

    /// The latest result per target name (targets whose probe has not
    /// finished once yet are left out).
    pub fn latest(&self) -> Vec<(String, ProbeStatus)> {
        self.entries
            .iter()
            .filter_map(|e| {
                let status = e.latest.borrow().clone()?;
                Some((e.name.clone(), status))
            })
            .collect()
    }

    /// How many probe tasks were started.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run_probe(
    name: String,
    check: ProbeCheck,
    interval: Duration,
    timeout: Duration,
    tx: watch::Sender<Option<ProbeStatus>>,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_ok = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = stop.cancelled() => break,
            r = probe_once(&check, timeout) => r,
        };
        let status = match result {
            Ok(latency) => {
                if !was_ok {
                    tracing::info!(target_name = %name, "probe ok again");
                }
                was_ok = true;
                ProbeStatus {
                    ok: true,
                    latency_ms: millis(latency),
                    ts_ms: unix_ms(),
                    error: None,
                }
            }
            Err(error) => {
                if was_ok {
                    tracing::warn!(target_name = %name, error = %error, "probe failed");
                }
                was_ok = false;
                ProbeStatus {
                    ok: false,
                    latency_ms: millis(started.elapsed()),
                    ts_ms: unix_ms(),
                    error: Some(error),
                }
            }
        };
        // Only fails when `Probes` is gone, and then `stop` is cancelled too.
        if tx.send(Some(status)).is_err() {
            break;
        }
    }
    tracing::debug!(target_name = %name, "probe stopped");
}

/// Runs one probe: the latency on success, the error text otherwise.
pub async fn probe_once(check: &ProbeCheck, timeout: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, async {
        match check {
            ProbeCheck::Http {
                host, port, path, ..
            } => http_get(host, *port, path).await,
            ProbeCheck::Tcp { addr } => tcp_connect(addr).await,
        }
    })
    .await;
    match outcome {
        Ok(Ok(())) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(ProbeError::Timeout(timeout).to_string()),
    }
}

async fn tcp_connect(addr: &str) -> Result<(), ProbeError> {
    TcpStream::connect(addr)
        .await
        .map(drop)
        .map_err(|source| ProbeError::Connect {
            addr: addr.to_string(),
            source,
        })
}

/// A GET over a fresh connection; 2xx and 3xx pass. The body is read (up to
/// [`MAX_BODY_BYTES`]) so a server that hangs mid-body fails the probe.
async fn http_get(host: &str, port: u16, path: &str) -> Result<(), ProbeError> {
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|source| ProbeError::Connect {
            addr: format!("{}:{port}", bracket(host)),
            source,
        })?;
    // Best effort: a probe is a handful of small writes.
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let host_header = if port == 80 {
        bracket(host)
    } else {
        format!("{}:{port}", bracket(host))
    };
    let request = Request::get(path)
        .header(HOST, host_header)
        .header(CONNECTION, "close")
        .header(
            USER_AGENT,
            concat!("outpost-probe/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())?;

    let exchange = async move {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let mut body = response.into_body();
        let mut read = 0usize;
        while read < MAX_BODY_BYTES {
            match body.frame().await {
                None => break,
                Some(frame) => {
                    if let Some(data) = frame?.data_ref() {
                        read += data.len();
                    }
                }
            }
        }
        if status.is_success() || status.is_redirection() {
            Ok(())
        } else {
            Err(ProbeError::Status(status.as_u16()))
        }
    };
    let mut exchange = std::pin::pin!(exchange);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = &mut exchange => r,
        c = &mut conn => {
            // The connection ended first: everything it read is buffered
            // for the exchange, which finishes (or fails) on its own.
            c?;
            exchange.await
        }
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Probe;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A tiny HTTP server: answers every connection with `status` (or never
    /// answers when `status` is `None`). Returns its port.
    async fn server(status: Option<u16>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let Some(status) = status else {
                    held.push(sock);
                    continue;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = sock.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                    }
                    let request = String::from_utf8_lossy(&got).to_string();
                    assert!(
                        request.starts_with("GET /healthz HTTP/1.1\r\n"),
                        "{request}"
                    );
                    assert!(request.to_ascii_lowercase().contains("connection: close"));
                    assert!(request.to_ascii_lowercase().contains("host: 127.0.0.1:"));
                    let body = "x".repeat(100_000);
                    let reply = format!(
                        "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(reply.as_bytes()).await;
                });
            }
        });
        port
    }

    fn http(port: u16) -> ProbeCheck {
        ProbeCheck::Http {
            url: format!("http://127.0.0.1:{port}/healthz"),
            host: "127.0.0.1".into(),
            port,
            path: "/healthz".into(),
        }
    }

    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    const T: Duration = Duration::from_millis(500);

    #[tokio::test]
    async fn http_200_is_ok() {
        let port = server(Some(200)).await;
        let latency = probe_once(&http(port), T).await.unwrap();
        assert!(latency < T);
    }

    #[tokio::test]
    async fn http_302_is_ok() {
        let port = server(Some(302)).await;
        probe_once(&http(port), T).await.unwrap();
    }

    #[tokio::test]
    async fn http_500_is_an_error() {
        let port = server(Some(500)).await;
        let err = probe_once(&http(port), T).await.unwrap_err();
        assert!(err.contains("500"), "{err}");
    }

    #[tokio::test]
    async fn http_silent_server_times_out() {
        let port = server(None).await;
        let started = Instant::now();
        let err = probe_once(&http(port), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn http_closed_port_is_an_error() {
        let port = closed_port().await;
        let err = probe_once(&http(port), T).await.unwrap_err();
        assert!(err.contains("connect"), "{err}");
    }

    #[tokio::test]
    async fn tcp_ok_and_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        probe_once(&ProbeCheck::Tcp { addr }, T).await.unwrap();

        let port = closed_port().await;
        let err = probe_once(
            &ProbeCheck::Tcp {
                addr: format!("127.0.0.1:{port}"),
            },
            T,
        )
        .await
        .unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }

    fn target(name: &str, kind: TargetKind, check: ProbeCheck) -> Target {
        Target {
            name: name.into(),
            kind,
            probe: Some(Probe {
                check,
                interval: Duration::from_millis(50),
                timeout: Duration::from_millis(300),
            }),
        }
    }

    #[tokio::test]
    async fn spawned_probes_fill_the_sample() {
        let ok_port = server(Some(200)).await;
        let bad_port = closed_port().await;
        let targets = vec![
            target("web", TargetKind::Host, http(ok_port)),
            target(
                "db",
                TargetKind::Systemd {
                    unit: "db.service".into(),
                },
                ProbeCheck::Tcp {
                    addr: format!("127.0.0.1:{bad_port}"),
                },
            ),
            Target {
                name: "plain".into(),
                kind: TargetKind::Host,
                probe: None,
            },
        ];
        let shutdown = CancellationToken::new();
        let probes = Probes::spawn(&targets, shutdown.clone());
        assert_eq!(probes.len(), 2);

        let deadline = Instant::now() + Duration::from_secs(5);
        while probes.latest().len() < 2 {
            assert!(Instant::now() < deadline, "probes produced no results");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut sample = Sample::new(0);
        // A collector already reported "db".
        sample.targets.push(TargetStatus {
            name: "db".into(),
            kind: "systemd".into(),
            state: "active/running".into(),
            up: true,
            probe: None,
            detail: Some("main pid 42".into()),
        });
        probes.collect(&mut sample);

        assert_eq!(sample.get("target.web.probe.ok"), Some(1.0));
        assert!(sample.get("target.web.probe.latency_ms").unwrap() >= 0.0);
        assert_eq!(sample.get("target.db.probe.ok"), Some(0.0));
        assert!(sample.get("target.db.probe.latency_ms").is_some());
        assert!(sample.get("target.plain.probe.ok").is_none());

        let web = sample.targets.iter().find(|t| t.name == "web").unwrap();
        assert_eq!(web.kind, "host");
        assert_eq!(web.state, "up");
        assert!(web.up);
        assert!(web.probe.as_ref().unwrap().ok);

        let db = sample.targets.iter().find(|t| t.name == "db").unwrap();
        assert_eq!(db.state, "active/running");
        assert!(!db.up);
        let probe = db.probe.as_ref().unwrap();
        assert!(!probe.ok);
        assert!(probe.ts_ms > 0);
        assert!(db.detail.as_deref().unwrap().contains("refused"));
        assert_eq!(sample.targets.len(), 2);

        shutdown.cancel();
        // After shutdown the results stop changing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = probes.latest();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(before, probes.latest());
    }
}
