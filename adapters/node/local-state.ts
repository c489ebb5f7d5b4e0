/**
 * The local state folder (`./.pgstack/` unless PGSTACK_DIR says otherwise): the embedded
 * database and the generated JWT secret, kept across restarts and shared by `serve` and
 * the CLI so a token minted by `pgstack token` verifies at the running gateway.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
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
