// Drives chatd's /socket.io/ endpoint with the real socket.io-client 4.
// Run by tests/socketio.rs (cargo test); by hand:
//   CHATD_URL=http://127.0.0.1:8080 SCENARIO=two_users node tests/socketio/client.mjs
//
// Scenarios (env SCENARIO):
//   two_users  registers and logs in two users over HTTP, then: bad tokens
//              are refused at connect, ready, send with acknowledgement,
//              receive, receipts, typing, ping, errors, reconnect and catch-up.
//   mixed      one Socket.IO user (env SIO_TOKEN, ROOM_ID, PEER_ID) chatting
//              with a /ws user driven by the Rust test, step by step: it
//              prints one JSON line per step on stdout and reads the Rust
//              side's lines ("go ...") on stdin.
//   heartbeat  connects (SIO_TOKEN) and reports the Engine.IO timers of
//              the handshake, the gaps between the server's pings and the
//              Socket.IO and Engine.IO ids.
//   capped     connects (SIO_TOKEN) to a user at the per-user socket cap:
//              must get connect_error too_many_sockets.
//
// Every wait has a timeout; a failure exits 1 with the reason on stderr.

import { existsSync } from "node:fs";
import { createInterface } from "node:readline";

let io;
try {
  ({ io } = await import("socket.io-client"));
} catch (e) {
  console.error(
    "FAIL: socket.io-client is not installed: run `npm install` in tests/socketio " +
      "(scripts/test.sh does): " + e.message,
  );
  process.exit(2);
}

const URL = process.env.CHATD_URL;
const WAIT_MS = Number(process.env.WAIT_MS || 10000);
if (!URL) fail("CHATD_URL is not set");

function fail(msg) {
  console.error("FAIL: " + msg);
  process.exit(1);
}

function step(name, data = {}) {
  process.stdout.write(JSON.stringify({ step: name, ...data }) + "\n");
}

function check(cond, msg) {
  if (!cond) throw new Error("check failed: " + msg);
}

function eq(actual, expected, what) {
  if (JSON.stringify(actual) !== JSON.stringify(expected)) {
    throw new Error(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(actual)}`);
  }
}

async function http(method, path, token, body) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  const r = await fetch(URL + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text ? JSON.parse(text) : null };
}

const PASSWORD = "password123";

async function register(prefix) {
  const name = prefix + Math.random().toString(36).slice(2, 10);
  const r = await http("POST", "/api/v1/auth/register", null, {
    username: name,
    email: `${name}@example.com`,
    password: PASSWORD,
  });
  eq(r.status, 201, "register status " + JSON.stringify(r.body));
  // Log in as the app does.
  const l = await http("POST", "/api/v1/auth/login", null, { login: name, password: PASSWORD });
  eq(l.status, 200, "login status " + JSON.stringify(l.body));
  return { id: l.body.user.id, username: name, token: l.body.access_token };
}

// A socket.io-client socket that records every event it gets, in order,
// and lets the test wait for one with a timeout.
class Client {
  constructor(name, opts) {
    this.name = name;
    this.log = []; // every event, in arrival order: {event, payload, n}
    this.unseen = []; // not yet consumed by a wait
    this.waiters = [];
    this.n = 0;
    this.socket = io(URL, { autoConnect: false, reconnectionDelay: 100, ...opts });
    this.socket.onAny((event, payload) => this.push(event, payload));
    for (const ev of ["connect", "connect_error", "disconnect"]) {
      this.socket.on(ev, (arg) =>
        this.push("$" + ev, ev === "connect_error" ? { message: arg.message } : arg),
      );
    }
  }

  push(event, payload) {
    const e = { event, payload, n: this.n++ };
    this.log.push(e);
    const i = this.waiters.findIndex((w) => w.event === event && w.pred(payload));
    if (i >= 0) {
      const [w] = this.waiters.splice(i, 1);
      clearTimeout(w.timer);
      w.resolve(e);
    } else {
      this.unseen.push(e);
    }
  }

  // The next event `event` matching `pred` (already received or to come).
  next(event, pred = () => true, what = event) {
    const i = this.unseen.findIndex((e) => e.event === event && pred(e.payload));
    if (i >= 0) return Promise.resolve(this.unseen.splice(i, 1)[0]);
    return new Promise((resolve, reject) => {
      const w = { event, pred, resolve };
      w.timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(w), 1);
        const seen = this.log.slice(-15).map((e) => e.event + " " + JSON.stringify(e.payload));
        reject(
          new Error(
            `${this.name}: no ${what} within ${WAIT_MS} ms; last events:\n  ` + seen.join("\n  "),
          ),
        );
      }, WAIT_MS);
      this.waiters.push(w);
    });
  }

  async payload(event, pred, what) {
    return (await this.next(event, pred, what)).payload;
  }

  // Connects and returns the `ready` payload (the first event).
  async connect() {
    this.unseen = this.unseen.filter((e) => e.event !== "ready");
    const from = this.n;
    this.socket.connect();
    const ready = await this.next("ready", () => true, "ready after connect");
    const first = this.log.find((e) => e.n >= from && !e.event.startsWith("$"));
    eq(first.event, "ready", `${this.name}: first event after connect`);
    return ready.payload;
  }

  // Sends with an acknowledgement callback; resolves with the callback's payload.
  sendAck(room_id, client_msg_id, body) {
    return this.socket
      .timeout(WAIT_MS)
      .emitWithAck("send", { room_id, client_msg_id, body });
  }

  // Proves nothing of `event` is pending: a ping round trip comes back
  // (frames are ordered) with no such event before its pong.
  async assertNone(event, pred = () => true) {
    const nonce = "n" + Math.random();
    this.socket.emit("ping", { nonce });
    const pong = await this.next("pong", (p) => p.nonce === nonce, "pong");
    const bad = this.unseen.find((e) => e.event === event && e.n < pong.n && pred(e.payload));
    check(!bad, `${this.name}: unexpected ${event} ${JSON.stringify(bad && bad.payload)}`);
  }

  close() {
    this.socket.disconnect();
  }
}

// A connection that must be refused at connect with a clear error.
async function refused(opts, what) {
  const c = new Client("refused", { ...opts, reconnection: false });
  c.socket.connect();
  const e = await c.payload("$connect_error", () => true, "connect_error for " + what);
  c.close();
  check(/unauthorized/.test(e.message), `${what}: connect_error says why: ${e.message}`);
  check(!c.log.some((x) => x.event === "ready"), `${what}: no ready`);
  return e.message;
}

async function twoUsers() {
  const alice = await register("sa");
  const bob = await register("sb");
  const room = await http("POST", "/api/v1/rooms", alice.token, { kind: "direct", peer: bob.id });
  check(room.status === 201 || room.status === 200, "room created " + JSON.stringify(room.body));
  const roomId = room.body.id;
  step("registered", { alice: alice.id, bob: bob.id, room_id: roomId });

  // Bad tokens are refused at connect.
  const m1 = await refused({ auth: { token: "garbage" } }, "bad token");
  await refused({}, "no token");
  await refused({ auth: { token: alice.token + "x" } }, "tampered token");
  step("refused", { message: m1 });

  // Alice: WebSocket only, token in auth. Bob: default transports (long
  // polling, then the upgrade), token in the Authorization header.
  const a = new Client("alice", { transports: ["websocket"], auth: { token: alice.token } });
  const b = new Client("bob", { extraHeaders: { authorization: `Bearer ${bob.token}` } });
  const ra = await a.connect();
  eq(ra.user_id, alice.id, "ready.user_id");
  check(typeof ra.session_id === "string" && typeof ra.node_id === "string", "ready ids");
  eq(ra.rooms.map((r) => r.room_id), [roomId], "ready.rooms");
  const rb = await b.connect();
  eq(rb.user_id, bob.id, "bob ready.user_id");
  // Alice sees Bob come online.
  await a.payload("presence", (p) => p.user_id === bob.id && p.online, "presence bob online");
  step("connected", { bob_transport: b.socket.io.engine.transport.name });

  // Send with acknowledgement: the callback gets the ack once durable.
  const ack = await a.sendAck(roomId, "a-1", " hello bob ");
  eq(ack.type, "ack", "ack type " + JSON.stringify(ack));
  eq(ack.seq, 1, "ack.seq");
  eq(ack.client_msg_id, "a-1", "ack.client_msg_id");
  eq(ack.room_id, roomId, "ack.room_id");
  check(typeof ack.message_id === "string" && typeof ack.created_at === "string", "ack ids");
  // Durable: the store has it.
  const hist = await http("GET", `/api/v1/rooms/${roomId}/messages`, alice.token);
  eq(hist.body.messages.map((m) => m.id), [ack.message_id], "history after ack");
  // Bob receives it.
  const msg = await b.payload("message", (m) => m.id === ack.message_id, "bob's message");
  eq([msg.body, msg.seq, msg.sender_id, msg.client_msg_id], ["hello bob", 1, alice.id, "a-1"], "message");
  // An acknowledged send is answered only through its callback.
  await a.assertNone("ack");
  // A resend of the same client_msg_id gets the same ack.
  const again = await a.sendAck(roomId, "a-1", "hello bob");
  eq(again, ack, "idempotent resend");
  step("acked", { ack });

  // Receipts: Bob says delivered, then read; Alice sees both.
  b.socket.emit("delivered", { room_id: roomId, up_to_seq: 1 });
  b.socket.emit("read", { room_id: roomId, up_to_seq: 1 });
  const rd = await a.payload("receipt", (r) => r.kind === "delivered" && r.user_id === bob.id);
  eq([rd.room_id, rd.up_to_seq], [roomId, 1], "delivered receipt");
  const rr = await a.payload("receipt", (r) => r.kind === "read" && r.user_id === bob.id);
  eq(rr.up_to_seq, 1, "read receipt");
  step("receipts");

  // A send without a callback is answered with an `ack` event.
  b.socket.emit("send", { room_id: roomId, client_msg_id: "b-1", body: "hi alice" });
  const backEv = await b.payload("ack", (x) => x.client_msg_id === "b-1", "ack event");
  eq(backEv.seq, 2, "ack event seq");
  const m2 = await a.payload("message", (m) => m.client_msg_id === "b-1", "alice's message");
  eq(m2.body, "hi alice", "message body");

  // Typing.
  a.socket.emit("typing", { room_id: roomId, state: true });
  const t = await b.payload("typing", (x) => x.user_id === alice.id, "typing");
  eq([t.room_id, t.state], [roomId, true], "typing");

  // Ping: as an event, and with a callback.
  a.socket.emit("ping", { nonce: 7 });
  eq((await a.payload("pong", (p) => p.nonce === 7)).type, "pong", "pong event");
  const pong = await a.socket.timeout(WAIT_MS).emitWithAck("ping", { nonce: "cb" });
  eq(pong, { type: "pong", nonce: "cb" }, "pong callback");

  // Errors: through the callback for acknowledged sends, else as events.
  const e1 = await a.sendAck("no-such-room", "a-err", "x");
  eq([e1.type, e1.code, e1.ref], ["error", "not_found", "a-err"], "error ack: no room");
  const e2 = await a.sendAck(roomId, "a-empty", "   ");
  eq([e2.type, e2.ref], ["error", "a-empty"], "error ack: empty body " + JSON.stringify(e2));
  const e3 = await a.sendAck(roomId, "", "x");
  eq([e3.type, e3.code], ["error", "invalid_client_msg_id"], "error ack: bad id");
  const e4 = await a.socket.timeout(WAIT_MS).emitWithAck("send", { room_id: roomId });
  eq([e4.type, e4.code], ["error", "invalid_request"], "error ack: missing fields");
  a.socket.emit("read", { room_id: roomId, up_to_seq: "x" });
  const e5 = await a.payload("error", (e) => e.ref === "read", "error event for read");
  eq(e5.code, "invalid_request", "error event code");
  a.socket.emit("bogus", {});
  eq((await a.payload("error", (e) => e.ref === "bogus")).code, "unknown_type", "unknown event");
  a.socket.emit("send", { room_id: roomId, client_msg_id: "a-noack", body: "" });
  eq((await a.payload("error", (e) => e.ref === "a-noack")).type, "error", "error event for send");
  step("errors");

  // Sync: the history after a seq, as message events.
  a.socket.emit("sync", { room_id: roomId, after_seq: 0 });
  const s1 = await a.payload("message", (m) => m.seq === 1, "sync seq 1");
  const s2 = await a.payload("message", (m) => m.seq === 2, "sync seq 2");
  eq([s1.id, s2.client_msg_id], [ack.message_id, "b-1"], "sync");

  // Reconnect: Bob goes away, Alice sends two messages, Bob comes back and
  // gets `ready`, then what he missed.
  b.close();
  await a.payload("presence", (p) => p.user_id === bob.id && !p.online, "presence bob offline");
  const x1 = await a.sendAck(roomId, "a-2", "while you were away 1");
  const x2 = await a.sendAck(roomId, "a-3", "while you were away 2");
  eq([x1.type, x2.type], ["ack", "ack"], "acks while bob is away");
  const ready2 = await b.connect();
  const cur = ready2.rooms.find((r) => r.room_id === roomId);
  eq(cur.last_seq, x2.seq, "ready: last_seq");
  check(cur.delivered_seq < x1.seq && cur.read_seq >= 1, "ready cursors " + JSON.stringify(cur));
  const g1 = await b.next("message", (m) => m.id === x1.message_id, "missed message 1");
  const g2 = await b.next("message", (m) => m.id === x2.message_id, "missed message 2");
  check(g1.n < g2.n, "missed messages in seq order");
  const readyEv = b.log.filter((e) => e.event === "ready").pop();
  check(readyEv.n < g1.n, "ready before the missed messages");
  step("caught_up", { seqs: [g1.payload.seq, g2.payload.seq] });

  // A dropped connection (not a client disconnect): the client reconnects
  // by itself and gets `ready` again; sending works afterwards.
  const before = a.log.filter((e) => e.event === "ready").length;
  a.socket.io.engine.close();
  await a.payload("$disconnect", () => true, "alice disconnect");
  await a.next("ready", () => a.log.filter((e) => e.event === "ready").length > before, "ready after auto-reconnect");
  const y = await a.sendAck(roomId, "a-4", "back again");
  eq(y.type, "ack", "ack after auto-reconnect");
  await b.payload("message", (m) => m.id === y.message_id, "message after alice's reconnect");
  step("auto_reconnect");

  // A long-polling-only device of Alice's gets everything too.
  const p = new Client("alice-polling", { transports: ["polling"], auth: { token: alice.token } });
  await p.connect();
  eq(p.socket.io.engine.transport.name, "polling", "polling transport");
  const z = await p.sendAck(roomId, "p-1", "over long polling");
  eq([z.type, z.seq], ["ack", y.seq + 1], "ack over polling");
  await b.payload("message", (m) => m.id === z.message_id, "message sent over polling");
  const echo = await a.payload("message", (m) => m.id === z.message_id, "echo to alice's other device");
  eq(echo.body, "over long polling", "echo body");
  b.socket.emit("send", { room_id: roomId, client_msg_id: "b-2", body: "to polling" });
  eq((await p.payload("message", (m) => m.client_msg_id === "b-2")).body, "to polling", "polling receives");
  step("polling");
  p.close();

  a.close();
  b.close();
}

// Stdin lines from the Rust side.
const lines = createInterface({ input: process.stdin });
const incoming = [];
const lineWaiters = [];
lines.on("line", (l) => {
  if (lineWaiters.length) lineWaiters.shift()(l);
  else incoming.push(l);
});
function readLine(what, ms = WAIT_MS) {
  if (incoming.length) return Promise.resolve(incoming.shift());
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("no line from the test for " + what)), ms);
    lineWaiters.push((l) => {
      clearTimeout(t);
      resolve(l);
    });
  });
}

async function mixed() {
  const token = process.env.SIO_TOKEN;
  const roomId = process.env.ROOM_ID;
  const peer = process.env.PEER_ID;
  check(token && roomId && peer, "SIO_TOKEN, ROOM_ID and PEER_ID are set");
  const s = new Client("sio", { transports: ["websocket"], auth: { token } });
  const ready = await s.connect();
  step("ready", { user_id: ready.user_id });

  // Socket.IO → /ws.
  const ack = await s.sendAck(roomId, "sio-1", "from socket.io");
  eq(ack.type, "ack", "ack " + JSON.stringify(ack));
  step("acked", { ack });

  // /ws → Socket.IO.
  eq(await readLine("ws sent"), "go ws-sent", "line from the test");
  const m = await s.payload("message", (x) => x.sender_id === peer, "the /ws user's message");
  eq(m.body, "from ws", "body from /ws");
  step("got_message", { message: m });
  s.socket.emit("read", { room_id: roomId, up_to_seq: m.seq });
  // The /ws user read ours.
  const r = await s.payload("receipt", (x) => x.user_id === peer && x.kind === "read", "receipt from /ws");
  eq(r.up_to_seq, ack.seq, "receipt seq");
  step("receipt", { receipt: r });
  eq(await readLine("done"), "go done", "line from the test");
  s.close();
}

// Connected, then disconnected by an operator: a `close` event with 4001,
// then a server-side disconnect (the client does not reconnect by itself).
async function kicked() {
  const s = new Client("sio", { transports: ["websocket"], auth: { token: process.env.SIO_TOKEN } });
  await s.connect();
  step("ready");
  const c = await s.payload("close", () => true, "close event");
  const reason = await s.payload("$disconnect", () => true, "disconnect");
  step("kicked", { close: c, reason });
}

// Sends 200 messages with callbacks; the test stops the node meanwhile.
// Every ack callback must come before the `close` event (1001), and the
// transport then closes (the client would reconnect by itself).
async function shutdown() {
  const roomId = process.env.ROOM_ID;
  const s = new Client("sio", {
    transports: ["websocket"],
    auth: { token: process.env.SIO_TOKEN },
    reconnection: false,
  });
  await s.connect();
  step("ready");
  let acked = 0;
  let refused = 0;
  let closed = false;
  let ackAfterClose = false;
  let first;
  const firstAck = new Promise((r) => (first = r));
  for (let i = 0; i < 200; i++) {
    s.socket.emit("send", { room_id: roomId, client_msg_id: "s" + i, body: "x" }, (a) => {
      if (a.type === "ack") {
        acked++;
        if (closed) ackAfterClose = true;
        first();
      } else if (a.code === "unavailable") {
        refused++; // queued but not handled when the node stopped: resend after reconnecting
      } else {
        fail("unexpected answer " + JSON.stringify(a));
      }
    });
  }
  await firstAck;
  step("sending");
  const c = await s.payload("close", () => true, "close event");
  closed = true;
  const reason = await s.payload("$disconnect", () => true, "disconnect");
  step("closed", { code: c.code, reason, acked, refused, ack_after_close: ackAfterClose });
}

// A client that stops reading while the test floods it: the server must
// close the socket (slow consumer) rather than drop frames. Before the
// close the client got a gap-free prefix of the room; after reconnecting
// it gets the rest after `ready`. To stop reading, the event loop is
// blocked (socket buffers fill up) until the test creates RESUME_FLAG.
async function slow() {
  const s = new Client("sio", { transports: ["websocket"], auth: { token: process.env.SIO_TOKEN } });
  await s.connect();
  step("paused");
  const flag = process.env.RESUME_FLAG;
  const nap = new Int32Array(new SharedArrayBuffer(4));
  const until = Date.now() + 6 * WAIT_MS;
  while (!existsSync(flag)) {
    if (Date.now() > until) fail("the test did not create " + flag);
    Atomics.wait(nap, 0, 0, 20);
  }
  const reason = await s.payload("$disconnect", () => true, "disconnect of the slow socket");
  const close = s.log.find((e) => e.event === "close");
  const before = s.log.filter((e) => e.event === "message").map((e) => e.payload.seq);
  before.forEach((seq, i) => eq(seq, i + 1, "messages before the close: gap-free, in order"));
  // Reconnect as the docs say ("io server disconnect" is not retried by the client).
  if (reason === "io server disconnect") s.socket.connect();
  const ready = await s.payload("ready", () => true, "ready after the slow-consumer close");
  const last = ready.rooms.find((r) => r.room_id === process.env.ROOM_ID).last_seq;
  const seen = new Set(before);
  while (seen.size < last) {
    const m = await s.payload("message", (m) => !seen.has(m.seq), `message ${seen.size + 1}/${last}`);
    seen.add(m.seq);
  }
  step("resynced", { reason, close: close && close.payload, before: before.length, total: last });
  s.close();
}

// The server's pings come at the configured interval (the test sets a
// short one, as the Socket.IO protocol test suites do).
async function heartbeat() {
  const s = new Client("sio", { transports: ["websocket"], auth: { token: process.env.SIO_TOKEN } });
  const pings = [];
  s.socket.io.on("ping", () => pings.push(Date.now()));
  await s.connect();
  const until = Date.now() + WAIT_MS;
  while (pings.length < 4) {
    if (Date.now() > until) fail(`${pings.length} pings from the server within ${WAIT_MS} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const gaps = pings.slice(1).map((t, i) => t - pings[i]);
  // Still connected after several intervals: the pongs came in time.
  await s.assertNone("close");
  const e = s.socket.io.engine;
  step("heartbeat", {
    ping_interval: e._pingInterval ?? e.pingInterval,
    ping_timeout: e._pingTimeout ?? e.pingTimeout,
    gaps,
    sid: s.socket.id,
    engine_sid: e.id,
  });
  s.close();
}

async function capped() {
  const c = new Client("capped", {
    transports: ["websocket"],
    auth: { token: process.env.SIO_TOKEN },
    reconnection: false,
  });
  c.socket.connect();
  const e = await c.payload("$connect_error", () => true, "connect_error at the cap");
  c.close();
  check(!c.log.some((x) => x.event === "ready"), "no ready over the cap");
  step("capped", { message: e.message });
}

const scenarios = { two_users: twoUsers, mixed, kicked, shutdown, slow, heartbeat, capped };
const run = scenarios[process.env.SCENARIO];
if (!run) fail(`unknown SCENARIO ${process.env.SCENARIO}`);
try {
  await run();
  step("done");
  process.exit(0);
} catch (e) {
  fail(e.stack || String(e));
}
