/**
 * Credentials -> Identity (DESIGN section 4).
 *
 * Sources, in order: `Authorization: Bearer <jwt>`, else the `apikey` header (the anon or
 * service key, itself a JWT). Query strings and cookies are never read: a token there is
 * ignored, so such a caller is anon.
 * Keys: an HS256 secret and/or a JWKS. The algorithm is fixed by the key that matches the
 * token's header; `alg: none` never verifies (jose refuses unsecured JWTs in jwtVerify), an
 * HS256 token can only be checked against the HS256 secret (never a public key), and keys
 * embedded in the token (`jwk`, `jku`, `x5u`, `x5c`) are ignored: only configured keys verify.
 */
import { jwtVerify, errors, createLocalJWKSet, type JWTPayload, type JSONWebKeySet, type JWSHeaderParameters, type FlattenedJWSInput } from 'jose';
import { encodeClaims, hasDuplicateKeys, payloadJson } from './claims.ts';
import { GatewayError, type ErrorCode } from './errors.ts';
import { createRemoteJwks, type KeyGetter } from './jwks.ts';
import type { Logger } from './log.ts';

export type Role = 'anon' | 'authenticated' | 'service_role';

export interface Identity {
  readonly role: Role;
  /** '' for anon and for a service key without `sub`. */
  readonly sub: string;
  /** The verified token's claims, or undefined when the caller presented none. */
  readonly claims: Readonly<Record<string, unknown>> | undefined;
  /** `claims` as ASCII-only JSON, ready for the X-Pgstack-Claims header. */
  readonly claimsHeader: string | undefined;
}

export const ANONYMOUS: Identity = Object.freeze({ role: 'anon', sub: '', claims: undefined, claimsHeader: undefined });

export interface KeyConfig {
  /** HS256 shared secret (Supabase's JWT_SECRET). */
  readonly jwtSecret?: string | undefined;
  /** Inline JWKS (works offline). */
  readonly jwks?: JSONWebKeySet | undefined;
  /** Remote JWKS URL, fetched with deps.fetch. */
  readonly jwksUrl?: string | undefined;
  readonly issuer?: string | string[] | undefined;
  readonly audience?: string | string[] | undefined;
  /** Leeway for exp/nbf in seconds. Default 5. */
  readonly clockToleranceSec?: number | undefined;
  /** Upper bound on one credential header in bytes. Default 8192. */
  readonly maxTokenBytes?: number | undefined;
  /** Verified-token cache entries. Default 10,000. 0 disables the cache. */
  readonly cacheSize?: number | undefined;
}

/** The outcome of reading a request's credentials, before any function's policy. */
export type Credentials =
  | { readonly kind: 'none' }
  | { readonly kind: 'valid'; readonly identity: Identity }
  | { readonly kind: 'invalid'; readonly error: GatewayError };

const ROLES: ReadonlySet<string> = new Set(['anon', 'authenticated', 'service_role']);
/** RFC 6750 2.1: `Bearer 1*SP b64token`; the scheme is case-insensitive (RFC 9110 11.1). */
const BEARER = /^bearer +([A-Za-z0-9\-._~+/]+=*) *$/i;
/** A compact JWS: three base64url parts. Anything else (an opaque `sb_publishable_...` key) is not a JWT. */
const COMPACT_JWS = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;
/** Supabase's opaque API keys (not JWTs). */
const OPAQUE_KEY = /^sb_(?:publishable|secret)_/;
/**
 * X-Pgstack-Sub must arrive as the claim is: printable ASCII (no CR/LF), at most 256
 * characters, no leading or trailing space. Every HTTP parser strips a field value's outer
 * whitespace (RFC 9110 5.5), so `"admin "` would reach a function as `admin`.
 */
const SAFE_SUB = /^(?:[\x21-\x7e](?:[\x20-\x7e]{0,254}[\x21-\x7e])?)?$/;

/** Whether `sub` can be carried by X-Pgstack-Sub unchanged (the empty string: no sub). */
export function isSafeSub(sub: string): boolean {
  return SAFE_SUB.test(sub);
}
const SUB_CACHE_TTL_MS = 300_000;

const ASYMMETRIC_ALGS = ['ES256', 'ES384', 'RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'EdDSA', 'Ed25519'];

function mapJoseError(err: unknown, code: ErrorCode = 'invalid_token'): GatewayError {
  // Only a well-formed exp/nbf that fails the clock check is "expired"/"not yet valid"; a
  // claim of the wrong type (`"nbf": "soon"`) is a malformed token (jose's reason 'invalid').
  if (err instanceof errors.JWTExpired && err.reason === 'check_failed') return new GatewayError('token_expired', { cause: err });
  if (err instanceof errors.JWTClaimValidationFailed && err.claim === 'nbf' && err.reason === 'check_failed') {
    return new GatewayError('token_not_yet_valid', { cause: err });
  }
  return new GatewayError(code, { cause: err });
}

export interface IdentifierDeps {
  readonly now: () => number;
  readonly fetch: typeof fetch;
  readonly log: Logger;
}

export interface Identifier {
  /** Reads the credentials of a request. Never throws. */
  identify(headers: Headers): Promise<Credentials>;
  /** Fetches a remote JWKS ahead of the first request (no-op without JWKS_URL). */
  warm(): Promise<void>;
}

export function createIdentifier(config: KeyConfig, deps: IdentifierDeps): Identifier {
  const maxTokenBytes = config.maxTokenBytes ?? 8192;
  const cacheSize = config.cacheSize ?? 10_000;
  const clockTolerance = config.clockToleranceSec ?? 5;
  const secret = config.jwtSecret ? new TextEncoder().encode(config.jwtSecret) : undefined;
  const remote = config.jwksUrl
    ? createRemoteJwks({ url: config.jwksUrl, fetch: deps.fetch, now: deps.now, log: deps.log })
    : undefined;
  const inline = config.jwks ? createLocalJWKSet(config.jwks) : undefined;
  const jwksGetter: KeyGetter | undefined = remote?.getKey ?? inline;
  const algorithms = [...(secret ? ['HS256'] : []), ...(jwksGetter ? ASYMMETRIC_ALGS : [])];

  // The key is chosen by the header's alg family: HS256 only ever meets the shared secret,
  // so a token "signed" with a public key as an HMAC secret finds no key to verify with.
  const keyFor = async (header: JWSHeaderParameters, token: FlattenedJWSInput): Promise<CryptoKey | Uint8Array> => {
    if (header.alg === 'HS256') {
      if (!secret) throw new errors.JWKSNoMatchingKey('no HS256 secret configured');
      return secret;
    }
    if (!jwksGetter) throw new errors.JWKSNoMatchingKey('no JWKS configured');
    return jwksGetter(header, token);
  };

  // Verified tokens, in insertion order for a cheap bounded eviction. An entry lives until
  // the token's exp (never past it) and at most SUB_CACHE_TTL_MS, so a revoked signing key
  // stops being honoured within minutes.
  const cache = new Map<string, { identity: Identity; until: number }>();

  /** `json`: the payload as signed, the source of X-Pgstack-Claims (see claims.ts). */
  function identityFrom(payload: JWTPayload, json: string): Identity | GatewayError {
    const role = payload['role'];
    if (typeof role !== 'string' || !ROLES.has(role)) {
      return new GatewayError('invalid_role');
    }
    const rawSub = payload.sub;
    if (rawSub !== undefined && (typeof rawSub !== 'string' || !SAFE_SUB.test(rawSub))) {
      return new GatewayError('invalid_token', { message: 'The token\'s "sub" is not a printable ASCII string (at most 256 characters, no leading or trailing space).' });
    }
    const sub = role === 'anon' ? '' : (rawSub ?? '');
    if (role === 'authenticated' && sub === '') {
      return new GatewayError('invalid_token', { message: 'An authenticated token must carry a "sub".' });
    }
    const claims = Object.freeze({ ...payload });
    const claimsHeader = encodeClaims(json);
    // Escaping can triple non-ASCII claims: bound what the function receives, as the token
    // itself is bounded, so X-Pgstack-Claims fits any HTTP stack's header limits.
    if (claimsHeader.length > maxTokenBytes) {
      return new GatewayError('token_too_large', { message: `The token's claims are over ${maxTokenBytes} bytes once escaped for X-Pgstack-Claims.` });
    }
    return Object.freeze({ role: role as Role, sub, claims, claimsHeader });
  }

  async function verify(token: string, invalidCode: ErrorCode): Promise<Identity | GatewayError> {
    const now = deps.now();
    const hit = cache.get(token);
    if (hit) {
      if (hit.until > now) return hit.identity;
      cache.delete(token);
    }
    if (!COMPACT_JWS.test(token)) {
      // Supabase's newer opaque keys cannot be verified offline: say what to use instead.
      const message = OPAQUE_KEY.test(token)
        ? 'Opaque API keys (sb_publishable_..., sb_secret_...) are not supported: use the JWT anon or service key.'
        : 'The credential is not a JWT.';
      return new GatewayError(invalidCode, { message });
    }
    if (algorithms.length === 0) {
      return new GatewayError(invalidCode, { message: 'The gateway has no keys configured to verify tokens.' });
    }
    let payload: JWTPayload;
    try {
      ({ payload } = await jwtVerify(token, keyFor, {
        algorithms,
        currentDate: new Date(now),
        clockTolerance,
        ...(config.issuer ? { issuer: config.issuer } : {}),
        ...(config.audience ? { audience: config.audience } : {}),
      }));
    } catch (err) {
      return mapJoseError(err, invalidCode);
    }
    const json = payloadJson(token);
    if (hasDuplicateKeys(json)) {
      return new GatewayError(invalidCode, { message: "The token's claims name the same key twice." });
    }
    const identity = identityFrom(payload, json);
    if (identity instanceof GatewayError) return identity;
    if (cacheSize > 0) {
      const until = Math.min(typeof payload.exp === 'number' ? payload.exp * 1000 : Infinity, now + SUB_CACHE_TTL_MS);
      if (cache.size >= cacheSize) {
        const oldest = cache.keys().next();
        if (!oldest.done) cache.delete(oldest.value);
      }
      cache.set(token, { identity, until });
    }
    return identity;
  }

  async function identify(headers: Headers): Promise<Credentials> {
    const authorization = headers.get('authorization');
    const apikey = headers.get('apikey');
    if ((authorization?.length ?? 0) > maxTokenBytes || (apikey?.length ?? 0) > maxTokenBytes) {
      return { kind: 'invalid', error: new GatewayError('token_too_large') };
    }
    // RFC 9110 5.3: repeated header lines are combined with commas (Node's listener with
    // joinDuplicateHeaders, Headers.append, every fetch runtime). No Bearer token or JWT holds
    // a comma, so one means two credentials were sent: refuse, never pick one of them.
    if (authorization?.includes(',') || apikey?.includes(',')) {
      return { kind: 'invalid', error: new GatewayError('ambiguous_credentials') };
    }

    let bearer: Identity | GatewayError | undefined;
    if (authorization !== null) {
      const match = BEARER.exec(authorization);
      bearer = match?.[1]
        ? await verify(match[1], 'invalid_token')
        : new GatewayError('invalid_token', { message: 'Authorization is not a single Bearer token.' });
    }
    // The apikey is checked whenever it is sent: a forged or foreign apikey beside a good
    // bearer is still an invalid request, never silently ignored.
    let key: Identity | GatewayError | undefined;
    if (apikey !== null) key = await verify(apikey.trim(), 'invalid_apikey');

    if (bearer instanceof GatewayError) return { kind: 'invalid', error: bearer };
    if (key instanceof GatewayError) return { kind: 'invalid', error: key };
    const identity = bearer ?? key;
    return identity ? { kind: 'valid', identity } : { kind: 'none' };
  }

  async function warm(): Promise<void> {
    if (remote) await remote.refresh();
  }

  return { identify, warm };
}
