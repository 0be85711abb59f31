//! The connection's supervision: connect, declare the topology, start the
//! registered consumers, watch, and on any failure drop everything and
//! reconnect with capped exponential backoff.

use super::consumer::{registration, start_consumer, Running};
use super::*;

/// Declares exchanges, this node's queue with its bindings, and the
/// notification queue. Idempotent.
pub(super) async fn declare(inner: &Inner, ch: &Channel) -> lapin::Result<()> {
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
pub(super) async fn supervise(inner: Arc<Inner>, mut ctl: mpsc::UnboundedReceiver<Ctl>) {
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

pub(super) enum Outcome {
    Stopped,
    Failed(String),
}

/// One connection's life: connect, declare, consume, watch.
pub(super) async fn run_connection(
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

pub(super) fn abort_all(consumers: &mut HashMap<QueueKind, Running>) {
    for (_, r) in consumers.drain() {
        r.task.abort();
    }
}
