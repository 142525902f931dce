//! Logging: to the journal with structured fields under systemd, readable
//! text on a terminal, or JSON lines when asked.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

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

/// Installs the global subscriber. `level` is a tracing filter such as
/// `info` or `outpost=debug`; `RUST_LOG` overrides it.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    match format {
        LogFormat::Json => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
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
                            .with_writer(std::io::stderr),
                    )
                    .try_init();
            }
        },
        LogFormat::Auto | LogFormat::Text => {
            let _ = registry
                .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
                .try_init();
        }
    }
}
