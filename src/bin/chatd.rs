//! The chatd server: reads config, starts telemetry, builds the node, waits
//! for SIGINT/SIGTERM.

use std::path::PathBuf;

use clap::Parser;

/// chatd — a real-time chat backend.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Extra config file layered over the defaults (env vars CHAT__SECTION__KEY win).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    let settings = chatd::Settings::load(cli.config.as_deref())?;
    chatd::telemetry::init_logs(settings.log.format == "json");
    let app = chatd::Application::build(settings).await?;
    app.run_until_stopped(shutdown_signal()).await?;
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
