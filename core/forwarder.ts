/**
 * The contract between the core and a host's upstream transport. The core decides what
 * to send; the forwarder only moves bytes (undici on Node, service bindings on Workers,
 * plain fetch() when embedded elsewhere).
 */
import type { FunctionEntry } from './catalog.ts';

export interface ForwardRequest {
  readonly fn: FunctionEntry;
  readonly method: string;
  /** Absolute URL: the function's origin + base path + the client's raw path and query. */
  readonly url: string;
  /** The path-and-query part of `url`, as sent on the request line. */
  readonly path: string;
  /** Rebuilt headers: hop-by-hop and spoofed ones removed, identity injected. */
  readonly headers: Headers;
  /** The streamed request body (already length-limited), or null. */
  readonly body: ReadableStream<Uint8Array> | null;
  /** Aborted when the client goes away. */
  readonly signal: AbortSignal;
  /**
   * Overall deadline for the whole exchange, response body included. Before the response
   * head: reject with ForwardError('deadline'). After it: error the body stream.
   */
  readonly deadlineMs: number;
}

/**
 * Sends the request upstream and resolves with the upstream's response as soon as its
 * headers arrive (the body streams). Redirects are returned, never followed.
 * Transport failures reject with a ForwardError; a client abort rejects with signal.reason;
 * anything else is treated as unreachable.
 */
export type Forwarder = (request: ForwardRequest) => Promise<Response>;

export type ForwardFailure =
  | 'unreachable' // DNS failure, refused, no route
  | 'connect_timeout'
  | 'headers_timeout'
  | 'deadline' // the overall deadline passed before the response head
  | 'blocked' // resolved address in a refused range (loopback, link-local, ...)
  | 'reset' // connection closed before a complete response head
  | 'bad_response'; // unparseable response from the upstream

export class ForwardError extends Error {
  readonly kind: ForwardFailure;
  constructor(kind: ForwardFailure, message: string, options: { cause?: unknown } = {}) {
    super(message, options);
    this.name = 'ForwardError';
    this.kind = kind;
  }
}
