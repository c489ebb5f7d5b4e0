/**
 * Issue 4, item 6: SIGTERM to a gateway process with a slow request in flight. New
 * connections are refused at once, the in-flight request completes, a request arriving
 * on an already open connection is told 503 shutting_down, the database connections are
 * closed, and the process exits 0 within SHUTDOWN_GRACE_MS.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import net from 'node:net';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { expectGatewayErrorBody, header, RawClient, requestText, spawnGateway, startHttpUpstream, until, type ChildGateway, type Upstream } from './support.ts';

const GRACE_MS = 5_000;
const SLOW_MS = 1_500;

let db: TestDatabase;
let gw: ChildGateway;
let upstream: Upstream;
let received = 0;

function handler(req: IncomingMessage, res: ServerResponse): void {
  received++;
  req.resume();
  setTimeout(() => res.end('slow answer'), SLOW_MS);
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

async function catalogSessions(): Promise<number> {
  const { rows } = await db.sql("SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'pgstack-catalog'");
  return (rows[0] as { n: number }).n;
}

beforeAll(async () => {
  db = await createTestDatabase();
  upstream = await startHttpUpstream(handler);
  await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('slow-fn', 'http', false, $1)", [`http://slow-fn:${upstream.port}`]);
  gw = await spawnGateway({ DATABASE_URL: db.url, UPSTREAM_HOSTS: 'slow-fn=127.0.0.1', SHUTDOWN_GRACE_MS: String(GRACE_MS) });
  await until(async () => (await fetch(`${gw.url}/readyz`)).status === 200, 10_000, 50, 'gateway ready');
}, 60_000);

afterAll(async () => {
  await gw?.kill();
  await upstream?.close();
  await db?.drop();
});

it('SIGTERM: refuses new connections, finishes the in-flight request, closes the database, exits 0 within the grace period', async () => {
  expect(await catalogSessions()).toBe(1);

  // An idle keep-alive connection opened before the signal, and a slow request in flight.
  const idle = await RawClient.connect(gw.port);
  await idle.write(requestText('GET', '/healthz'));
  expect((await idle.read()).status).toBe(200);
  const inflight = RawClient.connect(gw.port).then(async (c) => {
    await c.write(requestText('POST', '/functions/v1/slow-fn', { 'content-length': '5' }, 'hello'));
    return c.read({ timeoutMs: GRACE_MS + 5_000 });
  });
  await until(() => received === 1, 5_000, 10, 'upstream got the slow request');

  const signalled = Date.now();
  gw.child.kill('SIGTERM');
  await until(async () => !(await canConnect(gw.port)), 2_000, 20, 'new connections refused');
  const refusedAfter = Date.now() - signalled;

  // The already open idle connection: either closed by the gateway, or told 503 shutting_down.
  let idleOutcome = 'closed';
  if (!idle.closed) {
    try {
      await idle.write(requestText('GET', '/functions/v1/slow-fn'));
      const res = await idle.read({ timeoutMs: 2_000 });
      expect(res.status).toBe(503);
      expect(expectGatewayErrorBody(res.body.toString()).code).toBe('shutting_down');
      expect(header(res, 'connection')).toBe('close');
      idleOutcome = '503 shutting_down';
    } catch (err) {
      if (!idle.closed) throw err;
    }
  }
  expect(received).toBe(1); // nothing new reached the upstream

  const res = await inflight;
  const answeredAfter = Date.now() - signalled;
  expect(res.status).toBe(200);
  expect(res.body.toString()).toBe('slow answer');
  expect(res.complete).toBe(true);

  const { code, signal } = await gw.exited;
  const exitedAfter = Date.now() - signalled;
  console.log(`[shutdown] refused new connections after ${refusedAfter} ms; idle connection: ${idleOutcome}; in-flight answered after ${answeredAfter} ms; exit ${code} after ${exitedAfter} ms (grace ${GRACE_MS} ms)`);
  expect({ code, signal }).toEqual({ code: 0, signal: null });
  expect(exitedAfter).toBeLessThan(GRACE_MS);
  await until(async () => (await catalogSessions()) === 0, 5_000, 50, 'catalog session closed');
  idle.destroy();
}, 30_000);

it('at the end of the grace period, a request still waiting for its function gets 503 shutting_down, not an empty reply', async () => {
  const short = 800;
  const stuck = await startHttpUpstream((req) => req.resume()); // never answers
  await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('stuck-fn', 'http', false, $1)", [`http://stuck-fn:${stuck.port}`]);
  const child = await spawnGateway({ DATABASE_URL: db.url, UPSTREAM_HOSTS: 'stuck-fn=127.0.0.1', SHUTDOWN_GRACE_MS: String(short) });
  try {
    await until(async () => (await fetch(`${child.url}/functions/v1/stuck-fn/ping`, { signal: AbortSignal.timeout(200) }).catch(() => undefined)) === undefined, 5_000, 50, 'stuck-fn in the catalog (the call hangs)');
    const client = await RawClient.connect(child.port);
    await client.write(requestText('GET', '/functions/v1/stuck-fn'));
    await new Promise((r) => setTimeout(r, 100));
    const signalled = Date.now();
    child.child.kill('SIGTERM');
    const res = await client.read({ timeoutMs: short + 5_000 });
    const after = Date.now() - signalled;
    expect(res.status).toBe(503);
    expect(expectGatewayErrorBody(res.body.toString()).code).toBe('shutting_down');
    expect(header(res, 'connection')).toBe('close');
    expect(after).toBeGreaterThanOrEqual(short - 50);
    expect((await child.exited).code).toBe(0);
    expect(child.logs.some((l) => l['msg'] === 'shutdown grace period over; in-flight requests cut')).toBe(true);
    // The request's own line says what the client got.
    expect(child.logs.filter((l) => l['msg'] === 'request' && l['path'] === '/functions/v1/stuck-fn').map((l) => l['code'])).toContain('shutting_down');
    client.destroy();
  } finally {
    await child.kill();
    await stuck.close();
  }
}, 30_000);

it('a keep-alive connection whose answer was streaming at the signal is closed when the answer ends, not at the end of the grace period', async () => {
  const grace = 8_000;
  const streaming = await startHttpUpstream((req, res) => {
    req.resume();
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.write('first;');
    setTimeout(() => res.end('last'), 800);
  });
  await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('stream-fn', 'http', false, $1)", [`http://stream-fn:${streaming.port}`]);
  const child = await spawnGateway({ DATABASE_URL: db.url, UPSTREAM_HOSTS: 'stream-fn=127.0.0.1', SHUTDOWN_GRACE_MS: String(grace) });
  try {
    await until(async () => (await fetch(`${child.url}/functions/v1/stream-fn`)).status === 200, 10_000, 50, 'stream-fn served');
    const client = await RawClient.connect(child.port);
    await client.write(requestText('GET', '/functions/v1/stream-fn'));
    await new Promise((r) => setTimeout(r, 300)); // the head and the first chunk are out
    const signalled = Date.now();
    child.child.kill('SIGTERM');
    const res = await client.read({ timeoutMs: 5_000 });
    expect(res.status).toBe(200);
    expect(res.body.toString()).toBe('first;last');
    expect(res.complete).toBe(true);
    // The client keeps its connection open; the gateway closes it and exits.
    const { code } = await child.exited;
    const took = Date.now() - signalled;
    console.log(`[shutdown] streaming answer finished, keep-alive connection closed, exit ${code} after ${took} ms (grace ${grace} ms)`);
    expect(code).toBe(0);
    expect(took).toBeLessThan(3_000);
    client.destroy();
  } finally {
    await child.kill();
    await streaming.close();
  }
}, 30_000);
