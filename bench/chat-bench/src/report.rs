//! The report of one run: a human table or JSON.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    /// From a histogram in microseconds; None when it is empty.
    pub fn from_hist(h: &Histogram<u32>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct IdleStats {
    pub connections: usize,
    pub connected: usize,
    pub connect_errors: u64,
    pub first_connect_error: Option<String>,
    pub connect_per_sec: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_connected_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// (RSS at the end − RSS before connecting) / connections held.
    pub kib_per_conn: Option<f64>,
    pub pings: u64,
    pub pongs: u64,
    pub ping: Option<Latency>,
    pub closed_by_server: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    /// Name of the run within a suite (e.g. `direct-10`, `sweep-20000`).
    #[serde(default)]
    pub case: String,
    pub scenario: String,
    pub target: String,
    pub target2: Option<String>,
    pub pairs: Option<usize>,
    pub members: Option<usize>,
    pub users: usize,
    pub connections: usize,
    pub senders: usize,
    /// Offered load, sends/s over all senders (None: closed loop).
    pub offered_rate: Option<f64>,
    pub window: usize,
    pub body_size: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub drain_s: f64,
    pub drained: bool,
    pub register_s: f64,
    pub connect_s: f64,
    pub sent: u64,
    pub acked: u64,
    pub errored: u64,
    pub unacked: u64,
    pub delivered: u64,
    pub expected_deliveries: u64,
    /// Acked, never delivered, to a socket that stayed open: silent loss.
    pub lost: u64,
    /// Acked, not delivered to a socket before the server closed it (a real client
    /// would reconnect and sync them).
    #[serde(default)]
    pub missed_closed: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub self_echo: u64,
    pub sent_per_sec: f64,
    pub acked_per_sec: f64,
    pub delivered_per_sec: f64,
    pub e2e: Option<Latency>,
    pub ack: Option<Latency>,
    pub errors: BTreeMap<String, u64>,
    pub closed_sockets: u64,
    pub first_close: Option<String>,
    pub client_cpu_pct: Option<f64>,
    pub server_cpu_pct: Option<f64>,
    /// Server VmRSS and RssAnon (KiB) at the end of a message run, after --settle.
    #[serde(default)]
    pub server_rss_kib: Option<u64>,
    #[serde(default)]
    pub server_rss_anon_kib: Option<u64>,
    /// CPU used by other processes on the machine during the run (noise).
    #[serde(default)]
    pub background_cpu_pct: Option<f64>,
    pub idle: Option<IdleStats>,
}

fn lat(l: &Option<Latency>) -> String {
    match l {
        Some(l) => format!(
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  (n={})",
            l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
        ),
        None => "-".into(),
    }
}

pub fn human(r: &Report) -> String {
    let mut o = String::new();
    let mut line = |k: &str, v: String| o.push_str(&format!("  {k:<22} {v}\n"));
    line("server", format!("{} ({})", r.label, r.target));
    if let Some(t2) = &r.target2 {
        line("second node", t2.clone());
    }
    line("scenario", r.scenario.clone());
    if let Some(idle) = &r.idle {
        line(
            "connections",
            format!(
                "{} held of {} ({} users), {} connect errors, {:.0} connects/s",
                idle.connected,
                idle.connections,
                r.users,
                idle.connect_errors,
                idle.connect_per_sec
            ),
        );
        if let Some(e) = &idle.first_connect_error {
            line("first connect error", e.clone());
        }
        let kib = |v: Option<u64>| v.map(|v| format!("{v} KiB")).unwrap_or("-".into());
        line(
            "server RSS",
            format!(
                "before {}, connected {}, end {}",
                kib(idle.rss_before_kib),
                kib(idle.rss_connected_kib),
                kib(idle.rss_end_kib)
            ),
        );
        line(
            "per connection",
            idle.kib_per_conn
                .map(|v| format!("{v:.1} KiB"))
                .unwrap_or("- (pass --server-pid)".into()),
        );
        line(
            "pings",
            format!(
                "{} sent, {} answered; {}",
                idle.pings,
                idle.pongs,
                lat(&idle.ping)
            ),
        );
        line("closed by server", idle.closed_by_server.to_string());
    } else {
        line(
            "shape",
            format!(
                "{} users, {} sockets, {} senders, window {}, body {} B",
                r.users, r.connections, r.senders, r.window, r.body_size
            ),
        );
        line(
            "offered",
            r.offered_rate
                .map(|x| format!("{x:.0} sends/s"))
                .unwrap_or("closed loop (as fast as acks allow)".into()),
        );
        line(
            "time",
            format!(
                "warmup {:.1} s + measured {:.1} s, drain {:.2} s{}",
                r.warmup_s,
                r.duration_s,
                r.drain_s,
                if r.drained { "" } else { " (grace ran out)" }
            ),
        );
        line(
            "delivered",
            format!(
                "{:.0} msgs/s  (sent {:.0}/s, acked {:.0}/s)",
                r.delivered_per_sec, r.sent_per_sec, r.acked_per_sec
            ),
        );
        line("end-to-end latency", lat(&r.e2e));
        line("send→ack latency", lat(&r.ack));
        line(
            "counts",
            format!(
                "sent {} acked {} errored {} unacked {} delivered {}/{} expected",
                r.sent, r.acked, r.errored, r.unacked, r.delivered, r.expected_deliveries
            ),
        );
        line(
            "lost",
            format!(
                "{}  (duplicates {}, out of order {}, echoes to sender {})",
                r.lost, r.duplicates, r.reordered, r.self_echo
            ),
        );
        if r.missed_closed > 0 {
            line(
                "missed by closed sockets",
                format!(
                    "{} (sockets the server closed; a client would resync)",
                    r.missed_closed
                ),
            );
        }
    }
    line(
        "errors",
        if r.errors.is_empty() {
            "0".into()
        } else {
            format!("{:?}", r.errors)
        },
    );
    if r.closed_sockets > 0 {
        line(
            "sockets closed early",
            format!(
                "{} (first: {})",
                r.closed_sockets,
                r.first_close.clone().unwrap_or_default()
            ),
        );
    }
    let pct = |v: Option<f64>| v.map(|v| format!("{v:.0}%")).unwrap_or("-".into());
    line(
        "cpu (of one core)",
        format!(
            "client {}, server {}",
            pct(r.client_cpu_pct),
            pct(r.server_cpu_pct)
        ),
    );
    if r.server_rss_anon_kib.is_some() {
        let mib = |v: Option<u64>| {
            v.map(|v| format!("{:.1} MiB", v as f64 / 1024.0))
                .unwrap_or("-".into())
        };
        line(
            "server memory at end",
            format!(
                "RssAnon {}, VmRSS {}",
                mib(r.server_rss_anon_kib),
                mib(r.server_rss_kib)
            ),
        );
    }
    line(
        "setup",
        format!(
            "register {:.1} s, connect {:.1} s",
            r.register_s, r.connect_s
        ),
    );
    o
}
