//! The user service's security core: argon2id password hashes, HS256 JWT
//! access tokens, opaque refresh tokens (stored as SHA-256 hashes, rotated on
//! use, a reused token revokes its login), the login attempt limiter, and
//! the fixed pool of threads that runs argon2.

use std::net::IpAddr;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use base64::Engine;
use dashmap::DashMap;
use jsonwebtoken::{decode, encode, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
    /// The hashing queue is full: the caller should retry later.
    #[error("too many password checks in progress; retry shortly")]
    Busy,
}

/// Jobs waiting for a hashing thread, per thread; past this, `Busy`.
const HASH_QUEUE_PER_THREAD: usize = 64;

type HashJob = Box<dyn FnOnce() + Send>;

/// A fixed pool of threads that run argon2. Each hash takes ~19 MiB: on
/// arbitrary blocking threads the allocator would keep that much per thread
/// ever used, here memory for hashing is bounded by the pool's size. The
/// threads end when the pool is dropped.
struct HashPool {
    jobs: mpsc::SyncSender<HashJob>,
}

impl HashPool {
    fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let (jobs, rx) = mpsc::sync_channel::<HashJob>(threads * HASH_QUEUE_PER_THREAD);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("chatd-argon2-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    // A panic drops the job's reply (the caller sees an
                    // error) but keeps the thread.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start an argon2 thread");
            }
        }
        Self { jobs }
    }

    /// Runs `f` on a pool thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|e| match e {
                mpsc::TrySendError::Full(_) => AuthError::Busy,
                mpsc::TrySendError::Disconnected(_) => {
                    AuthError::Hash("no hashing thread is running".into())
                }
            })?;
        rx.await
            .map_err(|_| AuthError::Hash("the hashing job failed".into()))
    }
}

/// Keys, hasher limits and the attempt limiter.
pub struct AuthService {
    enc: EncodingKey,
    dec: DecodingKey,
    validation: Validation,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    hashing: HashPool,
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
            hashing: HashPool::new(cfg.hash_concurrency),
            limiter: LoginLimiter::new(
                (
                    cfg.login_max_failures,
                    Duration::from_secs(cfg.login_window_secs),
                ),
                (
                    cfg.login_address_max_failures,
                    Duration::from_secs(cfg.login_address_window_secs),
                ),
            ),
            dummy_hash,
        })
    }

    /// argon2id (OWASP parameters) on the hashing pool.
    pub async fn hash_password(&self, pw: &Password) -> Result<String, AuthError> {
        let pw = pw.expose().to_owned();
        self.hashing
            .run(move || {
                Argon2::default()
                    .hash_password(pw.as_bytes())
                    .map(|h| h.to_string())
                    .map_err(|e| AuthError::Hash(e.to_string()))
            })
            .await?
    }

    /// Checks a password against a stored hash (or the dummy when `None`,
    /// so that an unknown user costs the same time).
    pub async fn verify_password(&self, pw: &str, hash: Option<&str>) -> Result<bool, AuthError> {
        let known = hash.is_some();
        let hash = hash.unwrap_or(&self.dummy_hash).to_owned();
        let pw = pw.to_owned();
        let ok = self
            .hashing
            .run(move || {
                PasswordHash::new(&hash)
                    .map(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        Ok(ok && known)
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

/// Counts failed logins per account and per client address, each within
/// its window; past a limit, further attempts are refused until the window
/// ends. The account is what the login string resolves to, so a username
/// and an e-mail of one account share a count; an unknown login counts by
/// its text. The per-address limit is much higher than the per-account one
/// (many users share a NAT) and stops spraying across many accounts.
pub struct LoginLimiter {
    account: (u32, Duration),
    address: (u32, Duration),
    failures: DashMap<String, (u32, Instant)>,
}

impl LoginLimiter {
    fn new(account: (u32, Duration), address: (u32, Duration)) -> Self {
        Self {
            account: (account.0.max(1), account.1),
            address: (address.0.max(1), address.1),
            failures: DashMap::new(),
        }
    }

    /// The key a login attempt counts against: the account it names, or
    /// the login text when it names none.
    pub fn account_key(account: Option<&UserId>, login: &str) -> String {
        match account {
            Some(id) => format!("a:{id}"),
            None => format!("l:{}", login.trim().to_lowercase()),
        }
    }

    fn keys(&self, account: &str, ip: Option<IpAddr>) -> Vec<(String, (u32, Duration))> {
        let mut k = vec![(account.to_owned(), self.account)];
        if let Some(ip) = ip {
            k.push((format!("ip:{ip}"), self.address));
        }
        k
    }

    /// `Some(seconds to wait)` when the account or the address is over its limit.
    pub fn check(&self, account: &str, ip: Option<IpAddr>) -> Option<u64> {
        let now = Instant::now();
        let mut wait = None;
        for (key, (limit, window)) in self.keys(account, ip) {
            if let Some(e) = self.failures.get(&key) {
                let (n, since) = *e;
                let elapsed = now.duration_since(since);
                if elapsed < window && n >= limit {
                    let w = (window - elapsed).as_secs().max(1);
                    wait = Some(wait.map_or(w, |x: u64| x.max(w)));
                }
            }
        }
        wait
    }

    /// Records a failed attempt.
    pub fn failed(&self, account: &str, ip: Option<IpAddr>) {
        let now = Instant::now();
        for (key, (_, window)) in self.keys(account, ip) {
            let mut e = self.failures.entry(key).or_insert((0, now));
            if now.duration_since(e.1) >= window {
                *e = (0, now);
            }
            e.0 += 1;
        }
        if self.failures.len() > 100_000 {
            let longest = self.account.1.max(self.address.1);
            self.failures
                .retain(|_, (_, t)| now.duration_since(*t) < longest);
        }
    }

    /// A success clears the account's failures (not the address's).
    pub fn succeeded(&self, account: &str) {
        self.failures.remove(account);
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
        assert!(s.verify_password("correct horse", Some(&h)).await.unwrap());
        assert!(!s.verify_password("wrong horse", Some(&h)).await.unwrap());
        assert!(!s.verify_password("correct horse", None).await.unwrap());
    }

    #[tokio::test]
    async fn hashing_runs_on_a_fixed_pool_of_threads() {
        let mut cfg = crate::config::Settings::defaults().auth;
        cfg.hash_concurrency = 2;
        let s = AuthService::new(&cfg, b"test-secret-test-secret-test-secret");
        let mut jobs = Vec::new();
        for _ in 0..16 {
            let s = s.clone();
            jobs.push(tokio::spawn(async move {
                s.hashing
                    .run(|| std::thread::current().name().map(str::to_owned))
                    .await
                    .unwrap()
            }));
        }
        let mut names = std::collections::HashSet::new();
        for j in jobs {
            names.insert(j.await.unwrap().expect("a named thread"));
        }
        assert!(names.len() <= 2, "{names:?}");
        assert!(
            names.iter().all(|n| n.starts_with("chatd-argon2-")),
            "{names:?}"
        );
    }

    #[tokio::test]
    async fn a_full_hashing_queue_is_busy_not_a_wait() {
        let mut cfg = crate::config::Settings::defaults().auth;
        cfg.hash_concurrency = 1;
        let s = AuthService::new(&cfg, b"test-secret-test-secret-test-secret");
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let blocker = s.hashing.run(move || {
            let _ = hold.recv();
        });
        let mut blocker = Box::pin(blocker);
        // The blocking job is queued first; then fill the queue.
        let _ = futures_util::poll!(blocker.as_mut());
        let mut queued = Vec::new();
        let mut busy = false;
        for _ in 0..=HASH_QUEUE_PER_THREAD + 1 {
            let mut f = Box::pin(s.hashing.run(|| ()));
            if let std::task::Poll::Ready(Err(AuthError::Busy)) = futures_util::poll!(f.as_mut()) {
                busy = true;
                break;
            }
            queued.push(f);
        }
        assert!(busy, "the queue is bounded");
        release.send(()).unwrap();
        blocker.await.unwrap();
        for f in queued {
            f.await.unwrap();
        }
    }

    #[test]
    fn limiter_counts_per_account_and_per_address() {
        let w = Duration::from_secs(60);
        let l = LoginLimiter::new((3, w), (5, w));
        let id = UserId::generate();
        let acct = LoginLimiter::account_key(Some(&id), "bob");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(&acct, Some(ip)).is_none());
            l.failed(&acct, Some(ip));
        }
        assert!(l.check(&acct, Some(ip)).is_some());
        // Another account behind the same address is not locked...
        let other = LoginLimiter::account_key(None, " Ghost ");
        assert_eq!(other, LoginLimiter::account_key(None, "ghost"));
        assert!(l.check(&other, Some(ip)).is_none());
        l.failed(&other, Some(ip));
        l.failed(&other, Some(ip));
        // ...until the address reaches its own limit.
        assert!(l.check(&other, Some(ip)).is_some());
        assert!(l.check(&other, Some("10.0.0.2".parse().unwrap())).is_none());
        l.succeeded(&acct);
        assert!(l.check(&acct, None).is_none());
    }
}
