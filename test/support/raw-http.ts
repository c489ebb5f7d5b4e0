/**
 * HTTP/1.1 clients that send exactly what a test wrote. fetch() would normalise the path
 * (`..`, `%2e`, `\`) and merge or refuse header lines; these do not:
 *
 * - sendRequest: one request on its own connection, the target byte for byte and every
 *   header line as given (duplicates and hop-by-hop ones included), answered as a Response;
 * - exchange: raw bytes over node:net, for framing attacks, returning every response the
 *   server wrote and whether it closed the connection.
 */
import { Buffer } from 'node:buffer';
import net from 'node:net';

export type RawInit = Omit<RequestInit, 'headers' | 'body'> & {
  headers?: Record<string, string> | [string, string][];
  body?: string | Uint8Array | ArrayBuffer | null;
};

function toBuffer(body: RawInit['body']): Buffer | undefined {
  if (body === null || body === undefined) return undefined;
  if (typeof body === 'string') return Buffer.from(body, 'utf8');
  if (body instanceof ArrayBuffer) return Buffer.from(body);
  if (body instanceof Uint8Array) return Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  throw new TypeError('sendRequest: body must be a string, Uint8Array or ArrayBuffer');
}

const NULL_BODY = new Set([101, 103, 204, 205, 304]);

/**
 * Sends one request to 127.0.0.1:port on a fresh connection, over node:net (node:http's
 * client refuses some header lines a test must send, e.g. `Trailer` without chunking), and
 * resolves with the first answer as a fetch Response. Adds `Host` and `Content-Length` only
 * when absent. An answer that arrives before the body is fully written (an early 413) is
 * still returned.
 */
export function sendRequest(port: number, path: string, init: RawInit = {}): Promise<Response> {
  const given: [string, string][] = Array.isArray(init.headers) ? init.headers : Object.entries(init.headers ?? {});
  const body = toBuffer(init.body);
  const has = (name: string) => given.some(([n]) => n.toLowerCase() === name);
  const lines: [string, string][] = [];
  if (!has('host')) lines.push(['Host', `127.0.0.1:${port}`]);
  lines.push(...given);
  if (body !== undefined && !has('content-length') && !has('transfer-encoding')) lines.push(['Content-Length', String(body.length)]);
  const method = (init.method ?? 'GET').toUpperCase();
  const head = Buffer.from(`${method} ${path} HTTP/1.1\r\n${lines.map(([n, v]) => `${n}: ${v}\r\n`).join('')}\r\n`, 'latin1');

  return new Promise<Response>((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    let raw = Buffer.alloc(0);
    let settled = false;
    const settle = (ended: boolean): void => {
      if (settled) return;
      const parsed = parseOne(raw, 0, method === 'HEAD', ended);
      if (!parsed) {
        if (ended) {
          settled = true;
          reject(new Error(`sendRequest: the connection closed without a complete answer (${raw.length} bytes)`));
        }
        return;
      }
      settled = true;
      socket.destroy();
      const { response } = parsed;
      const headers = new Headers();
      for (const [name, value] of response.headers) headers.append(name, value);
      const payload = method === 'HEAD' || NULL_BODY.has(response.status) ? null : new Uint8Array(response.body);
      resolve(new Response(payload, { status: response.status, headers }));
    };
    socket.on('data', (chunk: Buffer) => {
      raw = Buffer.concat([raw, chunk]);
      settle(false);
    });
    socket.on('close', () => settle(true));
    socket.on('error', () => {
      // EPIPE/ECONNRESET while still writing a body the server already refused: what was
      // read decides ('close' follows).
    });
    socket.once('connect', () => {
      socket.write(head);
      if (body !== undefined) socket.write(body);
    });
  });
}

export interface RawResponse {
  status: number;
  headers: [string, string][];
  body: Buffer;
  header(name: string): string | undefined;
}

export interface Exchange {
  /** Every byte the server sent. */
  raw: Buffer;
  /** The responses parsed from `raw`, in order. */
  responses: RawResponse[];
  /** The server closed the connection (FIN or reset) before the wait ended. */
  closed: boolean;
}

/**
 * Parses one HTTP/1.1 response starting at `at`; undefined while incomplete. A body with
 * neither length nor chunking runs to the end of the connection (`ended`).
 */
function parseOne(raw: Buffer, at: number, isHead: boolean, ended: boolean): { response: RawResponse; next: number } | undefined {
  const headEnd = raw.indexOf('\r\n\r\n', at, 'latin1');
  if (headEnd < 0) return undefined;
  const lines = raw.subarray(at, headEnd).toString('latin1').split('\r\n');
  const m = /^HTTP\/1\.[01] (\d{3})/.exec(lines[0] ?? '');
  if (!m) return undefined;
  const status = Number(m[1]);
  const headers: [string, string][] = lines.slice(1).map((line) => {
    const colon = line.indexOf(':');
    return [line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim()];
  });
  const header = (name: string) => headers.find(([n]) => n === name)?.[1];
  let cursor = headEnd + 4;
  let body: Buffer;
  if (isHead || NULL_BODY.has(status) || (status >= 100 && status < 200)) {
    body = Buffer.alloc(0);
  } else if (/chunked/i.test(header('transfer-encoding') ?? '')) {
    const parts: Buffer[] = [];
    for (;;) {
      const lineEnd = raw.indexOf('\r\n', cursor, 'latin1');
      if (lineEnd < 0) return undefined;
      const size = parseInt(raw.subarray(cursor, lineEnd).toString('latin1'), 16);
      if (Number.isNaN(size)) return undefined;
      cursor = lineEnd + 2;
      if (size === 0) {
        // trailer lines, then an empty line
        for (;;) {
          const end = raw.indexOf('\r\n', cursor, 'latin1');
          if (end < 0) return undefined;
          const empty = end === cursor;
          cursor = end + 2;
          if (empty) break;
        }
        break;
      }
      if (cursor + size + 2 > raw.length) return undefined;
      parts.push(raw.subarray(cursor, cursor + size));
      cursor += size + 2;
    }
    body = Buffer.concat(parts);
  } else if (header('content-length') !== undefined) {
    const length = Number(header('content-length'));
    if (cursor + length > raw.length) return undefined;
    body = raw.subarray(cursor, cursor + length);
    cursor += length;
  } else {
    if (!ended) return undefined;
    body = raw.subarray(cursor);
    cursor = raw.length;
  }
  return { response: { status, headers, body, header }, next: cursor };
}

/** Parses consecutive HTTP/1.1 responses (no HEAD answers) from everything a connection sent. */
export function parseResponses(raw: Buffer): RawResponse[] {
  const out: RawResponse[] = [];
  let at = 0;
  while (at < raw.length) {
    const parsed = parseOne(raw, at, false, true);
    if (!parsed) break;
    out.push(parsed.response);
    at = parsed.next;
  }
  return out;
}

/**
 * Writes `bytes` to 127.0.0.1:port (all at once, or `parts` with a pause between them) and
 * collects what the server sends until it closes the connection or `waitMs` passes.
 */
export function exchange(port: number, bytes: string | Buffer | (string | Buffer)[], options: { waitMs?: number; pauseMs?: number } = {}): Promise<Exchange> {
  const waitMs = options.waitMs ?? 3_000;
  const parts = Array.isArray(bytes) ? bytes : [bytes];
  return new Promise<Exchange>((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    let closed = false;
    const finish = () => {
      clearTimeout(timer);
      socket.destroy();
      const raw = Buffer.concat(chunks);
      resolve({ raw, responses: parseResponses(raw), closed });
    };
    const timer = setTimeout(finish, waitMs);
    socket.on('data', (chunk: Buffer) => chunks.push(chunk));
    socket.on('error', () => {
      closed = true;
    });
    socket.on('close', () => {
      closed = true;
      finish();
    });
    socket.on('end', () => {
      closed = true;
    });
    socket.once('connect', async () => {
      for (const [i, part] of parts.entries()) {
        if (i > 0 && options.pauseMs) await new Promise((r) => setTimeout(r, options.pauseMs));
        if (socket.destroyed) return;
        socket.write(typeof part === 'string' ? Buffer.from(part, 'latin1') : part);
      }
    });
  });
}
