//! `bluegreen demo`: the whole tool at work on a live workload, on a throwaway PostgreSQL.
//!
//! Starts a cluster ([`crate::pg::cluster`]), loads the legacy CarBot schema with generated data,
//! starts the simulated application ([`app`]), and runs the real commands, as a migration
//! engineer would from the runbook, as child processes of this binary: plan, copy with a
//! follower, validate, cutover, validate, rollback, validate, cutover again, validate. Each step
//! is narrated in a line; each command's own output goes to `logs/` in the output directory.
//! The summary's "writes lost" is computed from the rows of both schemas against what the
//! application committed, and any failed check makes the demo exit 1.

pub mod app;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::pg::cluster::Cluster;

/// The files the demo runs on, embedded so the binary needs nothing beside it, written into the
/// output directory with the repository's layout (the mapping names its DDL and checks by
/// relative path).
const FILES: [(&str, &str); 5] = [
    (
        "mappings/carbot.yaml",
        include_str!("../../mappings/carbot.yaml"),
    ),
    (
        "examples/carbot/green.sql",
        include_str!("../../examples/carbot/green.sql"),
    ),
    (
        "examples/carbot/legacy.sql",
        include_str!("../../examples/carbot/legacy.sql"),
    ),
    (
        "examples/carbot/generate.sql",
        include_str!("../../examples/carbot/generate.sql"),
    ),
    (
        "validation/carbot.yaml",
        include_str!("../../validation/carbot.yaml"),
    ),
];
const MAPPING: &str = "mappings/carbot.yaml";
/// Marks a directory the demo made, so a second run may reuse it (and never writes into a
/// directory of the user's).
const MARKER: &str = ".bluegreen-demo";

pub struct Options {
    /// Legacy leads to generate (everything else scales from it).
    pub rows: u64,
    /// Application sessions (every other one long-lived).
    pub writers: usize,
    /// Seconds of application traffic between the steps after the copy.
    pub window: Duration,
    pub out: PathBuf,
    pub keep: bool,
}

/// What the demo measured, for the summary.
#[derive(Default)]
struct Findings {
    rows_copied: u64,
    blocked: Vec<(String, u64)>,
    validations: Vec<(String, bool)>,
    max_backlog: Arc<AtomicU64>,
    max_lag_ms: Arc<AtomicU64>,
    failed: Vec<String>,
}

struct Demo {
    out: PathBuf,
    url: String,
    step: usize,
    steps: usize,
    started: Instant,
}

impl Demo {
    fn line(&mut self, what: &str, took: Duration) {
        self.step += 1;
        println!(
            "[{:>2}/{}] {what} ({:.1} s)",
            self.step,
            self.steps,
            took.as_secs_f64()
        );
    }

    fn spinner(&self, what: &str) -> ProgressBar {
        let p = ProgressBar::new_spinner();
        p.set_style(
            ProgressStyle::with_template("        {spinner} {msg} {elapsed}")
                .expect("a valid template"),
        );
        p.set_message(what.to_string());
        p.enable_steady_tick(Duration::from_millis(120));
        p
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.out
            .join("logs")
            .join(format!("{:02}-{name}.log", self.step + 1))
    }

    /// Run `bluegreen <args>` against the demo database; its output goes to the step's log.
    async fn bluegreen(&self, name: &str, args: &[&str]) -> Result<(i32, String)> {
        let exe = std::env::current_exe().context("locating the bluegreen binary")?;
        let out = tokio::process::Command::new(exe)
            .args(args)
            .env("DATABASE_URL", &self.url)
            .current_dir(&self.out)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("running bluegreen {}", args.join(" ")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let log = format!(
            "$ bluegreen {}\n{stdout}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(self.log_path(name), &log)?;
        Ok((out.status.code().unwrap_or(2), stdout))
    }

    async fn status(&self) -> Result<serde_json::Value> {
        let exe = std::env::current_exe()?;
        let out = tokio::process::Command::new(exe)
            .args(["status", "-m", MAPPING, "--format", "json"])
            .env("DATABASE_URL", &self.url)
            .current_dir(&self.out)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await?;
        serde_json::from_slice(&out.stdout).context("reading `bluegreen status --format json`")
    }
}

async fn connect(url: &str) -> Result<sqlx::PgConnection> {
    crate::pg::connect(url)
        .await
        .map_err(|d| anyhow::anyhow!("{d}"))
}

/// The last lines of a log, for a step that failed.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The output directory: created, or one an earlier demo made.
fn prepare_out(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)?.next().is_none();
        if !empty && !out.join(MARKER).exists() {
            bail!(
                "{} exists and was not made by `bluegreen demo`; give another --out directory",
                out.display()
            );
        }
    }
    std::fs::create_dir_all(out.join("logs"))?;
    std::fs::write(out.join(MARKER), "made by bluegreen demo\n")?;
    for (path, text) in FILES {
        let p = out.join(path);
        std::fs::create_dir_all(p.parent().expect("a relative path with a folder"))?;
        std::fs::write(p, text)?;
    }
    Ok(())
}

/// `writes blocked at most N ms` from cutover's or rollback's output.
fn blocked_ms(stdout: &str) -> Option<u64> {
    let rest = stdout.split("blocked at most ").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}

/// Run the demo; `Ok(true)` when every check passed.
pub async fn run(o: &Options) -> Result<bool> {
    prepare_out(&o.out)?;
    let out = o.out.canonicalize()?;
    println!(
        "bluegreen demo: the CarBot migration (legacy schema -> carbot_v2) on a throwaway PostgreSQL,\n\
         with {} application sessions writing throughout; command output in {}/logs\n",
        o.writers,
        out.display()
    );
    let started = Instant::now();
    let t = Instant::now();
    let mut cluster = tokio::task::spawn_blocking(Cluster::start)
        .await?
        .context("starting a throwaway PostgreSQL (see `bluegreen demo --help`)")?;
    let mut d = Demo {
        out: out.clone(),
        url: cluster.url("carbot"),
        step: 0,
        steps: 12,
        started,
    };
    d.line(
        &format!(
            "PostgreSQL started: {} (socket in {})",
            cluster.bindir().display(),
            cluster.socket_dir().display()
        ),
        t.elapsed(),
    );
    let result = scenario(&mut d, o).await;
    let passed = match result {
        Ok(p) => p,
        Err(e) => {
            println!("\nFAIL: {e:#}");
            false
        }
    };
    if o.keep {
        let (url, stop) = (cluster.url("carbot"), cluster.keep());
        println!(
            "\nThe server keeps running (--keep):\n  export DATABASE_URL='{url}'\n  psql \"$DATABASE_URL\"\n  bluegreen status -m {}\nStop it with:\n  {stop}",
            out.join(MAPPING).display()
        );
    } else {
        cluster.stop();
        println!("\nThe throwaway server is stopped and removed.");
    }
    Ok(passed)
}

async fn scenario(d: &mut Demo, o: &Options) -> Result<bool> {
    let mut f = Findings::default();
    // Legacy CarBot with data.
    let t = Instant::now();
    let p = d.spinner(&format!(
        "loading the legacy CarBot schema, {} leads",
        o.rows
    ));
    {
        let admin = d.url.replace("/carbot?", "/postgres?");
        let mut c = connect(&admin).await?;
        sqlx::raw_sql("CREATE DATABASE carbot")
            .execute(&mut c)
            .await?;
        let mut c = connect(&d.url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(FILES[2].1))
            .execute(&mut c)
            .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET carbot.leads = {};\n{}",
            o.rows, FILES[3].1
        )))
        .execute(&mut c)
        .await?;
    }
    let counts = {
        let mut c = connect(&d.url).await?;
        let r: (i64, i64, i64, i64) = sqlx::query_as("SELECT (SELECT count(*) FROM public.workshops), (SELECT count(*) FROM public.customers), (SELECT count(*) FROM public.leads), (SELECT count(*) FROM public.chat_messages)")
            .fetch_one(&mut c)
            .await?;
        r
    };
    p.finish_and_clear();
    d.line(
        &format!(
            "legacy CarBot loaded: {} workshops, {} customers, {} leads, {} chat messages",
            counts.0, counts.1, counts.2, counts.3
        ),
        t.elapsed(),
    );

    // Plan and the runbook.
    let t = Instant::now();
    let (code, _) = d.bluegreen("plan", &["plan", "-m", MAPPING]).await?;
    if code != 0 {
        bail!("plan failed:\n{}", tail(&d.log_path("plan")));
    }
    let (_, runbook) = d
        .bluegreen("runbook", &["plan", "-m", MAPPING, "--format", "markdown"])
        .await?;
    std::fs::write(d.out.join("runbook.md"), runbook)?;
    d.line(
        &format!(
            "plan: sound (7 green tables); runbook written to {}",
            d.out.join("runbook.md").display()
        ),
        t.elapsed(),
    );

    // The application.
    let app = app::start(&d.url, o.writers, Duration::from_millis(25)).await?;
    println!(
        "        the application writes from now on: {} sessions ({} long-lived, staying on blue through the flips; {} reconnecting per transaction, following search_path)",
        o.writers,
        o.writers.div_ceil(2),
        o.writers / 2
    );

    // Copy with a follower, until live.
    let t = Instant::now();
    let follower_log = d.out.join("logs").join("follower.log");
    let exe = std::env::current_exe()?;
    let mut follower = tokio::process::Command::new(exe)
        .args(["copy", "--follow", "-m", MAPPING])
        .env("DATABASE_URL", &d.url)
        .current_dir(&d.out)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&follower_log)?)
        .stderr(std::fs::File::create(
            d.out.join("logs").join("follower.err.log"),
        )?)
        .kill_on_drop(true)
        .spawn()
        .context("starting `bluegreen copy --follow`")?;
    let p = d.spinner("copy --follow: copying");
    loop {
        if let Some(s) = follower.try_wait()? {
            p.finish_and_clear();
            bail!(
                "copy --follow exited ({s}) before going live:\n{}",
                tail(&d.out.join("logs").join("follower.err.log"))
            );
        }
        if let Ok(st) = d.status().await {
            let copied: u64 = st["tables"]
                .as_array()
                .map(|ts| ts.iter().filter_map(|t| t["rows_copied"].as_u64()).sum())
                .unwrap_or(0);
            p.set_message(format!(
                "copy --follow: {copied} rows copied, phase {}",
                st["phase"]
            ));
            if st["phase"] == "live" {
                f.rows_copied = copied;
                break;
            }
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("copy not live after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    p.finish_and_clear();
    d.line(
        &format!(
            "copy --follow: {} rows copied in parallel chunks; live sync on, the follower keeps running",
            f.rows_copied
        ),
        t.elapsed(),
    );
    // Lag and backlog sampled from here on.
    let sampler = {
        let (url, out) = (d.url.clone(), d.out.clone());
        let (backlog, lag) = (f.max_backlog.clone(), f.max_lag_ms.clone());
        tokio::spawn(async move {
            let probe = Demo {
                out,
                url,
                step: 0,
                steps: 0,
                started: Instant::now(),
            };
            loop {
                if let Ok(st) = probe.status().await {
                    backlog.fetch_max(st["backlog"].as_u64().unwrap_or(0), Ordering::Relaxed);
                    if let Some(l) = st["lag_seconds"].as_f64() {
                        lag.fetch_max((l * 1000.0) as u64, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };

    let writes = |app: &app::App| app.counters.commits.load(Ordering::Relaxed);
    let traffic = async |d: &mut Demo, app: &app::App, what: &str| {
        let before = (writes(app), app.counters.on_green.load(Ordering::Relaxed));
        let p = d.spinner(what);
        tokio::time::sleep(o.window).await;
        p.finish_and_clear();
        println!(
            "        {what}: {} writes committed ({} by sessions on green)",
            writes(app) - before.0,
            app.counters.on_green.load(Ordering::Relaxed) - before.1
        );
    };
    let validate = async |d: &mut Demo, f: &mut Findings, when: &str, report: bool| -> Result<()> {
        let t = Instant::now();
        let p = d.spinner(&format!("validate {when}"));
        let name = format!("validate-{}", when.replace(' ', "-"));
        let dir = d.out.join("report");
        let mut args = vec!["validate", "-m", MAPPING];
        let dir_s = dir.to_string_lossy().into_owned();
        if report {
            args.extend(["--report", &dir_s]);
        }
        let (code, stdout) = d.bluegreen(&name, &args).await?;
        p.finish_and_clear();
        let verdict = stdout
            .lines()
            .find(|l| l.starts_with("validation of"))
            .unwrap_or("")
            .to_string();
        f.validations.push((when.to_string(), code == 0));
        if code != 0 {
            f.failed
                .push(format!("validate {when}: {}", d.log_path(&name).display()));
        }
        d.line(
            &format!(
                "validate {when}: {}",
                verdict.rsplit(": ").next().unwrap_or("?")
            ),
            t.elapsed(),
        );
        Ok(())
    };
    let flip = async |d: &mut Demo, f: &mut Findings, name: &str, args: &[&str]| -> Result<()> {
        let t = Instant::now();
        let p = d.spinner(name);
        let (code, stdout) = d.bluegreen(&name.replace(' ', "-"), args).await?;
        p.finish_and_clear();
        if code != 0 {
            bail!(
                "{name} failed:\n{}",
                tail(&d.log_path(&name.replace(' ', "-")))
            );
        }
        let ms = blocked_ms(&stdout).unwrap_or(0);
        f.blocked.push((name.to_string(), ms));
        d.line(
            &format!("{name}: one transaction, application writes blocked at most {ms} ms"),
            t.elapsed(),
        );
        Ok(())
    };

    traffic(d, &app, "application traffic on blue, green kept in step").await;
    validate(d, &mut f, "while the application writes", false).await?;
    flip(
        d,
        &mut f,
        "cutover",
        &["cutover", "-m", MAPPING, "--yes", "--accept-lossy-rollback"],
    )
    .await?;
    traffic(
        d,
        &app,
        "traffic after the flip (new sessions on green, reverse sync to blue)",
    )
    .await;
    validate(d, &mut f, "after cutover", false).await?;
    flip(d, &mut f, "rollback", &["rollback", "-m", MAPPING, "--yes"]).await?;
    traffic(d, &app, "traffic after the rollback (back on blue)").await;
    validate(d, &mut f, "after rollback", false).await?;
    flip(
        d,
        &mut f,
        "second cutover",
        &["cutover", "-m", MAPPING, "--yes", "--accept-lossy-rollback"],
    )
    .await?;
    traffic(d, &app, "traffic after the second cutover").await;

    // Stop the application, let the follower drain, check everything.
    let t = Instant::now();
    let counters = app.counters.clone();
    let ledger = app.stop().await;
    let p = d.spinner("waiting for the follower to drain");
    let drained = loop {
        let st = d.status().await?;
        if st["backlog"] == 0 && st["rederive"].as_array().is_none_or(|r| r.is_empty()) {
            break true;
        }
        if t.elapsed() > Duration::from_secs(120) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    p.finish_and_clear();
    sampler.abort();
    if !drained {
        f.failed
            .push("the follower did not drain within 2 minutes".into());
    }
    d.line("application stopped, follower drained", t.elapsed());
    validate(d, &mut f, "at the end", true).await?;
    let lost = {
        let mut c = connect(&d.url).await?;
        let mut l = ledger.lost(&mut c, true).await?;
        l.extend(ledger.lost(&mut c, false).await?);
        l
    };
    let _ = follower.start_kill();
    let _ = follower.wait().await;

    // The summary.
    let errors = counters.errors.load(Ordering::Relaxed);
    let mut s = String::from("\nSummary\n");
    let _ = writeln!(s, "  rows copied          {}", f.rows_copied);
    let _ = writeln!(
        s,
        "  application writes   {} committed ({} by sessions on green), {} retried after sync gave way (40001)",
        counters.commits.load(Ordering::Relaxed),
        counters.on_green.load(Ordering::Relaxed),
        counters.retried.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        s,
        "  writes lost          {} (each of the {} rows the application wrote, as it last committed it, looked up in blue and in green)",
        lost.len(),
        ledger.keys()
    );
    for l in lost.iter().take(10) {
        let _ = writeln!(s, "                         {l}");
    }
    let _ = writeln!(s, "  application errors   {errors}");
    if let Some(e) = counters.first_error.lock().unwrap().as_ref() {
        let _ = writeln!(s, "                         first: {e}");
    }
    let _ = writeln!(
        s,
        "  longest write block  {}",
        f.blocked
            .iter()
            .map(|(n, ms)| format!("{n} {ms} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "  follower             backlog at most {} change(s), lag at most {:.1} s",
        f.max_backlog.load(Ordering::Relaxed),
        f.max_lag_ms.load(Ordering::Relaxed) as f64 / 1000.0
    );
    let _ = writeln!(
        s,
        "  validations          {}",
        f.validations
            .iter()
            .map(|(w, ok)| format!("{w}: {}", if *ok { "PASS" } else { "FAIL" }))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        s,
        "  sign-off report      {}",
        d.out.join("report").join("report.md").display()
    );
    let _ = writeln!(
        s,
        "  run report           {} (verdict, timeline, tables; open it in a browser)",
        d.out.join("report").join("report.html").display()
    );
    let _ = writeln!(
        s,
        "  runbook              {}",
        d.out.join("runbook.md").display()
    );
    let _ = writeln!(s, "  command output       {}", d.out.join("logs").display());
    let _ = writeln!(
        s,
        "  took                 {:.0} s",
        d.started.elapsed().as_secs_f64()
    );
    let passed = lost.is_empty() && errors == 0 && f.failed.is_empty();
    for x in &f.failed {
        let _ = writeln!(s, "  failed: {x}");
    }
    let _ = write!(s, "\n{}", if passed { "PASS" } else { "FAIL" });
    println!("{s}");
    Ok(passed)
}
