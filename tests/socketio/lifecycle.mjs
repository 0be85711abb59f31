// Message lifecycle over Socket.IO (run by tests/lifecycle.rs): two users
// (env TOKEN_A, TOKEN_B) in ROOM_ID where A sent MSG_ID. A edits, B reacts
// and tries to delete A's message, A deletes it: each request is answered
// by a `done` or `error` event, and the other user gets `message_updated`.
// Prints "OK" and exits 0; a failure exits 1 with the reason on stderr.

import { io } from "socket.io-client";

const URL = process.env.CHATD_URL;
const WAIT_MS = Number(process.env.WAIT_MS || 10000);
const ROOM = process.env.ROOM_ID;
const MSG = process.env.MSG_ID;

function fail(msg) {
  console.error("FAIL: " + msg);
  process.exit(1);
}

class Client {
  constructor(name, token) {
    this.name = name;
    this.events = [];
    this.waiters = [];
    this.socket = io(URL, { transports: ["websocket"], auth: { token }, autoConnect: false });
    this.socket.onAny((event, payload) => {
      this.events.push({ event, payload });
      this.waiters = this.waiters.filter((w) => !w());
    });
  }
  // Resolves with the first (and removes it) event matching `pred`.
  wait(event, pred, what) {
    return new Promise((resolve, reject) => {
      const look = () => {
        const i = this.events.findIndex((e) => e.event === event && pred(e.payload));
        if (i < 0) return false;
        resolve(this.events.splice(i, 1)[0].payload);
        return true;
      };
      if (look()) return;
      this.waiters.push(look);
      setTimeout(() => reject(new Error(`${this.name}: timed out waiting for ${what}`)), WAIT_MS);
    });
  }
  async connect() {
    this.socket.connect();
    return this.wait("ready", () => true, "ready");
  }
}

try {
  const a = new Client("a", process.env.TOKEN_A);
  const b = new Client("b", process.env.TOKEN_B);
  await a.connect();
  await b.connect();

  a.socket.emit("edit", { room_id: ROOM, message_id: MSG, body: "edited over socket.io", ref: "e1" });
  await a.wait("done", (d) => d.ref === "e1", "done e1");
  const u1 = await b.wait("message_updated", (u) => u.message.id === MSG && u.message.edited_at, "edit update");
  if (u1.message.body !== "edited over socket.io") fail("edited body: " + JSON.stringify(u1));

  b.socket.emit("react", { room_id: ROOM, message_id: MSG, emoji: "🎉", on: true, ref: "r1" });
  await b.wait("done", (d) => d.ref === "r1", "done r1");
  await a.wait("message_updated", (u) => u.message.reactions.length === 1 && u.message.reactions[0].emoji === "🎉", "reaction update");

  b.socket.emit("delete", { room_id: ROOM, message_id: MSG, ref: "d0" });
  const err = await b.wait("error", (e) => e.ref === "d0", "forbidden delete");
  if (err.code !== "forbidden") fail("delete by another: " + JSON.stringify(err));

  a.socket.emit("delete", { room_id: ROOM, message_id: MSG, ref: "d1" });
  await a.wait("done", (d) => d.ref === "d1", "done d1");
  const u3 = await b.wait("message_updated", (u) => u.message.deleted === true, "tombstone");
  if (u3.message.body !== "" || u3.message.reactions.length !== 0) fail("tombstone: " + JSON.stringify(u3));

  a.socket.close();
  b.socket.close();
  console.log("OK");
  process.exit(0);
} catch (e) {
  fail(e.message);
}
