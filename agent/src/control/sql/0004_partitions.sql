-- pgferry control schema, version 4: declarative partitioning.
--
-- A partitioned table is captured at its root (statements aimed at the root)
-- and at each partition (statements aimed at a partition). The root's batches
-- read and write through the root (no ONLY), and every batch of one hierarchy
-- takes the same lock, so a root batch and a partition batch naming the same
-- row never overlap.
ALTER TABLE tables ADD COLUMN partitioned boolean NOT NULL DEFAULT false;
ALTER TABLE tables ADD COLUMN lock_relid oid;
UPDATE tables SET lock_relid = relid;
ALTER TABLE tables ALTER COLUMN lock_relid SET NOT NULL;
