//! Column types on both sides, compared (docs/design.md, "Schema changes
//! during sync"): whether the target takes every value of the source's
//! type as it is. A batch applies a table only when it does; sync widens the
//! target's type when the source's grew (`int` to `bigint`, a longer
//! `varchar`, `text`, more `numeric` precision), and stops on anything else.

use std::collections::BTreeMap;

/// How the target's type of a column stands to the source's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The same type.
    Same,
    /// The target's holds every value of the source's unchanged (a type the
    /// operator widened there).
    Wider,
    /// The source's grew: the target's can be widened to it.
    Narrower,
    /// Neither holds the other's values unchanged (a type changed, a
    /// `numeric` scale moved): not followed.
    Other,
}

/// One column's type: schema-qualified name and modifier, as
/// [`super::batch::type_signature`] writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnType {
    /// `schema.name` of the type.
    pub name: String,
    /// `atttypmod` (-1: none).
    pub typmod: i32,
}

/// Parses a signature (a JSON object: column → `schema.type:typmod`) into
/// its columns.
pub fn parse(signature: &str) -> BTreeMap<String, ColumnType> {
    let raw: BTreeMap<String, String> = serde_json::from_str(signature).unwrap_or_default();
    raw.into_iter()
        .filter_map(|(column, ty)| {
            let (name, typmod) = ty.rsplit_once(':')?;
            Some((
                column,
                ColumnType {
                    name: name.to_string(),
                    typmod: typmod.parse().ok()?,
                },
            ))
        })
        .collect()
}

/// Whether every value of `from` is a value of `to`, unchanged.
pub fn holds(to: &ColumnType, from: &ColumnType) -> bool {
    if to == from {
        return true;
    }
    let rank = |n: &str| match n {
        "pg_catalog.int2" => Some(1),
        "pg_catalog.int4" => Some(2),
        "pg_catalog.int8" => Some(3),
        _ => None,
    };
    match (from.name.as_str(), to.name.as_str()) {
        (f, t) if rank(f).is_some() && rank(t).is_some() => rank(t) >= rank(f),
        ("pg_catalog.float4", "pg_catalog.float8") => true,
        ("pg_catalog.varchar", "pg_catalog.text") => true,
        ("pg_catalog.varchar", "pg_catalog.varchar") => {
            to.typmod == -1 || (from.typmod != -1 && to.typmod >= from.typmod)
        }
        ("pg_catalog.numeric", "pg_catalog.numeric") => {
            // typmod: ((precision << 16) | scale) + 4.
            let split = |m: i32| ((m - 4) >> 16, (m - 4) & 0xffff);
            to.typmod == -1
                || (from.typmod != -1 && {
                    let ((fp, fs), (tp, ts)) = (split(from.typmod), split(to.typmod));
                    fs == ts && tp >= fp
                })
        }
        _ => false,
    }
}

/// How the target's type of a column (`target`) stands to the source's.
pub fn fit(target: &ColumnType, source: &ColumnType) -> Fit {
    if target == source {
        Fit::Same
    } else if holds(target, source) {
        Fit::Wider
    } else if holds(source, target) {
        Fit::Narrower
    } else {
        Fit::Other
    }
}

/// The columns whose target type does not hold the source's values, with
/// how it stands, from the two signatures.
pub fn misfits(target: &str, source: &str) -> Vec<(String, Fit)> {
    let (target, source) = (parse(target), parse(source));
    source
        .iter()
        .filter_map(|(column, s)| {
            let f = target.get(column).map_or(Fit::Other, |t| fit(t, s));
            (!matches!(f, Fit::Same | Fit::Wider)).then(|| (column.clone(), f))
        })
        .collect()
}

/// For each of `tables` (by index), its columns' types on the target and on
/// the source, as two signatures for [`misfits`] (none for a table the
/// target lacks): one catalog read on each side for all of them. Generated
/// columns aside: never copied, they are followed whole (`follow`).
pub async fn signatures(
    m: &crate::db::Migration,
    tables: &[crate::control::state::TableState],
) -> Result<Vec<Option<(String, String)>>, super::SyncError> {
    let agg = "coalesce(jsonb_object_agg(a.attname, tn.nspname || '.' || ty.typname || ':' || a.atttypmod), '{}')::text";
    let joins = "JOIN pg_type ty ON ty.oid = a.atttypid JOIN pg_namespace tn ON tn.oid = ty.typnamespace";
    let relids: Vec<u32> = tables.iter().map(|t| t.relid).collect();
    let names: Vec<String> = tables.iter().map(|t| t.table.to_string()).collect();
    let source = m.source_conn().await?;
    let theirs: BTreeMap<u32, String> = source
        .query(
            &format!(
                "SELECT a.attrelid, {agg} FROM pg_attribute a {joins}
                  WHERE a.attrelid = ANY ($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
                    AND a.attgenerated = ''
                  GROUP BY a.attrelid"
            ),
            &[&relids],
        )
        .await
        .map_err(super::SyncError::Catalog)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    drop(source);
    let target = m.target_conn().await?;
    let ours: BTreeMap<i64, String> = target
        .query(
            &format!(
                "SELECT x.i, {agg} FROM unnest($1::text[]) WITH ORDINALITY x(name, i)
                   JOIN pg_attribute a ON a.attrelid = to_regclass(x.name) {joins}
                  WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
                  GROUP BY x.i"
            ),
            &[&names],
        )
        .await
        .map_err(|source| super::SyncError::Follow {
            what: "reading the target's column types",
            source,
        })?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(tables
        .iter()
        .enumerate()
        .map(|(i, t)| Some((ours.get(&(i as i64 + 1))?.clone(), theirs.get(&t.relid)?.clone())))
        .collect())
}

/// The columns of `tables` whose target type does not take the source's
/// values, as `table.column: type on the target, type on the source`, with
/// how each stands.
pub async fn drifted(
    m: &crate::db::Migration,
    tables: &[crate::control::state::TableState],
) -> Result<Vec<(usize, String, Fit)>, super::SyncError> {
    let mut found = Vec::new();
    for (i, both) in signatures(m, tables).await?.into_iter().enumerate() {
        let Some((target, source)) = both else { continue };
        for (column, f) in misfits(&target, &source) {
            found.push((i, column, f));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, typmod: i32) -> ColumnType {
        ColumnType {
            name: format!("pg_catalog.{name}"),
            typmod,
        }
    }

    fn numeric(p: i32, s: i32) -> ColumnType {
        t("numeric", ((p << 16) | s) + 4)
    }

    #[test]
    fn widening_is_told_from_every_other_change() {
        assert_eq!(
            fit(&t("int4", -1), &t("int8", -1)),
            Fit::Narrower,
            "int to bigint"
        );
        assert_eq!(fit(&t("int8", -1), &t("int4", -1)), Fit::Wider);
        assert_eq!(
            fit(&t("varchar", 14), &t("varchar", 24)),
            Fit::Narrower,
            "varchar(10) to (20)"
        );
        assert_eq!(fit(&t("varchar", 14), &t("text", -1)), Fit::Narrower);
        assert_eq!(fit(&t("varchar", 14), &t("varchar", -1)), Fit::Narrower);
        assert_eq!(
            fit(&numeric(10, 2), &numeric(12, 2)),
            Fit::Narrower,
            "precision up"
        );
        assert_eq!(fit(&numeric(10, 2), &t("numeric", -1)), Fit::Narrower);
        assert_eq!(
            fit(&numeric(10, 2), &numeric(12, 4)),
            Fit::Other,
            "a scale moved rounds"
        );
        assert_eq!(fit(&t("int4", -1), &t("text", -1)), Fit::Other);
        assert_eq!(fit(&t("timestamp", -1), &t("timestamptz", -1)), Fit::Other);
        assert_eq!(fit(&t("text", -1), &t("text", -1)), Fit::Same);
    }

    #[test]
    fn signatures_compare_by_column() {
        let target =
            r#"{"id": "pg_catalog.int4:-1", "name": "pg_catalog.varchar:14", "a,b:c": "pg_catalog.text:-1"}"#;
        let source =
            r#"{"id": "pg_catalog.int8:-1", "name": "pg_catalog.varchar:14", "a,b:c": "pg_catalog.text:-1"}"#;
        assert_eq!(misfits(target, source), vec![("id".to_string(), Fit::Narrower)]);
        assert!(
            misfits(source, target).is_empty(),
            "a wider target takes the rows"
        );
        assert_eq!(
            misfits("{}", r#"{"id": "pg_catalog.int4:-1"}"#),
            vec![("id".to_string(), Fit::Other)]
        );
    }
}
