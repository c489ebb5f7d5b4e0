-- pgstack catalog schema (DESIGN section 2).
--
-- Change notification
--   channel: pgstack_catalog
--   payload: {"op": "INSERT" | "UPDATE" | "DELETE" | "TRUNCATE", "name": <text | null>}
--            one notification per changed row, sent at commit; "name" is the row's name
--            (the new name for UPDATE, the old one for DELETE) and null for TRUNCATE.
--   The payload is for people and other listeners: the gateway reads what changed from the
--   change log at the end of this file (pgstack.catalog_changes).
--
-- Idempotent: safe to apply any number of times, also over the original four-column table
-- (name, runtime, verify_jwt, upstream_url). `pgstack migrate` and the gateway's start-up
-- apply it in one transaction under an advisory lock; by hand:
--   psql "$DATABASE_URL" --single-transaction -f sql/schema.sql

CREATE SCHEMA IF NOT EXISTS pgstack;

CREATE TABLE IF NOT EXISTS pgstack.edge_functions (
  name           text PRIMARY KEY,
  runtime        text NOT NULL,
  verify_jwt     boolean NOT NULL DEFAULT true,
  upstream_url   text,
  -- NULL: the gateway's default deadline / body limit.
  timeout_ms     integer,
  max_body_bytes bigint,
  created_at     timestamptz NOT NULL DEFAULT now(),
  updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Columns added after the original table; defaults keep the four-column INSERT working.
ALTER TABLE pgstack.edge_functions
  ADD COLUMN IF NOT EXISTS timeout_ms integer,
  ADD COLUMN IF NOT EXISTS max_body_bytes bigint,
  ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now(),
  ADD COLUMN IF NOT EXISTS updated_at timestamptz NOT NULL DEFAULT now(),
  ALTER COLUMN verify_jwt SET DEFAULT true;

-- Named CHECKs, dropped and re-added so a changed rule replaces the old one instead of
-- piling up beside it. Added NOT VALID and then validated: rows an older table let in
-- must not make the migration (and so the gateway's start-up) fail. Such rows stay,
-- with a WARNING, until someone fixes them; the gateway drops them from its catalog,
-- and every new or updated row is checked.
DO $migrate$
DECLARE
  rule record;
BEGIN
  FOR rule IN
    SELECT * FROM (VALUES
      ('edge_functions_name_slug',           $c$name ~ '^[A-Za-z0-9_-]{1,128}$'$c$),
      ('edge_functions_runtime_known',       $c$runtime IN ('deno', 'http')$c$),
      ('edge_functions_upstream_scheme',     $c$upstream_url IS NULL OR upstream_url ~* '^https?://'$c$),
      ('edge_functions_http_needs_upstream', $c$runtime <> 'http' OR upstream_url IS NOT NULL$c$),
      ('edge_functions_timeout_positive',    $c$timeout_ms IS NULL OR timeout_ms > 0$c$),
      ('edge_functions_body_limit_positive', $c$max_body_bytes IS NULL OR max_body_bytes > 0$c$)
    ) AS rules(conname, expr)
  LOOP
    EXECUTE format('ALTER TABLE pgstack.edge_functions DROP CONSTRAINT IF EXISTS %I', rule.conname);
    EXECUTE format('ALTER TABLE pgstack.edge_functions ADD CONSTRAINT %I CHECK (%s) NOT VALID', rule.conname, rule.expr);
    BEGIN
      EXECUTE format('ALTER TABLE pgstack.edge_functions VALIDATE CONSTRAINT %I', rule.conname);
    EXCEPTION WHEN check_violation THEN
      RAISE WARNING 'pgstack.edge_functions holds rows that break % (%); new rows are checked, the gateway drops these until they are fixed',
        rule.conname, rule.expr;
    END;
  END LOOP;

  -- verify_jwt fails closed: an older table may have allowed NULL there.
  IF EXISTS (SELECT 1 FROM pgstack.edge_functions WHERE verify_jwt IS NULL) THEN
    UPDATE pgstack.edge_functions SET verify_jwt = true WHERE verify_jwt IS NULL;
  END IF;
  ALTER TABLE pgstack.edge_functions ALTER COLUMN verify_jwt SET NOT NULL;
END
$migrate$;

-- updated_at follows every UPDATE, whatever the statement sets.
CREATE OR REPLACE FUNCTION pgstack.touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  NEW.updated_at := now();
  RETURN NEW;
END
$fn$;

DROP TRIGGER IF EXISTS pgstack_fn_touch ON pgstack.edge_functions;
CREATE TRIGGER pgstack_fn_touch
  BEFORE UPDATE ON pgstack.edge_functions
  FOR EACH ROW EXECUTE FUNCTION pgstack.touch_updated_at();

-- The notification described at the top of this file. NOTIFY is transactional: listeners
-- hear it at commit, never for a rolled-back change.
CREATE OR REPLACE FUNCTION pgstack.notify_catalog_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
  fn_name text;
BEGIN
  -- Branch on TG_OP instead of COALESCE(NEW.name, OLD.name): NEW and OLD are not both
  -- assigned in every kind of trigger on every server version.
  IF TG_OP = 'DELETE' THEN
    fn_name := OLD.name;
  ELSIF TG_OP IN ('INSERT', 'UPDATE') THEN
    fn_name := NEW.name;
  END IF;
  -- left(): a name from before the slug CHECK could exceed NOTIFY's 8000-byte payload
  -- limit, which would make the change itself fail.
  PERFORM pg_notify('pgstack_catalog', json_build_object('op', TG_OP, 'name', left(fn_name, 256))::text);
  RETURN NULL; -- AFTER trigger: the result is ignored
END
$fn$;

DROP TRIGGER IF EXISTS pgstack_fn_changed ON pgstack.edge_functions;
CREATE TRIGGER pgstack_fn_changed
  AFTER INSERT OR UPDATE OR DELETE ON pgstack.edge_functions
  FOR EACH ROW EXECUTE FUNCTION pgstack.notify_catalog_changed();

-- Row triggers do not fire for TRUNCATE.
DROP TRIGGER IF EXISTS pgstack_fn_changed_truncate ON pgstack.edge_functions;
CREATE TRIGGER pgstack_fn_changed_truncate
  AFTER TRUNCATE ON pgstack.edge_functions
  FOR EACH STATEMENT EXECUTE FUNCTION pgstack.notify_catalog_changed();

-- The change log: the names each committed change touched, so that a gateway reloads only
-- those rows (a whole-table reload per change costs O(catalog)). name NULL means
-- "everything" (TRUNCATE). Each entry carries its writer's transaction id. A gateway keeps
-- the snapshot its last read ran under (pg_current_snapshot()); the entries it has not seen
-- are exactly those of transactions that snapshot did not see committed:
--   xid >= pg_snapshot_xmin(snapshot) AND NOT pg_visible_in_snapshot(xid, snapshot)
-- whatever order transactions commit in. No counter and no shared row: writers never wait
-- for one another because of the log. About the newest 10,000 entries are kept.
-- pgstack.catalog_log_state.deleted_through is the newest xid whose entries may have been
-- deleted (by pruning, by hand, by a TRUNCATE of the log): a gateway whose snapshot's xmin
-- is not above it may have missed entries and reloads the whole catalog, as it does when
-- the tables' OIDs change (recreated).

-- The log of an earlier version of this schema: a counter row that every catalog writer
-- locked (all writers queued behind one open transaction, and could deadlock with a TRUNCATE).
DROP TRIGGER IF EXISTS pgstack_fn_versioned ON pgstack.edge_functions;
DROP FUNCTION IF EXISTS pgstack.bump_catalog_version();
DROP TABLE IF EXISTS pgstack.catalog_version;
DO $old_log$
BEGIN
  IF EXISTS (SELECT 1 FROM pg_attribute
              WHERE attrelid = to_regclass('pgstack.catalog_changes') AND attname = 'version' AND NOT attisdropped) THEN
    DROP TABLE pgstack.catalog_changes;
  END IF;
END
$old_log$;

CREATE TABLE IF NOT EXISTS pgstack.catalog_changes (
  id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  xid  xid8 NOT NULL DEFAULT pg_current_xact_id(),
  name text
);
CREATE INDEX IF NOT EXISTS catalog_changes_xid ON pgstack.catalog_changes (xid);

-- One row. A new one says "anything before now may be missing" (its creator's xid).
CREATE TABLE IF NOT EXISTS pgstack.catalog_log_state (
  one             boolean PRIMARY KEY DEFAULT true CHECK (one),
  deleted_through xid8 NOT NULL
);
INSERT INTO pgstack.catalog_log_state (one, deleted_through) VALUES (true, pg_current_xact_id())
  ON CONFLICT (one) DO NOTHING;

-- SECURITY DEFINER: a role allowed to edit pgstack.edge_functions need not be allowed to
-- write the log itself.
CREATE OR REPLACE FUNCTION pgstack.log_catalog_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgstack AS $fn$
DECLARE
  added bigint;
  last_id bigint;
  keep_from xid8;
  horizon xid8;
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO pgstack.catalog_changes (name) VALUES (NULL);
  ELSIF TG_OP = 'INSERT' THEN
    INSERT INTO pgstack.catalog_changes (name) SELECT DISTINCT n.name FROM new_rows n;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO pgstack.catalog_changes (name) SELECT DISTINCT o.name FROM old_rows o;
  ELSE
    INSERT INTO pgstack.catalog_changes (name) SELECT n.name FROM new_rows n UNION SELECT o.name FROM old_rows o;
  END IF;
  GET DIAGNOSTICS added = ROW_COUNT;
  IF added = 0 THEN
    RETURN NULL;
  END IF;
  -- Pruning, when this statement's entries cross a multiple of 1,000 ids, by one writer at a
  -- time (the others skip it rather than wait), and only in READ COMMITTED: a snapshot held
  -- for the whole transaction would fail to delete rows a pruner that committed meanwhile
  -- removed. Only entries of transactions that every snapshot sees as ended go (below the
  -- current xmin); the deletion trigger below records how far.
  last_id := currval(pg_get_serial_sequence('pgstack.catalog_changes', 'id'));
  IF last_id / 1000 > (last_id - added) / 1000
     AND current_setting('transaction_isolation') = 'read committed'
     AND pg_try_advisory_xact_lock(hashtextextended('pgstack.catalog_changes.prune', 0)) THEN
    SELECT c.xid INTO keep_from FROM pgstack.catalog_changes c ORDER BY c.xid DESC OFFSET 10000 LIMIT 1;
    horizon := pg_snapshot_xmin(pg_current_snapshot());
    IF keep_from IS NOT NULL THEN
      DELETE FROM pgstack.catalog_changes WHERE xid < LEAST(keep_from, horizon);
    END IF;
  END IF;
  RETURN NULL;
END
$fn$;

-- Whoever deletes log entries (the pruner, a person), deleted_through follows.
CREATE OR REPLACE FUNCTION pgstack.note_log_deletion() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgstack AS $fn$
DECLARE
  newest xid8;
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    newest := pg_current_xact_id();
  ELSE
    SELECT o.xid INTO newest FROM old_rows o ORDER BY o.xid DESC LIMIT 1;
  END IF;
  IF newest IS NOT NULL THEN
    UPDATE pgstack.catalog_log_state SET deleted_through = newest WHERE one AND deleted_through < newest;
  END IF;
  RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS pgstack_log_deleted ON pgstack.catalog_changes;
CREATE TRIGGER pgstack_log_deleted
  AFTER DELETE ON pgstack.catalog_changes REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pgstack.note_log_deletion();
DROP TRIGGER IF EXISTS pgstack_log_truncated ON pgstack.catalog_changes;
CREATE TRIGGER pgstack_log_truncated
  AFTER TRUNCATE ON pgstack.catalog_changes
  FOR EACH STATEMENT EXECUTE FUNCTION pgstack.note_log_deletion();

-- Transition tables allow one event per trigger.
DROP TRIGGER IF EXISTS pgstack_fn_logged_insert ON pgstack.edge_functions;
CREATE TRIGGER pgstack_fn_logged_insert
  AFTER INSERT ON pgstack.edge_functions REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pgstack.log_catalog_change();
DROP TRIGGER IF EXISTS pgstack_fn_logged_update ON pgstack.edge_functions;
CREATE TRIGGER pgstack_fn_logged_update
  AFTER UPDATE ON pgstack.edge_functions REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pgstack.log_catalog_change();
DROP TRIGGER IF EXISTS pgstack_fn_logged_delete ON pgstack.edge_functions;
CREATE TRIGGER pgstack_fn_logged_delete
  AFTER DELETE ON pgstack.edge_functions REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION pgstack.log_catalog_change();
DROP TRIGGER IF EXISTS pgstack_fn_logged_truncate ON pgstack.edge_functions;
CREATE TRIGGER pgstack_fn_logged_truncate
  AFTER TRUNCATE ON pgstack.edge_functions
  FOR EACH STATEMENT EXECUTE FUNCTION pgstack.log_catalog_change();
