//! What is left to drain: each table's delta rows.

use super::SyncError;
use crate::control::state::TableState;

/// What is pending on the source: each table's delta rows and TRUNCATEs
/// still to apply, read in one round trip of one statement per table. One
/// `UNION ALL` over every delta table was planned anew each time, and its
/// planning grows faster than the tables: 1.4 s for 2,000 of them, against
/// 40 ms as separate statements.
pub struct Pending {
    /// `now()` of the reading transaction: every count below was read in a
    /// snapshot taken after it, so a table with nothing pending was in sync
    /// as of then (consumed deltas are removed only after the target commit).
    /// 0 (1970, the largest lag) if it could not be read.
    pub as_of: f64,
    /// Delta rows per table id (up to the limit asked for).
    rows: std::collections::HashMap<i32, i64>,
    /// TRUNCATE markers per table id.
    truncates: std::collections::HashMap<i32, i64>,
}

impl Pending {
    /// Reads what is pending for `tables`, counting at most `limit` delta
    /// rows of each (all of them without one). Their delta tables must exist.
    pub async fn read(
        client: &tokio_postgres::Client,
        tables: &[&TableState],
        limit: Option<i64>,
    ) -> Result<Pending, tokio_postgres::Error> {
        let limit = limit.map_or(String::new(), |n| format!(" LIMIT {n}"));
        // Each statement gets its own snapshot, after the first one's now()
        // (in READ COMMITTED; in REPEATABLE READ they share the first one).
        let mut sql = String::from(
            "SELECT 'e', 0, extract(epoch FROM now())::float8;
             SELECT 't', table_id, count(*) FROM pgferry.truncates GROUP BY table_id;",
        );
        for t in tables {
            sql.push_str(&format!(
                "SELECT 'd', {}, count(*) FROM (SELECT FROM {}{limit}) d;",
                t.id,
                t.delta_table()
            ));
        }
        let mut found = Pending {
            as_of: 0.0,
            rows: Default::default(),
            truncates: Default::default(),
        };
        for message in client.simple_query(&sql).await? {
            let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            // Whatever does not read as a number is left out: a table
            // without a count is taken as pending, never as idle.
            let id = row.get(1).and_then(|v| v.parse::<i32>().ok());
            let n = row.get(2).and_then(|v| v.parse::<f64>().ok());
            match (row.get(0), id, n) {
                (Some("e"), _, Some(n)) => found.as_of = n,
                (Some("t"), Some(id), Some(n)) => _ = found.truncates.insert(id, n as i64),
                (Some("d"), Some(id), Some(n)) => _ = found.rows.insert(id, n as i64),
                _ => {}
            }
        }
        Ok(found)
    }

    /// Delta rows pending for `t`; one for a table the reading has no
    /// count of (each statement returns one row, so that is never expected).
    pub fn rows(&self, t: &TableState) -> i64 {
        self.rows.get(&t.id).copied().unwrap_or(1)
    }

    /// Delta rows and TRUNCATEs pending for `t`.
    pub fn backlog(&self, t: &TableState) -> i64 {
        self.rows(t) + self.truncates.get(&t.id).copied().unwrap_or(0)
    }
}

/// Unconsumed delta rows per table (TRUNCATE events count as one). A table
/// whose capture is not installed yet has none, nor one whose delta table
/// goes while this reads (an agent following a partition's detach drops
/// it): the backlogs are then read again.
pub async fn backlog(client: &tokio_postgres::Client, tables: &[TableState]) -> Result<Vec<i64>, SyncError> {
    let err = |source| SyncError::Backlog {
        table: "pgferry".into(),
        source,
    };
    let mut again = 3;
    loop {
        let existing: std::collections::HashSet<String> = client
            .query(
                "SELECT relname::text FROM pg_class WHERE relnamespace = to_regnamespace('pgferry') AND relkind = 'r'",
                &[],
            )
            .await
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        crate::failpoint::hit("backlog.listed").await;
        let counted: Vec<&TableState> = tables
            .iter()
            .filter(|t| existing.contains(&t.delta_table().name))
            .collect();
        let pending = match Pending::read(client, &counted, None).await {
            Err(e) if again > 0 && e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                again -= 1;
                continue;
            }
            read => read.map_err(err)?,
        };
        return Ok(tables
            .iter()
            .map(|t| {
                if existing.contains(&t.delta_table().name) {
                    pending.backlog(t)
                } else {
                    0
                }
            })
            .collect());
    }
}
