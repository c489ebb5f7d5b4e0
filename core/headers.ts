/**
 * The outgoing request's headers are rebuilt, not patched (as Go's httputil.ReverseProxy):
 * copy what is end-to-end, drop what is hop-by-hop or spoofable, then add the gateway's own.
 * Header names are compared after lowercasing and mapping `_` to `-`, because CGI, WSGI,
 * PHP and others expose `X_Pgstack_Role` and `X-Pgstack-Role` under the same variable.
 */
import type { Identity } from './identity.ts';

/** RFC 9110 7.6.1: connection-specific fields, never forwarded; plus the legacy ones. */
const HOP_BY_HOP: ReadonlySet<string> = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'http2-settings',
]);

/**
 * Headers through which proxies tell an application the client's address, the scheme, the
 * original host or URL, or a user: a client could forge any of them (Rack trusts
 * X-Forwarded-Ssl for https, IIS X-Original-URL for routing). Dropped unless they come from
 * a trusted proxy; the gateway sets its own X-Forwarded-For/-Proto/-Host. Whole families
 * (`x-forwarded-*`, `cf-*`, ...) are included too (see FORWARDING_FAMILIES).
 */
const FORWARDING: ReadonlySet<string> = new Set([
  'forwarded',
  'x-forwarded',
  'forwarded-for',
  'x-real-ip',
  'x-client-ip',
  'client-ip',
  'true-client-ip',
  'cf-connecting-ip',
  'fastly-client-ip',
  'x-cluster-client-ip',
  'x-envoy-external-address',
  'x-originating-ip',
  'x-remote-ip',
  'x-remote-addr',
  'x-proxyuser-ip',
  'front-end-https',
  'x-url-scheme',
  'x-scheme',
  'x-host',
  'x-original-host',
  'x-original-url',
  'x-original-uri',
  'x-rewrite-url',
]);

/**
 * Whole families set by a platform, a gateway or an auth proxy in front of an application,
 * which the application then believes (no list is complete: a function should trust only
 * X-Pgstack-*):
 * - the client's address or scheme: Cloudflare `cf-*`, CloudFront, Fly, Fastly, App
 *   Engine, Azure (`x-azure-*`, ARR, `disguised-host`, `x-waws-unencoded-url`), Vercel,
 *   Netlify, Akamai, Envoy, WebLogic (`wl-proxy-*`), and the original request
 *   (`x-original-*`);
 * - the signed-in user or client certificate: oauth2-proxy (`x-auth-request-*`), Keycloak
 *   gatekeeper (`x-auth-username`, ...), Authelia and others (`remote-*`), the Kubernetes
 *   front proxy (`x-remote-*`), Kong (`x-consumer-*`, `x-credential-*`,
 *   `x-authenticated-*`, `x-anonymous-consumer`), Google IAP, Cloud Endpoints and API
 *   Gateway (verified JWT payloads), AWS ALB OIDC and mTLS, App Service (`x-ms-client-principal*`,
 *   `x-ms-token-*`), Cloudflare Access (`cf-access-*`), Pomerium, authentik, Tailscale,
 *   Vouch, SiteMinder (`sm-*`, `smuser`, ...), WebSEAL (`iv-*`), `x-webauth-*`, JWT forwarders (`x-jwt-*`), generic user
 *   headers (`x-user`, `x-user-*`, `x-userid`), and TLS client facts (`ssl-client-*`,
 *   `x-ssl-*`, `x-client-cert*`, `x-client-verify`, `x-client-dn`, RFC 9440 `client-cert*`).
 */
const FORWARDING_FAMILIES = new RegExp(
  '^(?:' +
    [
      'x-forwarded-', 'x-original-', 'cf-', 'cloudfront-', 'fly-', 'fastly-', 'x-appengine-', 'x-azure-', 'x-arr-',
      'disguised-host$', 'x-waws-', 'x-vercel-', 'x-nf-', 'akamai-', 'x-akamai-', 'true-client-', 'x-envoy-', 'wl-proxy-',
      'x-auth-request-', 'x-auth-(?:username|userid|user|subject|email|roles|groups|audience|expiresin|preferred-username)$',
      'remote-', 'x-remote-', 'x-consumer-', 'x-credential-', 'x-authenticated-', 'x-anonymous-consumer$',
      'x-goog-authenticated-', 'x-goog-iap-', 'x-endpoint-api-', 'x-apigateway-api-', 'x-amzn-oidc-', 'x-amzn-mtls-',
      'x-ms-client-principal', 'x-ms-token-', 'x-pomerium-', 'x-authentik-', 'tailscale-', 'x-vouch-', 'sm-',
      'sm(?:user|userdn|universalid|authreason|authtype|realm|realmoid|session|sessionid|transactionid|serverid|agentname|timeoutreason)$', 'iv-',
      'x-webauth-', 'x-jwt-', 'x-user$', 'x-user-', 'x-userid$', 'ssl-client-', 'x-ssl-', 'x-client-cert', 'x-client-verify$',
      'x-client-dn$', 'client-cert',
    ].join('|') +
    ')',
);

function isForwarding(canonical: string): boolean {
  return FORWARDING.has(canonical) || FORWARDING_FAMILIES.test(canonical);
}

/**
 * Request headers the gateway handles itself: `host` (the transport sets the upstream's),
 * `expect` (the gateway's server answers 100-continue; relaying it upstream would ask for
 * a second interim answer), `x-request-id` (validated and set below), `content-length`
 * when the body is re-framed is the transport's business, so it is kept here.
 */
const GATEWAY_OWNED: ReadonlySet<string> = new Set(['host', 'expect', 'x-request-id']);

export const IDENTITY_PREFIX = 'x-pgstack-';

/** Lowercase and treat `_` as `-`: the spelling an upstream framework may fold names to. */
export function canonicalName(name: string): string {
  const lower = name.toLowerCase();
  return lower.includes('_') ? lower.replaceAll('_', '-') : lower;
}

/** Names listed in a Connection header value (RFC 9110 7.6.1), canonicalised. */
export function connectionTokens(value: string | null): Set<string> {
  const tokens = new Set<string>();
  if (!value) return tokens;
  for (const part of value.split(',')) {
    const token = part.trim();
    if (token) tokens.add(canonicalName(token));
  }
  return tokens;
}

function isHopByHop(canonical: string, named: ReadonlySet<string>): boolean {
  return HOP_BY_HOP.has(canonical) || canonical.startsWith('proxy-') || named.has(canonical);
}

export interface ForwardedFacts {
  /** The TCP peer of the gateway, if the host knows it. */
  readonly clientAddress: string | undefined;
  /** 'http' or 'https', as the client reached the gateway. */
  readonly proto: string;
  /** The Host the client asked for. */
  readonly host: string | undefined;
  /** True when the peer is a trusted proxy whose forwarding headers are kept and extended. */
  readonly trustForwarded: boolean;
  /** This gateway's Via entry (`1.1 pgstack-xxxx`), appended to the client's (RFC 9110 7.6.3). */
  readonly via: string;
}

/**
 * Builds the upstream request headers in one fixed order:
 * 1. copy end-to-end headers, dropping hop-by-hop ones and every header named in
 *    Connection, every `x-pgstack-*` (any case, `_` or `-`), forwarding headers from an
 *    untrusted peer, and the headers the gateway owns;
 * 2. set X-Forwarded-For/-Proto/-Host and X-Request-Id;
 * 3. set X-Pgstack-Role, X-Pgstack-Sub and (when there are claims) X-Pgstack-Claims.
 * Because step 3 runs last on a fresh Headers, exactly one copy of each identity header
 * reaches the upstream whatever the client sent.
 * `out` is the empty Headers to fill (a host may pass its own implementation's).
 */
export function buildUpstreamHeaders(inbound: Headers, identity: Identity, requestId: string, facts: ForwardedFacts, out: Headers = new Headers()): Headers {
  const named = connectionTokens(inbound.get('connection'));
  // forEach, not for...of: the same entries in the same order, without an iterator object
  // and an entry array per header (@whatwg-node's Headers iterate through a generator).
  inbound.forEach((value, name) => {
    const canonical = canonicalName(name);
    if (isHopByHop(canonical, named)) return;
    if (canonical.startsWith(IDENTITY_PREFIX)) return;
    if (GATEWAY_OWNED.has(canonical)) return;
    if (isForwarding(canonical) && (!facts.trustForwarded || canonical !== name)) return;
    out.append(name, value);
  });

  const client = facts.clientAddress;
  if (facts.trustForwarded) {
    const prior = inbound.get('x-forwarded-for');
    const chain = [prior, client].filter(Boolean).join(', ');
    if (chain) out.set('x-forwarded-for', chain);
    if (!out.has('x-forwarded-proto')) out.set('x-forwarded-proto', facts.proto);
    if (!out.has('x-forwarded-host') && facts.host) out.set('x-forwarded-host', facts.host);
  } else {
    if (client) out.set('x-forwarded-for', client);
    out.set('x-forwarded-proto', facts.proto);
    if (facts.host) out.set('x-forwarded-host', facts.host);
  }
  out.set('x-request-id', requestId);
  const via = inbound.get('via');
  out.set('via', via ? `${via}, ${facts.via}` : facts.via);

  out.set('x-pgstack-role', identity.role);
  out.set('x-pgstack-sub', identity.sub);
  if (identity.claimsHeader !== undefined) out.set('x-pgstack-claims', identity.claimsHeader);
  return out;
}

/**
 * Removes hop-by-hop headers from an upstream response (RFC 9110 7.6.1) so the gateway's
 * own framing applies. Mutates `headers`.
 */
export function stripResponseHopByHop(headers: Headers): void {
  const named = connectionTokens(headers.get('connection'));
  const drop: string[] = [];
  headers.forEach((_value, name) => {
    if (isHopByHop(canonicalName(name), named)) drop.push(name);
  });
  for (const name of drop) headers.delete(name);
}
