//! The in-process broker: this node is the whole cluster. Queues are bounded
//! channels; publishing waits when a queue is full (backpressure, no loss).

use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::*;

const QUEUE_DEPTH: usize = 65_536;

/// Queues of one process.
pub struct InProcess {
    node_id: String,
    node_tx: mpsc::Sender<Delivery>,
    node_rx: Mutex<Option<mpsc::Receiver<Delivery>>>,
    notify_tx: mpsc::Sender<Delivery>,
    notify_rx: Mutex<Option<mpsc::Receiver<Delivery>>>,
}

impl InProcess {
    /// Queues for the node `node_id`.
    pub fn new(node_id: &str) -> Self {
        let (node_tx, node_rx) = mpsc::channel(QUEUE_DEPTH);
        let (notify_tx, notify_rx) = mpsc::channel(QUEUE_DEPTH);
        Self {
            node_id: node_id.to_owned(),
            node_tx,
            node_rx: Mutex::new(Some(node_rx)),
            notify_tx,
            notify_rx: Mutex::new(Some(notify_rx)),
        }
    }
}

#[async_trait]
impl Broker for InProcess {
    async fn publish(&self, route: Route, envelope: Envelope) -> Result<(), BrokerError> {
        let tx = match &route {
            Route::Node(n) if n != &self.node_id => {
                // No other node exists in-process; a message for one has no
                // reader, which is what a vanished node looks like.
                return Ok(());
            }
            Route::Node(_) | Route::AllNodes => &self.node_tx,
            Route::Notify => &self.notify_tx,
        };
        tx.send(Delivery::new(envelope, None))
            .await
            .map_err(|_| BrokerError::Unavailable("in-process queue closed".into()))
    }

    async fn consume(&self, queue: Queue) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        let slot = match &queue {
            Queue::Node(_) => &self.node_rx,
            Queue::Notify => &self.notify_rx,
        };
        slot.lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| BrokerError::Other(format!("{queue:?} is already consumed")))
    }

    fn is_ready(&self) -> bool {
        !self.node_tx.is_closed()
    }

    fn backend(&self) -> BrokerKind {
        BrokerKind::InProcess
    }
}
