//! Types a followed table or column needs, created on the target first
//! (docs/design.md, "Schema changes during sync").
//!
//! A deploy often creates a type and a column of it in one go: an enum
//! (Alembic's `sa.Enum`, Rails' `create_enum`), a domain, a composite. The
//! cutover creates what the source created since the copy, but a column
//! added or a table created during sync needs its type on the target
//! before it. So when a followed table's columns use a type the target
//! lacks, the source's whole schema is dumped (only then: one read of the
//! catalog decides) and every type and domain it has that the target lacks
//! is restored from it, in one transaction, as the cutover would. A type
//! pg_dump does not dump (an extension's, which `check` names) stays
//! missing, and the change that needs it stops sync naming the statement
//! the target refused, as before.

use crate::db::ident::QualifiedTable;
use crate::db::Migration;
use crate::drain::SyncError;

/// The kinds of pre-data entry restored.
const KINDS: &[&str] = &["TYPE", "DOMAIN"];

/// `schema.name` of a `pg_restore --list` line's entry of `desc`, or None
/// for another kind (the owner is the last word).
fn named(line: &str, desc: &str) -> Option<(String, String)> {
    let (_, rest) = line.split_once("; ")?;
    let mut parts = rest.splitn(3, ' ');
    let (_catalog, _oid, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let rest = rest.strip_prefix(desc)?.strip_prefix(' ')?;
    let (schema, rest) = rest.split_once(' ')?;
    let (name, _owner) = rest.rsplit_once(' ')?;
    Some((schema.to_string(), name.to_string()))
}

/// Creates on the target the types and domains the source has and the
/// target lacks, when a column of the tables `relids` (source OIDs) uses a
/// type the target lacks; nothing is read beyond one catalog query a side
/// otherwise. Returns the types created, as `schema.name`.
pub(super) async fn create_missing(m: &Migration, relids: &[u32]) -> Result<Vec<String>, crate::Error> {
    if relids.is_empty() {
        return Ok(Vec::new());
    }
    let used: Vec<String> = m
        .source_conn()
        .await?
        .query(
            "SELECT DISTINCT format('%I.%I', n.nspname, t.typname)
               FROM pg_attribute a
               JOIN pg_type u ON u.oid = a.atttypid
               JOIN pg_type t ON t.oid = CASE WHEN u.typcategory = 'A' THEN u.typelem ELSE u.oid END
               JOIN pg_namespace n ON n.oid = t.typnamespace
              WHERE a.attrelid = ANY ($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
                AND n.nspname NOT IN ('pg_catalog', 'information_schema')",
            &[&relids],
        )
        .await
        .map_err(SyncError::Catalog)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if lacking(m, &used).await?.is_empty() {
        return Ok(Vec::new());
    }
    let tools = crate::schema::PgTools::locate(m.cfg.pg_bin_dir.as_deref()).await?;
    let dump = tools
        .dump_schema(&m.source, m.cfg.source_limits.lock_timeout_ms, false)
        .await?;
    let dumped: Vec<(crate::schema::TocEntry, QualifiedTable)> = tools
        .toc(&dump.archive, "pre-data")
        .await?
        .into_iter()
        .filter_map(|e| {
            let (schema, name) = KINDS.iter().find_map(|k| named(&e.line, k))?;
            Some((e, QualifiedTable::new(schema, name)))
        })
        .collect();
    let missing = lacking(m, &dumped.iter().map(|(_, n)| n.to_string()).collect::<Vec<_>>()).await?;
    let (entries, names): (Vec<_>, Vec<_>) = dumped
        .into_iter()
        .filter(|(_, n)| missing.contains(&n.to_string()))
        .map(|(e, n)| (e, n.display_name()))
        .unzip();
    tools
        .restore_entries(&m.target, &dump.archive, &entries, "types")
        .await?;
    for name in &names {
        tracing::info!(
            name,
            "Type created on the target before the table or column that uses it"
        );
    }
    Ok(names)
}

/// Of the types `names` (`schema.name`, quoted where needed), those the
/// target lacks.
async fn lacking(m: &Migration, names: &[String]) -> Result<Vec<String>, crate::Error> {
    Ok(m.target_conn()
        .await?
        .query(
            "SELECT x FROM unnest($1::text[]) x WHERE to_regtype(x) IS NULL",
            &[&names],
        )
        .await
        .map_err(|source| SyncError::Follow {
            what: "looking for types on the target",
            source,
        })?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_lines_name_their_type() {
        let line = "215; 1247 16386 TYPE public mood app";
        assert_eq!(named(line, "TYPE"), Some(("public".into(), "mood".into())));
        assert_eq!(named(line, "DOMAIN"), None);
        let domain = "216; 1247 16390 DOMAIN shop positive_amount app";
        assert_eq!(
            named(domain, "DOMAIN"),
            Some(("shop".into(), "positive_amount".into()))
        );
        assert_eq!(named("217; 1259 16400 TABLE public t app", "TYPE"), None);
    }
}
