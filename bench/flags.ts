/**
 * Command-line flags of `npm run bench` and `npm run soak`: node:util parseArgs, with
 * `--help` and a bad flag or value answered by the usage text and exit code 2 instead of a
 * stack trace.
 */
import { parseArgs, type ParseArgsConfig } from 'node:util';

type Options = NonNullable<ParseArgsConfig['options']>;

export function parseFlags<T extends Options>(options: T, usage: string, argv: string[] = process.argv.slice(2)) {
  const fail = (message: string): never => {
    process.stderr.write(`${message}\n\n${usage}\n`);
    process.exit(2);
  };
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(`${usage}\n`);
    process.exit(0);
  }
  try {
    return parseArgs({ args: argv, options, strict: true }).values;
  } catch (err) {
    return fail(err instanceof Error ? err.message.split('\n')[0]! : String(err));
  }
}

/** A whole number >= min from a flag's text, or the usage and exit 2. */
export function wholeFlag(name: string, raw: string | undefined, min: number, usage: string): number {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) {
    process.stderr.write(`--${name} must be a whole number >= ${min}, got ${JSON.stringify(raw)}\n\n${usage}\n`);
    process.exit(2);
  }
  return n;
}
