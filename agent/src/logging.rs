//! Logging: to the journal with structured fields under systemd, readable
//! text on a terminal, or JSON lines when asked.

use std::io::IsTerminal;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// The journal when started by systemd (JOURNAL_STREAM is set), else
    /// human-readable text on stderr.
    Auto,
    /// Human-readable text on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
}

/// Installs the global subscriber. `level` is a filter such as `info` or
/// `warn,outpost=debug` (a default level and `target=level` pairs);
/// `RUST_LOG` in the same syntax overrides it. (No span or field filters:
/// those need a regex engine, a quarter of a megabyte of binary.)
pub fn init(format: LogFormat, level: &str) {
    let filter = filter_from(std::env::var("RUST_LOG").ok().as_deref(), level);
    let registry = tracing_subscriber::registry().with(filter);
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    // Colour only for a person at a terminal: log files, pipes and the
    // journal get plain text that grep and log shippers can read.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    match format {
        LogFormat::Json => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .with_ansi(false)
                        .with_writer(std::io::stderr),
                )
                .try_init();
        }
        LogFormat::Auto if under_journal => match tracing_journald::layer() {
            Ok(journal) => {
                let _ = registry
                    .with(journal.with_syslog_identifier("outpost".to_string()))
                    .try_init();
            }
            Err(_) => {
                let _ = registry
                    .with(
                        tracing_subscriber::fmt::layer()
                            .without_time()
                            .with_ansi(false)
                            .with_writer(std::io::stderr),
                    )
                    .try_init();
            }
        },
        LogFormat::Auto | LogFormat::Text => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(colour)
                        .with_writer(std::io::stderr),
                )
                .try_init();
        }
    }
}

/// The filter: `RUST_LOG` when it is set and parses, else the configured
/// level, else `info`.
fn filter_from(env: Option<&str>, level: &str) -> Targets {
    env.and_then(|e| e.parse().ok())
        .or_else(|| level.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn the_environment_overrides_the_configured_level() {
        let f = filter_from(Some("warn,outpost=debug"), "info");
        assert!(f.would_enable("outpost::pipeline", &Level::DEBUG));
        assert!(!f.would_enable("rumqttc", &Level::INFO));
        assert!(f.would_enable("rumqttc", &Level::WARN));
    }

    #[test]
    fn a_bad_filter_falls_back() {
        let f = filter_from(Some("=nonsense=="), "error");
        assert!(f.would_enable("outpost", &Level::ERROR));
        assert!(!f.would_enable("outpost", &Level::WARN));
        let f = filter_from(None, "=nonsense==");
        assert!(f.would_enable("outpost", &Level::INFO));
        assert!(!f.would_enable("outpost", &Level::DEBUG));
    }
}
