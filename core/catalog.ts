/**
 * The catalog snapshot: an immutable map from function name to everything the request
 * path needs, computed once per load. A reload builds a new snapshot and the host swaps
 * it in with one assignment; in-flight requests keep the one they started with.
 */
import { validateUpstreamUrl, type UpstreamTarget, type UpstreamValidation } from './upstream.ts';

/** A row of pgstack.edge_functions as a driver returns it (values untrusted). */
export interface CatalogRow {
  name: unknown;
  runtime: unknown;
  verify_jwt: unknown;
  upstream_url: unknown;
  /** Optional per-function overall deadline in ms (NULL: the gateway default). */
  timeout_ms?: unknown;
  /** Optional per-function request body limit in bytes (NULL: the gateway default). */
  max_body_bytes?: unknown;
}

export type Runtime = 'deno' | 'http';

export interface FunctionEntry {
  readonly name: string;
  readonly runtime: Runtime;
  readonly verifyJwt: boolean;
  readonly upstream: UpstreamTarget;
  readonly timeoutMs: number | undefined;
  readonly maxBodyBytes: number | undefined;
}

export interface DroppedRow {
  readonly name: string;
  readonly reason: string;
}

export interface CatalogSnapshot {
  readonly functions: ReadonlyMap<string, FunctionEntry>;
  /** Rows refused at load, with the reason, for the operator's log and metrics. */
  readonly dropped: readonly DroppedRow[];
  /** Epoch ms of the load. */
  readonly loadedAt: number;
  /**
   * Upstream validations of this load by URL text, for the next build to reuse: a reload
   * re-checks only URLs it has not seen (rows share few upstreams; deno rows share one).
   */
  readonly checkedUrls: ReadonlyMap<string, UpstreamValidation>;
}

/** Function names: URL-safe slug, 1..128 chars (the same rule as the SQL CHECK). */
export const FUNCTION_NAME = /^[A-Za-z0-9_-]{1,128}$/;

export interface BuildOptions {
  /** Upstream of every runtime='deno' row; rows of that runtime are dropped when unset. */
  readonly edgeRuntimeUrl?: string | undefined;
  readonly now?: number;
  /** The snapshot this one replaces: its URL validations are reused. */
  readonly previous?: CatalogSnapshot | undefined;
}

/** validateUpstreamUrl, answered from `known` when it has the URL; the result is kept in `seen`. */
type UrlCheck = (raw: unknown) => UpstreamValidation;

function memoizedCheck(known: ReadonlyMap<string, UpstreamValidation> | undefined, seen: Map<string, UpstreamValidation>): UrlCheck {
  return (raw) => {
    if (typeof raw !== 'string') return validateUpstreamUrl(raw);
    let result = seen.get(raw) ?? known?.get(raw);
    if (result === undefined) result = validateUpstreamUrl(raw);
    seen.set(raw, result);
    return result;
  };
}

function optionalPositiveInt(value: unknown): number | undefined | null {
  if (value === null || value === undefined) return undefined;
  const n = typeof value === 'string' ? Number(value) : value;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n <= 0) return null;
  return n;
}

/** Validates one row. Returns the entry, or the reason the row is dropped. Never throws. */
export function entryFromRow(row: CatalogRow, options: BuildOptions = {}, check: UrlCheck = validateUpstreamUrl): FunctionEntry | DroppedRow {
  const name = typeof row.name === 'string' ? row.name : String(row.name);
  if (!FUNCTION_NAME.test(name)) return { name, reason: 'name is not a slug of letters, digits, - and _ (1..128)' };
  if (row.runtime !== 'deno' && row.runtime !== 'http') return { name, reason: `runtime ${JSON.stringify(row.runtime)} is neither 'deno' nor 'http'` };
  const verifyJwt = row.verify_jwt === false ? false : true; // anything but an explicit false fails closed
  let raw: unknown;
  if (row.runtime === 'deno') {
    if (!options.edgeRuntimeUrl) return { name, reason: "runtime 'deno' needs EDGE_RUNTIME_URL, which is not set" };
    raw = options.edgeRuntimeUrl;
  } else {
    raw = row.upstream_url;
    if (raw === null || raw === undefined || raw === '') return { name, reason: "runtime 'http' needs an upstream_url" };
  }
  const checked = check(raw);
  if (!checked.ok) return { name, reason: checked.reason };
  const timeoutMs = optionalPositiveInt(row.timeout_ms);
  if (timeoutMs === null) return { name, reason: 'timeout_ms must be a positive integer or NULL' };
  const maxBodyBytes = optionalPositiveInt(row.max_body_bytes);
  if (maxBodyBytes === null) return { name, reason: 'max_body_bytes must be a positive integer or NULL' };
  return Object.freeze({ name, runtime: row.runtime, verifyJwt, upstream: checked.target, timeoutMs, maxBodyBytes });
}

/** Builds an immutable snapshot from rows. Bad rows are dropped (listed in `dropped`), never thrown. */
export function buildSnapshot(rows: Iterable<CatalogRow>, options: BuildOptions = {}): CatalogSnapshot {
  const functions = new Map<string, FunctionEntry>();
  const dropped: DroppedRow[] = [];
  const checkedUrls = new Map<string, UpstreamValidation>();
  const check = memoizedCheck(options.previous?.checkedUrls, checkedUrls);
  for (const row of rows) {
    const result = entryFromRow(row, options, check);
    if ('reason' in result) dropped.push(result);
    else functions.set(result.name, result);
  }
  return Object.freeze({ functions, dropped: Object.freeze(dropped), loadedAt: options.now ?? Date.now(), checkedUrls });
}

/**
 * The snapshot after a change to some rows: `previous` with each name in `changed` replaced
 * by its row in `rows` (validated like buildSnapshot does), or removed when `rows` has none.
 * Unchanged entries, their drops and their URL validations are carried over, so the cost
 * is that of the changed rows, not of the catalog.
 */
export function applyChanges(previous: CatalogSnapshot, changed: Iterable<string>, rows: Iterable<CatalogRow>, options: BuildOptions = {}): CatalogSnapshot {
  const names = new Set(changed);
  const functions = new Map(previous.functions);
  const dropped = previous.dropped.filter((d) => !names.has(d.name));
  const checkedUrls = new Map(previous.checkedUrls);
  const check = memoizedCheck(previous.checkedUrls, checkedUrls);
  for (const name of names) functions.delete(name);
  for (const row of rows) {
    const result = entryFromRow(row, options, check);
    if ('reason' in result) dropped.push(result);
    else functions.set(result.name, result);
  }
  return Object.freeze({ functions, dropped: Object.freeze(dropped), loadedAt: options.now ?? Date.now(), checkedUrls });
}
