//! Schema changes of the source, followed while syncing (docs/design.md,
//! "Schema changes during sync").
//!
//! pg_partman (or a cron job) creates partitions ahead and detaches or drops
//! old ones, hourly or daily, and an application's deploy creates tables and
//! adds or drops columns: in a sync of days each such change was schema
//! drift, and sync stopped until an operator repeated it on the target and
//! ran `install` and `copy`. When the drift is only such changes, `sync`
//! does those steps itself, between two passes:
//!
//! - a leaf partition **created or attached** on the source is created on
//!   the target from `pg_dump`'s definition of it, gets its keys and indexes
//!   under the source's names, and is attached as the source's is. Rows the
//!   drain routed meanwhile into the target's default partition, where the
//!   source has none (the source's attach proved it), are deleted there in
//!   the attaching transaction;
//! - a leaf partition **detached** on the source is detached on the target;
//! - a leaf partition **dropped** on the source is dropped on the target;
//! - a **table created** on the source, of its own and with a key, is
//!   created on the target from `pg_dump`'s definition of it;
//! - **columns added, dropped or renamed** are so on the target
//!   ([`columns`]); a **table renamed or dropped** too;
//!
//! then, as an operator would, `install` captures the new and changed
//! tables (its preflight first) and `copy` copies them, in snapshots taken
//! after their capture. Every step finds what an interrupted run did and
//! goes on from there. Column types widened ([`retype`]) and enum values
//! added are followed when a batch or the drift check meets them; defaults
//! and NOT NULL (`attributes.rs`), CHECK constraints, and the indexes and
//! unique constraints the source dropped ([`constraints`]) by the drift
//! check, or when the target refuses a batch on one. Anything
//! else (a new partitioned table, classic inheritance, a type changed
//! otherwise, a key changed, a capture trigger dropped)
//! stops sync as drift, as before.

mod attributes;
mod columns;
mod constraints;
mod generated;
mod new_types;
mod retype;

use tokio_util::sync::CancellationToken;

use crate::control::state::TableState;
use crate::db::ident::{Ident, QualifiedTable};
use crate::db::Migration;
use crate::drain::SyncError;
use crate::plan::SourceTable;

/// The advisory lock class of a follow, taken on the target: `pgfr` less
/// one (the drain's batch locks, on the source, are `pgfr` and above).
const FOLLOW_LOCK_CLASS: i32 = 0x7067_6671;

/// One change of a captured partition hierarchy that sync repeats on the
/// target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A leaf partition new to the migration, or a captured table that
    /// became one (source OID).
    Attached(u32, QualifiedTable),
    /// A captured leaf partition that is now a table of its own (source
    /// OID).
    Detached(u32, QualifiedTable),
    /// A captured leaf partition that no longer exists.
    Dropped(QualifiedTable),
    /// A table new to the migration, of its own (no hierarchy), with a key
    /// (source OID).
    Created(u32, QualifiedTable),
    /// A table of its own renamed, or moved to another schema (source OID,
    /// old name, new name).
    Renamed(u32, QualifiedTable, QualifiedTable),
    /// A captured table of its own that no longer exists.
    TableDropped(QualifiedTable),
    /// A column renamed: same place, new name (a key column's too).
    ColumnRenamed {
        /// The table's source OID.
        relid: u32,
        /// The table.
        table: QualifiedTable,
        /// Its old name.
        from: String,
        /// Its new name.
        to: String,
        /// Known by its attribute number (control schema 21), not only by
        /// its place among the names.
        by_number: bool,
    },
    /// A column's type widened (`int` to `bigint`, a longer `varchar`).
    Widened(retype::Widened),
    /// A value added to an enum type (the statement that added it).
    EnumValue(String),
    /// A column's default or NOT NULL made the source's.
    Altered(attributes::Altered),
    /// A CHECK constraint added, validated or dropped, or an index or
    /// unique constraint dropped, as on the source.
    Constrained(constraints::Constrained),
    /// Columns added to a captured table, or dropped from it. Both in one
    /// deploy only where the registration has the columns' attribute
    /// numbers: by names alone a rename reads as both, and following it so
    /// would lose the column's values. Then the drops come first, the
    /// renames next and the additions last, each its own change.
    Columns {
        /// The table's source OID.
        relid: u32,
        /// The table.
        table: QualifiedTable,
        /// Columns added, in the source's order.
        added: Vec<String>,
        /// Columns dropped.
        dropped: Vec<String>,
        /// The columns the registration names once this is followed.
        now: Vec<String>,
    },
}

impl Change {
    /// The change's kind, as the metric labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Attached(..) => "partition_attached",
            Change::Detached(..) => "partition_detached",
            Change::Dropped(_) => "partition_dropped",
            Change::Created(..) => "table_created",
            Change::Widened(_) => "column_widened",
            Change::Renamed(..) => "table_renamed",
            Change::TableDropped(_) => "table_dropped",
            Change::ColumnRenamed { .. } => "column_renamed",
            Change::EnumValue(_) => "enum_value_added",
            Change::Altered(_) => "column_altered",
            Change::Constrained(_) => "constraint_changed",
            Change::Columns { added, .. } if !added.is_empty() => "columns_added",
            Change::Columns { .. } => "columns_dropped",
        }
    }

    /// Partition maintenance (`sync.follow_partitions`), or another change
    /// of the schema (`sync.follow_schema_changes`).
    pub fn is_partition_maintenance(&self) -> bool {
        matches!(
            self,
            Change::Attached(..) | Change::Detached(..) | Change::Dropped(_)
        )
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Attached(_, t) => write!(f, "partition {} attached", t.display_name()),
            Change::Detached(_, t) => write!(f, "partition {} detached", t.display_name()),
            Change::Dropped(t) => write!(f, "partition {} dropped", t.display_name()),
            Change::Created(_, t) => write!(f, "table {} created", t.display_name()),
            Change::EnumValue(statement) => write!(f, "enum value added ({statement})"),
            Change::Altered(a) => write!(
                f,
                "table {}: column {} {}",
                a.table.display_name(),
                a.column,
                a.action
            ),
            Change::Constrained(c) => write!(f, "table {}: {}", c.table.display_name(), c.action),
            Change::Renamed(_, from, to) => {
                write!(
                    f,
                    "table {} renamed to {}",
                    from.display_name(),
                    to.display_name()
                )
            }
            Change::TableDropped(t) => write!(f, "table {} dropped", t.display_name()),
            Change::ColumnRenamed { table, from, to, .. } => {
                write!(f, "table {}: column {from} renamed to {to}", table.display_name())
            }
            Change::Widened(w) => write!(
                f,
                "table {}: column {} widened to {}",
                w.table.display_name(),
                w.column,
                w.to
            ),
            Change::Columns {
                table,
                added,
                dropped,
                ..
            } => {
                if !added.is_empty() {
                    write!(
                        f,
                        "table {}: column(s) {} added",
                        table.display_name(),
                        added.join(", ")
                    )
                } else {
                    write!(
                        f,
                        "table {}: column(s) {} dropped",
                        table.display_name(),
                        dropped.join(", ")
                    )
                }
            }
        }
    }
}

/// What a follow repeated on the target.
#[derive(Debug, Default)]
pub struct Followed(pub Vec<Change>);

impl Followed {
    /// Partition maintenance, and the other changes, as the reports name
    /// them.
    pub fn split(self) -> (Vec<String>, Vec<String>) {
        let (partitions, others): (Vec<Change>, Vec<Change>) =
            self.0.into_iter().partition(Change::is_partition_maintenance);
        let names = |v: Vec<Change>| v.iter().map(ToString::to_string).collect();
        (names(partitions), names(others))
    }
}

/// The changes between `registered` and `current` when every one of them
/// is partition maintenance sync can repeat; `None` when some is not (or
/// nothing changed).
pub fn plan(registered: &[TableState], current: &[SourceTable]) -> Option<Vec<Change>> {
    let captured_root = |root: u32| registered.iter().any(|t| t.relid == root);
    let exists = |relid: u32| current.iter().any(|c| c.relid == relid);
    let leaf_partition = |c: &SourceTable| {
        c.lock_relid != c.relid && !c.partitioned && c.parent_relid.is_none() && !c.multiple_inheritance
    };
    let mut changes = Vec::new();
    let mut member_columns = Vec::new();
    for t in registered {
        let was_leaf_partition = t.lock_relid != t.relid && !t.partitioned && t.parent_relid.is_none();
        match current.iter().find(|c| c.relid == t.relid) {
            None if was_leaf_partition && exists(t.lock_relid) => {
                changes.push(Change::Dropped(t.table.clone()))
            }
            None if t.lock_relid == t.relid && t.parent_relid.is_none() && !t.partitioned => {
                changes.push(Change::TableDropped(t.table.clone()))
            }
            None => return None,
            Some(c) if c.partitioned != t.partitioned => return None,
            Some(c) if c.table != t.table => {
                // Renamed, and nothing else about it changed.
                let of_its_own = t.lock_relid == t.relid && t.parent_relid.is_none() && !t.partitioned;
                let same = c.lock_relid == t.lock_relid
                    && c.parent_relid == t.parent_relid
                    && c.copy_columns == t.copy_columns
                    && (t.copy_only || c.key_columns.as_ref() == Some(&t.key_columns));
                if !of_its_own || !same {
                    return None;
                }
                changes.push(Change::Renamed(t.relid, t.table.clone(), c.table.clone()));
            }
            Some(c) if c.lock_relid == t.lock_relid && c.parent_relid == t.parent_relid => {
                if !t.copy_only && c.key_columns.as_ref() != Some(&t.key_columns) && !key_renamed(t, c) {
                    return None;
                }
                if c.copy_columns != t.copy_columns {
                    // A hierarchy's root before its members: what it gains
                    // or loses, they do with it.
                    let member = t.lock_relid != t.relid || t.parent_relid.is_some();
                    if member { &mut member_columns } else { &mut changes }.extend(columns(t, c)?);
                }
            }
            Some(c) if c.copy_columns != t.copy_columns => return None,
            Some(c) if was_leaf_partition && c.lock_relid == c.relid && c.parent_relid.is_none() => {
                changes.push(Change::Detached(t.relid, t.table.clone()))
            }
            Some(c) if t.lock_relid == t.relid && t.parent_relid.is_none() && leaf_partition(c) => {
                if !captured_root(c.lock_relid) {
                    return None;
                }
                changes.push(Change::Attached(c.relid, c.table.clone()))
            }
            Some(_) => return None,
        }
    }
    for c in current
        .iter()
        .filter(|c| !registered.iter().any(|t| t.relid == c.relid))
    {
        c.key_columns.as_ref()?;
        let of_its_own = c.lock_relid == c.relid && c.parent_relid.is_none() && !c.partitioned;
        if of_its_own && !c.multiple_inheritance {
            changes.push(Change::Created(c.relid, c.table.clone()));
            continue;
        }
        if !leaf_partition(c) || !captured_root(c.lock_relid) {
            return None;
        }
        changes.push(Change::Attached(c.relid, c.table.clone()));
    }
    changes.append(&mut member_columns);
    (!changes.is_empty()).then_some(changes)
}

/// Whether `c`'s key is `t`'s with key columns renamed in their places
/// (and nothing else about the columns changed, when the registration
/// does not have their attribute numbers).
fn key_renamed(t: &TableState, c: &SourceTable) -> bool {
    let Some(changes) = columns(t, c) else {
        return false;
    };
    let mut key = t.key_columns.clone();
    let mut renamed = false;
    for change in &changes {
        match change {
            Change::ColumnRenamed { from, to, .. } => {
                for k in key.iter_mut().filter(|k| *k == from) {
                    *k = to.clone();
                    renamed = true;
                }
            }
            Change::Columns { dropped, .. } if dropped.iter().any(|d| t.key_columns.contains(d)) => {
                return false
            }
            _ => {}
        }
    }
    renamed && c.key_columns.as_ref() == Some(&key)
}

/// The columns `c` gained, lost or renamed since `t` was registered. By
/// their attribute numbers where the registration has them: a number kept
/// under a new name is a rename, one gone a drop, a new one an addition,
/// all followed in one deploy (drops, then renames, then additions).
/// Otherwise by names: only added (after every registered one, in the
/// source's order), only dropped (the others in their order), or one name
/// changed in its place; `None` for anything else.
fn columns(t: &TableState, c: &SourceTable) -> Option<Vec<Change>> {
    match &t.attnums {
        Some(numbers)
            if numbers.len() == t.copy_columns.len() && c.copy_attnums.len() == c.copy_columns.len() =>
        {
            Some(columns_by_number(t, numbers, c))
        }
        _ => columns_by_name(t, c).map(|change| vec![change]),
    }
}

/// [`columns`] with the registered columns' attribute `numbers`.
fn columns_by_number(t: &TableState, numbers: &[i16], c: &SourceTable) -> Vec<Change> {
    let now = |number: &i16| {
        c.copy_attnums
            .iter()
            .position(|n| n == number)
            .map(|i| &c.copy_columns[i])
    };
    let mut dropped = Vec::new();
    let mut renamed = Vec::new();
    for (name, number) in t.copy_columns.iter().zip(numbers) {
        match now(number) {
            Some(same) if same == name => {}
            Some(other) => renamed.push((name.clone(), other.clone())),
            None => dropped.push(name.clone()),
        }
    }
    let added: Vec<String> = c
        .copy_columns
        .iter()
        .zip(&c.copy_attnums)
        .filter(|(_, n)| !numbers.contains(n))
        .map(|(name, _)| name.clone())
        .collect();
    let mut changes = Vec::new();
    if !dropped.is_empty() {
        changes.push(Change::Columns {
            relid: t.relid,
            table: t.table.clone(),
            added: Vec::new(),
            now: t
                .copy_columns
                .iter()
                .filter(|x| !dropped.contains(x))
                .cloned()
                .collect(),
            dropped,
        });
    }
    for (from, to) in renamed {
        changes.push(Change::ColumnRenamed {
            relid: t.relid,
            table: t.table.clone(),
            from,
            to,
            by_number: true,
        });
    }
    if !added.is_empty() {
        changes.push(Change::Columns {
            relid: t.relid,
            table: t.table.clone(),
            added,
            dropped: Vec::new(),
            now: c.copy_columns.clone(),
        });
    }
    changes
}

/// [`columns`] by names alone (a registration older than control schema 21
/// whose columns have changed since).
fn columns_by_name(t: &TableState, c: &SourceTable) -> Option<Change> {
    let kept: Vec<&String> = t
        .copy_columns
        .iter()
        .filter(|x| c.copy_columns.contains(x))
        .collect();
    let dropped: Vec<String> = t
        .copy_columns
        .iter()
        .filter(|x| !c.copy_columns.contains(x))
        .cloned()
        .collect();
    let added: Vec<String> = c
        .copy_columns
        .iter()
        .filter(|x| !t.copy_columns.contains(x))
        .cloned()
        .collect();
    if let ([from], [to]) = (dropped.as_slice(), added.as_slice()) {
        // One name changed in its place: a rename (checked against the
        // source's dropped columns before it is followed). A key column's
        // too: the capture functions are made again to name it.
        let place = |cols: &[String], name: &String| cols.iter().position(|x| x == name);
        let renamed = t.copy_columns.len() == c.copy_columns.len()
            && place(&t.copy_columns, from) == place(&c.copy_columns, to);
        return renamed.then(|| Change::ColumnRenamed {
            relid: t.relid,
            table: t.table.clone(),
            from: from.clone(),
            to: to.clone(),
            by_number: false,
        });
    }
    let in_order = c.copy_columns.iter().take(kept.len()).eq(kept.iter().copied());
    if !in_order || (added.is_empty() == dropped.is_empty()) {
        return None;
    }
    Some(Change::Columns {
        relid: t.relid,
        table: t.table.clone(),
        added,
        dropped,
        now: c.copy_columns.clone(),
    })
}

/// Follows the source's schema changes when the drift is only what sync
/// can follow and `sync.follow_partitions` and `sync.follow_schema_changes`
/// allow; returns what it followed, or `None` when sync must stop on the
/// drift instead.
pub async fn drift(m: &Migration, cancel: &CancellationToken) -> Result<Option<Vec<Change>>, crate::Error> {
    // A fork given as `copy.from` lacks what the source created since.
    if !(m.cfg.sync.follow_partitions || m.cfg.sync.follow_schema_changes) || m.reads_elsewhere() {
        return Ok(None);
    }
    let _one_at_a_time = lock(m, cancel).await?;
    let read = pending(m).await?;
    if read.drift.is_empty() {
        tracing::info!("Another agent followed the source's partition maintenance");
        return Ok(Some(Vec::new()));
    }
    let Pending {
        follow: Some(changes),
        current,
        ..
    } = read
    else {
        return Ok(None);
    };
    let allowed = |c: &Change| {
        if c.is_partition_maintenance() {
            m.cfg.sync.follow_partitions
        } else {
            m.cfg.sync.follow_schema_changes
        }
    };
    if !changes.iter().all(allowed) {
        return Ok(None);
    }
    // Each step's seconds, for the log: the drain waits for all of them.
    let mut mark = std::time::Instant::now();
    let mut lap = move || {
        let secs = mark.elapsed().as_secs_f64();
        mark = std::time::Instant::now();
        secs
    };
    // The types a table created or a column added uses, first.
    let needing: Vec<u32> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Created(relid, _) => Some(*relid),
            Change::Columns { relid, added, .. } if !added.is_empty() => Some(*relid),
            _ => None,
        })
        .collect();
    new_types::create_missing(m, &needing).await?;
    for change in &changes {
        tracing::info!(%change, "Following the source's schema change on the target");
        match change {
            Change::Attached(relid, table) => attach(m, *relid, table).await?,
            Change::Detached(_, table) => detach(m, table).await?,
            Change::Dropped(table) => drop_partition(m, table).await?,
            Change::Created(_, table) => create(m, table).await?,
            Change::Renamed(relid, from, to) => rename_table(m, *relid, from, to).await?,
            Change::TableDropped(table) => drop_table(m, table).await?,
            Change::ColumnRenamed {
                relid,
                table,
                from,
                to,
                by_number,
            } => columns::rename(m, *relid, table, from, to, *by_number).await?,
            // Found by `types` and `enum_values`, not by the registrations' drift.
            Change::Widened(_) | Change::EnumValue(_) | Change::Altered(_) | Change::Constrained(_) => {}
            Change::Columns {
                relid,
                table,
                added,
                dropped,
                now,
            } => columns::follow(m, *relid, table, added, dropped, now).await?,
        }
        crate::telemetry::schema_change_followed(change.kind());
        crate::failpoint::hit("follow.target_done").await;
    }
    // A type the same deploy widened: before the copy, whose binary rows
    // the target's old type would refuse.
    let registered = crate::control::state::tables(&**m.source_conn().await?).await?;
    let mut changes = changes;
    for w in retype::follow(m, &registered, cancel).await? {
        let change = Change::Widened(w);
        tracing::info!(%change, "Followed the source's schema change on the target");
        crate::telemetry::schema_change_followed(change.kind());
        changes.push(change);
    }
    let target_secs = lap();
    crate::plan::preflight_for(m, true).await?;
    let preflight_secs = lap();
    // What the source did since that reading is the next follow's: its
    // tables are not on the target yet.
    crate::capture::install_as(m, cancel, crate::capture::Seen::Then(current)).await?;
    let install_secs = lap();
    crate::copy::run(m, cancel).await?;
    let copy_secs = lap();
    // Never the same steps over and over.
    let again = pending(m).await?;
    if again.follow.as_ref() == Some(&changes) {
        return Err(SyncError::SchemaDrift(again.drift).into());
    }
    tracing::info!(
        target_secs,
        preflight_secs,
        install_secs,
        copy_secs,
        "Followed on the target"
    );
    Ok(Some(changes))
}

/// Follows the column types the source widened (see [`retype`]); fails
/// with the statements to run by hand on any other type change. Returns
/// what it widened (nothing when another agent did it first).
pub async fn types(m: &Migration, cancel: &CancellationToken) -> Result<Vec<Change>, crate::Error> {
    if m.reads_elsewhere() {
        // The fork's types are not the source's to compare.
        return Ok(Vec::new());
    }
    let _one_at_a_time = lock(m, cancel).await?;
    let tables = crate::control::state::tables(&**m.source_conn().await?).await?;
    let widened = retype::follow(m, &tables, cancel).await?;
    let changes: Vec<Change> = widened.into_iter().map(Change::Widened).collect();
    for change in &changes {
        tracing::info!(%change, "Followed the source's schema change on the target");
        crate::telemetry::schema_change_followed(change.kind());
    }
    Ok(changes)
}

/// Makes the target's column defaults and NOT NULL the source's (see
/// [`attributes`]), and its CHECK constraints, and the indexes and unique
/// constraints the source dropped (see [`constraints`]); returns what it
/// changed.
pub async fn attributes(m: &Migration, cancel: &CancellationToken) -> Result<Vec<Change>, crate::Error> {
    if !m.cfg.sync.follow_schema_changes || m.reads_elsewhere() {
        return Ok(Vec::new());
    }
    let tables = crate::control::state::tables(&**m.source_conn().await?).await?;
    // Read first: the lock takes a session of its own.
    if !attributes::differ(m, &tables).await?
        && !constraints::differ(m, &tables).await?
        && !generated::differ(m, &tables).await?
    {
        return Ok(Vec::new());
    }
    let _one_at_a_time = lock(m, cancel).await?;
    // Generated columns first, which a CHECK may name; constraints next: a
    // CHECK the source dropped may be what a NOT NULL or a default of its
    // needs gone.
    let mut changes: Vec<Change> = generated::follow(m, &tables)
        .await?
        .into_iter()
        .map(Change::Altered)
        .collect();
    changes.extend(
        constraints::follow(m, &tables)
            .await?
            .into_iter()
            .map(Change::Constrained),
    );
    changes.extend(
        attributes::follow(m, &tables)
            .await?
            .into_iter()
            .map(Change::Altered),
    );
    for change in &changes {
        tracing::info!(%change, "Followed the source's schema change on the target");
        crate::telemetry::schema_change_followed(change.kind());
    }
    Ok(changes)
}

/// The registered tables as the drift check's comparisons read them on
/// both sides (defaults and NOT NULL, constraints, generated columns):
/// roots of hierarchies first (what a root gains or loses on the target,
/// its members do with it), numbered from 1 in that order.
struct RootsFirst<'a> {
    tables: Vec<&'a TableState>,
    /// Their source OIDs, for [`SOURCE_TABLES`].
    relids: Vec<u32>,
    /// Their names, for [`TARGET_TABLES`].
    names: Vec<String>,
}

impl<'a> RootsFirst<'a> {
    fn of(tables: &'a [TableState]) -> Self {
        let mut tables: Vec<&TableState> = tables.iter().collect();
        tables.sort_by_key(|t| t.lock_relid != t.relid || t.parent_relid.is_some());
        let relids = tables.iter().map(|t| t.relid).collect();
        let names = tables.iter().map(|t| t.table.to_string()).collect();
        Self {
            tables,
            relids,
            names,
        }
    }

    /// The table a reading numbered `i`.
    fn table(&self, i: i64) -> &QualifiedTable {
        &self.tables[(i - 1) as usize].table
    }
}

/// The `(i, oid)` pairs of a reading on the source, from `$1` (the OIDs).
const SOURCE_TABLES: &str = "SELECT i, rel FROM unnest($1::oid[]) WITH ORDINALITY u(rel, i)";

/// The `(i, oid)` pairs of a reading on the target, from `$1` (the names).
const TARGET_TABLES: &str = "SELECT i, to_regclass(name) FROM unnest($1::text[]) WITH ORDINALITY u(name, i)";

/// What [`read_both`] read.
struct BothSides<'a> {
    tables: RootsFirst<'a>,
    ours: Vec<tokio_postgres::Row>,
    theirs: Vec<tokio_postgres::Row>,
    /// The target session read on, to make the changes with.
    target: deadpool_postgres::Object,
}

/// Reads `query` for `tables` on both sides: a catalog query over `x(i,
/// rel)`, which `{tables}` in it stands for (the tables roots first,
/// numbered from 1), run with names in expressions qualified. `what` names
/// the target's reading in its error.
async fn read_both<'a>(
    m: &Migration,
    tables: &'a [TableState],
    query: &str,
    what: &'static str,
) -> Result<BothSides<'a>, crate::Error> {
    async fn read(
        conn: &mut tokio_postgres::Client,
        sql: &str,
        param: &(dyn tokio_postgres::types::ToSql + Sync),
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let tx = conn.transaction().await?;
        tx.batch_execute("SET LOCAL search_path = pg_catalog").await?;
        let rows = tx.query(sql, &[param]).await?;
        tx.commit().await?;
        Ok(rows)
    }
    let tables = RootsFirst::of(tables);
    let ours = read(
        &mut *m.source_conn().await?,
        &query.replace("{tables}", SOURCE_TABLES),
        &tables.relids,
    )
    .await
    .map_err(SyncError::Catalog)?;
    let mut target = m.target_conn().await?;
    let theirs = read(
        &mut target,
        &query.replace("{tables}", TARGET_TABLES),
        &tables.names,
    )
    .await
    .map_err(|source| SyncError::Follow { what, source })?;
    Ok(BothSides {
        tables,
        ours,
        theirs,
        target,
    })
}

/// Runs `wanted`'s statements on the target in order; returns the changes
/// of those it took. One it refuses (a member whose root's change reached
/// it already, a row the drain has yet to bring up to date) is logged and
/// left for the next check.
async fn apply_each<C>(target: &tokio_postgres::Client, wanted: Vec<(C, String)>) -> Vec<C> {
    let mut done = Vec::new();
    for (change, sql) in wanted {
        match target.batch_execute(&sql).await {
            Ok(()) => done.push(change),
            Err(e) => tracing::debug!(
                statement = sql,
                error = %crate::db::errors::report(&e),
                "The target does not take the source's change (yet)"
            ),
        }
    }
    done
}

/// Adds on the target the values the source's enum types gained, each in
/// its place (`statements`, as the failed batch's diagnosis made them);
/// nothing needs copying: the rows that use them were refused, not applied.
pub async fn enum_values(
    m: &Migration,
    cancel: &CancellationToken,
    statements: &[String],
) -> Result<Vec<Change>, crate::Error> {
    let _one_at_a_time = lock(m, cancel).await?;
    let target = m.target_conn().await?;
    let mut changes = Vec::new();
    for statement in statements {
        // Another agent may have added it meanwhile.
        let with_guard = statement.replacen(" ADD VALUE ", " ADD VALUE IF NOT EXISTS ", 1);
        target
            .batch_execute(&with_guard)
            .await
            .map_err(target_err("adding an enum value"))?;
        let change = Change::EnumValue(statement.clone());
        tracing::info!(%change, "Followed the source's schema change on the target");
        crate::telemetry::schema_change_followed(change.kind());
        changes.push(change);
    }
    Ok(changes)
}

/// Takes the follow's lock, waiting while another agent holds it: two
/// agents syncing one migration met the same maintenance, both repeated
/// it on the target, and the second failed on the table the first had
/// made. A session of its own holds it, outside the pool, so that it goes
/// with the session whatever ends the follow; on the target, which the
/// application does not use yet, not to take one more of the source's
/// capped connections.
async fn lock(m: &Migration, cancel: &CancellationToken) -> Result<tokio_postgres::Client, crate::Error> {
    let session = m.target.connect().await?;
    let mut told = false;
    loop {
        let locked: bool = session
            .query_one("SELECT pg_try_advisory_lock($1, 0)", &[&FOLLOW_LOCK_CLASS])
            .await
            .map_err(target_err("taking the follow's lock"))?
            .get(0);
        if locked {
            return Ok(session);
        }
        if !told {
            tracing::info!("Another agent follows the source's partition maintenance: waiting for it");
            crate::failpoint::hit("follow.waiting").await;
            told = true;
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(crate::Error::Cancelled),
            () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
    }
}

/// The source's drift from the registrations, what of it to follow, and
/// the catalog it was read from.
struct Pending {
    /// Every change, as drift tells it.
    drift: Vec<String>,
    /// What to follow (`None` when some of it is not partition
    /// maintenance).
    follow: Option<Vec<Change>>,
    /// The source's tables as read.
    current: Vec<crate::plan::SourceTable>,
}

async fn pending(m: &Migration) -> Result<Pending, crate::Error> {
    let conn = m.source_conn().await?;
    let registered = crate::control::state::tables(&**conn).await?;
    let current = crate::plan::source_tables(&**conn, false)
        .await
        .map_err(SyncError::Catalog)?;
    let gaps = crate::plan::drift::CaptureGaps::read(&**conn)
        .await
        .map_err(SyncError::Catalog)?;
    let all = crate::plan::drift::changes(&registered, &current, &gaps);
    // A capture trigger dropped or bypassed is more than maintenance, but
    // for a table that joins or leaves a hierarchy, which is captured and
    // copied afresh anyway (a plain table's key column trigger does not
    // serve a partition).
    let follow = plan(&registered, &current).filter(|changes| {
        gaps.lost.iter().chain(&gaps.bypassed).all(|relid| {
            changes
                .iter()
                .any(|c| matches!(c, Change::Attached(r, _) | Change::Detached(r, _) if r == relid))
        })
    });
    Ok(Pending {
        drift: all,
        follow,
        current,
    })
}

fn target_err(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> SyncError {
    move |source| SyncError::Follow { what, source }
}

/// What the target's catalog says of `table` (the query's `$1`), when it
/// gives a row.
async fn about<T>(
    target: &tokio_postgres::Client,
    sql: &str,
    table: &QualifiedTable,
) -> Result<Option<T>, SyncError>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let row = target
        .query_opt(sql, &[&table.to_string()])
        .await
        .map_err(target_err("reading the target's catalog"))?;
    Ok(row.map(|r| r.get(0)))
}

/// Where a partition hangs on the source: its parent, its bound and its
/// partition constraint, read with every name qualified.
struct Placement {
    parent: QualifiedTable,
    bound: String,
    constraint: String,
}

async fn placement(m: &Migration, relid: u32) -> Result<Placement, crate::Error> {
    let mut conn = m.source_conn().await?;
    let tx = conn.transaction().await.map_err(SyncError::Catalog)?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .map_err(SyncError::Catalog)?;
    let row = tx
        .query_one(
            "SELECT n.nspname::text, p.relname::text, pg_get_expr(c.relpartbound, c.oid),
                    coalesce(pg_get_partition_constraintdef(c.oid), 'true')
               FROM pg_class c
               JOIN pg_inherits i ON i.inhrelid = c.oid
               JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_namespace n ON n.oid = p.relnamespace
              WHERE c.oid = $1",
            &[&relid],
        )
        .await
        .map_err(SyncError::Catalog)?;
    Ok(Placement {
        parent: QualifiedTable::new(row.get::<_, String>(0), row.get::<_, String>(1)),
        bound: row.get(2),
        constraint: row.get(3),
    })
}

/// Creates (unless it exists) and attaches (unless attached) a partition
/// on the target, its keys and indexes built first under the source's
/// names so that attaching adopts them.
async fn attach(m: &Migration, relid: u32, table: &QualifiedTable) -> Result<(), crate::Error> {
    let place = placement(m, relid).await?;
    let target = m.target_conn().await?;
    let found: Option<bool> = about(
        &target,
        "SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = c.oid) FROM pg_class c WHERE c.oid = to_regclass($1)",
        table,
    )
    .await?;
    crate::failpoint::hit("follow.target_read").await;
    if found == Some(true) {
        return Ok(());
    }
    if found.is_none() {
        // Attached below, once its indexes exist.
        restore_definition(m, table, "partition").await?;
    } else {
        // A captured table joining a hierarchy: its rows on the target may
        // be older than the source's, which the source's attach checked;
        // it is copied again anyway.
        target
            .batch_execute(&format!("TRUNCATE {table}"))
            .await
            .map_err(target_err("emptying the table to attach"))?;
    }
    let defs = crate::copy::indexes::read(m, &[relid]).await?;
    crate::copy::indexes::build(m, defs).await?;
    let default: Option<String> = about(
        &target,
        "SELECT partdefid::regclass::text FROM pg_partitioned_table
          WHERE partrelid = to_regclass($1) AND partdefid <> 0",
        &place.parent,
    )
    .await?;
    let mut sql = String::from("BEGIN;\n");
    if let Some(default) = default.filter(|_| place.bound != "DEFAULT") {
        // What the drain put there before the target had this partition.
        sql.push_str(&format!("DELETE FROM {default} WHERE {};\n", place.constraint));
    }
    sql.push_str(&format!(
        "ALTER TABLE {} ATTACH PARTITION {table} {};\nCOMMIT;",
        place.parent, place.bound
    ));
    let attached = target.batch_execute(&sql).await;
    if attached.is_err() {
        let _ = target.batch_execute("ROLLBACK").await;
    }
    attached.map_err(target_err("attaching the partition"))?;
    Ok(())
}

/// Creates `table` on the target from `pg_dump`'s definition of it (its
/// pre-data: the table, its defaults and the sequences it owns; never a
/// partition's ATTACH, which [`attach`] does once its indexes exist).
async fn restore_definition(m: &Migration, table: &QualifiedTable, what: &str) -> Result<(), crate::Error> {
    let tools = crate::schema::PgTools::locate(m.cfg.pg_bin_dir.as_deref()).await?;
    let dump = tools
        .dump_schema_of(
            &m.source,
            m.cfg.source_limits.lock_timeout_ms,
            false,
            std::slice::from_ref(table),
        )
        .await?;
    let entries: Vec<_> = tools
        .toc(&dump.archive, "pre-data")
        .await?
        .into_iter()
        .filter(|e| e.desc != "TABLE ATTACH")
        .collect();
    tools
        .restore_entries(&m.target, &dump.archive, &entries, what)
        .await?;
    Ok(())
}

/// Creates a table new on the source on the target, unless it is there
/// already; `install` then captures it and `copy` copies it, with its keys
/// and indexes (its foreign keys come at the cutover, as every table's).
async fn create(m: &Migration, table: &QualifiedTable) -> Result<(), crate::Error> {
    let target = m.target_conn().await?;
    let found: Option<bool> = about(
        &target,
        "SELECT true FROM pg_class WHERE oid = to_regclass($1)",
        table,
    )
    .await?;
    drop(target);
    if found.is_none() {
        restore_definition(m, table, "table").await?;
    }
    Ok(())
}

/// Renames (and moves) a table on the target as on the source, unless it
/// is done already, then its registration: nothing is captured or copied
/// again (capture names the table by OID).
async fn rename_table(
    m: &Migration,
    relid: u32,
    from: &QualifiedTable,
    to: &QualifiedTable,
) -> Result<(), crate::Error> {
    let target = m.target_conn().await?;
    let there: Option<bool> = about(
        &target,
        "SELECT true FROM pg_class WHERE oid = to_regclass($1)",
        from,
    )
    .await?;
    if there.is_some() {
        let mut sql = String::from("BEGIN;\n");
        let mut at = from.clone();
        if from.schema != to.schema {
            sql.push_str(&format!(
                "ALTER TABLE {from} SET SCHEMA {};\n",
                Ident(to.schema.clone())
            ));
            at = QualifiedTable::new(to.schema.clone(), from.name.clone());
        }
        if from.name != to.name {
            sql.push_str(&format!(
                "ALTER TABLE {at} RENAME TO {};\n",
                Ident(to.name.clone())
            ));
        }
        sql.push_str("COMMIT;");
        let renamed = target.batch_execute(&sql).await;
        if renamed.is_err() {
            let _ = target.batch_execute("ROLLBACK").await;
        }
        renamed.map_err(target_err("renaming the table"))?;
    }
    crate::control::state::rename_registration(&**m.source_conn().await?, relid, to).await?;
    Ok(())
}

/// Drops on the target a table the source dropped, unless it is gone
/// already; `install` then forgets it. A view of the target's that still
/// uses it (the source's went with it) makes the drop fail, and sync stop.
async fn drop_table(m: &Migration, table: &QualifiedTable) -> Result<(), crate::Error> {
    m.target_conn()
        .await?
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .await
        .map_err(target_err("dropping the table"))?;
    Ok(())
}

/// Detaches a partition on the target, unless it is detached already.
async fn detach(m: &Migration, table: &QualifiedTable) -> Result<(), crate::Error> {
    let target = m.target_conn().await?;
    let parent: Option<String> = about(
        &target,
        "SELECT inhparent::regclass::text FROM pg_inherits WHERE inhrelid = to_regclass($1)",
        table,
    )
    .await?;
    if let Some(parent) = parent {
        target
            .batch_execute(&format!("ALTER TABLE {parent} DETACH PARTITION {table}"))
            .await
            .map_err(target_err("detaching the partition"))?;
    }
    Ok(())
}

/// Drops a partition on the target, unless it is gone already. A table of
/// that name that is not a partition there is left alone, and sync stops.
async fn drop_partition(m: &Migration, table: &QualifiedTable) -> Result<(), crate::Error> {
    let target = m.target_conn().await?;
    let partition: Option<bool> = about(
        &target,
        "SELECT relispartition FROM pg_class WHERE oid = to_regclass($1)",
        table,
    )
    .await?;
    match partition {
        None => Ok(()),
        Some(true) => {
            target
                .batch_execute(&format!("DROP TABLE {table}"))
                .await
                .map_err(target_err("dropping the partition"))?;
            Ok(())
        }
        Some(false) => Err(SyncError::SchemaDrift(vec![format!(
            "partition {} was dropped on the source, and on the target it is no longer a partition: \
             drop it there if it should go, then run `pgferry install`",
            table.display_name()
        )])
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(relid: u32, name: &str, lock_relid: u32, partitioned: bool) -> SourceTable {
        SourceTable {
            relid,
            table: QualifiedTable::new("public", name),
            relkind: if partitioned { "p" } else { "r" }.into(),
            partitioned,
            multiple_inheritance: false,
            parent_relid: None,
            lock_relid,
            key_columns: Some(vec!["id".into()]),
            copy_columns: vec!["id".into(), "v".into()],
            copy_attnums: vec![1, 2],
            est_rows: 0,
            total_bytes: 0,
            can_trigger: true,
            can_select: true,
        }
    }

    fn registered(c: &SourceTable) -> TableState {
        TableState {
            id: c.relid as i32,
            relid: c.relid,
            table: c.table.clone(),
            key_columns: c.key_columns.clone().unwrap(),
            copy_columns: c.copy_columns.clone(),
            attnums: None,
            copy_state: crate::control::state::CopyState::Done,
            copied_rows: None,
            applied_rows: 0,
            lag_secs: None,
            copy_only: false,
            partitioned: c.partitioned,
            lock_relid: c.lock_relid,
            parent_relid: c.parent_relid,
            text_form: false,
        }
    }

    /// A root (1) with partitions 2 and 3, and a plain table 4.
    fn before() -> Vec<SourceTable> {
        vec![
            source(1, "events", 1, true),
            source(2, "events_1", 1, false),
            source(3, "events_2", 1, false),
            source(4, "plain", 4, false),
        ]
    }

    #[test]
    fn what_sync_follows_and_nothing_else() {
        let reg: Vec<TableState> = before().iter().map(registered).collect();
        assert_eq!(plan(&reg, &before()), None, "nothing changed");

        let mut now = before();
        now.push(source(5, "events_3", 1, false));
        now.retain(|c| c.relid != 2);
        now[1].lock_relid = 3; // events_2 detached: its own root
        now[2].lock_relid = 1; // plain attached
        assert_eq!(
            plan(&reg, &now),
            Some(vec![
                Change::Dropped(QualifiedTable::new("public", "events_1")),
                Change::Detached(3, QualifiedTable::new("public", "events_2")),
                Change::Attached(4, QualifiedTable::new("public", "plain")),
                Change::Attached(5, QualifiedTable::new("public", "events_3")),
            ])
        );

        let mut now = before();
        now.push(source(5, "other", 5, false));
        now[3].copy_columns.push("w".into());
        now[1].copy_columns.push("w".into());
        now[0].copy_columns.push("w".into());
        assert_eq!(
            plan(&reg, &now),
            Some(vec![
                Change::Columns {
                    relid: 1,
                    table: QualifiedTable::new("public", "events"),
                    added: vec!["w".into()],
                    dropped: vec![],
                    now: vec!["id".into(), "v".into(), "w".into()],
                },
                Change::Columns {
                    relid: 4,
                    table: QualifiedTable::new("public", "plain"),
                    added: vec!["w".into()],
                    dropped: vec![],
                    now: vec!["id".into(), "v".into(), "w".into()],
                },
                Change::Created(5, QualifiedTable::new("public", "other")),
                Change::Columns {
                    relid: 2,
                    table: QualifiedTable::new("public", "events_1"),
                    added: vec!["w".into()],
                    dropped: vec![],
                    now: vec!["id".into(), "v".into(), "w".into()],
                },
            ]),
            "a table created, a column added, the hierarchy's root before its partitions"
        );
        let mut now = before();
        now[3].copy_columns = vec!["key".into(), "v".into()];
        now[3].key_columns = Some(vec!["key".into()]);
        assert_eq!(
            plan(&reg, &now),
            Some(vec![Change::ColumnRenamed {
                relid: 4,
                table: QualifiedTable::new("public", "plain"),
                from: "id".into(),
                to: "key".into(),
                by_number: false,
            }]),
            "a key column renamed"
        );
        let mut now = before();
        now[3].copy_columns.retain(|c| c != "v");
        assert_eq!(
            plan(&reg, &now),
            Some(vec![Change::Columns {
                relid: 4,
                table: QualifiedTable::new("public", "plain"),
                added: vec![],
                dropped: vec!["v".into()],
                now: vec!["id".into()],
            }])
        );

        let mut now = before();
        now[3].copy_columns = vec!["id".into(), "w".into()];
        assert_eq!(
            plan(&reg, &now),
            Some(vec![Change::ColumnRenamed {
                relid: 4,
                table: QualifiedTable::new("public", "plain"),
                from: "v".into(),
                to: "w".into(),
                by_number: false,
            }]),
            "a column renamed in its place"
        );
        let mut now = before();
        now[3].table = QualifiedTable::new("app", "renamed");
        now.retain(|c| c.relid != 2);
        assert_eq!(
            plan(&reg, &now),
            Some(vec![
                Change::Dropped(QualifiedTable::new("public", "events_1")),
                Change::Renamed(
                    4,
                    QualifiedTable::new("public", "plain"),
                    QualifiedTable::new("app", "renamed")
                ),
            ])
        );
        let mut now = before();
        now.retain(|c| c.relid != 4);
        assert_eq!(
            plan(&reg, &now),
            Some(vec![Change::TableDropped(QualifiedTable::new("public", "plain"))])
        );

        let refused: [fn(&mut Vec<SourceTable>); 8] = [
            // A new partitioned table under the root (sub-partitions).
            |now| now.push(source(5, "events_3", 1, true)),
            // A new table without a key.
            |now| {
                let mut c = source(5, "other", 5, false);
                c.key_columns = None;
                now.push(c)
            },
            // A key column renamed and another key besides.
            |now| {
                now[3].copy_columns = vec!["key".into(), "v".into()];
                now[3].key_columns = Some(vec!["key".into(), "v".into()]);
            },
            // Columns reordered.
            |now| now[3].copy_columns = vec!["v".into(), "id".into()],
            // A new partition without a key.
            |now| {
                let mut c = source(5, "events_3", 1, false);
                c.key_columns = None;
                now.push(c)
            },
            // A partition renamed.
            |now| now[1].table = QualifiedTable::new("public", "events_one"),
            // The whole hierarchy dropped.
            |now| now.retain(|c| c.lock_relid != 1),
            // A key changed beside a new partition.
            |now| {
                now[3].key_columns = Some(vec!["v".into()]);
                now.push(source(5, "events_3", 1, false))
            },
        ];
        for change in refused {
            let mut now = before();
            change(&mut now);
            assert_eq!(plan(&reg, &now), None, "{now:?}");
        }
    }

    /// With the registered columns' attribute numbers, one deploy that
    /// drops a column, renames another (into the dropped one's name) and
    /// adds two (one under the renamed one's old name) is told apart: the
    /// drop first, the rename next, the additions last.
    #[test]
    fn columns_told_apart_by_their_numbers() {
        let mut plain = source(4, "plain", 4, false);
        plain.copy_columns = vec!["id".into(), "a".into(), "b".into()];
        plain.copy_attnums = vec![1, 2, 3];
        let mut reg = registered(&plain);
        reg.attnums = Some(vec![1, 2, 3]);
        // a dropped (2 gone), b renamed to a (3 kept), b and c added (5 and
        // 6: 4 was a column added and dropped again meanwhile).
        let mut now = plain;
        now.copy_columns = vec!["id".into(), "a".into(), "b".into(), "c".into()];
        now.copy_attnums = vec![1, 3, 5, 6];
        let table = QualifiedTable::new("public", "plain");
        let by_number = plan(std::slice::from_ref(&reg), &[now.clone()]);
        assert_eq!(
            by_number,
            Some(vec![
                Change::Columns {
                    relid: 4,
                    table: table.clone(),
                    added: vec![],
                    dropped: vec!["a".into()],
                    now: vec!["id".into(), "b".into()],
                },
                Change::ColumnRenamed {
                    relid: 4,
                    table: table.clone(),
                    from: "b".into(),
                    to: "a".into(),
                    by_number: true,
                },
                Change::Columns {
                    relid: 4,
                    table,
                    added: vec!["b".into(), "c".into()],
                    dropped: vec![],
                    now: vec!["id".into(), "a".into(), "b".into(), "c".into()],
                },
            ])
        );
        // By names alone the same columns read as `c` added and nothing
        // else, which would keep the old `a` and `b` values under those
        // names: why the numbers are registered.
        reg.attnums = None;
        assert_ne!(plan(&[reg], &[now]), by_number);
    }
}
