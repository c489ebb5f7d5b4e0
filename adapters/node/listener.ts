/**
 * node:http <-> fetch. Translation only: the raw request target and the peer address go to
 * the core as context; all policy lives in core/.
 *
 * Requests are converted by @whatwg-node/server (the Request's signal aborts when the client
 * goes away). Responses are written here, not by the adapter's sendNodeResponse, because a
 * proxy needs what that one does not do: it pipes the body with `.pipe()`, so a body that
 * fails mid-way (the upstream reset, the deadline passed) never ends the client's response,
 * which then hangs with a clean-looking head forever. Here the body is piped with
 * stream.pipeline's guarantees (pipeBody): backpressure from the client reaches the
 * upstream, a failing body destroys the client connection (the client sees a truncated
 * response, never a clean end), and a client that leaves destroys the body (which cancels
 * the upstream exchange).
 *
 * Answers given before the request body has arrived (401, 404, 413, an upstream that
 * answered early): a small body still to come is read and dropped by Node and the
 * connection stays open for the next request. Otherwise the answer says `Connection:
 * close` and the connection closes the way nginx's lingering_close does: the answer, then
 * FIN, while what the client still sends is read and dropped for up to LINGER_MS. Closing
 * at once with unread data makes the kernel send RST, which can destroy the answer in the
 * client's receive buffer before the client reads it.
 */
import { createServer, type IncomingMessage, type OutgoingHttpHeaders, type Server, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { Readable } from 'node:stream';
import { Headers as WhatwgHeaders } from '@whatwg-node/fetch';
import { createServerAdapter } from '@whatwg-node/server';
import { ForwardError, GatewayError, toResponse, type Gateway, type Logger } from '../../core/index.ts';
import { toNodeReadable } from './node-streams.ts';
import { createPipelines } from './pipelining.ts';
import { classifyTransportError } from './transport-errors.ts';

interface NodeContext {
  req: IncomingMessage;
  res: ServerResponse;
}

export interface ListenerOptions {
  /** Time allowed for a client to send its request head. Default 20 s. */
  readonly headersTimeoutMs?: number;
  /** Idle keep-alive connections close after this. Default 5 s. */
  readonly keepAliveTimeoutMs?: number;
  /** Where answers that could not be written are reported. */
  readonly log?: Logger;
}

/**
 * An empty Headers of the implementation the listener's Requests already use (@whatwg-node's),
 * for GatewayDeps.newHeaders: several times cheaper to fill and iterate than Node's built-in
 * Headers, which validates every append and sorts on every iteration.
 */
export function newRequestHeaders(): Headers {
  return new WhatwgHeaders() as Headers;
}

/** Creates (does not start) the HTTP server for a gateway. */
export function createListener(gateway: Gateway, options: ListenerOptions = {}): Server {
  const log = options.log;
  const reporter = createReporter(gateway, log);
  const adapter = createServerAdapter<NodeContext>((request, ctx) => {
    // A request that asked for an upgrade (Connection: upgrade) leaves Node's parser paused
    // after it: nothing later on the connection would ever be read. Say so and close it.
    if (ctx.req.headers.upgrade !== undefined && /(?:^|,)\s*upgrade\s*(?:,|$)/i.test(String(ctx.req.headers.connection ?? ''))) {
      ctx.res.setHeader('connection', 'close');
    }
    return gateway.fetch(request, {
      rawTarget: ctx.req.url,
      clientAddress: ctx.req.socket.remoteAddress,
      headerLines: ctx.req.rawHeaders.length / 2,
    });
  });
  const server = createServer(
    {
      // Two Authorization (or apikey) headers must reach the core as one joined, invalid
      // value; by default Node keeps the first and drops the rest silently.
      joinDuplicateHeaders: true,
      // The gateway enforces its own per-request deadline; Node's whole-request timeout
      // (300 s) would cut long uploads that the deadline allows.
      requestTimeout: 0,
      headersTimeout: options.headersTimeoutMs ?? 20_000,
      // How often Node checks that deadline (default 30 s: a slow head lasted up to ~50 s).
      connectionsCheckingInterval: 2_000,
      keepAliveTimeout: options.keepAliveTimeoutMs ?? 5_000,
      // Streamed chunks (SSE) leave as they are written, not after Nagle's delay.
      noDelay: true,
    },
    handle,
  );
  // Every header line reaches req.headers: by default Node keeps the first 1,000 and drops
  // the rest silently, while its parser still frames the body by a Content-Length or
  // Transfer-Encoding among the dropped ones (a request the core took for bodyless). The
  // 16 KiB head limit bounds them; the core refuses more than its maxHeaderLines.
  server.maxHeadersCount = 0;
  // Expect: 100-continue (RFC 9110 10.1.1): Node would answer 100 before the gateway has
  // looked at the request, so an anonymous client would upload its whole body to a
  // verify_jwt function only to get 401. Handling 'checkContinue' ourselves, the 100 goes
  // out when the core starts reading the body: after routing, lookup and authorization.
  server.on('checkContinue', handle);
  const awaiting = new Map<ServerResponse, Awaiting>();
  awaitingByServer.set(server, { awaiting, reporter });
  // One request at a time per connection, and nothing after a `Connection: close` answer
  // (see pipelining.ts).
  function handle(req: IncomingMessage, res: ServerResponse): void {
    pipelines.admit(req, res, dispatch);
  }
  function dispatch(req: IncomingMessage, res: ServerResponse): void {
    // GET and HEAD bodies are never forwarded (the adapter drops them): no wrapper needed.
    const body = req.method === 'GET' || req.method === 'HEAD' ? undefined : new RequestBody(req, res);
    const source = body ? Object.assign(body, { method: req.method, url: req.url, headers: req.headers, socket: req.socket }) : req;
    awaiting.set(res, { req, body });
    Promise.resolve(adapter.handleNodeRequestAndResponse(source as unknown as IncomingMessage, res, { req, res }))
      .then((response) => {
        awaiting.delete(res);
        const instead = sendResponse(response, req, res, body, !server.listening, reporter);
        if (instead !== undefined) {
          const cause = instead.cause;
          log?.('warn', "a function's answer could not be relayed; the gateway answered instead", {
            request_id: response.headers.get('x-request-id'),
            status: response.status,
            code: instead.code,
            error: cause instanceof Error ? `${cause.name}: ${cause.message}` : String(cause),
          });
        }
      })
      .catch((err: unknown) => {
        // The core answers every failure itself; this is the last guard: never a hanging
        // response, never an unhandled rejection.
        awaiting.delete(res);
        log?.('error', 'the listener failed to answer a request', { error: err instanceof Error ? `${err.name}: ${err.message}` : String(err) });
        answerInstead(new GatewayError('internal_error', { cause: err }), req, res, body, reporter);
      });
  }
  // No 'upgrade' listener on purpose: Node then hands upgrade requests to the adapter like
  // any other, so the core authorizes them and refuses websockets (upgrade_not_supported).
  // Node's default 'clientError' answers malformed framing (conflicting Content-Length /
  // Transfer-Encoding, bad header lines) with 400 or 431 and closes the connection, so
  // nothing is smuggled through as a second request.
  return server;
}

/** A request the core has not answered yet. */
interface Awaiting {
  readonly req: IncomingMessage;
  readonly body: RequestBody | undefined;
}
const awaitingByServer = new WeakMap<Server, { awaiting: Map<ServerResponse, Awaiting>; reporter: Reporter }>();

/**
 * Answers `error` (503 shutting_down at the end of a shutdown's grace period) to every
 * request of `server` the core has not answered yet, so none is cut without a status.
 * Resolves when those answers are written, or after `flushMs`.
 */
export async function answerAwaiting(server: Server, error: GatewayError, flushMs = 500): Promise<number> {
  const registered = awaitingByServer.get(server);
  if (!registered || registered.awaiting.size === 0) return 0;
  const { awaiting, reporter } = registered;
  const written: Array<Promise<void>> = [];
  for (const [res, { req, body }] of awaiting) {
    if (res.headersSent || res.destroyed) continue;
    written.push(new Promise<void>((resolve) => res.once('close', () => resolve()).once('finish', () => resolve())));
    answerInstead(error, req, res, body, reporter);
  }
  awaiting.clear();
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([Promise.all(written), new Promise<void>((resolve) => (timer = setTimeout(resolve, flushMs)))]);
  clearTimeout(timer);
  return written.length;
}

/** Every connection's pipeline, whichever server it belongs to. */
const pipelines = createPipelines();

/** Unread request bodies up to this size are drained to keep the connection (Node's default). */
const DRAIN_LIMIT_BYTES = 256 * 1024;
/** How long a connection closed with an unread body keeps reading (and dropping) what the client sends. */
const LINGER_MS = 5_000;

/**
 * The request body as the core sees it: a Readable fed from the IncomingMessage, with
 * backpressure. Destroying it (the upstream failed or answered early, the body went over
 * the limit) stops reading and leaves the connection alone, so the answer that follows
 * still reaches the client; IncomingMessage.destroy() would destroy the socket, and the
 * answer with it.
 */
// Its fields must not be called `req` or `raw`: @whatwg-node/server takes
// `nodeRequest.raw || nodeRequest.req` as the request to read, which would bypass this wrapper.
class RequestBody extends Readable {
  /** The core started reading the body. */
  started = false;
  private readonly source: IncomingMessage;
  private readonly response: ServerResponse;
  private readonly onData: (chunk: Buffer) => void;
  private readonly onEnd: () => void;
  private readonly onError: (err: Error) => void;
  private readonly onClose: () => void;

  constructor(req: IncomingMessage, res: ServerResponse) {
    super({ highWaterMark: 64 * 1024 });
    this.source = req;
    this.response = res;
    // Assigned here rather than as arrow-function fields: under tsx a field's arrow gets a
    // name by Object.defineProperty (esbuild keepNames) on every instance, ~0.7 us each.
    this.onData = (chunk) => {
      if (!this.push(chunk)) this.source.pause();
    };
    this.onEnd = () => {
      this.push(null);
    };
    this.onError = (err) => {
      this.destroy(new GatewayError('client_closed_request', { message: 'The client connection failed while sending the request body.', cause: err }));
    };
    this.onClose = () => {
      // A GatewayError: the forwarder passes the body's own errors through as the core's.
      if (!this.source.complete) this.destroy(new GatewayError('client_closed_request', { message: 'The client closed the connection before the request body was complete.' }));
    };
  }

  override _read(): void {
    if (!this.started) {
      this.started = true;
      if (expectsContinue(this.source)) this.response.writeContinue();
      this.source.on('data', this.onData);
      this.source.once('end', this.onEnd);
      this.source.once('error', this.onError);
      this.source.once('close', this.onClose);
    }
    this.source.resume();
  }

  override _destroy(err: Error | null, callback: (error?: Error | null) => void): void {
    this.source.off('data', this.onData);
    this.source.off('end', this.onEnd);
    this.source.off('error', this.onError);
    this.source.off('close', this.onClose);
    callback(err);
  }
}

/**
 * Whether an answer must close the connection: the request body has not all arrived, and
 * it is not a small one nobody touched (which Node reads and drops, keeping the connection).
 * A 413 always closes: the client's body is, by definition, more than the gateway will read.
 */
function expectsContinue(req: IncomingMessage): boolean {
  // Node's own test for sending a request to 'checkContinue' (any 100-continue token).
  return /(?:^|\W)100-continue(?:$|\W)/i.test(req.headers.expect ?? '');
}

function mustClose(req: IncomingMessage, status: number, body: RequestBody | undefined): boolean {
  if (req.complete) return false;
  // A client still waiting for 100 Continue may or may not send its body after a final
  // answer; closing is the only framing both sides agree on.
  if (expectsContinue(req) && !body?.started) return true;
  if (status === 413 || body?.started) return true;
  const declared = req.headers['content-length'];
  return declared === undefined || !(Number(declared) <= DRAIN_LIMIT_BYTES);
}

/**
 * Replaces what Node does once the last response on a connection is written (destroySoon:
 * FIN, then destroy) with a lingering close: FIN, keep reading and dropping whatever the
 * client still sends, destroy when the client closes its side or after LINGER_MS.
 */
function lingerOnClose(socket: Socket, req: IncomingMessage): void {
  socket.destroySoon = function lingeringClose(this: Socket): void {
    this.end();
    req.resume();
    const timer = setTimeout(() => this.destroy(), LINGER_MS);
    timer.unref();
    this.once('close', () => clearTimeout(timer));
  };
}

/**
 * A small unread body is drained by Node after the answer, keeping the connection; a client
 * that stops sending it would hold the connection forever (no request timeout applies
 * then), so the drain gets LINGER_MS.
 */
function boundDrain(req: IncomingMessage, res: ServerResponse): void {
  res.once('finish', () => {
    if (req.complete) return;
    const socket = req.socket;
    const timer = setTimeout(() => {
      if (!req.complete) socket.destroy();
    }, LINGER_MS);
    timer.unref();
    // Both listeners go when either fires: the socket outlives the request on a keep-alive
    // connection, and a listener left on it per request kept every such request in memory.
    const done = (): void => {
      clearTimeout(timer);
      req.off('end', done);
      socket.off('close', done);
    };
    req.once('end', done);
    socket.once('close', done);
  });
}

/**
 * The gateway's own error in place of an answer that could not be written. A second
 * failure, or an answer already under way, destroys the response: never a hang, never a throw.
 */
function answerInstead(error: GatewayError, req: IncomingMessage, res: ServerResponse, requestBody: RequestBody | undefined, reporter: Reporter): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  try {
    // writeHead keeps what a failed call had already stored (Node keeps statusMessage).
    res.statusMessage = '';
    for (const name of res.getHeaderNames()) res.removeHeader(name);
    sendResponse(toResponse(error), req, res, requestBody, true, reporter, true);
  } catch {
    res.destroy();
  }
}

/**
 * Writes a fetch Response to a node:http response, streaming its body (see the head of this
 * file). Returns the GatewayError answered instead when the response could not be relayed
 * (Node refused its status or a header; its body failed before the head went out);
 * undefined otherwise.
 */
function sendResponse(
  response: Response,
  req: IncomingMessage,
  res: ServerResponse,
  requestBody: RequestBody | undefined,
  shuttingDown: boolean,
  reporter: Reporter,
  fallback = false,
): GatewayError | undefined {
  const body = response.body;
  if (res.destroyed || res.writableEnded) {
    // The client left before the answer was ready: release the upstream body.
    body?.cancel().catch(noop);
    return undefined;
  }
  const readable = body === null ? null : toNodeReadable(body);
  if (readable !== null && !fallback && (readable.errored || (readable.closed && !readable.readableEnded))) {
    // The body failed before its head went out (the function's head and a broken chunk in
    // one packet, a reset right after the head): the head is not relayed, a 502 says why.
    const cause = readable.errored;
    const code = cause instanceof ForwardError && cause.kind === 'deadline' ? 'upstream_deadline' : classifyTransportError(cause) === 'bad_response' ? 'upstream_bad_response' : 'upstream_reset';
    const instead = new GatewayError(code, { cause });
    answerInstead(instead, req, res, requestBody, reporter);
    return instead;
  }
  const headers: OutgoingHttpHeaders = {};
  let hasCookies = false;
  response.headers.forEach((value, name) => {
    if (name !== 'set-cookie') headers[name] = value;
    else hasCookies = true;
  });
  // Each Set-Cookie on its own line: they cannot be joined with commas (RFC 6265 3).
  // (Asked only when there is one: @whatwg-node's getSetCookie() builds a Map of all headers.)
  if (hasCookies) {
    const cookies = response.headers.getSetCookie();
    if (cookies.length > 0) headers['set-cookie'] = cookies;
  }
  if (mustClose(req, response.status, requestBody)) {
    headers['connection'] = 'close';
    lingerOnClose(req.socket, req);
  } else if (!req.complete) {
    boundDrain(req, res);
  } else if (shuttingDown) {
    // The server stopped listening (graceful shutdown): an answer finished in the grace
    // period closes its connection, so server.close() completes as soon as the last one does.
    headers['connection'] = 'close';
  }
  try {
    if (headers['connection'] === 'close' || res.getHeader('connection') === 'close') pipelines.closing(req.socket);
    // No reason phrase: RFC 9112 4 lets clients ignore it, and Node writes the standard one.
    // A function's own (latin-1, UTF-8, a control byte) is what Node refuses to write.
    res.writeHead(response.status, headers);
  } catch (err) {
    // A status or header Node will not write: the function's answer cannot be relayed.
    body?.cancel().catch(noop);
    if (fallback) throw err;
    const instead = new GatewayError('upstream_bad_response', { cause: err });
    answerInstead(instead, req, res, requestBody, reporter);
    return instead;
  }
  if (readable === null) res.end();
  else {
    // Node sends the head with the first body bytes. When none are here yet (a stream, a
    // slow function), the head leaves now: the client has its status at once, and a body
    // that then fails is a broken response after a head, not an empty reply. (When the
    // body came with the head, as it mostly does, head and body leave in one write.)
    if (readable.readableLength === 0 && !readable.readableEnded) res.flushHeaders();
    pipeBody(readable, res, reporter, headers['x-request-id']);
  }
  return undefined;
}

/**
 * stream.pipeline(body, res) for the one case the listener has, without its per-call cost:
 * Node 20's pipeline allocates an AbortController and aborts it at every normal finish (a
 * DOMException with a captured stack), ~10% of a proxied request's CPU.
 * - backpressure: `.pipe()`;
 * - the body fails or closes before its end (upstream reset, deadline): the client's
 *   connection is destroyed, so the client sees a truncated response, never a clean end;
 * - the client leaves before the response finished: the body is destroyed, which cancels
 *   the upstream exchange;
 * - an error on the client's side is never left unhandled;
 * - each of those cuts is reported once (the core logged the request at its head).
 */
function pipeBody(body: Readable, res: ServerResponse, reporter: Reporter, requestId: unknown): void {
  if (body.closed && !body.readableEnded) {
    // Already gone (its events with it) before the answer was written.
    reporter.cut(res, requestId, body.errored ?? undefined);
    breakResponse(res, body.errored ?? undefined);
    return;
  }
  // Whichever side ends it first is the cause (the client leaving also destroys the body,
  // through the core's abort signal, before this sees the close).
  let cut = false;
  body.once('error', (err: Error) => {
    if (!cut && !res.destroyed) {
      cut = true;
      reporter.cut(res, requestId, err);
    }
    breakResponse(res, err);
  });
  body.once('close', () => {
    if (body.readableEnded || res.destroyed) return;
    cut = true;
    reporter.cut(res, requestId, undefined);
    breakResponse(res, undefined);
  });
  res.once('close', () => {
    if (res.writableFinished) return;
    if (!cut) {
      cut = true;
      reporter.cut(res, requestId, CLIENT_LEFT);
    }
    body.destroy();
  });
  res.on('error', noop);
  body.pipe(res);
}

/**
 * Ends a response whose body failed so that every client can tell: the connection is reset
 * (RST), not closed. A FIN would end an HTTP/1.0 response, or any without a length, as if
 * it were whole; with a length or chunked framing the client sees the cut either way.
 */
function breakResponse(res: ServerResponse, err: Error | undefined): void {
  const socket = res.socket;
  if (socket && !socket.destroyed) socket.resetAndDestroy();
  res.destroy(err);
}

/** The cause of a cut when the client left mid-response (not an error of the gateway's). */
const CLIENT_LEFT = Symbol('client left');

/**
 * What the listener reports that the core cannot see: a response cut before its end, by
 * the function (reset, deadline) or by the client leaving. The core's request line was
 * written at the response head.
 */
interface Reporter {
  cut(res: ServerResponse, requestId: unknown, cause: unknown): void;
}

function createReporter(gateway: Gateway, log: Logger | undefined): Reporter {
  return {
    cut(res, requestId, cause) {
      const why = cause === CLIENT_LEFT ? 'client' : cause instanceof ForwardError && cause.kind === 'deadline' ? 'deadline' : 'upstream';
      gateway.metrics?.responseCut(why);
      const fields: Record<string, unknown> = { request_id: requestId, status: res.statusCode, cause: why };
      if (cause instanceof Error) fields['error'] = `${cause.name}: ${cause.message}`;
      // A client leaving a stream (closing an SSE tab) is ordinary; a function failing mid-body is not.
      log?.(why === 'client' ? 'info' : 'warn', 'response cut before its end', fields);
    },
  };
}

const noop = (): void => {};
