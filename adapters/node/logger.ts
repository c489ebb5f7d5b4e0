/** JSON-lines logger for the Node host: one line an entry on stdout. */
import type { Logger, LogLevel } from '../../core/index.ts';

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/** Field names the line itself starts with; fields spelled so take their place (spread order). */
const OWN_KEYS = ['ts', 'level', 'msg'] as const;

/** Lines held before a write, at most; more are written at once. */
const BATCH_BYTES = 64 * 1024;

/**
 * A writer for stdout that batches the lines of one event-loop turn into one write: under
 * load one write a request was a system call a request (~5% of a proxied request's CPU).
 * Lines leave at the end of the turn (setImmediate), at BATCH_BYTES, on flush() and at exit,
 * so a crash loses none; only SIGKILL can take the last turn's lines.
 */
export function batchedStdout(out: NodeJS.WritableStream = process.stdout): { write: (line: string) => void; flush: () => void } {
  let pending = '';
  let scheduled = false;
  const flush = (): void => {
    scheduled = false;
    if (pending === '') return;
    const text = pending;
    pending = '';
    out.write(text);
  };
  process.on('exit', flush);
  return {
    write(line) {
      pending += line;
      if (pending.length >= BATCH_BYTES) flush();
      else if (!scheduled) {
        scheduled = true;
        setImmediate(flush);
      }
    },
    flush,
  };
}

export function createJsonLogger(level: LogLevel, write: (line: string) => void = (l) => process.stdout.write(l)): Logger {
  const min = RANK[level];
  // One request line a request: the timestamp is formatted once a millisecond, and the
  // fields object is serialised as it is instead of being copied into a new object first.
  // The line is the same as JSON.stringify({ ts, level, msg, ...fields }) would write.
  let stampedAt = NaN;
  let stamp = '';
  return (entryLevel, msg, fields) => {
    if (RANK[entryLevel] < min) return;
    const now = Date.now();
    if (now !== stampedAt) {
      stampedAt = now;
      stamp = new Date(now).toISOString();
    }
    if (typeof msg !== 'string' || typeof entryLevel !== 'string' || (fields !== undefined && OWN_KEYS.some((k) => Object.hasOwn(fields, k)))) {
      write(`${JSON.stringify({ ts: stamp, level: entryLevel, msg, ...fields })}\n`);
      return;
    }
    const head = `{"ts":"${stamp}","level":${JSON.stringify(entryLevel)},"msg":${JSON.stringify(msg)}`;
    const rest = fields === undefined ? '{}' : JSON.stringify(fields);
    write(rest === '{}' ? `${head}}\n` : `${head},${rest.slice(1)}\n`);
  };
}
