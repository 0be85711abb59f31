//! Notifications for recipients who did not get a message live.
//!
//! A room publishes a [`NotifyJob`](crate::broker::NotifyJob) on the broker's
//! notify queue for the members that had no socket anywhere in the cluster.
//! The [`pool`] consumes that queue and hands each (job, recipient) to a
//! ractor factory worker chosen by the recipient's id, so one user's
//! notifications are handled in order by one worker. The worker asks the
//! [`policy`] what to do:
//!
//! - nothing, with a reason (read meanwhile, sender blocked, settings off, ...);
//! - a push through [`fcm`] when the user counts as online (a registered
//!   device and activity within `notify.online_window_secs`);
//! - otherwise an e-mail through [`smtp`], collapsed into one mail per user
//!   per `notify.email_window_secs` that lists what is still unread then.
//!
//! A delivery is acked only once every recipient's notification was sent or
//! given up with a reason; temporary failures that outlast the retries are
//! published again (delayed) and a crashed worker's jobs come back the same
//! way. docs/notifications.md has the whole design and every config key.

pub mod fcm;
pub mod policy;
pub mod pool;
pub mod smtp;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::cluster::Presence;
use crate::config::{NotifyConfig, Settings};
use crate::store::Stores;

pub use pool::{start, start_with};

/// What the pool needs of its node: narrow, no actor. The node builds it
/// (`From<Arc<Hub>>` in `actors`).
#[derive(Clone)]
pub struct Services {
    pub node_id: String,
    pub settings: Arc<Settings>,
    pub stores: Stores,
    /// Publishes retries on the notify queue, which the pool consumes.
    pub broker: Arc<dyn Broker>,
    /// Who has a socket somewhere in the cluster.
    pub presence: Arc<dyn Presence>,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// The supervisor the pool's factory is linked under (the node's root
    /// supervisor, so the pool shows in the admin tree); `None`: unlinked.
    pub supervisor: Option<ractor::ActorCell>,
}

/// What every worker (and the policy) needs, handed to a worker as its
/// `Arguments`.
pub struct Context {
    /// Store, presence, broker, node id, shutdown.
    pub node: Services,
    pub cfg: NotifyConfig,
    /// `None`: no FCM configured.
    pub push: Option<Arc<dyn PushSender>>,
    /// `None`: no SMTP configured.
    pub mail: Option<Arc<dyn MailSender>>,
}

/// A way to reach a user outside a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// FCM push to the user's devices.
    Push,
    /// An e-mail digest.
    Email,
}

impl Channel {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Push => "push",
            Channel::Email => "email",
        }
    }
}

/// One push notification, the same for every device of the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub title: String,
    pub body: String,
    /// FCM `data`: string values only.
    pub data: BTreeMap<String, String>,
}

/// One e-mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// Recipient address.
    pub to: String,
    /// Recipient display name.
    pub to_name: String,
    pub subject: String,
    /// Plain-text body.
    pub text: String,
    /// HTML body (same content).
    pub html: String,
}

/// Why a send did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    /// Worth trying again later (the sender's own retries are spent).
    #[error("temporary failure: {0}")]
    Temporary(String),
    /// Will not work by retrying.
    #[error("permanent failure: {0}")]
    Permanent(String),
    /// FCM says the device token is unregistered or invalid: forget it.
    #[error("push token is no longer valid")]
    InvalidToken,
}

/// Sends pushes to one device token (FCM in production).
#[async_trait]
pub trait PushSender: Send + Sync {
    /// Sends `push` to the device `token`, retrying temporary failures itself.
    async fn send(&self, token: &str, push: &Push) -> Result<(), NotifyError>;
}

/// Sends e-mails (SMTP in production).
#[async_trait]
pub trait MailSender: Send + Sync {
    /// Sends `mail`, retrying temporary failures itself.
    async fn send(&self, mail: &Mail) -> Result<(), NotifyError>;
}

/// Why the pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A `[notify]` setting or a file it names is unusable.
    #[error("notify config: {0}")]
    Config(String),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error("notify pool: {0}")]
    Actor(String),
}

/// When to try a send again.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all (the first one included).
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// A longer `Retry-After` ends the attempts (the job is requeued instead).
    pub max_retry_after: Duration,
}

impl RetryPolicy {
    /// The policy of `[notify]`.
    pub fn from_config(cfg: &NotifyConfig) -> Self {
        Self {
            max_attempts: cfg.max_attempts.max(1),
            backoff_base: Duration::from_millis(cfg.backoff_base_ms),
            backoff_max: Duration::from_millis(cfg.backoff_max_ms.max(cfg.backoff_base_ms)),
            max_retry_after: Duration::from_secs(cfg.max_retry_after_secs),
        }
    }

    /// The wait before the attempt after `attempt` (1-based) failed, or
    /// `None` when the attempts are spent or the server asks for a longer
    /// wait than we keep a worker busy for. `retry_after` (the server's
    /// word) wins over the exponential backoff; the backoff gets jitter.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        if let Some(ra) = retry_after {
            return (ra <= self.max_retry_after).then_some(ra);
        }
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << (attempt - 1).min(20))
            .min(self.backoff_max);
        // Half fixed, half random: spreads a burst of retries out.
        let half = exp / 2;
        let jitter = rand::rng().random_range(0..=half.as_millis() as u64);
        Some(half + Duration::from_millis(jitter))
    }
}

/// Parses an HTTP `Retry-After` value: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    Some(
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

pub(crate) fn count_sent(channel: Channel) {
    metrics::counter!("chatd_notifications_sent_total", "channel" => channel.as_str()).increment(1);
}

pub(crate) fn count_failed(channel: Channel) {
    metrics::counter!("chatd_notifications_failed_total", "channel" => channel.as_str())
        .increment(1);
}

pub(crate) fn count_retried(channel: Channel) {
    metrics::counter!("chatd_notifications_retried_total", "channel" => channel.as_str())
        .increment(1);
}

pub(crate) fn count_dropped(reason: &'static str, n: u64) {
    metrics::counter!("chatd_notifications_dropped_total", "reason" => reason).increment(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(300),
            max_retry_after: Duration::from_secs(10),
        }
    }

    #[test]
    fn backoff_grows_caps_and_stops() {
        let p = policy();
        for _ in 0..50 {
            let d1 = p.delay(1, None).unwrap();
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d2 = p.delay(2, None).unwrap();
            assert!(d2 >= Duration::from_millis(100) && d2 <= Duration::from_millis(200));
            let d3 = p.delay(3, None).unwrap();
            assert!(d3 >= Duration::from_millis(150) && d3 <= Duration::from_millis(300));
        }
        assert_eq!(p.delay(4, None), None);
    }

    #[test]
    fn retry_after_wins_within_the_cap() {
        let p = policy();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3))),
            Some(Duration::from_secs(3))
        );
        assert_eq!(p.delay(1, Some(Duration::from_secs(11))), None);
        assert_eq!(p.delay(4, Some(Duration::from_secs(1))), None);
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
