/**
 * loadConfig's durations: every `*_MS` variable is a whole number of milliseconds that a
 * timer can wait. Node's setTimeout fires after 1 ms for anything above 2^31 - 1, which
 * turned a huge CATALOG_BACKSTOP_MS into a reload loop and SHUTDOWN_GRACE_MS into no grace.
 */
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from './config.ts';

const DURATIONS = {
  UPSTREAM_CONNECT_TIMEOUT_MS: 'connectTimeoutMs',
  UPSTREAM_HEADERS_TIMEOUT_MS: 'headersTimeoutMs',
  UPSTREAM_KEEPALIVE_MS: 'upstreamKeepAliveMs',
  REQUEST_TIMEOUT_MS: 'requestTimeoutMs',
  CATALOG_BACKSTOP_MS: 'catalogBackstopMs',
  SHUTDOWN_GRACE_MS: 'shutdownGraceMs',
} as const;

describe('loadConfig: durations', () => {
  for (const [name, key] of Object.entries(DURATIONS)) {
    it(`${name}: up to 2147483647 ms is taken as given; beyond, or not a whole number, is refused naming it`, () => {
      expect(loadConfig({ [name]: '2147483647' })[key]).toBe(2_147_483_647);
      for (const bad of ['2147483648', '3000000000', '1e9', '-5', '1.5', '10s']) {
        expect(() => loadConfig({ [name]: bad }), bad).toThrow(ConfigError);
        expect(() => loadConfig({ [name]: bad }), bad).toThrow(name);
      }
    });
  }

  it('every *_MS variable the configuration table documents is covered here', async () => {
    const { readFile } = await import('node:fs/promises');
    const readme = await readFile(new URL('../../README.md', import.meta.url), 'utf8');
    const documented = [...readme.matchAll(/^\| `([A-Z_]+_MS)` \|/gm)].map((m) => m[1]);
    expect(documented.length).toBeGreaterThan(0);
    expect([...new Set(documented)].sort()).toEqual(Object.keys(DURATIONS).sort());
  });
});
