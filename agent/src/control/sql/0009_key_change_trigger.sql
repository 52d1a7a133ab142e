-- pgferry control schema, version 9: an UPDATE's old keys from a row trigger
-- that fires only when the key columns are assigned.
--
-- Measured (one session, 40,000 single-row UPDATE transactions, and
-- `pgferry-bench capture`): the statement-level UPDATE trigger that reads
-- both transition tables and writes `new UNION old` cost 6.4 µs per
-- statement; reading the new rows only costs 3.7 µs. The old table is
-- needed only for a key that changed, so for plain tables the UPDATE
-- capture is now:
-- * a statement-level trigger writing the new rows' keys (NEW TABLE only);
-- * a row-level `AFTER UPDATE OF <key columns>` trigger writing the old key
--   when it differs from the new one in any byte (`*<>`, the image
--   comparison, between the keys cast to `record`: without the cast a row
--   constructor comparison would look up `*<>` for each key column's type).
--   It is stricter than the type's equality, and an extra delta row is
--   harmless. A column trigger is skipped in C when the statement does not
--   assign a key column, which is nearly always.
-- A column trigger does not see what a BEFORE UPDATE row trigger changes,
-- and a row that an UPDATE moves to another partition fires no UPDATE row
-- trigger, so tables with a BEFORE UPDATE row trigger of their own, partitioned
-- tables, partitions and tables in an inheritance hierarchy keep the old
-- design; so do tables captured by an earlier version. `tables.key_trigger`
-- records the choice, made once per capture install. A BEFORE UPDATE row
-- trigger created later is schema drift: `sync` stops, and `install`
-- captures and copies the table afresh.
--
-- key_trigger_fits, as it is now, is in functions.sql (version 16).

ALTER TABLE tables ADD COLUMN key_trigger boolean;
UPDATE tables t SET key_trigger = false
 WHERE EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = t.relid AND tgname = 'pgferry_capture_upd');

-- (Re)creates the capture functions of one registered table. Takes no lock
-- on the table: the triggers already installed call the new bodies from
-- their next statement on.
CREATE OR REPLACE FUNCTION capture_functions(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $functions$
DECLARE
    t          pgferry.tables%ROWTYPE;
    delta      text := format('pgferry.%I', 'd_' || p_table_id);
    key_cols   text;
    src_cols   text;
    old_cols   text;
    fence_sql  text;
    upd_body   text;
    ev         record;
BEGIN
    SELECT * INTO STRICT t FROM pgferry.tables WHERE id = p_table_id;
    SELECT string_agg(format('k%s', k.ord), ', ' ORDER BY k.ord),
           string_agg(format('%I', k.name), ', ' ORDER BY k.ord),
           string_agg(format('OLD.%I', k.name), ', ' ORDER BY k.ord)
      INTO key_cols, src_cols, old_cols
      FROM unnest(t.key_columns) WITH ORDINALITY AS k(name, ord);

    fence_sql := $f$
    IF pg_catalog.pg_sequence_last_value('pgferry.fence'::pg_catalog.regclass) OPERATOR(pg_catalog.>) 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = '25006',
            MESSAGE = pg_catalog.format('pgferry: writes to %I.%I are blocked while the database moves to its new server', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            HINT = 'Retry against the new database once the cutover has finished.';
    END IF;$f$;

    IF coalesce(t.key_trigger, false) THEN
        upd_body := format('INSERT INTO %s (xid, %s) SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_new;',
                           delta, key_cols, src_cols);
    ELSE
        upd_body := format('INSERT INTO %s (xid, %s) SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_new '
                           'UNION SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_old;',
                           delta, key_cols, src_cols, src_cols);
    END IF;

    FOR ev IN
        SELECT * FROM (VALUES
            ('ins',   fence_sql, format('INSERT INTO %s (xid, %s) SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_new;',
                                        delta, key_cols, src_cols)),
            ('upd',   fence_sql, upd_body),
            ('del',   fence_sql, format('INSERT INTO %s (xid, %s) SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_old;',
                                        delta, key_cols, src_cols)),
            ('trunc', fence_sql, format('INSERT INTO pgferry.truncates (table_id, xid) VALUES (%s, pg_catalog.pg_current_xact_id());',
                                        p_table_id)),
            -- The row trigger: the statement-level UPDATE trigger of the same
            -- statement checks the fence.
            ('key',   '',        format('INSERT INTO %s (xid, %s) VALUES (pg_catalog.pg_current_xact_id(), %s);',
                                        delta, key_cols, old_cols))
        ) AS e(suffix, fence, body)
        WHERE e.suffix <> 'key' OR coalesce(t.key_trigger, false)
    LOOP
        EXECUTE format(
            $fn$CREATE OR REPLACE FUNCTION pgferry.%I() RETURNS trigger
                LANGUAGE plpgsql SECURITY DEFINER
                AS $body$BEGIN %s
    %s
    RETURN NULL;
END$body$$fn$,
            format('capture_%s_%s', p_table_id, ev.suffix), ev.fence, ev.body);
        EXECUTE format('REVOKE ALL ON FUNCTION pgferry.%I() FROM PUBLIC', format('capture_%s_%s', p_table_id, ev.suffix));
    END LOOP;
END
$functions$;

-- Installs capture for one registered table: its delta table, its capture
-- functions, the four statement-level triggers (transition tables) and,
-- where it fits, the key column trigger; all enabled ALWAYS. Idempotent.
CREATE OR REPLACE FUNCTION capture_install(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $install$
DECLARE
    t          pgferry.tables%ROWTYPE;
    rel        regclass;
    key_defs   text;
    key_names  text;
    old_row    text;
    new_row    text;
    n_found    integer;
    ev         record;
BEGIN
    SELECT * INTO STRICT t FROM pgferry.tables WHERE id = p_table_id;
    rel := t.relid::regclass;

    SELECT string_agg(format('k%s %s NOT NULL', k.ord, format_type(a.atttypid, a.atttypmod)), ', ' ORDER BY k.ord),
           string_agg(format('%I', k.name), ', ' ORDER BY k.ord),
           string_agg(format('OLD.%I', k.name), ', ' ORDER BY k.ord),
           string_agg(format('NEW.%I', k.name), ', ' ORDER BY k.ord),
           count(*)
      INTO key_defs, key_names, old_row, new_row, n_found
      FROM unnest(t.key_columns) WITH ORDINALITY AS k(name, ord)
      JOIN pg_attribute a ON a.attrelid = t.relid AND a.attname = k.name AND NOT a.attisdropped;

    IF n_found IS DISTINCT FROM cardinality(t.key_columns) THEN
        RAISE EXCEPTION 'pgferry: key columns % of % not found', t.key_columns, rel;
    END IF;

    IF t.key_trigger IS NULL THEN
        t.key_trigger := pgferry.key_trigger_fits(t.relid)
            AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = t.relid AND tgname = 'pgferry_capture_upd');
        UPDATE pgferry.tables SET key_trigger = t.key_trigger WHERE id = p_table_id;
    END IF;

    EXECUTE format('CREATE TABLE IF NOT EXISTS pgferry.%I (xid xid8 NOT NULL, %s) WITH (%s)',
                   'd_' || p_table_id, key_defs, pgferry.delta_storage());
    PERFORM pgferry.capture_functions(p_table_id);

    FOR ev IN
        SELECT * FROM (VALUES
            ('ins',   'INSERT',   'REFERENCING NEW TABLE AS pgferry_new', 'STATEMENT', ''),
            ('upd',   'UPDATE',
             CASE WHEN t.key_trigger THEN 'REFERENCING NEW TABLE AS pgferry_new'
                  ELSE 'REFERENCING OLD TABLE AS pgferry_old NEW TABLE AS pgferry_new' END,
             'STATEMENT', ''),
            ('del',   'DELETE',   'REFERENCING OLD TABLE AS pgferry_old', 'STATEMENT', ''),
            ('trunc', 'TRUNCATE', '', 'STATEMENT', ''),
            ('key',   format('UPDATE OF %s', key_names), '', 'ROW',
             format('WHEN (ROW(%s)::pg_catalog.record OPERATOR(pg_catalog.*<>) ROW(%s)::pg_catalog.record)', old_row, new_row))
        ) AS e(suffix, event, referencing, level, condition)
        WHERE e.suffix <> 'key' OR t.key_trigger
    LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = t.relid AND tgname = 'pgferry_capture_' || ev.suffix) THEN
            EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH %s %s EXECUTE FUNCTION pgferry.%I()',
                           'pgferry_capture_' || ev.suffix, ev.event, rel, ev.referencing, ev.level, ev.condition,
                           format('capture_%s_%s', p_table_id, ev.suffix));
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', rel, 'pgferry_capture_' || ev.suffix);
        END IF;
    END LOOP;
END
$install$;
