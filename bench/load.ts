/**
 * The load generators: wrk when installed (one thread, a Lua script written to a temp
 * file), else autocannon in a child process. Both send the same 200-byte JSON POST with a
 * Bearer token, either one fixed token or a different token on every request.
 */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface LoadSpec {
  readonly url: string;
  readonly connections: number;
  readonly seconds: number;
  readonly body: string;
  /** The Bearer token of every request... */
  readonly token: string;
  /** ...unless this file (one token a line) is given: then each request takes the next one. */
  readonly tokensFile?: string | undefined;
}

export interface LoadResult {
  readonly requests: number;
  readonly rps: number;
  readonly p50Ms: number;
  readonly p99Ms: number;
  /** Socket errors, timeouts and non-2xx answers. */
  readonly errors: number;
}

export interface LoadGenerator {
  readonly name: string;
  run(spec: LoadSpec): Promise<LoadResult>;
}

/** A 200-byte JSON body. */
export function body200(): string {
  const head = '{"event":"bench","padding":"';
  const tail = '"}';
  return head + 'x'.repeat(200 - head.length - tail.length) + tail;
}

function luaString(s: string): string {
  return JSON.stringify(s); // the body and tokens are plain ASCII: JSON quoting is valid Lua
}

function wrkScript(spec: LoadSpec): string {
  const lines = [
    'wrk.method = "POST"',
    `wrk.body = ${luaString(spec.body)}`,
    'wrk.headers["Content-Type"] = "application/json"',
    `wrk.headers["Authorization"] = ${luaString(`Bearer ${spec.token}`)}`,
  ];
  if (spec.tokensFile) {
    lines.push(
      'local tokens = {}',
      `for line in io.lines(${luaString(spec.tokensFile)}) do tokens[#tokens + 1] = line end`,
      'local i = 0',
      'request = function()',
      '  i = i + 1',
      '  wrk.headers["Authorization"] = "Bearer " .. tokens[(i % #tokens) + 1]',
      '  return wrk.format()',
      'end',
    );
  }
  return lines.join('\n') + '\n';
}

function parseDuration(text: string): number {
  const m = /^([\d.]+)(us|ms|s|m)$/.exec(text.trim());
  if (!m) return NaN;
  const n = Number(m[1]);
  return m[2] === 'us' ? n / 1000 : m[2] === 'ms' ? n : m[2] === 's' ? n * 1000 : n * 60_000;
}

/** Runs a command to completion and returns its stdout (rejects on a non-zero exit). */
function capture(command: string, args: string[], register: Register): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const release = register(child.pid ?? -1);
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d));
    child.stderr.on('data', (d: Buffer) => (err += d));
    child.on('error', (e) => {
      release();
      reject(e);
    });
    child.on('close', (code) => {
      release();
      if (code === 0) resolve(out);
      else reject(new Error(`${command} exited ${code}: ${err.trim() || out.trim()}`));
    });
  });
}

/** Wraps a command line so it runs pinned to the load generator's CPU (or unchanged). */
export type Pin = (command: string, args: string[]) => [string, string[]];
/** Tracks a child so the orchestrator can kill it on error; returns the release callback. */
export type Register = (pid: number) => () => void;

export function wrk(pin: Pin, tmpDir: string, register: Register): LoadGenerator {
  let scripts = 0;
  return {
    name: 'wrk',
    async run(spec) {
      const script = join(tmpDir, `load-${++scripts}.lua`);
      writeFileSync(script, wrkScript(spec));
      const args = ['-t1', `-c${spec.connections}`, `-d${spec.seconds}s`, '--latency', '-s', script, spec.url];
      const out = await capture(...pin('wrk', args), register);
      const total = /(\d+) requests in/.exec(out);
      const rps = /Requests\/sec:\s+([\d.]+)/.exec(out);
      const p50 = /\s50%\s+(\S+)/.exec(out);
      const p99 = /\s99%\s+(\S+)/.exec(out);
      const non2xx = /Non-2xx or 3xx responses:\s+(\d+)/.exec(out);
      const socket = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out);
      if (!total || !rps || !p50 || !p99) throw new Error(`cannot parse wrk output:\n${out}`);
      const socketErrors = socket ? socket.slice(1).reduce((n, v) => n + Number(v), 0) : 0;
      return {
        requests: Number(total[1]),
        rps: Number(rps[1]),
        p50Ms: parseDuration(p50[1] ?? ''),
        p99Ms: parseDuration(p99[1] ?? ''),
        errors: Number(non2xx?.[1] ?? 0) + socketErrors,
      };
    },
  };
}

export function autocannonChild(pin: Pin, register: Register): LoadGenerator {
  const runTs = fileURLToPath(new URL('../bin/run-ts.js', import.meta.url));
  const script = fileURLToPath(new URL('./load-autocannon.ts', import.meta.url));
  return {
    name: 'autocannon',
    async run(spec) {
      const out = await capture(...pin(process.execPath, [runTs, script, JSON.stringify(spec)]), register);
      return JSON.parse(out.trim().split('\n').pop() ?? '{}') as LoadResult;
    },
  };
}
