//! Schema drift: what changed on the source since its tables were captured
//! (columns, keys, names, tables created, dropped, attached, detached, a
//! capture trigger disabled), read by the drain, the cutover and `check`.

use crate::control::state::TableState;

/// What changed in the source schema since the tables were registered: new
/// user tables, dropped or renamed ones, changed columns or keys.
pub fn drift(registered: &[TableState], current: &[super::SourceTable]) -> Vec<String> {
    let mut changes = Vec::new();
    for t in registered {
        match current.iter().find(|c| c.relid == t.relid) {
            None => changes.push(format!("table {} was dropped", t.table.display_name())),
            Some(c) if c.table != t.table => changes.push(format!(
                "table {} was renamed to {}",
                t.table.display_name(),
                c.table.display_name()
            )),
            // ATTACH/DETACH PARTITION, INHERIT/NO INHERIT: the table reads
            // and is verified as part of another hierarchy (or none) than
            // the target's copy of it, and a parent's rows would differ
            // while each table compared the same.
            Some(c) if c.lock_relid != t.lock_relid || c.parent_relid != t.parent_relid => changes.push(format!(
                "table {} joined or left a partitioned table or an inheritance parent (ATTACH/DETACH PARTITION, \
                 INHERIT/NO INHERIT)",
                t.table.display_name()
            )),
            Some(c) if !t.copy_only && c.key_columns.as_ref() != Some(&t.key_columns) => {
                changes.push(format!("table {}: its key changed", t.table.display_name()))
            }
            Some(c) if c.copy_columns != t.copy_columns => changes.push(format!(
                "table {}: columns changed (now {}, captured {})",
                t.table.display_name(),
                c.copy_columns.join(", "),
                t.copy_columns.join(", ")
            )),
            Some(_) => {}
        }
    }
    for c in current {
        if !registered.iter().any(|t| t.relid == c.relid) {
            changes.push(format!(
                "table {} was created after install and is not captured",
                c.table.display_name()
            ));
        }
    }
    changes
}

/// The captured tables whose capture must be installed afresh: a trigger
/// disabled or dropped (`lost`), or a key column trigger that a BEFORE
/// UPDATE row trigger created since install could bypass.
#[derive(Debug, Default)]
pub struct CaptureGaps {
    /// Source OIDs of tables whose capture was disabled or dropped.
    pub lost: Vec<u32>,
    /// Source OIDs of tables whose key column trigger can be bypassed.
    pub bypassed: Vec<u32>,
}

impl CaptureGaps {
    /// Reads both from the source catalog.
    pub async fn read(client: &impl tokio_postgres::GenericClient) -> Result<Self, tokio_postgres::Error> {
        Ok(Self {
            lost: capture_lost(client).await?,
            bypassed: key_trigger_bypassed(client).await?,
        })
    }
}

/// The registered tables whose UPDATE capture takes old keys from the key
/// column trigger and that have since got a BEFORE UPDATE row trigger of
/// their own: a key that such a trigger changes goes unseen by the column
/// trigger, so these tables must be captured (and copied) afresh.
/// None before control schema version 9, which brought the key column
/// trigger.
async fn key_trigger_bypassed(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<u32>, tokio_postgres::Error> {
    let v9: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pgferry.schema_migrations WHERE version = 9)",
            &[],
        )
        .await?
        .get(0);
    if !v9 {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT t.relid FROM pgferry.tables t
              WHERE t.key_trigger AND NOT pgferry.key_trigger_fits(t.relid)
                AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.relid)",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// The names and row versions (xmin) of registered table `t`'s pgferry
/// triggers: any ALTER TABLE ... ENABLE/DISABLE TRIGGER on one changes it
/// (`control/sql/0012_trigger_stamps.sql`).
pub(crate) const TRIGGER_STAMP: &str = r"(SELECT string_agg(s.tgname || ':' || s.xmin::text, ',' ORDER BY s.tgname)
                                FROM pg_trigger s WHERE s.tgrelid = t.relid AND s.tgname LIKE 'pgferry\_%')";

/// The registered tables (still on the source) whose capture is not all
/// there and enabled: a capture trigger (or a copy_only table's fence
/// trigger) dropped, or disabled (`ALTER TABLE ... DISABLE TRIGGER`, which
/// the table's owner may run). pgferry's triggers are `ENABLE ALWAYS`, so
/// `session_replication_role` does not bypass them, and one disabled and
/// enabled again the plain way (`ENABLE TRIGGER`) shows here too; one
/// enabled again `ENABLE ALWAYS` shows by its row version, recorded at
/// install. Writes made meanwhile may have gone uncaptured, so these tables
/// must be captured and copied afresh. None while the first install is
/// still under way: a table it has yet to reach has no triggers.
async fn capture_lost(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Vec<u32>, tokio_postgres::Error> {
    // `key_trigger` arrived with control schema version 9 and
    // `trigger_stamp` with 12; read through jsonb so that an older schema
    // reads as "no key column trigger" and "nothing recorded".
    let rows = client
        .query(
            &format!(
                r"SELECT t.relid FROM pgferry.tables t
               CROSS JOIN LATERAL (
                 SELECT count(*) AS present, count(*) FILTER (WHERE g.tgenabled = 'A') AS enabled
                   FROM pg_trigger g
                  WHERE g.tgrelid = t.relid
                    AND g.tgname LIKE CASE WHEN t.copy_only THEN 'pgferry\_fence' ELSE 'pgferry\_capture\_%' END
               ) g
              WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.relid)
                AND (SELECT phase FROM pgferry.run) <> 'installing'
                AND (g.enabled < g.present
                     OR g.present < CASE WHEN t.copy_only THEN 1
                                         WHEN coalesce((to_jsonb(t) ->> 'key_trigger')::boolean, false) THEN 5
                                         ELSE 4 END
                     OR coalesce((to_jsonb(t) ->> 'trigger_stamp') <> {TRIGGER_STAMP}, false))"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// [`drift`], plus the tables of `gaps`, each said as what it means.
pub fn changes(registered: &[TableState], current: &[super::SourceTable], gaps: &CaptureGaps) -> Vec<String> {
    let mut changes = drift(registered, current);
    for t in registered.iter().filter(|t| gaps.lost.contains(&t.relid)) {
        changes.push(format!(
            "table {}: a capture trigger of pgferry's was disabled or dropped, so writes made since may \
             not have been captured (nothing to change on the target: `install` captures the table \
             afresh and `copy` copies it again)",
            t.table.display_name()
        ));
    }
    for t in registered.iter().filter(|t| gaps.bypassed.contains(&t.relid)) {
        changes.push(format!(
            "table {}: a BEFORE UPDATE row trigger was created after install, and the capture of \
             key changes cannot see what such a trigger changes (on the target, create only the \
             function it calls, if the target lacks it: pgferry creates the trigger there at cutover)",
            t.table.display_name()
        ));
    }
    changes
}

/// [`changes`], with the capture gaps read from the source.
pub async fn schema_changes(
    client: &impl tokio_postgres::GenericClient,
    registered: &[TableState],
    current: &[super::SourceTable],
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(changes(registered, current, &CaptureGaps::read(client).await?))
}
