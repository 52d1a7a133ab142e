//! Moving rows between the two databases, shared by the copy, the drain,
//! the verification and the extensions' configuration: the COPY [`pump`],
//! keys staged on the target ([`stage_keys`]), and the settings of a
//! loading transaction ([`set_loading`], [`pin_names`]).

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};

use crate::control::state::TableState;
use crate::db::Migration;

/// Writes to the target are batched to this size: sending each chunk on as
/// it arrives from the source cost a third of the throughput.
const COPY_BATCH_BYTES: usize = 256 * 1024;

/// Sets the loading session's TOAST compression (`copy.toast_compression`)
/// for the current transaction; lz4 only where the target has it.
pub async fn set_loading(
    m: &Migration,
    tx: &tokio_postgres::Transaction<'_>,
) -> Result<(), tokio_postgres::Error> {
    let method = match m.cfg.copy.toast_compression {
        crate::config::ToastCompression::Server => return Ok(()),
        crate::config::ToastCompression::Lz4 => "lz4",
        crate::config::ToastCompression::Pglz => "pglz",
    };
    tx.execute(
        "SELECT set_config('default_toast_compression', $1, true)
           FROM pg_settings WHERE name = 'default_toast_compression' AND $1 = ANY (enumvals)",
        &[&method],
    )
    .await
    .map(drop)
}

/// Which side of a [`pump`] failed.
#[derive(Debug)]
pub enum Pumped {
    /// Reading from the source.
    Source(tokio_postgres::Error),
    /// Writing to the target.
    Target(tokio_postgres::Error),
}

/// Streams a `COPY ... TO STDOUT` into a `COPY ... FROM STDIN`, batching the
/// writes, and returns (rows written, bytes streamed). No intermediate disk,
/// and memory bounded by one batch.
pub async fn pump(
    stream: tokio_postgres::CopyOutStream,
    sink: tokio_postgres::CopyInSink<bytes::Bytes>,
    throttle: &crate::db::throttle::Throttle,
    mut on_write: impl FnMut(usize),
) -> Result<(u64, u64), Pumped> {
    futures_util::pin_mut!(sink);
    futures_util::pin_mut!(stream);
    let mut buf = BytesMut::with_capacity(COPY_BATCH_BYTES);
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Pumped::Source)?;
        bytes += chunk.len() as u64;
        buf.extend_from_slice(&chunk);
        if buf.len() >= COPY_BATCH_BYTES {
            throttle.take(buf.len() as u64).await;
            on_write(buf.len());
            sink.send(buf.split().freeze()).await.map_err(Pumped::Target)?;
        }
    }
    if !buf.is_empty() {
        throttle.take(buf.len() as u64).await;
        on_write(buf.len());
        sink.send(buf.split().freeze()).await.map_err(Pumped::Target)?;
    }
    let rows = sink.finish().await.map_err(Pumped::Target)?;
    Ok((rows, bytes))
}

/// Stages keys on the target, in `ttx`: a temporary table `name`, dropped
/// at commit, with `table`'s `key_columns` (their types as on the target),
/// filled by binary COPY with the rows of `select` as `src` (a session, or
/// a batch's snapshot) sees them. The keys the drain applies, the
/// verification compares and a split copy removes all arrive this way.
/// Returns how many were staged.
///
/// `src` must be in a transaction: `select`'s DISTINCT or UNION is sorted
/// there, never hashed. The planner cannot count a delta's distinct keys (it
/// guesses a part's hash filter at 0.5% of the rows, a delta never analyzed
/// at 200 keys), and on such a guess it aggregates in two stages, hashed in
/// parallel workers and hashed again: 875,000 keys of a part took minutes
/// that way instead of 0.6 s sorted (a 10% backlog of a 5.5 GB table,
/// `docs/benchmarks.md`).
pub async fn stage_keys(
    src: &impl tokio_postgres::GenericClient,
    ttx: &tokio_postgres::Transaction<'_>,
    name: &str,
    table: &crate::db::ident::QualifiedTable,
    key_columns: &[String],
    select: &str,
) -> Result<u64, Pumped> {
    let keys = crate::db::ident::column_list(key_columns, None);
    ttx.batch_execute(&format!(
        "CREATE TEMP TABLE {name} ON COMMIT DROP AS SELECT {keys} FROM ONLY {table} WITH NO DATA"
    ))
    .await
    .map_err(Pumped::Target)?;
    // Binary COPY takes a value only as its column's own type: the keys are
    // sent as the target's types, whatever the delta's (a key type the
    // source widened, a delta column wider than the key: control schema 20).
    let types: Vec<String> = ttx
        .query_one(
            "SELECT array_agg(quote_ident(n.nspname) || '.' || quote_ident(ty.typname) ORDER BY a.attnum)
               FROM pg_attribute a
               JOIN pg_type ty ON ty.oid = a.atttypid
               JOIN pg_namespace n ON n.oid = ty.typnamespace
              WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped",
            &[&name],
        )
        .await
        .map_err(Pumped::Target)?
        .get(0);
    let cast = types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("s.c{i}::{ty}"))
        .collect::<Vec<_>>()
        .join(", ");
    let aliases = (0..types.len())
        .map(|i| format!("c{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    let select = format!("SELECT {cast} FROM ({select}) AS s({aliases})");
    let sink = ttx
        .copy_in(&format!("COPY {name} FROM STDIN (FORMAT binary)"))
        .await
        .map_err(Pumped::Target)?;
    let hashagg: String = src
        .query_one(
            "SELECT current_setting('enable_hashagg'), set_config('enable_hashagg', 'off', true)",
            &[],
        )
        .await
        .map_err(Pumped::Source)?
        .get(0);
    // Through the session itself, within `src`'s transaction.
    let stream = src
        .client()
        .copy_out(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        .await
        .map_err(Pumped::Source)?;
    let staged = pump(stream, sink, &crate::db::throttle::Throttle::unlimited(), |_| {})
        .await?
        .0;
    src.execute("SELECT set_config('enable_hashagg', $1, true)", &[&hashagg])
        .await
        .map_err(Pumped::Source)?;
    Ok(staged)
}

/// Copies `member`'s rows as `from` (a source transaction, or a batch's
/// snapshot) sees them, those matching `filter` (a WHERE clause, or nothing
/// for all), by COPY into `dest` in `to` (the same table on the other side,
/// or a staging table with its columns), at most as fast as `throttle` lets
/// bytes through. Returns the rows written.
pub async fn copy_rows(
    from: &tokio_postgres::Transaction<'_>,
    to: &tokio_postgres::Transaction<'_>,
    member: &TableState,
    dest: &str,
    filter: &str,
    throttle: &crate::db::throttle::Throttle,
) -> Result<u64, Pumped> {
    let cols = crate::db::ident::column_list(&member.copy_columns, None);
    let format = member.copy_format();
    let to_path = pin_names(to, member).await.map_err(Pumped::Target)?;
    let from_path = pin_names(from, member).await.map_err(Pumped::Source)?;
    let sink = to
        .copy_in(&format!("COPY {dest} ({cols}) FROM STDIN (FORMAT {format})"))
        .await
        .map_err(Pumped::Target)?;
    let stream = from
        .copy_out(&format!(
            "COPY (SELECT {cols} FROM {} {filter}) TO STDOUT (FORMAT {format})",
            member.rel()
        ))
        .await
        .map_err(Pumped::Source)?;
    let written = pump(stream, sink, throttle, |_| {}).await?.0;
    unpin_names(to, to_path).await.map_err(Pumped::Target)?;
    unpin_names(from, from_path).await.map_err(Pumped::Source)?;
    Ok(written)
}

/// For a table moved in text form ([`TableState::text_form`]): reg* values
/// are printed and read schema-qualified, as pg_dump moves them with an
/// empty `search_path`, so a name means the same object on both sides
/// whatever each role's `search_path`. For the rest of `tx`, or until
/// [`unpin_names`]; returns the setting it replaced.
pub async fn pin_names(
    tx: &tokio_postgres::Transaction<'_>,
    t: &TableState,
) -> Result<Option<String>, tokio_postgres::Error> {
    if !t.text_form {
        return Ok(None);
    }
    let row = tx
        .query_one(
            "SELECT current_setting('search_path'), set_config('search_path', 'pg_catalog', true)",
            &[],
        )
        .await?;
    Ok(Some(row.get(0)))
}

/// Puts back what [`pin_names`] replaced.
pub async fn unpin_names(
    tx: &tokio_postgres::Transaction<'_>,
    previous: Option<String>,
) -> Result<(), tokio_postgres::Error> {
    if let Some(previous) = previous {
        tx.execute("SELECT set_config('search_path', $1, true)", &[&previous])
            .await?;
    }
    Ok(())
}
