-- pgferry control schema, version 7: cheaper capture, bounded delta storage.
--
-- Measured with `pgferry-bench capture`:
-- * the fence is read with pg_sequence_last_value(), which plpgsql evaluates
--   as a simple expression, instead of a subquery run through the executor
--   for every captured statement; like the subquery it reads the sequence
--   outside MVCC, so the fence holds for snapshots that predate it;
-- * an UPDATE still records old and new keys with UNION, not UNION ALL: a
--   key that did not change is then one delta row, not two (the set
--   operation hashes with each type's default equality, found without
--   search_path; an anti-join on the key needs an = operator by name, and
--   comparing whole rows instead made a 100k-row UPDATE quadratic).
-- Delta tables are inserted into by the application and emptied by the drain
-- all the time; their autovacuum starts after a fixed number of dead rows
-- instead of a fraction of the table, without cost delay, so that their size
-- stays bounded under steady load.

CREATE FUNCTION delta_storage() RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT 'autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000, '
          || 'autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000, '
          || 'autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0, '
          || 'autovacuum_analyze_threshold = 10000' $$;
REVOKE ALL ON FUNCTION delta_storage() FROM PUBLIC;

DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.oid::regclass AS rel FROM pg_class c
              WHERE c.relnamespace = 'pgferry'::regnamespace AND c.relkind = 'r' AND c.relname LIKE 'd\_%'
    LOOP
        EXECUTE format('ALTER TABLE %s SET (%s)', r.rel, delta_storage());
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION capture_install(p_table_id integer) RETURNS void
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

    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (xid xid8 NOT NULL, %s) WITH (%s)', delta, key_defs, pgferry.delta_storage());

    fence_sql := $f$
    IF pg_sequence_last_value('pgferry.fence'::regclass) > 0 THEN
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

-- copy_only tables' fence trigger, read the same way.
CREATE OR REPLACE FUNCTION fence_only() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    IF pg_sequence_last_value('pgferry.fence'::regclass) > 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = '25006',
            MESSAGE = format('pgferry: writes to %I.%I are blocked while the database moves to its new server', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            HINT = 'Retry against the new database once the cutover has finished.';
    END IF;
    RETURN NULL;
END
$body$;
