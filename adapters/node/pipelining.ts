/**
 * HTTP/1.1 pipelining, bounded. Node emits every request it parses off a connection at
 * once and answers them in order, with no limit on how many wait: one connection could fan
 * out into thousands of concurrent upstream requests, and a connection that lingers after
 * `Connection: close` could be fed requests that pile up, unanswered, until it closes.
 *
 * - Requests of one connection run one at a time, as nginx runs them: one that arrives
 *   while another is in flight waits for it; with PIPELINE_DEPTH waiting, the connection
 *   is no longer read (Node's own pause, the one it uses when responses back up) until
 *   they drain.
 * - After an answer that said `Connection: close` (RFC 9112 9.6: nothing more received is
 *   processed), requests are dropped unanswered; the DROP_LIMIT-th closes the connection.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';

const PIPELINE_DEPTH = 16;
const DROP_LIMIT = 16;

/** The flag Node's HTTP server reads to pause and resume a connection's parser. */
interface ServerSocket extends Socket {
  _paused?: boolean;
}

type Dispatch = (req: IncomingMessage, res: ServerResponse) => void;

export interface Pipelines {
  /** Runs `dispatch(req, res)` now, or once the requests before it on its connection are done. */
  admit(req: IncomingMessage, res: ServerResponse, dispatch: Dispatch): void;
  /** Marks a connection whose answer says `Connection: close`: what it still brings is dropped. */
  closing(socket: Socket): void;
}

/** Keyed by connection, so one for every server of the process. */
export function createPipelines(): Pipelines {
  const waiting = new WeakMap<Socket, Array<[IncomingMessage, ServerResponse, Dispatch]>>();
  const busy = new WeakSet<Socket>();
  const dropped = new WeakMap<Socket, number>();

  function start(socket: Socket, req: IncomingMessage, res: ServerResponse, dispatch: Dispatch): void {
    busy.add(socket);
    res.once('close', () => done(socket));
    dispatch(req, res);
  }

  function done(socket: Socket): void {
    busy.delete(socket);
    const queue = waiting.get(socket);
    if (queue === undefined || queue.length === 0) return;
    if (socket.destroyed || dropped.has(socket)) {
      // Gone, or closing: nothing that waited is answered any more.
      queue.length = 0;
      return;
    }
    const [req, res, dispatch] = queue.shift()!;
    start(socket, req, res, dispatch);
  }

  return {
    admit(req, res, dispatch) {
      const socket = req.socket;
      const drops = dropped.get(socket);
      if (drops !== undefined) {
        dropped.set(socket, drops + 1);
        req.resume();
        if (drops + 1 >= DROP_LIMIT) socket.destroy();
        return;
      }
      if (!busy.has(socket)) {
        start(socket, req, res, dispatch);
        return;
      }
      let queue = waiting.get(socket);
      if (queue === undefined) {
        queue = [];
        waiting.set(socket, queue);
      }
      queue.push([req, res, dispatch]);
      const server = socket as ServerSocket;
      if (queue.length >= PIPELINE_DEPTH && !server._paused) {
        server._paused = true;
        socket.pause();
      }
    },
    closing(socket) {
      if (!dropped.has(socket)) dropped.set(socket, 0);
    },
  };
}
