/**
 * A TCP relay in front of the test database that can misbehave as networks and poolers do:
 * each chunk is passed on or dropped by a rule, and with `halfOpen` a side that closes is
 * never answered (the sockets stay open, as behind a stuck pooler).
 */
import net from 'node:net';

export interface RelayRules {
  /** Whether a chunk from the client reaches the database (default: always). */
  fromClient?: (chunk: Buffer) => boolean;
  /** Whether a chunk from the database reaches the client (default: always). */
  fromServer?: (chunk: Buffer) => boolean;
  /** A close or error on one side is not passed to the other (default false: it is). */
  halfOpen?: boolean;
}

export interface DbRelay {
  /** The database URL through the relay. */
  readonly url: string;
  /** Destroys every relayed socket; new connections are still relayed. */
  dropConnections(): void;
  /** Destroys every relayed socket and stops listening. */
  close(): void;
}

export async function startDbRelay(databaseUrl: string, rules: RelayRules = {}): Promise<DbRelay> {
  const target = new URL(databaseUrl);
  const sockets = new Set<net.Socket>();
  const relay = net.createServer({ allowHalfOpen: rules.halfOpen ?? false }, (inbound) => {
    const outbound = net.connect(Number(target.port), target.hostname);
    sockets.add(inbound).add(outbound);
    const pass = [
      [inbound, outbound, rules.fromClient],
      [outbound, inbound, rules.fromServer],
    ] as const;
    for (const [from, to, rule] of pass) {
      from.on('data', (chunk: Buffer) => {
        if (rule === undefined || rule(chunk)) to.write(chunk);
      });
      from.on('error', () => (rules.halfOpen ? undefined : to.destroy()));
      if (!rules.halfOpen) from.on('close', () => to.destroy());
    }
  });
  await new Promise<void>((resolve) => relay.listen(0, '127.0.0.1', () => resolve()));
  const url = new URL(databaseUrl);
  url.port = String((relay.address() as net.AddressInfo).port);
  const dropConnections = (): void => {
    for (const socket of sockets) socket.destroy();
    sockets.clear();
  };
  return {
    url: url.toString(),
    dropConnections,
    close() {
      dropConnections();
      relay.close();
    },
  };
}
