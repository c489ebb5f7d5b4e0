/**
 * The live catalog of the Node host (DESIGN section 2): one dedicated connection holds
 * `LISTEN pgstack_catalog`. A notification reloads only what changed: the change log of
 * sql/schema.sql names the rows each committed change touched, and one statement reads the
 * entries its last read's snapshot did not see, those names' rows and its new snapshot
 * together, so a snapshot is never half a transaction and a change costs the changed rows,
 * not the catalog. A reconnect, the
 * backstop tick, a TRUNCATE or a log that cannot say what changed (pruned past, recreated,
 * not readable by this role) reload the whole table. Either way a new immutable snapshot
 * is swapped in with one assignment.
 *
 * Ordering: LISTEN, then load, on the same session, so a change committed after the load's
 * snapshot is always followed by a notification. Notifications sent while disconnected are
 * lost, hence the full reload after every (re)connect.
 *
 * Coalescing: at most one reload runs and at most one is queued (a dirty flag). The first
 * notification after a quiet spell is reloaded at once (no debounce: visible about a
 * millisecond after its NOTIFY). While notifications keep coming, the next reload waits for
 * a pacing interval since the previous one started, 10 ms doubling up to 50 ms while the
 * storm lasts, back to 10 ms after a quiet spell: a change inside a burst is visible within
 * 10-50 ms plus one load, 1,000 notifications in a second cause about 20 reloads rather than
 * back-to-back loads competing with requests for the event loop.
 */
import pg from 'pg';
import { applyChanges, buildSnapshot, type CatalogRow, type CatalogSnapshot } from '../../core/catalog.ts';
import type { Logger } from '../../core/log.ts';
import { endWithin } from './pg-end.ts';
import { CATALOG_CHANGES_QUERY, CATALOG_CHANNEL, CATALOG_QUERY, CATALOG_VERSIONED_QUERY } from './catalog-sql.ts';

/** A row of CATALOG_VERSIONED_QUERY. */
interface VersionedRow extends CatalogRow {
  log_snapshot: string;
  log_epoch: string;
}

/** A row of CATALOG_CHANGES_QUERY. */
interface ChangeRow extends VersionedRow {
  log_gap: boolean;
  truncated: boolean;
  changed: string | null;
}

/** Where the change log stood when the current snapshot was read (see catalog-sql.ts). */
interface LogPosition {
  readonly snapshot: string;
  readonly epoch: string;
}

/** The SQLSTATE (or Node error code) of an error, if it has one. */
function errorCode(err: unknown): unknown {
  return typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
}

/** The log cannot be read: it (or the schema) is missing, or this role may not read it. */
function unreadableLog(err: unknown): boolean {
  const code = errorCode(err);
  return code === '42P01' || code === '42501' || code === '42883'; // undefined_table, insufficient_privilege, undefined_function (a server before 13)
}

export interface PostgresCatalogOptions {
  databaseUrl: string;
  /** Upstream of runtime='deno' rows, passed to buildSnapshot. */
  edgeRuntimeUrl?: string;
  /** Periodic full reload guarding against a lost notification. Default 60,000. */
  backstopIntervalMs?: number;
  /**
   * A `SELECT 1` on the LISTEN connection this often, so it is never idle long enough for
   * an idle timeout (idle_session_timeout, a pooler, a NAT) to drop it, and a dead one is
   * noticed within this plus heartbeatTimeoutMs. Default 10,000.
   */
  heartbeatMs?: number;
  /** A heartbeat without an answer in this time means the connection is dead. Default 5,000. */
  heartbeatTimeoutMs?: number;
  /** Reconnect backoff: capped exponential with jitter, from min to max. Defaults 100 and 5,000. */
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  log: Logger;
  /**
   * Runs before the first LISTEN (e.g. applying the schema), retried with the same backoff
   * as the connection until it succeeds once. The host can then start without waiting for
   * the database.
   */
  prepare?: () => Promise<void>;
  /** Called after each successful swap (metrics, tests). Exceptions are logged and ignored. */
  onReload?: (snapshot: CatalogSnapshot) => void;
}

export interface CatalogSource {
  /** The last good snapshot; undefined before the first load. */
  current(): CatalogSnapshot | undefined;
  /** The LISTEN connection is up and its first load succeeded (the snapshot is current as of it). */
  listening(): boolean;
  /** Connects in the background, retrying forever with backoff. Never throws; idempotent. */
  start(): void;
  /** Resolves at the first successful load; rejects only if stopped before it. */
  firstLoad(): Promise<CatalogSnapshot>;
  /** Forces a full reload (coalesced with any pending one); rejects if it fails or nothing is connected. */
  reloadNow(): Promise<void>;
  /** Closes the connection and timers. The last snapshot stays readable. */
  stop(): Promise<void>;
  /**
   * reloads: successful swaps (fullLoads of them read the whole table, changeLoads only the
   * rows the change log named); reconnects: times the listener came back after being lost;
   * notifications: received on the channel; lastError: the latest failure, if any.
   */
  stats(): { reloads: number; fullLoads: number; changeLoads: number; reconnects: number; notifications: number; lastError?: string };
}

/** Server-side limit for the load query; the client gives up on any query a little later (half-open TCP). */
const LOAD_STATEMENT_TIMEOUT_MS = 10_000;
const LOAD_CLIENT_TIMEOUT_MS = 15_000;
const CONNECT_TIMEOUT_MS = 5_000;
/** A connection that lived this long resets the reconnect backoff; shorter ones keep widening it (unless terminated by an administrator). */
const STABLE_CONNECTION_MS = 5_000;
/** Pacing of reloads during a burst of notifications (see the head of this file). */
const PACING_MIN_MS = 10;
const PACING_MAX_MS = 50;

const noop = () => {};
const message = (err: unknown) => (err instanceof Error ? err.message : String(err));

/** Creates the catalog; nothing happens until start(). */
export function createPostgresCatalog(options: PostgresCatalogOptions): CatalogSource {
  const { databaseUrl, edgeRuntimeUrl, log, onReload } = options;
  let prepared = options.prepare === undefined;
  const backstopIntervalMs = options.backstopIntervalMs ?? 60_000;
  const heartbeatMs = options.heartbeatMs ?? 10_000;
  const heartbeatTimeoutMs = options.heartbeatTimeoutMs ?? 5_000;
  const reconnectMinMs = options.reconnectMinMs ?? 100;
  const reconnectMaxMs = Math.max(options.reconnectMaxMs ?? 5_000, reconnectMinMs);

  let snapshot: CatalogSnapshot | undefined;
  /** The connection holding LISTEN; set only once LISTEN succeeded. */
  let client: pg.Client | undefined;
  /** A connection being opened, so stop() can close it too. */
  let opening: pg.Client | undefined;
  let started = false;
  let stopped = false;
  let connecting = false;
  let everConnected = false;
  /** When the current connection's LISTEN succeeded. */
  let connectedAt = 0;
  /** The connection the last successful load ran on (listening() needs it to be the current one). */
  let loadedOn: pg.Client | undefined;
  /** The current connection once its first load succeeded: losing it is news, losing a half-made one is a retry. */
  let established: pg.Client | undefined;
  /** A lost connection not yet logged (see connectionLost). */
  let unreportedLoss: string | undefined;
  /** Consecutive failed attempts and short-lived connections: the backoff exponent. */
  let retryStreak = 0;

  let dirty = false;
  /** The pending reload must read the whole table (reconnect, backstop, reloadNow). */
  let dirtyFull = false;
  /** Whether the change log is readable: unknown until the first full load of a connection. */
  let changeLog: boolean | undefined;
  /** The change log's position the current snapshot reflects. */
  let logPosition: LogPosition | undefined;
  let reloadLoop: Promise<void> | undefined;
  let lastReloadStart = Number.NEGATIVE_INFINITY;
  let pacing = PACING_MIN_MS;

  let reloads = 0;
  let fullLoads = 0;
  let changeLoads = 0;
  let reconnects = 0;
  let notifications = 0;
  let lastError: string | undefined;
  let droppedSeen = new Set<string>();

  let backstop: NodeJS.Timeout | undefined;
  let heartbeat: NodeJS.Timeout | undefined;
  /**
   * One query at a time on the LISTEN connection (pg queues a second one, deprecated and
   * gone in pg 9): a heartbeat is skipped while a load runs (the load proves the
   * connection), and a load waits for a heartbeat in flight.
   */
  let loading = false;
  let beating: Promise<unknown> | undefined;
  /** Wakers of the pending sleeps (reconnect backoff, burst spacing), for stop(). */
  const sleepers = new Set<() => void>();

  let resolveFirst!: (snapshot: CatalogSnapshot) => void;
  let rejectFirst!: (err: Error) => void;
  const first = new Promise<CatalogSnapshot>((resolve, reject) => {
    resolveFirst = resolve;
    rejectFirst = reject;
  });
  first.catch(noop); // a host that never awaits firstLoad() must not see an unhandled rejection at stop()

  /** A pause that stop() cuts short. */
  function sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        sleepers.delete(done);
        resolve();
      };
      const timer = setTimeout(done, ms);
      timer.unref();
      sleepers.add(done);
    });
  }

  function backoff(attempt: number): number {
    const ceiling = Math.min(reconnectMaxMs, reconnectMinMs * 2 ** Math.min(attempt, 30));
    return ceiling / 2 + (Math.random() * ceiling) / 2; // "equal jitter": spread, yet never near zero
  }

  function logDropped(next: CatalogSnapshot): void {
    const now = new Set(next.dropped.map((d) => `${d.name}\u0000${d.reason}`));
    for (const d of next.dropped) {
      if (!droppedSeen.has(`${d.name}\u0000${d.reason}`)) log('warn', 'catalog row dropped', { name: d.name, reason: d.reason });
    }
    droppedSeen = now;
  }

  /**
   * The whole catalog, with the change log's position when the log is readable (schema.sql
   * applied, and the role may read it); without it every change reloads the whole table.
   */
  async function loadAll(c: pg.Client): Promise<CatalogSnapshot> {
    if (changeLog !== false) {
      try {
        const { rows } = await c.query<VersionedRow>(CATALOG_VERSIONED_QUERY);
        const head = rows[0];
        logPosition = head === undefined ? undefined : { snapshot: head.log_snapshot, epoch: head.log_epoch };
        changeLog = logPosition !== undefined;
        fullLoads++;
        return buildSnapshot(rows.filter((r) => r.name !== null), { edgeRuntimeUrl, previous: snapshot });
      } catch (err) {
        if (!unreadableLog(err)) throw err;
        logUnreadable(err);
      }
    }
    const { rows } = await c.query<CatalogRow>(CATALOG_QUERY);
    fullLoads++;
    return buildSnapshot(rows, { edgeRuntimeUrl, previous: snapshot });
  }

  /** From now on (on this connection) every change reloads the whole table; said once. */
  function logUnreadable(err: unknown): void {
    changeLog = false;
    logPosition = undefined;
    log('warn', 'the catalog change log (pgstack.catalog_changes, pgstack.catalog_log_state) is not readable; every change reloads the whole catalog', {
      error: message(err),
      hint: 'apply sql/schema.sql (pgstack migrate; PostgreSQL 13 or newer), and grant this role SELECT on pgstack.catalog_changes and pgstack.catalog_log_state',
    });
  }

  /**
   * The rows changed since `since`, applied to the current snapshot; undefined when nothing
   * changed. Falls back to loadAll when the log cannot say: a TRUNCATE, entries not yet seen
   * that may have been deleted (pruned past, emptied by hand), tables recreated, a log this
   * role cannot read.
   */
  async function loadChanges(c: pg.Client, current: CatalogSnapshot, since: LogPosition): Promise<CatalogSnapshot | undefined> {
    let rows: ChangeRow[];
    try {
      ({ rows } = await c.query<ChangeRow>(CATALOG_CHANGES_QUERY, [since.snapshot]));
    } catch (err) {
      if (!unreadableLog(err)) throw err;
      logUnreadable(err);
      return loadAll(c);
    }
    const head = rows[0];
    if (head === undefined || head.log_epoch !== since.epoch || head.log_gap || head.truncated) return loadAll(c);
    logPosition = { snapshot: head.log_snapshot, epoch: head.log_epoch };
    const changed = rows.flatMap((r) => (r.changed === null ? [] : [r.changed]));
    if (changed.length === 0) return undefined;
    changeLoads++;
    return applyChanges(current, changed, rows.filter((r) => r.name !== null), { edgeRuntimeUrl });
  }

  /** One load on the current connection (only the changes, unless `full` or they cannot be had), then the swap. */
  async function loadOnce(full: boolean): Promise<void> {
    const c = client;
    if (!c) throw new Error('the catalog database is not connected');
    let next: CatalogSnapshot | undefined;
    loading = true;
    try {
      if (beating) await beating;
      if (c !== client) throw new Error('the catalog database connection was lost');
      const current = snapshot;
      const since = logPosition;
      next = !full && current !== undefined && changeLog === true && since !== undefined ? await loadChanges(c, current, since) : await loadAll(c);
    } catch (err) {
      // A failed load on a live connection (statement timeout, missing table, half-open TCP)
      // goes through the same retry path as a lost connection: reconnect with backoff, LISTEN, load.
      if (c === client) connectionLost(c, err);
      throw err;
    } finally {
      loading = false;
    }
    loadedOn = c;
    if (stopped || next === undefined) return;
    snapshot = next;
    reloads++;
    logDropped(next);
    resolveFirst(next);
    try {
      onReload?.(next);
    } catch (err) {
      log('error', 'catalog onReload callback threw', { error: message(err) });
    }
  }

  /**
   * Marks the catalog dirty and makes sure a reload loop runs. The loop reloads while dirty,
   * so a notification that lands during a load (which may have read the table before the
   * change) gets one more load after it. Resolves when the loop goes idle; rejects with the
   * error of its last load if that one failed.
   */
  function requestReload(full: boolean): Promise<void> {
    dirty = true;
    if (full) dirtyFull = true;
    return (reloadLoop ??= runReloads());
  }

  async function runReloads(): Promise<void> {
    try {
      let failure: unknown;
      while (dirty && !stopped) {
        // The load failed and took the connection with it: the reconnect reloads everything;
        // keep the failure that says why (not a "not connected" of one more try).
        if (failure !== undefined && client === undefined) break;
        const wait = lastReloadStart + pacing - performance.now();
        if (wait > 0) {
          await sleep(wait);
          pacing = Math.min(pacing * 2, PACING_MAX_MS); // still changing: pace the next one wider
        } else {
          pacing = PACING_MIN_MS; // the previous reload is older than the interval: not a burst (any more)
        }
        if (stopped) break;
        const full = dirtyFull;
        dirty = false;
        dirtyFull = false;
        lastReloadStart = performance.now();
        try {
          await loadOnce(full);
          failure = undefined;
        } catch (err) {
          failure = err;
        }
      }
      if (failure !== undefined) throw failure;
    } finally {
      // Synchronously after the last `dirty` check: a request cannot slip in between.
      reloadLoop = undefined;
    }
  }

  function newClient(): pg.Client {
    const c = new pg.Client({
      connectionString: databaseUrl,
      application_name: 'pgstack-catalog',
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
      connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
      query_timeout: LOAD_CLIENT_TIMEOUT_MS,
    });
    // Listeners stay attached for the client's whole life: pg can still emit 'error' after
    // end(), and an 'error' event without a listener would crash the process.
    c.on('error', (err) => connectionLost(c, err));
    c.on('end', () => connectionLost(c, new Error('connection closed')));
    c.on('notification', (msg) => {
      if (c !== client || msg.channel !== CATALOG_CHANNEL) return;
      notifications++;
      requestReload(false).catch(noop); // failures are logged and retried by the reconnect path
    });
    return c;
  }

  /** One heartbeat on the LISTEN connection; a failure or no answer is a lost connection. */
  function beat(): void {
    const c = client;
    if (!c || loading || beating) return;
    // (pg reads a per-query `query_timeout`; its typings do not list it.)
    const query = { text: 'SELECT 1', query_timeout: heartbeatTimeoutMs } as pg.QueryConfig;
    beating = c
      .query(query)
      .catch((err: unknown) => connectionLost(c, new Error(`heartbeat failed: ${message(err)}`)))
      .finally(() => (beating = undefined));
  }

  function connectionLost(c: pg.Client, err: unknown): void {
    if (c !== client) return; // an old or not yet established connection: handled where it is awaited
    client = undefined;
    lastError = message(err);
    // Said when the first reconnect attempt starts (after its backoff), unless stop() came
    // first: Ctrl-C reaches the embedded server (the terminal's process group) a moment
    // before the gateway's own handler runs, and a gateway shutting down has lost nothing.
    if (established === c) unreportedLoss = lastError;
    void endWithin(c);
    // A connection that lived, or a working one an administrator terminated (57P01:
    // pg_terminate_backend; a server shutting down says the same, but then the reconnects
    // fail and widen the backoff themselves): come back at the first step, because the
    // catalog is stale until then.
    if (performance.now() - connectedAt >= STABLE_CONNECTION_MS || (established === c && errorCode(err) === '57P01')) retryStreak = 0;
    ensureConnecting(true);
  }

  /** Runs connect() unless it is already running; restarts it if the connection was lost as it finished. */
  function ensureConnecting(afterLoss: boolean): void {
    if (stopped || connecting) return;
    connecting = true;
    void connect(afterLoss).finally(() => {
      connecting = false;
      if (!stopped && !client) ensureConnecting(true);
    });
  }

  /**
   * Connects, LISTENs, loads; retries with backoff until that succeeds or stop(). Never
   * rejects. After a loss it waits one backoff step first, so a connection that keeps
   * dying right after it is made (a pooler, a server restarting) cannot spin.
   */
  async function connect(afterLoss: boolean): Promise<void> {
    let delay = 0;
    for (let attempt = 0; !stopped; attempt++) {
      if (afterLoss || attempt > 0) {
        await sleep(delay || backoff(retryStreak++));
        if (stopped) break;
      }
      if (unreportedLoss !== undefined) {
        log('warn', 'catalog listener lost; serving the last good catalog while reconnecting', { error: unreportedLoss });
        unreportedLoss = undefined;
      }
      delay = 0;
      const c = newClient();
      opening = c;
      try {
        if (!prepared) {
          await options.prepare!();
          prepared = true;
        }
        await c.connect();
        // statement_timeout by SET, not as a startup parameter, which poolers such as
        // PgBouncer refuse; both in one round trip.
        await c.query(`SET statement_timeout = ${LOAD_STATEMENT_TIMEOUT_MS}; LISTEN ${CATALOG_CHANNEL}`);
        if (stopped) break;
        client = c;
        opening = undefined;
        connectedAt = performance.now();
        changeLog = undefined; // asked again on every connection (a migration may have run meanwhile)
        await requestReload(true);
        if (client !== c) throw new Error('connection lost during the first load');
        established = c;
        if (everConnected) reconnects++;
        log('info', everConnected ? 'catalog listener reconnected' : 'catalog listener connected', {
          attempts: attempt + 1,
          functions: snapshot?.functions.size,
          dropped: snapshot?.dropped.length,
        });
        everConnected = true;
        return;
      } catch (err) {
        if (client === c) client = undefined;
        opening = undefined;
        void endWithin(c);
        if (stopped) return;
        lastError = message(err);
        // One line per failed attempt: the backoff caps the rate at one per reconnectMaxMs.
        delay = backoff(retryStreak++);
        log('warn', everConnected ? 'catalog database unavailable; serving the last good catalog, retrying' : 'catalog database unavailable; no catalog yet, retrying', {
          error: lastError,
          attempt: attempt + 1,
          retryInMs: Math.round(delay),
        });
      }
    }
    if (opening) void endWithin(opening);
    opening = undefined;
  }

  return {
    current: () => snapshot,
    // Up once LISTEN is on and the first load of that connection succeeded: a reconnect
    // whose full reload is blocked (a lock, a timeout) is not ready, it may serve stale rows.
    listening: () => client !== undefined && loadedOn === client,
    start() {
      if (started || stopped) return;
      started = true;
      ensureConnecting(false);
      backstop = setInterval(() => {
        if (client) requestReload(true).catch(noop);
      }, backstopIntervalMs);
      backstop.unref();
      heartbeat = setInterval(beat, heartbeatMs);
      heartbeat.unref();
    },
    firstLoad: () => first,
    reloadNow: () => (stopped ? Promise.reject(new Error('the catalog is stopped')) : requestReload(true)),
    async stop() {
      if (stopped) return;
      stopped = true;
      clearInterval(backstop);
      clearInterval(heartbeat);
      for (const wake of [...sleepers]) wake();
      rejectFirst(new Error('the catalog was stopped before its first load'));
      const closing = [client, opening].filter((c): c is pg.Client => c !== undefined);
      client = undefined;
      opening = undefined;
      await Promise.all(closing.map((c) => endWithin(c)));
      await reloadLoop?.catch(noop);
    },
    stats: () => ({ reloads, fullLoads, changeLoads, reconnects, notifications, ...(lastError !== undefined ? { lastError } : {}) }),
  };
}
