//! The idle scenario: hold C connections that only ping, and measure the server's
//! resident memory per connection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::{stream, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::api::{run_id, Api};
use crate::cli::Args;
use crate::engine::new_hist;
use crate::procfs::{nofile_limits, rss_kib};
use crate::report::{IdleStats, Latency, Report};
use crate::ws::{Dialer, Ws};

/// Idle sockets of the bench keep small buffers too (tens of thousands of them).
const IDLE_READ_BUFFER: usize = 4096;

#[derive(Default)]
struct Counters {
    pings: AtomicU64,
    pongs: AtomicU64,
    closed: AtomicU64,
}

pub async fn run(args: &Args, target: &str) -> Result<Report> {
    let c = args.connections;
    let nusers = args.users.unwrap_or(c.min(100)).clamp(1, c.max(1));
    if let Some((soft, hard)) = nofile_limits() {
        if (soft as usize) < c + 256 {
            eprintln!(
                "warning: open-file limit is {soft} (hard {hard}), below --connections {c}: \
                 raise it with `ulimit -n` (bench/run.sh does)"
            );
        }
    }
    let api = Api::new(target)?;
    let rid = run_id();
    let t_reg = Instant::now();
    let users = api
        .register_many(&format!("b{rid}i"), nusers, args.register_concurrency)
        .await?;
    let register_s = t_reg.elapsed().as_secs_f64();
    let dialer = Dialer::new(target, &args.source_addrs, IDLE_READ_BUFFER).await?;

    let rss_before = args.server_pid.and_then(rss_kib);
    let counters = Arc::new(Counters::default());
    let hist = Arc::new(Mutex::new(new_hist()));
    let (stop_tx, stop_rx) = watch::channel(false);

    let t_connect = Instant::now();
    let mut tasks = Vec::with_capacity(c);
    let mut connect_errors = 0u64;
    let mut first_error = None;
    let mut attempts = stream::iter(0..c)
        .map(|i| {
            let token = users[i % nusers].token.clone();
            let dialer = &dialer;
            async move { dialer.connect(&token).await }
        })
        .buffer_unordered(args.connect_concurrency.max(1));
    while let Some(r) = attempts.next().await {
        match r {
            Ok(ws) => tasks.push(tokio::spawn(idle_conn(
                ws,
                args.ping_interval,
                stop_rx.clone(),
                counters.clone(),
                hist.clone(),
            ))),
            Err(e) => {
                connect_errors += 1;
                if first_error.is_none() {
                    first_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    drop(attempts);
    let connect_s = t_connect.elapsed().as_secs_f64();
    let connected = tasks.len();
    let rss_connected = args.server_pid.and_then(rss_kib);

    let server_cpu = crate::procfs::CpuMeter::start(args.server_pid);
    let client_cpu = crate::procfs::CpuMeter::start(None);
    let background = crate::procfs::BackgroundMeter::start(args.server_pid);
    tokio::time::sleep(args.duration).await;
    let rss_end = args.server_pid.and_then(rss_kib);
    let server_cpu_pct = args.server_pid.and_then(|_| server_cpu.percent());
    let client_cpu_pct = client_cpu.percent();
    let background_cpu_pct = background.percent();
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }

    let kib_per_conn = match (rss_before, rss_end) {
        (Some(b), Some(e)) if connected > 0 => Some((e as f64 - b as f64) / connected as f64),
        _ => None,
    };
    let ping = Latency::from_hist(&hist.lock().expect("not poisoned"));
    let closed = counters.closed.load(Ordering::Relaxed);
    Ok(Report {
        label: args.label.clone().unwrap_or_else(|| "server".into()),
        scenario: "idle".into(),
        target: target.to_string(),
        users: nusers,
        connections: c,
        warmup_s: 0.0,
        duration_s: args.duration.as_secs_f64(),
        drained: true,
        register_s,
        connect_s,
        client_cpu_pct,
        server_cpu_pct,
        background_cpu_pct,
        closed_sockets: closed,
        idle: Some(IdleStats {
            connections: c,
            connected,
            connect_errors,
            first_connect_error: first_error,
            connect_per_sec: connected as f64 / connect_s.max(1e-9),
            rss_before_kib: rss_before,
            rss_connected_kib: rss_connected,
            rss_end_kib: rss_end,
            kib_per_conn,
            pings: counters.pings.load(Ordering::Relaxed),
            pongs: counters.pongs.load(Ordering::Relaxed),
            ping,
            closed_by_server: closed,
        }),
        ..Default::default()
    })
}

#[derive(Deserialize)]
struct Pong<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    #[serde(default)]
    nonce: Option<&'a str>,
}

async fn idle_conn(
    mut ws: Ws,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
    hist: Arc<Mutex<Histogram<u32>>>,
) {
    let t0 = Instant::now();
    let iv = interval.as_nanos().max(1) as u64;
    // First ping at a random point of the first period, so pings do not come in waves.
    let mut next = t0 + Duration::from_nanos(rand::random::<u64>() % iv);
    let mut pending = 0u64;
    let mut stopping: Option<tokio::time::Instant> = None;
    loop {
        if stopping.is_some() && pending == 0 {
            break;
        }
        tokio::select! {
            // After the stop, wait (bounded) for the pongs still owed.
            _ = stop.changed(), if stopping.is_none() => {
                stopping = Some(tokio::time::Instant::now() + Duration::from_secs(2));
            }
            _ = tokio::time::sleep_until(stopping.unwrap_or_else(tokio::time::Instant::now)), if stopping.is_some() => break,
            _ = tokio::time::sleep_until(next.into()), if stopping.is_none() => {
                let nonce = format!("{:x}", t0.elapsed().as_nanos() as u64);
                let frame = format!(r#"{{"type":"ping","nonce":"{nonce}"}}"#);
                if ws.send(Message::text(frame)).await.is_err() {
                    counters.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                counters.pings.fetch_add(1, Ordering::Relaxed);
                pending += 1;
                next += interval;
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(Pong { ty: "pong", nonce: Some(n) }) = serde_json::from_str::<Pong>(t.as_str()) {
                        if let Ok(sent) = u64::from_str_radix(n, 16) {
                            counters.pongs.fetch_add(1, Ordering::Relaxed);
                            pending = pending.saturating_sub(1);
                            let rtt_us = (t0.elapsed().as_nanos() as u64).saturating_sub(sent) / 1000;
                            hist.lock().expect("not poisoned").saturating_record(rtt_us);
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    counters.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}
