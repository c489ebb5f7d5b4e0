/**
 * Ending a pg connection within a bound. `client.end()` sends Terminate and waits for the
 * server to close: on a connection gone silent (a partition, a stuck pooler) that wait has
 * no end, so after `timeoutMs` the socket is destroyed instead.
 */
import type pg from 'pg';

export async function endWithin(client: pg.Client, timeoutMs = 2_000): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const ended = await Promise.race([
    client.end().then(
      () => true,
      () => true,
    ),
    new Promise<false>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs))),
  ]);
  clearTimeout(timer);
  // (pg's typings do not list the connection's socket.)
  if (!ended) (client as unknown as { connection?: { stream?: { destroy(): void } } }).connection?.stream?.destroy();
}
