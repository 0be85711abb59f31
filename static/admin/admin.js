// chatd admin page: plain JavaScript, no build step, no outside URL.
//
// Logs in through POST /api/v1/auth/login, then polls the admin endpoints
// (GET /admin/v1/cluster, GET /admin/v1/actors and, for a looked-up user,
// GET /admin/v1/sessions/{user_id}) every few seconds and draws them. An
// operator can stop one actor (its supervisor restarts it) and disconnect a
// user. Tokens live in sessionStorage (this tab only). Everything is drawn with
// textContent, never innerHTML: names come from users.
'use strict';

(() => {
  const params = new URLSearchParams(window.location.search);
  const REFRESH_MS = Math.max(500, Number(params.get('refresh_ms')) || 3000);
  const KEY = 'chatd-admin-auth';
  const MAX_CHILDREN = 200; // per actor; the filter finds the rest
  const STALE_MS = 30000;   // a heartbeat older than this is shown as stale

  const $ = (id) => document.getElementById(id);
  let auth = loadAuth();
  let timer = null;
  let inFlight = null;
  let refreshes = 0;
  let lookedUp = null;         // the user id whose sessions are shown
  const collapsed = new Set(); // actor ids folded by the operator
  const drawn = { cluster: '', tree: '', sessions: '', filter: '' };
  let lastTree = null;

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function loadAuth() {
    try {
      const v = JSON.parse(window.sessionStorage.getItem(KEY) || 'null');
      return v && v.access_token ? v : null;
    } catch (_) {
      return null;
    }
  }

  function saveAuth(v) {
    auth = v;
    if (v) window.sessionStorage.setItem(KEY, JSON.stringify(v));
    else window.sessionStorage.removeItem(KEY);
  }

  // One element: el('li', {class: 'x', 'data-id': 1}, child, 'text', ...).
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  const time = (iso) => {
    if (!iso) return '–';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso;
    return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  };

  // ---- HTTP ----------------------------------------------------------------

  async function request(method, path, body, token) {
    const headers = {};
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let resp;
    try {
      resp = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (_) {
      throw new ApiError(0, 'unreachable', 'the server cannot be reached');
    }
    const text = await resp.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = null; }
    }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(resp.status, err.code || `http_${resp.status}`, err.message || `HTTP ${resp.status}`);
    }
    return data;
  }

  let refreshing = null;
  async function refreshTokens() {
    if (!auth || !auth.refresh_token) return false;
    if (!refreshing) {
      const username = auth.username;
      refreshing = request('POST', '/api/v1/auth/refresh', { refresh_token: auth.refresh_token })
        .then((s) => {
          saveAuth({ access_token: s.access_token, refresh_token: s.refresh_token, username });
          return true;
        })
        .catch(() => false)
        .finally(() => { refreshing = null; });
    }
    return refreshing;
  }

  // An authenticated call; one token refresh on 401, then back to the login.
  async function api(method, path, body) {
    try {
      return await request(method, path, body, auth && auth.access_token);
    } catch (e) {
      if (e.status === 401 && await refreshTokens()) {
        return request(method, path, body, auth && auth.access_token);
      }
      throw e;
    }
  }

  // ---- status and errors -----------------------------------------------------

  function setStatus(state, text) {
    const s = $('status');
    s.dataset.state = state;
    s.dataset.refreshes = String(refreshes);
    s.textContent = text;
  }

  function showError(text) {
    const box = $('errors');
    box.replaceChildren(el('div', { class: 'error', 'data-testid': 'error', text }));
  }

  function clearErrors() {
    $('errors').replaceChildren();
  }

  function notice(text) {
    setStatus('ok', text);
  }

  // ---- views -------------------------------------------------------------------

  function showLogin(message) {
    stopTimer();
    $('admin-view').hidden = true;
    $('me').hidden = true;
    $('login-view').hidden = false;
    setStatus('idle', '');
    if (message) showError(message);
    $('login').focus();
  }

  function showAdmin() {
    clearErrors();
    $('login-view').hidden = true;
    $('admin-view').hidden = false;
    $('me').hidden = false;
    $('me-name').textContent = auth.username || '';
    $('every').textContent = String(REFRESH_MS / 1000);
    tick();
    startTimer();
  }

  function startTimer() {
    stopTimer();
    if ($('auto').checked) timer = window.setInterval(tick, REFRESH_MS);
  }

  function stopTimer() {
    if (timer !== null) window.clearInterval(timer);
    timer = null;
  }

  // ---- cluster ---------------------------------------------------------------

  function drawCluster(c) {
    const key = JSON.stringify(c);
    if (key === drawn.cluster) return;
    drawn.cluster = key;
    const now = Date.now();
    const rows = c.nodes.map((n) => {
      const stale = now - new Date(n.last_heartbeat).getTime() > STALE_MS;
      const cls = [n.id === c.node_id ? 'self' : '', stale ? 'stale' : ''].filter(Boolean).join(' ');
      return el('tr', { class: cls || null, 'data-testid': 'node', 'data-id': n.id, 'data-sessions': n.sessions, 'data-rooms': n.rooms },
        el('td', { class: 'mono', text: n.id }),
        el('td', { class: 'mono', text: n.address }),
        el('td', { text: time(n.started_at) }),
        el('td', { text: time(n.last_heartbeat) }),
        el('td', { text: n.sessions }),
        el('td', { text: n.rooms }));
    });
    $('nodes').replaceChildren(...rows);
    const sessions = c.nodes.reduce((a, n) => a + n.sessions, 0);
    const rooms = c.nodes.reduce((a, n) => a + n.rooms, 0);
    $('cluster-summary').textContent =
      `${c.nodes.length} node${c.nodes.length === 1 ? '' : 's'} · ${sessions} sessions · ${rooms} active rooms`;
  }

  // ---- supervision tree ------------------------------------------------------

  const haystack = (a) => `${a.kind} ${a.name || ''} ${a.id} ${a.subject || ''}`.toLowerCase();

  function keep(a, f) {
    if (!f) return true;
    return haystack(a).includes(f) || a.children.some((c) => keep(c, f));
  }

  function count(a, acc) {
    acc.actors += 1;
    acc[a.kind] = (acc[a.kind] || 0) + 1;
    a.children.forEach((c) => count(c, acc));
    return acc;
  }

  function drawActor(a, depth, f) {
    const kids = a.children.filter((c) => keep(c, f));
    const folded = collapsed.has(a.id) && !f;
    const line = el('div', { class: 'actor-line' },
      kids.length
        ? el('button', {
          type: 'button', class: 'toggle', 'aria-label': folded ? 'expand' : 'collapse', 'aria-expanded': String(!folded),
          text: folded ? '▸' : '▾',
          onclick: () => { if (collapsed.has(a.id)) collapsed.delete(a.id); else collapsed.add(a.id); redrawTree(true); },
        })
        : el('span', { class: 'toggle' }),
      el('span', { class: 'kind', 'data-kind': a.kind, text: a.kind }),
      el('span', { class: 'mono name', text: a.name || '(unnamed)' }),
      el('span', { class: 'mono muted', title: 'actor id', text: `#${a.id}` }),
      el('span', { class: 'actor-status', 'data-status': a.status, text: a.status }),
      a.subject
        ? el('span', {
          class: 'mono subject', 'data-testid': 'subject', title: a.kind === 'session' ? 'show the sessions of this user' : 'subject',
          text: a.subject,
          onclick: () => { if (a.kind === 'session') lookup(a.subject); },
        })
        : null,
      a.mailbox_len !== null && a.mailbox_len !== undefined ? el('span', { class: 'muted', text: `mailbox ${a.mailbox_len}` }) : null,
      a.children.length ? el('span', { class: 'muted', text: `${a.children.length} child${a.children.length === 1 ? '' : 'ren'}` }) : null,
      depth > 0
        ? el('button', {
          type: 'button', class: 'stop danger', 'data-testid': 'stop-actor', title: 'stop this actor; its supervisor restarts it',
          text: 'stop', onclick: () => stopActor(a),
        })
        : null);
    const li = el('li', {
      class: 'actor', 'data-testid': 'actor', 'data-id': a.id, 'data-kind': a.kind,
      'data-status': a.status, 'data-subject': a.subject || '', 'data-name': a.name || '',
    }, line);
    if (kids.length && !folded) {
      const shown = kids.slice(0, MAX_CHILDREN).map((c) => drawActor(c, depth + 1, f));
      if (kids.length > MAX_CHILDREN) {
        shown.push(el('li', { class: 'muted', text: `… ${kids.length - MAX_CHILDREN} more (use the filter)` }));
      }
      li.append(el('ul', {}, shown));
    }
    return li;
  }

  function redrawTree(force) {
    if (!lastTree) return;
    const f = $('filter').value.trim().toLowerCase();
    const key = JSON.stringify(lastTree);
    if (!force && key === drawn.tree && f === drawn.filter) return;
    drawn.tree = key;
    drawn.filter = f;
    const c = count(lastTree, { actors: 0 });
    $('tree-summary').textContent =
      `${c.actors} actors · ${c.session || 0} sessions · ${c.room || 0} rooms`;
    $('tree').replaceChildren(el('ul', {}, drawActor(lastTree, 0, f)));
  }

  async function stopActor(a) {
    const what = `${a.kind} ${a.name || a.id}${a.subject ? ` (${a.subject})` : ''}`;
    if (!window.confirm(`Stop ${what}? Its supervisor restarts it.`)) return;
    try {
      await api('POST', `/admin/v1/actors/${encodeURIComponent(a.id)}/stop`, {});
      clearErrors();
      await refreshNow();
      notice(`stopped ${what}`);
    } catch (e) {
      handle(e, `could not stop ${what}`);
    }
  }

  // ---- sessions ----------------------------------------------------------------

  function drawSessions(data) {
    const key = JSON.stringify(data);
    if (key === drawn.sessions) return;
    drawn.sessions = key;
    const box = $('sessions');
    if (!data) {
      box.replaceChildren();
      $('disconnect').disabled = true;
      return;
    }
    $('disconnect').disabled = false;
    const parts = [];
    if (data.error) {
      parts.push(el('p', { class: 'error', 'data-testid': 'lookup-error', text: data.error }));
    } else if (!data.sessions.length) {
      parts.push(el('p', { class: 'sessions-empty', 'data-testid': 'no-sessions', text: `no live session for ${data.user_id}` }));
    }
    for (const s of data.sessions || []) {
      parts.push(el('div', { class: 'session', 'data-testid': 'session', 'data-node': s.node, 'data-presence': s.presence, 'data-devices': s.devices.length },
        el('div', {},
          el('strong', { class: 'mono', text: s.user_id }), ' on node ', el('span', { class: 'mono', text: s.node }),
          ` · ${s.presence} · since ${time(s.connected_at)}`),
        el('ul', {}, s.devices.map((d) => el('li', { 'data-testid': 'device', 'data-session-id': d.session_id },
          el('span', { class: 'mono', text: d.session_id }),
          ` · connected ${time(d.connected_at)} · ${d.queued_frames} queued frame${d.queued_frames === 1 ? '' : 's'}`)))));
    }
    if (data.unreachable_nodes && data.unreachable_nodes.length) {
      parts.push(el('p', { class: 'unreachable', 'data-testid': 'unreachable', text: `nodes that did not answer: ${data.unreachable_nodes.join(', ')}` }));
    }
    box.replaceChildren(...parts);
  }

  async function fetchSessions(uid) {
    try {
      return await api('GET', `/admin/v1/sessions/${encodeURIComponent(uid)}`);
    } catch (e) {
      if (e.status === 404 || e.status === 400) return { user_id: uid, sessions: [], error: `${uid}: ${e.message}` };
      throw e;
    }
  }

  async function lookup(uid) {
    uid = (uid || '').trim();
    $('lookup-user').value = uid;
    lookedUp = uid || null;
    if (!lookedUp) { drawSessions(null); return; }
    try {
      drawSessions(await fetchSessions(lookedUp));
    } catch (e) {
      handle(e, 'could not look up the sessions');
    }
  }

  async function disconnect() {
    const uid = lookedUp;
    if (!uid) return;
    if (!window.confirm(`Disconnect every socket of ${uid}?`)) return;
    try {
      await api('POST', `/admin/v1/sessions/${encodeURIComponent(uid)}/disconnect`, {});
      clearErrors();
      await refreshNow();
      notice(`disconnected ${uid}`);
    } catch (e) {
      handle(e, `could not disconnect ${uid}`);
    }
  }

  // ---- refresh loop ------------------------------------------------------------

  function handle(e, what) {
    if (e.status === 401) {
      saveAuth(null);
      showLogin('the login expired; log in again');
    } else if (e.status === 403) {
      saveAuth(null);
      showLogin('this account does not have the admin role');
    } else {
      showError(`${what}: ${e.message}`);
    }
  }

  async function load() {
    const uid = lookedUp;
    const [cluster, tree, sessions] = await Promise.all([
      api('GET', '/admin/v1/cluster'),
      api('GET', '/admin/v1/actors'),
      uid ? fetchSessions(uid) : Promise.resolve(null),
    ]);
    drawCluster(cluster);
    lastTree = tree;
    redrawTree(false);
    if (uid === lookedUp) drawSessions(sessions);
    refreshes += 1;
    setStatus('ok', `updated ${time(new Date().toISOString())}`);
  }

  // One refresh at a time; a tick during a refresh waits for it.
  function tick() {
    if (!auth) return Promise.resolve();
    if (!inFlight) {
      inFlight = load()
        .catch((e) => {
          if (e.status === 401 || e.status === 403) handle(e, 'refresh');
          else setStatus('error', `refresh failed: ${e.message} (retrying)`);
        })
        .finally(() => { inFlight = null; });
    }
    return inFlight;
  }

  // A refresh that starts after now (not one already under way).
  function refreshNow() {
    return (inFlight || Promise.resolve()).then(() => tick());
  }

  // ---- login and logout ----------------------------------------------------------

  async function login(ev) {
    ev.preventDefault();
    const login = $('login').value.trim();
    const password = $('password').value;
    if (!login || !password) { showError('enter a username (or e-mail) and a password'); return; }
    const button = ev.submitter || document.querySelector('[data-testid=login-submit]');
    button.disabled = true;
    try {
      const s = await request('POST', '/api/v1/auth/login', { login, password });
      try {
        await request('GET', '/admin/v1/cluster', undefined, s.access_token);
      } catch (e) {
        if (e.status === 403) {
          // Not an operator: end that login again.
          request('POST', '/api/v1/auth/logout', { refresh_token: s.refresh_token }, s.access_token).catch(() => {});
          showError(`${s.user.username} does not have the admin role (admin.usernames in the server's configuration)`);
          return;
        }
        throw e;
      }
      saveAuth({ access_token: s.access_token, refresh_token: s.refresh_token, username: s.user.username });
      $('password').value = '';
      showAdmin();
    } catch (e) {
      showError(e.code === 'invalid_credentials' ? 'unknown user or wrong password' : `login failed: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  }

  async function logout() {
    const a = auth;
    saveAuth(null);
    lookedUp = null;
    lastTree = null;
    Object.keys(drawn).forEach((k) => { drawn[k] = ''; });
    $('tree').replaceChildren();
    $('nodes').replaceChildren();
    $('sessions').replaceChildren();
    showLogin();
    if (a && a.refresh_token) {
      request('POST', '/api/v1/auth/logout', { refresh_token: a.refresh_token }, a.access_token).catch(() => {});
    }
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', login);
    $('logout').addEventListener('click', logout);
    $('refresh').addEventListener('click', () => refreshNow());
    $('auto').addEventListener('change', startTimer);
    $('filter').addEventListener('input', () => redrawTree(true));
    $('lookup-form').addEventListener('submit', (ev) => { ev.preventDefault(); lookup($('lookup-user').value); });
    $('disconnect').addEventListener('click', disconnect);
    if (auth) showAdmin();
    else showLogin();
  });
})();
