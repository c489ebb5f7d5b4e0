/**
 * core/contract.case.ts against the real Node host: the catalog in a test database (LISTEN
 * and all), startGateway() with its listener and undici forwarder, and the contract's echo
 * upstream as a real HTTP server on loopback (mapped by UPSTREAM_HOSTS, as an operator
 * would). Requests go over real sockets with the target and header lines exactly as given.
 */
import { contractSuite } from '../core/contract.case.ts';
import { createTestDatabase } from './support/db.ts';
import { startTestGateway, TEST_SECRET } from './support/gateway.ts';
import { sendRequest } from './support/raw-http.ts';
import { startEchoUpstream } from './support/upstreams.ts';

contractSuite('node', async () => {
  const db = await createTestDatabase();
  const echo = await startEchoUpstream();
  const upstream = `http://echo:${echo.port}`;
  for (const [name, verifyJwt] of [['open', false], ['secure', true], ['fails', false]] as const) {
    await db.sql('INSERT INTO pgstack.edge_functions (name, runtime, verify_jwt, upstream_url) VALUES ($1, $2, $3, $4)', [name, 'http', verifyJwt, upstream]);
  }
  const gw = await startTestGateway(db.url, { MAX_BODY_BYTES: '1048576', UPSTREAM_HOSTS: 'echo=127.0.0.1' });
  await gw.catalog.firstLoad();
  return {
    secret: TEST_SECRET,
    request: (path, init) => sendRequest(gw.port, path, init as Parameters<typeof sendRequest>[2]),
    async close() {
      await gw.stop();
      await echo.close();
      await db.drop();
    },
  };
});
