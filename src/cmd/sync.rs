//! `bluegreen sync`: replay the change log and retry failed keys; exit 1 while failures remain.

use super::{Outcome, reject};
use crate::cli::{Format, StatusArgs};

pub async fn run(a: &StatusArgs) -> anyhow::Result<Outcome> {
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
            crate::control::status::render(&r.status)
        ),
    };
    crate::output::print_stdout(&out)?;
    Ok(if r.failures_left > 0 {
        Outcome::Problem
    } else {
        Outcome::Success
    })
}
