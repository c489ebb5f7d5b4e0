import { Writable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { batchedStdout, createJsonLogger } from './logger.ts';

function sink(): { out: Writable; writes: string[] } {
  const writes: string[] = [];
  const out = new Writable({
    write(chunk: Buffer, _encoding, callback) {
      writes.push(chunk.toString());
      callback();
    },
  });
  return { out, writes };
}

const turn = () => new Promise((resolve) => setImmediate(resolve));

describe('createJsonLogger', () => {
  it('writes one JSON line an entry, with ts, level and msg first and the fields after', () => {
    const lines: string[] = [];
    const log = createJsonLogger('info', (line) => lines.push(line));
    log('debug', 'hidden');
    log('info', 'request', { status: 200, path: '/x"y' });
    log('warn', 'odd', { msg: 'a field named msg' });
    expect(lines).toHaveLength(2);
    for (const line of lines) expect(line.endsWith('\n')).toBe(true);
    const [first, second] = lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(Object.keys(first!)).toEqual(['ts', 'level', 'msg', 'status', 'path']);
    expect(first).toMatchObject({ level: 'info', msg: 'request', status: 200, path: '/x"y' });
    expect(second).toMatchObject({ level: 'warn', msg: 'a field named msg' });
  });
});

describe('batchedStdout', () => {
  it('writes the lines of one event-loop turn as one write, in order', async () => {
    const { out, writes } = sink();
    const batch = batchedStdout(out);
    batch.write('a\n');
    batch.write('b\n');
    batch.write('c\n');
    expect(writes).toEqual([]);
    await turn();
    expect(writes).toEqual(['a\nb\nc\n']);
    batch.write('d\n');
    await turn();
    expect(writes).toEqual(['a\nb\nc\n', 'd\n']);
  });

  it('writes at once past 64 KiB, and on flush()', async () => {
    const { out, writes } = sink();
    const batch = batchedStdout(out);
    batch.write('x'.repeat(70 * 1024));
    expect(writes).toHaveLength(1);
    batch.write('y\n');
    batch.flush();
    expect(writes[1]).toBe('y\n');
    await turn();
    expect(writes).toHaveLength(2); // nothing left for the scheduled flush
  });
});
