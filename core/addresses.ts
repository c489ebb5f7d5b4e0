/**
 * IP parsing and CIDR matching with Web APIs only (the core cannot use node:net), for the
 * trusted-proxy list. Strict: only canonical dotted-quad IPv4 and RFC 4291 IPv6 text.
 */

export interface Cidr {
  readonly version: 4 | 6;
  readonly base: bigint;
  readonly bits: number;
}

function parseV4(text: string): bigint | undefined {
  const parts = text.split('.');
  if (parts.length !== 4) return undefined;
  let value = 0n;
  for (const part of parts) {
    if (!/^(?:0|[1-9][0-9]{0,2})$/.test(part)) return undefined;
    const n = Number(part);
    if (n > 255) return undefined;
    value = (value << 8n) | BigInt(n);
  }
  return value;
}

function parseV6(text: string): bigint | undefined {
  let s = text;
  const zone = s.indexOf('%');
  if (zone >= 0) s = s.slice(0, zone);
  let tailV4: bigint | undefined;
  const lastColon = s.lastIndexOf(':');
  if (s.includes('.', lastColon)) {
    tailV4 = parseV4(s.slice(lastColon + 1));
    if (tailV4 === undefined) return undefined;
    s = `${s.slice(0, lastColon + 1)}0:0`;
  }
  const halves = s.split('::');
  if (halves.length > 2) return undefined;
  const head = halves[0] ? halves[0].split(':') : [];
  const tail = halves.length === 2 && halves[1] ? halves[1].split(':') : [];
  const missing = 8 - head.length - tail.length;
  if (halves.length === 1 ? missing !== 0 : missing < 1) return undefined;
  const groups = [...head, ...Array<string>(halves.length === 2 ? missing : 0).fill('0'), ...tail];
  let value = 0n;
  for (const g of groups) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return undefined;
    value = (value << 16n) | BigInt(parseInt(g, 16));
  }
  if (tailV4 !== undefined) value = (value & ~0xffffffffn) | tailV4;
  return value;
}

const V4_MAPPED = 0xffff00000000n;

/** Parses an IP; IPv4-mapped IPv6 (::ffff:a.b.c.d) is returned as IPv4. */
export function parseIp(text: string): { version: 4 | 6; value: bigint } | undefined {
  const v4 = parseV4(text);
  if (v4 !== undefined) return { version: 4, value: v4 };
  const bare = text.startsWith('[') && text.endsWith(']') ? text.slice(1, -1) : text;
  const v6 = parseV6(bare);
  if (v6 === undefined) return undefined;
  if (v6 >> 32n === V4_MAPPED >> 32n) return { version: 4, value: v6 & 0xffffffffn };
  return { version: 6, value: v6 };
}

/** Parses `a.b.c.d/n`, `x::y/n` or a single address. Throws with the offending text. */
export function parseCidr(text: string): Cidr {
  const parts = text.trim().split('/');
  const [addr = '', len] = parts;
  if (parts.length > 2) throw new Error(`bad prefix length in "${text}"`);
  const ip = parseIp(addr);
  if (!ip) throw new Error(`not an IP address or CIDR: "${text}"`);
  const width = ip.version === 4 ? 32 : 128;
  // An IPv4-mapped range in IPv6 notation (::ffff:10.0.0.0/104) counts its prefix over 128
  // bits; read as a v4 prefix, `::ffff:10.0.0.0/8` would silently mean 10.0.0.0/8.
  const mappedOffset = ip.version === 4 && addr.includes(':') ? 96 : 0;
  const bits = len === undefined ? width : Number(len) - mappedOffset;
  if (!Number.isInteger(bits) || bits < 0 || bits > width || (len !== undefined && !/^\d+$/.test(len))) {
    throw new Error(`bad prefix length in "${text}"`);
  }
  const mask = bits === 0 ? 0n : ((1n << BigInt(bits)) - 1n) << BigInt(width - bits);
  return { version: ip.version, base: ip.value & mask, bits };
}

export function cidrContains(cidr: Cidr, address: string): boolean {
  const ip = parseIp(address);
  if (!ip || ip.version !== cidr.version) return false;
  const width = cidr.version === 4 ? 32 : 128;
  const mask = cidr.bits === 0 ? 0n : ((1n << BigInt(cidr.bits)) - 1n) << BigInt(width - cidr.bits);
  return (ip.value & mask) === cidr.base;
}
