-- pgstack catalog schema (DESIGN section 2).
--
-- Change notification
--   channel: pgstack_catalog
--   payload: {"op": "INSERT" | "UPDATE" | "DELETE" | "TRUNCATE", "name": <text | null>}
--            one notification per changed row, sent at commit; "name" is the row's name
--            (the new name for UPDATE, the old one for DELETE) and null for TRUNCATE.
--   The payload is for people and other listeners: the gateway reads what changed from the
--   change log at the end of this file (pgstack.catalog_version, pgstack.catalog_changes).
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

-- The change log: what each committed change touched, in commit order, so a gateway can
-- reload only the rows that changed (a whole-table reload per change costs O(catalog)).
-- One counter row, bumped by every statement that changes the catalog: the row lock
-- serialises catalog writers, so versions follow commit order, and one query that reads
-- the counter, the changed names and those rows together sees a whole state, never half a
-- transaction. name NULL means "everything" (TRUNCATE). The log keeps the last 10,000
-- versions; a gateway further behind reloads the whole catalog.
CREATE TABLE IF NOT EXISTS pgstack.catalog_version (
  one     boolean PRIMARY KEY DEFAULT true CHECK (one),
  version bigint NOT NULL
);
INSERT INTO pgstack.catalog_version (one, version) VALUES (true, 0) ON CONFLICT (one) DO NOTHING;

CREATE TABLE IF NOT EXISTS pgstack.catalog_changes (
  version bigint NOT NULL,
  name    text
);
CREATE INDEX IF NOT EXISTS catalog_changes_version ON pgstack.catalog_changes (version);

-- SECURITY DEFINER: a role allowed to edit pgstack.edge_functions need not be allowed to
-- write the log itself. The version is bumped (and its row locked) BEFORE the statement
-- touches a row: a writer then waits for the counter before it holds any catalog row, so
-- two transactions editing rows in different orders queue up instead of deadlocking.
CREATE OR REPLACE FUNCTION pgstack.bump_catalog_version() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgstack AS $fn$
BEGIN
  UPDATE pgstack.catalog_version SET version = version + 1 WHERE one;
  RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION pgstack.log_catalog_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgstack AS $fn$
DECLARE
  v bigint;
BEGIN
  SELECT version INTO v FROM pgstack.catalog_version WHERE one; -- this statement's, bumped before it
  IF TG_OP = 'TRUNCATE' THEN
    INSERT INTO pgstack.catalog_changes (version, name) VALUES (v, NULL);
  ELSIF TG_OP = 'INSERT' THEN
    INSERT INTO pgstack.catalog_changes (version, name) SELECT DISTINCT v, n.name FROM new_rows n;
  ELSIF TG_OP = 'DELETE' THEN
    INSERT INTO pgstack.catalog_changes (version, name) SELECT DISTINCT v, o.name FROM old_rows o;
  ELSE
    INSERT INTO pgstack.catalog_changes (version, name)
      SELECT v, n.name FROM new_rows n UNION SELECT v, o.name FROM old_rows o;
  END IF;
  IF v % 1000 = 0 THEN
    DELETE FROM pgstack.catalog_changes WHERE version <= v - 10000;
  END IF;
  RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS pgstack_fn_versioned ON pgstack.edge_functions;
CREATE TRIGGER pgstack_fn_versioned
  BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgstack.edge_functions
  FOR EACH STATEMENT EXECUTE FUNCTION pgstack.bump_catalog_version();

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
