//! Operator-defined commands (`[[command]]`): argv without a shell.
//!
//! The command runs with an empty environment except
//! `PATH=/usr/sbin:/usr/bin:/sbin:/bin`, stdin from `/dev/null`, in `/`.
//! Its stdout and stderr are read as they come, interleaved into one buffer
//! that keeps the first [`OUTPUT_CAP`] bytes (the rest is read and
//! dropped, so a chatty command never blocks on a full pipe). When the
//! timeout passes, the command is killed (SIGKILL) and reaped; it is also
//! killed if the future is dropped. Once the command has exited, output
//! still held open by a process it left behind is waited for at most
//! [`DRAIN_GRACE`].
//!
//! Only the command itself is killed: processes it started in the
//! background and detached from it survive.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{elapsed_ms, ActionOutcome, ActionRequest, Actuator, OUTPUT_CAP};
use crate::decide::types::{ActionKind, CommandSpec};

/// The only environment variable a command gets.
pub const EXEC_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";
/// How long to keep reading output after the command exited.
pub const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Runs operator-defined commands.
#[derive(Debug, Default)]
pub struct ExecActuator;

impl ExecActuator {
    pub fn new() -> Self {
        ExecActuator
    }

    /// Runs `spec`. `ok` when it exits with code 0 within its timeout.
    pub async fn run(&self, spec: &CommandSpec) -> ActionOutcome {
        let started = Instant::now();
        let what = format!("exec:{}", spec.name);
        let Some((program, args)) = spec.argv.split_first() else {
            return ActionOutcome::failed(format!("{what}: empty argv"), None, started);
        };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", EXEC_PATH)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return ActionOutcome::failed(
                    format!("{what}: cannot run {program}: {e}"),
                    None,
                    started,
                )
            }
        };
        let deadline = tokio::time::Instant::from_std(started) + spec.timeout;
        let mut capture = Capture::default();
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let mut status: Option<std::io::Result<ExitStatus>> = None;
        // Until the command exits: its timeout; after: a short grace for
        // output still in flight.
        let mut read_until = deadline;
        let mut buf_out = [0u8; 4096];
        let mut buf_err = [0u8; 4096];
        loop {
            if status.is_some() && stdout.is_none() && stderr.is_none() {
                break;
            }
            tokio::select! {
                r = read_some(&mut stdout, &mut buf_out), if stdout.is_some() => {
                    match r {
                        Ok(n) if n > 0 => capture.push(&buf_out[..n]),
                        _ => stdout = None,
                    }
                }
                r = read_some(&mut stderr, &mut buf_err), if stderr.is_some() => {
                    match r {
                        Ok(n) if n > 0 => capture.push(&buf_err[..n]),
                        _ => stderr = None,
                    }
                }
                s = child.wait(), if status.is_none() => {
                    status = Some(s);
                    read_until = deadline.min(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                () = tokio::time::sleep_until(read_until) => break,
            }
        }
        let left_open = stdout.is_some() || stderr.is_some();
        drop((stdout, stderr));

        let (ok, mut summary) = match status {
            None => {
                // Timed out: SIGKILL, and reap it.
                let killed = match child.kill().await {
                    Ok(()) => "killed".to_string(),
                    Err(e) => format!("cannot kill it: {e}"),
                };
                (
                    false,
                    format!(
                        "{what}: timed out after {} ms; {killed}",
                        spec.timeout.as_millis()
                    ),
                )
            }
            Some(Err(e)) => (false, format!("{what}: cannot wait for it: {e}")),
            Some(Ok(st)) => match (st.code(), st.signal()) {
                (Some(0), _) => (true, format!("{what}: exited with code 0")),
                (Some(code), _) => (false, format!("{what}: exited with code {code}")),
                (None, Some(sig)) => (false, format!("{what}: killed by signal {sig}")),
                (None, None) => (false, format!("{what}: ended with {st}")),
            },
        };
        if capture.dropped > 0 {
            summary.push_str(&format!(
                "; output cut to {} KiB ({} bytes dropped)",
                OUTPUT_CAP / 1024,
                capture.dropped
            ));
        }
        if left_open && ok {
            summary.push_str("; output left open by a background process");
        }
        ActionOutcome {
            ok,
            summary,
            before: None,
            after: None,
            output: Some(capture.into_string()),
            duration_ms: elapsed_ms(started),
        }
    }
}

impl Actuator for ExecActuator {
    async fn execute(&self, req: &ActionRequest) -> ActionOutcome {
        let started = Instant::now();
        let ActionKind::Exec(name) = &req.action else {
            return ActionOutcome::failed(
                format!("{}: not an exec action", req.action.label()),
                None,
                started,
            );
        };
        match &req.command {
            Some(spec) if &spec.name == name => self.run(spec).await,
            Some(spec) => ActionOutcome::failed(
                format!("exec:{name}: the request carries command {:?}", spec.name),
                None,
                started,
            ),
            None => ActionOutcome::failed(
                format!("exec:{name}: no such command defined"),
                None,
                started,
            ),
        }
    }
}

/// Reads what is there; `Ok(0)` at the end (or when already closed).
async fn read_some<R: AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => Ok(0),
    }
}

/// The first [`OUTPUT_CAP`] bytes of output, and how many were dropped.
#[derive(Default)]
struct Capture {
    bytes: Vec<u8>,
    dropped: u64,
}

impl Capture {
    fn push(&mut self, chunk: &[u8]) {
        let room = OUTPUT_CAP.saturating_sub(self.bytes.len());
        let keep = room.min(chunk.len());
        self.bytes.extend_from_slice(&chunk[..keep]);
        self.dropped += (chunk.len() - keep) as u64;
    }

    /// Lossy UTF-8, never longer than [`OUTPUT_CAP`] bytes (a character cut
    /// at the cap is left out rather than replaced).
    fn into_string(self) -> String {
        let mut s = String::from_utf8_lossy(&self.bytes).into_owned();
        if s.len() > OUTPUT_CAP {
            let mut end = OUTPUT_CAP;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(argv: &[&str], timeout: Duration) -> CommandSpec {
        CommandSpec {
            name: "t".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout,
        }
    }

    async fn run(argv: &[&str]) -> ActionOutcome {
        ExecActuator::new()
            .run(&spec(argv, Duration::from_secs(10)))
            .await
    }

    #[tokio::test]
    async fn captures_stdout_and_stderr() {
        let out = run(&["/bin/sh", "-c", "echo out; echo err >&2"]).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(out.summary, "exec:t: exited with code 0");
        let output = out.output.unwrap();
        assert!(output.contains("out\n"), "{output:?}");
        assert!(output.contains("err\n"), "{output:?}");
        assert_eq!(output.len(), "out\nerr\n".len());
    }

    #[tokio::test]
    async fn nonzero_exit_is_not_ok() {
        let out = run(&["/bin/sh", "-c", "echo failing; exit 3"]).await;
        assert!(!out.ok);
        assert_eq!(out.summary, "exec:t: exited with code 3");
        assert_eq!(out.output.as_deref(), Some("failing\n"));
    }

    #[tokio::test]
    async fn a_signal_is_reported() {
        let out = run(&["/bin/sh", "-c", "kill -TERM $$"]).await;
        assert!(!out.ok);
        assert_eq!(out.summary, "exec:t: killed by signal 15");
    }

    #[tokio::test]
    async fn timeout_kills() {
        let started = Instant::now();
        let out = ExecActuator::new()
            .run(&spec(&["/bin/sleep", "5"], Duration::from_millis(200)))
            .await;
        let took = started.elapsed();
        assert!(!out.ok);
        assert_eq!(out.summary, "exec:t: timed out after 200 ms; killed");
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert!(took >= Duration::from_millis(200), "took {took:?}");
    }

    #[tokio::test]
    async fn timeout_keeps_what_was_said_before() {
        let out = ExecActuator::new()
            .run(&spec(
                &["/bin/sh", "-c", "echo started; exec /bin/sleep 5"],
                Duration::from_millis(300),
            ))
            .await;
        assert!(!out.ok);
        assert!(out.summary.contains("timed out"), "{}", out.summary);
        assert_eq!(out.output.as_deref(), Some("started\n"));
    }

    #[tokio::test]
    async fn missing_program_is_not_ok() {
        let out = run(&["/nonexistent/outpost-no-such-binary", "x"]).await;
        assert!(!out.ok);
        assert!(
            out.summary
                .starts_with("exec:t: cannot run /nonexistent/outpost-no-such-binary:"),
            "{}",
            out.summary
        );
        assert_eq!(out.output, None);
        // Looked up in the fixed PATH too.
        let out = run(&["outpost-no-such-binary"]).await;
        assert!(!out.ok);
        assert!(out.summary.contains("cannot run"), "{}", out.summary);
    }

    #[tokio::test]
    async fn empty_argv_is_not_ok() {
        let out = run(&[]).await;
        assert!(!out.ok);
        assert_eq!(out.summary, "exec:t: empty argv");
    }

    #[tokio::test]
    async fn environment_is_only_path_and_stdin_is_null() {
        // The test process has HOME, CARGO_* and more; none may pass.
        let out = run(&["env"]).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(
            out.output.as_deref(),
            Some(format!("PATH={EXEC_PATH}\n").as_str())
        );
        // stdin is /dev/null: cat ends at once.
        let out = run(&["cat"]).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(out.output.as_deref(), Some(""));
        let out = run(&["pwd"]).await;
        assert_eq!(out.output.as_deref(), Some("/\n"));
    }

    #[tokio::test]
    async fn output_is_capped() {
        // 20000 bytes on stdout, then a line on stderr: the command still
        // finishes (the pipe is drained), the output is cut at the cap.
        let out = run(&[
            "/bin/sh",
            "-c",
            "head -c 20000 /dev/zero | tr '\\0' x; echo done >&2",
        ])
        .await;
        assert!(out.ok, "{out:?}");
        let output = out.output.unwrap();
        assert_eq!(output.len(), OUTPUT_CAP);
        // The two pipes are read as data comes: the stderr line may land
        // before the last of stdout was read.
        let xs = output.bytes().filter(|b| *b == b'x').count();
        assert!(
            xs == OUTPUT_CAP || (xs == OUTPUT_CAP - 5 && output.contains("done\n")),
            "{xs} x in {} bytes",
            output.len()
        );
        assert!(
            out.summary
                .contains("output cut to 8 KiB (11813 bytes dropped)"),
            "{}",
            out.summary
        );
    }

    #[tokio::test]
    async fn background_process_holding_output_does_not_hang() {
        let started = Instant::now();
        let out = ExecActuator::new()
            .run(&spec(
                &["/bin/sh", "-c", "/bin/sleep 5 & echo spawned"],
                Duration::from_secs(4),
            ))
            .await;
        assert!(out.ok, "{out:?}");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(out.output.as_deref(), Some("spawned\n"));
        assert!(out.summary.contains("left open"), "{}", out.summary);
    }

    #[tokio::test]
    async fn request_must_carry_the_named_command() {
        let a = ExecActuator::new();
        let mut req = ActionRequest {
            id: 7,
            target_name: "host".into(),
            target: crate::decide::types::ActionTarget::Host,
            action: ActionKind::Exec("flush".into()),
            command: None,
        };
        let out = a.execute(&req).await;
        assert!(!out.ok);
        assert_eq!(out.summary, "exec:flush: no such command defined");
        req.command = Some(CommandSpec {
            name: "flush".into(),
            argv: vec!["true".into()],
            timeout: Duration::from_secs(5),
        });
        let out = a.execute(&req).await;
        assert!(out.ok, "{out:?}");
        assert_eq!(out.summary, "exec:flush: exited with code 0");
    }
}
