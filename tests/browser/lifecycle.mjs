// Replies, edits, deletes and reactions in the chat page that chatd serves
// at `/` (issue 19).
//
//   CHATD_URL=http://127.0.0.1:18080 OUT_DIR=/tmp/webshots node tests/browser/lifecycle.mjs
//
// Bob sends a message; Alice, in the browser, replies to it, reacts to it,
// edits her reply and deletes it; Bob's edit made over HTTP shows up live.
// Exits 0 on success, 1 with a message on failure.
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const BASE = (process.env.CHATD_URL || '').replace(/\/+$/, '');
const OUT = process.env.OUT_DIR || 'test-output/browser';
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const T = Number(process.env.E2E_TIMEOUT_MS || 15000);

if (!/^https?:\/\/[^/]+$/.test(BASE)) {
  console.error('lifecycle: set CHATD_URL to the server origin');
  process.exit(2);
}
mkdirSync(OUT, { recursive: true });

class Failure extends Error {}
const fail = (msg) => { throw new Failure(msg); };
const log = (msg) => console.log(`[lifecycle] ${msg}`);

async function http(method, path, token, body) {
  const headers = {};
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(`${BASE}/api/v1${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

const run = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
async function register(name) {
  const u = { username: `${name}_${run}`, email: `${name}_${run}@example.test`, password: `pw-${run}-secret` };
  const r = await http('POST', '/auth/register', null, u);
  if (r.status !== 201) fail(`register ${name}: ${r.status} ${JSON.stringify(r.body)}`);
  return { ...u, id: r.body.user.id, token: r.body.access_token };
}

async function until(page, what, fn, arg) {
  try {
    await page.waitForFunction(fn, arg, { timeout: T, polling: 100 });
  } catch (_) {
    const errs = await page.$$eval('[data-testid=error]', (els) => els.map((e) => e.textContent)).catch(() => []);
    const shown = await page.$eval('#message-items', (e) => e.outerHTML.slice(0, 1500)).catch(() => '');
    fail(`timed out waiting for: ${what}${errs.length ? ` (errors on the page: ${errs.join(' | ')})` : ''}\n${shown}`);
  }
}

async function main() {
  const alice = await register('alice');
  const bob = await register('bob');
  const room = await http('POST', '/rooms', alice.token, { kind: 'direct', peer: bob.id });
  if (room.status !== 201) fail(`room: ${room.status}`);
  const roomId = room.body.id;
  const hello = await http('POST', `/rooms/${roomId}/messages`, bob.token, { client_msg_id: `b-${run}`, body: 'hello from bob' });
  if (hello.status !== 201) fail(`send: ${hello.status}`);
  const bobMsg = hello.body.id;

  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
  const pageErrors = [];
  try {
    const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
    await context.route('**/*', (route) => {
      const url = route.request().url();
      if (url.startsWith(`${BASE}/`) || url === BASE) return route.continue();
      return route.abort('blockedbyclient');
    });
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(e.message));
    const answers = [];
    page.on('dialog', (d) => d.accept(answers.shift()));

    await page.goto(`${BASE}/`);
    await page.getByTestId('login-login').fill(alice.username);
    await page.getByTestId('login-password').fill(alice.password);
    await page.getByTestId('login-submit').click();
    await page.locator(`[data-testid=room-item][data-room-id="${roomId}"]`).click();
    const bobLi = page.locator(`[data-testid=message][data-id="${bobMsg}"]`);
    await bobLi.waitFor({ state: 'visible', timeout: T });
    log('room open');

    // Reply.
    await bobLi.hover();
    await bobLi.getByTestId('reply-button').click();
    await page.getByTestId('reply-bar').waitFor({ state: 'visible', timeout: T });
    await page.getByTestId('composer-input').fill('my answer');
    await page.getByTestId('composer-input').press('Enter');
    await until(page, 'the reply with its quote', () => [...document.querySelectorAll('[data-testid=message]')]
      .some((li) => li.dataset.id && li.querySelector('[data-testid=message-body]').textContent === 'my answer'
        && (li.querySelector('[data-testid=reply-quote]') || {}).textContent?.includes('hello from bob')));
    const hist = await http('GET', `/rooms/${roomId}/messages?limit=10`, alice.token);
    const reply = hist.body.messages.find((m) => m.body === 'my answer');
    if (!reply || reply.reply_to !== bobMsg) fail(`the stored reply: ${JSON.stringify(reply)}`);
    log('replied');

    // React.
    await bobLi.hover();
    await bobLi.getByTestId('react-button').click();
    await until(page, 'a 👍 1 reaction', (id) => {
      const li = document.querySelector(`[data-testid=message][data-id="${id}"]`);
      const r = li && li.querySelector('[data-testid=reaction]');
      return r && r.textContent === '👍 1' && r.classList.contains('on');
    }, bobMsg);
    log('reacted');

    // Edit the reply.
    const myLi = page.locator(`[data-testid=message][data-id="${reply.id}"]`);
    answers.push('my answer, edited');
    await myLi.hover();
    await myLi.getByTestId('edit-button').click();
    await until(page, 'the edited reply', (id) => {
      const li = document.querySelector(`[data-testid=message][data-id="${id}"]`);
      return li && li.querySelector('[data-testid=message-body]').textContent === 'my answer, edited'
        && li.querySelector('[data-testid=message-edited]');
    }, reply.id);
    log('edited');

    // Bob edits his message elsewhere: it changes here live.
    const e = await http('PATCH', `/rooms/${roomId}/messages/${bobMsg}`, bob.token, { body: 'hello from bob (fixed)' });
    if (e.status !== 200) fail(`bob's edit: ${e.status}`);
    await until(page, "bob's edit, live", (id) => {
      const li = document.querySelector(`[data-testid=message][data-id="${id}"]`);
      return li && li.querySelector('[data-testid=message-body]').textContent === 'hello from bob (fixed)';
    }, bobMsg);

    // Delete the reply.
    answers.push(undefined);
    await myLi.hover();
    await myLi.getByTestId('delete-button').click();
    await until(page, 'the tombstone', (id) => {
      const li = document.querySelector(`[data-testid=message][data-id="${id}"]`);
      return li && li.classList.contains('deleted') && li.querySelector('[data-testid=message-body]').textContent === 'Message deleted';
    }, reply.id);
    await page.screenshot({ path: join(OUT, 'lifecycle.png') });
    const after = await http('GET', `/rooms/${roomId}/messages?limit=10`, alice.token);
    const t = after.body.messages.find((m) => m.id === reply.id);
    if (!t.deleted || t.body !== '') fail(`the stored tombstone: ${JSON.stringify(t)}`);

    const errs = await page.$$eval('[data-testid=error]', (els) => els.map((x) => x.textContent).filter((x) => x.trim()));
    if (errs.length) fail(`errors on the page: ${errs.join(' | ')}`);
    if (pageErrors.length) fail(`uncaught errors in the page: ${pageErrors.join(' | ')}`);
    log('ok');
  } finally {
    await browser.close();
  }
}

main().then(() => process.exit(0), (e) => {
  console.error(e instanceof Failure ? `[lifecycle] FAILED: ${e.message}` : e);
  process.exit(1);
});
