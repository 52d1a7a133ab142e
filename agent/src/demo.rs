//! `demo`: a real migration between two throwaway local clusters while an
//! application keeps writing.
//!
//! The source's credential is like Heroku's (owner, no superuser, no
//! replication); the target's like the RDS master user (no superuser,
//! CREATEROLE). The line runs as `migrate --cutover` would, step by step so
//! the summary can report each: install, copy, a few seconds of live sync,
//! cutover, cleanup; then an independent verification. The clusters are
//! removed at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::sandbox::Cluster;
use crate::Migration;

/// Flags of the `demo` command.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Orders seeded on the source (customers are a tenth, items three per order).
    #[arg(long, default_value_t = 20_000)]
    pub orders: i32,
    /// Seconds of live sync before the cutover.
    #[arg(long, default_value_t = 5)]
    pub sync_secs: u64,
    /// Concurrent application writers.
    #[arg(long, default_value_t = 3)]
    pub writers: usize,
}

/// What the demo shows.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    /// Rows copied by the bulk copy.
    pub rows_copied: u64,
    /// Bulk copy wall time (data and indexes).
    pub copy_secs: f64,
    /// Rows per second of the data copy.
    pub copy_rows_per_sec: f64,
    /// Application transactions committed on the source during the migration.
    pub app_transactions: u64,
    /// Changed keys applied by the drain.
    pub keys_synced: u64,
    /// Largest lag seen during sync.
    pub max_lag_secs: f64,
    /// How long writes were blocked by the cutover.
    pub writes_blocked_ms: i64,
    /// Application writes refused by the fence.
    pub writes_refused: u64,
    /// Tables compared after cleanup.
    pub tables_verified: usize,
    /// Tables equal.
    pub tables_equal: usize,
    /// Rows compared.
    pub rows_verified: i64,
    /// Whether anything of pgferry's is left on either side.
    pub leftovers: bool,
}

impl DemoSummary {
    /// The summary as printed.
    pub fn render(&self) -> String {
        format!(
            "pgferry demo: live migration between two throwaway PostgreSQL clusters\n\
             \x20 copied        {} rows in {:.1} s ({:.0} rows/s, data and indexes)\n\
             \x20 live writes   {} application transactions on the source during the migration\n\
             \x20 synced        {} changed keys applied; max lag {:.2} s\n\
             \x20 cutover       writes blocked for {} ms; {} application writes refused by the fence\n\
             \x20 verification  {}/{} tables equal, {} rows compared row by row (count + checksum)\n\
             \x20 cleanup       {}\n\
             result: {}\n",
            self.rows_copied,
            self.copy_secs,
            self.copy_rows_per_sec,
            self.app_transactions,
            self.keys_synced,
            self.max_lag_secs,
            self.writes_blocked_ms,
            self.writes_refused,
            self.tables_equal,
            self.tables_verified,
            self.rows_verified,
            if self.leftovers {
                "pgferry objects LEFT BEHIND"
            } else {
                "no pgferry object left on either side"
            },
            if self.ok() { "success" } else { "FAILED" }
        )
    }

    /// True when everything matched and nothing was left behind.
    pub fn ok(&self) -> bool {
        self.tables_equal == self.tables_verified && !self.leftovers
    }
}

const SCHEMA_SQL: &str = "
CREATE TABLE customers (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL,
                        created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers (id),
                     status text NOT NULL, total numeric(12,2) NOT NULL, placed_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX orders_customer_idx ON orders (customer_id);
CREATE TABLE order_items (order_id bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE, line int NOT NULL,
                          sku text NOT NULL, qty int NOT NULL, PRIMARY KEY (order_id, line));
CREATE TABLE events (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), kind text NOT NULL, payload jsonb NOT NULL,
                     at timestamptz NOT NULL DEFAULT clock_timestamp());
";

/// Runs the demo.
pub async fn run(args: &DemoArgs, cancel: &CancellationToken) -> Result<DemoSummary, crate::Error> {
    tracing::info!("Starting throwaway source and target clusters");
    let (source, target) = tokio::try_join!(Cluster::start("demo-source"), Cluster::start("demo-target"))?;
    source
        .create_role(
            "app",
            "app-secret",
            "NOSUPERUSER NOREPLICATION NOCREATEDB NOCREATEROLE",
            Some("shop"),
        )
        .await?;
    target
        .create_role(
            "rds_master",
            "rds-secret",
            "NOSUPERUSER NOREPLICATION CREATEDB CREATEROLE",
            Some("shop"),
        )
        .await?;
    let source_url = source.url("app", "app-secret", "shop");
    let target_url = target.url("rds_master", "rds-secret", "shop");
    let cfg = Config {
        source: Some(source_url.into()),
        target: Some(target_url.into()),
        ..Config::default()
    };
    let m = Migration::new(cfg)?;
    seed(&m, args.orders).await?;
    tracing::info!(
        orders = args.orders,
        "Source seeded; starting the application's writers"
    );

    let stop = CancellationToken::new();
    let counters = Arc::new(Counters::default());
    let writers: Vec<_> = (0..args.writers)
        .map(|_| tokio::spawn(write_loop(m.clone(), stop.clone(), counters.clone())))
        .collect();

    let result = migrate(&m, args, cancel, &counters).await;
    stop.cancel();
    for w in writers {
        let _ = w.await;
    }
    let mut summary = result?;
    summary.app_transactions = counters.committed.load(Ordering::Relaxed);
    summary.writes_refused = counters.fenced.load(Ordering::Relaxed);

    let verdict = crate::verify::verify_all(&m).await?;
    summary.tables_verified = verdict.tables.len();
    summary.tables_equal = verdict.tables.iter().filter(|t| t.equal).count();
    summary.rows_verified = verdict.rows;
    let s = m.source_conn().await?;
    let t = m.target_conn().await?;
    let left = |e| crate::cutover::CutoverError::Source(e);
    summary.leftovers = !crate::cleanup::leftovers(&s).await.map_err(left)?.is_empty()
        || !crate::cleanup::leftovers(&t).await.map_err(left)?.is_empty();
    Ok(summary)
}

async fn migrate(
    m: &Migration,
    args: &DemoArgs,
    cancel: &CancellationToken,
    counters: &Counters,
) -> Result<DemoSummary, crate::Error> {
    crate::migrate::preflight(m).await?;
    crate::capture::install(m, cancel).await?;
    let started = Instant::now();
    let copy = crate::copy::run(m, cancel).await?;
    let copy_secs = started.elapsed().as_secs_f64();

    tracing::info!(secs = args.sync_secs, "Syncing live changes");
    let sync_stop = cancel.child_token();
    let sync = {
        let (m, stop) = (m.clone(), sync_stop.clone());
        tokio::spawn(async move { crate::sync::run(&m, crate::sync::SyncOptions::default(), &stop).await })
    };
    let mut max_lag: f64 = 0.0;
    let deadline = Instant::now() + Duration::from_secs(args.sync_secs);
    while Instant::now() < deadline && !cancel.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if let Ok(status) = crate::status::read(m).await {
            max_lag = max_lag.max(status.max_lag_secs.unwrap_or(0.0));
        }
    }
    sync_stop.cancel();
    let synced = sync.await.map_err(crate::drain::SyncError::Worker)??;
    tracing::info!(
        transactions = counters.committed.load(Ordering::Relaxed),
        "Cutting over"
    );
    let cutover = crate::cutover::run(m, crate::cutover::CutoverOptions::default(), cancel).await?;
    crate::cleanup::run(m, cancel).await?;
    Ok(DemoSummary {
        rows_copied: copy.rows,
        copy_secs,
        copy_rows_per_sec: copy.rows as f64 / copy.data_secs.max(1e-3),
        app_transactions: 0,
        keys_synced: synced.keys_applied + cutover.final_drain_keys,
        max_lag_secs: max_lag,
        writes_blocked_ms: cutover.writes_blocked_ms,
        writes_refused: 0,
        tables_verified: 0,
        tables_equal: 0,
        rows_verified: 0,
        leftovers: false,
    })
}

async fn seed(m: &Migration, orders: i32) -> Result<(), crate::Error> {
    let c = m.source_conn().await?;
    let e = crate::cutover::CutoverError::Source;
    c.batch_execute(SCHEMA_SQL).await.map_err(e)?;
    let customers = (orders / 10).max(1);
    c.execute(
        "INSERT INTO customers (email, name) SELECT 'c' || g || '@example.com', 'Customer ' || g FROM generate_series(1, $1) g",
        &[&customers],
    )
    .await
    .map_err(e)?;
    c.execute(
        "INSERT INTO orders (customer_id, status, total)
         SELECT 1 + g % $2, 'placed', (g % 500) + 0.99 FROM generate_series(1, $1) g",
        &[&orders, &customers],
    )
    .await
    .map_err(e)?;
    c.batch_execute(
        "INSERT INTO order_items SELECT o.id, l, 'SKU-' || (o.id * 7 + l) % 1000, l FROM orders o, generate_series(1, 3) l;
         ANALYZE",
    )
    .await
    .map_err(e)?;
    c.execute(
        "INSERT INTO events (kind, payload)
         SELECT 'seed', jsonb_build_object('n', g, 'note', repeat('x', 200)) FROM generate_series(1, $1) g",
        &[&orders],
    )
    .await
    .map_err(e)?;
    Ok(())
}

#[derive(Debug, Default)]
struct Counters {
    committed: AtomicU64,
    fenced: AtomicU64,
}

/// One application writer: random orders, updates, deletes and events until
/// stopped, or until the fence refuses it (the application would then be
/// pointed at the new database).
async fn write_loop(m: Migration, stop: CancellationToken, counters: Arc<Counters>) {
    let Ok(c) = m.source.connect().await else { return };
    while !stop.is_cancelled() {
        let (op, pick) = {
            let mut rng = rand::rng();
            (rng.random_range(0..6), rng.random_range(0.0..1.0f64))
        };
        let sql = match op {
            0 => "WITH o AS (INSERT INTO orders (customer_id, status, total)
                             SELECT id, 'placed', 10 FROM customers ORDER BY id LIMIT 1 RETURNING id)
                  INSERT INTO order_items SELECT o.id, l, 'SKU-NEW', 1 FROM o, generate_series(1, 2) l",
            1 => "UPDATE orders SET status = 'shipped', total = total + 1
                   WHERE id = (SELECT (min(id) + ($1::float8 * (max(id) - min(id))))::bigint FROM orders)",
            2 => "DELETE FROM order_items
                   WHERE (order_id, line) = (SELECT order_id, line FROM order_items
                                              WHERE order_id >= (SELECT (min(id) + ($1::float8 * (max(id) - min(id))))::bigint FROM orders)
                                              ORDER BY order_id, line LIMIT 1)",
            3 => "INSERT INTO events (kind, payload) SELECT 'click', jsonb_build_object('r', $1::float8)",
            4 => "UPDATE customers SET name = 'Renamed ' || $1::float8
                   WHERE id = (SELECT (min(id) + ($1::float8 * (max(id) - min(id))))::bigint FROM customers)",
            _ => "DELETE FROM orders
                   WHERE id = (SELECT (min(id) + ($1::float8 * (max(id) - min(id))))::bigint FROM orders)",
        };
        let res = if op == 0 {
            c.execute(sql, &[]).await
        } else {
            c.execute(sql, &[&pick]).await
        };
        match res {
            Ok(_) => {
                counters.committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.code().map(|c| c.code()) == Some("25006") => {
                counters.fenced.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
