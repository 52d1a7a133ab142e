//! The control schema (`pgferry` on the source): its SQL under `sql/`, the
//! upgrade that applies it ([`ensure_schema`]), and its accessors
//! ([`state`]).
//!
//! The versioned files under `sql/` are embedded in the binary and applied
//! in order, each in one transaction with `search_path` pinned to the
//! control schema (docs/design.md, "Dependency choices", says why this is
//! not an off-the-shelf migration runner).

use tokio_postgres::GenericClient;

use crate::db::ident::Ident;
use state::{q, StateError};

pub mod state;

/// The control schema's name.
pub const SCHEMA: &str = "pgferry";

/// Versioned control-schema migrations, applied in order.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("sql/0001_control.sql")),
    (2, include_str!("sql/0002_switch_marker.sql")),
    (3, include_str!("sql/0003_copy_only.sql")),
    (4, include_str!("sql/0004_partitions.sql")),
    (5, include_str!("sql/0005_inheritance.sql")),
    (6, include_str!("sql/0006_copy_parts.sql")),
    (7, include_str!("sql/0007_cheaper_capture.sql")),
    (8, include_str!("sql/0008_qualified_capture.sql")),
    (9, include_str!("sql/0009_key_change_trigger.sql")),
    (10, include_str!("sql/0010_fence_in_bodies.sql")),
    (11, include_str!("sql/0011_keys_only_deltas.sql")),
    (12, include_str!("sql/0012_trigger_stamps.sql")),
    (13, include_str!("sql/0013_drain_pass.sql")),
    (14, include_str!("sql/0014_cheaper_fence.sql")),
    (15, include_str!("sql/0015_moved_fence.sql")),
];

/// True when the control schema exists on this database.
pub async fn exists(client: &impl GenericClient) -> Result<bool, StateError> {
    let row = client
        .query_one(
            "SELECT to_regclass(format('%I.run', $1::text)) IS NOT NULL",
            &[&SCHEMA],
        )
        .await
        .map_err(q("look for the control schema"))?;
    Ok(row.get(0))
}

/// Creates the control schema if needed and applies missing migrations.
pub async fn ensure_schema(client: &mut tokio_postgres::Client) -> Result<(), StateError> {
    let tx = client.transaction().await.map_err(q("begin"))?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now());
         LOCK TABLE {schema}.schema_migrations IN EXCLUSIVE MODE;",
        schema = Ident(SCHEMA.into())
    ))
    .await
    .map_err(q("create the control schema"))?;
    let applied: Vec<i32> = tx
        .query(
            &format!("SELECT version FROM {}.schema_migrations", Ident(SCHEMA.into())),
            &[],
        )
        .await
        .map_err(q("read applied migrations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(&found) = applied.iter().max() {
        if found > known {
            return Err(StateError::TooNew { found, known });
        }
    }
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        tx.batch_execute(&format!(
            "SET LOCAL search_path = {}, pg_catalog",
            Ident(SCHEMA.into())
        ))
        .await
        .map_err(q("pin search_path"))?;
        tx.batch_execute(sql)
            .await
            .map_err(q("apply a control-schema migration"))?;
        tx.execute(
            &format!(
                "INSERT INTO {}.schema_migrations (version) VALUES ($1)",
                Ident(SCHEMA.into())
            ),
            &[version],
        )
        .await
        .map_err(q("record a migration"))?;
    }
    tx.commit().await.map_err(q("commit the control schema"))
}
