//! The control schema (`pgferry` on the source): its SQL under `sql/`, the
//! upgrade that applies it ([`ensure_schema`]), and its accessors
//! ([`state`]).
//!
//! The files under `sql/` are embedded in the binary and applied in one
//! transaction with `search_path` pinned to the control schema: the
//! versioned ones (tables, data, and why each change was made) in order,
//! once each; then `functions.sql`, every control function as it is now,
//! whenever it differs from the copy last applied. docs/design.md
//! ("Dependency choices") says why this is not an off-the-shelf runner.

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
    (16, include_str!("sql/0016_functions_in_one_file.sql")),
    (17, include_str!("sql/0017_fallback.sql")),
    (18, include_str!("sql/0018_reverse_lag.sql")),
    (19, include_str!("sql/0019_switched_back.sql")),
    (20, include_str!("sql/0020_key_release.sql")),
    (21, include_str!("sql/0021_column_places.sql")),
];

/// Every control function as it is now, re-applied after the versioned
/// files whenever it differs from the copy last applied (see the file's
/// header).
const FUNCTIONS: (&str, &str) = ("functions.sql", include_str!("sql/functions.sql"));

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
        apply_file(&tx, sql, "apply a control-schema migration").await?;
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
    let (name, sql) = FUNCTIONS;
    let stale: bool = tx
        .query_one(
            &format!(
                "SELECT NOT EXISTS (SELECT 1 FROM {}.repeatable
                                     WHERE name = $1 AND checksum = encode(sha256(convert_to($2, 'UTF8')), 'hex'))",
                Ident(SCHEMA.into())
            ),
            &[&name, &sql],
        )
        .await
        .map_err(q("read the applied functions"))?
        .get(0);
    if stale {
        apply_file(&tx, sql, "apply the control functions").await?;
        // The capturing bodies are made by `capture_functions`: made again
        // with it as it is now, unless the fence is up (then they refuse,
        // and lifting it makes them again).
        tx.batch_execute(
            "SELECT fence_apply(false, false) WHERE coalesce(pg_sequence_last_value('fence'), 0) = 0",
        )
        .await
        .map_err(q("make the capture functions again"))?;
        tx.execute(
            &format!(
                "INSERT INTO {}.repeatable (name, checksum)
                 VALUES ($1, encode(sha256(convert_to($2, 'UTF8')), 'hex'))
                 ON CONFLICT (name) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()",
                Ident(SCHEMA.into())
            ),
            &[&name, &sql],
        )
        .await
        .map_err(q("record the applied functions"))?;
    }
    tx.commit().await.map_err(q("commit the control schema"))
}

/// Runs `sql`, a file of the control schema, in `tx` with `search_path`
/// pinned to the control schema (again for each file: one may change it).
async fn apply_file(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    what: &'static str,
) -> Result<(), StateError> {
    tx.batch_execute(&format!(
        "SET LOCAL search_path = {}, pg_catalog",
        Ident(SCHEMA.into())
    ))
    .await
    .map_err(q("pin search_path"))?;
    tx.batch_execute(sql).await.map_err(q(what))
}
