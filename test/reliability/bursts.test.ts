/**
 * Issue 4, item 2, end to end: a burst of catalog transactions while requests hammer the
 * functions they change. Each transaction swaps two functions' names (alpha <-> beta, via a
 * temporary name) atomically; a half-applied catalog would show one of them missing (404)
 * or both on the same upstream. The coalescing itself (1,000 changes -> few reloads) is
 * measured in test/catalog.test.ts; here the reload count is checked too, on the way.
 */
import type { ServerResponse } from 'node:http';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { eventually, startTestGateway, type TestGateway } from '../support/gateway.ts';
import { startHttpUpstream, type Upstream } from './support.ts';

const SWAPS = 300; // 900 row changes
const CLIENTS = 8;
const MAX_MS = 15_000;

let db: TestDatabase;
let gw: TestGateway;
let a: Upstream;
let b: Upstream;

beforeAll(async () => {
  db = await createTestDatabase();
  a = await startHttpUpstream((_req, res: ServerResponse) => res.end('A'));
  b = await startHttpUpstream((_req, res: ServerResponse) => res.end('B'));
  gw = await startTestGateway(db.url, { UPSTREAM_HOSTS: 'ua=127.0.0.1,ub=127.0.0.1' });
  await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('alpha', 'http', false, $1), ('beta', 'http', false, $2)", [
    `http://ua:${a.port}`,
    `http://ub:${b.port}`,
  ]);
  await eventually(() => gw.catalog.current()?.functions.has('beta') ?? false, 5_000, 2);
}, 60_000);

afterAll(async () => {
  await gw?.stop();
  await Promise.all([a?.close(), b?.close()]);
  await db?.drop();
});

it(`${SWAPS} atomic swaps of two functions under load: every answer and every snapshot is a whole state`, async () => {
  const swap =
    "BEGIN; UPDATE pgstack.edge_functions SET name = 'swap-tmp' WHERE name = 'alpha'; " +
    "UPDATE pgstack.edge_functions SET name = 'alpha' WHERE name = 'beta'; " +
    "UPDATE pgstack.edge_functions SET name = 'beta' WHERE name = 'swap-tmp'; COMMIT";
  const reloadsBefore = gw.catalog.stats().reloads;
  const deadline = Date.now() + MAX_MS;
  let writing = true;
  const answers = new Map<string, number>();
  const bad: string[] = [];

  // Snapshot watcher: every snapshot the gateway installs holds alpha and beta on different upstreams.
  const snapshots = new Set<object>();
  const watcher = (async () => {
    while (writing && Date.now() < deadline) {
      const s = gw.catalog.current()!;
      if (!snapshots.has(s)) {
        snapshots.add(s);
        const alpha = s.functions.get('alpha')?.upstream.origin;
        const beta = s.functions.get('beta')?.upstream.origin;
        if (!alpha || !beta || alpha === beta || s.functions.has('swap-tmp')) bad.push(`snapshot: alpha=${alpha} beta=${beta}`);
      }
      await new Promise((r) => setImmediate(r));
    }
  })();

  const clients = Array.from({ length: CLIENTS }, async (_, i) => {
    const name = i % 2 === 0 ? 'alpha' : 'beta';
    while (writing && Date.now() < deadline) {
      const res = await gw.call(`/functions/v1/${name}`);
      const text = await res.text();
      const key = `${res.status} ${text.length <= 1 ? text : 'json'}`;
      answers.set(key, (answers.get(key) ?? 0) + 1);
      if (res.status !== 200 || (text !== 'A' && text !== 'B')) bad.push(`${name}: ${res.status} ${text.slice(0, 100)}`);
    }
  });

  const started = Date.now();
  let swaps = 0;
  try {
    for (; swaps < SWAPS && Date.now() < deadline; swaps++) await db.sql(swap);
  } finally {
    const wrote = Date.now() - started;
    // Let the requests run a little past the last commit, then stop everything.
    await new Promise((r) => setTimeout(r, 200));
    writing = false;
    await Promise.all([...clients, watcher]);
    const reloads = gw.catalog.stats().reloads - reloadsBefore;
    console.log(
      `[bursts] ${swaps} swap transactions (${swaps * 3} row changes) in ${wrote} ms; ${reloads} reloads; ${snapshots.size} snapshots seen; answers ${JSON.stringify(Object.fromEntries(answers))}`,
    );
    expect(reloads).toBeLessThan(swaps); // coalesced: far fewer reloads than changes
  }
  expect(swaps).toBe(SWAPS);
  expect(bad).toEqual([]);
  // Both states were actually served.
  expect((answers.get('200 A') ?? 0) > 0 && (answers.get('200 B') ?? 0) > 0).toBe(true);

  // The final state: an even number of swaps puts alpha back on A.
  await eventually(async () => (await (await gw.call('/functions/v1/alpha')).text()) === (SWAPS % 2 === 0 ? 'A' : 'B'), 5_000, 10);
  expect(await (await gw.call('/functions/v1/beta')).text()).toBe(SWAPS % 2 === 0 ? 'B' : 'A');
}, 30_000);
