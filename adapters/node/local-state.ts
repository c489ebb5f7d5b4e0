/**
 * The local state folder (`./.pgstack/` unless PGSTACK_DIR says otherwise): the embedded
 * database and the generated JWT secret, kept across restarts and shared by `serve` and
 * the CLI so a token minted by `pgstack token` verifies at the running gateway.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { ConfigError } from './config.ts';
import { join, resolve } from 'node:path';

const SECRET_FILE = 'jwt-secret';

export function stateDirPath(dir: string): string {
  return resolve(dir);
}

/** Reads the saved JWT secret, or undefined when none was generated yet. */
export function readSecret(dir: string): string | undefined {
  const file = join(dir, SECRET_FILE);
  if (!existsSync(file)) return undefined;
  const secret = readFileSync(file, 'utf8').trim();
  return secret.length >= 32 ? secret : undefined;
}

/** Reads the saved JWT secret or generates one (256 bits, base64url) readable by the owner only. */
export function readOrCreateSecret(dir: string): string {
  const existing = readSecret(dir);
  if (existing) return existing;
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const secret = randomBytes(32).toString('base64url');
  writeFileSync(join(dir, SECRET_FILE), `${secret}\n`, { mode: 0o600 });
  return secret;
}

/**
 * When the saved secret was generated (epoch seconds), or undefined without one: the `iat`
 * of the keys the banner prints, so that they are the same on every start.
 */
export function secretCreatedAt(dir: string): number | undefined {
  try {
    return Math.floor(statSync(join(dir, SECRET_FILE)).mtimeMs / 1000);
  } catch {
    return undefined;
  }
}

/** Whether `pid` is a live Node process (a pid reused by something else after a crash is not). */
function liveNodeProcess(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('node');
  } catch {
    return true; // no /proc: trust the signal check
  }
}

/**
 * Claims the state folder for one `serve` (`serve.pid`). A second gateway on the same
 * folder would join its database and take over the demo function's catalog row, breaking
 * the first; refuse it with a message instead. Returns the release function.
 */
export async function lockStateDir(dir: string): Promise<() => Promise<void>> {
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const file = join(dir, 'serve.pid');
  if (existsSync(file)) {
    const pid = Number(readFileSync(file, 'utf8').trim());
    if (Number.isSafeInteger(pid) && pid > 0 && pid !== process.pid && liveNodeProcess(pid)) {
      throw new ConfigError(
        `Another gateway (pid ${pid}) is already serving from ${resolve(dir)}: stop it first (Ctrl-C), or give this one its own PGSTACK_DIR.`,
      );
    }
  }
  writeFileSync(file, `${process.pid}\n`);
  return async () => {
    try {
      if (readFileSync(file, 'utf8').trim() === String(process.pid)) unlinkSync(file);
    } catch {
      // already gone
    }
  };
}
