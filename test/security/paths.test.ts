/**
 * Path tricks and redirects through the real listener. Two promises: no request target can
 * change the upstream's host or port (the echo is the only server that can receive
 * anything; a canary on another port must receive nothing), and no spelling reaches a
 * verify_jwt=false function's upstream while naming (to any lenient upstream) a verify_jwt one.
 */
import dns from 'node:dns/promises';
import os from 'node:os';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { isBlockedAddress } from '../../adapters/node/blocked-addresses.ts';
import { eventually } from '../support/gateway.ts';
import { FUNCTIONS, readEcho, startSecurityHost, type SecurityHost } from '../support/security-host.ts';

let host: SecurityHost;
let user: string;
let C: number; // the canary's port

beforeAll(async () => {
  host = await startSecurityHost();
  user = await host.token('authenticated', 'user-1');
  C = host.canary.port;
});
afterAll(async () => {
  expect(host?.canary.hits() ?? 0, 'the canary was reached').toBe(0);
  await host?.close();
});
beforeEach(async () => {
  await host.drain();
});

const VERIFY = new Map(FUNCTIONS.map(([name, verify]) => [name, verify]));

/**
 * The function name a lenient upstream could route a target to: percent-decodes dots and
 * separators, reads `\` as `/`, strips `;params`, resolves dot segments. A target the
 * gateway forwards must still name the function it authorized, read this way.
 */
function lenientFunction(target: string): string | undefined {
  // The most lenient upstream we defend against: percent-decodes every escape once, treats
  // `\` as `/`, strips `;params` (Tomcat, Jetty), truncates at NUL, then resolves dot segments.
  const decoded = (target.split('?', 1)[0] ?? '').replace(/%([0-9a-fA-F]{2})/g, (_, h: string) => String.fromCharCode(parseInt(h, 16)));
  const out: string[] = [];
  for (const raw of decoded.split(/[/\\]/).slice(1)) {
    const segment = raw.split(/[;\0?#]/, 1)[0] ?? '';
    if (segment === '..') out.pop();
    else if (segment !== '.') out.push(segment);
  }
  return out[0] === 'functions' && out[1] === 'v1' ? out[2] : undefined;
}

describe('targets that are forwarded: to the echo, byte for byte, never elsewhere', () => {
  const forwarded = () => [
    `/functions/v1/fn//127.0.0.1:${C}/x`,
    `/functions/v1/fn/@127.0.0.1:${C}/x`,
    `/functions/v1/fn/@evil/x`,
    `/functions/v1/fn/http://127.0.0.1:${C}/x`,
    `/functions/v1/fn/%2F%2F127.0.0.1:${C}`,
    `/functions/v1/fn?next=http://127.0.0.1:${C}/&u=//127.0.0.1:${C}`,
    `/functions/v1/fn/a;b=1/c`,
    `/functions/v1/fn/...`,
  ];
  it('each reaches the echo once with the exact target, and the canary never', async () => {
    for (const target of forwarded()) {
      const echo = await readEcho(await host.request(target));
      expect(echo.path).toBe(target);
      expect(echo.function).toBe('fn');
      expect((await host.drain()).map((r) => r.target)).toEqual([target]);
    }
    expect(host.canary.hits()).toBe(0);
  });
});

describe("targets that could reach another function's upstream with secure's rules skipped", () => {
  const refused: [string, number, string][] = [
    ['/functions/v1/fn/..%2f..%2fother', 400, 'bad_path'],
    ['/functions/v1/fn/..%2fother', 400, 'bad_path'],
    ['/functions/v1/fn/%2e%2e/other', 400, 'bad_path'],
    ['/functions/v1/fn/%2E%2E', 400, 'bad_path'],
    ['/functions/v1/fn/.%2e/other', 400, 'bad_path'],
    ['/functions/v1/fn/../other', 400, 'bad_path'],
    ['/functions/v1/fn/..;/other', 400, 'bad_path'],
    ['/functions/v1/fn/..%5cother', 400, 'bad_path'],
    ['/functions/v1/fn\\..\\other', 400, 'bad_path'],
    ['/functions/v1/secure/%2e%2e/open', 400, 'bad_path'],
    ['/functions/v1/secure/..\\open', 400, 'bad_path'],
    ['/functions/v1/open/..%2fsecure', 400, 'bad_path'],
    ['/functions/v1/open/x/..%2f..%2fsecure', 400, 'bad_path'],
    ['/functions/v1/secure%2f..%2fopen', 400, 'bad_path'],
    ['/functions/v1/Secure', 404, 'function_not_found'],
    ['/functions/v1/SECURE', 404, 'function_not_found'],
    ['/functions/v1//secure', 404, 'function_not_found'],
    ['/functions/v1/secure;x=1', 404, 'function_not_found'],
    ['/functions/v1/secure/', 401, 'credentials_required'],
    ['/functions/v1/secure//', 401, 'credentials_required'],
    ['/functions/v1/secure/./', 400, 'bad_path'],
    ['/functions/v1/secure?x=/../open', 401, 'credentials_required'],
  ];
  for (const [target, status, code] of refused) {
    it(`${target} -> ${status} ${code}, nothing forwarded`, async () => {
      const res = await host.request(target);
      const text = await res.text();
      expect(res.status, text).toBe(status);
      // Node's own parser may refuse first (plain 400); otherwise it is the gateway's code.
      if (res.headers.get('x-relay-error') === 'true') expect((JSON.parse(text) as { code: string }).code).toBe(code);
      expect(await host.drain()).toEqual([]);
    });
  }

  it('/functions/v1/secure/ with a token is secure, served as secure', async () => {
    const echo = await readEcho(await host.request('/functions/v1/secure/', { headers: { authorization: `Bearer ${user}` } }));
    expect(echo.function).toBe('secure');
    expect(echo.role).toBe('authenticated');
  });

  const absolute = () => [
    `GET http://evil:1/functions/v1/open HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
    `GET http://127.0.0.1:${C}/functions/v1/open HTTP/1.1\r\nHost: 127.0.0.1:${C}\r\nConnection: close\r\n\r\n`,
    `GET http://127.0.0.1:${C}/functions/v1/secure HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
    `GET //127.0.0.1:${C}/functions/v1/open HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`,
  ];
  it('absolute-form and scheme-relative targets are refused (4xx), never forwarded', async () => {
    for (const bytes of absolute()) {
      const result = await host.raw(bytes);
      expect(result.responses.length, bytes).toBe(1);
      const status = result.responses[0]?.status ?? 0;
      expect(status >= 400 && status < 500, `${bytes.split('\r\n')[0]} -> ${status}`).toBe(true);
    }
    expect(await host.drain()).toEqual([]);
  });

  it('property: an anon caller never gets a request forwarded whose target a lenient upstream reads as a verify_jwt function', async () => {
    const tricks = ['..', '.', '%2e%2e', '%2E.', '.%2e', '..%2f', '..%2F', '%2e%2e%2f', '.%2e%5c', '..\\', '%2f', '..;', ';x=1', '%3b', '%3B', '..%3b', '%00', '%3f', '%23', '%2e%2e%3Bx'];
    const names = ['secure', 'other', 'secure', 'other', 'open', 'Secure', 'a', '', '@evil', `127.0.0.1:${C}`];
    const piece = fc.oneof({ arbitrary: fc.constantFrom(...tricks), weight: 3 }, { arbitrary: fc.constantFrom(...names), weight: 2 });
    const segment = fc.array(piece, { minLength: 1, maxLength: 4 }).map((p) => p.join(''));
    const target = fc.tuple(fc.constantFrom('open', 'fn', 'secure', 'other'), fc.array(segment, { maxLength: 4 }), fc.boolean()).map(
      ([name, rest, query]) => `/functions/v1/${name}${rest.map((s) => `/${s}`).join('')}${query ? '?q=../secure' : ''}`,
    );
    await fc.assert(
      fc.asyncProperty(target, async (t) => {
        const res = await host.request(t);
        await res.text();
        expect(res.status, t).not.toBe(500);
        // The gateway answered: whatever it forwarded, the echo has recorded.
        const seen = await host.drain(0);
        if (res.status !== 200) {
          expect(seen, t).toEqual([]);
          return;
        }
        expect(seen.map((r) => r.target)).toEqual([t]);
        const named = lenientFunction(t);
        expect(named === undefined || VERIFY.get(named) !== true, `${t} reached the upstream as anon but reads as ${named}`).toBe(true);
      }),
      { numRuns: 300 },
    );
    expect(host.canary.hits()).toBe(0);
  });
});

describe('redirects from the upstream', () => {
  for (const method of ['GET', 'POST', 'PUT'] as const) {
    it(`${method}: a 302 to the canary is relayed to the client, never followed`, async () => {
      const res = await host.request('/functions/v1/redirect', { method, ...(method === 'GET' ? {} : { body: 'payload' }) });
      expect(res.status).toBe(302);
      expect(res.headers.get('location')).toBe(`http://127.0.0.1:${C}/stolen`);
      expect(res.headers.get('x-relay-error')).toBeNull();
      expect((await host.drain()).map((r) => `${r.method} ${r.target}`)).toEqual([`${method} /functions/v1/redirect`]);
      await new Promise((r) => setTimeout(r, 100));
      expect(host.canary.hits()).toBe(0);
    });
  }
});

describe('connect-time address checks, end to end', () => {
  const register = async (name: string, upstream: string) => {
    await host.db.sql('INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ($1, $2, false, $3)', [name, 'http', upstream]);
    await eventually(() => host.gw.catalog.current()?.functions.has(name) ?? false, 5_000, 5);
  };

  it("a bare name the operator did not map, resolving to loopback (this machine's own hostname), is 502 upstream_blocked", async (ctx) => {
    const name = os.hostname().toLowerCase();
    const addresses = /^[a-z0-9_][a-z0-9_-]{0,62}$/.test(name) && name !== 'echo' ? await dns.lookup(name, { all: true }).catch(() => []) : [];
    if (!addresses.some((a) => isBlockedAddress(a.address))) ctx.skip();
    await register('own-host', `http://${name}:${host.echo.port}`);
    const res = await host.request('/functions/v1/own-host');
    expect(res.status).toBe(502);
    expect(((await res.json()) as { code: string }).code).toBe('upstream_blocked');
    expect(await host.drain()).toEqual([]);
  });

  it('rows the validator refuses (IP literals, dotted names, localhost) are 404, never dialled', async () => {
    for (const [name, upstream] of [
      ['lit', `http://127.0.0.1:${C}`],
      ['dec', 'http://2130706433'],
      ['dotted', `http://canary.local:${C}`],
      ['loopback-name', `http://localhost:${C}`],
    ] as const) {
      await host.db.sql('INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ($1, $2, false, $3)', [name, 'http', upstream]);
    }
    await eventually(() => (host.gw.catalog.current()?.dropped.length ?? 0) >= 4, 5_000, 5);
    for (const name of ['lit', 'dec', 'dotted', 'loopback-name']) {
      const res = await host.request(`/functions/v1/${name}`);
      expect(res.status, name).toBe(404);
      await res.text();
    }
    expect(host.canary.hits()).toBe(0);
  });
});
