/**
 * A JWKS that is fetched from a URL and never fails open or closed by accident:
 * the last good key set keeps verifying while a refetch fails, a stale set is refreshed
 * in the background, and an unknown `kid` triggers one refetch at most every cooldown.
 * (jose's createRemoteJWKSet rejects verification when a refresh of a stale set fails;
 * an identity provider's blip must not log every user out.)
 */
import { createLocalJWKSet, errors, type JSONWebKeySet, type JWSHeaderParameters, type FlattenedJWSInput } from 'jose';
import type { Logger } from './log.ts';

export type KeyGetter = (header: JWSHeaderParameters, token: FlattenedJWSInput) => Promise<CryptoKey | Uint8Array>;

export interface RemoteJwksOptions {
  readonly url: string;
  readonly fetch: typeof fetch;
  readonly now: () => number;
  readonly log: Logger;
  /** A set older than this is refreshed in the background. Default 10 minutes. */
  readonly maxAgeMs?: number;
  /** At most one refetch for an unknown kid per this window. Default 30 s. */
  readonly cooldownMs?: number;
  /** Per fetch. Default 5 s. */
  readonly timeoutMs?: number;
  /** Upper bound on the JWKS document. Default 256 KiB. */
  readonly maxBytes?: number;
}

export interface RemoteJwks {
  readonly getKey: KeyGetter;
  /** Fetches now (at start-up); resolves false when the fetch failed. */
  refresh(): Promise<boolean>;
}

type LocalSet = ReturnType<typeof createLocalJWKSet>;

export function isJwks(value: unknown): value is JSONWebKeySet {
  return typeof value === 'object' && value !== null && Array.isArray((value as { keys?: unknown }).keys);
}

export function createRemoteJwks(options: RemoteJwksOptions): RemoteJwks {
  const maxAgeMs = options.maxAgeMs ?? 600_000;
  const cooldownMs = options.cooldownMs ?? 30_000;
  const timeoutMs = options.timeoutMs ?? 5_000;
  const maxBytes = options.maxBytes ?? 262_144;
  let local: LocalSet | undefined;
  let fetchedAt = -Infinity;
  let attemptedAt = -Infinity;
  let inFlight: Promise<boolean> | undefined;

  async function fetchOnce(): Promise<boolean> {
    attemptedAt = options.now();
    try {
      const res = await options.fetch(options.url, {
        headers: { accept: 'application/json' },
        redirect: 'manual',
        signal: AbortSignal.timeout(timeoutMs),
      });
      if (res.status !== 200) throw new Error(`JWKS answered HTTP ${res.status}`);
      const text = await res.text();
      if (text.length > maxBytes) throw new Error(`JWKS document is over ${maxBytes} bytes`);
      const json: unknown = JSON.parse(text);
      if (!isJwks(json)) throw new Error('JWKS document has no "keys" array');
      local = createLocalJWKSet(json);
      fetchedAt = options.now();
      options.log('info', 'jwks fetched', { url: options.url, keys: json.keys.length });
      return true;
    } catch (cause) {
      // Keep the last good set; the next attempt waits for the cooldown.
      options.log('warn', 'jwks fetch failed; keeping the last good key set', {
        url: options.url,
        error: cause instanceof Error ? cause.message : String(cause),
      });
      return false;
    }
  }

  function refresh(): Promise<boolean> {
    inFlight ??= fetchOnce().finally(() => {
      inFlight = undefined;
    });
    return inFlight;
  }

  const coolingDown = () => options.now() - attemptedAt < cooldownMs;

  async function getKey(header: JWSHeaderParameters, token: FlattenedJWSInput): Promise<CryptoKey | Uint8Array> {
    if (!local) {
      // Join a fetch in flight (a burst of first requests), else start one unless cooling down.
      if (inFlight || !coolingDown()) await refresh();
      if (!local) throw new errors.JWKSNoMatchingKey('no JWKS loaded');
    } else if (options.now() - fetchedAt > maxAgeMs && !coolingDown()) {
      void refresh(); // serve the current set; the fresh one applies to later requests
    }
    try {
      return await local(header, token);
    } catch (err) {
      if (!(err instanceof errors.JWKSNoMatchingKey)) throw err;
      // Unknown kid: the provider may have rotated. One refetch per cooldown window; requests
      // arriving while it is in flight wait for it instead of failing.
      if (!inFlight && coolingDown()) throw err;
      if (!(await refresh())) throw err;
      return local(header, token);
    }
  }

  return { getKey, refresh };
}
