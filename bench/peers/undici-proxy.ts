/** The minimal Node proxy: node:http + undici.request (pooled, keep-alive), no auth, streams both ways. */
import { createServer, type IncomingHttpHeaders } from 'node:http';
import { Agent } from 'undici';
import { env, listenAndAnnounce } from './ready.ts';

const origin = `http://127.0.0.1:${env('BENCH_UPSTREAM_PORT')}`;
const agent = new Agent({ connections: 128 });
const HOP = new Set(['host', 'connection', 'keep-alive', 'transfer-encoding', 'upgrade', 'expect']);

function forwardable(headers: IncomingHttpHeaders): Record<string, string | string[]> {
  const out: Record<string, string | string[]> = {};
  for (const [name, value] of Object.entries(headers)) if (value !== undefined && !HOP.has(name)) out[name] = value;
  return out;
}

const server = createServer(async (req, res) => {
  try {
    const hasBody = req.method !== 'GET' && req.method !== 'HEAD';
    const upstream = await agent.request({
      origin,
      path: req.url ?? '/',
      method: req.method as 'POST',
      headers: forwardable(req.headers),
      body: hasBody ? req : null,
    });
    res.writeHead(upstream.statusCode, forwardable(upstream.headers as IncomingHttpHeaders));
    upstream.body.pipe(res);
  } catch {
    if (!res.headersSent) res.writeHead(502);
    res.end();
  }
});
await listenAndAnnounce(server);
