//! `bluegreen plan`: load the mapping, probe the database in a rolled-back transaction, build and
//! print the plan.

use crate::cli::{Format, PlanArgs, ProfileArg};
use crate::diag::Rejected;
use crate::plan::{self, ProfileMode, render};
use crate::probe;

use super::Outcome;

pub async fn run(args: &PlanArgs) -> anyhow::Result<Outcome> {
    let mapping = crate::mapping::load(&args.common.mapping)?;
    let mode = match args.profile {
        ProfileArg::None => ProfileMode::None,
        ProfileArg::Sample => ProfileMode::Sample,
        ProfileArg::Full => ProfileMode::Full,
    };
    let opts = plan::Options {
        jobs: args.jobs,
        chunk_rows: args.chunk_rows,
        lock_timeout_ms: args.lock_timeout,
        profile: mode,
    };
    let settings = plan::effective_settings(&mapping, &opts);
    let mut conn = crate::pg::connect(&args.common.database_url)
        .await
        .map_err(|d| Rejected(vec![d]))?;
    eprintln!(
        "bluegreen: checking {} against {}",
        mapping.path.display(),
        crate::pg::redact_url(&args.common.database_url)
    );
    let out = probe::run(&mut conn, &mapping, settings.lock_timeout_ms, mode)
        .await
        .map_err(|d| Rejected(vec![d]))?;
    let plan = plan::build(
        &mapping,
        &out.catalog,
        &out.facts,
        &opts,
        out.green_ddl_ran,
        out.diagnostics,
    );
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
