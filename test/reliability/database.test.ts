/**
 * Issue 4, item 1: the gateway and its database's bad days, against a PostgreSQL server of
 * this file's own (a second embedded server it starts, stops and restarts).
 *
 * 1. Started before the database exists: the listener is up at once, function calls are
 *    503 catalog_not_loaded with Retry-After, /readyz 503; once the server starts, the
 *    background bootstrap migrates, loads, and the gateway serves.
 * 2. The server stops while serving: the last good catalog keeps answering 200, /readyz is
 *    503 while the listener is down; a change made right after the restart is served.
 * 3. A change whose notification is lost (triggers off for the session) is applied by the
 *    periodic backstop reload.
 */
import { randomBytes } from 'node:crypto';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort, readEmbeddedDatabaseUrl, startEmbeddedPostgres, type EmbeddedPostgres } from '../../adapters/node/embedded.ts';
import { startTestGateway, type TestGateway } from '../support/gateway.ts';
import { expectGatewayErrorBody, startHttpUpstream, until, type Upstream } from './support.ts';
import { migrate } from '../../adapters/node/migrate.ts';

let dir: string;
let port: number;
let databaseUrl: string;
let server: EmbeddedPostgres | undefined;
let gw: TestGateway;
const upstreams: Upstream[] = [];

const pgLog = (level: string, message: string) => {
  if (level === 'error') console.error(`[reliability postgres] ${message}`);
};
const startServer = async () => {
  server = await startEmbeddedPostgres({ dir, port, log: pgLog });
};

async function sql(text: string, params: unknown[] = []): Promise<pg.QueryResult> {
  const client = new pg.Client({ connectionString: databaseUrl, connectionTimeoutMillis: 5_000 });
  client.on('error', () => {});
  await client.connect();
  try {
    return await client.query(text, params);
  } finally {
    await client.end().catch(() => {});
  }
}

const answer = (text: string) => (_req: unknown, res: ServerResponse) => res.end(text);

async function body(path: string): Promise<{ status: number; text: string }> {
  const res = await gw.call(path);
  return { status: res.status, text: await res.text() };
}

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'pgstack-reliability-db-'));
  await chmod(dir, 0o755); // as root the server runs as 'postgres', which must enter it
  port = await freePort();
  // Settings written ahead, so the URL is known before the server has ever run.
  await writeFile(path.join(dir, 'postgres.json'), JSON.stringify({ port, password: randomBytes(18).toString('hex') }), { mode: 0o600 });
  databaseUrl = readEmbeddedDatabaseUrl(dir)!;
  for (const text of ['v1', 'v2', 'v3']) upstreams.push(await startHttpUpstream(answer(text)));
});

afterAll(async () => {
  await gw?.stop();
  await server?.stop();
  await Promise.all(upstreams.map((u) => u.close()));
  await rm(dir, { recursive: true, force: true });
});

describe('the database is not up when the gateway starts', () => {
  it('listens at once and answers 503 catalog_not_loaded with Retry-After; /readyz 503', async () => {
    const started = Date.now();
    gw = await startTestGateway(databaseUrl, {
      UPSTREAM_HOSTS: 'db-fn=127.0.0.1,late-fn=127.0.0.1',
      CATALOG_BACKSTOP_MS: '1000',
    });
    expect(Date.now() - started).toBeLessThan(3_000);
    const res = await gw.call('/functions/v1/db-fn');
    expect(res.status).toBe(503);
    expect(res.headers.get('retry-after')).toBe('1');
    expect(res.headers.get('x-relay-error')).toBe('true');
    expect(expectGatewayErrorBody(await res.text()).code).toBe('catalog_not_loaded');
    expect((await gw.call('/readyz')).status).toBe(503);
    expect((await gw.call('/healthz')).status).toBe(200);
    // Each failed attempt is logged at warn, with the error.
    await until(() => gw.logs.filter((l) => l['level'] === 'warn' && String(l['msg']).startsWith('catalog database unavailable')).length >= 2, 10_000, 50, 'two warn lines');
    const warn = gw.logs.find((l) => String(l['msg']).startsWith('catalog database unavailable'))!;
    expect(String(warn['error'])).toMatch(/ECONNREFUSED|connect/);
  });

  it('once the server starts, the bootstrap migrates and loads, and the gateway serves', async () => {
    await startServer();
    await until(async () => (await gw.call('/readyz')).status === 200, 20_000, 100, 'gateway ready after the database came up');
    await sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('db-fn', 'http', false, $1)", [`http://db-fn:${upstreams[0]!.port}`]);
    await until(async () => (await body('/functions/v1/db-fn')).text === 'v1', 5_000, 20, 'db-fn served');
  }, 60_000);
});

describe('the database goes away while serving', () => {
  it('the last good catalog keeps serving, /readyz is 503 while the listener is down, and a change made at the restart is served', async () => {
    const statuses = new Map<number, number>();
    let stop = false;
    const loop = (async () => {
      // Bounded: at most 60 s or until told to stop.
      const deadline = Date.now() + 60_000;
      while (!stop && Date.now() < deadline) {
        const { status } = await body('/functions/v1/db-fn');
        statuses.set(status, (statuses.get(status) ?? 0) + 1);
        await new Promise((r) => setTimeout(r, 10));
      }
    })();
    try {
      await server!.stop();
      await until(async () => (await gw.call('/readyz')).status === 503, 10_000, 50, '/readyz 503 while the database is down');
      expect(gw.catalog.listening()).toBe(false);
      await until(() => gw.logs.some((l) => l['level'] === 'warn' && String(l['msg']).startsWith('catalog listener lost')), 5_000, 20, 'the loss logged');
      // Still serving from the last good catalog.
      expect(await body('/functions/v1/db-fn')).toEqual({ status: 200, text: 'v1' });

      await startServer();
      // Changed as soon as the server is back, most likely before the gateway's next reconnect attempt.
      await sql('UPDATE pgstack.edge_functions SET upstream_url = $1 WHERE name = $2', [`http://db-fn:${upstreams[1]!.port}`, 'db-fn']);
      await until(async () => (await body('/functions/v1/db-fn')).text === 'v2', 15_000, 50, 'the change is served after the restart');
      await until(async () => (await gw.call('/readyz')).status === 200, 10_000, 50, '/readyz 200 again');
    } finally {
      stop = true;
      await loop;
    }
    console.log(`[database] statuses during the outage: ${JSON.stringify(Object.fromEntries(statuses))}; reconnects: ${gw.catalog.stats().reconnects}`);
    expect([...statuses.keys()]).toEqual([200]);
    expect(gw.catalog.stats().reconnects).toBeGreaterThanOrEqual(1);
  }, 60_000);
});

describe('a change whose notification is lost', () => {
  it('is applied by the backstop reload (CATALOG_BACKSTOP_MS=1000)', async () => {
    const before = gw.catalog.stats().notifications;
    const client = new pg.Client({ connectionString: databaseUrl });
    client.on('error', () => {});
    await client.connect();
    try {
      // Replica mode: ordinary triggers (pgstack_fn_changed among them) do not fire, so no NOTIFY.
      await client.query('SET session_replication_role = replica');
      await client.query("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('late-fn', 'http', false, $1)", [`http://late-fn:${upstreams[2]!.port}`]);
    } finally {
      await client.end();
    }
    const changed = Date.now();
    await until(async () => (await body('/functions/v1/late-fn')).text === 'v3', 5_000, 50, 'the backstop applied the change');
    const took = Date.now() - changed;
    console.log(`[database] change without NOTIFY served after ${took} ms (backstop every 1000 ms)`);
    expect(gw.catalog.stats().notifications).toBe(before);
    expect(took).toBeLessThan(2_500);
  });
});

describe('a least-privilege database role (SELECT on the catalog only) with MIGRATE_ON_START on', () => {
  it('says once that it may not apply a changed schema, with the fix, and serves the catalog; says nothing when the schema is current', async () => {
    const role = `pgstack_ro_${randomBytes(4).toString('hex')}`;
    const password = randomBytes(12).toString('hex');
    await sql(`CREATE ROLE ${role} LOGIN PASSWORD '${password}'`);
    await sql(`GRANT USAGE ON SCHEMA pgstack TO ${role}`);
    await sql(`GRANT SELECT ON pgstack.edge_functions TO ${role}`);
    const url = new URL(databaseUrl);
    url.username = role;
    url.password = password;
    let readOnly: TestGateway | undefined;
    try {
      // The schema is current: nothing to apply, nothing to refuse.
      const current = await startTestGateway(url.toString(), { UPSTREAM_HOSTS: 'db-fn=127.0.0.1', MIGRATE_ON_START: 'true' });
      try {
        await until(async () => (await current.call('/readyz')).status === 200, 10_000, 50, 'the read-only gateway ready');
        expect((await current.call('/functions/v1/db-fn')).status).toBe(200);
        expect(current.logs.filter((l) => String(l['msg']).startsWith('MIGRATE_ON_START'))).toEqual([]);
      } finally {
        await current.stop();
      }
      // A schema.sql newer than what the database holds: applying it is refused.
      await sql("COMMENT ON SCHEMA pgstack IS 'pgstack schema sha256:older'");
      readOnly = await startTestGateway(url.toString(), { UPSTREAM_HOSTS: 'db-fn=127.0.0.1', MIGRATE_ON_START: 'true' });
      const ro = readOnly;
      await until(async () => (await ro.call('/readyz')).status === 200, 10_000, 50, 'the read-only gateway ready');
      const res = await ro.call('/functions/v1/db-fn');
      expect(res.status).toBe(200);
      const refusals = ro.logs.filter((l) => String(l['msg']).startsWith('MIGRATE_ON_START: this database role may not apply the schema'));
      expect(refusals).toHaveLength(1);
      expect(refusals[0]!['level']).toBe('error');
      expect(String(refusals[0]!['hint'])).toContain('MIGRATE_ON_START=false');
      expect(ro.logs.some((l) => String(l['msg']).startsWith('catalog database unavailable'))).toBe(false);
    } finally {
      await readOnly?.stop();
      await migrate(databaseUrl);
      await sql(`DROP OWNED BY ${role}`);
      await sql(`DROP ROLE ${role}`);
    }
  }, 30_000);
});
