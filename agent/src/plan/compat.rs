//! What must agree between source and target: encoding, collation,
//! extensions; and values that name source objects by OID.

use tokio_postgres::GenericClient;

use super::check::Findings;
use super::Severity;

/// SQL: the relation `c`, in the namespace `n`, is the application's: not
/// in a system schema or pgferry's, nor a member of an extension.
const USER_RELATION: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') \
     AND n.nspname NOT LIKE 'pg\\_%' \
     AND NOT EXISTS (SELECT 1 FROM pg_depend d \
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";

/// Encoding, collation and ctype of the connected database.
async fn locale(c: &impl GenericClient) -> Result<(String, String, String), tokio_postgres::Error> {
    let r = c
        .query_one(
            "SELECT pg_encoding_to_char(encoding)::text, datcollate::text, datctype::text
               FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

/// Compares the two databases; adds what it finds.
pub(super) async fn compare(
    src: &impl GenericClient,
    tgt: &impl GenericClient,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let (s, t) = (locale(src).await?, locale(tgt).await?);
    if s.0 != t.0 {
        f.add(
            Severity::Blocker,
            "target",
            format!("the target database's encoding is {}, the source's {}", t.0, s.0),
            format!("create the target database with ENCODING '{}'", s.0),
        );
    }
    if s.1 != t.1 || s.2 != t.2 {
        f.add(
            Severity::Warning,
            "target",
            format!(
                "collation differs: source {}/{}, target {}/{}; text sorts and compares differently, which can \
                 change index order and unique constraints on text",
                s.1, s.2, t.1, t.2
            ),
            format!("create the target database with LC_COLLATE '{}' LC_CTYPE '{}' if you can", s.1, s.2),
        );
    }
    let wanted = src
        .query(
            "SELECT e.extname::text, e.extversion, n.nspname::text
               FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
              WHERE e.extname <> 'plpgsql' ORDER BY 1",
            &[],
        )
        .await?;
    for r in wanted {
        let (name, version, schema): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let row = tgt
            .query_opt(
                "SELECT installed_version IS NOT NULL,
                        coalesce((SELECT bool_or(trusted) FROM pg_available_extension_versions v WHERE v.name = a.name), false),
                        (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
                   FROM pg_available_extensions a WHERE name = $1",
                &[&name],
            )
            .await?;
        // What the RDS master user runs, as the platform did on the source.
        let create = format!(
            "CREATE EXTENSION IF NOT EXISTS {} WITH SCHEMA {} VERSION '{}'",
            crate::db::ident::Ident(name.clone()),
            crate::db::ident::Ident(schema),
            version.replace('\'', "''")
        );
        match row {
            None => f.add(
                Severity::Blocker,
                &name,
                "extension used by the source is not available on the target",
                "choose a target engine version that offers it, or drop it from the source",
            ),
            // A warning: RDS lets rds_superuser members create the
            // extensions it supports, trusted or not, which no catalog here
            // tells; elsewhere the copy's schema restore fails on it.
            Some(r) if !r.get::<_, bool>(0) && !r.get::<_, bool>(1) && !r.get::<_, bool>(2) => f.add(
                Severity::Warning,
                &name,
                "extension must exist on the target before the copy, and it is not trusted: only a privileged role \
                 may create it",
                format!(
                    "as the RDS master user (a member of rds_superuser), in the target database: {create}; then run \
                     check again"
                ),
            ),
            Some(r) if !r.get::<_, bool>(0) => f.add(
                Severity::Warning,
                &name,
                "extension is not on the target yet: the copy creates it (it is trusted)",
                format!("or create it first: {create}"),
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Columns of the source's tables whose values are object OIDs (`regclass`,
/// `regtype` and the other reg* types, also in arrays, domains and
/// composite types): the target's objects have other OIDs, so such tables
/// move in COPY's text form, by name (`state::TEXT_FORM_TABLES`), and a
/// name the target lacks fails the copy: a warning. Transaction ids and WAL positions (`xid`, `xid8`,
/// `pg_lsn`, snapshots) arrive intact but count on the source's counters,
/// which the target's do not continue: a warning.
pub(super) async fn object_references(
    src: &impl GenericClient,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let rows = src
        .query(
            "WITH RECURSIVE cols(relid, attname, declared, t) AS (
                 SELECT a.attrelid, a.attname, a.atttypid, a.atttypid
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') AND n.nspname NOT LIKE 'pg\\_%'
                 UNION
                 SELECT cols.relid, cols.attname, cols.declared, inner_t.t
                   FROM cols
                   JOIN pg_type ty ON ty.oid = cols.t
                   CROSS JOIN LATERAL (
                       SELECT ty.typbasetype AS t WHERE ty.typtype = 'd'
                       UNION ALL SELECT ty.typelem WHERE ty.typcategory = 'A' AND ty.typelem <> 0
                       UNION ALL SELECT ca.atttypid FROM pg_attribute ca
                                  WHERE ty.typtype = 'c' AND ca.attrelid = ty.typrelid AND ca.attnum > 0 AND NOT ca.attisdropped
                   ) inner_t
             )
             SELECT DISTINCT format('%I.%I', n.nspname, c.relname), quote_ident(cols.attname::text),
                    format_type(cols.declared, NULL), cols.t::regtype::text
               FROM cols JOIN pg_class c ON c.oid = cols.relid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE cols.t IN ('regclass'::regtype, 'regtype'::regtype, 'regproc'::regtype, 'regprocedure'::regtype,
                               'regoper'::regtype, 'regoperator'::regtype, 'regconfig'::regtype,
                               'regdictionary'::regtype, 'regnamespace'::regtype, 'regrole'::regtype,
                               'regcollation'::regtype,
                               'xid'::regtype, 'xid8'::regtype, 'pg_lsn'::regtype, 'txid_snapshot'::regtype,
                               'pg_snapshot'::regtype)
              ORDER BY 1, 2",
            &[],
        )
        .await?;
    for r in rows {
        let (table, column, declared, reg): (String, String, String, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let within = if declared == reg {
            String::new()
        } else {
            format!(" (in {declared})")
        };
        if !reg.starts_with("reg") {
            f.add(
                Severity::Warning,
                &table,
                format!(
                    "column {column} holds {reg} values{within}, which count on the source's transaction or WAL \
                     counters: the target's are others, and its new values may be smaller than the migrated ones"
                ),
                "make sure the application does not compare or order them across the switch",
            );
            continue;
        }
        f.add(
            Severity::Warning,
            &table,
            format!(
                "column {column} holds {reg} values{within}: moved by name (in COPY's text form), as pg_dump \
                 moves them, so each names the same object on the target; a value naming an object the target \
                 lacks (a role not recreated there) fails the copy, naming it"
            ),
            "create on the target what such values name before the copy (roles: `schema.recreate_roles = true`)",
        );
    }
    Ok(())
}

/// Tables whose row-level security policies apply to pgferry's role: with
/// FORCE ROW LEVEL SECURITY even to their owner (the usual way an
/// application that connects as the owner makes its own policies apply to
/// itself, on Heroku among others), and to a role that is not the owner
/// whenever row security is enabled. pgferry would read only the rows the
/// policies show it, and its verification would compare two such reads.
/// Its sessions run with `row_security = off`, so such a table fails the
/// copy loudly; this refuses it before anything is installed.
pub(super) async fn row_security(
    src: &impl GenericClient,
    user: &str,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let rows = src
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname), c.relforcerowsecurity AND pg_has_role(c.relowner, 'USAGE')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND row_security_active(c.oid) AND {USER_RELATION}
                  ORDER BY 1"
            ),
            &[],
        )
        .await?;
    for r in rows {
        let (table, forced): (String, bool) = (r.get(0), r.get(1));
        let (why, fix) = if forced {
            (
                "FORCE ROW LEVEL SECURITY",
                format!(
                    "run pgferry as a role with BYPASSRLS, or ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY until \
                     the cutover is done (the owner, and an application connecting as the owner, reads past the \
                     policies meanwhile), then FORCE it again on the target"
                ),
            )
        } else {
            (
                "row security is enabled and the role does not own the table",
                "use the owner's credentials, or a role with BYPASSRLS".to_string(),
            )
        };
        f.add(
            Severity::Blocker,
            &table,
            format!(
                "its row-level security policies apply to role {user} ({why}), so pgferry would read only the \
                 rows they show it"
            ),
            fix,
        );
    }
    Ok(())
}

/// What pg_dump's sections hold that pgferry does not migrate: publications
/// (logical replication's consumers would stop at the switch) and event
/// triggers (a superuser's).
pub(super) async fn not_migrated(
    src: &impl GenericClient,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let rows = src
        .query(
            "SELECT 'publication', count(*), string_agg(quote_ident(pubname::text), ', ' ORDER BY pubname)
               FROM pg_publication HAVING count(*) > 0
             UNION ALL
             SELECT 'event trigger', count(*), string_agg(quote_ident(evtname::text), ', ' ORDER BY evtname)
               FROM pg_event_trigger HAVING count(*) > 0",
            &[],
        )
        .await?;
    for r in rows {
        let (kind, count, names): (String, i64, String) = (r.get(0), r.get(1), r.get(2));
        f.add(
            Severity::Warning,
            "source",
            format!("{count} {kind}(s) ({names}) are not migrated"),
            format!("create the {kind}s needed on the target after the cutover"),
        );
    }
    Ok(())
}

/// Sequences the source role may not read: the cutover copies every
/// sequence's state with writes fenced, and a refusal there failed it
/// (and lifted the fence) after the whole copy and sync.
pub(super) async fn sequences(
    src: &impl GenericClient,
    user: &str,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let rows = src
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname)
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind = 'S' AND NOT has_table_privilege(c.oid, 'SELECT') AND {USER_RELATION}
                  ORDER BY 1"
            ),
            &[],
        )
        .await?;
    for r in rows {
        let sequence: String = r.get(0);
        f.add(
            Severity::Blocker,
            sequence.clone(),
            format!("role {user} may not read this sequence, whose value the cutover copies"),
            format!("GRANT SELECT ON SEQUENCE {sequence} TO {user}"),
        );
    }
    Ok(())
}

/// Foreign keys, valid on the source, that reference a partitioned table:
/// the cutover creates them valid at once, with the fence up (a later
/// VALIDATE would leave the constraints PostgreSQL derives for each
/// referenced partition NOT VALID), so checking their rows adds to the
/// write downtime. A warning with the size of what is checked.
pub(super) async fn references_to_partitioned(
    src: &impl GenericClient,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let rows = src
        .query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname), quote_ident(con.conname::text),
                        con.confrelid::regclass::text, greatest(c.reltuples, 0)::int8
                   FROM pg_constraint con
                   JOIN pg_class c ON c.oid = con.conrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_class r ON r.oid = con.confrelid
                  WHERE con.contype = 'f' AND con.conparentid = 0 AND con.convalidated AND r.relkind = 'p'
                    AND {USER_RELATION}
                  ORDER BY 1, 2"
            ),
            &[],
        )
        .await?;
    for r in rows {
        let (table, name, referenced, rows): (String, String, String, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        f.add(
            Severity::Warning,
            table,
            format!(
                "foreign key {name} references the partitioned table {referenced}: the cutover creates it valid \
                 with writes fenced, checking about {rows} row(s) then (PostgreSQL would leave the constraints it \
                 derives for each partition NOT VALID after a later VALIDATE)"
            ),
            "expect that check in the cutover's write downtime; nothing to change",
        );
    }
    Ok(())
}
