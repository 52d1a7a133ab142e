-- pgferry control schema, version 17: fallback (`cutover.fallback`).
--
-- After the switch the old source follows the new database: pgferry's
-- apply sessions write to it through its fence, nobody else does. The
-- fence lets through a session whose setting `pgferry.apply` holds
-- `run.apply_pass` (`fence_apply` renders the check into the refusal,
-- functions.sql), and such a write is not captured: the old source records
-- nothing of what follows the new database.
--
-- `direction` is `forward` on the source of a migration and `reverse` on
-- its target while the target's changes are captured for the way back.
-- `disabled_triggers` holds the application's triggers pgferry disabled on
-- the old source while it applies there (they fired on the new database
-- already), with the mode each is restored to: O (origin), A (always) or
-- R (replica).
ALTER TABLE run ADD COLUMN apply_pass text;
ALTER TABLE run ADD COLUMN direction text NOT NULL DEFAULT 'forward'
    CHECK (direction IN ('forward', 'reverse'));
CREATE TABLE disabled_triggers (
    relid   oid NOT NULL,
    tgname  name NOT NULL,
    mode    "char" NOT NULL CHECK (mode IN ('O', 'A', 'R')),
    PRIMARY KEY (relid, tgname)
);
