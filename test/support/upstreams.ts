/**
 * Upstreams for end-to-end tests of the Node host, run in the test process on 127.0.0.1:
 *
 * - the ECHO upstream of core/contract.case.ts (ContractHost's doc comment, exactly), which
 *   also records every request it receives (method, raw target, raw header lines, raw
 *   trailer lines, body) and counts connections, so a test can assert what reached it;
 * - a CANARY: a bare TCP server that counts every connection and every byte and answers
 *   nothing. Anything that reaches it is a request the gateway should never have made.
 */
import { Buffer } from 'node:buffer';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import net, { type AddressInfo } from 'node:net';

/** One request as the echo upstream received it. */
export interface Received {
  method: string;
  /** The raw request target, never decoded or normalised. */
  target: string;
  /** Raw header lines, name and value pairs as on the wire (rawHeaders). */
  headers: [string, string][];
  /** Raw trailer lines of a chunked body. */
  trailers: [string, string][];
  body: Buffer;
}

export interface EchoUpstream {
  readonly port: number;
  /** Every request received so far, in order. */
  readonly received: Received[];
  /** TCP connections accepted so far. */
  connections(): number;
  close(): Promise<void>;
}

export interface EchoOptions {
  /**
   * Answers some function segments differently (e.g. a redirect); return true when it
   * answered. Called after the request body was read.
   */
  special?: (segment: string, req: IncomingMessage, res: ServerResponse) => boolean;
}

const PREFIX = '/functions/v1/';

/** Node reads header values as latin-1: reinterpret the bytes as UTF-8 (as Go and Python do). */
const utf8 = (value: string): string => Buffer.from(value, 'latin1').toString('utf8');

function pairs(raw: string[]): [string, string][] {
  const out: [string, string][] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) out.push([raw[i] as string, raw[i + 1] as string]);
  return out;
}

function sendJson(req: IncomingMessage, res: ServerResponse, status: number, text: string): void {
  const body = Buffer.from(text, 'utf8');
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': body.length });
  res.end(req.method === 'HEAD' ? undefined : body);
}

/** Starts the contract's echo upstream on 127.0.0.1, port 0. */
export async function startEchoUpstream(options: EchoOptions = {}): Promise<EchoUpstream> {
  const received: Received[] = [];
  let connections = 0;
  const server: Server = createServer({ maxHeaderSize: 64 * 1024 }, (req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('error', () => res.destroy());
    req.on('end', () => {
      const body = Buffer.concat(chunks);
      const target = req.url ?? '';
      received.push({ method: req.method ?? '', target, headers: pairs(req.rawHeaders), trailers: pairs(req.rawTrailers), body });
      const path = target.split('?', 1)[0] as string;
      const segment = path.startsWith(PREFIX) ? (path.slice(PREFIX.length).split('/', 1)[0] as string) : '';
      if (options.special?.(segment, req, res)) return;
      if (segment === 'fails') return sendJson(req, res, 503, '{"own":"error"}');
      // A null-prototype map: a header named `constructor` or `__proto__` is just a header.
      const headers: Record<string, string[]> = Object.create(null) as Record<string, string[]>;
      let role: string | null = null;
      let sub: string | null = null;
      let claimsText: string | null = null;
      for (const [rawName, rawValue] of pairs(req.rawHeaders)) {
        const name = rawName.toLowerCase();
        const value = utf8(rawValue);
        (headers[name] ??= []).push(value);
        if (name === 'x-pgstack-role') role ??= value;
        if (name === 'x-pgstack-sub') sub ??= value;
        if (name === 'x-pgstack-claims') claimsText ??= value;
      }
      let claims: unknown = null;
      if (claimsText !== null) {
        try {
          claims = JSON.parse(claimsText);
        } catch {
          return sendJson(req, res, 400, '{"error":"bad claims header"}');
        }
      }
      sendJson(
        req,
        res,
        200,
        JSON.stringify({
          function: segment,
          method: req.method,
          path: target,
          role,
          sub,
          claims,
          headers,
          body: body.toString('utf8'),
          bodyBytes: body.length,
          runtime: 'node-echo',
        }),
      );
    });
  });
  server.on('connection', () => {
    connections += 1;
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    received,
    connections: () => connections,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

export interface Canary {
  readonly port: number;
  /** Connections accepted so far. */
  hits(): number;
  /** Bytes received so far, as latin-1 text. */
  bytes(): string;
  close(): Promise<void>;
}

/** A TCP server that records and never answers: anything reaching it is a leak. */
export async function startCanary(): Promise<Canary> {
  let hits = 0;
  let data = '';
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    hits += 1;
    sockets.add(socket);
    socket.on('data', (chunk) => {
      data += chunk.toString('latin1');
    });
    socket.on('error', () => {});
    socket.on('close', () => sockets.delete(socket));
    // Never answer; close after a moment so nothing waits on it forever.
    setTimeout(() => socket.destroy(), 200).unref();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as AddressInfo).port,
    hits: () => hits,
    bytes: () => data,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}
