/**
 * Stale keep-alive sockets.
 *
 * An upstream may close an idle pooled connection just as a request is written to it; the
 * request then fails with ECONNRESET / "other side closed" although the function never saw
 * it. Defences, in order:
 *  1. keepAliveTimeout (4 s) below common upstream idle timeouts (Node's http server: 5 s),
 *     capped by `Keep-Alive: timeout=N` from the upstream minus undici's 2 s margin;
 *  2. undici 7 lets the event loop turn once before reusing an idle socket, so a FIN/RST
 *     that already arrived retires the socket and the request goes to a new connection;
 *  3. the remaining race is retried here ONCE, on a fresh connection (a second Agent with
 *     pipelining 0, which never pools), only when it is safe: idempotent method, no request
 *     body, the socket had carried an earlier request (reused), not one byte of this
 *     response had arrived, and the client has not gone away.
 * undici's RetryAgent/RetryHandler is not used: it cannot tell a reused socket from a fresh
 * one, turns 3xx into errors unless told otherwise, waits between attempts, and resumes
 * broken bodies with Range requests, none of which a proxy wants.
 *
 * undici does not expose which socket a request was written to; its diagnostics channels
 * do. `undici:request:create` fires synchronously inside agent.request() (we tag the
 * request object there) and `undici:client:sendHeaders` fires right before the first byte
 * is written, with the socket. A request queued in the pool (all connections busy) is
 * created later, stays untagged and is simply never retried.
 */
import diagnosticsChannel from 'node:diagnostics_channel';
import type net from 'node:net';
import type { Dispatcher } from 'undici';
import type { ForwardRequest } from '../../core/forwarder.ts';
import { classifyTransportError } from './transport-errors.ts';

export interface SocketProbe {
  socket: net.Socket | undefined;
  /** Requests the socket had carried before this one. */
  previousUses: number;
  /** socket.bytesRead when this request was written: any later growth is response bytes. */
  bytesReadAtSend: number;
}

const probes = new WeakMap<object, SocketProbe>();
const socketUses = new WeakMap<object, number>();
let creating: SocketProbe | undefined;

diagnosticsChannel.subscribe('undici:request:create', (message) => {
  if (creating === undefined) return;
  probes.set((message as { request: object }).request, creating);
  creating = undefined;
});

diagnosticsChannel.subscribe('undici:client:sendHeaders', (message) => {
  const { request, socket } = message as { request: object; socket: net.Socket };
  const uses = socketUses.get(socket) ?? 0;
  socketUses.set(socket, uses + 1);
  const probe = probes.get(request);
  if (probe === undefined) return;
  probe.socket = socket;
  probe.previousUses = uses;
  probe.bytesReadAtSend = socket.bytesRead;
});

const IDEMPOTENT = new Set(['GET', 'HEAD', 'OPTIONS', 'PUT', 'DELETE']);

/** Whether a failed request could be retried at all: only these are ever probed. */
export function mayRetry(req: ForwardRequest): boolean {
  return IDEMPOTENT.has(req.method) && req.body === null;
}

export function isRetriableStaleReset(req: ForwardRequest, probe: SocketProbe | undefined, err: unknown): boolean {
  return (
    probe !== undefined &&
    classifyTransportError(err) === 'reset' &&
    mayRetry(req) &&
    !req.signal.aborted &&
    probe.socket !== undefined &&
    probe.previousUses > 0 &&
    probe.socket.bytesRead === probe.bytesReadAtSend
  );
}

/** A probe for a request that may be retried, else undefined (only those are followed). */
export function probeFor(req: ForwardRequest): SocketProbe | undefined {
  return mayRetry(req) ? { socket: undefined, previousUses: 0, bytesReadAtSend: 0 } : undefined;
}

/** agent.request(options), with the request tagged so `probe` learns the socket it goes out on. */
export function requestProbed(agent: Dispatcher, options: Dispatcher.RequestOptions, probe: SocketProbe | undefined): Promise<Dispatcher.ResponseData> {
  creating = probe;
  try {
    return agent.request(options);
  } finally {
    creating = undefined;
  }
}
