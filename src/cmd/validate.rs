//! `bluegreen validate`: compare, report, exit 0 (PASS) or 1 (FAIL).

use super::{Outcome, reject, settings};
use crate::cli::{Format, ValidateArgs};
use crate::diag::Diagnostic;

pub async fn run(a: &ValidateArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    super::upgrade_control(&a.common.database_url, &m).await?;
    let s = settings(&m, a.jobs, a.chunk_rows, None);
    let o = crate::validate::Options {
        jobs: s.jobs,
        chunk_rows: s.chunk_rows,
        max_diffs: a.max_diffs,
        show_values: a.show_values,
        allow_hot: a.allow_hot,
        max_snapshot_age: std::time::Duration::from_millis(a.max_snapshot_age),
    };
    let r = crate::validate::run(&a.common.database_url, &m, &o)
        .await
        .map_err(reject)?;
    if let Some(dir) = &a.report {
        // The run report's timeline: what the control schema recorded (none before prepare).
        let timeline = {
            let mut c = crate::pg::connect(&a.common.database_url)
                .await
                .map_err(reject)?;
            if crate::control::exists(&mut c, &m).await.map_err(reject)? {
                crate::validate::timeline::load(&mut c, &m)
                    .await
                    .map_err(reject)?
            } else {
                crate::validate::timeline::Timeline::default()
            }
        };
        crate::validate::report::write(&r, &timeline, dir).map_err(|e| {
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
