//! Command line of chat-bench.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N pairs of users, each side sending to its direct room.
    Direct,
    /// One group room of M members, every member sending at a fixed rate.
    Fanout,
    /// C idle connections with periodic pings; server RSS per connection.
    Idle,
    /// N pairs: senders connected to --target, receivers to --target2.
    Cluster,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::Fanout => "fanout",
            Scenario::Idle => "idle",
            Scenario::Cluster => "cluster",
        }
    }
}

/// Load generator for chatd (and anything that speaks its client contract).
///
/// Examples:
///   chat-bench --target http://127.0.0.1:8080 --scenario direct --pairs 50 --duration 10s
///   chat-bench --target http://127.0.0.1:8080 --scenario direct --pairs 50 --rate 20000 --json
///   chat-bench --target http://127.0.0.1:8080 --scenario fanout --members 100 --rate 3000
///   chat-bench --target http://127.0.0.1:8080 --scenario idle --connections 15000 --server-pid 1234
///   chat-bench --suite            (what bench/run.sh runs: chatd and both baselines)
#[derive(Parser, Debug, Clone)]
#[command(name = "chat-bench", version, verbatim_doc_comment)]
pub struct Args {
    /// Base URL of the server, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub target: Option<String>,
    /// Second node for --scenario cluster (receivers connect here)
    #[arg(long)]
    pub target2: Option<String>,
    #[arg(long, value_enum, default_value = "direct")]
    pub scenario: Scenario,
    /// Pairs of users (direct, cluster)
    #[arg(long, default_value_t = 50)]
    pub pairs: usize,
    /// Members of the group room (fanout)
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// Idle connections to hold (idle)
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Users the idle connections are spread over, as devices (idle; default min(C, 100))
    #[arg(long)]
    pub users: Option<usize>,
    /// Measured time (sending goes on for --warmup + --duration)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Sending before the measured time (not counted in rates or latency)
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Grace period after sending stops for outstanding acks and deliveries
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Fixed offered load: total sends/s over all senders. Without it, direct and cluster
    /// senders send as fast as acks allow (closed loop, --window in flight);
    /// fanout defaults to 30 sends/s per member.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Sends in flight (sent, not yet acked) per sender
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Message body length in bytes
    #[arg(long, default_value_t = 100)]
    pub body_size: usize,
    /// Bind client sockets round-robin to these local addresses (e.g. 127.0.0.2,127.0.0.3)
    #[arg(long, value_delimiter = ',')]
    pub source_addrs: Vec<IpAddr>,
    /// Server process id: its RSS (idle) and CPU time are read from /proc
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// After a message run, wait this long with the sockets closed, then read the server's
    /// RSS and RssAnon (the memory check of issue 14: 10s)
    #[arg(long, value_parser = parse_duration)]
    pub settle: Option<Duration>,
    /// Ping period of each idle connection
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// Registrations in flight (argon2 on the server is slow)
    #[arg(long, default_value_t = 8)]
    pub register_concurrency: usize,
    /// WebSocket handshakes in flight
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Name of the server in the report
    #[arg(long)]
    pub label: Option<String>,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,

    /// Run the whole suite: build nothing, start chatd, bench-relay and the Node relay
    /// from --bin-dir / --node-relay-dir, run every scenario against each, write
    /// --out-dir/results.json, the table into --markdown and the chart into --chart
    /// (all under target/bench/ by default: the committed BENCHMARKS.md, BENCHMARKS.png
    /// and bench/results/ change only when named, as `bench/run.sh --write` does).
    #[arg(long)]
    pub suite: bool,
    /// Suite size: full, or quick (shorter runs, for trying the suite out)
    #[arg(long, default_value = "full")]
    pub profile: String,
    /// Run only these suite cases: a full name (`direct-10`) or a family (`sweep`,
    /// `idle`, `fanout`); default: every case
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Servers the suite runs, in order
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chatd,relay-durable,relay,node"
    )]
    pub servers: Vec<String>,
    #[arg(long, default_value = "target/release")]
    pub bin_dir: PathBuf,
    #[arg(long, default_value = "bench/node-relay")]
    pub node_relay_dir: PathBuf,
    /// Where results.json, table.md and the server logs go
    #[arg(long, default_value = "target/bench")]
    pub out_dir: PathBuf,
    /// Markdown file whose generated section (between the markers) is rewritten
    #[arg(long, default_value = "target/bench/BENCHMARKS.md")]
    pub markdown: PathBuf,
    /// Where the chart (PNG) is drawn
    #[arg(long, default_value = "target/bench/BENCHMARKS.png")]
    pub chart: PathBuf,
    /// Suite: before each run, wait until other processes use less than this much CPU
    /// (percent of one core, measured over 2 s)...
    #[arg(long, default_value_t = 25.0)]
    pub quiet_below: f64,
    /// ...but no longer than this (then run anyway; the report says how busy it was)
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub quiet_wait: Duration,
    /// Redraw the chart and table from a results.json written by --suite
    #[arg(long)]
    pub replot: Option<PathBuf>,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (try 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("duration out of range: {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn the_documented_command_line_parses() {
        let a = Args::try_parse_from([
            "chat-bench",
            "--target",
            "http://127.0.0.1:8080",
            "--scenario",
            "direct",
            "--pairs",
            "50",
            "--duration",
            "10s",
            "--rate",
            "20000",
            "--json",
            "--source-addrs",
            "127.0.0.2,127.0.0.3",
        ])
        .unwrap();
        assert_eq!(a.scenario, Scenario::Direct);
        assert_eq!(a.pairs, 50);
        assert_eq!(a.rate, Some(20000.0));
        assert!(a.json);
        assert_eq!(a.source_addrs.len(), 2);
    }
}
