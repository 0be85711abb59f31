//! Logs (tracing; text or JSON by config, level from `RUST_LOG`) and the
//! Prometheus metrics recorder: histograms of seconds get seconds buckets,
//! histograms of counts get count buckets, and the process's resident
//! memory is a gauge (`process_resident_memory_bytes`, and the anonymous
//! part as `process_resident_memory_anon_bytes`).

use std::io::IsTerminal;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets of every histogram of seconds (the default).
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Buckets of the histograms that count things (up to a full store batch).
const COUNTS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// The histograms whose values are counts, not seconds.
const COUNT_HISTOGRAMS: &[&str] = &["chatd_store_batch_size"];

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
    let mut builder = PrometheusBuilder::new().set_buckets(SECONDS);
    for name in COUNT_HISTOGRAMS {
        builder =
            builder.and_then(|b| b.set_buckets_for_metric(Matcher::Full((*name).into()), COUNTS));
    }
    let Ok(handle) = builder.and_then(|b| b.install_recorder()) else {
        return;
    };
    if PROMETHEUS.set(handle.clone()).is_ok() {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    every.tick().await;
                    handle.run_upkeep();
                    record_memory();
                }
            });
        }
    }
}

/// The metrics in Prometheus text format, if the recorder is installed.
pub fn render_metrics() -> Option<String> {
    PROMETHEUS.get().map(|h| {
        record_memory();
        h.render()
    })
}

/// Sets the resident memory gauges from `/proc/self/status` (Linux; on
/// other systems they are not set).
fn record_memory() {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    for (field, gauge) in [
        ("VmRSS:", "process_resident_memory_bytes"),
        ("RssAnon:", "process_resident_memory_anon_bytes"),
    ] {
        if let Some(kib) = status_kib(&status, field) {
            metrics::gauge!(gauge).set(kib as f64 * 1024.0);
        }
    }
}

/// The value in KiB of a `/proc/self/status` line such as `VmRSS:  1234 kB`.
fn status_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_from_proc_status() {
        let s = "Name:\tchatd\nVmRSS:\t   51200 kB\nRssAnon:\t  40960 kB\n";
        assert_eq!(status_kib(s, "VmRSS:"), Some(51200));
        assert_eq!(status_kib(s, "RssAnon:"), Some(40960));
        assert_eq!(status_kib(s, "VmSwap:"), None);
    }
}
