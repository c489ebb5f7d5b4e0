/**
 * Helpers for the reliability tests: real upstream servers on loopback, a raw HTTP/1.1
 * client for the cases where framing matters, the gateway as a child process (to measure
 * its memory and send it signals), and bounded waiting.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { REPO_ROOT } from '../support/processes.ts';

export const SECRET = 'test-secret-that-is-long-enough-for-hs256-0123456789';

// ---------------------------------------------------------------------------------------
// Upstreams

export interface Upstream {
  readonly port: number;
  readonly server: http.Server | net.Server;
  close(): Promise<void>;
}

/** An HTTP upstream on `host` (default 127.0.0.1), port 0 unless given. */
export async function startHttpUpstream(handler: http.RequestListener, options: { host?: string; port?: number; keepAliveTimeoutMs?: number } = {}): Promise<Upstream & { server: http.Server }> {
  const server = http.createServer(handler);
  if (options.keepAliveTimeoutMs !== undefined) server.keepAliveTimeout = options.keepAliveTimeoutMs;
  await listen(server, options.port ?? 0, options.host ?? '127.0.0.1');
  return {
    port: (server.address() as net.AddressInfo).port,
    server,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

/** A TCP upstream that hands every connection to `onConnection` (for misbehaving servers). */
export async function startTcpUpstream(onConnection: (socket: net.Socket) => void, options: { host?: string; port?: number } = {}): Promise<Upstream & { sockets: Set<net.Socket> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => {});
    onConnection(socket);
  });
  await listen(server, options.port ?? 0, options.host ?? '127.0.0.1');
  return {
    port: (server.address() as net.AddressInfo).port,
    server,
    sockets,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

function listen(server: net.Server, port: number, host: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 client: one socket, responses parsed one after another.

export interface RawResponse {
  status: number;
  /** Header lines in order, names lowercased. */
  headers: Array<[string, string]>;
  body: Buffer;
  /** The body ended by its framing (Content-Length reached, last chunk, or none expected). */
  complete: boolean;
}

export function header(res: RawResponse, name: string): string | undefined {
  return res.headers.find(([n]) => n === name)?.[1];
}

export function headerAll(res: RawResponse, name: string): string[] {
  return res.headers.filter(([n]) => n === name).map(([, v]) => v);
}

export class RawClient {
  readonly socket: net.Socket;
  private buf: Buffer = Buffer.alloc(0);
  private ended = false;
  /** The socket saw an error (ECONNRESET, ...). */
  error: Error | undefined;
  private wake: (() => void) | undefined;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (d: Buffer) => {
      this.buf = this.buf.length === 0 ? d : Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    socket.on('end', () => {
      this.ended = true;
      this.wake?.();
    });
    socket.on('close', () => {
      this.ended = true;
      this.wake?.();
    });
    socket.on('error', (err) => {
      this.error = err;
      this.ended = true;
      this.wake?.();
    });
  }

  /** `allowHalfOpen`: keep writing after the server's FIN (a client that goes on sending). */
  static connect(port: number, host = '127.0.0.1', options: { allowHalfOpen?: boolean } = {}): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ port, host, allowHalfOpen: options.allowHalfOpen ?? false });
      socket.once('connect', () => {
        socket.off('error', reject);
        resolve(new RawClient(socket));
      });
      socket.once('error', reject);
    });
  }

  /** Whether the peer closed (or the socket failed). */
  get closed(): boolean {
    return this.ended;
  }

  write(data: string | Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.socket.destroyed) return reject(new Error('socket destroyed'));
      this.socket.write(data, (err) => (err ? reject(err) : resolve()));
    });
  }

  private async more(deadline: number): Promise<boolean> {
    if (this.ended) return false;
    const left = deadline - Date.now();
    if (left <= 0) throw new Error('raw client: timed out waiting for the response');
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, left);
      this.wake = () => {
        clearTimeout(timer);
        this.wake = undefined;
        resolve();
      };
    });
    return true;
  }

  /** Waits until the peer closes the connection (bounded). */
  async waitClosed(timeoutMs = 5_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.ended) await this.more(deadline);
  }

  /**
   * Reads one response (an interim 1xx too). `head: true` for a response to HEAD (no body).
   * A body cut short by the peer closing is returned with complete: false.
   */
  async read(options: { head?: boolean; timeoutMs?: number } = {}): Promise<RawResponse> {
    const deadline = Date.now() + (options.timeoutMs ?? 10_000);
    let end: number;
    while ((end = this.buf.indexOf('\r\n\r\n')) < 0) {
      if (!(await this.more(deadline)) && this.buf.indexOf('\r\n\r\n') < 0) {
        throw new Error(`raw client: connection closed before a response head${this.error ? ` (${this.error.message})` : ''}; got ${JSON.stringify(this.buf.toString('latin1').slice(0, 200))}`);
      }
    }
    const lines = this.buf.subarray(0, end).toString('latin1').split('\r\n');
    this.buf = this.buf.subarray(end + 4);
    const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(lines[0] ?? '')?.[1]);
    const headers = lines.slice(1).map((l): [string, string] => {
      const i = l.indexOf(':');
      return [l.slice(0, i).trim().toLowerCase(), l.slice(i + 1).trim()];
    });
    const res: RawResponse = { status, headers, body: Buffer.alloc(0), complete: true };
    if (options.head || status < 200 || status === 204 || status === 304) return res;
    const te = header(res, 'transfer-encoding');
    const cl = header(res, 'content-length');
    const parts: Buffer[] = [];
    if (te && /chunked/i.test(te)) {
      for (;;) {
        let lineEnd: number;
        while ((lineEnd = this.buf.indexOf('\r\n')) < 0) {
          if (!(await this.more(deadline))) return { ...res, body: Buffer.concat(parts), complete: false };
        }
        const size = Number.parseInt(this.buf.subarray(0, lineEnd).toString('latin1'), 16);
        if (size === 0) {
          // The last chunk: optional trailer lines, then an empty line.
          let trailerEnd: number;
          while ((trailerEnd = this.buf.indexOf('\r\n\r\n', lineEnd)) < 0) {
            if (!(await this.more(deadline))) return { ...res, body: Buffer.concat(parts), complete: false };
          }
          this.buf = this.buf.subarray(trailerEnd + 4);
          return { ...res, body: Buffer.concat(parts) };
        }
        while (this.buf.length < lineEnd + 2 + size + 2) {
          if (!(await this.more(deadline))) {
            parts.push(this.buf.subarray(lineEnd + 2));
            this.buf = Buffer.alloc(0);
            return { ...res, body: Buffer.concat(parts), complete: false };
          }
        }
        parts.push(this.buf.subarray(lineEnd + 2, lineEnd + 2 + size));
        this.buf = this.buf.subarray(lineEnd + 2 + size + 2);
      }
    }
    if (cl !== undefined) {
      const n = Number(cl);
      while (this.buf.length < n) {
        if (!(await this.more(deadline))) {
          const got = this.buf;
          this.buf = Buffer.alloc(0);
          return { ...res, body: got, complete: false };
        }
      }
      const body = this.buf.subarray(0, n);
      this.buf = this.buf.subarray(n);
      return { ...res, body };
    }
    // Read until close: complete only on a clean close (FIN), not an error.
    while (await this.more(deadline));
    const body = this.buf;
    this.buf = Buffer.alloc(0);
    return { ...res, body, complete: this.error === undefined };
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** `GET path` (or another method) as raw request text, with a Host header. */
export function requestText(method: string, target: string, headers: Record<string, string> = {}, body = ''): string {
  const lines = [`${method} ${target} HTTP/1.1`, 'Host: gateway.test'];
  for (const [k, v] of Object.entries(headers)) lines.push(`${k}: ${v}`);
  return `${lines.join('\r\n')}\r\n\r\n${body}`;
}

// ---------------------------------------------------------------------------------------
// The gateway as a child process (`node bin/pgstack.js serve`).

export interface ChildGateway {
  readonly pid: number;
  readonly port: number;
  readonly url: string;
  readonly child: ChildProcess;
  /** Parsed JSON log lines so far. */
  readonly logs: Array<Record<string, unknown>>;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** SIGKILL if still running. */
  kill(): Promise<void>;
}

export async function spawnGateway(env: Record<string, string>, options: { readyTimeoutMs?: number } = {}): Promise<ChildGateway> {
  const child = spawn(process.execPath, [path.join(REPO_ROOT, 'bin', 'pgstack.js'), 'serve'], {
    cwd: REPO_ROOT,
    env: { PATH: process.env['PATH'] ?? '', HOME: process.env['HOME'] ?? '/tmp', JWT_SECRET: SECRET, PORT: '0', HOST: '127.0.0.1', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: Array<Record<string, unknown>> = [];
  let stderr = '';
  let partial = '';
  child.stdout!.setEncoding('utf8');
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (d: string) => (stderr = (stderr + d).slice(-8_000)));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`gateway child not listening in time\n${stderr}`)), options.readyTimeoutMs ?? 30_000);
    child.stdout!.on('data', (d: string) => {
      const lines = (partial + d).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) {
        let entry: Record<string, unknown>;
        try {
          entry = JSON.parse(line) as Record<string, unknown>;
        } catch {
          continue;
        }
        logs.push(entry);
        if (entry['msg'] === 'listening') {
          clearTimeout(timer);
          resolve(Number(/:(\d+)$/.exec(String(entry['url']))?.[1]));
        }
      }
    });
    void exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`gateway child exited (code ${code}, signal ${signal}) before listening\n${stderr}`));
    });
  });
  return {
    pid: child.pid!,
    port,
    url: `http://127.0.0.1:${port}`,
    child,
    logs,
    exited,
    async kill() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await exited;
      }
    },
  };
}

/** VmRSS and VmHWM of a process, in bytes (Linux /proc). */
export function memoryOf(pid: number): { rss: number; hwm: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN) * 1024;
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

// ---------------------------------------------------------------------------------------

/** Polls `check` until it returns true, or throws after `timeoutMs`. */
export async function until(check: () => Promise<boolean> | boolean, timeoutMs = 10_000, everyMs = 20, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`${what} not met within ${timeoutMs} ms`);
    await sleep(everyMs);
  }
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** Rejects after `ms` unless `promise` settles first. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
    }),
  ]);
}

/** A gateway error body has exactly {code, message} and nothing else. */
export function expectGatewayErrorBody(body: string): { code: string; message: string } {
  const parsed = JSON.parse(body) as Record<string, unknown>;
  if (Object.keys(parsed).sort().join(',') !== 'code,message') throw new Error(`gateway error body has extra keys: ${body}`);
  return parsed as { code: string; message: string };
}
