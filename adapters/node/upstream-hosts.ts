/**
 * UPSTREAM_HOSTS: the operator's explicit name -> address mapping (like compose `extra_hosts`).
 * A mapped name is dialled at that address with no range check: the operator meant it.
 *
 *   UPSTREAM_HOSTS="hello-go=127.0.0.1, legacy=10.0.0.7,v6fn=fd00::12"
 */
import net from 'node:net';

/** The same bare-hostname rule as core/upstream.ts (one DNS label, after lowercasing). */
const BARE_HOST = /^[a-z0-9_][a-z0-9_-]{0,62}$/;

function fail(item: string, reason: string): never {
  throw new Error(`UPSTREAM_HOSTS: bad item ${JSON.stringify(item)}: ${reason} (expected name=address,name2=address2)`);
}

/** Parses UPSTREAM_HOSTS. Unset or blank: an empty map. Anything malformed throws. */
export function parseUpstreamHosts(value: string | undefined): Map<string, string> {
  const hosts = new Map<string, string>();
  if (value === undefined || value.trim() === '') return hosts;
  for (const rawItem of value.split(',')) {
    const item = rawItem.trim();
    if (item === '') fail(rawItem, 'empty item');
    const eq = item.indexOf('=');
    if (eq === -1) fail(item, 'missing "="');
    const name = item.slice(0, eq).trim().toLowerCase();
    const address = item.slice(eq + 1).trim();
    if (!BARE_HOST.test(name)) fail(item, 'name must be a bare hostname (letters, digits, - and _; at most 63)');
    if (net.isIP(address) === 0) fail(item, 'address must be an IPv4 or IPv6 literal');
    if (hosts.has(name)) fail(item, `duplicate name "${name}"`);
    hosts.set(name, address);
  }
  return hosts;
}
