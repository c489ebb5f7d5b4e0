// Start the reference functions in examples/functions/ as real child processes.
// Used by test/examples.test.ts and by the gateway integration tests (as upstreams).
import { spawn, execFile } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { accessSync, constants, existsSync, mkdirSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export type ExampleKind = 'go' | 'node' | 'python';

export interface RunningExample {
  kind: ExampleKind;
  /** The real bound port (the examples are started with PORT=0 unless env overrides it). */
  port: number;
  /** Base URL without trailing slash, e.g. http://127.0.0.1:41234 */
  url: string;
  pid: number;
  /** Resolves when the child exits (after stop() or on its own). */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** What the child printed so far (tails, for debugging failures). */
  output(): { stdout: string; stderr: string };
  /** SIGTERM the child's process group, SIGKILL after 5 s, and wait for exit. Idempotent. */
  stop(): Promise<void>;
}

export const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
export const EXAMPLES_DIR = path.join(REPO_ROOT, 'examples', 'functions');
const TSX_CLI = path.join(REPO_ROOT, 'node_modules', 'tsx', 'dist', 'cli.mjs');
const READY_TIMEOUT_MS = 20_000;
const BUILD_TIMEOUT_MS = 180_000;
const STOP_GRACE_MS = 5_000;
const TAIL_CHARS = 64 * 1024;
const READY_LINE = /^listening on http:\/\/(\[[^\]]+\]|[^\s:]+):(\d+)\s*$/;

/** Absolute path of the `go` binary: $GO_BIN, then PATH, then /usr/local/go/bin/go. */
export function findGo(): string | null {
  const candidates = [
    ...(process.env.GO_BIN ? [process.env.GO_BIN] : []),
    ...(process.env.PATH ?? '').split(path.delimiter).filter(Boolean).map((dir) => path.join(dir, 'go')),
    '/usr/local/go/bin/go',
  ];
  for (const candidate of candidates) {
    try {
      accessSync(candidate, constants.X_OK);
      if (statSync(candidate).isFile()) return candidate;
    } catch {
      // not here
    }
  }
  return null;
}

export function hasGo(): boolean {
  return findGo() !== null;
}

let goBuild: Promise<string> | undefined;

/**
 * Build hello-go once per process into a cache under os.tmpdir(), keyed by the source files and the
 * go binary, so parallel workers and later runs reuse it (written to a temp name, then renamed).
 */
export function buildGoExample(): Promise<string> {
  goBuild ??= doBuildGo();
  goBuild.catch(() => (goBuild = undefined)); // let a later call retry after a failure
  return goBuild;
}

async function doBuildGo(): Promise<string> {
  const go = findGo();
  if (!go) throw new Error('go not found on PATH (install golang-go): cannot build examples/functions/hello-go');
  const src = path.join(EXAMPLES_DIR, 'hello-go');
  const hash = createHash('sha256');
  for (const file of ['go.mod', 'main.go']) hash.update(file).update(readFileSync(path.join(src, file)));
  hash.update(go).update(String(statSync(go).mtimeMs));
  const dir = path.join(os.tmpdir(), 'pgstack-examples', `hello-go-${hash.digest('hex').slice(0, 16)}`);
  const bin = path.join(dir, 'hello-go');
  if (existsSync(bin)) return bin;
  mkdirSync(dir, { recursive: true });
  const tmp = `${bin}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  const env: NodeJS.ProcessEnv = { ...process.env, CGO_ENABLED: '0', GOTOOLCHAIN: 'local', GOPROXY: 'off', GOFLAGS: '' };
  // `go` refuses to run without a cache dir; HOME may be unset in CI sandboxes.
  if (!env.GOCACHE && !env.HOME && !env.XDG_CACHE_HOME) env.GOCACHE = path.join(os.tmpdir(), 'pgstack-examples', 'go-cache');
  if (!env.GOPATH && !env.HOME) env.GOPATH = path.join(os.tmpdir(), 'pgstack-examples', 'gopath');
  await new Promise<void>((resolve, reject) => {
    execFile(go, ['build', '-trimpath', '-o', tmp, '.'], { cwd: src, env, timeout: BUILD_TIMEOUT_MS }, (err, stdout, stderr) => {
      if (err) {
        rmSync(tmp, { force: true });
        reject(new Error(`go build of hello-go failed: ${err.message}\n${stdout}${stderr}`));
      } else resolve();
    });
  });
  renameSync(tmp, bin);
  return bin;
}

async function commandFor(kind: ExampleKind): Promise<{ cmd: string; args: string[] }> {
  switch (kind) {
    case 'go':
      return { cmd: await buildGoExample(), args: [] };
    case 'node':
      return { cmd: process.execPath, args: [TSX_CLI, path.join(EXAMPLES_DIR, 'hello-node', 'server.ts')] };
    case 'python':
      return { cmd: process.env.PYTHON || 'python3', args: ['-u', path.join(EXAMPLES_DIR, 'hello-python', 'server.py')] };
    default:
      throw new Error(`unknown example kind: ${String(kind)}`);
  }
}

// Children run in their own process group (tsx forks a grandchild); kill groups on exit as a last resort.
const live = new Set<ChildProcess>();
let exitHookInstalled = false;

function killGroup(child: ChildProcess, signal: NodeJS.Signals): void {
  if (child.pid === undefined) return;
  try {
    process.kill(-child.pid, signal);
  } catch {
    try {
      child.kill(signal);
    } catch {
      // already gone
    }
  }
}

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const child of live) killGroup(child, 'SIGKILL');
  });
}

const tail = (s: string): string => (s.length > TAIL_CHARS ? s.slice(-TAIL_CHARS) : s);

/**
 * Start examples/functions/hello-{kind} on 127.0.0.1 with PORT=0 (override with env) and resolve
 * once it printed `listening on http://HOST:PORT`. Rejects (with the child's output) if it exits
 * early, fails to spawn or is not ready within 20 s.
 */
export async function startExample(kind: ExampleKind, env: Record<string, string> = {}): Promise<RunningExample> {
  const { cmd, args } = await commandFor(kind);
  installExitHook();
  const child = spawn(cmd, args, {
    cwd: REPO_ROOT,
    env: { ...process.env, HOST: '127.0.0.1', PORT: '0', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true, // own process group, so stop() also reaches tsx's child
  });
  live.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8');
  child.stderr!.setEncoding('utf8');
  // Keep draining both pipes for the child's whole life, or it blocks once a pipe fills.
  child.stdout!.on('data', (chunk: string) => (stdout = tail(stdout + chunk)));
  child.stderr!.on('data', (chunk: string) => (stderr = tail(stderr + chunk)));

  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => {
      live.delete(child);
      resolve({ code, signal });
    });
  });
  const describeOutput = (): string =>
    `\n--- stderr ---\n${stderr.trim() || '(empty)'}\n--- stdout ---\n${stdout.trim() || '(empty)'}`;

  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      if (child.exitCode === null && child.signalCode === null) {
        killGroup(child, 'SIGTERM');
        const timer = setTimeout(() => killGroup(child, 'SIGKILL'), STOP_GRACE_MS);
        await exited;
        clearTimeout(timer);
      }
      killGroup(child, 'SIGKILL'); // mop up anything left in the group (ESRCH is ignored)
    })();
    return stopping;
  };

  let ready: { host: string; port: number };
  try {
    ready = await new Promise<{ host: string; port: number }>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`hello-${kind} did not print "listening on" within ${READY_TIMEOUT_MS} ms${describeOutput()}`)),
        READY_TIMEOUT_MS,
      );
      const onData = (): void => {
        for (const line of stdout.split('\n')) {
          const m = READY_LINE.exec(line);
          if (m) {
            clearTimeout(timer);
            child.stdout!.off('data', onData);
            resolve({ host: m[1]!, port: Number(m[2]) });
            return;
          }
        }
      };
      child.stdout!.on('data', onData);
      child.once('error', (err) => {
        clearTimeout(timer);
        reject(new Error(`failed to spawn hello-${kind} (${cmd}): ${err.message}`));
      });
      // 'close' (not 'exit'): by then the pipes are drained, so the error carries all of stderr.
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`hello-${kind} exited early (code ${code}, signal ${signal})${describeOutput()}`));
      });
    });
  } catch (err) {
    await stop();
    throw err;
  }

  const host = ready.host === '0.0.0.0' ? '127.0.0.1' : ready.host === '[::]' ? '[::1]' : ready.host;
  return {
    kind,
    port: ready.port,
    url: `http://${host}:${ready.port}`,
    pid: child.pid!,
    exited,
    output: () => ({ stdout, stderr }),
    stop,
  };
}
