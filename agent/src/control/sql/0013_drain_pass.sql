-- pgferry control schema, version 13: what the last drain pass found.
--
-- A drain pass used to run a batch on every captured table, each a few
-- round trips and an UPDATE of the table's row here: with 2,000 idle
-- tables (a schema per tenant), 4,000 transactions a second on an idle
-- source and 3.5 s between two batches of the one busy table. A pass now
-- reads every delta table's backlog in one round trip and runs batches
-- only where something is pending. The tables it skips are in sync as of
-- that reading, which is recorded here, once per pass, instead of in each
-- table's row: `checked_at` is the reading's `now()` (every backlog was
-- read in a later snapshot), `dirty` the ids of the tables that had deltas
-- or a TRUNCATE to apply, whose lag their own `synced_through` tells.
ALTER TABLE run ADD COLUMN pass_checked_at timestamptz;
ALTER TABLE run ADD COLUMN pass_dirty integer[];
