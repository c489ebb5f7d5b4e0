/**
 * Fetch bodies as Node Readables, without copying: @whatwg-node's ReadableStream is a thin
 * wrapper over a Node Readable (`.readable`), which is handed on as it is; a Node Readable
 * is itself; a native web stream is adapted with Readable.fromWeb (destroying the result
 * cancels the web stream).
 */
import { Readable } from 'node:stream';
import type { ReadableStream as NodeWebReadableStream } from 'node:stream/web';

export function toNodeReadable(body: ReadableStream<Uint8Array>): Readable {
  const inner = (body as { readable?: unknown }).readable;
  if (inner instanceof Readable) return inner;
  if ((body as unknown) instanceof Readable) return body as unknown as Readable;
  return Readable.fromWeb(body as unknown as NodeWebReadableStream<Uint8Array>);
}
