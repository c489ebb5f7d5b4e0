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
 * Whether an object in the JSON text names a key twice, compared as the decoders a function
 * may use would (see foldKey): "a" and "\u0061", "Role" and "role", "\u0130ss" and "iss",
 * "role\u0000" and "role". Parsers disagree on which copy wins, so a function re-reading
 * the token could see another role than the gateway did: such a token is refused.
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

/**
 * A decoded key as the most lenient common decoder matches it:
 * - C parsers keeping keys NUL-terminated (cJSON) read it up to the first NUL;
 * - Go decodes a lone surrogate escape as U+FFFD;
 * - Go's encoding/json matches struct fields per code point by ToUpper(ToLower(r)) with
 *   simple (one-to-one) case mappings, .NET ignores case: "\u017fub" is "sub", "\u0130ss"
 *   is "iss", Kelvin "\u212aey" is "key". JavaScript's mappings are the full ones; a code
 *   point whose full mapping is several (U+0130 lowercases to "i" + U+0307, "\u00df"
 *   uppercases to "SS") takes the first of them for lowercase (the simple mapping) and
 *   stays as it is for uppercase (it has no simple one). Keys that fold alike are the same.
 */
function foldKey(key: string): string {
  const nul = key.indexOf('\0');
  const bare = nul === -1 ? key : key.slice(0, nul);
  if (/^[a-z0-9_]*$/.test(bare)) return bare.toUpperCase();
  let folded = '';
  for (const char of bare.replace(LONE_SURROGATE, '\ufffd')) {
    const lower = String.fromCodePoint(char.toLowerCase().codePointAt(0)!);
    const upper = lower.toUpperCase();
    folded += [...upper].length === 1 ? upper : lower;
  }
  return folded;
}

const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g;

/**
 * JSON text as pure printable ASCII, decoding to exactly the same value: raw tab, CR and LF
 * can only be whitespace between tokens (JSON strings cannot hold them raw) and become
 * spaces; every other character outside 0x20..0x7e can only be inside a string and becomes
 * a \uXXXX escape. No HTTP stack mangles the result.
 */
export function encodeClaims(json: string): string {
  return json.replace(/[\t\n\r]/g, ' ').replace(/[^\x20-\x7e]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}
