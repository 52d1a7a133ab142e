-- pgferry control schema: its functions, as they are now.
--
-- Re-applied, whole, by `install` when this copy differs from the one the
-- control schema last recorded (`pgferry.repeatable`), after the versioned
-- files, in the same transaction (control/mod.rs, `ensure_schema`). So a
-- function is changed here, in place, never restated in a versioned file;
-- a change comes with a new versioned file saying what changed and why (it
-- may hold no statement), so that an older pgferry refuses the newer
-- schema instead of putting its own functions back. Versions 1 to 15
-- restated functions whole: they keep the definitions an upgrade through
-- them runs its data steps with, and the ones current at version 15 moved
-- here.
--
-- Only code lives here: the per-table capture functions and the fence
-- trigger's function are state (made by `capture_functions` and
-- `fence_apply`), and this file never touches them. After it is applied,
-- with the fence down, the captured tables' capture functions are made
-- again (`fence_apply(false, false)`), so that a change to
-- `capture_functions` reaches them at once; with the fence up they refuse
-- writes, and are made again when it is lifted.

-- Installs the fence trigger of a copy_only table. Idempotent.
CREATE OR REPLACE FUNCTION fence_install(p_table_id integer) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $install$
DECLARE
    rel regclass;
BEGIN
    SELECT relid::regclass INTO STRICT rel FROM pgferry.tables WHERE id = p_table_id AND copy_only;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = rel AND tgname = 'pgferry_fence') THEN
        EXECUTE format('CREATE TRIGGER pgferry_fence BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s
                        FOR EACH STATEMENT EXECUTE FUNCTION pgferry.fence_only()', rel);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER pgferry_fence', rel);
    END IF;
END
$install$;
REVOKE ALL ON FUNCTION fence_install(integer) FROM PUBLIC;

-- The storage parameters of a delta table: inserted into by the
-- application and emptied by the drain all the time, so autovacuum starts
-- after a fixed number of dead rows, without cost delay.
CREATE OR REPLACE FUNCTION delta_storage() RETURNS text
LANGUAGE sql IMMUTABLE
AS $$ SELECT 'autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 2000, '
          || 'autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 10000, '
          || 'autovacuum_vacuum_cost_delay = 0, autovacuum_analyze_scale_factor = 0, '
          || 'autovacuum_analyze_threshold = 10000' $$;
REVOKE ALL ON FUNCTION delta_storage() FROM PUBLIC;

-- Whether the capture of `p_relid` may take an UPDATE's old keys from a key
-- column trigger (see above).
CREATE OR REPLACE FUNCTION key_trigger_fits(p_relid oid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.relkind = 'r' AND NOT c.relispartition
       AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid OR i.inhparent = c.oid)
       AND NOT EXISTS (SELECT 1 FROM pg_trigger tg
                        WHERE tg.tgrelid = c.oid AND NOT tg.tgisinternal AND tg.tgname NOT LIKE 'pgferry\_%'
                          -- ROW (1) | BEFORE (2) | UPDATE (16)
                          AND (tg.tgtype::integer & 19) = 19)
      FROM pg_class c WHERE c.oid = p_relid
$$;
REVOKE ALL ON FUNCTION key_trigger_fits(oid) FROM PUBLIC;

-- The type `capture_key_release` gives a delta table's column for a key
-- column of type `p_type` (and modifier): the widest of its family, so
-- that the application widening its key (integer to bigint, a longer
-- varchar, more numeric precision) never makes the capture refuse one of
-- its keys while sync has yet to follow the change (version 20). Not at
-- install: converting an integer key to bigint costs every captured
-- statement about 2,300 instructions (7% of what capture adds to a
-- single-row UPDATE, `pgferry-bench capture`). A batch stages the keys as
-- the target's types (`rows::stage_keys`).
CREATE OR REPLACE FUNCTION delta_key_type(p_type oid, p_typmod integer) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE WHEN p_type IN ('int2'::regtype, 'int4'::regtype) THEN 'bigint'
                WHEN p_type = 'varchar'::regtype THEN 'character varying'
                WHEN p_type = 'numeric'::regtype THEN 'numeric'
                ELSE format_type(p_type, p_typmod) END
$$;
REVOKE ALL ON FUNCTION delta_key_type(oid, integer) FROM PUBLIC;

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
REVOKE ALL ON FUNCTION capture_functions(integer) FROM PUBLIC;

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
REVOKE ALL ON FUNCTION capture_install(integer) FROM PUBLIC;

-- Makes one captured table's delta key columns the widest of their types
-- (`delta_key_type`), then moves it from the key column trigger to the
-- UPDATE trigger that reads both transition tables, in the caller's
-- transaction, so that no UPDATE goes uncaptured between the two (version
-- 20). Returns false when the table has no key column trigger (its delta
-- is widened all the same). Refused with the fence up, whose refusing
-- bodies `capture_functions` would replace.
CREATE OR REPLACE FUNCTION capture_key_release(p_table_id integer) RETURNS boolean
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $release$
DECLARE
    t   pgferry.tables%ROWTYPE;
    rel regclass;
    k   record;
BEGIN
    SELECT * INTO STRICT t FROM pgferry.tables WHERE id = p_table_id;
    rel := t.relid::regclass;
    FOR k IN
        SELECT format('k%s', u.ord) AS col, pgferry.delta_key_type(a.atttypid, a.atttypmod) AS wide,
               (SELECT format_type(d.atttypid, d.atttypmod) FROM pg_attribute d
                 WHERE d.attrelid = to_regclass(format('pgferry.%I', 'd_' || p_table_id))
                   AND d.attname = format('k%s', u.ord)) AS now
          FROM unnest(t.key_columns) WITH ORDINALITY AS u(name, ord)
          JOIN pg_attribute a ON a.attrelid = t.relid AND a.attname = u.name AND NOT a.attisdropped
    LOOP
        IF k.now <> k.wide THEN
            EXECUTE format('ALTER TABLE pgferry.%I ALTER COLUMN %I TYPE %s', 'd_' || p_table_id, k.col, k.wide);
        END IF;
    END LOOP;
    IF NOT coalesce(t.key_trigger, false) THEN
        RETURN false;
    END IF;
    IF pg_sequence_last_value('pgferry.fence'::regclass) > 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = '55000',
            MESSAGE = 'pgferry: writes are fenced; key column triggers are released only while syncing';
    END IF;
    UPDATE pgferry.tables SET key_trigger = false WHERE id = p_table_id;
    EXECUTE format('DROP TRIGGER IF EXISTS pgferry_capture_key ON %s', rel);
    EXECUTE format('DROP TRIGGER IF EXISTS pgferry_capture_upd ON %s', rel);
    EXECUTE format('DROP FUNCTION IF EXISTS pgferry.%I()', format('capture_%s_key', p_table_id));
    PERFORM pgferry.capture_install(p_table_id);
    RETURN true;
END
$release$;
REVOKE ALL ON FUNCTION capture_key_release(integer) FROM PUBLIC;

-- Registers the key columns' names after `ALTER TABLE ... RENAME COLUMN`
-- of a key column, and makes the table's capture functions name them
-- (version 20): they name the key, so from the rename on they fail every
-- write to the table until this runs. With the fence up their bodies
-- refuse writes without naming a column and are left so: lifting the fence
-- makes them again from the registration.
CREATE OR REPLACE FUNCTION capture_rekey(p_table_id integer, p_key_columns text[]) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $rekey$
BEGIN
    UPDATE pgferry.tables SET key_columns = p_key_columns WHERE id = p_table_id;
    IF coalesce(pg_sequence_last_value('pgferry.fence'::regclass), 0) = 0
       AND EXISTS (SELECT 1 FROM pg_proc p
                    WHERE p.pronamespace = 'pgferry'::regnamespace
                      AND p.proname = format('capture_%s_ins', p_table_id)) THEN
        PERFORM pgferry.capture_functions(p_table_id);
    END IF;
END
$rekey$;
REVOKE ALL ON FUNCTION capture_rekey(integer, text[]) FROM PUBLIC;

-- Sets the fence: raised, every capture function of a table and the
-- fence trigger of copy_only tables refuse the write (naming the move when
-- `p_moved`: after the switch), except to a session whose setting
-- `pgferry.apply` holds `run.apply_pass` when there is one (version 17),
-- which they let through uncaptured; lowered, the capturing bodies are
-- made again by `capture_functions`. The fence is state, not code: this
-- file never sets it.
CREATE OR REPLACE FUNCTION fence_apply(p_raised boolean, p_moved boolean) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET check_function_bodies = off
AS $fence$
DECLARE
    refuse text := CASE WHEN p_moved THEN $r$
    RAISE EXCEPTION USING
        ERRCODE = '25006',
        MESSAGE = pg_catalog.format('pgferry: this database has moved to a new server; writes to %I.%I are refused here', TG_TABLE_SCHEMA, TG_TABLE_NAME),
        HINT = 'Point the application at the new database: a write made here would be lost.';$r$
    ELSE $r$
    RAISE EXCEPTION USING
        ERRCODE = '25006',
        MESSAGE = pg_catalog.format('pgferry: writes to %I.%I are blocked while the database moves to its new server', TG_TABLE_SCHEMA, TG_TABLE_NAME),
        HINT = 'Retry against the new database once the cutover has finished.';$r$
    END;
    pass   text := (SELECT r.apply_pass FROM pgferry.run r);
    f      record;
BEGIN
    IF pass IS NOT NULL THEN
        refuse := pg_catalog.format($r$
    IF pg_catalog.current_setting('pgferry.apply', true) IS DISTINCT FROM %L THEN%s
    END IF;$r$, pass, refuse);
    END IF;
    IF p_raised THEN
        FOR f IN SELECT p.proname FROM pg_proc p
                  WHERE p.pronamespace = 'pgferry'::regnamespace
                    AND p.proname ~ '^capture_[0-9]+_(ins|upd|del|trunc)$'
        LOOP
            EXECUTE format(
                $fn$CREATE OR REPLACE FUNCTION pgferry.%I() RETURNS trigger
                    LANGUAGE plpgsql SECURITY DEFINER
                    AS $body$BEGIN%s
    RETURN NULL;
END$body$$fn$,
                f.proname, refuse);
        END LOOP;
    ELSE
        PERFORM pgferry.capture_functions(t.id)
           FROM pgferry.tables t
          WHERE NOT t.copy_only
            AND EXISTS (SELECT 1 FROM pg_proc p
                         WHERE p.pronamespace = 'pgferry'::regnamespace AND p.proname = format('capture_%s_ins', t.id));
    END IF;
    EXECUTE format(
        $fn$CREATE OR REPLACE FUNCTION pgferry.fence_only() RETURNS trigger
            LANGUAGE plpgsql SECURITY DEFINER
            AS $body$BEGIN%s
    RETURN NULL;
END$body$$fn$,
        CASE WHEN p_raised THEN refuse ELSE '' END);
    PERFORM setval('pgferry.fence', CASE WHEN p_raised THEN 1 ELSE 0 END);
END
$fence$;
REVOKE ALL ON FUNCTION fence_apply(boolean, boolean) FROM PUBLIC;

-- The fence without the move (the agent's callers since version 10).
CREATE OR REPLACE FUNCTION fence_set(p_raised boolean) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgferry.fence_apply(p_raised, false) $$;
REVOKE ALL ON FUNCTION fence_set(boolean) FROM PUBLIC;
