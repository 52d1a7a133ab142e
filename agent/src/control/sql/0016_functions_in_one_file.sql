-- pgferry control schema, version 16: the functions live in one file.
--
-- Versions 1 to 15 each restated whole the functions they changed
-- (`capture_install` five times). From now on `functions.sql` holds every
-- control function as it is now, re-applied whole after the versioned
-- files whenever it differs from the copy recorded here; a versioned file
-- holds tables, data, and the reasons for a change. The definitions
-- current at version 15 moved there from versions 3, 9, 11 and 15 (each
-- says so); the older ones stay where they were, for the data steps of
-- an upgrade through those versions (`delta_storage`, which version 7's
-- data step calls, is in both). The first application re-creates the
-- functions as version 15 left them.
CREATE TABLE repeatable (
    name        text PRIMARY KEY,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
