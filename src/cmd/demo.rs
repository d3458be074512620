//! `bluegreen demo`: glue between the CLI and `demo`.

use std::time::Duration;

use super::Outcome;
use crate::cli::DemoArgs;

pub async fn run(a: &DemoArgs) -> anyhow::Result<Outcome> {
    let o = crate::demo::Options {
        rows: a.rows,
        writers: a.writers as usize,
        window: Duration::from_secs(a.window),
        out: a.out.clone(),
        keep: a.keep,
    };
    // Ctrl-C drops the demo: its child processes are killed and the server stopped on the way.
    tokio::select! {
        r = crate::demo::run(&o) => Ok(if r? { Outcome::Success } else { Outcome::Problem }),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\nbluegreen demo: interrupted; the throwaway server is stopped and removed");
            Ok(Outcome::Problem)
        }
    }
}
