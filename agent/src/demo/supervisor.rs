//! The demo's service manager: it starts the demo service, starts it again
//! [`RESPAWN_DELAY`] after it exits (like a unit with `Restart=always`), and
//! answers `stop` on a Unix socket (what `outpost demo-stop` sends) by
//! killing the service. Plain threads: it must work whatever the async
//! side is doing.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::DemoError;

/// How long after an exit the service is started again (systemd's
/// `RestartSec` default).
pub const RESPAWN_DELAY: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(20);

/// What the service manager saw, for the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceEvent {
    Started { pid: u32 },
    Exited { pid: u32, how: String },
    StopRequested { pid: Option<u32> },
}

struct Proc {
    child: Option<Child>,
    /// When the service is due to be started (again).
    start_at: Option<Instant>,
}

struct Shared {
    proc: Mutex<Proc>,
    stopping: AtomicBool,
    events: UnboundedSender<ServiceEvent>,
    exe: PathBuf,
    port: u16,
    /// `argv[0]` of the service: what the agent's process target matches.
    name: String,
    log: PathBuf,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Proc> {
        self.proc.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self, p: &mut Proc) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let spawned = Command::new(&self.exe)
            .arg0(&self.name)
            .args(["demo-service", "--port", &self.port.to_string()])
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn();
        match spawned {
            Ok(child) => {
                let pid = child.id();
                tracing::debug!(pid, "demo service started");
                let _ = self.events.send(ServiceEvent::Started { pid });
                p.child = Some(child);
                p.start_at = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, exe = %self.exe.display(), "cannot start the demo service");
                p.start_at = Some(Instant::now() + RESPAWN_DELAY * 5);
            }
        }
    }

    /// Kills and reaps the service; its pid, if it was running.
    fn kill(&self, p: &mut Proc, why: &str) -> Option<u32> {
        let mut child = p.child.take()?;
        let pid = child.id();
        let _ = child.kill();
        let how = match child.wait() {
            Ok(st) => format!("{why} ({st})"),
            Err(e) => format!("{why} (cannot reap it: {e})"),
        };
        let _ = self.events.send(ServiceEvent::Exited { pid, how });
        Some(pid)
    }
}

/// The running service manager; [`Supervisor::shutdown`] (or drop) kills
/// the service and stops the threads.
pub struct Supervisor {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    socket: PathBuf,
}

impl Supervisor {
    /// Starts the service now and the manager's two threads.
    pub fn start(
        exe: &Path,
        port: u16,
        name: &str,
        dir: &Path,
        events: UnboundedSender<ServiceEvent>,
    ) -> Result<Supervisor, DemoError> {
        let socket = dir.join("service-manager.sock");
        let listener = UnixListener::bind(&socket).map_err(|e| DemoError::Io {
            what: format!("listen on {}", socket.display()),
            source: e,
        })?;
        listener.set_nonblocking(true).map_err(|e| DemoError::Io {
            what: "make the service manager's socket non-blocking".into(),
            source: e,
        })?;
        let shared = Arc::new(Shared {
            proc: Mutex::new(Proc {
                child: None,
                start_at: Some(Instant::now()),
            }),
            stopping: AtomicBool::new(false),
            events,
            exe: exe.to_path_buf(),
            port,
            name: name.to_string(),
            log: dir.join("service.log"),
        });
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("demo-svc-monitor".into())
                .spawn(move || monitor(&s))
                .map_err(|e| DemoError::Io {
                    what: "start the service monitor thread".into(),
                    source: e,
                })?,
        );
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("demo-svc-control".into())
            .spawn(move || control(&s, &listener));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                let mut sup = Supervisor {
                    shared,
                    threads,
                    socket,
                };
                sup.shutdown();
                return Err(DemoError::Io {
                    what: "start the service manager's socket thread".into(),
                    source: e,
                });
            }
        }
        Ok(Supervisor {
            shared,
            threads,
            socket,
        })
    }

    /// A handle that kills the service and stops respawning it, for the
    /// demo's last-resort watchdog (it does not join the threads).
    pub fn kill_handle(&self) -> impl Fn() + Send + 'static {
        let shared = self.shared.clone();
        move || {
            shared.stopping.store(true, Ordering::SeqCst);
            let mut p = shared.lock();
            shared.kill(&mut p, "killed by the demo's watchdog");
        }
    }

    /// Where `outpost demo-stop --socket` connects.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Kills the service, stops respawning and joins the threads.
    pub fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut p = self.shared.lock();
        self.shared.kill(&mut p, "stopped at the end of the demo");
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Reaps the service when it exits and starts it again.
fn monitor(s: &Shared) {
    while !s.stopping.load(Ordering::SeqCst) {
        {
            let mut p = s.lock();
            if let Some(child) = p.child.as_mut() {
                let pid = child.id();
                match child.try_wait() {
                    Ok(Some(st)) => {
                        p.child = None;
                        p.start_at = Some(Instant::now() + RESPAWN_DELAY);
                        let _ = s.events.send(ServiceEvent::Exited {
                            pid,
                            how: format!("exited by itself ({st})"),
                        });
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(pid, error = %e, "cannot wait for the demo service"),
                }
            } else if p.start_at.is_some_and(|at| Instant::now() >= at) {
                s.spawn(&mut p);
            }
        }
        std::thread::sleep(POLL);
    }
}

/// Answers `stop` requests: kill the service (the monitor starts it again).
fn control(s: &Shared, listener: &UnixListener) {
    while !s.stopping.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => answer(s, stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                tracing::warn!(error = %e, "service manager: accept failed");
                std::thread::sleep(POLL);
            }
        }
    }
}

fn answer(s: &Shared, stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let Ok(read) = stream.try_clone() else {
        return;
    };
    if BufReader::new(read).read_line(&mut line).is_err() {
        return;
    }
    let reply = match line.trim() {
        "stop" => {
            let mut p = s.lock();
            let _ = s.events.send(ServiceEvent::StopRequested {
                pid: p.child.as_ref().map(Child::id),
            });
            let pid = s.kill(&mut p, "killed (SIGKILL) on request");
            p.start_at = Some(Instant::now() + RESPAWN_DELAY);
            match pid {
                Some(pid) => {
                    format!("stopped pid {pid} (SIGKILL); the service manager restarts it")
                }
                None => "stopped: it was not running; the service manager restarts it".to_string(),
            }
        }
        other => format!("error: unknown request {other:?}; expected stop"),
    };
    let mut stream = stream;
    let _ = writeln!(stream, "{reply}");
}
