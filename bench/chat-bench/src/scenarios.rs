//! Setting up users, rooms and sockets for each scenario, and the report of a run.

use std::time::Instant;

use anyhow::{bail, Result};
use futures_util::{stream, StreamExt, TryStreamExt};

use crate::api::{run_id, Api, User};
use crate::cli::{Args, Scenario};
use crate::engine::{self, ConnPlan, Plan, RoomPlan, RunCfg};
use crate::report::{Latency, Report};
use crate::ws::Dialer;

/// Fanout members send this much each when no --rate is given.
pub const FANOUT_DEFAULT_PER_MEMBER: f64 = 30.0;

/// Client read buffer for message scenarios (the client should not be the bottleneck).
const CLIENT_READ_BUFFER: usize = 64 * 1024;

pub async fn run(args: &Args) -> Result<Report> {
    let Some(target) = args.target.as_deref() else {
        bail!("--target is required (or use --suite)");
    };
    match args.scenario {
        Scenario::Idle => crate::idle::run(args, target).await,
        _ => run_messages(args, target).await,
    }
}

async fn run_messages(args: &Args, target: &str) -> Result<Report> {
    let api = Api::new(target)?;
    let rid = run_id();
    let mut dialers = vec![Dialer::new(target, &args.source_addrs, CLIENT_READ_BUFFER).await?];
    let mut target2 = None;
    if args.scenario == Scenario::Cluster {
        let t2 = args
            .target2
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--scenario cluster needs --target2"))?;
        dialers.push(Dialer::new(t2, &args.source_addrs, CLIENT_READ_BUFFER).await?);
        target2 = Some(t2.to_string());
    }

    let t_reg = Instant::now();
    let (users, plan, senders, rate): (Vec<User>, Plan, usize, Option<f64>) = match args.scenario {
        Scenario::Direct | Scenario::Cluster => {
            if args.pairs == 0 {
                bail!("--pairs must be at least 1");
            }
            let users = api
                .register_many(
                    &format!("b{rid}d"),
                    args.pairs * 2,
                    args.register_concurrency,
                )
                .await?;
            let rooms: Vec<String> = stream::iter(0..args.pairs)
                .map(|i| {
                    let (a, b) = (&users[2 * i], &users[2 * i + 1]);
                    let api = &api;
                    async move { api.direct_room(&a.token, &b.id).await }
                })
                .buffered(16)
                .try_collect()
                .await?;
            let cluster = args.scenario == Scenario::Cluster;
            let mut conns = Vec::new();
            let mut room_plans = Vec::new();
            for (i, id) in rooms.into_iter().enumerate() {
                conns.push(ConnPlan {
                    token: users[2 * i].token.clone(),
                    dialer: 0,
                    send_room: Some(i),
                });
                conns.push(ConnPlan {
                    token: users[2 * i + 1].token.clone(),
                    dialer: usize::from(cluster),
                    send_room: if cluster { None } else { Some(i) },
                });
                room_plans.push(RoomPlan {
                    id,
                    conns: vec![2 * i, 2 * i + 1],
                });
            }
            let senders = if cluster { args.pairs } else { args.pairs * 2 };
            (
                users,
                Plan {
                    conns,
                    rooms: room_plans,
                },
                senders,
                args.rate,
            )
        }
        Scenario::Fanout => {
            if args.members < 2 {
                bail!("--members must be at least 2");
            }
            let users = api
                .register_many(&format!("b{rid}f"), args.members, args.register_concurrency)
                .await?;
            let others: Vec<String> = users[1..].iter().map(|u| u.id.clone()).collect();
            let room = api
                .group_room(&users[0].token, &format!("bench {rid}"), &others)
                .await?;
            let conns = users
                .iter()
                .map(|u| ConnPlan {
                    token: u.token.clone(),
                    dialer: 0,
                    send_room: Some(0),
                })
                .collect();
            let rate = args
                .rate
                .unwrap_or(FANOUT_DEFAULT_PER_MEMBER * args.members as f64);
            (
                users,
                Plan {
                    conns,
                    rooms: vec![RoomPlan {
                        id: room,
                        conns: (0..args.members).collect(),
                    }],
                },
                args.members,
                Some(rate),
            )
        }
        Scenario::Idle => unreachable!(),
    };
    let register_s = t_reg.elapsed().as_secs_f64();

    let cfg = RunCfg {
        warmup: args.warmup,
        duration: args.duration,
        drain: args.drain,
        window: args.window,
        rate_per_sender: rate.map(|r| r / senders as f64),
        body_size: args.body_size,
        connect_concurrency: args.connect_concurrency,
        server_pid: args.server_pid,
    };
    let res = engine::run(&plan, &dialers, &cfg).await?;

    let mut e2e = engine::new_hist();
    let mut ack = engine::new_hist();
    let mut r = Report {
        label: args.label.clone().unwrap_or_else(|| "server".into()),
        scenario: args.scenario.name().into(),
        target: target.to_string(),
        target2,
        pairs: matches!(args.scenario, Scenario::Direct | Scenario::Cluster).then_some(args.pairs),
        members: (args.scenario == Scenario::Fanout).then_some(args.members),
        users: users.len(),
        connections: plan.conns.len(),
        senders,
        offered_rate: rate,
        window: args.window,
        body_size: args.body_size,
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: res.measured_secs,
        drain_s: res.drain_secs,
        drained: res.drained,
        register_s,
        connect_s: res.connect_secs,
        lost: res.lost,
        missed_closed: res.missed_closed,
        expected_deliveries: res.expected_deliveries,
        client_cpu_pct: res.client_cpu_pct,
        server_cpu_pct: res.server_cpu_pct,
        background_cpu_pct: res.background_cpu_pct,
        ..Default::default()
    };
    let mut sent_window = 0;
    let mut acked_window = 0;
    let mut delivered_window = 0;
    for c in &res.conns {
        if let Some(s) = &c.sender {
            r.sent += s.sent;
            r.acked += s.acked;
            r.errored += s.errored;
            sent_window += s.sent_window;
            acked_window += s.acked_window;
            ack.add(&s.ack).expect("same bounds");
        }
        if let Some(h) = &c.e2e {
            e2e.add(h).expect("same bounds");
        }
        r.delivered += c.delivered_total;
        delivered_window += c.delivered_window;
        r.duplicates += c.duplicates;
        r.reordered += c.reordered;
        r.self_echo += c.self_echo;
        for (k, v) in &c.errors {
            *r.errors.entry(k.clone()).or_default() += v;
        }
        if let Some(why) = &c.closed {
            r.closed_sockets += 1;
            if r.first_close.is_none() {
                r.first_close = Some(why.clone());
            }
        }
    }
    r.unacked = r.sent - r.acked - r.errored;
    let secs = res.measured_secs.max(1e-9);
    r.sent_per_sec = sent_window as f64 / secs;
    r.acked_per_sec = acked_window as f64 / secs;
    r.delivered_per_sec = delivered_window as f64 / secs;
    r.e2e = Latency::from_hist(&e2e);
    r.ack = Latency::from_hist(&ack);
    drop(res);
    if let Some(pid) = args.server_pid {
        if let Some(d) = args.settle {
            tokio::time::sleep(d).await;
        }
        r.server_rss_kib = crate::procfs::rss_kib(pid);
        r.server_rss_anon_kib = crate::procfs::rss_anon_kib(pid);
    }
    Ok(r)
}
