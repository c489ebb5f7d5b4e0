/**
 * The request body limit, enforced without reading the body first: a Content-Length over
 * the limit is refused before any byte is read; a body without one is counted as it
 * streams and cut off at the limit.
 */
import { GatewayError } from './errors.ts';

export interface LimitedBody {
  readonly body: ReadableStream<Uint8Array> | null;
  /** True once a streamed body crossed the limit (the forwarder then fails; answer 413). */
  exceeded(): boolean;
}

const never = (): boolean => false;
/** No body to forward. */
export const NO_BODY: LimitedBody = { body: null, exceeded: never };

/** Returns the body to forward, or a 413/400 GatewayError. Never reads the body. */
export function limitBody(request: Request, limit: number): LimitedBody | GatewayError {
  const declared = request.headers.get('content-length');
  if (declared !== null) {
    if (!/^\d{1,16}$/.test(declared)) return new GatewayError('bad_request', { message: 'Content-Length is not a number.' });
    if (Number(declared) > limit) return new GatewayError('payload_too_large');
  }
  const body = request.body;
  if (body === null) return NO_BODY;
  // With a valid Content-Length the server already stops at that many bytes.
  if (declared !== null) return { body, exceeded: never };
  let seen = 0;
  let over = false;
  const counted = body.pipeThrough(
    new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        seen += chunk.byteLength;
        if (seen > limit) {
          over = true;
          controller.error(new GatewayError('payload_too_large'));
          return;
        }
        controller.enqueue(chunk);
      },
    }),
  );
  return { body: counted, exceeded: () => over };
}
