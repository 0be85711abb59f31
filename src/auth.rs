//! The user service's security core: argon2id password hashes, HS256 JWT
//! access tokens, opaque refresh tokens (stored as SHA-256 hashes, rotated on
//! use, a reused token revokes its login), and the login attempt limiter.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use base64::Engine;
use dashmap::DashMap;
use jsonwebtoken::{decode, encode, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::AuthConfig;
use crate::domain::{Password, UserId};

/// Claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Username (for the admin role check).
    pub usr: String,
    pub iat: i64,
    pub exp: i64,
}

/// A verified caller.
#[derive(Debug, Clone)]
pub struct AuthUser {
    pub id: UserId,
    pub username: String,
}

/// Auth failures.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("invalid or expired token")]
    InvalidToken,
    #[error("hashing failed: {0}")]
    Hash(String),
}

/// Keys, hasher limits and the attempt limiter.
pub struct AuthService {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    hashing: Semaphore,
    limiter: LoginLimiter,
    /// A real hash of a random password: unknown users are verified against
    /// it so both failures take the same time.
    dummy_hash: String,
}

impl AuthService {
    /// Builds the service from config and the resolved secret.
    pub fn new(cfg: &AuthConfig, secret: &[u8]) -> Arc<Self> {
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let dummy_hash = Argon2::default()
            .hash_password(uuid::Uuid::new_v4().to_string().as_bytes())
            .map(|h| h.to_string())
            .unwrap_or_default();
        Arc::new(Self {
            enc: EncodingKey::from_secret(secret),
            dec: DecodingKey::from_secret(secret),
            validation,
            access_ttl: Duration::from_secs(cfg.access_ttl_secs.max(1)),
            refresh_ttl: Duration::from_secs(cfg.refresh_ttl_secs.max(1)),
            hashing: Semaphore::new(cfg.hash_concurrency.max(1)),
            limiter: LoginLimiter::new(
                cfg.login_max_failures,
                Duration::from_secs(cfg.login_window_secs),
            ),
            dummy_hash,
        })
    }

    /// argon2id (OWASP parameters) in the blocking pool, a bounded number at once.
    pub async fn hash_password(&self, pw: &Password) -> Result<String, AuthError> {
        let _permit = self
            .hashing
            .acquire()
            .await
            .map_err(|e| AuthError::Hash(e.to_string()))?;
        let pw = pw.expose().to_owned();
        tokio::task::spawn_blocking(move || {
            Argon2::default()
                .hash_password(pw.as_bytes())
                .map(|h| h.to_string())
                .map_err(|e| AuthError::Hash(e.to_string()))
        })
        .await
        .map_err(|e| AuthError::Hash(e.to_string()))?
    }

    /// Checks a password against a stored hash (or the dummy when `None`).
    pub async fn verify_password(&self, pw: &str, hash: Option<&str>) -> bool {
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        let known = hash.is_some();
        let hash = hash.unwrap_or(&self.dummy_hash).to_owned();
        let pw = pw.to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        ok && known
    }

    /// A signed access token for the user.
    pub fn issue_access(&self, id: &UserId, username: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = Claims {
            sub: id.to_string(),
            usr: username.to_owned(),
            iat: now,
            exp: now + self.access_ttl.as_secs() as i64,
        };
        // HS256 with an in-memory key cannot fail to sign.
        encode(&Header::default(), &claims, &self.enc).unwrap_or_default()
    }

    /// Verifies an access token.
    pub fn verify_access(&self, token: &str) -> Result<AuthUser, AuthError> {
        let data = decode::<Claims>(token, &self.dec, &self.validation)
            .map_err(|_| AuthError::InvalidToken)?;
        let id = UserId::parse(&data.claims.sub).map_err(|_| AuthError::InvalidToken)?;
        Ok(AuthUser {
            id,
            username: data.claims.usr,
        })
    }

    /// A new opaque refresh token and the hash to store.
    pub fn new_refresh(&self) -> (String, String) {
        let bytes: [u8; 32] = rand::random();
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let hash = Self::hash_refresh(&token);
        (token, hash)
    }

    /// The stored form of a refresh token.
    pub fn hash_refresh(token: &str) -> String {
        hex::encode(Sha256::digest(token.as_bytes()))
    }

    /// The login attempt limiter.
    pub fn limiter(&self) -> &LoginLimiter {
        &self.limiter
    }
}

/// Counts failed logins per login name and per client address within a
/// window; past the limit, further attempts are refused until it ends.
pub struct LoginLimiter {
    max: u32,
    window: Duration,
    failures: DashMap<String, (u32, Instant)>,
}

impl LoginLimiter {
    fn new(max: u32, window: Duration) -> Self {
        Self {
            max: max.max(1),
            window,
            failures: DashMap::new(),
        }
    }

    fn keys(login: &str, ip: Option<IpAddr>) -> Vec<String> {
        let mut k = vec![format!("u:{}", login.trim().to_lowercase())];
        if let Some(ip) = ip {
            k.push(format!("ip:{ip}"));
        }
        k
    }

    /// `Some(seconds to wait)` when the caller is over the limit.
    pub fn check(&self, login: &str, ip: Option<IpAddr>) -> Option<u64> {
        let now = Instant::now();
        let mut wait = None;
        for key in Self::keys(login, ip) {
            if let Some(e) = self.failures.get(&key) {
                let (n, since) = *e;
                let elapsed = now.duration_since(since);
                // The per-address budget is wider: many users share NATs.
                let limit = if key.starts_with("ip:") {
                    self.max * 4
                } else {
                    self.max
                };
                if elapsed < self.window && n >= limit {
                    let w = (self.window - elapsed).as_secs().max(1);
                    wait = Some(wait.map_or(w, |x: u64| x.max(w)));
                }
            }
        }
        wait
    }

    /// Records a failed attempt.
    pub fn failed(&self, login: &str, ip: Option<IpAddr>) {
        let now = Instant::now();
        for key in Self::keys(login, ip) {
            let mut e = self.failures.entry(key).or_insert((0, now));
            if now.duration_since(e.1) >= self.window {
                *e = (0, now);
            }
            e.0 += 1;
        }
        if self.failures.len() > 100_000 {
            self.failures
                .retain(|_, (_, t)| now.duration_since(*t) < self.window);
        }
    }

    /// A success clears the login's failures (not the address's).
    pub fn succeeded(&self, login: &str) {
        self.failures
            .remove(&format!("u:{}", login.trim().to_lowercase()));
    }
}

/// The JWT secret: the configured one, or one generated on first start and
/// kept in `dir/jwt_secret` (mode 0600), with a warning.
pub fn resolve_secret(configured: &str, dir: &std::path::Path) -> std::io::Result<Vec<u8>> {
    if !configured.is_empty() {
        return Ok(configured.as_bytes().to_vec());
    }
    let path = dir.join("jwt_secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        if s.trim().len() >= 32 {
            return Ok(s.trim().as_bytes().to_vec());
        }
    }
    std::fs::create_dir_all(dir)?;
    let bytes: [u8; 48] = rand::random();
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&path)?;
        f.write_all(secret.as_bytes())?;
    }
    tracing::warn!(
        path = %path.display(),
        "no auth.jwt_secret configured: generated one and stored it there; set CHAT__AUTH__JWT_SECRET (the same on every node) for a cluster"
    );
    Ok(secret.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> Arc<AuthService> {
        let cfg = crate::config::Settings::defaults().auth;
        AuthService::new(&cfg, b"test-secret-test-secret-test-secret")
    }

    #[test]
    fn access_tokens_round_trip_and_reject_tampering() {
        let s = svc();
        let id = UserId::generate();
        let t = s.issue_access(&id, "alice");
        let u = s.verify_access(&t).unwrap();
        assert_eq!(u.id, id);
        assert_eq!(u.username, "alice");
        let mut bad = t.clone();
        bad.pop();
        bad.push('x');
        assert!(s.verify_access(&bad).is_err());
        let other = AuthService::new(
            &crate::config::Settings::defaults().auth,
            b"another-secret-another-secret-xx",
        );
        assert!(other.verify_access(&t).is_err());
    }

    #[tokio::test]
    async fn password_hash_verifies() {
        let s = svc();
        let pw = Password::parse("correct horse", &Default::default()).unwrap();
        let h = s.hash_password(&pw).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(s.verify_password("correct horse", Some(&h)).await);
        assert!(!s.verify_password("wrong horse", Some(&h)).await);
        assert!(!s.verify_password("correct horse", None).await);
    }

    #[test]
    fn limiter_blocks_after_max_failures() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        for _ in 0..3 {
            assert!(l.check("Bob", None).is_none());
            l.failed("bob", None);
        }
        assert!(l.check("bob", None).is_some());
        l.succeeded("BOB");
        assert!(l.check("bob", None).is_none());
    }
}
