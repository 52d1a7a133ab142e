-- pgferry control schema, version 18: the way back's lag.
--
-- On a target that captures for the way back (`direction = 'reverse'`),
-- the snapshot time of the last pass that applied everything it saw to
-- the old source: what was committed on the target before it is there, so
-- the time since bounds the age of the oldest change not yet applied
-- (`pgferry_reverse_lag_seconds`).
ALTER TABLE run ADD COLUMN reverse_synced_through timestamptz;
