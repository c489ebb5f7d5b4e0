/**
 * Header tricks end to end through the Node listener, as separate header lines on the
 * wire: duplicated credentials, x-pgstack-* in every spelling, forwarding headers (with and
 * without a trusted proxy) and Host values that would steer the adapter's URL.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { TestGateway } from '../support/gateway.ts';
import { sendRequest } from '../support/raw-http.ts';
import { expectError, expectIdentityLines, readEcho, startSecurityHost, type SecurityHost } from '../support/security-host.ts';

let host: SecurityHost;
let user: string;
let service: string;
let anon: string;

beforeAll(async () => {
  host = await startSecurityHost();
  user = await host.token('authenticated', 'user-1');
  service = await host.token('service_role', 'svc-1');
  anon = await host.token('anon');
});
afterAll(async () => {
  expect(host?.canary.hits() ?? 0, 'the canary was reached').toBe(0);
  await host?.close();
});
beforeEach(async () => {
  await host.drain();
});

describe('duplicated credentials (separate header lines; the listener joins them)', () => {
  const cases: [string, () => [string, string][]][] = [
    ['two Authorization lines (user, then service)', () => [['Authorization', `Bearer ${user}`], ['Authorization', `Bearer ${service}`]]],
    ['two Authorization lines (service, then an anon key)', () => [['Authorization', `Bearer ${service}`], ['authorization', `Bearer ${anon}`]]],
    ['two identical Authorization lines', () => [['Authorization', `Bearer ${user}`], ['Authorization', `Bearer ${user}`]]],
    ['two apikey lines beside a good Bearer', () => [['Authorization', `Bearer ${user}`], ['apikey', service], ['apikey', anon]]],
    ['two apikey lines alone', () => [['apikey', service], ['APIKEY', anon]]],
  ];
  for (const [name, lines] of cases) {
    it(`${name} -> 401 ambiguous_credentials on a verify_jwt function; upstream untouched`, async () => {
      await expectError(await host.request('/functions/v1/secure', { headers: lines() }), 401, 'ambiguous_credentials');
      expect(await host.drain()).toEqual([]);
    });

    it(`${name} -> anon on a verify_jwt=false function, never the first token's identity`, async () => {
      const echo = await readEcho(await host.request('/functions/v1/open', { headers: lines() }));
      expect(echo.role).toBe('anon');
      expect(echo.sub).toBe('');
      expect(echo.claims).toBeNull();
      const [seen] = await host.drain();
      expectIdentityLines(seen?.headers ?? [], 'anon', '');
    });
  }
});

describe('x-pgstack-* in any spelling never reaches the upstream', () => {
  const spellings: [string, string][] = [
    ['X-Pgstack-Role', 'service_role'],
    ['x-pgstack-role', 'service_role'],
    ['X-PGSTACK-ROLE', 'service_role'],
    ['X_Pgstack_Role', 'service_role'],
    ['x_pgstack_role', 'service_role'],
    ['X_PGSTACK-ROLE', 'service_role'],
    ['X-Pgstack_Role', 'service_role'],
    ['x-pgstack-sub', 'evil'],
    ['X_Pgstack_Sub', 'evil'],
    ['x_PGSTACK_sub', 'evil'],
    ['X-Pgstack-Claims', '{"role":"service_role","sub":"evil"}'],
    ['X_Pgstack_Claims', '{"role":"service_role"}'],
    ['x-pgstack-role', 'authenticated'],
    ['x-pgstack-anything', '1'],
    ['X_Pgstack_Other', '2'],
    ['Connection', 'X-Pgstack-Role, X_Pgstack_Sub, x-pgstack-claims'],
  ];

  it('anon on open: exactly the gateway anon identity, once', async () => {
    const echo = await readEcho(await host.request('/functions/v1/open', { headers: spellings }));
    expect(echo.role).toBe('anon');
    const [seen] = await host.drain();
    expectIdentityLines(seen?.headers ?? [], 'anon', '');
    expect((seen?.headers ?? []).filter(([n]) => n.toLowerCase() === 'x-pgstack-claims')).toEqual([]);
  });

  it('a user on secure: exactly the verified identity, once, also when Connection names the identity headers', async () => {
    const echo = await readEcho(await host.request('/functions/v1/secure', { headers: [...spellings, ['Authorization', `Bearer ${user}`]] }));
    expect(echo.role).toBe('authenticated');
    expect(echo.sub).toBe('user-1');
    const [seen] = await host.drain();
    expectIdentityLines(seen?.headers ?? [], 'authenticated', 'user-1');
    const claims = (seen?.headers ?? []).filter(([n]) => n.toLowerCase() === 'x-pgstack-claims');
    expect(claims).toHaveLength(1);
    expect(JSON.parse(claims[0]?.[1] ?? '{}')).toMatchObject({ role: 'authenticated', sub: 'user-1' });
  });
});

describe('forwarding headers', () => {
  const forged: [string, string][] = [
    ['X-Forwarded-For', '198.51.100.9'],
    ['X-Forwarded-For', '198.51.100.10'],
    ['Forwarded', 'for=198.51.100.9;proto=https;host=evil.example'],
    ['X-Real-IP', '198.51.100.9'],
    ['X-Forwarded-Host', 'evil.example'],
    ['X-Forwarded-Proto', 'https'],
    ['X_Forwarded_For', '198.51.100.11'],
    ['True-Client-IP', '198.51.100.12'],
    ['CF-Connecting-IP', '198.51.100.13'],
  ];
  // What other proxies use to tell scheme, client, host, URL or user (Rack, IIS, Envoy, CDNs).
  const alsoForged: [string, string][] = [
    ['X-Forwarded-Ssl', 'on'],
    ['X-Forwarded-Scheme', 'https'],
    ['X-Forwarded-User', 'admin'],
    ['X-Forwarded-Uri', '/admin'],
    ['Front-End-Https', 'on'],
    ['X-Url-Scheme', 'https'],
    ['X-Scheme', 'https'],
    ['X-Original-Host', 'evil.example'],
    ['X-Host', 'evil.example'],
    ['X-Original-URL', '/admin'],
    ['X-Rewrite-URL', '/admin'],
    ['X-Cluster-Client-IP', '198.51.100.14'],
    ['Client-IP', '198.51.100.15'],
    ['Fastly-Client-IP', '198.51.100.16'],
    ['X-Envoy-External-Address', '198.51.100.17'],
  ];

  it("from an untrusted peer: replaced by the gateway's own", async () => {
    const echo = await readEcho(await host.request('/functions/v1/open', { headers: forged }));
    expect(echo.headers['x-forwarded-for']).toEqual(['127.0.0.1']);
    expect(echo.headers['x-forwarded-proto']).toEqual(['http']);
    expect(echo.headers['x-forwarded-host']).toEqual([`127.0.0.1:${host.port}`]);
    for (const name of ['forwarded', 'x-real-ip', 'x_forwarded_for', 'true-client-ip', 'cf-connecting-ip']) expect(echo.headers[name], name).toBeUndefined();
  });

  it('from an untrusted peer: the other proxies\' scheme, client, host, URL and user headers never reach the function', async () => {
    const echo = await readEcho(await host.request('/functions/v1/open', { headers: alsoForged }));
    for (const [name] of alsoForged) expect(echo.headers[name.toLowerCase()], name).toBeUndefined();
    expect(echo.headers['x-forwarded-proto']).toEqual(['http']);
  });

  describe('from a trusted proxy (TRUSTED_PROXIES=127.0.0.1/32)', () => {
    let trusted: TestGateway;
    beforeAll(async () => {
      trusted = await host.another({ TRUSTED_PROXIES: '127.0.0.1/32' });
    });

    it("the client's X-Forwarded-For is kept and extended with the peer; its proto and host are kept", async () => {
      const echo = await readEcho(await sendRequest(trusted.port, '/functions/v1/open', { headers: forged }));
      expect(echo.headers['x-forwarded-for']).toEqual(['198.51.100.9, 198.51.100.10, 127.0.0.1']);
      expect(echo.headers['x-forwarded-proto']).toEqual(['https']);
      expect(echo.headers['x-forwarded-host']).toEqual(['evil.example']);
      // Underscore spellings are never a forwarding header, trusted or not.
      expect(echo.headers['x_forwarded_for']).toBeUndefined();
    });

    it('identity headers are still the gateway\'s: trust covers forwarding headers only', async () => {
      const echo = await readEcho(await sendRequest(trusted.port, '/functions/v1/open', { headers: [...forged, ['X-Pgstack-Role', 'service_role']] }));
      expect(echo.role).toBe('anon');
      expect(echo.headers['x-pgstack-role']).toEqual(['anon']);
    });
  });
});

describe('Host', () => {
  const bad = ['evil/healthz#', 'a@b', 'x/functions/v1/open?', '[', 'a b', 'x, y', 'x:80:81', 'x:999999'];
  for (const value of bad) {
    it(`Host: ${JSON.stringify(value)} -> 400 bad_request, not 500, not another route`, async () => {
      await expectError(await host.request('/functions/v1/open', { headers: { Host: value } }), 400, 'bad_request');
      expect(await host.drain()).toEqual([]);
    });
  }

  it('two Host lines -> 400', async () => {
    const res = await host.request('/functions/v1/open', { headers: [['Host', 'a'], ['Host', 'b']] });
    expect(res.status).toBe(400);
    expect(await host.drain()).toEqual([]);
  });

  it('a Host naming the canary only changes X-Forwarded-Host, never where the request goes', async () => {
    const echo = await readEcho(await host.request('/functions/v1/open', { headers: { Host: `127.0.0.1:${host.canary.port}` } }));
    expect(echo.headers['x-forwarded-host']).toEqual([`127.0.0.1:${host.canary.port}`]);
    expect(echo.headers['host']).toEqual([`echo:${host.echo.port}`]);
  });

  it('HTTP/1.0 without Host, and absolute-form targets glued to a missing Host, are never 500', async () => {
    const noHost = await host.raw('GET /functions/v1/open HTTP/1.0\r\n\r\n');
    expect(noHost.responses.map((r) => r.status)).toEqual([200]);
    const glued = await host.raw(`GET http://127.0.0.1:${host.canary.port}/functions/v1/open HTTP/1.0\r\n\r\n`);
    expect(glued.responses.map((r) => r.status)).toEqual([400]);
    expect((await host.drain()).map((r) => r.target)).toEqual(['/functions/v1/open']);
  });
});
