import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { validateUpstreamUrl, type UpstreamTarget } from './upstream.ts';

const REFUSED: [label: string, raw: unknown][] = [
  ['empty path segment (scheme-relative request line)', 'http://fn:8000//x'],
  ['empty segment inside the base path', 'http://fn:8000/a//b'],
  ['dotted IPv4 loopback', 'http://127.0.0.1'],
  ['decimal IPv4', 'http://2130706433'],
  ['hex-dotted IPv4', 'http://0x7f.1'],
  ['hex IPv4', 'http://0x7f000001'],
  ['a lone hex number', 'http://0x7f'],
  ['shorthand IPv4', 'http://127.1'],
  ['a lone zero (0.0.0.0)', 'http://0'],
  ['octal IPv4', 'http://017700000001'],
  ['IPv6 loopback', 'http://[::1]'],
  ['IPv4-mapped IPv6, dotted', 'http://[::ffff:127.0.0.1]'],
  ['IPv4-mapped IPv6, hex', 'http://[::ffff:7f00:1]'],
  ['cloud metadata address', 'http://169.254.169.254'],
  ['a trailing dot', 'http://fn.'],
  ['an FQDN', 'http://fn.internal'],
  ['a dotted name', 'http://a.b.c'],
  ['userinfo', 'http://user@fn'],
  ['userinfo with password and port', 'http://user:pw@fn:80'],
  ['empty userinfo', 'http://@fn'],
  ['a percent-encoded host', 'http://f%6e'],
  ['full-width letters (IDNA maps them to ascii)', 'http://ｆｎ'],
  ['a tab the parser would drop', 'http://fn\t'],
  ['a newline the parser would drop', 'http://f\nn'],
  ['a backslash before userinfo', 'http://fn\\@evil'],
  ['backslashes as slashes', 'http:\\\\fn'],
  ['a backslash after the port', 'http://fn:80\\x'],
  ['ftp', 'ftp://fn'],
  ['file', 'file:///etc/passwd'],
  ['javascript', 'javascript:alert(1)'],
  ['scheme without slashes', 'http:fn'],
  ['scheme with one slash', 'http:/fn'],
  ['localhost', 'http://localhost'],
  ['LOCALHOST with a port', 'http://LOCALHOST:80'],
  ['ip6-localhost', 'http://ip6-localhost'],
  ['ip6-loopback', 'http://ip6-loopback'],
  ['metadata', 'http://metadata'],
  ['instance-data', 'http://instance-data'],
  ["systemd's default router name", 'http://_gateway:80'],
  ["systemd's own LAN address name", 'http://_outbound'],
  ["systemd's stub resolver name", 'http://_localdnsstub:53'],
  ['the Kubernetes API server', 'https://kubernetes'],
  ['a query string', 'http://fn?x=1'],
  ['a fragment', 'http://fn#x'],
  ['a dot segment in the path', 'http://fn/a/../b'],
  ['an encoded dot segment in the path', 'http://fn/%2e%2e/x'],
  ['a single-dot segment', 'http://fn/./x'],
  ['an encoded slash in the path', 'http://fn/a%2Fb'],
  ['a space in the path', 'http://fn/a b'],
  ['port 0', 'http://fn:0'],
  ['a port out of range', 'http://fn:99999'],
  ['no host', 'http://'],
  ['a port but no host', 'http://:80'],
  ['the empty string', ''],
  ['null', null],
  ['undefined', undefined],
  ['a number', 42],
  ['an object', { toString: () => 'http://fn' }],
  ['a 64-character label', `http://${'a'.repeat(64)}`],
  ['an over-long URL', `http://fn/${'p'.repeat(3000)}`],
];

describe('validateUpstreamUrl refuses', () => {
  for (const [label, raw] of REFUSED) {
    it(`${label}: ${JSON.stringify(raw)}`, () => {
      const result = validateUpstreamUrl(raw);
      expect(result.ok).toBe(false);
      if (!result.ok) expect(result.reason).toMatch(/^upstream_url /);
    });
  }
});

const ACCEPTED: [raw: string, expected: UpstreamTarget][] = [
  ['http://fn_a', { protocol: 'http:', hostname: 'fn_a', port: 80, origin: 'http://fn_a:80', basePath: '' }],
  ['http://hello-go:8000', { protocol: 'http:', hostname: 'hello-go', port: 8000, origin: 'http://hello-go:8000', basePath: '' }],
  // WHATWG lowercases scheme and host; the validator compares case-insensitively and reports the canonical host.
  ['HTTP://Hello-Go:8000', { protocol: 'http:', hostname: 'hello-go', port: 8000, origin: 'http://hello-go:8000', basePath: '' }],
  ['https://fn:8443', { protocol: 'https:', hostname: 'fn', port: 8443, origin: 'https://fn:8443', basePath: '' }],
  ['https://fn', { protocol: 'https:', hostname: 'fn', port: 443, origin: 'https://fn:443', basePath: '' }],
  ['http://localhost-fn', { protocol: 'http:', hostname: 'localhost-fn', port: 80, origin: 'http://localhost-fn:80', basePath: '' }],
  ['http://9fn:1', { protocol: 'http:', hostname: '9fn', port: 1, origin: 'http://9fn:1', basePath: '' }],
  [`http://${'b'.repeat(63)}`, { protocol: 'http:', hostname: 'b'.repeat(63), port: 80, origin: `http://${'b'.repeat(63)}:80`, basePath: '' }],
  ['http://fn:8000/base/', { protocol: 'http:', hostname: 'fn', port: 8000, origin: 'http://fn:8000', basePath: '/base' }],
  ['http://fn/base/path', { protocol: 'http:', hostname: 'fn', port: 80, origin: 'http://fn:80', basePath: '/base/path' }],
  ['http://fn/', { protocol: 'http:', hostname: 'fn', port: 80, origin: 'http://fn:80', basePath: '' }],
];

describe('validateUpstreamUrl accepts', () => {
  for (const [raw, expected] of ACCEPTED) {
    it(`${raw} -> ${expected.origin}${expected.basePath}`, () => {
      const result = validateUpstreamUrl(raw);
      expect(result).toEqual({ ok: true, target: expected });
      expect(new URL(raw).hostname).toBe(expected.hostname);
    });
  }
});

describe('validateUpstreamUrl properties', () => {
  const HOST = /^[a-z0-9_][a-z0-9_-]{0,62}$/;

  function checkAccepted(raw: string): void {
    const result = validateUpstreamUrl(raw);
    if (!result.ok) return;
    const { hostname, port, origin, protocol } = result.target;
    expect(hostname).toMatch(HOST);
    expect(hostname).not.toContain('.');
    expect(hostname).not.toMatch(/^[0-9]+$/);
    expect(new URL(raw).hostname).toBe(hostname);
    expect(['http:', 'https:']).toContain(protocol);
    expect(port).toBeGreaterThan(0);
    expect(port).toBeLessThan(65536);
    expect(origin).toBe(`${protocol}//${hostname}:${port}`);
  }

  it('never throws on any string, and every accepted URL names a bare, non-numeric host the parser keeps', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string(), fc.string({ unit: 'binary' }), fc.string({ unit: 'grapheme' })), (raw) => {
        expect(() => validateUpstreamUrl(raw)).not.toThrow();
        checkAccepted(raw);
      }),
      { numRuns: 2000 },
    );
  });

  it('the same holds for URL-shaped strings built from hostile pieces', () => {
    const scheme = fc.constantFrom('http://', 'https://', 'HTTP://', 'hTtPs://', 'ftp://', 'http:\\\\', 'http:/', 'ws://');
    const hostChars = [...'abcxyzABCXYZ0189_-.%@:[]\\ \t\u3000ｆｎ０x'];
    const host = fc.oneof(
      fc.string({ unit: fc.constantFrom(...hostChars), maxLength: 20 }),
      fc.constantFrom('127.0.0.1', '0x7f000001', '2130706433', '0', '127.1', '[::1]', 'localhost', 'LocalHost', 'fn', 'Hello-Go', 'metadata', '017700000001'),
    );
    const port = fc.oneof(fc.constant(''), fc.integer({ min: 0, max: 70000 }).map((p) => `:${p}`), fc.constantFrom(':', ':080', ':8o'));
    const path = fc.oneof(fc.constant(''), fc.string({ unit: fc.constantFrom(...'/ab.%2eEfF?#'), maxLength: 12 }).map((p) => `/${p}`));
    fc.assert(
      fc.property(scheme, host, port, path, (s, h, p, rest) => {
        const raw = s + h + p + rest;
        expect(() => validateUpstreamUrl(raw)).not.toThrow();
        checkAccepted(raw);
      }),
      { numRuns: 3000 },
    );
  });

  it('every accepted URL yields a base path the parser keeps unchanged (no dot segments, query or fragment)', () => {
    const raw = fc
      .tuple(fc.constantFrom('fn', 'hello-go', 'a_b'), fc.string({ unit: fc.constantFrom(...'/ab.%2eEfF?#'), maxLength: 16 }))
      .map(([h, p]) => `http://${h}:8000/${p}`);
    fc.assert(
      fc.property(raw, (r) => {
        const result = validateUpstreamUrl(r);
        if (!result.ok) return;
        const url = new URL(r);
        expect(url.search).toBe('');
        expect(url.hash).toBe('');
        expect(result.target.basePath).toBe(url.pathname.replace(/\/+$/, ''));
        expect(result.target.basePath.split('/')).not.toContain('..');
        expect(result.target.basePath.split('/')).not.toContain('.');
        expect(result.target.basePath).not.toMatch(/%2e|%2f/i);
      }),
      { numRuns: 2000 },
    );
  });
});
