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
 * Where the change log stands, as SQL expressions read in the same statement as the rows:
 * the snapshot the statement runs under (pg_current_snapshot() is the statement's own),
 * and the OIDs of the tables (a DROP and re-create changes them, and the log then says
 * nothing about what the old tables held).
 */
const LOG_POSITION = `pg_current_snapshot()::text AS log_snapshot,
       concat_ws('/', 'pgstack.edge_functions'::regclass::oid, 'pgstack.catalog_changes'::regclass::oid, 'pgstack.catalog_log_state'::regclass::oid) AS log_epoch`;

/**
 * The whole catalog and the change log's position, in one statement (one snapshot): where a
 * later CATALOG_CHANGES_QUERY continues from. One row with a NULL name when the catalog is
 * empty.
 */
export const CATALOG_VERSIONED_QUERY = `
SELECT ${LOG_POSITION}, f.name, f.runtime, f.verify_jwt, f.upstream_url, f.timeout_ms, f.max_body_bytes
  FROM (SELECT 1) one
  LEFT JOIN pgstack.edge_functions f ON true
 ORDER BY f.name`;

/**
 * What changed since the snapshot $1, in one statement (one snapshot, so never half a
 * transaction): the log's position now; whether entries the gateway has not seen may have
 * been deleted (catalog_log_state.deleted_through is not below $1's xmin); whether a
 * TRUNCATE is among the changes; and each changed name (`changed`) with its row now (NULL
 * columns when the row is gone; looked up by primary key, one name at a time: the LIMIT keeps the planner from turning it into a scan of the whole table). One row
 * with a NULL `changed` when nothing changed. The entries not seen under $1 are those of
 * transactions $1 did not see committed: at or above its xmin (below it every transaction
 * had ended) and not visible in it.
 */
export const CATALOG_CHANGES_QUERY = `
WITH since AS (SELECT $1::pg_snapshot AS s),
     log AS (SELECT c.name FROM pgstack.catalog_changes c, since
              WHERE c.xid >= pg_snapshot_xmin(since.s) AND NOT pg_visible_in_snapshot(c.xid, since.s)),
     names AS (SELECT DISTINCT name FROM log WHERE name IS NOT NULL)
SELECT ${LOG_POSITION},
       COALESCE((SELECT deleted_through FROM pgstack.catalog_log_state) >= pg_snapshot_xmin(since.s), true) AS log_gap,
       EXISTS (SELECT 1 FROM log WHERE name IS NULL) AS truncated,
       n.name AS changed,
       f.name, f.runtime, f.verify_jwt, f.upstream_url, f.timeout_ms, f.max_body_bytes
  FROM since
  LEFT JOIN names n ON true
  LEFT JOIN LATERAL (SELECT * FROM pgstack.edge_functions e WHERE e.name = n.name LIMIT 1) f ON true`;
