//! The notification pool: a feeder task that consumes the broker's notify
//! queue, and a ractor factory of workers routed by recipient
//! ([`KeyPersistentRouting`](ractor::factory::routing::KeyPersistentRouting)
//! on the user id), so one user's notifications are decided and sent in
//! order by one worker, which also holds that user's e-mail digest.
//!
//! Settling: the feeder splits a job into one work item per recipient, each
//! with a oneshot the worker answers once the notification was sent or
//! given up on ([`Outcome::Settled`]), or failed for now ([`Outcome::Retry`]).
//! The delivery is acked when every recipient settled. Recipients to retry
//! go back on the queue as a new job after `notify.requeue_delay_secs` (and
//! only then is the original acked; if that publish fails it is nacked for
//! the broker to redeliver). A worker that crashes drops its oneshots: the
//! feeder sees that and retries those recipients the same way, at most
//! [`MAX_CRASHES`] times per message and recipient. An e-mail digest keeps
//! its jobs unacked until the mail went out, so a node that dies inside the
//! window loses nothing on a broker that redelivers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::factory::{
    queues, routing, worker_builder, Factory, FactoryArguments, FactoryMessage, Job, Worker,
    WorkerId,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::fcm::Fcm;
use super::policy::{self, Decision, DigestPlan, Pending};
use super::smtp::Smtp;
use super::{
    count_dropped, count_failed, count_sent, Channel, Context, MailSender, NotifyError, PushSender,
    RetryPolicy, Services, StartError,
};
use crate::broker::{Delivery, Envelope, Event, NotifyJob, Queue, Route};
use crate::domain::{MessageId, UserId};
use crate::store::{Device, StoreError};

/// Times one recipient of one message may take a worker down with it
/// before it is given up (reason `worker_crash`).
pub const MAX_CRASHES: u32 = 3;

/// How a worker settled one recipient of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent, or given up with a reason: ack.
    Settled,
    /// Failed for now: publish again later.
    Retry,
}

/// A worker's job message (the job key is the recipient).
pub enum Work {
    /// Notify the recipient of `job`; answer on `done`.
    Notify {
        job: Arc<NotifyJob>,
        done: oneshot::Sender<Outcome>,
    },
    /// The recipient's e-mail window that opened as `generation` ends.
    Flush { generation: u64 },
}

type NotifyFactory = Factory<
    UserId,
    Work,
    Arc<Context>,
    NotifyWorker,
    routing::KeyPersistentRouting<UserId, Work>,
    queues::DefaultQueue<UserId, Work>,
>;

/// Starts the pool with the FCM and SMTP senders `[notify]` configures.
pub async fn start(node: impl Into<Services>) -> Result<JoinHandle<()>, StartError> {
    let node: Services = node.into();
    // reqwest and lettre use rustls; chatd's main installs this too.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cfg = &node.settings.notify;
    let retry = RetryPolicy::from_config(cfg);
    let push = Fcm::from_config(&cfg.fcm, retry.clone())
        .map_err(StartError::Config)?
        .map(|f| Arc::new(f) as Arc<dyn PushSender>);
    let mail = Smtp::from_config(&cfg.smtp, retry, cfg.email_rate_per_sec)
        .map_err(StartError::Config)?
        .map(|s| Arc::new(s) as Arc<dyn MailSender>);
    if push.is_none() && mail.is_none() {
        tracing::info!("neither FCM nor SMTP configured: notifications are dropped (no_channel)");
    }
    start_with(node, push, mail).await
}

/// Starts the pool with the given senders: spawns the factory, then
/// consumes the notify queue. The task ends when the node shuts down.
pub async fn start_with(
    node: impl Into<Services>,
    push: Option<Arc<dyn PushSender>>,
    mail: Option<Arc<dyn MailSender>>,
) -> Result<JoinHandle<()>, StartError> {
    let node: Services = node.into();
    let ctx = Arc::new(Context {
        cfg: node.settings.notify.clone(),
        node,
        push,
        mail,
    });
    let pool = Pool::spawn(ctx.clone()).await?;
    let rx = match ctx.node.broker.consume(Queue::Notify).await {
        Ok(rx) => rx,
        Err(e) => {
            pool.factory.stop(None);
            return Err(e.into());
        }
    };
    tracing::info!(
        workers = ctx.cfg.workers.max(1),
        push = ctx.push.is_some(),
        email = ctx.mail.is_some(),
        "notification pool started"
    );
    Ok(tokio::spawn(feed(ctx, pool, rx)))
}

/// The factory and its join handle; replaced if the factory itself dies
/// (its workers are restarted by the factory).
struct Pool {
    ctx: Arc<Context>,
    factory: ActorRef<FactoryMessage<UserId, Work>>,
    handle: JoinHandle<()>,
}

impl Pool {
    async fn spawn(ctx: Arc<Context>) -> Result<Self, StartError> {
        let for_workers = ctx.clone();
        let args = FactoryArguments::builder()
            .worker_builder(Box::new(worker_builder(move |_wid| {
                (NotifyWorker, for_workers.clone())
            })))
            .queue(Default::default())
            .router(Default::default())
            .num_initial_workers(ctx.cfg.workers.max(1))
            .build();
        // Under the node's root supervisor (visible in the admin tree); the
        // root does not restart it: `dispatch` starts a new one if it died.
        let name = Some(format!("notifier@{}", ctx.node.node_id));
        let spawned = match &ctx.node.supervisor {
            Some(sup) => {
                Actor::spawn_linked(name, NotifyFactory::default(), args, sup.clone()).await
            }
            None => Actor::spawn(name, NotifyFactory::default(), args).await,
        };
        let (factory, handle) = spawned.map_err(|e| StartError::Actor(e.to_string()))?;
        Ok(Self {
            ctx,
            factory,
            handle,
        })
    }

    /// Hands `work` to the recipient's worker. If that is impossible the
    /// work (and its oneshot) is dropped, which the feeder treats like a
    /// crash: the recipient is retried.
    async fn dispatch(&mut self, user: UserId, work: Work) {
        if self.handle.is_finished() {
            tracing::error!("notification factory stopped; starting a new one");
            match Pool::spawn(self.ctx.clone()).await {
                Ok(p) => *self = p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot restart the notification factory");
                    return;
                }
            }
        }
        if self.factory.dispatch(user, work).is_err() {
            tracing::warn!("notification factory refused a job; it will be retried");
        }
    }
}

type Crashes = Arc<Mutex<HashMap<(MessageId, UserId), u32>>>;

async fn feed(ctx: Arc<Context>, mut pool: Pool, mut rx: mpsc::Receiver<Delivery>) {
    let permits = Arc::new(Semaphore::new(ctx.cfg.max_in_flight.max(1)));
    let crashes: Crashes = Arc::default();
    let shutdown = ctx.node.shutdown.clone();
    loop {
        let d = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            d = rx.recv() => match d {
                Some(d) => d,
                None => break,
            },
        };
        let job = match &d.envelope.event {
            Event::Notify(job) => Arc::new(job.clone()),
            other => {
                tracing::warn!(event = ?other, "not a notification on the notify queue; dropped");
                d.ack().await;
                continue;
            }
        };
        if expired(&job.created_at, ctx.cfg.give_up_after_secs) {
            count_dropped("expired", job.recipients.len() as u64);
            d.ack().await;
            continue;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => {
                d.nack(true).await;
                break;
            }
        };
        let mut seen = HashSet::new();
        let mut waits = Vec::new();
        for user in job.recipients.iter().filter(|u| seen.insert(*u)) {
            let (done, answer) = oneshot::channel();
            pool.dispatch(
                user.clone(),
                Work::Notify {
                    job: job.clone(),
                    done,
                },
            )
            .await;
            waits.push((user.clone(), answer));
        }
        tokio::spawn(settle(ctx.clone(), d, job, waits, permit, crashes.clone()));
    }
    pool.factory.stop(Some("shutdown".into()));
}

fn expired(created_at: &str, max_age_secs: u64) -> bool {
    chrono::DateTime::parse_from_rfc3339(created_at)
        .map(|t| {
            (chrono::Utc::now() - t.with_timezone(&chrono::Utc))
                .to_std()
                .is_ok_and(|age| age > Duration::from_secs(max_age_secs))
        })
        .unwrap_or(false)
}

/// Waits for every recipient of one delivery, then acks it or publishes
/// the recipients to retry as a new job.
async fn settle(
    ctx: Arc<Context>,
    d: Delivery,
    job: Arc<NotifyJob>,
    waits: Vec<(UserId, oneshot::Receiver<Outcome>)>,
    _permit: OwnedSemaphorePermit,
    crashes: Crashes,
) {
    let mut again = Vec::new();
    for (user, answer) in waits {
        let key = (job.message_id.clone(), user.clone());
        match answer.await {
            Ok(Outcome::Settled) => {
                crashes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key);
            }
            Ok(Outcome::Retry) => again.push(user),
            Err(_) if ctx.node.shutdown.is_cancelled() => again.push(user),
            Err(_) => {
                let mut c = crashes.lock().unwrap_or_else(|e| e.into_inner());
                let n = c.entry(key.clone()).or_insert(0);
                *n += 1;
                if *n >= MAX_CRASHES {
                    c.remove(&key);
                    drop(c);
                    tracing::error!(message = %job.message_id, user = %user, "notification keeps crashing its worker; given up");
                    count_dropped("worker_crash", 1);
                } else {
                    drop(c);
                    tracing::warn!(message = %job.message_id, user = %user, "notification worker stopped with the job; retrying");
                    again.push(user);
                }
            }
        }
    }
    if again.is_empty() {
        d.ack().await;
        return;
    }
    let delay = Duration::from_secs(ctx.cfg.requeue_delay_secs);
    tokio::select! {
        _ = tokio::time::sleep(delay), if !ctx.node.shutdown.is_cancelled() => {}
        _ = ctx.node.shutdown.cancelled() => {
            // A broker that keeps unacked messages hands it to another node.
            d.nack(true).await;
            return;
        }
    }
    metrics::counter!("chatd_notifications_requeued_total").increment(again.len() as u64);
    let retry = NotifyJob {
        recipients: again,
        ..(*job).clone()
    };
    let env = Envelope::new(&ctx.node.node_id, Event::Notify(retry));
    match ctx.node.broker.publish(Route::Notify, env).await {
        Ok(()) => d.ack().await,
        Err(e) => {
            tracing::warn!(error = %e, "cannot requeue a notification; leaving it to the broker");
            d.nack(true).await;
        }
    }
}

/// One worker of the pool.
pub struct NotifyWorker;

/// A worker's state: the open e-mail digests of its users.
pub struct WorkerState {
    ctx: Arc<Context>,
    digests: HashMap<UserId, Digest>,
}

/// Numbers e-mail windows process-wide, so a window timer of a crashed
/// worker can never close a window of its replacement.
static WINDOWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct Digest {
    generation: u64,
    entries: Vec<(Pending, oneshot::Sender<Outcome>)>,
}

impl Worker for NotifyWorker {
    type Key = UserId;
    type Message = Work;
    type Arguments = Arc<Context>;
    type State = WorkerState;

    async fn pre_start(
        &self,
        _wid: WorkerId,
        _factory: &ActorRef<FactoryMessage<UserId, Work>>,
        ctx: Arc<Context>,
    ) -> Result<WorkerState, ActorProcessingErr> {
        Ok(WorkerState {
            ctx,
            digests: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        _wid: WorkerId,
        factory: &ActorRef<FactoryMessage<UserId, Work>>,
        Job { key, msg, .. }: Job<UserId, Work>,
        state: &mut WorkerState,
    ) -> Result<UserId, ActorProcessingErr> {
        match msg {
            Work::Notify { job, done } => notify(state, factory, &key, job, done).await,
            Work::Flush { generation } => flush(state, &key, generation).await,
        }
        Ok(key)
    }
}

async fn notify(
    st: &mut WorkerState,
    factory: &ActorRef<FactoryMessage<UserId, Work>>,
    user: &UserId,
    job: Arc<NotifyJob>,
    done: oneshot::Sender<Outcome>,
) {
    let ctx = st.ctx.clone();
    let step = match policy::decide(&ctx, &job, user).await {
        Ok(Decision::Push(devices)) => match push(&ctx, &job, user, devices).await {
            Ok(Pushed::Sent) => Step::Done(Outcome::Settled),
            Ok(Pushed::Retry) => Step::Done(Outcome::Retry),
            Ok(Pushed::MessageGone) => Step::Then(Decision::Skip("message_gone")),
            // Push failed for good (or every token was stale): e-mail.
            Ok(Pushed::FallBack) => match ctx.node.stores.users.notification_settings(user).await {
                Ok(s) => Step::Then(policy::email_or_skip(&ctx, s.email)),
                Err(e) => {
                    tracing::warn!(error = %e, user = %user, "push fallback: store failed; retrying later");
                    Step::Done(Outcome::Retry)
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, user = %user, "push: store failed; retrying later");
                Step::Done(Outcome::Retry)
            }
        },
        Ok(other) => Step::Then(other),
        Err(e) => {
            tracing::warn!(error = %e, user = %user, "notification policy: store failed; retrying later");
            Step::Done(Outcome::Retry)
        }
    };
    match step {
        Step::Done(outcome) => {
            let _ = done.send(outcome);
        }
        Step::Then(Decision::Email) => enqueue(st, factory, user, &job, done),
        Step::Then(Decision::Skip(reason)) => {
            count_dropped(reason, 1);
            let _ = done.send(Outcome::Settled);
        }
        Step::Then(Decision::Push(_)) => {
            // `email_or_skip` never answers push; settle rather than loop.
            count_dropped("no_channel", 1);
            let _ = done.send(Outcome::Settled);
        }
    }
}

/// Where handling one recipient got to.
enum Step {
    /// Settled (or to retry) already.
    Done(Outcome),
    /// Still to do.
    Then(Decision),
}

enum Pushed {
    /// At least one device got it.
    Sent,
    /// Only temporary failures: try again later.
    Retry,
    /// No device took it and retrying will not help.
    FallBack,
    MessageGone,
}

async fn push(
    ctx: &Context,
    job: &NotifyJob,
    user: &UserId,
    devices: Vec<Device>,
) -> Result<Pushed, StoreError> {
    let Some(sender) = ctx.push.as_ref() else {
        return Ok(Pushed::FallBack);
    };
    let Some(content) = policy::push_for(ctx, job).await? else {
        return Ok(Pushed::MessageGone);
    };
    let (mut sent, mut temporary) = (false, false);
    for d in devices {
        match sender.send(&d.token, &content).await {
            Ok(()) => {
                count_sent(Channel::Push);
                sent = true;
            }
            Err(NotifyError::InvalidToken) => {
                count_failed(Channel::Push);
                tracing::info!(user = %user, platform = %d.platform, "FCM token unregistered; device removed");
                ctx.node.stores.users.delete_device(user, &d.token).await?;
            }
            Err(NotifyError::Temporary(e)) => {
                count_failed(Channel::Push);
                tracing::warn!(error = %e, user = %user, "push failed for now");
                temporary = true;
            }
            Err(NotifyError::Permanent(e)) => {
                count_failed(Channel::Push);
                tracing::warn!(error = %e, user = %user, "push failed");
            }
        }
    }
    Ok(if sent {
        Pushed::Sent
    } else if temporary {
        Pushed::Retry
    } else {
        Pushed::FallBack
    })
}

/// Adds the message to the user's digest; the first one opens the window.
fn enqueue(
    st: &mut WorkerState,
    factory: &ActorRef<FactoryMessage<UserId, Work>>,
    user: &UserId,
    job: &NotifyJob,
    done: oneshot::Sender<Outcome>,
) {
    let entry = (
        Pending {
            room_id: job.room_id.clone(),
            seq: job.seq,
            sender_id: job.sender_id.clone(),
        },
        done,
    );
    if let Some(d) = st.digests.get_mut(user) {
        d.entries.push(entry);
        return;
    }
    let generation = WINDOWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    st.digests.insert(
        user.clone(),
        Digest {
            generation,
            entries: vec![entry],
        },
    );
    let window = Duration::from_secs(st.ctx.cfg.email_window_secs);
    let factory = factory.clone();
    let user = user.clone();
    tokio::spawn(async move {
        tokio::time::sleep(window).await;
        // Fails only when the pool is gone; the digest's jobs are then retried.
        let _ = factory.dispatch(user, Work::Flush { generation });
    });
}

/// The window ended: mail what is still unread, settle every job in it.
async fn flush(st: &mut WorkerState, user: &UserId, generation: u64) {
    if st.digests.get(user).map(|d| d.generation) != Some(generation) {
        // The worker was restarted since; its digests were retried.
        return;
    }
    let Some(digest) = st.digests.remove(user) else {
        return;
    };
    let ctx = st.ctx.clone();
    let n = digest.entries.len() as u64;
    let pending: Vec<Pending> = digest.entries.iter().map(|(p, _)| p.clone()).collect();
    let outcome = match policy::digest(&ctx, user, &pending).await {
        Err(e) => {
            tracing::warn!(error = %e, user = %user, "e-mail digest: store failed; retrying later");
            Outcome::Retry
        }
        Ok(DigestPlan::Nothing(reason)) => {
            count_dropped(reason, n);
            Outcome::Settled
        }
        Ok(DigestPlan::Send(d)) => match ctx.mail.as_ref() {
            None => {
                count_dropped("no_channel", n);
                Outcome::Settled
            }
            Some(mailer) => {
                let mail = policy::render(&d, Duration::from_secs(ctx.cfg.email_window_secs));
                match mailer.send(&mail).await {
                    Ok(()) => {
                        count_sent(Channel::Email);
                        Outcome::Settled
                    }
                    Err(NotifyError::Temporary(e)) => {
                        count_failed(Channel::Email);
                        tracing::warn!(error = %e, user = %user, "e-mail failed for now");
                        Outcome::Retry
                    }
                    Err(e) => {
                        count_failed(Channel::Email);
                        count_dropped("failed", n);
                        tracing::warn!(error = %e, user = %user, "e-mail failed; given up");
                        Outcome::Settled
                    }
                }
            }
        },
    };
    for (_, done) in digest.entries {
        let _ = done.send(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_jobs_expire() {
        let now = crate::domain::now_rfc3339();
        assert!(!expired(&now, 60));
        assert!(expired("2020-01-01T00:00:00.000Z", 60));
        assert!(!expired("not a time", 60));
    }
}
