/** JSON-lines logger for the Node host: one line an entry on stdout. */
import type { Logger, LogLevel } from '../../core/index.ts';

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export function createJsonLogger(level: LogLevel, write: (line: string) => void = (l) => process.stdout.write(l)): Logger {
  const min = RANK[level];
  return (entryLevel, msg, fields) => {
    if (RANK[entryLevel] < min) return;
    write(`${JSON.stringify({ ts: new Date().toISOString(), level: entryLevel, msg, ...fields })}\n`);
  };
}
