//! `bluegreen status`: where the migration stands.

use super::{Outcome, reject};
use crate::cli::{Format, StatusArgs};
use crate::control::status;

pub async fn run(a: &StatusArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    super::upgrade_control(&a.common.database_url, &m).await?;
    let mut conn = crate::pg::connect(&a.common.database_url)
        .await
        .map_err(reject)?;
    let st = status::status(&mut conn, &m).await.map_err(reject)?;
    let out = match a.format {
        Format::Json => serde_json::to_string_pretty(&st)? + "\n",
        _ => status::render(&st),
    };
    crate::output::print_stdout(&out)?;
    Ok(Outcome::Success)
}
