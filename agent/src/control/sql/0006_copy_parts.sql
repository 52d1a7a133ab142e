-- pgferry control schema, version 6: large tables copied in parts.
--
-- A table larger than copy.split_tables_larger_than_mb is copied as several
-- block (ctid) ranges in parallel, each in its own snapshot and its own
-- target transaction. A part is done once its target transaction committed.
-- target_xid and rows are written before that commit, so that after a crash a
-- part whose transaction is in doubt is settled by asking the target
-- (pg_xact_status) instead of being copied twice.
CREATE TABLE copy_parts (
    table_id    int NOT NULL REFERENCES tables (id) ON DELETE CASCADE,
    part        int NOT NULL,
    first_block bigint NOT NULL,
    end_block   bigint,            -- exclusive; NULL: to the end of the table
    target_xid  text,              -- xid8 of the loading transaction, once known
    rows        bigint,
    done        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (table_id, part)
);
