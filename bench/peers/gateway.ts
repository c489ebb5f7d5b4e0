/**
 * The gateway on its real Node host path, minus the database: core createGateway (HS256
 * keys, verified-token cache), the undici forwarder, the @whatwg-node/server listener and
 * the JSON request log (on stdout, which the orchestrator sends to /dev/null). The catalog
 * is a static snapshot with one function, `bench`, whose bare upstream name is mapped to
 * loopback the way an operator would with UPSTREAM_HOSTS.
 */
import { buildSnapshot, createGateway } from '../../core/index.ts';
import { DEFAULTS } from '../../adapters/node/config.ts';
import { createUndiciForwarder } from '../../adapters/node/forwarder.ts';
import { createListener, newRequestHeaders } from '../../adapters/node/listener.ts';
import { batchedStdout, createJsonLogger } from '../../adapters/node/logger.ts';
import { env, listenAndAnnounce } from './ready.ts';

const snapshot = buildSnapshot([
  { name: 'bench', runtime: 'http', verify_jwt: true, upstream_url: `http://bench-upstream:${env('BENCH_UPSTREAM_PORT')}` },
]);
const log = createJsonLogger('info', batchedStdout().write);
const forwarder = createUndiciForwarder({
  connectTimeoutMs: DEFAULTS.UPSTREAM_CONNECT_TIMEOUT_MS,
  headersTimeoutMs: DEFAULTS.UPSTREAM_HEADERS_TIMEOUT_MS,
  upstreamHosts: new Map([['bench-upstream', { address: '127.0.0.1' }]]),
  log,
});
const gateway = createGateway(
  { keys: { jwtSecret: env('BENCH_JWT_SECRET') }, limits: { maxBodyBytes: DEFAULTS.MAX_BODY_BYTES, requestTimeoutMs: DEFAULTS.REQUEST_TIMEOUT_MS } },
  { catalog: () => snapshot, forward: forwarder.forward, log, newHeaders: newRequestHeaders },
);
await listenAndAnnounce(createListener(gateway));
