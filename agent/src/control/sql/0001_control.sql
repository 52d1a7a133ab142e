-- pgferry control schema, version 1.
--
-- Applied by the agent inside one transaction with search_path = pgferry,
-- pg_catalog, so every object below lands in schema pgferry and cleanup is
-- "drop the capture triggers, then DROP SCHEMA pgferry CASCADE".
-- Nothing here is granted to PUBLIC.

REVOKE ALL ON SCHEMA pgferry FROM PUBLIC;

-- The migration as a stored state machine (one row).
CREATE TABLE run (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    phase              text NOT NULL,
    pre_data_done      boolean NOT NULL DEFAULT false,
    post_data_done     boolean NOT NULL DEFAULT false,
    fence_raised_at    timestamptz,
    cutover_done_at    timestamptz,
    writes_blocked_ms  bigint,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Captured tables and their per-table progress.
CREATE TABLE tables (
    id              integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid           oid NOT NULL UNIQUE,
    schema_name     text NOT NULL,
    table_name      text NOT NULL,
    key_columns     text[] NOT NULL,
    copy_columns    text[] NOT NULL,
    copy_state      text NOT NULL DEFAULT 'pending' CHECK (copy_state IN ('pending', 'done')),
    copied_rows     bigint,
    copied_at       timestamptz,
    applied_rows    bigint NOT NULL DEFAULT 0,
    synced_through  timestamptz
);

-- TRUNCATE events: applying one resynchronises the whole table.
CREATE TABLE truncates (
    table_id  integer NOT NULL REFERENCES tables (id),
    xid       xid8 NOT NULL
);

-- The write fence. A sequence, not a table: setval() is not transactional and
-- a sequence read is not subject to MVCC, so a transaction whose snapshot
-- predates the fence still sees it raised (0 = open, 1 = raised).
CREATE SEQUENCE fence MINVALUE 0 MAXVALUE 1 START 0 NO CYCLE;

-- Installs capture for one registered table: its delta table d_<id> holding
-- the key of every changed row plus the writing transaction's id, one trigger
-- function per event, and the four statement-level triggers (transition
-- tables), enabled ALWAYS so that session_replication_role cannot skip them.
-- Idempotent: re-running it after a crash completes what is missing.
CREATE FUNCTION capture_install(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $install$
DECLARE
    t          pgferry.tables%ROWTYPE;
    rel        regclass;
    delta      text := format('pgferry.%I', 'd_' || p_table_id);
    key_defs   text;
    key_cols   text;
    src_cols   text;
    n_found    integer;
    fence_sql  text;
    ev         record;
BEGIN
    SELECT * INTO STRICT t FROM pgferry.tables WHERE id = p_table_id;
    rel := t.relid::regclass;

    SELECT string_agg(format('k%s %s NOT NULL', k.ord, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
           string_agg(format('k%s', k.ord), ', ' ORDER BY k.ord),
           string_agg(format('%I', a.attname), ', ' ORDER BY k.ord),
           count(*)
      INTO key_defs, key_cols, src_cols, n_found
      FROM unnest(t.key_columns) WITH ORDINALITY AS k(name, ord)
      JOIN pg_attribute a ON a.attrelid = t.relid AND a.attname = k.name AND NOT a.attisdropped;

    IF n_found IS DISTINCT FROM cardinality(t.key_columns) THEN
        RAISE EXCEPTION 'pgferry: key columns % of % not found', t.key_columns, rel;
    END IF;

    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (xid xid8 NOT NULL, %s)', delta, key_defs);

    fence_sql := $f$
    IF (SELECT last_value FROM pgferry.fence) <> 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = '25006',
            MESSAGE = format('pgferry: writes to %I.%I are blocked while the database moves to its new server', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            HINT = 'Retry against the new database once the cutover has finished.';
    END IF;$f$;

    FOR ev IN
        SELECT * FROM (VALUES
            ('ins',   'INSERT',   'REFERENCING NEW TABLE AS pgferry_new',
             format('INSERT INTO %s (xid, %s) SELECT pg_current_xact_id(), %s FROM pgferry_new;', delta, key_cols, src_cols)),
            ('upd',   'UPDATE',   'REFERENCING OLD TABLE AS pgferry_old NEW TABLE AS pgferry_new',
             format('INSERT INTO %s (xid, %s) SELECT pg_current_xact_id(), %s FROM pgferry_new UNION SELECT pg_current_xact_id(), %s FROM pgferry_old;',
                    delta, key_cols, src_cols, src_cols)),
            ('del',   'DELETE',   'REFERENCING OLD TABLE AS pgferry_old',
             format('INSERT INTO %s (xid, %s) SELECT pg_current_xact_id(), %s FROM pgferry_old;', delta, key_cols, src_cols)),
            ('trunc', 'TRUNCATE', '',
             format('INSERT INTO pgferry.truncates (table_id, xid) VALUES (%s, pg_current_xact_id());', p_table_id))
        ) AS e(suffix, event, referencing, body)
    LOOP
        EXECUTE format(
            $fn$CREATE OR REPLACE FUNCTION pgferry.%I() RETURNS trigger
                LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
                AS $body$BEGIN %s
    %s
    RETURN NULL;
END$body$$fn$,
            format('capture_%s_%s', p_table_id, ev.suffix), fence_sql, ev.body);
        EXECUTE format('REVOKE ALL ON FUNCTION pgferry.%I() FROM PUBLIC', format('capture_%s_%s', p_table_id, ev.suffix));
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = t.relid AND tgname = 'pgferry_capture_' || ev.suffix) THEN
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION pgferry.%I()',
                           'pgferry_capture_' || ev.suffix, ev.event, rel, ev.referencing,
                           format('capture_%s_%s', p_table_id, ev.suffix));
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', rel, 'pgferry_capture_' || ev.suffix);
        END IF;
    END LOOP;
END
$install$;

REVOKE ALL ON FUNCTION capture_install(integer) FROM PUBLIC;
