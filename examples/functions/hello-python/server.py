#!/usr/bin/env python3
"""hello-python: reference pgstack function (Python 3 stdlib only). See ../README.md."""
import json
import os
import re
import signal
import socket
import sys
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 10 * 1024 * 1024  # 10 MiB
PREFIX = '/functions/v1/'


def utf8(text):
    """http.server decodes the request line and headers as latin-1: reinterpret the bytes as UTF-8."""
    return text.encode('latin-1').decode('utf-8', errors='replace')


class TooLarge(Exception):
    pass


def _no_constants(name):
    raise ValueError(f'{name} is not JSON')  # json.loads would otherwise accept NaN/Infinity


class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive; every response carries Content-Length
    server_version = 'hello-python'
    timeout = 65  # idle keep-alive / slow client timeout, seconds

    def __getattr__(self, name):  # any method (do_GET, do_PATCH, ...) goes to handle_any
        if name.startswith('do_'):
            return self.handle_any
        raise AttributeError(name)

    def version_string(self):
        return self.server_version

    def handle_expect_100(self):  # send 100 Continue only once we decide to read the body
        self.expect_100 = True
        return True

    def log_message(self, format, *args):  # quiet, like the Go and Node versions
        pass

    def send(self, status, ctype, body, close=False):
        self.send_response(status)
        self.send_header('Content-Type', ctype)
        self.send_header('Content-Length', str(len(body)))
        if close:
            self.send_header('Connection', 'close')  # also sets self.close_connection
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def send_json(self, status, obj, close=False):
        self.send(status, 'application/json', json.dumps(obj, separators=(',', ':')).encode(), close)

    def has_body(self):
        return 'Transfer-Encoding' in self.headers or self.headers.get('Content-Length', '0').strip() != '0'

    def read_body(self, expect_100):
        length = self.headers.get('Content-Length', '0').strip()
        if not re.fullmatch(r'[0-9]+', length):
            raise ValueError('bad content-length')
        if int(length) > MAX_BODY:
            raise TooLarge()
        if expect_100:
            self.send_response_only(100)
            self.end_headers()
        if 'chunked' not in self.headers.get('Transfer-Encoding', '').lower():
            body = self.rfile.read(int(length))
            if len(body) != int(length):
                raise ValueError('short body')
            return body
        chunks, total = [], 0
        while True:  # http.server does not decode chunked request bodies itself
            size = self.rfile.readline(1024).split(b';', 1)[0].strip()
            if not re.fullmatch(rb'[0-9a-fA-F]+', size):
                raise ValueError('bad chunk size')
            if int(size, 16) == 0:
                break
            total += int(size, 16)
            if total > MAX_BODY:
                raise TooLarge()
            chunks.append(self.rfile.read(int(size, 16)))
            self.rfile.readline(1024)  # CRLF after the chunk data
        while self.rfile.readline(65537) not in (b'\r\n', b'\n', b''):
            pass  # trailers
        return b''.join(chunks)

    def handle_any(self):
        expect_100 = self.__dict__.pop('expect_100', False)  # per request, not per connection
        words = self.requestline.split()  # raw target; self.path may have '//' collapsed
        target = utf8(words[1] if len(words) >= 2 else self.path)
        path = target.split('?', 1)[0]
        if path == '/healthz':
            return self.send(200, 'text/plain', b'ok', close=self.has_body())
        if not path.startswith(PREFIX):
            return self.send_json(404, {'error': 'not found'}, close=self.has_body())
        try:
            body = self.read_body(expect_100)
        except TooLarge:
            return self.send_json(413, {'error': 'payload too large'}, close=True)
        except (ValueError, OSError):
            return self.send_json(400, {'error': 'bad request body'}, close=True)
        claims = None
        raw_claims = self.headers.get('X-Pgstack-Claims')  # first value, like Go and Node
        if raw_claims is not None:
            try:
                claims = json.loads(utf8(raw_claims), parse_constant=_no_constants)
            except (ValueError, RecursionError):
                return self.send_json(400, {'error': 'bad claims header'})
        headers = {}
        for name, value in self.headers.items():  # keeps duplicates, in order
            headers.setdefault(name.lower(), []).append(utf8(value))
        role, sub = self.headers.get('X-Pgstack-Role'), self.headers.get('X-Pgstack-Sub')
        self.send_json(200, {
            'function': path[len(PREFIX):].split('/', 1)[0],
            'method': self.command,
            'path': target,
            'role': None if role is None else utf8(role),
            'sub': None if sub is None else utf8(sub),
            'claims': claims,
            'headers': headers,
            'body': body.decode('utf-8', errors='replace'),
            'bodyBytes': len(body),
            'runtime': 'python',
        })


def main():
    host = os.environ.get('HOST') or '0.0.0.0'
    port = int(os.environ.get('PORT') or '8000')

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ':' in host else socket.AF_INET
        daemon_threads = True

        def server_bind(self):  # skip HTTPServer's socket.getfqdn(), a slow DNS lookup
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = host, self.server_address[1]

    try:
        httpd = Server((host, port), Handler)
    except OSError as err:  # a port in use, an address not on this machine: one line, not a traceback
        print(f'listen: {host}:{port}: {err.strerror}', file=sys.stderr)
        sys.exit(1)
    shown = f'[{host}]' if ':' in host else host
    print(f'listening on http://{shown}:{httpd.server_address[1]}', flush=True)

    def stop(signum, frame):  # shutdown() blocks until serve_forever returns: call it off-thread
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


if __name__ == '__main__':
    main()
