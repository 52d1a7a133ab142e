-- pgferry control schema, version 2: the cutover's point of no return.
--
-- Set just before the switch command runs. From then on the application may
-- be writing to the target, so nothing may abort the cutover or lift the
-- fence; a re-run only completes the remaining steps.
ALTER TABLE run ADD COLUMN switch_started_at timestamptz;
