import { describe, expect, it } from 'vitest';
import { limitBody } from './body.ts';
import { isGatewayError } from './errors.ts';

const post = (init: RequestInit & { duplex?: 'half' }) => new Request('http://gateway.test/functions/v1/fn', { method: 'POST', ...init });

function streamOf(chunks: Uint8Array[], onPull?: () => void): ReadableStream<Uint8Array> {
  let i = 0;
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      onPull?.();
      const chunk = chunks[i++];
      if (chunk) controller.enqueue(chunk);
      else controller.close();
    },
  });
}

async function drain(body: ReadableStream<Uint8Array>): Promise<number> {
  const reader = body.getReader();
  let n = 0;
  for (let r = await reader.read(); !r.done; r = await reader.read()) n += r.value.byteLength;
  return n;
}

describe('limitBody', () => {
  it('no body: body null, never exceeded', () => {
    const limited = limitBody(new Request('http://gateway.test/'), 10);
    expect(isGatewayError(limited)).toBe(false);
    if (isGatewayError(limited)) return;
    expect(limited.body).toBeNull();
    expect(limited.exceeded()).toBe(false);
  });

  it('Content-Length over the limit -> 413 payload_too_large, without reading the body', () => {
    const request = post({ body: 'x'.repeat(11), headers: { 'content-length': '11' } });
    const limited = limitBody(request, 10);
    expect(isGatewayError(limited) && limited.code).toBe('payload_too_large');
    expect(request.bodyUsed).toBe(false);
  });

  it('a huge declared Content-Length is refused even with no body at all', () => {
    const limited = limitBody(post({ headers: { 'content-length': '9999999999999999' } }), 1024);
    expect(isGatewayError(limited) && limited.code).toBe('payload_too_large');
  });

  it('Content-Length equal to the limit passes, and the body is forwarded as is', async () => {
    const request = post({ body: 'x'.repeat(10), headers: { 'content-length': '10' } });
    const limited = limitBody(request, 10);
    if (isGatewayError(limited)) throw limited;
    expect(limited.body).not.toBeNull();
    expect(await drain(limited.body as ReadableStream<Uint8Array>)).toBe(10);
    expect(limited.exceeded()).toBe(false);
  });

  for (const bad of ['abc', '-1', '1.5', '1e3', '0x10', '10, 10', '12345678901234567']) {
    it(`a malformed Content-Length ${JSON.stringify(bad)} -> 400 bad_request`, () => {
      const limited = limitBody(post({ headers: { 'content-length': bad } }), 1_000_000);
      expect(isGatewayError(limited) && limited.code).toBe('bad_request');
    });
  }

  it('a streamed body under the limit streams through whole', async () => {
    const chunks = [new Uint8Array(4), new Uint8Array(4), new Uint8Array(2)];
    const limited = limitBody(post({ body: streamOf(chunks), duplex: 'half' }), 10);
    if (isGatewayError(limited)) throw limited;
    expect(await drain(limited.body as ReadableStream<Uint8Array>)).toBe(10);
    expect(limited.exceeded()).toBe(false);
  });

  it('a streamed body over the limit errors with payload_too_large at the limit, not at its end', async () => {
    let pulls = 0;
    const chunks = Array.from({ length: 100 }, () => new Uint8Array(4));
    const limited = limitBody(post({ body: streamOf(chunks, () => pulls++), duplex: 'half' }), 10);
    if (isGatewayError(limited)) throw limited;
    expect(limited.exceeded()).toBe(false);
    const error = await drain(limited.body as ReadableStream<Uint8Array>).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isGatewayError(error) && error.code).toBe('payload_too_large');
    expect(limited.exceeded()).toBe(true);
    expect(pulls).toBeLessThan(10);
  });

  it('a streamed body delivers the bytes before the limit and nothing past it', async () => {
    const limited = limitBody(post({ body: streamOf([new Uint8Array(6), new Uint8Array(6)]), duplex: 'half' }), 10);
    if (isGatewayError(limited)) throw limited;
    const reader = (limited.body as ReadableStream<Uint8Array>).getReader();
    const first = await reader.read();
    expect(first.value?.byteLength).toBe(6);
    await expect(reader.read()).rejects.toMatchObject({ code: 'payload_too_large' });
  });
});
