/**
 * Issue 4, item 7: HTTP edge cases that have broken other Node proxies, checked on the wire
 * with raw sockets where framing matters: Expect: 100-continue, bodiless answers (204, 304,
 * HEAD), repeated Set-Cookie, and answers the gateway gives before reading the body, which
 * must leave the connection usable or close it cleanly and say so.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { eventually, startTestGateway, type TestGateway } from '../support/gateway.ts';
import { expectGatewayErrorBody, header, headerAll, RawClient, requestText, startHttpUpstream, type RawResponse, type Upstream } from './support.ts';

const LIMIT = 1024 * 1024;

let db: TestDatabase;
let gw: TestGateway;
let upstream: Upstream;
let userToken: string;

/** Every request target the upstream received, in order. */
const received: string[] = [];

/** Requests in the upstream right now, and the most seen at once. */
let concurrent = 0;
let maxConcurrent = 0;

function handler(req: IncomingMessage, res: ServerResponse): void {
  received.push(req.url ?? '');
  concurrent++;
  maxConcurrent = Math.max(maxConcurrent, concurrent);
  res.once('close', () => concurrent--);
  const mode = /\/functions\/v1\/[^/]+\/?([\w-]*)/.exec(req.url ?? '')?.[1] ?? '';
  if (mode === 'early') {
    // Answers at once, without reading the body.
    res.writeHead(403, { 'content-type': 'text/plain', 'x-early': 'yes' });
    res.end('nope');
    return;
  }
  let bytes = 0;
  req.on('data', (d: Buffer) => (bytes += d.length));
  req.on('end', () => {
    switch (mode) {
      case 'no-content':
        res.writeHead(204, { 'x-custom': 'kept', 'cache-control': 'no-store' });
        res.end();
        return;
      case 'not-modified':
        res.writeHead(304, { etag: '"v1"', 'x-custom': 'kept' });
        res.end();
        return;
      case 'slow':
        setTimeout(() => res.end(JSON.stringify({ method: req.method, bytes, url: req.url })), 5);
        return;
      case 'cookies':
        res.setHeader('set-cookie', ['a=1; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly', 'b=2, c=3; Path=/']);
        res.end('cookies');
        return;
      default:
        res.setHeader('x-custom', 'kept');
        if (req.method === 'HEAD') {
          res.writeHead(200, { 'content-length': '1234', 'content-type': 'text/plain' });
          res.end();
          return;
        }
        res.end(JSON.stringify({ method: req.method, bytes }));
    }
  });
}

beforeAll(async () => {
  db = await createTestDatabase();
  upstream = await startHttpUpstream(handler);
  gw = await startTestGateway(db.url, { UPSTREAM_HOSTS: 'open-fn=127.0.0.1,locked-fn=127.0.0.1', MAX_BODY_BYTES: String(LIMIT) });
  await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('open-fn', 'http', false, $1), ('locked-fn', 'http', true, $1)", [
    `http://open-fn:${upstream.port}`,
  ]);
  await db.sql("UPDATE pgstack.edge_functions SET upstream_url = $1 WHERE name = 'locked-fn'", [`http://locked-fn:${upstream.port}`]);
  await eventually(() => gw.catalog.current()?.functions.get('locked-fn')?.upstream.origin.includes('locked-fn') ?? false, 5_000, 2);
  userToken = await gw.token('authenticated', 'u1');
}, 60_000);

afterAll(async () => {
  await gw?.stop();
  await upstream?.close();
  await db?.drop();
});

/** The next request on the same socket is answered normally. */
async function expectUsable(client: RawClient): Promise<void> {
  await client.write(requestText('GET', '/functions/v1/open-fn'));
  const next = await client.read();
  expect(next.status).toBe(200);
  expect(JSON.parse(next.body.toString())).toEqual({ method: 'GET', bytes: 0 });
}

describe('Expect: 100-continue', () => {
  it('the client gets 100 Continue, sends the body, and the upstream receives all of it', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('POST', '/functions/v1/open-fn', { expect: '100-continue', 'content-length': '11' }));
    const interim = await client.read();
    expect(interim.status).toBe(100);
    await client.write('hello world');
    const res = await client.read();
    expect(res.status).toBe(200);
    expect(JSON.parse(res.body.toString())).toEqual({ method: 'POST', bytes: 11 });
    await expectUsable(client);
    client.destroy();
  });

  it.each(['100-continue, x', '100-Continue ', 'foo, 100-continue'])('Expect: %s (a list with 100-continue in it) gets its 100 Continue too, never a stalled request', async (value) => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('POST', '/functions/v1/open-fn', { expect: value, 'content-length': '3' }));
    const interim = await client.read({ timeoutMs: 2_000 });
    expect(interim.status).toBe(100);
    await client.write('abc');
    const res = await client.read();
    expect(res.status).toBe(200);
    expect(JSON.parse(res.body.toString())).toEqual({ method: 'POST', bytes: 3 });
    client.destroy();
  });

  it('an anonymous caller of a verify_jwt function gets 401 without a 100 Continue first, so it never uploads its body', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('POST', '/functions/v1/locked-fn', { expect: '100-continue', 'content-length': String(512 * 1024) }));
    const res = await client.read();
    expect(res.status).toBe(401);
    expect(expectGatewayErrorBody(res.body.toString()).code).toBe('credentials_required');
    // The client may or may not send the body now; closing is the only framing both sides agree on.
    expect(header(res, 'connection')).toBe('close');
    client.destroy();
  });

  it('an authorized caller of a verify_jwt function gets 100 Continue, and the body reaches the function', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('POST', '/functions/v1/locked-fn', { expect: '100-continue', 'content-length': '5', authorization: `Bearer ${userToken}` }));
    expect((await client.read()).status).toBe(100);
    await client.write('abcde');
    const res = await client.read();
    expect(res.status).toBe(200);
    expect(JSON.parse(res.body.toString())).toEqual({ method: 'POST', bytes: 5 });
    client.destroy();
  });

  it('an early answer from the upstream (without reading the body) is relayed', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('POST', '/functions/v1/open-fn/early', { expect: '100-continue', 'content-length': String(256 * 1024) }));
    let res = await client.read();
    if (res.status === 100) {
      await client.write(Buffer.alloc(256 * 1024, 'e')).catch(() => {});
      res = await client.read();
    }
    expect(res.status).toBe(403);
    expect(header(res, 'x-early')).toBe('yes');
    expect(res.body.toString()).toBe('nope');
    expect(res.complete).toBe(true);
    client.destroy();
  });
});

describe('answers without a body', () => {
  it('204: headers intact, no body, the connection stays usable', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('GET', '/functions/v1/open-fn/no-content'));
    const res = await client.read();
    expect(res.status).toBe(204);
    expect(header(res, 'x-custom')).toBe('kept');
    expect(header(res, 'transfer-encoding')).toBeUndefined();
    await expectUsable(client);
    client.destroy();
  });

  it('304: ETag intact, no body, the connection stays usable', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('GET', '/functions/v1/open-fn/not-modified', { 'if-none-match': '"v1"' }));
    const res = await client.read();
    expect(res.status).toBe(304);
    expect(header(res, 'etag')).toBe('"v1"');
    expect(header(res, 'x-custom')).toBe('kept');
    await expectUsable(client);
    client.destroy();
  });

  it('HEAD: the upstream Content-Length and headers come back, no body bytes follow', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('HEAD', '/functions/v1/open-fn'));
    const res = await client.read({ head: true });
    expect(res.status).toBe(200);
    expect(header(res, 'content-length')).toBe('1234');
    expect(header(res, 'x-custom')).toBe('kept');
    await expectUsable(client); // would fail to parse if body bytes had followed the HEAD answer
    client.destroy();
  });
});

it('two Set-Cookie headers from the upstream reach the client as two header lines, values intact', async () => {
  const client = await RawClient.connect(gw.port);
  await client.write(requestText('GET', '/functions/v1/open-fn/cookies'));
  const res = await client.read();
  expect(res.status).toBe(200);
  expect(headerAll(res, 'set-cookie')).toEqual(['a=1; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT; HttpOnly', 'b=2, c=3; Path=/']);
  client.destroy();
});

describe('a gateway answer given before the body was read', () => {
  const cases: Array<[string, string, Record<string, string>, number]> = [
    ['401 on a verify_jwt function', '/functions/v1/locked-fn', {}, 401],
    ['404 for an unknown function', '/functions/v1/no-such-fn', {}, 404],
    ['405 for a refused method', '/functions/v1/open-fn', {}, 405],
  ];
  for (const [what, path, headers, status] of cases) {
    it(`${what}, with a small body: the keep-alive connection serves the next request`, async () => {
      const client = await RawClient.connect(gw.port);
      const body = 'x'.repeat(2_000);
      await client.write(requestText(status === 405 ? 'TRACE' : 'POST', path, { ...headers, 'content-length': String(body.length) }, body));
      const res = await client.read();
      expect(res.status).toBe(status);
      expectGatewayErrorBody(res.body.toString());
      expect(header(res, 'connection')).not.toBe('close');
      await expectUsable(client);
      client.destroy();
    });
  }

  it('early answers on one keep-alive connection leave nothing behind on its socket (no listener, no request kept per answer)', async () => {
    const sockets: Array<import('node:net').Socket> = [];
    const onConnection = (socket: import('node:net').Socket) => sockets.push(socket);
    gw.server.on('connection', onConnection);
    try {
      const client = await RawClient.connect(gw.port);
      await eventually(() => sockets.length === 1);
      const before = sockets[0]!.listenerCount('close');
      const body = 'y'.repeat(500);
      for (let i = 0; i < 30; i++) {
        // The head alone first: the 401 goes out before the body has arrived, then the body
        // follows and is drained, and the connection serves the next request.
        await client.write(requestText('POST', '/functions/v1/locked-fn', { 'content-length': String(body.length) }));
        const res = await client.read();
        expect(res.status).toBe(401);
        await client.write(body);
      }
      await expectUsable(client);
      expect(sockets).toHaveLength(1);
      expect(sockets[0]!.listenerCount('close')).toBeLessThanOrEqual(before + 1);
      client.destroy();
    } finally {
      gw.server.off('connection', onConnection);
    }
  });

  it('a small announced body that never arrives does not hold the connection forever', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('POST', '/functions/v1/locked-fn', { 'content-length': '1000' }, 'only ten b'));
    const res = await client.read();
    expect(res.status).toBe(401);
    const answered = Date.now();
    await client.waitClosed(10_000); // the drain after an early answer is bounded (5 s)
    expect(Date.now() - answered).toBeLessThan(8_000);
  }, 15_000);

  it('413 by Content-Length: answered at once, then a clean close announced with Connection: close', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('POST', '/functions/v1/open-fn', { 'content-length': String(LIMIT + 1) }));
    const res = await client.read({ timeoutMs: 2_000 });
    expect(res.status).toBe(413);
    expect(header(res, 'connection')).toBe('close');
    // The client, told so, stops; the gateway's close is clean (FIN, not RST).
    client.socket.end();
    await client.waitClosed(8_000);
    expect(client.error).toBeUndefined();
  });

  for (const framing of ['content-length', 'chunked'] as const) {
    it(`a 401 sent while a large ${framing} body is still arriving reaches the client intact (no reset eats it)`, async () => {
      const total = 16 * LIMIT; // 16 MiB, well past what any socket buffer holds
      const client = await RawClient.connect(gw.port);
      const head = requestText('POST', '/functions/v1/locked-fn', framing === 'chunked' ? { 'transfer-encoding': 'chunked' } : { 'content-length': String(total) });
      await client.write(head);
      let answered: RawResponse | undefined;
      let readError: unknown;
      const reading = client.read({ timeoutMs: 10_000 }).then(
        (r) => (answered = r),
        (err: unknown) => (readError = err),
      );
      // Keep sending (respecting backpressure) until the answer arrives or the body is done.
      const chunk = Buffer.alloc(64 * 1024, 'z');
      let sent = 0;
      let writeError: unknown;
      while (!answered && readError === undefined && sent < total) {
        const data = framing === 'chunked' ? Buffer.concat([Buffer.from(`${chunk.length.toString(16)}\r\n`), chunk, Buffer.from('\r\n')]) : chunk;
        try {
          await client.write(data);
        } catch (err) {
          writeError = err;
          break;
        }
        sent += chunk.length;
      }
      await reading;
      expect(readError).toBeUndefined();
      expect(answered!.status).toBe(401);
      expect(answered!.complete).toBe(true);
      expect(expectGatewayErrorBody(answered!.body.toString()).code).toBe('credentials_required');
      console.log(`[http-edges] 401 with a ${framing} body: answered after ${(sent / 1024).toFixed(0)} KiB sent; connection: ${header(answered!, 'connection')}; write error: ${String(writeError ?? 'none')}`);
      // Either the connection is announced closed (and then closes cleanly), or it stays usable.
      if (header(answered!, 'connection') === 'close') {
        client.socket.end();
        await client.waitClosed(8_000);
        expect(client.error).toBeUndefined();
      } else {
        if (framing === 'chunked') await client.write('0\r\n\r\n');
        else if (sent < total) await client.write(Buffer.alloc(total - sent, 'z'));
        await expectUsable(client);
      }
      client.destroy();
    });
  }

  it('a request that succeeds after all this: the authenticated call passes', async () => {
    const res = await gw.call('/functions/v1/locked-fn', { method: 'POST', headers: { authorization: `Bearer ${userToken}` }, body: 'ok' });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ method: 'POST', bytes: 2 });
  });
});

// RFC 9112 9.6: a server that answered with `Connection: close` does not process anything
// more it receives on that connection. While the connection lingers (reading and dropping
// what the client still sends), a complete request among those bytes is never routed.
describe('after an answer that says Connection: close', () => {
  // Each opener is followed by the rest of its body, complete, then a request.
  const openers: Array<[string, string, string]> = [
    ['401 to an anonymous Expect: 100-continue', requestText('POST', '/functions/v1/locked-fn', { expect: '100-continue', 'content-length': '5' }), 'hello'],
    ['401 before a large declared body', requestText('POST', '/functions/v1/locked-fn', { 'content-length': String(512 * 1024) }), 'x'.repeat(512 * 1024)],
    ['404 before a chunked body', requestText('POST', '/functions/v1/no-such-fn', { 'transfer-encoding': 'chunked' }), '5\r\nhello\r\n0\r\n\r\n'],
    ['413 before a body over the limit', requestText('POST', '/functions/v1/open-fn', { 'content-length': String(LIMIT + 1) }), 'y'.repeat(LIMIT + 1)],
  ];
  it.each(openers)('%s: a request sent after it never reaches the function, and is not answered', async (_, opener, rest) => {
    const marker = `after-close-${Math.random().toString(36).slice(2)}`;
    const client = await RawClient.connect(gw.port);
    await client.write(opener);
    const first = await client.read();
    expect(first.status).toBeGreaterThanOrEqual(400);
    expect(header(first, 'connection')).toBe('close');
    // The answer's FIN may already be here: the connection is half-closed, still read.
    await client.write(rest + requestText('GET', `/functions/v1/open-fn/${marker}`)).catch(() => {});
    await new Promise((resolve) => setTimeout(resolve, 500));
    expect(received.filter((url) => url.includes(marker))).toEqual([]);
    await client.waitClosed(8_000);
    client.destroy();
  });
});

describe('pipelining', () => {
  it('requests pipelined on one connection run one at a time, in order, and all are answered', async () => {
    maxConcurrent = 0;
    const client = await RawClient.connect(gw.port);
    const n = 60;
    await client.write(Array.from({ length: n }, (_, i) => requestText('GET', `/functions/v1/open-fn/slow?i=${i}`)).join(''));
    for (let i = 0; i < n; i++) {
      const res = await client.read();
      expect(res.status).toBe(200);
      expect((JSON.parse(res.body.toString()) as { url: string }).url).toBe(`/functions/v1/open-fn/slow?i=${i}`);
    }
    expect(maxConcurrent).toBe(1);
    client.destroy();
  });

  it('a flood pipelined after a Connection: close answer is dropped, the connection closed, and the gateway stays responsive', async () => {
    const before = received.length;
    const client = await RawClient.connect(gw.port, '127.0.0.1', { allowHalfOpen: true });
    const closed = new Promise<number>((resolve) => client.socket.once('close', () => resolve(Date.now())));
    await client.write(requestText('POST', '/functions/v1/locked-fn', { expect: '100-continue', 'content-length': '5' }));
    const first = await client.read();
    expect([first.status, header(first, 'connection')]).toEqual([401, 'close']);
    // The body after all, then 20,000 requests in ~1 MiB, sent while the connection lingers.
    const flood = Buffer.from('hello' + requestText('GET', '/functions/v1/open-fn/flood').repeat(20_000));
    client.socket.on('error', () => {}); // the reset that ends it
    client.socket.write(flood, () => {});
    const started = Date.now();
    const health = await fetch(`http://127.0.0.1:${gw.port}/healthz`, { signal: AbortSignal.timeout(5_000) });
    expect(health.status).toBe(200);
    expect(Date.now() - started).toBeLessThan(1_000);
    // Closed once it had brought a handful of requests, not at the end of the 5 s linger: a
    // byte sent now meets a closed socket (a reset), not one still reading and dropping.
    await new Promise((r) => setTimeout(r, 300));
    client.socket.write('G', () => {});
    const closedAt = await Promise.race([closed, new Promise<number>((_, reject) => setTimeout(() => reject(new Error('the flooding connection was not closed')), 1_500))]);
    expect(closedAt - started).toBeLessThan(2_000);
    expect(received.slice(before).filter((u) => u.includes('/flood'))).toEqual([]);
    client.destroy();
  });
});
