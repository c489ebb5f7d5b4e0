/**
 * examples/embed: the core embedded with a static catalog and fetch() as the forwarder, as
 * README's "Embedding the core" shows it. The upstream is the real hello-node example; the
 * only stand-in is name resolution: a compose network would resolve `hello`, here a fetch
 * wrapper dials 127.0.0.1 for it (the request, headers and body are fetch()'s own).
 */
import { execFile, spawn } from 'node:child_process';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { SignJWT } from 'jose';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Gateway } from '../core/index.ts';
import { createEmbeddedGateway } from '../examples/embed/embed.ts';
import { freePort } from '../adapters/node/embedded.ts';
import { TEST_SECRET } from './support/gateway.ts';
import { REPO_ROOT, startExample, type RunningExample } from './support/processes.ts';

let hello: RunningExample;
let odd: http.Server;
let oddPort: number;
let gateway: Gateway;
const logged: string[] = [];

/** Resolves the bare names of this test's catalog as a compose network would. */
function composeDns(ports: Record<string, number>): typeof fetch {
  return (input, init) => {
    const url = new URL(String(input));
    const port = ports[url.hostname];
    if (port !== undefined) {
      url.hostname = '127.0.0.1';
      url.port = String(port);
    }
    return fetch(url, init);
  };
}

const token = (claims: Record<string, unknown>) =>
  new SignJWT(claims).setProtectedHeader({ alg: 'HS256' }).setIssuedAt().setExpirationTime('5m').sign(new TextEncoder().encode(TEST_SECRET));

beforeAll(async () => {
  hello = await startExample('node');
  // Answers a redirect, or never answers (the deadline case).
  odd = http.createServer((req, res) => {
    if (req.url?.includes('/redirect')) {
      res.writeHead(302, { location: 'http://169.254.169.254/latest/meta-data' });
      res.end();
    }
  });
  await new Promise<void>((resolve) => odd.listen(0, '127.0.0.1', () => resolve()));
  oddPort = (odd.address() as AddressInfo).port;
  gateway = createEmbeddedGateway({
    jwtSecret: TEST_SECRET,
    rows: [
      { name: 'hello', runtime: 'http', verify_jwt: true, upstream_url: 'http://hello:8000' },
      { name: 'odd', runtime: 'http', verify_jwt: false, upstream_url: 'http://odd:8000', timeout_ms: 300 },
      { name: 'gone', runtime: 'http', verify_jwt: false, upstream_url: 'http://pgstack-embed-no-such-host:8000' },
      { name: 'metadata', runtime: 'http', verify_jwt: false, upstream_url: 'http://169.254.169.254' },
    ],
    fetch: composeDns({ hello: hello.port, odd: oddPort }),
    log: (level, msg, fields) => logged.push(JSON.stringify({ level, msg, ...fields })),
  });
}, 60_000);

afterAll(async () => {
  odd?.closeAllConnections();
  odd?.close();
  await hello?.stop();
});

describe('examples/embed: the core in a plain fetch runtime', () => {
  it('a signed-in call reaches the function with the verified identity; spoofed identity headers do not', async () => {
    const jwt = await token({ role: 'authenticated', sub: 'embed-user' });
    const res = await gateway.fetch(
      new Request('http://gw.local/functions/v1/hello/sub?q=1', {
        method: 'POST',
        headers: { authorization: `Bearer ${jwt}`, 'x-pgstack-role': 'service_role', 'content-type': 'text/plain' },
        body: 'hi',
      }),
    );
    expect(res.status).toBe(200);
    const echo = (await res.json()) as { role: string; sub: string; path: string; body: string; headers: Record<string, string[]> };
    expect(echo).toMatchObject({ role: 'authenticated', sub: 'embed-user', path: '/functions/v1/hello/sub?q=1', body: 'hi' });
    expect(echo.headers['x-pgstack-role']).toEqual(['authenticated']);
  });

  it('no token on a verify_jwt function: 401 before anything is forwarded', async () => {
    const res = await gateway.fetch(new Request('http://gw.local/functions/v1/hello', { method: 'POST', body: 'x' }));
    expect(res.status).toBe(401);
    expect(res.headers.get('x-relay-error')).toBe('true');
    expect(((await res.json()) as { code: string }).code).toBe('credentials_required');
  });

  it('a redirect is relayed to the client, never followed', async () => {
    const res = await gateway.fetch(new Request('http://gw.local/functions/v1/odd/redirect'));
    expect(res.status).toBe(302);
    expect(res.headers.get('location')).toBe('http://169.254.169.254/latest/meta-data');
    expect(res.headers.get('x-relay-error')).toBeNull();
  });

  it("the row's deadline ends a silent upstream with 502 upstream_deadline", async () => {
    const started = Date.now();
    const res = await gateway.fetch(new Request('http://gw.local/functions/v1/odd/silent'));
    expect(res.status).toBe(502);
    expect(((await res.json()) as { code: string }).code).toBe('upstream_deadline');
    expect(Date.now() - started).toBeLessThan(5_000);
  });

  it('a name that resolves nowhere is 502 upstream_unreachable, with the reason in the log', async () => {
    const res = await gateway.fetch(new Request('http://gw.local/functions/v1/gone'));
    expect(res.status).toBe(502);
    expect(((await res.json()) as { code: string }).code).toBe('upstream_unreachable');
    expect(logged.some((line) => line.includes('"code":"upstream_unreachable"') && line.includes('pgstack-embed-no-such-host'))).toBe(true);
  });

  it('a row with an IP-literal upstream is dropped at load (logged) and answers 404', async () => {
    expect(logged.some((line) => line.includes('catalog row dropped') && line.includes('"function":"metadata"'))).toBe(true);
    const res = await gateway.fetch(new Request('http://gw.local/functions/v1/metadata'));
    expect(res.status).toBe(404);
  });
});

describe('examples/embed/gateway.ts: export default { fetch } from the environment', () => {
  const load = (env: Record<string, string>): Promise<{ code: number; stdout: string; stderr: string }> =>
    new Promise((resolve) => {
      const script = `
        const { default: handler } = await import(${JSON.stringify(join(REPO_ROOT, 'examples/embed/gateway.ts'))});
        const res = await handler.fetch(new Request('http://gw.local/functions/v1/hello', { method: 'POST', body: 'x' }));
        console.log(res.status, (await res.json()).code);`;
      execFile(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: REPO_ROOT, env: { ...process.env, ...env }, timeout: 20_000 }, (err, stdout, stderr) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
      );
    });

  it('serves the catalog it was given', async () => {
    const rows = JSON.stringify([{ name: 'hello', runtime: 'http', verify_jwt: true, upstream_url: 'http://hello:8000' }]);
    const res = await load({ JWT_SECRET: TEST_SECRET, PGSTACK_FUNCTIONS: rows });
    const lines = res.stdout.trim().split('\n');
    expect(lines.at(-1)).toBe('401 credentials_required');
    // The console logger: one JSON line for the request.
    expect(JSON.parse(lines[0]!)).toMatchObject({ level: 'info', msg: 'request', function: 'hello', status: 401, code: 'credentials_required' });
  });

  it('examples/embed/serve.ts serves it on Node as the README shows', async () => {
    const rows = JSON.stringify([{ name: 'hello', runtime: 'http', verify_jwt: true, upstream_url: 'http://hello:8000' }]);
    const port = String(await freePort());
    const child = spawn(process.execPath, ['bin/run-ts.js', 'examples/embed/serve.ts'], {
      cwd: REPO_ROOT,
      env: { ...process.env, JWT_SECRET: TEST_SECRET, PGSTACK_FUNCTIONS: rows, PORT: port },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    try {
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('serve.ts did not start')), 20_000);
        child.stdout!.on('data', (d: Buffer) => {
          if (String(d).includes('embedded gateway on')) {
            clearTimeout(timer);
            resolve();
          }
        });
      });
      const res = await fetch(`http://127.0.0.1:${port}/functions/v1/hello`, { method: 'POST', body: 'x' });
      expect(res.status).toBe(401);
      expect(((await res.json()) as { code: string }).code).toBe('credentials_required');
      expect((await fetch(`http://127.0.0.1:${port}/metrics`)).status).toBe(404); // off unless asked for
    } finally {
      child.kill('SIGKILL');
    }
  });

  it.each([
    [{ JWT_SECRET: 'short', PGSTACK_FUNCTIONS: '[]' }, 'at least 32 characters'],
    [{ JWT_SECRET: '', PGSTACK_FUNCTIONS: '[]' }, 'JWT_SECRET is required'],
    [{ JWT_SECRET: TEST_SECRET, PGSTACK_FUNCTIONS: '{"name":"x"}' }, 'PGSTACK_FUNCTIONS must be a JSON array'],
    [{ JWT_SECRET: TEST_SECRET, PGSTACK_FUNCTIONS: 'not json' }, 'PGSTACK_FUNCTIONS must be a JSON array'],
  ])('a bad environment (%j) fails when the module loads, naming the variable', async (env, message) => {
    const res = await load(env);
    expect(res.code).not.toBe(0);
    expect(res.stderr).toContain(message);
  });
});
