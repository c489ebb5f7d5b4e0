/**
 * Applies sql/schema.sql. Safe to run at every start-up and from several gateways at once.
 */
import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import pg from 'pg';
import { endWithin } from './pg-end.ts';
import type { Logger } from '../../core/log.ts';

export { CATALOG_CHANNEL, CATALOG_QUERY } from './catalog-sql.ts';

const SCHEMA_FILE = new URL('../../sql/schema.sql', import.meta.url);

export interface MigrateOptions {
  /** Receives the server's WARNINGs (e.g. old rows that break a new CHECK). */
  log?: Logger;
  /**
   * Apply even when the schema says it is current (`pgstack migrate`: repairs a trigger or
   * a CHECK dropped by hand). Without it a current schema is left alone: re-applying takes
   * exclusive locks on the catalog table, which would queue every catalog reader and
   * writer behind any open transaction that touched it.
   */
  force?: boolean;
  /** How long a statement waits for a lock before the migration gives up (and is retried by the caller). Default 5,000. */
  lockTimeoutMs?: number;
  /**
   * How long the client waits for any one answer of the server, default 30,000: a
   * connection that went silent (a partition, a stuck pooler) fails the attempt instead of
   * hanging it until the kernel gives up on TCP (~15 min).
   */
  queryTimeoutMs?: number;
}

/** A deadlock (40P01) with catalog writers or readers aborts one side: the migration tries again, this often. */
const DEADLOCK_ATTEMPTS = 3;

/** The server ends a migration session left idle inside its transaction after this long. */
const IDLE_IN_TRANSACTION_MS = 30_000;

/** The schema's comment names the version of schema.sql applied last. */
const markerOf = (schema: string) => `pgstack schema sha256:${createHash('sha256').update(schema).digest('hex').slice(0, 32)}`;
/**
 * The marker, and whether every CHECK is validated: rows an older table let in leave a CHECK
 * NOT VALID (see schema.sql), and once they are fixed the next migration validates it.
 */
const MARKER_QUERY = `SELECT obj_description(to_regnamespace('pgstack'), 'pg_namespace') AS marker,
       NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass('pgstack.edge_functions') AND contype = 'c' AND NOT convalidated) AS validated`;

async function isCurrent(client: pg.Client, marker: string): Promise<boolean> {
  const row = (await client.query<{ marker: string | null; validated: boolean }>(MARKER_QUERY)).rows[0];
  return row?.marker === marker && row.validated;
}

/** A migration that gave up waiting for a lock (lock_timeout). */
export class MigrationLockTimeout extends Error {
  readonly code = '55P03';
}

/**
 * Applies the schema in one transaction. A transaction-scoped advisory lock serialises
 * concurrent migrators: DDL such as CREATE OR REPLACE FUNCTION or CREATE SCHEMA IF NOT
 * EXISTS races with itself ("tuple concurrently updated", duplicate key) without it.
 * Rejects with the server's error; nothing is applied then.
 */
export async function migrate(databaseUrl: string, options: MigrateOptions = {}): Promise<void> {
  const schema = await readFile(SCHEMA_FILE, 'utf8');
  for (let attempt = 1; ; attempt++) {
    try {
      return await migrateOnce(databaseUrl, schema, options);
    } catch (err) {
      if ((err as { code?: unknown }).code !== '40P01' || attempt >= DEADLOCK_ATTEMPTS) throw err;
      options.log?.('warn', 'migrate: deadlock with a concurrent catalog session; trying again', { attempt });
      await new Promise((resolve) => setTimeout(resolve, 100 * attempt));
    }
  }
}

async function migrateOnce(databaseUrl: string, schema: string, options: MigrateOptions): Promise<void> {
  const marker = markerOf(schema);
  const lockTimeoutMs = options.lockTimeoutMs ?? 5_000;
  const client = new pg.Client({
    connectionString: databaseUrl,
    application_name: 'pgstack-migrate',
    connectionTimeoutMillis: 5_000,
    keepAlive: true,
    query_timeout: options.queryTimeoutMs ?? 30_000,
  });
  // Errors reach the caller through the awaited calls below; an 'error' event without a
  // listener would crash the process instead.
  client.on('error', () => {});
  client.on('notice', (notice) => {
    // `... IF EXISTS` / `IF NOT EXISTS` on a fresh or current schema: expected, not news.
    if (notice.message?.endsWith(', skipping')) return;
    options.log?.(notice.severity === 'WARNING' ? 'warn' : 'debug', `migrate: ${notice.message}`);
  });
  await client.connect();
  try {
    if (!options.force && (await isCurrent(client, marker))) return;
    await client.query('BEGIN');
    await client.query(`SET LOCAL lock_timeout = ${Math.max(1, Math.floor(lockTimeoutMs))}`);
    // A migrator cut off mid-transaction would leave its session holding the catalog's
    // locks (every gateway's reloads then time out) until the server notices the dead TCP
    // connection, possibly hours: the server ends a session idle in this transaction.
    await client.query(`SET LOCAL idle_in_transaction_session_timeout = ${IDLE_IN_TRANSACTION_MS}`);
    await client.query("SELECT pg_advisory_xact_lock(hashtextextended('pgstack.migrate', 0))");
    // Another migrator may have applied it while this one waited.
    if (!options.force && (await isCurrent(client, marker))) {
      await client.query('COMMIT');
      return;
    }
    await client.query(schema);
    await client.query(`COMMENT ON SCHEMA pgstack IS '${marker}'`);
    await client.query('COMMIT');
  } catch (err) {
    // (After a timeout the connection is not to be trusted: ending it rolls back too.)
    if (!/timeout/i.test(String((err as Error).message))) await client.query('ROLLBACK').catch(() => {});
    if ((err as { code?: unknown }).code === '55P03') {
      throw new MigrationLockTimeout(
        `applying the schema waited over ${lockTimeoutMs} ms for a lock on the pgstack tables: another session holds one (an open transaction that changed the catalog?)`,
        { cause: err },
      );
    }
    throw err;
  } finally {
    await endWithin(client);
  }
}
