/**
 * Upstream URL validation: the SSRF gate for catalog rows (DESIGN section 5).
 *
 * The validator parses exactly as the transport will (WHATWG URL) and then demands that
 * parsing changed nothing: a parser that rewrites a host (IPv4 shorthand `127.1`, decimal
 * `2130706433`, IDNA full-width letters, percent-decoding) would hand the transport a
 * different host than the one a reviewer read in the row, so any rewrite is a refusal.
 */

/** Bare docker-network host: one DNS label, letters, digits, `-`, `_`, max 63 chars. */
const BARE_HOST = /^[a-z0-9_](?:[a-z0-9_-]{0,62})$/;

/**
 * Names that resolve to the gateway's own machine, its router or platform, or to cloud
 * metadata on common images (/etc/hosts of Debian and Docker, systemd's synthesised names,
 * GCE/AWS metadata aliases, Kubernetes). Never siblings.
 */
const RESERVED_NAMES = new Set([
  'localhost',
  'localhost4',
  'localhost6',
  'ip6-localhost',
  'ip6-loopback',
  'ip6-localnet',
  'ip6-mcastprefix',
  'ip6-allnodes',
  'ip6-allrouters',
  'ip6-allhosts',
  'broadcasthost',
  'metadata',
  'instance-data',
  'gateway',
  'host-gateway',
  // systemd's nss-myhostname / nss-resolve: the default router, the host's own LAN address, the stub resolver.
  '_gateway',
  '_outbound',
  '_localdnsstub',
  '_localdnsproxy',
  // The API server, from a pod in the default namespace (search domain default.svc.cluster.local).
  'kubernetes',
]);

export interface UpstreamTarget {
  readonly protocol: 'http:' | 'https:';
  readonly hostname: string;
  /** Numeric port, the scheme default when the URL has none. */
  readonly port: number;
  /** `http://name:port`, what the transport dials. */
  readonly origin: string;
  /** Path prefix from the URL without a trailing slash: '' or '/base'. */
  readonly basePath: string;
}

export type UpstreamValidation =
  | { readonly ok: true; readonly target: UpstreamTarget }
  | { readonly ok: false; readonly reason: string };

const fail = (reason: string): UpstreamValidation => Object.freeze({ ok: false, reason });

/** Splits `scheme://authority/path...` without normalising anything. */
function rawAuthority(raw: string): { authority: string; rest: string } | undefined {
  const m = /^[A-Za-z][A-Za-z0-9+.-]*:\/\/([^/?#]*)(.*)$/.exec(raw);
  return m ? { authority: m[1] ?? '', rest: m[2] ?? '' } : undefined;
}

/**
 * Validates an operator-supplied upstream URL. Never throws.
 * Accepts only `http(s)://bare-name[:port][/base/path]` spelled canonically.
 */
export function validateUpstreamUrl(raw: unknown): UpstreamValidation {
  if (typeof raw !== 'string' || raw.length === 0) return fail('upstream_url is empty');
  if (raw.length > 2048) return fail('upstream_url is longer than 2048 characters');
  // WHATWG silently drops tabs/newlines and turns `\` into `/`; refuse instead of guessing.
  if (!/^[\x21-\x7e]+$/.test(raw)) return fail('upstream_url contains whitespace, control or non-ASCII characters');
  if (raw.includes('\\')) return fail('upstream_url contains a backslash');
  const parts = rawAuthority(raw);
  if (!parts) return fail('upstream_url is not of the form scheme://host');
  if (parts.authority.includes('@')) return fail('upstream_url carries userinfo');
  if (parts.authority.includes('%')) return fail('upstream_url host is percent-encoded');

  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    return fail('upstream_url does not parse as a URL');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') return fail('upstream_url scheme must be http or https');
  if (url.username !== '' || url.password !== '') return fail('upstream_url carries userinfo');

  const host = url.hostname;
  const rawHost = parts.authority.replace(/:\d*$/, '').toLowerCase();
  if (rawHost !== host) return fail(`upstream_url host is rewritten by the URL parser ("${rawHost}" becomes "${host}")`);
  if (host.startsWith('[') || host.includes(':')) return fail('upstream_url host is an IPv6 literal');
  if (host.includes('.')) return fail('upstream_url host contains a dot (IP literal or FQDN); use a bare container name');
  if (!BARE_HOST.test(host)) return fail('upstream_url host is not a bare hostname (letters, digits, - and _; at most 63)');
  if (/^[0-9]+$/.test(host) || /^0x[0-9a-f]*$/.test(host)) return fail('upstream_url host is a numeric IP literal');
  if (RESERVED_NAMES.has(host)) return fail(`upstream_url host "${host}" names the gateway's own machine or a metadata service`);

  if (url.search !== '' || raw.includes('?')) return fail('upstream_url carries a query string');
  if (url.hash !== '' || raw.includes('#')) return fail('upstream_url carries a fragment');
  const rawPath = parts.rest;
  if (rawPath !== '' && rawPath !== url.pathname) return fail('upstream_url path is rewritten by the URL parser (dot segments or encoding)');
  if (/\/\.\.?(?:\/|$)/.test(rawPath) || /%2e|%2f|%5c/i.test(rawPath)) return fail('upstream_url path has dot segments or encoded separators');
  // `//x` as a base path would make the request line `GET //x/functions/...`, which some
  // servers read as a scheme-relative URL naming host `x`.
  if (rawPath.includes('//')) return fail('upstream_url path has an empty segment (//)');

  const protocol = url.protocol;
  const port = url.port === '' ? (protocol === 'https:' ? 443 : 80) : Number(url.port);
  if (port === 0) return fail('upstream_url port 0 is not dialable');
  const basePath = url.pathname.replace(/\/+$/, '');
  // Frozen: one result is shared by every row naming the same URL (see catalog.ts).
  return Object.freeze({
    ok: true,
    target: Object.freeze({ protocol, hostname: host, port, origin: `${protocol}//${host}:${port}`, basePath }),
  });
}
