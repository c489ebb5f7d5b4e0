/**
 * A fetch handler for runtimes that serve a module's `export default { fetch }` (Deno's
 * `deno serve`, Bun), configured from the environment when the module loads, so a
 * mistake stops the start. test/embed.test.ts runs it under Node.
 *
 * Environment (read here, in the host, never by the core):
 *   JWT_SECRET         HS256 secret (required)
 *   PGSTACK_FUNCTIONS  JSON array of catalog rows, e.g.
 *                      [{"name":"hello","runtime":"http","verify_jwt":true,"upstream_url":"http://hello:8000"}]
 */
import type { CatalogRow, Gateway } from '../../core/index.ts';
import { createEmbeddedGateway } from './embed.ts';

function fromEnvironment(): Gateway {
  const env = (globalThis as { process?: { env: Record<string, string | undefined> } }).process?.env ?? {};
  const jwtSecret = env['JWT_SECRET'];
  if (!jwtSecret) throw new Error('JWT_SECRET is required');
  let rows: unknown;
  try {
    rows = JSON.parse(env['PGSTACK_FUNCTIONS'] ?? '[]');
  } catch {
    rows = undefined;
  }
  if (!Array.isArray(rows)) throw new Error('PGSTACK_FUNCTIONS must be a JSON array of catalog rows');
  return createEmbeddedGateway({ jwtSecret, rows: rows as CatalogRow[] });
}

const gateway = fromEnvironment();
export default { fetch: (request: Request): Promise<Response> => gateway.fetch(request) };
