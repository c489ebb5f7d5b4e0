/**
 * Which path is which function. itty-router dispatches the gateway's few routes; the
 * function name and the upstream target are then read from the raw request target, not
 * from a normalised URL, so a dot segment or an encoded slash can never turn one
 * function's path into another's.
 */
import { IttyRouter, type IRequest } from 'itty-router';
import { FUNCTION_NAME } from './catalog.ts';
import { GatewayError } from './errors.ts';

export const FUNCTIONS_PREFIX = '/functions/v1/';

/** Methods proxied to functions; anything else is 405 with an Allow header. */
export const PROXY_METHODS: ReadonlySet<string> = new Set(['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS']);
export const ALLOW_HEADER = [...PROXY_METHODS].join(', ');

export interface FunctionTarget {
  readonly name: string;
  /** Path and query exactly as the client sent them. */
  readonly target: string;
}

/**
 * True when the path, as a lenient upstream that decodes it once before routing could
 * read it, has a `.` or `..` segment. Decoding covers `%XX`, IIS's `%uXXXX`, overlong
 * UTF-8 of any length (`%c0%ae` is `.` to a decoder that does not refuse it), bytes read
 * as UTF-8 or as Latin-1, and Unicode compatibility forms (NFKC: full-width `%ef%bc%8e` is
 * `.`, the two-dot leader `%e2%80%a5` is `..`). After decoding, `/` and `\` separate
 * segments (so `open/..%2fsecure` is caught), a segment ends at `;` (Tomcat and Jetty strip
 * path parameters: `..;x`, `..%3bx`), at NUL (C servers truncate there) and at `?`/`#`, and
 * whatever some server trims around it is ignored (controls, spaces, NEL, NBSP: `..%20`,
 * `..%01`, `..%c2%85`). All `runtime='deno'` functions share one upstream that routes by
 * the path, so a target that reads as another function's behind the gateway must never
 * leave it.
 */
function hasDotSegment(rest: string): boolean {
  // No `.` and no escape: no segment can decode to a dot segment (the common case; the
  // target is visible ASCII, so any other character arrives as an escape).
  if (!rest.includes('.') && !rest.includes('%')) return false;
  return lenientReadings(rest).some((reading) =>
    reading.split(/[/\\]/).some((segment) => {
      const bare = (segment.split(/[;\0?#]/, 1)[0] ?? '').replace(TRIMMED, '');
      return bare === '.' || bare === '..';
    }),
  );
}

/** What servers trim around a segment: Java's trim() (every code unit up to U+0020), DEL, C1 controls, NBSP, Unicode spaces and BOM. */
const TRIMMED = /^[\x00-\x20\x7f-\xa0\s\u200b-\u200f\u2060\ufeff]+|[\x00-\x20\x7f-\xa0\s\u200b-\u200f\u2060\ufeff]+$/g;

/** Overlong UTF-8 of an ASCII character, 2 to 6 bytes long (only the last two carry its bits). */
const OVERLONG_ASCII = /(?:[\xc0\xc1]|\xe0[\x80\x81]|\xf0\x80[\x80\x81]|\xf8\x80\x80[\x80\x81]|\xfc\x80\x80\x80[\x80\x81])[\x80-\xbf]/g;

const utf8 = new TextDecoder();

/** The path as the lenient decoders we defend against read it (see hasDotSegment): its bytes as Latin-1, and as UTF-8 folded by NFKC. */
export function lenientReadings(path: string): [latin1: string, unicode: string] {
  const units = path.replace(/%[uU]([0-9a-fA-F]{4})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)));
  // Bytes as Latin-1 characters; characters above 0xff (from %u) kept as they are.
  const bytes = units.replace(/%([0-9a-fA-F]{2})/g, (_, hex: string) => String.fromCharCode(parseInt(hex, 16)));
  const laxed = bytes.replace(OVERLONG_ASCII, (c) => String.fromCharCode(((c.charCodeAt(c.length - 2) & 0x3f) << 6) | (c.charCodeAt(c.length - 1) & 0x3f)));
  // Runs of bytes decoded as UTF-8 (invalid ones become U+FFFD), then compatibility forms folded.
  const text = laxed.replace(/[\x80-\xff]+/g, (run) => utf8.decode(Uint8Array.from(run, (c) => c.charCodeAt(0))));
  return [laxed, text.normalize('NFKC')];
}

/**
 * Splits a raw request target (`/functions/v1/{name}[/rest][?query]`) into the function
 * name and the target to forward. Refuses (400 bad_path) dot segments in any encoding
 * (also between encoded slashes, also with `;params`), backslashes, and percent-encoding
 * inside the name; an invalid name is 404.
 */
export function parseFunctionTarget(target: string): FunctionTarget | GatewayError {
  const q = target.indexOf('?');
  const path = q < 0 ? target : target.slice(0, q);
  if (path === FUNCTIONS_PREFIX.slice(0, -1)) return new GatewayError('function_not_found', { message: 'No function name in the path.' });
  // The URL said /functions/v1/ but the raw target does not: dot segments were resolved.
  if (!path.startsWith(FUNCTIONS_PREFIX)) return new GatewayError('bad_path');
  // Only visible ASCII: the request line's own grammar (RFC 9112 3.2), and no backslash,
  // which WHATWG parsers turn into a slash.
  if (!/^[\x21-\x7e]*$/.test(target) || path.includes('\\')) return new GatewayError('bad_path');
  const rest = path.slice(FUNCTIONS_PREFIX.length);
  const slash = rest.indexOf('/');
  const name = slash < 0 ? rest : rest.slice(0, slash);
  if (name.includes('%')) return new GatewayError('bad_path', { message: 'The function name must not be percent-encoded.' });
  if (hasDotSegment(rest)) return new GatewayError('bad_path');
  if (!FUNCTION_NAME.test(name)) return new GatewayError('function_not_found');
  return { name, target };
}

export type RouteKind = 'health' | 'ready' | 'metrics' | 'function';

/**
 * The gateway's route table. Returns the kind of route a request is for, or undefined
 * (404). Matching is on the URL's pathname; the function route then re-reads the raw target.
 * itty-router gets the method and the URL without its query: the pathname is the same, and
 * it then neither parses a query nobody reads nor writes `query`/`params` onto the Request.
 */
export function createRouteTable(options: { metrics: boolean }) {
  const router = IttyRouter<IRequest, [], RouteKind>();
  router
    .all('/healthz', () => 'health' as const)
    .all('/readyz', () => 'ready' as const)
    .all('/functions/v1/*', () => 'function' as const);
  if (options.metrics) router.all('/metrics', () => 'metrics' as const);
  return (request: Request): Promise<RouteKind | undefined> => {
    const url = request.url;
    const q = url.indexOf('?');
    return router.fetch({ method: request.method, url: q < 0 ? url : url.slice(0, q) } as IRequest);
  };
}
