/**
 * The fallback load generator when wrk is not installed: autocannon, in a child process of
 * its own (pinned like wrk), so it never shares an event loop with the orchestrator.
 * Input: one JSON argument (LoadSpec); output: one JSON line on stdout (LoadResult).
 */
import { readFileSync } from 'node:fs';
import autocannon from 'autocannon';
import type { LoadResult, LoadSpec } from './load.ts';

const spec = JSON.parse(process.argv[2] ?? '{}') as LoadSpec;
const tokens = spec.tokensFile ? readFileSync(spec.tokensFile, 'utf8').split('\n').filter(Boolean) : [spec.token];
let next = 0;

const result = await autocannon({
  url: spec.url,
  connections: spec.connections,
  duration: spec.seconds,
  method: 'POST',
  body: spec.body,
  headers: { 'content-type': 'application/json', authorization: `Bearer ${spec.token}` },
  requests: [
    {
      setupRequest: (request: autocannon.Request) => {
        if (tokens.length > 1) request.headers = { ...request.headers, authorization: `Bearer ${tokens[next++ % tokens.length]}` };
        return request;
      },
    },
  ],
});
const out: LoadResult = {
  requests: result.requests.total,
  rps: result.requests.total / spec.seconds,
  p50Ms: result.latency.p50,
  p99Ms: result.latency.p99,
  errors: result.errors + result.timeouts + result.non2xx,
};
process.stdout.write(`${JSON.stringify(out)}\n`);
