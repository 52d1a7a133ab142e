-- pgferry control schema, version 11: a delta row is the key, nothing else.
--
-- Every delta row used to carry its transaction id, so that the drain could
-- forget the rows a batch consumed, after the target commit, with
-- `DELETE ... WHERE pg_visible_in_snapshot(xid, S)`. The drain now deletes
-- them in the batch's own source transaction, whose snapshot is S, after the
-- target commit and before its own: the same rows (exactly those visible in
-- S), made durable only after the target is, and left in place by a crash
-- in between as before.
--
-- Without the column each captured statement costs the source 2,400
-- machine instructions less (valgrind's callgrind, single-row UPDATEs in
-- single-user mode: 31,900 added instead of 34,300, 7%), the transaction id
-- call and the wider projection the executor builds anew for every captured
-- statement; and every delta row is 8 bytes narrower.
--
-- Delta tables created before this version keep their column (dropping it
-- would take an ACCESS EXCLUSIVE lock on a table every captured write
-- inserts into); their capture functions go on filling it. The drain does
-- not read it.

-- (Re)creates the capturing bodies of one registered table's capture
-- functions. As in version 10, with the transaction id written only into a
-- delta table that still has the column. Takes no lock on the table.
CREATE OR REPLACE FUNCTION capture_functions(p_table_id integer) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $functions$
DECLARE
    t          pgferry.tables%ROWTYPE;
    delta      text := format('pgferry.%I', 'd_' || p_table_id);
    has_xid    boolean;
    xid_col    text;
    xid_val    text;
    key_cols   text;
    src_cols   text;
    old_cols   text;
    upd_body   text;
    ev         record;
BEGIN
    SELECT * INTO STRICT t FROM pgferry.tables WHERE id = p_table_id;
    SELECT EXISTS (SELECT 1 FROM pg_attribute
                    WHERE attrelid = to_regclass(delta) AND attname = 'xid' AND NOT attisdropped)
      INTO has_xid;
    xid_col := CASE WHEN has_xid THEN 'xid, ' ELSE '' END;
    xid_val := CASE WHEN has_xid THEN 'pg_catalog.pg_current_xact_id(), ' ELSE '' END;
    SELECT string_agg(format('k%s', k.ord), ', ' ORDER BY k.ord),
           string_agg(format('%I', k.name), ', ' ORDER BY k.ord),
           string_agg(format('OLD.%I', k.name), ', ' ORDER BY k.ord)
      INTO key_cols, src_cols, old_cols
      FROM unnest(t.key_columns) WITH ORDINALITY AS k(name, ord);

    IF coalesce(t.key_trigger, false) THEN
        upd_body := format('INSERT INTO %s (%s%s) SELECT %s%s FROM pgferry_new;',
                           delta, xid_col, key_cols, xid_val, src_cols);
    ELSE
        upd_body := format('INSERT INTO %s (%s%s) SELECT %s%s FROM pgferry_new '
                           'UNION SELECT %s%s FROM pgferry_old;',
                           delta, xid_col, key_cols, xid_val, src_cols, xid_val, src_cols);
    END IF;

    FOR ev IN
        SELECT * FROM (VALUES
            ('ins',   format('INSERT INTO %s (%s%s) SELECT %s%s FROM pgferry_new;',
                             delta, xid_col, key_cols, xid_val, src_cols)),
            ('upd',   upd_body),
            ('del',   format('INSERT INTO %s (%s%s) SELECT %s%s FROM pgferry_old;',
                             delta, xid_col, key_cols, xid_val, src_cols)),
            ('trunc', format('INSERT INTO pgferry.truncates (table_id, xid) VALUES (%s, pg_catalog.pg_current_xact_id());',
                             p_table_id)),
            ('key',   format('INSERT INTO %s (%s%s) VALUES (%s%s);',
                             delta, xid_col, key_cols, xid_val, old_cols))
        ) AS e(suffix, body)
        WHERE e.suffix <> 'key' OR coalesce(t.key_trigger, false)
    LOOP
        EXECUTE format(
            $fn$CREATE OR REPLACE FUNCTION pgferry.%I() RETURNS trigger
                LANGUAGE plpgsql SECURITY DEFINER
                AS $body$BEGIN
    %s
    RETURN NULL;
END$body$$fn$,
            format('capture_%s_%s', p_table_id, ev.suffix), ev.body);
        EXECUTE format('REVOKE ALL ON FUNCTION pgferry.%I() FROM PUBLIC', format('capture_%s_%s', p_table_id, ev.suffix));
    END LOOP;
END
$functions$;

-- Installs capture for one registered table: its delta table (the key
-- columns only), its capture functions, the four statement-level triggers
-- (transition tables) and, where it fits, the key column trigger; all
-- enabled ALWAYS. Idempotent. As in version 9 but for the delta table.
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

    EXECUTE format('CREATE TABLE IF NOT EXISTS pgferry.%I (%s) WITH (%s)',
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
