//! Schema drift: what changed on the source since its tables were captured
//! (columns, keys, names, tables created, dropped, attached, detached, a
//! capture trigger disabled), read by the drain, the cutover and `check`.

use crate::drain::SyncError;
use crate::db::Migration;
use crate::state::TableState;

/// What changed in the source schema since the tables were registered: new
/// user tables, dropped or renamed ones, changed columns or keys.
pub fn drift(registered: &[TableState], current: &[crate::plan::SourceTable]) -> Vec<String> {
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
            lost: crate::capture::capture_lost(client).await?,
            bypassed: crate::capture::key_trigger_bypassed(client).await?,
        })
    }
}

/// [`drift`], plus the tables of `gaps`, each said as what it means.
pub fn changes(
    registered: &[TableState],
    current: &[crate::plan::SourceTable],
    gaps: &CaptureGaps,
) -> Vec<String> {
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
    current: &[crate::plan::SourceTable],
) -> Result<Vec<String>, tokio_postgres::Error> {
    Ok(changes(registered, current, &CaptureGaps::read(client).await?))
}

/// Fails with [`SyncError::SchemaDrift`] when the source schema changed.
pub async fn check_drift(m: &Migration, tables: &[TableState]) -> Result<(), SyncError> {
    let conn = m.source_conn().await?;
    let current = crate::plan::source_tables(&**conn, false)
        .await
        .map_err(SyncError::Catalog)?;
    let changes = schema_changes(&**conn, tables, &current)
        .await
        .map_err(SyncError::Catalog)?;
    if changes.is_empty() {
        Ok(())
    } else {
        Err(SyncError::SchemaDrift(changes))
    }
}
