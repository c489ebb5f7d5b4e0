import { createServer, type Server } from 'node:http';
import { createHmac } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import fc from 'fast-check';
import { exportJWK, exportSPKI, generateKeyPair, importJWK, SignJWT, type JWK, type JWTHeaderParameters, type JWTPayload } from 'jose';
import { encodeClaims, hasDuplicateKeys } from './claims.ts';
import { createIdentifier, type Credentials, type Identifier, type IdentifierDeps, type KeyConfig } from './identity.ts';
import { silentLogger } from './log.ts';

const SECRET = 'identity-test-secret-0123456789abcdef0123';
const enc = new TextEncoder();
/** The injected clock: a fixed instant, moved by the tests that need time to pass. */
const T0 = 1_750_000_000_000;
let clock = T0;
const nowSec = () => Math.floor(clock / 1000);

afterEach(() => {
  clock = T0;
  vi.restoreAllMocks();
});

function identifier(config: KeyConfig, deps: Partial<IdentifierDeps> = {}): Identifier {
  return createIdentifier(config, { now: () => clock, fetch: globalThis.fetch.bind(globalThis), log: silentLogger, ...deps });
}

const hs = (payload: JWTPayload, header: Partial<JWTHeaderParameters> = {}, secret = SECRET) =>
  new SignJWT(payload).setProtectedHeader({ alg: 'HS256', typ: 'JWT', ...header }).sign(enc.encode(secret));

const user = (extra: JWTPayload = {}): JWTPayload => ({ role: 'authenticated', sub: 'user-1', iat: nowSec(), exp: nowSec() + 3600, ...extra });

const withBearer = (token: string) => new Headers({ authorization: `Bearer ${token}` });

async function bearer(id: Identifier, token: string): Promise<Credentials> {
  return id.identify(withBearer(token));
}

function expectValid(credentials: Credentials, role: string, sub: string): void {
  expect(credentials.kind, credentials.kind === 'invalid' ? `${credentials.error.code}: ${credentials.error.message}` : '').toBe('valid');
  if (credentials.kind !== 'valid') return;
  expect(credentials.identity.role).toBe(role);
  expect(credentials.identity.sub).toBe(sub);
}

function expectInvalid(credentials: Credentials, code: string): void {
  expect(credentials.kind).toBe('invalid');
  if (credentials.kind === 'invalid') expect(credentials.error.code).toBe(code);
}

const b64url = (value: unknown) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');

interface TestKey {
  alg: string;
  kid: string;
  privateKey: CryptoKey;
  publicJwk: JWK;
}

async function makeKey(alg: string, kid: string): Promise<TestKey> {
  const { publicKey, privateKey } = await generateKeyPair(alg, { extractable: true });
  const publicJwk = { ...(await exportJWK(publicKey)), kid, alg, use: 'sig' };
  return { alg, kid, privateKey, publicJwk };
}

const signWith = (key: TestKey, payload: JWTPayload, header: Partial<JWTHeaderParameters> = {}) =>
  new SignJWT(payload).setProtectedHeader({ alg: key.alg, kid: key.kid, typ: 'JWT', ...header }).sign(key.privateKey);

/** A node:http server on 127.0.0.1:0 serving a JWKS, counting requests. */
interface JwksServer {
  url: string;
  hits: number;
  keys: JWK[];
  status: number;
  close(): Promise<void>;
}

async function startJwksServer(keys: JWK[]): Promise<JwksServer> {
  const state = { hits: 0, keys, status: 200 };
  const server: Server = createServer((_req, res) => {
    state.hits++;
    res.writeHead(state.status, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ keys: state.keys }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/.well-known/jwks.json`;
  return {
    url,
    get hits() {
      return state.hits;
    },
    set hits(n: number) {
      state.hits = n;
    },
    get keys() {
      return state.keys;
    },
    set keys(k: JWK[]) {
      state.keys = k;
    },
    get status() {
      return state.status;
    },
    set status(s: number) {
      state.status = s;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

let es: TestKey, esOther: TestKey, rs: TestKey, ps: TestKey, ed: TestKey, ed25519: TestKey, attacker: TestKey;
let JWKS: { keys: JWK[] };

beforeAll(async () => {
  [es, esOther, rs, ps, ed, ed25519, attacker] = await Promise.all([
    makeKey('ES256', 'es-1'),
    makeKey('ES256', 'es-2'),
    makeKey('RS256', 'rs-1'),
    makeKey('PS256', 'ps-1'),
    makeKey('EdDSA', 'ed-1'),
    makeKey('Ed25519', 'ed25519-1'),
    makeKey('RS256', 'attacker'),
  ]);
  JWKS = { keys: [es.publicJwk, esOther.publicJwk, rs.publicJwk, ps.publicJwk, ed.publicJwk, ed25519.publicJwk] };
});

describe('HS256 secret', () => {
  it('a token signed with the secret verifies, with its claims and an ASCII claims header', async () => {
    const claims = user({ email: 'zoë@example.com' });
    const result = await bearer(identifier({ jwtSecret: SECRET }), await hs(claims));
    expectValid(result, 'authenticated', 'user-1');
    if (result.kind !== 'valid') return;
    expect(result.identity.claims).toEqual(claims);
    expect(JSON.parse(result.identity.claimsHeader as string)).toEqual(claims);
  });

  it('a token signed with another secret is invalid_token', async () => {
    expectInvalid(await bearer(identifier({ jwtSecret: SECRET }), await hs(user(), {}, 'another-secret-another-secret-another')), 'invalid_token');
  });

  it('with no keys configured at all, every token is invalid and nothing throws', async () => {
    expectInvalid(await bearer(identifier({}), await hs(user())), 'invalid_token');
  });
});

describe('inline JWKS', () => {
  for (const name of ['es', 'rs', 'ps', 'ed', 'ed25519'] as const) {
    it(`verifies a ${name.toUpperCase()} token selected by kid`, async () => {
      const key = { es, rs, ps, ed, ed25519 }[name];
      expectValid(await bearer(identifier({ jwks: JWKS }), await signWith(key, user())), 'authenticated', 'user-1');
    });
  }

  it('the kid selects the key: the right kid verifies, another kid with the same alg is invalid', async () => {
    const id = identifier({ jwks: JWKS });
    expectValid(await bearer(id, await signWith(esOther, user())), 'authenticated', 'user-1');
    expectInvalid(await bearer(id, await signWith(esOther, user(), { kid: 'es-1' })), 'invalid_token');
  });

  it('a kid naming a key of another algorithm is invalid', async () => {
    expectInvalid(await bearer(identifier({ jwks: JWKS }), await signWith(es, user(), { kid: 'rs-1' })), 'invalid_token');
  });

  it('HS256 and a JWKS together (rotation): both kinds of token verify', async () => {
    const id = identifier({ jwtSecret: SECRET, jwks: JWKS });
    expectValid(await bearer(id, await hs(user({ sub: 'legacy' }))), 'authenticated', 'legacy');
    expectValid(await bearer(id, await signWith(es, user({ sub: 'new' }))), 'authenticated', 'new');
    expectValid(await bearer(id, await signWith(ed, user({ sub: 'ed' }))), 'authenticated', 'ed');
  });

  it('an HS256 token is never checked against the JWKS when no secret is configured', async () => {
    expectInvalid(await bearer(identifier({ jwks: JWKS }), await hs(user(), { kid: 'es-1' })), 'invalid_token');
  });

  it('an asymmetric token is never checked against the HS256 secret when no JWKS is configured', async () => {
    expectInvalid(await bearer(identifier({ jwtSecret: SECRET }), await signWith(es, user())), 'invalid_token');
  });
});

describe('attacks on the algorithm and key selection', () => {
  const configs: [string, () => KeyConfig][] = [
    ['HS256 only', () => ({ jwtSecret: SECRET })],
    ['JWKS only', () => ({ jwks: JWKS })],
    ['HS256 and JWKS', () => ({ jwtSecret: SECRET, jwks: JWKS })],
  ];

  for (const alg of ['none', 'None', 'NONE', 'nOnE']) {
    for (const [label, config] of configs) {
      it(`alg "${alg}" is invalid (${label})`, async () => {
        const id = identifier(config());
        const head = b64url({ alg, typ: 'JWT' });
        const body = b64url(user());
        expectInvalid(await bearer(id, `${head}.${body}.`), 'invalid_token');
        expectInvalid(await bearer(id, `${head}.${body}.AAAA`), 'invalid_token');
        // A kid pointing at a real key changes nothing.
        expectInvalid(await bearer(id, `${b64url({ alg, kid: 'es-1' })}.${body}.`), 'invalid_token');
      });
    }
  }

  const publicKeyTexts: [string, () => Promise<string>][] = [
    ['the RSA public key PEM', () => exportSPKI(rsPublic())],
    ['the EC public key PEM', () => exportSPKI(esPublic())],
    ['the RSA public JWK JSON', async () => JSON.stringify(rs.publicJwk)],
    ['the EC public JWK JSON', async () => JSON.stringify(es.publicJwk)],
    ['the RSA modulus', async () => rs.publicJwk.n as string],
  ];
  let rsPublicKey: CryptoKey;
  let esPublicKey: CryptoKey;
  const rsPublic = () => rsPublicKey;
  const esPublic = () => esPublicKey;
  beforeAll(async () => {
    rsPublicKey = (await importJWK(rs.publicJwk, 'RS256', { extractable: true })) as CryptoKey;
    esPublicKey = (await importJWK(es.publicJwk, 'ES256', { extractable: true })) as CryptoKey;
  });
  for (const [label, text] of publicKeyTexts) {
    it(`an HS256 token whose secret is ${label} is invalid (algorithm confusion)`, async () => {
      const secret = await text();
      for (const kid of ['rs-1', 'es-1', undefined]) {
        const token = await hs(user(), kid ? { kid } : {}, secret);
        expectInvalid(await bearer(identifier({ jwks: JWKS }), token), 'invalid_token');
        expectInvalid(await bearer(identifier({ jwtSecret: SECRET, jwks: JWKS }), token), 'invalid_token');
      }
    });
  }

  it('a token carrying its own key in the jwk header is invalid', async () => {
    const id = identifier({ jwks: JWKS });
    for (const kid of [attacker.kid, 'rs-1']) {
      const token = await signWith(attacker, user(), { kid, jwk: attacker.publicJwk });
      expectInvalid(await bearer(id, token), 'invalid_token');
    }
    // Without a kid, too.
    const noKid = await new SignJWT(user()).setProtectedHeader({ alg: 'RS256', jwk: attacker.publicJwk }).sign(attacker.privateKey);
    expectInvalid(await bearer(id, noKid), 'invalid_token');
  });

  describe('jku and x5u', () => {
    let evil: JwksServer;
    let legit: JwksServer;
    beforeAll(async () => {
      evil = await startJwksServer([attacker.publicJwk]);
      legit = await startJwksServer([rs.publicJwk]);
    });
    afterAll(async () => {
      await evil.close();
      await legit.close();
    });

    for (const param of ['jku', 'x5u'] as const) {
      it(`a token whose ${param} points to the attacker's key set is invalid, and that URL is never fetched`, async () => {
        const fetched: string[] = [];
        const recordingFetch: typeof fetch = (input, init) => {
          fetched.push(String(input instanceof Request ? input.url : input));
          return globalThis.fetch(input, init);
        };
        const token = await signWith(attacker, user(), { [param]: evil.url });
        for (const config of [{ jwtSecret: SECRET }, { jwks: JWKS }, { jwksUrl: legit.url, cacheSize: 0 }] as KeyConfig[]) {
          expectInvalid(await bearer(identifier(config, { fetch: recordingFetch }), token), 'invalid_token');
        }
        expect(evil.hits).toBe(0);
        expect(fetched.filter((u) => u !== legit.url)).toEqual([]);
      });
    }
  });

  for (const kid of ['../../etc/passwd', "' OR 1=1 --", '\u0000', 'x'.repeat(5000), '__proto__', 'constructor']) {
    it(`kid ${JSON.stringify(kid.slice(0, 20))} is invalid and nothing throws`, async () => {
      const token = await signWith(es, user(), { kid });
      expectInvalid(await bearer(identifier({ jwks: JWKS }), token), 'invalid_token');
      expectInvalid(await bearer(identifier({ jwtSecret: SECRET, jwks: JWKS }), token), 'invalid_token');
    });
  }

  it('garbage in every part of the token is a 401 code, never a throw', async () => {
    const id = identifier({ jwtSecret: SECRET, jwks: JWKS });
    const tokens = ['a.b.c', 'e30.e30.', `${b64url('not json')}.${b64url(user())}.x`, `${b64url({ alg: 'HS256' })}.${b64url('[1,2]')}.x`, `${b64url({ alg: 'HS256' })}.!!.x`, '..', 'eyJ.eyJ.eyJ', `${b64url({ alg: 'HS256', crit: ['exp'] })}.${b64url(user())}.x`];
    for (const token of tokens) {
      const result = await id.identify(new Headers({ authorization: `Bearer ${token}` }));
      expect(result.kind, token).toBe('invalid');
    }
  });
});

describe('time claims', () => {
  const id = () => identifier({ jwtSecret: SECRET });

  it('exp in the past (beyond the 5 s leeway) -> token_expired', async () => {
    expectInvalid(await bearer(id(), await hs(user({ exp: nowSec() - 10 }))), 'token_expired');
  });

  it('exp within the 5 s leeway -> valid', async () => {
    expectValid(await bearer(id(), await hs(user({ exp: nowSec() - 3 }))), 'authenticated', 'user-1');
  });

  it('nbf in the future -> token_not_yet_valid', async () => {
    expectInvalid(await bearer(id(), await hs(user({ nbf: nowSec() + 60 }))), 'token_not_yet_valid');
  });

  it('exp or nbf of the wrong type is a malformed token (invalid_token), not expired / not yet valid', async () => {
    expectInvalid(await bearer(id(), await hs(user({ nbf: 'soon' as unknown as number }))), 'invalid_token');
    expectInvalid(await bearer(id(), await hs(user({ exp: 'later' as unknown as number }))), 'invalid_token');
  });

  it('nbf within the leeway -> valid', async () => {
    expectValid(await bearer(id(), await hs(user({ nbf: nowSec() + 3 }))), 'authenticated', 'user-1');
  });
});

describe('issuer and audience', () => {
  const id = () => identifier({ jwtSecret: SECRET, issuer: 'https://auth.example/v1', audience: 'authenticated' });

  it('the configured issuer and audience verify', async () => {
    expectValid(await bearer(id(), await hs(user({ iss: 'https://auth.example/v1', aud: 'authenticated' }))), 'authenticated', 'user-1');
    expectValid(await bearer(id(), await hs(user({ iss: 'https://auth.example/v1', aud: ['other', 'authenticated'] }))), 'authenticated', 'user-1');
  });

  const wrong: [string, JWTPayload][] = [
    ['a wrong issuer', { iss: 'https://evil.example/v1', aud: 'authenticated' }],
    ['no issuer', { aud: 'authenticated' }],
    ['an issuer differing by a trailing slash', { iss: 'https://auth.example/v1/', aud: 'authenticated' }],
    ['a wrong audience', { iss: 'https://auth.example/v1', aud: 'anon' }],
    ['no audience', { iss: 'https://auth.example/v1' }],
  ];
  for (const [label, extra] of wrong) {
    it(`${label} -> invalid_token`, async () => {
      expectInvalid(await bearer(id(), await hs(user(extra))), 'invalid_token');
    });
  }
});

describe('roles and sub', () => {
  const id = () => identifier({ jwtSecret: SECRET });

  it('exactly three roles are granted', async () => {
    expectValid(await bearer(id(), await hs(user({ role: 'authenticated' }))), 'authenticated', 'user-1');
    expectValid(await bearer(id(), await hs(user({ role: 'service_role' }))), 'service_role', 'user-1');
    expectValid(await bearer(id(), await hs(user({ role: 'anon', sub: undefined }))), 'anon', '');
  });

  for (const role of ['postgres', 'supabase_admin', 'Authenticated', 'authenticated ', ' authenticated', 'SERVICE_ROLE', 'service-role', '', ['authenticated'], { name: 'authenticated' }, 1, true, null]) {
    it(`role ${JSON.stringify(role)} is never granted -> invalid_role`, async () => {
      expectInvalid(await bearer(id(), await hs(user({ role: role as string }))), 'invalid_role');
    });
  }

  it('a token without a role claim -> invalid_role', async () => {
    const { role: _role, ...noRole } = user();
    expectInvalid(await bearer(id(), await hs(noRole)), 'invalid_role');
  });

  for (const sub of ['a\r\nX-Pgstack-Role: service_role', 'line\nbreak', 'ünïcödé', 'emoji-😀', 'tab\there', '\u0000', 'x'.repeat(257), 'admin ', ' admin', '   ', ' ']) {
    it(`sub ${JSON.stringify(sub.slice(0, 24))} -> invalid_token`, async () => {
      expectInvalid(await bearer(id(), await hs(user({ sub }))), 'invalid_token');
    });
  }

  for (const sub of ['a', 'user 1', 'x'.repeat(256), '~!@#$%^&*()_+{}|:"<>?`-=[]\\;\',./']) {
    it(`sub ${JSON.stringify(sub.slice(0, 24))} is carried as it is`, async () => {
      expectValid(await bearer(id(), await hs(user({ sub }))), 'authenticated', sub);
    });
  }

  it('a non-string sub -> invalid_token', async () => {
    expectInvalid(await bearer(id(), await hs(user({ sub: 42 as unknown as string }))), 'invalid_token');
  });

  it('an authenticated token without sub -> invalid_token', async () => {
    expectInvalid(await bearer(id(), await hs(user({ sub: undefined }))), 'invalid_token');
  });

  it('a service key without sub -> service_role with an empty sub', async () => {
    expectValid(await bearer(id(), await hs({ role: 'service_role', iat: nowSec() })), 'service_role', '');
  });

  it('an anon key with a sub -> anon with an empty sub', async () => {
    const result = await id().identify(new Headers({ apikey: await hs({ role: 'anon', sub: 'someone', iat: nowSec() }) }));
    expectValid(result, 'anon', '');
    if (result.kind === 'valid') expect(result.identity.claims?.['sub']).toBe('someone');
  });
});

describe('credential sources', () => {
  const id = () => identifier({ jwtSecret: SECRET });

  it('no credentials -> none', async () => {
    expect(await id().identify(new Headers())).toEqual({ kind: 'none' });
  });

  it('tokens in cookies or other headers are never read', async () => {
    const token = await hs(user());
    expect(await id().identify(new Headers({ cookie: `sb-access-token=${token}`, 'x-access-token': token }))).toEqual({ kind: 'none' });
  });

  it('the apikey alone identifies; a bad apikey is invalid_apikey', async () => {
    expectValid(await id().identify(new Headers({ apikey: await hs({ role: 'anon', iat: nowSec() }) })), 'anon', '');
    expectInvalid(await id().identify(new Headers({ apikey: 'sb_publishable_abc' })), 'invalid_apikey');
  });

  it('an opaque Supabase key is refused with a message that names the JWT key to use instead', async () => {
    for (const opaque of ['sb_publishable_abc', 'sb_secret_abc']) {
      const credentials = await id().identify(new Headers({ apikey: opaque }));
      expectInvalid(credentials, 'invalid_apikey');
      if (credentials.kind === 'invalid') expect(credentials.error.message).toMatch(/Opaque API keys .* not supported: use the JWT anon or service key/);
    }
    const other = await id().identify(new Headers({ apikey: 'not-a-jwt' }));
    if (other.kind === 'invalid') expect(other.error.message).toBe('The credential is not a JWT.');
  });

  it('Bearer wins over apikey; a forged apikey beside a good Bearer is still invalid', async () => {
    const anonKey = await hs({ role: 'anon', iat: nowSec() });
    expectValid(await id().identify(new Headers({ authorization: `Bearer ${await hs(user())}`, apikey: anonKey })), 'authenticated', 'user-1');
    const forged = await hs({ role: 'service_role', iat: nowSec() }, {}, 'forged-secret-forged-secret-forged-secret');
    expectInvalid(await id().identify(new Headers({ authorization: `Bearer ${await hs(user())}`, apikey: forged })), 'invalid_apikey');
  });

  it('the Bearer scheme is case-insensitive; other schemes and malformed values are invalid_token', async () => {
    const token = await hs(user());
    for (const scheme of ['Bearer', 'bearer', 'BEARER', 'bEaReR']) {
      expectValid(await id().identify(new Headers({ authorization: `${scheme} ${token}` })), 'authenticated', 'user-1');
    }
    for (const value of [`Basic ${token}`, `Token ${token}`, token, 'Bearer', `Bearer ${token} extra`]) {
      expectInvalid(await id().identify(new Headers({ authorization: value })), 'invalid_token');
    }
  });

  it('two Authorization or apikey lines (joined with a comma) -> ambiguous_credentials, never the first', async () => {
    const token = await hs(user());
    const anonKey = await hs({ role: 'anon', iat: nowSec() });
    const twice = new Headers();
    twice.append('authorization', `Bearer ${token}`);
    twice.append('authorization', `Bearer ${anonKey}`);
    expectInvalid(await id().identify(twice), 'ambiguous_credentials');
    expectInvalid(await id().identify(new Headers({ authorization: `Bearer ${token}, Bearer ${token}` })), 'ambiguous_credentials');
    const keys = new Headers({ authorization: `Bearer ${token}` });
    keys.append('apikey', anonKey);
    keys.append('apikey', anonKey);
    expectInvalid(await id().identify(keys), 'ambiguous_credentials');
  });

  it('a token under the bound whose claims escape to more than 8 KiB -> token_too_large; one that fits passes', async () => {
    const wide = await hs(user({ name: 'é'.repeat(2_000) })); // ~5.5 KB token, ~12 KB escaped
    expect(`Bearer ${wide}`.length).toBeLessThan(8192);
    const refused = await bearer(id(), wide);
    expectInvalid(refused, 'token_too_large');
    if (refused.kind === 'invalid') expect(refused.error.message).toContain('X-Pgstack-Claims');
    const fits = await bearer(id(), await hs(user({ name: 'é'.repeat(1_000) })));
    expectValid(fits, 'authenticated', 'user-1');
    if (fits.kind === 'valid') expect(fits.identity.claimsHeader!.length).toBeLessThanOrEqual(8192);
  });

  it('a credential over 8 KiB -> token_too_large, before any parsing', async () => {
    expectInvalid(await id().identify(new Headers({ authorization: `Bearer ${'a'.repeat(8200)}` })), 'token_too_large');
    expectInvalid(await id().identify(new Headers({ apikey: 'a'.repeat(8200) })), 'token_too_large');
  });
});

describe('encodeClaims', () => {
  const anyString = fc.oneof(
    fc.string({ unit: 'binary' }),
    fc.string({ unit: fc.integer({ min: 0, max: 0xffff }).map((c) => String.fromCharCode(c)) }), // lone surrogates too
  );
  const claims = fc.dictionary(anyString, fc.oneof(anyString, fc.jsonValue({ depthSize: 'small' })));

  it('is printable ASCII only and JSON.parse round-trips any claims, compact or pretty-printed', () => {
    fc.assert(
      fc.property(claims, fc.constantFrom(undefined, 2, '\t'), (value, indent) => {
        const encoded = encodeClaims(JSON.stringify(value, null, indent));
        expect(encoded).toMatch(/^[\x20-\x7e]*$/);
        expect(JSON.parse(encoded)).toEqual(JSON.parse(JSON.stringify(value)));
      }),
      { numRuns: 1000 },
    );
  });

  it('escapes the characters HTTP stacks mangle', () => {
    const value = { a: 'é', b: '\u007f', c: '😀', d: '\n\r\u0000', e: '\u2028' };
    const encoded = encodeClaims(JSON.stringify(value));
    expect(encoded).toBe('{"a":"\\u00e9","b":"\\u007f","c":"\\ud83d\\ude00","d":"\\n\\r\\u0000","e":"\\u2028"}');
    expect(JSON.parse(encoded)).toEqual(value);
  });

  it('keeps numbers as signed: no rounding of 64-bit ids, no null for 1e400', () => {
    const json = '{"user_id":1234567890123456789,"big":1e400,"neg":-0,"f":0.1000000000000000055511151231257827}';
    expect(encodeClaims(json)).toBe(json);
  });
});

describe('hasDuplicateKeys', () => {
  it.each([
    ['{"role":"authenticated","role":"service_role"}', true],
    ['{"a":1,"\\u0061":2}', true],
    ['{"x":{"k":1,"k":2}}', true],
    ['{"x":[{"k":1},{"k":2}],"k":3}', false],
    ['{"a":{"a":{"a":1}}}', false],
    ['{"__proto__":1,"constructor":2,"toString":3}', false],
  ])('%s -> %s', (json, expected) => {
    expect(hasDuplicateKeys(json)).toBe(expected);
  });
});

describe('X-Pgstack-Claims is the payload as signed', () => {
  const id = () => identifier({ jwtSecret: SECRET });
  const signRaw = async (payloadJson: string) => {
    const head = b64url({ alg: 'HS256', typ: 'JWT' });
    const body = Buffer.from(payloadJson).toString('base64url');
    const mac = createHmac('sha256', SECRET).update(`${head}.${body}`).digest('base64url');
    return `${head}.${body}.${mac}`;
  };

  it('two users whose 64-bit ids differ in the last digits get different headers, each exactly its token', async () => {
    const exp = nowSec() + 600;
    for (const idValue of ['1234567890123456789', '1234567890123456790']) {
      const json = `{"role":"authenticated","sub":"u","user_id":${idValue},"exp":${exp}}`;
      const result = await bearer(id(), await signRaw(json));
      expectValid(result, 'authenticated', 'u');
      if (result.kind === 'valid') expect(result.identity.claimsHeader).toBe(json);
    }
  });

  it('a pretty-printed, non-ASCII payload arrives as one ASCII line that parses to the same claims', async () => {
    const json = JSON.stringify({ role: 'authenticated', sub: 'u', name: 'Zoë 😀', exp: nowSec() + 600 }, null, 2);
    const result = await bearer(id(), await signRaw(json));
    expectValid(result, 'authenticated', 'u');
    if (result.kind !== 'valid') return;
    expect(result.identity.claimsHeader).toMatch(/^[\x20-\x7e]+$/);
    expect(JSON.parse(result.identity.claimsHeader!)).toEqual(JSON.parse(json));
  });

  it('a payload naming a claim twice is invalid_token, whichever copy a parser would keep', async () => {
    const exp = nowSec() + 600;
    for (const json of [
      `{"role":"authenticated","sub":"u","role":"service_role","exp":${exp}}`,
      `{"role":"service_role","sub":"u","r\\u006fle":"authenticated","exp":${exp}}`,
      `{"role":"authenticated","sub":"u","app":{"tier":"free","tier":"pro"},"exp":${exp}}`,
      // Keys equal ignoring case, as Go's encoding/json and .NET match struct fields:
      `{"role":"authenticated","sub":"u","Role":"service_role","exp":${exp}}`,
      `{"role":"authenticated","sub":"u","ROLE":"service_role","exp":${exp}}`,
      `{"role":"authenticated","sub":"u","\u017fub":"admin","exp":${exp}}`, // long s folds to s
      `{"role":"authenticated","sub":"u","app":{"\u212aey":1,"key":2},"exp":${exp}}`, // Kelvin sign folds to k
      `{"role":"authenticated","sub":"u","iss":"pgstack","\u0130ss":"evil","exp":${exp}}`, // dotted capital I: Go's simple lowercase is i
      `{"role":"authenticated","sub":"u","\u0131ss":"evil","iss":"x","exp":${exp}}`, // dotless i uppercases to I
      `{"role":"authenticated","sub":"u","stra\u00dfe":1,"STRA\u1e9eE":2,"exp":${exp}}`, // capital sharp s lowercases to sharp s
      `{"role":"authenticated","sub":"u","\u03c3x":1,"\u03c2x":2,"exp":${exp}}`, // final and non-final sigma
      `{"role\\u0000":"service_role","role":"authenticated","sub":"u","exp":${exp}}`, // a C parser reads keys up to NUL (JSON escape)
      `{"role":"authenticated","sub":"u","x\\ud800":1,"x\\ufffd":2,"exp":${exp}}`, // Go reads a lone surrogate escape as U+FFFD
    ]) {
      expectInvalid(await bearer(id(), await signRaw(json)), 'invalid_token');
    }
  });

  it('keys that only look alike are not duplicates', async () => {
    const exp = nowSec() + 600;
    const json = `{"role":"authenticated","sub":"u","roles":["a"],"r\u00f4le":"x","app":{"Key":1},"key":2,"stra\u00dfe":1,"strasse":2,"first_name":1,"firstName":2,"i\u0307ss":3,"x\\ud800":1,"exp":${exp}}`;
    expectValid(await bearer(id(), await signRaw(json)), 'authenticated', 'u');
  });
});

describe('verified-token cache', () => {
  it('a token verified once is not verified again', async () => {
    const verify = vi.spyOn(globalThis.crypto.subtle, 'verify');
    const id = identifier({ jwtSecret: SECRET, jwks: JWKS });
    const token = await signWith(es, user());
    expectValid(await bearer(id, token), 'authenticated', 'user-1');
    const afterFirst = verify.mock.calls.length;
    expect(afterFirst).toBe(1);
    expectValid(await bearer(id, token), 'authenticated', 'user-1');
    expectValid(await bearer(id, token), 'authenticated', 'user-1');
    expect(verify.mock.calls.length).toBe(afterFirst);
  });

  it('with cacheSize 0 every request verifies (the spy sees the signature checks)', async () => {
    const verify = vi.spyOn(globalThis.crypto.subtle, 'verify');
    const id = identifier({ jwtSecret: SECRET, cacheSize: 0 });
    const token = await hs(user());
    await bearer(id, token);
    await bearer(id, token);
    expect(verify.mock.calls.length).toBe(2);
  });

  it('a cached token stops being accepted exactly at its exp', async () => {
    const verify = vi.spyOn(globalThis.crypto.subtle, 'verify');
    const id = identifier({ jwtSecret: SECRET, clockToleranceSec: 0 });
    const exp = nowSec() + 100;
    const token = await hs(user({ exp }));
    expectValid(await bearer(id, token), 'authenticated', 'user-1');
    clock = exp * 1000 - 1;
    expectValid(await bearer(id, token), 'authenticated', 'user-1');
    expect(verify.mock.calls.length).toBe(1); // served from the cache
    clock = exp * 1000;
    expectInvalid(await bearer(id, token), 'token_expired');
  });

  it('with the default leeway, a cached token is refused once past exp + leeway', async () => {
    const id = identifier({ jwtSecret: SECRET });
    const exp = nowSec() + 100;
    const token = await hs(user({ exp }));
    expectValid(await bearer(id, token), 'authenticated', 'user-1');
    clock = exp * 1000 + 6000;
    expectInvalid(await bearer(id, token), 'token_expired');
  });

  it('a cache entry lives at most 5 minutes, even for a long-lived token', async () => {
    const verify = vi.spyOn(globalThis.crypto.subtle, 'verify');
    const id = identifier({ jwtSecret: SECRET });
    const token = await hs(user({ exp: nowSec() + 86_400 }));
    await bearer(id, token);
    clock = T0 + 299_000;
    await bearer(id, token);
    expect(verify.mock.calls.length).toBe(1);
    clock = T0 + 301_000;
    expectValid(await bearer(id, token), 'authenticated', 'user-1');
    expect(verify.mock.calls.length).toBe(2);
  });

  it('the cache is bounded: the oldest entry is evicted', async () => {
    const verify = vi.spyOn(globalThis.crypto.subtle, 'verify');
    const id = identifier({ jwtSecret: SECRET, cacheSize: 2 });
    const [a, b, c] = await Promise.all(['a', 'b', 'c'].map((sub) => hs(user({ sub }))));
    for (const token of [a, b, c] as string[]) await bearer(id, token);
    expect(verify.mock.calls.length).toBe(3);
    await bearer(id, c as string); // still cached
    expect(verify.mock.calls.length).toBe(3);
    expectValid(await bearer(id, a as string), 'authenticated', 'a'); // evicted, verified again
    expect(verify.mock.calls.length).toBe(4);
  });

  it('invalid tokens are not cached as valid', async () => {
    const id = identifier({ jwtSecret: SECRET });
    const forged = await hs(user(), {}, 'forged-secret-forged-secret-forged-secret');
    expectInvalid(await bearer(id, forged), 'invalid_token');
    expectInvalid(await bearer(id, forged), 'invalid_token');
  });
});

describe('remote JWKS (jwksUrl) against a real server', () => {
  let server: JwksServer;
  beforeAll(async () => {
    server = await startJwksServer([]);
  });
  afterAll(async () => {
    await server.close();
  });
  const fresh = () => {
    server.keys = [es.publicJwk];
    server.hits = 0;
    server.status = 200;
    return identifier({ jwksUrl: server.url, cacheSize: 0 });
  };

  it('verifies a token with a key from the served set, fetching the set once', async () => {
    const id = fresh();
    expectValid(await bearer(id, await signWith(es, user())), 'authenticated', 'user-1');
    expectValid(await bearer(id, await signWith(es, user({ sub: 'two' }))), 'authenticated', 'two');
    expect(server.hits).toBe(1);
  });

  it('warm() fetches the set before the first request', async () => {
    const id = fresh();
    await id.warm();
    expect(server.hits).toBe(1);
    expectValid(await bearer(id, await signWith(es, user())), 'authenticated', 'user-1');
    expect(server.hits).toBe(1);
  });

  it('an unknown kid triggers exactly one refetch per 30 s cooldown, even when concurrent', async () => {
    const id = fresh();
    expectValid(await bearer(id, await signWith(es, user())), 'authenticated', 'user-1');
    expect(server.hits).toBe(1);
    const unknown = (kid: string) => signWith(esOther, user(), { kid });

    clock = T0 + 1_000; // within the cooldown of the first fetch
    expectInvalid(await bearer(id, await unknown('u-1')), 'invalid_token');
    expect(server.hits).toBe(1);

    clock = T0 + 31_000;
    expectInvalid(await bearer(id, await unknown('u-2')), 'invalid_token');
    expect(server.hits).toBe(2);
    clock = T0 + 32_000;
    expectInvalid(await bearer(id, await unknown('u-3')), 'invalid_token');
    expect(server.hits).toBe(2);

    clock = T0 + 62_000;
    const tokens = await Promise.all(['u-4', 'u-5', 'u-6', 'u-7', 'u-8'].map(unknown));
    const results = await Promise.all(tokens.map((t) => bearer(id, t)));
    for (const r of results) expectInvalid(r, 'invalid_token');
    expect(server.hits).toBe(3);
  });

  it('a burst of first requests before the set is loaded all wait for the one fetch and verify', async () => {
    const id = fresh();
    const tokens = await Promise.all(['a', 'b', 'c', 'd'].map((sub) => signWith(es, user({ sub }))));
    const results = await Promise.all(tokens.map((t) => bearer(id, t)));
    results.forEach((r, i) => expectValid(r, 'authenticated', ['a', 'b', 'c', 'd'][i] as string));
    expect(server.hits).toBe(1);
  });

  it('concurrent requests with a newly rotated kid all wait for the one refetch and verify', async () => {
    const id = fresh();
    expectValid(await bearer(id, await signWith(es, user())), 'authenticated', 'user-1');
    server.keys = [es.publicJwk, esOther.publicJwk];
    clock = T0 + 31_000;
    const tokens = await Promise.all(['a', 'b', 'c'].map((sub) => signWith(esOther, user({ sub }))));
    const results = await Promise.all(tokens.map((t) => bearer(id, t)));
    results.forEach((r, i) => expectValid(r, 'authenticated', ['a', 'b', 'c'][i] as string));
    expect(server.hits).toBe(2);
  });

  it('a key added at the server is picked up on its unknown kid (after the cooldown)', async () => {
    const id = fresh();
    expectValid(await bearer(id, await signWith(es, user())), 'authenticated', 'user-1');
    server.keys = [es.publicJwk, esOther.publicJwk];
    const rotated = await signWith(esOther, user({ sub: 'rotated' }));
    clock = T0 + 31_000;
    expectValid(await bearer(id, rotated), 'authenticated', 'rotated');
    expect(server.hits).toBe(2);
    expectValid(await bearer(id, await signWith(es, user())), 'authenticated', 'user-1');
  });

  it('a key removed at the server stops verifying once the set is refetched', async () => {
    const id = fresh();
    server.keys = [es.publicJwk, esOther.publicJwk];
    expectValid(await bearer(id, await signWith(esOther, user())), 'authenticated', 'user-1');
    server.keys = [es.publicJwk];
    clock = T0 + 11 * 60_000; // past the 10 min max age: a background refresh
    await bearer(id, await signWith(es, user()));
    await vi.waitFor(() => expect(server.hits).toBe(2));
    expectInvalid(await bearer(id, await signWith(esOther, user())), 'invalid_token');
  });

  it('a JWKS answering 500 before the first load: tokens are invalid (never fail open), nothing throws', async () => {
    const id = fresh();
    server.status = 500;
    expectInvalid(await bearer(id, await signWith(es, user())), 'invalid_token');
    expect(server.hits).toBe(1);
  });
});

describe('remote JWKS whose server goes down', () => {
  it('keeps verifying with the last good key set', async () => {
    const server = await startJwksServer([es.publicJwk]);
    const id = identifier({ jwksUrl: server.url, cacheSize: 0 });
    expectValid(await bearer(id, await signWith(es, user())), 'authenticated', 'user-1');
    expect(server.hits).toBe(1);
    await server.close();

    clock = T0 + 11 * 60_000; // stale: a background refresh is attempted and fails
    expectValid(await bearer(id, await signWith(es, user({ sub: 'after-outage' }))), 'authenticated', 'after-outage');
    clock = T0 + 12 * 60_000; // an unknown kid: the refetch fails, the old set stays
    expectInvalid(await bearer(id, await signWith(esOther, user(), { kid: 'new' })), 'invalid_token');
    clock = T0 + 13 * 60_000;
    expectValid(await bearer(id, await signWith(es, user({ sub: 'still' }))), 'authenticated', 'still');
    expect(server.hits).toBe(1);
  });
});
