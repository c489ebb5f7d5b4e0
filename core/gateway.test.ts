import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { SignJWT, type JWTPayload } from 'jose';
import { buildSnapshot, type CatalogRow, type CatalogSnapshot } from './catalog.ts';
import { contractSuite, type Echo } from './contract.case.ts';
import { ForwardError, type ForwardFailure, type ForwardRequest, type Forwarder } from './forwarder.ts';
import { createGateway, type GatewayConfig, type GatewayDeps } from './gateway.ts';

const SECRET = 'core-contract-secret-at-least-32-characters-long';
const MiB = 1024 * 1024;

const ROWS: CatalogRow[] = [
  { name: 'open', runtime: 'http', verify_jwt: false, upstream_url: 'http://echo:8000' },
  { name: 'secure', runtime: 'http', verify_jwt: true, upstream_url: 'http://echo:8000' },
  { name: 'fails', runtime: 'http', verify_jwt: false, upstream_url: 'http://echo:8000' },
];

/** The examples/functions echo, in memory: answers from the ForwardRequest the core built. */
async function echoUpstream(req: ForwardRequest): Promise<Response> {
  const bytes = req.body ? new Uint8Array(await new Response(req.body).arrayBuffer()) : new Uint8Array();
  const fn = req.path.split('?')[0]?.split('/')[3] ?? '';
  if (fn === 'fails') return new Response('{"own":"error"}', { status: 503, headers: { 'content-type': 'application/json' } });
  // Web Headers merge repeated names into one entry: one array element per entry.
  // A null-prototype map: a header named `constructor` or `__proto__` is just a header.
  const headers: Record<string, string[]> = Object.create(null) as Record<string, string[]>;
  for (const [name, value] of req.headers) (headers[name] ??= []).push(value);
  const claims = req.headers.get('x-pgstack-claims');
  const echo: Echo = {
    function: fn,
    method: req.method,
    path: req.path,
    role: req.headers.get('x-pgstack-role'),
    sub: req.headers.get('x-pgstack-sub'),
    claims: claims === null ? null : (JSON.parse(claims) as Record<string, unknown>),
    headers,
    body: new TextDecoder().decode(bytes),
    bodyBytes: bytes.byteLength,
    runtime: 'memory',
  };
  return new Response(req.method === 'HEAD' ? null : JSON.stringify(echo), { status: 200, headers: { 'content-type': 'application/json' } });
}

const CONFIG: GatewayConfig = { keys: { jwtSecret: SECRET }, limits: { maxBodyBytes: MiB } };

function makeGateway(deps: Partial<GatewayDeps> = {}, config: GatewayConfig = CONFIG) {
  const snapshot = buildSnapshot(ROWS);
  return createGateway(config, { catalog: () => snapshot, forward: echoUpstream, ...deps });
}

type Init = RequestInit & { headers?: Record<string, string> | [string, string][] };

/** What the in-memory host does: a Request plus the raw target the listener would see. */
function send(gateway: ReturnType<typeof makeGateway>, path: string, init?: Init): Promise<Response> {
  return gateway.fetch(new Request(`http://gateway.test${path}`, init), { rawTarget: path, clientAddress: '203.0.113.7' });
}

contractSuite('core', async () => {
  const gateway = makeGateway();
  return { secret: SECRET, request: (path, init) => send(gateway, path, init), close: async () => {} };
});

const sign = (payload: JWTPayload, secret = SECRET) =>
  new SignJWT(payload).setProtectedHeader({ alg: 'HS256', typ: 'JWT' }).sign(new TextEncoder().encode(secret));

async function errorBody(res: Response): Promise<{ code: string; message: string }> {
  expect(res.headers.get('x-relay-error')).toBe('true');
  return (await res.json()) as { code: string; message: string };
}

describe('core gateway: host-independent behaviour', () => {
  it('createGateway without any key throws at once, naming what is missing', () => {
    const deps = { catalog: () => undefined, forward: () => Promise.reject(new Error('unused')) };
    for (const keys of [{}, { jwtSecret: '' }, { jwtSecret: undefined, jwks: undefined, jwksUrl: undefined }]) {
      expect(() => createGateway({ keys }, deps)).toThrow(/config\.keys needs a jwtSecret, a jwks or a jwksUrl/);
    }
    expect(() => createGateway({ keys: { jwtSecret: SECRET } }, deps)).not.toThrow();
    expect(() => createGateway({ keys: { jwtSecret: 'x'.repeat(31) } }, deps)).toThrow(/at least 32 characters/);
  });

  it('catalog not loaded -> 503 catalog_not_loaded with Retry-After', async () => {
    const gateway = makeGateway({ catalog: () => undefined });
    const res = await send(gateway, '/functions/v1/open');
    expect(res.status).toBe(503);
    expect(res.headers.get('retry-after')).toMatch(/^\d+$/);
    expect((await errorBody(res)).code).toBe('catalog_not_loaded');
  });

  const kinds: [ForwardFailure, string][] = [
    ['unreachable', 'upstream_unreachable'],
    ['connect_timeout', 'upstream_connect_timeout'],
    ['headers_timeout', 'upstream_headers_timeout'],
    ['deadline', 'upstream_deadline'],
    ['blocked', 'upstream_blocked'],
    ['reset', 'upstream_reset'],
    ['bad_response', 'upstream_bad_response'],
  ];
  for (const [kind, code] of kinds) {
    it(`ForwardError('${kind}') -> 502 ${code}, without the cause's message`, async () => {
      const secretDetail = `connect ECONNREFUSED 10.9.8.7:5432 secret-detail-${kind}`;
      const gateway = makeGateway({
        forward: async () => {
          throw new ForwardError(kind, secretDetail, { cause: new Error(`inner ${secretDetail}`) });
        },
      });
      const res = await send(gateway, '/functions/v1/open');
      expect(res.status).toBe(502);
      const text = await res.text();
      expect(text).not.toContain('secret-detail');
      expect(text).not.toContain('10.9.8.7');
      expect(JSON.parse(text).code).toBe(code);
      expect(res.headers.get('x-relay-error')).toBe('true');
    });
  }

  it('a forwarder throwing a plain Error -> 502 upstream_unreachable, never 500', async () => {
    const gateway = makeGateway({
      forward: async () => {
        throw new TypeError('fetch failed: getaddrinfo ENOTFOUND echo secret-detail');
      },
    });
    const res = await send(gateway, '/functions/v1/open');
    expect(res.status).toBe(502);
    const text = await res.text();
    expect(JSON.parse(text).code).toBe('upstream_unreachable');
    expect(text).not.toContain('secret-detail');
  });

  it('a forwarder throwing a non-Error value -> 502 upstream_unreachable', async () => {
    const gateway = makeGateway({
      forward: () => Promise.reject('just a string'),
    });
    const res = await send(gateway, '/functions/v1/open');
    expect(res.status).toBe(502);
    expect((await errorBody(res)).code).toBe('upstream_unreachable');
  });

  it('a streamed body without Content-Length over the limit -> 413 payload_too_large', async () => {
    const chunk = new Uint8Array(64 * 1024).fill(97);
    let pulled = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        pulled++;
        if (pulled > 40) controller.close(); // 2.5 MiB in total, over the 1 MiB limit
        else controller.enqueue(chunk);
      },
    });
    const gateway = makeGateway();
    const res = await send(gateway, '/functions/v1/open', { method: 'POST', body, duplex: 'half' } as Init);
    expect(res.status).toBe(413);
    expect((await errorBody(res)).code).toBe('payload_too_large');
    expect(pulled).toBeLessThan(40); // cut off at the limit, not read to the end
  });

  it('a streamed body over the limit -> 413 even when the transport reports it as its own failure', async () => {
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (sent++ === 16) controller.close(); // 4 MiB in total
        else controller.enqueue(new Uint8Array(256 * 1024));
      },
    });
    // A real transport surfaces a failing request body as a socket error, not as the stream's reason.
    const gateway = makeGateway({
      forward: async (req) => {
        try {
          await new Response(req.body).arrayBuffer();
        } catch (cause) {
          throw new ForwardError('reset', 'other side closed', { cause });
        }
        return new Response('unreachable');
      },
    });
    const res = await send(gateway, '/functions/v1/open', { method: 'POST', body, duplex: 'half' } as Init);
    expect(res.status).toBe(413);
    expect((await errorBody(res)).code).toBe('payload_too_large');
  });

  it('a streamed body without Content-Length under the limit is forwarded whole', async () => {
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode('part one, '));
        controller.enqueue(new TextEncoder().encode('part two'));
        controller.close();
      },
    });
    const res = await send(makeGateway(), '/functions/v1/open', { method: 'POST', body, duplex: 'half' } as Init);
    const echo = (await res.json()) as Echo;
    expect(echo.body).toBe('part one, part two');
  });

  it('more header lines than maxHeaderLines -> 431 too_many_headers, never forwarded; the host count wins over the Request\'s', async () => {
    let calls = 0;
    const gateway = makeGateway({ forward: async (req) => (calls++, echoUpstream(req)) }, { ...CONFIG, limits: { ...CONFIG.limits, maxHeaderLines: 10 } });
    const lines = (n: number): [string, string][] => Array.from({ length: n }, (_, i) => [`x-h${i}`, 'v']);
    const over = await send(gateway, '/functions/v1/open', { headers: lines(11) });
    expect(over.status).toBe(431);
    expect((await errorBody(over)).code).toBe('too_many_headers');
    expect((await send(gateway, '/functions/v1/open', { headers: lines(10) })).status).toBe(200);
    // A host that saw more lines than the Request holds (repeated names joined) says so.
    const counted = await gateway.fetch(new Request('http://gateway.test/functions/v1/open'), { rawTarget: '/functions/v1/open', headerLines: 11 });
    expect(counted.status).toBe(431);
    expect(calls).toBe(1);
  });

  it('a websocket upgrade -> 501 upgrade_not_supported, never forwarded', async () => {
    let calls = 0;
    const gateway = makeGateway({
      forward: async (req) => {
        calls++;
        return echoUpstream(req);
      },
    });
    const res = await send(gateway, '/functions/v1/open', { headers: { connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-version': '13' } });
    expect(res.status).toBe(501);
    expect((await errorBody(res)).code).toBe('upgrade_not_supported');
    expect(calls).toBe(0);
  });

  it('the snapshot read at the start of a request is used for the whole request', async () => {
    const before = buildSnapshot(ROWS);
    // After the swap: `open` requires a JWT and points elsewhere.
    const after = buildSnapshot([{ name: 'open', runtime: 'http', verify_jwt: true, upstream_url: 'http://other:9000' }]);
    let current: CatalogSnapshot = before;
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    const seen: ForwardRequest[] = [];
    const gateway = makeGateway({
      catalog: () => {
        const snapshot = current;
        current = after; // any later read during this request would see the new catalog
        return snapshot;
      },
      forward: async (req) => {
        seen.push(req);
        await gate;
        return echoUpstream(req);
      },
    });
    const pending = send(gateway, '/functions/v1/open/x');
    await new Promise((resolve) => setTimeout(resolve, 10));
    expect(seen).toHaveLength(1);
    release();
    const res = await pending;
    expect(res.status).toBe(200);
    const echo = (await res.json()) as Echo;
    expect(echo.role).toBe('anon');
    expect(seen[0]?.url).toBe('http://echo:8000/functions/v1/open/x');
    expect(seen[0]?.fn.verifyJwt).toBe(false);
    // The next request sees the new catalog.
    const next = await send(gateway, '/functions/v1/open/x');
    expect(next.status).toBe(401);
  });

  it('drain() makes /readyz 503 and function calls 503 shutting_down', async () => {
    const gateway = makeGateway();
    expect((await send(gateway, '/readyz')).status).toBe(200);
    expect((await send(gateway, '/functions/v1/open')).status).toBe(200);
    gateway.drain();
    expect((await send(gateway, '/readyz')).status).toBe(503);
    const res = await send(gateway, '/functions/v1/open');
    expect(res.status).toBe(503);
    expect((await errorBody(res)).code).toBe('shutting_down');
    expect((await send(gateway, '/healthz')).status).toBe(200);
  });

  it('/readyz is 503 before the catalog loads and 200 after', async () => {
    let snapshot: CatalogSnapshot | undefined;
    const gateway = makeGateway({ catalog: () => snapshot });
    expect((await send(gateway, '/readyz')).status).toBe(503);
    snapshot = buildSnapshot(ROWS);
    const res = await send(gateway, '/readyz');
    expect(res.status).toBe(200);
    expect(((await res.json()) as { catalog: { functions: number } }).catalog.functions).toBe(3);
  });

  it("/readyz is 503 while the host's listener is not ready", async () => {
    let listening = false;
    const gateway = makeGateway({ ready: () => listening });
    expect((await send(gateway, '/readyz')).status).toBe(503);
    listening = true;
    expect((await send(gateway, '/readyz')).status).toBe(200);
  });

  it('/metrics renders counters that change after requests', async () => {
    const gateway = makeGateway({ extraMetrics: () => ['pgstack_catalog_functions 3'] });
    const scrape = async () => {
      const res = await send(gateway, '/metrics');
      expect(res.status).toBe(200);
      expect(res.headers.get('content-type')).toMatch(/^text\/plain/);
      return res.text();
    };
    const counter = (text: string, series: string) => {
      const line = text.split('\n').find((l) => l.startsWith(`${series} `));
      return line === undefined ? 0 : Number(line.slice(series.length + 1));
    };
    const okSeries = 'pgstack_requests_total{function="open",status="2xx"}';
    const errSeries = 'pgstack_gateway_errors_total{code="function_not_found"}';
    const first = await scrape();
    expect(first).toContain('pgstack_catalog_functions 3');
    expect(counter(first, okSeries)).toBe(0);
    await send(gateway, '/functions/v1/open');
    await send(gateway, '/functions/v1/open');
    await send(gateway, '/functions/v1/nope');
    const second = await scrape();
    expect(counter(second, okSeries)).toBe(2);
    expect(counter(second, errSeries)).toBe(1);
    expect(counter(second, 'pgstack_requests_in_flight')).toBe(1); // the scrape itself
  });

  it('response hop-by-hop headers are stripped; two Set-Cookie stay two', async () => {
    const gateway = makeGateway({
      forward: async () => {
        const headers = new Headers([
          ['connection', 'x-foo'],
          ['x-foo', 'named in connection'],
          ['keep-alive', 'timeout=5'],
          ['transfer-encoding', 'chunked'],
          ['proxy-authenticate', 'Basic'],
          ['x-kept', 'yes'],
        ]);
        headers.append('set-cookie', 'a=1; Path=/');
        headers.append('set-cookie', 'b=2; Path=/; HttpOnly');
        return new Response('hi', { status: 201, headers });
      },
    });
    const res = await send(gateway, '/functions/v1/open');
    expect(res.status).toBe(201);
    for (const name of ['connection', 'x-foo', 'keep-alive', 'transfer-encoding', 'proxy-authenticate']) expect(res.headers.has(name), name).toBe(false);
    expect(res.headers.get('x-kept')).toBe('yes');
    expect(res.headers.getSetCookie()).toEqual(['a=1; Path=/', 'b=2; Path=/; HttpOnly']);
    expect(res.headers.get('x-request-id')).toBeTruthy();
    expect(await res.text()).toBe('hi');
  });

  describe('a forwarder returning a Response with immutable headers', () => {
    let server: Server;
    let origin: string;
    beforeAll(async () => {
      server = createServer((req, res) => {
        res.setHeader('set-cookie', ['a=1', 'b=2']);
        res.setHeader('connection', 'keep-alive, x-foo');
        res.setHeader('x-foo', 'hop');
        res.setHeader('x-upstream', 'real');
        res.statusCode = 418;
        res.end(`from ${req.url}`);
      });
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      origin = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    });
    afterAll(async () => {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    });

    it('a real fetch() Response still gets x-request-id, hop-by-hop stripped, body and status kept', async () => {
      const forward: Forwarder = async (req) => {
        const res = await fetch(origin + req.path, { method: req.method, redirect: 'manual' });
        expect(() => res.headers.set('x-probe', '1')).toThrow(); // really immutable
        return res;
      };
      const res = await send(makeGateway({ forward }), '/functions/v1/open/p?q=1', { headers: { 'x-request-id': 'req-42' } });
      expect(res.status).toBe(418);
      expect(res.headers.get('x-request-id')).toBe('req-42');
      expect(res.headers.get('x-upstream')).toBe('real');
      expect(res.headers.has('x-foo')).toBe(false);
      expect(res.headers.has('connection')).toBe(false);
      expect(res.headers.getSetCookie()).toEqual(['a=1', 'b=2']);
      expect(await res.text()).toBe('from /functions/v1/open/p?q=1');
    });

    it('a Response.redirect() (immutable headers) is relayed, not followed, with x-request-id', async () => {
      const gateway = makeGateway({ forward: async () => Response.redirect('http://elsewhere.example/next', 307) });
      const res = await send(gateway, '/functions/v1/open');
      expect(res.status).toBe(307);
      expect(res.headers.get('location')).toBe('http://elsewhere.example/next');
      expect(res.headers.get('x-request-id')).toBeTruthy();
    });
  });

  describe('properties', () => {
    const HEADER_NAMES = [
      'X-Pgstack-Role', 'x-pgstack-role', 'X-PGSTACK-ROLE', 'X_Pgstack_Role', 'x_pgstack_role',
      'X-Pgstack-Sub', 'x-pgstack-sub', 'X_PGSTACK_SUB', 'X-Pgstack-Claims', 'x_pgstack_claims', 'X-PGSTACK-CLAIMS',
      'x-pgstack-anything', 'X_Pgstack_Other', 'x-pgstack-', 'x-pgstack-role-extra',
      'Connection', 'connection', 'Keep-Alive', 'TE', 'Trailer', 'Upgrade', 'Proxy-Authorization', 'Proxy-Connection',
      'Transfer-Encoding', 'HTTP2-Settings', 'X-Forwarded-For', 'Forwarded', 'X-Real-IP', 'X-Request-Id', 'Expect',
      'Host', 'Content-Type', 'Accept', 'X-Custom',
    ];
    const TOKEN_CHARS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$&*+.^`|~';
    const randomName = fc.string({ unit: fc.constantFrom(...TOKEN_CHARS), minLength: 1, maxLength: 20 });
    // Header values: visible ASCII and inner spaces (what a Headers object accepts after trimming).
    const value = fc.oneof(
      fc.string({ unit: fc.integer({ min: 0x20, max: 0x7e }).map((c) => String.fromCharCode(c)), maxLength: 40 }),
      fc.constantFrom('service_role', 'authenticated', 'x-pgstack-role', 'x-pgstack-role, x-pgstack-sub', 'keep-alive, x-pgstack-claims', '{"role":"service_role"}', ''),
    );
    // Credentials and framing are chosen by the property itself, never by the random headers.
    const notCredential = (n: string) => !['authorization', 'apikey', 'content-length'].includes(n.toLowerCase().replace(/_/g, '-'));
    const headerPair = fc.tuple(fc.oneof(fc.constantFrom(...HEADER_NAMES), randomName.filter(notCredential)), value).map(([n, v]): [string, string] => {
      // A websocket Upgrade is a separate, documented 501; h2c and others are dropped.
      if (n.toLowerCase() === 'upgrade' && /websocket/i.test(v)) return [n, 'h2c'];
      return [n, v];
    });

    let tokens: Record<string, string>;
    let proven: Record<string, { role: string; sub: string; claims: JWTPayload | null }>;
    beforeAll(async () => {
      const exp = Math.floor(Date.now() / 1000) + 3600;
      const user: JWTPayload = { role: 'authenticated', sub: 'user-9', exp, name: 'Zoë "Z" \\ 😀' };
      const service: JWTPayload = { role: 'service_role', exp };
      const anon: JWTPayload = { role: 'anon', exp };
      tokens = {
        user: `Bearer ${await sign(user)}`,
        service: `Bearer ${await sign(service)}`,
        anon: await sign(anon),
        garbage: `Bearer ${await sign(user, 'not-the-secret-not-the-secret-not-the-secret')}`,
      };
      proven = {
        none: { role: 'anon', sub: '', claims: null },
        user: { role: 'authenticated', sub: 'user-9', claims: user },
        service: { role: 'service_role', sub: '', claims: service },
        anon: { role: 'anon', sub: '', claims: anon },
        garbage: { role: 'anon', sub: '', claims: null },
      };
    });

    it('whatever headers a client sends, the upstream gets exactly the identity the credentials prove; never a 500', async () => {
      const seen: ForwardRequest[] = [];
      const gateway = makeGateway({
        forward: async (req) => {
          seen.push(req);
          return echoUpstream(req);
        },
      });
      await fc.assert(
        fc.asyncProperty(
          fc.array(headerPair, { maxLength: 12 }),
          fc.constantFrom('none', 'user', 'service', 'anon', 'garbage'),
          fc.constantFrom('open', 'secure'),
          async (pairs, credentials, fn) => {
            seen.length = 0;
            const headers = new Headers();
            for (const [n, v] of pairs) headers.append(n, v);
            if (credentials === 'anon') headers.set('apikey', tokens['anon'] as string);
            else if (credentials !== 'none') headers.set('authorization', tokens[credentials] as string);
            const res = await gateway.fetch(new Request(`http://gateway.test/functions/v1/${fn}`, { headers }), {
              rawTarget: `/functions/v1/${fn}`,
              clientAddress: '203.0.113.7',
            });
            expect(res.status).not.toBe(500);
            // RFC 9112 3.2: a Host that is not host[:port] (random text, two joined) is a 400.
            const host = headers.get('host');
            if (host && !/^(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$/.test(host)) {
              expect(res.status).toBe(400);
              expect(seen).toHaveLength(0);
              return;
            }
            // RFC 9112 6.1: a transfer coding other than chunked is refused (501) before anything.
            const codings = (headers.get('transfer-encoding') ?? '').split(',').map((c) => c.trim().toLowerCase());
            if (codings.some((c) => c !== '' && c !== 'chunked')) {
              expect(res.status).toBe(501);
              expect(seen).toHaveLength(0);
              return;
            }
            const expected = proven[credentials] as { role: string; sub: string; claims: JWTPayload | null };
            if (fn === 'secure' && expected.role === 'anon') {
              expect(res.status).toBe(401);
              expect(seen).toHaveLength(0);
              return;
            }
            expect(res.status).toBe(200);
            expect(seen).toHaveLength(1);
            const out = (seen[0] as ForwardRequest).headers;
            for (const [name] of out) {
              if (name.replace(/_/g, '-').startsWith('x-pgstack-')) expect(['x-pgstack-role', 'x-pgstack-sub', 'x-pgstack-claims']).toContain(name);
            }
            expect(out.get('x-pgstack-role')).toBe(expected.role);
            expect(out.get('x-pgstack-sub')).toBe(expected.sub);
            const claims = out.get('x-pgstack-claims');
            if (expected.claims === null) expect(claims).toBeNull();
            else expect(JSON.parse(claims as string)).toEqual(expected.claims);
          },
        ),
        { numRuns: 300 },
      );
    });

    it('for any URL-ish path, fetch never throws and never answers 500', async () => {
      const gateway = makeGateway();
      const URLISH = 'abcXYZ019-_.~%/?#&=+:;@!$\'()*,[]\\ "<>^`{|}\t\u00e9\u{1F600}';
      const segment = fc.string({ unit: fc.constantFrom(...[...URLISH]), maxLength: 30 });
      const path = fc.tuple(fc.constantFrom('/', '/functions/v1/', '/functions/v1/open', '/functions/v1/secure/', '//', '/healthz'), segment).map(([a, b]) => a + b);
      await fc.assert(
        fc.asyncProperty(path, fc.constantFrom('GET', 'POST', 'OPTIONS', 'PROPFIND'), async (p, method) => {
          let request: Request;
          try {
            request = new Request(`http://gateway.test${p.replace(/#/g, '%23')}`, { method });
          } catch {
            return; // not something a listener could hand the core
          }
          const res = await gateway.fetch(request, { rawTarget: p, clientAddress: '203.0.113.7' });
          expect(res.status).not.toBe(500);
          expect(res.status).toBeGreaterThanOrEqual(200);
        }),
        { numRuns: 500 },
      );
    });
  });
});

describe('loops, transfer codings, method overrides, client aborts', () => {
  it('a function whose upstream is the gateway itself is stopped at the second pass: 508 loop_detected, forwarded once', async () => {
    let forwards = 0;
    const gateway: ReturnType<typeof makeGateway> = makeGateway({
      // The "upstream" is this same gateway, as a row pointing at its own compose name would be.
      forward: async (req) => {
        forwards++;
        return gateway.fetch(new Request(`http://gateway.test${req.path}`, { method: req.method, headers: req.headers }), { rawTarget: req.path });
      },
    });
    const res = await send(gateway, '/functions/v1/open');
    expect(res.status).toBe(508);
    expect((await errorBody(res)).code).toBe('loop_detected');
    expect(forwards).toBe(1);
  });

  it('Via from other proxies passes and is extended; 16 or more hops is refused as a loop', async () => {
    const gateway = makeGateway();
    const ok = await send(gateway, '/functions/v1/open', { headers: { via: '1.1 cdn, 1.1 lb' } });
    expect(ok.status).toBe(200);
    expect(((await ok.json()) as Echo).headers['via']?.[0]).toMatch(/^1\.1 cdn, 1\.1 lb, 1\.1 pgstack-[0-9a-f]{8}$/);
    const many = Array.from({ length: 16 }, (_, i) => `1.1 p${i}`).join(', ');
    const refused = await send(gateway, '/functions/v1/open', { headers: { via: many } });
    expect(refused.status).toBe(508);
  });

  it('two gateways pointing at each other stop when the request comes back to the first', async () => {
    let hops = 0;
    const a: ReturnType<typeof makeGateway> = makeGateway({
      forward: async (req) => (hops++, b.fetch(new Request(`http://b.test${req.path}`, { headers: req.headers }), { rawTarget: req.path })),
    });
    const b: ReturnType<typeof makeGateway> = makeGateway({
      forward: async (req) => (hops++, a.fetch(new Request(`http://a.test${req.path}`, { headers: req.headers }), { rawTarget: req.path })),
    });
    const res = await send(a, '/functions/v1/open');
    expect(res.status).toBe(508);
    expect(hops).toBe(2);
  });

  it.each(['gzip', 'gzip, chunked', 'chunked, gzip', 'deflate', 'identity'])('Transfer-Encoding: %s -> 501 transfer_coding_not_supported, nothing forwarded', async (te) => {
    let forwards = 0;
    const gateway = makeGateway({ forward: async (req) => (forwards++, echoUpstream(req)) });
    const res = await send(gateway, '/functions/v1/open', { method: 'POST', headers: { 'transfer-encoding': te } });
    expect(res.status).toBe(501);
    expect((await errorBody(res)).code).toBe('transfer_coding_not_supported');
    expect(forwards).toBe(0);
  });

  const preflight = { origin: 'https://app.example', 'access-control-request-method': 'POST' };
  it('a plain CORS preflight on a verify_jwt function is forwarded as anon', async () => {
    const res = await send(makeGateway(), '/functions/v1/secure', { method: 'OPTIONS', headers: preflight });
    expect(res.status).toBe(200);
    expect(((await res.json()) as Echo).role).toBe('anon');
  });

  it('a preflight let through without credentials never brings a body, even one its headers do not show', async () => {
    // A body the Request has while its headers declare none (what a transport framing by a
    // header the Request does not carry would produce).
    const res = await send(makeGateway(), '/functions/v1/secure', { method: 'OPTIONS', headers: preflight, body: '{"delete_all":true}' });
    expect(res.status).toBe(200);
    const echo = (await res.json()) as Echo;
    expect(echo.role).toBe('anon');
    expect(echo.bodyBytes).toBe(0);
  });

  it.each([
    ['X-Original-Method', '/functions/v1/secure'],
    ['X-HTTP-Method-Override', '/functions/v1/secure'],
    ['x_http_method', '/functions/v1/secure'],
    ['X-Method', '/functions/v1/secure'],
    ['X-HTTP-Verb', '/functions/v1/secure'],
    ['X-Original-Verb', '/functions/v1/secure'],
  ])('a preflight carrying %s needs credentials on a verify_jwt function (401)', async (header, path) => {
    const res = await send(makeGateway(), path, { method: 'OPTIONS', headers: { ...preflight, [header]: 'POST' } });
    expect(res.status).toBe(401);
  });

  it.each([
    '/functions/v1/secure?_method=POST',
    '/functions/v1/secure?a=1&_METHOD=DELETE',
    '/functions/v1/secure?x=1;_method=DELETE',
    '/functions/v1/secure?%5Fmethod=DELETE',
    '/functions/v1/secure?.method=DELETE',
    '/functions/v1/secure?+method=DELETE',
    '/functions/v1/secure?_method[]=DELETE',
    '/functions/v1/secure?%20_method=DELETE',
    '/functions/v1/secure?+_method=DELETE',
    '/functions/v1/secure?_method%00x=DELETE',
    '/functions/v1/secure?_method%00=DELETE',
    '/functions/v1/secure?_method',
  ])('a preflight to %s (query method override) needs credentials (401)', async (path) => {
    const res = await send(makeGateway(), path, { method: 'OPTIONS', headers: preflight });
    expect(res.status).toBe(401);
  });

  it.each(['/functions/v1/secure?payment_method=card', '/functions/v1/secure?method=GET&x=%ZZ', '/functions/v1/secure?methods=a'])(
    'a preflight to %s (a query that is no override) stays a preflight',
    async (path) => {
      const res = await send(makeGateway(), path, { method: 'OPTIONS', headers: preflight });
      expect(res.status).toBe(200);
    },
  );

  it('a client that leaves while the upstream works is 499 client_closed_request, not an upstream failure', async () => {
    const client = new AbortController();
    const lines: Array<Record<string, unknown>> = [];
    const gateway = makeGateway({
      log: (level, msg, fields) => lines.push({ level, msg, ...fields }),
      forward: (req) =>
        new Promise((_, reject) => {
          req.signal.addEventListener('abort', () => reject(req.signal.reason));
          client.abort(new DOMException('client went away', 'AbortError'));
        }),
    });
    const res = await gateway.fetch(new Request('http://gateway.test/functions/v1/open'), { rawTarget: '/functions/v1/open', signal: client.signal });
    expect(res.status).toBe(499);
    expect((await errorBody(res)).code).toBe('client_closed_request');
    expect(lines.some((l) => l['level'] === 'warn' || l['level'] === 'error')).toBe(false);
    expect(gateway.metrics.render()).toContain('pgstack_gateway_errors_total{code="client_closed_request"} 1');
    expect(gateway.metrics.render()).not.toContain('upstream_unreachable');
  });
});
