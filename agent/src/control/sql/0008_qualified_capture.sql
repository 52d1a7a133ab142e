-- pgferry control schema, version 8: capture functions without SET clauses.
--
-- Measured with `pgferry-bench capture` (pgbench TPC-B-like, 8 clients): a
-- trigger function declared with `SET search_path` saves, sets and restores
-- that setting on every call, which cost the source about 7 points of TPS
-- (capture -29% against -22% without it). The capture and fence functions
-- stay SECURITY DEFINER, so the application's roles need no privilege on
-- schema pgferry, and stay safe from a caller's search_path without the
-- SET clause: every function, operator, type and table they name is
-- schema-qualified (pg_catalog or pgferry). The only unqualified names are
-- the transition tables, which PostgreSQL resolves before any schema.

-- (Re)creates the four capture functions of one registered table. Takes no
-- lock on the table: the triggers already installed call the new bodies from
-- their next statement on.
CREATE FUNCTION capture_functions(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $functions$
DECLARE
    t          pgferry.tables%ROWTYPE;
    delta      text := format('pgferry.%I', 'd_' || p_table_id);
    key_cols   text;
    src_cols   text;
    fence_sql  text;
    ev         record;
BEGIN
    SELECT * INTO STRICT t FROM pgferry.tables WHERE id = p_table_id;
    SELECT string_agg(format('k%s', k.ord), ', ' ORDER BY k.ord),
           string_agg(format('%I', k.name), ', ' ORDER BY k.ord)
      INTO key_cols, src_cols
      FROM unnest(t.key_columns) WITH ORDINALITY AS k(name, ord);

    fence_sql := $f$
    IF pg_catalog.pg_sequence_last_value('pgferry.fence'::pg_catalog.regclass) OPERATOR(pg_catalog.>) 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = '25006',
            MESSAGE = pg_catalog.format('pgferry: writes to %I.%I are blocked while the database moves to its new server', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            HINT = 'Retry against the new database once the cutover has finished.';
    END IF;$f$;

    FOR ev IN
        SELECT * FROM (VALUES
            ('ins',   format('INSERT INTO %s (xid, %s) SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_new;',
                             delta, key_cols, src_cols)),
            ('upd',   format('INSERT INTO %s (xid, %s) SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_new '
                             'UNION SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_old;',
                             delta, key_cols, src_cols, src_cols)),
            ('del',   format('INSERT INTO %s (xid, %s) SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_old;',
                             delta, key_cols, src_cols)),
            ('trunc', format('INSERT INTO pgferry.truncates (table_id, xid) VALUES (%s, pg_catalog.pg_current_xact_id());',
                             p_table_id))
        ) AS e(suffix, body)
    LOOP
        EXECUTE format(
            $fn$CREATE OR REPLACE FUNCTION pgferry.%I() RETURNS trigger
                LANGUAGE plpgsql SECURITY DEFINER
                AS $body$BEGIN %s
    %s
    RETURN NULL;
END$body$$fn$,
            format('capture_%s_%s', p_table_id, ev.suffix), fence_sql, ev.body);
        EXECUTE format('REVOKE ALL ON FUNCTION pgferry.%I() FROM PUBLIC', format('capture_%s_%s', p_table_id, ev.suffix));
    END LOOP;
END
$functions$;
REVOKE ALL ON FUNCTION capture_functions(integer) FROM PUBLIC;

-- Installs capture for one registered table: its delta table, its capture
-- functions, and the four statement-level triggers (transition tables),
-- enabled ALWAYS. Idempotent.
CREATE OR REPLACE FUNCTION capture_install(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $install$
DECLARE
    t          pgferry.tables%ROWTYPE;
    rel        regclass;
    key_defs   text;
    n_found    integer;
    ev         record;
BEGIN
    SELECT * INTO STRICT t FROM pgferry.tables WHERE id = p_table_id;
    rel := t.relid::regclass;

    SELECT string_agg(format('k%s %s NOT NULL', k.ord, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
           count(*)
      INTO key_defs, n_found
      FROM unnest(t.key_columns) WITH ORDINALITY AS k(name, ord)
      JOIN pg_attribute a ON a.attrelid = t.relid AND a.attname = k.name AND NOT a.attisdropped;

    IF n_found IS DISTINCT FROM cardinality(t.key_columns) THEN
        RAISE EXCEPTION 'pgferry: key columns % of % not found', t.key_columns, rel;
    END IF;

    EXECUTE format('CREATE TABLE IF NOT EXISTS pgferry.%I (xid xid8 NOT NULL, %s) WITH (%s)',
                   'd_' || p_table_id, key_defs, pgferry.delta_storage());
    PERFORM pgferry.capture_functions(p_table_id);

    FOR ev IN
        SELECT * FROM (VALUES
            ('ins',   'INSERT',   'REFERENCING NEW TABLE AS pgferry_new'),
            ('upd',   'UPDATE',   'REFERENCING OLD TABLE AS pgferry_old NEW TABLE AS pgferry_new'),
            ('del',   'DELETE',   'REFERENCING OLD TABLE AS pgferry_old'),
            ('trunc', 'TRUNCATE', '')
        ) AS e(suffix, event, referencing)
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = t.relid AND tgname = 'pgferry_capture_' || ev.suffix) THEN
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION pgferry.%I()',
                           'pgferry_capture_' || ev.suffix, ev.event, rel, ev.referencing,
                           format('capture_%s_%s', p_table_id, ev.suffix));
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', rel, 'pgferry_capture_' || ev.suffix);
        END IF;
    END LOOP;
END
$install$;

-- copy_only tables' fence trigger, without a SET clause either.
CREATE OR REPLACE FUNCTION fence_only() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
AS $body$
BEGIN
    IF pg_catalog.pg_sequence_last_value('pgferry.fence'::pg_catalog.regclass) OPERATOR(pg_catalog.>) 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = '25006',
            MESSAGE = pg_catalog.format('pgferry: writes to %I.%I are blocked while the database moves to its new server', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            HINT = 'Retry against the new database once the cutover has finished.';
    END IF;
    RETURN NULL;
END
$body$;

-- Tables captured by an earlier version get the new function bodies now.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT t.id FROM pgferry.tables t
              WHERE NOT t.copy_only
                AND EXISTS (SELECT 1 FROM pg_proc p
                             WHERE p.pronamespace = 'pgferry'::regnamespace AND p.proname = format('capture_%s_ins', t.id))
    LOOP
        PERFORM pgferry.capture_functions(r.id);
    END LOOP;
END
$$;
