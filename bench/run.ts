/**
 * `npm run bench`: requests/s and latency of the gateway and of peer proxies in front of one
 * upstream, in one run, as DESIGN section 8 measures them.
 *
 *   upstream (node:http)            CPU 1  started once, shared by every row
 *   load generator (wrk|autocannon) CPU 1  one thread, N connections, 200-byte JSON POST
 *   the proxy under test            CPU 0  a child process of its own, one row at a time
 *
 * Flags: --seconds N (10), --warmup N (5; an unmeasured run first), --connections N (32),
 * --rounds N (1; rows interleaved, the median kept), --only a,b (row ids), --cpu-prof DIR
 * (profile the Node children, one folder a row), --autocannon (even when wrk is installed).
 * Every child is killed at the end, on error and on Ctrl-C.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { availableParallelism, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { mintToken } from '../adapters/node/tokens.ts';
import { parseFlags, wholeFlag } from './flags.ts';
import { autocannonChild, body200, wrk, type LoadGenerator, type LoadResult, type Pin } from './load.ts';

const USAGE = `usage: npm run bench [-- flags]
  --seconds N       measured seconds per row (10)
  --warmup N        unmeasured seconds before each row (5; 0 for none)
  --connections N   concurrent connections of the load generator (32)
  --rounds N        run the rows N times interleaved and keep each row's median (1)
  --only a,b        rows by id: ${'gateway, gateway-fresh, http-proxy, undici, nginx, naive'}
  --cpu-prof DIR    write a CPU profile of each Node proxy under DIR
  --autocannon      use autocannon even when wrk is installed`;

const flags = parseFlags(
  {
    seconds: { type: 'string', default: '10' },
    warmup: { type: 'string', default: '5' },
    connections: { type: 'string', default: '32' },
    rounds: { type: 'string', default: '1' },
    only: { type: 'string' },
    'cpu-prof': { type: 'string' },
    autocannon: { type: 'boolean', default: false },
  },
  USAGE,
);
const seconds = wholeFlag('seconds', flags.seconds, 1, USAGE);
const warmup = wholeFlag('warmup', flags.warmup, 0, USAGE);
const connections = wholeFlag('connections', flags.connections, 1, USAGE);
const rounds = wholeFlag('rounds', flags.rounds, 1, USAGE);

const root = fileURLToPath(new URL('..', import.meta.url));
const runTs = join(root, 'bin/run-ts.js');
const tmp = mkdtempSync(join(tmpdir(), 'pgstack-bench-'));
const secret = randomBytes(32).toString('base64url');
/** Enough distinct tokens that a 10,000-entry FIFO cache never holds the next one. */
const FRESH_TOKENS = 20_000;

// ---------------------------------------------------------------------------------------
// Children: tracked from spawn to exit, all killed on the way out.

const children = new Set<number>();
function track(pid: number): () => void {
  children.add(pid);
  return () => children.delete(pid);
}
function killAll(): void {
  for (const pid of children) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  children.clear();
}
process.on('exit', () => {
  killAll();
  rmSync(tmp, { recursive: true, force: true });
});
for (const signal of ['SIGINT', 'SIGTERM'] as const) process.on(signal, () => process.exit(130));

const has = (command: string): boolean => spawnSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' }).status === 0;
const pinning = has('taskset') && availableParallelism() >= 2;
const pinTo =
  (cpu: number): Pin =>
  (command, args) =>
    pinning ? ['taskset', ['-c', String(cpu), command, ...args]] : [command, args];
const onProxyCpu = pinTo(0);
const onLoadCpu = pinTo(1);

interface Started {
  readonly port: number;
  readonly child: ChildProcess;
  stop(): Promise<void>;
}

/** Starts a child, waits for `READY <port>` on its stderr (or a TCP port to accept). */
function startChild(label: string, command: string, args: string[], waitPort?: number): Promise<Started> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(command, args, { cwd: root, stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env } });
    const release = track(child.pid ?? -1);
    let stderr = '';
    let settled = false;
    const exited = new Promise<void>((r) => child.once('exit', () => r()));
    const started = (port: number): void => {
      if (settled) return;
      settled = true;
      resolvePromise({
        port,
        child,
        async stop() {
          if (child.exitCode === null && child.signalCode === null) {
            child.kill('SIGTERM');
            const timer = setTimeout(() => child.kill('SIGKILL'), 5_000);
            await exited;
            clearTimeout(timer);
          }
          release();
        },
      });
    };
    const fail = (why: string): void => {
      if (settled) return;
      settled = true;
      child.kill('SIGKILL');
      release();
      reject(new Error(`${label}: ${why}${stderr ? `\n${stderr.trim()}` : ''}`));
    };
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk;
      const m = /READY (\d+)/.exec(stderr);
      if (m) started(Number(m[1]));
    });
    child.once('error', (err) => fail(err.message));
    child.once('exit', (code, signal) => fail(`exited early (${signal ?? code})`));
    const timer = setTimeout(() => fail('did not start within 30 s'), 30_000);
    timer.unref();
    if (waitPort !== undefined) {
      const poll = (): void => {
        if (settled) return;
        const req = httpRequest({ host: '127.0.0.1', port: waitPort, path: '/', method: 'HEAD' }, (res) => {
          res.resume();
          started(waitPort);
        });
        req.on('error', () => setTimeout(poll, 50));
        req.end();
      };
      poll();
    }
  });
}

function node(script: string, nodeFlags: string[] = []): [string, string[]] {
  return [process.execPath, [...nodeFlags, runTs, join(root, script)]];
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

function rssMiB(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** CPU time (user + system) a process has used, in ms, from /proc (Linux). */
function cpuMs(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // utime and stime are fields 14 and 15 of stat(5), in clock ticks (100 Hz on Linux).
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
  } catch {
    return undefined;
  }
}

/** One request through the proxy before the load: the row is skipped if this is not a 200. */
function probe(port: number, token: string, body: string): Promise<string | undefined> {
  return new Promise((done) => {
    const req = httpRequest(
      {
        host: '127.0.0.1',
        port,
        path: '/functions/v1/bench',
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        let text = '';
        res.on('data', (d: Buffer) => (text += d));
        res.on('end', () => done(res.statusCode === 200 && text.includes('bench-upstream') ? undefined : `probe answered ${res.statusCode}: ${text.slice(0, 200)}`));
      },
    );
    req.on('error', (err) => done(`probe failed: ${err.message}`));
    req.end(body);
  });
}

// ---------------------------------------------------------------------------------------
// The rows.

interface Row {
  readonly id: string;
  readonly label: string;
  readonly fresh?: boolean;
  start(upstreamPort: number): Promise<Started> | undefined;
}

const profileFlags = (id: string): string[] => {
  if (!flags['cpu-prof']) return [];
  // One folder a row: node names each thread's profile itself (tsx's loader runs in a worker).
  return ['--cpu-prof', '--cpu-prof-dir', join(resolve(flags['cpu-prof']), id)];
};

const nginxAvailable = has('nginx');
/** The gateway child; BENCH_GATEWAY_SCRIPT swaps in a variant for A/B experiments. */
const gatewayScript = process.env['BENCH_GATEWAY_SCRIPT'] ?? 'bench/peers/gateway.ts';

const ROWS: Row[] = [
  { id: 'gateway', label: 'gateway (jwt+identity)', start: () => startChild('gateway', ...onProxyCpu(...node(gatewayScript, profileFlags('gateway')))) },
  {
    id: 'gateway-fresh',
    label: 'gateway (fresh jwt/request)',
    fresh: true,
    start: () => startChild('gateway', ...onProxyCpu(...node(gatewayScript, profileFlags('gateway-fresh')))),
  },
  { id: 'http-proxy', label: 'node-http-proxy', start: () => startChild('node-http-proxy', ...onProxyCpu(...node('bench/peers/http-proxy.ts', profileFlags('http-proxy')))) },
  { id: 'undici', label: 'node:http + undici', start: () => startChild('node:http + undici', ...onProxyCpu(...node('bench/peers/undici-proxy.ts', profileFlags('undici')))) },
  {
    id: 'nginx',
    label: 'nginx',
    start: (upstreamPort) => {
      if (!nginxAvailable) return undefined;
      return (async () => {
        const port = await freePort();
        const prefix = join(tmp, 'nginx');
        const conf = join(prefix, 'nginx.conf');
        mkdirSync(join(prefix, 'logs'), { recursive: true });
        mkdirSync(join(prefix, 'tmp'), { recursive: true });
        writeFileSync(conf, nginxConf(prefix, port, upstreamPort));
        return startChild('nginx', ...onProxyCpu('nginx', ['-p', prefix, '-c', conf]), port);
      })();
    },
  },
  { id: 'naive', label: 'naive (whatwg + fetch + jose)', start: () => startChild('naive', ...onProxyCpu(...node('bench/peers/naive.ts', profileFlags('naive')))) },
];
const BASELINE = 'http-proxy';

/** One process, one worker thread of work: nginx pinned to the proxy CPU like the others. */
function nginxConf(prefix: string, port: number, upstreamPort: number): string {
  return `
daemon off;
master_process off;
worker_processes 1;
pid ${prefix}/nginx.pid;
error_log ${prefix}/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path ${prefix}/tmp/body;
  proxy_temp_path ${prefix}/tmp/proxy;
  fastcgi_temp_path ${prefix}/tmp/fastcgi;
  uwsgi_temp_path ${prefix}/tmp/uwsgi;
  scgi_temp_path ${prefix}/tmp/scgi;
  upstream bench { server 127.0.0.1:${upstreamPort}; keepalive 128; }
  server {
    listen 127.0.0.1:${port};
    location / {
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
`;
}

// ---------------------------------------------------------------------------------------

interface Measured {
  result: LoadResult;
  rssMiB: number | undefined;
  /** The proxy's CPU time per request in µs: steadier than req/s on a busy machine. */
  cpuUs: number | undefined;
}

const fmtInt = (n: number): string => Math.round(n).toLocaleString('en-US');
const fmtMs = (n: number): string => (n < 10 ? n.toFixed(2) : n.toFixed(1)) + 'ms';

async function main(): Promise<void> {
  const selected = flags.only ? ROWS.filter((r) => flags.only!.split(',').includes(r.id)) : ROWS;
  if (selected.length === 0) throw new Error(`--only matches no row; rows: ${ROWS.map((r) => r.id).join(', ')}`);
  const load: LoadGenerator = has('wrk') && !flags.autocannon ? wrk(onLoadCpu, tmp, track) : autocannonChild(onLoadCpu, track);

  const body = body200();
  const token = await mintToken(secret, { role: 'authenticated', sub: 'bench-user', expiresIn: '1h', claims: { email: 'bench@example.com' } });
  let tokensFile: string | undefined;
  if (selected.some((r) => r.fresh)) {
    const tokens: string[] = [];
    for (let i = 0; i < FRESH_TOKENS; i++) tokens.push(await mintToken(secret, { role: 'authenticated', sub: `bench-user-${i}`, expiresIn: '1h' }));
    tokensFile = join(tmp, 'tokens.txt');
    writeFileSync(tokensFile, tokens.join('\n') + '\n');
  }

  process.env['BENCH_JWT_SECRET'] = secret;
  const upstream = await startChild('upstream', ...onLoadCpu(...node('bench/peers/upstream.ts')));
  process.env['BENCH_UPSTREAM_PORT'] = String(upstream.port);

  console.log(
    `pgstack bench: ${load.name}, ${connections} connections, 200-byte POST, ${warmup ? `${warmup} s warmup + ` : ''}${seconds} s per row` +
      `${rounds > 1 ? `, median of ${rounds} rounds` : ''}, ` +
      (pinning ? 'proxy pinned to CPU 0, load + upstream to CPU 1' : 'no CPU pinning (taskset or a second CPU missing)'),
  );
  if (!nginxAvailable && selected.some((r) => r.id === 'nginx')) console.log('nginx: not installed, skipped');

  const results = new Map<string, Measured[]>();
  for (let round = 0; round < rounds; round++) {
    for (const row of selected) {
      const pending = row.start(upstream.port);
      if (!pending) continue;
      const proxy = await pending;
      try {
        const problem = await probe(proxy.port, token, body);
        if (problem) {
          console.log(`${row.label}: ${problem}; skipped`);
          continue;
        }
        const spec = { url: `http://127.0.0.1:${proxy.port}/functions/v1/bench`, connections, body, token, tokensFile: row.fresh ? tokensFile : undefined };
        if (warmup > 0) await load.run({ ...spec, seconds: warmup });
        const cpuBefore = cpuMs(proxy.child.pid);
        const result = await load.run({ ...spec, seconds });
        const cpuAfter = cpuMs(proxy.child.pid);
        const cpuUs = cpuBefore !== undefined && cpuAfter !== undefined && result.requests > 0 ? ((cpuAfter - cpuBefore) * 1000) / result.requests : undefined;
        const measured = { result, rssMiB: rssMiB(proxy.child.pid), cpuUs };
        results.set(row.id, [...(results.get(row.id) ?? []), measured]);
        if (rounds > 1) console.log(`  round ${round + 1}: ${row.label} ${fmtInt(result.rps)} req/s`);
      } finally {
        await proxy.stop();
      }
    }
  }
  await upstream.stop();

  const median = (runs: Measured[]): Measured => [...runs].sort((a, b) => a.result.rps - b.result.rps)[Math.floor(runs.length / 2)]!;
  const baseline = results.get(BASELINE);
  const base = baseline ? median(baseline).result.rps : undefined;
  const width = Math.max(...selected.map((r) => r.label.length));
  console.log('');
  for (const row of selected) {
    const runs = results.get(row.id);
    if (!runs) continue;
    const { result, rssMiB: rss, cpuUs } = median(runs);
    const ratio = base && row.id !== BASELINE ? `  x${(result.rps / base).toFixed(2)} vs node-http-proxy` : '';
    const errors = result.errors ? `  (${fmtInt(result.errors)} errors!)` : '';
    const memory = rss !== undefined ? `  rss ${rss.toFixed(0).padStart(3)}MiB` : '';
    const cpu = cpuUs !== undefined ? `  cpu ${cpuUs.toFixed(0).padStart(4)}us/req` : '';
    console.log(
      `${row.label.padEnd(width)}  ${fmtInt(result.rps).padStart(7)} req/s  p50 ${fmtMs(result.p50Ms).padStart(7)} p99 ${fmtMs(result.p99Ms).padStart(7)}${cpu}${memory}${ratio}${errors}`,
    );
  }
}

try {
  await main();
} catch (err) {
  console.error(err instanceof Error ? err.message : err);
  process.exitCode = 1;
} finally {
  killAll();
}
