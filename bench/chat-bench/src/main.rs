//! chat-bench: load generator for chatd and for the baselines it is compared with.
//!
//! Speaks the client contract (shared/API.md): registers users over HTTP, opens rooms,
//! holds WebSockets and measures delivered messages/s, send→ack and send→recipient
//! latency, errors and lost messages. `--suite` runs chatd, bench-relay and the Node
//! relay one after the other under the same scenarios and writes BENCHMARKS.md's table
//! and chart. See `chat-bench --help` and BENCHMARKS.md.

mod api;
mod chart;
mod cli;
mod engine;
mod idle;
mod procfs;
mod report;
mod scenarios;
mod suite;
mod ws;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = cli::Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if let Some(path) = &args.replot {
            return suite::replot(&args, path);
        }
        if args.suite {
            return suite::run(&args).await;
        }
        let report = scenarios::run(&args).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", report::human(&report));
        }
        Ok(())
    })
}
