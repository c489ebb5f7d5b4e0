/**
 * The SQL contract between the gateway and sql/schema.sql: the channel its trigger
 * notifies and the query that reads the whole catalog.
 */

/** Channel of the `pgstack_fn_changed` triggers (payload: see the head of sql/schema.sql). */
export const CATALOG_CHANNEL = 'pgstack_catalog';

/** Every catalog row, in a stable order; values are validated by core's buildSnapshot. */
export const CATALOG_QUERY =
  'SELECT name, runtime, verify_jwt, upstream_url, timeout_ms, max_body_bytes FROM pgstack.edge_functions ORDER BY name';
