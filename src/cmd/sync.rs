//! `bluegreen sync`: apply the change log once and retry failed keys (exit 1 while anything is left
//! pending or failed), or follow it until stopped (`--follow`).

use super::{Outcome, reject, stop_on_signal};
use crate::cli::{Format, SyncArgs};

pub async fn run(a: &SyncArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    super::upgrade_control(&a.common.database_url, &m).await?;
    if a.follow {
        let done = crate::sync::follow::follow(&a.common.database_url, &m, stop_on_signal())
            .await
            .map_err(reject)?;
        let out = match a.format {
            Format::Json => serde_json::to_string_pretty(&done)? + "\n",
            _ => format!(
                "followed: {} change(s), {} key(s) re-derived, {} failed\n",
                done.changes, done.keys, done.failed
            ),
        };
        crate::output::print_stdout(&out)?;
        return Ok(Outcome::Success);
    }
    let mut conn = crate::pg::connect(&a.common.database_url)
        .await
        .map_err(reject)?;
    let r = crate::sync::sync(&mut conn, &m).await.map_err(reject)?;
    let out = match a.format {
        Format::Json => serde_json::to_string_pretty(&r)? + "\n",
        _ => format!(
            "applied {} change(s) ({} key(s)), retried {} failed key(s); {} failure(s) and {} pending change(s) or full re-derive(s) left\n{}",
            r.replayed,
            r.keys,
            r.retried,
            r.failures_left,
            r.pending_left,
            crate::control::status::render(&r.status)
        ),
    };
    crate::output::print_stdout(&out)?;
    Ok(if r.failures_left > 0 || r.pending_left > 0 {
        Outcome::Problem
    } else {
        Outcome::Success
    })
}
