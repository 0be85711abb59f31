// End-to-end test of the admin page that chatd serves at `/admin`.
//
//   CHATD_URL=http://127.0.0.1:18080 OUT_DIR=/tmp/adminshots \
//   ADMIN_LOGIN=admin ADMIN_PASSWORD=... USER_LOGIN=... USER_PASSWORD=... \
//   USER_ID=... ROOM_ID=... node tests/browser/admin.mjs
//
// USER_ID is a user with a live socket (held open by the caller) in room
// ROOM_ID; USER_LOGIN / USER_PASSWORD log in as a user without the admin role.
// The operator is refused with a wrong password and as a non-admin, logs in,
// sees the node and the supervision tree with the user's session and room
// actors, looks up the user's sessions, sees a newly connected user appear
// without clicking (auto refresh), stops the user's session actor and sees it
// come back under a new id with the socket kept, filters the tree, disconnects
// the user and logs out. Every request must go to CHATD_URL. Exits 0 on
// success, 1 with a message on failure; screenshots go to OUT_DIR.
import { chromium } from 'playwright-core';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const BASE = (process.env.CHATD_URL || '').replace(/\/+$/, '');
const OUT = process.env.OUT_DIR || 'test-output/admin';
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const T = Number(process.env.E2E_TIMEOUT_MS || 15000); // per wait
const TOTAL = Number(process.env.E2E_TOTAL_MS || 180000);
const env = (k) => {
  const v = process.env[k];
  if (!v) { console.error(`admin e2e: set ${k}`); process.exit(2); }
  return v;
};

if (!/^https?:\/\/[^/]+$/.test(BASE)) {
  console.error('admin e2e: set CHATD_URL to the server origin, e.g. CHATD_URL=http://127.0.0.1:18080');
  process.exit(2);
}
const ADMIN = { login: env('ADMIN_LOGIN'), password: env('ADMIN_PASSWORD') };
const PLAIN = { login: env('USER_LOGIN'), password: env('USER_PASSWORD') };
const USER_ID = env('USER_ID');
const ROOM_ID = env('ROOM_ID');
const WS_BASE = BASE.replace(/^http/, 'ws');
mkdirSync(OUT, { recursive: true });

const offOrigin = [];
let requestCount = 0;
const pageErrors = [];
const consoleLines = [];
const dialogs = [];
const pages = new Map();
let step = 'start';
let shot = 0;

class Failure extends Error {}
const fail = (msg) => { throw new Failure(msg); };
const log = (msg) => console.log(`[admin-e2e] ${msg}`);

async function screenshot(page, name) {
  shot += 1;
  const file = join(OUT, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  log(`screenshot ${file}`);
}

async function until(page, what, fn, arg, timeout = T) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 100 });
  } catch (e) {
    if (page.isClosed()) fail(`page closed while waiting for: ${what}`);
    let detail = '';
    try {
      detail = await page.evaluate(() => [
        ...[...document.querySelectorAll('[data-testid=error]')].map((e) => `error: ${e.textContent}`),
        `status: ${document.querySelector('[data-testid=status]')?.textContent}`,
      ].join(' | '));
    } catch (_) { /* ignore */ }
    fail(`timed out after ${timeout} ms waiting for: ${what}${detail ? ` (${detail})` : ''}`);
  }
}

async function visible(page, testId, what) {
  try {
    await page.getByTestId(testId).first().waitFor({ state: 'visible', timeout: T });
  } catch (_) {
    fail(`timed out after ${T} ms waiting for ${what || testId} to be visible`);
  }
}

async function errorsShown(page) {
  return page.$$eval('[data-testid=error]', (els) => els.map((e) => e.textContent.trim()));
}

// The id of the actor of `kind` serving `subject` as drawn, or null.
const actorId = (page, kind, subject) => page.evaluate(([k, s]) => {
  const li = document.querySelector(`[data-testid=actor][data-kind="${k}"][data-subject="${s}"]`);
  return li ? li.dataset.id : null;
}, [kind, subject]);

const refreshes = (page) => page.evaluate(() => Number(document.querySelector('[data-testid=status]').dataset.refreshes || 0));

async function newPage(context, label) {
  const page = await context.newPage();
  page.setDefaultTimeout(T);
  pages.set(label, page);
  page.on('pageerror', (err) => pageErrors.push(`${label}: ${err.message}`));
  page.on('console', (msg) => consoleLines.push(`${label} ${msg.type()}: ${msg.text()}`));
  page.on('dialog', (d) => { dialogs.push(d.message()); d.accept(); });
  page.on('websocket', (ws) => {
    if (!ws.url().startsWith(`${WS_BASE}/`)) offOrigin.push(`websocket ${ws.url()}`);
  });
  return page;
}

async function newContext(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, locale: 'en-GB', timezoneId: 'UTC' });
  await context.route('**/*', (route) => {
    const url = route.request().url();
    requestCount += 1;
    if (url === BASE || url.startsWith(`${BASE}/`)) return route.continue();
    offOrigin.push(url);
    return route.abort('blockedbyclient');
  });
  return context;
}

async function login(page, who) {
  await page.getByTestId('login').fill(who.login);
  await page.getByTestId('password').fill(who.password);
  await page.getByTestId('login-submit').click();
}

async function scenario(browser) {
  const context = await newContext(browser);
  const p = await newPage(context, 'admin');

  step = 'the page asks for a login';
  log(step);
  await p.goto(`${BASE}/admin?refresh_ms=1000`);
  await visible(p, 'login-form', 'the login form');

  step = 'a wrong password is refused';
  log(step);
  await login(p, { login: ADMIN.login, password: `${ADMIN.password}-wrong` });
  await until(p, 'the wrong-password error', () =>
    [...document.querySelectorAll('[data-testid=error]')].some((e) => e.textContent.includes('wrong password')));

  step = 'a user without the admin role is refused';
  log(step);
  await login(p, PLAIN);
  await until(p, 'the not-an-admin error', () =>
    [...document.querySelectorAll('[data-testid=error]')].some((e) => e.textContent.includes('admin role')));
  if (!(await p.getByTestId('login-view').isVisible())) fail('the login form went away for a non-admin');
  if (await p.evaluate(() => sessionStorage.length)) fail('a non-admin login was kept in sessionStorage');
  await screenshot(p, 'refused-non-admin');

  step = 'the operator logs in and sees the cluster';
  log(step);
  await login(p, ADMIN);
  await visible(p, 'admin-view', 'the admin view');
  await until(p, 'a node with a session in the cluster table', () =>
    [...document.querySelectorAll('[data-testid=node]')].some((r) => Number(r.dataset.sessions) >= 1));
  const errs = await errorsShown(p);
  if (errs.length) fail(`errors shown after logging in: ${errs.join(' | ')}`);

  step = "the supervision tree shows the root, the user's session and the room";
  log(step);
  await until(p, 'the root supervisor', () => !!document.querySelector('[data-testid=actor][data-kind=root_supervisor]'));
  await until(p, `the session actor of ${USER_ID}`,
    (u) => !!document.querySelector(`[data-testid=actor][data-kind=session][data-subject="${u}"]`), USER_ID);
  await until(p, `the room actor of ${ROOM_ID}`,
    (r) => !!document.querySelector(`[data-testid=actor][data-kind=room][data-subject="${r}"]`), ROOM_ID);
  const nested = await p.evaluate((u) => {
    const li = document.querySelector(`[data-testid=actor][data-kind=session][data-subject="${u}"]`);
    const parent = li.parentElement.closest('[data-testid=actor]');
    return parent ? parent.dataset.kind : null;
  }, USER_ID);
  if (nested !== 'session_supervisor') fail(`the session actor is drawn under ${nested}, not under the session supervisor`);
  await screenshot(p, 'cluster-and-tree');

  step = "clicking the session's user looks up its sessions";
  log(step);
  await p.locator(`[data-testid=actor][data-kind=session][data-subject="${USER_ID}"] > .actor-line [data-testid=subject]`).click();
  await until(p, 'a session with a device', () =>
    [...document.querySelectorAll('[data-testid=session]')].some((s) => s.querySelectorAll('[data-testid=device]').length >= 1));
  if ((await p.getByTestId('lookup-user').inputValue()) !== USER_ID) fail('the lookup field does not hold the user id');
  await screenshot(p, 'sessions-of-user');

  step = 'a user who connects later appears without a click (auto refresh)';
  log(step);
  const before = await refreshes(p);
  const other = await newPage(context, 'late-user');
  await other.goto(`${BASE}/healthz`);
  const late = await other.evaluate(async (wsBase) => {
    const name = `late_${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
    const r = await fetch('/api/v1/auth/register', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ username: name, email: `${name}@example.test`, password: 'password-late-1' }),
    });
    if (r.status !== 201) return { error: `register answered ${r.status}: ${await r.text()}` };
    const s = await r.json();
    return new Promise((resolve) => {
      const ws = new WebSocket(`${wsBase}/ws?access_token=${encodeURIComponent(s.access_token)}`);
      window.lateSocket = ws;
      ws.onmessage = (ev) => {
        const f = JSON.parse(ev.data);
        if (f.type === 'ready') resolve({ id: s.user.id });
      };
      ws.onerror = () => resolve({ error: 'the late socket failed' });
    });
  }, WS_BASE);
  if (late.error) fail(late.error);
  await until(p, `the late user's session actor (${late.id})`,
    (u) => !!document.querySelector(`[data-testid=actor][data-kind=session][data-subject="${u}"]`), late.id);
  if ((await refreshes(p)) <= before) fail('the tree changed without a refresh being counted');

  step = "stopping the user's session actor: it comes back under a new id, socket kept";
  log(step);
  const oldId = await actorId(p, 'session', USER_ID);
  await p.locator(`[data-testid=actor][data-id="${oldId}"] > .actor-line [data-testid=stop-actor]`).click();
  if (!dialogs.some((d) => d.includes('Stop session'))) fail(`no confirmation was asked before stopping (dialogs: ${dialogs.join(' | ')})`);
  await until(p, 'a new session actor for the user', ([u, old]) => {
    const li = document.querySelector(`[data-testid=actor][data-kind=session][data-subject="${u}"]`);
    return li && li.dataset.id !== old && li.dataset.status === 'running';
  }, [USER_ID, oldId]);
  await until(p, 'the restarted session to still hold the socket', () =>
    [...document.querySelectorAll('[data-testid=session]')].some((s) => s.querySelectorAll('[data-testid=device]').length >= 1));
  log(`session actor ${oldId} -> ${await actorId(p, 'session', USER_ID)}`);
  await screenshot(p, 'session-actor-restarted');

  step = 'the filter narrows the tree to one user';
  log(step);
  await p.getByTestId('tree-filter').fill(USER_ID);
  await until(p, "only the user's session in the filtered tree", ([u, l]) => {
    const sessions = [...document.querySelectorAll('[data-testid=actor][data-kind=session]')].map((e) => e.dataset.subject);
    return sessions.includes(u) && !sessions.includes(l);
  }, [USER_ID, late.id]);
  await screenshot(p, 'filtered-tree');
  await p.getByTestId('tree-filter').fill('');

  step = 'disconnecting the user closes its sockets';
  log(step);
  await p.getByTestId('disconnect').click();
  await until(p, 'no live socket for the user', () =>
    !!document.querySelector('[data-testid=no-sessions]')
    || (document.querySelector('[data-testid=session]') && !document.querySelector('[data-testid=device]')));
  await screenshot(p, 'user-disconnected');
  const lateOpen = await other.evaluate(() => window.lateSocket.readyState === WebSocket.OPEN);
  if (!lateOpen) fail("disconnecting one user closed another user's socket");

  step = 'logging out returns to the login form';
  log(step);
  await p.getByTestId('logout').click();
  await visible(p, 'login-form', 'the login form after logging out');
  if (await p.evaluate(() => sessionStorage.length)) fail('tokens are still in sessionStorage after logging out');

  step = 'the page only talked to chatd';
  if (requestCount === 0) fail('no request was seen at all: the origin check did not run');
  if (offOrigin.length) fail(`the page requested URLs outside ${BASE}:\n  ${[...new Set(offOrigin)].join('\n  ')}`);
  if (pageErrors.length) fail(`uncaught errors in the page:\n  ${pageErrors.join('\n  ')}`);
  log(`${requestCount} requests, all to ${BASE}`);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--disable-quic', '--no-first-run'],
  });
  try {
    await scenario(browser);
  } catch (err) {
    for (const [label, page] of pages) {
      if (page.isClosed()) continue;
      const file = join(OUT, `failure-${label}.png`);
      await page.screenshot({ path: file, fullPage: true }).then(() => log(`screenshot ${file}`), () => {});
    }
    throw err;
  } finally {
    await browser.close().catch(() => {});
  }
}

const watchdog = setTimeout(() => {
  console.error(`admin e2e FAILED: the whole test took longer than ${TOTAL} ms (at step: ${step})`);
  process.exit(1);
}, TOTAL);

try {
  await main();
  clearTimeout(watchdog);
  log('PASS');
  process.exit(0);
} catch (err) {
  clearTimeout(watchdog);
  console.error(`\nadmin e2e FAILED at step: ${step}\n  ${err instanceof Failure ? err.message : err.stack || err}`);
  if (pageErrors.length) console.error(`uncaught errors in the page:\n  ${pageErrors.join('\n  ')}`);
  if (consoleLines.length) console.error(`last console lines:\n  ${consoleLines.slice(-20).join('\n  ')}`);
  writeFileSync(join(OUT, 'failure.txt'), `step: ${step}\n${err && err.message}\n\n${consoleLines.join('\n')}\n`);
  process.exit(1);
}
