/**
 * Applies sql/schema.sql. Safe to run at every start-up and from several gateways at once.
 */
import { readFile } from 'node:fs/promises';
import pg from 'pg';
import type { Logger } from '../../core/log.ts';

export { CATALOG_CHANNEL, CATALOG_QUERY } from './catalog-sql.ts';

const SCHEMA_FILE = new URL('../../sql/schema.sql', import.meta.url);

export interface MigrateOptions {
  /** Receives the server's WARNINGs (e.g. old rows that break a new CHECK). */
  log?: Logger;
}

/**
 * Applies the schema in one transaction. A transaction-scoped advisory lock serialises
 * concurrent migrators: DDL such as CREATE OR REPLACE FUNCTION or CREATE SCHEMA IF NOT
 * EXISTS races with itself ("tuple concurrently updated", duplicate key) without it.
 * Rejects with the server's error; nothing is applied then.
 */
export async function migrate(databaseUrl: string, options: MigrateOptions = {}): Promise<void> {
  const schema = await readFile(SCHEMA_FILE, 'utf8');
  const client = new pg.Client({
    connectionString: databaseUrl,
    application_name: 'pgstack-migrate',
    connectionTimeoutMillis: 5_000,
  });
  // Errors reach the caller through the awaited calls below; an 'error' event without a
  // listener would crash the process instead.
  client.on('error', () => {});
  client.on('notice', (notice) => {
    options.log?.(notice.severity === 'WARNING' ? 'warn' : 'debug', `migrate: ${notice.message}`);
  });
  await client.connect();
  try {
    await client.query('BEGIN');
    await client.query("SELECT pg_advisory_xact_lock(hashtextextended('pgstack.migrate', 0))");
    await client.query(schema);
    await client.query('COMMIT');
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {});
    throw err;
  } finally {
    await client.end().catch(() => {});
  }
}
