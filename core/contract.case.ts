/**
 * The gateway's behaviour, written once and run against every host (STYLE 7): core in
 * memory (core/gateway.test.ts), the Node listener over real HTTP, and workerd. A host's
 * test file calls `contractSuite(name, setup)`; the cases below are the contract of
 * DESIGN sections 3, 4 and 6 as a client and a function see it.
 *
 * This file imports only vitest, jose and core: it must load in any host's test runner.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SignJWT, type JWTPayload } from 'jose';
import { parseIp } from './addresses.ts';
import { ERROR_CODES, type ErrorCode } from './errors.ts';

/**
 * One host under test. What the host must be set up with:
 *
 * - Catalog: `open` (verify_jwt=false), `secure` (verify_jwt=true) and `fails`
 *   (verify_jwt=false), all three proxying to the ECHO upstream below. No other function.
 * - Keys: only the HS256 `secret` below (no JWKS), default leeway, no issuer/audience.
 * - Limits: maxBodyBytes exactly 1 MiB (1048576); default token limit (8 KiB).
 * - No trusted proxies: the client's forwarding headers are never trusted.
 *
 * The ECHO upstream (the examples/functions echo shape) answers every request whose
 * path's function segment (`/functions/v1/{segment}/...`) is not `fails` with 200,
 * `content-type: application/json` and the body
 *   {"function": segment, "method", "path": the raw request target as received (path and
 *    query, never decoded or cleaned), "role": first X-Pgstack-Role or null, "sub": first
 *    X-Pgstack-Sub or null, "claims": X-Pgstack-Claims parsed as JSON or null,
 *    "headers": {lowercased name: [every value received, one entry per header line]},
 *    "body": the request body as UTF-8 text, "bodyBytes": its length in bytes, "runtime"}
 * (no body for HEAD). For segment `fails` it answers 503 with body `{"own":"error"}`,
 * `content-type: application/json`, and no `x-relay-error` header.
 *
 * `request` must send exactly what it is given: the path byte for byte (no URL
 * normalisation of `..`, `%2e` or `\`, so not through WHATWG URL / fetch() on a real
 * socket), every header line as given (duplicates and hop-by-hop headers included).
 */
export interface ContractHost {
  /**
   * Sends a request to the host under test; `path` is a raw request target like
   * '/functions/v1/open?x=1'; `init` as for fetch. For the in-memory host this is
   * gateway.fetch(new Request('http://gateway.test' + path, init), { rawTarget: path, clientAddress: '203.0.113.7' }).
   */
  request(path: string, init?: RequestInit & { headers?: Record<string, string> | [string, string][] }): Promise<Response>;
  /** HS256 secret the host verifies with. */
  secret: string;
}

/** The echo upstream's answer (see ContractHost). */
export interface Echo {
  function: string;
  method: string;
  path: string;
  role: string | null;
  sub: string | null;
  claims: Record<string, unknown> | null;
  headers: Record<string, string[]>;
  body: string;
  bodyBytes: number;
  runtime: string;
}

const MiB = 1024 * 1024;
const IDENTITY_HEADERS = ['x-pgstack-role', 'x-pgstack-sub', 'x-pgstack-claims'];
const PROXY_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'];
const canonical = (name: string) => name.toLowerCase().replace(/_/g, '-');

async function readEcho(res: Response): Promise<Echo> {
  const text = await res.text();
  expect(res.status, `expected the echo's 200, got ${res.status}: ${text}`).toBe(200);
  expect(res.headers.get('x-relay-error')).toBeNull();
  return JSON.parse(text) as Echo;
}

/** Asserts a gateway-made error: status, code, JSON {code, message}, x-relay-error, CORS. */
async function expectGatewayError(res: Response, code: ErrorCode): Promise<void> {
  const text = await res.text();
  expect(res.status, text).toBe(ERROR_CODES[code].status);
  const body = JSON.parse(text) as Record<string, unknown>;
  expect(Object.keys(body).sort()).toEqual(['code', 'message']);
  expect(body['code']).toBe(code);
  expect(typeof body['message']).toBe('string');
  expect((body['message'] as string).length).toBeGreaterThan(0);
  expect(res.headers.get('content-type')).toMatch(/^application\/json/);
  expect(res.headers.get('x-relay-error')).toBe('true');
  expect(res.headers.get('access-control-allow-origin')).toBe('*');
}

/** The single value of a header at the upstream (asserting there is exactly one). */
function only(echo: Echo, name: string): string {
  const values = echo.headers[name];
  expect(values, `upstream header ${name}`).toBeDefined();
  expect(values, `upstream header ${name}`).toHaveLength(1);
  return (values as string[])[0] as string;
}

/** The upstream saw exactly the gateway's identity headers, with these values. */
function expectIdentity(echo: Echo, role: string, sub: string, claims: JWTPayload | null): void {
  for (const name of Object.keys(echo.headers)) {
    if (canonical(name).startsWith('x-pgstack-')) expect(IDENTITY_HEADERS, `unexpected upstream header ${name}`).toContain(name);
  }
  expect(only(echo, 'x-pgstack-role')).toBe(role);
  expect(only(echo, 'x-pgstack-sub')).toBe(sub);
  expect(echo.role).toBe(role);
  expect(echo.sub).toBe(sub);
  if (claims === null) {
    expect(echo.headers['x-pgstack-claims']).toBeUndefined();
    expect(echo.claims).toBeNull();
  } else {
    const header = only(echo, 'x-pgstack-claims');
    expect(header).toMatch(/^[\x20-\x7e]*$/);
    expect(JSON.parse(header)).toEqual(claims);
    expect(echo.claims).toEqual(claims);
  }
}

const nowSec = () => Math.floor(Date.now() / 1000);

async function sign(payload: JWTPayload, secret: string): Promise<string> {
  return new SignJWT(payload).setProtectedHeader({ alg: 'HS256', typ: 'JWT' }).sign(new TextEncoder().encode(secret));
}

interface Tokens {
  claims: Record<string, JWTPayload>;
  jwt: Record<string, string>;
}

async function mintTokens(secret: string): Promise<Tokens> {
  const iat = nowSec();
  const exp = iat + 3600;
  const claims: Record<string, JWTPayload> = {
    user: { role: 'authenticated', sub: 'user-1', aud: 'authenticated', email: 'u@example.com', iat, exp },
    serviceSub: { role: 'service_role', sub: 'svc-1', iss: 'supabase', iat, exp },
    service: { role: 'service_role', iss: 'supabase', iat, exp },
    anon: { role: 'anon', iss: 'supabase', iat, exp },
    expired: { role: 'authenticated', sub: 'user-1', iat: iat - 7200, exp: iat - 3600 },
    postgres: { role: 'postgres', sub: 'user-1', iat, exp },
    capitalised: { role: 'Authenticated', sub: 'user-1', iat, exp },
    trailingSpace: { role: 'authenticated ', sub: 'user-1', iat, exp },
    arrayRole: { role: ['authenticated'], sub: 'user-1', iat, exp },
    wild: {
      role: 'authenticated',
      sub: 'user-2',
      'naïve ключ 名前': 'valüe ✓ Ωmega',
      emoji: '😀👩‍👩‍👧🏳️‍🌈',
      quotes: 'say "hi" \'there\'',
      backslashes: 'C:\\dir\\file \\u0041 \\\\',
      control: 'a\u0001b\nc\r\td\u007f\u0000e\u2028f',
      long: 'L'.repeat(3000),
      nested: { list: [1, 2.5, null, true, { deep: 'ü' }], empty: {} },
      iat,
      exp,
    },
  };
  const jwt: Record<string, string> = {};
  for (const [name, payload] of Object.entries(claims)) jwt[name] = await sign(payload, secret);
  jwt['wrongSignature'] = await sign(claims['user'] as JWTPayload, `${secret}-but-not-quite`);
  jwt['foreign'] = await sign({ iss: 'https://webhooks.example', event: 'push', iat, exp }, 'a-webhook-provider-secret-0123456789');
  return { claims, jwt };
}

type Expected = { role: string; sub: string; claims: string | null } | { status: 401; code: ErrorCode };

interface RoleCase {
  name: string;
  headers: (t: Tokens) => Record<string, string>;
  open: Expected;
  secure: Expected;
}

const anonymous: Expected = { role: 'anon', sub: '', claims: null };

/** DESIGN section 4: credentials -> (role, sub, claims) on verify_jwt=false and =true. */
const ROLE_TABLE: RoleCase[] = [
  {
    name: 'a valid authenticated JWT with sub',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['user']}` }),
    open: { role: 'authenticated', sub: 'user-1', claims: 'user' },
    secure: { role: 'authenticated', sub: 'user-1', claims: 'user' },
  },
  {
    name: 'a signed-in supabase-js call (user JWT as Bearer, anon key as apikey)',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['user']}`, apikey: t.jwt['anon'] as string }),
    open: { role: 'authenticated', sub: 'user-1', claims: 'user' },
    secure: { role: 'authenticated', sub: 'user-1', claims: 'user' },
  },
  {
    name: 'a service_role JWT with sub',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['serviceSub']}` }),
    open: { role: 'service_role', sub: 'svc-1', claims: 'serviceSub' },
    secure: { role: 'service_role', sub: 'svc-1', claims: 'serviceSub' },
  },
  {
    name: 'a service_role JWT without sub',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['service']}`, apikey: t.jwt['service'] as string }),
    open: { role: 'service_role', sub: '', claims: 'service' },
    secure: { role: 'service_role', sub: '', claims: 'service' },
  },
  {
    name: 'the anon key only, via apikey',
    headers: (t) => ({ apikey: t.jwt['anon'] as string }),
    open: { role: 'anon', sub: '', claims: 'anon' },
    secure: { status: 401, code: 'credentials_required' },
  },
  {
    name: 'the anon key as Bearer and apikey (supabase-js signed out)',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['anon']}`, apikey: t.jwt['anon'] as string }),
    open: { role: 'anon', sub: '', claims: 'anon' },
    secure: { status: 401, code: 'credentials_required' },
  },
  {
    name: 'no credentials',
    headers: () => ({}),
    open: anonymous,
    secure: { status: 401, code: 'credentials_required' },
  },
  {
    name: 'an expired JWT',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['expired']}` }),
    open: anonymous,
    secure: { status: 401, code: 'token_expired' },
  },
  {
    name: 'a JWT with a wrong signature',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['wrongSignature']}` }),
    open: anonymous,
    secure: { status: 401, code: 'invalid_token' },
  },
  {
    name: 'a bearer that is not a JWT',
    headers: () => ({ authorization: 'Bearer not-a-jwt' }),
    open: anonymous,
    secure: { status: 401, code: 'invalid_token' },
  },
  {
    name: "a foreign service's token (a webhook's own)",
    headers: (t) => ({ authorization: `Bearer ${t.jwt['foreign']}` }),
    open: anonymous,
    secure: { status: 401, code: 'invalid_token' },
  },
  {
    name: 'role "postgres"',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['postgres']}` }),
    open: anonymous,
    secure: { status: 401, code: 'invalid_role' },
  },
  {
    name: 'role "postgres" via apikey',
    headers: (t) => ({ apikey: t.jwt['postgres'] as string }),
    open: anonymous,
    secure: { status: 401, code: 'invalid_role' },
  },
  {
    name: 'role "Authenticated"',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['capitalised']}` }),
    open: anonymous,
    secure: { status: 401, code: 'invalid_role' },
  },
  {
    name: 'role "authenticated " (trailing space)',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['trailingSpace']}` }),
    open: anonymous,
    secure: { status: 401, code: 'invalid_role' },
  },
  {
    name: 'role ["authenticated"] (an array)',
    headers: (t) => ({ authorization: `Bearer ${t.jwt['arrayRole']}` }),
    open: anonymous,
    secure: { status: 401, code: 'invalid_role' },
  },
];

export function contractSuite(hostName: string, setup: () => Promise<ContractHost & { close(): Promise<void> }>): void {
  describe(`gateway contract (${hostName})`, () => {
    let host: ContractHost & { close(): Promise<void> };
    let t: Tokens;
    const bearer = (name: string) => `Bearer ${t.jwt[name]}`;

    beforeAll(async () => {
      host = await setup();
      t = await mintTokens(host.secret);
    });
    afterAll(async () => {
      await host?.close();
    });

    describe('identity: DESIGN section 4 role table', () => {
      for (const row of ROLE_TABLE) {
        for (const fn of ['open', 'secure'] as const) {
          const expected = row[fn];
          const outcome = 'status' in expected ? `401 ${expected.code}` : `${expected.role}, sub "${expected.sub}"`;
          it(`${row.name} on ${fn} (verify_jwt=${fn === 'secure'}) -> ${outcome}`, async () => {
            const headers = row.headers(t);
            const res = await host.request(`/functions/v1/${fn}`, { headers });
            if ('status' in expected) {
              await expectGatewayError(res, expected.code);
              return;
            }
            const echo = await readEcho(res);
            expect(echo.function).toBe(fn);
            expectIdentity(echo, expected.role, expected.sub, expected.claims === null ? null : (t.claims[expected.claims] as JWTPayload));
            // Credentials always reach the function unchanged, valid or not.
            if (headers.authorization !== undefined) expect(echo.headers['authorization']).toEqual([headers.authorization]);
            if (headers.apikey !== undefined) expect(echo.headers['apikey']).toEqual([headers.apikey]);
          });
        }
      }

      it('a lowercase "bearer" scheme is accepted on secure', async () => {
        const echo = await readEcho(await host.request('/functions/v1/secure', { headers: { authorization: `bearer ${t.jwt['user']}` } }));
        expectIdentity(echo, 'authenticated', 'user-1', t.claims['user'] as JWTPayload);
      });

      it('Authorization: Basic on secure -> 401 invalid_token', async () => {
        await expectGatewayError(await host.request('/functions/v1/secure', { headers: { authorization: 'Basic xyz' } }), 'invalid_token');
      });

      it('Authorization: Basic on open -> anon, and the function still reads Authorization', async () => {
        const echo = await readEcho(await host.request('/functions/v1/open', { headers: { authorization: 'Basic xyz' } }));
        expectIdentity(echo, 'anon', '', null);
        expect(echo.headers['authorization']).toEqual(['Basic xyz']);
      });

      it('a Bearer token over 8 KiB on secure -> 431 token_too_large', async () => {
        const huge = `eyJ${'a'.repeat(9000)}.eyJ${'b'.repeat(100)}.${'c'.repeat(43)}`;
        await expectGatewayError(await host.request('/functions/v1/secure', { headers: { authorization: `Bearer ${huge}` } }), 'token_too_large');
      });

      it('a credential over 8 KiB on open is 431 too: never read, so never downgraded to anon nor forwarded', async () => {
        const huge = `eyJ${'a'.repeat(9000)}.eyJ${'b'.repeat(100)}.${'c'.repeat(43)}`;
        await expectGatewayError(await host.request('/functions/v1/open', { headers: { authorization: `Bearer ${huge}` } }), 'token_too_large');
        await expectGatewayError(await host.request('/functions/v1/open', { headers: { apikey: huge } }), 'token_too_large');
      });

      it('two Authorization lines -> 401 ambiguous_credentials on secure, never the first token', async () => {
        const headers: [string, string][] = [
          ['Authorization', bearer('user')],
          ['Authorization', bearer('serviceSub')],
        ];
        await expectGatewayError(await host.request('/functions/v1/secure', { headers }), 'ambiguous_credentials');
        const echo = await readEcho(await host.request('/functions/v1/open', { headers }));
        expectIdentity(echo, 'anon', '', null);
      });

      it('two apikey lines -> 401 ambiguous_credentials on secure, also beside a good Bearer', async () => {
        const headers: [string, string][] = [
          ['Authorization', bearer('user')],
          ['apikey', t.jwt['serviceSub'] as string],
          ['apikey', t.jwt['anon'] as string],
        ];
        await expectGatewayError(await host.request('/functions/v1/secure', { headers }), 'ambiguous_credentials');
        await expectGatewayError(await host.request('/functions/v1/secure', { headers: headers.slice(1) }), 'ambiguous_credentials');
      });

      it('X-Pgstack-Claims decodes to exactly the token claims: non-ASCII, emoji, quotes, backslashes, controls, a long string', async () => {
        const echo = await readEcho(await host.request('/functions/v1/secure', { headers: { authorization: bearer('wild') } }));
        expectIdentity(echo, 'authenticated', 'user-2', t.claims['wild'] as JWTPayload);
        expect((echo.claims as Record<string, unknown>)['control']).toBe('a\u0001b\nc\r\td\u007f\u0000e\u2028f');
        expect((echo.claims as Record<string, unknown>)['long']).toHaveLength(3000);
      });
    });

    describe('identity headers cannot be spoofed', () => {
      const spoofed: [string, string][] = [
        ['X-Pgstack-Role', 'service_role'],
        ['x-pgstack-role', 'authenticated'],
        ['x-pgstack-sub', 'evil'],
        ['X-PGSTACK-SUB', 'evil-too'],
        ['X-PGSTACK-CLAIMS', '{"role":"service_role","sub":"evil"}'],
        ['x-pgstack-claims', '{}'],
        ['X_Pgstack_Role', 'service_role'],
        ['x_pgstack_sub', 'evil'],
        ['X_PGSTACK_CLAIMS', '{"role":"service_role"}'],
        ['x-pgstack-anything', '1'],
        ['X-PgStack-Anything', '2'],
        ['x_pgstack_other', '3'],
        ['Connection', 'x-pgstack-role, keep-alive'],
      ];

      it('without credentials: only the gateway anon identity reaches the upstream, once each', async () => {
        const echo = await readEcho(await host.request('/functions/v1/open', { headers: spoofed }));
        expectIdentity(echo, 'anon', '', null);
      });

      it('with a user token: only the verified identity reaches the upstream, once each', async () => {
        const echo = await readEcho(await host.request('/functions/v1/secure', { headers: [...spoofed, ['Authorization', bearer('user')]] }));
        expectIdentity(echo, 'authenticated', 'user-1', t.claims['user'] as JWTPayload);
      });

      it('with a service key without sub: X-Pgstack-Sub is empty, not the spoofed value', async () => {
        const echo = await readEcho(await host.request('/functions/v1/open', { headers: [...spoofed, ['apikey', t.jwt['service'] as string]] }));
        expectIdentity(echo, 'service_role', '', t.claims['service'] as JWTPayload);
      });
    });

    describe('request headers', () => {
      it('hop-by-hop headers and headers named in Connection are stripped', async () => {
        const echo = await readEcho(
          await host.request('/functions/v1/open', {
            headers: [
              ['Connection', 'keep-alive, X-Custom'],
              ['X-Custom', 'drop me'],
              ['X-Kept', 'keep me'],
              ['Keep-Alive', 'timeout=5, max=100'],
              ['TE', 'trailers'],
              ['Trailer', 'X-Checksum'],
              ['Upgrade', 'h2c'],
              ['Proxy-Authorization', 'Basic Zm9vOmJhcg=='],
              ['Proxy-Connection', 'keep-alive'],
            ],
          }),
        );
        for (const name of ['x-custom', 'keep-alive', 'te', 'trailer', 'upgrade', 'proxy-authorization', 'proxy-connection']) {
          expect(echo.headers[name], name).toBeUndefined();
        }
        // The upstream transport may add its own Connection; never the client's.
        for (const value of echo.headers['connection'] ?? []) expect(value.toLowerCase()).not.toContain('x-custom');
        expect(echo.headers['x-kept']).toEqual(['keep me']);
      });

      it('client X-Forwarded-For, Forwarded, X-Real-IP and friends are replaced by the gateway', async () => {
        const echo = await readEcho(
          await host.request('/functions/v1/open', {
            headers: {
              'X-Forwarded-For': '198.51.100.9',
              Forwarded: 'for=198.51.100.9;proto=https',
              'X-Real-IP': '198.51.100.9',
              'X-Forwarded-Host': 'evil.example',
              'X-Forwarded-Proto': 'gopher',
            },
          }),
        );
        expect(echo.headers['forwarded']).toBeUndefined();
        expect(echo.headers['x-real-ip']).toBeUndefined();
        const xff = only(echo, 'x-forwarded-for');
        expect(xff).not.toContain('198.51.100.9');
        for (const hop of xff.split(',')) expect(parseIp(hop.trim()), `x-forwarded-for hop ${hop}`).toBeDefined();
        expect(['http', 'https']).toContain(only(echo, 'x-forwarded-proto'));
        expect(echo.headers['x-forwarded-host'] ?? []).not.toContain('evil.example');
      });

      it('a valid X-Request-Id is forwarded and echoed on the response', async () => {
        const res = await host.request('/functions/v1/open', { headers: { 'X-Request-Id': 'abc-123' } });
        expect(res.headers.get('x-request-id')).toBe('abc-123');
        expect(only(await readEcho(res), 'x-request-id')).toBe('abc-123');
      });

      it.each(['bad id with spaces', '../../etc/passwd', 'a/b', '..', '.', '-rf', '.hidden', `${'x'.repeat(129)}`])('an invalid X-Request-Id (%s) is replaced by a generated one, the same upstream and on the response', async (bad) => {
        const res = await host.request('/functions/v1/open', { headers: { 'X-Request-Id': bad } });
        const echoed = res.headers.get('x-request-id');
        const forwarded = only(await readEcho(res), 'x-request-id');
        expect(forwarded).not.toBe(bad);
        expect(forwarded).toMatch(/^[A-Za-z0-9][A-Za-z0-9._:+=-]{0,127}$/);
        expect(echoed).toBe(forwarded);
      });

      it('Authorization, apikey, content-type, custom headers and the body pass through unchanged', async () => {
        const body = 'héllo wörld ✓ 😀 {"json": true}\n';
        const headers = {
          Authorization: bearer('user'),
          apikey: t.jwt['anon'] as string,
          'Content-Type': 'application/x-custom; charset=utf-8',
          'X-Custom-Thing': 'Value With Case & Symbols !#$%',
          'X-Client-Info': 'supabase-js/2.0.0',
        };
        const echo = await readEcho(await host.request('/functions/v1/secure', { method: 'POST', headers, body }));
        expect(echo.headers['authorization']).toEqual([headers.Authorization]);
        expect(echo.headers['apikey']).toEqual([headers.apikey]);
        expect(echo.headers['content-type']).toEqual([headers['Content-Type']]);
        expect(echo.headers['x-custom-thing']).toEqual([headers['X-Custom-Thing']]);
        expect(echo.headers['x-client-info']).toEqual([headers['X-Client-Info']]);
        expect(echo.body).toBe(body);
        expect(echo.bodyBytes).toBe(new TextEncoder().encode(body).byteLength);
      });
    });

    describe('routes and paths', () => {
      it('path and query reach the upstream byte for byte', async () => {
        const path = '/functions/v1/open/a/b%2Fc?x=%20y&x=2&empty=&%F0%9F%98%80=1';
        const echo = await readEcho(await host.request(path));
        expect(echo.function).toBe('open');
        expect(echo.path).toBe(path);
      });

      it('a trailing slash on secure still requires credentials', async () => {
        await expectGatewayError(await host.request('/functions/v1/secure/'), 'credentials_required');
        const echo = await readEcho(await host.request('/functions/v1/secure/', { headers: { authorization: bearer('user') } }));
        expect(echo.path).toBe('/functions/v1/secure/');
        expect(echo.function).toBe('secure');
      });

      it('function names are case-sensitive: /functions/v1/Secure -> 404 function_not_found', async () => {
        await expectGatewayError(await host.request('/functions/v1/Secure', { headers: { authorization: bearer('user') } }), 'function_not_found');
      });

      it('an unknown function -> 404 function_not_found', async () => {
        await expectGatewayError(await host.request('/functions/v1/nope'), 'function_not_found');
        await expectGatewayError(await host.request('/functions/v1/nope/deeper?x=1'), 'function_not_found');
      });

      const escapes = [
        '/functions/v1/secure/../open',
        '/functions/v1/secure/%2e%2e/open',
        '/functions/v1/secure/%2E%2E/open',
        '/functions/v1/secure/.%2e/open',
        '/functions/v1/secure/%2e./open',
        '/functions/v1/secure/./../open',
        '/functions/v1/secure/..%2fopen',
        '/functions/v1/secure%2f..%2fopen',
        '/functions/v1/secure/..\\open',
        '/functions/v1/secure/a/../../open',
      ];
      for (const path of escapes) {
        it(`${path} never reaches open with secure's rules skipped (400 bad_path or 401 as secure)`, async () => {
          const res = await host.request(path);
          const text = await res.text();
          expect([400, 401], `${res.status} ${text}`).toContain(res.status);
          const code = (JSON.parse(text) as { code: string }).code;
          expect(res.status === 400 ? ['bad_path'] : ['credentials_required']).toContain(code);
          expect(res.headers.get('x-relay-error')).toBe('true');
        });
      }

      for (const method of PROXY_METHODS) {
        it(`${method} is proxied`, async () => {
          const withBody = method === 'POST' || method === 'PUT' || method === 'PATCH';
          const res = await host.request('/functions/v1/open/m', { method, ...(withBody ? { body: `body of ${method}` } : {}) });
          if (method === 'HEAD') {
            expect(res.status).toBe(200);
            expect(res.headers.get('x-relay-error')).toBeNull();
            expect(res.headers.get('content-type')).toMatch(/^application\/json/);
            expect(await res.text()).toBe('');
            return;
          }
          const echo = await readEcho(res);
          expect(echo.method).toBe(method);
          expect(echo.path).toBe('/functions/v1/open/m');
          if (withBody) expect(echo.body).toBe(`body of ${method}`);
        });
      }

      const reverseEscapes = [
        '/functions/v1/open/../secure',
        '/functions/v1/open/%2e%2e/secure',
        '/functions/v1/open/..%2fsecure',
        '/functions/v1/open/..%2Fsecure',
        '/functions/v1/open/%2e%2e%2fsecure',
        '/functions/v1/open/x/..%2f..%2fsecure',
        '/functions/v1/open/..%5csecure',
        '/functions/v1/open/..;/secure',
        '/functions/v1/open/..;x=1/secure',
      ];
      for (const path of reverseEscapes) {
        it(`${path} -> 400 bad_path (an upstream that decodes or strips ;params could resolve it to secure)`, async () => {
          await expectGatewayError(await host.request(path), 'bad_path');
        });
      }

      it('PROPFIND -> 405 method_not_allowed with Allow listing the proxied methods', async () => {
        const res = await host.request('/functions/v1/open', { method: 'PROPFIND' });
        const allow = (res.headers.get('allow') ?? '').split(',').map((m) => m.trim());
        expect(allow.sort()).toEqual([...PROXY_METHODS].sort());
        await expectGatewayError(res, 'method_not_allowed');
      });

      it('OPTIONS on secure without credentials is proxied as anon (CORS preflight)', async () => {
        const echo = await readEcho(
          await host.request('/functions/v1/secure', {
            method: 'OPTIONS',
            headers: { origin: 'https://app.example', 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization, content-type' },
          }),
        );
        expect(echo.method).toBe('OPTIONS');
        expectIdentity(echo, 'anon', '', null);
        expect(echo.headers['origin']).toEqual(['https://app.example']);
      });

      it('Upgrade: websocket by an anon caller on secure -> 401 first (auth before anything else)', async () => {
        const upgrade = { connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==', 'sec-websocket-version': '13' };
        await expectGatewayError(await host.request('/functions/v1/secure', { headers: upgrade }), 'credentials_required');
        await expectGatewayError(await host.request('/functions/v1/secure', { headers: { ...upgrade, authorization: bearer('expired') } }), 'token_expired');
      });

      it('Upgrade: websocket by an authorized caller -> 501 upgrade_not_supported, on secure and open', async () => {
        const upgrade = { connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==', 'sec-websocket-version': '13' };
        await expectGatewayError(await host.request('/functions/v1/secure', { headers: { ...upgrade, authorization: bearer('user') } }), 'upgrade_not_supported');
        await expectGatewayError(await host.request('/functions/v1/open', { headers: upgrade }), 'upgrade_not_supported');
      });

      it('Upgrade: h2c is dropped and the request served as plain HTTP/1.1', async () => {
        const echo = await readEcho(
          await host.request('/functions/v1/open/h2c', { headers: { connection: 'Upgrade, HTTP2-Settings', upgrade: 'h2c', 'http2-settings': 'AAMAAABkAARAAAAAAAIAAAAA' } }),
        );
        expect(echo.path).toBe('/functions/v1/open/h2c');
        for (const name of ['upgrade', 'http2-settings']) expect(echo.headers[name], name).toBeUndefined();
      });

      it('OPTIONS on secure that is not a browser preflight needs credentials like any request', async () => {
        const preflight = { origin: 'https://app.example', 'access-control-request-method': 'POST' };
        const cases: [string, RequestInit & { headers: Record<string, string> }][] = [
          ['no Origin / Access-Control-Request-Method', { method: 'OPTIONS', headers: {} }],
          ['no Access-Control-Request-Method', { method: 'OPTIONS', headers: { origin: 'https://app.example' } }],
          ['a body', { method: 'OPTIONS', headers: { ...preflight, 'content-length': '23' }, body: '{"delete":"everything"}' }],
          ['a chunked body', { method: 'OPTIONS', headers: { ...preflight, 'transfer-encoding': 'chunked' }, body: '5\r\nhello\r\n0\r\n\r\n' }],
          ['X-HTTP-Method-Override: POST', { method: 'OPTIONS', headers: { ...preflight, 'X-HTTP-Method-Override': 'POST' } }],
          ['X_HTTP_Method_Override: POST', { method: 'OPTIONS', headers: { ...preflight, X_HTTP_Method_Override: 'POST' } }],
          ['X-HTTP-Method: DELETE', { method: 'OPTIONS', headers: { ...preflight, 'X-HTTP-Method': 'DELETE' } }],
          ['X-Method-Override: PUT', { method: 'OPTIONS', headers: { ...preflight, 'X-Method-Override': 'PUT' } }],
        ];
        for (const [why, init] of cases) {
          const res = await host.request('/functions/v1/secure', init);
          expect(res.status, why).toBe(401);
          await expectGatewayError(res, 'credentials_required');
        }
        // The same with credentials is served.
        const echo = await readEcho(await host.request('/functions/v1/secure', { method: 'OPTIONS', headers: { authorization: bearer('user') }, body: 'x' }));
        expect(echo.method).toBe('OPTIONS');
        expectIdentity(echo, 'authenticated', 'user-1', t.claims['user'] as JWTPayload);
      });

      it('GET /healthz -> 200', async () => {
        const res = await host.request('/healthz');
        expect(res.status).toBe(200);
        expect(res.headers.get('x-relay-error')).toBeNull();
      });

      it('an unknown route -> 404 not_found', async () => {
        await expectGatewayError(await host.request('/nope'), 'not_found');
        await expectGatewayError(await host.request('/functions/v2/open'), 'not_found');
      });
    });

    describe('errors and limits', () => {
      it("the function's own 503 passes through untouched: status, body, no x-relay-error", async () => {
        for (const path of ['/functions/v1/fails', '/functions/v1/fails/sub?q=1']) {
          const res = await host.request(path, { headers: { authorization: bearer('user') } });
          expect(res.status).toBe(503);
          expect(res.headers.get('x-relay-error')).toBeNull();
          expect(await res.text()).toBe('{"own":"error"}');
        }
      });

      it('every gateway error is JSON {code, message} with x-relay-error and CORS', async () => {
        const cases: [string, RequestInit & { headers?: Record<string, string> }, ErrorCode][] = [
          ['/nope', {}, 'not_found'],
          ['/functions/v1/nope', {}, 'function_not_found'],
          ['/functions/v1/open', { method: 'PROPFIND' }, 'method_not_allowed'],
          ['/functions/v1/secure/%2e%2e/x', {}, 'bad_path'],
          ['/functions/v1/secure', {}, 'credentials_required'],
          ['/functions/v1/secure', { headers: { authorization: 'Bearer x.y.z' } }, 'invalid_token'],
          ['/functions/v1/secure', { headers: { authorization: bearer('expired') } }, 'token_expired'],
          ['/functions/v1/secure', { headers: { authorization: `Bearer ${'a'.repeat(9000)}` } }, 'token_too_large'],
          ['/functions/v1/open', { method: 'POST', headers: { 'content-length': String(MiB + 1) }, body: new Uint8Array(MiB + 1) }, 'payload_too_large'],
        ];
        for (const [path, init, code] of cases) {
          const res = await host.request(path, init);
          await expectGatewayError(res, code);
          expect(res.headers.get('x-request-id'), `${code} carries a request id`).toBeTruthy();
        }
      });

      it('a Content-Length over the 1 MiB limit -> 413 payload_too_large', async () => {
        const res = await host.request('/functions/v1/open', {
          method: 'POST',
          headers: { 'content-type': 'application/octet-stream', 'content-length': String(MiB + 1) },
          body: new Uint8Array(MiB + 1),
        });
        await expectGatewayError(res, 'payload_too_large');
      });

      it('a body of exactly the 1 MiB limit is forwarded whole', async () => {
        const echo = await readEcho(
          await host.request('/functions/v1/open', {
            method: 'POST',
            headers: { 'content-type': 'text/plain', 'content-length': String(MiB) },
            body: 'z'.repeat(MiB),
          }),
        );
        expect(echo.bodyBytes).toBe(MiB);
      });
    });
  });
}
