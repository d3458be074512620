//! `bluegreen plan`: load the mapping, probe the database in a rolled-back transaction, build and
//! print the plan.

use crate::cli::{Format, PlanArgs};
use crate::diag::Rejected;
use crate::plan::{self, render};
use crate::probe;

use super::Outcome;

pub async fn run(args: &PlanArgs) -> anyhow::Result<Outcome> {
    let mapping = crate::mapping::load(&args.common.mapping)?;
    let opts = plan::Options {
        jobs: args.jobs,
        chunk_rows: args.chunk_rows,
        lock_timeout_ms: args.lock_timeout,
        profile: args.profile.into(),
    };
    let mut conn = crate::pg::connect(&args.common.database_url)
        .await
        .map_err(|d| Rejected(vec![d]))?;
    eprintln!(
        "bluegreen: checking {} against {}",
        mapping.path.display(),
        crate::pg::redact_url(&args.common.database_url)
    );
    let plan = probe::plan(&mut conn, &mapping, &opts)
        .await
        .map_err(|d| Rejected(vec![d]))?;
    let text = match args.format {
        Format::Text => render::text(&plan),
        Format::Json => render::json(&plan),
        Format::Markdown => render::markdown(&plan),
    };
    crate::output::print_stdout(&text)?;
    if plan.errors() > 0 {
        // Bad input is exit 2; the diagnostics are already in the output, repeat them on stderr
        // so a runbook that pipes stdout still shows why.
        return Err(Rejected(
            plan.diagnostics
                .into_iter()
                .filter(|d| d.is_error())
                .collect(),
        )
        .into());
    }
    Ok(Outcome::Success)
}
