/**
 * The naive design, for reference (DESIGN 8): @whatwg-node/server + Node's built-in fetch()
 * + jose jwtVerify on every request (no cache), identity injected.
 */
import { createServer } from 'node:http';
import { createServerAdapter } from '@whatwg-node/server';
import { jwtVerify } from 'jose';
import { env, listenAndAnnounce } from './ready.ts';

const origin = `http://127.0.0.1:${env('BENCH_UPSTREAM_PORT')}`;
const secret = new TextEncoder().encode(env('BENCH_JWT_SECRET'));

const adapter = createServerAdapter(async (request: Request) => {
  const token = /^Bearer (.+)$/i.exec(request.headers.get('authorization') ?? '')?.[1];
  if (!token) return new Response('unauthorized', { status: 401 });
  let payload;
  try {
    ({ payload } = await jwtVerify(token, secret, { algorithms: ['HS256'] }));
  } catch {
    return new Response('unauthorized', { status: 401 });
  }
  const url = new URL(request.url);
  const headers = new Headers(request.headers);
  headers.delete('host');
  headers.delete('connection');
  headers.set('x-pgstack-role', String(payload['role']));
  headers.set('x-pgstack-sub', payload.sub ?? '');
  headers.set('x-pgstack-claims', JSON.stringify(payload));
  const hasBody = request.method !== 'GET' && request.method !== 'HEAD';
  const upstream = await fetch(origin + url.pathname + url.search, {
    method: request.method,
    headers,
    body: hasBody ? await request.arrayBuffer() : null,
    redirect: 'manual',
  });
  return new Response(upstream.body, { status: upstream.status, headers: upstream.headers });
});
await listenAndAnnounce(createServer(adapter));
