/**
 * The one handshake between a bench child and bench/run.ts: once listening, a child writes
 * `READY <port>` on stderr (stdout is the gateway's request log, sent to /dev/null).
 */
import type { AddressInfo } from 'node:net';
import type { Server } from 'node:http';

export async function listenAndAnnounce(server: Server): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  process.stderr.write(`READY ${(server.address() as AddressInfo).port}\n`);
}

/** A required environment variable the orchestrator passes in. */
export function env(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`bench child: ${name} is not set`);
  return value;
}

// Exit normally on SIGTERM so `node --cpu-prof` (bench/run.ts --cpu-prof) writes its profile.
process.once('SIGTERM', () => process.exit(0));
