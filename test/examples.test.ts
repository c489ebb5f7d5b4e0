// The three reference functions in examples/functions/ must serve the identical contract.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { request as httpRequest } from 'node:http';
import { connect } from 'node:net';
import { hasGo, startExample } from './support/processes.ts';
import type { ExampleKind, RunningExample } from './support/processes.ts';
import type { Echo } from '../core/contract.case.ts';

const goAvailable = hasGo();
if (!goAvailable) console.warn('go not found: skipping hello-go (install golang-go)');

const ECHO_KEYS = ['body', 'bodyBytes', 'claims', 'function', 'headers', 'method', 'path', 'role', 'runtime', 'sub'];
// Exactly this ASCII text: JSON with \u escapes, as the gateway sends it.
const CLAIMS_HEADER = '{"sub":"u1","name":"\\u00e9\\u6f22\\ud83d\\ude00"}';


interface RawResponse {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** Send bytes as-is (no URL normalisation, any framing) and read until the server closes. */
function rawRequest(port: number, text: string): Promise<RawResponse> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    socket.setTimeout(10_000, () => socket.destroy(new Error('raw request timed out')));
    socket.on('data', (chunk) => chunks.push(chunk));
    socket.on('error', reject);
    socket.on('end', () => {
      let raw = Buffer.concat(chunks).toString('utf8');
      while (raw.startsWith('HTTP/1.1 100')) raw = raw.slice(raw.indexOf('\r\n\r\n') + 4);
      const split = raw.indexOf('\r\n\r\n');
      const [statusLine = '', ...lines] = raw.slice(0, split).split('\r\n');
      const headers: Record<string, string> = {};
      for (const line of lines) {
        const colon = line.indexOf(':');
        headers[line.slice(0, colon).toLowerCase()] = line.slice(colon + 1).trim();
      }
      resolve({ status: Number(statusLine.split(' ')[1]), headers, body: raw.slice(split + 4) });
    });
    socket.write(text);
  });
}

/** node:http sends array header values as separate header lines. */
function duplicateHeaders(url: string, values: string[]): Promise<Echo> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(`${url}/functions/v1/dup`, { headers: { 'x-dup': values } }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => (text += chunk));
      res.on('end', () => resolve(JSON.parse(text) as Echo));
    });
    req.on('error', reject);
    req.end();
  });
}

const kinds: ExampleKind[] = ['go', 'node', 'python'];

describe.each(kinds)('examples/functions/hello-%s', (kind) => {
  const skip = kind === 'go' && !goAvailable;
  let ex: RunningExample;

  beforeAll(async () => {
    if (skip) return;
    const started = Date.now();
    ex = await startExample(kind);
    console.info(`hello-${kind} ready on ${ex.url} in ${Date.now() - started} ms`);
  }, 180_000);

  afterAll(async () => {
    await ex?.stop();
  });

  it.skipIf(skip)('GET /healthz is ok', async () => {
    const res = await fetch(`${ex.url}/healthz`);
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('text/plain');
    expect(await res.text()).toBe('ok');
  });

  it.skipIf(skip)('echoes identity, raw path, claims and body', async () => {
    const res = await fetch(`${ex.url}/functions/v1/hello-x/sub/path?q=%2F&a=1`, {
      method: 'POST',
      headers: {
        'X-Pgstack-Role': 'authenticated',
        'X-Pgstack-Sub': 'u1',
        'X-Pgstack-Claims': CLAIMS_HEADER,
        'content-type': 'application/json',
      },
      body: '{"hello":"world"}',
    });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/json');
    const echo = (await res.json()) as Echo;
    expect(Object.keys(echo).sort()).toEqual(ECHO_KEYS);
    expect(echo).toMatchObject({
      function: 'hello-x',
      method: 'POST',
      path: '/functions/v1/hello-x/sub/path?q=%2F&a=1',
      role: 'authenticated',
      sub: 'u1',
      claims: { sub: 'u1', name: 'é漢😀' },
      body: '{"hello":"world"}',
      bodyBytes: 17,
      runtime: kind,
    });
    expect(echo.headers['x-pgstack-role']).toEqual(['authenticated']);
    expect(echo.headers['x-pgstack-claims']).toEqual([CLAIMS_HEADER]);
    expect(echo.headers['content-type']).toEqual(['application/json']);
    expect(echo.headers['host']).toEqual([`127.0.0.1:${ex.port}`]);
  });

  it.skipIf(skip)('HEAD has the same headers and no body', async () => {
    const head = await fetch(`${ex.url}/functions/v1/hello-x`, { method: 'HEAD' });
    expect(head.status).toBe(200);
    expect(head.headers.get('content-type')).toBe('application/json');
    expect(await head.text()).toBe('');
    // Byte-identical requests apart from the method: the JSON is one byte longer for HEAD.
    const request = (method: string): string =>
      `${method} /functions/v1/hello-x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n`;
    const [rawGet, rawHead] = await Promise.all([rawRequest(ex.port, request('GET')), rawRequest(ex.port, request('HEAD'))]);
    expect(rawHead.status).toBe(200);
    expect(rawHead.body).toBe('');
    expect(rawHead.headers['content-type']).toBe('application/json');
    expect(Number(rawHead.headers['content-length'])).toBe(Buffer.byteLength(rawGet.body) + 1);
  });

  it.skipIf(skip)('accepts every method', async () => {
    for (const method of ['GET', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']) {
      const res = await fetch(`${ex.url}/functions/v1/m`, { method });
      expect(res.status).toBe(200);
      expect(((await res.json()) as Echo).method).toBe(method);
    }
  });

  it.skipIf(skip)('anonymous request: no claims, empty sub, UTF-8 body', async () => {
    const res = await fetch(`${ex.url}/functions/v1/anon?x`, {
      method: 'PUT',
      headers: { 'X-Pgstack-Role': 'anon', 'X-Pgstack-Sub': '' },
      body: 'héllo 漢😀',
    });
    const echo = (await res.json()) as Echo;
    expect(echo).toMatchObject({ function: 'anon', path: '/functions/v1/anon?x', role: 'anon', sub: '', claims: null });
    expect(echo.body).toBe('héllo 漢😀');
    expect(echo.bodyBytes).toBe(Buffer.byteLength('héllo 漢😀'));

    const bare = (await (await fetch(`${ex.url}/functions/v1/bare`)).json()) as Echo;
    expect(bare).toMatchObject({ role: null, sub: null, claims: null, body: '', bodyBytes: 0 });
  });

  it.skipIf(skip)('keeps duplicate headers in order', async () => {
    const echo = await duplicateHeaders(ex.url, ['one', 'two', 'three']);
    expect(echo.headers['x-dup']).toEqual(['one', 'two', 'three']);
  });

  it.skipIf(skip)('keeps the request target byte for byte', async () => {
    const target = '/functions/v1/raw/a/../%2e%2e//b;c?x=%zz&y=a+b#';
    const res = await rawRequest(ex.port, `GET ${target} HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n`);
    expect(res.status).toBe(200);
    expect(JSON.parse(res.body)).toMatchObject({ function: 'raw', path: target });
  });

  it.skipIf(skip)('reads raw non-ASCII header bytes as UTF-8', async () => {
    const res = await rawRequest(
      ex.port,
      'GET /functions/v1/utf HTTP/1.1\r\nHost: x\r\nX-Pgstack-Sub: ü-漢\r\nX-Name: é😀\r\nConnection: close\r\n\r\n',
    );
    const echo = JSON.parse(res.body) as Echo;
    expect(echo.sub).toBe('ü-漢');
    expect(echo.headers['x-name']).toEqual(['é😀']);
  });

  it.skipIf(skip)('decodes a chunked request body', async () => {
    const res = await rawRequest(
      ex.port,
      'POST /functions/v1/chunky HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n' +
        '5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n',
    );
    expect(res.status).toBe(200);
    const echo = JSON.parse(res.body) as Echo;
    expect(echo).toMatchObject({ body: 'hello world', bodyBytes: 11 });
    expect(echo.headers['transfer-encoding']).toEqual(['chunked']);
  });

  it.skipIf(skip)('rejects a body over 10 MiB with 413', async () => {
    const res = await rawRequest(
      ex.port,
      `POST /functions/v1/big HTTP/1.1\r\nHost: x\r\nContent-Length: ${10 * 1024 * 1024 + 1}\r\nExpect: 100-continue\r\n\r\n`,
    );
    expect(res.status).toBe(413);
    expect(JSON.parse(res.body)).toEqual({ error: 'payload too large' });
  });

  it.skipIf(skip)('accepts a body of exactly 10 MiB', async () => {
    const body = Buffer.alloc(10 * 1024 * 1024, 'a');
    const res = await fetch(`${ex.url}/functions/v1/big`, { method: 'POST', body });
    expect(res.status).toBe(200);
    expect(((await res.json()) as Echo).bodyBytes).toBe(body.length);
  });

  it.skipIf(skip)('bad claims header is 400', async () => {
    for (const claims of ['{not json', 'NaN', '']) {
      const res = await fetch(`${ex.url}/functions/v1/x`, { headers: { 'X-Pgstack-Claims': claims } });
      expect(res.status, JSON.stringify(claims)).toBe(400);
      expect(res.headers.get('content-type')).toBe('application/json');
      expect(await res.json()).toEqual({ error: 'bad claims header' });
    }
  });

  it.skipIf(skip)('unknown paths are 404', async () => {
    for (const p of ['/', '/functions/v1', '/functions/v2/x', '/nope?functions/v1/']) {
      const res = await fetch(`${ex.url}${p}`, { method: 'POST', body: 'x' });
      expect(res.status, p).toBe(404);
      expect(res.headers.get('content-type')).toBe('application/json');
      expect(await res.json()).toEqual({ error: 'not found' });
    }
  });

  it.skipIf(skip)('a port already in use: exit 1 with one line on stderr, no stack trace', async () => {
    const err = (await startExample(kind, { PORT: String(ex.port) }).then(
      () => undefined,
      (e: unknown) => e,
    )) as Error | undefined;
    expect(err?.message).toMatch(/exited early \(code 1, signal null\)/);
    const stderr = err!.message.split('--- stderr ---\n')[1]!.split('\n--- stdout ---')[0]!;
    expect(stderr).toMatch(new RegExp(`^listen: .*${ex.port}.*(in use|EADDRINUSE)`, 'i'));
    expect(stderr.trim().split('\n')).toHaveLength(1);
  });

  it.skipIf(skip)('exits cleanly on SIGTERM', async () => {
    const other = await startExample(kind);
    expect((await fetch(`${other.url}/healthz`)).status).toBe(200);
    await other.stop();
    expect(await other.exited).toEqual({ code: 0, signal: null });
  });
});
