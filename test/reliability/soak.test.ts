/**
 * Issue 4, item 8, short: ten seconds of bench/soak.ts (the gateway as a child process,
 * steady keep-alive load, a catalog change every 100 ms) so CI exercises it. The long run
 * is `npm run soak` (2 minutes by default); README "Operating it" has its figures.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import { formatReport, runSoak } from '../../bench/soak.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';

let db: TestDatabase;

beforeAll(async () => {
  db = await createTestDatabase();
});

afterAll(async () => {
  await db?.drop();
});

it('10 s at steady load with catalog changes: no unexpected answer, flat memory, clean exit', async () => {
  const report = await runSoak({ databaseUrl: db.url, seconds: 10, clients: 8, changeEveryMs: 100, maxRssGrowthBytes: 64 * 1024 * 1024 });
  console.log(formatReport(report));
  expect(report.failures).toEqual([]);
  expect(report.unexpected).toEqual({});
  expect(report.catalogChanges).toBeGreaterThanOrEqual(50);
  expect(report.requests).toBeGreaterThan(200);
}, 60_000);
