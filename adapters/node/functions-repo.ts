/**
 * Catalog writes for the CLI and the demo: the same table a user edits with SQL. Each
 * write fires the pgstack_fn_changed trigger, so running gateways pick it up live.
 */
import pg from 'pg';
import { endWithin } from './pg-end.ts';
import type { CatalogRow, Runtime } from '../../core/index.ts';
import { CATALOG_QUERY } from './catalog-sql.ts';

export interface FunctionInput {
  readonly name: string;
  readonly runtime: Runtime;
  readonly verifyJwt: boolean;
  readonly upstreamUrl: string | null;
  readonly timeoutMs?: number | null;
  readonly maxBodyBytes?: number | null;
}

async function withClient<T>(databaseUrl: string, fn: (client: pg.Client) => Promise<T>): Promise<T> {
  // Bounded waits: a silent connection fails the command instead of hanging it.
  const client = new pg.Client({ connectionString: databaseUrl, connectionTimeoutMillis: 5_000, query_timeout: 15_000, keepAlive: true, application_name: 'pgstack-cli' });
  client.on('error', () => {}); // a dropped connection surfaces as the query's rejection
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await endWithin(client);
  }
}

/** Inserts or replaces a function. Resolves true when it was new. */
export function upsertFunction(databaseUrl: string, input: FunctionInput): Promise<boolean> {
  return withClient(databaseUrl, async (client) => {
    const res = await client.query<{ inserted: boolean }>(
      `INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url, timeout_ms, max_body_bytes)
       VALUES ($1, $2, $3, $4, $5, $6)
       ON CONFLICT (name) DO UPDATE SET runtime = EXCLUDED.runtime, verify_jwt = EXCLUDED.verify_jwt,
         upstream_url = EXCLUDED.upstream_url, timeout_ms = EXCLUDED.timeout_ms, max_body_bytes = EXCLUDED.max_body_bytes
       RETURNING (xmax = 0) AS inserted`,
      [input.name, input.runtime, input.verifyJwt, input.upstreamUrl, input.timeoutMs ?? null, input.maxBodyBytes ?? null],
    );
    return res.rows[0]?.inserted ?? false;
  });
}

export function listFunctions(databaseUrl: string): Promise<CatalogRow[]> {
  return withClient(databaseUrl, async (client) => {
    const res = await client.query<CatalogRow>(CATALOG_QUERY);
    return res.rows;
  });
}

/** Deletes a function. Resolves false when there was none by that name. */
export function removeFunction(databaseUrl: string, name: string): Promise<boolean> {
  return withClient(databaseUrl, async (client) => {
    const res = await client.query('DELETE FROM pgstack.edge_functions WHERE name = $1', [name]);
    return (res.rowCount ?? 0) > 0;
  });
}
