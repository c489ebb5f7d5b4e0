/**
 * Name resolution and connecting: the SSRF gate at connect time (DESIGN 5). Every new
 * connection resolves the name again (no cache: a replaced container is found at its new
 * address); an operator-mapped name (UPSTREAM_HOSTS) is dialled as mapped, on its pinned
 * port when it has one; anything else is refused when any of its addresses is in a blocked
 * range (see blocked-addresses.ts).
 */
import dns from 'node:dns';
import net from 'node:net';
import { buildConnector } from 'undici';
import { isBlockedAddress } from './blocked-addresses.ts';
import type { MappedHost } from './upstream-hosts.ts';

/** The connect-time refusal of an address in a blocked range (mapped to ForwardError 'blocked'). */
export class BlockedAddressError extends Error {
  readonly code = 'EPGSTACK_BLOCKED_ADDRESS';
  readonly hostname: string;
  readonly address: string;
  constructor(hostname: string, address: string, reason = 'address is in a blocked range (loopback, link-local, metadata, unspecified, multicast or broadcast)') {
    super(`refusing to connect to ${hostname} at ${address}: ${reason}`);
    this.name = 'BlockedAddressError';
    this.hostname = hostname;
    this.address = address;
  }
}

/**
 * A `net.connect` lookup: mapped names answer their mapped address (no range check), other
 * names go through dns.lookup (no cache: a replaced container is found at its new address)
 * and are refused when ANY address is in a blocked range. Refusing the whole name rather
 * than filtering keeps a name that mixes a sibling address with 127.0.0.1 (rebinding) out.
 */
export function createUpstreamLookup(upstreamHosts: ReadonlyMap<string, MappedHost>): net.LookupFunction {
  return (hostname, options, callback) => {
    const mapped = upstreamHosts.get(hostname.toLowerCase())?.address;
    if (mapped !== undefined) {
      const family = net.isIP(mapped);
      if (options.all) callback(null, [{ address: mapped, family }]);
      else callback(null, mapped, family);
      return;
    }
    const lookupOptions: dns.LookupAllOptions = { all: true };
    if (options.family !== undefined) lookupOptions.family = options.family;
    if (options.hints !== undefined) lookupOptions.hints = options.hints;
    dns.lookup(hostname, lookupOptions, (err, addresses) => {
      if (err) {
        callback(err, '');
        return;
      }
      const refused = addresses.find((a) => isBlockedAddress(a.address));
      if (refused !== undefined) {
        callback(new BlockedAddressError(hostname, refused.address), '');
        return;
      }
      if (options.all) {
        callback(null, addresses);
        return;
      }
      const first = addresses[0];
      if (first === undefined) {
        const notFound: NodeJS.ErrnoException = new Error(`getaddrinfo ENOTFOUND ${hostname}`);
        notFound.code = 'ENOTFOUND';
        callback(notFound, '');
        return;
      }
      callback(null, first.address, first.family);
    });
  };
}

/**
 * The undici connector of the forwarder: createUpstreamLookup for names, a blocked-range
 * check for IP literals (net.connect skips `lookup` for them; the core never produces one,
 * but an IP-literal origin in a blocked range is refused all the same), and the pinned port
 * of a mapped name.
 */
export function createUpstreamConnector(upstreamHosts: ReadonlyMap<string, MappedHost>, connectTimeoutMs: number): buildConnector.connector {
  const baseConnect = buildConnector({ timeout: connectTimeoutMs, lookup: createUpstreamLookup(upstreamHosts) });
  return (connectOptions, callback) => {
    const host = connectOptions.hostname;
    if (net.isIP(host) !== 0 && isBlockedAddress(host)) {
      callback(new BlockedAddressError(host, host), null);
      return;
    }
    // A name mapped with a port is dialled on that port only.
    const pinned = upstreamHosts.get(host.toLowerCase());
    if (pinned?.port !== undefined) {
      const port = Number(connectOptions.port) || (connectOptions.protocol === 'https:' ? 443 : 80);
      if (port !== pinned.port) {
        callback(new BlockedAddressError(host, `${pinned.address}:${port}`, `UPSTREAM_HOSTS maps ${host} to port ${pinned.port} only`), null);
        return;
      }
    }
    baseConnect(connectOptions, callback);
  };
}
