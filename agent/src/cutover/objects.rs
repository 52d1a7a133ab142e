//! Target objects that must not act while syncing: foreign keys, the
//! application's triggers, rules and policies; plus sequences, which only
//! make sense once writes have stopped.
//!
//! Definitions are read from the source catalog with `search_path` set to
//! `pg_catalog`, so every name inside them comes out schema-qualified.
//! pgferry's own capture triggers are recognised by their function's schema
//! and never reach the target.

use futures_util::future::join_all;
use tokio_postgres::Client;

use crate::db::ident::{Ident, QualifiedTable};

/// A foreign key as the source defines it.
#[derive(Debug, Clone)]
pub struct ForeignKey {
    /// The referencing table.
    pub table: QualifiedTable,
    /// Constraint name.
    pub name: String,
    /// `FOREIGN KEY (...) REFERENCES ...`.
    pub definition: String,
    /// Validated on the source (so it is validated on the target too).
    pub validated: bool,
    /// On a partitioned table: added without ONLY and valid at once
    /// (PostgreSQL refuses NOT VALID foreign keys there).
    pub partitioned: bool,
    /// It references a partitioned table. For each of that table's
    /// partitions PostgreSQL derives a constraint, which a later VALIDATE
    /// leaves NOT VALID (PostgreSQL 15: it validates only the one named);
    /// so one valid on the source is added valid at once, its existing
    /// rows checked with the fence up.
    pub references_partitioned: bool,
}

/// One of the application's triggers.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// The table.
    pub table: QualifiedTable,
    /// Trigger name.
    pub name: String,
    /// `CREATE TRIGGER ...`.
    pub definition: String,
    /// `pg_trigger.tgenabled`.
    pub enabled: String,
}

/// SQL: the relation `c`, in namespace `n`, is the application's: not in a
/// system schema or pgferry's, nor a member of an extension (PostGIS's
/// views and tables belong to the extension, which the target has already:
/// its rules, triggers and grants are not the cutover's to touch).
pub(super) const USER_SCHEMA: &str =
    "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') AND n.nspname NOT LIKE 'pg\\_%' \
     AND NOT EXISTS (SELECT 1 FROM pg_depend ext WHERE ext.classid = 'pg_class'::regclass AND ext.objid = c.oid \
                      AND ext.deptype = 'e')";

/// Foreign keys of the source's user tables.
pub async fn foreign_keys(source: &mut Client) -> Result<Vec<ForeignKey>, tokio_postgres::Error> {
    let tx = source.transaction().await?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog").await?;
    let rows = tx
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, con.conname::text, pg_get_constraintdef(con.oid), con.convalidated,
                        c.relkind = 'p', (SELECT r.relkind = 'p' FROM pg_class r WHERE r.oid = con.confrelid)
                   FROM pg_constraint con
                   JOIN pg_class c ON c.oid = con.conrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE con.contype = 'f' AND con.conparentid = 0 AND {USER_SCHEMA}
                  ORDER BY 1, 2, 3"
            ),
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|r| ForeignKey {
            table: QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            name: r.get(2),
            definition: r.get(3),
            validated: r.get(4),
            partitioned: r.get(5),
            references_partitioned: r.get(6),
        })
        .collect())
}

/// The application's triggers on the source (not pgferry's, not internal).
pub async fn triggers(source: &mut Client) -> Result<Vec<Trigger>, tokio_postgres::Error> {
    let tx = source.transaction().await?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog").await?;
    let rows = tx
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, t.tgname::text, pg_get_triggerdef(t.oid), t.tgenabled::text
                   FROM pg_trigger t
                   JOIN pg_class c ON c.oid = t.tgrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_proc p ON p.oid = t.tgfoid
                   JOIN pg_namespace pn ON pn.oid = p.pronamespace
                  WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND pn.nspname <> 'pgferry' AND {USER_SCHEMA}
                  ORDER BY 1, 2, 3"
            ),
            &[],
        )
        .await?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|r| Trigger {
            table: QualifiedTable::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            name: r.get(2),
            definition: r.get(3),
            enabled: r.get(4),
        })
        .collect())
}

async fn trigger_exists(
    target: &Client,
    table: &QualifiedTable,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    let row = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = $2)",
            &[&table.to_string(), &name],
        )
        .await?;
    Ok(row.get(0))
}

/// Creates the foreign keys `NOT VALID` (instant: existing rows are not
/// scanned while writes are fenced), but for those that must be valid at
/// once ([`ForeignKey::partitioned`], [`ForeignKey::references_partitioned`]). Skips those that exist. All at once
/// (pipelined): two round trips in all with writes blocked, not two per key.
pub async fn create_foreign_keys(
    target: &Client,
    fks: &[ForeignKey],
) -> Result<usize, tokio_postgres::Error> {
    let created = all_done(fks.iter().map(|fk| async move {
        if crate::copy::indexes::constraint_exists(target, &fk.table, &fk.name).await? {
            return Ok(false);
        }
        let (only, not_valid) = if fk.partitioned {
            ("", "")
        } else if fk.definition.ends_with("NOT VALID") || fk.references_partitioned {
            ("ONLY ", "")
        } else {
            ("ONLY ", " NOT VALID")
        };
        target
            .batch_execute(&format!(
                "ALTER TABLE {only}{} ADD CONSTRAINT {} {}{not_valid}",
                fk.table,
                Ident(fk.name.clone()),
                fk.definition
            ))
            .await
            .map(|()| true)
    }))
    .await?;
    Ok(created.into_iter().filter(|c| *c).count())
}

/// Runs `statements` pipelined, and waits for every one of them before
/// giving the first error: a statement sent after a failing one still runs,
/// and an abort that removes what they created must come after it.
async fn all_done<T>(
    statements: impl IntoIterator<Item = impl std::future::Future<Output = Result<T, tokio_postgres::Error>>>,
) -> Result<Vec<T>, tokio_postgres::Error> {
    join_all(statements).await.into_iter().collect()
}

/// Validates the foreign keys that are valid on the source (after the
/// switch: validation takes a lock that does not block writes).
pub async fn validate_foreign_keys(target: &Client, fks: &[ForeignKey]) -> Result<(), tokio_postgres::Error> {
    for fk in fks.iter().filter(|fk| fk.validated) {
        target
            .batch_execute(&format!(
                "ALTER TABLE {} VALIDATE CONSTRAINT {}",
                fk.table,
                Ident(fk.name.clone())
            ))
            .await?;
    }
    Ok(())
}

/// Creates the application's triggers in the state they have on the
/// source. All at once (pipelined), like [`create_foreign_keys`].
pub async fn create_triggers(target: &Client, triggers: &[Trigger]) -> Result<usize, tokio_postgres::Error> {
    let created = all_done(triggers.iter().map(|t| async move {
        if trigger_exists(target, &t.table, &t.name).await? {
            return Ok(false);
        }
        let state = match t.enabled.as_str() {
            "D" => Some("DISABLE TRIGGER"),
            "R" => Some("ENABLE REPLICA TRIGGER"),
            "A" => Some("ENABLE ALWAYS TRIGGER"),
            _ => None,
        };
        let mut sql = format!("{};", t.definition);
        if let Some(state) = state {
            sql.push_str(&format!(
                " ALTER TABLE {} {state} {};",
                t.table,
                Ident(t.name.clone())
            ));
        }
        target.batch_execute(&sql).await.map(|()| true)
    }))
    .await?;
    Ok(created.into_iter().filter(|c| *c).count())
}

/// Abort path: removes from the target everything that must not act while
/// syncing (foreign keys, triggers, rules, policies, row security),
/// whoever created it. Row security is switched off rather than left on
/// without policies: a table that FORCEs it (pre-data brings that) would
/// then refuse pgferry's own reads and writes, the verification's among
/// them.
pub async fn remove_cutover_objects(target: &mut Client) -> Result<(), tokio_postgres::Error> {
    let rows = target
        .query(
            &format!(
                "SELECT format('ALTER TABLE %s%I.%I DROP CONSTRAINT IF EXISTS %I',
                               CASE WHEN c.relkind = 'p' THEN '' ELSE 'ONLY ' END, n.nspname, c.relname, con.conname)
                   FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE con.contype = 'f' AND con.conparentid = 0 AND {USER_SCHEMA}
                 UNION ALL
                 SELECT format('DROP TRIGGER IF EXISTS %I ON %I.%I', t.tgname, n.nspname, c.relname)
                   FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE NOT t.tgisinternal AND t.tgparentid = 0 AND {USER_SCHEMA}
                    -- The target's own capture, for the way back (cutover.fallback).
                    AND NOT EXISTS (SELECT 1 FROM pg_proc p
                                     WHERE p.oid = t.tgfoid AND p.pronamespace = to_regnamespace('pgferry'))
                 UNION ALL
                 SELECT format('DROP RULE IF EXISTS %I ON %I.%I', r.rulename, n.nspname, c.relname)
                   FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE r.rulename <> '_RETURN' AND {USER_SCHEMA}
                 UNION ALL
                 SELECT format('DROP POLICY IF EXISTS %I ON %I.%I', p.polname, n.nspname, c.relname)
                   FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE {USER_SCHEMA}
                 UNION ALL
                 SELECT format('ALTER TABLE %I.%I DISABLE ROW LEVEL SECURITY', n.nspname, c.relname)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relrowsecurity AND {USER_SCHEMA}"
            ),
            &[],
        )
        .await?;
    let tx = target.transaction().await?;
    for r in rows {
        // Statements built by the server's own format('%I'), from its catalog.
        tx.batch_execute(r.get::<_, &str>(0)).await?;
    }
    tx.commit().await
}

/// Copies every sequence's state (last_value and is_called) to the target,
/// after making its options (type, increment, bounds, cycling) the
/// source's where a deploy changed them since the copy (Django's
/// `ALTER SEQUENCE ... AS bigint` when a serial key was widened: the
/// target's `integer` sequence would refuse the value, or stop the new
/// database at 2^31).
pub async fn copy_sequences(source: &Client, target: &Client) -> Result<usize, tokio_postgres::Error> {
    align_sequences(source, target).await?;
    let rows = source
        .query(
            &format!(
                "SELECT c.oid, n.nspname::text, c.relname::text
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind = 'S' AND {USER_SCHEMA}
                    AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                     WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')"
            ),
            &[],
        )
        .await?;
    let oids: Vec<u32> = rows.iter().map(|r| r.get(0)).collect();
    let seqs: Vec<String> = rows
        .iter()
        .map(|r| QualifiedTable::new(r.get::<_, String>(1), r.get::<_, String>(2)).to_string())
        .collect();
    // With writes blocked, every statement counts: read one statement
    // each, 2,000 sequences took 1.3 s of the source's time. The function
    // `pg_sequences` reads them by takes 11 ms; it gives NULL for a
    // sequence not called since it was created or set with `setval(...,
    // false)`, whose state is then read from the sequence itself.
    let called: Vec<Option<i64>> = all_done(oids.chunks(SEQUENCES_AT_ONCE).map(|oids| async move {
        let row = source
            .query_one(
                "SELECT coalesce(array_agg(pg_sequence_last_value(o) ORDER BY k), '{}')
                   FROM unnest($1::oid[]) WITH ORDINALITY AS u(o, k)",
                &[&oids],
            )
            .await?;
        Ok(row.get::<_, Vec<Option<i64>>>(0))
    }))
    .await?
    .concat();
    let mut values: Vec<(i64, bool)> = called
        .iter()
        .map(|v| (v.unwrap_or_default(), v.is_some()))
        .collect();
    let uncalled: Vec<usize> = (0..seqs.len()).filter(|&i| called[i].is_none()).collect();
    let reads: Vec<String> = uncalled
        .chunks(SEQUENCES_BY_NAME)
        .map(|part| {
            part.iter()
                .map(|&i| format!("SELECT {i}::int4, last_value, is_called FROM {}", seqs[i]))
                .collect::<Vec<_>>()
                .join(" UNION ALL ")
        })
        .collect();
    for rows in all_done(reads.iter().map(|sql| source.query(sql, &[]))).await? {
        for r in rows {
            values[r.get::<_, i32>(0) as usize] = (r.get(1), r.get(2));
        }
    }
    let set = seqs.iter().zip(&values).collect::<Vec<_>>();
    all_done(set.chunks(SEQUENCES_AT_ONCE).map(|part| {
        let names: Vec<&String> = part.iter().map(|(s, _)| *s).collect();
        let lasts: Vec<i64> = part.iter().map(|(_, v)| v.0).collect();
        let calls: Vec<bool> = part.iter().map(|(_, v)| v.1).collect();
        async move {
            target
                .query_one(
                    "SELECT count(setval(s::regclass, v, c))
                       FROM unnest($1::text[], $2::int8[], $3::bool[]) AS u(s, v, c)",
                    &[&names, &lasts, &calls],
                )
                .await
        }
    }))
    .await?;
    Ok(seqs.len())
}

/// Makes the options of the target's sequences the source's where they
/// differ: two catalog reads (no sequence is opened), and a statement only
/// for a sequence that changed.
pub(super) async fn align_sequences(source: &Client, target: &Client) -> Result<(), tokio_postgres::Error> {
    let options = format!(
        "SELECT n.nspname::text, c.relname::text,
                format('AS %s INCREMENT BY %s MINVALUE %s MAXVALUE %s %sCYCLE',
                       format_type(s.seqtypid, NULL), s.seqincrement, s.seqmin, s.seqmax,
                       CASE WHEN s.seqcycle THEN '' ELSE 'NO ' END)
           FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE {USER_SCHEMA}"
    );
    let read = |rows: Vec<tokio_postgres::Row>| -> std::collections::HashMap<(String, String), String> {
        rows.iter().map(|r| ((r.get(0), r.get(1)), r.get(2))).collect()
    };
    let theirs = read(source.query(&options, &[]).await?);
    let ours = read(target.query(&options, &[]).await?);
    let mut differ: Vec<String> = theirs
        .iter()
        .filter(|(name, o)| ours.get(*name).is_some_and(|mine| mine != *o))
        .map(|((schema, name), o)| {
            format!(
                "ALTER SEQUENCE {} {o}",
                QualifiedTable::new(schema.clone(), name.clone())
            )
        })
        .collect();
    differ.sort();
    for statement in &differ {
        tracing::info!(
            statement,
            "Sequence options changed on the source since the copy: made so on the target"
        );
        target.batch_execute(statement).await?;
    }
    Ok(())
}

/// Sequences read or set per statement: each locks all of its own until it
/// ends, and the lock table is shared and finite.
const SEQUENCES_AT_ONCE: usize = 500;

/// Sequences read by name per statement (those never called).
const SEQUENCES_BY_NAME: usize = 100;
