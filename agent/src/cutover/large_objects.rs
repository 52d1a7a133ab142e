//! Large objects, when `large_objects = true`: copied during the cutover,
//! with their OIDs, and verified.
//!
//! Large-object writes go through `pg_largeobject`, where no trigger can see
//! them, so they cannot be captured or fenced: the cutover copies them all
//! while table writes are fenced, and the application must not write large
//! objects during the cutover (`check` says so). Each object is compared by
//! md5 afterwards; a difference aborts the cutover like any other.

use serde::Serialize;

use super::CutoverError;
use crate::db::Migration;

/// What the copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LargeObjectReport {
    /// Objects copied.
    pub copied: usize,
    /// Bytes copied.
    pub bytes: i64,
    /// Objects removed from the target (not on the source).
    pub removed: usize,
}

/// Copies every large object of the source to the target, with its OID,
/// replacing what the target has under that OID.
pub async fn copy_all(m: &Migration) -> Result<LargeObjectReport, crate::Error> {
    let source = m.source_conn().await?;
    let mut target = m.target_conn().await?;
    let src_oids: Vec<u32> = source
        .query("SELECT oid FROM pg_largeobject_metadata ORDER BY oid", &[])
        .await
        .map_err(CutoverError::Source)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut report = LargeObjectReport::default();
    let tx = target.transaction().await.map_err(CutoverError::Target)?;
    // Objects the source no longer has.
    report.removed = tx
        .execute(
            "SELECT lo_unlink(oid) FROM pg_largeobject_metadata WHERE oid <> ALL ($1::oid[])",
            &[&src_oids],
        )
        .await
        .map_err(CutoverError::Target)? as usize;
    for oid in &src_oids {
        // One object at a time: memory holds one object, not all of them.
        let data: Vec<u8> = source
            .query_one("SELECT lo_get($1)", &[oid])
            .await
            .map_err(CutoverError::Source)?
            .get(0);
        tx.execute(
            "SELECT lo_unlink($1) FROM pg_largeobject_metadata WHERE oid = $1",
            &[oid],
        )
        .await
        .map_err(CutoverError::Target)?;
        tx.execute("SELECT lo_from_bytea($1, $2)", &[oid, &data])
            .await
            .map_err(CutoverError::Target)?;
        report.copied += 1;
        report.bytes += data.len() as i64;
    }
    tx.commit().await.map_err(CutoverError::Target)?;
    Ok(report)
}

/// The objects that differ between source and target (OID and why).
pub async fn differences(m: &Migration) -> Result<Vec<String>, crate::Error> {
    let q = "SELECT oid, md5(lo_get(oid)) FROM pg_largeobject_metadata ORDER BY oid";
    let (source, target) = (m.source_conn().await?, m.target_conn().await?);
    let read = |rows: Vec<tokio_postgres::Row>| -> std::collections::BTreeMap<u32, String> {
        rows.iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let a = read(source.query(q, &[]).await.map_err(CutoverError::Source)?);
    let mut b = read(target.query(q, &[]).await.map_err(CutoverError::Target)?);
    let mut out = Vec::new();
    for (oid, sum) in &a {
        match b.remove(oid) {
            Some(s) if &s == sum => {}
            Some(_) => out.push(format!("large object {oid} differs")),
            None => out.push(format!("large object {oid} missing on target")),
        }
    }
    out.extend(
        b.into_keys()
            .map(|oid| format!("large object {oid} only on target")),
    );
    Ok(out)
}
