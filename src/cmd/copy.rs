//! `bluegreen copy`: fill green, then live sync; prints the status at the end.

use super::{Outcome, check_before_writing, reject, settings};
use crate::cli::{CopyArgs, EngineArg};
use crate::copy::{self, Engine};
use crate::diag::Diagnostic;

pub async fn run(a: &CopyArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    let s = settings(&m, a.jobs, a.chunk_rows, a.lock_timeout);
    let o = copy::Options {
        jobs: s.jobs,
        chunk_rows: s.chunk_rows,
        lock_timeout_ms: s.lock_timeout_ms,
        engine: match a.engine {
            EngineArg::Copy => Engine::Copy,
            EngineArg::InsertSelect | EngineArg::Auto => Engine::InsertSelect,
        },
    };
    let url = a.common.database_url.clone();
    check_before_writing(&url, &m, a.profile.into(), s.lock_timeout_ms).await?;
    // Ctrl-C: stop at once; the chunks in flight roll back with their connections, the finished
    // ones stay done, and `copy` resumes where it stopped.
    let run = async {
        copy::copy(&url, &m, &o).await?;
        crate::sync::go_live(&url, &m, o.lock_timeout_ms).await?;
        copy::validate_foreign_keys(&url, &m, o.lock_timeout_ms).await
    };
    tokio::select! {
        r = run => r.map_err(reject)?,
        _ = tokio::signal::ctrl_c() => {
            return Err(reject(Diagnostic::error("interrupted", "interrupted: chunks in flight were rolled back; finished chunks are kept")
                .hint("run the same copy command again to resume")));
        }
    }
    let mut conn = crate::pg::connect(&url).await.map_err(reject)?;
    let st = crate::control::status::status(&mut conn, &m)
        .await
        .map_err(reject)?;
    crate::output::print_stdout(&crate::control::status::render(&st))?;
    if a.follow {
        drop(conn);
        crate::sync::follow::follow(&url, &m, super::stop_on_signal())
            .await
            .map_err(reject)?;
    }
    Ok(Outcome::Success)
}
