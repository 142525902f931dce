//! The embedded MQTT broker: rumqttd, MQTT 3.1.1 on a loopback port, no
//! TLS, in-process on its own threads. It lives until the process exits
//! (rumqttd has no stop), which is when the demo is over.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, ConnectionSettings, RouterConfig, ServerSettings};

use super::DemoError;

/// The largest message the broker takes (state and summaries are a few KiB).
const MAX_PAYLOAD: usize = 256 * 1024;

/// Starts the broker on `127.0.0.1:port` and waits until it accepts
/// connections.
pub fn start(port: u16, within: Duration) -> Result<(), DemoError> {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let server = ServerSettings {
        name: "demo-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..rumqttd::Config::default()
    };
    std::thread::Builder::new()
        .name("demo-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| DemoError::Io {
            what: "start the broker thread".into(),
            source: e,
        })?;
    let deadline = Instant::now() + within;
    loop {
        match TcpStream::connect_timeout(&listen, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(DemoError::Broker(format!(
                    "the embedded broker does not accept connections on {listen}: {e}"
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
