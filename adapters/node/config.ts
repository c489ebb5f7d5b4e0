/**
 * Environment -> configuration, validated once at start. The only file of the Node host
 * that reads process.env. Every failure names the variable and what it wants.
 */
import { isIP } from 'node:net';
import { isJwks, parseCidr, validateUpstreamUrl } from '../../core/index.ts';
import type { JSONWebKeySet } from 'jose';
import { parseUpstreamHosts, type MappedHost } from './upstream-hosts.ts';

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
}

export interface NodeConfig {
  /** Unset: the embedded default database under `stateDir`. */
  readonly databaseUrl: string | undefined;
  readonly port: number;
  readonly host: string;
  readonly jwtSecret: string | undefined;
  readonly jwks: JSONWebKeySet | undefined;
  readonly jwksUrl: string | undefined;
  readonly jwtIssuer: string | undefined;
  readonly jwtAudience: string | undefined;
  readonly edgeRuntimeUrl: string | undefined;
  readonly upstreamHosts: ReadonlyMap<string, MappedHost>;
  readonly connectTimeoutMs: number;
  readonly headersTimeoutMs: number;
  /** Idle lifetime of a pooled upstream connection. */
  readonly upstreamKeepAliveMs: number;
  /** Connections per upstream origin; 0: no limit. */
  readonly upstreamMaxConnections: number;
  readonly requestTimeoutMs: number;
  readonly maxBodyBytes: number;
  readonly maxHeaderLines: number;
  readonly trustedProxies: readonly string[];
  readonly catalogBackstopMs: number;
  readonly migrateOnStart: boolean;
  readonly shutdownGraceMs: number;
  readonly logLevel: 'debug' | 'info' | 'warn' | 'error';
  readonly metrics: boolean;
  /** Embedded database, generated secret and demo state. */
  readonly stateDir: string;
  /** Start the demo function with the embedded database. */
  readonly demo: boolean;
}

type Env = Record<string, string | undefined>;

/** Documented defaults (README "Configuration" lists the same). */
export const DEFAULTS = {
  PORT: 8080,
  HOST: '127.0.0.1',
  UPSTREAM_CONNECT_TIMEOUT_MS: 5_000,
  UPSTREAM_HEADERS_TIMEOUT_MS: 60_000,
  UPSTREAM_KEEPALIVE_MS: 4_000,
  UPSTREAM_MAX_CONNECTIONS: 0,
  REQUEST_TIMEOUT_MS: 150_000,
  MAX_BODY_BYTES: 20 * 1024 * 1024,
  MAX_HEADER_LINES: 100,
  CATALOG_BACKSTOP_MS: 60_000,
  SHUTDOWN_GRACE_MS: 10_000,
  PGSTACK_DIR: '.pgstack',
} as const;

function int(env: Env, name: keyof typeof DEFAULTS, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const raw = env[name];
  if (raw === undefined || raw.trim() === '') return DEFAULTS[name] as number;
  if (!/^\d+$/.test(raw.trim())) throw new ConfigError(`${name} must be a whole number, got "${raw}"`);
  const n = Number(raw.trim());
  if (n < min || n > max) throw new ConfigError(`${name} must be between ${min} and ${max}, got ${n}`);
  return n;
}

/** setTimeout's ceiling: a longer delay fires after 1 ms (TimeoutOverflowWarning). */
const MAX_TIMER_MS = 2_147_483_647;

/** A duration in milliseconds: a whole number within what a timer can wait (about 24.8 days). */
function ms(env: Env, name: keyof typeof DEFAULTS, min: number): number {
  return int(env, name, min, MAX_TIMER_MS);
}

function bool(env: Env, name: string, fallback: boolean): boolean {
  const raw = env[name]?.trim().toLowerCase();
  if (raw === undefined || raw === '') return fallback;
  if (['1', 'true', 'yes', 'on'].includes(raw)) return true;
  if (['0', 'false', 'no', 'off'].includes(raw)) return false;
  throw new ConfigError(`${name} must be true or false (also 1/0, yes/no, on/off), got "${env[name]}"`);
}

function optional(env: Env, name: string): string | undefined {
  const raw = env[name]?.trim();
  return raw ? raw : undefined;
}

function list(value: string | undefined): string[] {
  return (value ?? '').split(',').map((s) => s.trim()).filter(Boolean);
}

export function loadConfig(env: Env = process.env): NodeConfig {
  const databaseUrl = optional(env, 'DATABASE_URL');
  if (databaseUrl && !/^postgres(ql)?:\/\//i.test(databaseUrl)) {
    throw new ConfigError('DATABASE_URL must be a postgres:// or postgresql:// URL');
  }

  const host = optional(env, 'HOST') ?? DEFAULTS.HOST;
  if (!isIP(host) && (!/^[A-Za-z0-9.-]+$/.test(host) || /^[\d.]+$/.test(host))) throw new ConfigError(`HOST must be an IP address or a hostname of this machine, got "${host}"`);

  const jwtSecret = optional(env, 'JWT_SECRET');
  if (jwtSecret !== undefined && jwtSecret.length < 32) {
    throw new ConfigError('JWT_SECRET must be at least 32 characters (HS256 needs a 256-bit secret)');
  }

  let jwks: JSONWebKeySet | undefined;
  const inline = optional(env, 'JWKS');
  if (inline) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(inline);
    } catch {
      throw new ConfigError('JWKS must be a JSON Web Key Set ({"keys":[...]}); it does not parse as JSON');
    }
    if (!isJwks(parsed)) throw new ConfigError('JWKS must be a JSON object with a "keys" array');
    jwks = parsed;
  }
  const jwksUrl = optional(env, 'JWKS_URL');
  if (jwksUrl) {
    try {
      const u = new URL(jwksUrl);
      if (u.protocol !== 'https:' && u.protocol !== 'http:') throw new Error();
    } catch {
      throw new ConfigError(`JWKS_URL must be an http(s) URL, got "${jwksUrl}"`);
    }
  }

  const edgeRuntimeUrl = optional(env, 'EDGE_RUNTIME_URL');
  if (edgeRuntimeUrl) {
    const checked = validateUpstreamUrl(edgeRuntimeUrl);
    if (!checked.ok) throw new ConfigError(`EDGE_RUNTIME_URL is refused: ${checked.reason}`);
  }

  let upstreamHosts: Map<string, MappedHost>;
  try {
    upstreamHosts = parseUpstreamHosts(env['UPSTREAM_HOSTS']);
  } catch (err) {
    throw new ConfigError(err instanceof Error ? err.message : String(err));
  }

  const trustedProxies = list(env['TRUSTED_PROXIES']);
  for (const cidr of trustedProxies) {
    try {
      parseCidr(cidr);
    } catch (err) {
      throw new ConfigError(`TRUSTED_PROXIES: ${err instanceof Error ? err.message : String(err)}`);
    }
  }

  const logLevel = (optional(env, 'LOG_LEVEL') ?? 'info').toLowerCase();
  if (!['debug', 'info', 'warn', 'error'].includes(logLevel)) {
    throw new ConfigError(`LOG_LEVEL must be debug, info, warn or error, got "${logLevel}"`);
  }

  return {
    databaseUrl,
    port: int(env, 'PORT', 0, 65535),
    host,
    jwtSecret,
    jwks,
    jwksUrl,
    jwtIssuer: optional(env, 'JWT_ISSUER'),
    jwtAudience: optional(env, 'JWT_AUDIENCE'),
    edgeRuntimeUrl,
    upstreamHosts,
    connectTimeoutMs: ms(env, 'UPSTREAM_CONNECT_TIMEOUT_MS', 1),
    headersTimeoutMs: ms(env, 'UPSTREAM_HEADERS_TIMEOUT_MS', 1),
    upstreamKeepAliveMs: ms(env, 'UPSTREAM_KEEPALIVE_MS', 1),
    upstreamMaxConnections: int(env, 'UPSTREAM_MAX_CONNECTIONS', 0),
    requestTimeoutMs: ms(env, 'REQUEST_TIMEOUT_MS', 1),
    maxBodyBytes: int(env, 'MAX_BODY_BYTES', 0),
    maxHeaderLines: int(env, 'MAX_HEADER_LINES', 1, 10_000),
    trustedProxies,
    catalogBackstopMs: ms(env, 'CATALOG_BACKSTOP_MS', 1_000),
    migrateOnStart: bool(env, 'MIGRATE_ON_START', true),
    shutdownGraceMs: ms(env, 'SHUTDOWN_GRACE_MS', 0),
    logLevel: logLevel as NodeConfig['logLevel'],
    metrics: bool(env, 'METRICS', true),
    stateDir: optional(env, 'PGSTACK_DIR') ?? DEFAULTS.PGSTACK_DIR,
    demo: !databaseUrl && bool(env, 'PGSTACK_DEMO', true),
  };
}
