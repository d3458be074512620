//! `bluegreen prepare`: control schema, green schema, change capture.

use super::{Outcome, check_before_writing, reject, settings};
use crate::cli::PrepareArgs;

pub async fn run(a: &PrepareArgs) -> anyhow::Result<Outcome> {
    let m = crate::mapping::load(&a.common.mapping)?;
    let s = settings(&m, None, None, a.lock_timeout);
    check_before_writing(
        &a.common.database_url,
        &m,
        a.profile.into(),
        s.lock_timeout_ms,
    )
    .await?;
    crate::copy::prepare(&a.common.database_url, &m, s.lock_timeout_ms)
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
