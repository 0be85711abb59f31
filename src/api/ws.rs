//! `GET /ws`: the WebSocket transport. The token is checked before the
//! upgrade (401 otherwise). After the upgrade the socket is admitted under
//! the per-user cap (else closed with 4009), a writer task pumps the
//! socket's bounded outbound queue into the sink (every write bounded by
//! `ws.write_timeout_ms`) and the read loop hands each text frame to the
//! dispatcher in [`super::socket`], which answers every mistake with an
//! `error` frame and keeps the socket open.

use std::sync::Arc;

use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, State};
use axum::http::request::Parts;
use axum::response::Response;
use futures_util::StreamExt;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::socket::transport::{pump, read_loop, Outlet, ReadEnd, WriteEnd, WriteLimits, WsOutlet};
use super::socket::{self, Ctx};
use super::{AppState, Error, ErrorBody};
use crate::auth::AuthUser;
use crate::socket::{
    CloseReason, SocketHandle, SocketRegistry, CLOSE_GOING_AWAY, CLOSE_TOO_MANY_SOCKETS,
};

/// The socket route.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(upgrade))
}

/// Opens the WebSocket; frames are described in docs/protocol.md.
#[utoipa::path(get, path = "/ws", tag = "socket",
    params(("access_token" = Option<String>, Query,
        description = "the access token, for browsers that cannot set `Authorization`")),
    security(("bearer" = []), ("access_token" = [])),
    responses(
        (status = 101, description = "switched to the WebSocket protocol; the first frame is `ready` (or a close with 4009 when the user holds `ws.max_sockets_per_user` sockets already)"),
        (status = 400, description = "not a WebSocket upgrade request (plain text)", body = String),
        (status = 401, description = "`unauthorized`: missing, invalid or expired token", body = ErrorBody),
    ))]
#[tracing::instrument(skip_all)]
async fn upgrade(
    State(st): State<AppState>,
    Extension(registry): Extension<Arc<SocketRegistry>>,
    parts: Parts,
    ws: WebSocketUpgrade,
) -> Result<Response, Error> {
    let token = super::bearer(&parts)
        .ok_or_else(|| Error::Unauthorized("unauthorized", "missing access token".into()))?;
    let user = st.auth.verify_access(&token).map_err(|_| {
        Error::Unauthorized("unauthorized", "invalid or expired access token".into())
    })?;
    let cfg = &st.settings.ws;
    // Small, explicit buffers: tungstenite holds at most this much of a
    // socket's output; beyond it writes wait (and time out) instead of
    // growing memory. A whole frame must fit, so the cap is at least one.
    let max_write = cfg
        .max_write_buffer_bytes
        .max(cfg.write_buffer_bytes + cfg.max_frame_bytes);
    Ok(ws
        .read_buffer_size(cfg.read_buffer_bytes)
        .write_buffer_size(cfg.write_buffer_bytes)
        .max_write_buffer_size(max_write)
        .max_message_size(cfg.max_frame_bytes)
        .max_frame_size(cfg.max_frame_bytes)
        .on_upgrade(move |socket| run(st, registry, user, socket)))
}

async fn run(st: AppState, registry: Arc<SocketRegistry>, user: AuthUser, socket: WebSocket) {
    let cfg = &st.settings.ws;
    let limits = WriteLimits::of(cfg);
    let (sink, mut stream) = socket.split();
    let mut out = WsOutlet(sink);
    // Held until the connection is dropped: the per-user count and the
    // `chatd_connections` gauge cannot drift whatever ends the socket.
    let _guard = match registry.admit(&user.id, cfg.max_sockets_per_user) {
        Ok(g) => g,
        Err(_) => {
            let reason = CloseReason {
                code: CLOSE_TOO_MANY_SOCKETS,
                reason: "too_many_sockets",
            };
            if let Ok(Ok(())) = tokio::time::timeout(limits.close, out.close(&reason)).await {
                finish_close(&mut stream, limits).await;
            }
            return;
        }
    };
    let (handle, mut inbox) = SocketHandle::new(user.id.clone(), cfg.outbound_queue);
    let writer = tokio::spawn({
        let handle = handle.clone();
        async move { pump(&mut out, &mut inbox, &handle, limits).await }
    });
    if let Err(e) = socket::attach(&st, &handle).await {
        tracing::warn!(error = %e, "could not attach socket");
        handle.close(1011, "server busy; reconnect");
    } else {
        let ctx = Ctx {
            st: &st,
            user: &user,
            handle: &handle,
        };
        let idle = std::time::Duration::from_secs(cfg.idle_timeout_secs.max(5));
        let end = read_loop(
            &mut stream,
            &handle,
            &st.hub.shutdown,
            idle,
            |t| async move { socket::on_text(ctx, t.as_str()).await },
        )
        .await;
        if end == ReadEnd::Shutdown {
            // Sends already accepted are stored and acked before the close.
            crate::socket::drain(&st.hub.pipelines, "a /ws socket").await;
            handle.close(CLOSE_GOING_AWAY, "server shutting down");
        }
    }
    socket::detach(&st, &handle);
    if !handle.is_closed() {
        handle.close(1000, "bye");
    }
    // A stalled writer gave up on the client: the connection is dropped
    // right here, without waiting for a closing handshake.
    if let Ok(WriteEnd::Closed) = writer.await {
        finish_close(&mut stream, limits).await;
    }
}

/// Finishes the closing handshake: reads (and discards) until the client's
/// Close, so unread client data does not turn our close into a reset that
/// would destroy the frames we just flushed. Bounded by the close timeout.
async fn finish_close<S>(stream: &mut S, limits: WriteLimits)
where
    S: futures_util::Stream<Item = Result<axum::extract::ws::Message, axum::Error>> + Unpin,
{
    let _ = tokio::time::timeout(limits.close, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}
