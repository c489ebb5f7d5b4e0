/**
 * Runs the real Node host in-process for a test: startGateway() over a test database, with
 * JSON log lines captured for assertions.
 */
import { loadConfig } from '../../adapters/node/config.ts';
import { startGateway, type RunningGateway } from '../../adapters/node/serve.ts';
import { mintToken } from '../../adapters/node/tokens.ts';
import type { Role } from '../../core/index.ts';

export const TEST_SECRET = 'test-secret-that-is-long-enough-for-hs256-0123456789';

export interface TestGateway extends RunningGateway {
  readonly logs: Array<Record<string, unknown>>;
  /** fetch() against the gateway: `path` is appended to its URL. */
  call(path: string, init?: RequestInit): Promise<Response>;
  token(role: Role, sub?: string, claims?: Record<string, unknown>): Promise<string>;
}

export async function startTestGateway(databaseUrl: string, env: Record<string, string> = {}): Promise<TestGateway> {
  const config = loadConfig({
    DATABASE_URL: databaseUrl,
    JWT_SECRET: TEST_SECRET,
    PORT: '0',
    HOST: '127.0.0.1',
    SHUTDOWN_GRACE_MS: '2000',
    ...env,
  });
  const logs: Array<Record<string, unknown>> = [];
  const running = await startGateway(config, (level, msg, fields) => logs.push({ level, msg, ...fields }));
  return Object.assign(Object.create(null) as object, running, {
    logs,
    call: (path: string, init?: RequestInit) => fetch(running.url + path, init),
    token: (role: Role, sub?: string, claims?: Record<string, unknown>) => mintToken(TEST_SECRET, { role, sub, expiresIn: '1h', claims }),
  }) as TestGateway;
}

/** Polls `check` until it returns true (bounded). */
export async function eventually(check: () => Promise<boolean> | boolean, timeoutMs = 10_000, everyMs = 10): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
