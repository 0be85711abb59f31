//! Opening WebSockets to the server, optionally from several loopback source addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

pub struct Dialer {
    addr: SocketAddr,
    authority: String,
    sources: Vec<IpAddr>,
    next: AtomicUsize,
    read_buffer: usize,
}

impl Dialer {
    /// `target` is the server's base URL (`http://host:port`).
    pub async fn new(target: &str, sources: &[IpAddr], read_buffer: usize) -> Result<Self> {
        let rest = target
            .strip_prefix("http://")
            .or_else(|| target.strip_prefix("ws://"))
            .ok_or_else(|| anyhow!("--target must be http://host:port (got {target})"))?;
        let authority = rest.split('/').next().unwrap_or(rest).to_string();
        let addr = tokio::net::lookup_host(&authority)
            .await
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .ok_or_else(|| anyhow!("{authority} resolves to nothing"))?;
        Ok(Dialer {
            addr,
            authority,
            sources: sources.to_vec(),
            next: AtomicUsize::new(0),
            read_buffer,
        })
    }

    /// Opens `/ws?access_token=...` and waits for the `ready` frame.
    pub async fn connect(&self, token: &str) -> Result<Ws> {
        let sock = if self.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if !self.sources.is_empty() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            let src = SocketAddr::new(self.sources[i], 0);
            sock.bind(src)
                .with_context(|| format!("binding a client socket to {src}"))?;
        }
        let stream = sock
            .connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let url = format!("ws://{}/ws?access_token={}", self.authority, token);
        let config = WebSocketConfig::default().read_buffer_size(self.read_buffer);
        let (mut ws, _resp) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                .await
                .context("WebSocket handshake")?;
        let first = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .map_err(|_| anyhow!("no ready frame within 30 s"))?;
        match first {
            Some(Ok(Message::Text(t))) => {
                #[derive(Deserialize)]
                struct T<'a> {
                    #[serde(rename = "type")]
                    ty: &'a str,
                }
                match serde_json::from_str::<T>(t.as_str()) {
                    Ok(T { ty: "ready" }) => Ok(ws),
                    _ => bail!("first frame is not ready: {}", t.as_str()),
                }
            }
            Some(Ok(other)) => bail!("first frame is not text: {other:?}"),
            Some(Err(e)) => Err(e).context("reading the ready frame"),
            None => bail!("socket closed before ready"),
        }
    }
}
