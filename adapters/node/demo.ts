/**
 * The demo function of the embedded default: examples/functions/hello-node run as a real
 * child process on 127.0.0.1, registered as `hello`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const SERVER = `${ROOT}examples/functions/hello-node/server.ts`;

export interface DemoFunction {
  readonly port: number;
  stop(): Promise<void>;
}

// `node --import tsx` keeps the function one process (the tsx CLI would fork a second one
// that a SIGTERM to the first does not always reach).
/**
 * A demo left running by a gateway that died without stopping it (SIGKILL): its pid is
 * kept in the state folder, and it is stopped before a new one starts. Only a process that
 * still runs this server is signalled (a reused pid is left alone).
 */
function stopLeftover(pidFile: string): void {
  let pid: number;
  try {
    pid = Number(readFileSync(pidFile, 'utf8').trim());
  } catch {
    return;
  }
  if (!Number.isInteger(pid) || pid <= 0) return;
  try {
    if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(SERVER)) return;
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone already, or not ours to signal
  }
}

/**
 * Starts the hello-node example on a free loopback port; rejects with its stderr if it dies.
 * Its pid is kept in `stateDir` while it runs.
 */
export function startDemoFunction(stateDir: string, timeoutMs = 20_000): Promise<DemoFunction> {
  const pidFile = path.join(stateDir, 'demo.pid');
  stopLeftover(pidFile);
  const child: ChildProcess = spawn(process.execPath, ['--import', import.meta.resolve('tsx'), SERVER], {
    env: { ...process.env, PORT: '0', HOST: '127.0.0.1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-4000);
  });
  if (child.pid !== undefined) writeFileSync(pidFile, `${child.pid}\n`);
  child.once('exit', () => rmSync(pidFile, { force: true }));
  const stop = () =>
    new Promise<void>((resolve) => {
      if (child.exitCode !== null || child.signalCode !== null) return resolve();
      child.once('exit', () => resolve());
      child.kill('SIGTERM');
      setTimeout(() => child.kill('SIGKILL'), 3_000).unref();
    });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      void stop();
      reject(new Error(`demo function did not start within ${timeoutMs} ms: ${stderr}`));
    }, timeoutMs);
    let stdout = '';
    child.stdout?.on('data', (d: Buffer) => {
      stdout += d.toString();
      const m = /listening on http:\/\/[^:\s]+:(\d+)/.exec(stdout);
      if (m) {
        clearTimeout(timer);
        child.stdout?.removeAllListeners('data');
        child.stdout?.resume();
        resolve({ port: Number(m[1]), stop });
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`demo function exited with code ${code}: ${stderr}`));
    });
  });
}
