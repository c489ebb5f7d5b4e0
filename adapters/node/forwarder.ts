/**
 * The Node forwarder: moves a ForwardRequest to the function over one pooled undici Agent
 * (`agent.request`, not `fetch()`: the built-in fetch measured ~6x slower here, DESIGN 8).
 *
 * - Name resolution is the SSRF gate (DESIGN 5): every new connection resolves the name
 *   again; an operator-mapped name (UPSTREAM_HOSTS) is dialled as mapped, anything else is
 *   refused when any of its addresses is loopback, unspecified, link-local, multicast or
 *   broadcast, in any IPv6 spelling that carries such an IPv4 address.
 * - Redirects are relayed, never followed (undici's request() follows nothing by itself).
 * - Bodies stream both ways. `req.signal` is the client leaving; `req.deadlineMs` is the
 *   overall deadline, enforced here for the whole exchange, response body included.
 */
import diagnosticsChannel from 'node:diagnostics_channel';
import dns from 'node:dns';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { Readable } from 'node:stream';
import type { ReadableStream as NodeWebReadableStream } from 'node:stream/web';
import { Response } from '@whatwg-node/fetch';
import { Agent, buildConnector, errors as undiciErrors, type Dispatcher } from 'undici';
import { isGatewayError } from '../../core/errors.ts';
import { ForwardError, type ForwardFailure, type ForwardRequest, type Forwarder } from '../../core/forwarder.ts';
import type { Logger } from '../../core/log.ts';
import { isBlockedAddress } from './blocked-addresses.ts';
import type { MappedHost } from './upstream-hosts.ts';

export interface UndiciForwarderOptions {
  /** TCP(+TLS) connect deadline, name resolution included -> ForwardError('connect_timeout'). */
  connectTimeoutMs: number;
  /** From the request being written to the response head -> ForwardError('headers_timeout'). */
  headersTimeoutMs: number;
  /**
   * Operator mapping name -> IP literal and optional port (UPSTREAM_HOSTS, like compose
   * extra_hosts). Read at each connect, so a host may add entries later (the demo does).
   */
  upstreamHosts: ReadonlyMap<string, MappedHost>;
  /** Idle pooled socket lifetime, default 4_000 (below common upstream idle timeouts of 5 s). */
  keepAliveTimeoutMs?: number;
  /**
   * Connections per upstream origin; 0 or unset: no limit (one per concurrent request, as
   * nginx opens them). With a limit, requests beyond it wait for a free connection (within
   * their deadline), and every function behind the same origin (all deno functions share
   * EDGE_RUNTIME_URL) waits in the same queue.
   */
  connectionsPerOrigin?: number;
  /** How long close() lets in-flight requests finish before destroying sockets, default 1_000. */
  closeTimeoutMs?: number;
  log?: Logger;
}

export interface NodeForwarder {
  forward: Forwarder;
  /**
   * Aborts every exchange in flight with `reason` (the end of a shutdown's grace period):
   * one still waiting for its head rejects with it, one streaming its body is cut.
   */
  abortAll(reason: unknown): void;
  close(): Promise<void>;
}

/** The connect-time refusal of an address in a blocked range (mapped to ForwardError 'blocked'). */
export class BlockedAddressError extends Error {
  readonly code = 'EPGSTACK_BLOCKED_ADDRESS';
  readonly hostname: string;
  readonly address: string;
  constructor(hostname: string, address: string, reason = 'address is in a blocked range (loopback, link-local, metadata, unspecified, multicast or broadcast)') {
    super(`refusing to connect to ${hostname} at ${address}: ${reason}`);
    this.name = 'BlockedAddressError';
    this.hostname = hostname;
    this.address = address;
  }
}

// ---------------------------------------------------------------------------------------
// Name resolution: the SSRF gate at connect time.

/**
 * A `net.connect` lookup: mapped names answer their mapped address (no range check), other
 * names go through dns.lookup (no cache: a replaced container is found at its new address)
 * and are refused when ANY address is in a blocked range. Refusing the whole name rather
 * than filtering keeps a name that mixes a sibling address with 127.0.0.1 (rebinding) out.
 */
export function createUpstreamLookup(upstreamHosts: ReadonlyMap<string, MappedHost>): net.LookupFunction {
  return (hostname, options, callback) => {
    const mapped = upstreamHosts.get(hostname.toLowerCase())?.address;
    if (mapped !== undefined) {
      const family = net.isIP(mapped);
      if (options.all) callback(null, [{ address: mapped, family }]);
      else callback(null, mapped, family);
      return;
    }
    const lookupOptions: dns.LookupAllOptions = { all: true };
    if (options.family !== undefined) lookupOptions.family = options.family;
    if (options.hints !== undefined) lookupOptions.hints = options.hints;
    dns.lookup(hostname, lookupOptions, (err, addresses) => {
      if (err) {
        callback(err, '');
        return;
      }
      const refused = addresses.find((a) => isBlockedAddress(a.address));
      if (refused !== undefined) {
        callback(new BlockedAddressError(hostname, refused.address), '');
        return;
      }
      if (options.all) {
        callback(null, addresses);
        return;
      }
      const first = addresses[0];
      if (first === undefined) {
        const notFound: NodeJS.ErrnoException = new Error(`getaddrinfo ENOTFOUND ${hostname}`);
        notFound.code = 'ENOTFOUND';
        callback(notFound, '');
        return;
      }
      callback(null, first.address, first.family);
    });
  };
}

// ---------------------------------------------------------------------------------------
// Failure classification.

const UNREACHABLE = new Set([
  'ECONNREFUSED',
  'ENOTFOUND',
  'EAI_AGAIN',
  'EAI_FAIL',
  'EAI_NONAME',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EHOSTDOWN',
  'ENETDOWN',
  'EADDRNOTAVAIL',
]);
const RESET = new Set(['ECONNRESET', 'EPIPE', 'ECONNABORTED', 'UND_ERR_SOCKET']);
const BAD_RESPONSE = new Set(['UND_ERR_INFO', 'UND_ERR_HEADERS_OVERFLOW', 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH']);

function errorCode(err: unknown): string | undefined {
  if (typeof err !== 'object' || err === null) return undefined;
  const code = (err as { code?: unknown }).code;
  if (typeof code === 'string') return code;
  // net's happy-eyeballs (autoSelectFamily) wraps per-address errors in an AggregateError.
  const errors = (err as { errors?: unknown }).errors;
  if (Array.isArray(errors)) return errorCode(errors[0]);
  return undefined;
}

/** Maps a transport error (from undici, net or dns) to the core's failure kinds. */
export function classifyTransportError(err: unknown): ForwardFailure {
  if (err instanceof BlockedAddressError) return 'blocked';
  // llhttp errors: the code is `HPE_*` when undici knows the llhttp error name, else unset.
  if (err instanceof undiciErrors.HTTPParserError) return 'bad_response';
  const code = errorCode(err);
  if (code === undefined) return 'unreachable';
  if (code === 'UND_ERR_CONNECT_TIMEOUT' || code === 'ETIMEDOUT') return 'connect_timeout';
  if (code === 'UND_ERR_HEADERS_TIMEOUT') return 'headers_timeout';
  if (code.startsWith('HPE_') || BAD_RESPONSE.has(code)) return 'bad_response';
  if (code === 'UND_ERR_SOCKET') {
    // undici reports protocol violations seen before the head as SocketError too.
    const message = (err as Error).message;
    if (message === 'bad response' || message === 'bad upgrade') return 'bad_response';
  }
  if (RESET.has(code)) return 'reset';
  if (UNREACHABLE.has(code)) return 'unreachable';
  return 'unreachable';
}

const DESCRIPTIONS: Record<ForwardFailure, string> = {
  unreachable: 'is unreachable',
  connect_timeout: 'did not accept a connection in time',
  headers_timeout: 'did not send a response head in time',
  deadline: 'exceeded the request deadline',
  blocked: 'resolves to an address in a blocked range',
  reset: 'closed the connection before a complete response head',
  bad_response: 'sent an unparseable response',
};

function toForwardError(req: ForwardRequest, err: unknown): ForwardError {
  const kind = classifyTransportError(err);
  const code = errorCode(err);
  // (The log line's detail; the client only ever sees the code.)
  const detail = err instanceof BlockedAddressError ? err.message : (code ?? (err instanceof Error ? err.message : String(err)));
  // The usual first-day mistake: a bare container name outside Docker. Say what fixes it.
  const hint =
    code === 'ENOTFOUND' || code === 'EAI_AGAIN'
      ? `; "${req.fn.upstream.hostname}" does not resolve here: on a compose network it is the service name, elsewhere map it with UPSTREAM_HOSTS=${req.fn.upstream.hostname}=<address>`
      : '';
  return new ForwardError(kind, `upstream ${req.fn.name} (${req.fn.upstream.origin}) ${DESCRIPTIONS[kind]} (${detail})${hint}`, {
    cause: err,
  });
}

// ---------------------------------------------------------------------------------------
// Stale keep-alive sockets.
//
// An upstream may close an idle pooled connection just as a request is written to it; the
// request then fails with ECONNRESET / "other side closed" although the function never saw
// it. Defences, in order:
//  1. keepAliveTimeout (4 s) below common upstream idle timeouts (Node's http server: 5 s),
//     capped by `Keep-Alive: timeout=N` from the upstream minus undici's 2 s margin;
//  2. undici 7 lets the event loop turn once before reusing an idle socket, so a FIN/RST
//     that already arrived retires the socket and the request goes to a new connection;
//  3. the remaining race is retried here ONCE, on a fresh connection (a second Agent with
//     pipelining 0, which never pools), only when it is safe: idempotent method, no request
//     body, the socket had carried an earlier request (reused), not one byte of this
//     response had arrived, and the client has not gone away.
// undici's RetryAgent/RetryHandler is not used: it cannot tell a reused socket from a fresh
// one, turns 3xx into errors unless told otherwise, waits between attempts, and resumes
// broken bodies with Range requests, none of which a proxy wants.
//
// undici does not expose which socket a request was written to; its diagnostics channels
// do. `undici:request:create` fires synchronously inside agent.request() (we tag the
// request object there) and `undici:client:sendHeaders` fires right before the first byte
// is written, with the socket. A request queued in the pool (all connections busy) is
// created later, stays untagged and is simply never retried.

interface SocketProbe {
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
function mayRetry(req: ForwardRequest): boolean {
  return IDEMPOTENT.has(req.method) && req.body === null;
}

function isRetriableStaleReset(req: ForwardRequest, probe: SocketProbe, err: unknown): boolean {
  return (
    classifyTransportError(err) === 'reset' &&
    mayRetry(req) &&
    !req.signal.aborted &&
    probe.socket !== undefined &&
    probe.previousUses > 0 &&
    probe.socket.bytesRead === probe.bytesReadAtSend
  );
}

// ---------------------------------------------------------------------------------------
// Request and response conversion.

/**
 * Headers undici refuses (it throws on them) or owns: Host is always the upstream's
 * `name:port` from the origin (the port is omitted when it is the scheme default), and the
 * connection-level ones are hop-by-hop. The core strips these already; this is the belt.
 */
const TRANSPORT_HEADERS = new Set(['host', 'connection', 'keep-alive', 'transfer-encoding', 'upgrade', 'expect']);

/** Web Headers -> undici's flat `[name, value, name, value, ...]` form. */
function toUndiciHeaders(headers: Headers): string[] {
  const flat: string[] = [];
  headers.forEach((value, name) => {
    if (!TRANSPORT_HEADERS.has(name.toLowerCase())) flat.push(name, value);
  });
  return flat;
}

/**
 * The request body as a Node Readable, without buffering. @whatwg-node's ReadableStream is
 * a thin wrapper over a Node Readable (`.readable`): hand that to undici directly. A native
 * web stream is adapted with Readable.fromWeb (destroying it cancels the web stream).
 */
function toNodeReadable(body: ReadableStream<Uint8Array>): Readable {
  const inner = (body as { readable?: unknown }).readable;
  if (inner instanceof Readable) return inner;
  if ((body as unknown) instanceof Readable) return body as unknown as Readable;
  return Readable.fromWeb(body as unknown as NodeWebReadableStream<Uint8Array>);
}

function hasNullBody(method: string, status: number): boolean {
  return method === 'HEAD' || status === 204 || status === 205 || status === 304 || status < 200;
}

const noop = (): void => {};

/** setTimeout's ceiling (2^31 - 1 ms, about 24.8 days); longer deadlines are clamped. */
const MAX_TIMER_MS = 2_147_483_647;

function toResponse(req: ForwardRequest, data: Dispatcher.ResponseData): Response {
  // A plain object init: @whatwg-node's Headers keeps it as is (and its server can write it
  // with one writeHead) until someone edits it. Repeated Set-Cookie stays an array (one
  // header line each); other repeated headers are combined as Headers.append would.
  const headers: Record<string, string | string[]> = Object.create(null) as Record<string, string | string[]>;
  for (const name of Object.keys(data.headers)) {
    const value = data.headers[name];
    if (value === undefined) continue;
    headers[name] = Array.isArray(value) && name !== 'set-cookie' ? value.join(', ') : value;
  }
  let body: Readable | null = data.body;
  if (hasNullBody(req.method, data.statusCode)) {
    // Nothing to relay; drain what the parser may still deliver so the socket is released.
    data.body.dump({ limit: 64 * 1024 }).catch(noop);
    body = null;
  }
  // The reason phrase is not relayed (RFC 9112 4: clients ignore it; Go's ReverseProxy
  // does the same): a function's own may hold bytes no HTTP stack will write again.
  return new Response(body as unknown as BodyInit | null, { status: data.statusCode, headers: headers as unknown as HeadersInit });
}

/**
 * One exchange: the abort source undici gets, the deadline timer and the client's signal,
 * released together by finish().
 * - undici takes an EventEmitter as well as an AbortSignal (`on('abort')`, `aborted`,
 *   `reason`); this costs a fraction of Node 20's AbortController, whose construction alone
 *   was ~4% of a proxied request's CPU. Like AbortController.abort(), an abort without a
 *   reason gets a DOMException AbortError.
 * - It listens to the client's signal as an EventListener object (handleEvent), so an
 *   exchange creates no closures: under tsx each named closure costs a defineProperty.
 */
class Exchange extends EventEmitter {
  aborted = false;
  reason: unknown = undefined;
  /** The overall deadline's timer, cleared by finish(). */
  deadline: NodeJS.Timeout | undefined = undefined;
  private finished = false;
  private readonly client: AbortSignal;
  private readonly onFinish: (exchange: Exchange) => void;

  constructor(client: AbortSignal, onFinish: (exchange: Exchange) => void) {
    super();
    this.client = client;
    this.onFinish = onFinish;
    if (client.aborted) this.handleEvent();
    else client.addEventListener('abort', this, { once: true });
  }

  abort(reason: unknown): void {
    if (this.aborted) return;
    this.aborted = true;
    this.reason = reason ?? new DOMException('This operation was aborted', 'AbortError');
    this.emit('abort');
  }

  /** The client left: abort with its reason, unchanged. */
  handleEvent(): void {
    this.abort(this.client.reason);
  }

  /** The exchange is over (failed, or its response body closed): release everything once. */
  finish(): void {
    if (this.finished) return;
    this.finished = true;
    clearTimeout(this.deadline);
    this.client.removeEventListener('abort', this);
    this.onFinish(this);
  }
}

// ---------------------------------------------------------------------------------------

export function createUndiciForwarder(options: UndiciForwarderOptions): NodeForwarder {
  const { connectTimeoutMs, headersTimeoutMs, upstreamHosts, log } = options;
  const keepAliveTimeoutMs = options.keepAliveTimeoutMs ?? 4_000;
  const connections = options.connectionsPerOrigin ? options.connectionsPerOrigin : null;
  const closeTimeoutMs = options.closeTimeoutMs ?? 1_000;

  const baseConnect = buildConnector({ timeout: connectTimeoutMs, lookup: createUpstreamLookup(upstreamHosts) });
  // net.connect skips `lookup` for IP literals; the core never produces one (bare names
  // only), but an IP-literal origin in a blocked range is refused here all the same.
  const connect: buildConnector.connector = (connectOptions, callback) => {
    const host = connectOptions.hostname;
    if (net.isIP(host) !== 0 && isBlockedAddress(host)) {
      callback(new BlockedAddressError(host, host), null);
      return;
    }
    // A name mapped with a port is dialled on that port only.
    const pinned = upstreamHosts.get(host.toLowerCase());
    if (pinned?.port !== undefined) {
      const port = Number(connectOptions.port) || (connectOptions.protocol === 'https:' ? 443 : 80);
      if (port !== pinned.port) {
        callback(new BlockedAddressError(host, `${pinned.address}:${port}`, `UPSTREAM_HOSTS maps ${host} to port ${pinned.port} only`), null);
        return;
      }
    }
    baseConnect(connectOptions, callback);
  };

  const agentOptions: Agent.Options = {
    connect,
    connections,
    pipelining: 1,
    keepAliveTimeout: keepAliveTimeoutMs,
    keepAliveMaxTimeout: keepAliveTimeoutMs, // never keep an idle socket longer, whatever the upstream announces
    headersTimeout: headersTimeoutMs,
    bodyTimeout: 0,
  };
  const agent = new Agent(agentOptions);
  // Retries of stale keep-alive resets only: pipelining 0 disables keep-alive, so every
  // request here gets a connection of its own (and sends `connection: close`).
  const freshAgent = new Agent({ ...agentOptions, pipelining: 0 });

  const live = new Set<Exchange>();
  let onIdle: (() => void) | undefined;
  const exchangeFinished = (exchange: Exchange): void => {
    live.delete(exchange);
    if (live.size === 0) onIdle?.();
  };

  const forward: Forwarder = async (req) => {
    // One signal for undici carries both ends of the exchange: the client leaving (its
    // reason, unchanged) and the overall deadline. Before the head undici rejects with the
    // reason; after it, undici destroys the response body with it, which also closes the
    // upstream socket.
    const exchange = new Exchange(req.signal, exchangeFinished);
    live.add(exchange);
    if (Number.isFinite(req.deadlineMs) && req.deadlineMs > 0) {
      exchange.deadline = setTimeout(() => {
        exchange.abort(new ForwardError('deadline', `upstream ${req.fn.name} (${req.fn.upstream.origin}) exceeded the ${req.deadlineMs} ms deadline`));
      }, Math.min(req.deadlineMs, MAX_TIMER_MS));
      exchange.deadline.unref();
    }

    let body: Readable | null = null;
    if (req.body !== null) {
      body = toNodeReadable(req.body);
      // Never an unhandled 'error': undici reports every body failure through the request.
      body.on('error', noop);
    }
    const requestOptions: Dispatcher.RequestOptions = {
      origin: req.fn.upstream.origin,
      path: req.path,
      method: req.method as Dispatcher.HttpMethod,
      headers: toUndiciHeaders(req.headers),
      body,
      signal: exchange,
      headersTimeout: headersTimeoutMs,
      bodyTimeout: 0,
    };

    // Only a request that could be retried is followed to its socket (a WeakMap entry each).
    const probe: SocketProbe = { socket: undefined, previousUses: 0, bytesReadAtSend: 0 };
    const followed = mayRetry(req) ? probe : undefined;
    let data: Dispatcher.ResponseData;
    try {
      try {
        creating = followed;
        const pending = agent.request(requestOptions);
        creating = undefined;
        data = await pending;
      } catch (err) {
        creating = undefined;
        // The client left (signal.reason, unchanged) or the deadline passed (ForwardError).
        if (exchange.aborted) throw exchange.reason;
        // The request body failed on the client's side (the core's size limit, the client
        // left mid-upload): the body's own GatewayError, passed through unchanged. Anything
        // else is the transport's, also when undici destroyed the body with it first (a
        // connect failure on a POST reaches us as the body's error too).
        if (isGatewayError(err)) throw err;
        if (!isRetriableStaleReset(req, probe, err)) throw toForwardError(req, err);
        log?.('debug', 'retrying on a fresh connection after a reset on a reused keep-alive socket', {
          function: req.fn.name,
          method: req.method,
          code: errorCode(err),
        });
        try {
          data = await freshAgent.request(requestOptions);
        } catch (retryErr) {
          if (exchange.aborted) throw exchange.reason;
          throw toForwardError(req, retryErr);
        }
      }
    } catch (err) {
      exchange.finish();
      throw err;
    }
    const response = toResponse(req, data);
    // The deadline covers the body too: keep it (and the client listener) until the body
    // stream closes, whether it ended, failed or was destroyed.
    // (A null-body response keeps its undici stream draining until it closes, bounded too.)
    if (data.body.closed) exchange.finish();
    else data.body.once('close', () => exchange.finish());
    return response;
  };

  // close() waits for the exchanges in flight itself rather than calling agent.close():
  // undici 7's Agent.close() forgets its pools at once, so a destroy() after it no longer
  // reaches the sockets still streaming (they would outlive the forwarder).
  let closing: Promise<void> | undefined;
  const close = (): Promise<void> => {
    closing ??= (async () => {
      if (live.size > 0) {
        let timer: NodeJS.Timeout | undefined;
        const drained = await Promise.race([
          new Promise<true>((resolve) => {
            onIdle = () => resolve(true);
          }),
          new Promise<false>((resolve) => {
            timer = setTimeout(() => resolve(false), closeTimeoutMs);
          }),
        ]);
        clearTimeout(timer);
        if (!drained) log?.('warn', 'upstream exchanges still in flight at shutdown; destroying them', { inFlight: live.size, timeoutMs: closeTimeoutMs });
      }
      await Promise.all([agent.destroy(), freshAgent.destroy()]).catch(noop);
    })();
    return closing;
  };

  const abortAll = (reason: unknown): void => {
    for (const exchange of [...live]) exchange.abort(reason);
  };

  return { forward, abortAll, close };
}
