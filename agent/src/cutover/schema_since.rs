//! What the source's schema gained since the copy, checked ahead of the
//! fence.
//!
//! The target's schema is the source's pre-data as of the copy. A sync can
//! last days, and an application deploy meanwhile creates functions, views
//! or types, or replaces a function's body, on the source only: the drift
//! check sees columns, keys and tables, not those, and the application
//! would meet the old schema after the switch. So just before the fence the
//! pre-data of both sides, as pg_restore prints it (no owners, grants or
//! tablespaces), is compared entry by entry: an entry the target lacks, or
//! (between servers of the same major version, whose pg_dump output can be
//! compared) one it has with another definition, ends the cutover before
//! the fence, each named. Indexes are built by the cutover itself
//! ([`crate::copy::indexes::build_all`]); the entries restored at cutover
//! come from the source's dump anyway.

use std::collections::BTreeMap;
use std::path::Path;

use super::CutoverError;
use crate::db::Migration;
use crate::schema::PgTools;

/// An entry's header (`NAME; Type: TYPE; Schema: SCHEMA; Owner: -`) as
/// `TYPE SCHEMA.NAME` (`TYPE NAME` without a schema).
fn display(header: &str) -> String {
    let mut parts = header.split("; ");
    let name = parts.next().unwrap_or(header);
    let (mut kind, mut schema) = ("", "-");
    for p in parts {
        if let Some(k) = p.strip_prefix("Type: ") {
            kind = k;
        } else if let Some(s) = p.strip_prefix("Schema: ") {
            schema = s;
        }
    }
    match schema {
        "-" => format!("{kind} {name}"),
        _ => format!("{kind} {schema}.{name}"),
    }
}

/// A pre-data script's entries: each `-- Name: ...; Type: ...; Schema: ...`
/// header with the statements under it.
fn entries(script: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in script.lines() {
        if let Some(header) = line.strip_prefix("-- Name: ") {
            if let Some((name, body)) = current.take() {
                out.insert(name, body.join("\n").trim().to_string());
            }
            current = Some((display(header), Vec::new()));
        } else if let Some((_, body)) = current.as_mut() {
            // Comment lines frame headers; meta-commands carry a random key.
            if !line.starts_with("--") && !line.starts_with('\\') {
                body.push(line);
            }
        }
    }
    if let Some((name, body)) = current {
        out.insert(name, body.join("\n").trim().to_string());
    }
    out
}

/// The entries of `source` that `target` lacks, and, with `bodies`, those
/// it has with another definition, with the lines that differ (a column's
/// default or a check constraint changed shows as its table's entry).
fn differences(
    source: &BTreeMap<String, String>,
    target: &BTreeMap<String, String>,
    bodies: bool,
) -> Vec<String> {
    source
        .iter()
        .filter_map(|(name, body)| match target.get(name) {
            None => Some(format!("{name} (created since the copy)")),
            // A routine's lines are its code, which may hold a secret (a
            // connection string, a key): named, not shown.
            Some(other) if bodies && other != body && is_routine(name) => {
                Some(format!("{name} (changed since the copy)"))
            }
            Some(other) if bodies && other != body => Some(format!(
                "{name} (changed since the copy; source: {}; target: {})",
                lines_only_in(body, other),
                lines_only_in(other, body)
            )),
            Some(_) => None,
        })
        .collect()
}

/// A function, procedure or aggregate entry (by its [`display`]ed name).
fn is_routine(name: &str) -> bool {
    ["FUNCTION ", "PROCEDURE ", "AGGREGATE "]
        .iter()
        .any(|k| name.starts_with(k))
}

/// The first few lines of `a` that `b` does not have, trimmed, in `a`'s
/// order; `nothing` when there are none (only the order differs).
fn lines_only_in(a: &str, b: &str) -> String {
    const SHOWN: usize = 3;
    let theirs: std::collections::HashSet<&str> = b.lines().map(str::trim).collect();
    let ours: Vec<&str> = a
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !theirs.contains(l))
        .collect();
    if ours.is_empty() {
        return "nothing".into();
    }
    let mut shown = ours
        .iter()
        .take(SHOWN)
        .map(|l| format!("`{l}`"))
        .collect::<Vec<_>>()
        .join(" ");
    if ours.len() > SHOWN {
        shown.push_str(&format!(" and {} more lines", ours.len() - SHOWN));
    }
    shown
}

async fn major(conn: &tokio_postgres::Client) -> Result<u32, tokio_postgres::Error> {
    let row = conn
        .query_one("SELECT current_setting('server_version_num')::int / 10000", &[])
        .await?;
    Ok(row.get::<_, i32>(0) as u32)
}

/// Compares the pre-data of the source's `archive` with the target's
/// schema; an error names what the target lacks or has otherwise. Returns
/// the entries only the target has (dropped on the source since the copy,
/// or created on the target by hand): reported, not refused. Skipped, with
/// a warning, when the local pg_dump is older than the target server (it
/// needs only be as new as the source's for the rest).
pub async fn check(m: &Migration, tools: &PgTools, archive: &Path) -> Result<SinceCopy, crate::Error> {
    let (source_major, target_major) = {
        let (source, target) = (m.source_conn().await?, m.target_conn().await?);
        (
            major(&source).await.map_err(CutoverError::Source)?,
            major(&target).await.map_err(CutoverError::Target)?,
        )
    };
    if tools.major < target_major {
        tracing::warn!(
            pg_dump = tools.major,
            target = target_major,
            "Not comparing the schemas: pg_dump is older than the target server; objects created on the source \
             since the copy are not looked for"
        );
        return Ok(SinceCopy {
            only_on_target: Vec::new(),
            followed: Vec::new(),
        });
    }
    let bodies = source_major == target_major;
    let target_entries = || async {
        let dump = tools
            .dump_schema(&m.target, m.cfg.source_limits.lock_timeout_ms, false)
            .await?;
        Ok::<_, crate::Error>(entries(&tools.section_sql(&dump.archive, "pre-data").await?))
    };
    let source = entries(&tools.section_sql(archive, "pre-data").await?);
    let mut target = target_entries().await?;
    let mut followed = Vec::new();
    if !differences(&source, &target, bodies).is_empty() && m.cfg.sync.follow_schema_changes {
        followed = follow(m, tools, archive, &source, &target, bodies).await?;
        if !followed.is_empty() {
            target = target_entries().await?;
        }
    }
    let found = differences(&source, &target, bodies);
    if !found.is_empty() {
        return Err(CutoverError::SchemaChanged(found).into());
    }
    let only_on_target: Vec<String> = target
        .keys()
        .filter(|k| !source.contains_key(*k))
        .cloned()
        .collect();
    for entry in &only_on_target {
        tracing::warn!(
            entry = %entry,
            "On the target only: dropped on the source since the copy, or created on the target; drop it there \
             if the application no longer has it"
        );
    }
    Ok(SinceCopy {
        only_on_target,
        followed,
    })
}

/// What [`check`] found and did.
pub struct SinceCopy {
    /// Entries only the target has: reported, not refused.
    pub only_on_target: Vec<String>,
    /// Entries the source created or replaced since the copy, made so on
    /// the target.
    pub followed: Vec<String>,
}

/// The kinds of pre-data entry a cutover creates on the target when the
/// source created them since the copy (a deploy's functions, views, types,
/// sequences), and of those the ones it replaces when their definition
/// changed.
const CREATED: &[&str] = &[
    "SEQUENCE OWNED BY",
    "AGGREGATE",
    "PROCEDURE",
    "FUNCTION",
    "SEQUENCE",
    "DOMAIN",
    "VIEW",
    "TYPE",
];
const REPLACED: &[&str] = &["PROCEDURE", "FUNCTION", "VIEW"];

/// A `pg_restore --list` line's entry as [`display`] names it, for the
/// kinds of [`CREATED`]: `KIND schema.tag` (the owner is the last word).
fn toc_display(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("; ")?;
    let mut parts = rest.splitn(3, ' ');
    let (_catalog, _oid, rest) = (parts.next()?, parts.next()?, parts.next()?);
    let kind = CREATED
        .iter()
        .find(|k| rest.starts_with(*k) && rest[k.len()..].starts_with(' '))?;
    let rest = &rest[kind.len() + 1..];
    let (schema, rest) = rest.split_once(' ')?;
    let (tag, _owner) = rest.rsplit_once(' ')?;
    Some(match schema {
        "-" => format!("{kind} {tag}"),
        _ => format!("{kind} {schema}.{tag}"),
    })
}

/// Creates on the target the entries of [`CREATED`] kinds the source has
/// and the target lacks, in one transaction, replaces (`CREATE OR
/// REPLACE`) the routines and views whose definition changed, in another,
/// and gives the sequences whose options changed the source's.
/// Either failing leaves it to the comparison after to name what is
/// missing. Returns what it made.
async fn follow(
    m: &Migration,
    tools: &PgTools,
    archive: &Path,
    source: &BTreeMap<String, String>,
    target: &BTreeMap<String, String>,
    bodies: bool,
) -> Result<Vec<String>, crate::Error> {
    let toc = tools.toc(archive, "pre-data").await?;
    let named: Vec<(String, &crate::schema::TocEntry)> = toc
        .iter()
        .filter_map(|e| Some((toc_display(&e.line)?, e)))
        .collect();
    let missing: Vec<&(String, &crate::schema::TocEntry)> = named
        .iter()
        .filter(|(name, _)| source.contains_key(name) && !target.contains_key(name))
        .collect();
    let replaced: Vec<&(String, &crate::schema::TocEntry)> = named
        .iter()
        .filter(|(name, _)| {
            bodies
                && REPLACED.iter().any(|k| name.starts_with(&format!("{k} ")))
                && matches!((source.get(name), target.get(name)), (Some(a), Some(b)) if a != b)
        })
        .collect();
    let mut made = Vec::new();
    // A sequence's options (`AS bigint` when a serial key was widened).
    let resequenced: Vec<&String> = source
        .iter()
        .filter(|(name, body)| name.starts_with("SEQUENCE ") && target.get(*name).is_some_and(|b| b != *body))
        .map(|(name, _)| name)
        .collect();
    if bodies && !resequenced.is_empty() {
        let (source, target) = (m.source_conn().await?, m.target_conn().await?);
        match super::objects::align_sequences(&source, &target).await {
            Ok(()) => made.extend(resequenced.iter().map(|name| format!("{name} altered"))),
            Err(e) => tracing::warn!(
                error = %crate::db::errors::report(&e),
                "The sequences the source altered since the copy could not be altered on the target"
            ),
        }
    }
    if !missing.is_empty() {
        let entries: Vec<crate::schema::TocEntry> = missing.iter().map(|(_, e)| (*e).clone()).collect();
        match tools
            .restore_entries(&m.target, archive, &entries, "since-copy")
            .await
        {
            Ok(()) => made.extend(missing.iter().map(|(name, _)| format!("{name} created"))),
            Err(e) => {
                tracing::warn!(error = %e, "The entries created on the source since the copy could not be created on the target")
            }
        }
    }
    if !replaced.is_empty() {
        let entries: Vec<crate::schema::TocEntry> = replaced.iter().map(|(_, e)| (*e).clone()).collect();
        let sql = tools.entries_sql(archive, &entries, "replaced").await?;
        let sql: String = sql
            .lines()
            .filter(|l| !l.starts_with('\\'))
            .map(|l| {
                ["FUNCTION", "PROCEDURE", "VIEW"]
                    .iter()
                    .find_map(|k| {
                        l.strip_prefix(&format!("CREATE {k} "))
                            .map(|rest| format!("CREATE OR REPLACE {k} {rest}"))
                    })
                    .unwrap_or_else(|| l.to_string())
            })
            .collect::<Vec<_>>()
            .join("\n");
        let target = m.target_conn().await?;
        match target.batch_execute(&format!("BEGIN;\n{sql}\nCOMMIT;")).await {
            Ok(()) => made.extend(replaced.iter().map(|(name, _)| format!("{name} replaced"))),
            Err(e) => {
                let _ = target.batch_execute("ROLLBACK").await;
                tracing::warn!(
                    error = %crate::db::errors::report(&e),
                    "The routines and views the source changed since the copy could not be replaced on the target"
                );
            }
        }
    }
    for entry in &made {
        tracing::info!(entry = %entry, "Followed the source's schema change on the target");
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\\restrict abc
SET statement_timeout = 0;

--
-- Name: f(integer); Type: FUNCTION; Schema: public; Owner: -
--

CREATE FUNCTION public.f(x integer) RETURNS integer
    LANGUAGE sql
    AS $$SELECT x$$;


--
-- Name: v; Type: VIEW; Schema: public; Owner: -
--

CREATE VIEW public.v AS
 SELECT 1 AS one;

\\unrestrict abc
";

    #[test]
    fn entries_are_read_by_header_without_comments_or_meta_commands() {
        let e = entries(SCRIPT);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(
            e["FUNCTION public.f(integer)"],
            "CREATE FUNCTION public.f(x integer) RETURNS integer\n    LANGUAGE sql\n    AS $$SELECT x$$;"
        );
        assert_eq!(e["VIEW public.v"], "CREATE VIEW public.v AS\n SELECT 1 AS one;");
    }

    #[test]
    fn created_and_changed_entries_differ_changed_only_when_bodies_compare() {
        let source = entries(SCRIPT);
        let mut target = source.clone();
        target.remove("VIEW public.v");
        target.insert(
            "FUNCTION public.f(integer)".into(),
            "CREATE FUNCTION public.f(x integer) RETURNS integer AS $$SELECT 2$$;".into(),
        );
        target.insert("TABLE public.extra".into(), String::new());
        assert_eq!(
            differences(&source, &target, true),
            [
                "FUNCTION public.f(integer) (changed since the copy)",
                "VIEW public.v (created since the copy)"
            ]
        );
        assert_eq!(
            differences(&source, &target, false),
            ["VIEW public.v (created since the copy)"]
        );
    }

    #[test]
    fn a_changed_table_names_its_changed_lines() {
        let table = |default: &str| {
            format!(
                "CREATE TABLE public.t (\n    id integer NOT NULL,\n    n integer DEFAULT {default} NOT NULL,\n    \
                 CONSTRAINT positive CHECK ((n > 0))\n);"
            )
        };
        let source = BTreeMap::from([("TABLE public.t".to_string(), table("1"))]);
        let target = BTreeMap::from([("TABLE public.t".to_string(), table("0"))]);
        assert_eq!(
            differences(&source, &target, true),
            [
                "TABLE public.t (changed since the copy; source: `n integer DEFAULT 1 NOT NULL,`; \
              target: `n integer DEFAULT 0 NOT NULL,`)"
            ]
        );
        let many = BTreeMap::from([("TABLE public.t".to_string(), "a\nb\nc\nd\ne".to_string())]);
        assert!(differences(&many, &target, true)[0].contains("`a` `b` `c` and 2 more lines;"));
    }
}
