/**
 * node:http <-> fetch. Translation only: the raw request target and the peer address go to
 * the core as context; all policy lives in core/.
 *
 * Requests are converted by @whatwg-node/server (the Request's signal aborts when the client
 * goes away). Responses are written here, not by the adapter's sendNodeResponse, because a
 * proxy needs what that one does not do: it pipes the body with `.pipe()`, so a body that
 * fails mid-way (the upstream reset, the deadline passed) never ends the client's response,
 * which then hangs with a clean-looking head forever. Here the body goes through
 * stream.pipeline: backpressure from the client reaches the upstream, a failing body
 * destroys the client connection (the client sees a truncated response, never a clean
 * end), and a client that leaves destroys the body (which cancels the upstream exchange).
 */
import { createServer, type IncomingMessage, type OutgoingHttpHeaders, type Server, type ServerResponse } from 'node:http';
import { Readable, pipeline } from 'node:stream';
import type { ReadableStream as NodeWebReadableStream } from 'node:stream/web';
import { createServerAdapter } from '@whatwg-node/server';
import type { Gateway } from '../../core/index.ts';

interface NodeContext {
  req: IncomingMessage;
  res: ServerResponse;
}

export interface ListenerOptions {
  /** Time allowed for a client to send its request head. Default 20 s. */
  readonly headersTimeoutMs?: number;
  /** Idle keep-alive connections close after this. Default 5 s. */
  readonly keepAliveTimeoutMs?: number;
}

/** Creates (does not start) the HTTP server for a gateway. */
export function createListener(gateway: Gateway, options: ListenerOptions = {}): Server {
  const adapter = createServerAdapter<NodeContext>((request, ctx) =>
    gateway.fetch(request, {
      rawTarget: ctx.req.url,
      clientAddress: ctx.req.socket.remoteAddress,
    }),
  );
  const server = createServer(
    {
      // Two Authorization (or apikey) headers must reach the core as one joined, invalid
      // value; by default Node keeps the first and drops the rest silently.
      joinDuplicateHeaders: true,
      // The gateway enforces its own per-request deadline; Node's whole-request timeout
      // (300 s) would cut long uploads that the deadline allows.
      requestTimeout: 0,
      headersTimeout: options.headersTimeoutMs ?? 20_000,
      keepAliveTimeout: options.keepAliveTimeoutMs ?? 5_000,
      // Streamed chunks (SSE) leave as they are written, not after Nagle's delay.
      noDelay: true,
    },
    (req, res) => {
      Promise.resolve(adapter.handleNodeRequestAndResponse(req, res, { req, res })).then(
        (response) => sendResponse(response, res),
        () => sendInternalError(res),
      );
    },
  );
  // No 'upgrade' listener on purpose: Node then hands upgrade requests to the adapter like
  // any other, so the core authorizes them and refuses websockets (upgrade_not_supported).
  // Node's default 'clientError' answers malformed framing (conflicting Content-Length /
  // Transfer-Encoding, bad header lines) with 400 or 431 and closes the connection, so
  // nothing is smuggled through as a second request.
  return server;
}

/** Writes a fetch Response to a node:http response, streaming its body (see the head of this file). */
function sendResponse(response: Response, res: ServerResponse): void {
  const body = response.body;
  if (res.destroyed || res.writableEnded) {
    // The client left before the answer was ready: release the upstream body.
    body?.cancel().catch(noop);
    return;
  }
  const headers: OutgoingHttpHeaders = {};
  response.headers.forEach((value, name) => {
    if (name !== 'set-cookie') headers[name] = value;
  });
  // Each Set-Cookie on its own line: they cannot be joined with commas (RFC 6265 3).
  const cookies = response.headers.getSetCookie();
  if (cookies.length > 0) headers['set-cookie'] = cookies;
  res.writeHead(response.status, response.statusText || undefined, headers);
  if (body === null) {
    res.end();
    return;
  }
  pipeline(toNodeReadable(body), res, noop);
}

function sendInternalError(res: ServerResponse): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  res.writeHead(500, { 'content-type': 'application/json; charset=utf-8', 'x-relay-error': 'true' });
  res.end('{"code":"internal_error","message":"Internal gateway error."}');
}

/** A fetch body as a Node Readable: @whatwg-node bodies wrap one (`.readable`), others are adapted. */
function toNodeReadable(body: ReadableStream<Uint8Array>): Readable {
  const inner = (body as { readable?: unknown }).readable;
  if (inner instanceof Readable) return inner;
  return Readable.fromWeb(body as unknown as NodeWebReadableStream<Uint8Array>);
}

const noop = (): void => {};
