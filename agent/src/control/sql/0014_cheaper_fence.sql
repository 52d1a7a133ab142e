-- pgferry control schema, version 14: a cheaper fence.
--
-- Raising the fence is write downtime, and it rewrote every capture
-- function: 1.2-1.3 s for 2,000 tables on the development machine, most
-- of it PL/pgSQL compiling each new body to validate it. Now:
-- - the functions are created with `check_function_bodies` off, as
--   pg_restore creates them: the fenced body is one fixed text, and the
--   capturing bodies put back are those `capture_functions` made, and
--   PostgreSQL validated, at install;
-- - the key column trigger's function (`capture_<id>_key`) is left
--   capturing: it fires only in an UPDATE, whose statement trigger then
--   refuses the statement, and what the key function wrote with it.
-- Measured: 0.4-0.5 s at 2,000 tables.
CREATE OR REPLACE FUNCTION fence_set(p_raised boolean) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET check_function_bodies = off
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
