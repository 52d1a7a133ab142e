-- pgferry control schema, version 19: a switchback is remembered.
--
-- On the old source after `pgferry switchback`, until a cutover finishes
-- again: the operator went back on purpose, so `migrate --cutover` (the
-- service, restarted) syncs instead of cutting over on its own; an
-- explicit `pgferry cutover` goes again. An older control schema lacks the
-- column, and pgferry reads it as never switched back.
ALTER TABLE run ADD COLUMN switched_back_at timestamptz;
