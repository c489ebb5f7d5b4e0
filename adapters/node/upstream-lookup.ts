/**
 * Name resolution and connecting: the SSRF gate at connect time (DESIGN 5). Every new
 * connection resolves the name again (no cache: a replaced container is found at its new
 * address); an operator-mapped name (UPSTREAM_HOSTS) is dialled as mapped, on its pinned
 * port when it has one; anything else is refused when any of its addresses is in a blocked
 * range (see blocked-addresses.ts) or is one of the gateway's own interface addresses.
 */
import dns from 'node:dns';
import net from 'node:net';
import os from 'node:os';
import { buildConnector } from 'undici';
import { ipv4Of, ipv6Groups, isBlockedAddress } from './blocked-addresses.ts';
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

/** What the lookup uses from the system, replaceable in tests. */
export interface LookupSeams {
  /** dns.lookup with `all: true`. */
  readonly resolve?: (hostname: string, options: dns.LookupAllOptions, callback: (err: NodeJS.ErrnoException | null, addresses: dns.LookupAddress[]) => void) => void;
  /** The gateway's own addresses, normalised (see normalAddress). */
  readonly ownAddresses?: () => ReadonlySet<string>;
}

/** Lowercase, without an IPv6 zone, IPv4-mapped IPv6 (in any spelling) as its IPv4. */
export function normalAddress(address: string): string {
  let a = address.toLowerCase();
  const zone = a.indexOf('%');
  if (zone !== -1) a = a.slice(0, zone);
  if (net.isIPv6(a)) {
    const groups = ipv6Groups(a);
    if (groups.slice(0, 6).join() === '0,0,0,0,0,65535') return ipv4Of(groups[6]!, groups[7]!);
  }
  return a;
}

const OWN_ADDRESSES_TTL_MS = 5_000;
let ownAddresses: { set: ReadonlySet<string>; at: number } | undefined;

/** The addresses of this machine's interfaces (os.networkInterfaces), re-read at most every 5 s. */
export function interfaceAddresses(): ReadonlySet<string> {
  const now = performance.now();
  if (ownAddresses === undefined || now - ownAddresses.at > OWN_ADDRESSES_TTL_MS) {
    const set = new Set<string>();
    for (const list of Object.values(os.networkInterfaces())) for (const info of list ?? []) set.add(normalAddress(info.address));
    ownAddresses = { set, at: now };
  }
  return ownAddresses.set;
}

/**
 * A `net.connect` lookup: mapped names answer their mapped address (no range check), other
 * names go through dns.lookup (no cache: a replaced container is found at its new address)
 * and are refused when ANY address is in a blocked range or is one of the gateway's own
 * interface addresses. Refusing the whole name rather
 * than filtering keeps a name that mixes a sibling address with 127.0.0.1 (rebinding) out.
 */
export function createUpstreamLookup(upstreamHosts: ReadonlyMap<string, MappedHost>, seams: LookupSeams = {}): net.LookupFunction {
  const resolve = seams.resolve ?? dns.lookup;
  const own = seams.ownAddresses ?? interfaceAddresses;
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
    resolve(hostname, lookupOptions, (err, addresses) => {
      if (err) {
        callback(err, '');
        return;
      }
      const refused = addresses.find((a) => isBlockedAddress(a.address));
      if (refused !== undefined) {
        callback(new BlockedAddressError(hostname, refused.address), '');
        return;
      }
      // The gateway's own machine (a container's hostname resolves to its eth0 address,
      // systemd's _outbound to the host's): not a sibling, whatever port it listens on.
      const ownAddresses = own();
      const itself = addresses.find((a) => ownAddresses.has(normalAddress(a.address)));
      if (itself !== undefined) {
        callback(new BlockedAddressError(hostname, itself.address, "address is one of the gateway's own (its machine, not a sibling)"), '');
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
    baseConnect(connectOptions, (err, socket) => {
      if (socket) socket.prependListener('error', markReset);
      callback(err, socket as never);
    });
  };
}

/**
 * The code a connection reset carries once it reached undici (see markReset); classified as
 * a reset like ECONNRESET itself.
 */
export const UPSTREAM_RESET_CODE = 'EPGSTACK_RESET';

/**
 * A reset seen first, before undici's own listener: undici takes ECONNRESET on an answer
 * whose body runs until the connection closes (no Content-Length, not chunked) as the end
 * of that body (for macOS, which resets after a complete one), so a function reset
 * mid-body would reach the client as a clean, short answer. Under another code it is what
 * it is: the body failed (as Go's ReverseProxy treats it).
 */
function markReset(err: NodeJS.ErrnoException): void {
  if (err.code === 'ECONNRESET') err.code = UPSTREAM_RESET_CODE;
}
