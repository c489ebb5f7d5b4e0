/**
 * Functions that share an upstream origin (every deno function shares EDGE_RUNTIME_URL):
 * slow calls to one must not hold the others back. By default the gateway opens a
 * connection per concurrent request, as nginx does; UPSTREAM_MAX_CONNECTIONS caps them per
 * origin, and then requests beyond the cap wait for a free one.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { Agent, request } from 'undici';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { eventually, startTestGateway, type TestGateway } from '../support/gateway.ts';
import { startHttpUpstream, type Upstream } from './support.ts';

const SLOW_MS = 2_000;
let db: TestDatabase;
let edge: Upstream;
const gateways: TestGateway[] = [];
const client = new Agent({ connections: null });

function handler(req: IncomingMessage, res: ServerResponse): void {
  req.resume();
  if (req.url?.startsWith('/functions/v1/slow')) setTimeout(() => res.end('slow'), SLOW_MS);
  else res.end('fast');
}

async function gateway(env: Record<string, string> = {}): Promise<TestGateway> {
  const gw = await startTestGateway(db.url, { EDGE_RUNTIME_URL: `http://edge:${edge.port}`, UPSTREAM_HOSTS: 'edge=127.0.0.1', ...env });
  gateways.push(gw);
  await eventually(() => gw.catalog.current()?.functions.size === 2, 10_000, 10);
  return gw;
}

/** Starts `n` slow calls, not awaited: they hold their connections for SLOW_MS. */
function slowCalls(gw: TestGateway, n: number): Array<Promise<string>> {
  return Array.from({ length: n }, () => request(`${gw.url}/functions/v1/slow`, { dispatcher: client }).then((r) => r.body.text()));
}

async function timedFast(gw: TestGateway): Promise<{ ms: number; text: string }> {
  const started = Date.now();
  const res = await request(`${gw.url}/functions/v1/fast`, { dispatcher: client });
  return { ms: Date.now() - started, text: await res.body.text() };
}

beforeAll(async () => {
  db = await createTestDatabase();
  edge = await startHttpUpstream(handler);
  await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt) VALUES ('slow', 'deno', false), ('fast', 'deno', false)");
}, 60_000);

afterAll(async () => {
  for (const gw of gateways) await gw.stop();
  await client.close();
  await edge?.close();
  await db?.drop();
});

describe('functions behind one upstream origin', () => {
  it('by default, 150 slow calls to one deno function do not delay another', async () => {
    const gw = await gateway();
    const slow = slowCalls(gw, 150);
    await new Promise((r) => setTimeout(r, 300));
    const fast = await timedFast(gw);
    expect(fast.text).toBe('fast');
    expect(fast.ms).toBeLessThan(SLOW_MS / 2);
    expect(await Promise.all(slow)).toEqual(Array(150).fill('slow'));
  }, 30_000);

  it('UPSTREAM_MAX_CONNECTIONS=4 caps connections per origin: the next call waits for a free one', async () => {
    const gw = await gateway({ UPSTREAM_MAX_CONNECTIONS: '4' });
    const slow = slowCalls(gw, 4);
    await new Promise((r) => setTimeout(r, 300));
    const fast = await timedFast(gw);
    expect(fast.text).toBe('fast');
    expect(fast.ms).toBeGreaterThanOrEqual(SLOW_MS - 600);
    expect(await Promise.all(slow)).toEqual(Array(4).fill('slow'));
  }, 30_000);
});
