//! Firebase Cloud Messaging, HTTP v1 API.
//!
//! Auth is Google's OAuth2 service-account flow: an RS256 JWT assertion
//! (`iss` the service account's e-mail, `scope` firebase.messaging, `aud`
//! the token URL, at most one hour long) signed with the account's private
//! key is exchanged at the token URL for an access token, which is cached
//! until shortly before it expires. Sends are
//! `POST {base}/v1/projects/{project}/messages:send`. 429 and 5xx are
//! retried with backoff, honouring `Retry-After`; `UNREGISTERED` (404) and
//! `INVALID_ARGUMENT` (400) for the token come back as
//! [`NotifyError::InvalidToken`] so the caller can forget the device.

use std::time::Duration;

use async_trait::async_trait;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{
    count_retried, parse_retry_after, Channel, NotifyError, Push, PushSender, RetryPolicy,
};
use crate::config::FcmConfig;

/// The OAuth scope FCM sends need.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Lifetime of a JWT assertion (Google accepts at most one hour).
const ASSERTION_TTL_SECS: u64 = 3600;
/// An access token is renewed this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// The fields of a Google service-account JSON key file that we use.
#[derive(Clone, Deserialize)]
pub struct ServiceAccount {
    pub project_id: String,
    #[serde(default)]
    pub private_key_id: String,
    pub private_key: String,
    pub client_email: String,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("private_key", &"***")
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

struct CachedToken {
    value: String,
    renew_at: Instant,
}

/// What one HTTP exchange with Google came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Sent.
    Ok,
    /// The access token was refused: get a new one and try again.
    Unauthorized,
    /// Worth another attempt, after `retry_after` when the server said so.
    Retry {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Settled as failed: no retry helps.
    Fail(NotifyError),
}

/// Reads an FCM `messages:send` answer (status, body, `Retry-After`).
pub fn classify_send(status: u16, body: &str, retry_after: Option<Duration>) -> Answer {
    let err: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let e = &err["error"];
    let status_name = e["status"].as_str().unwrap_or_default();
    let details = e["details"].as_array().cloned().unwrap_or_default();
    let error_codes: Vec<&str> = details
        .iter()
        .filter_map(|d| d["errorCode"].as_str())
        .collect();
    let other_field = details
        .iter()
        .filter_map(|d| d["fieldViolations"].as_array())
        .flatten()
        .filter_map(|v| v["field"].as_str())
        .any(|f| f != "message.token");
    let short = || format!("FCM {status}: {}", e["message"].as_str().unwrap_or(body));
    match status {
        200..=299 => Answer::Ok,
        401 => Answer::Unauthorized,
        404 if error_codes.contains(&"UNREGISTERED") || status_name == "UNREGISTERED" => {
            Answer::Fail(NotifyError::InvalidToken)
        }
        // Our payload is fixed and valid, so INVALID_ARGUMENT is about the
        // token, unless FCM names another field.
        400 if !other_field
            && (status_name == "INVALID_ARGUMENT" || error_codes.contains(&"INVALID_ARGUMENT")) =>
        {
            Answer::Fail(NotifyError::InvalidToken)
        }
        429 | 500 | 502 | 503 | 504 => Answer::Retry {
            reason: short(),
            retry_after,
        },
        _ => Answer::Fail(NotifyError::Permanent(short())),
    }
}

/// The FCM sender.
pub struct Fcm {
    http: reqwest::Client,
    account: ServiceAccount,
    key: EncodingKey,
    token_url: String,
    send_url: String,
    retry: RetryPolicy,
    token: Mutex<Option<CachedToken>>,
}

impl Fcm {
    /// The sender `[notify.fcm]` describes; `None` when no service account is configured.
    pub fn from_config(cfg: &FcmConfig, retry: RetryPolicy) -> Result<Option<Self>, String> {
        if cfg.service_account_path.trim().is_empty() {
            return Ok(None);
        }
        let raw = std::fs::read_to_string(&cfg.service_account_path)
            .map_err(|e| format!("cannot read {}: {e}", cfg.service_account_path))?;
        let account: ServiceAccount = serde_json::from_str(&raw).map_err(|e| {
            format!(
                "{} is not a service-account JSON: {e}",
                cfg.service_account_path
            )
        })?;
        Self::new(account, cfg, retry).map(Some)
    }

    /// A sender for `account` with the URLs and timeouts of `cfg`.
    pub fn new(
        mut account: ServiceAccount,
        cfg: &FcmConfig,
        retry: RetryPolicy,
    ) -> Result<Self, String> {
        if !cfg.project_id.trim().is_empty() {
            account.project_id = cfg.project_id.trim().to_owned();
        }
        if account.project_id.is_empty() || account.client_email.is_empty() {
            return Err("the service account needs project_id and client_email".into());
        }
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .map_err(|e| format!("service account private key: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_secs.max(1)))
            .build()
            .map_err(|e| format!("http client: {e}"))?;
        let base = cfg.base_url.trim_end_matches('/');
        Ok(Self {
            http,
            send_url: format!("{base}/v1/projects/{}/messages:send", account.project_id),
            token_url: cfg.token_url.clone(),
            account,
            key,
            retry,
            token: Mutex::new(None),
        })
    }

    /// A fresh signed JWT assertion for the token endpoint.
    pub fn assertion(&self) -> Result<String, NotifyError> {
        let iat = jsonwebtoken::get_current_timestamp();
        let mut header = Header::new(Algorithm::RS256);
        if !self.account.private_key_id.is_empty() {
            header.kid = Some(self.account.private_key_id.clone());
        }
        let claims = Claims {
            iss: &self.account.client_email,
            scope: SCOPE,
            aud: &self.token_url,
            iat,
            exp: iat + ASSERTION_TTL_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| NotifyError::Permanent(format!("cannot sign the OAuth assertion: {e}")))
    }

    /// The cached access token, fetched anew when missing or near expiry.
    async fn access_token(&self) -> Result<String, Answer> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(t.value.clone());
        }
        let (value, ttl) = self.fetch_token().await?;
        *slot = Some(CachedToken {
            value: value.clone(),
            renew_at: Instant::now() + ttl.saturating_sub(TOKEN_MARGIN),
        });
        Ok(value)
    }

    async fn fetch_token(&self) -> Result<(String, Duration), Answer> {
        let assertion = self.assertion().map_err(Answer::Fail)?;
        // The assertion is base64url and dots: nothing to percent-encode.
        let body = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={assertion}"
        );
        let resp = self
            .http
            .post(&self.token_url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| Answer::Retry {
                reason: format!("token endpoint: {e}"),
                retry_after: None,
            })?;
        let status = resp.status().as_u16();
        let retry_after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        match status {
            200..=299 => {
                let t: TokenAnswer = serde_json::from_str(&text).map_err(|e| Answer::Retry {
                    reason: format!("token endpoint answered {e}"),
                    retry_after: None,
                })?;
                let ttl = Duration::from_secs(t.expires_in.unwrap_or(3600));
                Ok((t.access_token, ttl))
            }
            429 | 500..=599 => Err(Answer::Retry {
                reason: format!("token endpoint {status}"),
                retry_after,
            }),
            // invalid_grant and friends: the key or config is wrong.
            _ => Err(Answer::Fail(NotifyError::Permanent(format!(
                "token endpoint {status}: {text}"
            )))),
        }
    }

    async fn send_once(&self, device: &str, push: &Push) -> Answer {
        let token = match self.access_token().await {
            Ok(t) => t,
            Err(a) => return a,
        };
        let body = json!({
            "message": {
                "token": device,
                "notification": {"title": push.title, "body": push.body},
                "data": push.data,
            }
        });
        let resp = match self
            .http
            .post(&self.send_url)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .json(&body)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return Answer::Retry {
                    reason: format!("FCM: {e}"),
                    retry_after: None,
                }
            }
        };
        let status = resp.status().as_u16();
        let ra = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        classify_send(status, &text, ra)
    }
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    h.get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, chrono::Utc::now()))
}

#[async_trait]
impl PushSender for Fcm {
    async fn send(&self, device: &str, push: &Push) -> Result<(), NotifyError> {
        let mut attempt = 1;
        let mut renewed = false;
        loop {
            match self.send_once(device, push).await {
                Answer::Ok => return Ok(()),
                Answer::Fail(e) => return Err(e),
                Answer::Unauthorized if !renewed => {
                    // The token was revoked or expired early: one fresh try.
                    renewed = true;
                    *self.token.lock().await = None;
                }
                Answer::Unauthorized => {
                    return Err(NotifyError::Permanent(
                        "FCM refused a fresh access token".into(),
                    ))
                }
                Answer::Retry {
                    reason,
                    retry_after,
                } => match self.retry.delay(attempt, retry_after) {
                    Some(wait) => {
                        tracing::debug!(%reason, ?wait, attempt, "FCM send retried");
                        count_retried(Channel::Push);
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                    }
                    None => return Err(NotifyError::Temporary(reason)),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unregistered_and_invalid_tokens_are_reported() {
        let unregistered = r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert_eq!(
            classify_send(404, unregistered, None),
            Answer::Fail(NotifyError::InvalidToken)
        );
        let invalid = r#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
        assert_eq!(
            classify_send(400, invalid, None),
            Answer::Fail(NotifyError::InvalidToken)
        );
        let other = r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.data[0].value","description":"bad"}]}]}}"#;
        assert!(matches!(
            classify_send(400, other, None),
            Answer::Fail(NotifyError::Permanent(_))
        ));
        assert!(matches!(
            classify_send(404, r#"{"error":{"status":"NOT_FOUND"}}"#, None),
            Answer::Fail(NotifyError::Permanent(_))
        ));
    }

    #[test]
    fn overload_is_retried_with_the_servers_wait() {
        let ra = Some(Duration::from_secs(2));
        match classify_send(429, "{}", ra) {
            Answer::Retry { retry_after, .. } => assert_eq!(retry_after, ra),
            other => panic!("{other:?}"),
        }
        assert!(matches!(classify_send(503, "", None), Answer::Retry { .. }));
        assert_eq!(classify_send(401, "", None), Answer::Unauthorized);
        assert_eq!(classify_send(200, "{}", None), Answer::Ok);
        assert!(matches!(
            classify_send(403, "{}", None),
            Answer::Fail(NotifyError::Permanent(_))
        ));
    }
}
