//! Parse arguments, run, map the outcome to an exit code: 0 success, 1 a problem found, 2 error.

use std::process::ExitCode;

use clap::Parser;

use bluegreen::cli::{Cli, Command};
use bluegreen::cmd::{self, Outcome};
use bluegreen::diag::Rejected;

fn main() -> ExitCode {
    bluegreen::control::events::mark_start();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match &cli.command {
            Command::Plan(a) => cmd::plan::run(a).await,
            Command::Prepare(a) => cmd::prepare::run(a).await,
            Command::Copy(a) => cmd::copy::run(a).await,
            Command::Sync(a) => cmd::sync::run(a).await,
            Command::Status(a) => cmd::status::run(a).await,
            Command::Validate(a) => cmd::validate::run(a).await,
            Command::Cutover(a) => cmd::cutover::run(a).await,
            Command::Rollback(a) => cmd::cutover::rollback(a).await,
            Command::Finalize(a) => cmd::cutover::finalize(a).await,
            Command::Demo(a) => cmd::demo::run(a).await,
        }
    });
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Problem) => ExitCode::from(1),
        Err(e) => {
            match e.downcast_ref::<Rejected>() {
                Some(r) => eprintln!("{r}"),
                None => eprintln!("error: {e:#}"),
            }
            ExitCode::from(2)
        }
    }
}
