//! The message engine behind direct, fanout and cluster.
//!
//! Every connection is one task that owns its socket: it sends (closed loop with a
//! window of unacked sends, or open loop at a fixed rate), reads acks and messages,
//! and keeps its own histograms and bit sets, so the hot path shares nothing.
//!
//! Each `client_msg_id` is `{sender:x}-{n:x}-{t:x}`: the sender's index, its n-th
//! send, and the send time in nanoseconds of the bench's monotonic clock (for fixed
//! rate runs the *scheduled* time, so that a slow server cannot hide its queueing
//! delay: no coordinated omission). The receiving task reads it back from the
//! `message` frame: end-to-end latency, duplicate and loss accounting need nothing
//! else.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::{stream, FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::ws::{Dialer, Ws};

/// Latency histograms are in microseconds, up to a minute, 3 significant digits.
pub fn new_hist() -> Histogram<u32> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

#[derive(Default, Clone)]
pub struct BitSet(Vec<u64>);

impl BitSet {
    /// Sets bit `i`; returns whether it was set before.
    #[inline]
    pub fn test_set(&mut self, i: u64) -> bool {
        let w = (i / 64) as usize;
        if w >= self.0.len() {
            self.0.resize((w + 1).max(self.0.len() * 2), 0);
        }
        let b = 1u64 << (i % 64);
        let was = self.0[w] & b != 0;
        self.0[w] |= b;
        was
    }

    /// How many bits of `self` are not set in `other`.
    pub fn missing_in(&self, other: Option<&BitSet>) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let o = other.and_then(|o| o.0.get(i)).copied().unwrap_or(0);
                (w & !o).count_ones() as u64
            })
            .sum()
    }
}

/// One socket of the run.
pub struct ConnPlan {
    pub token: String,
    /// Index into the dialers (0 = --target, 1 = --target2).
    pub dialer: usize,
    /// The room this connection sends to, if it sends.
    pub send_room: Option<usize>,
}

pub struct RoomPlan {
    pub id: String,
    /// Connections of the room's members (they all receive what one of them sends).
    pub conns: Vec<usize>,
}

pub struct Plan {
    pub conns: Vec<ConnPlan>,
    pub rooms: Vec<RoomPlan>,
}

#[derive(Clone)]
pub struct RunCfg {
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub window: usize,
    /// Sends per second of each sender (None: closed loop).
    pub rate_per_sender: Option<f64>,
    pub body_size: usize,
    pub connect_concurrency: usize,
    /// Server process whose CPU time is measured during the run.
    pub server_pid: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Wait,
    Run { warm_end: u64, run_end: u64 },
    Drain,
    Done,
}

struct Shared {
    t0: Instant,
    outstanding: AtomicI64,
    expected: AtomicU64,
    delivered: AtomicU64,
}

impl Shared {
    #[inline]
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
}

/// What one connection saw.
#[derive(Default)]
pub struct ConnResult {
    pub sender: Option<SenderResult>,
    pub recv: HashMap<u32, BitSet>,
    pub e2e: Option<Histogram<u32>>,
    pub delivered_total: u64,
    pub delivered_window: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub self_echo: u64,
    pub errors: BTreeMap<String, u64>,
    pub closed: Option<String>,
}

pub struct SenderResult {
    pub room: usize,
    pub sent: u64,
    pub sent_window: u64,
    pub acked: u64,
    pub acked_window: u64,
    pub errored: u64,
    pub acked_bits: BitSet,
    pub ack: Histogram<u32>,
}

pub struct EngineResult {
    pub conns: Vec<ConnResult>,
    pub connect_secs: f64,
    pub measured_secs: f64,
    pub drain_secs: f64,
    pub drained: bool,
    pub lost: u64,
    pub missed_closed: u64,
    pub expected_deliveries: u64,
    pub client_cpu_pct: Option<f64>,
    pub server_cpu_pct: Option<f64>,
    pub background_cpu_pct: Option<f64>,
}

pub async fn run(plan: &Plan, dialers: &[Dialer], cfg: &RunCfg) -> Result<EngineResult> {
    // Connect everything first; sending starts on every socket at once.
    let t_connect = Instant::now();
    let mut sockets: Vec<Option<Ws>> = (0..plan.conns.len()).map(|_| None).collect();
    let mut results = stream::iter(plan.conns.iter().enumerate())
        .map(|(i, c)| async move { (i, dialers[c.dialer].connect(&c.token).await) })
        .buffer_unordered(cfg.connect_concurrency.max(1));
    while let Some((i, r)) = results.next().await {
        match r {
            Ok(ws) => sockets[i] = Some(ws),
            Err(e) => bail!("connection {i} failed: {e:#}"),
        }
    }
    drop(results);
    let connect_secs = t_connect.elapsed().as_secs_f64();

    let shared = Arc::new(Shared {
        t0: Instant::now(),
        outstanding: AtomicI64::new(0),
        expected: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Wait);
    let body = json_string(&"x".repeat(cfg.body_size.max(1)));
    let mut tasks = Vec::with_capacity(plan.conns.len());
    for (i, ws) in sockets.into_iter().enumerate() {
        let ws = ws.expect("connected");
        let c = &plan.conns[i];
        let send = c.send_room.map(|r| {
            let room = &plan.rooms[r];
            let recipients = room.conns.iter().filter(|&&x| x != i).count() as u64;
            let interval = cfg
                .rate_per_sender
                .map(|rate| (1e9 / rate.max(1e-3)) as u64);
            SendState {
                room: r,
                room_json: json_string(&room.id),
                body: body.clone(),
                recipients,
                window: cfg.window.max(1),
                interval,
                next_due: 0,
                n: 0,
                inflight: 0,
                sent: 0,
                sent_window: 0,
                acked: 0,
                acked_window: 0,
                errored: 0,
                acked_bits: BitSet::default(),
                ack: new_hist(),
            }
        });
        let conn = Conn {
            idx: i as u32,
            ws,
            shared: shared.clone(),
            phase: phase_rx.clone(),
            send,
            res: ConnResult {
                e2e: Some(new_hist()),
                ..Default::default()
            },
            last_seq: HashMap::new(),
            warm_end: 0,
            run_end: 0,
            d_out: 0,
            d_exp: 0,
            d_del: 0,
            frame: String::with_capacity(256 + cfg.body_size),
        };
        tasks.push(tokio::spawn(conn.run()));
    }

    let start = shared.now();
    let warm_end = start + cfg.warmup.as_nanos() as u64;
    let run_end = warm_end + cfg.duration.as_nanos() as u64;
    phase_tx.send_replace(Phase::Run { warm_end, run_end });
    let client_cpu = crate::procfs::CpuMeter::start(None);
    let server_cpu = cfg
        .server_pid
        .map(|p| crate::procfs::CpuMeter::start(Some(p)));
    let background = crate::procfs::BackgroundMeter::start(cfg.server_pid);
    tokio::time::sleep(Duration::from_nanos(run_end.saturating_sub(shared.now()))).await;
    phase_tx.send_replace(Phase::Drain);
    let client_cpu_pct = client_cpu.percent();
    let server_cpu_pct = server_cpu.and_then(|m| m.percent());
    let background_cpu_pct = background.percent();

    // Drain: wait (bounded) until every send is answered and every acked message
    // reached all its recipients.
    let drain_start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let drained = loop {
        let out = shared.outstanding.load(Ordering::Acquire);
        let exp = shared.expected.load(Ordering::Acquire);
        let del = shared.delivered.load(Ordering::Acquire);
        if out <= 0 && del >= exp {
            break true;
        }
        if drain_start.elapsed() >= cfg.drain {
            break false;
        }
        tick.tick().await;
    };
    let drain_secs = drain_start.elapsed().as_secs_f64();
    phase_tx.send_replace(Phase::Done);

    let mut conns = Vec::with_capacity(tasks.len());
    for t in tasks {
        conns.push(t.await?);
    }

    // Exact loss: every acked message must be in every recipient's bit set.
    let mut lost = 0;
    let mut missed_closed = 0;
    let mut expected_deliveries = 0;
    for (s, c) in conns.iter().enumerate() {
        let Some(sr) = &c.sender else { continue };
        for &r in &plan.rooms[sr.room].conns {
            if r == s {
                continue;
            }
            expected_deliveries += sr.acked;
            let missing = sr.acked_bits.missing_in(conns[r].recv.get(&(s as u32)));
            // A socket the server closed (e.g. 4008, too slow) would resync on
            // reconnect; what it missed is counted apart from silent loss.
            if conns[r].closed.is_some() {
                missed_closed += missing;
            } else {
                lost += missing;
            }
        }
    }

    Ok(EngineResult {
        conns,
        connect_secs,
        measured_secs: cfg.duration.as_secs_f64(),
        drain_secs,
        drained,
        lost,
        missed_closed,
        expected_deliveries,
        client_cpu_pct,
        server_cpu_pct,
        background_cpu_pct,
    })
}

/// A JSON string literal, quotes included.
pub fn json_string(s: &str) -> Arc<str> {
    Arc::from(
        serde_json::to_string(s)
            .expect("a string serialises")
            .as_str(),
    )
}

struct SendState {
    room: usize,
    room_json: Arc<str>,
    body: Arc<str>,
    recipients: u64,
    window: usize,
    interval: Option<u64>,
    next_due: u64,
    n: u64,
    inflight: usize,
    sent: u64,
    sent_window: u64,
    acked: u64,
    acked_window: u64,
    errored: u64,
    acked_bits: BitSet,
    ack: Histogram<u32>,
}

struct Conn {
    idx: u32,
    ws: Ws,
    shared: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    send: Option<SendState>,
    res: ConnResult,
    last_seq: HashMap<String, u64>,
    warm_end: u64,
    run_end: u64,
    // Deltas not yet published to the shared counters.
    d_out: i64,
    d_exp: u64,
    d_del: u64,
    frame: String,
}

#[derive(Deserialize)]
struct InFrame<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(borrow, default)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    room_id: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow, default)]
    reference: Option<Cow<'a, str>>,
}

/// Parses `{sender:x}-{n:x}-{t:x}`.
#[inline]
pub fn parse_cmid(s: &str) -> Option<(u32, u64, u64)> {
    let mut it = s.split('-');
    let a = u32::from_str_radix(it.next()?, 16).ok()?;
    let b = u64::from_str_radix(it.next()?, 16).ok()?;
    let c = u64::from_str_radix(it.next()?, 16).ok()?;
    if it.next().is_some() {
        return None;
    }
    Some((a, b, c))
}

impl Conn {
    async fn run(mut self) -> ConnResult {
        // Until the start, only read (a server may push presence and the like).
        loop {
            let p = *self.phase.borrow_and_update();
            match p {
                Phase::Run { warm_end, run_end } => {
                    self.warm_end = warm_end;
                    self.run_end = run_end;
                    if let Some(s) = &mut self.send {
                        // Spread fixed-rate senders over one interval.
                        if let Some(iv) = s.interval {
                            s.next_due = self.shared.now() + rand::random::<u64>() % iv.max(1);
                        }
                    }
                    break;
                }
                Phase::Drain | Phase::Done => return self.finish().await,
                Phase::Wait => {}
            }
            tokio::select! {
                r = self.phase.changed() => if r.is_err() { return self.finish().await },
                m = self.ws.next() => if !self.on_ws(m) { return self.finish().await },
            }
        }

        let mut phase = *self.phase.borrow();
        loop {
            let now = self.shared.now();
            let sending = matches!(phase, Phase::Run { .. }) && now < self.run_end;
            if sending && self.send.is_some() {
                if let Err(e) = self.fill(now).await {
                    self.res.closed = Some(format!("write: {e}"));
                    break;
                }
            }
            self.publish();
            if phase == Phase::Done {
                break;
            }
            let deadline = if sending {
                match &self.send {
                    Some(s) if s.interval.is_some() && s.inflight < s.window => {
                        Some(s.next_due.min(self.run_end))
                    }
                    Some(_) => None,
                    None => None,
                }
            } else {
                None
            };
            let sleep_for = deadline.map(|d| Duration::from_nanos(d.saturating_sub(now)));
            tokio::select! {
                biased;
                r = self.phase.changed() => {
                    if r.is_err() { break; }
                    phase = *self.phase.borrow_and_update();
                }
                m = self.ws.next() => {
                    if !self.on_ws(m) { break; }
                    // Take what is already buffered before writing again.
                    let mut k = 0;
                    while k < 256 {
                        match self.ws.next().now_or_never() {
                            Some(m) => { if !self.on_ws(m) { break; } }
                            None => break,
                        }
                        k += 1;
                    }
                    if self.res.closed.is_some() { break; }
                }
                _ = tokio::time::sleep(sleep_for.unwrap_or_default()), if sleep_for.is_some() => {}
            }
        }
        self.finish().await
    }

    async fn finish(mut self) -> ConnResult {
        // What is still in flight will never be answered on this socket.
        if let Some(s) = &self.send {
            self.d_out -= s.inflight as i64;
        }
        self.publish();
        if self.res.closed.is_none() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
        }
        let mut res = self.res;
        if let Some(s) = self.send {
            res.sender = Some(SenderResult {
                room: s.room,
                sent: s.sent,
                sent_window: s.sent_window,
                acked: s.acked,
                acked_window: s.acked_window,
                errored: s.errored,
                acked_bits: s.acked_bits,
                ack: s.ack,
            });
        }
        res
    }

    #[inline]
    fn publish(&mut self) {
        if self.d_out != 0 {
            self.shared
                .outstanding
                .fetch_add(self.d_out, Ordering::AcqRel);
            self.d_out = 0;
        }
        if self.d_exp != 0 {
            self.shared.expected.fetch_add(self.d_exp, Ordering::AcqRel);
            self.d_exp = 0;
        }
        if self.d_del != 0 {
            self.shared
                .delivered
                .fetch_add(self.d_del, Ordering::AcqRel);
            self.d_del = 0;
        }
    }

    /// Sends what the window (and the rate) allow, then flushes once.
    async fn fill(&mut self, now: u64) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let mut k = 0;
        loop {
            let s = self.send.as_mut().expect("a sender");
            if s.inflight >= s.window || k >= 64 {
                break;
            }
            let t = match s.interval {
                Some(iv) => {
                    if s.next_due > now || s.next_due >= self.run_end {
                        break;
                    }
                    let t = s.next_due;
                    s.next_due += iv;
                    t
                }
                None => now,
            };
            self.frame.clear();
            let _ = write!(
                self.frame,
                r#"{{"type":"send","room_id":{},"client_msg_id":"{:x}-{:x}-{:x}","body":{}}}"#,
                s.room_json, self.idx, s.n, t, s.body
            );
            s.n += 1;
            s.inflight += 1;
            s.sent += 1;
            if now >= self.warm_end {
                s.sent_window += 1;
            }
            self.d_out += 1;
            k += 1;
            self.ws.feed(Message::text(self.frame.as_str())).await?;
        }
        if k > 0 {
            self.ws.flush().await?;
        }
        Ok(())
    }

    /// Handles one item of the socket stream; false when the socket is gone.
    fn on_ws(&mut self, m: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> bool {
        match m {
            Some(Ok(Message::Text(t))) => {
                self.on_frame(t.as_str());
                true
            }
            Some(Ok(Message::Close(c))) => {
                self.res.closed = Some(format!("closed by server: {c:?}"));
                false
            }
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                self.res.closed = Some(format!("read: {e}"));
                false
            }
            None => {
                self.res.closed = Some("socket ended".into());
                false
            }
        }
    }

    fn on_frame(&mut self, text: &str) {
        let f: InFrame = match serde_json::from_str(text) {
            Ok(f) => f,
            Err(_) => {
                *self.res.errors.entry("bad_frame".into()).or_default() += 1;
                return;
            }
        };
        let now = self.shared.now();
        match &*f.ty {
            "ack" => {
                let Some((s, n, t)) = f.client_msg_id.as_deref().and_then(parse_cmid) else {
                    *self
                        .res
                        .errors
                        .entry("ack_without_our_id".into())
                        .or_default() += 1;
                    return;
                };
                let Some(st) = self.send.as_mut() else { return };
                if s != self.idx {
                    return;
                }
                if st.acked_bits.test_set(n) {
                    *self.res.errors.entry("duplicate_ack".into()).or_default() += 1;
                    return;
                }
                st.inflight = st.inflight.saturating_sub(1);
                st.acked += 1;
                self.d_out -= 1;
                self.d_exp += st.recipients;
                // Rates count by arrival time, latency by send time.
                if now >= self.warm_end && now < self.run_end {
                    st.acked_window += 1;
                }
                if t >= self.warm_end && t < self.run_end {
                    st.ack.saturating_record(now.saturating_sub(t) / 1000);
                }
            }
            "message" => {
                let Some((s, n, t)) = f.client_msg_id.as_deref().and_then(parse_cmid) else {
                    *self
                        .res
                        .errors
                        .entry("message_without_our_id".into())
                        .or_default() += 1;
                    return;
                };
                if s == self.idx {
                    self.res.self_echo += 1;
                    return;
                }
                let dup = self.res.recv.entry(s).or_default().test_set(n);
                if let (Some(room), Some(seq)) = (f.room_id.as_deref(), f.seq) {
                    match self.last_seq.get_mut(room) {
                        Some(last) => {
                            if seq > *last {
                                *last = seq;
                            } else if !dup {
                                self.res.reordered += 1;
                            }
                        }
                        None => {
                            self.last_seq.insert(room.to_string(), seq);
                        }
                    }
                }
                if dup {
                    self.res.duplicates += 1;
                    return;
                }
                self.res.delivered_total += 1;
                self.d_del += 1;
                if now >= self.warm_end && now < self.run_end {
                    self.res.delivered_window += 1;
                }
                if t >= self.warm_end && t < self.run_end {
                    if let Some(h) = &mut self.res.e2e {
                        h.saturating_record(now.saturating_sub(t) / 1000);
                    }
                }
            }
            "error" => {
                let code = f.code.as_deref().unwrap_or("unknown").to_string();
                *self.res.errors.entry(code).or_default() += 1;
                if let (Some(st), Some((s, n, _))) = (
                    self.send.as_mut(),
                    f.reference.as_deref().and_then(parse_cmid),
                ) {
                    if s == self.idx && !st.acked_bits.get(n) {
                        // Answered but not stored: expected nowhere.
                        st.inflight = st.inflight.saturating_sub(1);
                        st.errored += 1;
                        self.d_out -= 1;
                    }
                }
            }
            // ready, pong, presence, receipt, typing: nothing to count here.
            _ => {}
        }
    }
}

impl BitSet {
    pub fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1u64 << (i % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_msg_id_round_trips() {
        let s = format!("{:x}-{:x}-{:x}", 7u32, 123_456u64, 9_876_543_210u64);
        assert_eq!(parse_cmid(&s), Some((7, 123_456, 9_876_543_210)));
        assert_eq!(parse_cmid("7-1"), None);
        assert_eq!(parse_cmid("7-1-2-3"), None);
        assert_eq!(parse_cmid("someone-else's-id"), None);
    }

    #[test]
    fn bitset_counts_what_is_missing() {
        let mut acked = BitSet::default();
        let mut got = BitSet::default();
        for i in 0..200 {
            assert!(!acked.test_set(i));
        }
        assert!(acked.test_set(5));
        for i in (0..200).filter(|i| i % 3 != 0) {
            got.test_set(i);
        }
        assert_eq!(acked.missing_in(Some(&got)), 67);
        assert_eq!(acked.missing_in(None), 200);
        assert!(got.get(1) && !got.get(3) && !got.get(10_000));
    }

    #[test]
    fn frames_parse_without_copying_ids() {
        let f: InFrame = serde_json::from_str(
            r#"{"type":"message","id":"m1","room_id":"r1","seq":3,"sender_id":"u1","client_msg_id":"1-2-3","body":"hi \"there\"","created_at":"x"}"#,
        )
        .unwrap();
        assert_eq!(&*f.ty, "message");
        assert_eq!(f.seq, Some(3));
        assert_eq!(f.client_msg_id.as_deref(), Some("1-2-3"));
        let e: InFrame = serde_json::from_str(
            r#"{"type":"error","code":"forbidden","message":"no","ref":"0-1-2"}"#,
        )
        .unwrap();
        assert_eq!(e.code.as_deref(), Some("forbidden"));
        assert_eq!(e.reference.as_deref(), Some("0-1-2"));
    }
}
