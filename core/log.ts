/** The logger the host passes in. Entries become one JSON line each on Node. */
export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

export type Logger = (level: LogLevel, message: string, fields?: Record<string, unknown>) => void;

/** A logger that drops everything, for embedding and tests that do not read logs. */
export const silentLogger: Logger = () => {};
