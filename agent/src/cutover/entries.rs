//! The schema entries restored at cutover: policies, rules, comments,
//! statistics and security labels, then (leniently) grants and default
//! privileges. They come from a schema dump of the source, and dumping
//! takes most of the time writes are blocked once the rest is fast (pg_dump
//! and pg_restore started four times: 186 ms of a 318 ms demo cutover). So
//! the dump is made and read ahead of the fence, together with a
//! fingerprint of the catalogs those entries come from; with the fence up,
//! the fingerprint is read again (a few ms), and only if it changed is the
//! source dumped again.

use deadpool_postgres::Object;

use super::CutoverError;
use crate::db::Migration;
use crate::schema::{PgTools, Step};

/// The entries to restore, as SQL, and the catalogs they were read from.
pub struct Prepared {
    /// [`fingerprint`] as of (before) the dump.
    fingerprint: String,
    /// Policies, rules, comments, statistics, security labels: one script,
    /// restored all or nothing.
    script: String,
    /// GRANT, REVOKE and ALTER DEFAULT PRIVILEGES statements, each restored
    /// on its own.
    grants: Vec<String>,
    /// Pre-data entries only the target has (see [`super::schema_since`]).
    pub only_on_target: Vec<String>,
    /// Entries the source created or replaced since the copy, made so on
    /// the target (see [`super::schema_since`]).
    pub followed: Vec<String>,
}

/// Everything in the source's catalogs that the entries restored at
/// cutover are made of, or name: ACLs of every kind (and the extensions'
/// initial ones, which decide what pg_dump prints), row security switches,
/// policies, rules, extended statistics, comments and security labels, and
/// the names of relations, schemas, constraints and triggers. It reads
/// more than the entries need: a change anywhere in it only costs a dump
/// with the fence up, as before.
const FINGERPRINT: &str = r"
SELECT md5(string_agg(x, E'\n' ORDER BY x)) FROM (
    SELECT format('class %s %s %s %s %s %s', oid, relname, relnamespace, relacl, relrowsecurity, relforcerowsecurity)
      FROM pg_class
    UNION ALL SELECT format('attribute %s %s %s', attrelid, attnum, attacl) FROM pg_attribute WHERE attacl IS NOT NULL
    UNION ALL SELECT format('namespace %s %s %s', oid, nspname, nspacl) FROM pg_namespace
    UNION ALL SELECT format('proc %s %s', oid, proacl) FROM pg_proc WHERE proacl IS NOT NULL
    UNION ALL SELECT format('type %s %s', oid, typacl) FROM pg_type WHERE typacl IS NOT NULL
    UNION ALL SELECT format('language %s %s', oid, lanacl) FROM pg_language
    UNION ALL SELECT format('fdw %s %s', oid, fdwacl) FROM pg_foreign_data_wrapper
    UNION ALL SELECT format('server %s %s', oid, srvacl) FROM pg_foreign_server
    UNION ALL SELECT format('default acl %s', d) FROM pg_default_acl d
    UNION ALL SELECT format('init privs %s', i) FROM pg_init_privs i
    UNION ALL SELECT format('policy %s', p) FROM pg_policy p
    UNION ALL SELECT format('rule %s', r) FROM pg_rewrite r WHERE rulename <> '_RETURN'
    UNION ALL SELECT format('statistics %s', s) FROM pg_statistic_ext s
    UNION ALL SELECT format('constraint %s %s', oid, conname) FROM pg_constraint WHERE oid >= 16384
    UNION ALL SELECT format('trigger %s %s', oid, tgname) FROM pg_trigger WHERE oid >= 16384
    UNION ALL SELECT format('description %s', d) FROM pg_description d WHERE objoid >= 16384
    UNION ALL SELECT format('label %s', l) FROM pg_seclabel l
) f(x)";

async fn fingerprint(m: &Migration) -> Result<String, crate::Error> {
    let conn = m.source_conn().await?;
    let row = conn
        .query_one(FINGERPRINT, &[])
        .await
        .map_err(CutoverError::Source)?;
    Ok(row.get(0))
}

/// Dumps the source's schema and reads the entries restored at cutover out
/// of it, after reading the fingerprint (so a change made meanwhile shows
/// as one).
pub async fn prepare(m: &Migration) -> Result<Prepared, crate::Error> {
    let fingerprint = fingerprint(m).await?;
    let tools = PgTools::locate(m.cfg.pg_bin_dir.as_deref()).await?;
    let dump = tools
        .dump_schema(&m.source, m.cfg.source_limits.lock_timeout_ms, true)
        .await?;
    let archive = &dump.archive;
    let since = super::schema_since::check(m, &tools, archive).await?;
    let post_data = tools.toc(archive, "post-data").await?;
    let at_cutover: Vec<_> = post_data
        .iter()
        .filter(|e| e.step() == Step::AtCutover)
        .cloned()
        .collect();
    let script = without_meta_commands(&tools.entries_sql(archive, &at_cutover, "cutover").await?);
    let mut grants = Vec::new();
    if m.cfg.schema.privileges {
        let entries: Vec<_> = tools
            .toc(archive, "pre-data")
            .await?
            .into_iter()
            .chain(post_data)
            .filter(|e| e.step() == Step::Grants)
            .collect();
        // Statement by statement: pg_restore runs an object's grants as one
        // query, so one grant to a role the target lacks would silently drop
        // the grants after it.
        grants = tools
            .entries_sql(archive, &entries, "grants")
            .await?
            .lines()
            .map(str::trim)
            .filter(|l| {
                l.starts_with("GRANT ")
                    || l.starts_with("REVOKE ")
                    || l.starts_with("ALTER DEFAULT PRIVILEGES ")
            })
            .map(String::from)
            .collect();
    }
    Ok(Prepared {
        fingerprint,
        script,
        grants,
        only_on_target: since.only_on_target,
        followed: since.followed,
    })
}

/// pg_restore's script without its psql meta-commands: the `\restrict KEY`
/// line that opens it and the `\unrestrict KEY` line that closes it
/// (PostgreSQL 15.14 and later).
fn without_meta_commands(script: &str) -> String {
    let key = script
        .lines()
        .find_map(|l| l.strip_prefix("\\restrict "))
        .map(str::to_string);
    match key {
        None => script.to_string(),
        Some(key) => {
            let (open, close) = (format!("\\restrict {key}"), format!("\\unrestrict {key}"));
            script
                .lines()
                .filter(|l| *l != open && *l != close)
                .map(|l| format!("{l}\n"))
                .collect()
        }
    }
}

/// Restores the entries on the target: `prepared` when the catalogs they
/// came from are unchanged since (else, or without it, from a dump made
/// now). Returns the grants that failed, each with its reason.
pub async fn restore(m: &Migration, prepared: Option<Prepared>) -> Result<Vec<String>, crate::Error> {
    let entries = match prepared {
        Some(p) if fingerprint(m).await? == p.fingerprint => p,
        Some(_) => {
            tracing::info!(
                "The source's grants, policies, rules or comments changed since they were read ahead of the fence: \
                 dumping them again"
            );
            prepare(m).await?
        }
        None => prepare(m).await?,
    };
    if !entries.script.is_empty() {
        let mut target = m.target_conn().await?;
        let tx = target.transaction().await.map_err(CutoverError::Target)?;
        tx.batch_execute(&entries.script)
            .await
            .map_err(CutoverError::Target)?;
        tx.commit().await.map_err(CutoverError::Target)?;
        // The script's SETs (an empty search_path among them) stay with the
        // session: it does not go back to the pool.
        let _ = Object::take(target);
    }
    // Each statement is its own query, so one failing leaves the others be;
    // all are sent at once (pipelined, run in order): one round trip under
    // the fence rather than one per statement.
    let target = m.target_conn().await?;
    let outcomes = futures_util::future::join_all(
        entries
            .grants
            .iter()
            .map(|statement| target.batch_execute(statement)),
    )
    .await;
    let mut warnings = Vec::new();
    for (statement, outcome) in entries.grants.iter().zip(outcomes) {
        if let Err(e) = outcome {
            let why = crate::db::errors::db_message(&e);
            warnings.push(format!("{statement} -- {why}"));
        }
    }
    for w in &warnings {
        tracing::warn!(warning = %w, "Grant not restored");
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restrict_lines_of_a_script_are_dropped_and_nothing_else() {
        let script =
            "\\restrict abc\nSET x = 1;\nCOMMENT ON INDEX i IS '\\restrict zzz';\n\\unrestrict abc\n";
        assert_eq!(
            without_meta_commands(script),
            "SET x = 1;\nCOMMENT ON INDEX i IS '\\restrict zzz';\n"
        );
        assert_eq!(without_meta_commands("SET x = 1;\n"), "SET x = 1;\n");
    }
}
