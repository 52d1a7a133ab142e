//! The command line (a stable contract, see docs/design.md): parses flags, loads
//! configuration, starts logging and the runtime, runs the command, prints its
//! result (human or `--json`) and maps errors to exit codes.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use secrecy::SecretString;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Overrides};
use crate::db::errors::report;
use crate::error::{Error, ExitCode};
use crate::migrate::resilient;
use crate::Migration;

/// pgferry: live PostgreSQL migration without superuser or replication.
#[derive(Debug, Parser)]
#[command(name = "pgferry", version, about, long_about = None)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Source libpq URL (prefer PGFERRY_SOURCE or the config file: argv is visible to other users).
    #[arg(long, global = true, value_name = "URL")]
    pub source: Option<String>,
    /// Target libpq URL (prefer PGFERRY_TARGET or the config file).
    #[arg(long, global = true, value_name = "URL")]
    pub target: Option<String>,
    /// Print the result as JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line (journald, log shippers).
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Preflight report; exit 1 when something blocks the migration.
    Check {
        /// Also read every row of every table and report unreadable ones.
        #[arg(long)]
        scan: bool,
    },
    /// Control schema and capture triggers on the source.
    Install,
    /// Schema pre-data, parallel data copy, indexes.
    Copy,
    /// Drain deltas until stopped (SIGINT/SIGTERM) or caught up.
    Sync {
        /// Stop once caught up: after a pass that leaves nothing, or at most
        /// cutover.max_backlog_rows delta rows and no fewer than the pass
        /// before (what writes add while one pass runs).
        #[arg(long)]
        until_caught_up: bool,
    },
    /// Fence, final drain, sequences, FKs/triggers, verify, switch.
    Cutover {
        /// Lift the fence of an interrupted cutover and return to syncing.
        #[arg(long)]
        abort: bool,
        /// With --abort: even if the switch command may already have run.
        #[arg(long, requires = "abort")]
        force: bool,
    },
    /// Remove every pgferry object from source and target.
    Cleanup,
    /// After a cutover with cutover.fallback: the old source follows the
    /// new database (kept fenced, pgferry applying there what the
    /// application writes to the target) until stopped.
    Fallback {
        /// Stop after a pass that found nothing to apply.
        #[arg(long)]
        until_caught_up: bool,
    },
    /// Back to the old source after a cutover with cutover.fallback: fence
    /// the target, drain the rest, verify, run cutover.switchback_command,
    /// open the old source; forward sync can start again.
    Switchback {
        /// Lift the target's fence of a switchback that stopped before its
        /// command ran; the old source goes on following.
        #[arg(long)]
        abort: bool,
    },
    /// End the fallback window: the old source's triggers enabled again,
    /// pgferry removed from both sides (which lifts the old source's fence).
    Finish {
        /// Keep the old source fenced (read-only for the application) until
        /// `pgferry cleanup`; only the target is cleaned now.
        #[arg(long)]
        keep_source_fenced: bool,
    },
    /// Before a deploy that changes the type of a key column (an integer
    /// key made bigint): capture the named tables' key changes without
    /// the key column trigger, which PostgreSQL would not let the
    /// column's type change under. Runs beside sync.
    ReleaseKeys {
        /// A captured table (`schema.table`, or `table` when only one
        /// schema has it); repeat for more. None: every captured table.
        #[arg(long = "table", value_name = "TABLE")]
        tables: Vec<String>,
    },
    /// Compare source and target: counts, checksums, differing keys.
    Verify,
    /// Phase, per-table progress, backlog, lag.
    Status,
    /// All of the above in order, resuming from the stored phase.
    Migrate {
        /// Finish unattended: cutover, then cleanup of the source.
        #[arg(long)]
        cutover: bool,
    },
    /// Throwaway source and target clusters, live workload, full migration.
    Demo(crate::demo::DemoArgs),
    /// Create, describe, wait for, snapshot or delete the target RDS instance.
    Rds(crate::rds::RdsArgs),
}

/// Entry point shared by the `pgferry` binary and the test harness's copy.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::from(ExitCode::Runtime as u8);
        }
    };
    let code = runtime.block_on(run(cli));
    std::process::ExitCode::from(code as u8)
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PGFERRY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if terminal && matches!(format, LogFormat::Human) {
        crate::progress::enable();
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::progress::LogWriter)
        .with_target(false);
    match format {
        LogFormat::Human => builder.with_ansi(terminal).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("Stopping after the batch in hand");
        token.cancel();
    });
}

async fn run(cli: Cli) -> ExitCode {
    let cancel = CancellationToken::new();
    cancel_on_signals(cancel.clone());
    let json = cli.json;
    match dispatch(cli, &cancel).await {
        Ok(out) => {
            if json {
                println!("{}", out.json);
            } else {
                print!("{}", out.text);
            }
            out.code
        }
        Err(f) => {
            eprintln!("error: {}", report(&f.error));
            // The last line says whether the application can write to the
            // source again (invariant 9), read from the source itself.
            match f.fence {
                Some((line, still_fenced)) => {
                    eprintln!("{line}");
                    if still_fenced {
                        ExitCode::Fenced
                    } else {
                        f.error.exit_code()
                    }
                }
                None => f.error.exit_code(),
            }
        }
    }
}

/// A failed command: its error, and for the commands that raise the fence,
/// the fence's state when it ended.
struct Failure {
    error: Error,
    fence: Option<(String, bool)>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self { error, fence: None }
    }
}

/// A command's result, in both renderings.
struct Output {
    text: String,
    json: serde_json::Value,
    code: ExitCode,
}

impl Output {
    fn ok<T: Serialize>(value: &T, text: String) -> Self {
        Self {
            json: serde_json::to_value(value).unwrap_or(serde_json::Value::Null),
            text,
            code: ExitCode::Done,
        }
    }
}

fn migration(cli: &Cli) -> Result<Migration, Error> {
    let cfg = Config::load(
        cli.config.as_deref(),
        Overrides {
            source: cli.source.clone().map(SecretString::from),
            target: cli.target.clone().map(SecretString::from),
        },
    )?;
    // The source's cleanup must work from any machine with its URL alone.
    if matches!(
        cli.command,
        Command::Cleanup | Command::Status | Command::ReleaseKeys { .. }
    ) {
        return Ok(Migration::without_target(cfg)?);
    }
    Ok(Migration::new(cfg)?)
}

fn pretty<T: Serialize>(title: &str, value: &T) -> String {
    format!(
        "{title}\n{}\n",
        serde_json::to_string_pretty(value).unwrap_or_default()
    )
}

async fn dispatch(cli: Cli, cancel: &CancellationToken) -> Result<Output, Failure> {
    if let Command::Demo(args) = &cli.command {
        let summary = crate::demo::run(args, cancel).await?;
        return Ok(Output::ok(&summary, summary.render()));
    }
    if let Command::Rds(args) = &cli.command {
        let cfg = Config::load(
            cli.config.as_deref(),
            Overrides {
                source: cli.source.clone().map(SecretString::from),
                target: cli.target.clone().map(SecretString::from),
            },
        )
        .map_err(Error::from)?;
        // With a source configured, class, storage and version default from it.
        let defaults = match &cfg.source {
            Some(url) => {
                let ep = crate::db::endpoint::Endpoint::parse(
                    url,
                    crate::db::endpoint::Side::Source,
                    cfg.source_limits.lock_timeout_ms,
                )
                .map_err(Error::from)?;
                Some(crate::rds::source_defaults(&ep).await?)
            }
            None => None,
        };
        let info = crate::rds::run(args, defaults).await?;
        return Ok(Output::ok(&info, info.render()));
    }
    let m = migration(&cli)?;
    let sampler = start_telemetry(&cli.command, &m);
    let out = run_command(&cli, &m, cancel).await;
    if let Some(stop) = sampler {
        stop.cancel();
    }
    match out {
        Ok(out) => Ok(out),
        // Its own headline already says so, and the source cannot be read.
        Err(error)
            if matches!(
                error.downcast_ref(),
                Some(crate::cutover::CutoverError::StillFenced { .. })
            ) =>
        {
            Err(Failure {
            fence: Some((
                "THE SOURCE IS STILL FENCED: the application cannot write until the fence is lifted (see above)."
                    .into(),
                true,
            )),
            error,
        })
        }
        Err(error) if matches!(cli.command, Command::Cutover { .. } | Command::Migrate { .. }) => Err(Failure {
            fence: crate::cutover::abort::fence_verdict(&m).await,
            error,
        }),
        Err(error) => Err(error.into()),
    }
}

/// Serves metrics and samples the source while a working command runs
/// (not for check, verify, status and release-keys, which are one-shot).
fn start_telemetry(command: &Command, m: &Migration) -> Option<CancellationToken> {
    if matches!(
        command,
        Command::Check { .. }
            | Command::Verify
            | Command::Status
            | Command::ReleaseKeys { .. }
            | Command::Demo(_)
            | Command::Rds(_)
    ) {
        return None;
    }
    let addr = m.cfg.metrics.address().ok().flatten()?;
    crate::telemetry::install(addr);
    let stop = CancellationToken::new();
    let interval = std::time::Duration::from_millis(m.cfg.metrics.sample_interval_ms);
    tokio::spawn(crate::status::sample_forever(m.clone(), interval, stop.clone()));
    Some(stop)
}

async fn run_command(cli: &Cli, m: &Migration, cancel: &CancellationToken) -> Result<Output, Error> {
    let m = m.clone();
    Ok(match &cli.command {
        Command::Check { scan } => {
            let mut report = crate::plan::check(&m).await;
            if *scan && report.source.major_version.is_some() {
                report.problems.extend(crate::plan::scan(&m).await?);
            }
            let mut out = Output::ok(&report, report.render());
            if report.blockers() > 0 {
                out.code = ExitCode::CheckFailed;
            }
            out
        }
        Command::Install => {
            crate::plan::preflight_for(&m, true).await?;
            let r = resilient(&m, "install", cancel, || crate::capture::install(&m, cancel)).await?;
            Output::ok(&r, pretty("install done", &r))
        }
        Command::Copy => {
            let r = resilient(&m, "copy", cancel, || crate::copy::run(&m, cancel)).await?;
            Output::ok(&r, pretty("copy done", &r))
        }
        Command::Sync { until_caught_up } => {
            let opts = crate::sync::SyncOptions {
                until_caught_up: *until_caught_up,
            };
            let r = resilient(&m, "sync", cancel, || crate::sync::run(&m, opts, cancel)).await?;
            Output::ok(&r, pretty("sync stopped", &r))
        }
        Command::Cutover { abort, force } => {
            let opts = crate::cutover::CutoverOptions {
                abort: *abort,
                force: *force,
            };
            let r = resilient(&m, "cutover", cancel, || crate::cutover::run(&m, opts, cancel)).await;
            match r {
                Ok(r) => Output::ok(&r, pretty("cutover done", &r)),
                Err(e) => {
                    use crate::cutover::CutoverError;
                    if let Some(CutoverError::VerifyMismatch(v) | CutoverError::MismatchBeforeFence(v)) =
                        e.downcast_ref()
                    {
                        eprint!("{}", v.render());
                    }
                    return Err(e);
                }
            }
        }
        Command::Cleanup => {
            // Run by hand after the switch, cleanup lifts the fence that
            // keeps stragglers from writing where nobody reads: say who.
            if let Ok(Some(who)) = crate::cutover::release::connected_now(&m).await {
                tracing::warn!(
                    sessions = %who,
                    "Lifting the old source's fence while sessions that could write to it are connected: what they \
                     write there from now on is not migrated"
                );
            }
            // A fallback's remains too: its triggers enabled again on the
            // old source, the target's capture removed table by table.
            let r = resilient(&m, "cleanup", cancel, || {
                crate::fallback::finish(&m, false, cancel)
            })
            .await?;
            let r = r.cleanup.unwrap_or_default();
            Output::ok(&r, pretty("cleanup done", &r))
        }
        Command::Fallback { until_caught_up } => {
            let r = resilient(&m, "fallback", cancel, || {
                crate::fallback::run(&m, *until_caught_up, cancel)
            })
            .await?;
            Output::ok(&r, pretty("fallback stopped", &r))
        }
        Command::Switchback { abort: true } => {
            crate::cutover::switchback::abort(&m).await?;
            Output::ok(
                &serde_json::json!({ "target_fence_lifted": true }),
                "target fence lifted\n".into(),
            )
        }
        Command::Switchback { abort: false } => {
            let r = resilient(&m, "switchback", cancel, || {
                crate::cutover::switchback::run(&m, cancel)
            })
            .await?;
            Output::ok(&r, pretty("switched back", &r))
        }
        Command::Finish { keep_source_fenced } => {
            if !*keep_source_fenced {
                if let Ok(Some(who)) = crate::cutover::release::connected_now(&m).await {
                    tracing::warn!(
                        sessions = %who,
                        "Lifting the old source's fence while sessions that could write to it are connected: what \
                         they write there from now on is not migrated"
                    );
                }
            }
            let r = resilient(&m, "finish", cancel, || {
                crate::fallback::finish(&m, *keep_source_fenced, cancel)
            })
            .await?;
            Output::ok(&r, pretty("fallback finished", &r))
        }
        Command::ReleaseKeys { tables } => {
            let r = crate::capture::release_keys(&m, tables, cancel).await?;
            Output::ok(&r, pretty("key column triggers released", &r))
        }
        Command::Verify => {
            let r = crate::verify::verify_all(&m).await?;
            let mut out = Output::ok(&r, r.render());
            if r.mismatches > 0 {
                out.code = ExitCode::CheckFailed;
            }
            out
        }
        Command::Status => {
            let r = crate::status::read(&m).await?;
            Output::ok(&r, r.render())
        }
        Command::Migrate { cutover } => {
            let opts = crate::migrate::MigrateOptions { cutover: *cutover };
            let r = crate::migrate::run(&m, opts, cancel).await?;
            Output::ok(&r, pretty("migrate done", &r))
        }
        Command::Demo(_) | Command::Rds(_) => unreachable!("handled above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_contract_parses() {
        let cli = Cli::try_parse_from([
            "pgferry",
            "--source",
            "postgres://a@h/d",
            "--target",
            "postgres://b@h/d",
            "--json",
            "sync",
            "--until-caught-up",
        ])
        .unwrap();
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            Command::Sync {
                until_caught_up: true
            }
        ));
        for cmd in [
            "check",
            "install",
            "copy",
            "sync",
            "cutover",
            "cleanup",
            "verify",
            "status",
            "migrate",
            "demo",
            "fallback",
            "switchback",
            "finish",
            "release-keys",
        ] {
            Cli::try_parse_from(["pgferry", cmd]).unwrap_or_else(|e| panic!("{cmd}: {e}"));
        }
        let cli = Cli::try_parse_from(["pgferry", "migrate", "--cutover", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Migrate { cutover: true }));
        let cli =
            Cli::try_parse_from(["pgferry", "release-keys", "--table", "public.a", "--table", "b"]).unwrap();
        assert!(matches!(&cli.command, Command::ReleaseKeys { tables } if tables == &["public.a", "b"]));
    }

    #[test]
    fn usage_errors_exit_2() {
        let err = Cli::try_parse_from(["pgferry", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
