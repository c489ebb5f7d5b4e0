/**
 * An isolated database per test file on the server of test/setup/postgres.ts, with the
 * schema applied, so files running in parallel never see each other's catalog rows.
 */
import { randomBytes } from 'node:crypto';
import pg from 'pg';
import { inject } from 'vitest';
import { migrate } from '../../adapters/node/migrate.ts';

export interface TestDatabase {
  /** URL of the new database. */
  url: string;
  /** Runs one statement on a helper connection to the new database. */
  sql(text: string, params?: unknown[]): Promise<pg.QueryResult>;
  /** Closes the helper connection, ends every other session on the database and drops it. */
  drop(): Promise<void>;
}

async function withAdmin<T>(serverUrl: string, fn: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: serverUrl, application_name: 'pgstack-test-admin' });
  client.on('error', () => {});
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end().catch(() => {});
  }
}

/** Creates a database named pgstack_test_<random>, migrated; `options.migrate: false` leaves it empty. */
export async function createTestDatabase(options: { migrate?: boolean } = {}): Promise<TestDatabase> {
  const serverUrl = inject('databaseUrl');
  const name = `pgstack_test_${randomBytes(6).toString('hex')}`;
  await withAdmin(serverUrl, (admin) => admin.query(`CREATE DATABASE ${name}`));
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  const dbUrl = url.toString();
  if (options.migrate !== false) await migrate(dbUrl);

  const helper = new pg.Client({ connectionString: dbUrl, application_name: 'pgstack-test-helper' });
  helper.on('error', () => {});
  await helper.connect();

  return {
    url: dbUrl,
    sql: (text, params) => helper.query(text, params),
    async drop() {
      await helper.end().catch(() => {});
      await withAdmin(serverUrl, async (admin) => {
        await admin.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()', [name]);
        await admin.query(`DROP DATABASE IF EXISTS ${name}`);
      });
    },
  };
}
