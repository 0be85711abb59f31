// Minimal Node.js relay for chat-bench: no auth, no storage, in-memory rooms.
// Speaks the same frames as chatd (shared/API.md): register/rooms stubs over HTTP,
// /ws with ready / send -> ack + message / ping -> pong.
// Usage: node server.js [HOST:PORT]   (default 127.0.0.1:9102, or $RELAY_LISTEN)
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const listen = process.argv[2] || process.env.RELAY_LISTEN || '127.0.0.1:9102';
const [host, portStr] = listen.split(':');

let nextId = 0;
let nextMsg = 0;
let nextConn = 0;
const rooms = new Map();   // room id -> { members: [user id], seq }
const direct = new Map();  // "a|b" -> room id
const conns = new Map();   // user id -> Set of sockets

function send(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    let body = {};
    if (chunks.length) {
      try { body = JSON.parse(Buffer.concat(chunks).toString('utf8')); } catch (e) {
        return send(res, 400, { error: { code: 'invalid_request', message: 'bad json' } });
      }
    }
    const now = new Date().toISOString();
    if (req.method === 'GET' && (req.url === '/healthz' || req.url === '/readyz')) {
      return send(res, 200, { status: 'ok' });
    }
    if (req.method === 'POST' && req.url === '/api/v1/auth/register') {
      const id = 'u' + (++nextId);
      return send(res, 201, {
        user: { id, username: body.username, email: body.email, display_name: body.display_name || null, created_at: now },
        access_token: id, refresh_token: 'r-' + id, expires_in: 3600,
      });
    }
    if (req.method === 'POST' && req.url === '/api/v1/rooms') {
      const auth = req.headers.authorization || '';
      const me = auth.startsWith('Bearer ') ? auth.slice(7) : null;
      if (!me) return send(res, 401, { error: { code: 'unauthorized', message: 'no token' } });
      let members; let id; let status = 201;
      if (body.kind === 'direct') {
        const key = [me, body.peer].sort().join('|');
        members = [me, body.peer];
        if (direct.has(key)) { id = direct.get(key); status = 200; } else {
          id = 'r' + (++nextId); direct.set(key, id);
        }
      } else {
        members = [me, ...(body.members || []).filter((m) => m !== me)];
        id = 'r' + (++nextId);
      }
      if (status === 201) rooms.set(id, { members, seq: 0 });
      return send(res, status, {
        id, kind: body.kind, name: body.name || null,
        members: members.map((m) => ({ user_id: m, role: m === me ? 'owner' : 'member' })),
        created_at: now, last_seq: 0,
      });
    }
    return send(res, 404, { error: { code: 'not_found', message: 'not found' } });
  });
});

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://x');
  let token = url.searchParams.get('access_token');
  if (!token && (req.headers.authorization || '').startsWith('Bearer ')) token = req.headers.authorization.slice(7);
  if (url.pathname !== '/ws' || !token) {
    socket.write('HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n');
    socket.destroy();
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => onConnection(ws, token));
});

function onConnection(ws, me) {
  ws.connId = ++nextConn;
  if (!conns.has(me)) conns.set(me, new Set());
  conns.get(me).add(ws);
  ws.send(JSON.stringify({ type: 'ready', user_id: me, session_id: 's' + ws.connId, node_id: 'node-relay', rooms: [] }));
  ws.on('message', (data, isBinary) => {
    if (isBinary) return;
    let f;
    try { f = JSON.parse(data.toString('utf8')); } catch (e) {
      ws.send('{"type":"error","code":"invalid_frame","message":"not a JSON frame"}');
      return;
    }
    if (f.type === 'send') {
      const room = rooms.get(f.room_id);
      if (!room) {
        ws.send(JSON.stringify({ type: 'error', code: 'not_found', message: 'no such room', ref: f.client_msg_id }));
        return;
      }
      const seq = ++room.seq;
      const id = 'm' + (++nextMsg);
      const createdAt = new Date().toISOString();
      ws.send(JSON.stringify({ type: 'ack', client_msg_id: f.client_msg_id, message_id: id, room_id: f.room_id, seq, created_at: createdAt }));
      const out = JSON.stringify({
        type: 'message', id, room_id: f.room_id, seq, sender_id: me,
        client_msg_id: f.client_msg_id, body: f.body, created_at: createdAt,
      });
      for (const m of room.members) {
        const set = conns.get(m);
        if (!set) continue;
        for (const c of set) if (c !== ws) c.send(out);
      }
    } else if (f.type === 'ping') {
      ws.send(JSON.stringify(f.nonce !== undefined ? { type: 'pong', nonce: f.nonce } : { type: 'pong' }));
    }
  });
  ws.on('close', () => { conns.get(me).delete(ws); });
  ws.on('error', () => {});
}

server.listen(Number(portStr), host, () => console.error(`node-relay listening on ${listen}`));
