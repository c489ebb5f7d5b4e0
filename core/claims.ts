/**
 * The claims a function receives in X-Pgstack-Claims: the verified token's payload as it
 * was signed, not a re-serialisation of what JavaScript parsed. JSON.parse would round
 * integers above 2^53 (two users' 64-bit ids become one), turn 1e400 into null and keep
 * only the last of two equal keys, so the header would not decode to the token's claims.
 */
import { base64url } from 'jose';
import { visit } from 'jsonc-parser';

const utf8 = new TextDecoder();

/** The payload JSON of a compact JWS (already verified and parsed by jose, so well formed). */
export function payloadJson(token: string): string {
  return utf8.decode(base64url.decode(token.slice(token.indexOf('.') + 1, token.lastIndexOf('.'))));
}

/**
 * Whether an object in the JSON text names a key twice (compared decoded: "a" and "\u0061"
 * are the same; and ignoring case, Unicode folding included: Go's encoding/json and .NET
 * match struct fields that way, so "Role" or "ſub" would be read as "role" or "sub").
 * Parsers disagree on which one wins, so a function re-reading the token could see another
 * role than the gateway did: such a token is refused.
 */
export function hasDuplicateKeys(json: string): boolean {
  const open: Array<Set<string>> = [];
  let duplicate = false;
  visit(json, {
    onObjectBegin: () => {
      open.push(new Set());
    },
    onObjectEnd: () => {
      open.pop();
    },
    onObjectProperty: (key) => {
      const keys = open[open.length - 1];
      if (keys === undefined) return;
      const folded = foldKey(key);
      if (keys.has(folded)) duplicate = true;
      keys.add(folded);
    },
  });
  return duplicate;
}

/** A key as case-insensitive decoders compare it (upper then lower: 'ſ' -> 'S' -> 's', Kelvin 'K' -> 'k'). */
function foldKey(key: string): string {
  return /^[a-z0-9_]*$/.test(key) ? key : key.toUpperCase().toLowerCase();
}

/**
 * JSON text as pure printable ASCII, decoding to exactly the same value: raw tab, CR and LF
 * can only be whitespace between tokens (JSON strings cannot hold them raw) and become
 * spaces; every other character outside 0x20..0x7e can only be inside a string and becomes
 * a \uXXXX escape. No HTTP stack mangles the result.
 */
export function encodeClaims(json: string): string {
  return json.replace(/[\t\n\r]/g, ' ').replace(/[^\x20-\x7e]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}
