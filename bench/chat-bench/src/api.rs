//! The HTTP half of the contract that the bench needs: register, rooms, healthz.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{stream, StreamExt, TryStreamExt};
use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub token: String,
}

#[derive(Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    pub fn new(base: &str) -> Result<Self> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build()?;
        Ok(Api {
            client,
            base: base.trim_end_matches('/').to_string(),
        })
    }

    pub async fn healthy(&self) -> bool {
        match self
            .client
            .get(format!("{}/healthz", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16() == 200,
            Err(_) => false,
        }
    }

    /// POST a JSON body; retries on 429 after Retry-After (the server asked for it).
    async fn post(&self, path: &str, token: Option<&str>, body: &Value) -> Result<(u16, Value)> {
        for _attempt in 0..20 {
            let mut req = self
                .client
                .post(format!("{}{}", self.base, path))
                .json(body);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await.with_context(|| format!("POST {path}"))?;
            let status = resp.status().as_u16();
            if status == 429 {
                let wait = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(1.0);
                tokio::time::sleep(Duration::from_secs_f64(wait.clamp(0.05, 30.0))).await;
                continue;
            }
            let text = resp.text().await?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|_| anyhow!("POST {path}: {status} with a non-JSON body: {text:.200}"))?;
            return Ok((status, v));
        }
        bail!("POST {path}: still rate limited after 20 tries")
    }

    pub async fn register(&self, username: &str) -> Result<User> {
        let body = json!({
            "username": username,
            "email": format!("{username}@bench.example.com"),
            "password": "bench-password-1",
        });
        let (status, v) = self.post("/api/v1/auth/register", None, &body).await?;
        if status != 201 && status != 200 {
            bail!("register {username}: HTTP {status}: {v}");
        }
        let id =
            id_string(&v["user"]["id"]).ok_or_else(|| anyhow!("register: no user.id in {v}"))?;
        let token = v["access_token"]
            .as_str()
            .ok_or_else(|| anyhow!("register: no access_token in {v}"))?
            .to_string();
        Ok(User { id, token })
    }

    /// Registers `n` users named `{prefix}{i}`, `concurrency` at a time, in order.
    pub async fn register_many(
        &self,
        prefix: &str,
        n: usize,
        concurrency: usize,
    ) -> Result<Vec<User>> {
        stream::iter(0..n)
            .map(|i| {
                let name = format!("{prefix}{i}");
                async move { self.register(&name).await }
            })
            .buffered(concurrency.max(1))
            .try_collect()
            .await
    }

    pub async fn direct_room(&self, token: &str, peer: &str) -> Result<String> {
        let (status, v) = self
            .post(
                "/api/v1/rooms",
                Some(token),
                &json!({"kind": "direct", "peer": peer}),
            )
            .await?;
        if status != 201 && status != 200 {
            bail!("create direct room: HTTP {status}: {v}");
        }
        room_id(&v)
    }

    pub async fn group_room(&self, token: &str, name: &str, members: &[String]) -> Result<String> {
        let (status, v) = self
            .post(
                "/api/v1/rooms",
                Some(token),
                &json!({"kind": "group", "name": name, "members": members}),
            )
            .await?;
        if status != 201 && status != 200 {
            bail!("create group room: HTTP {status}: {v}");
        }
        room_id(&v)
    }
}

/// The room may come bare or wrapped as `{room: {...}}`.
fn room_id(v: &Value) -> Result<String> {
    id_string(&v["id"])
        .or_else(|| id_string(&v["room"]["id"]))
        .ok_or_else(|| anyhow!("create room: no id in {v}"))
}

fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A short random run id so that usernames never collide across runs.
pub fn run_id() -> String {
    use rand::Rng;
    const ALPHA: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..6)
        .map(|_| ALPHA[rng.random_range(0..ALPHA.len())] as char)
        .collect()
}
