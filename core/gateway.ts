/**
 * createGateway(config, deps) -> { fetch }: the whole request path, top to bottom.
 *
 *   route -> look up -> identify -> authorize -> limit body -> rewrite headers -> forward -> relay
 *
 * Stages share one small value ({ fn, identity }); the inbound Request is never mutated.
 * Every answer the gateway makes itself is a GatewayError rendered by toResponse().
 */
import { cidrContains, parseCidr, type Cidr } from './addresses.ts';
import { limitBody, NO_BODY } from './body.ts';
import type { CatalogSnapshot, FunctionEntry } from './catalog.ts';
import { GatewayError, isGatewayError, toResponse } from './errors.ts';
import { ForwardError, type ForwardFailure, type Forwarder } from './forwarder.ts';
import { buildUpstreamHeaders, canonicalName, stripResponseHopByHop } from './headers.ts';
import { ANONYMOUS, createIdentifier, type Identity, type KeyConfig } from './identity.ts';
import { silentLogger, type Logger } from './log.ts';
import { Metrics } from './metrics.ts';
import { ALLOW_HEADER, createRouteTable, parseFunctionTarget, PROXY_METHODS } from './routes.ts';

export interface GatewayLimits {
  /** Request body limit in bytes, unless the function's row sets its own. Default 20 MiB. */
  readonly maxBodyBytes?: number;
  /** Overall per-request deadline in ms, unless the function's row sets its own. Default 150 s. */
  readonly requestTimeoutMs?: number;
  /**
   * Request header lines accepted; more is 431 too_many_headers. Default 100 (Apache's
   * LimitRequestFields). The gateway adds about ten of its own, and an upstream that stops
   * reading at its own count (Node keeps 1,000 silently, Python refuses over 100) must never
   * be the one to drop the identity headers.
   */
  readonly maxHeaderLines?: number;
}

export interface GatewayConfig {
  readonly keys: KeyConfig;
  readonly limits?: GatewayLimits;
  /** CIDRs of proxies in front of the gateway whose X-Forwarded-* are kept and extended. */
  readonly trustedProxies?: readonly string[];
  /** Serve Prometheus text on /metrics. Default true. */
  readonly metrics?: boolean;
}

export interface GatewayDeps {
  /** The current catalog snapshot, undefined until the first load. */
  readonly catalog: () => CatalogSnapshot | undefined;
  /** Host readiness beyond a loaded catalog (e.g. the LISTEN connection is up). Default: true. */
  readonly ready?: () => boolean;
  readonly forward: Forwarder;
  readonly now?: () => number;
  readonly log?: Logger;
  /** Used only to fetch a remote JWKS. Default: globalThis.fetch. */
  readonly fetch?: typeof fetch;
  /** Extra Prometheus lines from the host (catalog gauges). */
  readonly extraMetrics?: () => string[];
  /** Request id generator. Default: crypto.randomUUID. */
  readonly requestId?: () => string;
  /**
   * Creates the empty Headers of each upstream request. Default: `new Headers()`. A host
   * whose Requests use another Headers implementation passes its own (Node: @whatwg-node's,
   * several times cheaper than Node's built-in one, which validates every append and sorts
   * on every iteration; the values put there are already validated: by the host's HTTP
   * parser, or by the gateway itself).
   */
  readonly newHeaders?: () => Headers;
}

/** What a host knows about a request beyond the Request object. */
export interface RequestContext {
  /** The request target exactly as on the request line (Node: req.url). Default: from request.url. */
  readonly rawTarget?: string;
  /** The TCP peer address. */
  readonly clientAddress?: string;
  /** Aborted when the client goes away. Default: request.signal. */
  readonly signal?: AbortSignal;
  /**
   * Header lines as received (Node: rawHeaders.length / 2), for the maxHeaderLines limit.
   * Default: the entries of request.headers (repeated names joined count once).
   */
  readonly headerLines?: number;
}

export interface Gateway {
  fetch(request: Request, context?: RequestContext): Promise<Response>;
  /** Fetches a remote JWKS ahead of traffic; resolves either way. */
  warm(): Promise<void>;
  readonly metrics: Metrics;
  /** Makes /readyz answer 503 and new function requests 503 shutting_down (for draining). */
  drain(): void;
}

const FAILURE_CODES: Record<ForwardFailure, ConstructorParameters<typeof GatewayError>[0]> = {
  unreachable: 'upstream_unreachable',
  connect_timeout: 'upstream_connect_timeout',
  headers_timeout: 'upstream_headers_timeout',
  deadline: 'upstream_deadline',
  blocked: 'upstream_blocked',
  reset: 'upstream_reset',
  bad_response: 'upstream_bad_response',
};

/**
 * RFC 9112 3.2: a Host that is not `uri-host [":" port]` is a 400. Hosts build the request
 * URL from it (@whatwg-node: `http://` + Host + target), so a Host carrying `/`, `#`, `@` or
 * a comma (two Host lines joined) would otherwise pick the route or break URL parsing.
 */
const HOST_HEADER = /^(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$/;

/**
 * A method override: any header whose name mentions "method" or "verb" but the preflight's
 * own (X-HTTP-Method-Override, X-HTTP-Method, X-Original-Method, X-HTTP-Verb, ...; browsers
 * send no such header on a preflight), or a `_method` query parameter (Rails, Laravel,
 * Express method-override) in any spelling a framework folds to it: `&` or `;` separated,
 * percent-encoded, `+` for space, PHP's `.`/space -> `_` and `[...]` suffixes.
 */
function hasMethodOverride(request: Request, target: string): boolean {
  for (const name of request.headers.keys()) {
    const canonical = canonicalName(name);
    if ((canonical.includes('method') || canonical.includes('verb')) && canonical !== 'access-control-request-method') return true;
  }
  const q = target.indexOf('?');
  if (q < 0) return false;
  for (const pair of target.slice(q + 1).split(/[&;]/)) {
    const eq = pair.indexOf('=');
    if (queryKeyIsMethod(eq < 0 ? pair : pair.slice(0, eq))) return true;
  }
  return false;
}

/** Whether a raw query key reads as `_method` once a framework decoded and folded it. */
function queryKeyIsMethod(raw: string): boolean {
  if (!/method/i.test(raw) && !/%/.test(raw)) return false; // the common case: no work
  let key = raw.replace(/\+/g, ' ');
  try {
    key = decodeURIComponent(key);
  } catch {
    // a malformed escape: judge the text as it is
  }
  // PHP's folding (php_register_variable_ex): the name ends at NUL, leading spaces go, then
  // ' ' and '.' become '_' and a '[' starts an array index. Read with and without dropping
  // the leading spaces, so no folding of either kind can hide an override.
  const nul = key.indexOf('\u0000');
  if (nul >= 0) key = key.slice(0, nul);
  const fold = (name: string) => name.replace(/[ .]/g, '_').replace(/\[.*$/, '').trimEnd().toLowerCase();
  return fold(key) === '_method' || fold(key.trimStart()) === '_method';
}

/**
 * A browser's CORS preflight (Fetch standard 4.8): OPTIONS with Origin and
 * Access-Control-Request-Method and no body. Only that skips verify_jwt. An OPTIONS with a
 * body or a method-override header (any spelling a framework folds to one) is an ordinary
 * request to a function that may not look at the method, and needs credentials. The body is
 * judged by its framing headers (Content-Length, Transfer-Encoding), as on the wire: a host
 * hands every OPTIONS a body stream, empty or not.
 */
function isCorsPreflight(request: Request, target: string): boolean {
  const headers = request.headers;
  if (request.method !== 'OPTIONS' || !headers.has('origin') || !headers.has('access-control-request-method')) return false;
  if (headers.has('transfer-encoding') || (headers.get('content-length') ?? '0') !== '0') return false;
  return !hasMethodOverride(request, target);
}

/** Proxies a request may have passed before this gateway refuses it as a loop. */
const MAX_VIA_HOPS = 16;

/**
 * A caller's X-Request-Id kept as is: a plain token starting with a letter or digit, no '/'
 * (a function may put it in a file path or a command line: no `..`, no `-option`).
 */
const REQUEST_ID = /^[A-Za-z0-9][A-Za-z0-9._:+=-]{0,127}$/;

function targetOf(request: Request): string {
  const url = new URL(request.url);
  return url.pathname + url.search;
}

/** The scheme the client used: read off the URL's spelling, parsed only when unusual. */
function protoOf(url: string): 'http' | 'https' {
  if (url.startsWith('http://')) return 'http';
  if (url.startsWith('https://')) return 'https';
  return new URL(url).protocol === 'https:' ? 'https' : 'http';
}

/** The path of a request target, without its query. */
function pathOf(target: string): string {
  const q = target.indexOf('?');
  return q < 0 ? target : target.slice(0, q);
}

/** RFC 7518 3.2: an HS256 key is at least 256 bits. */
const MIN_SECRET_LENGTH = 32;

/**
 * Builds the gateway. Throws a TypeError when config.keys holds no key at all (no
 * jwtSecret, jwks or jwksUrl): such a gateway could verify nothing and would answer 401 to
 * every token, which is a host's configuration mistake, not a policy; and when the HS256
 * secret is shorter than 32 characters (a guessable key would let anyone mint tokens).
 */
function countHeaders(headers: Headers): number {
  let n = 0;
  headers.forEach(() => n++);
  return n;
}

export function createGateway(config: GatewayConfig, deps: GatewayDeps): Gateway {
  if (!config.keys?.jwtSecret && !config.keys?.jwks && !config.keys?.jwksUrl) {
    throw new TypeError('createGateway: config.keys needs a jwtSecret, a jwks or a jwksUrl to verify tokens with');
  }
  if (config.keys.jwtSecret && config.keys.jwtSecret.length < MIN_SECRET_LENGTH) {
    throw new TypeError(`createGateway: config.keys.jwtSecret must be at least ${MIN_SECRET_LENGTH} characters (HS256 needs a 256-bit key)`);
  }
  const now = deps.now ?? Date.now;
  const log = deps.log ?? silentLogger;
  const ready = deps.ready ?? (() => true);
  const newId = deps.requestId ?? (() => crypto.randomUUID());
  const newHeaders = deps.newHeaders ?? (() => new Headers());
  /** This gateway's Via pseudonym: random per instance, so a loop through it is recognised. */
  const viaToken = `pgstack-${crypto.randomUUID().slice(0, 8)}`;
  const maxBodyBytes = config.limits?.maxBodyBytes ?? 20 * 1024 * 1024;
  const requestTimeoutMs = config.limits?.requestTimeoutMs ?? 150_000;
  const maxHeaderLines = config.limits?.maxHeaderLines ?? 100;
  const trusted: Cidr[] = (config.trustedProxies ?? []).map(parseCidr);
  const identifier = createIdentifier(config.keys, { now, log, fetch: deps.fetch ?? globalThis.fetch.bind(globalThis) });
  const route = createRouteTable({ metrics: config.metrics ?? true });
  const metrics = new Metrics();
  let draining = false;

  const isTrusted = (address: string | undefined) => address !== undefined && trusted.some((c) => cidrContains(c, address));

  /** Authorize: the function's verify_jwt rule applied to what the credentials proved. */
  async function authorize(fn: FunctionEntry, request: Request, preflight: boolean): Promise<Identity> {
    // CORS preflight carries no credentials (browsers never send them): never required.
    const open = !fn.verifyJwt || preflight;
    const credentials = await identifier.identify(request.headers);
    switch (credentials.kind) {
      case 'valid':
        if (!open && credentials.identity.role === 'anon') throw new GatewayError('credentials_required');
        return credentials.identity;
      case 'invalid':
        // On an open function a foreign token (a webhook's own) just makes the caller anon.
        // A credential over the size bound is refused everywhere (431): it was never read, so
        // the caller must not be silently downgraded to anon, nor the huge header forwarded.
        if (open && credentials.error.code !== 'token_too_large') return ANONYMOUS;
        throw credentials.error;
      case 'none':
        if (!open) throw new GatewayError('credentials_required');
        return ANONYMOUS;
    }
  }

  async function proxy(request: Request, context: RequestContext, requestId: string, state: { fn?: string; role?: string }): Promise<Response> {
    if (draining) throw new GatewayError('shutting_down', { headers: { 'retry-after': '1', connection: 'close' } });
    if ((context.headerLines ?? countHeaders(request.headers)) > maxHeaderLines) throw new GatewayError('too_many_headers');
    if (!PROXY_METHODS.has(request.method)) throw new GatewayError('method_not_allowed', { headers: { allow: ALLOW_HEADER } });
    const parsed = parseFunctionTarget(context.rawTarget ?? targetOf(request));
    if (isGatewayError(parsed)) throw parsed;
    // A catalog row that points back at a gateway (its own compose name, a mapped port)
    // would multiply one request without end: each gateway stamps Via (RFC 9110 7.6.3) and
    // refuses a request that already carries its stamp or has passed too many proxies.
    const via = request.headers.get('via');
    if (via !== null && (via.includes(viaToken) || via.split(',').length >= MAX_VIA_HOPS)) throw new GatewayError('loop_detected');
    // RFC 9112 6.1: a transfer coding the gateway does not understand (gzip, chunked) would
    // reach the function still coded with nothing saying so.
    const transferEncoding = request.headers.get('transfer-encoding');
    if (transferEncoding !== null) {
      const codings = transferEncoding.split(',').map((c) => c.trim().toLowerCase());
      if (codings.some((c) => c !== '' && c !== 'chunked')) throw new GatewayError('transfer_coding_not_supported');
    }

    // Look up: one snapshot for the whole request, even if a reload lands meanwhile.
    const snapshot = deps.catalog();
    if (!snapshot) throw new GatewayError('catalog_not_loaded', { headers: { 'retry-after': '1' } });
    const fn = snapshot.functions.get(parsed.name);
    if (!fn) throw new GatewayError('function_not_found');
    state.fn = fn.name;

    // Authorize before anything else about the request: an anon caller learns nothing about
    // a verify_jwt function (not even that it refuses upgrades) beyond its 401.
    const preflight = fn.verifyJwt && isCorsPreflight(request, parsed.target);
    const identity = await authorize(fn, request, preflight);
    state.role = identity.role;
    // A preflight let through without credentials has no body to bring: whatever a body
    // the transport may have framed anyway (a header it used that the Request did not
    // show), none reaches the function.
    const bodiless = preflight && identity.role === 'anon';

    // An upgrade would hand the socket to the function outside this pipeline; websockets
    // are refused. Other upgrade offers (h2c) are dropped as hop-by-hop headers.
    if (/\bwebsocket\b/i.test(request.headers.get('upgrade') ?? '')) throw new GatewayError('upgrade_not_supported');

    const limited = bodiless ? NO_BODY : limitBody(request, fn.maxBodyBytes ?? maxBodyBytes);
    if (isGatewayError(limited)) throw limited;

    const headers = buildUpstreamHeaders(request.headers, identity, requestId, {
      clientAddress: context.clientAddress,
      proto: protoOf(request.url),
      host: request.headers.get('host') ?? new URL(request.url).host,
      trustForwarded: isTrusted(context.clientAddress),
      via: `1.1 ${viaToken}`,
    }, newHeaders());
    if (bodiless) headers.delete('content-length');

    const path = fn.upstream.basePath + parsed.target;
    let response: Response;
    try {
      response = await deps.forward({
        fn,
        method: request.method,
        url: fn.upstream.origin + path,
        path,
        headers,
        body: limited.body,
        signal: context.signal ?? request.signal,
        deadlineMs: fn.timeoutMs ?? requestTimeoutMs,
      });
    } catch (err) {
      if (limited.exceeded()) throw new GatewayError('payload_too_large', { cause: err });
      // The client left: not an upstream failure (nor an alert an outsider can inflate).
      // While draining, the host cut it at the end of its grace period.
      if ((context.signal ?? request.signal).aborted) throw new GatewayError(draining ? 'shutting_down' : 'client_closed_request', { cause: err });
      if (err instanceof ForwardError) throw new GatewayError(FAILURE_CODES[err.kind], { cause: err });
      if (isGatewayError(err)) throw err;
      throw new GatewayError('upstream_unreachable', { cause: err });
    }
    return relay(response, requestId);
  }

  /** Relay: the function's own answer, untouched but for hop-by-hop headers and the request id. */
  function relay(response: Response, requestId: string): Response {
    try {
      stripResponseHopByHop(response.headers);
      response.headers.set('x-request-id', requestId);
      return response;
    } catch {
      // Immutable headers (a Response from fetch()): copy them once.
      const headers = new Headers(response.headers);
      stripResponseHopByHop(headers);
      headers.set('x-request-id', requestId);
      return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
    }
  }

  function readiness(): Response {
    const snapshot = deps.catalog();
    const ok = !draining && snapshot !== undefined && ready();
    const body = {
      status: ok ? 'ready' : 'not_ready',
      catalog: snapshot ? { functions: snapshot.functions.size, dropped: snapshot.dropped.length, loadedAt: new Date(snapshot.loadedAt).toISOString() } : null,
      listener: ready(),
      draining,
    };
    return Response.json(body, { status: ok ? 200 : 503, headers: { 'cache-control': 'no-store' } });
  }

  async function handle(request: Request, context: RequestContext = {}): Promise<Response> {
    const started = now();
    const inbound = request.headers.get('x-request-id');
    const requestId = inbound && REQUEST_ID.test(inbound) ? inbound : newId();
    const state: { fn?: string; role?: string } = {};
    let response: Response;
    let code: string | undefined;
    metrics.requestStarted();
    try {
      const host = request.headers.get('host');
      if (host !== null && host !== '' && !HOST_HEADER.test(host)) throw new GatewayError('bad_request', { message: 'The Host header is not a valid host[:port].' });
      const kind = await route(request);
      if (kind === 'function') {
        response = await proxy(request, context, requestId, state);
      } else if (kind !== undefined && request.method !== 'GET' && request.method !== 'HEAD') {
        throw new GatewayError('method_not_allowed', { headers: { allow: 'GET, HEAD' } });
      } else if (kind === 'health') {
        response = new Response('ok\n', { headers: { 'content-type': 'text/plain; charset=utf-8', 'cache-control': 'no-store' } });
      } else if (kind === 'ready') {
        response = readiness();
      } else if (kind === 'metrics') {
        response = new Response(metrics.render(deps.extraMetrics?.() ?? []), { headers: { 'content-type': 'text/plain; version=0.0.4' } });
      } else {
        throw new GatewayError('not_found');
      }
    } catch (err) {
      const error = isGatewayError(err) ? err : unexpected(request, err);
      code = error.code;
      if (error.status >= 500 || error.code === 'internal_error') {
        log(error.status === 500 ? 'error' : 'warn', error.message, { request_id: requestId, code, cause: describe(error.cause) });
      }
      response = toResponse(error, requestId);
    }
    const ms = now() - started;
    metrics.requestFinished(state.fn ?? '', response.status, ms / 1000, code);
    log('info', 'request', {
      request_id: requestId,
      method: request.method,
      path: pathOf(context.rawTarget ?? targetOf(request)),
      function: state.fn,
      role: state.role,
      status: response.status,
      code,
      ms,
    });
    return response;
  }

  return {
    fetch: handle,
    warm: () => identifier.warm(),
    metrics,
    drain() {
      draining = true;
    },
  };
}

/**
 * An error no stage mapped. A request URL that does not parse (an absolute-form target glued
 * to the Host by the host's adapter) is the client's fault, 400; anything else is ours, 500.
 */
function unexpected(request: Request, err: unknown): GatewayError {
  let parses = false;
  try {
    parses = URL.canParse(request.url);
  } catch {
    // a url getter that throws is as unparseable as a bad URL
  }
  return parses ? new GatewayError('internal_error', { cause: err }) : new GatewayError('bad_request', { message: 'The request URL does not parse.', cause: err });
}

function describe(cause: unknown): string | undefined {
  if (cause === undefined) return undefined;
  if (cause instanceof Error) return `${cause.name}: ${cause.message}${cause.cause ? ` <- ${describe(cause.cause)}` : ''}`;
  return String(cause);
}
