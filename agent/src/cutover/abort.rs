//! The abort path: failure reopens production (invariant 9).
//!
//! A cutover that fails with the fence up lifts the fence on the source
//! before anything else, and only then tidies the target (the foreign keys,
//! triggers, rules and policies the cutover restored there). Lifting is one
//! source transaction (fence bodies, `fence_raised_at`, and the switch
//! marker when the switch command said it did not switch); while the
//! source cannot be reached it is tried again with backoff for
//! `cutover.fence_lift_timeout_ms`, `pgferry_fence_raised` staying 1, before
//! [`CutoverError::StillFenced`] names the command that lifts it.
//!
//! A target that cannot be tidied does not keep the source fenced: the
//! migration then stays in phase `cutting_over` with the fence down (see
//! [`state::Run::target_untidied`]), and the next `cutover`, `cutover --abort` or `migrate`
//! tidies the target before anything else; `sync` refuses to drain into a
//! target whose foreign keys and triggers would act on the drain. Safe to
//! re-run: lifting a lifted fence and tidying a tidy target change nothing.

use std::time::Duration;

use super::{fence, objects, CutoverError};
use crate::control::state::{self, Phase};
use crate::db::Migration;

/// Lifts the fence first, then tidies the target and returns the migration
/// to `syncing`. `switch_failed`: the switch command reported that it did not
/// switch, so its marker is cleared with the fence.
pub async fn abort(m: &Migration, why: &str, switch_failed: bool) -> Result<(), crate::Error> {
    tracing::warn!(
        reason = why,
        "Aborting the cutover: lifting the fence on the source first"
    );
    lift_persistently(m, switch_failed).await?;
    tracing::warn!("Fence lifted: the source takes writes again");
    if let Err(e) = finish(m).await {
        tracing::warn!(
            error = %crate::db::errors::report(&e),
            "The target still holds the foreign keys and triggers the cutover restored: the next `pgferry cutover`, \
             `pgferry cutover --abort` or `pgferry migrate` removes them before syncing"
        );
    }
    Ok(())
}

/// Tidies the target after the fence came down and returns the migration to
/// `syncing`.
pub async fn finish(m: &Migration) -> Result<(), crate::Error> {
    let mut target = m.target_conn().await?;
    objects::remove_cutover_objects(&mut target)
        .await
        .map_err(CutoverError::Target)?;
    drop(target);
    crate::fallback::withdraw(m, &tokio_util::sync::CancellationToken::new()).await?;
    let conn = m.source_conn().await?;
    state::set_phase(&**conn, Phase::Syncing).await?;
    tracing::info!("Target tidied: sync can continue");
    Ok(())
}

/// One attempt: the fence and its bookkeeping in one source transaction.
async fn lift_once(m: &Migration, switch_failed: bool) -> Result<(), crate::Error> {
    let mut conn = m.source_conn().await?;
    let tx = tokio_postgres::Client::transaction(&mut conn)
        .await
        .map_err(CutoverError::Source)?;
    fence::lift(&tx).await.map_err(CutoverError::Source)?;
    state::record_fence(&tx, false).await?;
    if switch_failed {
        state::clear_switch_started(&tx).await?;
    }
    tx.commit().await.map_err(CutoverError::Source)?;
    Ok(())
}

/// Lifts the fence, trying again with backoff while the source cannot be
/// reached, for `cutover.fence_lift_timeout_ms`.
async fn lift_persistently(m: &Migration, switch_failed: bool) -> Result<(), crate::Error> {
    let limit = Duration::from_millis(m.cfg.cutover.fence_lift_timeout_ms);
    fence::lift_persistently(limit, "THE SOURCE", || lift_once(m, switch_failed))
        .await
        .map_err(|(secs, cause)| {
            CutoverError::StillFenced {
                secs,
                command: lift_command(switch_failed),
                cause: Box::new(cause),
            }
            .into()
        })
}

/// The command that lifts the fence by hand.
fn lift_command(switch_failed: bool) -> &'static str {
    if switch_failed {
        // The marker may still say the switch started.
        "pgferry cutover --abort --force"
    } else {
        "pgferry cutover --abort"
    }
}

/// The last line a failed `cutover` or `migrate` prints: whether the source
/// takes the application's writes again, read from the source itself; and
/// whether the exit code must say that it does not.
pub async fn fence_verdict(m: &Migration) -> Option<(String, bool)> {
    let read = async {
        let conn = m.source_conn().await.ok()?;
        let Some(run) = state::load(&**conn).await.ok()? else {
            // Nothing of pgferry's there: no fence either.
            return Some(None);
        };
        let raised = fence::is_raised(&**conn).await.ok()?;
        Some(Some((run, raised)))
    };
    let (run, raised) =
        match tokio::time::timeout(Duration::from_secs(15), read).await {
            Ok(Some(Some(found))) => found,
            Ok(Some(None)) => return None,
            _ => return Some((
                "The source could not be read to tell whether the fence is up: check with `pgferry status` \
                 (`pgferry cutover --abort` lifts a fence left up)"
                    .into(),
                false,
            )),
        };
    Some(match (raised, run.switch_started || run.phase == Phase::CutOver) {
        (false, _) => ("The source takes writes: the fence is down.".into(), false),
        (true, true) => (
            "The source stays fenced on purpose: the switch has run and the application belongs on the target \
             (`pgferry cutover` finishes, `pgferry cleanup` lifts it)."
                .into(),
            false,
        ),
        (true, false) => (
            "THE SOURCE IS STILL FENCED: the application cannot write. Run `pgferry cutover --abort` to lift it.".into(),
            true,
        ),
    })
}
