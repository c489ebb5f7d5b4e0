/**
 * The README's first command, as a newcomer runs it: `npm start` on a fresh state folder
 * (embedded PostgreSQL, generated secret, demo function), then the curl it prints, run by
 * a shell exactly as printed. Then SIGTERM: a clean exit 0 with nothing left running.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import pg from 'pg';
import { REPO_ROOT } from './support/processes.ts';

const exec = promisify(execFile);
let dir: string;
let child: ChildProcess;
let stdout = '';
let stderr = '';

function waitFor(pattern: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const tick = () => {
      const m = pattern.exec(stdout);
      if (m) return resolve(m);
      if (child.exitCode !== null) return reject(new Error(`npm start exited ${child.exitCode}: ${stderr}\n${stdout}`));
      if (Date.now() - started > timeoutMs) return reject(new Error(`timed out waiting for ${pattern}: ${stderr}\n${stdout}`));
      setTimeout(tick, 50);
    };
    tick();
  });
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'pgstack-start-'));
  chmodSync(dir, 0o755); // the embedded server runs as the postgres user when we are root
  child = spawn('npm', ['start'], {
    cwd: REPO_ROOT,
    env: { ...process.env, DATABASE_URL: '', JWT_SECRET: '', PGSTACK_DIR: join(dir, 'state'), PORT: '0' },
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: true, // its own process group, so cleanup reaches npm's children too
  });
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
});

afterAll(async () => {
  // The whole group, also when npm has exited: what it started must not outlive the test.
  if (child.pid) {
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch {}
  }
  rmSync(dir, { recursive: true, force: true });
});

describe('npm start on a fresh state folder', () => {
  it('prints a curl command that, run as printed, returns the demo function answer with the caller identity', async () => {
    const [curl] = await waitFor(/^curl .+$/m, 90_000);
    expect(stdout).toMatch(/Database\s+postgres:\/\/\S+/);
    expect(stdout).toMatch(/Anon key\s+eyJ\S+/);
    expect(stdout).toMatch(/Service key\s+eyJ\S+/);
    expect(stdout).toContain(`"msg":"verification keys","hs256":${JSON.stringify(join(dir, 'state', 'jwt-secret'))}`);
    const { stdout: answer } = await exec('sh', ['-c', curl], { timeout: 15_000 });
    const echo = JSON.parse(answer) as { function: string; role: string; sub: string; claims: Record<string, unknown>; body: string };
    expect(echo.function).toBe('hello');
    expect(echo.role).toBe('authenticated');
    expect(echo.sub).toBe('demo-user');
    expect(echo.claims['sub']).toBe('demo-user');
    expect(echo.body).toBe('{"hello":"world"}');
    // The state folder holds the data and the secret, secret readable by its owner only.
    const secret = join(dir, 'state', 'jwt-secret');
    expect(existsSync(secret)).toBe(true);
    expect(statSync(secret).mode & 0o077).toBe(0);
  }, 120_000);

  it('the printed anon key is refused by the demo function (verify_jwt) and the service key accepted', async () => {
    const url = /Gateway\s+(\S+)/.exec(stdout)![1]!;
    const anon = /Anon key\s+(\S+)/.exec(stdout)![1]!;
    const service = /Service key\s+(\S+)/.exec(stdout)![1]!;
    const refused = await fetch(`${url}/functions/v1/hello`, { headers: { apikey: anon, authorization: `Bearer ${anon}` } });
    expect(refused.status).toBe(401);
    expect(((await refused.json()) as { code: string }).code).toBe('credentials_required');
    const ok = await fetch(`${url}/functions/v1/hello`, { headers: { apikey: service, authorization: `Bearer ${service}` } });
    expect(ok.status).toBe(200);
    expect(((await ok.json()) as { role: string }).role).toBe('service_role');
  });

  it("the demo's name is mapped to loopback on the demo's port only: a row naming another local port is blocked", async () => {
    const url = /Gateway\s+(\S+)/.exec(stdout)![1]!;
    const database = /Database\s+(\S+)/.exec(stdout)![1]!;
    const service = /Service key\s+(\S+)/.exec(stdout)![1]!;
    const dbPort = new URL(database).port;
    const client = new pg.Client({ connectionString: database });
    await client.connect();
    try {
      await client.query("INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ('sneaky', 'http', false, $1)", [`http://hello:${dbPort}`]);
      let res: Response | undefined;
      for (let i = 0; i < 100; i++) {
        res = await fetch(`${url}/functions/v1/sneaky`, { headers: { authorization: `Bearer ${service}` } });
        if (res.status !== 404) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      expect(res!.status).toBe(502);
      expect(((await res!.json()) as { code: string }).code).toBe('upstream_blocked');
    } finally {
      await client.query("DELETE FROM pgstack.edge_functions WHERE name = 'sneaky'");
      await client.end();
    }
  });

  it('a second npm start on the same state folder is refused with a message, and the first keeps serving', async () => {
    const second = await new Promise<{ code: number | null; out: string }>((resolve) => {
      execFile('npm', ['start'], { cwd: REPO_ROOT, env: { ...process.env, DATABASE_URL: '', JWT_SECRET: '', PGSTACK_DIR: join(dir, 'state'), PORT: '0' }, timeout: 60_000 }, (err, out, errOut) =>
        resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, out: out + errOut }),
      );
    });
    expect(second.code).toBe(1);
    expect(second.out).toMatch(/Another gateway \(pid \d+\) is already serving from .*state/);
    const [curl] = /^curl .+$/m.exec(stdout)!;
    const { stdout: answer } = await exec('sh', ['-c', curl], { timeout: 15_000 });
    expect((JSON.parse(answer) as { role: string }).role).toBe('authenticated');
  }, 90_000);

  it('SIGTERM to the npm start process stops the gateway with exit 0, the embedded database and demo function with it', async () => {
    // What a process manager (or `kill <pid>` of what it started) does: signal npm itself.
    // npm passes the signal to its script's shell only; the script execs node so that the
    // gateway is that process (a plain `sh -c node ...` died and left the gateway orphaned).
    const { stdout: ps } = await exec('ps', ['-e', '-o', 'pid=,pgid=,args=']);
    const gateway = ps
      .split('\n')
      .map((line) => line.trim().split(/\s+/))
      .find(([, pgid, ...args]) => Number(pgid) === child.pid && args[0]?.endsWith('node') && args.join(' ').includes('bin/pgstack.js serve'));
    expect(gateway, ps).toBeDefined();
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    process.kill(child.pid!, 'SIGTERM');
    expect(await exited).toBe(0);
    expect(stdout).toContain('"msg":"shutting down"');
    expect(stdout).toContain('"msg":"stopped"');
    expect(stdout).not.toContain('catalog listener lost');
    expect(existsSync(join(dir, 'state', 'pgdata', 'postmaster.pid'))).toBe(false);
    expect(existsSync(join(dir, 'state', 'serve.pid'))).toBe(false);
    // Everything it started (postgres and its workers, the demo function) is gone too.
    const leftovers = async () =>
      (await exec('ps', ['-e', '-o', 'pgid=,args='])).stdout.split('\n').filter((l) => Number(l.trim().split(/\s+/)[0]) === child.pid);
    const deadline = Date.now() + 5_000;
    while ((await leftovers()).length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    expect(await leftovers()).toEqual([]);
  }, 30_000);
});

describe('npm start with PGSTACK_DEMO=false, stopped by Ctrl-C', () => {
  it('prints the database URL and keys without a demo, and Ctrl-C (SIGINT to the whole process group) stops it cleanly', async () => {
    const own = mkdtempSync(join(tmpdir(), 'pgstack-start-nodemo-'));
    chmodSync(own, 0o755);
    let out = '';
    const npm = spawn('npm', ['start'], {
      cwd: REPO_ROOT,
      env: { ...process.env, DATABASE_URL: '', JWT_SECRET: '', PGSTACK_DIR: join(own, 'state'), PORT: '0', PGSTACK_DEMO: 'false' },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: true, // a process group of its own, as a terminal's foreground job
    });
    npm.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    npm.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    const group = npm.pid!;
    const leftovers = async () =>
      (await exec('ps', ['-e', '-o', 'pgid=,args='])).stdout.split('\n').filter((l) => Number(l.trim().split(/\s+/)[0]) === group);
    try {
      const started = Date.now();
      while (!/Service key\s+eyJ\S+\n[\s\S]*register yours/.test(out) && Date.now() - started < 90_000 && npm.exitCode === null) {
        await new Promise((r) => setTimeout(r, 50));
      }
      expect(out).toMatch(/running \(embedded database\)\n/);
      expect(out).toMatch(/Database\s+postgres:\/\/\S+/);
      expect(out).toMatch(/Anon key\s+eyJ\S+/);
      expect(out).toContain('No demo function (PGSTACK_DEMO=false)');
      expect(out).not.toContain('earlier demo run'); // a fresh folder has no demo row left over
      expect(out).not.toMatch(/^curl /m);

      const exited = new Promise<void>((resolve) => npm.once('exit', () => resolve()));
      process.kill(-group, 'SIGINT'); // what Ctrl-C does: the gateway, npm and PostgreSQL all get it
      await exited;
      const deadline = Date.now() + 15_000;
      while (!out.includes('"msg":"stopped"') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      expect(out).toContain('"msg":"shutting down","signal":"SIGINT"');
      expect(out).toContain('"msg":"stopped"');
      expect(out).not.toContain('catalog listener lost');
      expect(out).not.toMatch(/embedded PostgreSQL (exited unexpectedly|was shut down by a signal)/);
      while ((await leftovers()).length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
      expect(await leftovers()).toEqual([]);
    } finally {
      try {
        process.kill(-group, 'SIGKILL');
      } catch {}
      rmSync(own, { recursive: true, force: true });
    }
  }, 120_000);
});

describe('npm start after a gateway was killed with SIGKILL', () => {
  it('stops the demo function the dead gateway left running before starting its own, and prints the same keys', async () => {
    const own = mkdtempSync(join(tmpdir(), 'pgstack-start-killed-'));
    chmodSync(own, 0o755);
    const env = { ...process.env, DATABASE_URL: '', JWT_SECRET: '', PGSTACK_DIR: join(own, 'state'), PORT: '0' };
    const start = () => {
      let out = '';
      const npm = spawn('npm', ['start'], { cwd: REPO_ROOT, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
      npm.stdout!.on('data', (d: Buffer) => (out += d.toString()));
      npm.stderr!.on('data', (d: Buffer) => (out += d.toString()));
      return { npm, output: () => out };
    };
    const waitCurl = async (run: { output: () => string }) => {
      for (const deadline = Date.now() + 90_000; !/^curl .+$/m.test(run.output()) && Date.now() < deadline; ) await new Promise((r) => setTimeout(r, 50));
      expect(run.output()).toMatch(/^curl .+$/m);
    };
    // Running, not a zombie waiting for a parent to reap it (a killed process's orphans are
    // re-parented to init, which may reap late).
    const alive = (pid: number) => {
      try {
        return !/^State:\s+Z/m.test(readFileSync(`/proc/${pid}/status`, 'utf8'));
      } catch {
        return false;
      }
    };
    const first = start();
    const second: { run?: ReturnType<typeof start> } = {};
    try {
      await waitCurl(first);
      const demoPid = Number(readFileSync(join(own, 'state', 'demo.pid'), 'utf8'));
      expect(alive(demoPid)).toBe(true);
      // SIGKILL the gateway alone (not its group): the demo (and PostgreSQL) outlive it.
      const { stdout: ps } = await exec('ps', ['-e', '-o', 'pid=,pgid=,args=']);
      const gateway = ps
        .split('\n')
        .map((l) => l.trim().split(/\s+/))
        .find(([, pgid, ...args]) => Number(pgid) === first.npm.pid && args[0]?.endsWith('node') && args.join(' ').includes('bin/pgstack.js serve'));
      process.kill(Number(gateway![0]), 'SIGKILL');
      await new Promise((r) => setTimeout(r, 1_100)); // a second later: a new iat would show
      expect(alive(demoPid)).toBe(true);

      second.run = start();
      await waitCurl(second.run);
      expect(alive(demoPid)).toBe(false);
      expect(Number(readFileSync(join(own, 'state', 'demo.pid'), 'utf8'))).not.toBe(demoPid);
      const [curl] = /^curl .+$/m.exec(second.run.output())!;
      const { stdout: answer } = await exec('sh', ['-c', curl], { timeout: 15_000 });
      expect((JSON.parse(answer) as { role: string }).role).toBe('authenticated');
      // The anon and service keys are derived from the kept secret and its creation time.
      const keys = (out: string) => /Anon key\s+(\S+)\n\s*Service key\s+(\S+)/.exec(out)?.slice(1);
      expect(keys(first.output())).toHaveLength(2);
      expect(keys(second.run.output())).toEqual(keys(first.output()));
    } finally {
      for (const run of [first, second.run]) {
        try {
          if (run?.npm.pid) process.kill(-run.npm.pid, 'SIGKILL');
        } catch {}
      }
      // What the first gateway left behind outside its group is stopped by the second; make sure.
      await new Promise((r) => setTimeout(r, 300));
      rmSync(own, { recursive: true, force: true });
    }
  }, 180_000);
});
