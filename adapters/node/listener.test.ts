/**
 * The Node listener's last guards, with a gateway that answers what a host's forwarder
 * could hand it: a header Node refuses to write, a rejected promise. Whatever it is, the
 * client gets a gateway error and the server keeps serving.
 */
import type { AddressInfo } from 'node:net';
import type { Server } from 'node:http';
import { Response as WhatwgResponse } from '@whatwg-node/fetch';
import { afterEach, describe, expect, it } from 'vitest';
import type { Gateway } from '../../core/index.ts';
import { GatewayError } from '../../core/index.ts';
import { answerAwaiting, createListener } from './listener.ts';

let server: Server | undefined;
afterEach(async () => {
  server?.closeAllConnections();
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  server = undefined;
});

async function listen(fetch: Gateway['fetch'], logged: string[]): Promise<string> {
  const gateway = { fetch } as unknown as Gateway;
  server = createListener(gateway, { log: (level, msg) => logged.push(`${level} ${msg}`) });
  await new Promise<void>((resolve) => server!.listen(0, '127.0.0.1', () => resolve()));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

describe('listener: answers Node cannot write', () => {
  it('a header value Node refuses becomes 502 upstream_bad_response, logged; the next request is served', async () => {
    const logged: string[] = [];
    let bad = true;
    const url = await listen(async () => {
      if (!bad) return new WhatwgResponse('fine') as Response;
      bad = false;
      return new WhatwgResponse('body', { status: 200, headers: { 'x-bad': 'a\u0001b' } }) as Response;
    }, logged);
    const res = await fetch(`${url}/functions/v1/x`);
    expect(res.status).toBe(502);
    expect(res.headers.get('x-relay-error')).toBe('true');
    expect(await res.json()).toEqual({ code: 'upstream_bad_response', message: 'The function sent a malformed response.' });
    expect(logged.some((line) => line.startsWith("warn a function's answer could not be relayed"))).toBe(true);
    expect(await (await fetch(`${url}/functions/v1/x`)).text()).toBe('fine');
  });

  it('a gateway that rejects becomes 500 internal_error, never an unhandled rejection', async () => {
    const logged: string[] = [];
    const url = await listen(() => Promise.reject(new Error('boom')), logged);
    const res = await fetch(`${url}/anything`);
    expect(res.status).toBe(500);
    expect(((await res.json()) as { code: string }).code).toBe('internal_error');
    expect(logged).toContain('error the listener failed to answer a request');
  });
});

describe('listener: answerAwaiting', () => {
  it('answers every request the core has not answered yet, and leaves answered ones alone', async () => {
    const logged: string[] = [];
    const url = await listen((request) => (new URL(request.url).pathname === '/fast' ? Promise.resolve(new WhatwgResponse('fast') as Response) : new Promise<Response>(() => {})), logged);
    expect(await (await fetch(`${url}/fast`)).text()).toBe('fast');
    const pending = [fetch(`${url}/never-1`), fetch(`${url}/never-2`)];
    await new Promise((r) => setTimeout(r, 100));
    const answered = await answerAwaiting(server!, new GatewayError('shutting_down', { headers: { connection: 'close' } }));
    expect(answered).toBe(2);
    for (const res of await Promise.all(pending)) {
      expect(res.status).toBe(503);
      expect(((await res.json()) as { code: string }).code).toBe('shutting_down');
    }
    expect(await answerAwaiting(server!, new GatewayError('shutting_down'))).toBe(0);
  });
});
