// End-to-end test of the chat page that chatd serves at `/`.
//
//   CHATD_URL=http://127.0.0.1:18080 OUT_DIR=/tmp/webshots node tests/browser/e2e.mjs
//
// Two browser contexts (two people) register, open a direct chat, exchange
// messages, see delivered and read ticks, one goes offline and comes back, and
// sees what it missed in order without duplicates. Every request the page makes
// must go to CHATD_URL; anything else is aborted and fails the test.
// Exits 0 on success, 1 with a message on failure; screenshots go to OUT_DIR.
import { chromium } from 'playwright-core';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const BASE = (process.env.CHATD_URL || '').replace(/\/+$/, '');
const OUT = process.env.OUT_DIR || 'test-output/browser';
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const T = Number(process.env.E2E_TIMEOUT_MS || 15000); // per wait
const TOTAL = Number(process.env.E2E_TOTAL_MS || 240000);

if (!/^https?:\/\/[^/]+$/.test(BASE)) {
  console.error('e2e: set CHATD_URL to the server origin, e.g. CHATD_URL=http://127.0.0.1:18080');
  process.exit(2);
}
const WS_BASE = BASE.replace(/^http/, 'ws');
mkdirSync(OUT, { recursive: true });

const run = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
const mkUser = (name, display) => ({
  username: `${name}_${run}`,
  email: `${name}_${run}@example.test`,
  password: `pw-${run}-secret`,
  display,
});
const alice = mkUser('alice', 'Alice Liddell');
const bob = mkUser('bob', 'Bob Builder');

const offOrigin = [];   // requests that did not go to chatd
let requestCount = 0;
const pageErrors = [];  // uncaught exceptions in the page
const consoleLines = [];
const pages = new Map(); // label -> page, for failure screenshots
let step = 'start';
let shot = 0;

class Failure extends Error {}
const fail = (msg) => { throw new Failure(msg); };

function log(msg) { console.log(`[e2e] ${msg}`); }

async function screenshot(page, name) {
  shot += 1;
  const file = join(OUT, `${String(shot).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file, fullPage: false });
  log(`screenshot ${file}`);
}

// Wait until fn(arg) is truthy in the page; on timeout, fail with `what`.
async function until(page, what, fn, arg, timeout = T) {
  try {
    await page.waitForFunction(fn, arg, { timeout, polling: 100 });
  } catch (e) {
    if (page.isClosed()) fail(`page closed while waiting for: ${what}`);
    let detail = '';
    try { detail = await page.evaluate(() => [...document.querySelectorAll('[data-testid=error]')].map((e) => e.textContent).join(' | ')); } catch (_) { /* ignore */ }
    fail(`timed out after ${timeout} ms waiting for: ${what}${detail ? ` (errors shown on the page: ${detail})` : ''}`);
  }
}

async function visible(page, testId, what) {
  try {
    await page.getByTestId(testId).first().waitFor({ state: 'visible', timeout: T });
  } catch (_) {
    fail(`timed out after ${T} ms waiting for ${what || testId} to be visible`);
  }
}

// The conversation as the page shows it.
const conversation = (page) => page.$$eval('[data-testid=message]', (els) => els.map((e) => ({
  id: e.dataset.id || null,
  seq: e.dataset.seq ? Number(e.dataset.seq) : null,
  body: e.querySelector('[data-testid=message-body]').textContent,
  mine: e.dataset.mine === 'true',
  state: e.dataset.state || null,
})));

async function errorsShown(page) {
  return page.$$eval('[data-testid=error]', (els) => els.map((e) => e.textContent.replace(/×$/, '').trim()));
}
async function noErrors(page, who) {
  const errs = await errorsShown(page);
  if (errs.length) fail(`${who}'s page shows an unexpected error: ${errs.join(' | ')}`);
}

async function waitConnected(page, who) {
  await until(page, `${who}'s socket to be connected`,
    () => document.querySelector('[data-testid=conn-status]')?.dataset.state === 'connected');
}

async function waitStatus(page, body, states, who) {
  const want = Array.isArray(states) ? states : [states];
  await until(page, `${who}'s message "${body}" to show ${want.join(' or ')}`, ([b, w]) => {
    const li = [...document.querySelectorAll('[data-testid=message]')]
      .find((e) => e.querySelector('[data-testid=message-body]').textContent === b);
    return li && w.includes(li.dataset.state);
  }, [body, want]);
}

async function waitBodies(page, bodies, who) {
  await until(page, `${who} to see the message(s) ${bodies.map((b) => `"${b}"`).join(', ')}`, (bs) => {
    const shown = [...document.querySelectorAll('[data-testid=message-body]')].map((e) => e.textContent);
    return bs.every((b) => shown.includes(b));
  }, bodies);
}

async function send(page, text) {
  const input = page.getByTestId('composer-input');
  await input.fill(text);
  await input.press('Enter');
  // The composer empties and the message shows at once, pending or better.
  await until(page, `"${text}" to appear in the sender's conversation`, (b) =>
    [...document.querySelectorAll('[data-testid=message-body]')].some((e) => e.textContent === b), text);
}

// The page marks where the missed / unread messages start.
async function dividerBefore(page, body, label, who) {
  await until(page, `${who}'s "${label}" line right above "${body}"`, ([b, l]) => {
    const d = document.querySelector('[data-testid=new-messages-divider]');
    const next = d && d.nextElementSibling;
    return d && d.textContent.includes(l) && next && next.querySelector('[data-testid=message-body]').textContent === b;
  }, [body, label]);
}

// In order by seq, each message once, and exactly the expected bodies in this order.
async function checkOrderAndUnique(page, expected, who) {
  // First wait until the page shows exactly these bodies (history loads take a moment) ...
  try {
    await page.waitForFunction((exp) => {
      const shown = [...document.querySelectorAll('[data-testid=message-body]')].map((e) => e.textContent);
      return JSON.stringify(shown) === JSON.stringify(exp);
    }, expected, { timeout: T, polling: 100 });
  } catch (_) { /* ... and if it never does, say what it shows instead, below. */ }
  const msgs = await conversation(page);
  const ids = msgs.map((m) => m.id);
  const dupIds = ids.filter((id, i) => id && ids.indexOf(id) !== i);
  if (dupIds.length) fail(`${who} shows duplicate message ids: ${dupIds.join(', ')}`);
  const seqs = msgs.map((m) => m.seq);
  if (seqs.some((s) => s === null)) fail(`${who} still shows messages without a seq: ${JSON.stringify(msgs.filter((m) => m.seq === null))}`);
  for (let i = 1; i < seqs.length; i++) {
    if (!(seqs[i] > seqs[i - 1])) fail(`${who}'s messages are not in seq order: ${seqs.join(',')}`);
  }
  const bodies = msgs.map((m) => m.body);
  if (JSON.stringify(bodies) !== JSON.stringify(expected)) {
    fail(`${who} shows\n  ${JSON.stringify(bodies)}\nexpected\n  ${JSON.stringify(expected)}`);
  }
}

async function newPage(context, label) {
  const page = await context.newPage();
  page.setDefaultTimeout(T);
  pages.set(label, page);
  page.on('pageerror', (err) => pageErrors.push(`${label}: ${err.message}`));
  page.on('console', (msg) => consoleLines.push(`${label} ${msg.type()}: ${msg.text()}`));
  page.on('websocket', (ws) => {
    if (!ws.url().startsWith(`${WS_BASE}/`)) offOrigin.push(`websocket ${ws.url()}`);
  });
  return page;
}

async function newContext(browser, viewport) {
  const context = await browser.newContext({ viewport, locale: 'en-GB', timezoneId: 'UTC' });
  // The network is cut off from everything but chatd: other requests are
  // recorded and aborted.
  await context.route('**/*', (route) => {
    const url = route.request().url();
    requestCount += 1;
    if (url === BASE || url.startsWith(`${BASE}/`)) return route.continue();
    offOrigin.push(url);
    return route.abort('blockedbyclient');
  });
  context.on('request', (req) => {
    const url = req.url();
    if (!(url === BASE || url.startsWith(`${BASE}/`))) offOrigin.push(url);
  });
  return context;
}

async function register(page, u) {
  await page.goto(`${BASE}/`);
  await visible(page, 'auth-view', 'the log in / register form');
  await page.getByTestId('tab-register').click();
  await page.getByLabel('Username', { exact: true }).fill(u.username);
  await page.getByLabel('Display name').fill(u.display);
  await page.getByLabel('E-mail', { exact: true }).fill(u.email);
  await page.getByLabel('Password', { exact: true }).filter({ visible: true }).fill(u.password);
  await page.getByTestId('register-submit').click();
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
      await page.screenshot({ path: file }).then(() => log(`screenshot ${file}`), () => {});
    }
    throw err;
  } finally {
    await browser.close().catch(() => {});
  }
}

async function scenario(browser) {
  // Alice on a laptop-sized window, Bob on a phone-sized one.
  const aliceCtx = await newContext(browser, { width: 1100, height: 720 });
  const bobCtx = await newContext(browser, { width: 390, height: 760 });
  const a = await newPage(aliceCtx, 'alice');
  let b = await newPage(bobCtx, 'bob');

  step = 'the page loads from chatd';
  const res = await a.goto(`${BASE}/`);
  if (!res || res.status() !== 200) fail(`GET / answered ${res && res.status()}`);
  const ctype = res.headers()['content-type'] || '';
  if (!ctype.startsWith('text/html')) fail(`GET / has content type "${ctype}", expected text/html`);
  for (const [path, type] of [['/app.js', 'javascript'], ['/app.css', 'text/css']]) {
    const r = await aliceCtx.request.get(`${BASE}${path}`);
    if (r.status() !== 200) fail(`GET ${path} answered ${r.status()}`);
    if (!(r.headers()['content-type'] || '').includes(type)) fail(`GET ${path} has content type "${r.headers()['content-type']}"`);
  }

  step = 'Bob registers (phone-sized window)';
  log(step);
  await register(b, bob);
  await visible(b, 'chat-view', "Bob's chat view");
  await waitConnected(b, 'Bob');
  await until(b, "Bob's name in the top bar", (n) => document.querySelector('[data-testid=me-name]').textContent === n, bob.display);

  step = 'a taken username is shown as an error in words';
  log(step);
  await register(a, { ...alice, username: bob.username });
  await visible(a, 'error', 'an error message for a taken username');
  const errs = await errorsShown(a);
  if (!errs.some((e) => /taken|exists|already/i.test(e))) fail(`the error for a taken username does not say so: ${errs.join(' | ')}`);
  await screenshot(a, 'register-error');
  for (const btn of await a.getByTestId('error').getByRole('button', { name: 'Dismiss' }).all()) await btn.click();

  step = 'Alice registers';
  log(step);
  await a.getByLabel('Username', { exact: true }).fill(alice.username);
  await a.getByTestId('register-submit').click();
  await visible(a, 'chat-view', "Alice's chat view");
  await waitConnected(a, 'Alice');
  await noErrors(a, 'Alice');

  step = 'Alice finds Bob by username and opens a direct chat';
  log(step);
  await a.getByLabel('Start a chat').fill(bob.username.slice(0, 12));
  const result = a.locator(`[data-testid=user-result][data-username="${bob.username}"]`);
  try { await result.waitFor({ state: 'visible', timeout: T }); } catch (_) { fail(`searching "${bob.username.slice(0, 12)}" did not list ${bob.username}`); }
  await result.click();
  await visible(a, 'conversation', "Alice's conversation view");
  await until(a, 'the conversation title to be Bob', (n) => document.querySelector('[data-testid=conv-title]').textContent === n, bob.display);
  await until(a, "Bob's presence dot to be online", () => document.querySelector('[data-testid=presence-dot]')?.dataset.online === 'true');

  step = 'Alice sends; Bob (room list open) gets it: delivered';
  log(step);
  const m1 = 'Hello Bob — first message ✓';
  await send(a, m1);
  await waitStatus(a, m1, ['sent', 'delivered', 'read'], 'Alice');
  await until(b, "the new room in Bob's room list with 1 unread", () => {
    const item = document.querySelector('[data-testid=room-item]');
    return item && item.querySelector('[data-testid=room-unread]').textContent === '1' && !item.querySelector('[data-testid=room-unread]').hidden;
  });
  await until(b, "Bob's room list to show the last message", (t) =>
    document.querySelector('[data-testid=room-item] [data-testid=room-last]')?.textContent.includes(t), m1);
  await waitStatus(a, m1, 'delivered', 'Alice');
  await screenshot(a, 'alice-delivered');
  await screenshot(b, 'bob-room-list-unread');

  step = 'Bob opens the chat: read';
  log(step);
  await b.getByTestId('room-item').first().click();
  await visible(b, 'conversation', "Bob's conversation");
  await waitBodies(b, [m1], 'Bob');
  await waitStatus(a, m1, 'read', 'Alice');
  await until(b, "Alice's presence dot on Bob's side to be online", () => document.querySelector('[data-testid=presence-dot]')?.dataset.online === 'true');

  step = 'Bob types: Alice sees the typing indicator';
  log(step);
  await b.getByTestId('composer-input').pressSequentially('Hi Ali', { delay: 20 });
  await until(a, 'the typing indicator on Alice\'s side', () => /typing/.test(document.querySelector('[data-testid=typing-indicator]').textContent));
  await screenshot(a, 'alice-sees-typing');
  const m2 = 'Hi Alice! Got it.';
  await b.getByTestId('composer-input').fill(m2);
  await b.getByTestId('composer-input').press('Enter');
  await waitBodies(a, [m2], 'Alice');
  await waitStatus(b, m2, 'read', 'Bob');
  await until(a, 'the typing indicator to go away', () => document.querySelector('[data-testid=typing-indicator]').textContent === '');
  await checkOrderAndUnique(a, [m1, m2], 'Alice');
  await checkOrderAndUnique(b, [m1, m2], 'Bob');
  await screenshot(b, 'bob-conversation-read');
  await noErrors(a, 'Alice');
  await noErrors(b, 'Bob');

  step = 'Bob goes offline; Alice sends three messages';
  log(step);
  await bobCtx.setOffline(true);
  await until(b, "Bob's page to notice it is offline", () => document.querySelector('[data-testid=conn-status]')?.dataset.state !== 'connected');
  const missed = ['While you were away 1', 'While you were away 2', 'While you were away 3'];
  for (const m of missed) await send(a, m);
  for (const m of missed) await waitStatus(a, m, ['sent', 'delivered', 'read'], 'Alice');
  await screenshot(b, 'bob-offline');

  step = 'Bob comes back online: reconnects and sees what he missed';
  log(step);
  await bobCtx.setOffline(false);
  await waitConnected(b, 'Bob');
  await waitBodies(b, missed, 'Bob');
  await checkOrderAndUnique(b, [m1, m2, ...missed], 'Bob');
  await dividerBefore(b, missed[0], 'Missed while you were offline', 'Bob');
  await waitStatus(a, missed[2], 'read', 'Alice');
  await screenshot(b, 'bob-back-online');
  await screenshot(a, 'alice-read-after-reconnect');

  step = "Bob closes the page; Alice sees him go offline and sends two more";
  log(step);
  await b.close();
  pages.delete('bob');
  await until(a, "Bob's presence dot to turn offline", () => document.querySelector('[data-testid=presence-dot]')?.dataset.online === 'false');
  const closed = ['Sent while your page was closed', 'And one more, in order'];
  for (const m of closed) await send(a, m);
  for (const m of closed) await waitStatus(a, m, 'sent', 'Alice');
  await screenshot(a, 'alice-bob-away');

  step = 'Bob opens the page again (still logged in) and catches up';
  log(step);
  b = await newPage(bobCtx, 'bob');
  await b.goto(`${BASE}/`);
  await visible(b, 'chat-view', "Bob's chat view after reopening (tokens kept in storage)");
  await waitConnected(b, 'Bob');
  await until(b, "Bob's room list to show 2 unread", () => document.querySelector('[data-testid=room-item] [data-testid=room-unread]')?.textContent === '2');
  await screenshot(b, 'bob-reopened-room-list');
  await b.getByTestId('room-item').first().click();
  await waitBodies(b, closed, 'Bob');
  await checkOrderAndUnique(b, [m1, m2, ...missed, ...closed], 'Bob');
  await dividerBefore(b, closed[0], '2 new messages', 'Bob');
  await waitStatus(a, closed[1], 'read', 'Alice');
  await until(a, "Bob's presence dot to be online again", () => document.querySelector('[data-testid=presence-dot]')?.dataset.online === 'true');
  await checkOrderAndUnique(a, [m1, m2, ...missed, ...closed], 'Alice');
  await screenshot(b, 'bob-caught-up');
  await screenshot(a, 'alice-all-read');

  step = 'Bob blocks and unblocks Alice from the conversation';
  log(step);
  await b.getByTestId('block-button').click();
  await until(b, 'the block button to read Unblock', () => document.querySelector('[data-testid=block-button]').textContent === 'Unblock');
  await screenshot(b, 'bob-blocked-alice');
  await b.getByTestId('block-button').click();
  await until(b, 'the block button to read Block', () => document.querySelector('[data-testid=block-button]').textContent === 'Block');
  await noErrors(b, 'Bob');

  step = 'Alice creates a group with Bob; Bob sees it when the first message comes';
  log(step);
  await a.getByTestId('new-group-toggle').click();
  const groupName = `Team ${run}`;
  await a.getByLabel('Group name').fill(groupName);
  await a.getByLabel('Add members').fill(bob.username.slice(0, 10));
  const gres = a.locator(`[data-testid=group-member-results] [data-username="${bob.username}"]`);
  try { await gres.waitFor({ state: 'visible', timeout: T }); } catch (_) { fail('the group member search did not list Bob'); }
  await gres.click();
  await visible(a, 'group-member', 'Bob as a chosen member');
  await a.getByTestId('group-create').click();
  await until(a, 'the group conversation to open', (n) => document.querySelector('[data-testid=conv-title]').textContent === n, groupName);
  const g1 = 'Welcome to the group';
  await send(a, g1);
  await waitStatus(a, g1, ['sent', 'delivered', 'read'], 'Alice');
  await b.getByTestId('back-button').click();
  await until(b, "the group in Bob's room list", (n) =>
    [...document.querySelectorAll('[data-testid=room-name]')].some((e) => e.textContent === n), groupName);
  await screenshot(b, 'bob-room-list-group');
  await b.getByTestId('room-item').filter({ has: b.getByTestId('room-name').getByText(groupName, { exact: true }) }).click();
  await waitBodies(b, [g1], 'Bob');
  await waitStatus(a, g1, 'read', 'Alice');
  await screenshot(a, 'alice-group');

  step = 'history is paged upward (more than one page)';
  log(step);
  // Fill the direct room over HTTP, as another client would.
  const filled = await a.evaluate(async (peer) => {
    const auth = JSON.parse(localStorage.getItem('chatd.auth'));
    const h = { Authorization: `Bearer ${auth.access_token}`, 'Content-Type': 'application/json' };
    const room = await (await fetch('/api/v1/rooms', { method: 'POST', headers: h, body: JSON.stringify({ kind: 'direct', peer }) })).json();
    for (let i = 1; i <= 60; i++) {
      const r = await fetch(`/api/v1/rooms/${room.id}/messages`, {
        method: 'POST', headers: h, body: JSON.stringify({ client_msg_id: `fill-${i}-${room.id}`, body: `history ${i}` }),
      });
      if (r.status !== 201 && r.status !== 200) return `POST message ${i} answered ${r.status}: ${await r.text()}`;
    }
    return 'ok';
  }, await b.evaluate(() => JSON.parse(localStorage.getItem('chatd.auth')).user.id));
  if (filled !== 'ok') fail(filled);
  const expectedAll = [m1, m2, ...missed, ...closed, ...Array.from({ length: 60 }, (_, i) => `history ${i + 1}`)];
  await b.reload();
  await visible(b, 'chat-view', "Bob's chat view after reload");
  await waitConnected(b, 'Bob');
  await until(b, "the direct room in Bob's list", (n) =>
    [...document.querySelectorAll('[data-testid=room-name]')].some((e) => e.textContent === n), alice.display);
  await b.getByTestId('room-item').filter({ has: b.getByTestId('room-name').getByText(alice.display, { exact: true }) }).click();
  // The newest 50 (of 67) come first: "history 11" … "history 60".
  await waitBodies(b, ['history 11', 'history 60'], 'Bob');
  const firstPage = await conversation(b);
  if (firstPage.length !== 50) fail(`the first page of history has ${firstPage.length} messages, expected 50`);
  await visible(b, 'load-older', 'the "Load older messages" button');
  await b.getByTestId('load-older').click();
  await waitBodies(b, [m1], 'Bob (after loading older messages)');
  await until(b, 'the load older button to go away (no more history)', () => document.querySelector('[data-testid=load-older]').hidden);
  await checkOrderAndUnique(b, expectedAll, 'Bob (whole history)');
  await screenshot(b, 'bob-history-paged');

  step = 'Alice logs out and logs in again';
  log(step);
  await a.getByTestId('logout-button').click();
  await visible(a, 'auth-view', 'the log in form after logging out');
  const stored = await a.evaluate(() => localStorage.getItem('chatd.auth'));
  if (stored) fail('tokens are still in localStorage after log out');
  await screenshot(a, 'alice-logged-out');
  await a.getByLabel('Username or e-mail').fill(alice.email);
  await a.getByLabel('Password', { exact: true }).filter({ visible: true }).fill(alice.password);
  await a.getByTestId('login-submit').click();
  await visible(a, 'chat-view', "Alice's chat view after logging in");
  await waitConnected(a, 'Alice');
  await until(a, 'both rooms in Alice\'s list after logging in', () => document.querySelectorAll('[data-testid=room-item]').length >= 2);
  await noErrors(a, 'Alice');
  await noErrors(b, 'Bob');
  await screenshot(a, 'alice-logged-in-again');

  step = 'the page only talked to chatd';
  if (requestCount === 0) fail('no request was seen at all: the origin check did not run');
  if (offOrigin.length) fail(`the page requested URLs outside ${BASE}:\n  ${[...new Set(offOrigin)].join('\n  ')}`);
  if (pageErrors.length) fail(`uncaught errors in the page:\n  ${pageErrors.join('\n  ')}`);
  log(`${requestCount} requests, all to ${BASE}`);
}

const watchdog = setTimeout(() => {
  console.error(`e2e FAILED: the whole test took longer than ${TOTAL} ms (at step: ${step})`);
  process.exit(1);
}, TOTAL);

try {
  await main();
  clearTimeout(watchdog);
  log('PASS');
  process.exit(0);
} catch (err) {
  clearTimeout(watchdog);
  console.error(`\ne2e FAILED at step: ${step}\n  ${err instanceof Failure ? err.message : err.stack || err}`);
  if (pageErrors.length) console.error(`uncaught errors in the page:\n  ${pageErrors.join('\n  ')}`);
  if (consoleLines.length) console.error(`last console lines:\n  ${consoleLines.slice(-20).join('\n  ')}`);
  writeFileSync(join(OUT, 'failure.txt'), `step: ${step}\n${err && err.message}\n\n${consoleLines.join('\n')}\n`);
  process.exit(1);
}
