/**
 * The connect-time lookup's refusal of the gateway's own machine: a name resolving to one
 * of its interface addresses (a container's own hostname, systemd's _outbound) is refused
 * like loopback, unless the operator mapped it. Resolution is injected; nothing is dialled.
 */
import type dns from 'node:dns';
import os from 'node:os';
import { describe, expect, it } from 'vitest';
import { isBlockedAddress } from './blocked-addresses.ts';
import { BlockedAddressError, createUpstreamLookup, interfaceAddresses, normalAddress, type LookupSeams } from './upstream-lookup.ts';

type Resolved = { error: unknown; addresses: dns.LookupAddress[] };

function lookupWith(answers: Record<string, string[]>, seams: Omit<LookupSeams, 'resolve'> = {}, mapped = new Map()) {
  const resolve: LookupSeams['resolve'] = (hostname, _options, callback) => {
    const list = answers[hostname] ?? [];
    queueMicrotask(() => callback(null, list.map((address) => ({ address, family: address.includes(':') ? 6 : 4 }))));
  };
  const lookup = createUpstreamLookup(mapped, { resolve, ...seams });
  return (hostname: string) =>
    new Promise<Resolved>((done) =>
      lookup(hostname, { all: true }, (error, addresses) => done({ error, addresses: addresses as unknown as dns.LookupAddress[] })),
    );
}

describe('upstream lookup: the gateway never dials its own machine', () => {
  const own = () => new Set(['198.51.100.7', 'fd00::7']);

  it.each([
    ['its own IPv4', ['198.51.100.7']],
    ['its own IPv6', ['fd00::7']],
    ['its own IPv6, upper case', ['FD00::7']],
    ['its own IPv4, IPv4-mapped', ['::ffff:198.51.100.7']],
    ['its own IPv4, IPv4-mapped in hex', ['::ffff:c633:6407']],
    ['a sibling and its own address (the whole name is refused)', ['198.51.100.8', '198.51.100.7']],
  ])('a name resolving to %s is refused', async (_label, addresses) => {
    const { error } = await lookupWith({ self: addresses }, { ownAddresses: own })('self');
    expect(error).toBeInstanceOf(BlockedAddressError);
    expect((error as Error).message).toContain("gateway's own");
  });

  it('a sibling address is resolved as it is', async () => {
    const { error, addresses } = await lookupWith({ sibling: ['198.51.100.8'] }, { ownAddresses: own })('sibling');
    expect(error).toBeNull();
    expect(addresses.map((a) => a.address)).toEqual(['198.51.100.8']);
  });

  it('a name the operator mapped to an own address is dialled as mapped', async () => {
    const mapped = new Map([['self', { address: '198.51.100.7' }]]);
    const { error, addresses } = await lookupWith({}, { ownAddresses: own }, mapped)('self');
    expect(error).toBeNull();
    expect(addresses.map((a) => a.address)).toEqual(['198.51.100.7']);
  });

  it("by default the own addresses are this machine's interfaces, and a name resolving to any of them is refused", async () => {
    const listed = Object.values(os.networkInterfaces()).flatMap((list) => (list ?? []).map((info) => normalAddress(info.address)));
    expect(listed.length).toBeGreaterThan(0);
    expect([...interfaceAddresses()].sort()).toEqual([...new Set(listed)].sort());
    const lookup = lookupWith(Object.fromEntries(listed.map((address, i) => [`self-${i}`, [address]])));
    for (const [i, address] of listed.entries()) {
      const { error } = await lookup(`self-${i}`);
      expect(error, address).toBeInstanceOf(BlockedAddressError);
      // Loopback and link-local are refused as blocked ranges; the others as the gateway's own.
      if (!isBlockedAddress(address)) expect((error as Error).message, address).toContain("gateway's own");
    }
  });

  it('normalAddress: lower case, no zone, IPv4-mapped as IPv4', () => {
    expect(normalAddress('FE80::1%eth0')).toBe('fe80::1');
    expect(normalAddress('::FFFF:10.0.0.1')).toBe('10.0.0.1');
    expect(normalAddress('::ffff:a00:1')).toBe('10.0.0.1');
    expect(normalAddress('::ffff:c633:6407')).toBe('198.51.100.7');
    expect(normalAddress('10.0.0.1')).toBe('10.0.0.1');
  });
});
