/**
 * The address ranges the Node forwarder refuses to dial when a name was not mapped by the
 * operator (DESIGN section 5): loopback, unspecified, link-local (cloud metadata), the
 * metadata addresses outside link-local, multicast and broadcast, in every IPv6 spelling
 * that carries an IPv4 address.
 *
 * Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) stay allowed: docker networks live there.
 */
import net from 'node:net';

const V4 = new net.BlockList();
V4.addSubnet('0.0.0.0', 8, 'ipv4'); // "this network", includes unspecified 0.0.0.0
V4.addSubnet('127.0.0.0', 8, 'ipv4'); // loopback
V4.addSubnet('169.254.0.0', 16, 'ipv4'); // link-local, cloud metadata 169.254.169.254
V4.addSubnet('224.0.0.0', 4, 'ipv4'); // multicast
V4.addAddress('255.255.255.255', 'ipv4'); // limited broadcast
V4.addAddress('100.100.100.200', 'ipv4'); // Alibaba Cloud metadata (outside 169.254/16)
V4.addAddress('168.63.129.16', 'ipv4'); // Azure WireServer (VM agent, extension settings, health)

const V6 = new net.BlockList();
V6.addAddress('::', 'ipv6'); // unspecified
V6.addAddress('::1', 'ipv6'); // loopback
V6.addSubnet('fe80::', 10, 'ipv6'); // link-local
V6.addSubnet('ff00::', 8, 'ipv6'); // multicast
V6.addSubnet('fd00:ec2::', 64, 'ipv6'); // AWS link services over IPv6: metadata ::254, EKS Pod Identity credentials ::23, DNS ::253, time ::123
V6.addAddress('fd20:ce::254', 'ipv6'); // Google Cloud metadata over IPv6
// Translation prefixes whose IPv4 part cannot be read off one fixed place: refused whole
// (no function lives behind them on a container network).
V6.addSubnet('64:ff9b:1::', 48, 'ipv6'); // RFC 8215 local-use NAT64 (prefix lengths vary)
V6.addSubnet('2001::', 32, 'ipv6'); // Teredo (the IPv4 addresses are obfuscated)

/** IPv6 prefixes whose last 32 bits are an IPv4 address the kernel (or a NAT64) will dial. */
const EMBEDS_V4 = new net.BlockList();
EMBEDS_V4.addSubnet('::ffff:0:0', 96, 'ipv6'); // IPv4-mapped ::ffff:a.b.c.d (also ::ffff:7f00:1)
EMBEDS_V4.addSubnet('::', 96, 'ipv6'); // IPv4-compatible ::a.b.c.d (deprecated, still parsed)
EMBEDS_V4.addSubnet('::ffff:0:0:0', 96, 'ipv6'); // IPv4-translated (SIIT)
EMBEDS_V4.addSubnet('64:ff9b::', 96, 'ipv6'); // NAT64 well-known prefix

/** Expands a valid IPv6 literal (no zone) to its 8 16-bit groups. */
export function ipv6Groups(address: string): number[] {
  let text = address;
  const lastColon = text.lastIndexOf(':');
  const last = text.slice(lastColon + 1);
  if (last.includes('.')) {
    // Trailing dotted quad (`::ffff:1.2.3.4`): rewrite it as two hex groups.
    const [a = 0, b = 0, c = 0, d = 0] = last.split('.').map(Number);
    text = `${text.slice(0, lastColon + 1)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
  }
  const parse = (part: string): number[] => (part === '' ? [] : part.split(':').map((g) => parseInt(g, 16)));
  const doubleColon = text.indexOf('::');
  if (doubleColon === -1) return parse(text);
  const head = parse(text.slice(0, doubleColon));
  const rest = parse(text.slice(doubleColon + 2));
  return [...head, ...new Array<number>(Math.max(0, 8 - head.length - rest.length)).fill(0), ...rest];
}

/** The IPv4 address in the 16-bit groups `hi` and `lo`. */
export function ipv4Of(hi: number, lo: number): string {
  return `${hi >> 8}.${hi & 0xff}.${lo >> 8}.${lo & 0xff}`;
}

/** 6to4 (RFC 3056): 2002:AABB:CCDD::/48 routes to the IPv4 address AA.BB.CC.DD. */
const SIX_TO_FOUR = new net.BlockList();
SIX_TO_FOUR.addSubnet('2002::', 16, 'ipv6');

/**
 * True when `ip` is in a refused range. Anything that is not an IP literal is refused too
 * (fail closed): the caller only ever passes resolver output or operator-checked literals.
 */
export function isBlockedAddress(ip: string): boolean {
  const family = net.isIP(ip);
  if (family === 4) return V4.check(ip, 'ipv4');
  if (family !== 6) return true;
  const zone = ip.indexOf('%');
  const address = zone === -1 ? ip : ip.slice(0, zone);
  if (V6.check(address, 'ipv6')) return true;
  if (EMBEDS_V4.check(address, 'ipv6')) {
    const groups = ipv6Groups(address);
    return V4.check(ipv4Of(groups[6] ?? 0, groups[7] ?? 0), 'ipv4');
  }
  if (SIX_TO_FOUR.check(address, 'ipv6')) {
    const groups = ipv6Groups(address);
    return V4.check(ipv4Of(groups[1] ?? 0, groups[2] ?? 0), 'ipv4');
  }
  return false;
}
