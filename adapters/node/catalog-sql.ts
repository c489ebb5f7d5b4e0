/**
 * The SQL contract between the gateway and sql/schema.sql: the channel its trigger
 * notifies and the query that reads the whole catalog.
 */

/** Channel of the `pgstack_fn_changed` triggers (payload: see the head of sql/schema.sql). */
export const CATALOG_CHANNEL = 'pgstack_catalog';

/** Every catalog row, in a stable order; values are validated by core's buildSnapshot. */
export const CATALOG_QUERY =
  'SELECT name, runtime, verify_jwt, upstream_url, timeout_ms, max_body_bytes FROM pgstack.edge_functions ORDER BY name';

/**
 * The whole catalog and the change log's version, in one statement (one snapshot): the
 * version a later CATALOG_CHANGES_QUERY continues from. One row with a NULL name when the
 * catalog is empty.
 */
export const CATALOG_VERSIONED_QUERY = `
SELECT v.version AS catalog_version, f.name, f.runtime, f.verify_jwt, f.upstream_url, f.timeout_ms, f.max_body_bytes
  FROM (SELECT version FROM pgstack.catalog_version) v
  LEFT JOIN pgstack.edge_functions f ON true
 ORDER BY f.name`;

/**
 * What changed since version $1, in one statement (one snapshot, so never half a
 * transaction): the current version, the oldest version the log still holds, whether a
 * TRUNCATE is among the changes, and each changed name (`changed`) with its row now (NULL
 * columns when the row is gone). One row with a NULL `changed` when nothing changed.
 */
export const CATALOG_CHANGES_QUERY = `
WITH log AS (SELECT version, name FROM pgstack.catalog_changes WHERE version > $1::bigint),
     names AS (SELECT DISTINCT name FROM log WHERE name IS NOT NULL)
SELECT v.version AS catalog_version,
       (SELECT min(version) FROM pgstack.catalog_changes) AS oldest,
       EXISTS (SELECT 1 FROM log WHERE name IS NULL) AS truncated,
       n.name AS changed,
       f.name, f.runtime, f.verify_jwt, f.upstream_url, f.timeout_ms, f.max_body_bytes
  FROM (SELECT version FROM pgstack.catalog_version) v
  LEFT JOIN names n ON true
  LEFT JOIN pgstack.edge_functions f ON f.name = n.name`;
