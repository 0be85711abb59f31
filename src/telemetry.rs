//! Logs (tracing; text or JSON by config, level from `RUST_LOG`) and the
//! Prometheus metrics recorder.

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global log subscriber (once; later calls do nothing). Logs
/// go to stdout, coloured only when stdout is a terminal (a file or a pipe
/// gets plain text).
pub fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .with_target(false);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Installs the process-wide metrics recorder (once) and keeps its upkeep running.
pub fn init_metrics() {
    if PROMETHEUS.get().is_some() {
        return;
    }
    let Ok(handle) = PrometheusBuilder::new()
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ])
        .and_then(|b| b.install_recorder())
    else {
        return;
    };
    if PROMETHEUS.set(handle.clone()).is_ok() {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    every.tick().await;
                    handle.run_upkeep();
                }
            });
        }
    }
}

/// The metrics in Prometheus text format, if the recorder is installed.
pub fn render_metrics() -> Option<String> {
    PROMETHEUS.get().map(|h| h.render())
}
