-- pgferry control schema, version 16: the functions live in one file.
--
-- Versions 1 to 15 each restated whole the functions they changed
-- (`capture_install` five times). From now on `functions.sql` holds every
-- control function as it is now, re-applied whole after the versioned
-- files whenever it differs from the copy recorded here; a versioned file
-- holds tables, data, and the reasons for a change. The first application
-- re-creates the functions as version 15 left them.
CREATE TABLE repeatable (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
