/**
 * Issue 4, item 5: 1 GiB each way through the gateway with flat memory, and streamed
 * response chunks delivered as they are written. The gateway runs as a child process
 * (`node bin/pgstack.js serve`) so its own RSS can be sampled from /proc while the bytes
 * flow; the client and a hashing upstream run in this process.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { Readable } from 'node:stream';
import { request } from 'undici';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { memoryOf, spawnGateway, startHttpUpstream, until, within, type ChildGateway, type Upstream } from './support.ts';

const MiB = 1024 * 1024;
const TOTAL = 1024 * MiB;
const CHUNK = MiB;
/** Peak RSS growth allowed while 1 GiB streams through. */
const MAX_GROWTH = 150 * MiB;

let db: TestDatabase;
let gw: ChildGateway;
let upstream: Upstream;

/** A deterministic 1 GiB stream: 1,024 distinct 1 MiB chunks (a random block stamped with its index). */
const BLOCK = randomBytes(CHUNK);
function* chunks(): Generator<Buffer> {
  for (let i = 0; i < TOTAL / CHUNK; i++) {
    const chunk = Buffer.from(BLOCK);
    chunk.writeUInt32BE(i, 0);
    yield chunk;
  }
}
const EXPECTED = (() => {
  const hash = createHash('sha256');
  for (const chunk of chunks()) hash.update(chunk);
  return hash.digest('hex');
})();

/** SSE: the upstream writes the second event only after the test says the first arrived. */
let firstEventSeen: (() => void) | undefined;

function handler(req: IncomingMessage, res: ServerResponse): void {
  const mode = /\/functions\/v1\/stream-fn\/(\w+)/.exec(req.url ?? '')?.[1];
  if (mode === 'sink') {
    const hash = createHash('sha256');
    let bytes = 0;
    req.on('data', (d: Buffer) => {
      bytes += d.length;
      hash.update(d);
    });
    req.on('end', () => res.end(JSON.stringify({ bytes, sha256: hash.digest('hex') })));
    return;
  }
  if (mode === 'source') {
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(TOTAL) });
    Readable.from(chunks()).pipe(res);
    return;
  }
  if (mode === 'events') {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    res.write('data: first\n\n');
    const second = new Promise<void>((resolve) => (firstEventSeen = resolve));
    void within(second, 10_000, 'first event seen').then(
      () => res.end('data: second\n\n'),
      () => res.end('data: timeout\n\n'),
    );
    return;
  }
  res.writeHead(404).end();
}

beforeAll(async () => {
  db = await createTestDatabase();
  upstream = await startHttpUpstream(handler);
  gw = await spawnGateway({
    DATABASE_URL: db.url,
    UPSTREAM_HOSTS: 'stream-fn=127.0.0.1',
    MAX_BODY_BYTES: String(2 * TOTAL),
    REQUEST_TIMEOUT_MS: '120000',
    LOG_LEVEL: 'info',
  });
  await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('stream-fn', 'http', false, $1)", [`http://stream-fn:${upstream.port}`]);
  await until(async () => (await fetch(`${gw.url}/functions/v1/stream-fn/none`)).status === 404 && (await fetch(`${gw.url}/readyz`)).status === 200, 10_000, 50, 'gateway ready with stream-fn');
  // Warm the path (JIT, pools) so the baseline is the gateway's steady state.
  for (let i = 0; i < 20; i++) {
    const res = await request(`${gw.url}/functions/v1/stream-fn/sink`, { method: 'POST', body: Buffer.alloc(256 * 1024) });
    await res.body.text();
  }
}, 60_000);

afterAll(async () => {
  await gw?.kill();
  await upstream?.close();
  await db?.drop();
});

/** Samples the gateway's VmRSS every 25 ms while `run` goes; returns the baseline and peak. */
async function sampled<T>(run: () => Promise<T>): Promise<{ result: T; baseline: number; peak: number; hwm: number; ms: number }> {
  const baseline = memoryOf(gw.pid).rss;
  let peak = baseline;
  const timer = setInterval(() => {
    try {
      peak = Math.max(peak, memoryOf(gw.pid).rss);
    } catch {
      // the process went away; the test fails elsewhere
    }
  }, 25);
  const started = Date.now();
  try {
    const result = await run();
    return { result, baseline, peak: Math.max(peak, memoryOf(gw.pid).rss), hwm: memoryOf(gw.pid).hwm, ms: Date.now() - started };
  } finally {
    clearInterval(timer);
  }
}

const mb = (n: number) => `${(n / MiB).toFixed(1)} MiB`;

it('a 1 GiB request body (chunked, no Content-Length) streams to the upstream with flat gateway memory', async () => {
  const { result, baseline, peak, hwm, ms } = await sampled(async () => {
    const res = await request(`${gw.url}/functions/v1/stream-fn/sink`, { method: 'POST', body: Readable.from(chunks()), headersTimeout: 60_000, bodyTimeout: 60_000 });
    return { status: res.statusCode, body: (await res.body.json()) as { bytes: number; sha256: string } };
  });
  console.log(`[streaming] 1 GiB upload in ${ms} ms (${((TOTAL / MiB / ms) * 1000).toFixed(0)} MiB/s): gateway RSS ${mb(baseline)} -> peak ${mb(peak)} (+${mb(peak - baseline)}), VmHWM ${mb(hwm)}`);
  expect(result.status).toBe(200);
  expect(result.body).toEqual({ bytes: TOTAL, sha256: EXPECTED });
  expect(peak - baseline).toBeLessThan(MAX_GROWTH);
}, 90_000);

it('a 1 GiB response body streams to the client with flat gateway memory', async () => {
  const { result, baseline, peak, hwm, ms } = await sampled(async () => {
    const res = await request(`${gw.url}/functions/v1/stream-fn/source`, { headersTimeout: 60_000, bodyTimeout: 60_000 });
    const hash = createHash('sha256');
    let bytes = 0;
    for await (const chunk of res.body) {
      bytes += (chunk as Buffer).length;
      hash.update(chunk as Buffer);
    }
    return { status: res.statusCode, bytes, sha256: hash.digest('hex') };
  });
  console.log(`[streaming] 1 GiB download in ${ms} ms (${((TOTAL / MiB / ms) * 1000).toFixed(0)} MiB/s): gateway RSS ${mb(baseline)} -> peak ${mb(peak)} (+${mb(peak - baseline)}), VmHWM ${mb(hwm)}`);
  expect(result).toEqual({ status: 200, bytes: TOTAL, sha256: EXPECTED });
  expect(peak - baseline).toBeLessThan(MAX_GROWTH);
}, 90_000);

it('server-sent events reach the client as they are written (the first before the upstream writes the second)', async () => {
  const res = await request(`${gw.url}/functions/v1/stream-fn/events`, { headersTimeout: 10_000, bodyTimeout: 15_000 });
  expect(res.statusCode).toBe(200);
  expect(res.headers['content-type']).toBe('text/event-stream');
  let text = '';
  for await (const chunk of res.body) {
    text += (chunk as Buffer).toString();
    if (text.includes('data: first\n\n') && firstEventSeen) {
      // Only now may the upstream write the second event: a buffering gateway never gets here.
      firstEventSeen();
      firstEventSeen = undefined;
    }
  }
  expect(text).toBe('data: first\n\ndata: second\n\n');
}, 20_000);
