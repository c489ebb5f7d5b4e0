/**
 * examples/embed/gateway.ts served on Node, for trying the embedding out: any server that
 * takes a fetch handler will do; this one is @whatwg-node/server on node:http.
 *
 *   JWT_SECRET=<32+ characters> PGSTACK_FUNCTIONS='[{"name":"hello","runtime":"http","verify_jwt":false,"upstream_url":"http://hello:8000"}]' \
 *     PORT=8787 node bin/run-ts.js examples/embed/serve.ts
 */
import { createServer } from 'node:http';
import { createServerAdapter } from '@whatwg-node/server';
import handler from './gateway.ts';

const port = Number(process.env['PORT'] ?? 8787);
const host = process.env['HOST'] ?? '127.0.0.1';
createServer(createServerAdapter((request: Request) => handler.fetch(request))).listen(port, host, () => {
  console.log(`embedded gateway on http://${host}:${port}`);
});
