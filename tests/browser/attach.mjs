// Attachments in the chat page that chatd serves at `/`.
//
//   CHATD_URL=http://127.0.0.1:18080 OUT_DIR=/tmp/webshots node tests/browser/attach.mjs
//
// Alice logs in, opens her direct room with Bob, attaches a PNG and a text
// file with the attach button, sends them with a message, and sees the image
// inline (decoded, at its real size) and the text file as a link. The
// uploads are on the server, readable with her token. A message that
// carries `attachments` (the contract's shape) is rendered the same way when
// it arrives from history. Exits 0 on success, 1 with a message on failure.
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { deflateSync } from 'node:zlib';

const BASE = (process.env.CHATD_URL || '').replace(/\/+$/, '');
const OUT = process.env.OUT_DIR || 'test-output/browser';
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const T = Number(process.env.E2E_TIMEOUT_MS || 15000);

if (!/^https?:\/\/[^/]+$/.test(BASE)) {
  console.error('attach: set CHATD_URL to the server origin');
  process.exit(2);
}
mkdirSync(OUT, { recursive: true });

class Failure extends Error {}
const fail = (msg) => { throw new Failure(msg); };
const log = (msg) => console.log(`[attach] ${msg}`);

function crc32(buf) {
  let c = 0xffffffff;
  for (const b of buf) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

// A real RGBA PNG of w×h.
function png(w, h) {
  const raw = Buffer.alloc((w * 4 + 1) * h);
  for (let y = 0; y < h; y++) {
    raw[y * (w * 4 + 1)] = 0;
    for (let x = 0; x < w; x++) {
      const o = y * (w * 4 + 1) + 1 + x * 4;
      raw[o] = 40 * x; raw[o + 1] = 90; raw[o + 2] = 200; raw[o + 3] = 255;
    }
  }
  const chunk = (type, data) => {
    const len = Buffer.alloc(4); len.writeUInt32BE(data.length);
    const td = Buffer.concat([Buffer.from(type), data]);
    const crc = Buffer.alloc(4); crc.writeUInt32BE(crc32(td));
    return Buffer.concat([len, td, crc]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0); ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8; ihdr[9] = 6;
  return Buffer.concat([Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr), chunk('IDAT', deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}

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

  // A message from history that carries an attachment, as the contract shapes it.
  const img = png(5, 4);
  const pre = await fetch(`${BASE}/api/v1/rooms/${roomId}/attachments?filename=old.png`, {
    method: 'POST', headers: { Authorization: `Bearer ${alice.token}`, 'Content-Type': 'image/png' }, body: img });
  if (pre.status !== 201) fail(`upload: ${pre.status} ${await pre.text()}`);
  const oldAttachment = await pre.json();

  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-dev-shm-usage'] });
  const pageErrors = [];
  try {
    const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
    await context.route('**/*', (route) => {
      const url = route.request().url();
      if (url.startsWith(`${BASE}/`) || url === BASE) return route.continue();
      return route.abort('blockedbyclient');
    });
    // History answers with the contract's `attachments` on the first message.
    await context.route((url) => url.pathname === `/api/v1/rooms/${roomId}/messages`, async (route) => {
      if (route.request().method() !== 'GET') return route.continue();
      const res = await route.fetch();
      const body = await res.json();
      for (const m of body.messages || []) if (m.body === 'from history') m.attachments = [oldAttachment];
      return route.fulfill({ response: res, json: body });
    });
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(e.message));
    const sent = await http('POST', `/rooms/${roomId}/messages`, alice.token, { client_msg_id: `h-${run}`, body: 'from history' });
    if (sent.status !== 201) fail(`send: ${sent.status}`);

    await page.goto(`${BASE}/`);
    await page.getByTestId('login-login').fill(alice.username);
    await page.getByTestId('login-password').fill(alice.password);
    await page.getByTestId('login-submit').click();
    await page.locator(`[data-testid=room-item][data-room-id="${roomId}"]`).click();
    log('room open');

    await until(page, 'the image of the message from history, decoded at 5×4', () => {
      const img = document.querySelector('[data-testid=attachment-image]');
      return img && img.src.startsWith('blob:') && img.complete && img.naturalWidth === 5 && img.naturalHeight === 4;
    });

    await page.getByTestId('attach-button').waitFor({ state: 'visible' });
    await page.getByTestId('attach-input').setInputFiles([
      { name: 'pic.png', mimeType: 'image/png', buffer: png(3, 2) },
      { name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('some notes') },
    ]);
    await until(page, 'two uploaded files in the composer', () => {
      const chips = [...document.querySelectorAll('[data-testid=draft-attachment]')];
      return chips.length === 2 && chips.every((c) => c.dataset.state === 'ready');
    });
    const input = page.getByTestId('composer-input');
    await input.fill('look at this');
    await input.press('Enter');
    await until(page, 'the sent message with an inline 3×2 image and a link to notes.txt', () => {
      const li = [...document.querySelectorAll('[data-testid=message]')]
        .find((e) => e.querySelector('[data-testid=message-body]').textContent === 'look at this');
      if (!li) return false;
      const img = li.querySelector('[data-testid=attachment-image]');
      const link = li.querySelector('[data-testid=attachment-link]');
      return img && img.complete && img.naturalWidth === 3 && img.naturalHeight === 2
        && link && link.textContent === 'notes.txt';
    });
    const chipsLeft = await page.$$eval('[data-testid=draft-attachment]', (els) => els.length);
    if (chipsLeft !== 0) fail(`the composer still lists ${chipsLeft} file(s) after sending`);
    await page.screenshot({ path: join(OUT, 'attach-sent.png') });

    // The uploads are on the server.
    const ids = await page.$$eval('[data-testid=message] [data-id]', (els) => els.map((e) => e.dataset.id));
    for (const id of ids) {
      const r = await fetch(`${BASE}/api/v1/attachments/${id}`, { headers: { Authorization: `Bearer ${alice.token}` } });
      if (r.status !== 200) fail(`GET /attachments/${id}: ${r.status}`);
    }
    const errs = await page.$$eval('[data-testid=error]', (els) => els.map((e) => e.textContent));
    if (errs.length) fail(`errors on the page: ${errs.join(' | ')}`);
    if (pageErrors.length) fail(`uncaught errors in the page: ${pageErrors.join(' | ')}`);
    log(`ok: ${ids.length} attachments shown`);
  } finally {
    await browser.close();
  }
}

main().then(() => process.exit(0), (e) => {
  console.error(e instanceof Failure ? `[attach] FAILED: ${e.message}` : e);
  process.exit(1);
});
