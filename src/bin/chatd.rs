//! The chatd server: reads config, starts telemetry, builds the node, waits
//! for SIGINT/SIGTERM. `chatd export` / `chatd import` move a whole store
//! (see `chatd::store::transfer`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

// jemalloc returns memory freed on other threads (glibc's per-thread arenas
// kept it: the SQLite writer allocates, runtime workers free, and every
// thread that hashed a password kept its own ~19 MiB arena).
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// chatd — a real-time chat backend; without a subcommand it starts the server.
///
/// Without a subcommand, chatd starts the server: it listens on
/// `http.listen` (default 127.0.0.1:8080) until Ctrl-C or SIGTERM.
#[derive(Parser)]
#[command(
    version,
    after_help = "Run without a subcommand to start the server. Configuration: config.toml defaults, \
                  then --config FILE, then CHAT__SECTION__KEY environment variables (docs/config.md)."
)]
struct Cli {
    /// Extra config file layered over the defaults (env vars CHAT__SECTION__KEY win).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Write the whole configured store as JSON lines (to FILE, or stdout).
    Export {
        /// File to write the export to (default: stdout).
        #[arg(long, short, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Load a JSON-lines export (from FILE, or stdin) into the configured
    /// store, which must be empty.
    Import {
        /// Export file to read (default: stdin).
        #[arg(value_name = "INPUT")]
        input: Option<PathBuf>,
    },
    /// The admin role of existing accounts, in the configured store (takes
    /// effect at once on running nodes).
    Admin {
        #[command(subcommand)]
        action: AdminAction,
    },
}

#[derive(Subcommand)]
enum AdminAction {
    /// Give USERNAME the admin role.
    Grant {
        /// An existing account's username.
        username: String,
    },
    /// Take the admin role from USERNAME.
    Revoke {
        /// An existing account's username.
        username: String,
    },
    /// List the accounts with the admin role.
    List,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let settings = chatd::Settings::load(cli.config.as_deref())?;
    match cli.command {
        Some(Command::Admin { action }) => return admin(action, &settings).await,
        Some(cmd) => return transfer(cmd, &settings).await,
        None => {}
    }
    chatd::telemetry::init_logs(settings.log.format == "json");
    // Everything runs on the runtime's workers; the main thread only waits.
    tokio::spawn(async move {
        let app = chatd::Application::build(settings).await?;
        app.run_until_stopped(shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(())
    })
    .await?
}

async fn transfer(cmd: Command, settings: &chatd::Settings) -> anyhow::Result<()> {
    use chatd::blobs::transfer::BlobTransfer;
    use chatd::store::transfer;
    use std::io::BufReader;
    // stdout may carry the export: logs go to stderr, warnings and worse.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let store = &settings.store;
    // Attachment files travel with the store's records.
    let blobs = chatd::blobs::transfer::open(settings).await?;
    let dump = || Some(Box::new(BlobTransfer(blobs.clone())) as Box<dyn transfer::Dump>);
    let load = || Some(Box::new(BlobTransfer(blobs.clone())) as Box<dyn transfer::Load>);
    let counts = match cmd {
        Command::Export { output: Some(p) } => {
            transfer::export_with(store, dump(), std::fs::File::create(p)?, true).await?
        }
        Command::Export { output: None } => {
            transfer::export_with(store, dump(), std::io::stdout(), true).await?
        }
        Command::Import { input: Some(p) } => {
            let f = std::fs::File::open(p)?;
            let size = f.metadata()?.len();
            transfer::import_with(store, load(), BufReader::new(f), Some(size), true).await?
        }
        Command::Import { input: None } => {
            let stdin = BufReader::new(std::io::stdin());
            transfer::import_with(store, load(), stdin, None, true).await?
        }
        Command::Admin { .. } => unreachable!("handled in main"),
    };
    eprintln!("{counts} (the {} store)", store.kind);
    Ok(())
}

async fn admin(action: AdminAction, settings: &chatd::Settings) -> anyhow::Result<()> {
    let stores = chatd::store::open(&settings.store).await?;
    let users = &*stores.users;
    let (name, grant) = match action {
        AdminAction::List => {
            for u in users.admins().await? {
                println!("{}", u.username.as_ref());
            }
            return Ok(());
        }
        AdminAction::Grant { username } => (username, true),
        AdminAction::Revoke { username } => (username, false),
    };
    match chatd::roles::set(users, &name, grant).await? {
        Some(u) if grant => println!("{} is an admin", u.username.as_ref()),
        Some(u) => println!("{} is not an admin", u.username.as_ref()),
        None => anyhow::bail!("no account named {name:?}"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
