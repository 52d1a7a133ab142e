-- pgferry control schema, version 5: classic table inheritance.
--
-- A statement on an inheritance parent also changes its children's rows and
-- fires only the parent's triggers; its deltas can name rows of any table
-- below it. parent_relid records each child's parent so that a parent's
-- batch can act on the whole hierarchy below it.
ALTER TABLE tables ADD COLUMN parent_relid oid;
