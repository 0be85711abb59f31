//! A cluster of real `chatd` processes on loopback for the tests: one shared
//! SQLite file (WAL), the real RabbitMQ (`CHAT_TEST_AMQP_URI`, default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), a prefix and node ids of its
//! own so tests run in parallel with others against one broker, and
//! WebSocket/HTTP clients. Dropping a [`Cluster`] kills its processes and
//! deletes its exchanges and queues.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The broker the tests use.
pub fn amqp_uri() -> String {
    std::env::var("CHAT_TEST_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `host:port` of the test broker.
pub fn amqp_host() -> String {
    let uri = amqp_uri();
    let rest = uri.split("://").nth(1).unwrap_or("127.0.0.1:5672");
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    }
}

/// A random lowercase suffix.
pub fn rand_id(len: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..len].to_owned()
}

/// A free loopback port for a server to bind later. It is taken below the
/// kernel's ephemeral range (32768 and up here), where outgoing connections
/// of every process would otherwise grab it in between.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 15_000 + (rand::random::<u16>() % 17_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// Heartbeat and node timeout the test nodes run with (seconds).
pub const HEARTBEAT_SECS: u64 = 1;
pub const NODE_TIMEOUT_SECS: u64 = 3;

/// One chatd process.
pub struct Node {
    pub id: String,
    pub port: u16,
    pub amqp: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

/// Several nodes sharing a store and a broker prefix.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub secret: String,
    pub nodes: Vec<Node>,
    pub http: reqwest::Client,
    /// Node ids ever started (their queues are deleted at the end).
    started: Vec<String>,
    /// `cluster.node_timeout_secs` of nodes started from now on.
    pub node_timeout_secs: u64,
    /// The username with the admin role on every node.
    pub admin_name: String,
}

impl Cluster {
    /// An empty cluster with a fresh store and prefix. Panics with a clear
    /// message when the test broker is not reachable (the tests never pass
    /// without it).
    pub fn new() -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let host = amqp_host();
        let reachable = std::net::ToSocketAddrs::to_socket_addrs(host.as_str())
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| {
                std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
            });
        assert!(
            reachable,
            "RabbitMQ is not reachable at {host}: start it (`rabbitmq-server -detached`; \
             scripts/test.sh does) or point CHAT_TEST_AMQP_URI at one"
        );
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            prefix: format!("chatd-test-{}", rand_id(10)),
            secret: format!("test-secret-{}", rand_id(24)),
            nodes: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("http client"),
            started: Vec::new(),
            node_timeout_secs: NODE_TIMEOUT_SECS,
            admin_name: format!("admin_{}", rand_id(8)),
        }
    }

    /// The shared SQLite file.
    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("chatd.db")
    }

    /// Starts a node that reaches RabbitMQ at `amqp` (None: the test broker)
    /// and returns its index; see [`Cluster::wait_ready`].
    pub fn spawn_node(&mut self, amqp: Option<String>) -> usize {
        let id = format!("n{}-{}", self.nodes.len(), rand_id(6));
        let port = free_port();
        let amqp = amqp.unwrap_or_else(amqp_uri);
        let mut node = Node {
            id,
            port,
            amqp,
            child: None,
            log: PathBuf::new(),
        };
        self.launch(&mut node);
        self.started.push(node.id.clone());
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn launch(&self, node: &mut Node) {
        let log = self
            .dir
            .path()
            .join(format!("{}-{}.log", node.id, rand_id(4)));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_chatd"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("CHAT_TEST_NODE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("CHAT__NODE__ID", &node.id)
            .env("CHAT__HTTP__LISTEN", format!("127.0.0.1:{}", node.port))
            .env("CHAT__STORE__KIND", "sqlite")
            .env("CHAT__STORE__SQLITE__PATH", self.db_path())
            .env("CHAT__STORE__SQLITE__SYNCHRONOUS", "normal")
            .env("CHAT__BROKER__KIND", "rabbitmq")
            .env("CHAT__BROKER__RABBITMQ__URI", &node.amqp)
            .env("CHAT__BROKER__RABBITMQ__PREFIX", &self.prefix)
            .env("CHAT__BROKER__RABBITMQ__QUEUE_EXPIRES_SECS", "60")
            .env("CHAT__CLUSTER__HEARTBEAT_SECS", HEARTBEAT_SECS.to_string())
            .env(
                "CHAT__CLUSTER__NODE_TIMEOUT_SECS",
                self.node_timeout_secs.to_string(),
            )
            .env("CHAT__AUTH__JWT_SECRET", &self.secret)
            .env("CHAT__AUTH__HASH_CONCURRENCY", "4")
            .env("CHAT__AUTH__LOGIN_MAX_FAILURES", "1000")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn chatd");
        node.child = Some(child);
        node.log = log;
    }

    /// Restarts a stopped node with the same id and port.
    pub fn restart(&mut self, i: usize) {
        let mut node = std::mem::replace(
            &mut self.nodes[i],
            Node {
                id: String::new(),
                port: 0,
                amqp: String::new(),
                child: None,
                log: PathBuf::new(),
            },
        );
        self.launch(&mut node);
        self.nodes[i] = node;
    }

    /// Polls `/readyz` of node `i` until it answers 200.
    pub async fn wait_ready(&mut self, i: usize) -> Result<()> {
        let url = format!("{}/readyz", self.nodes[i].base());
        self.poll_status(i, &url, 200, Duration::from_secs(60))
            .await
            .with_context(|| format!("node {} never became ready", self.nodes[i].id))
    }

    /// Polls `url` (on node `i`) until it answers `status`.
    pub async fn poll_status(
        &mut self,
        i: usize,
        url: &str,
        status: u16,
        within: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    bail!("node exited with {st}: {}", self.log_tail(i));
                }
            }
            if let Ok(r) = self.http.get(url).send().await {
                if r.status().as_u16() == status {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{url} did not answer {status} in {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts `n` nodes and waits until all are ready.
    pub async fn start(n: usize) -> Result<Self> {
        let mut c = Self::new();
        for _ in 0..n {
            c.spawn_node(None);
        }
        for i in 0..n {
            c.wait_ready(i).await?;
        }
        Ok(c)
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs node `i` and waits for it to exit.
    pub fn terminate(&mut self, i: usize) -> Result<std::process::ExitStatus> {
        let mut c = self.nodes[i]
            .child
            .take()
            .ok_or_else(|| anyhow!("not running"))?;
        let st = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status()?;
        if !st.success() {
            bail!("kill -TERM failed");
        }
        Ok(c.wait()?)
    }

    /// The end of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Registers a user through node `i`.
    pub async fn register(&self, i: usize, name: &str) -> Result<User> {
        register(&self.http, &self.nodes[i].base(), name).await
    }

    /// Registers the cluster's admin user at node `i`.
    pub async fn register_admin(&self, i: usize) -> Result<User> {
        let username = self.admin_name.clone();
        let r = self
            .http
            .post(format!("{}/api/v1/auth/register", self.nodes[i].base()))
            .json(&json!({
                "username": username,
                "email": format!("{username}@example.com"),
                "password": "correct horse battery",
            }))
            .send()
            .await?;
        let v: Value = r.json().await?;
        // The role is granted by the operator's command, on the shared store.
        let out = Command::new(env!("CARGO_BIN_EXE_chatd"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CHAT__STORE__KIND", "sqlite")
            .env("CHAT__STORE__SQLITE__PATH", self.db_path())
            .args(["admin", "grant", &username])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "chatd admin grant failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(User {
            id: v["user"]["id"].as_str().unwrap_or_default().to_owned(),
            username,
            token: v["access_token"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// Names of this cluster's broker objects.
    pub fn queues(&self) -> Vec<String> {
        let mut q: Vec<String> = self
            .started
            .iter()
            .map(|id| format!("{}.node.{id}", self.prefix))
            .collect();
        q.push(format!("{}.notify", self.prefix));
        q
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            for (i, n) in self.nodes.iter().enumerate() {
                eprintln!("---- log of node {} ----\n{}", n.id, self.log_tail(i));
            }
        }
        let queues = self.queues();
        let exchanges = vec![
            format!("{}.cluster", self.prefix),
            format!("{}.notify", self.prefix),
        ];
        // Drop may run inside a runtime: clean up from a thread of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(delete_broker_objects(queues, exchanges));
        })
        .join();
    }
}

/// Deletes queues and exchanges (each on its own channel: a missing one
/// closes the channel it was asked on).
pub async fn delete_broker_objects(queues: Vec<String>, exchanges: Vec<String>) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let Ok(Ok(conn)) = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(&amqp_uri(), lapin::ConnectionProperties::default()),
    )
    .await
    else {
        return;
    };
    for q in queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    for x in exchanges {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "test cleanup".into()).await;
}

/// Whether a queue exists on the broker.
pub async fn queue_exists(name: &str) -> Result<bool> {
    use lapin::options::QueueDeclareOptions;
    let conn =
        lapin::Connection::connect(&amqp_uri(), lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let r = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    let _ = conn.close(200, "probe".into()).await;
    Ok(r.is_ok())
}

/// A registered user.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub token: String,
}

/// Registers a user at `base`.
pub async fn register(http: &reqwest::Client, base: &str, name: &str) -> Result<User> {
    let username = format!("{name}_{}", rand_id(8));
    let r = http
        .post(format!("{base}/api/v1/auth/register"))
        .json(&json!({
            "username": username,
            "email": format!("{username}@example.com"),
            "password": "correct horse battery",
        }))
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    if status.as_u16() != 201 {
        bail!("register {username}: {status} {v}");
    }
    Ok(User {
        id: v["user"]["id"].as_str().unwrap_or_default().to_owned(),
        username,
        token: v["access_token"].as_str().unwrap_or_default().to_owned(),
    })
}

/// Creates (or finds) the direct room of `a` and `b` at `base`.
pub async fn direct_room(http: &reqwest::Client, base: &str, a: &User, b: &User) -> Result<String> {
    let r = http
        .post(format!("{base}/api/v1/rooms"))
        .bearer_auth(&a.token)
        .json(&json!({"kind": "direct", "peer": b.id}))
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    if !status.is_success() {
        bail!("create room: {status} {v}");
    }
    Ok(v["id"].as_str().unwrap_or_default().to_owned())
}

/// Creates a group room owned by `owner` with `members`.
pub async fn group_room(
    http: &reqwest::Client,
    base: &str,
    owner: &User,
    members: &[&User],
) -> Result<String> {
    let ids: Vec<&str> = members.iter().map(|u| u.id.as_str()).collect();
    let r = http
        .post(format!("{base}/api/v1/rooms"))
        .bearer_auth(&owner.token)
        .json(&json!({"kind": "group", "name": "cluster test", "members": ids}))
        .send()
        .await?;
    let status = r.status();
    let v: Value = r.json().await?;
    if !status.is_success() {
        bail!("create group: {status} {v}");
    }
    Ok(v["id"].as_str().unwrap_or_default().to_owned())
}

/// One WebSocket connection; a reader task records every frame.
pub struct Client {
    pub user: User,
    pub ready: Value,
    out: mpsc::UnboundedSender<WsMessage>,
    frames: Arc<Mutex<Vec<Value>>>,
    seen: watch::Receiver<usize>,
    closed: watch::Receiver<bool>,
    answered: Arc<std::sync::atomic::AtomicUsize>,
}

impl Client {
    /// Connects to `host:port` (a node or the load balancer) as `user` and
    /// waits for `ready`.
    pub async fn connect(addr: &str, user: &User) -> Result<Client> {
        let url = format!("ws://{addr}/ws?access_token={}", user.token);
        let (ws, _) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(url),
        )
        .await
        .context("ws connect timed out")??;
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<WsMessage>();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let (seen_tx, seen) = watch::channel(0usize);
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let f = frames.clone();
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = answered.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if let WsMessage::Text(t) = m {
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                        if v["type"] == "ack" || v["type"] == "error" {
                            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        let n = {
                            let mut g = f.lock().unwrap();
                            g.push(v);
                            g.len()
                        };
                        let _ = seen_tx.send(n);
                    }
                } else if let WsMessage::Close(frame) = m {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    f.lock()
                        .unwrap()
                        .push(json!({"type": "_closed", "code": code}));
                    break;
                }
            }
            let _ = closed_tx.send(true);
        });
        let mut c = Client {
            user: user.clone(),
            ready: Value::Null,
            out,
            frames,
            seen,
            closed,
            answered,
        };
        c.ready = c
            .wait_for(Duration::from_secs(15), |f| f["type"] == "ready")
            .await
            .context("no ready frame")?;
        Ok(c)
    }

    /// The node this socket landed on.
    pub fn node_id(&self) -> String {
        self.ready["node_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Sends one JSON frame.
    pub fn send(&self, v: Value) {
        let _ = self.out.send(WsMessage::Text(v.to_string().into()));
    }

    /// Sends a message.
    pub fn say(&self, room: &str, cmid: &str, body: &str) {
        self.send(json!({"type": "send", "room_id": room, "client_msg_id": cmid, "body": body}));
    }

    /// Closes the socket.
    pub fn close(&self) {
        let _ = self.out.send(WsMessage::Close(None));
    }

    /// Whether the server closed the socket.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Waits until the socket is closed.
    pub async fn wait_closed(&self, within: Duration) -> Result<()> {
        let mut c = self.closed.clone();
        tokio::time::timeout(within, c.wait_for(|v| *v))
            .await
            .context("socket did not close")?
            .map_err(|_| anyhow!("closed watch dropped"))?;
        Ok(())
    }

    /// Every frame so far.
    pub fn frames(&self) -> Vec<Value> {
        self.frames.lock().unwrap().clone()
    }

    /// Waits for the first frame (from the start) matching `pred`.
    pub async fn wait_for(&self, within: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        self.wait_until(within, |fs| fs.iter().find(|f| pred(f)).cloned())
            .await
    }

    /// Waits until `check` over all frames so far gives an answer.
    pub async fn wait_until<T>(
        &self,
        within: Duration,
        check: impl Fn(&[Value]) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = self.seen.clone();
        loop {
            {
                let g = self.frames.lock().unwrap();
                if let Some(t) = check(&g) {
                    return Ok(t);
                }
            }
            match tokio::time::timeout_at(deadline, seen.changed()).await {
                Err(_) => bail!("timed out after {within:?}"),
                Ok(Err(_)) => {
                    // The reader ended: one last look.
                    let g = self.frames.lock().unwrap();
                    return check(&g).ok_or_else(|| anyhow!("socket closed"));
                }
                Ok(Ok(())) => {}
            }
        }
    }

    /// Message frames of `room`, in arrival order.
    pub fn messages(&self, room: &str) -> Vec<Value> {
        self.frames()
            .into_iter()
            .filter(|f| f["type"] == "message" && f["room_id"] == room)
            .collect()
    }

    /// Ids of messages of `room` received so far.
    pub fn message_ids(&self, room: &str) -> HashSet<String> {
        self.messages(room)
            .iter()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect()
    }

    /// Acks so far by client_msg_id → message id.
    pub fn acks(&self) -> HashMap<String, Value> {
        self.frames()
            .into_iter()
            .filter(|f| f["type"] == "ack")
            .filter_map(|f| Some((f["client_msg_id"].as_str()?.to_owned(), f)))
            .collect()
    }

    /// Acks and errors received so far.
    pub fn answered(&self) -> usize {
        self.answered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sends `n` messages `{tag}{i}` as fast as the server answers, with at
    /// most `window` unanswered; stops when the socket closes. Returns how
    /// many were sent (see [`Client::acks`] for what was acked).
    pub async fn send_window(&self, room: &str, tag: &str, n: usize, window: usize) -> usize {
        let base = self.answered();
        let mut seen = self.seen.clone();
        for i in 0..n {
            while i - (self.answered() - base).min(i) >= window {
                if self.is_closed() {
                    return i;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), seen.changed()).await;
            }
            if self.is_closed() {
                return i;
            }
            self.say(room, &format!("{tag}{i}"), &format!("{tag} number {i}"));
        }
        // Wait for the last answers (or the end of the socket).
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.answered() - base < n && !self.is_closed() && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(200), seen.changed()).await;
        }
        n
    }

    /// Sends a message and waits for its ack; returns the ack.
    pub async fn send_acked(&self, room: &str, cmid: &str, body: &str) -> Result<Value> {
        self.say(room, cmid, body);
        self.wait_for(Duration::from_secs(10), |f| {
            (f["type"] == "ack" || f["type"] == "error") && f["client_msg_id"] == cmid
                || (f["type"] == "error" && f["ref"] == cmid)
        })
        .await
        .and_then(|f| {
            if f["type"] == "ack" {
                Ok(f)
            } else {
                Err(anyhow!("send refused: {f}"))
            }
        })
    }
}

/// A user who keeps chatting like a real client: sends `n` messages
/// `{tag}{i}` with at most `window` unanswered, and when the socket closes
/// (slow-consumer 4008, a dead node) reconnects to the first address that
/// answers and resends what was not acked (resends are idempotent by
/// `client_msg_id`).
pub struct Chatter {
    pub user: User,
    pub room: String,
    pub tag: String,
    pub addrs: Mutex<Vec<String>>,
    pub clients: Mutex<Vec<Arc<Client>>>,
}

impl Chatter {
    /// A chatter that connects to `addrs` in order of preference.
    pub fn new(user: &User, room: &str, tag: &str, addrs: Vec<String>) -> Arc<Chatter> {
        Arc::new(Chatter {
            user: user.clone(),
            room: room.to_owned(),
            tag: tag.to_owned(),
            addrs: Mutex::new(addrs),
            clients: Mutex::new(Vec::new()),
        })
    }

    /// Every socket so far.
    pub fn all(&self) -> Vec<Arc<Client>> {
        self.clients.lock().unwrap().clone()
    }

    /// Acks and errors over all sockets.
    pub fn answered(&self) -> usize {
        self.all().iter().map(|c| c.answered()).sum()
    }

    /// Acked client_msg_ids → message ids, over all sockets.
    pub fn acked(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for c in self.all() {
            for (cmid, a) in c.acks() {
                if let Some(id) = a["message_id"].as_str() {
                    out.insert(cmid, id.to_owned());
                }
            }
        }
        out
    }

    /// Ids of `room`'s messages received over all sockets.
    pub fn received(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        for c in self.all() {
            out.extend(c.message_ids(&self.room));
        }
        out
    }

    /// Connects to the first address that answers.
    pub async fn connect(&self) -> Result<Arc<Client>> {
        let addrs = self.addrs.lock().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for a in &addrs {
                if let Ok(c) = Client::connect(a, &self.user).await {
                    let c = Arc::new(c);
                    self.clients.lock().unwrap().push(c.clone());
                    return Ok(c);
                }
            }
            if Instant::now() > deadline {
                bail!("{} could not reconnect to {addrs:?}", self.user.username);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends everything, reconnecting as needed; returns how many were acked.
    pub async fn run(self: Arc<Self>, n: usize, window: usize) -> Result<usize> {
        loop {
            let acked = self.acked();
            let todo: Vec<usize> = (0..n)
                .filter(|i| !acked.contains_key(&format!("{}{i}", self.tag)))
                .collect();
            if todo.is_empty() {
                return Ok(n);
            }
            let current = self.all().last().cloned();
            let client = match current {
                Some(c) if !c.is_closed() => c,
                _ => self.connect().await?,
            };
            client
                .send_indices(&self.room, &self.tag, &todo, window)
                .await;
            if !client.is_closed() {
                // Everything answered: refusals would loop, so stop here.
                return Ok(self.acked().len());
            }
        }
    }
}

impl Client {
    /// Like [`Client::send_window`] for the given message numbers.
    pub async fn send_indices(&self, room: &str, tag: &str, indices: &[usize], window: usize) {
        let base = self.answered();
        let mut seen = self.seen.clone();
        for (k, i) in indices.iter().enumerate() {
            while k - (self.answered() - base).min(k) >= window {
                if self.is_closed() {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(200), seen.changed()).await;
            }
            if self.is_closed() {
                return;
            }
            self.say(room, &format!("{tag}{i}"), &format!("{tag} number {i}"));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.answered() - base < indices.len()
            && !self.is_closed()
            && Instant::now() < deadline
        {
            let _ = tokio::time::timeout(Duration::from_millis(200), seen.changed()).await;
        }
    }

    /// Close codes the server sent.
    pub fn close_codes(&self) -> Vec<u64> {
        self.frames()
            .iter()
            .filter(|f| f["type"] == "_closed")
            .filter_map(|f| f["code"].as_u64())
            .collect()
    }
}

/// Checks that the socket got `room`'s messages in strictly increasing
/// `seq` once duplicates are dropped by id.
pub fn assert_in_order(c: &Client, room: &str) {
    let mut seen = HashSet::new();
    let mut last = 0i64;
    for m in c.messages(room) {
        let id = m["id"].as_str().unwrap_or_default().to_owned();
        if !seen.insert(id) {
            continue;
        }
        let seq = m["seq"].as_i64().unwrap_or_default();
        assert!(
            seq > last,
            "{} got seq {seq} after {last} in room {room}",
            c.user.username
        );
        last = seq;
    }
}

/// A TCP proxy in front of RabbitMQ whose link the test can cut: an outage
/// of one node's broker connection that leaves every other client alone.
pub struct CutProxy {
    pub port: u16,
    up: watch::Sender<bool>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: String) -> Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (up, up_rx) = watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if !*up_rx.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut = up_rx.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(CutProxy { port, up })
    }

    /// The AMQP URI through this proxy.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Drops every proxied connection and refuses new ones.
    pub fn cut(&self) {
        let _ = self.up.send(false);
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        let _ = self.up.send(true);
    }
}

/// Closes, from the broker's side, the AMQP connections of the given nodes
/// (`rabbitmqctl close_connection`), leaving other clients alone.
pub fn close_broker_connections(node_ids: &[String]) -> Result<usize> {
    let out = Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .context("rabbitmqctl list_connections")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines() {
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        if node_ids
            .iter()
            .any(|id| line.contains(&format!("chatd node {id}")))
        {
            let st = Command::new("rabbitmqctl")
                .args(["-q", "close_connection", pid, "cluster test cuts the link"])
                .status()?;
            if st.success() {
                closed += 1;
            }
        }
    }
    Ok(closed)
}
