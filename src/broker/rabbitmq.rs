//! The RabbitMQ backend (lapin 4): what crosses nodes in a cluster.
//!
//! Topology (docs/cluster.md has the whole picture), names under the
//! configured `prefix` (default `chatd`):
//!
//! - exchange `{prefix}.cluster` (direct, durable): every node's queue is
//!   bound to it twice, with `node.{node_id}` ([`Route::Node`]) and `all`
//!   ([`Route::AllNodes`]);
//! - queue `{prefix}.node.{node_id}` (durable, `x-expires` and
//!   `x-message-ttl` = `queue_expires_secs`): the node's own queue. It
//!   survives a connection drop or a broker restart; RabbitMQ removes it
//!   when no consumer has used it for `queue_expires_secs` (the node is gone
//!   for good), and a node that shuts down cleanly deletes it itself;
//! - exchange `{prefix}.notify` (direct, durable) with routing key `notify`
//!   to the durable queue `{prefix}.notify`, shared by the notification
//!   pool; its messages are persistent.
//!
//! Bodies are the JSON [`Envelope`] (with its version `v`). Every publish is
//! `mandatory` and waits for its publisher confirm; a confirm that carries a
//! returned message means "not routed" ([`BrokerError::Unroutable`]).
//! Consumers use manual acks and a bounded prefetch (`prefetch` for the
//! node queue, `notify_prefetch` for the notification queue, whose jobs stay
//! unacked while an e-mail window is open); a delivery is acked by its
//! [`Delivery`] once the caller handled it.
//!
//! One supervision task owns the connection: it connects, declares the
//! topology, starts the registered consumers, watches for errors, and on any
//! failure drops everything and reconnects with capped exponential backoff
//! (lapin's own auto-recovery is not used). While it is down, [`is_ready`]
//! is false and publishing fails at once with [`BrokerError::Unavailable`].
//!
//! [`is_ready`]: Broker::is_ready

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::RabbitConfig;

/// Longest wait for a TCP + AMQP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// AMQP heartbeat asked for when the URI names none: a silent peer is
/// noticed within two of these.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Backoff between reconnection attempts.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the supervisor looks at the connection status.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// Exchange, queue and routing-key names of one cluster.
#[derive(Debug, Clone)]
pub struct Names {
    /// Direct exchange for node queues.
    pub cluster_exchange: String,
    /// Direct exchange for the notification queue.
    pub notify_exchange: String,
    /// The notification pool's durable queue.
    pub notify_queue: String,
    /// Routing key of the notification queue.
    pub notify_key: String,
    /// Routing key every node queue is bound with.
    pub all_key: String,
    prefix: String,
}

impl Names {
    /// Names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            cluster_exchange: format!("{prefix}.cluster"),
            notify_exchange: format!("{prefix}.notify"),
            notify_queue: format!("{prefix}.notify"),
            notify_key: "notify".into(),
            all_key: "all".into(),
            prefix: prefix.to_owned(),
        }
    }

    /// The queue of node `node`.
    pub fn node_queue(&self, node: &str) -> String {
        format!("{}.node.{node}", self.prefix)
    }

    /// The routing key of node `node` on the cluster exchange.
    pub fn node_key(&self, node: &str) -> String {
        format!("node.{node}")
    }
}

/// The RabbitMQ broker of one node.
pub struct RabbitMq {
    inner: Arc<Inner>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    node_id: String,
    names: Names,
    uri: AMQPUri,
    prefetch: u16,
    notify_prefetch: u16,
    queue_expires_ms: u32,
    confirm_timeout: Duration,
    /// The publishing channel of the current connection.
    live: RwLock<Option<Live>>,
    ready: AtomicBool,
    /// Bumped on every successful (re)connection.
    epoch: AtomicU64,
    /// Registered consumers (with a registration number), started on
    /// every connection.
    consumers: Mutex<HashMap<QueueKind, (u64, mpsc::Sender<Delivery>)>>,
    registrations: AtomicU64,
    ctl: mpsc::UnboundedSender<Ctl>,
    stop: CancellationToken,
}

impl Inner {
    fn prefetch_of(&self, kind: QueueKind) -> u16 {
        match kind {
            QueueKind::Node => self.prefetch,
            QueueKind::Notify => self.notify_prefetch,
        }
    }
}

#[derive(Clone)]
struct Live {
    channel: Channel,
    epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum QueueKind {
    Node,
    Notify,
}

enum Ctl {
    /// Something failed on the connection of this epoch: rebuild it.
    Broken(u64, String),
    /// A consumer was registered (or replaced).
    Consume(QueueKind),
    /// Leave for good: delete this node's queue, close, answer.
    Close(oneshot::Sender<()>),
}

impl RabbitMq {
    /// Starts the supervision loop for node `node_id` and waits (at most
    /// [`CONNECT_TIMEOUT`]) for the first connection. A broker that is not
    /// reachable yet is not an error: the node starts unready and keeps
    /// trying. A URI that does not parse is.
    pub async fn open(cfg: &RabbitConfig, node_id: &str) -> Result<Self, BrokerError> {
        let mut uri: AMQPUri = cfg
            .uri
            .parse()
            .map_err(|e| BrokerError::Other(format!("invalid RabbitMQ URI: {e}")))?;
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
        if cfg.prefix.is_empty() || node_id.is_empty() {
            return Err(BrokerError::Other(
                "broker prefix and node id must not be empty".into(),
            ));
        }
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            node_id: node_id.to_owned(),
            names: Names::new(&cfg.prefix),
            uri,
            prefetch: cfg.prefetch.max(1),
            notify_prefetch: cfg.notify_prefetch.max(1),
            queue_expires_ms: u32::try_from(cfg.queue_expires_secs.max(1).saturating_mul(1000))
                .unwrap_or(u32::MAX),
            confirm_timeout: Duration::from_millis(cfg.confirm_timeout_ms.max(100)),
            live: RwLock::new(None),
            ready: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            consumers: Mutex::new(HashMap::new()),
            registrations: AtomicU64::new(0),
            ctl,
            stop: CancellationToken::new(),
        });
        let supervisor = tokio::spawn(supervise(inner.clone(), ctl_rx));
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        while !inner.ready.load(Ordering::Acquire) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !inner.ready.load(Ordering::Acquire) {
            tracing::warn!("RabbitMQ not reachable yet; starting unready and retrying");
        }
        Ok(Self {
            inner,
            supervisor: Mutex::new(Some(supervisor)),
        })
    }

    /// The names this broker uses.
    pub fn names(&self) -> &Names {
        &self.inner.names
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

#[async_trait]
impl Broker for RabbitMq {
    async fn publish(&self, route: Route, envelope: Envelope) -> Result<(), BrokerError> {
        let inner = &self.inner;
        if !inner.ready.load(Ordering::Acquire) {
            return Err(BrokerError::Unavailable("not connected to RabbitMQ".into()));
        }
        let live = inner
            .live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| BrokerError::Unavailable("not connected to RabbitMQ".into()))?;
        let body = serde_json::to_vec(&envelope)
            .map_err(|e| BrokerError::Other(format!("cannot encode envelope: {e}")))?;
        let kind = event_kind(&envelope.event);
        let (exchange, key, persistent) = match &route {
            Route::Node(n) => (
                inner.names.cluster_exchange.as_str(),
                inner.names.node_key(n),
                false,
            ),
            Route::AllNodes => (
                inner.names.cluster_exchange.as_str(),
                inner.names.all_key.clone(),
                false,
            ),
            Route::Notify => (
                inner.names.notify_exchange.as_str(),
                inner.names.notify_key.clone(),
                true,
            ),
        };
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type(kind.into())
            .with_app_id("chatd".into())
            .with_delivery_mode(if persistent { 2 } else { 1 });
        let mut outcome = publish_once(inner, &live, exchange, &key, &body, &props).await;
        if matches!(outcome, Err(BrokerError::Unroutable(_))) && !matches!(route, Route::Node(_)) {
            // Our own queue and the notification queue are declared on every
            // connection; if one was deleted behind our back, declare again
            // and retry once.
            tracing::warn!(
                ?route,
                "broker returned a message to a queue we declare; redeclaring"
            );
            if let Err(e) = declare(inner, &live.channel).await {
                return Err(fail(inner, live.epoch, format!("redeclare: {e}")));
            }
            outcome = publish_once(inner, &live, exchange, &key, &body, &props).await;
        }
        count(&route, &outcome);
        outcome
    }

    async fn publish_start(
        &self,
        route: Route,
        envelope: Envelope,
    ) -> Result<Confirm, BrokerError> {
        if !matches!(route, Route::Node(_)) {
            // Other routes may need a redeclare and a retry: confirm first.
            let r = self.publish(route, envelope).await;
            return Ok(Box::pin(std::future::ready(r)));
        }
        let inner = self.inner.clone();
        if !inner.ready.load(Ordering::Acquire) {
            return Err(BrokerError::Unavailable("not connected to RabbitMQ".into()));
        }
        let live = inner
            .live
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| BrokerError::Unavailable("not connected to RabbitMQ".into()))?;
        let body = serde_json::to_vec(&envelope)
            .map_err(|e| BrokerError::Other(format!("cannot encode envelope: {e}")))?;
        let Route::Node(n) = &route else {
            unreachable!("checked above")
        };
        let key = inner.names.node_key(n);
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type(event_kind(&envelope.event).into())
            .with_app_id("chatd".into())
            .with_delivery_mode(1);
        let sent = tokio::time::timeout(
            inner.confirm_timeout,
            live.channel.basic_publish(
                inner.names.cluster_exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                props,
            ),
        )
        .await;
        let pending = match sent {
            Err(_) => {
                return Err(fail(
                    &inner,
                    live.epoch,
                    format!("publish not taken within {:?}", inner.confirm_timeout),
                ))
            }
            Ok(Err(e)) => return Err(fail(&inner, live.epoch, format!("publish: {e}"))),
            Ok(Ok(p)) => p,
        };
        Ok(Box::pin(async move {
            let outcome = match tokio::time::timeout(inner.confirm_timeout, pending).await {
                Err(_) => Err(fail(
                    &inner,
                    live.epoch,
                    format!("no publisher confirm within {:?}", inner.confirm_timeout),
                )),
                Ok(Err(e)) => Err(fail(&inner, live.epoch, format!("publish: {e}"))),
                Ok(Ok(c)) => confirmation(c, &inner.names.cluster_exchange, &key),
            };
            count(&route, &outcome);
            outcome
        }))
    }

    async fn consume(&self, queue: Queue) -> Result<mpsc::Receiver<Delivery>, BrokerError> {
        let kind = match &queue {
            Queue::Node(n) if n == &self.inner.node_id => QueueKind::Node,
            Queue::Node(n) => {
                return Err(BrokerError::Other(format!(
                    "this broker serves node {}, not {n}",
                    self.inner.node_id
                )))
            }
            Queue::Notify => QueueKind::Notify,
        };
        // The channel holds at most one prefetch window: the broker does not
        // send more until some are acked, so this never blocks for long.
        let (tx, rx) = mpsc::channel(usize::from(self.inner.prefetch_of(kind)));
        // A second call replaces the first consumer (a restarted bridge).
        let reg = self.inner.registrations.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner
            .consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind, (reg, tx));
        let _ = self.inner.ctl.send(Ctl::Consume(kind));
        Ok(rx)
    }

    fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    fn backend(&self) -> BrokerKind {
        BrokerKind::RabbitMq
    }

    fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.ctl.send(Ctl::Close(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
        self.inner.stop.cancel();
        let handle = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
        }
    }
}

/// Counts a publish's outcome by route.
fn count(route: &Route, outcome: &Result<(), BrokerError>) {
    match outcome {
        Ok(()) => metrics::counter!("chatd_broker_published_total", "route" => route_label(route))
            .increment(1),
        Err(BrokerError::Unroutable(_)) => {
            metrics::counter!("chatd_broker_returned_total", "route" => route_label(route))
                .increment(1)
        }
        Err(_) => {}
    }
}

/// What a publisher confirm means: taken, refused, or returned (unroutable).
fn confirmation(c: lapin::Confirmation, exchange: &str, key: &str) -> Result<(), BrokerError> {
    if c.is_nack() {
        // The broker refused responsibility (e.g. an internal error):
        // nothing was taken, the caller treats it like an outage.
        return Err(BrokerError::Unavailable(
            "publish nacked by RabbitMQ".into(),
        ));
    }
    match c.take_message() {
        None => Ok(()),
        Some(returned) => Err(BrokerError::Unroutable(format!(
            "{exchange}/{key}: {}",
            returned.reply_text
        ))),
    }
}

fn route_label(route: &Route) -> &'static str {
    match route {
        Route::Node(_) => "node",
        Route::AllNodes => "all",
        Route::Notify => "notify",
    }
}

fn event_kind(e: &Event) -> &'static str {
    match e {
        Event::Deliver { .. } => "deliver",
        Event::DeliverBatch { .. } => "deliver_batch",
        Event::Presence { .. } => "presence",
        Event::RoomChanged { .. } => "room_changed",
        Event::BlocksChanged { .. } => "blocks_changed",
        Event::Heartbeat { .. } => "heartbeat",
        Event::NodeLeft { .. } => "node_left",
        Event::Resync { .. } => "resync",
        Event::Disconnect { .. } => "disconnect",
        Event::SessionQuery { .. } => "session_query",
        Event::SessionReport { .. } => "session_report",
        Event::Notify(_) => "notify",
    }
}

/// Marks the connection of `epoch` as broken (the supervisor rebuilds it)
/// and returns the error for the caller.
fn fail(inner: &Inner, epoch: u64, why: String) -> BrokerError {
    if inner.epoch.load(Ordering::Acquire) == epoch {
        inner.ready.store(false, Ordering::Release);
    }
    let _ = inner.ctl.send(Ctl::Broken(epoch, why.clone()));
    BrokerError::Unavailable(why)
}

async fn publish_once(
    inner: &Inner,
    live: &Live,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: &BasicProperties,
) -> Result<(), BrokerError> {
    let confirm = async {
        live.channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                props.clone(),
            )
            .await?
            .await
    };
    match tokio::time::timeout(inner.confirm_timeout, confirm).await {
        Err(_) => Err(fail(
            inner,
            live.epoch,
            format!("no publisher confirm within {:?}", inner.confirm_timeout),
        )),
        Ok(Err(e)) => Err(fail(inner, live.epoch, format!("publish: {e}"))),
        Ok(Ok(c)) => confirmation(c, exchange, key),
    }
}

/// Declares exchanges, this node's queue with its bindings, and the
/// notification queue. Idempotent.
async fn declare(inner: &Inner, ch: &Channel) -> lapin::Result<()> {
    let n = &inner.names;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        n.cluster_exchange.as_str().into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        n.notify_exchange.as_str().into(),
        ExchangeKind::Direct,
        durable,
        FieldTable::default(),
    )
    .await?;
    let queue = n.node_queue(&inner.node_id);
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongUInt(inner.queue_expires_ms),
    );
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongUInt(inner.queue_expires_ms),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    for key in [n.node_key(&inner.node_id), n.all_key.clone()] {
        ch.queue_bind(
            queue.as_str().into(),
            n.cluster_exchange.as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.queue_declare(
        n.notify_queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        n.notify_queue.as_str().into(),
        n.notify_exchange.as_str().into(),
        n.notify_key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Reconnects forever (until stopped) with capped exponential backoff.
async fn supervise(inner: Arc<Inner>, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
    let mut delay = BACKOFF_MIN;
    loop {
        let outcome = run_connection(&inner, &mut ctl, &mut delay).await;
        inner.ready.store(false, Ordering::Release);
        *inner.live.write().unwrap_or_else(|e| e.into_inner()) = None;
        metrics::gauge!("chatd_broker_connected").set(0.0);
        match outcome {
            Outcome::Stopped => return,
            Outcome::Failed(why) => {
                tracing::warn!(error = %why, retry_in = ?delay, "RabbitMQ connection lost or refused");
            }
        }
        // Jitter spreads the reconnections of a whole cluster.
        let jitter = delay.mul_f64(rand::random::<f64>() * 0.5);
        let wake = tokio::time::sleep(delay + jitter);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = inner.stop.cancelled() => return,
                _ = &mut wake => break,
                c = ctl.recv() => match c {
                    // A close request while down: nothing to clean up on the broker.
                    Some(Ctl::Close(done)) => {
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                    // Consumers start on the next connection; stale breaks are moot.
                    Some(_) => {}
                },
            }
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

enum Outcome {
    Stopped,
    Failed(String),
}

/// One connection's life: connect, declare, consume, watch.
async fn run_connection(
    inner: &Arc<Inner>,
    ctl: &mut mpsc::UnboundedReceiver<Ctl>,
    delay: &mut Duration,
) -> Outcome {
    let props = ConnectionProperties::default()
        .with_connection_name(format!("chatd node {}", inner.node_id).into());
    let conn = tokio::select! {
        _ = inner.stop.cancelled() => return Outcome::Stopped,
        r = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(inner.uri.clone(), props)) => match r {
            Err(_) => return Outcome::Failed("connect timed out".into()),
            Ok(Err(e)) => return Outcome::Failed(format!("connect: {e}")),
            Ok(Ok(c)) => c,
        },
    };
    let mut events = conn.events_listener();
    let setup = async {
        let ch = conn.create_channel().await?;
        declare(inner, &ch).await?;
        if inner.epoch.load(Ordering::Acquire) == 0 {
            // A new process: what waits in a queue of the same node id was
            // meant for a previous incarnation (its sessions are gone; the
            // store has the messages), and stale presence would mislead.
            ch.queue_purge(
                inner.names.node_queue(&inner.node_id).as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await?;
        }
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok::<_, lapin::Error>(ch)
    };
    let channel = match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
        Err(_) => return Outcome::Failed("topology setup timed out".into()),
        Ok(Err(e)) => return Outcome::Failed(format!("topology setup: {e}")),
        Ok(Ok(ch)) => ch,
    };
    let epoch = inner.epoch.fetch_add(1, Ordering::AcqRel) + 1;
    let mut consumers: HashMap<QueueKind, Running> = HashMap::new();
    let kinds: Vec<QueueKind> = inner
        .consumers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .copied()
        .collect();
    for kind in kinds {
        match start_consumer(inner, &conn, kind, epoch).await {
            Ok(r) => {
                consumers.insert(kind, r);
            }
            Err(e) => {
                abort_all(&mut consumers);
                return Outcome::Failed(format!("consume {kind:?}: {e}"));
            }
        }
    }
    *inner.live.write().unwrap_or_else(|e| e.into_inner()) = Some(Live {
        channel: channel.clone(),
        epoch,
    });
    inner.ready.store(true, Ordering::Release);
    metrics::gauge!("chatd_broker_connected").set(1.0);
    if epoch > 1 {
        metrics::counter!("chatd_broker_reconnects_total").increment(1);
    }
    tracing::info!(epoch, node = %inner.node_id, "connected to RabbitMQ");
    *delay = BACKOFF_MIN;

    let mut watch = tokio::time::interval(WATCH_EVERY);
    let outcome = loop {
        tokio::select! {
            _ = inner.stop.cancelled() => break Outcome::Stopped,
            ev = events.next() => match ev {
                Some(lapin::Event::Error(e)) => break Outcome::Failed(format!("connection error: {e}")),
                None => break Outcome::Failed("connection event stream ended".into()),
                Some(_) => {}
            },
            c = ctl.recv() => match c {
                None => break Outcome::Stopped,
                Some(Ctl::Broken(e, why)) if e == epoch => break Outcome::Failed(why),
                Some(Ctl::Broken(..)) => {}
                Some(Ctl::Consume(kind)) => {
                    let current = registration(inner, kind);
                    if consumers.get(&kind).is_some_and(|r| Some(r.reg) == current) {
                        continue;
                    }
                    if let Some(old) = consumers.remove(&kind) {
                        old.task.abort();
                    }
                    match start_consumer(inner, &conn, kind, epoch).await {
                        Ok(r) => { consumers.insert(kind, r); }
                        Err(e) => break Outcome::Failed(format!("consume {kind:?}: {e}")),
                    }
                }
                Some(Ctl::Close(done)) => {
                    inner.ready.store(false, Ordering::Release);
                    *inner.live.write().unwrap_or_else(|e| e.into_inner()) = None;
                    abort_all(&mut consumers);
                    let queue = inner.names.node_queue(&inner.node_id);
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
                    )
                    .await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(2),
                        conn.close(200, "node leaving".into()),
                    )
                    .await;
                    let _ = done.send(());
                    return Outcome::Stopped;
                }
            },
            _ = watch.tick() => {
                if !conn.status().connected() {
                    break Outcome::Failed("connection no longer connected".into());
                }
                if let Some(kind) = consumers.iter().find(|(_, r)| r.task.is_finished()).map(|(k, _)| *k) {
                    break Outcome::Failed(format!("consumer of {kind:?} ended"));
                }
            }
        }
    };
    inner.ready.store(false, Ordering::Release);
    *inner.live.write().unwrap_or_else(|e| e.into_inner()) = None;
    abort_all(&mut consumers);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        conn.close(200, "reconnecting".into()),
    )
    .await;
    outcome
}

fn abort_all(consumers: &mut HashMap<QueueKind, Running>) {
    for (_, r) in consumers.drain() {
        r.task.abort();
    }
}

/// A running consumer task and the registration it serves.
struct Running {
    reg: u64,
    task: JoinHandle<()>,
}

fn registration(inner: &Inner, kind: QueueKind) -> Option<u64> {
    inner
        .consumers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&kind)
        .map(|(reg, _)| *reg)
}

/// Opens a channel with the prefetch window, starts consuming `kind`, and
/// forwards each decoded envelope to the registered receiver.
async fn start_consumer(
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
fn decode(body: &[u8]) -> Result<Envelope, String> {
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

struct RabbitAcker(lapin::Acker);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("chatd");
        assert_eq!(n.cluster_exchange, "chatd.cluster");
        assert_eq!(n.node_queue("a1"), "chatd.node.a1");
        assert_eq!(n.node_key("a1"), "node.a1");
        assert_eq!(n.notify_queue, "chatd.notify");
    }

    #[test]
    fn decode_checks_the_version() {
        let env = Envelope::new("n1", Event::NodeLeft { node: "n1".into() });
        let body = serde_json::to_vec(&env).unwrap();
        assert!(decode(&body).is_ok());
        let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["v"] = serde_json::json!(ENVELOPE_VERSION + 1);
        let err = decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(err.contains("newer"), "{err}");
        assert!(decode(b"not json").is_err());
        assert!(decode(br#"{"v":1,"from":"x","event":{"kind":"nope"}}"#).is_err());
    }
}
