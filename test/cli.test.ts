/**
 * `pgstack` as a user runs it (a child process), against a real database and a running
 * gateway: register a real function, mint a token, invoke it, list, remove; and the
 * messages and exit codes for bad arguments.
 */
import { execFile } from 'node:child_process';
import net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestDatabase, type TestDatabase } from './support/db.ts';
import { eventually, startTestGateway, TEST_SECRET, type TestGateway } from './support/gateway.ts';
import { REPO_ROOT, startExample, type RunningExample } from './support/processes.ts';

const BIN = join(REPO_ROOT, 'bin', 'pgstack.js');
let db: TestDatabase;
let gw: TestGateway;
let fn: RunningExample;

function pgstack(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [BIN, ...args],
      { cwd: REPO_ROOT, env: { ...process.env, DATABASE_URL: db.url, JWT_SECRET: TEST_SECRET, ...env }, timeout: 30_000 },
      (err, stdout, stderr) => resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
}

beforeAll(async () => {
  db = await createTestDatabase();
  fn = await startExample('python', { HOST: '127.0.0.1' });
  gw = await startTestGateway(db.url, { UPSTREAM_HOSTS: 'hello-python=127.0.0.1' });
  await gw.catalog.firstLoad();
}, 120_000);

afterAll(async () => {
  await gw?.stop();
  await fn?.stop();
  await db?.drop();
});

describe('pgstack CLI', () => {
  it('functions add registers a function that a token from `pgstack token` can invoke without a restart', async () => {
    const add = await pgstack(['functions', 'add', 'hello-python', '--url', `http://hello-python:${fn.port}`]);
    expect(add.stderr).toBe('');
    expect(add.code).toBe(0);
    expect(add.stdout).toContain('added hello-python');
    await eventually(() => gw.catalog.current()?.functions.has('hello-python') ?? false, 5_000, 5);

    const token = await pgstack(['token', '--role', 'authenticated', '--sub', 'cli-user', '--expires-in', '10m']);
    expect(token.code).toBe(0);
    const jwt = token.stdout.trim();
    expect(jwt).toMatch(/^eyJ[\w-]+\.[\w-]+\.[\w-]+$/);

    const res = await gw.call('/functions/v1/hello-python', { method: 'POST', headers: { authorization: `Bearer ${jwt}` }, body: 'hi' });
    expect(res.status).toBe(200);
    const echo = (await res.json()) as { role: string; sub: string; runtime: string; claims: { exp: number; iat: number } };
    expect(echo).toMatchObject({ role: 'authenticated', sub: 'cli-user', runtime: 'python' });
    expect(echo.claims.exp - echo.claims.iat).toBe(600);
  });

  it('functions list shows every row with ok or the reason it is dropped', async () => {
    await db.sql("INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('sneaky', 'http', 'http://169.254.169.254')");
    const list = await pgstack(['functions', 'list']);
    expect(list.code).toBe(0);
    expect(list.stdout).toMatch(/hello-python\s+http\s+yes\s+http:\/\/hello-python:\d+\s+default\s+default\s+ok/);
    expect(list.stdout).toMatch(/sneaky\s+http\s+yes\s+http:\/\/169\.254\.169\.254\s+default\s+default\s+DROPPED: /);
  });

  it('functions list shows control and bidi characters of a row escaped, never raw to the terminal', async () => {
    await db.sql(
      "INSERT INTO pgstack.edge_functions (name, runtime, upstream_url) VALUES ('esc', 'http', E'http://x\\x1b[2J\\x1b]0;PWNED\\x07/\\u202e\\u009b\\u061c\\u00ad\\U000E0041\\u180e\\u3164\\ufe0f\\u034f\\u2028')",
    );
    try {
      const list = await pgstack(['functions', 'list']);
      expect(list.code).toBe(0);
      const line = list.stdout.split('\n').find((l) => l.startsWith('esc '));
      expect(line).toContain('http://x\\u{1b}[2J\\u{1b}]0;PWNED\\u{7}/\\u{202e}\\u{9b}\\u{61c}\\u{ad}\\u{e0041}\\u{180e}\\u{3164}\\u{fe0f}\\u{34f}\\u{2028}');
      expect(list.stdout).not.toMatch(/[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e\u061c\u00ad\u180e\u3164\ufe0f\u034f\u2028]|\u{e0041}/u);
    } finally {
      await db.sql("DELETE FROM pgstack.edge_functions WHERE name = 'esc'");
    }
  });

  it('functions add --no-verify-jwt makes the function open; running add again updates it', async () => {
    const add = await pgstack(['functions', 'add', 'hello-python', '--url', `http://hello-python:${fn.port}`, '--no-verify-jwt']);
    expect(add.code).toBe(0);
    expect(add.stdout).toContain('updated hello-python');
    expect(add.stdout).toContain('(verify_jwt false, timeout default, body limit default)');
    await eventually(() => gw.catalog.current()?.functions.get('hello-python')?.verifyJwt === false, 5_000, 5);
    const res = await gw.call('/functions/v1/hello-python');
    expect(res.status).toBe(200);
    expect(((await res.json()) as { role: string }).role).toBe('anon');
  });

  it('functions add shows the per-function timeout and body limit, and list shows them too', async () => {
    const add = await pgstack(['functions', 'add', 'limited', '--url', 'http://limited:8000', '--timeout-ms', '2000', '--max-body-bytes', '100']);
    expect(add.code).toBe(0);
    expect(add.stdout).toContain('added limited -> http://limited:8000 (verify_jwt true, timeout 2000 ms, body limit 100 bytes)');
    const list = await pgstack(['functions', 'list']);
    expect(list.stdout).toMatch(/limited\s+http\s+yes\s+http:\/\/limited:8000\s+2000\s+100\s+ok/);
    expect((await pgstack(['functions', 'rm', 'limited'])).code).toBe(0);
  });

  it('without DATABASE_URL and no embedded database, the message names the folder it looked in and how to point at another', async () => {
    const res = await pgstack(['functions', 'list'], { DATABASE_URL: '', PGSTACK_DIR: '/nonexistent/pgstack-state' });
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('/nonexistent/pgstack-state holds no embedded database');
    expect(res.stderr).toContain('PGSTACK_DIR');
  });

  it('functions rm removes it (404 next) and a second rm exits 1', async () => {
    expect((await pgstack(['functions', 'rm', 'hello-python'])).code).toBe(0);
    await eventually(() => !(gw.catalog.current()?.functions.has('hello-python') ?? true), 5_000, 5);
    expect((await gw.call('/functions/v1/hello-python')).status).toBe(404);
    const again = await pgstack(['functions', 'rm', 'hello-python']);
    expect(again.code).toBe(1);
    expect(again.stderr).toContain('no function named "hello-python"');
  });

  it.each([
    [['functions', 'add', 'x', '--url', 'http://127.0.0.1:80'], /--url is refused: .*dot/],
    [['functions', 'add', 'x', '--url', 'http://localhost:80'], /--url is refused/],
    [['functions', 'add', 'bad name!', '--url', 'http://fn:80'], /NAME must be/],
    [['functions', 'add', 'x'], /--url is required/],
    [['functions', 'add', 'x', '--url', 'http://fn', '--runtime', 'python'], /--runtime must be http or deno/],
    [['functions', 'add', 'x', '--url', 'http://fn', '--timeout-ms', '-5'], /--timeout-ms needs a value, and one starting with "-" is not accepted/],
    [['functions', 'add', 'x', '--url', 'http://fn', '--timeout-ms=-5'], /--timeout-ms must be a positive whole number, got "-5"/],
    [['functions', 'add', 'x', '--url', 'http://fn', '--timeout-ms'], /--timeout-ms needs a value\n/],
    [['functions', 'add', 'x', '--url', 'http://fn', '--no-verify-jwt=yes'], /--no-verify-jwt takes no value/],
    [['functions', 'frobnicate'], /unknown functions command/],
    [['token'], /--role must be one of/],
    [['token', '--role', 'postgres'], /--role must be one of .*got "postgres"/],
    [['token', '--role', 'authenticated'], /--sub is required/],
    [['token', '--role', 'anon', '--sub', 'x'], /--sub does not apply/],
    [['token', '--role', 'service_role', '--expires-in', 'soon'], /--expires-in must be a positive duration/],
    [['token', '--role', 'service_role', '--expires-in', '0'], /--expires-in must be a positive duration/],
    [['token', '--role', 'service_role', '--expires-in', '0h'], /--expires-in must be a positive duration/],
    [['functions', 'add', 'x', '--runtime', 'deno', '--url', 'http://fn:1'], /--url does not apply to --runtime deno/],
    [['functions', 'add', 'x', '--url', 'http://10.0.0.5:8000'], /UPSTREAM_HOSTS=my-fn=127\.0\.0\.1:8000/],
    [['token', '--role', 'service_role', '--bogus'], /^pgstack: unknown option --bogus\n/],
    [['nonsense'], /unknown command "nonsense"/],
    [['migrate', 'extra'], /migrate takes no arguments/],
    [['functions', 'rm', 'a b'], /NAME must be letters, digits/],
  ])('%j exits 2 with a clear message', async (args, message) => {
    const res = await pgstack(args as string[]);
    expect(res.code).toBe(2);
    expect(res.stderr).toMatch(message);
    expect(res.stderr).not.toMatch(/\n\s+at /); // no stack trace
  });

  it('a bad environment value exits 1 naming the variable', async () => {
    const res = await pgstack(['functions', 'list'], { PORT: 'eighty' });
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('PORT must be a whole number');
  });

  it('an unreachable database exits 1 with advice, not a stack trace', async () => {
    const res = await pgstack(['functions', 'list'], { DATABASE_URL: 'postgres://postgres:x@127.0.0.1:1/postgres' });
    expect(res.code).toBe(1);
    expect(res.stderr).toContain('Cannot reach the database');
  });

  it('serve on a port already in use exits 1 saying to pick another PORT, not with a stack trace', async () => {
    const taken = net.createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', () => resolve()));
    try {
      const port = (taken.address() as net.AddressInfo).port;
      const res = await pgstack(['serve'], { PORT: String(port), HOST: '127.0.0.1', MIGRATE_ON_START: 'false' });
      expect(res.code).toBe(1);
      expect(res.stderr).toContain(`pgstack: 127.0.0.1:${port} is already in use: set PORT to another port (PORT=0 picks a free one)`);
      expect(res.stderr).not.toMatch(/\n\s+at /);
    } finally {
      taken.close();
    }
  });

  it.each([
    ['999.1.1.1', 'HOST must be an IP address or a hostname of this machine, got "999.1.1.1"'],
    ['pgstack-no-such-host-xyz', 'HOST=pgstack-no-such-host-xyz does not resolve to an address of this machine'],
  ])('serve with HOST=%s exits 1 naming HOST', async (host, message) => {
    const res = await pgstack(['serve'], { HOST: host, PORT: '0', MIGRATE_ON_START: 'false' });
    expect(res.code).toBe(1);
    expect(res.stderr).toContain(message);
    expect(res.stderr).not.toMatch(/\n\s+at /);
  });

  it('migrate is idempotent', async () => {
    expect((await pgstack(['migrate'])).code).toBe(0);
    const again = await pgstack(['migrate']);
    expect(again.code).toBe(0);
    expect(again.stdout).toContain('schema applied');
  });
});
