//! chatd: a real-time chat backend. One binary runs a whole chat service on
//! a laptop (SQLite store, in-process broker); the same binary scales out to
//! a cluster sharing a store and RabbitMQ.
//!
//! Module map:
//!
//! - [`domain`]: newtypes that parse at the edge (`UserId`, `Username`,
//!   `MessageBody`, ...); past the edge values are valid by construction.
//! - [`config`]: layered settings (`config.toml`, `--config FILE`,
//!   `CHAT__SECTION__KEY`).
//! - [`store`]: async traits per aggregate (users, auth, rooms, messages),
//!   the SQLite backend with group commit, the MongoDB backend
//!   (transactions), export/import between them, and the contract suite
//!   every backend passes; `store::lifecycle` is what an edit, delete or
//!   reaction does to a message (docs/lifecycle.md).
//! - [`blobs`]: attachments: bytes and metadata behind one trait (files
//!   under the data directory, or GridFS with MongoDB), upload checks, the
//!   sweeper of unattached uploads, and the contract suite.
//! - [`broker`]: the bus between nodes (one trait; in-process and RabbitMQ
//!   backends).
//! - [`actors`]: the ractor tree: root supervisor, session supervisor with a
//!   `UserSession` per connected user, room supervisor with a `Room` per
//!   active room (store → ack → fan-out pipeline), the broker bridge;
//!   `actors::lifecycle` applies message changes in the room actor.
//! - [`cluster`]: the node table, the user → node directory, the `Presence`
//!   view, and the wire types the bus carries.
//! - [`roles`]: the admin role (stored with the user; operator grants it,
//!   `admin.usernames` only for accounts existing at start).
//! - [`protocol`]: the WebSocket frames of the contract.
//! - [`socket`]: a socket's bounded outbound queue, its closer, the close
//!   codes, the per-node socket registry (per-user cap, connection gauge)
//!   and the pipeline drain, shared by actors and api.
//! - [`auth`]: argon2id, JWT access tokens, rotating refresh tokens, login limiter.
//! - [`api`]: axum routers (`auth`, `users`, `rooms`, `ws`, `admin`, health)
//!   and the one error type; `api::socket` is the socket layer shared by
//!   `/ws` and Socket.IO (frame dispatch, one file per frame kind, the
//!   transport loops).
//! - [`notify`]: the notification pool (ractor factory keyed by user), its
//!   policy (push when online, else a collapsed e-mail), FCM and SMTP senders.
//! - [`telemetry`]: logs and the Prometheus recorder.
//! - [`app`]: building, running and draining a node.

pub mod actors;
pub mod api;
pub mod app;
pub mod auth;
pub mod blobs;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod notify;
pub mod protocol;
pub mod roles;
pub mod socket;
pub mod store;
pub mod telemetry;

pub use app::{Application, StartError};
pub use config::Settings;
