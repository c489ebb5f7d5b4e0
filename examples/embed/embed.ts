/**
 * The core embedded in another fetch runtime: a static catalog, an HS256 secret, and the
 * runtime's own fetch() as the forwarder. gateway.ts beside this file wires it to the
 * environment as `export default { fetch }`.
 *
 * What the Node host adds and this does not: the live catalog (LISTEN/NOTIFY), UPSTREAM_HOSTS,
 * separate connect and response-head timeouts, and the connect-time address check (a bare
 * name that resolves to loopback or link-local is refused there). Run an embedding only
 * where bare names resolve to sibling containers, or give it a forwarder that checks.
 */
import { buildSnapshot, createGateway, ForwardError, type CatalogRow, type Forwarder, type Gateway, type Logger } from '../../core/index.ts';

/**
 * A Forwarder over a fetch() implementation: redirects relayed (never followed), the body
 * streamed, the overall deadline enforced, failures mapped to the core's ForwardError kinds
 * (deadline, unreachable). A client that leaves aborts the upstream request.
 */
export function fetchForwarder(fetchImpl: typeof fetch = fetch): Forwarder {
  return async (req) => {
    const deadline = AbortSignal.timeout(req.deadlineMs);
    try {
      return await fetchImpl(req.url, {
        method: req.method,
        headers: req.headers,
        body: req.body,
        redirect: 'manual',
        signal: AbortSignal.any([req.signal, deadline]),
        duplex: 'half',
      } as RequestInit);
    } catch (err) {
      if (req.signal.aborted) throw req.signal.reason;
      if (deadline.aborted) throw new ForwardError('deadline', `upstream ${req.fn.name} exceeded the ${req.deadlineMs} ms deadline`, { cause: err });
      throw new ForwardError('unreachable', `upstream ${req.fn.name} (${req.fn.upstream.origin}) is unreachable`, { cause: err });
    }
  };
}

/** One JSON line a log entry, on the runtime's console. */
const consoleLog: Logger = (level, message, fields) => console.log(JSON.stringify({ level, msg: message, ...fields }));

export interface EmbeddedOptions {
  readonly jwtSecret: string;
  readonly rows: readonly CatalogRow[];
  readonly fetch?: typeof fetch;
  readonly log?: Logger;
  /** Serve Prometheus text on /metrics. Default false. */
  readonly metrics?: boolean;
}

/** A gateway over a fixed catalog; rows that fail validation are dropped and logged. */
export function createEmbeddedGateway(options: EmbeddedOptions): Gateway {
  const log = options.log ?? consoleLog;
  const snapshot = buildSnapshot(options.rows);
  for (const row of snapshot.dropped) log('warn', 'catalog row dropped', { function: row.name, reason: row.reason });
  // No /metrics here: an embedding exposes metrics only when it means to (metrics: true).
  return createGateway({ keys: { jwtSecret: options.jwtSecret }, metrics: options.metrics ?? false }, { catalog: () => snapshot, forward: fetchForwarder(options.fetch), log });
}

