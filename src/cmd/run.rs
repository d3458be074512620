//! `prepare`, `copy`, `sync`, `status`: glue between the CLI and `copy` / `sync`.

use crate::cli::{CopyArgs, EngineArg, Format, PrepareArgs, StatusArgs};
use crate::copy::{self, Engine};
use crate::diag::{Diagnostic, Rejected};
use crate::mapping::Mapping;
use crate::plan;

use super::Outcome;

fn reject(d: Diagnostic) -> anyhow::Error {
    Rejected(vec![d]).into()
}

fn settings(
    m: &Mapping,
    jobs: Option<u32>,
    chunk_rows: Option<u64>,
    lock_timeout: Option<u64>,
) -> plan::EffectiveSettings {
    plan::effective_settings(
        m,
        &plan::Options {
            jobs,
            chunk_rows,
            lock_timeout_ms: lock_timeout,
            profile: "none".into(),
        },
    )
}

pub async fn prepare(a: &PrepareArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    let s = settings(&m, None, None, a.lock_timeout);
    copy::prepare(&a.common.database_url, &m, s.lock_timeout_ms)
        .await
        .map_err(reject)?;
    crate::output::print_stdout(&format!(
        "prepared {}: green schema {}, change capture on {} blue table(s)\n",
        m.migration,
        m.green,
        m.blue_tables_read().len()
    ))?;
    Ok(Outcome::Success)
}

pub async fn copy(a: &CopyArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    let s = settings(&m, a.jobs, a.chunk_rows, a.lock_timeout);
    let o = copy::Options {
        jobs: s.jobs,
        chunk_rows: s.chunk_rows,
        lock_timeout_ms: s.lock_timeout_ms,
        engine: match a.engine {
            EngineArg::Copy | EngineArg::Auto => Engine::Copy,
            EngineArg::InsertSelect => Engine::InsertSelect,
        },
    };
    let url = a.common.database_url.clone();
    // Ctrl-C: stop at once; the chunks in flight roll back with their connections, the finished
    // ones stay done, and `copy` resumes where it stopped.
    tokio::select! {
        r = copy::copy(&url, &m, &o) => r.map_err(reject)?,
        _ = tokio::signal::ctrl_c() => {
            return Err(reject(Diagnostic::error("interrupted", "interrupted: chunks in flight were rolled back; finished chunks are kept")
                .hint("run the same copy command again to resume")));
        }
    }
    let mut conn = crate::pg::connect(&url).await.map_err(reject)?;
    let st = crate::sync::status(&mut conn, &m).await.map_err(reject)?;
    crate::output::print_stdout(&crate::sync::render_status(&st))?;
    Ok(Outcome::Success)
}

pub async fn sync(a: &StatusArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    let mut conn = crate::pg::connect(&a.common.database_url)
        .await
        .map_err(reject)?;
    let r = crate::sync::sync(&mut conn, &m).await.map_err(reject)?;
    let out = match a.format {
        Format::Json => serde_json::to_string_pretty(&r)? + "\n",
        _ => format!(
            "replayed {} change(s), retried {} failed key(s), {} failure(s) left\n{}",
            r.replayed,
            r.retried,
            r.failures_left,
            crate::sync::render_status(&r.status)
        ),
    };
    crate::output::print_stdout(&out)?;
    Ok(if r.failures_left > 0 {
        Outcome::Problem
    } else {
        Outcome::Success
    })
}

pub async fn status(a: &StatusArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    let mut conn = crate::pg::connect(&a.common.database_url)
        .await
        .map_err(reject)?;
    let st = crate::sync::status(&mut conn, &m).await.map_err(reject)?;
    let out = match a.format {
        Format::Json => serde_json::to_string_pretty(&st)? + "\n",
        _ => crate::sync::render_status(&st),
    };
    crate::output::print_stdout(&out)?;
    Ok(Outcome::Success)
}

pub async fn validate(a: &crate::cli::ValidateArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    let s = settings(&m, a.jobs, a.chunk_rows, None);
    let o = crate::validate::Options {
        jobs: s.jobs,
        chunk_rows: s.chunk_rows,
        max_diffs: a.max_diffs,
        show_values: a.show_values,
    };
    let r = crate::validate::run(&a.common.database_url, &m, &o)
        .await
        .map_err(reject)?;
    if let Some(dir) = &a.report {
        crate::validate::report::write(&r, dir).map_err(|e| {
            reject(Diagnostic::error(
                "report-write",
                format!("cannot write the report to {}: {e}", dir.display()),
            ))
        })?;
        eprintln!("bluegreen: report written to {}", dir.display());
    }
    let out = match a.format {
        Format::Json => r.json(),
        _ => crate::validate::report::summary(&r),
    };
    crate::output::print_stdout(&out)?;
    Ok(if r.passed() {
        Outcome::Success
    } else {
        Outcome::Problem
    })
}
