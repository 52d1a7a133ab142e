-- pgferry control schema, version 10: the fence is the capture functions'
-- bodies, not a check that every captured statement makes.
--
-- Measured (`pgferry-bench capture`, pgbench TPC-B-like, 8 clients): reading
-- the fence sequence in every captured statement cost 0.9 µs of the capture's
-- 4 µs per single-row UPDATE; without it pgferry's TPS loss was 0.41-0.58
-- of Bucardo's in four runs, where it had been 0.57-0.64. So the capture
-- functions now check nothing:
-- raising the fence (`fence_set(true)`) replaces, in one transaction, the
-- body of every capture function and of `fence_only()` by one that refuses
-- the write (SQLSTATE 25006), and lifting it puts the capturing bodies back.
--
-- Why that holds for every session, including transactions whose snapshot
-- predates the fence: at every call PL/pgSQL checks that the function's
-- pg_proc row is the one it compiled (its xmin and ctid), reading the
-- catalog as of the invalidation messages the session has taken in. A
-- session takes them in when a transaction starts and whenever it takes a
-- lock on a relation that it did not hold in that mode, and a write takes
-- ROW EXCLUSIVE on its table. So a write that can still run a capturing
-- body after the fence is one whose transaction held that lock before it:
-- an in-flight writer, which the cutover waits for with `LOCK ... IN SHARE
-- MODE` before its final drain, as before.
--
-- The sequence `fence` stays the flag that `status` reads, set in the same
-- transaction.

-- (Re)creates the capturing bodies of one registered table's capture
-- functions, with no fence check (see above). Takes no lock on the table:
-- the triggers already installed call the new bodies from their next
-- statement on.
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
    upd_body   text;
    ev         record;
BEGIN
    SELECT * INTO STRICT t FROM pgferry.tables WHERE id = p_table_id;
    SELECT string_agg(format('k%s', k.ord), ', ' ORDER BY k.ord),
           string_agg(format('%I', k.name), ', ' ORDER BY k.ord),
           string_agg(format('OLD.%I', k.name), ', ' ORDER BY k.ord)
      INTO key_cols, src_cols, old_cols
      FROM unnest(t.key_columns) WITH ORDINALITY AS k(name, ord);

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
            ('ins',   format('INSERT INTO %s (xid, %s) SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_new;',
                             delta, key_cols, src_cols)),
            ('upd',   upd_body),
            ('del',   format('INSERT INTO %s (xid, %s) SELECT pg_catalog.pg_current_xact_id(), %s FROM pgferry_old;',
                             delta, key_cols, src_cols)),
            ('trunc', format('INSERT INTO pgferry.truncates (table_id, xid) VALUES (%s, pg_catalog.pg_current_xact_id());',
                             p_table_id)),
            ('key',   format('INSERT INTO %s (xid, %s) VALUES (pg_catalog.pg_current_xact_id(), %s);',
                             delta, key_cols, old_cols))
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


-- Raises (true) or lifts (false) the fence: the bodies of every capture
-- function and of `fence_only()`, then the flag. Takes no lock on any
-- application table.
CREATE FUNCTION fence_set(p_raised boolean) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fence$
DECLARE
    refuse text := $r$
    RAISE EXCEPTION USING
        ERRCODE = '25006',
        MESSAGE = pg_catalog.format('pgferry: writes to %I.%I are blocked while the database moves to its new server', TG_TABLE_SCHEMA, TG_TABLE_NAME),
        HINT = 'Retry against the new database once the cutover has finished.';$r$;
    f      record;
BEGIN
    IF p_raised THEN
        FOR f IN SELECT p.proname FROM pg_proc p
                  WHERE p.pronamespace = 'pgferry'::regnamespace AND p.proname ~ '^capture_[0-9]+_[a-z]+$'
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
REVOKE ALL ON FUNCTION fence_set(boolean) FROM PUBLIC;

-- Every function gets the bodies of the fence's present state.
SELECT fence_set(coalesce(pg_sequence_last_value('fence'), 0) > 0);
