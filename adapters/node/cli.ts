/**
 * `pgstack`: the command line a user would otherwise replace with psql and jwt.io.
 * It finds the database and the secret the way `serve` does: environment first, else the
 * local state folder (`./.pgstack/`).
 */
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { entryFromRow, FUNCTION_NAME, isSafeSub, validateUpstreamUrl, type Role } from '../../core/index.ts';
import { ConfigError, loadConfig, type NodeConfig } from './config.ts';
import { listFunctions, removeFunction, upsertFunction } from './functions-repo.ts';
import { readEmbeddedDatabaseUrl } from './embedded.ts';
import { batchedStdout, createJsonLogger } from './logger.ts';
import { migrate } from './migrate.ts';
import { resolveJwtSecret, startGateway } from './serve.ts';
import { secretCreatedAt } from './local-state.ts';
import { DURATION, mintToken, type MintOptions } from './tokens.ts';

/** How long the banner's anon and service keys are valid from their iat. */
const TEN_YEARS_S = 10 * 365 * 86_400;

const USAGE = `pgstack: polyglot edge functions gateway

Usage:
  pgstack serve                         run the gateway (embedded database when DATABASE_URL is unset)
  pgstack migrate                       apply sql/schema.sql (idempotent)
  pgstack functions add NAME --url URL [--runtime http|deno] [--no-verify-jwt]
                                        [--timeout-ms N] [--max-body-bytes N]
  pgstack functions list
  pgstack functions rm NAME
  pgstack token --role anon|authenticated|service_role [--sub ID] [--expires-in DURATION]
  pgstack help

Environment: DATABASE_URL, JWT_SECRET, PGSTACK_DIR (default ./.pgstack) and the rest of the
configuration table in README.md.`;

/** A mistake in how the command was called: exit 2 with the usage hint. */
class UsageError extends Error {}

const ROLES: readonly Role[] = ['anon', 'authenticated', 'service_role'];

function positiveInt(flag: string, value: string | undefined): number | null {
  if (value === undefined) return null;
  if (!/^\d+$/.test(value) || Number(value) <= 0) throw new UsageError(`${flag} must be a positive whole number, got "${value}"`);
  return Number(value);
}

/** The database the CLI talks to: DATABASE_URL, else the embedded one under the state folder. */
function databaseUrlFor(config: NodeConfig): string {
  if (config.databaseUrl) return config.databaseUrl;
  const url = readEmbeddedDatabaseUrl(config.stateDir);
  if (!url) {
    throw new ConfigError(
      `No database: ${resolve(config.stateDir)} holds no embedded database. Set DATABASE_URL, or run this from the folder where \`npm start\` runs (or set PGSTACK_DIR to its state folder).`,
    );
  }
  return url;
}

/** Turns a connection failure into advice instead of a stack trace. */
function explainDbError(err: unknown, config: NodeConfig): never {
  const code = (err as { code?: string }).code;
  if (code === 'ECONNREFUSED' && !config.databaseUrl) {
    throw new ConfigError('The embedded database is not running: start the gateway (`npm start`) in another terminal, or set DATABASE_URL.');
  }
  if (code === 'ECONNREFUSED' || code === 'ENOTFOUND' || code === 'ETIMEDOUT') {
    throw new ConfigError(`Cannot reach the database (${code}). Check DATABASE_URL.`);
  }
  if (code === '42P01' || code === '3F000') {
    throw new ConfigError('The catalog table does not exist yet: run `pgstack migrate` first.');
  }
  throw err;
}

async function serve(config: NodeConfig): Promise<void> {
  const stdout = batchedStdout();
  const log = createJsonLogger(config.logLevel, stdout.write);
  const running = await startGateway(config, log);
  let stopping = false;
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    log('info', 'shutting down', { signal, graceMs: config.shutdownGraceMs });
    const started = Date.now();
    running.stop().then(
      () => {
        log('info', 'stopped', { ms: Date.now() - started });
        process.exit(0);
      },
      (err) => {
        log('error', 'shutdown failed', { error: String(err) });
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  // A stray rejection (a bug in a path no test found) must not take every function down
  // with the process: it is logged for the operator, and serving goes on.
  process.on('unhandledRejection', (reason) => {
    log('error', 'unhandled rejection', { error: reason instanceof Error ? `${reason.name}: ${reason.message}` : String(reason) });
  });

  // The embedded default is a local playground: show what a newcomer needs to call it.
  // Never with DATABASE_URL: a real deployment's logs get no long-lived service key.
  if (running.embedded && running.jwtSecret) {
    const mint = (role: Role, extra: Omit<MintOptions, 'role' | 'issuer' | 'audience'>) =>
      mintToken(running.jwtSecret!, { role, ...extra, issuer: config.jwtIssuer, audience: config.jwtAudience });
    // The keys carry the secret's creation time as iat, so they stay the same across
    // restarts (as long as the secret does); a JWT_SECRET from the environment has none.
    const createdAt = config.jwtSecret ? undefined : secretCreatedAt(config.stateDir);
    const fixedTimes = createdAt === undefined ? undefined : { issuedAt: createdAt, expiresAt: createdAt + TEN_YEARS_S };
    const anon = await mint('anon', { expiresIn: '10y', fixedTimes });
    const service = await mint('service_role', { expiresIn: '10y', fixedTimes });
    const lines = [
      '',
      `pgstack functions proxy is running (embedded database${running.demo ? ', demo function "hello"' : ''})`,
      '',
      `  Gateway       ${running.url}`,
      `  Database      ${running.databaseUrl}`,
      `  Anon key      ${anon}`,
      `  Service key   ${service}`,
      '',
    ];
    if (running.demo) {
      const user = await mint('authenticated', { sub: 'demo-user', expiresIn: '7d', claims: { email: 'demo@example.com' } });
      lines.push(
        'Call the demo function as a signed-in user (token valid 7 days; mint more with `npx pgstack token`):',
        '',
        `curl -sS -X POST ${running.url}/functions/v1/hello -H "Authorization: Bearer ${user}" -H "Content-Type: application/json" -d '{"hello":"world"}'`,
        '',
      );
    } else {
      lines.push('No demo function (PGSTACK_DEMO=false): register yours with `npx pgstack functions add`.');
      // The row an earlier demo run registered stays (it is the user's catalog), unreachable now.
      const loaded = await Promise.race([running.catalog.firstLoad(), new Promise<undefined>((r) => setTimeout(r, 2_000))]).catch(() => undefined);
      const left = loaded?.functions.get('hello');
      if (left?.upstream.hostname === 'hello' && !config.upstreamHosts.has('hello')) {
        lines.push('The "hello" row an earlier demo run registered answers 502 without the demo: `npx pgstack functions rm hello` removes it.');
      }
      lines.push('');
    }
    stdout.flush(); // the log lines so far first
    process.stdout.write(`${lines.join('\n')}\n`);
  }
}

async function functions(config: NodeConfig, args: string[]): Promise<void> {
  const [sub, ...rest] = args;
  if (sub === 'add') {
    const { values, positionals } = parseArgs({
      args: rest,
      allowPositionals: true,
      options: {
        url: { type: 'string' },
        runtime: { type: 'string', default: 'http' },
        'no-verify-jwt': { type: 'boolean', default: false },
        'timeout-ms': { type: 'string' },
        'max-body-bytes': { type: 'string' },
      },
    });
    const [name, extra] = positionals;
    if (!name) throw new UsageError('functions add needs a NAME');
    if (extra !== undefined) throw new UsageError(`unexpected argument "${extra}"`);
    if (!FUNCTION_NAME.test(name)) throw new UsageError(`NAME must be letters, digits, - and _ (1..128 characters), got "${name}"`);
    if (values.runtime !== 'http' && values.runtime !== 'deno') throw new UsageError(`--runtime must be http or deno, got "${values.runtime}"`);
    if (values.runtime === 'http' && !values.url) throw new UsageError('--url is required for --runtime http (e.g. --url http://my-fn:8000)');
    if (values.runtime === 'deno' && values.url !== undefined) {
      throw new UsageError('--url does not apply to --runtime deno (every deno function is served by EDGE_RUNTIME_URL)');
    }
    if (values.url !== undefined) {
      const checked = validateUpstreamUrl(values.url);
      if (!checked.ok) {
        const hint = /IP literal|dot|localhost|own machine/i.test(checked.reason)
          ? ' (for a function on this machine, use a bare name such as http://my-fn:8000 and start the gateway with UPSTREAM_HOSTS=my-fn=127.0.0.1:8000, the port pinning the name to that one port)'
          : '';
        throw new UsageError(`--url is refused: ${checked.reason}${hint}`);
      }
    }
    const input = {
      name,
      runtime: values.runtime,
      verifyJwt: !values['no-verify-jwt'],
      upstreamUrl: values.url ?? null,
      timeoutMs: positiveInt('--timeout-ms', values['timeout-ms']),
      maxBodyBytes: positiveInt('--max-body-bytes', values['max-body-bytes']),
    } as const;
    const databaseUrl = databaseUrlFor(config);
    const created = await upsertFunction(databaseUrl, input).catch((err) => explainDbError(err, config));
    const limits = [
      `verify_jwt ${input.verifyJwt}`,
      `timeout ${input.timeoutMs === null ? 'default' : `${input.timeoutMs} ms`}`,
      `body limit ${input.maxBodyBytes === null ? 'default' : `${input.maxBodyBytes} bytes`}`,
    ];
    process.stdout.write(`${created ? 'added' : 'updated'} ${name} -> ${input.upstreamUrl ?? 'EDGE_RUNTIME_URL'} (${limits.join(', ')})\n`);
    if (input.runtime === 'deno' && !config.edgeRuntimeUrl) {
      process.stderr.write('warning: EDGE_RUNTIME_URL is not set here; a gateway without it drops deno functions (404)\n');
    }
    return;
  }
  if (sub === 'list') {
    if (rest.length) throw new UsageError(`unexpected argument "${rest[0]}"`);
    const rows = await listFunctions(databaseUrlFor(config)).catch((err) => explainDbError(err, config));
    if (rows.length === 0) {
      process.stdout.write('no functions registered\n');
      return;
    }
    const lines = rows.map((row) => {
      const entry = entryFromRow(row, { edgeRuntimeUrl: config.edgeRuntimeUrl });
      const status = 'reason' in entry ? `DROPPED: ${entry.reason}` : 'ok';
      const orDefault = (value: unknown) => (value === null || value === undefined ? 'default' : String(value));
      return [String(row.name), String(row.runtime), row.verify_jwt ? 'yes' : 'no', String(row.upstream_url ?? '-'), orDefault(row.timeout_ms), orDefault(row.max_body_bytes), status];
    });
    const table = [['NAME', 'RUNTIME', 'VERIFY_JWT', 'UPSTREAM', 'TIMEOUT_MS', 'MAX_BODY_BYTES', 'STATUS'], ...lines.map((l) => l.map(printable))];
    const widths = table[0]!.map((_, i) => Math.max(...table.map((r) => r[i]!.length)));
    for (const r of table) process.stdout.write(`${r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')}\n`);
    return;
  }
  if (sub === 'rm') {
    const [name, extra] = rest;
    if (!name) throw new UsageError('functions rm needs a NAME');
    if (extra !== undefined) throw new UsageError(`unexpected argument "${extra}"`);
    if (!FUNCTION_NAME.test(name)) throw new UsageError(`NAME must be letters, digits, - and _ (1..128 characters), got "${name}"`);
    const removed = await removeFunction(databaseUrlFor(config), name).catch((err) => explainDbError(err, config));
    if (!removed) throw new ConfigError(`no function named "${name}"`);
    process.stdout.write(`removed ${name}\n`);
    return;
  }
  throw new UsageError(sub ? `unknown functions command "${sub}" (add, list, rm)` : 'functions needs a command: add, list or rm');
}

async function token(config: NodeConfig, args: string[]): Promise<void> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      role: { type: 'string' },
      sub: { type: 'string' },
      'expires-in': { type: 'string', default: '1h' },
    },
  });
  if (positionals.length) throw new UsageError(`unexpected argument "${positionals[0]}"`);
  const role = values.role as Role | undefined;
  if (!role || !ROLES.includes(role)) throw new UsageError(`--role must be one of ${ROLES.join(', ')}${values.role ? `, got "${values.role}"` : ''}`);
  if (role === 'authenticated' && !values.sub) throw new UsageError('--sub is required for --role authenticated (the user id the function sees)');
  if (role === 'anon' && values.sub) throw new UsageError('--sub does not apply to --role anon (anon callers have no sub)');
  if (values.sub !== undefined && (values.sub === '' || !isSafeSub(values.sub))) {
    throw new UsageError('--sub must be 1..256 printable ASCII characters, without leading or trailing spaces');
  }
  const expiresIn = values['expires-in'];
  if (!DURATION.test(expiresIn) || /^0+\s*[a-z]*$/i.test(expiresIn)) {
    throw new UsageError(`--expires-in must be a positive duration like 30m, 1h, 7d or 3600, got "${expiresIn}"`);
  }
  const secret = resolveJwtSecret(config, false);
  if (!secret) throw new ConfigError(`No secret: set JWT_SECRET, or run \`npm start\` once in this folder so ${join(resolve(config.stateDir), 'jwt-secret')} exists.`);
  const jwt = await mintToken(secret, { role, sub: values.sub, expiresIn, issuer: config.jwtIssuer, audience: config.jwtAudience });
  process.stdout.write(`${jwt}\n`);
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...args] = argv;
  try {
    if (!command || command === 'help' || command === '--help' || command === '-h') {
      process.stdout.write(`${USAGE}\n`);
      return command ? 0 : 2;
    }
    const config = loadConfig();
    switch (command) {
      case 'serve':
        if (args.length) throw new UsageError(`serve takes no arguments (configure it with environment variables), got "${args[0]}"`);
        await serve(config);
        return -1; // keeps running
      case 'migrate': {
        if (args.length) throw new UsageError(`migrate takes no arguments (it uses DATABASE_URL or the embedded database), got "${args[0]}"`);
        const url = databaseUrlFor(config);
        await migrate(url, { force: true }).catch((err) => explainDbError(err, config));
        process.stdout.write('schema applied\n');
        return 0;
      }
      case 'functions':
        await functions(config, args);
        return 0;
      case 'token':
        await token(config, args);
        return 0;
      default:
        throw new UsageError(`unknown command "${command}"`);
    }
  } catch (err) {
    const parseError = parseArgsMessage(err);
    if (err instanceof UsageError || parseError !== undefined) {
      process.stderr.write(`pgstack: ${parseError ?? (err as Error).message}\nRun \`pgstack help\` for usage.\n`);
      return 2;
    }
    if (err instanceof ConfigError) {
      process.stderr.write(`pgstack: ${err.message}\n`);
      return 1;
    }
    process.stderr.write(`pgstack: ${err instanceof Error ? err.message : String(err)}\n`);
    return 1;
  }
}

/**
 * node:util parseArgs errors, said plainly: its own messages give advice about positional
 * arguments (`-- "--bogus"`) that does not apply to this command line, and call a negative
 * number "ambiguous" as if it could be passed another way.
 */
function parseArgsMessage(err: unknown): string | undefined {
  const code = (err as { code?: string }).code;
  if (typeof code !== 'string' || !code.startsWith('ERR_PARSE_ARGS')) return undefined;
  const message = (err as Error).message;
  const option = /'(--?[^'\s]+)/.exec(message)?.[1];
  if (code === 'ERR_PARSE_ARGS_UNKNOWN_OPTION') return `unknown option ${option ?? ''}`.trim();
  if (code === 'ERR_PARSE_ARGS_INVALID_OPTION_VALUE') {
    // "--timeout-ms -5": the value looks like an option. "--no-verify-jwt=x": a flag given a value.
    if (/ambiguous/.test(message)) return `${option ?? 'the option'} needs a value, and one starting with "-" is not accepted (numbers must be positive)`;
    if (/argument missing/.test(message)) return `${option ?? 'the option'} needs a value`;
    return `${option ?? 'the option'} takes no value`;
  }
  if (code === 'ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL') return 'unexpected argument';
  return message;
}

/**
 * A catalog value as it may reach an operator's terminal: a row can hold anything, so
 * controls (escape sequences that would drive the terminal), format characters (bidi
 * overrides and marks, zero-width ones), default-ignorable, private-use, unassigned and
 * line/paragraph separator code points are shown as \u{XX}.
 */
function printable(text: string): string {
  return text.replace(/[\p{Cc}\p{Cf}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Default_Ignorable_Code_Point}]/gu, (c) => `\\u{${c.codePointAt(0)!.toString(16)}}`);
}
