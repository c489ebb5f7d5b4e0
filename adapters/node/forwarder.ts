/**
 * The Node forwarder: moves a ForwardRequest to the function over one pooled undici Agent
 * (`agent.request`, not `fetch()`: the built-in fetch measured ~6x slower here, DESIGN 8).
 *
 * - Connecting is the SSRF gate (DESIGN 5, upstream-lookup.ts); failures are classified in
 *   transport-errors.ts; a reset on a reused keep-alive socket is retried once when that
 *   is safe (stale-sockets.ts).
 * - Redirects are relayed, never followed (undici's request() follows nothing by itself).
 * - Bodies stream both ways. `req.signal` is the client leaving; `req.deadlineMs` is the
 *   overall deadline, enforced here for the whole exchange, response body included.
 */
import { EventEmitter } from 'node:events';
import type { Readable } from 'node:stream';
import { Response } from '@whatwg-node/fetch';
import { Agent, type Dispatcher } from 'undici';
import { isGatewayError } from '../../core/errors.ts';
import { ForwardError, type ForwardRequest, type Forwarder } from '../../core/forwarder.ts';
import type { Logger } from '../../core/log.ts';
import { toNodeReadable } from './node-streams.ts';
import { isRetriableStaleReset, probeFor, requestProbed } from './stale-sockets.ts';
import { errorCode, toForwardError } from './transport-errors.ts';
import { createUpstreamConnector } from './upstream-lookup.ts';
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
   * Returns how many there were.
   */
  abortAll(reason: unknown): number;
  close(): Promise<void>;
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

function hasNullBody(method: string, status: number): boolean {
  return method === 'HEAD' || status === 204 || status === 205 || status === 304 || status < 200;
}

const noop = (): void => {};

/** An answer nobody waits for any more: its body destroyed (undici's body errors on destroy: never unhandled). */
const discard = (data: Dispatcher.ResponseData): void => {
  data.body.on('error', noop).destroy();
};

/** setTimeout's ceiling (2^31 - 1 ms, about 24.8 days); longer deadlines are clamped. */
const MAX_TIMER_MS = 2_147_483_647;

/**
 * Why an answer undici parsed cannot be relayed, or undefined: a status outside 100..999
 * (no HTTP stack writes it), or a transfer coding besides chunked (undici removes the
 * framing; `gzip, chunked` would reach the client still gzipped with nothing saying so).
 */
function unrelayableAnswer(data: Dispatcher.ResponseData): string | undefined {
  if (!Number.isInteger(data.statusCode) || data.statusCode < 100 || data.statusCode > 999) return `answered with status ${data.statusCode}`;
  const te = data.headers['transfer-encoding'];
  if (te !== undefined) {
    const codings = String(te).split(',').map((c) => c.trim().toLowerCase());
    if (codings.some((c) => c !== '' && c !== 'chunked')) return `answered with Transfer-Encoding "${String(te)}" (only chunked is relayed)`;
  }
  return undefined;
}

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

  /**
   * `pending`, or the abort if it comes first. undici applies an abort only once the request
   * is on a socket: one queued for a free connection (UPSTREAM_MAX_CONNECTIONS) or still
   * connecting would wait that out, past its deadline or its client. undici still aborts
   * it when it gets a socket (it kept the reason); an answer that arrives anyway is dropped.
   */
  settle(pending: Promise<Dispatcher.ResponseData>): Promise<Dispatcher.ResponseData> {
    if (this.aborted) {
      pending.then(discard, noop);
      return Promise.reject(this.reason);
    }
    return new Promise((resolve, reject) => {
      const onAbort = (): void => {
        pending.then(discard, noop);
        reject(this.reason);
      };
      this.once('abort', onAbort);
      pending.then(
        (data) => {
          this.off('abort', onAbort);
          resolve(data);
        },
        (err: unknown) => {
          this.off('abort', onAbort);
          reject(err);
        },
      );
    });
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

  const connect = createUpstreamConnector(upstreamHosts, connectTimeoutMs);

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
    const probe = probeFor(req);
    let data: Dispatcher.ResponseData;
    try {
      try {
        data = await exchange.settle(requestProbed(agent, requestOptions, probe));
      } catch (err) {
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
          data = await exchange.settle(freshAgent.request(requestOptions));
        } catch (retryErr) {
          if (exchange.aborted) throw exchange.reason;
          throw toForwardError(req, retryErr);
        }
      }
    } catch (err) {
      exchange.finish();
      throw err;
    }
    const unrelayable = unrelayableAnswer(data);
    if (unrelayable !== undefined) {
      discard(data);
      exchange.finish();
      throw new ForwardError('bad_response', `upstream ${req.fn.name} (${req.fn.upstream.origin}) ${unrelayable}`);
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

  const abortAll = (reason: unknown): number => {
    const exchanges = [...live];
    for (const exchange of exchanges) exchange.abort(reason);
    return exchanges.length;
  };

  return { forward, abortAll, close };
}
