/**
 * node:http <-> fetch, via @whatwg-node/server. Translation only: the raw request target
 * and the peer address go to the core as context; all policy lives in core/.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
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
    },
    adapter,
  );
  // No 'upgrade' listener on purpose: Node then hands upgrade requests to the adapter like
  // any other, so the core authorizes them and refuses websockets (upgrade_not_supported).
  // Node's default 'clientError' answers malformed framing (conflicting Content-Length /
  // Transfer-Encoding, bad header lines) with 400 or 431 and closes the connection, so
  // nothing is smuggled through as a second request.
  return server;
}
