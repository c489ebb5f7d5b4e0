/**
 * The Node host as an attacker meets it, for test/security/*: a test database with a small
 * catalog, the real gateway (listener, LISTEN catalog, undici forwarder), a counting echo
 * upstream (the only server any request may reach) and a canary on another port that must
 * never be reached.
 *
 * Catalog (every row proxies to the echo, mapped to 127.0.0.1 by UPSTREAM_HOSTS):
 *   open (verify_jwt=false), secure (true), fn (false), other (true), redirect (false; the
 *   echo answers it with a 302 to the canary).
 */
import { expect } from 'vitest';
import type { Role } from '../../core/index.ts';
import { createTestDatabase, type TestDatabase } from './db.ts';
import { startTestGateway, type TestGateway } from './gateway.ts';
import { exchange, sendRequest, type Exchange, type RawInit } from './raw-http.ts';
import { startCanary, startEchoUpstream, type Canary, type EchoUpstream, type Received } from './upstreams.ts';
import type { Echo } from '../../core/contract.case.ts';
export type { Echo };


export const FUNCTIONS: ReadonlyArray<readonly [name: string, verifyJwt: boolean]> = [
  ['open', false],
  ['secure', true],
  ['fn', false],
  ['other', true],
  ['redirect', false],
];

export interface SecurityHost {
  readonly db: TestDatabase;
  readonly gw: TestGateway;
  readonly echo: EchoUpstream;
  readonly canary: Canary;
  readonly port: number;
  /** One request with the target and header lines exactly as given. */
  request(path: string, init?: RawInit): Promise<Response>;
  /** Raw bytes on one connection; waits for the close or `waitMs`. */
  raw(bytes: string | Buffer | (string | Buffer)[], options?: { waitMs?: number; pauseMs?: number }): Promise<Exchange>;
  token(role: Role, sub?: string, claims?: Record<string, unknown>): Promise<string>;
  /**
   * Requests the echo received since the last call, after `settleMs` (default 50) for
   * anything still in flight. The echo records a request before answering it.
   */
  drain(settleMs?: number): Promise<Received[]>;
  /** Starts another gateway over the same catalog with extra env (e.g. TRUSTED_PROXIES). */
  another(env: Record<string, string>): Promise<TestGateway>;
  close(): Promise<void>;
}

export async function startSecurityHost(env: Record<string, string> = {}): Promise<SecurityHost> {
  const db = await createTestDatabase();
  const canary = await startCanary();
  const echo = await startEchoUpstream({
    special(segment, _req, res) {
      if (segment !== 'redirect') return false;
      res.writeHead(302, { location: `http://127.0.0.1:${canary.port}/stolen`, 'content-length': '0' });
      res.end();
      return true;
    },
  });
  for (const [name, verifyJwt] of FUNCTIONS) {
    await db.sql('INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ($1, $2, $3, $4)', [
      name,
      'http',
      verifyJwt,
      `http://echo:${echo.port}`,
    ]);
  }
  const baseEnv = { MAX_BODY_BYTES: '1048576', UPSTREAM_HOSTS: 'echo=127.0.0.1' };
  const gw = await startTestGateway(db.url, { ...baseEnv, ...env });
  await gw.catalog.firstLoad();
  const extra: TestGateway[] = [];
  let seen = 0;
  return {
    db,
    gw,
    echo,
    canary,
    port: gw.port,
    request: (path, init) => sendRequest(gw.port, path, init),
    raw: (bytes, options) => exchange(gw.port, bytes, options),
    token: (role, sub, claims) => gw.token(role, sub, claims),
    async drain(settleMs = 50) {
      if (settleMs > 0) await new Promise((r) => setTimeout(r, settleMs));
      const fresh = echo.received.slice(seen);
      seen = echo.received.length;
      return fresh;
    },
    async another(more) {
      const other = await startTestGateway(db.url, { ...baseEnv, ...env, ...more });
      await other.catalog.firstLoad();
      extra.push(other);
      return other;
    },
    async close() {
      for (const other of extra) await other.stop();
      await gw.stop();
      await echo.close();
      await canary.close();
      await db.drop();
    },
  };
}

/** The echo's JSON answer, asserting a 200 that is the function's, not the gateway's. */
export async function readEcho(res: Response): Promise<Echo> {
  const text = await res.text();
  expect(res.status, text).toBe(200);
  expect(res.headers.get('x-relay-error')).toBeNull();
  return JSON.parse(text) as Echo;
}

/** A gateway error: status and code. */
export async function expectError(res: Response, status: number, code: string): Promise<void> {
  const text = await res.text();
  expect(res.status, text).toBe(status);
  expect(res.headers.get('x-relay-error')).toBe('true');
  expect((JSON.parse(text) as { code: string }).code).toBe(code);
}

const IDENTITY = ['x-pgstack-role', 'x-pgstack-sub', 'x-pgstack-claims'];

/**
 * The upstream saw exactly one X-Pgstack-Role and X-Pgstack-Sub with these values, at most
 * one X-Pgstack-Claims, and no other header that any framework could read as x-pgstack-*.
 */
export function expectIdentityLines(headers: [string, string][], role: string, sub: string): void {
  const identity = headers.filter(([n]) => n.toLowerCase().replace(/_/g, '-').startsWith('x-pgstack-'));
  for (const [name] of identity) expect(IDENTITY, `unexpected upstream header ${name}`).toContain(name.toLowerCase());
  const values = (name: string) => identity.filter(([n]) => n.toLowerCase() === name).map(([, v]) => v);
  expect(values('x-pgstack-role')).toEqual([role]);
  expect(values('x-pgstack-sub')).toEqual([sub]);
  expect(values('x-pgstack-claims').length).toBeLessThanOrEqual(1);
}
