//! The demo service (`outpost demo-service --port P`, hidden): a tiny HTTP
//! server on loopback that answers `/healthz` and takes fault injections.
//!
//! - `/healthz`: `200 ok`, or, once hung, no answer at all.
//! - `/fault/hang`: stop answering `/healthz` (a deadlock, as the probe sees it).
//! - `/fault/leak`: grow the resident set by [`LEAK_MIB`] MiB, in steps.
//! - `/fault/spin`: burn one core in a busy loop.
//!
//! It is plain `std` (a thread per connection): it has to keep answering
//! while one of its threads spins, and it is meant to be killed, not to
//! shut down gracefully. `outpost demo-stop --socket S` asks the demo's
//! service manager to stop it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cli::{EXIT_OK, EXIT_RUNTIME};

/// How much `/fault/leak` allocates (and keeps).
pub const LEAK_MIB: usize = 96;
/// The leak grows by this much per step.
const LEAK_STEP_MIB: usize = 8;
const LEAK_STEP_INTERVAL: Duration = Duration::from_millis(40);
/// A hung request is dropped after this long, so a hung service does not
/// collect threads forever.
const HANG_HOLD: Duration = Duration::from_secs(30);
/// How long to retry binding the port (a previous instance may still hold
/// it for a moment while it dies).
const BIND_RETRY: Duration = Duration::from_secs(3);
const READ_TIMEOUT: Duration = Duration::from_secs(2);

static HUNG: AtomicBool = AtomicBool::new(false);
static SPINNING: AtomicBool = AtomicBool::new(false);
static LEAKED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// Runs the service until it is killed.
pub fn serve(port: u16) -> u8 {
    let started = Instant::now();
    let listener = loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => break l,
            Err(e) if started.elapsed() < BIND_RETRY => {
                tracing::debug!(port, error = %e, "demo service: port busy, retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                eprintln!("demo-service: cannot listen on 127.0.0.1:{port}: {e}");
                return EXIT_RUNTIME;
            }
        }
    };
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                let spawned = std::thread::Builder::new()
                    .name("demo-conn".into())
                    .spawn(move || handle(stream));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "demo service: cannot start a connection thread");
                }
            }
            Err(e) => tracing::debug!(error = %e, "demo service: accept failed"),
        }
    }
    EXIT_OK
}

fn handle(stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // Drain the headers; the demo's requests carry no body.
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let (status, body) = match path {
        "/healthz" => {
            if HUNG.load(Ordering::SeqCst) {
                // Hold the connection and say nothing, like a deadlocked
                // handler; the prober's timeout is what notices.
                std::thread::sleep(HANG_HOLD);
                return;
            }
            ("200 OK", "ok\n".to_string())
        }
        "/fault/hang" => {
            HUNG.store(true, Ordering::SeqCst);
            ("200 OK", "hanging: /healthz stops answering\n".to_string())
        }
        "/fault/leak" => {
            std::thread::spawn(leak);
            ("200 OK", format!("leaking {LEAK_MIB} MiB\n"))
        }
        "/fault/spin" => {
            if !SPINNING.swap(true, Ordering::SeqCst) {
                std::thread::spawn(spin);
            }
            ("200 OK", "spinning one core\n".to_string())
        }
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    respond(stream, status, &body);
}

fn respond(mut stream: TcpStream, status: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.flush();
}

/// Allocates and touches memory (touched pages count in RSS; untouched
/// ones would not) and keeps it.
fn leak() {
    for _ in 0..LEAK_MIB / LEAK_STEP_MIB {
        let chunk = vec![0x5au8; LEAK_STEP_MIB * 1024 * 1024];
        LEAKED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(std::hint::black_box(chunk));
        std::thread::sleep(LEAK_STEP_INTERVAL);
    }
}

fn spin() {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

/// `outpost demo-stop --socket S`: asks the demo's service manager to stop
/// the service (it is respawned, like a unit with `Restart=always`). Prints
/// the manager's answer; exit 0 when the service was stopped.
pub fn stop(socket: &Path) -> u8 {
    use std::os::unix::net::UnixStream;
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo-stop: no service manager at {}: {e}", socket.display());
            return EXIT_RUNTIME;
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    if let Err(e) = stream.write_all(b"stop\n") {
        eprintln!("demo-stop: {e}");
        return EXIT_RUNTIME;
    }
    let mut answer = String::new();
    if let Err(e) = stream.read_to_string(&mut answer) {
        eprintln!("demo-stop: no answer: {e}");
        return EXIT_RUNTIME;
    }
    let answer = answer.trim();
    println!("{answer}");
    if answer.starts_with("stopped") {
        EXIT_OK
    } else {
        EXIT_RUNTIME
    }
}
