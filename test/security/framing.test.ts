/**
 * Request smuggling and malformed framing, end to end through the Node listener on raw
 * sockets. Each malformed request carries a complete second request after it (or in what
 * a lenient parser would read as its body). The rule: a clean 4xx, the connection closed,
 * and the echo upstream (which counts every request) sees exactly the requests the client
 * meant, never one built from body bytes; the canary on another port sees nothing.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { expectIdentityLines, startSecurityHost, type SecurityHost } from '../support/security-host.ts';

let host: SecurityHost;

beforeAll(async () => {
  host = await startSecurityHost();
});
afterAll(async () => {
  expect(host?.canary.hits() ?? 0, 'the canary was reached').toBe(0);
  await host?.close();
});
beforeEach(async () => {
  await host.drain();
});

const CRLF = '\r\n';
/** A complete request for `secure` (verify_jwt) hidden where a desynchronised parser would find it. */
const SMUGGLED = `GET /functions/v1/secure/smuggled HTTP/1.1${CRLF}Host: x${CRLF}X-Pgstack-Role: service_role${CRLF}${CRLF}`;
const head = (lines: string[]) => lines.join(CRLF) + CRLF + CRLF;

describe('malformed framing is refused: 4xx, connection closed, nothing reaches the upstream', () => {
  const cases: [string, string, number][] = [
    [
      'Content-Length then Transfer-Encoding: chunked',
      head(['POST /functions/v1/open HTTP/1.1', 'Host: x', `Content-Length: ${5 + SMUGGLED.length}`, 'Transfer-Encoding: chunked']) + `0${CRLF}${CRLF}` + SMUGGLED,
      400,
    ],
    [
      'Transfer-Encoding: chunked then Content-Length',
      head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding: chunked', 'Content-Length: 3']) + `0${CRLF}${CRLF}` + SMUGGLED,
      400,
    ],
    [
      'Content-Length: 0 with a chunked body',
      head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Content-Length: 0', 'Transfer-Encoding: chunked']) + `${SMUGGLED.length.toString(16)}${CRLF}${SMUGGLED}${CRLF}0${CRLF}${CRLF}`,
      400,
    ],
    ['two different Content-Length', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Content-Length: 0', `Content-Length: ${SMUGGLED.length}`]) + SMUGGLED, 400],
    ['two equal Content-Length', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Content-Length: 4', 'Content-Length: 4']) + 'abcd' + SMUGGLED, 400],
    ['a Content-Length list', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Content-Length: 4, 4']) + 'abcd' + SMUGGLED, 400],
    ['a signed Content-Length', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Content-Length: +4']) + 'abcd' + SMUGGLED, 400],
    ['Transfer-Encoding: chunked, identity', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding: chunked, identity']) + `0${CRLF}${CRLF}` + SMUGGLED, 400],
    ['Transfer-Encoding: xchunked', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding: xchunked']) + `0${CRLF}${CRLF}` + SMUGGLED, 400],
    ['two Transfer-Encoding lines', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding: chunked', 'Transfer-Encoding: chunked']) + `0${CRLF}${CRLF}` + SMUGGLED, 400],
    ['whitespace before the colon', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding : chunked', 'Content-Length: 3']) + `0${CRLF}${CRLF}` + SMUGGLED, 400],
    ['an obs-folded header line', head(['GET /functions/v1/open HTTP/1.1', 'Host: x', 'X-Folded: a', ' b']) + SMUGGLED, 400],
    ['an obs-folded Transfer-Encoding', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding: identity', ' chunked', 'Content-Length: 3']) + `0${CRLF}${CRLF}` + SMUGGLED, 400],
    ['a header line without a colon', head(['GET /functions/v1/open HTTP/1.1', 'Host: x', 'X-No-Colon']) + SMUGGLED, 400],
    ['a NUL in a header value', head(['GET /functions/v1/open HTTP/1.1', 'Host: x', 'X-Nul: a\u0000b']) + SMUGGLED, 400],
    ['a bare CR in a header value', head(['GET /functions/v1/open HTTP/1.1', 'Host: x', 'X-Cr: a\rX-Pgstack-Role: service_role']) + SMUGGLED, 400],
    ['bare LF line endings', ['GET /functions/v1/open HTTP/1.1', 'Host: x', '', ''].join('\n') + SMUGGLED, 400],
    ['a chunk size that overflows', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding: chunked']) + `ffffffffffffffffff1${CRLF}a${CRLF}0${CRLF}${CRLF}` + SMUGGLED, 400],
    ['a chunk size that is not hex', head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding: chunked']) + `5g${CRLF}hello${CRLF}0${CRLF}${CRLF}` + SMUGGLED, 400],
    ['headers over 16 KiB', head(['GET /functions/v1/open HTTP/1.1', 'Host: x', `X-Big: ${'a'.repeat(17 * 1024)}`]) + SMUGGLED, 431],
    ['many small headers over 16 KiB', head(['GET /functions/v1/open HTTP/1.1', 'Host: x', ...Array.from({ length: 400 }, (_, i) => `X-H${i}: ${'v'.repeat(40)}`)]) + SMUGGLED, 431],
  ];

  for (const [name, bytes, status] of cases) {
    it(`${name} -> ${status}, closed, upstream untouched`, async () => {
      const result = await host.raw(bytes);
      expect(result.closed, 'the connection is closed').toBe(true);
      expect(result.responses.map((r) => r.status)).toEqual([status]);
      expect(await host.drain()).toEqual([]);
    });
  }
});

describe('header lines: every one is seen, and more than MAX_HEADER_LINES (100) are refused', () => {
  const fillers = (n: number) => Array.from({ length: n }, (_, i) => `a${i}:`);

  it('a preflight whose Content-Length hides past line 1,000 (where Node stops keeping headers) -> 431, the function untouched', async () => {
    const bytes =
      head(['OPTIONS /functions/v1/secure HTTP/1.1', 'Host: x', 'Origin: https://evil.example', 'Access-Control-Request-Method: POST', ...fillers(1_000), 'Content-Length: 19']) +
      '{"delete_all":true}';
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([431]);
    expect(JSON.parse(result.responses[0]!.body.toString('utf8'))).toMatchObject({ code: 'too_many_headers' });
    expect(await host.drain()).toEqual([]);
  });

  it('a Transfer-Encoding past line 1,000 -> 431, the function untouched', async () => {
    const bytes = head(['POST /functions/v1/open HTTP/1.1', 'Host: x', ...fillers(1_005), 'Transfer-Encoding: gzip, chunked']) + `3${CRLF}abc${CRLF}0${CRLF}${CRLF}`;
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([431]);
    expect(await host.drain()).toEqual([]);
  });

  it('101 lines -> 431 too_many_headers; 100 lines are forwarded, identity lines exactly once', async () => {
    const over = await host.raw(head(['GET /functions/v1/open HTTP/1.1', 'Host: x', 'Connection: close', ...fillers(98), 'X-Pgstack-Role: service_role']));
    expect(over.responses.map((r) => r.status)).toEqual([431]);
    expect(await host.drain()).toEqual([]);
    const at = await host.raw(head(['GET /functions/v1/open HTTP/1.1', 'Host: x', 'Connection: close', ...fillers(96), 'X-Pgstack-Role: service_role']));
    expect(at.responses.map((r) => r.status)).toEqual([200]);
    const [received] = await host.drain();
    expectIdentityLines(received!.headers, 'anon', '');
  });
});

describe('well-formed requests whose bodies hold a request: the upstream sees exactly what the client meant', () => {
  it('a Content-Length body holding a request is one request with that body', async () => {
    const bytes = head(['POST /functions/v1/open HTTP/1.1', 'Host: x', `Content-Length: ${SMUGGLED.length}`, 'Connection: close']) + SMUGGLED;
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([200]);
    const seen = await host.drain();
    expect(seen.map((r) => `${r.method} ${r.target}`)).toEqual(['POST /functions/v1/open']);
    expect(seen[0]?.body.toString('latin1')).toBe(SMUGGLED);
  });

  it('a chunked body holding a request is one request with that body', async () => {
    const half = Math.floor(SMUGGLED.length / 2);
    const chunk = (s: string) => `${s.length.toString(16)}${CRLF}${s}${CRLF}`;
    const bytes = head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding: chunked', 'Connection: close']) + chunk(SMUGGLED.slice(0, half)) + chunk(SMUGGLED.slice(half)) + `0${CRLF}${CRLF}`;
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([200]);
    const seen = await host.drain();
    expect(seen.map((r) => `${r.method} ${r.target}`)).toEqual(['POST /functions/v1/open']);
    expect(seen[0]?.body.toString('latin1')).toBe(SMUGGLED);
  });

  it('a GET with a Content-Length body: the body is consumed (and not forwarded), never parsed as a request', async () => {
    const bytes = head(['GET /functions/v1/open HTTP/1.1', 'Host: x', `Content-Length: ${SMUGGLED.length}`]) + SMUGGLED + head(['GET /functions/v1/open/second HTTP/1.1', 'Host: x', 'Connection: close']);
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([200, 200]);
    const seen = await host.drain();
    expect(seen.map((r) => `${r.method} ${r.target}`)).toEqual(['GET /functions/v1/open', 'GET /functions/v1/open/second']);
    expect(seen.every((r) => r.body.length === 0)).toBe(true);
  });

  it('two pipelined requests are two upstream requests, answered in order', async () => {
    const bytes = head(['GET /functions/v1/open/one HTTP/1.1', 'Host: x']) + head(['GET /functions/v1/fn/two HTTP/1.1', 'Host: x', 'Connection: close']);
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([200, 200]);
    expect(result.responses.map((r) => (JSON.parse(r.body.toString('utf8')) as { path: string }).path)).toEqual(['/functions/v1/open/one', '/functions/v1/fn/two']);
    expect((await host.drain()).map((r) => r.target)).toEqual(['/functions/v1/open/one', '/functions/v1/fn/two']);
  });

  it('a request refused with 401 before its body was read still never turns the body into a request', async () => {
    const bytes = head(['POST /functions/v1/secure HTTP/1.1', 'Host: x', `Content-Length: ${SMUGGLED.length}`]) + SMUGGLED + head(['GET /functions/v1/open/after HTTP/1.1', 'Host: x', 'Connection: close']);
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([401, 200]);
    expect((await host.drain()).map((r) => r.target)).toEqual(['/functions/v1/open/after']);
  });

  it('a 413 on Content-Length closes the connection: the unread body is never parsed as a request', async () => {
    const bytes = head(['POST /functions/v1/open HTTP/1.1', 'Host: x', `Content-Length: ${2 * 1024 * 1024}`]) + SMUGGLED + SMUGGLED;
    const result = await host.raw(bytes, { waitMs: 8_000 });
    expect(result.responses.map((r) => r.status)).toEqual([413]);
    expect(result.responses[0]?.header('connection')).toBe('close');
    expect(await host.drain()).toEqual([]);
  });
});

describe('trailers', () => {
  it('x-pgstack-* and credentials sent as chunked-body trailers never reach the upstream, as header or trailer', async () => {
    const service = await host.token('service_role', 'svc');
    const bytes =
      head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Transfer-Encoding: chunked', 'Trailer: X-Pgstack-Role, X-Pgstack-Sub, Authorization', 'TE: trailers', 'Connection: close']) +
      `5${CRLF}hello${CRLF}0${CRLF}X-Pgstack-Role: service_role${CRLF}x_pgstack_sub: evil${CRLF}X-Pgstack-Claims: {"role":"service_role"}${CRLF}Authorization: Bearer ${service}${CRLF}${CRLF}`;
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([200]);
    const [seen] = await host.drain();
    expect(seen?.body.toString()).toBe('hello');
    expect(seen?.trailers).toEqual([]);
    expectIdentityLines(seen?.headers ?? [], 'anon', '');
    const names = (seen?.headers ?? []).map(([n]) => n.toLowerCase());
    for (const name of ['trailer', 'te', 'authorization', 'x-pgstack-claims']) expect(names, name).not.toContain(name);
  });
});

describe('upgrades on the wire', () => {
  it('Upgrade: websocket by an anon caller on secure -> 401, connection closed, upstream untouched', async () => {
    const bytes = head(['GET /functions/v1/secure HTTP/1.1', 'Host: x', 'Connection: Upgrade', 'Upgrade: websocket', 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==', 'Sec-WebSocket-Version: 13']) + SMUGGLED;
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([401]);
    expect(JSON.parse(result.responses[0]?.body.toString() ?? '{}')).toMatchObject({ code: 'credentials_required' });
    expect(result.closed).toBe(true);
    expect(await host.drain()).toEqual([]);
  });

  it('Upgrade: websocket by an authorized caller -> 501 upgrade_not_supported, connection closed, upstream untouched', async () => {
    const user = await host.token('authenticated', 'user-1');
    const bytes = head(['GET /functions/v1/secure HTTP/1.1', 'Host: x', `Authorization: Bearer ${user}`, 'Connection: Upgrade', 'Upgrade: websocket', 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==', 'Sec-WebSocket-Version: 13']) + SMUGGLED;
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([501]);
    expect(JSON.parse(result.responses[0]?.body.toString() ?? '{}')).toMatchObject({ code: 'upgrade_not_supported' });
    expect(result.closed).toBe(true);
    expect(await host.drain()).toEqual([]);
  });

  it('Upgrade: h2c is stripped and the request served as HTTP/1.1; the connection then closes', async () => {
    const body = 'h2c body';
    const bytes = head(['POST /functions/v1/open HTTP/1.1', 'Host: x', 'Connection: Upgrade, HTTP2-Settings', 'Upgrade: h2c', 'HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA', `Content-Length: ${body.length}`]) + body + SMUGGLED;
    const result = await host.raw(bytes);
    expect(result.responses.map((r) => r.status)).toEqual([200]);
    expect(result.closed).toBe(true);
    const seen = await host.drain();
    expect(seen.map((r) => r.target)).toEqual(['/functions/v1/open']);
    expect(seen[0]?.body.toString()).toBe(body);
    const names = (seen[0]?.headers ?? []).map(([n]) => n.toLowerCase());
    expect(names).not.toContain('upgrade');
    expect(names).not.toContain('http2-settings');
  });

  it('CONNECT is never tunnelled', async () => {
    const result = await host.raw(head([`CONNECT 127.0.0.1:${host.canary.port} HTTP/1.1`, `Host: 127.0.0.1:${host.canary.port}`]));
    expect(result.closed).toBe(true);
    expect(result.responses.every((r) => r.status >= 400)).toBe(true);
    expect(await host.drain()).toEqual([]);
  });
});
