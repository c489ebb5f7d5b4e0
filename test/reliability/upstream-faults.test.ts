/**
 * Issue 4, item 3: upstream faults through the real gateway (in-process Node host, real
 * PostgreSQL catalog, misbehaving upstream servers on loopback). Each fault ends in the
 * right status and code with nothing leaked, or, once the response head is relayed, in a
 * response the client can tell is broken (never a clean end).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { freePort } from '../../adapters/node/embedded.ts';
import { createUndiciForwarder } from '../../adapters/node/forwarder.ts';
import { buildSnapshot } from '../../core/index.ts';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { eventually, startTestGateway, type TestGateway } from '../support/gateway.ts';
import { expectGatewayErrorBody, RawClient, requestText, sleep, startHttpUpstream, startTcpUpstream, type Upstream } from './support.ts';

const HEADERS_TIMEOUT_MS = 600;
const ROW_DEADLINE_MS = 800;

let db: TestDatabase;
let gw: TestGateway;
const upstreams: Upstream[] = [];

async function register(name: string, port: number, extra: { timeoutMs?: number } = {}): Promise<void> {
  await db.sql('INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url, timeout_ms) VALUES ($1, $2, false, $3, $4)', [
    name,
    'http',
    `http://${name}:${port}`,
    extra.timeoutMs ?? null,
  ]);
  await eventually(() => gw.catalog.current()?.functions.has(name) ?? false, 5_000, 2);
}

/** The 502 a fault must produce: the code, x-relay-error, and a body of {code, message} only. */
async function expectFault(res: Response, code: string): Promise<void> {
  expect(res.status).toBe(502);
  expect(res.headers.get('x-relay-error')).toBe('true');
  const text = await res.text();
  const body = expectGatewayErrorBody(text);
  expect(body.code).toBe(code);
  // Nothing of the upstream (address, port, library error) reaches the client.
  expect(text).not.toMatch(/127\.0\.0\.1|ECONN|UND_ERR|undici|socket|:\d{2,5}\b/i);
}

/** The causes of the 'response cut before its end' lines for requests to `name`. */
function cutsFor(name: string): unknown[] {
  const ids = new Set(gw.logs.filter((l) => l['msg'] === 'request' && l['function'] === name).map((l) => l['request_id']));
  return gw.logs.filter((l) => l['msg'] === 'response cut before its end' && ids.has(l['request_id'])).map((l) => l['cause']);
}

beforeAll(async () => {
  db = await createTestDatabase();
  const names = ['refused', 'silent', 'stall-chunked', 'stall-length', 'reset-chunked', 'reset-length', 'reset-until-close', 'close-delimited', 'reset-late', 'slow-body', 'idle-close', 'idle-drop', 'reason', 'broken-chunk'];
  gw = await startTestGateway(db.url, {
    UPSTREAM_HOSTS: names.map((n) => `${n}=127.0.0.1`).join(','),
    UPSTREAM_HEADERS_TIMEOUT_MS: String(HEADERS_TIMEOUT_MS),
  });
  await gw.catalog.firstLoad();
}, 60_000);

afterAll(async () => {
  await gw?.stop();
  await Promise.all(upstreams.map((u) => u.close()));
  await db?.drop();
});

describe('upstream faults', () => {
  it("a reason phrase of any bytes (latin-1, UTF-8, DEL) is not relayed: the status and body are, and the gateway lives on", async () => {
    let reason = Buffer.alloc(0);
    const odd = await startTcpUpstream((socket) => {
      socket.once('data', () => socket.end(Buffer.concat([Buffer.from('HTTP/1.1 201 '), reason, Buffer.from('\r\nContent-Length: 2\r\n\r\nok')])));
    });
    upstreams.push(odd);
    await register('reason', odd.port);
    for (const bytes of [Buffer.from('Cr\xe9\xe9', 'latin1'), Buffer.from('OK\x7f', 'latin1'), Buffer.from('Ök€', 'utf8')]) {
      reason = bytes;
      const client = await RawClient.connect(gw.port);
      await client.write(requestText('GET', '/functions/v1/reason'));
      const res = await client.read();
      client.destroy();
      expect([res.status, res.body.toString()]).toEqual([201, 'ok']);
      expect((await gw.call('/healthz')).status).toBe(200);
    }
  });

  it('a head and a broken first chunk in one packet: never relayed as a good answer (502 when the failure is seen before the head goes out)', async () => {
    const broken = await startTcpUpstream((socket) => {
      socket.once('data', () => socket.end('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nAA\r\n0\r\n\r\n'));
    });
    upstreams.push(broken);
    await register('broken-chunk', broken.port);
    for (let i = 0; i < 5; i++) {
      const client = await RawClient.connect(gw.port);
      await client.write(requestText('GET', '/functions/v1/broken-chunk'));
      const outcome = await client.read({ timeoutMs: 5_000 }).then(
        (res) => res,
        () => 'closed without a response' as const,
      );
      client.destroy();
      // The 502 when the body's failure is known before the head is written; when it fails
      // right after (Node has not sent the head yet), the connection closes with nothing:
      // either way the client sees an error, never a 200 that looks whole.
      if (outcome === 'closed without a response') continue;
      if (outcome.status === 502) expect(expectGatewayErrorBody(outcome.body.toString()).code).toBe('upstream_bad_response');
      else expect([outcome.status, outcome.complete]).toEqual([200, false]);
    }
  });

  it('connection refused: 502 upstream_unreachable', async () => {
    await register('refused', await freePort());
    await expectFault(await gw.call('/functions/v1/refused', { method: 'POST', body: 'x' }), 'upstream_unreachable');
  });

  it('accepts but never answers: 502 upstream_headers_timeout after UPSTREAM_HEADERS_TIMEOUT_MS', async () => {
    const silent = await startTcpUpstream((socket) => socket.resume());
    upstreams.push(silent);
    await register('silent', silent.port);
    const started = Date.now();
    await expectFault(await gw.call('/functions/v1/silent'), 'upstream_headers_timeout');
    const took = Date.now() - started;
    expect(took).toBeGreaterThanOrEqual(HEADERS_TIMEOUT_MS - 50);
    expect(took).toBeLessThan(HEADERS_TIMEOUT_MS + 2_000);
  });

  for (const framing of ['chunked', 'length'] as const) {
    it(`answers the head then stalls the body (${framing}): the deadline cuts the response, the client sees it broken`, async () => {
      const name = `stall-${framing}`;
      const stall = await startTcpUpstream((socket) => {
        socket.once('data', () => {
          socket.write(
            framing === 'chunked'
              ? 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n'
              : 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nhello',
          );
          // ...and nothing more, ever.
        });
      });
      upstreams.push(stall);
      await register(name, stall.port, { timeoutMs: ROW_DEADLINE_MS });
      const client = await RawClient.connect(gw.port);
      const started = Date.now();
      await client.write(requestText('GET', `/functions/v1/${name}`));
      const res = await client.read({ timeoutMs: 10_000 });
      const took = Date.now() - started;
      expect(res.status).toBe(200);
      expect(res.body.toString()).toBe('hello');
      expect(res.complete).toBe(false);
      expect(client.closed).toBe(true);
      expect(took).toBeGreaterThanOrEqual(ROW_DEADLINE_MS - 50);
      expect(took).toBeLessThan(ROW_DEADLINE_MS + 3_000);
      // fetch() reports it as an error, not a short body.
      await expect(gw.call(`/functions/v1/${name}`).then((r) => r.text())).rejects.toThrow();
      // The request line went out at the head (200); the cut is reported and counted apart.
      expect(cutsFor(name)).toContain('deadline');
    });
  }

  const resetFramings = {
    chunked: 'Transfer-Encoding: chunked\r\n\r\n4\r\npart\r\n',
    length: 'Content-Length: 100\r\n\r\npart',
    // No length: the body runs until the connection closes, so only a FIN ends it cleanly.
    'until close': 'Connection: close\r\n\r\npart',
  };
  for (const [framing, rest] of Object.entries(resetFramings)) {
    it(`resets mid-body (${framing}): the client sees an error reading the body, never a clean end`, async () => {
      const name = `reset-${framing.replace(' ', '-')}`;
      const reset = await startTcpUpstream((socket) => {
        socket.once('data', () => {
          socket.write(`HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n${rest}`, () => {
            setTimeout(() => socket.resetAndDestroy(), 50);
          });
        });
      });
      upstreams.push(reset);
      await register(name, reset.port);
      const client = await RawClient.connect(gw.port);
      await client.write(requestText('GET', `/functions/v1/${name}`));
      const res = await client.read({ timeoutMs: 5_000 });
      expect(res.status).toBe(200);
      expect(res.body.toString()).toBe('part');
      expect(res.complete).toBe(false);
      await expect(gw.call(`/functions/v1/${name}`).then((r) => r.text())).rejects.toThrow();
      expect(cutsFor(name)).toContain('upstream');
      expect(await (await gw.call('/metrics')).text()).toMatch(/^pgstack_responses_cut_total\{cause="upstream"\} [1-9]/m);
    });
  }

  it('resets mid-body, to an HTTP/1.0 client (no framing of its own): the client sees a reset, never a clean end', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write('GET /functions/v1/reset-chunked HTTP/1.0\r\nHost: gw\r\n\r\n');
    const res = await client.read({ timeoutMs: 5_000 });
    expect(res.status).toBe(200);
    expect(res.body.toString()).toBe('part');
    expect(res.complete).toBe(false);
    expect(client.error).toBeDefined();
  });

  it('a head, then a reset before any body byte: the client has the status and a broken body, not an empty reply', async () => {
    const late = await startTcpUpstream((socket) => {
      socket.once('data', () => {
        socket.write('HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\n', () => {
          setTimeout(() => socket.resetAndDestroy(), 300);
        });
      });
    });
    upstreams.push(late);
    await register('reset-late', late.port);
    const client = await RawClient.connect(gw.port);
    const started = Date.now();
    await client.write(requestText('GET', '/functions/v1/reset-late'));
    const head = await client.read({ timeoutMs: 5_000 });
    expect(head.status).toBe(200);
    expect(head.body.length).toBe(0);
    expect(head.complete).toBe(false);
    expect(Date.now() - started).toBeGreaterThanOrEqual(250);
  });

  it('the head of a slow body leaves at once: the client has its status before the first byte of the body', async () => {
    const slow = await startTcpUpstream((socket) => {
      socket.once('data', () => {
        socket.write('HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n');
        setTimeout(() => socket.end('4\r\nlate\r\n0\r\n\r\n'), 1_000);
      });
    });
    upstreams.push(slow);
    await register('slow-body', slow.port);
    const started = Date.now();
    const res = await gw.call('/functions/v1/slow-body');
    expect(res.status).toBe(200);
    expect(Date.now() - started).toBeLessThan(800);
    expect(await res.text()).toBe('late');
    expect(Date.now() - started).toBeGreaterThanOrEqual(900);
  });

  it('closes cleanly after a body without a length (FIN, not a reset): relayed whole, ended cleanly', async () => {
    const closing = await startTcpUpstream((socket) => {
      socket.once('data', () => {
        socket.end('HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nwhole body');
      });
    });
    upstreams.push(closing);
    await register('close-delimited', closing.port);
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('GET', '/functions/v1/close-delimited'));
    const res = await client.read({ timeoutMs: 5_000 });
    expect(res.status).toBe(200);
    expect(res.body.toString()).toBe('whole body');
    expect(res.complete).toBe(true);
    expect(await (await gw.call('/functions/v1/close-delimited')).text()).toBe('whole body');
  });

  it('an upstream that closes idle keep-alive connections: every next request still succeeds', async () => {
    // Node's own server closes idle keep-alive connections after keepAliveTimeout; 150 ms
    // here, requests spaced around it so some land just after the close.
    let served = 0;
    const idle = await startHttpUpstream(
      (req, res) => {
        req.resume();
        req.on('end', () => {
          served++;
          res.end('ok');
        });
      },
      { keepAliveTimeoutMs: 150 },
    );
    upstreams.push(idle);
    await register('idle-close', idle.port);
    const statuses: number[] = [];
    for (let i = 0; i < 24; i++) {
      const method = i % 2 === 0 ? 'GET' : 'POST';
      const res = await gw.call('/functions/v1/idle-close', method === 'POST' ? { method, body: `n=${i}` } : {});
      statuses.push(res.status);
      await res.text();
      await sleep(100 + (i % 6) * 20); // 100..200 ms: before, at and after the upstream's idle close
    }
    expect(statuses.every((s) => s === 200)).toBe(true);
    expect(served).toBe(24);
  });

  it('an upstream that drops each connection shortly after answering (no Connection: close): no stale socket becomes a 502', async () => {
    const drop = await startTcpUpstream((socket) => {
      let buffered = '';
      socket.on('data', (d: Buffer) => {
        buffered += d.toString('latin1');
        if (!buffered.includes('\r\n\r\n')) return;
        buffered = '';
        socket.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok', () => setTimeout(() => socket.end(), 30));
      });
    });
    upstreams.push(drop);
    await register('idle-drop', drop.port);
    for (let i = 0; i < 12; i++) {
      const res = await gw.call('/functions/v1/idle-drop');
      expect(res.status).toBe(200);
      expect(await res.text()).toBe('ok');
      await sleep(i % 2 === 0 ? 60 : 5);
    }
  });
});

describe('a function replaced under the same name at a new address', () => {
  // The container behind a name is replaced: the old address stops answering and the name
  // now resolves elsewhere. The forwarder resolves the name on every new connection (no
  // cache), so the next connection goes to the new address. A DNS change cannot be made
  // here without touching the machine's resolver, so the name's resolution is changed
  // where the forwarder reads it: the UPSTREAM_HOSTS map, consulted by the same connect-time
  // lookup for every new connection (createUpstreamLookup). Old and new "containers" are
  // real servers on two loopback addresses, same port, as two containers would be.
  it('the next connection after the old one dies dials the new address', async () => {
    const port = await freePort();
    const old = await startHttpUpstream((_req, res) => res.end('old'), { host: '127.0.0.2', port });
    const fresh = await startHttpUpstream((_req, res) => res.end('new'), { host: '127.0.0.3', port });
    upstreams.push(fresh);
    const hosts = new Map([['fn', { address: '127.0.0.2' }]]);
    const forwarder = createUndiciForwarder({ connectTimeoutMs: 1_000, headersTimeoutMs: 2_000, upstreamHosts: hosts });
    const fn = buildSnapshot([{ name: 'fn', runtime: 'http', verify_jwt: false, upstream_url: `http://fn:${port}` }]).functions.get('fn')!;
    const call = async () => {
      const res = await forwarder.forward({
        fn,
        method: 'GET',
        url: `${fn.upstream.origin}/functions/v1/fn`,
        path: '/functions/v1/fn',
        headers: new Headers(),
        body: null,
        signal: new AbortController().signal,
        deadlineMs: 5_000,
      });
      return res.text();
    };
    try {
      expect(await call()).toBe('old');
      expect(await call()).toBe('old'); // pooled connection reused
      // Replace: the old server goes away (its connections with it), the name moves.
      await old.close();
      hosts.set('fn', { address: '127.0.0.3' });
      expect(await call()).toBe('new');
      expect(await call()).toBe('new');
    } finally {
      await forwarder.close();
    }
  });

  it('a connection refused at the old address is not cached: once the name points elsewhere, calls succeed', async () => {
    const port = await freePort();
    const fresh = await startHttpUpstream((_req, res) => res.end('new'), { host: '127.0.0.3', port });
    upstreams.push(fresh);
    const hosts = new Map([['fn', { address: '127.0.0.2' }]]); // nothing listens there
    const forwarder = createUndiciForwarder({ connectTimeoutMs: 1_000, headersTimeoutMs: 2_000, upstreamHosts: hosts });
    const fn = buildSnapshot([{ name: 'fn', runtime: 'http', verify_jwt: false, upstream_url: `http://fn:${port}` }]).functions.get('fn')!;
    const req = () => ({
      fn,
      method: 'GET',
      url: `${fn.upstream.origin}/x`,
      path: '/x',
      headers: new Headers(),
      body: null,
      signal: new AbortController().signal,
      deadlineMs: 5_000,
    });
    try {
      await expect(forwarder.forward(req())).rejects.toMatchObject({ kind: 'unreachable' });
      hosts.set('fn', { address: '127.0.0.3' });
      expect(await (await forwarder.forward(req())).text()).toBe('new');
    } finally {
      await forwarder.close();
    }
  });
});

