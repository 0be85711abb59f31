//! Consumers: one channel per queue with its prefetch window, decoded
//! envelopes forwarded to the registered receiver, manual acks.

use super::*;

/// A running consumer task and the registration it serves.
pub(super) struct Running {
    pub(super) reg: u64,
    pub(super) task: JoinHandle<()>,
}

pub(super) fn registration(inner: &Inner, kind: QueueKind) -> Option<u64> {
    inner
        .consumers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&kind)
        .map(|(reg, _)| *reg)
}

/// Opens a channel with the prefetch window, starts consuming `kind`, and
/// forwards each decoded envelope to the registered receiver.
pub(super) async fn start_consumer(
    inner: &Arc<Inner>,
    conn: &Connection,
    kind: QueueKind,
    epoch: u64,
) -> lapin::Result<Running> {
    let Some((reg, tx)) = inner
        .consumers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&kind)
        .cloned()
    else {
        // Registered consumers are never removed; nothing to start.
        return Ok(Running {
            reg: 0,
            task: tokio::spawn(std::future::pending()),
        });
    };
    let queue = match kind {
        QueueKind::Node => inner.names.node_queue(&inner.node_id),
        QueueKind::Notify => inner.names.notify_queue.clone(),
    };
    let ch = conn.create_channel().await?;
    ch.basic_qos(inner.prefetch_of(kind), BasicQosOptions::default())
        .await?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            format!("{}-{kind:?}-{epoch}", inner.node_id)
                .to_lowercase()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let inner = inner.clone();
    let task = tokio::spawn(async move {
        // The channel lives as long as this task: dropping it closes the
        // channel, and the broker requeues what was not acked.
        let _ch = ch;
        while let Some(next) = consumer.next().await {
            let d = match next {
                Ok(d) => d,
                Err(e) => {
                    let _ = inner
                        .ctl
                        .send(Ctl::Broken(epoch, format!("consumer {kind:?}: {e}")));
                    return;
                }
            };
            let envelope = match decode(&d.data) {
                Ok(env) => env,
                Err(why) => {
                    // Not ours to read (corrupt, or from a newer chatd):
                    // requeueing would loop forever.
                    tracing::warn!(queue = %queue, error = %why, "dropping an envelope this node cannot read");
                    metrics::counter!("chatd_broker_rejected_total").increment(1);
                    let _ = d.acker.reject(BasicRejectOptions { requeue: false }).await;
                    continue;
                }
            };
            let delivery = Delivery::new(envelope, Some(Box::new(RabbitAcker(d.acker))));
            if let Err(e) = tx.send(delivery).await {
                // The reader went away (a restarting bridge): give it back.
                e.0.nack(true).await;
                return;
            }
        }
        let _ = inner.ctl.send(Ctl::Broken(
            epoch,
            format!("consumer of {kind:?} cancelled"),
        ));
    });
    Ok(Running { reg, task })
}

/// Parses a body; refuses envelopes of a newer format version.
pub(super) fn decode(body: &[u8]) -> Result<Envelope, String> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let v: Version = serde_json::from_slice(body).map_err(|e| format!("no version: {e}"))?;
    if v.v > ENVELOPE_VERSION {
        return Err(format!(
            "envelope version {} is newer than {ENVELOPE_VERSION}",
            v.v
        ));
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid envelope: {e}"))
}

pub(super) struct RabbitAcker(lapin::Acker);

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(&self) {
        if let Err(e) = self.0.ack(BasicAckOptions::default()).await {
            // The channel is gone; the broker redelivers the message on the
            // next connection (at least once).
            tracing::debug!(error = %e, "ack failed");
        }
    }

    async fn nack(&self, requeue: bool) {
        if let Err(e) = self
            .0
            .nack(BasicNackOptions {
                multiple: false,
                requeue,
            })
            .await
        {
            tracing::debug!(error = %e, "nack failed");
        }
    }
}
