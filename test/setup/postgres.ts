/**
 * vitest globalSetup: one PostgreSQL server for the whole run, handed to test files as
 * inject('databaseUrl'). DATABASE_URL when set (a server of your own, e.g. in compose);
 * otherwise an embedded one in a fresh temporary folder, stopped and removed at the end.
 * Test files create their own databases on it (test/support/db.ts).
 */
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { TestProject } from 'vitest/node';
import { freePort, startEmbeddedPostgres } from '../../adapters/node/embedded.ts';

declare module 'vitest' {
  export interface ProvidedContext {
    databaseUrl: string;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const given = process.env.DATABASE_URL;
  if (given) {
    project.provide('databaseUrl', given);
    return async () => {};
  }
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pgstack-test-'));
  // mkdtemp makes it 0700; as root the server runs as the 'postgres' user, which must enter it.
  await chmod(dir, 0o755);
  const log = (level: string, message: string, fields?: Record<string, unknown>) => {
    if (level === 'warn' || level === 'error') console.error(`[test postgres] ${level} ${message}`, fields ?? '');
  };
  let db;
  try {
    db = await startEmbeddedPostgres({ dir, port: await freePort(), log });
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  project.provide('databaseUrl', db.databaseUrl);
  return async () => {
    await db.stop();
    await rm(dir, { recursive: true, force: true });
  };
}
