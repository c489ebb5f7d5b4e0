/**
 * Issue 4, item 4: what clients do to the gateway. A client that leaves cancels the upstream
 * exchange; a slow client back-pressures the upstream instead of being buffered for; bodies
 * over the limit get a prompt 413, announced by Content-Length or discovered while streaming.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from '../support/db.ts';
import { eventually, startTestGateway, type TestGateway } from '../support/gateway.ts';
import { expectGatewayErrorBody, header, RawClient, requestText, sleep, startHttpUpstream, until, within, type Upstream } from './support.ts';

const LIMIT = 64 * 1024;
const MiB = 1024 * 1024;

let db: TestDatabase;
let gw: TestGateway;
let upstream: Upstream;

/** What the upstream saw of each request, by the `x-probe` header the test sends. */
interface Seen {
  bodyBytes: number;
  /** The request or its response closed before the exchange completed. */
  aborted: boolean;
  closedAt?: number;
  written: number;
}
const seen = new Map<string, Seen>();
let requestsSeen = 0;

const CHUNK = Buffer.alloc(64 * 1024, 'x');

function handler(req: IncomingMessage, res: ServerResponse): void {
  requestsSeen++;
  const probe = String(req.headers['x-probe'] ?? '');
  const s: Seen = { bodyBytes: 0, aborted: false, written: 0 };
  seen.set(probe, s);
  const markClosed = () => {
    if (!res.writableFinished) {
      s.aborted = true;
      s.closedAt ??= Date.now();
    }
  };
  req.on('data', (d: Buffer) => (s.bodyBytes += d.length));
  req.on('error', markClosed);
  res.on('close', markClosed);
  const mode = /\/functions\/v1\/[^/]+\/(\w+)/.exec(req.url ?? '')?.[1];
  if (mode === 'hang') return; // never answers
  if (mode === 'trickle') {
    // Streams a chunk every 50 ms for at most 10 s.
    res.writeHead(200, { 'content-type': 'text/plain' });
    const timer = setInterval(() => {
      if (res.destroyed) return clearInterval(timer);
      res.write('tick\n');
    }, 50);
    setTimeout(() => {
      clearInterval(timer);
      res.end();
    }, 10_000).unref();
    res.on('close', () => clearInterval(timer));
    return;
  }
  if (mode === 'big') {
    // 1 GiB, written only as fast as the connection takes it.
    const total = 1024 * MiB;
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': String(total) });
    const pump = () => {
      while (s.written < total && !res.destroyed) {
        s.written += CHUNK.length;
        if (!res.write(CHUNK)) return void res.once('drain', pump);
      }
      if (!res.destroyed) res.end();
    };
    pump();
    return;
  }
  req.on('end', () => res.end(JSON.stringify({ bytes: s.bodyBytes })));
}

beforeAll(async () => {
  db = await createTestDatabase();
  upstream = await startHttpUpstream(handler);
  gw = await startTestGateway(db.url, { UPSTREAM_HOSTS: 'client-fn=127.0.0.1', MAX_BODY_BYTES: String(LIMIT) });
  await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('client-fn', 'http', false, $1)", [`http://client-fn:${upstream.port}`]);
  await eventually(() => gw.catalog.current()?.functions.has('client-fn') ?? false, 5_000, 2);
}, 60_000);

afterAll(async () => {
  await gw?.stop();
  await upstream?.close();
  await db?.drop();
});

describe('a client that disconnects cancels the upstream request', () => {
  it('while waiting for the response head', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('GET', '/functions/v1/client-fn/hang', { 'x-probe': 'hang' }));
    await until(() => seen.has('hang'), 5_000, 10, 'upstream got the request');
    const left = Date.now();
    client.destroy();
    await until(() => seen.get('hang')!.aborted, 3_000, 10, 'upstream saw the request aborted');
    console.log(`[clients] upstream saw the abort ${seen.get('hang')!.closedAt! - left} ms after the client left (waiting for head)`);
  });

  it('while reading a streamed response body', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('GET', '/functions/v1/client-fn/trickle', { 'x-probe': 'trickle' }));
    await until(() => seen.has('trickle'), 5_000, 10, 'upstream got the request');
    await sleep(200);
    const left = Date.now();
    client.destroy();
    await until(() => seen.get('trickle')!.aborted, 3_000, 10, 'upstream saw its response closed');
    console.log(`[clients] upstream saw the abort ${seen.get('trickle')!.closedAt! - left} ms after the client left (mid-body)`);
    // Reported as the client's cut (info, not a warning), and counted.
    await until(() => gw.logs.some((l) => l['msg'] === 'response cut before its end' && l['cause'] === 'client'), 3_000, 10, 'the cut reported');
    expect(gw.logs.find((l) => l['msg'] === 'response cut before its end' && l['cause'] === 'client')!['level']).toBe('info');
    expect(await (await gw.call('/metrics')).text()).toMatch(/^pgstack_responses_cut_total\{cause="client"\} [1-9]/m);
  });

  it('while uploading the request body', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('POST', '/functions/v1/client-fn/upload', { 'x-probe': 'upload', 'content-length': String(LIMIT - 1) }));
    await client.write(Buffer.alloc(4096, 'a'));
    await until(() => (seen.get('upload')?.bodyBytes ?? 0) >= 4096, 5_000, 10, 'upstream got the first body bytes');
    client.destroy();
    await until(() => seen.get('upload')!.aborted, 3_000, 10, 'upstream saw the upload aborted');
  });
});

describe('a slow client', () => {
  it('back-pressures the upstream: while the client reads nothing, the upstream stalls far short of the body', async () => {
    const socket = net.connect(gw.port, '127.0.0.1');
    socket.on('error', () => {});
    await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
    let received = 0;
    let headSeen = false;
    const onData = (d: Buffer) => {
      received += d.length;
      if (!headSeen && d.includes('\r\n\r\n')) {
        headSeen = true;
        socket.pause(); // the client stops reading right after the head
      }
    };
    socket.on('data', onData);
    socket.write(requestText('GET', '/functions/v1/client-fn/big', { 'x-probe': 'big' }));
    await until(() => headSeen, 5_000, 5, 'response head');
    // Let the buffers between upstream -> gateway -> client fill, then watch the upstream stop.
    await until(
      async () => {
        const before = seen.get('big')!.written;
        await sleep(400);
        return seen.get('big')!.written - before < MiB;
      },
      10_000,
      0,
      'upstream writes stalled',
    );
    const stalledAt = seen.get('big')!.written;
    console.log(`[clients] 1 GiB response, client paused: the upstream stalled after writing ${(stalledAt / MiB).toFixed(1)} MiB (client had ${(received / MiB).toFixed(1)} MiB)`);
    // Socket buffers on two loopback hops (receive buffers autotune up to 32 MiB here), not the body.
    expect(stalledAt).toBeLessThan(160 * MiB);
    // Reading resumes: the stream goes on from where it stood.
    socket.resume();
    await until(() => seen.get('big')!.written > stalledAt + 16 * MiB, 10_000, 10, 'upstream resumes writing');
    socket.destroy();
    await until(() => seen.get('big')!.aborted, 3_000, 10, 'upstream saw the client leave');
  });
});

describe('request bodies over the limit', () => {
  it('Content-Length over the limit: 413 before any body byte is sent, the upstream sees nothing', async () => {
    const before = requestsSeen;
    const client = await RawClient.connect(gw.port);
    const started = Date.now();
    await client.write(requestText('POST', '/functions/v1/client-fn/echo', { 'content-length': String(100 * MiB) }));
    const res = await client.read({ timeoutMs: 3_000 });
    expect(Date.now() - started).toBeLessThan(1_000);
    expect(res.status).toBe(413);
    expect(expectGatewayErrorBody(res.body.toString()).code).toBe('payload_too_large');
    // The announced body will not be read: the connection is closed, and says so.
    expect(header(res, 'connection')).toBe('close');
    await client.waitClosed(8_000);
    expect(client.error).toBeUndefined();
    expect(requestsSeen).toBe(before);
  });

  it('a chunked body that crosses the limit while streaming: prompt 413 while the client is still sending', async () => {
    const client = await RawClient.connect(gw.port);
    await client.write(requestText('POST', '/functions/v1/client-fn/echo', { 'transfer-encoding': 'chunked', 'x-probe': 'chunked-over' }));
    // Send 16 KiB chunks until the answer comes (bounded: 4x the limit).
    let sent = 0;
    const reading = client.read({ timeoutMs: 5_000 });
    let answered = false;
    void reading.then(() => (answered = true), () => (answered = true));
    while (!answered && sent < 4 * LIMIT) {
      await client.write(`4000\r\n${'b'.repeat(0x4000)}\r\n`).catch(() => {});
      sent += 0x4000;
      await sleep(5);
    }
    const res = await within(reading, 5_000, '413 response');
    expect(res.status).toBe(413);
    expect(expectGatewayErrorBody(res.body.toString()).code).toBe('payload_too_large');
    expect(sent).toBeLessThanOrEqual(LIMIT + 4 * 0x4000);
    expect(header(res, 'connection')).toBe('close');
    // The client stops; the connection ends cleanly (no reset that could have eaten the answer).
    client.socket.end();
    await client.waitClosed(8_000);
    expect(client.error).toBeUndefined();
  });

  it('a body within the limit still passes after those', async () => {
    const res = await gw.call('/functions/v1/client-fn/echo', { method: 'POST', body: 'x'.repeat(LIMIT) });
    expect(res.status).toBe(200);
    expect(await res.json()).toEqual({ bytes: LIMIT });
  });
});
