/**
 * The portable gateway: a WinterCG fetch handler built from Web APIs only.
 * Hosts (adapters/node, or your own) pass in the catalog, keys, forwarder,
 * clock and logger; nothing here reads the environment or imports a driver.
 */
export { createGateway, type Gateway, type GatewayConfig, type GatewayDeps, type GatewayLimits, type RequestContext } from './gateway.ts';
export { applyChanges, buildSnapshot, entryFromRow, FUNCTION_NAME, type CatalogRow, type CatalogSnapshot, type FunctionEntry, type DroppedRow, type Runtime } from './catalog.ts';
export { validateUpstreamUrl, type UpstreamTarget, type UpstreamValidation } from './upstream.ts';
export { ForwardError, type Forwarder, type ForwardRequest, type ForwardFailure } from './forwarder.ts';
export { GatewayError, ERROR_CODES, toResponse, type ErrorCode } from './errors.ts';
export { isSafeSub, ANONYMOUS, type Identity, type Role, type KeyConfig } from './identity.ts';
export { encodeClaims } from './claims.ts';
export { isJwks } from './jwks.ts';
export { silentLogger, type Logger, type LogLevel } from './log.ts';
export { parseCidr } from './addresses.ts';
