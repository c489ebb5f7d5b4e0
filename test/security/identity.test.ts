/**
 * Identity edges end to end through the Node host: the credential size bound, iss/aud
 * checks (JWT_ISSUER / JWT_AUDIENCE), opaque keys, tokens in the query or a cookie,
 * credential spellings, forged algorithms, a `sub` that would split a header, and claims of
 * every kind of character decoding exactly at the real Go, Python and Node examples.
 */
import { createHmac } from 'node:crypto';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { base64url, SignJWT, type JWTPayload } from 'jose';
import { mintToken } from '../../adapters/node/tokens.ts';
import { TEST_SECRET, type TestGateway } from '../support/gateway.ts';
import { hasGo, startExample, type ExampleKind, type RunningExample } from '../support/processes.ts';
import { sendRequest } from '../support/raw-http.ts';
import { expectError, expectIdentityLines, readEcho, startSecurityHost, type SecurityHost } from '../support/security-host.ts';

const GO = hasGo();
if (!GO) console.warn('go not found: skipping the hello-go claims case (install golang-go)');

let host: SecurityHost;
let user: string;

const nowSec = () => Math.floor(Date.now() / 1000);
const sign = (payload: JWTPayload, secret = TEST_SECRET) =>
  new SignJWT(payload).setProtectedHeader({ alg: 'HS256', typ: 'JWT' }).sign(new TextEncoder().encode(secret));

beforeAll(async () => {
  host = await startSecurityHost();
  user = await host.token('authenticated', 'user-1');
});
afterAll(async () => {
  expect(host?.canary.hits() ?? 0, 'the canary was reached').toBe(0);
  await host?.close();
});
beforeEach(async () => {
  await host.drain();
});

describe('the credential size bound (8 KiB a header; Node refuses any head over 16 KiB)', () => {
  const huge = `eyJ${'a'.repeat(9000)}.eyJ${'b'.repeat(100)}.${'c'.repeat(43)}`;
  for (const fn of ['open', 'secure']) {
    it(`a 9 KB Bearer or apikey on ${fn} -> 431 token_too_large, nothing forwarded`, async () => {
      await expectError(await host.request(`/functions/v1/${fn}`, { headers: { authorization: `Bearer ${huge}` } }), 431, 'token_too_large');
      await expectError(await host.request(`/functions/v1/${fn}`, { headers: { apikey: huge } }), 431, 'token_too_large');
      expect(await host.drain()).toEqual([]);
    });
  }

  it("a 17 KB Bearer -> Node's own 431, connection closed, nothing forwarded", async () => {
    const result = await host.raw(`GET /functions/v1/open HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${'a'.repeat(17 * 1024)}\r\n\r\n`);
    expect(result.responses.map((r) => r.status)).toEqual([431]);
    expect(result.closed).toBe(true);
    expect(await host.drain()).toEqual([]);
  });

  it('a valid token just under the bound verifies and its claims arrive whole', async () => {
    const filler = 'x'.repeat(5_500);
    const token = await sign({ role: 'authenticated', sub: 'big', filler, exp: nowSec() + 600 });
    expect(`Bearer ${token}`.length).toBeLessThan(8192);
    const echo = await readEcho(await host.request('/functions/v1/secure', { headers: { authorization: `Bearer ${token}` } }));
    expect(echo.role).toBe('authenticated');
    expect(echo.claims?.['filler']).toBe(filler);
  });
});

describe('iss and aud (JWT_ISSUER, JWT_AUDIENCE)', () => {
  let strict: TestGateway;
  const ISS = 'https://auth.example.test/auth/v1';
  beforeAll(async () => {
    strict = await host.another({ JWT_ISSUER: ISS, JWT_AUDIENCE: 'authenticated' });
  });
  const mint = (issuer: string | undefined, audience: string | undefined) =>
    mintToken(TEST_SECRET, { role: 'authenticated', sub: 'user-iss', expiresIn: '1h', ...(issuer ? { issuer } : {}), ...(audience ? { audience } : {}) });

  it('the right iss and aud -> the caller is authenticated', async () => {
    const echo = await readEcho(await sendRequest(strict.port, '/functions/v1/secure', { headers: { authorization: `Bearer ${await mint(ISS, 'authenticated')}` } }));
    expect(echo.role).toBe('authenticated');
    expect(echo.sub).toBe('user-iss');
  });

  const wrong: [string, () => Promise<string>][] = [
    ['another issuer', () => mint('https://evil.example.test/auth/v1', 'authenticated')],
    ['the default issuer ("pgstack")', () => mint(undefined, 'authenticated')],
    ['another audience', () => mint(ISS, 'service')],
    ['no audience', () => mint(ISS, undefined)],
  ];
  for (const [name, token] of wrong) {
    it(`${name} -> 401 invalid_token on secure, anon on open`, async () => {
      const bearer = `Bearer ${await token()}`;
      await expectError(await sendRequest(strict.port, '/functions/v1/secure', { headers: { authorization: bearer } }), 401, 'invalid_token');
      const echo = await readEcho(await sendRequest(strict.port, '/functions/v1/open', { headers: { authorization: bearer } }));
      expect(echo.role).toBe('anon');
      expect(echo.sub).toBe('');
    });
  }

  it('the checks apply to the apikey too: an anon key without aud beside a good Bearer -> 401 invalid_apikey', async () => {
    const anonKey = await mintToken(TEST_SECRET, { role: 'anon', expiresIn: '1h', issuer: ISS });
    const res = await sendRequest(strict.port, '/functions/v1/secure', { headers: { authorization: `Bearer ${await mint(ISS, 'authenticated')}`, apikey: anonKey } });
    await expectError(res, 401, 'invalid_apikey');
  });
});

describe('credential placement', () => {
  it("an opaque key (sb_publishable_...) is not a JWT: 401 invalid_apikey on secure (also beside a good Bearer), anon on open", async () => {
    const opaque = 'sb_publishable_3ZqH4k1Yd8vX2cWmNa7PfQ_0aBcDeF';
    await expectError(await host.request('/functions/v1/secure', { headers: { apikey: opaque } }), 401, 'invalid_apikey');
    await expectError(await host.request('/functions/v1/secure', { headers: { apikey: opaque, authorization: `Bearer ${user}` } }), 401, 'invalid_apikey');
    const echo = await readEcho(await host.request('/functions/v1/open', { headers: { apikey: opaque } }));
    expect(echo.role).toBe('anon');
    expect(echo.headers['apikey']).toEqual([opaque]);
    await expectError(await host.request('/functions/v1/secure', { headers: { authorization: `Bearer ${opaque}` } }), 401, 'invalid_token');
  });

  it('a token in the query string or a cookie is never read: 401 on secure, anon on open, passed through unchanged', async () => {
    const service = await host.token('service_role', 'svc');
    const target = `/functions/v1/secure?access_token=${user}&apikey=${service}&token=${service}`;
    const cookie = `sb-access-token=${user}; access_token=${service}; apikey=${service}`;
    await expectError(await host.request(target), 401, 'credentials_required');
    await expectError(await host.request('/functions/v1/secure', { headers: { cookie } }), 401, 'credentials_required');
    const openTarget = target.replace('/secure', '/open');
    const echo = await readEcho(await host.request(openTarget, { headers: { cookie } }));
    expect(echo.role).toBe('anon');
    expect(echo.path).toBe(openTarget);
    expect(echo.headers['cookie']).toEqual([cookie]);
  });

  const spellings: [string, (t: string) => Record<string, string>, boolean][] = [
    ['lowercase bearer', (t) => ({ authorization: `bearer ${t}` }), true],
    ['BEARER', (t) => ({ authorization: `BEARER ${t}` }), true],
    ['extra spaces after the scheme', (t) => ({ authorization: `Bearer    ${t}` }), true],
    ['spaces around the value (trimmed by HTTP)', (t) => ({ authorization: `   Bearer ${t}   ` }), true],
    ['an apikey with spaces around it', (t) => ({ apikey: `  ${t}  ` }), true],
    ['a tab after the scheme', (t) => ({ authorization: `Bearer\t${t}` }), false],
    ['no scheme', (t) => ({ authorization: t }), false],
    ['Token scheme', (t) => ({ authorization: `Token ${t}` }), false],
    ['Bearer with a trailing word', (t) => ({ authorization: `Bearer ${t} extra` }), false],
    ['the token in X-Access-Token', (t) => ({ 'x-access-token': t }), false],
  ];
  for (const [name, headers, accepted] of spellings) {
    it(`${name} -> ${accepted ? 'authenticated' : '401 on secure'}`, async () => {
      const res = await host.request('/functions/v1/secure', { headers: headers(user) });
      if (accepted) expect((await readEcho(res)).role).toBe('authenticated');
      else {
        expect(res.status).toBe(401);
        expect(res.headers.get('x-relay-error')).toBe('true');
      }
    });
  }
});

describe('forged tokens through the real host', () => {
  const b64 = (v: unknown) => base64url.encode(JSON.stringify(v));
  const payload = () => ({ role: 'service_role', sub: 'forged', exp: nowSec() + 600 });

  it('alg none in any spelling, an embedded jwk, a foreign secret: 401 on secure, anon on open', async () => {
    const tokens = [
      `${b64({ alg: 'none', typ: 'JWT' })}.${b64(payload())}.`,
      `${b64({ alg: 'None', typ: 'JWT' })}.${b64(payload())}.`,
      `${b64({ alg: 'nOnE' })}.${b64(payload())}.`,
      await new SignJWT(payload())
        .setProtectedHeader({ alg: 'HS256', jwk: { kty: 'oct', k: base64url.encode('attacker-secret-attacker-secret-32') } as never })
        .sign(new TextEncoder().encode('attacker-secret-attacker-secret-32')),
      await sign(payload(), 'attacker-secret-attacker-secret-attacker'),
    ];
    for (const token of tokens) {
      const res = await host.request('/functions/v1/secure', { headers: { authorization: `Bearer ${token}` } });
      expect(res.status, token.slice(0, 40)).toBe(401);
      await res.text();
      const echo = await readEcho(await host.request('/functions/v1/open', { headers: { apikey: token } }));
      expect(echo.role).toBe('anon');
    }
    expect((await host.drain()).every((r) => r.target === '/functions/v1/open')).toBe(true);
  });

  it('exp and nbf: 5 s leeway, no more', async () => {
    const at = (exp: number, nbf?: number) => sign({ role: 'authenticated', sub: 'clock', exp, ...(nbf === undefined ? {} : { nbf }) });
    expect((await readEcho(await host.request('/functions/v1/secure', { headers: { authorization: `Bearer ${await at(nowSec() - 2)}` } }))).sub).toBe('clock');
    await expectError(await host.request('/functions/v1/secure', { headers: { authorization: `Bearer ${await at(nowSec() - 30)}` } }), 401, 'token_expired');
    await expectError(await host.request('/functions/v1/secure', { headers: { authorization: `Bearer ${await at(nowSec() + 600, nowSec() + 60)}` } }), 401, 'token_not_yet_valid');
  });
});

describe('X-Pgstack-Sub can never split a header', () => {
  const subs = ['u\r\nX-Pgstack-Role: service_role', 'u\nx', 'u\rx', 'a\u0000b', 'tab\there', 'ü-user', 'emoji-😀', 'x'.repeat(300)];
  for (const sub of subs) {
    it(`sub ${JSON.stringify(sub.slice(0, 40))} -> 401 invalid_token on secure, anon with an empty sub on open`, async () => {
      const token = await sign({ role: 'authenticated', sub, exp: nowSec() + 600 });
      await expectError(await host.request('/functions/v1/secure', { headers: { authorization: `Bearer ${token}` } }), 401, 'invalid_token');
      const echo = await readEcho(await host.request('/functions/v1/open', { headers: { authorization: `Bearer ${token}` } }));
      expect(echo.role).toBe('anon');
      const [seen] = await host.drain();
      expectIdentityLines(seen?.headers ?? [], 'anon', '');
    });
  }
});

describe('X-Pgstack-Claims decodes to exactly the claims at real upstreams (Go, Python, Node examples)', () => {
  const kinds: ExampleKind[] = GO ? ['go', 'python', 'node'] : ['python', 'node'];
  const examples: Partial<Record<ExampleKind, RunningExample>> = {};
  let gw: TestGateway;

  beforeAll(async () => {
    await Promise.all(kinds.map(async (k) => (examples[k] = await startExample(k))));
    for (const k of kinds) {
      await host.db.sql('INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ($1, $2, $3, $4)', [
        `claims-${k}`,
        'http',
        true,
        `http://hello-${k}:${examples[k]!.port}`,
      ]);
    }
    gw = await host.another({ UPSTREAM_HOSTS: 'echo=127.0.0.1,hello-go=127.0.0.1,hello-python=127.0.0.1,hello-node=127.0.0.1' });
  }, 240_000);
  afterAll(async () => {
    await Promise.all(Object.values(examples).map((e) => e?.stop()));
  });

  const wild: JWTPayload = {
    role: 'authenticated',
    sub: 'user-wild',
    'naïve ключ 名前': 'valüe ✓ Ωmega',
    emoji: '😀👩‍👩‍👧🏳️‍🌈',
    quotes: 'say "hi" \'there\'',
    backslashes: 'C:\\dir\\file \\u0041 \\\\ \\"',
    control: 'a\u0001b\nc\r\td\u007f\u0000e\u2028f\u2029g\u0085',
    lone: 'x\ud800y\udfffz',
    header: 'v\r\nX-Pgstack-Role: service_role',
    html: '</script><script>alert(1)</script>',
    numbers: [0, -1, 1.5, 1e21, 9007199254740991],
    nested: { list: [1, null, true, false, { deep: 'ü' }], empty: {}, emptyList: [] },
    long: 'L'.repeat(3000),
  };

  for (const kind of ['go', 'python', 'node'] as const) {
    it.skipIf(kind === 'go' && !GO)(`hello-${kind}: claims with every kind of character, and random claims, decode exactly`, async () => {
      const call = async (claims: JWTPayload) => {
        const token = await sign({ ...claims, exp: nowSec() + 600 });
        const echo = await readEcho(await sendRequest(gw.port, `/functions/v1/claims-${kind}`, { headers: { authorization: `Bearer ${token}` } }));
        expect(echo.runtime).toBe(kind);
        expect(echo.headers['x-pgstack-claims']).toHaveLength(1);
        expect(echo.headers['x-pgstack-claims']?.[0]).toMatch(/^[\x20-\x7e]*$/);
        return echo;
      };
      const echo = await call(wild);
      expect(echo.claims).toEqual({ ...wild, exp: echo.claims?.['exp'] });
      expect(echo.role).toBe('authenticated');
      expect(echo.sub).toBe('user-wild');

      // The header is the payload as signed: 64-bit ids keep their digits, whatever the
      // function's own JSON parser then makes of them.
      const json = `{"role":"authenticated","sub":"user-big","user_id":1234567890123456789,"exp":${nowSec() + 600}}`;
      const head = base64url.encode(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
      const body = base64url.encode(json);
      const mac = createHmac('sha256', TEST_SECRET).update(`${head}.${body}`).digest('base64url');
      const big = await readEcho(await sendRequest(gw.port, `/functions/v1/claims-${kind}`, { headers: { authorization: `Bearer ${head}.${body}.${mac}` } }));
      expect(big.headers['x-pgstack-claims']).toEqual([json]);

      const text = fc.string({ unit: 'binary', maxLength: 20 });
      const claims = fc.dictionary(text, fc.oneof(text, fc.integer(), fc.boolean(), fc.constant(null), fc.array(text, { maxLength: 3 })), { maxKeys: 5 });
      await fc.assert(
        fc.asyncProperty(claims, async (extra) => {
          const payload: JWTPayload = Object.assign(Object.create(null) as JWTPayload, extra, { role: 'authenticated', sub: 'user-fc' });
          const got = await call(payload);
          expect(got.claims).toEqual({ ...JSON.parse(JSON.stringify(payload)), exp: got.claims?.['exp'] });
        }),
        { numRuns: 25 },
      );
    });
  }
});
