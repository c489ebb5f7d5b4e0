import { describe, expect, it } from 'vitest';
import { buildUpstreamHeaders, canonicalName, connectionTokens, stripResponseHopByHop, type ForwardedFacts } from './headers.ts';
import { encodeClaims } from './claims.ts';
import { ANONYMOUS, type Identity } from './identity.ts';

const USER_CLAIMS = { role: 'authenticated', sub: 'user-1', name: 'Zoë' };
const USER: Identity = { role: 'authenticated', sub: 'user-1', claims: USER_CLAIMS, claimsHeader: encodeClaims(JSON.stringify(USER_CLAIMS)) };
const DIRECT: ForwardedFacts = { clientAddress: '203.0.113.7', proto: 'http', host: 'gateway.test', trustForwarded: false, via: '1.1 pgstack-test' };
const VIA_PROXY: ForwardedFacts = { clientAddress: '10.0.0.2', proto: 'https', host: 'api.example', trustForwarded: true, via: '1.1 pgstack-test' };

function build(pairs: [string, string][], identity: Identity = USER, facts: ForwardedFacts = DIRECT, requestId = 'rid-1'): Headers {
  const inbound = new Headers();
  for (const [name, value] of pairs) inbound.append(name, value);
  return buildUpstreamHeaders(inbound, identity, requestId, facts);
}

const names = (h: Headers) => [...h.keys()];

describe('canonicalName', () => {
  const table: [string, string][] = [
    ['X-Pgstack-Role', 'x-pgstack-role'],
    ['X_Pgstack_Role', 'x-pgstack-role'],
    ['x_PGSTACK-role', 'x-pgstack-role'],
    ['Content-Type', 'content-type'],
    ['__', '--'],
    ['', ''],
  ];
  for (const [input, expected] of table) it(`${JSON.stringify(input)} -> ${JSON.stringify(expected)}`, () => expect(canonicalName(input)).toBe(expected));
});

describe('connectionTokens', () => {
  const table: [string | null, string[]][] = [
    [null, []],
    ['', []],
    ['close', ['close']],
    ['keep-alive, X-Custom', ['keep-alive', 'x-custom']],
    ['  Upgrade ,,  X_Pgstack_Role  ,', ['upgrade', 'x-pgstack-role']],
    ['a,A,a', ['a']],
  ];
  for (const [input, expected] of table) {
    it(`${JSON.stringify(input)} -> ${JSON.stringify(expected)}`, () => expect([...connectionTokens(input)].sort()).toEqual(expected.sort()));
  }
});

describe('buildUpstreamHeaders', () => {
  it('drops every hop-by-hop header (RFC 9110 7.6.1) and the legacy ones', () => {
    const out = build([
      ['Connection', 'keep-alive'],
      ['Keep-Alive', 'timeout=5'],
      ['Proxy-Connection', 'keep-alive'],
      ['TE', 'trailers'],
      ['Trailer', 'x-sum'],
      ['Transfer-Encoding', 'chunked'],
      ['Upgrade', 'h2c'],
      ['HTTP2-Settings', 'AAMAAABkAAQAAP__'],
      ['Proxy-Authorization', 'Basic eDp5'],
      ['Proxy-Anything', '1'],
      ['x-kept', 'yes'],
    ]);
    expect(names(out).filter((n) => !n.startsWith('x-') && n !== 'via')).toEqual([]);
    expect(out.get('x-kept')).toBe('yes');
  });

  it('drops every header named in Connection, in any case or with underscores', () => {
    const out = build([
      ['Connection', 'X-Custom, x_other, AUTHORIZATION'],
      ['x-custom', '1'],
      ['X-Other', '2'],
      ['authorization', 'Bearer t'],
      ['x-kept', 'yes'],
    ]);
    expect(out.has('x-custom')).toBe(false);
    expect(out.has('x-other')).toBe(false);
    expect(out.has('authorization')).toBe(false);
    expect(out.get('x-kept')).toBe('yes');
  });

  it('a Connection header cannot name the identity headers away: they are added after stripping', () => {
    const out = build([['Connection', 'x-pgstack-role, x-pgstack-sub, x-pgstack-claims, x-request-id, x-forwarded-for']]);
    expect(out.get('x-pgstack-role')).toBe('authenticated');
    expect(out.get('x-pgstack-sub')).toBe('user-1');
    expect(JSON.parse(out.get('x-pgstack-claims') as string)).toEqual(USER_CLAIMS);
    expect(out.get('x-request-id')).toBe('rid-1');
    expect(out.get('x-forwarded-for')).toBe('203.0.113.7');
  });

  it('strips every inbound x-pgstack-* in any case, with _ or -, and sets exactly one of each', () => {
    const out = build([
      ['X-Pgstack-Role', 'service_role'],
      ['x-pgstack-role', 'service_role'],
      ['X_PGSTACK_ROLE', 'service_role'],
      ['x-pgstack-sub', 'evil'],
      ['x_pgstack_claims', '{}'],
      ['X-Pgstack-Anything', '1'],
      ['x-pgstack-', '1'],
    ]);
    const pgstack = names(out).filter((n) => canonicalName(n).startsWith('x-pgstack-'));
    expect(pgstack.sort()).toEqual(['x-pgstack-claims', 'x-pgstack-role', 'x-pgstack-sub']);
    expect(out.get('x-pgstack-role')).toBe('authenticated');
    expect(out.get('x-pgstack-sub')).toBe('user-1');
    expect(out.get('x-pgstack-claims')).toBe(USER.claimsHeader);
  });

  it('anon: role anon, empty sub, no claims header', () => {
    const out = build([['X-Pgstack-Claims', '{"role":"service_role"}']], ANONYMOUS);
    expect(out.get('x-pgstack-role')).toBe('anon');
    expect(out.get('x-pgstack-sub')).toBe('');
    expect(out.has('x-pgstack-claims')).toBe(false);
  });

  it('from an untrusted peer, client forwarding headers are replaced by the gateway', () => {
    const out = build([
      ['X-Forwarded-For', '198.51.100.9'],
      ['X-Forwarded-Proto', 'https'],
      ['X-Forwarded-Host', 'evil.example'],
      ['X-Forwarded-Port', '1'],
      ['Forwarded', 'for=198.51.100.9'],
      ['X-Real-IP', '198.51.100.9'],
      ['True-Client-IP', '198.51.100.9'],
      ['CF-Connecting-IP', '198.51.100.9'],
    ]);
    expect(out.get('x-forwarded-for')).toBe('203.0.113.7');
    expect(out.get('x-forwarded-proto')).toBe('http');
    expect(out.get('x-forwarded-host')).toBe('gateway.test');
    for (const name of ['x-forwarded-port', 'forwarded', 'x-real-ip', 'true-client-ip', 'cf-connecting-ip']) expect(out.has(name), name).toBe(false);
  });

  it("from an untrusted peer, the platforms' client, scheme and URL families and auth proxies' user headers are dropped; look-alikes pass", () => {
    const dropped = [
      'X-Arr-Ssl', 'CloudFront-Forwarded-Proto', 'CloudFront-Viewer-Address', 'Cf-Visitor', 'Cf-Connecting-Ipv6', 'CF-IPCountry',
      'Cf-Access-Authenticated-User-Email', 'Fly-Client-Ip', 'Fly-Forwarded-Proto', 'X-Appengine-User-Ip', 'X-Azure-ClientIP',
      'X-Original-Forwarded-For', 'X-Original-Proto', 'X-Original-Method', 'X-Vercel-Forwarded-For', 'X-Nf-Client-Connection-Ip',
      'Akamai-Origin-Hop', 'True-Client-Port', 'X-Envoy-Original-Path', 'X-Auth-Request-User', 'X-Auth-Request-Email',
      'X-Goog-Authenticated-User-Email', 'X-Goog-Iap-Jwt-Assertion', 'X-Amzn-Oidc-Identity', 'X-MS-Client-Principal-Name',
      'Remote-User', 'X-Remote-User', 'X-WebAuth-User', 'X_Auth_Request_User',
      'Remote-Groups', 'Remote-Email', 'X-Remote-Group', 'X-Remote-Extra-Scopes', 'X-Consumer-ID', 'X-Consumer-Username',
      'X-Consumer-Groups', 'X-Credential-Identifier', 'X-Authenticated-Userid', 'X-Anonymous-Consumer', 'X-Endpoint-API-UserInfo',
      'X-Apigateway-Api-Userinfo', 'SM_USER', 'SM-Universalid', 'SMUSER', 'SMUSERDN', 'SMUNIVERSALID', 'SMAUTHREASON', 'SMREALM', 'SMSESSION', 'iv-user', 'iv-groups', 'X-Pomerium-Claim-Email', 'X-authentik-username',
      'Tailscale-User-Login', 'X-Vouch-User', 'X-Auth-Username', 'X-Auth-Email', 'X-Auth-Roles', 'X-MS-Token-AAD-Id-Token',
      'Disguised-Host', 'X-Waws-Unencoded-Url', 'ssl-client-verify', 'X-SSL-Client-DN', 'X-Client-Cert', 'X-Client-Cert-Chain',
      'X-Client-Verify', 'X-Amzn-Mtls-Clientcert', 'Client-Cert', 'Client-Cert-Chain', 'WL-Proxy-Client-IP', 'WL-Proxy-SSL',
      'Fastly-SSL', 'X-Jwt-Assertion', 'X-JWT-Payload', 'X-User', 'X-User-Id', 'X-UserId',
    ];
    const kept = ['X-Amzn-Trace-Id', 'Cfg-Mode', 'X-Originals', 'Remoteness', 'X-Goog-Api-Key', 'Flyer', 'X-Auth-Token', 'X-Users-Count', 'Smtp-Host', 'Ivory', 'Smart-Mode'];
    const out = build([...dropped, ...kept].map((name) => [name, 'spoofed'] as [string, string]));
    for (const name of dropped) expect(out.has(name), name).toBe(false);
    for (const name of kept) expect(out.get(name), name).toBe('spoofed');
    // A trusted proxy's own platform headers are kept as sent.
    const viaProxy = build([['CF-Connecting-IP', '198.51.100.9'], ['X-Auth-Request-User', 'alice']], USER, VIA_PROXY);
    expect(viaProxy.get('cf-connecting-ip')).toBe('198.51.100.9');
    expect(viaProxy.get('x-auth-request-user')).toBe('alice');
  });

  it('without a known client address, X-Forwarded-For is absent rather than the client-supplied one', () => {
    const out = build([['X-Forwarded-For', '198.51.100.9']], USER, { ...DIRECT, clientAddress: undefined });
    expect(out.has('x-forwarded-for')).toBe(false);
  });

  it('from a trusted proxy, the chain is extended and its proto and host kept', () => {
    const out = build([
      ['X-Forwarded-For', '198.51.100.9'],
      ['X-Forwarded-Proto', 'https'],
      ['X-Forwarded-Host', 'public.example'],
    ], USER, VIA_PROXY);
    expect(out.get('x-forwarded-for')).toBe('198.51.100.9, 10.0.0.2');
    expect(out.get('x-forwarded-proto')).toBe('https');
    expect(out.get('x-forwarded-host')).toBe('public.example');
  });

  it('from a trusted proxy, underscore spellings of forwarding headers are still dropped', () => {
    const out = build([['X_Forwarded_For', '198.51.100.9'], ['x_real_ip', '198.51.100.9']], USER, VIA_PROXY);
    expect(out.get('x-forwarded-for')).toBe('10.0.0.2');
    expect(names(out)).not.toContain('x_forwarded_for');
    expect(names(out)).not.toContain('x_real_ip');
  });

  it('from a trusted proxy without forwarding headers, the gateway sets them', () => {
    const out = build([], USER, VIA_PROXY);
    expect(out.get('x-forwarded-for')).toBe('10.0.0.2');
    expect(out.get('x-forwarded-proto')).toBe('https');
    expect(out.get('x-forwarded-host')).toBe('api.example');
  });

  it('Host and Expect are dropped; X-Request-Id is the gateway-chosen one', () => {
    const out = build([['Host', 'evil.example'], ['Expect', '100-continue'], ['X-Request-Id', 'client-chosen']], USER, DIRECT, 'gateway-chosen');
    expect(out.has('host')).toBe(false);
    expect(out.has('expect')).toBe(false);
    expect(out.get('x-request-id')).toBe('gateway-chosen');
  });

  it('end-to-end headers pass through unchanged, repeated values included', () => {
    const out = build([
      ['Authorization', 'Bearer abc.def.ghi'],
      ['apikey', 'key'],
      ['Content-Type', 'application/json; charset=utf-8'],
      ['Content-Length', '12'],
      ['Accept', 'text/html'],
      ['Accept', 'application/json'],
      ['Cookie', 'a=1; b=2'],
      ['X-Custom', 'Mixed Case !#$'],
    ]);
    expect(out.get('authorization')).toBe('Bearer abc.def.ghi');
    expect(out.get('apikey')).toBe('key');
    expect(out.get('content-type')).toBe('application/json; charset=utf-8');
    expect(out.get('content-length')).toBe('12');
    expect(out.get('accept')).toBe('text/html, application/json');
    expect(out.get('cookie')).toBe('a=1; b=2');
    expect(out.get('x-custom')).toBe('Mixed Case !#$');
  });

  it('does not mutate the inbound headers', () => {
    const inbound = new Headers([['Connection', 'x-a'], ['x-a', '1'], ['x-pgstack-role', 'service_role']]);
    buildUpstreamHeaders(inbound, USER, 'rid', DIRECT);
    expect([...inbound]).toEqual([['connection', 'x-a'], ['x-a', '1'], ['x-pgstack-role', 'service_role']]);
  });
});

describe('stripResponseHopByHop', () => {
  it('removes hop-by-hop headers and those named in Connection, keeps the rest and every Set-Cookie', () => {
    const headers = new Headers([
      ['Connection', 'X-Foo, close'],
      ['X-Foo', 'hop'],
      ['Keep-Alive', 'timeout=5'],
      ['Transfer-Encoding', 'chunked'],
      ['Trailer', 'x-sum'],
      ['Upgrade', 'h2c'],
      ['Proxy-Authenticate', 'Basic'],
      ['Content-Type', 'text/plain'],
      ['Cache-Control', 'no-store'],
    ]);
    headers.append('Set-Cookie', 'a=1');
    headers.append('Set-Cookie', 'b=2');
    stripResponseHopByHop(headers);
    expect([...new Set(names(headers))].sort()).toEqual(['cache-control', 'content-type', 'set-cookie']);
    expect(headers.getSetCookie()).toEqual(['a=1', 'b=2']);
  });

  it('leaves a response without hop-by-hop headers as it was', () => {
    const headers = new Headers([['content-type', 'application/json'], ['x-kept', '1']]);
    stripResponseHopByHop(headers);
    expect([...headers]).toEqual([['content-type', 'application/json'], ['x-kept', '1']]);
  });
});

describe('Via (RFC 9110 7.6.3)', () => {
  it("appends the gateway's entry to the client's Via, so loops through gateways are visible", () => {
    expect(build([]).get('via')).toBe('1.1 pgstack-test');
    expect(build([['via', '1.1 edge-proxy']]).get('via')).toBe('1.1 edge-proxy, 1.1 pgstack-test');
  });
});
