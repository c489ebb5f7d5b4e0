/** Mints HS256 tokens with the gateway's secret: the anon/service keys and `pgstack token`. */
import { SignJWT } from 'jose';
import type { Role } from '../../core/index.ts';

export interface MintOptions {
  readonly role: Role;
  readonly sub?: string | undefined;
  /** jose duration from now: '1h', '7d', '10y', or plain seconds ('3600'). */
  readonly expiresIn: string;
  /** A fixed `iat` and `exp` (epoch seconds) instead of now and now + expiresIn: the same key on every start. */
  readonly fixedTimes?: { readonly issuedAt: number; readonly expiresAt: number } | undefined;
  readonly issuer?: string | undefined;
  readonly audience?: string | undefined;
  /** Extra claims (email, app_metadata...). */
  readonly claims?: Record<string, unknown>;
}

/** `1h`, `30m`, `7d`, `2w`, `1y`, `45s` or plain seconds. */
export const DURATION = /^(?:\d+|\d+\s*(?:s|sec|secs|second|seconds|m|min|mins|minute|minutes|h|hr|hrs|hour|hours|d|day|days|w|week|weeks|y|yr|yrs|year|years))$/i;

export async function mintToken(secret: string, options: MintOptions): Promise<string> {
  const jwt = new SignJWT({ ...options.claims, role: options.role })
    .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
    .setIssuer(options.issuer ?? 'pgstack');
  if (options.fixedTimes) jwt.setIssuedAt(options.fixedTimes.issuedAt).setExpirationTime(options.fixedTimes.expiresAt);
  else jwt.setIssuedAt().setExpirationTime(/^\d+$/.test(options.expiresIn) ? `${options.expiresIn}s` : options.expiresIn);
  if (options.sub) jwt.setSubject(options.sub);
  if (options.audience) jwt.setAudience(options.audience);
  return jwt.sign(new TextEncoder().encode(secret));
}
