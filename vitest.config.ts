import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['core/**/*.test.ts', 'adapters/**/*.test.ts', 'test/**/*.test.ts'],
    globalSetup: ['test/setup/postgres.ts'],
    testTimeout: 30_000,
    hookTimeout: 120_000,
    // Two cores: integration files each start real processes; keep the pool small.
    maxWorkers: 2,
    pool: 'forks',
  },
});
