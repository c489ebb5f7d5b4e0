/**
 * The catalog's two gates agree on their shared part. The SQL CHECK on
 * pgstack.edge_functions.upstream_url only requires an http(s) scheme; the validator
 * (core/upstream.ts, applied at every catalog load) requires that and much more. So:
 *
 *   validator accepts  =>  the CHECK accepts (the INSERT succeeds)
 *   the CHECK refuses  =>  the validator refuses
 *
 * and the CHECK by itself refuses what it must (other schemes, an http row without upstream).
 * The same holds for function names (FUNCTION_NAME vs edge_functions_name_slug).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { FUNCTION_NAME } from '../../core/catalog.ts';
import { validateUpstreamUrl } from '../../core/upstream.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';

let db: TestDatabase;
let n = 0;

beforeAll(async () => {
  db = await createTestDatabase();
});
afterAll(async () => {
  await db?.drop();
});

/** Inserts a row; resolves 'ok', 'check' (a CHECK violation, SQLSTATE 23514) or rethrows. */
async function insert(row: { name?: string; runtime?: string; upstream: string | null }): Promise<'ok' | 'check'> {
  const name = row.name ?? `u${++n}`;
  try {
    await db.sql('INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ($1, $2, true, $3)', [name, row.runtime ?? 'http', row.upstream]);
    await db.sql('DELETE FROM pgstack.edge_functions WHERE name = $1', [name]);
    return 'ok';
  } catch (err) {
    if ((err as { code?: string }).code === '23514') return 'check';
    throw err;
  }
}

async function expectAgreement(url: string): Promise<void> {
  const validated = validateUpstreamUrl(url);
  const outcome = await insert({ upstream: url });
  if (validated.ok) expect(outcome, `validator accepts ${JSON.stringify(url)} but the CHECK refuses it`).toBe('ok');
  if (outcome === 'check') expect(validated.ok, `the CHECK refuses ${JSON.stringify(url)} but the validator accepts it`).toBe(false);
}

describe('upstream_url: the CHECK and the validator agree on the scheme', () => {
  const table = [
    // accepted by both
    'http://fn_a',
    'http://hello-go:8000',
    'https://hello-go:8443/base/path',
    'HTTP://fn',
    'HtTpS://fn:1/x',
    `http://${'a'.repeat(63)}:65535`,
    'http://0fn',
    // refused by the validator, accepted by the CHECK (the validator is the stricter gate)
    'http://127.0.0.1:5432',
    'http://2130706433',
    'http://0x7f.1',
    'http://127.1',
    'http://[::1]:80',
    'http://evil.example.com',
    'http://user:pass@fn',
    'http://localhost:8000',
    'http://metadata',
    'http://fn\\@evil',
    'http://ｆｎ',
    'http://%66n',
    'http://fn:0',
    // refused by both
    'ftp://fn',
    'javascript:alert(1)',
    'file:///etc/passwd',
    'gopher://fn:70',
    'ws://fn',
    'http:/fn',
    'http:fn',
    'http:\\\\fn',
    '//fn',
    'fn:8000',
    ' http://fn',
    '\thttp://fn',
    'xhttp://fn',
    'https//fn',
    '',
  ];
  for (const url of table) it(JSON.stringify(url), () => expectAgreement(url));

  it('property: for generated URLs, validator accepts => CHECK accepts, CHECK refuses => validator refuses', async () => {
    const noNul = (s: string) => s.replace(/\u0000/g, '');
    const scheme = fc.oneof(fc.constantFrom('http', 'https', 'HTTP', 'hTtPs', 'ftp', 'javascript', 'file', 'ws', '', 'http ', ' http', 'https+x', 'h\ttp'), fc.string({ maxLength: 6 }));
    const separator = fc.constantFrom('://', ':/', ':', ':\\\\', '://\t', ':///', '//', '');
    const hostname = fc.oneof(
      fc.stringMatching(/^[a-z0-9_][a-z0-9_-]{0,20}$/),
      fc.constantFrom('localhost', '127.0.0.1', '2130706433', '0x7f.1', '[::1]', 'a.b', 'user@fn', 'ｆｎ', '%66n', 'fn.', ''),
      fc.string({ maxLength: 12 }),
    );
    const port = fc.option(fc.oneof(fc.integer({ min: 0, max: 70000 }).map(String), fc.string({ maxLength: 4 })), { nil: undefined });
    const path = fc.oneof(fc.constant(''), fc.constantFrom('/', '/base', '/a/../b', '/%2e%2e', '?q=1', '#f'), fc.string({ maxLength: 10 }).map((s) => `/${s}`));
    const url = fc.oneof(
      fc.tuple(scheme, separator, hostname, port, path).map(([s, sep, h, p, rest]) => noNul(`${s}${sep}${h}${p === undefined ? '' : `:${p}`}${rest}`)),
      fc.string({ maxLength: 30 }).map(noNul),
    );
    await fc.assert(fc.asyncProperty(url, expectAgreement), { numRuns: 300 });
  });
});

describe('the CHECK by itself refuses what it must', () => {
  const refused: [string, string | null, string][] = [
    ['http', 'ftp://fn', 'another scheme'],
    ['http', 'FTP://fn', 'another scheme, upper case'],
    ['http', 'javascript:alert(1)', 'a javascript: URL'],
    ['http', 'file:///etc/passwd', 'a file: URL'],
    ['http', ' http://fn', 'leading whitespace'],
    ['http', 'fn:8000', 'no scheme'],
    ['http', null, 'an http row without upstream_url'],
    ['deno', 'ftp://fn', 'a deno row with a non-http upstream_url'],
  ];
  for (const [runtime, upstream, why] of refused) {
    it(`${why}: ${runtime} ${JSON.stringify(upstream)} -> check_violation`, async () => {
      expect(await insert({ runtime, upstream })).toBe('check');
    });
  }

  it('a deno row without upstream_url is accepted (its upstream is EDGE_RUNTIME_URL)', async () => {
    expect(await insert({ runtime: 'deno', upstream: null })).toBe('ok');
  });
});

describe('function names: the CHECK and FUNCTION_NAME are the same rule', () => {
  it('property: a name is accepted by the CHECK exactly when FUNCTION_NAME accepts it', async () => {
    const name = fc.oneof(
      fc.stringMatching(/^[A-Za-z0-9_-]{1,130}$/),
      fc.string({ maxLength: 12 }).map((s) => s.replace(/\u0000/g, '')),
      fc.constantFrom('a.b', 'a/b', 'a b', 'ä', 'a\n', '\na', 'fn;x', '%2e', '..', 'x'.repeat(128), 'x'.repeat(129)),
    );
    await fc.assert(
      fc.asyncProperty(name, async (candidate) => {
        const outcome = await insert({ name: candidate, upstream: 'http://fn' }).catch((err: { code?: string }) => {
          // an empty or duplicate-looking name may trip other constraints; only CHECKs matter here
          if (err.code === '23505') return 'dup' as const;
          throw err;
        });
        if (outcome === 'dup') return;
        expect(outcome === 'ok', JSON.stringify(candidate)).toBe(FUNCTION_NAME.test(candidate));
      }),
      { numRuns: 300 },
    );
  });
});
