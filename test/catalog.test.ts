/**
 * The live catalog (adapters/node/catalog.ts) against a real PostgreSQL: changes arrive by
 * NOTIFY without reloadNow(), bad rows are dropped and logged once, the listener comes back
 * after pg_terminate_backend with a full reload, bursts coalesce, and the latency from commit
 * to visibility is measured.
 */
import { readFileSync } from 'node:fs';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import type { CatalogSnapshot } from '../core/catalog.ts';
import type { LogLevel } from '../core/log.ts';
import { createPostgresCatalog, type CatalogSource, type PostgresCatalogOptions } from '../adapters/node/catalog.ts';
import { freePort } from '../adapters/node/embedded.ts';
import { createTestDatabase, type TestDatabase } from './support/db.ts';
import { startDbRelay } from './support/db-relay.ts';

interface LogEntry {
  level: LogLevel;
  message: string;
  fields?: Record<string, unknown>;
}

const WAIT = { timeout: 5_000, interval: 2 };

let db: TestDatabase;
let catalog: CatalogSource | undefined;
let logs: LogEntry[] = [];
let reloadWaiters: Array<(snapshot: CatalogSnapshot) => void> = [];

beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db?.drop();
});
afterEach(async () => {
  await catalog?.stop();
  catalog = undefined;
  logs = [];
  reloadWaiters = [];
  await db.sql('TRUNCATE pgstack.edge_functions');
});

async function startCatalog(options: Partial<PostgresCatalogOptions> = {}): Promise<CatalogSource> {
  catalog = createPostgresCatalog({
    databaseUrl: db.url,
    log: (level, message, fields) => logs.push({ level, message, ...(fields ? { fields } : {}) }),
    onReload: (snapshot) => {
      for (const waiter of reloadWaiters) waiter(snapshot);
    },
    ...options,
  });
  catalog.start();
  await catalog.firstLoad();
  return catalog;
}

/** A catalog of its own (not stopped by afterEach), retrying fast, with its log lines. */
function catalogAt(databaseUrl: string): { source: CatalogSource; entries: LogEntry[] } {
  const entries: LogEntry[] = [];
  const source = createPostgresCatalog({
    databaseUrl,
    reconnectMinMs: 20,
    reconnectMaxMs: 40,
    log: (level, message, fields) => entries.push({ level, message, ...(fields ? { fields } : {}) }),
  });
  return { source, entries };
}

/** Resolves with performance.now() at the first swap whose snapshot satisfies `test` (now, if the current one does). */
function whenSnapshot(source: CatalogSource, test: (snapshot: CatalogSnapshot) => boolean): Promise<number> {
  const current = source.current();
  if (current && test(current)) return Promise.resolve(performance.now());
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no matching snapshot within 5 s')), 5_000);
    const waiter = (snapshot: CatalogSnapshot) => {
      if (!test(snapshot)) return;
      clearTimeout(timer);
      reloadWaiters = reloadWaiters.filter((w) => w !== waiter);
      resolve(performance.now());
    };
    reloadWaiters.push(waiter);
  });
}

const insert = (name: string, upstream = `http://${name}:8000`) =>
  db.sql(`INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ($1, 'http', true, $2)`, [name, upstream]);

describe('live catalog', () => {
  it('applies INSERT, UPDATE and DELETE from their NOTIFY, without reloadNow()', async () => {
    const source = await startCatalog();
    expect(source.listening()).toBe(true);
    expect(source.current()?.functions.size).toBe(0);

    await insert('my-fn');
    await vi.waitFor(() => expect(source.current()?.functions.get('my-fn')?.upstream.origin).toBe('http://my-fn:8000'), WAIT);

    await db.sql(`UPDATE pgstack.edge_functions SET upstream_url = 'http://my-fn:9000/base', verify_jwt = false, timeout_ms = 1500 WHERE name = 'my-fn'`);
    await vi.waitFor(() => {
      const fn = source.current()?.functions.get('my-fn');
      expect(fn).toMatchObject({ verifyJwt: false, timeoutMs: 1500, upstream: { origin: 'http://my-fn:9000', basePath: '/base' } });
    }, WAIT);

    await db.sql(`DELETE FROM pgstack.edge_functions WHERE name = 'my-fn'`);
    await vi.waitFor(() => expect(source.current()?.functions.has('my-fn')).toBe(false), WAIT);
    expect(source.stats().notifications).toBe(3);
  });

  it('swaps whole snapshots: one taken earlier is never changed', async () => {
    const source = await startCatalog();
    const before = source.current();
    await insert('later');
    await vi.waitFor(() => expect(source.current()?.functions.has('later')).toBe(true), WAIT);
    expect(before?.functions.has('later')).toBe(false);
    expect(Object.isFrozen(source.current())).toBe(true);
  });

  it('drops rows whose upstream fails validation, keeps the others, and logs each drop once', async () => {
    const source = await startCatalog();
    await insert('good');
    await insert('loopback', 'http://127.0.0.1:80');
    await insert('dotted', 'http://a.b:80');
    await vi.waitFor(() => expect(source.current()?.dropped.map((d) => d.name).sort()).toEqual(['dotted', 'loopback']), WAIT);
    const snapshot = source.current()!;
    expect([...snapshot.functions.keys()]).toEqual(['good']);

    await insert('another');
    await vi.waitFor(() => expect(source.current()?.functions.has('another')).toBe(true), WAIT);
    const dropLogs = logs.filter((l) => l.message === 'catalog row dropped');
    expect(dropLogs.map((l) => [l.level, l.fields?.name]).sort()).toEqual([
      ['warn', 'dotted'],
      ['warn', 'loopback'],
    ]);
    expect(dropLogs.every((l) => typeof l.fields?.reason === 'string' && (l.fields.reason as string).length > 0)).toBe(true);
  });

  it('reconnects after pg_terminate_backend, reloading what changed while it was down', async () => {
    // A wide first backoff step so the test can see the listener down.
    const source = await startCatalog({ reconnectMinMs: 400, reconnectMaxMs: 1_000 });
    await insert('before');
    await vi.waitFor(() => expect(source.current()?.functions.has('before')).toBe(true), WAIT);

    const { rows } = await db.sql(
      `SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE application_name = 'pgstack-catalog' AND datname = current_database()`,
    );
    expect(rows).toEqual([{ ok: true }]);
    await vi.waitFor(() => expect(source.listening()).toBe(false), WAIT);

    await insert('while-down'); // its NOTIFY reaches nobody
    expect(source.listening()).toBe(false);
    // The last good catalog keeps serving meanwhile.
    expect(source.current()?.functions.has('before')).toBe(true);

    await vi.waitFor(() => expect(source.listening()).toBe(true), WAIT);
    await vi.waitFor(() => expect(source.current()?.functions.has('while-down')).toBe(true), WAIT);
    expect(source.stats()).toMatchObject({ reconnects: 1 });
    expect(logs.some((l) => l.level === 'warn' && l.message.startsWith('catalog listener lost'))).toBe(true);

    // And it listens again.
    await insert('after');
    await vi.waitFor(() => expect(source.current()?.functions.has('after')).toBe(true), WAIT);
  });

  it('terminated again and again, the listener comes back at the first backoff step each time (the catalog is stale meanwhile)', async () => {
    const source = await startCatalog({ reconnectMinMs: 100, reconnectMaxMs: 5_000 });
    const downFor: number[] = [];
    for (let i = 0; i < 6; i++) {
      await vi.waitFor(() => expect(source.listening()).toBe(true), WAIT);
      const { rows } = await db.sql(
        `SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE application_name = 'pgstack-catalog' AND datname = current_database() AND state = 'idle'`,
      );
      if (rows.length === 0) continue; // caught mid-query: try again
      const killed = performance.now();
      await insert(`kill-${i}`);
      await whenSnapshot(source, (s) => s.functions.has(`kill-${i}`));
      downFor.push(performance.now() - killed);
    }
    expect(downFor.length).toBeGreaterThanOrEqual(4);
    // Each time: one first step (50..100 ms) plus connect, LISTEN and a full load; widening
    // the backoff, the sixth would wait 1.6..3.2 s.
    expect(Math.max(...downFor), downFor.map((d) => d.toFixed(0)).join(', ')).toBeLessThan(800);
  });

  it('not listening (so not ready) while a reconnect cannot reload: its full load waits on a lock', async () => {
    const source = await startCatalog({ reconnectMinMs: 50, reconnectMaxMs: 100 });
    await insert('locked-before');
    await vi.waitFor(() => expect(source.current()?.functions.has('locked-before')).toBe(true), WAIT);
    const locker = new pg.Client({ connectionString: db.url });
    await locker.connect();
    try {
      await locker.query('BEGIN');
      await locker.query('LOCK pgstack.edge_functions IN ACCESS EXCLUSIVE MODE');
      // Committed with the lock's release: its notification comes after the reconnect.
      await locker.query("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('locked-new', 'http', true, 'http://locked-new:8000')");
      await db.sql(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pgstack-catalog' AND datname = current_database()`);
      await vi.waitFor(() => expect(source.listening()).toBe(false), WAIT);
      // LISTEN is back at once; the reload waits on the lock: still not listening, stale rows.
      await new Promise((r) => setTimeout(r, 600));
      expect(source.listening()).toBe(false);
      expect(source.current()?.functions.has('locked-new')).toBe(false);
      await locker.query('COMMIT');
      await vi.waitFor(() => expect(source.listening()).toBe(true), WAIT);
      expect(source.current()?.functions.has('locked-new')).toBe(true);
    } finally {
      await locker.end();
    }
  });

  it('a heartbeat keeps the listener up under an idle timeout that would drop it', async () => {
    const { rows } = await db.sql('SELECT current_database() AS name');
    await db.sql(`ALTER DATABASE ${rows[0].name} SET idle_session_timeout = '700ms'`);
    try {
      const sample = async (source: CatalogSource): Promise<boolean> => {
        let alwaysUp = true;
        for (const deadline = Date.now() + 2_500; Date.now() < deadline; ) {
          alwaysUp &&= source.listening();
          await new Promise((r) => setTimeout(r, 20));
        }
        return alwaysUp;
      };
      // Without a heartbeat inside the timeout the server drops the idle LISTEN session...
      const idle = await startCatalog({ heartbeatMs: 60_000, reconnectMinMs: 200, reconnectMaxMs: 400 });
      expect(await sample(idle)).toBe(false);
      await idle.stop();
      // ...with one it stays up, and changes keep arriving.
      const beating = await startCatalog({ heartbeatMs: 250 });
      expect(await sample(beating)).toBe(true);
      expect(beating.stats().reconnects).toBe(0);
      await insert('kept');
      await vi.waitFor(() => expect(beating.current()?.functions.has('kept')).toBe(true), WAIT);
    } finally {
      await db.sql(`ALTER DATABASE ${rows[0].name} RESET idle_session_timeout`);
    }
  });

  it('a connection that stops answering (blackholed) is noticed by the heartbeat and replaced', async () => {
    // A relay to the database that can freeze: it keeps the sockets open, forwards nothing.
    let frozen = false;
    const relay = await startDbRelay(db.url, { fromClient: () => !frozen, fromServer: () => !frozen });
    try {
      const source = await startCatalog({ databaseUrl: relay.url, heartbeatMs: 200, heartbeatTimeoutMs: 500, reconnectMinMs: 100, reconnectMaxMs: 200 });
      expect(source.listening()).toBe(true);
      frozen = true;
      const started = Date.now();
      await vi.waitFor(() => expect(source.listening()).toBe(false), { timeout: 3_000, interval: 20 });
      expect(Date.now() - started).toBeLessThan(2_000);
      await vi.waitFor(() => expect(logs.some((l) => l.message.startsWith('catalog listener lost') && String(l.fields?.['error']).includes('heartbeat'))).toBe(true), WAIT);
      relay.dropConnections();
      frozen = false;
      await vi.waitFor(() => expect(source.listening()).toBe(true), WAIT);
    } finally {
      relay.close();
    }
  });

  it('sends one query at a time on the LISTEN connection: heartbeats never overlap a load', async () => {
    // pg queues a query sent while another runs (deprecated; pg 9 removes it). Count, per
    // catalog connection, the queries in flight whenever one is sent.
    const original = pg.Client.prototype.query;
    const inFlight = new WeakMap<object, number>();
    let sent = 0;
    let overlapping = 0;
    pg.Client.prototype.query = function (this: pg.Client, ...args: unknown[]) {
      const result = (original as (...a: unknown[]) => unknown).apply(this, args);
      if ((this as unknown as { connectionParameters: { application_name?: string } }).connectionParameters.application_name === 'pgstack-catalog') {
        const n = (inFlight.get(this) ?? 0) + 1;
        inFlight.set(this, n);
        sent++;
        if (n > 1) overlapping++;
        // Registered before the caller's await: the count drops before the caller goes on.
        const done = () => void inFlight.set(this, (inFlight.get(this) ?? 1) - 1);
        (result as Promise<unknown>).then(done, done);
      }
      return result;
    } as typeof original;
    try {
      const source = await startCatalog({ heartbeatMs: 1 });
      for (let i = 0; i < 60; i++) {
        await insert(`beat-${i}`);
        if (i % 10 === 0) await Promise.all([source.reloadNow(), source.reloadNow()]);
      }
      await vi.waitFor(() => expect(source.current()?.functions.size).toBe(60), WAIT);
      expect(sent).toBeGreaterThan(60);
      expect(overlapping).toBe(0);
      expect(source.stats().reconnects).toBe(0);
    } finally {
      pg.Client.prototype.query = original;
    }
  });

  it('reloads on the backstop timer even when no notification comes', async () => {
    const source = await startCatalog({ backstopIntervalMs: 100 });
    // Silence the trigger for one change, as a dead listener would miss it.
    await db.sql('ALTER TABLE pgstack.edge_functions DISABLE TRIGGER pgstack_fn_changed');
    try {
      await insert('silent');
    } finally {
      await db.sql('ALTER TABLE pgstack.edge_functions ENABLE TRIGGER pgstack_fn_changed');
    }
    await vi.waitFor(() => expect(source.current()?.functions.has('silent')).toBe(true), WAIT);
    expect(source.stats().notifications).toBe(0);
  });

  it('coalesces a burst: 1,000 separately committed inserts cause far fewer reloads', async () => {
    const source = await startCatalog();
    const before = source.stats();
    const started = performance.now();
    // One transaction per row, as fast as the server commits them: a COMMIT inside a DO block
    // (PostgreSQL 11+) ends each insert's transaction, and with it sends its NOTIFY.
    await db.sql(`DO $$
      BEGIN
        -- Session-wide (SET LOCAL would end with the first COMMIT): the burst is about the listener, not the disk.
        PERFORM set_config('synchronous_commit', 'off', false);
        FOR i IN 0..999 LOOP
          INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('burst-' || i, 'http', 'http://burst:1');
          COMMIT;
        END LOOP;
      END $$`);
    const insertMs = performance.now() - started;
    await db.sql('RESET synchronous_commit');
    await vi.waitFor(() => expect(source.current()?.functions.size).toBe(1_000), { timeout: 10_000, interval: 5 });
    await vi.waitFor(() => expect(source.stats().notifications - before.notifications).toBe(1_000), WAIT);
    const reloads = source.stats().reloads - before.reloads;
    console.log(`burst: 1000 commits in ${insertMs.toFixed(0)} ms -> 1000 notifications, ${reloads} reloads`);
    expect(reloads).toBeLessThan(50);
  });

  it('coalesces concurrent writers too: 10 connections x 100 inserts', async () => {
    const source = await startCatalog();
    const before = source.stats();
    const writers = await Promise.all(
      Array.from({ length: 10 }, async () => {
        const client = new pg.Client({ connectionString: db.url });
        client.on('error', () => {});
        await client.connect();
        await client.query('SET synchronous_commit = off');
        return client;
      }),
    );
    const started = performance.now();
    try {
      await Promise.all(
        writers.map(async (client, w) => {
          for (let i = 0; i < 100; i++) {
            await client.query(`INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ($1, 'http', 'http://burst:1')`, [
              `burst-${w}-${i}`,
            ]);
          }
        }),
      );
    } finally {
      await Promise.all(writers.map((c) => c.end()));
    }
    const insertMs = performance.now() - started;
    await vi.waitFor(() => expect(source.current()?.functions.size).toBe(1_000), { timeout: 10_000, interval: 5 });
    await vi.waitFor(() => expect(source.stats().notifications - before.notifications).toBe(1_000), WAIT);
    const reloads = source.stats().reloads - before.reloads;
    console.log(`writers: 1000 inserts in ${insertMs.toFixed(0)} ms -> 1000 notifications, ${reloads} reloads`);
    // While notifications keep coming, reloads start at most every 10-50 ms (the pacing).
    expect(reloads).toBeLessThanOrEqual(Math.ceil(insertMs / 40) + 10);
  });

  it('makes a committed INSERT visible within milliseconds (median of 20)', async () => {
    const source = await startCatalog();
    const fromCommit: number[] = [];
    const fromSend: number[] = [];
    for (let i = 0; i < 20; i++) {
      const name = `latency-${i}`;
      const visible = whenSnapshot(source, (s) => s.functions.has(name));
      const sent = performance.now();
      await insert(name);
      const committed = performance.now();
      const seen = await visible;
      fromCommit.push(Math.max(0, seen - committed));
      fromSend.push(seen - sent);
      await new Promise((resolve) => setTimeout(resolve, 20)); // isolated changes, not a burst
    }
    const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
    console.log(
      `notify-to-visible: median ${median(fromCommit).toFixed(2)} ms after the INSERT's commit was acknowledged ` +
        `(max ${Math.max(...fromCommit).toFixed(2)}); median ${median(fromSend).toFixed(2)} ms from sending the INSERT`,
    );
    expect(median(fromCommit)).toBeLessThan(20); // DESIGN section 8: within 20 ms of the NOTIFY
  });
});

describe('the change log: a change reloads only the rows it touched', () => {
  it('with 20,000 functions, a single change is visible within 20 ms of its commit, without reading the table again', async () => {
    await db.sql('ALTER TABLE pgstack.edge_functions DISABLE TRIGGER pgstack_fn_changed');
    try {
      await db.sql(`INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url)
                    SELECT 'bulk-' || i, 'http', true, 'http://bulk-' || i || ':8000' FROM generate_series(1, 20000) i`);
    } finally {
      await db.sql('ALTER TABLE pgstack.edge_functions ENABLE TRIGGER pgstack_fn_changed');
    }
    const source = await startCatalog();
    expect(source.current()?.functions.size).toBe(20_000);
    const before = source.stats();
    const fromCommit: number[] = [];
    for (let i = 0; i < 10; i++) {
      const name = `big-${i}`;
      const visible = whenSnapshot(source, (snap) => snap.functions.has(name));
      await insert(name);
      const committed = performance.now();
      fromCommit.push(Math.max(0, (await visible) - committed));
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const after = source.stats();
    const median = [...fromCommit].sort((a, b) => a - b)[5]!;
    console.log(`20,000 rows: change visible a median ${median.toFixed(2)} ms after commit; ${after.changeLoads - before.changeLoads} change loads, ${after.fullLoads - before.fullLoads} full loads`);
    expect(after.fullLoads).toBe(before.fullLoads);
    expect(after.changeLoads - before.changeLoads).toBeGreaterThanOrEqual(1);
    expect(median).toBeLessThan(20);
    expect(source.current()?.functions.size).toBe(20_010);
  }, 60_000);

  it('applies renames, updates and deletes of several rows in one transaction as one whole state', async () => {
    const source = await startCatalog();
    await insert('swap-a', 'http://host-a:1');
    await insert('swap-b', 'http://host-b:1');
    await vi.waitFor(() => expect(source.current()?.functions.has('swap-b')).toBe(true), WAIT);
    const seen: Array<string> = [];
    reloadWaiters.push((snap) =>
      seen.push(
        [...snap.functions.keys()]
          .filter((n) => n.startsWith('swap'))
          .sort()
          .map((n) => `${n}=${snap.functions.get(n)!.upstream.hostname}`)
          .join(','),
      ),
    );
    const loadsBefore = source.stats().fullLoads;
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    try {
      await client.query('BEGIN');
      await client.query("UPDATE pgstack.edge_functions SET name = 'swap-tmp' WHERE name = 'swap-a'");
      await client.query("UPDATE pgstack.edge_functions SET name = 'swap-a' WHERE name = 'swap-b'");
      await client.query("UPDATE pgstack.edge_functions SET name = 'swap-b' WHERE name = 'swap-tmp'");
      await client.query("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('swap-c', 'http', 'http://host-c:1')");
      await client.query('COMMIT');
    } finally {
      await client.end();
    }
    await vi.waitFor(() => expect(source.current()?.functions.has('swap-c')).toBe(true), WAIT);
    const now = source.current()!;
    expect(now.functions.get('swap-a')!.upstream.hostname).toBe('host-b');
    expect(now.functions.get('swap-b')!.upstream.hostname).toBe('host-a');
    expect(now.functions.has('swap-tmp')).toBe(false);
    // Every snapshot swapped in was the state before or after the transaction, nothing between.
    for (const state of seen) expect(['swap-a=host-a,swap-b=host-b', 'swap-a=host-b,swap-b=host-a,swap-c=host-c']).toContain(state);
    expect(source.stats().fullLoads).toBe(loadsBefore);
  });

  it('a transaction that commits after a later one is still seen, incrementally (entries are found by snapshot, not by order)', async () => {
    const source = await startCatalog();
    const early = new pg.Client({ connectionString: db.url });
    await early.connect();
    try {
      // `early` writes first and stays open while a later transaction commits and is loaded.
      await early.query('BEGIN');
      await early.query("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('late-commit', 'http', 'http://late:1')");
      await insert('early-commit');
      await vi.waitFor(() => expect(source.current()?.functions.has('early-commit')).toBe(true), WAIT);
      expect(source.current()?.functions.has('late-commit')).toBe(false);
      const before = source.stats();
      await early.query('COMMIT');
      await vi.waitFor(() => expect(source.current()?.functions.has('late-commit')).toBe(true), WAIT);
      expect(source.stats().fullLoads).toBe(before.fullLoads);
      expect(source.stats().changeLoads).toBeGreaterThan(before.changeLoads);
    } finally {
      await early.end();
    }
  });

  it('pruning while another session holds a transaction open (xmin held back) costs no full reloads', async () => {
    await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) SELECT 'held-' || g, 'http', 'http://h:1' FROM generate_series(1, 1000) g");
    const source = await startCatalog();
    const long = new pg.Client({ connectionString: db.url });
    await long.connect();
    try {
      await long.query('BEGIN');
      await long.query('SELECT pg_current_xact_id()'); // an xid: every snapshot's xmin stays at or below it
      const before = source.stats();
      const deletedThrough = async () => (await db.sql('SELECT deleted_through::text AS x FROM pgstack.catalog_log_state')).rows[0].x as string;
      const prunedBefore = await deletedThrough();
      // 12,000 entries: the log is pruned (of what came before the open transaction).
      for (let i = 0; i < 12; i++) await db.sql("UPDATE pgstack.edge_functions SET verify_jwt = NOT verify_jwt WHERE name LIKE 'held-%'");
      await insert('after-pruning');
      await vi.waitFor(() => expect(source.current()?.functions.has('after-pruning')).toBe(true), WAIT);
      expect(source.stats().fullLoads).toBe(before.fullLoads);
      expect(BigInt(await deletedThrough())).toBeGreaterThan(BigInt(prunedBefore)); // it did prune
    } finally {
      await long.query('ROLLBACK');
      await long.end();
    }
  }, 60_000);

  it('reads the whole table again when the log cannot say: a TRUNCATE, a log pruned past its version, a schema recreated', async () => {
    const source = await startCatalog();
    await insert('kept');
    await vi.waitFor(() => expect(source.current()?.functions.has('kept')).toBe(true), WAIT);

    let full = source.stats().fullLoads;
    await db.sql('TRUNCATE pgstack.edge_functions');
    await vi.waitFor(() => expect(source.current()?.functions.size).toBe(0), WAIT);
    expect(source.stats().fullLoads).toBe(full + 1);

    // Pruned past: the log lost what came after the gateway's version.
    full = source.stats().fullLoads;
    await db.sql('ALTER TABLE pgstack.edge_functions DISABLE TRIGGER pgstack_fn_changed');
    await insert('lost-from-log');
    await db.sql('ALTER TABLE pgstack.edge_functions ENABLE TRIGGER pgstack_fn_changed');
    await db.sql('DELETE FROM pgstack.catalog_changes');
    await insert('after-prune');
    await vi.waitFor(() => expect(source.current()?.functions.has('after-prune')).toBe(true), WAIT);
    expect(source.current()?.functions.has('lost-from-log')).toBe(true);
    expect(source.stats().fullLoads).toBe(full + 1);

    // The schema dropped and recreated in one transaction with new rows: the new log knows
    // nothing of what the old tables held ('kept' is gone, the new rows are all there).
    full = source.stats().fullLoads;
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    try {
      await client.query('BEGIN');
      await client.query('DROP SCHEMA pgstack CASCADE');
      await client.query(readFileSync(new URL('../sql/schema.sql', import.meta.url), 'utf8'));
      for (const name of ['re-a', 're-b', 're-c']) {
        await client.query("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ($1, 'http', 'http://re:1')", [name]);
      }
      await client.query('COMMIT');
    } finally {
      await client.end();
    }
    await vi.waitFor(() => expect([...source.current()!.functions.keys()].sort()).toEqual(['re-a', 're-b', 're-c']), WAIT);
    expect(source.stats().fullLoads).toBe(full + 1);
  });

  it('without a readable log (an old schema, or a role without SELECT on it), says so once and reloads the whole table on every change', async () => {
    // An old schema: no log triggers, no log table.
    const triggers = ['pgstack_fn_logged_insert', 'pgstack_fn_logged_update', 'pgstack_fn_logged_delete', 'pgstack_fn_logged_truncate'];
    for (const t of triggers) await db.sql(`ALTER TABLE pgstack.edge_functions DISABLE TRIGGER ${t}`);
    await db.sql('ALTER TABLE pgstack.catalog_changes RENAME TO catalog_changes_hidden');
    try {
      const source = await startCatalog();
      const before = source.stats();
      await insert('old-schema');
      await vi.waitFor(() => expect(source.current()?.functions.has('old-schema')).toBe(true), WAIT);
      expect(source.stats().changeLoads).toBe(before.changeLoads);
      expect(source.stats().fullLoads).toBeGreaterThan(before.fullLoads);
      expect(logs.filter((l) => l.level === 'warn' && l.message.startsWith('the catalog change log'))).toHaveLength(1);
    } finally {
      await db.sql('ALTER TABLE pgstack.catalog_changes_hidden RENAME TO catalog_changes');
      for (const t of triggers) await db.sql(`ALTER TABLE pgstack.edge_functions ENABLE TRIGGER ${t}`);
    }
  });

  it('a role that may read the catalog but not the log: every change a full reload, said once, the listener never dropped', async () => {
    const role = `pgstack_ro_${Math.random().toString(36).slice(2, 8)}`;
    await db.sql(`CREATE ROLE ${role} LOGIN PASSWORD 'ro-secret'`);
    await db.sql(`GRANT USAGE ON SCHEMA pgstack TO ${role}`);
    await db.sql(`GRANT SELECT ON pgstack.edge_functions TO ${role}`);
    const url = new URL(db.url);
    url.username = role;
    url.password = 'ro-secret';
    const { source, entries } = catalogAt(url.toString());
    try {
      source.start();
      await source.firstLoad();
      for (let i = 0; i < 5; i++) {
        await insert(`ro-${i}`);
        await vi.waitFor(() => expect(source.current()?.functions.has(`ro-${i}`)).toBe(true), WAIT);
      }
      expect(source.stats().reconnects).toBe(0);
      expect(source.stats().changeLoads).toBe(0);
      expect(entries.filter((l) => l.message.startsWith('the catalog change log'))).toHaveLength(1);
      expect(entries.filter((l) => l.message.includes('listener lost'))).toEqual([]);
    } finally {
      await source.stop();
      await db.sql(`DROP OWNED BY ${role}`);
      await db.sql(`DROP ROLE ${role}`);
    }
  });
});

describe('catalog without a database', () => {
  it('keeps retrying without throwing, and stop() ends it', async () => {
    const port = await freePort();
    const url = new URL(db.url);
    url.port = String(port);
    const { source, entries } = catalogAt(url.toString());
    const first = source.firstLoad();
    source.start();
    await vi.waitFor(() => expect(entries.filter((e) => e.message.includes('retrying')).length).toBeGreaterThanOrEqual(3), WAIT);
    expect(source.listening()).toBe(false);
    expect(source.current()).toBeUndefined();
    expect(source.stats().lastError).toMatch(/ECONNREFUSED|connect/);
    await expect(source.reloadNow()).rejects.toThrow(/not connected/);
    await source.stop();
    await expect(first).rejects.toThrow(/stopped/);
    const count = entries.length;
    await new Promise((resolve) => setTimeout(resolve, 100));
    expect(entries.length).toBe(count);
  });
});
