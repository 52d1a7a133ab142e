//! The preflight report: every problem on both sides, each with its fix.

use std::fmt::Write as _;

use serde::Serialize;
use tokio_postgres::GenericClient;

use crate::config::MatviewRefresh;
use crate::config::VerifyScope;
use crate::control::state::{self, Phase};
use crate::db::endpoint::{ConnectError, Side};
use crate::db::Migration;
use crate::schema::PgTools;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The migration must not start.
    Blocker,
    /// Worth knowing; the migration can proceed.
    Warning,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Blocker or warning.
    pub severity: Severity,
    /// What it is about (`source`, `target`, a table name...).
    pub subject: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

/// What one side looks like.
#[derive(Debug, Clone, Serialize)]
pub struct SideSummary {
    /// `user@host:port/db`.
    pub endpoint: String,
    /// Server major version, when reached.
    pub major_version: Option<u32>,
}

/// A copy_only table and the write downtime its copy costs.
#[derive(Debug, Clone, Serialize)]
pub struct CopyOnlyCost {
    /// `schema.name`.
    pub table: String,
    /// Its size on the source.
    pub bytes: i64,
    /// Its size over the sampled read rate.
    pub estimated_blocked_secs: Option<f64>,
}

/// The whole preflight result.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The source.
    pub source: SideSummary,
    /// The target.
    pub target: SideSummary,
    /// The stored phase, when a migration is under way.
    pub phase: Option<Phase>,
    /// Tables that will be migrated.
    pub tables: usize,
    /// Sum of the planner's row estimates.
    pub estimated_rows: i64,
    /// Sum of table sizes on disk (not read by a step's preflight).
    pub total_bytes: Option<i64>,
    /// Storage, instance class and copy-time estimate for the target.
    pub sizing: Option<super::Sizing>,
    /// Tables copied whole under the fence, and what that costs.
    pub copy_only: Vec<CopyOnlyCost>,
    /// Everything found.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// Number of blockers other than schema drift (what `install` may
    /// proceed past, since it is the remedy).
    pub fn blockers_but_drift(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Blocker && p.subject != DRIFT)
            .count()
    }

    /// Number of blockers.
    pub fn blockers(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Blocker)
            .count()
    }

    /// The report as an operator reads it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let v = |s: &SideSummary| {
            s.major_version
                .map_or("unreachable".to_string(), |v| format!("PostgreSQL {v}"))
        };
        let _ = writeln!(out, "source  {} ({})", self.source.endpoint, v(&self.source));
        let _ = writeln!(out, "target  {} ({})", self.target.endpoint, v(&self.target));
        if let Some(phase) = self.phase {
            let _ = writeln!(out, "phase   {} (a migration is under way)", phase.as_str());
        }
        let _ = writeln!(
            out,
            "tables  {} (~{} rows{})",
            self.tables,
            self.estimated_rows.max(0),
            self.total_bytes
                .map(|b| format!(", {:.1} MB", b as f64 / 1e6))
                .unwrap_or_default()
        );
        if let Some(s) = &self.sizing {
            let _ = writeln!(
                out,
                "sizing  database {:.1} GB; target: allocate {} GB (gp3), start with {}{}",
                s.database_bytes as f64 / 1e9,
                s.recommended_storage_gb,
                s.suggested_instance_class,
                s.estimated_copy_secs
                    .map(|secs| format!(
                        "; copy estimate ~{secs:.0} s at the sampled {:.0} MB/s",
                        s.sampled_read_bytes_per_sec.unwrap_or(0.0) / 1e6
                    ))
                    .unwrap_or_default()
            );
        }
        for p in &self.problems {
            let tag = match p.severity {
                Severity::Blocker => "BLOCKER",
                Severity::Warning => "WARNING",
            };
            let _ = writeln!(out, "{tag:<8} {}: {}", p.subject, p.message);
            let _ = writeln!(out, "         fix: {}", p.fix);
        }
        let b = self.blockers();
        let w = self.problems.len() - b;
        if b == 0 {
            let _ = writeln!(out, "ok: no blockers, {w} warning(s)");
        } else {
            let _ = writeln!(
                out,
                "refused: {b} blocker(s), {w} warning(s); nothing was changed on either side"
            );
        }
        out
    }
}

/// The subject of schema-drift problems: they block everything but
/// `install`, which is how an operator resolves them.
pub const DRIFT: &str = "schema drift";

/// Problems found so far.
pub(super) struct Findings(Vec<Problem>);

impl Findings {
    /// Records one problem.
    pub(super) fn add(
        &mut self,
        severity: Severity,
        subject: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(Problem {
            severity,
            subject: subject.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn connect(&mut self, side: Side, err: &ConnectError) {
        self.add(
            Severity::Blocker,
            side.to_string(),
            crate::db::errors::report(err).replace('\n', " "),
            format!("correct the {side} URL or make the server reachable from this host"),
        );
    }

    fn query(&mut self, side: Side, err: &tokio_postgres::Error) {
        self.add(
            Severity::Blocker,
            side.to_string(),
            format!(
                "catalog query failed: {}",
                crate::db::errors::report(err).replace('\n', " ")
            ),
            "check that the role may read the system catalogs",
        );
    }
}

/// Runs the preflight against both sides. Reads only.
pub async fn check(m: &Migration) -> CheckReport {
    check_with(m, true).await
}

/// [`check`]; without `sizing`, nothing of the source's size: no table
/// sizes (`pg_total_relation_size` of each, 0.6 s at 2,000 tables) and no
/// sample of its read rate (a second of COPY from its largest table). Only
/// the report shows them, so the preflight of a step (and of each
/// partition sync follows, the drain paused) goes without.
pub async fn check_with(m: &Migration, sizing: bool) -> CheckReport {
    let mut f = Findings(Vec::new());
    let mut report = CheckReport {
        source: SideSummary {
            endpoint: m.source.redacted(),
            major_version: None,
        },
        target: SideSummary {
            endpoint: m.target.redacted(),
            major_version: None,
        },
        phase: None,
        tables: 0,
        estimated_rows: 0,
        total_bytes: None,
        sizing: None,
        copy_only: Vec::new(),
        problems: Vec::new(),
    };
    let (src, tgt) = tokio::join!(m.source.connect(), m.target.connect());
    let mut pre_data_done = false;
    match &src {
        Ok(c) => {
            if let Err(e) = check_source(m, c, sizing, &mut report, &mut f, &mut pre_data_done).await {
                f.query(Side::Source, &e);
            }
            if let Err(e) = super::health::source(m, c, &mut f).await {
                f.query(Side::Source, &e);
            }
            if sizing {
                report.sizing = super::health::sizing(m).await.ok();
            }
        }
        Err(e) => f.connect(Side::Source, e),
    }
    // The same database named twice (a copy-pasted URL, a DNS alias): the
    // target's checks would call the source's own tables "not empty".
    let mut same = false;
    if let (Ok(s), Ok(t)) = (&src, &tgt) {
        same = same_database(s, t).await.unwrap_or(false);
        if same {
            f.add(
                Severity::Blocker,
                "target",
                "the source and the target are the same database",
                "point --target at the new (empty) database; nothing was changed on either side",
            );
        }
    }
    let source_tables = match &src {
        Ok(c) if !same => table_names(c).await.ok(),
        _ => None,
    };
    match &tgt {
        Ok(_) if same => {}
        Ok(c) => {
            if let Err(e) = check_target(c, &mut report, &mut f, pre_data_done, source_tables.as_ref()).await
            {
                f.query(Side::Target, &e);
            }
        }
        Err(e) => f.connect(Side::Target, e),
    }
    if m.cfg.cutover.fallback && !same {
        if let Ok(c) = &src {
            if let Err(e) = check_fallback_source(m, c, &mut f).await {
                f.query(Side::Source, &e);
            }
        }
        if let Ok(c) = &tgt {
            let can: Result<bool, _> = c
                .query_one("SELECT has_database_privilege(current_database(), 'CREATE')", &[])
                .await
                .map(|r| r.get(0));
            match can {
                Ok(true) => {}
                Ok(false) => f.add(
                    Severity::Blocker,
                    "target",
                    format!(
                        "with cutover.fallback the target keeps pgferry's capture (schema pgferry) until `pgferry \
                         finish`, and role {} may not create a schema in its database",
                        m.target.user()
                    ),
                    format!(
                        "GRANT CREATE ON DATABASE {} TO {}, or set cutover.fallback = false",
                        m.target.dbname(),
                        m.target.user()
                    ),
                ),
                Err(e) => f.query(Side::Target, &e),
            }
        }
    }
    // What copy_only tables cost in write downtime, at the sampled rate, or
    // at the copy's rate limit when the cutover keeps it.
    let mut rate = report.sizing.as_ref().and_then(|s| s.sampled_read_bytes_per_sec);
    if let (true, Some(limit)) = (m.cfg.cutover.rate_limited, m.cfg.copy.rate_bytes_per_sec) {
        rate = Some(rate.map_or(limit as f64, |r| r.min(limit as f64)));
    }
    for c in &mut report.copy_only {
        c.estimated_blocked_secs = rate.map(|r| c.bytes as f64 / r);
        f.add(
            Severity::Warning,
            &c.table,
            format!(
                "has no key and is listed under copy_only: it is copied whole while writes are fenced, adding {} to the cutover's write downtime",
                c.estimated_blocked_secs.map_or("an unmeasured time".into(), |s| format!("about {s:.1} s"))
            ),
            "add a primary key to sync it instead, if that downtime is too long",
        );
    }
    if let Some((message, fix)) = verify_downtime(m.cfg.cutover.verify, report.total_bytes.unwrap_or(0)) {
        f.add(Severity::Warning, "cutover", message, fix);
    }
    let cc = &m.cfg.copy;
    if cc.method == crate::config::CopyMethod::Dump && cc.rate_bytes_per_sec.is_some() && cc.from.is_none() {
        f.add(
            Severity::Warning,
            "copy",
            "copy.rate_bytes_per_sec does not hold back pg_dump: with copy.method = \"dump\" the bulk copy reads the source at full speed (the limit still holds sync's whole-table copies)",
            "use copy.method = \"stream\" to keep the limit on the bulk copy, or dump a fork of the source (copy.from)",
        );
    }
    if let (Ok(s), Ok(t)) = (&src, &tgt) {
        if let Err(e) = super::compat::compare(s, t, &mut f).await {
            f.query(Side::Target, &e);
        }
    }
    check_tools(m, &report, &mut f).await;
    report.problems = f.0;
    report
}

async fn check_source(
    m: &Migration,
    c: &impl GenericClient,
    sizing: bool,
    report: &mut CheckReport,
    f: &mut Findings,
    pre_data_done: &mut bool,
) -> Result<(), tokio_postgres::Error> {
    let major = super::server_major(c).await?;
    report.source.major_version = Some(major);
    if major < 13 {
        f.add(
            Severity::Blocker,
            "source",
            format!("PostgreSQL {major} is too old: capture needs pg_current_xact_id() (13 or newer)"),
            "upgrade the source to PostgreSQL 13 or newer first",
        );
    }
    let run = match state::load(c).await {
        Ok(run) => run,
        Err(e) => {
            f.add(
                Severity::Blocker,
                "source",
                crate::db::errors::report(&e).replace('\n', " "),
                "run `pgferry cleanup` to remove the broken control schema, then start again",
            );
            None
        }
    };
    report.phase = run.as_ref().map(|r| r.phase);
    *pre_data_done = run.as_ref().is_some_and(|r| r.pre_data_done);
    if run.is_none() {
        let row = c
            .query_one("SELECT has_database_privilege(current_database(), 'CREATE')", &[])
            .await?;
        if !row.get::<_, bool>(0) {
            f.add(
                Severity::Blocker,
                "source",
                format!(
                    "role {} may not create schemas in the source database",
                    m.source.user()
                ),
                "GRANT CREATE ON DATABASE <db> TO <role>, or use the database owner's credentials",
            );
        }
    }
    let tables = super::source_tables(c, sizing).await?;
    report.tables = tables.len();
    report.estimated_rows = tables.iter().map(|t| t.est_rows.max(0)).sum();
    report.total_bytes = sizing.then(|| tables.iter().map(|t| t.total_bytes).sum());
    if run.is_some() {
        if let Ok(registered) = state::tables(c).await {
            for change in super::drift::schema_changes(c, &registered, &tables).await? {
                f.add(
                    Severity::Blocker,
                    DRIFT,
                    format!("the schema changed since install: {change}"),
                    "make the same change on the target, then run `pgferry install` and `pgferry copy`",
                );
            }
        }
    }
    if tables.is_empty() {
        f.add(
            Severity::Blocker,
            "source",
            "the source database has no user tables",
            "point --source at the database that holds the application's data",
        );
    }
    for t in &tables {
        let name = t.table.display_name();
        if t.multiple_inheritance {
            f.add(
                Severity::Blocker,
                &name,
                "inherits from more than one parent (multiple INHERITS), which pgferry does not migrate",
                "migrate it separately during a maintenance window",
            );
        } else if t.key_columns.is_none() && m.cfg.copy_only.contains(&name) {
            report.copy_only.push(CopyOnlyCost {
                table: name.clone(),
                bytes: t.total_bytes,
                estimated_blocked_secs: None,
            });
        } else if t.key_columns.is_none() {
            f.add(
                Severity::Blocker,
                &name,
                "has no primary key or unique NOT NULL index, so changed rows cannot be identified",
                format!(
                    "add one (ALTER TABLE {} ADD PRIMARY KEY (...)), or list it under copy_only to copy it whole \
                     while writes are fenced, then run check again",
                    t.table
                ),
            );
        }
        if !t.can_trigger {
            f.add(
                Severity::Blocker,
                &name,
                format!("role {} may not create triggers on it", m.source.user()),
                format!(
                    "GRANT TRIGGER ON {} TO {}, or use the owner's credentials",
                    t.table,
                    m.source.user()
                ),
            );
        }
        if !t.can_select {
            f.add(
                Severity::Blocker,
                &name,
                format!("role {} may not read it", m.source.user()),
                format!("GRANT SELECT ON {} TO {}", t.table, m.source.user()),
            );
        }
    }
    let roots: Vec<String> = tables
        .iter()
        .filter(|t| t.partitioned && t.lock_relid == t.relid)
        .map(|t| t.table.display_name())
        .collect();
    if !roots.is_empty() {
        let partman: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_partman')",
                &[],
            )
            .await?
            .get(0);
        let partman = if partman {
            ", and pg_partman is installed"
        } else {
            ""
        };
        let roots = roots.join(", ");
        if m.cfg.sync.follow_partitions {
            f.add(
                Severity::Warning,
                "source",
                format!(
                    "partitioned tables ({roots}){partman}: sync repeats on the target a partition created, \
                     attached, detached or dropped while it runs, and copies what it brings, with the drain \
                     paused meanwhile; a partitioned table created under them, or any partition change while \
                     the cutover runs, stops it as schema drift"
                ),
                "create the partitions the cutover will need ahead (pg_partman's premake), and keep partition \
                 maintenance (run_maintenance, cron jobs) from running during the cutover",
            );
        } else {
            f.add(
                Severity::Warning,
                "source",
                format!(
                    "partitioned tables ({roots}){partman}: with sync.follow_partitions = false, a partition \
                     created, dropped, attached or detached during the sync stops it as schema drift until the \
                     change is made on the target"
                ),
                "pause partition maintenance (pg_partman's run_maintenance, cron jobs) until the cutover, after \
                 creating the partitions it will need by then",
            );
        }
    }
    super::compat::object_references(c, f).await?;
    super::compat::row_security(c, m.source.user(), f).await?;
    super::compat::not_migrated(c, f).await?;
    super::compat::sequences(c, m.source.user(), f).await?;
    super::compat::references_to_partitioned(c, f).await?;
    if m.cfg.cutover.materialized_views == MatviewRefresh::Fenced {
        let views: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind = 'm' AND c.relispopulated
                    AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'",
                &[],
            )
            .await?
            .get(0);
        if let Some((message, fix)) = matview_downtime(views) {
            f.add(Severity::Warning, "cutover", message, fix);
        }
    }
    let long = c
        .query(
            "SELECT pid, extract(epoch FROM clock_timestamp() - xact_start)::int8, state
               FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND xact_start < clock_timestamp() - interval '5 minutes'",
            &[],
        )
        .await?;
    for r in long {
        f.add(
            Severity::Warning,
            "source",
            format!(
                "backend {} has had a transaction open for {} s ({}): trigger installation waits for its locks",
                r.get::<_, i32>(0),
                r.get::<_, i64>(1),
                r.get::<_, Option<String>>(2).unwrap_or_default()
            ),
            "let it finish or end it before install; pgferry retries with a short lock timeout meanwhile",
        );
    }
    Ok(())
}

/// Whether two sessions are in the same database of the same server: the
/// target's session list holds the source session's backend, in a database
/// of the same name and OID.
async fn same_database(
    source: &impl GenericClient,
    target: &impl GenericClient,
) -> Result<bool, tokio_postgres::Error> {
    let me = source
        .query_one(
            "SELECT pg_backend_pid(), current_database()::text, oid FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    let (pid, name, oid): (i32, String, u32) = (me.get(0), me.get(1), me.get(2));
    let row = target
        .query_one(
            "SELECT current_database() = $2
                AND (SELECT oid FROM pg_database WHERE datname = current_database()) = $3
                AND EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND datname = $2)",
            &[&pid, &name, &oid],
        )
        .await?;
    Ok(row.get(0))
}

/// The user tables of a database (`schema.table`), pgferry's aside.
async fn table_names(
    c: &impl GenericClient,
) -> Result<std::collections::BTreeSet<String>, tokio_postgres::Error> {
    Ok(c
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry')
                AND n.nspname NOT LIKE 'pg\\_%'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

async fn check_target(
    c: &impl GenericClient,
    report: &mut CheckReport,
    f: &mut Findings,
    pre_data_done: bool,
    source_tables: Option<&std::collections::BTreeSet<String>>,
) -> Result<(), tokio_postgres::Error> {
    let major = super::server_major(c).await?;
    report.target.major_version = Some(major);
    if let Some(src) = report.source.major_version {
        if major < src {
            f.add(
                Severity::Blocker,
                "target",
                format!("the target runs PostgreSQL {major}, older than the source's {src}"),
                format!("create the target with PostgreSQL {src} or newer"),
            );
        }
    }
    let row = c
        .query_one("SELECT has_database_privilege(current_database(), 'CREATE')", &[])
        .await?;
    if !row.get::<_, bool>(0) {
        f.add(
            Severity::Blocker,
            "target",
            "the target role may not create schemas in the target database",
            "use the RDS master user, or GRANT CREATE ON DATABASE <db> TO <role>",
        );
    }
    if !pre_data_done {
        let (count, examples) = super::user_objects(c).await?;
        let holds_source = match source_tables {
            Some(tables) if count > 0 && !tables.is_empty() => tables.is_subset(&table_names(c).await?),
            _ => false,
        };
        if holds_source {
            // Possibly the new production database: never advise removing
            // anything from it.
            f.add(
                Severity::Blocker,
                "target",
                format!(
                    "the target already holds every table of the source ({count} object(s) in all): a finished \
                     migration, whose database the application may already use, or an earlier copy"
                ),
                "if this migration finished, there is nothing left to do; to migrate this source again, point \
                 --target at a new, empty database",
            );
        } else if count > 0 {
            f.add(
                Severity::Blocker,
                "target",
                format!(
                    "the target database is not empty: {count} object(s), e.g. {}",
                    examples.join(", ")
                ),
                "point --target at a new, empty database (or drop those objects)",
            );
        }
    }
    Ok(())
}

async fn check_tools(m: &Migration, report: &CheckReport, f: &mut Findings) {
    match PgTools::locate(m.cfg.pg_bin_dir.as_deref()).await {
        Ok(tools) => {
            if let Some(src) = report.source.major_version {
                if tools.major < src {
                    f.add(
                        Severity::Blocker,
                        "pg_dump",
                        format!("pg_dump {} cannot dump a PostgreSQL {src} server", tools.major),
                        format!("install the PostgreSQL {src} client tools (e.g. apt-get install postgresql-client-{src}) or set pg_bin_dir"),
                    );
                }
            }
            if let Some(tgt) = report.target.major_version {
                if tools.major < tgt {
                    f.add(
                        Severity::Warning,
                        "pg_dump",
                        format!(
                            "pg_dump {} cannot dump the PostgreSQL {tgt} target, so the cutover cannot compare the \
                             schemas: objects created on the source since the copy would go unnoticed",
                            tools.major
                        ),
                        format!("install the PostgreSQL {tgt} client tools (apt-get install postgresql-client-{tgt}) or set pg_bin_dir"),
                    );
                }
            }
        }
        Err(e) => f.add(
            Severity::Blocker,
            "pg_dump",
            crate::db::errors::report(&e).replace('\n', " "),
            "install the PostgreSQL client tools (apt-get install postgresql-client) or set pg_bin_dir",
        ),
    }
}

/// From this much table data on, the write downtime of the default full
/// verification is worth a warning: about 1.5 s per GB where measured
/// (docs/design.md, "Verification and write downtime").
const FULL_VERIFY_WARN_BYTES: i64 = 5_000_000_000;

/// The warning (message, fix) about what the cutover's verification costs
/// in write downtime for `table_bytes` of tables, if it is worth one.
fn verify_downtime(scope: VerifyScope, table_bytes: i64) -> Option<(String, &'static str)> {
    (scope == VerifyScope::Full && table_bytes >= FULL_VERIFY_WARN_BYTES).then(|| {
        (
            format!(
                "with cutover.verify = \"full\" the cutover reads all {:.1} GB of tables on both sides while writes \
                 are blocked: about {:.0} s of write downtime at the 1.5 s per GB measured, growing with the database",
                table_bytes as f64 / 1e9,
                table_bytes as f64 / 1e9 * 1.5
            ),
            "leave cutover.verify at its default, \"changed\": each table is then verified ahead of the fence, and \
             only the rows changed since are compared while writes are blocked",
        )
    })
}

/// The warning (message, fix) about refreshing `views` populated
/// materialized views with writes blocked, if there are any.
fn matview_downtime(views: i64) -> Option<(String, &'static str)> {
    (views > 0).then(|| {
        (
            format!(
                "{views} materialized view(s) are refreshed on the target while writes are blocked \
                 (cutover.materialized_views = \"fenced\"): the write downtime grows with the time their queries take"
            ),
            "if they are slow to refresh, set cutover.materialized_views = \"after_switch\": they are then \
             refreshed just before the fence and again after the switch, holding the data of a moment before \
             the switch until then",
        )
    })
}

/// With `cutover.fallback`: after the switch pgferry writes the old
/// source's tables as their rows arrive from the target, and disables
/// their own triggers meanwhile, which only a table's owner may do.
async fn check_fallback_source(
    m: &Migration,
    c: &tokio_postgres::Client,
    f: &mut Findings,
) -> Result<(), tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname),
                    has_table_privilege(c.oid, 'INSERT, UPDATE, DELETE'),
                    pg_has_role(c.relowner, 'USAGE'),
                    (SELECT string_agg(t.tgname, ', ' ORDER BY t.tgname) FROM pg_trigger t
                      WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND t.tgparentid = 0 AND t.tgenabled <> 'D'
                        AND t.tgname NOT LIKE 'pgferry\\_%')
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p')
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') AND n.nspname NOT LIKE 'pg\\_%'
                AND NOT EXISTS (SELECT 1 FROM pg_depend d
                                 WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
              ORDER BY 1",
            &[],
        )
        .await?;
    for r in &rows {
        let (name, writes, owns, triggers): (String, bool, bool, Option<String>) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if !writes {
            f.add(
                Severity::Blocker,
                &name,
                format!(
                    "with cutover.fallback pgferry writes it on the old source after the switch, and role {} may not",
                    m.source.user()
                ),
                format!(
                    "GRANT INSERT, UPDATE, DELETE ON {name} TO {}, or set cutover.fallback = false",
                    m.source.user()
                ),
            );
        }
        if let (false, Some(triggers)) = (owns, triggers) {
            f.add(
                Severity::Blocker,
                &name,
                format!(
                    "with cutover.fallback pgferry disables its triggers ({triggers}) on the old source while it \
                     follows the new database (they fired there already), which only its owner may do, and role {} \
                     does not own it",
                    m.source.user()
                ),
                "run pgferry as the table's owner, or set cutover.fallback = false".to_string(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materialized_views_refreshed_under_the_fence_are_warned_about() {
        let (message, fix) = matview_downtime(2).expect("a warning");
        assert!(message.starts_with("2 materialized view(s)"), "{message}");
        assert!(fix.contains("\"after_switch\""), "{fix}");
        assert!(matview_downtime(0).is_none());
    }

    #[test]
    fn a_large_database_is_warned_about_the_full_verification() {
        let (message, fix) = verify_downtime(VerifyScope::Full, 12_300_000_000).expect("a warning");
        assert!(
            message.contains("12.3 GB") && message.contains("about 18 s"),
            "{message}"
        );
        assert!(fix.contains("\"changed\""), "{fix}");
        assert!(verify_downtime(VerifyScope::Full, 1_000_000_000).is_none());
        assert!(verify_downtime(VerifyScope::Changed, 12_300_000_000).is_none());
    }
}
