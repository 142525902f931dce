//! The sampler: runs every collector once per sample interval and assembles
//! one [`Sample`].

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::container::ContainerCollector;
use super::host::HostCollector;
use super::probe::Probes;
use super::process::ProcessCollector;
use super::systemd::SystemdCollector;
use super::{Sample, TargetStatus};
use crate::config::{Config, TargetKind};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Every collector the config asks for.
pub struct Sampler {
    host: HostCollector,
    process: ProcessCollector,
    systemd: Option<SystemdCollector>,
    container: Option<ContainerCollector>,
    probes: Probes,
    host_targets: Vec<String>,
}

impl Sampler {
    /// Probe tasks stop when `shutdown` is cancelled.
    pub fn new(cfg: &Config, shutdown: CancellationToken) -> Sampler {
        let has = |f: fn(&TargetKind) -> bool| cfg.targets.iter().any(|t| f(&t.kind));
        Sampler {
            host: HostCollector::new(&cfg.collect.proc_root, &cfg.collect.sys_root),
            process: ProcessCollector::new(&cfg.collect.proc_root, &cfg.targets),
            systemd: has(|k| matches!(k, TargetKind::Systemd { .. }))
                .then(|| SystemdCollector::new(&cfg.targets)),
            container: has(|k| matches!(k, TargetKind::Container { .. })).then(|| {
                ContainerCollector::new(&cfg.targets, cfg.collect.container_socket.as_deref())
            }),
            probes: Probes::spawn(&cfg.targets, shutdown),
            host_targets: cfg
                .targets
                .iter()
                .filter(|t| matches!(t.kind, TargetKind::Host))
                .map(|t| t.name.clone())
                .collect(),
        }
    }

    /// Takes one sample of everything.
    pub async fn sample(&mut self, now: Instant) -> Sample {
        let mut sample = Sample::new(now_ms());
        self.host.collect(now, &mut sample);
        self.process.collect(now, &mut sample);
        if let Some(s) = self.systemd.as_mut() {
            s.collect(now, &mut sample).await;
        }
        if let Some(c) = self.container.as_mut() {
            c.collect(now, &mut sample).await;
        }
        for name in &self.host_targets {
            sample.targets.push(TargetStatus {
                name: name.clone(),
                kind: "host".to_string(),
                state: "up".to_string(),
                up: true,
                probe: None,
                detail: None,
            });
        }
        self.probes.collect(&mut sample);
        sample
    }
}
