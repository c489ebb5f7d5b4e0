/**
 * Transport failures (undici, net, dns) as the core's failure kinds, and the log line that
 * says which function failed how (the client only ever sees the kind's code).
 */
import { errors as undiciErrors } from 'undici';
import { ForwardError, type ForwardFailure, type ForwardRequest } from '../../core/forwarder.ts';
import { BlockedAddressError, UPSTREAM_RESET_CODE } from './upstream-lookup.ts';

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
const RESET = new Set(['ECONNRESET', UPSTREAM_RESET_CODE, 'EPIPE', 'ECONNABORTED', 'UND_ERR_SOCKET']);
// ERR_ASSERTION: undici asserts on a status it cannot take (`HTTP/1.1 000`, `099`).
const BAD_RESPONSE = new Set(['UND_ERR_INFO', 'UND_ERR_HEADERS_OVERFLOW', 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH', 'ERR_ASSERTION']);

export function errorCode(err: unknown): string | undefined {
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
  blocked: 'was refused before connecting',
  reset: 'closed the connection before a complete response head',
  bad_response: 'sent an unparseable response',
};

export function toForwardError(req: ForwardRequest, err: unknown): ForwardError {
  const kind = classifyTransportError(err);
  const code = errorCode(err);
  // (The log line's detail; the client only ever sees the code.)
  const detail = err instanceof BlockedAddressError ? err.message : (code ?? (err instanceof Error ? err.message : String(err)));
  // The usual first-day mistake: a bare container name outside Docker. Say what fixes it.
  const hint =
    code === 'ENOTFOUND' || code === 'EAI_AGAIN'
      ? `; "${req.fn.upstream.hostname}" does not resolve here: on a compose network it is the service name, elsewhere map it with UPSTREAM_HOSTS=${req.fn.upstream.hostname}=<address>:${req.fn.upstream.port}`
      : '';
  return new ForwardError(kind, `upstream ${req.fn.name} (${req.fn.upstream.origin}) ${DESCRIPTIONS[kind]} (${detail})${hint}`, {
    cause: err,
  });
}

