/**
 * `npm run soak [-- --seconds N --clients N --change-every-ms N --max-rss-growth-mb N]`
 *
 * A bounded soak on loopback: the gateway as a child process (`node bin/pgstack.js serve`),
 * an upstream function in this process, steady load from N keep-alive clients (undici), and
 * a catalog change every ~100 ms (a function toggled in and out, the hot function's row
 * rewritten). Prints requests, answers by kind, p50/p99 latency and the gateway's RSS at
 * start, middle and end; exits 1 on any unexpected answer or when RSS grows more than the
 * threshold between the middle and the end (after warm-up, the steady state must be flat).
 *
 * The database is DATABASE_URL when set, else an embedded PostgreSQL in a temporary folder.
 * test/reliability/soak.test.ts runs a 10-second version through runSoak().
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseFlags } from './flags.ts';
import pg from 'pg';
import { Pool } from 'undici';
import { freePort, startEmbeddedPostgres } from '../adapters/node/embedded.ts';
import { migrate } from '../adapters/node/migrate.ts';
import { mintToken } from '../adapters/node/tokens.ts';

const REPO_ROOT = fileURLToPath(new URL('..', import.meta.url));
const SECRET = 'soak-secret-that-is-long-enough-for-hs256-0123456789';
const MiB = 1024 * 1024;

export interface SoakOptions {
  /** A migrated (or empty) database of the soak's own; its pgstack.edge_functions rows are rewritten. */
  databaseUrl: string;
  seconds: number;
  clients: number;
  changeEveryMs: number;
  /** Allowed gateway RSS growth between the middle and the end of the run. */
  maxRssGrowthBytes: number;
  /** Progress lines; default: none. */
  progress?: (line: string) => void;
}

export interface SoakReport {
  seconds: number;
  clients: number;
  requests: number;
  requestsPerSecond: number;
  /** Answers by kind: `200`, `401 credentials_required`, `404 function_not_found`, `error ECONNRESET`, ... */
  answers: Record<string, number>;
  /** Answers outside what each route may legitimately return. */
  unexpected: Record<string, number>;
  latencyMs: { p50: number; p99: number; max: number };
  catalogChanges: number;
  catalogReloads: number | undefined;
  rss: { start: number; middle: number; end: number; peak: number };
  ok: boolean;
  failures: string[];
}

/** One request kind of the mix: what is sent, and which answers are fine. */
interface Route {
  weight: number;
  method: 'GET' | 'POST';
  path: string;
  auth: boolean;
  expected: Set<string>;
}

function rssOf(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] ?? NaN) * 1024;
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

interface Child {
  pid: number;
  port: number;
  stop(): Promise<number | null>;
  reloads(): Promise<number | undefined>;
}

async function startGatewayChild(databaseUrl: string): Promise<Child> {
  // SOAK_GATEWAY_NODE_ARGS: extra node flags for the gateway (e.g. --cpu-prof), to look into a run.
  const nodeArgs = (process.env['SOAK_GATEWAY_NODE_ARGS'] ?? '').split(' ').filter(Boolean);
  const child = spawn(process.execPath, [...nodeArgs, path.join(REPO_ROOT, 'bin', 'pgstack.js'), 'serve'], {
    cwd: REPO_ROOT,
    env: {
      PATH: process.env['PATH'] ?? '',
      HOME: process.env['HOME'] ?? os.tmpdir(),
      DATABASE_URL: databaseUrl,
      JWT_SECRET: SECRET,
      PORT: '0',
      HOST: '127.0.0.1',
      UPSTREAM_HOSTS: 'soak-fn=127.0.0.1',
      LOG_LEVEL: 'info', // the production default: one JSON line a request, drained below
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err = (err + d.toString()).slice(-4_000)));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const port = await new Promise<number>((resolve, reject) => {
    let head = '';
    const timer = setTimeout(() => reject(new Error(`gateway did not listen within 30 s: ${err}${head}`)), 30_000);
    const onData = (d: Buffer) => {
      head += d.toString();
      const m = /"msg":"listening","url":"http:\/\/[^"]*:(\d+)"/.exec(head);
      if (m) {
        clearTimeout(timer);
        child.stdout!.off('data', onData);
        child.stdout!.resume(); // keep draining the request log
        resolve(Number(m[1]));
      } else if (head.length > 64_000) {
        head = head.slice(-8_000);
      }
    };
    child.stdout!.on('data', onData);
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`gateway exited ${code} before listening: ${err}${head}`));
    });
  });
  return {
    pid: child.pid!,
    port,
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), 15_000);
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
    async reloads() {
      try {
        const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
        const counts = [...text.matchAll(/^pgstack_catalog_reloads_total\{kind="\w+"\} (\d+)$/gm)].map((m) => Number(m[1]));
        return counts.length > 0 ? counts.reduce((a, b) => a + b, 0) : undefined;
      } catch {
        return undefined;
      }
    },
  };
}

export async function runSoak(options: SoakOptions): Promise<SoakReport> {
  const say = options.progress ?? (() => {});
  // The upstream: reads the body, answers a small JSON with the identity it was given.
  const upstream = http.createServer((req, res) => {
    let bytes = 0;
    req.on('data', (d: Buffer) => (bytes += d.length));
    req.on('end', () => {
      const body = JSON.stringify({ role: req.headers['x-pgstack-role'], bytes });
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
      res.end(body);
    });
  });
  upstream.keepAliveTimeout = 10_000;
  await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
  const upstreamPort = (upstream.address() as AddressInfo).port;

  await migrate(options.databaseUrl);
  const db = new pg.Client({ connectionString: options.databaseUrl, application_name: 'pgstack-soak' });
  db.on('error', () => {});
  await db.connect();
  const url = `http://soak-fn:${upstreamPort}`;
  await db.query("DELETE FROM pgstack.edge_functions WHERE name LIKE 'soak-%'");
  await db.query(
    "INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('soak-echo', 'http', true, $1), ('soak-open', 'http', false, $1), ('soak-churn', 'http', false, $1)",
    [url],
  );

  const gateway = await startGatewayChild(options.databaseUrl);
  const base = `http://127.0.0.1:${gateway.port}`;
  const pool = new Pool(base, { connections: options.clients, pipelining: 1, keepAliveTimeout: 30_000 });
  const token = await mintToken(SECRET, { role: 'authenticated', sub: 'soak-user', expiresIn: '1h' });
  const body = JSON.stringify({ pad: 'x'.repeat(180) }); // about 200 bytes, as in DESIGN section 8

  const routes: Route[] = [
    { weight: 7, method: 'POST', path: '/functions/v1/soak-echo', auth: true, expected: new Set(['200']) },
    { weight: 1, method: 'GET', path: '/functions/v1/soak-open/x?y=1', auth: false, expected: new Set(['200']) },
    // Toggled in and out by the catalog changes: found or not, never anything else.
    { weight: 1, method: 'GET', path: '/functions/v1/soak-churn', auth: false, expected: new Set(['200', '404 function_not_found']) },
    { weight: 1, method: 'POST', path: '/functions/v1/soak-echo', auth: false, expected: new Set(['401 credentials_required']) },
  ];
  const wheel = routes.flatMap((r) => Array.from({ length: r.weight }, () => r));

  const answers: Record<string, number> = {};
  const unexpected: Record<string, number> = {};
  const latencies: number[] = [];
  const failures: string[] = [];
  let requests = 0;
  let changes = 0;

  const call = async (route: Route): Promise<void> => {
    const started = performance.now();
    let kind: string;
    try {
      const res = await pool.request({
        method: route.method,
        path: route.path,
        headers: {
          ...(route.auth ? { authorization: `Bearer ${token}` } : {}),
          ...(route.method === 'POST' ? { 'content-type': 'application/json' } : {}),
        },
        body: route.method === 'POST' ? body : null,
        headersTimeout: 10_000,
        bodyTimeout: 10_000,
      });
      const text = await res.body.text();
      kind = res.statusCode === 200 ? '200' : `${res.statusCode} ${(/"code":"([a-z_]+)"/.exec(text) ?? [])[1] ?? '?'}`;
    } catch (err) {
      kind = `error ${(err as { code?: string }).code ?? (err as Error).message}`;
    }
    latencies.push(performance.now() - started);
    requests++;
    answers[kind] = (answers[kind] ?? 0) + 1;
    if (!route.expected.has(kind)) unexpected[`${route.method} ${route.path.split('?')[0]} -> ${kind}`] = (unexpected[`${route.method} ${route.path.split('?')[0]} -> ${kind}`] ?? 0) + 1;
  };

  // Warm-up (JIT, pools, token cache), then the baseline.
  for (let i = 0; i < 200; i++) await call(wheel[i % wheel.length]!);
  for (const k of Object.keys(answers)) delete answers[k];
  for (const k of Object.keys(unexpected)) delete unexpected[k];
  latencies.length = 0;
  requests = 0;
  const reloadsBefore = await gateway.reloads();

  const rss = { start: rssOf(gateway.pid), middle: NaN, end: NaN, peak: 0 };
  rss.peak = rss.start;
  const durationMs = options.seconds * 1000;
  const started = Date.now();
  const stopAt = started + durationMs;
  say(`soak: ${options.seconds} s, ${options.clients} clients, catalog change every ${options.changeEveryMs} ms; gateway pid ${gateway.pid}, RSS ${(rss.start / MiB).toFixed(1)} MiB`);

  const sampler = setInterval(() => {
    try {
      const now = rssOf(gateway.pid);
      rss.peak = Math.max(rss.peak, now);
      if (Number.isNaN(rss.middle) && Date.now() - started >= durationMs / 2) rss.middle = now;
    } catch {
      // gone; reported below
    }
  }, 250);
  const reporter = setInterval(() => {
    const elapsed = (Date.now() - started) / 1000;
    say(`  ${elapsed.toFixed(0)} s: ${requests} requests (${(requests / elapsed).toFixed(0)}/s), ${changes} catalog changes, RSS ${(rssOf(gateway.pid) / MiB).toFixed(1)} MiB`);
  }, Math.max(5_000, Math.min(30_000, durationMs / 4)));

  const changer = (async () => {
    let present = true;
    for (let i = 0; Date.now() < stopAt; i++) {
      const tick = Date.now();
      try {
        if (i % 2 === 0) {
          if (present) await db.query("DELETE FROM pgstack.edge_functions WHERE name = 'soak-churn'");
          else await db.query("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('soak-churn', 'http', false, $1)", [url]);
          present = !present;
        } else {
          // Rewrites the hot function's row (same behaviour): every reload rebuilds its entry.
          await db.query("UPDATE pgstack.edge_functions SET timeout_ms = $1 WHERE name = 'soak-echo'", [30_000 + (i % 7)]);
        }
        changes++;
      } catch (err) {
        failures.push(`catalog change failed: ${(err as Error).message}`);
        break;
      }
      await new Promise((r) => setTimeout(r, Math.max(0, Math.min(options.changeEveryMs - (Date.now() - tick), stopAt - Date.now()))));
    }
  })();

  const workers = Array.from({ length: options.clients }, async (_, w) => {
    for (let i = w; Date.now() < stopAt; i++) await call(wheel[i % wheel.length]!);
  });
  await Promise.all([...workers, changer]);
  clearInterval(sampler);
  clearInterval(reporter);
  const elapsedMs = Date.now() - started;
  rss.end = rssOf(gateway.pid);
  if (Number.isNaN(rss.middle)) rss.middle = rss.start;
  const reloadsAfter = await gateway.reloads();

  await pool.close();
  const exitCode = await gateway.stop();
  await db.end();
  await new Promise<void>((resolve) => {
    upstream.close(() => resolve());
    upstream.closeAllConnections();
  });

  const sorted = Float64Array.from(latencies).sort();
  const growth = rss.end - rss.middle;
  if (Object.keys(unexpected).length > 0) failures.push(`unexpected answers: ${JSON.stringify(unexpected)}`);
  if (growth > options.maxRssGrowthBytes) failures.push(`gateway RSS grew ${(growth / MiB).toFixed(1)} MiB between the middle and the end (limit ${(options.maxRssGrowthBytes / MiB).toFixed(0)} MiB)`);
  if (exitCode !== 0) failures.push(`gateway exited ${exitCode} on SIGTERM`);
  if (requests === 0) failures.push('no requests completed');

  return {
    seconds: elapsedMs / 1000,
    clients: options.clients,
    requests,
    requestsPerSecond: Math.round((requests / elapsedMs) * 1000),
    answers,
    unexpected,
    latencyMs: { p50: round(percentile(sorted, 50)), p99: round(percentile(sorted, 99)), max: round(sorted[sorted.length - 1] ?? NaN) },
    catalogChanges: changes,
    catalogReloads: reloadsBefore !== undefined && reloadsAfter !== undefined ? reloadsAfter - reloadsBefore : undefined,
    rss,
    ok: failures.length === 0,
    failures,
  };
}

const round = (n: number) => Math.round(n * 100) / 100;

export function formatReport(r: SoakReport): string {
  const mb = (n: number) => `${(n / MiB).toFixed(1)} MiB`;
  return [
    `soak: ${r.seconds.toFixed(1)} s, ${r.clients} clients: ${r.requests} requests (${r.requestsPerSecond}/s)`,
    `  answers: ${Object.entries(r.answers).map(([k, v]) => `${k}: ${v}`).join(', ')}`,
    `  unexpected: ${Object.keys(r.unexpected).length === 0 ? 'none' : JSON.stringify(r.unexpected)}`,
    `  latency: p50 ${r.latencyMs.p50} ms, p99 ${r.latencyMs.p99} ms, max ${r.latencyMs.max} ms`,
    `  catalog: ${r.catalogChanges} changes, ${r.catalogReloads ?? '?'} reloads`,
    `  gateway RSS: start ${mb(r.rss.start)}, middle ${mb(r.rss.middle)}, end ${mb(r.rss.end)}, peak ${mb(r.rss.peak)} (middle -> end ${r.rss.end - r.rss.middle >= 0 ? '+' : ''}${mb(r.rss.end - r.rss.middle)})`,
    r.ok ? '  result: OK' : `  result: FAILED\n${r.failures.map((f) => `    - ${f}`).join('\n')}`,
  ].join('\n');
}

async function main(): Promise<number> {
  const usage = `usage: npm run soak [-- flags]
  --seconds N            how long the load runs (120)
  --clients N            concurrent keep-alive clients (12)
  --change-every-ms N    a catalog change this often (100)
  --max-rss-growth-mb N  RSS growth between the middle and the end that fails the soak (48)`;
  const values = parseFlags(
    {
      seconds: { type: 'string', default: '120' },
      clients: { type: 'string', default: '12' },
      'change-every-ms': { type: 'string', default: '100' },
      'max-rss-growth-mb': { type: 'string', default: '48' },
    },
    usage,
  );
  const num = (name: string, raw: string) => {
    const n = Number(raw);
    if (!Number.isFinite(n) || n <= 0) {
      process.stderr.write(`--${name} must be a positive number, got "${raw}"\n\n${usage}\n`);
      process.exit(2);
    }
    return n;
  };
  const seconds = num('seconds', values.seconds);
  const clients = Math.round(num('clients', values.clients));
  const changeEveryMs = num('change-every-ms', values['change-every-ms']);
  const maxRssGrowthBytes = num('max-rss-growth-mb', values['max-rss-growth-mb']) * MiB;

  let databaseUrl = process.env['DATABASE_URL'];
  let cleanup = async () => {};
  if (!databaseUrl) {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'pgstack-soak-'));
    await chmod(dir, 0o755); // as root the server runs as 'postgres', which must enter it
    const server = await startEmbeddedPostgres({ dir, port: await freePort(), log: () => {} });
    databaseUrl = server.databaseUrl;
    cleanup = async () => {
      await server.stop();
      await rm(dir, { recursive: true, force: true });
    };
    process.stdout.write(`soak: embedded PostgreSQL in ${dir}\n`);
  } else {
    // A database of its own on the given server, so the soak never rewrites someone's catalog.
    const name = `pgstack_soak_${randomBytes(4).toString('hex')}`;
    const admin = new pg.Client({ connectionString: databaseUrl });
    await admin.connect();
    await admin.query(`CREATE DATABASE ${name}`);
    await admin.end();
    const given = databaseUrl;
    const u = new URL(given);
    u.pathname = `/${name}`;
    databaseUrl = u.toString();
    cleanup = async () => {
      const a = new pg.Client({ connectionString: given });
      await a.connect();
      await a.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      await a.end();
    };
  }
  try {
    const report = await runSoak({ databaseUrl, seconds, clients, changeEveryMs, maxRssGrowthBytes, progress: (l) => process.stdout.write(`${l}\n`) });
    process.stdout.write(`${formatReport(report)}\n`);
    return report.ok ? 0 : 1;
  } finally {
    await cleanup();
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`soak: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
      process.exit(2);
    },
  );
}
