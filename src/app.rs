//! Startup and shutdown of a node: open the store and broker, start the
//! actor tree, bind HTTP, and on shutdown stop reading sockets, let every
//! accepted message be stored and acked, then close. The accept loop with
//! its timeouts and connection cap is in `serve`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::actors::{root, Hub};
use crate::api::{self, AppState};
use crate::auth::AuthService;
use crate::config::Settings;

mod serve;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("broker: {0}")]
    Broker(#[from] crate::broker::BrokerError),
    #[error("cannot bind {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("secret: {0}")]
    Secret(std::io::Error),
    #[error("actors: {0}")]
    Actors(String),
    #[error(transparent)]
    Notify(#[from] crate::notify::StartError),
    #[error("attachments: {0}")]
    Blobs(#[from] crate::blobs::BlobError),
}

/// A built node, bound and ready to serve.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    state: AppState,
    root: ractor::ActorRef<()>,
    root_handle: tokio::task::JoinHandle<()>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Application {
    /// Opens everything the settings name and binds the listener.
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        crate::telemetry::init_metrics();
        let settings = Arc::new(settings);
        let listener = TcpListener::bind(&settings.http.listen)
            .await
            .map_err(|e| StartError::Bind(settings.http.listen.clone(), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Bind(settings.http.listen.clone(), e))?;
        let node_id = if settings.node.id.is_empty() {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "node".into());
            format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
        } else {
            settings.node.id.clone()
        };
        let secret = crate::auth::resolve_secret(&settings.auth.jwt_secret, &settings.data_dir())
            .map_err(StartError::Secret)?;
        let stores = crate::store::open(&settings.store).await?;
        crate::store::lifecycle::set_reaction_users_shown(settings.limits.reaction_users_shown);
        crate::roles::bootstrap(&*stores.users, &settings.admin.usernames).await?;
        let broker = crate::broker::open(&settings.broker, &node_id).await?;
        let blobs = crate::blobs::open(&settings).await?;
        let hub = Hub::new(settings.clone(), node_id, addr.to_string(), stores, broker);
        let (root, root_handle) = root::start(hub.clone())
            .await
            .map_err(|e| StartError::Actors(e.to_string()))?;
        let _ = hub.root.set(root.get_cell());
        let mut background = Vec::new();
        if matches!(
            settings.node.role,
            crate::config::NodeRole::All | crate::config::NodeRole::Notifier
        ) {
            background.push(crate::notify::start(hub.clone()).await?);
        }
        background.push(crate::blobs::sweeper::start(
            blobs.clone(),
            Duration::from_secs(settings.limits.attachment_unattached_ttl_secs),
            hub.shutdown.clone(),
        ));
        let auth = AuthService::new(&settings.auth, &secret);
        tracing::info!(node = %hub.node_id, %addr, store = hub.stores.health.backend(), broker = hub.broker.kind(), "chatd started");
        Ok(Self {
            listener,
            addr,
            state: AppState {
                stores: hub.stores.clone(),
                settings: hub.settings.clone(),
                hub,
                auth,
                blobs,
            },
            root,
            root_handle,
            background,
        })
    }

    /// The bound port (useful with port 0).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's shared context.
    pub fn hub(&self) -> Arc<Hub> {
        self.state.hub.clone()
    }

    /// Serves until `shutdown` resolves, then drains and stops.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let hub = self.state.hub.clone();
        let bounds = serve::Bounds::from_config(&hub.settings.http);
        let app = api::router(self.state);
        let stop = hub.shutdown.clone();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = stop.cancelled() => {}
                }
                stop.cancel();
            }
        });
        serve::serve(self.listener, app, bounds, stop.clone()).await;
        stop.cancel();
        tracing::info!("shutting down: draining room pipelines");
        // Rooms stop; their pipelines finish storing and acking what they accepted.
        if let Some(r) = hub.rooms.supervisor() {
            r.stop_children(Some("shutdown".into()));
        }
        hub.rooms.clear();
        hub.pipelines.close();
        crate::socket::drain(&hub.pipelines, "shutdown").await;
        hub.publish(
            crate::broker::Route::AllNodes,
            crate::broker::Event::NodeLeft {
                node: hub.node_id.clone(),
            },
        )
        .await;
        // Sockets close (1001) once their queued acks are written.
        for e in hub.sockets.iter() {
            for s in e.value() {
                s.close(crate::socket::CLOSE_GOING_AWAY, "server shutting down");
            }
        }
        self.root.stop(Some("shutdown".into()));
        let _ = tokio::time::timeout(Duration::from_secs(5), self.root_handle).await;
        // Leaving for good: the broker drops this node's queue and disconnects.
        hub.broker.close().await;
        for b in self.background {
            b.abort();
        }
        tracing::info!("chatd stopped");
        Ok(())
    }
}
