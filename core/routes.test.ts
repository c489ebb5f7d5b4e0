import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { isGatewayError } from './errors.ts';
import { ALLOW_HEADER, createRouteTable, parseFunctionTarget, PROXY_METHODS } from './routes.ts';

describe('parseFunctionTarget: accepted targets keep the name and the target byte for byte', () => {
  const table: [target: string, name: string][] = [
    ['/functions/v1/fn', 'fn'],
    ['/functions/v1/fn/', 'fn'],
    ['/functions/v1/fn?x=1', 'fn'],
    ['/functions/v1/Hello_World-2', 'Hello_World-2'],
    ['/functions/v1/fn/a/b%2Fc?x=%20y&x=2&empty=&%F0%9F%98%80=1', 'fn'],
    ['/functions/v1/fn//127.0.0.1:5432/x', 'fn'],
    ['/functions/v1/fn/...', 'fn'],
    ['/functions/v1/fn/..a/a..', 'fn'],
    ['/functions/v1/fn/%2e%2e%2e', 'fn'],
    ['/functions/v1/fn?path=../../etc&y=%2e%2e', 'fn'],
    ['/functions/v1/fn?a=\\', 'fn'],
    ['/functions/v1/fn/a;b=1/c%2Fd%5Ce', 'fn'],
    ['/functions/v1/fn/..x%2f.x;', 'fn'],
    [`/functions/v1/${'n'.repeat(128)}`, 'n'.repeat(128)],
    // Look-alikes of the lenient forms below that no decoder reads as a dot segment.
    ['/functions/v1/fn/%e2%80%a6', 'fn'], // horizontal ellipsis: three dots
    ['/functions/v1/fn/..%20x', 'fn'],
    ['/functions/v1/fn/%c0%af', 'fn'], // overlong '/': a separator, not a dot
    ['/functions/v1/fn/%ef%bc%8ex', 'fn'],
    ['/functions/v1/fn/%u002ex', 'fn'],
    ['/functions/v1/fn/..%01x', 'fn'],
    ['/functions/v1/fn/%e3%80%82%e3%80%82', 'fn'], // ideographic full stops: no decoder reads them as dots
  ];
  for (const [target, name] of table) {
    it(`${target.slice(0, 80)} -> ${name.slice(0, 20)}`, () => {
      expect(parseFunctionTarget(target)).toEqual({ name, target });
    });
  }
});

describe('parseFunctionTarget: dot segments, backslashes and encoded separators -> 400 bad_path', () => {
  const table = [
    '/functions/v1/fn/..',
    '/functions/v1/fn/../other',
    '/functions/v1/fn/.',
    '/functions/v1/fn/./x',
    '/functions/v1/fn/%2e%2e/other',
    '/functions/v1/fn/%2E%2E/other',
    '/functions/v1/fn/%2e%2E/other',
    '/functions/v1/fn/.%2e/other',
    '/functions/v1/fn/.%2E/other',
    '/functions/v1/fn/%2e./other',
    '/functions/v1/fn/%2e/other',
    '/functions/v1/fn/a/b/../../../other',
    '/functions/v1/fn/x/..?q=1',
    '/functions/v1/../fn',
    '/functions/v1/%2e%2e/fn',
    '/functions/v1/fn\\..\\other',
    '/functions/v1/fn/a\\b',
    '/functions/v1/fn%2fother',
    '/functions/v1/fn%2Fother',
    '/functions/v1/fn%2f..%2fother',
    '/functions/v1/fn/..%2f..%2fother',
    '/functions/v1/fn/..%2Fother',
    '/functions/v1/fn/x%2f..',
    '/functions/v1/fn/%2e%2e%2fother',
    '/functions/v1/fn/..%5cother',
    '/functions/v1/fn/..;/other',
    '/functions/v1/fn/..;x=1/other',
    '/functions/v1/fn/%2e%2e;/other',
    '/functions/v1/fn/.;x/other',
    '/functions/v1/fn/..%3b/other',
    '/functions/v1/fn/%2e%2e%3b/other',
    '/functions/v1/fn/%2e%2e%3Bx/other',
    '/functions/v1/fn/.%3bx/other',
    '/functions/v1/fn/..%00/other',
    '/functions/v1/fn/..%00.png/other',
    '/functions/v1/fn/..%3f/other',
    '/functions/v1/fn/..%23/other',
    // Lenient decoders: trimmed whitespace, IIS %u, overlong UTF-8, Unicode compatibility forms.
    '/functions/v1/fn/..%20/other',
    '/functions/v1/fn/%20..%09/other',
    '/functions/v1/fn/..%0b/other',
    '/functions/v1/fn/..%c2%a0/other',
    '/functions/v1/fn/%u002e%u002e/other',
    '/functions/v1/fn/%U002E./other',
    '/functions/v1/fn/..%u002f..%u002fother',
    '/functions/v1/fn/%c0%ae%c0%ae/other',
    '/functions/v1/fn/%C0%AE./other',
    '/functions/v1/fn/%e0%80%ae%e0%80%ae/other',
    '/functions/v1/fn/%f0%80%80%ae./other',
    '/functions/v1/fn/..%c0%af..%c0%afother',
    '/functions/v1/fn/..%c1%9cother',
    '/functions/v1/fn/%ef%bc%8e%ef%bc%8e/other',
    '/functions/v1/fn/%e2%80%a5/other',
    '/functions/v1/fn/..%ef%bc%8fother',
    '/functions/v1/fn/..%ef%bc%bcother',
    '/functions/v1/fn/%ef%b9%92./other',
    // What Java, Python and Go trim, and bytes read as Latin-1:
    '/functions/v1/fn/..%01/other',
    '/functions/v1/fn/..%1c/other',
    '/functions/v1/fn/..%1f/other',
    '/functions/v1/fn/..%7f/other',
    '/functions/v1/fn/..%c2%85/other',
    '/functions/v1/fn/..%85/other',
    '/functions/v1/fn/..%a0/other',
    '/functions/v1/fn/%e3%80%80../other',
    '/functions/v1/fn/..%e2%80%8b/other',
    // Overlong UTF-8 of 5 and 6 bytes:
    '/functions/v1/fn/%f8%80%80%80%ae./other',
    '/functions/v1/fn/%fc%80%80%80%80%ae%fc%80%80%80%80%ae/other',
    '/functions/v1/fn/..%f8%80%80%80%af..%fc%80%80%80%81%9cother',
    '/functions/v1/f%6e',
    '/functions/v1/fn%5cother',
    '/functions/v1/fn/a b',
    '/functions/v1/fn/\u00e9',
    '/functions/v1/fn/\t',
    '/elsewhere/functions/v1/fn',
  ];
  for (const target of table) {
    it(JSON.stringify(target), () => {
      const result = parseFunctionTarget(target);
      expect(isGatewayError(result) && result.code).toBe('bad_path');
    });
  }
});

describe('parseFunctionTarget: names outside the slug rule -> 404 function_not_found', () => {
  const table = [
    '/functions/v1/',
    '/functions/v1/?x=1',
    '/functions/v1//fn',
    '/functions/v1/a.b',
    '/functions/v1/fn@evil',
    '/functions/v1/fn:8000',
    '/functions/v1/fn~1',
    `/functions/v1/${'n'.repeat(129)}`,
  ];
  for (const target of table) {
    it(JSON.stringify(target), () => {
      const result = parseFunctionTarget(target);
      expect(isGatewayError(result) && result.code).toBe('function_not_found');
    });
  }
});

describe('parseFunctionTarget properties', () => {
  it('never throws, and an accepted target has no dot segment in any encoding and a slug name', () => {
    const chars = [...'abAB09-_./%2eEfF5cC\\?=&; '];
    const target = fc.string({ unit: fc.constantFrom(...chars), maxLength: 30 }).map((s) => `/functions/v1/${s}`);
    fc.assert(
      fc.property(target, (t) => {
        const result = parseFunctionTarget(t);
        if (isGatewayError(result)) {
          expect(['bad_path', 'function_not_found']).toContain(result.code);
          return;
        }
        expect(result.target).toBe(t);
        expect(result.name).toMatch(/^[A-Za-z0-9_-]{1,128}$/);
        const path = t.split('?')[0] as string;
        expect(path).not.toContain('\\');
        for (const segment of path.split(/\/|%2f|%5c/i)) {
          const decoded = decodeDots(segment).split(';')[0];
          expect(decoded === '.' || decoded === '..', `segment ${segment}`).toBe(false);
        }
        expect(path.startsWith(`/functions/v1/${result.name}`)).toBe(true);
      }),
      { numRuns: 3000 },
    );
  });
});

function decodeDots(s: string): string {
  return s.replace(/%2e/gi, '.');
}

describe('route table', () => {
  const kind = async (path: string, metrics = true) => createRouteTable({ metrics })(new Request(`http://gateway.test${path}`));

  const table: [string, string | undefined][] = [
    ['/healthz', 'health'],
    ['/readyz', 'ready'],
    ['/metrics', 'metrics'],
    ['/functions/v1/fn', 'function'],
    ['/functions/v1/fn/a/b?x=1', 'function'],
    ['/', undefined],
    ['/nope', undefined],
    ['/Healthz', undefined],
    ['/functions/v2/fn', undefined],
    ['/functions/v1x', undefined],
  ];
  for (const [path, expected] of table) it(`${path} -> ${expected}`, async () => expect(await kind(path)).toBe(expected));

  it('/metrics is not a route when metrics are disabled', async () => {
    expect(await kind('/metrics', false)).toBeUndefined();
  });

  it('Allow lists exactly the proxied methods', () => {
    expect(ALLOW_HEADER.split(', ').sort()).toEqual(['DELETE', 'GET', 'HEAD', 'OPTIONS', 'PATCH', 'POST', 'PUT']);
    expect([...PROXY_METHODS].sort()).toEqual(ALLOW_HEADER.split(', ').sort());
  });
});

describe('the bare prefix', () => {
  it('/functions/v1 without a name is 404 function_not_found, not bad_path', () => {
    for (const target of ['/functions/v1', '/functions/v1?x=1']) {
      const result = parseFunctionTarget(target);
      expect(isGatewayError(result) && result.code).toBe('function_not_found');
    }
  });
});
