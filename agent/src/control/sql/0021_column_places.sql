-- pgferry control schema, version 21: each registration's columns by
-- attribute number too.
--
-- `attnums` holds, in `copy_columns`' order, each column's attribute
-- number on the table. A column renamed keeps its number under a new name;
-- one dropped leaves its number to a dropped attribute; one added takes a
-- new number. So sync tells a rename from a column dropped and another
-- added, and follows both kinds in one deploy (Django's RemoveField and
-- AddField in one `migrate`), where the names alone could not tell them
-- apart. Registrations made before are given their numbers here where the
-- table's columns are still the registered ones, in order; the others keep
-- NULL and are followed by their names as before.
ALTER TABLE tables ADD COLUMN attnums int2[];

UPDATE tables t
   SET attnums = n.attnums
  FROM (SELECT t2.id,
               array_agg(a.attnum ORDER BY a.attnum) AS attnums,
               array_agg(a.attname::text ORDER BY a.attnum) AS names
          FROM tables t2
          JOIN pg_attribute a ON a.attrelid = t2.relid AND a.attnum > 0 AND NOT a.attisdropped
                             AND a.attgenerated = ''
         GROUP BY t2.id) n
 WHERE n.id = t.id AND n.names = t.copy_columns;
