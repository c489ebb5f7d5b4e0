/**
 * A catalog row that points back at the gateway (its own compose service name, or a
 * mapped name on its own port) must not turn one request into an endless chain of
 * requests: the second pass is refused (508 loop_detected) and the chain stops.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../adapters/node/embedded.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { eventually, startTestGateway, type TestGateway } from '../support/gateway.ts';

let db: TestDatabase;
let gw: TestGateway;

beforeAll(async () => {
  db = await createTestDatabase();
  const port = await freePort();
  gw = await startTestGateway(db.url, { PORT: String(port), UPSTREAM_HOSTS: 'proxy=127.0.0.1' });
  await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url, timeout_ms) VALUES ('loop', 'http', false, $1, 3000)", [`http://proxy:${port}`]);
  await eventually(() => gw.catalog.current()?.functions.has('loop') ?? false, 5_000, 5);
}, 60_000);

afterAll(async () => {
  await gw?.stop();
  await db?.drop();
});

describe('a function whose upstream is the gateway itself', () => {
  it('one call makes exactly two passes, the second refused with 508 loop_detected, then nothing more', async () => {
    const res = await gw.call('/functions/v1/loop', { headers: { 'x-request-id': 'loop-probe-1' } });
    // The outer pass relays what its "upstream" (the inner pass) answered: the 508.
    expect(res.status).toBe(508);
    expect(((await res.json()) as { code: string }).code).toBe('loop_detected');
    const passes = () => gw.logs.filter((l) => l['msg'] === 'request' && l['request_id'] === 'loop-probe-1').length;
    expect(passes()).toBe(2);
    await new Promise((r) => setTimeout(r, 300));
    expect(passes()).toBe(2);
  });
});
