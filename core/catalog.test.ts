import { describe, expect, it } from 'vitest';
import { buildSnapshot, type CatalogRow } from './catalog.ts';

const row = (name: string, upstream_url: unknown, extra: Partial<CatalogRow> = {}): CatalogRow => ({ name, runtime: 'http', verify_jwt: true, upstream_url, ...extra });

describe('buildSnapshot', () => {
  it('keeps good rows, drops bad ones with a reason, and never throws on odd values', () => {
    const snapshot = buildSnapshot([
      row('ok', 'http://fn-a:8000'),
      row('ip', 'http://127.0.0.1:8000'),
      row('bad name!', 'http://fn:1'),
      { name: 'odd', runtime: 'python', verify_jwt: true, upstream_url: 'http://fn:1' },
      row('num', 42),
      row('neg', 'http://fn:1', { timeout_ms: -1 }),
    ]);
    expect([...snapshot.functions.keys()]).toEqual(['ok']);
    expect(snapshot.dropped.map((d) => d.name)).toEqual(['ip', 'bad name!', 'odd', 'num', 'neg']);
    expect(Object.isFrozen(snapshot)).toBe(true);
  });

  it('a verify_jwt that is not exactly false fails closed', () => {
    const snapshot = buildSnapshot([row('a', 'http://fn:1', { verify_jwt: null }), row('b', 'http://fn:1', { verify_jwt: 'false' }), row('c', 'http://fn:1', { verify_jwt: false })]);
    expect(['a', 'b', 'c'].map((n) => snapshot.functions.get(n)?.verifyJwt)).toEqual([true, true, false]);
  });

  it('validates each URL once per load and reuses the previous load validations (frozen, shared)', () => {
    const first = buildSnapshot([row('a', 'http://shared:8000'), row('b', 'http://shared:8000'), row('c', 'http://own:1')]);
    const a = first.functions.get('a')!;
    expect(first.functions.get('b')!.upstream).toBe(a.upstream);
    expect(Object.isFrozen(a.upstream)).toBe(true);
    const second = buildSnapshot([row('a', 'http://shared:8000'), row('d', 'http://new:2')], { previous: first });
    expect(second.functions.get('a')!.upstream).toBe(a.upstream);
    expect(second.functions.get('d')!.upstream.origin).toBe('http://new:2');
    // Only this load's URLs are carried on: a URL no row names any more is forgotten.
    expect([...second.checkedUrls.keys()].sort()).toEqual(['http://new:2', 'http://shared:8000']);
  });

  it('a refused URL stays refused when reused', () => {
    const first = buildSnapshot([row('a', 'http://169.254.169.254')]);
    const second = buildSnapshot([row('b', 'http://169.254.169.254')], { previous: first });
    expect(second.functions.size).toBe(0);
    expect(second.dropped).toEqual([{ name: 'b', reason: first.dropped[0]!.reason }]);
  });
});
