//! systemd integration: READY=1 once collecting, STATUS= lines, and
//! WATCHDOG=1 pings sent only while the pipeline makes progress.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Counts completed sampling rounds; the watchdog task pings systemd only
/// when this has moved since its last ping, so a hung pipeline gets the
/// agent killed and restarted instead of kept alive by a blind timer.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    pub fn tick(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Talks to systemd when NOTIFY_SOCKET is set; does nothing otherwise.
#[derive(Debug, Clone)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    fn send(&self, state: &[NotifyState]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(state) {
                tracing::debug!(error = %e, "sd_notify failed");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        // systemd wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload).
        match sd_notify::NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    /// Spawns the watchdog task when systemd asked for one (WatchdogSec).
    /// `sample_interval` is how often progress is expected.
    pub fn spawn_watchdog(
        &self,
        progress: Progress,
        sample_interval: Duration,
        shutdown: CancellationToken,
    ) {
        if !self.enabled {
            return;
        }
        let Some(timeout) = sd_notify::watchdog_enabled() else {
            return;
        };
        let period = timeout / 2;
        if sample_interval >= period {
            tracing::warn!(
                watchdog_ms = timeout.as_millis() as u64,
                sample_interval_ms = sample_interval.as_millis() as u64,
                "sample interval is longer than half the watchdog timeout; systemd may restart the agent"
            );
        }
        let me = self.clone();
        tokio::spawn(async move {
            // The first sample comes within one sample interval of start:
            // judge progress only from the first full period on.
            let mut last = 0;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        let now = progress.get();
                        if now != last {
                            me.send(&[NotifyState::Watchdog]);
                            last = now;
                        } else {
                            tracing::warn!("no sampling progress since the last watchdog ping; not pinging");
                        }
                    }
                }
            }
        });
    }
}
