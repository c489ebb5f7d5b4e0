/**
 * fast-check against the real Node host: random header sets (every x-pgstack, hop-by-hop
 * and forwarding spelling in random case and `_`/`-` forms, plus random names and values)
 * and random credentials, sent as separate header lines on a raw socket. Whatever is sent:
 * the gateway never answers 500, and the upstream receives exactly one X-Pgstack-Role and
 * X-Pgstack-Sub and at most one X-Pgstack-Claims, equal to what the credentials prove (a
 * model of DESIGN section 4 written independently of core/identity.ts).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { SignJWT, type JWTPayload } from 'jose';
import { TEST_SECRET } from '../support/gateway.ts';
import { expectIdentityLines, startSecurityHost, type SecurityHost } from '../support/security-host.ts';

let host: SecurityHost;

const nowSec = () => Math.floor(Date.now() / 1000);
const sign = (payload: JWTPayload, secret = TEST_SECRET) =>
  new SignJWT(payload).setProtectedHeader({ alg: 'HS256', typ: 'JWT' }).sign(new TextEncoder().encode(secret));

interface Proven {
  role: 'anon' | 'authenticated' | 'service_role';
  sub: string;
  claims: JWTPayload;
}
/** Each token kind and what it proves (undefined: it proves nothing, it is invalid). */
const TOKENS: Record<string, { token: string; proves: Proven | undefined }> = {};

beforeAll(async () => {
  host = await startSecurityHost();
  const exp = nowSec() + 3600;
  const claims: Record<string, JWTPayload> = {
    user: { role: 'authenticated', sub: 'user-1', email: 'ü@example.com', exp },
    service: { role: 'service_role', exp },
    serviceSub: { role: 'service_role', sub: 'svc-1', exp },
    anon: { role: 'anon', iss: 'supabase', exp },
  };
  for (const [kind, payload] of Object.entries(claims)) {
    TOKENS[kind] = { token: await sign(payload), proves: { role: payload['role'] as Proven['role'], sub: payload.role === 'anon' ? '' : (payload.sub ?? ''), claims: payload } };
  }
  TOKENS['expired'] = { token: await sign({ role: 'authenticated', sub: 'user-1', exp: nowSec() - 3600 }), proves: undefined };
  TOKENS['forged'] = { token: await sign({ role: 'service_role', sub: 'evil', exp }, 'not-the-secret-not-the-secret-not-the-secret'), proves: undefined };
  TOKENS['postgres'] = { token: await sign({ role: 'postgres', sub: 'user-1', exp }), proves: undefined };
  TOKENS['opaque'] = { token: 'sb_publishable_3ZqH4k1Yd8vX2cWmNa7PfQ', proves: undefined };
  TOKENS['garbage'] = { token: 'x.y.z', proves: undefined };
});
afterAll(async () => {
  expect(host?.canary.hits() ?? 0, 'the canary was reached').toBe(0);
  await host?.close();
});

/** Spells `base` with random case and `_` for some `-`, driven by `seed`'s bits. */
function spell(base: string, seed: number): string {
  return [...base]
    .map((c, i) => {
      const bit = (seed >>> (i % 31)) & 1;
      if (c === '-') return bit ? '_' : '-';
      return (seed >>> ((i * 7 + 3) % 31)) & 1 ? c.toUpperCase() : c;
    })
    .join('');
}

const BASES = [
  'x-pgstack-role', 'x-pgstack-sub', 'x-pgstack-claims', 'x-pgstack-other', 'x-pgstack-',
  'connection', 'keep-alive', 'te', 'trailer', 'upgrade', 'proxy-connection', 'proxy-authorization', 'http2-settings',
  'forwarded', 'x-forwarded-for', 'x-forwarded-proto', 'x-forwarded-host', 'x-forwarded-port', 'x-real-ip', 'true-client-ip', 'x-request-id',
];
/** Framing, the Host and the credentials are the property's to choose, not the random headers'. */
const RESERVED = new Set(['content-length', 'transfer-encoding', 'host', 'expect', 'authorization', 'apikey']);
const TOKEN_CHARS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$&*+.^`|~';

const headerName = fc.oneof(
  { arbitrary: fc.tuple(fc.constantFrom(...BASES), fc.integer({ min: 0, max: 0x7fffffff })).map(([b, s]) => spell(b, s)), weight: 4 },
  { arbitrary: fc.string({ unit: fc.constantFrom(...TOKEN_CHARS), minLength: 1, maxLength: 16 }), weight: 1 },
).filter((name) => !RESERVED.has(name.toLowerCase()));
const headerValue = fc.oneof(
  fc.stringMatching(/^[\x21-\x7e]([\x20-\x7e]{0,30}[\x21-\x7e])?$/),
  fc.constantFrom('service_role', 'authenticated', 'evil', '{"role":"service_role","sub":"evil"}', 'x-pgstack-role', 'X_Pgstack_Sub, x-pgstack-claims', 'keep-alive, x-pgstack-role', 'close', 'upgrade', 'h2c', 'websocket', '198.51.100.9', 'for=198.51.100.9'),
);

const tokenKind = fc.constantFrom('user', 'service', 'serviceSub', 'anon', 'expired', 'forged', 'postgres', 'opaque', 'garbage');
const authorizationLine = fc.tuple(fc.constantFrom('Bearer ', 'bearer ', 'BEARER  ', 'Basic ', ''), tokenKind);
const credentials = fc.record({
  authorization: fc.array(authorizationLine, { maxLength: 2 }),
  apikey: fc.array(tokenKind, { maxLength: 2 }),
});

type Outcome = { kind: 'none' } | { kind: 'valid'; proven: Proven } | { kind: 'invalid' };

/** DESIGN section 4, as a model: what the credential lines prove. */
function model(auth: [string, string][], apikeys: string[]): Outcome {
  // Repeated lines are joined with ", " by the listener: never a single credential.
  const bearer: Outcome | undefined =
    auth.length === 0
      ? undefined
      : auth.length > 1 || !/^bearer +$/i.test(auth[0]![0])
        ? { kind: 'invalid' }
        : TOKENS[auth[0]![1]]!.proves
          ? { kind: 'valid', proven: TOKENS[auth[0]![1]]!.proves! }
          : { kind: 'invalid' };
  const key: Outcome | undefined =
    apikeys.length === 0 ? undefined : apikeys.length > 1 || !TOKENS[apikeys[0]!]!.proves ? { kind: 'invalid' } : { kind: 'valid', proven: TOKENS[apikeys[0]!]!.proves! };
  if (bearer?.kind === 'invalid' || key?.kind === 'invalid') return { kind: 'invalid' };
  return bearer ?? key ?? { kind: 'none' };
}

describe('property: random headers and credentials through the Node host', () => {
  it('the upstream gets exactly one role/sub and at most one claims, equal to what the credentials prove; never a 500', async () => {
    const started = Date.now();
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(headerName, headerValue), { maxLength: 14 }),
        credentials,
        fc.constantFrom('open', 'secure'),
        fc.constantFrom('GET', 'POST'),
        async (random, creds, fn, method) => {
          const lines: [string, string][] = [...random];
          for (const [scheme, kind] of creds.authorization) lines.splice(Math.floor(lines.length / 2), 0, ['Authorization', `${scheme}${TOKENS[kind]!.token}`]);
          for (const kind of creds.apikey) lines.push(['apikey', TOKENS[kind]!.token]);
          await host.drain(0);
          const res = await host.request(`/functions/v1/${fn}`, { method, headers: lines, ...(method === 'POST' ? { body: 'payload' } : {}) });
          const text = await res.text();
          const seen = await host.drain(0);
          expect(res.status, text).not.toBe(500);

          const outcome = model(creds.authorization, creds.apikey);
          const upgrade = lines.filter(([n]) => n.toLowerCase() === 'upgrade').map(([, v]) => v).join(', ');
          const authorized = fn === 'open' || (outcome.kind === 'valid' && outcome.proven.role !== 'anon');
          if (!authorized) {
            expect(res.status, text).toBe(401);
            expect(seen).toEqual([]);
            return;
          }
          if (/\bwebsocket\b/i.test(upgrade)) {
            expect(res.status, text).toBe(501);
            expect(seen).toEqual([]);
            return;
          }
          expect(res.status, text).toBe(200);
          expect(seen).toHaveLength(1);
          const proven = outcome.kind === 'valid' ? outcome.proven : undefined;
          const headers = seen[0]!.headers;
          expectIdentityLines(headers, proven?.role ?? 'anon', proven?.sub ?? '');
          const claims = headers.filter(([n]) => n.toLowerCase() === 'x-pgstack-claims').map(([, v]) => JSON.parse(v) as unknown);
          expect(claims).toEqual(proven ? [proven.claims] : []);
          expect(seen[0]!.body.toString()).toBe(method === 'POST' ? 'payload' : '');
        },
      ),
      { numRuns: 200 },
    );
    expect(Date.now() - started).toBeLessThan(20_000);
  });
});
