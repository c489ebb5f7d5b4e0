/** node-http-proxy (http-proxy 1.18.1), no auth, keep-alive agent to the upstream: its best configuration. */
import { Agent, createServer } from 'node:http';
import httpProxy from 'http-proxy';
import { env, listenAndAnnounce } from './ready.ts';

const proxy = httpProxy.createProxyServer({
  target: `http://127.0.0.1:${env('BENCH_UPSTREAM_PORT')}`,
  agent: new Agent({ keepAlive: true, maxSockets: 128 }),
});
proxy.on('error', (_err, _req, res) => {
  if ('writeHead' in res && !res.headersSent) res.writeHead(502);
  res.end();
});
await listenAndAnnounce(createServer((req, res) => proxy.web(req, res)));
