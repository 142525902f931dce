//! systemd collector.
