/** The upstream every proxy fronts: node:http, reads the request body, answers a small fixed body. */
import { createServer } from 'node:http';
import { listenAndAnnounce } from './ready.ts';

const BODY = Buffer.from('{"ok":true,"from":"bench-upstream"}\n');

const server = createServer((req, res) => {
  req.resume();
  req.on('end', () => {
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': BODY.length });
    res.end(BODY);
  });
});
await listenAndAnnounce(server);
