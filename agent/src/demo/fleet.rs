//! The fleet's side of the demo: an MQTT client on the embedded broker,
//! subscribed to every node's state, summaries and events, that hands what
//! it receives to the timeline.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::DemoError;

/// The protocol's default topic prefix (schemas/PROTOCOL.md).
pub const TOPIC_PREFIX: &str = "outpost/v1";

/// One message the fleet received.
#[derive(Debug, Clone)]
pub struct FleetMessage {
    /// Unix ms when it arrived.
    pub received_ms: i64,
    pub topic: String,
    /// The payload as JSON (`Null` if it was not JSON).
    pub body: serde_json::Value,
}

/// Connects, subscribes, and forwards every message until `stop`. Returns
/// once the broker acknowledged the subscriptions.
pub async fn subscribe(
    port: u16,
    out: UnboundedSender<FleetMessage>,
    stop: CancellationToken,
    within: Duration,
) -> Result<(), DemoError> {
    let mut opts = MqttOptions::new("outpost-demo-fleet", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let filters = ["events", "state", "summary"];
    for f in filters {
        client
            .subscribe(format!("{TOPIC_PREFIX}/nodes/+/{f}"), QoS::AtLeastOnce)
            .await
            .map_err(|e| DemoError::Broker(format!("fleet subscriber: {e}")))?;
    }
    // Drive the connection until every subscription is acknowledged.
    let mut acked = 0;
    let ready = async {
        while acked < filters.len() {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => acked += 1,
                Ok(Event::Incoming(Packet::Publish(p))) => forward(&out, &p.topic, &p.payload),
                Ok(_) => {}
                Err(e) => return Err(DemoError::Broker(format!("fleet subscriber: {e}"))),
            }
        }
        Ok(())
    };
    tokio::time::timeout(within, ready)
        .await
        .map_err(|_| DemoError::Broker("fleet subscriber: no SUBACK from the broker".into()))??;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => forward(&out, &p.topic, &p.payload),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "fleet subscriber: connection error; reconnecting");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
        let _ = client.try_disconnect();
    });
    Ok(())
}

fn forward(out: &UnboundedSender<FleetMessage>, topic: &str, payload: &[u8]) {
    let body = serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null);
    let _ = out.send(FleetMessage {
        received_ms: crate::collect::sampler::now_ms(),
        topic: topic.to_string(),
        body,
    });
}
