//! Notifications for recipients who did not get a message live.
//!
//! [`Notifier`] is the seam the FCM and SMTP senders implement; the pool
//! that chooses between them per recipient is its own issue. Until it is
//! configured, [`drain`] consumes the notification queue so it never fills
//! up, acking each job as skipped.

use std::sync::Arc;

use async_trait::async_trait;

use crate::broker::{Broker, Event, NotifyJob, Queue};

/// Something that can reach a user outside a socket.
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Handles one job; `Err` means "retry later".
    async fn notify(&self, job: &NotifyJob) -> Result<(), NotifyError>;
}

/// Notification failures.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("temporary failure: {0}")]
    Temporary(String),
    #[error("permanent failure: {0}")]
    Permanent(String),
}

/// Consumes the notification queue and skips every job (no channel configured).
pub async fn drain(
    broker: Arc<dyn Broker>,
) -> Result<tokio::task::JoinHandle<()>, crate::broker::BrokerError> {
    let mut rx = broker.consume(Queue::Notify).await?;
    Ok(tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            if let Event::Notify(job) = &d.envelope.event {
                metrics::counter!("chatd_notifications_dropped_total", "reason" => "no_channel_configured")
                    .increment(job.recipients.len() as u64);
            }
            d.ack().await;
        }
    }))
}
