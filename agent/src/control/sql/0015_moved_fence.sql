-- pgferry control schema, version 15: the fence says the database moved.
--
-- After the switch the old source stays fenced until the application has
-- left it (`cutover.release_after_ms`). A writer still connected then is
-- not waiting for a cutover to end: its database has moved, and a write
-- it made here would be lost. `fence_apply(raised, moved)` sets the bodies
-- as `fence_set` does (version 14), with the refusal naming the move when
-- `moved`; `fence_set(raised)` keeps its signature for the agent's callers.
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
    f      record;
BEGIN
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

CREATE OR REPLACE FUNCTION fence_set(p_raised boolean) RETURNS void
LANGUAGE sql
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pgferry.fence_apply(p_raised, false) $$;

REVOKE ALL ON FUNCTION fence_apply(boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION fence_set(boolean) FROM PUBLIC;
