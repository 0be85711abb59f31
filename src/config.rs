//! Layered configuration: the `config.toml` shipped in the binary, then an
//! optional file named on the command line, then `CHAT__SECTION__KEY`
//! environment variables (`__` separates levels). Secrets are never logged.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

use crate::domain::Limits;

/// The defaults, identical to the repository's `config.toml`.
pub const DEFAULTS: &str = include_str!("../config.toml");

/// Everything chatd reads at start.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Settings {
    pub node: NodeConfig,
    pub http: HttpConfig,
    pub ws: WsConfig,
    pub socketio: SocketIoConfig,
    pub store: StoreConfig,
    pub broker: BrokerConfig,
    pub cluster: ClusterConfig,
    pub auth: AuthConfig,
    pub admin: AdminConfig,
    pub rooms: RoomsConfig,
    pub limits: Limits,
    pub log: LogConfig,
    pub notify: NotifyConfig,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NodeConfig {
    #[serde(deserialize_with = "string_like")]
    pub id: String,
    pub role: NodeRole,
}

/// `node.role`: what a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Chat (HTTP, sockets, actors) and the notification pool.
    All,
    /// Chat only; notifications are left to `notifier` nodes.
    Chat,
    /// The notification pool (plus HTTP for health and admin).
    Notifier,
}

impl NodeRole {
    /// The name used in config files and the environment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Chat => "chat",
            Self::Notifier => "notifier",
        }
    }
}

/// `store.kind`: the storage backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded SQLite file (`store.sqlite`).
    Sqlite,
    /// MongoDB (`store.mongodb`).
    Mongodb,
}

impl StoreKind {
    /// The name used in config files and the environment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Mongodb => "mongodb",
        }
    }
}

/// `broker.kind`: how nodes exchange events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// One node, events stay in the process.
    #[serde(alias = "in-process", alias = "memory")]
    InProcess,
    /// A cluster over RabbitMQ (`broker.rabbitmq`).
    #[serde(alias = "amqp")]
    RabbitMq,
}

impl BrokerKind {
    /// The name used in config files and the environment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProcess => "inprocess",
            Self::RabbitMq => "rabbitmq",
        }
    }

    /// Whether other nodes may exist (events can cross processes).
    pub fn spans_nodes(self) -> bool {
        self != Self::InProcess
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(NodeRole, StoreKind, BrokerKind);

/// `[http]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpConfig {
    #[serde(deserialize_with = "string_like")]
    pub listen: String,
    pub max_body_bytes: usize,
    /// Longest time to receive a request's header (from its first byte, or
    /// from the end of the previous response on a kept-alive connection).
    pub header_read_timeout_secs: u64,
    /// Longest wait for the next bytes of a request body.
    pub body_read_timeout_secs: u64,
    /// A connection with no request in progress and no bytes moving for
    /// this long is closed.
    pub idle_timeout_secs: u64,
    /// Most open HTTP connections (upgraded sockets included); more are
    /// answered 503 and closed.
    pub max_connections: usize,
}

/// `[ws]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WsConfig {
    pub max_frame_bytes: usize,
    pub outbound_queue: usize,
    pub read_buffer_bytes: usize,
    pub write_buffer_bytes: usize,
    /// Most bytes tungstenite buffers for one socket's output.
    pub max_write_buffer_bytes: usize,
    pub idle_timeout_secs: u64,
    /// A write that waits this long for the client closes the socket (4008).
    pub write_timeout_ms: u64,
    /// Bound on sending a close and on waiting for the client's reply.
    pub close_timeout_ms: u64,
    /// Sockets (`/ws` and Socket.IO) of one user on one node; 0: no cap.
    pub max_sockets_per_user: usize,
}

/// `[socketio]`: Engine.IO/Socket.IO timers and sizes.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SocketIoConfig {
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub max_payload_bytes: u64,
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub sqlite: SqliteConfig,
    pub mongodb: MongoConfig,
}

/// `[store.sqlite]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SqliteConfig {
    #[serde(deserialize_with = "string_like")]
    pub path: String,
    pub synchronous: String,
    pub max_batch: usize,
}

/// `[store.mongodb]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MongoConfig {
    #[serde(serialize_with = "redact")]
    pub uri: String,
    #[serde(deserialize_with = "string_like")]
    pub database: String,
    /// `w`: "majority", a number of nodes, or a tag set name.
    pub write_concern: String,
    /// `j`: wait for the journal.
    pub journal: bool,
    /// `wtimeout` in ms; 0 waits forever.
    pub write_timeout_ms: u64,
}

/// `[broker]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BrokerConfig {
    pub kind: BrokerKind,
    pub rabbitmq: RabbitConfig,
}

/// `[broker.rabbitmq]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RabbitConfig {
    #[serde(serialize_with = "redact")]
    pub uri: String,
    pub prefetch: u16,
    pub notify_prefetch: u16,
    pub prefix: String,
    pub queue_expires_secs: u64,
    pub confirm_timeout_ms: u64,
}

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ClusterConfig {
    pub heartbeat_secs: u64,
    pub node_timeout_secs: u64,
}

/// `[auth]`.
#[derive(Clone, Deserialize, Serialize)]
pub struct AuthConfig {
    #[serde(serialize_with = "redact", deserialize_with = "string_like")]
    pub jwt_secret: String,
    pub access_ttl_secs: u64,
    pub refresh_ttl_secs: u64,
    pub login_max_failures: u32,
    pub login_window_secs: u64,
    /// Failed logins from one client address per its window before 429.
    pub login_address_max_failures: u32,
    pub login_address_window_secs: u64,
    pub hash_concurrency: usize,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("jwt_secret", &"***")
            .field("access_ttl_secs", &self.access_ttl_secs)
            .field("refresh_ttl_secs", &self.refresh_ttl_secs)
            .finish_non_exhaustive()
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AdminConfig {
    #[serde(deserialize_with = "string_or_list")]
    pub usernames: Vec<String>,
}

/// `[rooms]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RoomsConfig {
    pub idle_secs: u64,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogConfig {
    pub format: String,
}

/// `[notify]`: the notification pool (see docs/notifications.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NotifyConfig {
    pub workers: usize,
    pub online_window_secs: u64,
    pub email_window_secs: u64,
    pub preview: bool,
    pub preview_chars: usize,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub max_retry_after_secs: u64,
    pub requeue_delay_secs: u64,
    pub give_up_after_secs: u64,
    pub email_rate_per_sec: u32,
    pub max_in_flight: usize,
    pub fcm: FcmConfig,
    pub smtp: SmtpConfig,
}

/// `[notify.fcm]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FcmConfig {
    pub service_account_path: String,
    pub project_id: String,
    pub token_url: String,
    pub base_url: String,
    pub timeout_secs: u64,
}

/// `[notify.smtp]`.
#[derive(Clone, Deserialize, Serialize)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: String,
    pub username: String,
    #[serde(serialize_with = "redact")]
    pub password: String,
    pub from: String,
    pub pool_size: u32,
    pub timeout_secs: u64,
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &"***")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

fn redact<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    if v.is_empty() {
        s.serialize_str("")
    } else {
        s.serialize_str("***")
    }
}

/// Accepts a string, or a number or boolean as its text: environment
/// values like `CHAT__NODE__ID=1` arrive typed.
fn string_like<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Scalar::deserialize(d)? {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
        Scalar::F(f) => f.to_string(),
        Scalar::B(b) => b.to_string(),
    })
}

/// Accepts `["a", "b"]` from TOML and `"a,b"` from the environment.
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Either::deserialize(d)? {
        Either::One(s) => s
            .split(',')
            .map(|x| x.trim().to_owned())
            .filter(|x| !x.is_empty())
            .collect(),
        Either::Many(v) => v,
    })
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Settings {
    /// Defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::figment(file)
            .extract()
            .map_err(|e| ConfigError(e.to_string()))
    }

    /// The layered sources, for callers that add their own on top (tests).
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut f = Figment::from(Toml::string(DEFAULTS));
        if let Some(p) = file {
            f = f.merge(Toml::file_exact(p));
        }
        // Values like "127.0.0.1:9000" or "alice,bob" stay strings; figment
        // would otherwise try to read "a,b" as an array only with brackets.
        f.merge(Env::prefixed("CHAT__").split("__").lowercase(true))
    }

    /// The defaults alone, ignoring the environment (tests start from here).
    pub fn defaults() -> Self {
        Figment::from(Toml::string(DEFAULTS))
            .extract()
            .expect("the embedded config.toml is valid")
    }

    /// Directory that holds the store file and generated secrets.
    pub fn data_dir(&self) -> PathBuf {
        Path::new(&self.store.sqlite.path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let s = Settings::defaults();
        assert_eq!(s.store.kind, StoreKind::Sqlite);
        assert_eq!(s.broker.kind, BrokerKind::InProcess);
        assert_eq!(s.node.role, NodeRole::All);
        assert_eq!(s.limits.body_max, 4000);
        assert!(s.admin.usernames.is_empty());
        assert!(s.notify.smtp.host.is_empty());
        assert_eq!(
            s.notify.fcm.token_url,
            "https://oauth2.googleapis.com/token"
        );
    }

    #[test]
    fn env_overrides_and_lists() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CHAT__HTTP__LISTEN", "127.0.0.1:9000");
            jail.set_env("CHAT__ADMIN__USERNAMES", "alice, bob");
            jail.set_env("CHAT__STORE__SQLITE__PATH", "/tmp/x.db");
            jail.set_env("CHAT__NODE__ID", "1");
            jail.set_env("CHAT__AUTH__JWT_SECRET", "123456");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.http.listen, "127.0.0.1:9000");
            assert_eq!(s.admin.usernames, vec!["alice", "bob"]);
            assert_eq!(s.store.sqlite.path, "/tmp/x.db");
            assert_eq!(s.node.id, "1");
            assert_eq!(s.auth.jwt_secret, "123456");
            Ok(())
        });
    }

    #[test]
    fn attachment_limits_default_and_come_from_env() {
        let d = Settings::defaults();
        assert_eq!(d.limits.attachment_max_bytes, 25 * 1024 * 1024);
        assert_eq!(d.limits.attachment_unattached_ttl_secs, 86_400);
        figment::Jail::expect_with(|jail| {
            jail.set_env("CHAT__LIMITS__ATTACHMENT_MAX_BYTES", "1048576");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.limits.attachment_max_bytes, 1_048_576);
            Ok(())
        });
    }

    #[test]
    fn file_layer_sits_between() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "extra.toml",
                "[http]\nlisten = \"0.0.0.0:1\"\n[rooms]\nidle_secs = 7\n",
            )?;
            jail.set_env("CHAT__HTTP__LISTEN", "127.0.0.1:2");
            let s = Settings::load(Some(Path::new("extra.toml"))).unwrap();
            assert_eq!(s.http.listen, "127.0.0.1:2");
            assert_eq!(s.rooms.idle_secs, 7);
            Ok(())
        });
    }

    #[test]
    fn kinds_parse_and_unknown_ones_are_named() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CHAT__STORE__KIND", "mongodb");
            jail.set_env("CHAT__BROKER__KIND", "amqp");
            jail.set_env("CHAT__NODE__ROLE", "notifier");
            let s = Settings::load(None).unwrap();
            assert_eq!(s.store.kind, StoreKind::Mongodb);
            assert_eq!(s.broker.kind, BrokerKind::RabbitMq);
            assert_eq!(s.node.role, NodeRole::Notifier);
            for (var, value, key) in [
                ("CHAT__STORE__KIND", "postgres", "store.kind"),
                ("CHAT__BROKER__KIND", "kafka", "broker.kind"),
                ("CHAT__NODE__ROLE", "everything", "node.role"),
            ] {
                jail.set_env(var, value);
                let e = Settings::load(None).unwrap_err().to_string();
                // figment names an environment key in capitals ("STORE.KIND").
                let lower = e.to_lowercase();
                assert!(lower.contains(value) && lower.contains(key), "{e}");
                jail.clear_env();
            }
            Ok(())
        });
    }

    #[test]
    fn secrets_do_not_print() {
        let mut s = Settings::defaults();
        s.auth.jwt_secret = "hunter2hunter2".into();
        s.notify.smtp.password = "hunter2hunter2".into();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&s).unwrap().contains("hunter2"));
    }
}
