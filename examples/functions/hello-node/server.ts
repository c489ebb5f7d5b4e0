// hello-node: reference pgstack function (TypeScript, node: builtins only). See ../README.md.
import { Buffer } from 'node:buffer';
import { createServer } from 'node:http';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

const MAX_BODY = 10 * 1024 * 1024; // 10 MiB
const PREFIX = '/functions/v1/';
const expectsContinue = new WeakSet<IncomingMessage>();

function send(req: IncomingMessage, res: ServerResponse, status: number, type: string, text: string, close = false): void {
  const body = Buffer.from(text, 'utf8');
  res.writeHead(status, {
    'content-type': type,
    'content-length': body.length,
    ...(close ? { connection: 'close' } : {}),
  });
  res.end(req.method === 'HEAD' ? undefined : body);
}

function sendJson(req: IncomingMessage, res: ServerResponse, status: number, value: unknown, close = false): void {
  send(req, res, status, 'application/json', JSON.stringify(value), close);
}

/** Resolves with the whole body, or null once it exceeds MAX_BODY. */
function readBody(req: IncomingMessage, res: ServerResponse): Promise<Buffer | null> {
  return new Promise((resolve, reject) => {
    if (Number(req.headers['content-length'] ?? 0) > MAX_BODY) return resolve(null);
    if (expectsContinue.has(req)) res.writeContinue(); // only once we mean to read the body
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > MAX_BODY) resolve(null);
      else chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

/** Node decodes header values as latin-1: reinterpret the bytes as UTF-8 (as Go and Python do). */
const utf8 = (value: string): string => Buffer.from(value, 'latin1').toString('utf8');

/** First value of a header, from rawHeaders (name, value, name, value, ...). */
function firstHeader(raw: string[], name: string): string | null {
  for (let i = 0; i + 1 < raw.length; i += 2) {
    if (raw[i]!.toLowerCase() === name) return utf8(raw[i + 1]!);
  }
  return null;
}

async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
  const target = req.url ?? ''; // the raw request target, never decoded or normalised
  const path = target.split('?', 1)[0]!;
  const unread = expectsContinue.has(req); // the client holds its body back: close after replying
  if (path === '/healthz') return send(req, res, 200, 'text/plain', 'ok', unread);
  if (!path.startsWith(PREFIX)) return sendJson(req, res, 404, { error: 'not found' }, unread);

  const body = await readBody(req, res);
  if (body === null) return sendJson(req, res, 413, { error: 'payload too large' }, true);

  let claims: unknown = null;
  const rawClaims = firstHeader(req.rawHeaders, 'x-pgstack-claims');
  if (rawClaims !== null) {
    try {
      claims = JSON.parse(rawClaims);
    } catch {
      return sendJson(req, res, 400, { error: 'bad claims header' });
    }
  }
  const headers: Record<string, string[]> = Object.create(null);
  for (let i = 0; i + 1 < req.rawHeaders.length; i += 2) {
    const name = req.rawHeaders[i]!.toLowerCase();
    (headers[name] ??= []).push(utf8(req.rawHeaders[i + 1]!));
  }
  sendJson(req, res, 200, {
    function: path.slice(PREFIX.length).split('/', 1)[0],
    method: req.method,
    path: target,
    role: firstHeader(req.rawHeaders, 'x-pgstack-role'),
    sub: firstHeader(req.rawHeaders, 'x-pgstack-sub'),
    claims,
    headers,
    body: body.toString('utf8'),
    bodyBytes: body.length,
    runtime: 'node',
  });
}

function onRequest(req: IncomingMessage, res: ServerResponse): void {
  handle(req, res).catch((err: unknown) => {
    if (res.headersSent) return void res.destroy();
    const aborted = (err as { code?: string } | null)?.code === 'ECONNRESET';
    if (!aborted) console.error(err);
    sendJson(req, res, aborted ? 400 : 500, { error: aborted ? 'bad request body' : 'internal error' }, true);
  });
}

const server = createServer({ maxHeaderSize: 64 * 1024 }, onRequest);
server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => {
  expectsContinue.add(req);
  onRequest(req, res);
});
server.keepAliveTimeout = 65_000; // outlive typical proxy pools' idle timeouts

const host = process.env.HOST || '0.0.0.0';
server.once('error', (err: NodeJS.ErrnoException) => {
  // A port in use, an address not on this machine: one line, not a stack trace.
  process.stderr.write(`listen: ${host}:${process.env.PORT || 8000}: ${err.code ?? err.message}\n`);
  process.exit(1);
});
server.listen(Number(process.env.PORT || 8000), host, () => {
  const { port } = server.address() as AddressInfo;
  process.stdout.write(`listening on http://${host.includes(':') ? `[${host}]` : host}:${port}\n`);
});

let stopping = false;
function shutdown(): void {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), 5_000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
