/**
 * The Node host, assembled: config -> database (given or embedded) -> live catalog
 * (migrate, LISTEN, load: in the background, retried while the database is down) -> undici
 * forwarder -> core gateway -> node:http listener. The listener comes up without waiting
 * for the database; until the first catalog load function calls answer 503
 * catalog_not_loaded and /readyz 503. Returns a handle so tests and embedders can run it
 * in-process; `pgstack serve` adds the banner and signals.
 */
import type { AddressInfo } from 'node:net';
import { join, resolve } from 'node:path';
import type { Server } from 'node:http';
import { createGateway, GatewayError, type Gateway, type KeyConfig, type Logger } from '../../core/index.ts';
import { createPostgresCatalog, type CatalogSource } from './catalog.ts';
import { ConfigError, type NodeConfig } from './config.ts';
import { startDemoFunction, type DemoFunction } from './demo.ts';
import { startEmbeddedPostgres, type EmbeddedPostgres } from './embedded.ts';
import { createUndiciForwarder, type NodeForwarder } from './forwarder.ts';
import { answerAwaiting, createListener, newRequestHeaders } from './listener.ts';
import { lockStateDir, readOrCreateSecret, readSecret } from './local-state.ts';
import { migrate } from './migrate.ts';
import { upsertFunction } from './functions-repo.ts';

export interface RunningGateway {
  readonly url: string;
  readonly port: number;
  readonly databaseUrl: string;
  /** The database is the embedded default, started by this gateway. */
  readonly embedded: boolean;
  /** The HS256 secret in use, when there is one (to mint keys). */
  readonly jwtSecret: string | undefined;
  /** Set when the embedded default started the demo function. */
  readonly demo: DemoFunction | undefined;
  readonly server: Server;
  readonly gateway: Gateway;
  readonly catalog: CatalogSource;
  /** Graceful stop: refuse new work, let in-flight requests finish within the grace period, close everything. */
  stop(): Promise<void>;
}

/** Resolves keys the way the CLI does: environment first, else the local state folder. */
export function resolveJwtSecret(config: NodeConfig, create: boolean): string | undefined {
  if (config.jwtSecret) return config.jwtSecret;
  return create ? readOrCreateSecret(config.stateDir) : readSecret(config.stateDir);
}

export async function startGateway(config: NodeConfig, log: Logger): Promise<RunningGateway> {
  const cleanups: Array<() => Promise<void>> = [];
  const cleanup = async () => {
    for (const fn of cleanups.reverse()) await fn().catch((err) => log('warn', 'cleanup failed', { error: String(err) }));
  };
  try {
    let embedded: EmbeddedPostgres | undefined;
    let databaseUrl = config.databaseUrl;
    if (!databaseUrl) {
      // One gateway per state folder: a second one would take over the demo's catalog row.
      cleanups.push(await lockStateDir(config.stateDir));
      embedded = await startEmbeddedPostgres({ dir: config.stateDir, log });
      cleanups.push(() => embedded!.stop());
      databaseUrl = embedded.databaseUrl;
    }

    // Keys: the environment's, else (embedded default, or a secret already generated
    // locally) the one under the state folder. A gateway that could verify nothing is a
    // configuration error, not a silent anon-only gateway.
    const jwtSecret = resolveJwtSecret(config, !config.databaseUrl);
    if (!jwtSecret && !config.jwks && !config.jwksUrl) {
      throw new ConfigError('No verification keys: set JWT_SECRET, JWKS or JWKS_URL (with DATABASE_URL set, no secret is generated).');
    }
    // Which keys verify tokens, wherever they came from (never the keys themselves).
    log('info', 'verification keys', {
      hs256: config.jwtSecret ? 'JWT_SECRET' : jwtSecret ? join(resolve(config.stateDir), 'jwt-secret') : undefined,
      jwks: config.jwks ? `JWKS (${config.jwks.keys.length} keys)` : undefined,
      jwksUrl: config.jwksUrl,
    });
    const keys: KeyConfig = {
      jwtSecret,
      jwks: config.jwks,
      jwksUrl: config.jwksUrl,
      issuer: config.jwtIssuer,
      audience: config.jwtAudience,
    };

    // The demo runs on this machine: once it listens, its bare name is mapped to loopback on
    // its port only, as an operator would with UPSTREAM_HOSTS=hello=127.0.0.1:PORT (no
    // catalog row can reach another local port through it). The forwarder reads the map at
    // each connect.
    const upstreamHosts = new Map(config.upstreamHosts);
    const withDemo = embedded !== undefined && config.demo;

    // The embedded database is ours and up: migrate before anything reads the catalog. A
    // given database may not be up yet: the catalog applies the schema in the background,
    // retrying, while the listener answers 503 catalog_not_loaded.
    const migrateNow = config.migrateOnStart && embedded !== undefined;
    const catalog = createPostgresCatalog({
      databaseUrl,
      edgeRuntimeUrl: config.edgeRuntimeUrl,
      backstopIntervalMs: config.catalogBackstopMs,
      log,
      ...(config.migrateOnStart && !migrateNow ? { prepare: () => migrateUnlessRefused(databaseUrl, log) } : {}),
    });
    cleanups.push(() => catalog.stop());

    const forwarder: NodeForwarder = createUndiciForwarder({
      connectTimeoutMs: config.connectTimeoutMs,
      headersTimeoutMs: config.headersTimeoutMs,
      keepAliveTimeoutMs: config.upstreamKeepAliveMs,
      connectionsPerOrigin: config.upstreamMaxConnections,
      upstreamHosts,
      log,
    });
    cleanups.push(() => forwarder.close());

    const gateway = createGateway(
      {
        keys,
        limits: { maxBodyBytes: config.maxBodyBytes, requestTimeoutMs: config.requestTimeoutMs, maxHeaderLines: config.maxHeaderLines },
        trustedProxies: config.trustedProxies,
        metrics: config.metrics,
      },
      {
        catalog: () => catalog.current(),
        ready: () => catalog.listening(),
        forward: forwarder.forward,
        log,
        extraMetrics: () => catalogMetrics(catalog),
        newHeaders: newRequestHeaders,
      },
    );
    await gateway.warm();

    const server = createListener(gateway, { log });
    await new Promise<void>((resolve, reject) => {
      const onError = (err: NodeJS.ErrnoException) => {
        if (err.code === 'EADDRINUSE') reject(new ConfigError(`${config.host}:${config.port} is already in use: set PORT to another port (PORT=0 picks a free one), or stop what listens there.`));
        else if (err.code === 'EADDRNOTAVAIL') reject(new ConfigError(`HOST=${config.host} is not an address of this machine.`));
        else if (err.code === 'ENOTFOUND' || err.code === 'EAI_AGAIN') reject(new ConfigError(`HOST=${config.host} does not resolve to an address of this machine.`));
        else reject(err);
      };
      server.once('error', onError);
      server.listen(config.port, config.host, () => {
        server.off('error', onError);
        resolve();
      });
    });
    cleanups.push(() => new Promise<void>((resolve) => server.close(() => resolve())));
    const port = (server.address() as AddressInfo).port;

    // Only now, with the port ours, touch shared state: the schema, the demo's row.
    if (migrateNow) await migrate(databaseUrl, { log });
    let demo: DemoFunction | undefined;
    if (withDemo) {
      demo = await startDemoFunction(config.stateDir);
      cleanups.push(() => demo!.stop());
      if (!upstreamHosts.has('hello')) upstreamHosts.set('hello', { address: '127.0.0.1', port: demo.port });
      await upsertFunction(databaseUrl, { name: 'hello', runtime: 'http', verifyJwt: true, upstreamUrl: `http://hello:${demo.port}` });
    }
    catalog.start();
    const shownHost = config.host === '0.0.0.0' || config.host === '::' ? '127.0.0.1' : config.host.includes(':') ? `[${config.host}]` : config.host;
    log('info', 'listening', { url: `http://${shownHost}:${port}` });

    let stopping: Promise<void> | undefined;
    const stop = () => {
      stopping ??= (async () => {
        gateway.drain();
        // Draining answers every new function call 503 and in-flight requests hold their
        // snapshot: the catalog is read no more. Its connections close now, before the
        // database goes away under them (Ctrl-C reaches the embedded server too: it shares
        // the terminal's process group), so that is not reported as a lost listener.
        const catalogStopped = catalog.stop();
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        // A keep-alive connection whose answer was already under way at the signal is idle
        // once that answer ends: closed then, not at the end of the grace period.
        server.closeIdleConnections();
        const sweeper = setInterval(() => server.closeIdleConnections(), 50);
        let graceTimer: NodeJS.Timeout | undefined;
        const grace = new Promise<'grace'>((resolve) => (graceTimer = setTimeout(() => resolve('grace'), config.shutdownGraceMs)));
        if ((await Promise.race([closed, grace])) === 'grace') {
          // Requests still waiting for their function get a status, not an empty reply: their
          // exchanges end with shutting_down, which the core answers (503) and logs as such;
          // responses already streaming are cut. Any request still unanswered a turn later
          // (waiting for something else) gets the same 503 from the listener.
          const cut = () => new GatewayError('shutting_down', { headers: { 'retry-after': '1', connection: 'close' } });
          const aborted = forwarder.abortAll(cut());
          await new Promise((resolve) => setTimeout(resolve, 20));
          const answered = await answerAwaiting(server, cut());
          if (aborted + answered > 0) log('warn', 'shutdown grace period over; in-flight requests cut', { graceMs: config.shutdownGraceMs, exchanges: aborted, answeredByListener: answered });
          else log('info', 'shutdown grace period over; closing the remaining connections', { graceMs: config.shutdownGraceMs });
        }
        clearTimeout(graceTimer);
        clearInterval(sweeper);
        server.closeAllConnections();
        await catalogStopped;
        await cleanup();
      })();
      return stopping;
    };

    return { url: `http://${shownHost}:${port}`, port, databaseUrl, embedded: embedded !== undefined, jwtSecret, demo, server, gateway, catalog, stop };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

/**
 * MIGRATE_ON_START with a given database: a role that may read the catalog but not change
 * the schema (least privilege) is a configuration the gateway can still serve with. The
 * refusal is said once, with what to do, and the catalog goes on to LISTEN and load.
 * Any other failure rejects (and is retried as the database being unavailable).
 */
async function migrateUnlessRefused(databaseUrl: string, log: Logger): Promise<void> {
  try {
    await migrate(databaseUrl, { log });
  } catch (err) {
    if ((err as { code?: string }).code !== '42501') throw err; // insufficient_privilege
    log('error', 'MIGRATE_ON_START: this database role may not apply the schema; serving the catalog as it is', {
      error: err instanceof Error ? err.message : String(err),
      hint: 'apply sql/schema.sql with an owner role (pgstack migrate) and set MIGRATE_ON_START=false for this gateway',
    });
  }
}

function catalogMetrics(catalog: CatalogSource): string[] {
  const snapshot = catalog.current();
  const stats = catalog.stats();
  return [
    '# HELP pgstack_catalog_functions Functions in the current catalog snapshot.',
    '# TYPE pgstack_catalog_functions gauge',
    `pgstack_catalog_functions ${snapshot?.functions.size ?? 0}`,
    '# HELP pgstack_catalog_dropped_rows Catalog rows refused at the last load (bad upstream, name or runtime).',
    '# TYPE pgstack_catalog_dropped_rows gauge',
    `pgstack_catalog_dropped_rows ${snapshot?.dropped.length ?? 0}`,
    '# HELP pgstack_catalog_reloads_total Catalog snapshots swapped in, by how they were read (full: the whole table; changes: only the rows the change log named).',
    '# TYPE pgstack_catalog_reloads_total counter',
    `pgstack_catalog_reloads_total{kind="full"} ${stats.fullLoads}`,
    `pgstack_catalog_reloads_total{kind="changes"} ${stats.changeLoads}`,
    '# HELP pgstack_catalog_reconnects_total Reconnects of the LISTEN connection.',
    '# TYPE pgstack_catalog_reconnects_total counter',
    `pgstack_catalog_reconnects_total ${stats.reconnects}`,
    '# HELP pgstack_catalog_listening Whether the LISTEN connection is up.',
    '# TYPE pgstack_catalog_listening gauge',
    `pgstack_catalog_listening ${catalog.listening() ? 1 : 0}`,
  ];
}
