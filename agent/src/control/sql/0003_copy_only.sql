-- pgferry control schema, version 3: tables copied whole under the fence.
--
-- A table without a usable key cannot be synced by key; listed under
-- copy_only it gets no capture, only this fence trigger, and is copied in
-- full during the cutover, while writes are fenced.
--
-- fence_install, as it is now, is in functions.sql (version 16).
ALTER TABLE tables ADD COLUMN copy_only boolean NOT NULL DEFAULT false;

CREATE FUNCTION fence_only() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    IF (SELECT last_value FROM pgferry.fence) <> 0 THEN
        RAISE EXCEPTION USING
            ERRCODE = '25006',
            MESSAGE = format('pgferry: writes to %I.%I are blocked while the database moves to its new server', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            HINT = 'Retry against the new database once the cutover has finished.';
    END IF;
    RETURN NULL;
END
$body$;
REVOKE ALL ON FUNCTION fence_only() FROM PUBLIC;
