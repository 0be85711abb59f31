// chatd web page: plain JavaScript, no build step, no framework, no outside URL.
// It speaks only the public contract: HTTP under /api/v1, live traffic on /ws.
'use strict';
(() => {
  const API = '/api/v1';
  const STORE_KEY = 'chatd.auth';
  const PAGE = 50;             // history page size
  const PING_EVERY = 20000;    // heartbeat interval while connected
  const PONG_WITHIN = 10000;   // no frame for this long after a ping: the socket is dead
  const TYPING_IDLE = 3000;    // typing stops after this long without a key
  const TYPING_SHOWN = 7000;   // a peer's typing=true is shown at most this long
  const tabId = uuid();

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs = {}, ...kids) => {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'text') n.textContent = v;
      else if (k === 'class') n.className = v;
      else if (k.startsWith('on')) n.addEventListener(k.slice(2), v);
      else n.setAttribute(k, v === true ? '' : String(v));
    }
    for (const kid of kids) if (kid) n.append(kid);
    return n;
  };
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    // crypto.randomUUID needs a secure context; getRandomValues does not.
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  // ------------------------------------------------------------------ errors

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }
  class SessionEnded extends Error {}

  const FRIENDLY = {
    invalid_credentials: 'Wrong username, e-mail or password.',
    username_taken: 'That username is already taken.',
    email_taken: 'An account with that e-mail already exists.',
    rate_limited: 'Too many requests. Please wait a moment and try again.',
    unauthorized: 'You are not logged in any more.',
    forbidden: 'You are not allowed to do that.',
    not_found: 'Not found.',
    payload_too_large: 'That is too large for the server.',
    unavailable: 'The server is unavailable right now. Please try again shortly.',
    network: 'Could not reach the server. Check your connection.',
  };

  function words(code, message) {
    const m = (message || '').trim();
    if (m) return m.charAt(0).toUpperCase() + m.slice(1);
    return FRIENDLY[code] || `Something went wrong (${code || 'unknown error'}).`;
  }

  async function readError(res) {
    let code = `http_${res.status}`;
    let message = '';
    try {
      const body = await res.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || '';
      }
    } catch (_) { /* not JSON: fall back to the status */ }
    if (!message) message = FRIENDLY[code] || `The server answered ${res.status} ${res.statusText || ''}`.trim();
    if (res.status === 429) {
      const after = res.headers.get('Retry-After');
      if (after) message += ` (try again in ${after} s)`;
    }
    return new ApiError(res.status, code, words(code, message));
  }

  const errorBox = () => $('errors');
  // Transient errors (the server could not be reached) go away once the socket is back.
  function showError(text, { transient = false } = {}) {
    const box = errorBox();
    // The same words twice in a row only once.
    for (const e of [...box.children]) if (e.dataset.text === text) e.remove();
    const item = el('div', { class: 'error', 'data-testid': 'error', 'data-text': text, 'data-transient': String(transient) },
      el('span', { text }),
      el('button', { type: 'button', 'aria-label': 'Dismiss', title: 'Dismiss', text: '×',
        onclick: () => item.remove() }));
    box.append(item);
    while (box.children.length > 4) box.firstElementChild.remove();
  }
  function report(err, prefix) {
    if (err instanceof SessionEnded) return;
    console.error(err);
    const msg = err instanceof ApiError ? err.message : (err && err.message) || String(err);
    showError(prefix ? `${prefix}: ${msg}` : msg, { transient: err instanceof ApiError && err.status === 0 });
  }
  // Wrap an event handler so that nothing it throws is swallowed.
  const guard = (fn, prefix) => (...args) => {
    try {
      const r = fn(...args);
      if (r && typeof r.catch === 'function') r.catch((e) => report(e, prefix));
    } catch (e) { report(e, prefix); }
  };

  // ------------------------------------------------------------------ tokens

  let auth = loadAuth(); // {access_token, refresh_token, expires_at, lifetime, user}
  let refreshTimer = null;
  let refreshing = null;

  function loadAuth() {
    try { return JSON.parse(localStorage.getItem(STORE_KEY) || 'null'); } catch (_) { return null; }
  }
  function saveAuth(a) {
    auth = a;
    if (a) localStorage.setItem(STORE_KEY, JSON.stringify(a));
    else localStorage.removeItem(STORE_KEY);
    return shared.put(a);
  }

  // localStorage reaches other tabs late (each renderer keeps its own copy), so a
  // tab that just took the refresh lock may still see the pair that another tab has
  // already spent. IndexedDB transactions are seen by every tab once committed: the
  // pair is also kept there and read from there inside the lock.
  const shared = (() => {
    let dbp = null;
    const open = () => {
      if (!window.indexedDB) return Promise.resolve(null);
      if (!dbp) {
        dbp = new Promise((resolve) => {
          try {
            const req = indexedDB.open('chatd', 1);
            req.onupgradeneeded = () => req.result.createObjectStore('kv');
            req.onsuccess = () => resolve(req.result);
            req.onerror = () => resolve(null);
            req.onblocked = () => resolve(null);
          } catch (_) { resolve(null); }
        });
      }
      return dbp;
    };
    const tx = async (mode, work) => {
      const db = await open();
      if (!db) return undefined;
      return new Promise((resolve) => {
        let out;
        try {
          const t = db.transaction('kv', mode);
          const r = work(t.objectStore('kv'));
          if (r) r.onsuccess = () => { out = r.result; };
          t.oncomplete = () => resolve(out);
          t.onerror = () => resolve(undefined);
          t.onabort = () => resolve(undefined);
        } catch (_) { resolve(undefined); }
      });
    };
    return {
      get: () => tx('readonly', (st) => st.get('auth')),
      put: (a) => tx('readwrite', (st) => (a ? st.put(a, 'auth') : st.delete('auth'))),
    };
  })();
  // The newer of the two stored pairs (they are stamped when issued).
  async function storedAuth() {
    const a = loadAuth();
    const b = await shared.get();
    if (!a) return null; // logged out (in this tab or another)
    if (!b) return a;
    return (b.issued_at || 0) > (a.issued_at || 0) ? b : a;
  }
  function jwtExp(token) {
    try {
      const part = token.split('.')[1];
      const json = JSON.parse(atob(part.replace(/-/g, '+').replace(/_/g, '/')));
      return typeof json.exp === 'number' ? json.exp * 1000 : null;
    } catch (_) { return null; }
  }
  function authFrom(body, user) {
    let lifetime = Number(body.expires_in) * 1000;
    if (!(lifetime > 0)) {
      const exp = jwtExp(body.access_token);
      lifetime = exp ? exp - Date.now() : 5 * 60 * 1000;
    }
    return {
      issued_at: Date.now(),
      access_token: body.access_token,
      refresh_token: body.refresh_token,
      expires_at: Date.now() + lifetime,
      lifetime,
      user: body.user || user || null,
    };
  }
  // Refresh this long before the access token expires.
  const margin = (a) => Math.min(60000, Math.max(3000, (a.lifetime || 60000) * 0.2));

  function scheduleRefresh() {
    clearTimeout(refreshTimer);
    if (!auth) return;
    const delay = Math.max(0, auth.expires_at - margin(auth) - Date.now());
    refreshTimer = setTimeout(() => refreshTokens().catch((e) => {
      if (e instanceof ApiError && e.status === 0) {
        // Server out of reach: the status line says so; try again shortly.
        clearTimeout(refreshTimer);
        refreshTimer = setTimeout(scheduleRefresh, 5000);
        return;
      }
      report(e, 'Could not renew the session');
    }), Math.min(delay, 2 ** 31 - 1));
  }

  // Only one refresh at a time, across timers in this tab (the shared promise)
  // and across tabs (a Web Lock, or a lease in localStorage where locks are missing).
  // Inside the lock the stored pair is read again: if another tab has rotated it
  // meanwhile, this tab adopts the new pair instead of spending a dead refresh token.
  function refreshTokens(opts = {}) {
    if (!refreshing) {
      refreshing = withLock('chatd-refresh', () => doRefresh(opts)).finally(() => { refreshing = null; });
    }
    return refreshing;
  }

  async function doRefresh({ force = false, failedAccess = null } = {}) {
    const stored = await storedAuth();
    if (!stored) { endSession('You were logged out.', { keepStorage: true }); throw new SessionEnded(); }
    if (force) {
      if (failedAccess && stored.access_token !== failedAccess) { adopt(stored); return; }
    } else if (stored.expires_at - Date.now() > margin(stored)) {
      adopt(stored); // someone (another tab) already refreshed
      return;
    }
    let res;
    try {
      res = await fetch(`${API}/auth/refresh`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ refresh_token: stored.refresh_token }),
      });
    } catch (_) {
      throw new ApiError(0, 'network', FRIENDLY.network);
    }
    if (!res.ok) {
      const err = await readError(res);
      const again = await storedAuth();
      if (again && again.refresh_token !== stored.refresh_token) { adopt(again); return; }
      if (res.status === 401) {
        endSession('Your session has ended. Please log in again.');
        throw new SessionEnded();
      }
      throw err;
    }
    const body = await res.json();
    await saveAuth(authFrom(body, stored.user)); // committed before the lock is released
    scheduleRefresh();
  }
  function adopt(a) {
    const local = loadAuth();
    if (a && local && (a.issued_at || 0) > (local.issued_at || 0)) localStorage.setItem(STORE_KEY, JSON.stringify(a));
    auth = a;
    scheduleRefresh();
  }

  async function withLock(name, fn) {
    if (navigator.locks && navigator.locks.request) return navigator.locks.request(name, fn);
    const key = `chatd.lock.${name}`;
    const read = () => { try { return JSON.parse(localStorage.getItem(key) || 'null'); } catch (_) { return null; } };
    for (let i = 0; i < 60; i++) {
      const cur = read();
      if (!cur || cur.until < Date.now()) {
        localStorage.setItem(key, JSON.stringify({ owner: tabId, until: Date.now() + 10000 }));
        await sleep(40); // let a racing tab overwrite; the last writer wins
        const mine = read();
        if (mine && mine.owner === tabId) {
          try { return await fn(); } finally { localStorage.removeItem(key); }
        }
      }
      await sleep(80 + Math.random() * 120);
    }
    return fn();
  }

  async function ensureFreshToken() {
    if (!auth) throw new SessionEnded();
    if (auth.expires_at - Date.now() < Math.min(10000, margin(auth))) await refreshTokens();
  }

  // Other tabs: adopt their rotated tokens, follow their log in and log out.
  window.addEventListener('storage', (e) => {
    if (e.key !== STORE_KEY && e.key !== null) return;
    const next = loadAuth();
    if (!next) { if (auth) endSession('You logged out in another tab.', { keepStorage: true }); return; }
    if (!auth) { auth = next; enterChat(); return; }
    if (next.user && auth.user && next.user.id !== auth.user.id) { location.reload(); return; }
    adopt(next);
  });

  // ------------------------------------------------------------------ HTTP

  async function api(method, path, body, { retry = true } = {}) {
    await ensureFreshToken();
    const headers = { Authorization: `Bearer ${auth.access_token}` };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const sentWith = auth.access_token;
    let res;
    try {
      res = await fetch(API + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (_) {
      throw new ApiError(0, 'network', FRIENDLY.network);
    }
    if (res.status === 401 && retry) {
      await refreshTokens({ force: true, failedAccess: sentWith });
      return api(method, path, body, { retry: false });
    }
    if (!res.ok) throw await readError(res);
    if (res.status === 204) return null;
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  }

  // A file as the raw body of POST /rooms/{id}/attachments; answers the `attachment`.
  async function uploadAttachment(roomId, file, { retry = true } = {}) {
    await ensureFreshToken();
    const sentWith = auth.access_token;
    let res;
    try {
      res = await fetch(`${API}/rooms/${encodeURIComponent(roomId)}/attachments?filename=${encodeURIComponent(file.name || 'attachment')}`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${sentWith}`, 'Content-Type': file.type || 'application/octet-stream' },
        body: file,
      });
    } catch (_) {
      throw new ApiError(0, 'network', FRIENDLY.network);
    }
    if (res.status === 401 && retry) {
      await refreshTokens({ force: true, failedAccess: sentWith });
      return uploadAttachment(roomId, file, { retry: false });
    }
    if (!res.ok) throw await readError(res);
    return res.json();
  }

  // Attachments need the bearer token, so <img> and links get blob: URLs.
  const attachmentUrls = new Map(); // attachment id -> Promise<object URL>
  function attachmentUrl(id) {
    if (!attachmentUrls.has(id)) {
      const p = (async () => {
        await ensureFreshToken();
        let res = await fetch(`${API}/attachments/${encodeURIComponent(id)}`, { headers: { Authorization: `Bearer ${auth.access_token}` } });
        if (res.status === 401) {
          await refreshTokens({ force: true });
          res = await fetch(`${API}/attachments/${encodeURIComponent(id)}`, { headers: { Authorization: `Bearer ${auth.access_token}` } });
        }
        if (!res.ok) throw await readError(res);
        return URL.createObjectURL(await res.blob());
      })();
      p.catch(() => attachmentUrls.delete(id)); // a failure may be retried later
      attachmentUrls.set(id, p);
    }
    return attachmentUrls.get(id);
  }
  function forgetAttachmentUrls() {
    for (const p of attachmentUrls.values()) p.then((u) => URL.revokeObjectURL(u), () => {});
    attachmentUrls.clear();
  }

  async function anonymous(path, body) {
    let res;
    try {
      res = await fetch(API + path, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
    } catch (_) {
      throw new ApiError(0, 'network', FRIENDLY.network);
    }
    if (!res.ok) throw await readError(res);
    return res.json();
  }

  // ------------------------------------------------------------------ state

  const S = {
    me: null,                 // user
    rooms: new Map(),         // id -> room (see normRoom)
    users: new Map(),         // id -> public profile
    blocks: new Set(),        // user ids I blocked
    openRoomId: null,
    cache: new Map(),         // room id -> {byId, bySeq, list, loaded, hasMore, loadingOlder}
    pending: new Map(),       // client_msg_id -> outgoing message not yet acked
    drafts: new Map(),        // room id -> [{key, name, size, state, attachment, error}] files to send
    typing: new Map(),        // room id -> Map(user id -> timer)
  };
  const userFetches = new Map();

  const memberId = (m) => (typeof m === 'string' ? m : (m && (m.user_id || m.id)) || null);
  const myId = () => (S.me && S.me.id) || (auth && auth.user && auth.user.id) || null;

  function normRoom(r, prev) {
    const room = prev || { id: r.id, unread: 0, last_seq: 0, last_message: null, cursors: new Map(),
      myDelivered: 0, myRead: 0, memberIds: [], kind: 'group', name: '' };
    if (r.kind) room.kind = r.kind;
    if (r.name !== undefined) room.name = r.name || '';
    if (r.created_at) room.created_at = r.created_at;
    if (Array.isArray(r.members)) {
      room.memberIds = r.members.map(memberId).filter(Boolean);
      for (const m of r.members) {
        if (m && typeof m === 'object') updateCursor(room, memberId(m), m.delivered_seq, m.read_seq, m.role);
      }
    }
    if (typeof r.last_seq === 'number' && r.last_seq > room.last_seq) room.last_seq = r.last_seq;
    if (r.last_message && (!room.last_message || r.last_message.seq >= room.last_message.seq)) {
      room.last_message = r.last_message;
      if (r.last_message.seq > room.last_seq) room.last_seq = r.last_message.seq;
    }
    return room;
  }

  function updateCursor(room, uid, delivered, read, role) {
    if (!uid) return false;
    const c = room.cursors.get(uid) || { delivered_seq: 0, read_seq: 0 };
    let moved = false;
    if (typeof delivered === 'number' && delivered > c.delivered_seq) { c.delivered_seq = delivered; moved = true; }
    if (typeof read === 'number' && read > c.read_seq) { c.read_seq = read; moved = true; }
    if (c.read_seq > c.delivered_seq) c.delivered_seq = c.read_seq;
    if (role) c.role = role;
    room.cursors.set(uid, c);
    if (uid === myId()) {
      room.myDelivered = Math.max(room.myDelivered, c.delivered_seq);
      room.myRead = Math.max(room.myRead, c.read_seq);
    }
    return moved;
  }

  function ensureRoom(id) {
    let room = S.rooms.get(id);
    if (!room) {
      room = normRoom({ id });
      S.rooms.set(id, room);
      roomsSoon(); // a room we did not know: someone started a chat with us
    }
    return room;
  }

  function cacheFor(roomId) {
    let c = S.cache.get(roomId);
    if (!c) {
      c = { byId: new Map(), bySeq: new Map(), list: [], loaded: false, hasMore: true, loadingOlder: false };
      S.cache.set(roomId, c);
    }
    return c;
  }

  // Insert a message into its room, by seq, dropping duplicates. True if new.
  function insertMessage(m) {
    const c = cacheFor(m.room_id);
    if (c.byId.has(m.id) || c.bySeq.has(m.seq)) {
      // A later copy is the message's current state: its attachments win.
      const old = c.byId.get(m.id);
      if (old && old !== m) Object.assign(old, m);
      return false;
    }
    c.byId.set(m.id, m);
    c.bySeq.set(m.seq, m);
    const list = c.list;
    if (!list.length || list[list.length - 1].seq < m.seq) list.push(m);
    else {
      let lo = 0, hi = list.length;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (list[mid].seq < m.seq) lo = mid + 1; else hi = mid; }
      list.splice(lo, 0, m);
    }
    if (m.client_msg_id && m.sender_id === myId()) S.pending.delete(m.client_msg_id);
    return true;
  }

  const maxSeq = (roomId) => { const c = S.cache.get(roomId); return c && c.list.length ? c.list[c.list.length - 1].seq : 0; };

  function peerOf(room) {
    if (room.kind !== 'direct') return null;
    return room.memberIds.find((id) => id !== myId()) || null;
  }
  function userName(id) {
    if (id === myId()) return 'You';
    const u = S.users.get(id);
    if (!u) { fetchUser(id); return '…'; }
    return u.display_name || u.username || id;
  }
  function roomTitle(room) {
    if (room.kind === 'direct') {
      const peer = peerOf(room);
      return peer ? userName(peer) : (room.name || 'Direct chat');
    }
    return room.name || 'Group';
  }

  function fetchUser(id) {
    if (!id || userFetches.has(id)) return userFetches.get(id);
    const p = api('GET', `/users/${encodeURIComponent(id)}`)
      .then((u) => { S.users.set(id, { ...(S.users.get(id) || {}), ...u }); renderSoon(); return u; })
      .catch((e) => { userFetches.delete(id); if (!(e instanceof SessionEnded)) console.warn('user', id, e.message); });
    userFetches.set(id, p);
    return p;
  }

  // ------------------------------------------------------------------ socket

  let ws = null;
  let wsReady = false;
  let attempt = 0;
  let failedBeforeReady = 0;
  let reconnectTimer = null;
  let pingTimer = null;
  let pongTimer = null;
  let wantSocket = false;
  let reconnectMark = null; // {roomId, seq}: the open room's first seq after a reconnect

  function setConn(state, text) {
    const c = $('conn');
    c.dataset.state = state;
    c.textContent = text;
  }

  async function connect() {
    if (!wantSocket || ws || !auth) return;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    setConn(attempt ? 'reconnecting' : 'connecting', attempt ? 'Reconnecting…' : 'Connecting…');
    try {
      // The upgrade is refused (401) with an expired token, and a browser cannot
      // see that status: after a failed attempt, renew the token first.
      if (failedBeforeReady > 0 && failedBeforeReady % 2 === 1) {
        await refreshTokens({ force: true, failedAccess: auth.access_token });
      } else {
        await ensureFreshToken();
      }
    } catch (e) {
      if (e instanceof SessionEnded) return;
      failedBeforeReady++;
      scheduleReconnect();
      return;
    }
    if (!wantSocket || ws) return;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const sock = new WebSocket(`${proto}//${location.host}/ws?access_token=${encodeURIComponent(auth.access_token)}`);
    ws = sock;
    sock.onmessage = (ev) => {
      if (ws !== sock) return;
      let frame;
      try { frame = JSON.parse(ev.data); } catch (_) { showError('The server sent a frame that is not JSON.'); return; }
      alive();
      try { onFrame(frame); } catch (e) { report(e, 'Could not handle a server frame'); }
    };
    sock.onclose = () => { if (ws === sock) socketGone(); };
    sock.onerror = () => { /* a close event follows */ };
  }

  function socketGone() {
    const wasReady = wsReady;
    ws = null;
    wsReady = false;
    clearInterval(pingTimer);
    clearTimeout(pongTimer);
    if (!wasReady) failedBeforeReady++;
    for (const room of S.typing.keys()) clearTyping(room);
    for (const p of S.pending.values()) if (p.state === 'pending') p.onWire = false;
    scheduleReconnect();
  }

  function dropSocket() {
    const sock = ws;
    if (!sock) return;
    ws = null; // forget it now: a dead socket may take long to report its close
    try { sock.close(); } catch (_) { /* ignore */ }
    socketGone();
  }

  function scheduleReconnect() {
    if (!wantSocket) { setConn('idle', ''); return; }
    clearTimeout(reconnectTimer);
    if (navigator.onLine === false) {
      setConn('offline', 'Offline');
    }
    const base = Math.min(30000, 500 * 2 ** Math.min(attempt, 6));
    const delay = Math.round(base / 2 + Math.random() * base / 2);
    attempt++;
    if (navigator.onLine !== false) setConn('reconnecting', `Reconnecting in ${Math.ceil(delay / 1000)} s`);
    reconnectTimer = setTimeout(() => { reconnectTimer = null; connect(); }, delay);
  }

  function reconnectNow() {
    if (!wantSocket || ws) return;
    attempt = Math.min(attempt, 1);
    clearTimeout(reconnectTimer);
    connect();
  }

  function alive() {
    clearTimeout(pongTimer);
    pongTimer = null;
  }
  function startHeartbeat() {
    clearInterval(pingTimer);
    pingTimer = setInterval(() => {
      if (!wsReady) return;
      wsSend({ type: 'ping', nonce: uuid() });
      if (!pongTimer) pongTimer = setTimeout(() => { pongTimer = null; dropSocket(); }, PONG_WITHIN);
    }, PING_EVERY);
  }

  function wsSend(frame) {
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  window.addEventListener('offline', () => { if (wantSocket) { dropSocket(); setConn('offline', 'Offline'); } });
  window.addEventListener('online', () => reconnectNow());

  function onFrame(f) {
    switch (f.type) {
      case 'ready': return onReady(f);
      case 'ack': return onAck(f);
      case 'message': return onMessage(f);
      case 'message_updated': return onUpdated(f.message);
      case 'done': return undefined;
      case 'receipt': return onReceipt(f);
      case 'presence': return onPresence(f);
      case 'typing': return onTyping(f);
      case 'pong': return undefined;
      case 'error': return onSocketError(f);
      default:
        // A batch answer to `sync`, if the server sends one as a list.
        if (Array.isArray(f.messages)) for (const m of f.messages) onMessage(m);
        return undefined;
    }
  }

  function onReady(f) {
    wsReady = true;
    attempt = 0;
    failedBeforeReady = 0;
    setConn('connected', 'Connected');
    for (const e of [...errorBox().children]) if (e.dataset.transient === 'true') e.remove();
    startHeartbeat();
    cursorSent.clear(); // a cursor sent just before a drop may be lost: send again when due
    if (f.user_id && S.me && f.user_id !== S.me.id) console.warn('ready for another user', f.user_id);
    let unknown = false;
    for (const r of f.rooms || []) {
      const room = S.rooms.get(r.room_id);
      if (!room) { unknown = true; continue; }
      updateCursor(room, myId(), r.delivered_seq, r.read_seq);
    }
    // Missed messages are pushed by the server now; the list also gets fresh counts.
    refreshRooms().catch((e) => report(e, 'Could not load the rooms'));
    if (unknown) roomsSoon();
    // Presence changes while away were not seen: ask again for the peers shown.
    for (const room of S.rooms.values()) {
      const peer = peerOf(room);
      if (peer && S.users.has(peer)) { userFetches.delete(peer); fetchUser(peer); }
    }
    // Outgoing messages that never got an ack go again, with the same client_msg_id.
    for (const p of S.pending.values()) if (p.state === 'pending') transmit(p);
    // The open room asks for everything after what it shows.
    const open = S.openRoomId;
    if (open && cacheFor(open).loaded) {
      reconnectMark = { roomId: open, seq: maxSeq(open) + 1 };
      wsSend({ type: 'sync', room_id: open, after_seq: maxSeq(open), limit: 100 });
    }
    markRead();
    render();
  }

  function onAck(f) {
    const p = S.pending.get(f.client_msg_id);
    if (!p) return;
    const m = {
      id: f.message_id, room_id: f.room_id || p.room_id, seq: f.seq, sender_id: myId(),
      client_msg_id: f.client_msg_id, body: p.body, created_at: f.created_at || p.created_at,
      attachments: p.attachments || [],
      reply_to: p.reply_to || null, edited_at: null, deleted: false, reactions: [],
    };
    S.pending.delete(f.client_msg_id);
    gotMessage(m);
  }

  function onMessage(f) {
    if (!f || !f.id || !f.room_id || typeof f.seq !== 'number') return;
    const { type, ...m } = f;
    gotMessage(m);
  }

  function gotMessage(m) {
    const room = ensureRoom(m.room_id);
    const c = cacheFor(m.room_id);
    const prevMax = maxSeq(m.room_id);
    if (!insertMessage(m)) { renderSoon(); return; }
    const mine = m.sender_id === myId();
    if (m.seq > room.last_seq) {
      room.last_seq = m.seq;
      if (!mine && !isReading(room.id) && m.seq > room.myRead) room.unread = (room.unread || 0) + 1;
    }
    if (!room.last_message || m.seq >= room.last_message.seq) room.last_message = m;
    if (!mine) cursorSoon('delivered', room.id, m.seq);
    // What arrives in the open room right after a reconnect was missed: mark where it starts.
    if (!mine && reconnectMark && reconnectMark.roomId === room.id && room.id === S.openRoomId && m.seq >= reconnectMark.seq) {
      divider = { roomId: room.id, seq: reconnectMark.seq, label: 'Missed while you were offline' };
      reconnectMark = null;
    }
    if (mine) updateCursor(room, myId(), m.seq, m.seq); // one's own message counts as read
    // A hole below a live message in the open room: ask for what is missing.
    if (room.id === S.openRoomId && c.loaded && prevMax && m.seq > prevMax + 1 && wsReady) {
      wsSend({ type: 'sync', room_id: room.id, after_seq: prevMax, limit: 100 });
    }
    if (isReading(room.id)) markRead();
    renderSoon();
  }

  function onReceipt(f) {
    const room = S.rooms.get(f.room_id);
    if (!room) return;
    const moved = f.kind === 'read'
      ? updateCursor(room, f.user_id, f.up_to_seq, f.up_to_seq)
      : updateCursor(room, f.user_id, f.up_to_seq, undefined);
    if (f.user_id === myId() && f.kind === 'read' && f.up_to_seq >= room.last_seq) room.unread = 0;
    if (moved) renderSoon();
  }

  function onPresence(f) {
    const u = S.users.get(f.user_id) || { id: f.user_id };
    u.online = !!f.online;
    if (f.last_seen !== undefined) u.last_seen = f.last_seen;
    S.users.set(f.user_id, u);
    if (!f.online) clearTypingUser(f.user_id);
    renderSoon();
  }

  function onTyping(f) {
    if (f.user_id === myId()) return;
    let m = S.typing.get(f.room_id);
    if (!m) { m = new Map(); S.typing.set(f.room_id, m); }
    clearTimeout(m.get(f.user_id));
    if (f.state) {
      m.set(f.user_id, setTimeout(() => { m.delete(f.user_id); renderTyping(); }, TYPING_SHOWN));
    } else m.delete(f.user_id);
    renderTyping();
  }
  function clearTyping(roomId) {
    const m = S.typing.get(roomId);
    if (!m) return;
    for (const t of m.values()) clearTimeout(t);
    m.clear();
    renderTyping();
  }
  function clearTypingUser(uid) {
    for (const m of S.typing.values()) if (m.has(uid)) { clearTimeout(m.get(uid)); m.delete(uid); }
    renderTyping();
  }

  function onSocketError(f) {
    const text = words(f.code, f.message);
    const p = f.ref && S.pending.get(f.ref);
    if (p) {
      p.state = 'failed';
      p.error = text;
      showError(`Message not sent: ${text}`);
      renderSoon();
      return;
    }
    showError(f.ref ? `${text} (${f.ref})` : text);
  }

  // Cursor frames: one per room and kind, with the highest seq, a moment later.
  const cursorQueue = new Map();
  let cursorTimer = null;
  const cursorSent = new Map();
  function cursorSoon(kind, roomId, seq) {
    const key = `${kind}|${roomId}`;
    if ((cursorSent.get(key) || 0) >= seq) return;
    if ((cursorQueue.get(key) || 0) < seq) cursorQueue.set(key, seq);
    if (!cursorTimer) cursorTimer = setTimeout(flushCursors, 50);
  }
  function flushCursors() {
    cursorTimer = null;
    if (!wsReady) { cursorQueue.clear(); return; } // on reconnect the server pushes again
    for (const [key, seq] of cursorQueue) {
      const [kind, roomId] = key.split('|');
      if ((cursorSent.get(key) || 0) >= seq) continue;
      if (wsSend({ type: kind, room_id: roomId, up_to_seq: seq })) cursorSent.set(key, seq);
    }
    cursorQueue.clear();
  }

  const conversationVisible = () => document.visibilityState === 'visible' && !$('conversation').hidden
    && (!isPhone() || $('chat-view').dataset.pane === 'conversation');
  const isReading = (roomId) => roomId === S.openRoomId && conversationVisible();
  const isPhone = () => window.matchMedia('(max-width: 700px)').matches;

  function markRead() {
    const id = S.openRoomId;
    if (!id || !conversationVisible()) return;
    const room = S.rooms.get(id);
    const top = maxSeq(id);
    if (!room || !top) return;
    room.unread = 0;
    if (top > room.myRead) cursorSoon('read', id, top); // myRead moves when the server confirms
    renderRoomsSoon();
  }
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible') {
      markRead();
      if (auth && auth.expires_at - Date.now() < margin(auth)) refreshTokens().catch((e) => report(e));
      reconnectNow();
    }
  });

  // ------------------------------------------------------------------ sending

  // ------------------------------------------------------------------ lifecycle
  // Replies, edits, deletes, reactions: requests go over HTTP; every device
  // (this one too) learns the result from `message_updated`.

  function onUpdated(m) {
    if (!m || !m.id) return;
    const c = cacheFor(m.room_id);
    const old = c.byId.get(m.id);
    if (old) Object.assign(old, m); else insertMessage(m);
    if (S.replyTo && S.replyTo.id === m.id && m.deleted) setReply(null);
    if (m.room_id === S.openRoomId) renderSoon();
  }

  const msgPath = (m) => `/rooms/${encodeURIComponent(m.room_id)}/messages/${encodeURIComponent(m.id)}`;

  function lifecycleCall(method, path, body) {
    api(method, path, body).catch((e) => { if (!(e instanceof SessionEnded)) showError(e.message); });
  }

  function setReply(m) {
    S.replyTo = m ? { id: m.id, room_id: m.room_id } : null;
    const bar = $('reply-bar');
    if (!bar) return;
    bar.hidden = !m;
    if (m) setText(bar.querySelector('.reply-text'), `Replying to ${userName(m.sender_id)}: ${(m.body || '').slice(0, 80)}`);
  }

  function editMessage(m) {
    const body = window.prompt('Edit message', m.body);
    if (body === null || !body.trim() || body.trim() === m.body) return;
    lifecycleCall('PATCH', msgPath(m), { body: body.trim() });
  }

  function deleteMessage(m) {
    if (!window.confirm('Delete this message for everyone?')) return;
    lifecycleCall('DELETE', msgPath(m));
  }

  function toggleReaction(m, emoji, on) {
    lifecycleCall(on ? 'PUT' : 'DELETE', `${msgPath(m)}/reactions/${encodeURIComponent(emoji)}`);
  }

  function canDelete(room, m) {
    if (m.sender_id === myId()) return true;
    const me = room.cursors && room.cursors.get(myId());
    return room.kind === 'group' && !!me && (me.role === 'owner' || me.role === 'admin');
  }

  // The reply quote, edited mark, tombstone, reactions and actions of one message.
  function renderLifecycle(li, m, room, mine) {
    const bubble = li.querySelector('.bubble');
    const body = li.querySelector('.body');
    li.classList.toggle('deleted', !!m.deleted);
    if (m.deleted) { setText(body, 'Message deleted'); body.hidden = false; }
    else setText(body, m.body || '');
    let quote = bubble.querySelector('.reply-quote');
    if (m.reply_to && !m.deleted) {
      const target = cacheFor(m.room_id).byId.get(m.reply_to);
      const text = target ? `${userName(target.sender_id)}: ${target.deleted ? 'Message deleted' : (target.body || 'attachment')}` : 'an earlier message';
      if (!quote) { quote = el('div', { class: 'reply-quote', 'data-testid': 'reply-quote' }); bubble.prepend(quote); }
      setText(quote, `↪ ${text.slice(0, 120)}`);
    } else if (quote) quote.remove();
    const meta = li.querySelector('.meta');
    let edited = meta.querySelector('.edited');
    if (m.edited_at && !m.deleted) {
      if (!edited) { edited = el('span', { class: 'edited', 'data-testid': 'message-edited', text: 'edited' }); meta.prepend(edited); }
    } else if (edited) edited.remove();
    let box = li.querySelector('.reactions');
    if (box) box.remove();
    if (m.id && !m.deleted && (m.reactions || []).length) {
      box = el('div', { class: 'reactions', 'data-testid': 'reactions' });
      for (const r of m.reactions) {
        const minePut = (r.users || []).includes(myId());
        box.append(el('button', { type: 'button', class: `reaction${minePut ? ' on' : ''}`, 'data-testid': 'reaction',
          title: (r.users || []).map(userName).join(', '), text: `${r.emoji} ${r.count}`,
          onclick: () => toggleReaction(m, r.emoji, !minePut) }));
      }
      li.append(box);
    }
    let acts = li.querySelector('.actions');
    if (acts) acts.remove();
    if (m.id && m.seq && !m.deleted) {
      acts = el('div', { class: 'actions', 'data-testid': 'message-actions' },
        el('button', { type: 'button', class: 'link', 'data-testid': 'reply-button', text: 'Reply', onclick: () => { setReply(m); $('composer-input').focus(); } }),
        el('button', { type: 'button', class: 'link', 'data-testid': 'react-button', text: '👍', title: 'React 👍',
          onclick: () => toggleReaction(m, '👍', !((m.reactions || []).find((r) => r.emoji === '👍') || { users: [] }).users.includes(myId())) }),
        el('button', { type: 'button', class: 'link', 'data-testid': 'react-other-button', text: '+', title: 'Another reaction',
          onclick: () => { const e = window.prompt('Reaction (an emoji)'); if (e && e.trim()) toggleReaction(m, e.trim(), true); } }),
        mine ? el('button', { type: 'button', class: 'link', 'data-testid': 'edit-button', text: 'Edit', onclick: () => editMessage(m) }) : null,
        canDelete(room, m) ? el('button', { type: 'button', class: 'link', 'data-testid': 'delete-button', text: 'Delete', onclick: () => deleteMessage(m) }) : null);
      li.append(acts);
    }
  }

  function transmit(p) {
    const frame = { type: 'send', room_id: p.room_id, client_msg_id: p.client_msg_id, body: p.body };
    if (p.reply_to) frame.reply_to = p.reply_to;
    const ids = (p.attachments || []).map((a) => a.id);
    if (ids.length) frame.attachments = ids;
    if (wsReady && wsSend(frame)) {
      p.onWire = true;
      return;
    }
    // No socket: the same call over HTTP, for the same client_msg_id.
    if (p.httpInFlight) return;
    p.httpInFlight = true;
    const httpBody = { client_msg_id: p.client_msg_id, body: p.body };
    if (p.reply_to) httpBody.reply_to = p.reply_to;
    if (ids.length) httpBody.attachments = ids;
    api('POST', `/rooms/${encodeURIComponent(p.room_id)}/messages`, httpBody)
      .then((m) => {
        if (m && m.id) { S.pending.delete(p.client_msg_id); gotMessage({ ...m, room_id: m.room_id || p.room_id }); }
      })
      .catch((e) => {
        if (e instanceof SessionEnded) return;
        if (e.status === 0) return; // offline: stays pending, goes again on the next `ready`
        p.state = 'failed';
        p.error = e.message;
        showError(`Message not sent: ${e.message}`);
        renderSoon();
      })
      .finally(() => { p.httpInFlight = false; });
  }

  function sendFromComposer() {
    const input = $('composer-input');
    const roomId = S.openRoomId;
    const body = input.value;
    if (!roomId) return;
    const trimmed = body.trim();
    const drafts = S.drafts.get(roomId) || [];
    if (drafts.some((d) => d.state === 'uploading')) { showError('Wait until the files are uploaded.'); return; }
    const attachments = drafts.filter((d) => d.state === 'ready').map((d) => d.attachment);
    if (!trimmed && !attachments.length) return;
    if (trimmed.length > 4000) { showError('A message can be at most 4000 characters long.'); return; }
    const p = { client_msg_id: uuid(), room_id: roomId, body: trimmed, state: 'pending',
      created_at: new Date().toISOString(), sender_id: myId(), made: performance.now() };
    if (attachments.length) p.attachments = attachments;
    if (S.replyTo && S.replyTo.room_id === roomId) { p.reply_to = S.replyTo.id; setReply(null); }
    S.drafts.delete(roomId);
    renderDrafts();
    S.pending.set(p.client_msg_id, p);
    input.value = '';
    autosize(input);
    stopTyping();
    transmit(p);
    render({ toBottom: true });
  }

  // ------------------------------------------------------------------ attachments

  function fmtSize(n) {
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(n < 10240 ? 1 : 0)} KB`;
    return `${(n / 1024 / 1024).toFixed(1)} MB`;
  }

  function attachFiles(files) {
    const roomId = S.openRoomId;
    if (!roomId) return;
    const list = S.drafts.get(roomId) || [];
    S.drafts.set(roomId, list);
    for (const file of files) {
      const d = { key: uuid(), name: file.name || 'attachment', size: file.size, state: 'uploading', attachment: null, error: null };
      list.push(d);
      uploadAttachment(roomId, file)
        .then((a) => { d.state = 'ready'; d.attachment = a; })
        .catch((e) => {
          if (e instanceof SessionEnded) return;
          d.state = 'failed';
          d.error = e.message;
          showError(`Could not upload ${d.name}: ${e.message}`);
        })
        .finally(renderDrafts);
    }
    renderDrafts();
  }

  function removeDraft(roomId, key) {
    const list = (S.drafts.get(roomId) || []).filter((d) => d.key !== key);
    if (list.length) S.drafts.set(roomId, list); else S.drafts.delete(roomId);
    renderDrafts();
  }

  function renderDrafts() {
    const ul = $('composer-attachments');
    const roomId = S.openRoomId;
    const list = (roomId && S.drafts.get(roomId)) || [];
    ul.textContent = '';
    for (const d of list) {
      const word = d.state === 'uploading' ? 'uploading…' : d.state === 'failed' ? 'failed' : fmtSize(d.size);
      ul.append(el('li', { 'data-testid': 'draft-attachment', 'data-state': d.state, title: d.error || d.name },
        el('span', { text: `${d.name} (${word})` }),
        el('button', { type: 'button', 'aria-label': `Remove ${d.name}`, text: '×',
          onclick: () => removeDraft(roomId, d.key) })));
    }
    ul.hidden = list.length === 0;
  }

  const INLINE_IMAGES = new Set(['image/png', 'image/jpeg', 'image/gif', 'image/webp', 'image/avif', 'image/bmp']);
  const isInlineImage = (a) => INLINE_IMAGES.has(String(a.content_type || '').split(';')[0].trim().toLowerCase());

  async function saveAttachment(a) {
    const url = await attachmentUrl(a.id);
    const link = el('a', { href: url, download: a.filename || 'attachment' });
    document.body.append(link);
    link.click();
    link.remove();
  }

  // The attachments of a message: images inline, other files as links.
  function attachmentsBox(m) {
    const box = el('div', { class: 'attachments', 'data-testid': 'message-attachments' });
    for (const a of m.attachments || []) {
      if (!a || !a.id) continue;
      if (isInlineImage(a)) {
        const img = el('img', { alt: a.filename || 'image', 'data-testid': 'attachment-image', 'data-id': a.id,
          width: a.width || undefined, height: a.height || undefined, title: a.filename });
        attachmentUrl(a.id).then((u) => { img.src = u; }, (e) => { img.alt = `${a.filename}: ${e.message}`; });
        box.append(el('button', { type: 'button', class: 'link', title: `Save ${a.filename}`,
          onclick: guard(() => saveAttachment(a), 'Could not download') }, img));
      } else {
        box.append(el('span', { class: 'file' },
          el('button', { type: 'button', class: 'link', 'data-testid': 'attachment-link', 'data-id': a.id,
            text: a.filename || 'attachment', onclick: guard(() => saveAttachment(a), 'Could not download') }),
          el('span', { class: 'size', text: fmtSize(a.size || 0) })));
      }
    }
    return box;
  }

  function retry(clientMsgId) {
    const p = S.pending.get(clientMsgId);
    if (!p) return;
    p.state = 'pending';
    p.error = null;
    transmit(p);
    renderSoon();
  }

  let typingRoom = null;
  let typingSentAt = 0;
  let typingIdle = null;
  function onComposerInput() {
    const input = $('composer-input');
    autosize(input);
    const roomId = S.openRoomId;
    if (!roomId) return;
    if (!input.value.trim()) { stopTyping(); return; }
    const now = Date.now();
    if (typingRoom !== roomId || now - typingSentAt > TYPING_IDLE) {
      if (typingRoom && typingRoom !== roomId) stopTyping();
      if (wsSend({ type: 'typing', room_id: roomId, state: true })) { typingRoom = roomId; typingSentAt = now; }
    }
    clearTimeout(typingIdle);
    typingIdle = setTimeout(stopTyping, TYPING_IDLE);
  }
  function stopTyping() {
    clearTimeout(typingIdle);
    if (typingRoom) wsSend({ type: 'typing', room_id: typingRoom, state: false });
    typingRoom = null;
    typingSentAt = 0;
  }
  function autosize(t) {
    t.style.height = 'auto';
    t.style.height = `${Math.min(t.scrollHeight + 2, 144)}px`;
  }

  // ------------------------------------------------------------------ rooms

  let roomsTimer = null;
  function roomsSoon() {
    clearTimeout(roomsTimer);
    roomsTimer = setTimeout(() => refreshRooms().catch((e) => report(e, 'Could not load the rooms')), 150);
  }

  async function refreshRooms() {
    const data = await api('GET', '/rooms');
    const seen = new Set();
    for (const r of (data && data.rooms) || []) {
      seen.add(r.id);
      const prev = S.rooms.get(r.id);
      const room = normRoom(r, prev);
      // The snapshot counts up to its last_seq; add what arrived live after it.
      const snapSeq = typeof r.last_seq === 'number' ? r.last_seq : (r.last_message ? r.last_message.seq : 0);
      const c = S.cache.get(r.id);
      const later = c ? c.list.filter((m) => m.seq > snapSeq && m.sender_id !== myId() && m.seq > room.myRead).length : 0;
      room.unread = isReading(r.id) ? 0 : (Number(r.unread) || 0) + later;
      S.rooms.set(r.id, room);
      for (const id of room.memberIds) if (room.kind === 'direct' && id !== myId() && !S.users.has(id)) fetchUser(id);
    }
    for (const id of [...S.rooms.keys()]) if (!seen.has(id) && id !== S.openRoomId) S.rooms.delete(id);
    renderRooms();
    if (S.openRoomId) renderHeader();
  }

  async function loadBlocks() {
    const data = await api('GET', '/users/me/blocks');
    S.blocks = new Set(((data && data.users) || []).map((u) => (typeof u === 'string' ? u : u.id || u.user_id)));
    renderHeader();
  }

  async function startDirect(user) {
    S.users.set(user.id, { ...(S.users.get(user.id) || {}), ...user });
    const room = await api('POST', '/rooms', { kind: 'direct', peer: user.id });
    S.rooms.set(room.id, normRoom(room, S.rooms.get(room.id)));
    $('user-search').value = '';
    $('search-results').textContent = '';
    renderRooms();
    await openRoom(room.id);
  }

  const groupMembers = new Map(); // id -> user
  async function createGroup() {
    const name = $('group-name').value.trim();
    if (!name) { showError('Give the group a name.'); $('group-name').focus(); return; }
    if (!groupMembers.size) { showError('Add at least one member to the group.'); $('group-member-search').focus(); return; }
    const room = await api('POST', '/rooms', { kind: 'group', name, members: [...groupMembers.keys()] });
    S.rooms.set(room.id, normRoom(room, S.rooms.get(room.id)));
    groupMembers.clear();
    $('group-name').value = '';
    $('group-member-search').value = '';
    $('group-member-results').textContent = '';
    renderChips();
    $('group-box').open = false;
    renderRooms();
    await openRoom(room.id);
  }

  async function openRoom(id) {
    if (S.openRoomId && S.openRoomId !== id) stopTyping();
    S.openRoomId = id;
    msgEls.clear();
    $('message-items').textContent = '';
    const known = S.rooms.get(id);
    divider = known && known.unread > 0
      ? { roomId: id, seq: known.myRead + 1, label: known.unread === 1 ? '1 new message' : `${known.unread} new messages` }
      : null;
    reconnectMark = null;
    $('chat-view').dataset.pane = 'conversation';
    $('conversation').hidden = false;
    $('placeholder').hidden = true;
    renderHeader();
    renderRooms();
    renderTyping();
    const c = cacheFor(id);
    render({ toBottom: true });
    const detail = await api('GET', `/rooms/${encodeURIComponent(id)}`);
    if (S.openRoomId !== id) return;
    const room = normRoom(detail, S.rooms.get(id));
    S.rooms.set(id, room);
    for (const uid of room.memberIds) if (!S.users.has(uid) && uid !== myId()) fetchUser(uid);
    if (!c.loaded) {
      const upTo = Math.max(room.last_seq, maxSeq(id));
      if (upTo > 0) {
        const data = await api('GET', `/rooms/${encodeURIComponent(id)}/messages?before=${upTo + 1}&limit=${PAGE}`);
        const got = (data && data.messages) || [];
        for (const m of got) insertMessage({ ...m, room_id: m.room_id || id });
        c.hasMore = got.length >= PAGE && c.list.length > 0 && c.list[0].seq > 1;
      } else c.hasMore = false;
      c.loaded = true;
    }
    if (S.openRoomId !== id) return;
    if (wsReady) wsSend({ type: 'sync', room_id: id, after_seq: maxSeq(id), limit: 100 });
    render({ toBottom: divider ? 'divider' : true });
    markRead();
    if (!isPhone()) $('composer-input').focus();
  }

  async function loadOlder() {
    const id = S.openRoomId;
    if (!id) return;
    const c = cacheFor(id);
    if (!c.loaded || !c.hasMore || c.loadingOlder || !c.list.length) return;
    c.loadingOlder = true;
    $('load-older').disabled = true;
    $('load-older').textContent = 'Loading…';
    try {
      const before = c.list[0].seq;
      const data = await api('GET', `/rooms/${encodeURIComponent(id)}/messages?before=${before}&limit=${PAGE}`);
      if (S.openRoomId !== id) return;
      const got = (data && data.messages) || [];
      const box = $('messages');
      const fromBottom = box.scrollHeight - box.scrollTop;
      for (const m of got) insertMessage({ ...m, room_id: m.room_id || id });
      c.hasMore = got.length >= PAGE && c.list[0].seq > 1;
      render();
      box.scrollTop = box.scrollHeight - fromBottom; // keep the view where it was
    } finally {
      c.loadingOlder = false;
      $('load-older').disabled = false;
      $('load-older').textContent = 'Load older messages';
    }
  }

  function closeRoom() {
    stopTyping();
    S.openRoomId = null;
    divider = null;
    $('chat-view').dataset.pane = 'list';
    $('conversation').hidden = true;
    $('placeholder').hidden = false;
    renderRooms();
  }

  async function toggleBlock() {
    const room = S.rooms.get(S.openRoomId);
    const peer = room && peerOf(room);
    if (!peer) return;
    const btn = $('block');
    btn.disabled = true;
    try {
      if (S.blocks.has(peer)) {
        await api('DELETE', `/users/me/blocks/${encodeURIComponent(peer)}`);
        S.blocks.delete(peer);
      } else {
        await api('PUT', `/users/me/blocks/${encodeURIComponent(peer)}`);
        S.blocks.add(peer);
        clearTypingUser(peer);
      }
    } finally {
      btn.disabled = false;
      renderHeader();
    }
  }

  // ------------------------------------------------------------------ search

  function searchBox(input, list, onPick, exclude) {
    let timer = null;
    let seq = 0;
    input.addEventListener('input', () => {
      clearTimeout(timer);
      const q = input.value.trim().toLowerCase();
      if (!q) { list.textContent = ''; return; }
      timer = setTimeout(guard(async () => {
        const mine = ++seq;
        const data = await api('GET', `/users?q=${encodeURIComponent(q)}`);
        if (mine !== seq) return;
        const users = ((data && data.users) || []).filter((u) => u.id !== myId() && !exclude(u));
        list.textContent = '';
        if (!users.length) { list.append(el('li', { class: 'none', text: `No user starts with “${q}”.` })); return; }
        for (const u of users) {
          S.users.set(u.id, { ...(S.users.get(u.id) || {}), ...u });
          list.append(el('li', {},
            el('button', { type: 'button', 'data-testid': 'user-result', 'data-user-id': u.id, 'data-username': u.username,
              onclick: guard(() => onPick(u), 'Could not open the chat') },
            el('span', { class: 'dot', 'data-online': String(!!u.online), 'aria-hidden': 'true' }),
            el('span', { text: u.display_name && u.display_name !== u.username ? `${u.display_name} (@${u.username})` : `@${u.username}` }))));
        }
      }, 'Search failed'), 200);
    });
  }

  function renderChips() {
    const ul = $('group-members');
    ul.textContent = '';
    for (const u of groupMembers.values()) {
      ul.append(el('li', { 'data-testid': 'group-member', 'data-user-id': u.id },
        el('span', { text: u.display_name || u.username }),
        el('button', { type: 'button', 'aria-label': `Remove ${u.username}`, text: '×',
          onclick: () => { groupMembers.delete(u.id); renderChips(); } })));
    }
  }

  // ------------------------------------------------------------------ rendering

  let renderQueued = false;
  function renderSoon() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => { renderQueued = false; render(); });
    // Hidden tabs get no animation frames: a timer keeps state current there too.
    setTimeout(() => { if (renderQueued) { renderQueued = false; render(); } }, 100);
  }
  let roomsQueued = false;
  function renderRoomsSoon() {
    if (roomsQueued) return;
    roomsQueued = true;
    setTimeout(() => { roomsQueued = false; renderRooms(); }, 0);
  }

  function render(opts = {}) {
    renderRooms();
    renderHeader();
    renderMessages(opts);
    renderTyping();
    renderDrafts();
  }

  function fmtTime(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    const now = new Date();
    const sameDay = d.toDateString() === now.toDateString();
    return sameDay ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
      : d.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
  }

  function lastActivity(room) {
    return (room.last_message && room.last_message.created_at) || room.created_at || '';
  }

  function renderRooms() {
    const ul = $('room-list');
    const rooms = [...S.rooms.values()].sort((a, b) => lastActivity(b).localeCompare(lastActivity(a)));
    $('rooms-empty').hidden = rooms.length > 0;
    const keep = new Set();
    let prev = null;
    for (const room of rooms) {
      const key = room.id;
      keep.add(key);
      let li = ul.querySelector(`li[data-room-id="${CSS.escape(key)}"]`);
      if (!li) {
        li = el('li', { 'data-room-id': key },
          el('button', { type: 'button', class: 'room', 'data-testid': 'room-item', 'data-room-id': key,
            onclick: guard(() => openRoom(key), 'Could not open the room') },
          el('span', { class: 'dot', 'aria-hidden': 'true' }),
          el('span', { class: 'name', 'data-testid': 'room-name' }),
          el('span', { class: 'last', 'data-testid': 'room-last' }),
          el('span', { class: 'unread', 'data-testid': 'room-unread' })));
      }
      const btn = li.firstElementChild;
      const [dot, name, last, unread] = btn.children;
      btn.setAttribute('aria-current', String(room.id === S.openRoomId));
      const peer = peerOf(room);
      if (room.kind === 'direct') {
        dot.className = 'dot';
        dot.dataset.online = String(!!(peer && S.users.get(peer) && S.users.get(peer).online && !S.blocks.has(peer)));
      } else {
        dot.className = 'dot group';
        delete dot.dataset.online;
      }
      setText(name, roomTitle(room));
      const lm = room.last_message;
      setText(last, lm ? `${lm.sender_id === myId() ? 'You: ' : (room.kind === 'group' ? `${userName(lm.sender_id)}: ` : '')}${lm.body || ((lm.attachments || []).length ? `[${lm.attachments.map((a) => a.filename).join(', ')}]` : '')}` : 'No messages yet');
      const n = room.unread || 0;
      unread.hidden = n === 0;
      setText(unread, String(n));
      unread.setAttribute('aria-label', `${n} unread`);
      btn.setAttribute('aria-label', `${roomTitle(room)}${n ? `, ${n} unread` : ''}`);
      const want = prev ? prev.nextSibling : ul.firstChild;
      if (want !== li) ul.insertBefore(li, want);
      prev = li;
    }
    for (const li of [...ul.children]) if (!keep.has(li.dataset.roomId)) li.remove();
  }

  function setText(node, text) { if (node.textContent !== text) node.textContent = text; }

  function renderHeader() {
    const room = S.rooms.get(S.openRoomId);
    if (!room) return;
    setText($('conv-title'), roomTitle(room));
    const dot = $('conv-dot');
    const block = $('block');
    const sub = $('conv-sub');
    const peer = peerOf(room);
    if (room.kind === 'direct' && peer) {
      const u = S.users.get(peer) || {};
      const blocked = S.blocks.has(peer);
      dot.hidden = false;
      dot.dataset.online = String(!!u.online && !blocked);
      dot.setAttribute('aria-label', u.online ? 'online' : 'offline');
      block.hidden = false;
      setText(block, blocked ? 'Unblock' : 'Block');
      block.classList.toggle('danger', !blocked);
      block.setAttribute('aria-pressed', String(blocked));
      block.dataset.blocked = String(blocked);
      let text;
      if (blocked) text = 'Blocked — you do not receive their messages';
      else if (u.online) text = 'online';
      else if (u.last_seen) text = `last seen ${fmtTime(u.last_seen)}`;
      else text = u.username ? `@${u.username}` : '';
      setText(sub, text);
    } else {
      dot.hidden = true;
      block.hidden = true;
      const ids = [myId(), ...room.memberIds.filter((u) => u !== myId())].filter(Boolean);
      const names = ids.slice(0, 4).map(userName);
      const more = room.memberIds.length - names.length;
      setText(sub, room.memberIds.length ? `${names.join(', ')}${more > 0 ? ` and ${more} more` : ''}` : '');
    }
  }

  function statusOf(room, m) {
    if (!m.seq) return m.state === 'failed' ? 'failed' : 'pending';
    const others = room.memberIds.filter((id) => id !== myId());
    if (!others.length) return 'sent';
    let read = true;
    let delivered = true;
    for (const id of others) {
      const c = room.cursors.get(id) || { delivered_seq: 0, read_seq: 0 };
      if (c.read_seq < m.seq) read = false;
      if (Math.max(c.delivered_seq, c.read_seq) < m.seq) delivered = false;
    }
    return read ? 'read' : delivered ? 'delivered' : 'sent';
  }
  // Ticks on every own message; the word under the latest one.
  const STATUS = {
    pending: ['…', 'Sending', 'Sending… not yet stored by the server'],
    sent: ['✓', 'Sent', 'Sent: stored by the server'],
    delivered: ['✓✓', 'Delivered', 'Delivered to their device'],
    read: ['✓✓', 'Read', 'Read'],
    failed: ['!', 'Not sent', 'Not sent'],
  };

  const msgEls = new Map(); // key -> li of the open room
  let divider = null;       // {roomId, seq, label}: "new messages" line in the open room
  let dividerEl = null;
  function renderMessages({ toBottom = false } = {}) {
    const id = S.openRoomId;
    if (!id) return;
    const room = S.rooms.get(id);
    if (!room) return;
    const c = cacheFor(id);
    const box = $('messages');
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    const ol = $('message-items');
    const pend = [...S.pending.values()].filter((p) => p.room_id === id).sort((a, b) => a.made - b.made);
    const items = [...c.list, ...pend];
    const lastMine = [...items].reverse().find((m) => m.sender_id === myId());
    const keep = new Set();
    let prev = null;
    let dividerPlaced = false;
    const place = (node) => {
      const want = prev ? prev.nextSibling : ol.firstChild;
      if (want !== node) ol.insertBefore(node, want);
      prev = node;
    };
    for (let i = 0; i < items.length; i++) {
      const m = items[i];
      const mine = m.sender_id === myId();
      if (divider && divider.roomId === id && !dividerPlaced && m.seq && m.seq >= divider.seq && !mine) {
        if (!dividerEl) dividerEl = el('li', { class: 'divider', 'data-testid': 'new-messages-divider', role: 'separator' }, el('span'));
        setText(dividerEl.firstChild, divider.label);
        place(dividerEl);
        dividerPlaced = true;
      }
      const key = mine && m.client_msg_id ? `c:${m.client_msg_id}` : `m:${m.id}`;
      keep.add(key);
      let li = msgEls.get(key);
      if (!li) {
        li = el('li', { class: `msg${mine ? ' mine' : ''}`, 'data-testid': 'message', 'data-mine': String(mine) },
          (!mine && room.kind !== 'direct') ? el('div', { class: 'sender', 'data-testid': 'message-sender' }) : null,
          el('div', { class: 'bubble' },
            el('span', { class: 'body', 'data-testid': 'message-body', text: m.body }),
            el('span', { class: 'meta' },
              el('time', { 'data-testid': 'message-time' }),
              mine ? el('span', { class: 'status', 'data-testid': 'message-status' },
                el('span', { class: 'ticks', 'aria-hidden': 'true' }), el('span', { class: 'word' })) : null)));
        msgEls.set(key, li);
      }
      const attKey = (m.attachments || []).map((a) => a && a.id).join(',');
      if ((li.dataset.attachments || '') !== attKey) {
        const old = li.querySelector('.attachments');
        if (old) old.remove();
        if (attKey) li.querySelector('.bubble').prepend(attachmentsBox(m));
        li.dataset.attachments = attKey;
        li.querySelector('.body').hidden = !m.body;
      }
      renderLifecycle(li, m, room, mine);
      if (m.id) li.dataset.id = m.id; else delete li.dataset.id;
      if (m.seq) li.dataset.seq = String(m.seq); else delete li.dataset.seq;
      if (m.client_msg_id) li.dataset.clientMsgId = m.client_msg_id;
      const next = items[i + 1];
      li.classList.toggle('run', !!next && next.sender_id === m.sender_id);
      const sender = li.querySelector('.sender');
      if (sender) {
        const prevMsg = items[i - 1];
        sender.hidden = !!prevMsg && prevMsg.sender_id === m.sender_id;
        setText(sender, userName(m.sender_id));
      }
      const time = li.querySelector('time');
      if (m.created_at && time.getAttribute('datetime') !== m.created_at) {
        time.setAttribute('datetime', m.created_at);
        time.textContent = fmtTime(m.created_at);
        time.title = new Date(m.created_at).toLocaleString();
      }
      if (mine) {
        const st = statusOf(room, m);
        const s = li.querySelector('.status');
        li.classList.toggle('last-mine', m === lastMine || st === 'failed' || st === 'pending');
        if (s.dataset.state !== st) {
          s.dataset.state = st;
          li.dataset.state = st;
          s.firstChild.textContent = STATUS[st][0];
          s.lastChild.textContent = STATUS[st][1];
          s.title = m.state === 'failed' && m.error ? m.error : STATUS[st][2];
          const old = li.querySelector('.retry');
          if (old) old.remove();
          if (st === 'failed') {
            li.append(el('button', { type: 'button', class: 'link retry', 'data-testid': 'retry-button',
              text: 'Retry', onclick: () => retry(m.client_msg_id) }));
          }
        }
      }
      place(li);
    }
    if (!dividerPlaced && dividerEl) { dividerEl.remove(); }
    for (const [k, li] of msgEls) if (!keep.has(k)) { li.remove(); msgEls.delete(k); }
    $('load-older').hidden = !(c.loaded && c.hasMore && c.list.length);
    $('conv-empty').hidden = !(c.loaded && items.length === 0);
    if (toBottom || atBottom) {
      // Bring the "new messages" line into view rather than jumping past what was missed.
      if (toBottom === 'divider' && dividerPlaced) dividerEl.scrollIntoView({ block: 'start' });
      else box.scrollTop = box.scrollHeight;
    }
  }

  function renderTyping() {
    const box = $('typing');
    const id = S.openRoomId;
    const m = id && S.typing.get(id);
    const who = m ? [...m.keys()].filter((u) => !S.blocks.has(u)).map(userName) : [];
    let text = '';
    if (who.length === 1) text = `${who[0]} is typing…`;
    else if (who.length === 2) text = `${who[0]} and ${who[1]} are typing…`;
    else if (who.length > 2) text = 'Several people are typing…';
    setText(box, text);
    box.dataset.active = String(who.length > 0);
  }

  // ------------------------------------------------------------------ views

  function showAuth() {
    $('auth-view').hidden = false;
    $('chat-view').hidden = true;
    $('me').hidden = true;
    setConn('idle', '');
  }

  function showChat() {
    $('auth-view').hidden = true;
    $('chat-view').hidden = false;
    $('me').hidden = false;
    const u = S.me || (auth && auth.user);
    setText($('me-name'), u ? (u.display_name || u.username || '') : '');
  }

  function setTab(which) {
    const login = which === 'login';
    $('tab-login').setAttribute('aria-selected', String(login));
    $('tab-register').setAttribute('aria-selected', String(!login));
    $('login-form').hidden = !login;
    $('register-form').hidden = login;
    (login ? $('login-login') : $('reg-username')).focus();
  }

  let entered = false;
  async function enterChat() {
    if (entered) return;
    entered = true;
    showChat();
    scheduleRefresh();
    wantSocket = true;
    try {
      S.me = await api('GET', '/users/me');
      if (auth) saveAuth({ ...auth, user: S.me });
      showChat();
    } catch (e) {
      if (e instanceof SessionEnded) return;
      report(e, 'Could not load your profile');
    }
    connect();
    await Promise.all([
      refreshRooms().catch((e) => report(e, 'Could not load the rooms')),
      loadBlocks().catch((e) => report(e, 'Could not load your blocked users')),
    ]);
  }

  function endSession(message, { keepStorage = false } = {}) {
    wantSocket = false;
    entered = false;
    clearTimeout(refreshTimer);
    clearTimeout(reconnectTimer);
    dropSocket();
    if (!keepStorage) saveAuth(null); else auth = null;
    S.me = null;
    S.rooms.clear();
    S.cache.clear();
    S.pending.clear();
    S.drafts.clear();
    forgetAttachmentUrls();
    S.users.clear();
    S.blocks.clear();
    S.openRoomId = null;
    userFetches.clear();
    cursorSent.clear();
    msgEls.clear();
    divider = null;
    $('room-list').textContent = '';
    $('message-items').textContent = '';
    $('conversation').hidden = true;
    $('placeholder').hidden = false;
    $('chat-view').dataset.pane = 'list';
    setConn('idle', '');
    showAuth();
    setTab('login');
    if (message) showError(message);
  }

  async function logout() {
    const a = auth;
    if (!a) { endSession(); return; }
    try {
      await api('POST', '/auth/logout', { refresh_token: (loadAuth() || a).refresh_token });
    } catch (e) {
      if (e instanceof SessionEnded) return;
      endSession(`Logged out on this device, but the server said: ${e.message}`);
      return;
    }
    endSession();
  }

  async function register(ev) {
    ev.preventDefault();
    const username = $('reg-username').value.trim();
    const email = $('reg-email').value.trim();
    const password = $('reg-password').value;
    const display = $('reg-display').value.trim();
    if (!/^[a-z0-9_.-]{3,32}$/.test(username)) {
      showError('A username has 3 to 32 characters: lower-case letters, digits, _ . or -.');
      $('reg-username').focus();
      return;
    }
    if (!email.includes('@')) { showError('Please enter an e-mail address.'); $('reg-email').focus(); return; }
    if (password.length < 8 || password.length > 128) {
      showError('A password has 8 to 128 characters.');
      $('reg-password').focus();
      return;
    }
    const body = { username, email, password };
    if (display) body.display_name = display;
    const res = await anonymous('/auth/register', body);
    saveAuth(authFrom(res));
    $('reg-password').value = '';
    await enterChat();
  }

  async function login(ev) {
    ev.preventDefault();
    const login = $('login-login').value.trim();
    const password = $('login-password').value;
    if (!login || !password) { showError('Enter your username (or e-mail) and your password.'); return; }
    const res = await anonymous('/auth/login', { login, password });
    saveAuth(authFrom(res));
    $('login-password').value = '';
    await enterChat();
  }

  // ------------------------------------------------------------------ wiring

  function wire() {
    $('tab-login').addEventListener('click', () => setTab('login'));
    $('reply-cancel').addEventListener('click', () => setReply(null));
    $('tab-register').addEventListener('click', () => setTab('register'));
    $('login-form').addEventListener('submit', guard(login, 'Could not log in'));
    $('register-form').addEventListener('submit', guard(register, 'Could not register'));
    $('logout').addEventListener('click', guard(logout));
    $('search-form').addEventListener('submit', (e) => e.preventDefault());
    searchBox($('user-search'), $('search-results'), startDirect, () => false);
    searchBox($('group-member-search'), $('group-member-results'), (u) => {
      groupMembers.set(u.id, u);
      renderChips();
      $('group-member-search').value = '';
      $('group-member-results').textContent = '';
      $('group-member-search').focus();
    }, (u) => groupMembers.has(u.id));
    $('group-form').addEventListener('submit', guard((e) => { e.preventDefault(); return createGroup(); }, 'Could not create the group'));
    $('composer').addEventListener('submit', guard((e) => { e.preventDefault(); sendFromComposer(); }));
    const input = $('composer-input');
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); sendFromComposer(); }
    });
    input.addEventListener('input', onComposerInput);
    $('attach-button').addEventListener('click', () => $('attach-input').click());
    $('attach-input').addEventListener('change', guard((e) => {
      const files = [...e.target.files];
      e.target.value = '';
      attachFiles(files);
    }, 'Could not attach'));
    input.addEventListener('blur', stopTyping);
    $('back').addEventListener('click', closeRoom);
    $('block').addEventListener('click', guard(toggleBlock, 'Could not change the block'));
    $('load-older').addEventListener('click', guard(loadOlder, 'Could not load older messages'));
    $('messages').addEventListener('scroll', () => {
      if ($('messages').scrollTop < 40) guard(loadOlder, 'Could not load older messages')();
    });
    window.addEventListener('resize', () => markRead());
    window.addEventListener('unhandledrejection', (e) => report(e.reason));
  }

  wire();
  if (auth && auth.access_token && auth.refresh_token) enterChat();
  else { saveAuth(null); showAuth(); setTab('login'); }
})();
