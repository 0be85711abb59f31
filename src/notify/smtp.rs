//! E-mail through SMTP with lettre's pooled async tokio transport: plain
//! (a local relay), STARTTLS or implicit TLS as configured, a text and an
//! HTML part, a pool-wide send rate, and retries with backoff on transient
//! (4xx, connection) failures.

use std::time::Duration;

use async_trait::async_trait;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{count_retried, Channel, Mail, MailSender, NotifyError, RetryPolicy};
use crate::config::SmtpConfig;

/// The SMTP sender.
pub struct Smtp {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    retry: RetryPolicy,
    limiter: RateLimiter,
}

impl Smtp {
    /// The sender `[notify.smtp]` describes; `None` when no host is set.
    /// Must run inside the tokio runtime (the pool starts a task).
    pub fn from_config(
        cfg: &SmtpConfig,
        retry: RetryPolicy,
        per_sec: u32,
    ) -> Result<Option<Self>, String> {
        let host = cfg.host.trim();
        if host.is_empty() {
            return Ok(None);
        }
        let builder = match cfg.tls.as_str() {
            "none" | "" => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
            "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
                .map_err(|e| format!("smtp starttls: {e}"))?,
            "tls" => AsyncSmtpTransport::<Tokio1Executor>::relay(host)
                .map_err(|e| format!("smtp tls: {e}"))?,
            other => {
                return Err(format!(
                    "notify.smtp.tls must be \"none\", \"starttls\" or \"tls\", not {other:?}"
                ))
            }
        };
        let mut builder = builder
            .port(cfg.port)
            .timeout(Some(Duration::from_secs(cfg.timeout_secs.max(1))))
            .pool_config(PoolConfig::new().max_size(cfg.pool_size.max(1)));
        if !cfg.username.is_empty() {
            builder =
                builder.credentials(Credentials::new(cfg.username.clone(), cfg.password.clone()));
        }
        let from: Mailbox = cfg
            .from
            .parse()
            .map_err(|e| format!("notify.smtp.from {:?}: {e}", cfg.from))?;
        Ok(Some(Self {
            transport: builder.build(),
            from,
            retry,
            limiter: RateLimiter::new(per_sec),
        }))
    }

    fn message(&self, mail: &Mail) -> Result<Message, NotifyError> {
        let to = Mailbox::new(
            Some(mail.to_name.clone()),
            mail.to
                .parse()
                .map_err(|e| NotifyError::Permanent(format!("recipient address: {e}")))?,
        );
        Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .multipart(MultiPart::alternative_plain_html(
                mail.text.clone(),
                mail.html.clone(),
            ))
            .map_err(|e| NotifyError::Permanent(format!("cannot build the e-mail: {e}")))
    }
}

#[async_trait]
impl MailSender for Smtp {
    async fn send(&self, mail: &Mail) -> Result<(), NotifyError> {
        let message = self.message(mail)?;
        let mut attempt = 1;
        loop {
            self.limiter.wait().await;
            match self.transport.send(message.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_permanent() => {
                    return Err(NotifyError::Permanent(format!("SMTP: {e}")))
                }
                Err(e) => match self.retry.delay(attempt, None) {
                    Some(wait) => {
                        tracing::debug!(error = %e, ?wait, attempt, "SMTP send retried");
                        count_retried(Channel::Email);
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                    None => return Err(NotifyError::Temporary(format!("SMTP: {e}"))),
                },
            }
        }
    }
}

/// Spaces sends evenly: at most `per_sec` a second across the pool.
struct RateLimiter {
    every: Option<Duration>,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn new(per_sec: u32) -> Self {
        Self {
            every: (per_sec > 0).then(|| Duration::from_secs(1) / per_sec),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn wait(&self) {
        let Some(every) = self.every else { return };
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + every;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tls: &str) -> SmtpConfig {
        let mut c = crate::config::Settings::defaults().notify.smtp;
        c.host = "smtp.example.com".into();
        c.tls = tls.into();
        c
    }

    #[tokio::test]
    async fn every_tls_mode_builds_and_unknown_ones_are_refused() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let retry = RetryPolicy::from_config(&crate::config::Settings::defaults().notify);
        for tls in ["none", "starttls", "tls"] {
            assert!(Smtp::from_config(&cfg(tls), retry.clone(), 1)
                .unwrap()
                .is_some());
        }
        assert!(Smtp::from_config(&cfg("ssl"), retry.clone(), 1).is_err());
        let mut off = cfg("none");
        off.host = String::new();
        assert!(Smtp::from_config(&off, retry, 1).unwrap().is_none());
    }

    #[tokio::test]
    async fn the_limiter_spaces_sends() {
        let l = RateLimiter::new(50);
        let start = Instant::now();
        for _ in 0..5 {
            l.wait().await;
        }
        // Five sends at 50/s: the fifth waits four intervals of 20 ms.
        assert!(start.elapsed() >= Duration::from_millis(80));
        let none = RateLimiter::new(0);
        let start = Instant::now();
        none.wait().await;
        assert!(start.elapsed() < Duration::from_millis(20));
    }
}
