/**
 * UPSTREAM_HOSTS: the operator's explicit name -> address mapping (like compose `extra_hosts`).
 * A mapped name is dialled at that address with no range check: the operator meant it.
 * With a port, the name is dialled on that port only (any other is refused at connect time),
 * so mapping a name to loopback does not open every local port to catalog rows.
 *
 *   UPSTREAM_HOSTS="hello-go=127.0.0.1:8001, legacy=10.0.0.7,v6fn=[fd00::12],v6pinned=[fd00::13]:9000"
 *
 * An IPv6 address is always in brackets: `fd00::1:8000` is itself a valid address, so a
 * port after a bare one could not be told from its last group.
 */
import net from 'node:net';

export interface MappedHost {
  /** An IP literal. */
  readonly address: string;
  /** When set, the only port the name may be dialled on. */
  readonly port?: number;
}

/** The same bare-hostname rule as core/upstream.ts (one DNS label, after lowercasing). */
const BARE_HOST = /^[a-z0-9_][a-z0-9_-]{0,62}$/;
/** `1.2.3.4`, `1.2.3.4:80`, `[v6]`, `[v6]:80`. */
const WITH_PORT = /^(?:\[([^\]]*)\]|([^:\[\]]*))(?::(\d{1,5}))?$/;

function fail(item: string, reason: string): never {
  throw new Error(`UPSTREAM_HOSTS: bad item ${JSON.stringify(item)}: ${reason} (expected name=address or name=address:port, comma-separated)`);
}

function parseTarget(item: string, target: string): MappedHost {
  if (net.isIP(target) === 6) fail(item, `an IPv6 address goes in brackets, with or without a port: [${target}] or [${target}]:8000`);
  const m = WITH_PORT.exec(target);
  const address = m?.[1] ?? m?.[2] ?? '';
  const family = net.isIP(address);
  if (!m || family === 0 || (m[1] !== undefined) !== (family === 6)) fail(item, 'address must be an IPv4 or IPv6 literal (IPv6 with a port in brackets: [fd00::1]:8000)');
  if (m[3] === undefined) return { address };
  const port = Number(m[3]);
  if (port < 1 || port > 65535) fail(item, 'port must be 1..65535');
  return { address, port };
}

/** Parses UPSTREAM_HOSTS. Unset or blank: an empty map. Anything malformed throws. */
export function parseUpstreamHosts(value: string | undefined): Map<string, MappedHost> {
  const hosts = new Map<string, MappedHost>();
  if (value === undefined || value.trim() === '') return hosts;
  for (const rawItem of value.split(',')) {
    const item = rawItem.trim();
    if (item === '') fail(rawItem, 'empty item');
    const eq = item.indexOf('=');
    if (eq === -1) fail(item, 'missing "="');
    const name = item.slice(0, eq).trim().toLowerCase();
    if (!BARE_HOST.test(name)) fail(item, 'name must be a bare hostname (letters, digits, - and _; at most 63)');
    const target = parseTarget(item, item.slice(eq + 1).trim());
    if (hosts.has(name)) fail(item, `duplicate name "${name}"`);
    hosts.set(name, target);
  }
  return hosts;
}
