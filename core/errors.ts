/**
 * Every answer the gateway makes itself is a GatewayError rendered by toResponse().
 * Codes are stable API: supabase-js and operators match on them. Add, never rename.
 */

export const ERROR_CODES = {
  // routing
  not_found: { status: 404, message: 'No such route.' },
  function_not_found: { status: 404, message: 'No function by that name.' },
  method_not_allowed: { status: 405, message: 'Method not allowed.' },
  bad_path: { status: 400, message: 'The request path is not acceptable (dot segments, backslashes or encoded slashes).' },
  bad_request: { status: 400, message: 'The request is malformed.' },
  // identity
  credentials_required: { status: 401, message: 'This function requires a signed-in user or service key.' },
  invalid_token: { status: 401, message: 'The token is invalid.' },
  token_expired: { status: 401, message: 'The token has expired.' },
  token_not_yet_valid: { status: 401, message: 'The token is not valid yet.' },
  invalid_role: { status: 401, message: 'The token carries no role this gateway grants.' },
  invalid_apikey: { status: 401, message: 'The apikey is invalid.' },
  ambiguous_credentials: { status: 401, message: 'More than one Authorization header or apikey was sent.' },
  token_too_large: { status: 431, message: 'The credentials are too large.' },
  too_many_headers: { status: 431, message: 'The request has more header lines than the gateway accepts.' },
  // limits
  payload_too_large: { status: 413, message: 'The request body is over the limit.' },
  upgrade_not_supported: { status: 501, message: 'Protocol upgrades are not supported.' },
  transfer_coding_not_supported: { status: 501, message: 'Only the chunked transfer coding is supported.' },
  loop_detected: { status: 508, message: 'The request has already passed through this gateway (a function\'s upstream points back at a gateway).' },
  client_closed_request: { status: 499, message: 'The client closed the request.' },
  // availability
  catalog_not_loaded: { status: 503, message: 'The function catalog is not loaded yet.' },
  shutting_down: { status: 503, message: 'The gateway is shutting down.' },
  // upstream
  upstream_unreachable: { status: 502, message: 'The function could not be reached.' },
  upstream_connect_timeout: { status: 502, message: 'Connecting to the function timed out.' },
  upstream_headers_timeout: { status: 502, message: 'The function did not answer in time.' },
  upstream_deadline: { status: 502, message: 'The function exceeded the request deadline.' },
  upstream_blocked: { status: 502, message: 'The function resolves to an address (or is called on a port) the gateway does not call.' },
  upstream_reset: { status: 502, message: 'The function closed the connection.' },
  upstream_bad_response: { status: 502, message: 'The function sent a malformed response.' },
  internal_error: { status: 500, message: 'Internal gateway error.' },
} as const satisfies Record<string, { status: number; message: string }>;

export type ErrorCode = keyof typeof ERROR_CODES;

export class GatewayError extends Error {
  readonly code: ErrorCode;
  readonly status: number;
  /** Extra response headers (Allow, Retry-After). */
  readonly headers: Record<string, string>;

  constructor(code: ErrorCode, options: { message?: string; cause?: unknown; headers?: Record<string, string> } = {}) {
    super(options.message ?? ERROR_CODES[code].message, { cause: options.cause });
    this.name = 'GatewayError';
    this.code = code;
    this.status = ERROR_CODES[code].status;
    this.headers = options.headers ?? {};
  }
}

export function isGatewayError(e: unknown): e is GatewayError {
  return e instanceof GatewayError;
}

/** Headers a browser needs to read a gateway error (supabase-js reads x-relay-error). */
export const CORS_ERROR_HEADERS: Record<string, string> = {
  'access-control-allow-origin': '*',
  'access-control-allow-headers': 'authorization, x-client-info, apikey, content-type, x-request-id',
  'access-control-expose-headers': 'x-relay-error, x-request-id, retry-after',
};

/**
 * The one rendering of a gateway error: JSON {code, message}, x-relay-error: true, CORS.
 * The body never carries a stack, a library message or a token: only the code's message
 * or a message the gateway wrote itself.
 */
export function toResponse(error: GatewayError, requestId?: string): Response {
  const headers = new Headers({
    'content-type': 'application/json; charset=utf-8',
    'cache-control': 'no-store',
    'x-relay-error': 'true',
    ...CORS_ERROR_HEADERS,
    ...error.headers,
  });
  if (requestId) headers.set('x-request-id', requestId);
  return new Response(JSON.stringify({ code: error.code, message: error.message }), {
    status: error.status,
    headers,
  });
}
