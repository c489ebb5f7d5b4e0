import { describe, expect, it } from 'vitest';
import { parseUpstreamHosts } from './upstream-hosts.ts';

describe('parseUpstreamHosts', () => {
  it('reads name=address pairs, spaces around items allowed', () => {
    const hosts = parseUpstreamHosts(' hello-go=127.0.0.1 , Legacy_fn = 10.0.0.7,v6=[fd00::12] ');
    expect([...hosts]).toEqual([
      ['hello-go', { address: '127.0.0.1' }],
      ['legacy_fn', { address: '10.0.0.7' }],
      ['v6', { address: 'fd00::12' }],
    ]);
  });

  it('reads an optional port that pins the name to it (IPv6 in brackets)', () => {
    const hosts = parseUpstreamHosts('a=127.0.0.1:8001,b=[::1]:9000,c=[fd00::12],d=10.0.0.7:65535');
    expect([...hosts]).toEqual([
      ['a', { address: '127.0.0.1', port: 8001 }],
      ['b', { address: '::1', port: 9000 }],
      ['c', { address: 'fd00::12' }],
      ['d', { address: '10.0.0.7', port: 65535 }],
    ]);
  });

  it('gives an empty map for unset or blank values', () => {
    expect(parseUpstreamHosts(undefined).size).toBe(0);
    expect(parseUpstreamHosts('').size).toBe(0);
    expect(parseUpstreamHosts('   ').size).toBe(0);
  });

  it.each([
    ['hello', 'missing "="'],
    ['hello=', 'IPv4 or IPv6'],
    ['hello=example.com', 'IPv4 or IPv6'],
    ['hello=127.1', 'IPv4 or IPv6'],
    ['hello=[127.0.0.1]', 'IPv4 or IPv6'],
    ['hello=::1:8005', 'in brackets'],
    ['hello=fd00::12', 'in brackets'],
    ['hello=127.0.0.1:', 'IPv4 or IPv6'],
    ['hello=127.0.0.1:0', 'port must be 1..65535'],
    ['hello=127.0.0.1:65536', 'port must be 1..65535'],
    ['hello=127.0.0.1:80:80', 'IPv4 or IPv6'],
    ['hello=[::1]:x', 'IPv4 or IPv6'],
    ['hello=localhost:80', 'IPv4 or IPv6'],
    ['=127.0.0.1', 'bare hostname'],
    ['fn.internal=10.0.0.1', 'bare hostname'],
    ['-fn=10.0.0.1', 'bare hostname'],
    [`${'a'.repeat(64)}=10.0.0.1`, 'bare hostname'],
    ['a=10.0.0.1,,b=10.0.0.2', 'empty item'],
    ['a=10.0.0.1,', 'empty item'],
    ['a=10.0.0.1,A=10.0.0.2', 'duplicate'],
  ])('refuses %j naming UPSTREAM_HOSTS and the item', (value, reason) => {
    let error: unknown;
    try {
      parseUpstreamHosts(value);
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(Error);
    const message = (error as Error).message;
    expect(message).toContain('UPSTREAM_HOSTS');
    expect(message).toContain(reason);
  });

  it('names the offending item in the message', () => {
    expect(() => parseUpstreamHosts('ok=10.0.0.1, bad=nope')).toThrow(/"bad=nope"/);
  });
});
