import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { cidrContains, parseCidr, parseIp } from './addresses.ts';

describe('parseIp', () => {
  const valid: [string, 4 | 6, bigint][] = [
    ['0.0.0.0', 4, 0n],
    ['127.0.0.1', 4, 0x7f000001n],
    ['255.255.255.255', 4, 0xffffffffn],
    ['203.0.113.7', 4, 0xcb007107n],
    ['::', 6, 0n],
    ['::1', 6, 1n],
    ['[::1]', 6, 1n],
    ['2001:db8::1', 6, 0x20010db8000000000000000000000001n],
    ['2001:DB8:0:0:0:0:0:1', 6, 0x20010db8000000000000000000000001n],
    ['1:2:3:4:5:6:7:8', 6, 0x00010002000300040005000600070008n],
    ['fe80::1%eth0', 6, 0xfe800000000000000000000000000001n],
    ['64:ff9b::1.2.3.4', 6, 0x0064ff9b000000000000000001020304n],
    // IPv4-mapped IPv6 is the IPv4 address (Node reports dual-stack peers this way).
    ['::ffff:127.0.0.1', 4, 0x7f000001n],
    ['::ffff:7f00:1', 4, 0x7f000001n],
    ['[::ffff:10.1.2.3]', 4, 0x0a010203n],
  ];
  for (const [text, version, value] of valid) {
    it(`${text} -> v${version}`, () => expect(parseIp(text)).toEqual({ version, value }));
  }

  const invalid = [
    '', 'localhost', '1.2.3', '1.2.3.4.5', '256.0.0.1', '01.2.3.4', '1.2.3.04', '0x7f.0.0.1', '127.1', '2130706433',
    ' 1.2.3.4', '1.2.3.4 ', '1.2.3.-1', '1:2:3:4:5:6:7:8:9', '1::2::3', ':::', '12345::', 'g::1', '::ffff:1.2.3', '::ffff:256.0.0.1',
    '1:2:3:4:5:6:7:1.2.3.4', '[1.2.3.4]', '[::1', ':1:2:3:4:5:6:7',
  ];
  for (const text of invalid) it(`${JSON.stringify(text)} -> undefined`, () => expect(parseIp(text)).toBeUndefined());

  it('round-trips every IPv4 address written canonically', () => {
    fc.assert(
      fc.property(fc.ipV4(), (ip) => {
        const value = ip.split('.').reduce((acc, part) => (acc << 8n) | BigInt(Number(part)), 0n);
        expect(parseIp(ip)).toEqual({ version: 4, value });
      }),
    );
  });

  it('never throws on any string', () => {
    fc.assert(fc.property(fc.oneof(fc.string(), fc.ipV6(), fc.ipV4Extended()), (s) => void parseIp(s)));
  });

  it('parses every IPv6 address fast-check generates', () => {
    fc.assert(
      fc.property(fc.ipV6(), (ip) => {
        expect(parseIp(ip)).toBeDefined();
      }),
    );
  });
});

describe('parseCidr', () => {
  const valid: [string, { version: 4 | 6; base: bigint; bits: number }][] = [
    ['10.0.0.0/8', { version: 4, base: 0x0a000000n, bits: 8 }],
    ['10.1.2.3/8', { version: 4, base: 0x0a000000n, bits: 8 }],
    ['0.0.0.0/0', { version: 4, base: 0n, bits: 0 }],
    ['203.0.113.7', { version: 4, base: 0xcb007107n, bits: 32 }],
    [' 172.16.0.0/12 ', { version: 4, base: 0xac100000n, bits: 12 }],
    ['::1', { version: 6, base: 1n, bits: 128 }],
    ['::/0', { version: 6, base: 0n, bits: 0 }],
    ['2001:db8::ff/32', { version: 6, base: 0x20010db8n << 96n, bits: 32 }],
    ['fd00::/8', { version: 6, base: 0xfdn << 120n, bits: 8 }],
    // A v4-mapped range in v6 notation is the v4 range: /104 of ::ffff:0:0/96 is a /8.
    ['::ffff:10.0.0.0/104', { version: 4, base: 0x0a000000n, bits: 8 }],
    ['::ffff:127.0.0.1', { version: 4, base: 0x7f000001n, bits: 32 }],
  ];
  for (const [text, expected] of valid) it(`${JSON.stringify(text)}`, () => expect(parseCidr(text)).toEqual(expected));

  const invalid = [
    '', 'x', 'localhost/8', '10.0.0.0/33', '10.0.0.0/-1', '10.0.0.0/', '10.0.0.0/8.0', '10.0.0.0/ 8', '10.0.0.0/0x8', '10.0.0.0/8/9',
    '::/129', '::1/abc', '10.0.0/8', '::ffff:10.0.0.0/8', '::ffff:10.0.0.0/95', '::ffff:10.0.0.0/129',
  ];
  for (const text of invalid) {
    it(`${JSON.stringify(text)} throws, naming the input`, () => {
      expect(() => parseCidr(text)).toThrow(text.trim() === '' ? /""/ : text);
    });
  }
});

describe('cidrContains', () => {
  const table: [string, string, boolean][] = [
    ['10.0.0.0/8', '10.255.1.2', true],
    ['10.0.0.0/8', '11.0.0.1', false],
    ['10.0.0.0/8', '::ffff:10.1.2.3', true],
    ['10.0.0.0/8', '[::ffff:10.1.2.3]', true],
    ['::ffff:10.0.0.0/104', '10.9.9.9', true],
    ['127.0.0.1', '127.0.0.1', true],
    ['127.0.0.1', '127.0.0.2', false],
    ['0.0.0.0/0', '8.8.8.8', true],
    ['0.0.0.0/0', '::1', false],
    ['::/0', '2001:db8::1', true],
    ['::/0', '1.2.3.4', false],
    ['2001:db8::/32', '2001:db8:ffff::1', true],
    ['2001:db8::/32', '2001:db9::1', false],
    ['::1', '::1', true],
    ['::1', '127.0.0.1', false],
    ['10.0.0.0/8', 'not an ip', false],
    ['10.0.0.0/8', '', false],
    ['10.0.0.0/8', '010.0.0.1', false],
  ];
  for (const [cidr, address, expected] of table) {
    it(`${cidr} ${expected ? 'contains' : 'does not contain'} ${JSON.stringify(address)}`, () => {
      expect(cidrContains(parseCidr(cidr), address)).toBe(expected);
    });
  }

  it('a /n range contains exactly the addresses sharing the first n bits', () => {
    fc.assert(
      fc.property(fc.ipV4(), fc.ipV4(), fc.integer({ min: 0, max: 32 }), (base, address, bits) => {
        const toInt = (ip: string) => ip.split('.').reduce((acc, p) => acc * 256 + Number(p), 0);
        const shift = 32 - bits;
        const same = bits === 0 || Math.floor(toInt(base) / 2 ** shift) === Math.floor(toInt(address) / 2 ** shift);
        expect(cidrContains(parseCidr(`${base}/${bits}`), address)).toBe(same);
      }),
    );
  });
});
