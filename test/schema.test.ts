/**
 * sql/schema.sql against a real PostgreSQL: idempotence (also over the seed's original
 * table), the CHECKs, updated_at, and the NOTIFY of the pgstack_fn_changed triggers.
 */
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { CATALOG_CHANNEL, migrate } from '../adapters/node/migrate.ts';
import { createTestDatabase, type TestDatabase } from './support/db.ts';
import { startDbRelay } from './support/db-relay.ts';

const SEED_INSERT = `INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('my-fn', 'http', true, 'http://my-fn:8000');`;

/** Sorted description of the table's shape, to compare before and after a second migration. */
async function shape(db: TestDatabase) {
  const columns = await db.sql(
    `SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns
      WHERE table_schema = 'pgstack' AND table_name = 'edge_functions' ORDER BY column_name`,
  );
  // PostgreSQL 18 lists NOT NULL in pg_constraint too; those are covered by the columns.
  const constraints = await db.sql(
    `SELECT conname, pg_get_constraintdef(oid) AS def, convalidated FROM pg_constraint
      WHERE conrelid = 'pgstack.edge_functions'::regclass AND contype IN ('c', 'p', 'u', 'f') ORDER BY conname`,
  );
  const triggers = await db.sql(
    `SELECT tgname FROM pg_trigger WHERE tgrelid = 'pgstack.edge_functions'::regclass AND NOT tgisinternal ORDER BY tgname`,
  );
  return { columns: columns.rows, constraints: constraints.rows, triggers: triggers.rows.map((r) => r.tgname) };
}

describe('schema.sql', () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase();
  });
  afterAll(async () => {
    await db?.drop();
  });

  it('is idempotent: a second and third run change nothing', async () => {
    const before = await shape(db);
    await migrate(db.url, { force: true });
    await migrate(db.url, { force: true });
    expect(await shape(db)).toEqual(before);
    expect(before.triggers).toEqual(['pgstack_fn_changed', 'pgstack_fn_changed_truncate', 'pgstack_fn_logged_delete', 'pgstack_fn_logged_insert', 'pgstack_fn_logged_truncate', 'pgstack_fn_logged_update', 'pgstack_fn_touch']);
    expect(before.constraints.map((c) => c.conname)).toEqual([
      'edge_functions_body_limit_positive',
      'edge_functions_http_needs_upstream',
      'edge_functions_name_slug',
      'edge_functions_pkey',
      'edge_functions_runtime_known',
      'edge_functions_timeout_positive',
      'edge_functions_upstream_scheme',
    ]);
    expect(before.constraints.every((c) => c.convalidated)).toBe(true);
  });

  it('leaves a current schema alone (no lock taken): an open transaction on the catalog holds up no start-up migration', async () => {
    await migrate(db.url);
    const open = new pg.Client({ connectionString: db.url });
    await open.connect();
    try {
      await open.query('BEGIN');
      await open.query("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('held', 'http', 'http://h:1')");
      const started = performance.now();
      await migrate(db.url, { lockTimeoutMs: 2_000 });
      expect(performance.now() - started).toBeLessThan(1_000);
      // Applying it anyway has to wait for that transaction: it gives up with a clear error.
      await expect(migrate(db.url, { force: true, lockTimeoutMs: 300 })).rejects.toMatchObject({
        code: '55P03',
        message: expect.stringMatching(/waited over 300 ms for a lock on the pgstack tables: another session holds one/),
      });
    } finally {
      await open.query('ROLLBACK').catch(() => {});
      await open.end();
    }
    // A changed schema.sql is applied: the marker it left names this file's content.
    const { rows } = await db.sql("SELECT obj_description('pgstack'::regnamespace, 'pg_namespace') AS marker");
    expect(rows[0].marker).toMatch(/^pgstack schema sha256:[0-9a-f]{32}$/);
    await db.sql("COMMENT ON SCHEMA pgstack IS 'pgstack schema sha256:older'");
    await db.sql('DROP TRIGGER pgstack_fn_touch ON pgstack.edge_functions');
    await migrate(db.url);
    expect((await shape(db)).triggers).toContain('pgstack_fn_touch');
  });

  it('a connection that goes silent after login fails the migration within its query timeout (no hang)', async () => {
    // A relay to the database that forwards the login, then drops whatever the client
    // sends (a partition or a stuck pooler): the first query's answer never comes.
    let loggedIn = false;
    const relay = await startDbRelay(db.url, {
      fromClient: () => !loggedIn,
      fromServer: (chunk) => {
        if (chunk.includes(Buffer.from('Z\x00\x00\x00\x05I'))) loggedIn = true; // ReadyForQuery, idle
        return true;
      },
    });
    try {
      const started = Date.now();
      const failure = await migrate(relay.url, { queryTimeoutMs: 500 }).then(
        () => undefined,
        (err: unknown) => err,
      );
      expect(loggedIn).toBe(true);
      expect(String(failure)).toMatch(/timeout/i);
      expect(Date.now() - started).toBeLessThan(4_000);
    } finally {
      relay.close();
    }
  });

  it('a connection that goes silent as it is being ended does not hold the migration (end is bounded)', async () => {
    // The relay forwards until the client says Terminate, then forwards nothing more and
    // keeps both sockets open (half-open: the client's FIN is never answered, a stuck
    // pooler's FIN-WAIT-2): the server never closes, so end() alone would wait forever.
    let terminated = false;
    const relay = await startDbRelay(db.url, {
      halfOpen: true,
      fromClient: (chunk) => {
        if (chunk.includes(Buffer.from('X\x00\x00\x00\x04'))) terminated = true;
        return !terminated;
      },
    });
    try {
      const started = Date.now();
      await migrate(relay.url); // current: checks the marker, then ends the connection
      expect(terminated).toBe(true);
      expect(Date.now() - started).toBeLessThan(4_000);
    } finally {
      relay.close();
    }
  });

  it('a deadlock with a catalog session aborts the migration once; it tries again and applies', async () => {
    // A holds the change log, then wants the catalog table the migration already locked,
    // while the migration waits for the change log: a cycle PostgreSQL breaks by aborting
    // the migration (it has waited longest: its deadlock check runs first).
    const a = new pg.Client({ connectionString: db.url });
    await a.connect();
    const lines: Array<{ level: string; message: string }> = [];
    try {
      await a.query('BEGIN');
      await a.query('SELECT count(*) FROM pgstack.catalog_changes');
      const migrating = migrate(db.url, { force: true, log: (level, message) => lines.push({ level, message }) });
      await vi.waitFor(async () => {
        const { rows } = await db.sql("SELECT 1 FROM pg_stat_activity WHERE application_name = 'pgstack-migrate' AND wait_event_type = 'Lock'");
        expect(rows.length).toBe(1);
      }, { timeout: 5_000, interval: 20 });
      const aWaits = a.query('SELECT count(*) FROM pgstack.edge_functions');
      await aWaits; // granted once the migration's first attempt is aborted
      await a.query('COMMIT');
      await migrating;
      expect(lines.some((l) => l.level === 'warn' && l.message.includes('deadlock'))).toBe(true);
      const { rows } = await db.sql("SELECT obj_description('pgstack'::regnamespace) AS marker");
      expect(rows[0].marker).toMatch(/^pgstack schema sha256:/);
    } finally {
      await a.query('ROLLBACK').catch(() => undefined);
      await a.end();
    }
  });

  it('survives concurrent migrations (advisory lock)', async () => {
    await Promise.all([migrate(db.url), migrate(db.url), migrate(db.url), migrate(db.url)]);
    expect((await shape(db)).triggers).toHaveLength(7);
  });

  it('logs every name each changing statement touched (old and new on a rename) with its transaction id', async () => {
    await db.sql('TRUNCATE pgstack.edge_functions');
    const after = Number((await db.sql('SELECT COALESCE(max(id), 0) AS id FROM pgstack.catalog_changes')).rows[0].id);
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    const xids: string[] = [];
    const inTransaction = async (sql: string) => {
      await client.query('BEGIN');
      await client.query(sql);
      xids.push((await client.query('SELECT pg_current_xact_id()::text AS x')).rows[0].x);
      await client.query('COMMIT');
    };
    try {
      await inTransaction("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('log-a', 'http', 'http://a:1'), ('log-b', 'http', 'http://b:1')");
      await inTransaction("UPDATE pgstack.edge_functions SET name = 'log-c' WHERE name = 'log-a'");
      await inTransaction("UPDATE pgstack.edge_functions SET verify_jwt = false WHERE name = 'nothing-matches'");
      await inTransaction("DELETE FROM pgstack.edge_functions WHERE name = 'log-b'");
      await inTransaction('TRUNCATE pgstack.edge_functions');
    } finally {
      await client.end();
    }
    const { rows } = await db.sql('SELECT xid::text AS xid, name FROM pgstack.catalog_changes WHERE id > $1 ORDER BY id, name', [after]);
    const step = (xid: string) => xids.indexOf(xid);
    expect(rows.map((r) => [step(r.xid), r.name]).sort((x, y) => x[0] - y[0] || String(x[1]).localeCompare(String(y[1])))).toEqual([
      [0, 'log-a'],
      [0, 'log-b'],
      [1, 'log-a'],
      [1, 'log-c'],
      [3, 'log-b'],
      [4, null],
    ]);
  });

  it('writers of different rows never wait for each other because of the log: an open transaction holds up nobody', async () => {
    await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('w-a', 'http', 'http://a:1'), ('w-b', 'http', 'http://b:1')");
    const [one, two] = [new pg.Client({ connectionString: db.url }), new pg.Client({ connectionString: db.url })];
    await Promise.all([one.connect(), two.connect()]);
    try {
      await one.query('BEGIN');
      await one.query("UPDATE pgstack.edge_functions SET verify_jwt = false WHERE name = 'w-a'");
      // Another session's change to another row (and an insert) completes while `one` is open.
      await two.query("SET lock_timeout = '2s'");
      await two.query("UPDATE pgstack.edge_functions SET verify_jwt = false WHERE name = 'w-b'");
      await two.query("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('w-c', 'http', 'http://c:1')");
      // A TRUNCATE in the open transaction, after another writer went through: no deadlock
      // (a shared counter row made this one: the other writer waited on it holding the table).
      await one.query('TRUNCATE pgstack.edge_functions');
      await one.query('ROLLBACK');
      // REPEATABLE READ writers of different rows both commit (no serialization failure).
      await one.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      await two.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
      await one.query("UPDATE pgstack.edge_functions SET verify_jwt = true WHERE name = 'w-a'");
      await two.query("UPDATE pgstack.edge_functions SET verify_jwt = true WHERE name = 'w-b'");
      await Promise.all([one.query('COMMIT'), two.query('COMMIT')]);
    } finally {
      await Promise.all([one.end(), two.end()]);
    }
    const { rows } = await db.sql("SELECT name, verify_jwt FROM pgstack.edge_functions WHERE name LIKE 'w-%' ORDER BY name");
    expect(rows).toEqual([
      { name: 'w-a', verify_jwt: true },
      { name: 'w-b', verify_jwt: true },
      { name: 'w-c', verify_jwt: true },
    ]);
    await db.sql("DELETE FROM pgstack.edge_functions WHERE name LIKE 'w-%'");
  });

  it('keeps about the newest 10,000 entries, however they are written (single statements, upserts)', async () => {
    const count = async () => Number((await db.sql('SELECT count(*) AS n FROM pgstack.catalog_changes')).rows[0].n);
    // 12,000 entries over 120 transactions, then upserts (INSERT ... ON CONFLICT DO UPDATE,
    // what `pgstack functions add` runs) on top.
    for (let i = 0; i < 120; i++) {
      await db.sql(`INSERT INTO pgstack.edge_functions (name, runtime, upstream_url)
                    SELECT 'prune-' || $1::int || '-' || g, 'http', 'http://p:1' FROM generate_series(1, 100) g`, [i]);
    }
    for (let i = 0; i < 300; i++) {
      await db.sql(`INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('prune-up', 'http', 'http://p:1')
                    ON CONFLICT (name) DO UPDATE SET upstream_url = EXCLUDED.upstream_url`);
    }
    const n = await count();
    expect(n).toBeGreaterThanOrEqual(10_000);
    expect(n).toBeLessThanOrEqual(11_100);
    await db.sql("DELETE FROM pgstack.edge_functions WHERE name LIKE 'prune-%'");
  }, 60_000);

  describe('pruning', () => {
    // Rows [from, to] flipped in one statement: one log entry each. Concurrent writers get
    // ranges of their own (row locks are not what is tested here).
    const bulk = async (client: pg.Client | TestDatabase, from = 1_101, to = 2_100) =>
      (client instanceof pg.Client ? client.query.bind(client) : client.sql.bind(client))(
        `UPDATE pgstack.edge_functions SET verify_jwt = NOT verify_jwt WHERE name LIKE 'pr-%' AND substr(name, 4)::int BETWEEN ${from} AND ${to}`,
      );
    beforeAll(async () => {
      await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) SELECT 'pr-' || g, 'http', 'http://p:1' FROM generate_series(1, 2100) g");
      for (let i = 0; i < 11; i++) await bulk(db);
    });
    afterAll(async () => {
      await db.sql("DELETE FROM pgstack.edge_functions WHERE name LIKE 'pr-%' OR name = 'victim-pr'");
    });

    it('never deletes an entry a reader has not seen without saying so (deleted_through), also with a pruner left open', async () => {
      const reader = (await db.sql('SELECT pg_current_snapshot()::text AS s, pg_snapshot_xmin(pg_current_snapshot())::text AS xmin')).rows[0];
      const [victim, open] = [new pg.Client({ connectionString: db.url }), new pg.Client({ connectionString: db.url })];
      await Promise.all([victim.connect(), open.connect()]);
      try {
        await victim.query('BEGIN');
        await victim.query("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('victim-pr', 'http', 'http://v:1')");
        const victimXid = (await victim.query('SELECT pg_current_xact_id()::text AS x')).rows[0].x as string;
        await victim.query('COMMIT');
        // A pruner whose transaction stays open while others write (and would prune).
        await open.query('BEGIN');
        await bulk(open, 1, 1_100);
        for (let i = 0; i < 11; i++) await bulk(db);
        await open.query('COMMIT');
        for (let i = 0; i < 12; i++) await bulk(db);
        const { rows } = await db.sql(
          `SELECT EXISTS (SELECT 1 FROM pgstack.catalog_changes WHERE xid = $1::xid8 AND name = 'victim-pr') AS kept,
                  (SELECT deleted_through FROM pgstack.catalog_log_state) >= $2::xid8 AS flagged`,
          [victimXid, reader.xmin],
        );
        // The reader's snapshot did not see the victim: its entry is either still there, or
        // the reader is told that it may be gone.
        expect(rows[0].kept || rows[0].flagged).toBe(true);
        expect(rows[0].kept).toBe(false); // (and here it was pruned: the case is exercised)
      } finally {
        await Promise.all([victim.end(), open.end()]);
      }
    }, 60_000);

    it('a REPEATABLE READ writer whose statement would prune, after another pruned meanwhile, commits', async () => {
      const rr = new pg.Client({ connectionString: db.url });
      await rr.connect();
      try {
        await rr.query('BEGIN ISOLATION LEVEL REPEATABLE READ');
        await rr.query('SELECT 1'); // its snapshot, from before the other pruner
        for (let i = 0; i < 2; i++) await bulk(db);
        await bulk(rr, 1, 1_100);
        await rr.query('COMMIT');
      } finally {
        await rr.end();
      }
    }, 60_000);

    it('an open transaction elsewhere (holding the xmin back) does not make a reader see a gap', async () => {
      const long = new pg.Client({ connectionString: db.url });
      await long.connect();
      try {
        await long.query('BEGIN');
        const longXid = (await long.query('SELECT pg_current_xact_id()::text AS xid')).rows[0].xid as string;
        const before = (await db.sql('SELECT deleted_through::text AS d FROM pgstack.catalog_log_state')).rows[0]?.d ?? null;
        for (let i = 0; i < 12; i++) await bulk(db);
        // Pruning went on (the log is past 10,000 entries) but deleted nothing at or after the
        // open transaction's xid, so a reader whose snapshot saw it running (its xmin at most
        // that xid) is told of no gap. (Compared with the xid itself, not a reader's xmin:
        // xids are cluster-wide, and another database's transaction can hold a reader's
        // xmin lower than entries deleted earlier, a harmless full reload.)
        const { rows } = await db.sql(
          'SELECT deleted_through IS NOT DISTINCT FROM $1::xid8 OR deleted_through < $2::xid8 AS ok FROM pgstack.catalog_log_state',
          [before, longXid],
        );
        expect(rows[0].ok).toBe(true);
      } finally {
        await long.query('ROLLBACK');
        await long.end();
      }
    }, 60_000);
  });

  it('a role that may only edit the catalog table can still change it (the log is written as its owner)', async () => {
    const role = `pgstack_editor_${Math.random().toString(36).slice(2, 8)}`;
    await db.sql(`CREATE ROLE ${role}`);
    try {
      await db.sql(`GRANT USAGE ON SCHEMA pgstack TO ${role}`);
      await db.sql(`GRANT SELECT, INSERT, UPDATE, DELETE ON pgstack.edge_functions TO ${role}`);
      await db.sql(`SET ROLE ${role}`);
      await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('by-editor', 'http', 'http://e:1')");
      await db.sql("DELETE FROM pgstack.edge_functions WHERE name = 'by-editor'");
    } finally {
      await db.sql('RESET ROLE');
      await db.sql(`DROP OWNED BY ${role}`);
      await db.sql(`DROP ROLE ${role}`);
    }
  });

  it("accepts the seed's four-column INSERT and fills the defaults", async () => {
    await db.sql(SEED_INSERT);
    const { rows } = await db.sql(`SELECT * FROM pgstack.edge_functions WHERE name = 'my-fn'`);
    expect(rows[0]).toMatchObject({ name: 'my-fn', runtime: 'http', verify_jwt: true, upstream_url: 'http://my-fn:8000', timeout_ms: null, max_body_bytes: null });
    expect(rows[0].created_at).toBeInstanceOf(Date);
    expect(rows[0].updated_at).toBeInstanceOf(Date);
    await db.sql(`DELETE FROM pgstack.edge_functions`);
  });

  it.each([
    ['an ftp:// upstream', `('bad-scheme', 'http', 'ftp://x')`, 'edge_functions_upstream_scheme'],
    ['an upstream without scheme', `('no-scheme', 'http', 'my-fn:8000')`, 'edge_functions_upstream_scheme'],
    ['an empty upstream', `('empty-url', 'http', '')`, 'edge_functions_upstream_scheme'],
    ['a name with a slash', `('a/b', 'http', 'http://fn:1')`, 'edge_functions_name_slug'],
    ['a name with a dot', `('a.b', 'http', 'http://fn:1')`, 'edge_functions_name_slug'],
    ['an empty name', `('', 'http', 'http://fn:1')`, 'edge_functions_name_slug'],
    ['a 129-character name', `('${'a'.repeat(129)}', 'http', 'http://fn:1')`, 'edge_functions_name_slug'],
    ['a name ending in a newline', `(E'fn\\n', 'http', 'http://fn:1')`, 'edge_functions_name_slug'],
    ['an unknown runtime', `('fn', 'python', 'http://fn:1')`, 'edge_functions_runtime_known'],
    ["runtime 'http' without upstream", `('fn', 'http', NULL)`, 'edge_functions_http_needs_upstream'],
  ])('refuses %s', async (_what, values, constraint) => {
    await expect(db.sql(`INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ${values}`)).rejects.toMatchObject({
      code: '23514',
      constraint,
    });
  });

  it('refuses non-positive timeout_ms and max_body_bytes', async () => {
    await expect(
      db.sql(`INSERT INTO pgstack.edge_functions (name, runtime, upstream_url, timeout_ms) VALUES ('t', 'http', 'http://fn:1', 0)`),
    ).rejects.toMatchObject({ constraint: 'edge_functions_timeout_positive' });
    await expect(
      db.sql(`INSERT INTO pgstack.edge_functions (name, runtime, upstream_url, max_body_bytes) VALUES ('t', 'http', 'http://fn:1', -1)`),
    ).rejects.toMatchObject({ constraint: 'edge_functions_body_limit_positive' });
  });

  it('accepts HTTP:// and https:// case-insensitively, a 128-character name, deno without upstream', async () => {
    await db.sql(
      `INSERT INTO pgstack.edge_functions (name, runtime, upstream_url, timeout_ms, max_body_bytes) VALUES
        ('upper', 'http', 'HTTP://fn:1', 1000, 1048576),
        ('tls', 'http', 'HtTpS://fn', NULL, NULL),
        ('${'A'.repeat(128)}', 'http', 'http://fn:1', NULL, NULL),
        ('under_score-dash9', 'deno', NULL, NULL, NULL)`,
    );
    const { rows } = await db.sql(`SELECT count(*)::int AS n FROM pgstack.edge_functions`);
    expect(rows[0].n).toBe(4);
    await db.sql(`DELETE FROM pgstack.edge_functions`);
  });

  it('moves updated_at on UPDATE and keeps created_at', async () => {
    await db.sql(SEED_INSERT);
    const before = (await db.sql(`SELECT created_at, updated_at FROM pgstack.edge_functions WHERE name = 'my-fn'`)).rows[0];
    await db.sql(`UPDATE pgstack.edge_functions SET verify_jwt = false, updated_at = '2000-01-01' WHERE name = 'my-fn'`);
    const after = (await db.sql(`SELECT created_at, updated_at FROM pgstack.edge_functions WHERE name = 'my-fn'`)).rows[0];
    expect(after.created_at).toEqual(before.created_at);
    expect(after.updated_at.getTime()).toBeGreaterThanOrEqual(before.updated_at.getTime());
    await db.sql(`DELETE FROM pgstack.edge_functions`);
  });

  it('notifies pgstack_catalog on INSERT, UPDATE, DELETE and TRUNCATE, at commit only', async () => {
    const listener = new pg.Client({ connectionString: db.url });
    listener.on('error', () => {});
    await listener.connect();
    const payloads: unknown[] = [];
    listener.on('notification', (msg) => {
      if (msg.channel === CATALOG_CHANNEL) payloads.push(JSON.parse(msg.payload ?? 'null'));
    });
    await listener.query(`LISTEN ${CATALOG_CHANNEL}`);
    try {
      await db.sql(SEED_INSERT);
      await db.sql(`UPDATE pgstack.edge_functions SET upstream_url = 'http://my-fn:9000' WHERE name = 'my-fn'`);
      await db.sql(`UPDATE pgstack.edge_functions SET name = 'renamed' WHERE name = 'my-fn'`);
      await db.sql(`DELETE FROM pgstack.edge_functions WHERE name = 'renamed'`);
      await db.sql(`INSERT INTO pgstack.edge_functions (name, runtime) VALUES ('d1', 'deno'), ('d2', 'deno')`);
      await db.sql(`TRUNCATE pgstack.edge_functions`);
      // A rolled-back change is never announced.
      await db.sql('BEGIN');
      await db.sql(`INSERT INTO pgstack.edge_functions (name, runtime) VALUES ('ghost', 'deno')`);
      await db.sql('ROLLBACK');
      await db.sql(`INSERT INTO pgstack.edge_functions (name, runtime) VALUES ('last', 'deno')`);

      const expected = [
        { op: 'INSERT', name: 'my-fn' },
        { op: 'UPDATE', name: 'my-fn' },
        { op: 'UPDATE', name: 'renamed' },
        { op: 'DELETE', name: 'renamed' },
        { op: 'INSERT', name: 'd1' },
        { op: 'INSERT', name: 'd2' },
        { op: 'TRUNCATE', name: null },
        { op: 'INSERT', name: 'last' },
      ];
      await vi.waitFor(() => expect(payloads).toHaveLength(expected.length), { timeout: 5_000, interval: 10 });
      expect(payloads).toEqual(expected);
    } finally {
      await listener.end();
      await db.sql(`TRUNCATE pgstack.edge_functions`);
    }
  });
});

describe('schema.sql over the seed’s original four-column table', () => {
  let db: TestDatabase;
  beforeAll(async () => {
    db = await createTestDatabase({ migrate: false });
  });
  afterAll(async () => {
    await db?.drop();
  });

  it('adds the columns, CHECKs and triggers, keeps the rows, and stays idempotent', async () => {
    await db.sql(`CREATE SCHEMA pgstack`);
    await db.sql(`CREATE TABLE pgstack.edge_functions (
      name text PRIMARY KEY,
      runtime text NOT NULL,
      verify_jwt boolean NOT NULL DEFAULT true,
      upstream_url text
    )`);
    await db.sql(SEED_INSERT);
    // A row the new CHECKs refuse: the migration must still pass (the gateway drops the row).
    await db.sql(`INSERT INTO pgstack.edge_functions VALUES ('legacy.bad', 'http', true, 'ftp://old')`);

    const warnings: string[] = [];
    await migrate(db.url, { log: (level, message) => level === 'warn' && warnings.push(message) });
    await migrate(db.url);

    const { rows } = await db.sql(`SELECT name, runtime, verify_jwt, upstream_url, timeout_ms, max_body_bytes, created_at FROM pgstack.edge_functions ORDER BY name`);
    expect(rows.map((r) => r.name)).toEqual(['legacy.bad', 'my-fn']);
    expect(rows[1]).toMatchObject({ timeout_ms: null, max_body_bytes: null });
    expect(rows[1].created_at).toBeInstanceOf(Date);
    expect(warnings.join('\n')).toMatch(/edge_functions_name_slug/);
    expect(warnings.join('\n')).toMatch(/edge_functions_upstream_scheme/);

    // New rows are checked even though old ones break the rules.
    await expect(db.sql(`INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('x', 'http', 'ftp://x')`)).rejects.toMatchObject({
      code: '23514',
    });
    await db.sql(`DELETE FROM pgstack.edge_functions WHERE name = 'my-fn'`);
    await db.sql(SEED_INSERT);

    // Once fixed, the next migration validates the CHECKs.
    await db.sql(`DELETE FROM pgstack.edge_functions WHERE name = 'legacy.bad'`);
    await migrate(db.url);
    const { rows: constraints } = await db.sql(
      `SELECT bool_and(convalidated) AS ok, count(*)::int AS n FROM pg_constraint WHERE conrelid = 'pgstack.edge_functions'::regclass AND contype = 'c'`,
    );
    expect(constraints[0]).toEqual({ ok: true, n: 6 });
  });
});
