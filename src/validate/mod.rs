//! `validate`: proves green = M(blue) in one consistent snapshot while the application writes
//! (DESIGN.md step 4), locates every difference, runs the checks file, and writes a report.
//!
//! Parallel workers share one exported snapshot (`pg_export_snapshot` / `SET TRANSACTION
//! SNAPSHOT`), so blue and green are read at the same instant. Each green table is split into key
//! ranges from green's own data (quantiles of its first key column); the blue side reads M(blue)
//! restricted to the same range of the same value, cast to the green type. Every row of both sides
//! is rendered as the text of a row of the green column types (`ROW(...)::text`, with the session
//! settings pinned on every connection) and hashed with blake3 on rayon threads; a chunk's digest is
//! its row count and the wrapping sum of its row hashes (order-free), a table's the sum of its
//! chunks'. Chunks that differ are compared row by row by key to name the missing, extra,
//! duplicated and changed rows and the differing columns.

pub mod checks;
mod digest;
pub mod html;
mod lag;
mod locate;
pub mod report;
pub mod timeline;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sqlx::{PgConnection, Row};

use crate::catalog::{self, Catalog};
use crate::control::{self, chunks, events, runs, validations};
use crate::diag::Diagnostic;
use crate::mapping::{Mapping, TableEntry};
use crate::pg::{db_error, exec};
use crate::plan::chunks::{condition, planned_count, scattered_column};
use crate::plan::query::{Shape, mapping_select_typed};
use crate::plan::upsert_key;
use crate::sql::{Ident, Literal, QName, Sql, TypeName, join, sql};

use digest::stream_digest;
pub use digest::{Digest, digest_rows};
pub use locate::{Difference, DifferenceKind};

#[derive(Clone, Debug)]
pub struct Options {
    pub jobs: u32,
    pub chunk_rows: u64,
    pub max_diffs: usize,
    pub show_values: bool,
    /// Keys still pending after every re-check round do not fail the validation.
    pub allow_hot: bool,
    /// A worker moves to a fresh snapshot between chunks once its snapshot is this old (a long
    /// snapshot keeps the change log's dead rows from being vacuumed).
    pub max_snapshot_age: std::time::Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableResult {
    pub table: String,
    pub matches: bool,
    pub blue_rows: u64,
    pub green_rows: u64,
    pub blue_digest: String,
    pub green_digest: String,
    pub chunks: usize,
    pub differing_chunks: usize,
    pub missing: u64,
    pub extra: u64,
    pub duplicated: u64,
    pub changed: u64,
    /// Keys that differed in the snapshot while a change touching them was pending, and matched
    /// once it was applied.
    pub pending_rechecked: u64,
    /// Keys still pending after every re-check round: neither verified nor found different.
    pub unverified_hot: u64,
    /// After a cutover, for an invertible table: the green writes whose reverse failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverse: Option<ReverseResult>,
    /// After a cutover, an entry without a reverse is the new application's (insert-only from
    /// blue): not compared.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub not_compared: bool,
}

/// Reverse sync of one invertible entry after a cutover (or a rollback, while reverse sync stays).
///
/// The verdict on the rows themselves is the forward comparison, which goes on after the flip:
/// `green = M(blue)` exactly. That is the condition for a lossless rollback (after it, live sync
/// resumes with nothing to repair), and it catches a green write whose reverse wrote the wrong
/// blue row (`M(R(g)) <> g`) or none. `blue = R(green)` is not a property to check: a blue row
/// nobody wrote since the flip keeps its legacy values, which `R(M(b))` normalizes (a NULL
/// priority comes back as 'medium'), so it would report every such row.
#[derive(Debug, Clone, Serialize)]
pub struct ReverseResult {
    pub blue_table: String,
    pub matches: bool,
    /// Green writes whose reverse failed and was recorded (`reverse_failures`): not in blue until
    /// `sync` retries them.
    pub failed: u64,
    /// Up to ten of their green keys.
    pub keys: Vec<String>,
}

/// The standing reverse failures of every invertible entry, in one snapshot.
async fn reverse_checks(
    url: &str,
    m: &Mapping,
    cat: &catalog::Catalog,
) -> Result<Vec<(String, ReverseResult)>, Diagnostic> {
    let entries = crate::plan::sync::sync_entries(m, cat);
    let revs = crate::plan::sync::reversals(m, &entries, cat);
    if revs.is_empty() {
        return Ok(Vec::new());
    }
    let mut c = crate::pg::connect(url).await?;
    let mut out = Vec::new();
    for r in &revs {
        let failed: Vec<String> = sqlx::query_scalar(
            control::statement(
                m,
                "SELECT green_key::text FROM {reverse_failures} WHERE migration = $1 AND green_table = $2 ORDER BY 1",
            )
            .assert_safe(),
        )
        .bind(&m.migration)
        .bind(&r.entry)
        .fetch_all(&mut c)
        .await
        .map_err(db_error)?;
        out.push((
            r.entry.clone(),
            ReverseResult {
                blue_table: r.blue.display(),
                matches: failed.is_empty(),
                failed: failed.len() as u64,
                keys: failed.into_iter().take(10).collect(),
            },
        ));
    }
    Ok(out)
}

/// One chunk to compare: the same key range on both sides.
struct Task {
    entry: usize,
    green_cond: String,
    blue_cond: String,
}

struct ChunkResult {
    entry: usize,
    blue: Digest,
    green: Digest,
    differences: Vec<Difference>,
}

pub struct Outcome {
    pub tables: Vec<TableResult>,
    pub differences: Vec<Difference>,
    pub snapshot_lsn: String,
    pub phase: control::Phase,
}

/// How an entry's rows are split into chunks: ranges of one green column, each chunk's blue side
/// filtered on the blue column that holds the same value (so blue's own index serves each
/// chunk).
struct RangeKey<'a> {
    column: &'a str,
    expr: &'a str,
    green_type: &'a str,
    blue_column: String,
    /// Ranges of it are scattered over blue's or green's heap (`plan::chunks::scattered`).
    scattered: bool,
}

/// The range column of an entry: a column of one of green's NOT NULL unique keys (the upsert
/// key's first column first) filled by a plain or widened blue column, with no value map, and
/// compared under the same collation on both sides (else a row could fall into different chunks
/// on the two sides). None when no key column is a blue column: ranges of a computed key (an
/// `md5(...)::uuid` id) would make every chunk compute it over the whole of blue, so such an
/// entry is one chunk.
fn range_key<'a>(e: &'a TableEntry, gt: &'a catalog::Table, cat: &Catalog) -> Option<RangeKey<'a>> {
    let mut keys = gt.arbiter_keys();
    if let Some(u) = upsert_key(e, gt) {
        keys.retain(|k| *k != u);
        keys.insert(0, u);
    }
    // First columns of every key before the others: they spread best.
    let width = keys.iter().map(Vec::len).max().unwrap_or(0);
    let columns = (0..width).flat_map(|i| keys.iter().filter_map(move |k| k.get(i)));
    let aliases = e.from_clause.aliases();
    for name in columns {
        let (Some(c), Some(g)) = (e.column(name), gt.column(name)) else {
            continue;
        };
        if c.value_map.is_some() || g.own_equality {
            continue;
        }
        let [a] = crate::sql::scan::referenced_aliases(&c.expr.text, &aliases)[..] else {
            continue;
        };
        let Some(bt) = e
            .from_clause
            .item_by_alias(a)
            .and_then(|it| cat.table(&it.table))
        else {
            continue;
        };
        // A plain column, or a cast of one to green's own type (`(p.id)::bigint`): another cast
        // may narrow (`i.amt::numeric(10,0)` rounds 9.6 into the range of 10 on green's side
        // while blue's row stays below it).
        let Some(bc) = crate::plan::keys::plain_column_of(&c.expr.text, a)
            .or_else(|| crate::plan::keys::cast_to(&c.expr.text, a, &g.type_sql))
        else {
            continue;
        };
        // Every blue value a distinct green value in the same order.
        if !bt
            .column(&bc)
            .is_some_and(|b| crate::plan::keys::widening(&b.type_sql, &g.type_sql))
        {
            continue;
        }
        if bt.column(&bc).map(|b| &b.collation) != Some(&g.collation) {
            continue;
        }
        let cache = cat.server.shared_buffers;
        return Some(RangeKey {
            column: c.name.as_str(),
            expr: c.expr.text.as_str(),
            green_type: g.type_sql.as_str(),
            blue_column: format!("{}.{}", Ident::new(a), Ident::new(&bc)),
            scattered: scattered_column(gt, &c.name, cache) || scattered_column(bt, &bc, cache),
        });
    }
    None
}

fn green_rows_sql(e: &TableEntry, gt: &catalog::Table, cond: &str) -> Sql {
    let cols = join(
        e.columns
            .iter()
            .filter(|c| gt.column(&c.name).is_some())
            .map(|c| Ident::new(&c.name)),
        ", ",
    );
    sql!(
        "SELECT ROW({cols})::text FROM {} AS bluegreen_g WHERE {cond}",
        gt.qname()
    )
}

/// M(blue) in green types restricted to `cond`; a value outside a default-less map becomes NULL
/// (and so a difference) instead of aborting the whole comparison.
fn blue_select(m: &Mapping, e: &TableEntry, gt: &catalog::Table, cond: &str) -> Sql {
    mapping_select_typed(
        e,
        gt,
        &m.control_schema,
        &Shape {
            extra_where: vec![cond.to_string()],
            lenient: true,
            ..Shape::default()
        },
    )
}

fn blue_rows_sql(m: &Mapping, e: &TableEntry, gt: &catalog::Table, cond: &str) -> Sql {
    let cols = join(
        e.columns
            .iter()
            .filter(|c| gt.column(&c.name).is_some())
            .map(|c| format!("b.{}", Ident::new(&c.name))),
        ", ",
    );
    sql!(
        "SELECT ROW({cols})::text FROM ({}) AS b",
        blue_select(m, e, gt, cond)
    )
}

/// Whether `x` can filter the rows of the entry's `from` (an aggregate cannot: then the table is
/// one chunk). Asked under a savepoint inside the snapshot's transaction.
async fn filters_rows(
    conn: &mut PgConnection,
    e: &TableEntry,
    x: &str,
) -> Result<bool, Diagnostic> {
    let probe = sql!(
        "SAVEPOINT bluegreen_v; SELECT 1 FROM {} WHERE ({x}) IS NULL LIMIT 0",
        e.from_clause.render()
    );
    match exec(conn, &probe).await {
        Ok(()) => exec(conn, &sql!("RELEASE SAVEPOINT bluegreen_v"))
            .await
            .map(|_| true),
        Err(_) => exec(conn, &sql!("ROLLBACK TO SAVEPOINT bluegreen_v"))
            .await
            .map(|_| false),
    }
}

/// Plan the chunks of every entry from green's data, inside the snapshot: ranges of green's
/// first key column, the blue side filtered on the expression that fills it (in green's type),
/// or, when that expression is a blue column (or a cast that keeps every value), on the column
/// itself with the bounds in its own type, so blue's index serves the range.
async fn plan_tasks(
    conn: &mut PgConnection,
    m: &Mapping,
    cat: &Catalog,
    chunk_rows: u64,
    jobs: u32,
) -> Result<Vec<Task>, Diagnostic> {
    let mut tasks = Vec::new();
    for (i, e) in m.tables.iter().enumerate() {
        let gt = cat.table(&QName::new(&m.green, &e.name)).ok_or_else(|| {
            Diagnostic::error(
                "unknown-green-table",
                format!(
                    "green table {}.{} is missing: run prepare and copy first",
                    m.green, e.name
                ),
            )
        })?;
        let key = match range_key(e, gt, cat) {
            Some(k) if filters_rows(conn, e, k.expr).await? => Some(k),
            _ => None,
        };
        let Some(k) = key else {
            tasks.push(Task {
                entry: i,
                green_cond: "true".into(),
                blue_cond: "true".into(),
            });
            continue;
        };
        let green_key = format!("bluegreen_g.{}", Ident::new(k.column));
        let rows = chunks::estimate_rows(conn, &gt.qname(), gt.reltuples).await?;
        let source = format!("{} AS bluegreen_g", gt.qname());
        let n = planned_count(rows, chunk_rows, jobs, k.scattered);
        let ranges = chunks::key_ranges(conn, &green_key, &source, n).await?;
        let green_bound = |v: &str| format!("{}::{}", Literal::new(v), TypeName(k.green_type));
        // Both sides compare with bounds in green's type: a green value outside blue's narrower
        // type (an extra row of 3,000,000,000 over an integer column) must be a difference, not an
        // error; the comparison across widened types (integer against bigint) is exact and still
        // served by blue's index.
        let blue_bound = green_bound;
        for r in ranges {
            tasks.push(Task {
                entry: i,
                green_cond: condition(&green_key, &r, green_bound),
                blue_cond: condition(&k.blue_column, &r, blue_bound),
            });
        }
    }
    Ok(tasks)
}

/// Compare every table in one snapshot with `jobs` workers.
pub async fn compare(url: &str, m: &Mapping, o: &Options) -> Result<Outcome, Diagnostic> {
    let mut main = crate::pg::connect(url).await?;
    let phase = runs::phase(&mut main, m).await?;
    let cat = Arc::new(control::load_catalog(&mut main, m).await?);
    // The exporter holds the snapshot open until every worker has attached to it, and not a moment
    // longer: an open snapshot pins the change log's dead rows (rule M1).
    exec(
        &mut main,
        &sql!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
    )
    .await?;
    let row = sqlx::query("SELECT pg_export_snapshot() AS s, pg_current_wal_lsn()::text AS lsn")
        .fetch_one(&mut main)
        .await
        .map_err(db_error)?;
    let snapshot: String = row.get("s");
    let lsn: String = row.get("lsn");
    exec(
        &mut main,
        &crate::plan::query::set_mapping_search_path(m, true),
    )
    .await?;
    let tasks = plan_tasks(&mut main, m, &cat, o.chunk_rows, o.jobs).await?;
    let ntasks = tasks.len();
    let queue = Arc::new(Mutex::new(tasks.into_iter().collect::<VecDeque<_>>()));
    // Progress: a bar over all chunks on a terminal, a line every tenth of the work otherwise.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(ntasks as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "validating [{bar:30}] {pos}/{len} chunks  {msg}  eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b
    });
    let done_chunks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<ChunkResult>>> = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    // Each worker says when it has attached (or drops its sender when it fails first).
    let (attached_tx, mut attached) = tokio::sync::mpsc::channel::<()>(o.jobs.max(1) as usize);
    for _ in 0..o.jobs.max(1) {
        let attached_tx = attached_tx.clone();
        let (url, m, cat, queue, results, snapshot, o) = (
            url.to_string(),
            m.clone(),
            cat.clone(),
            queue.clone(),
            results.clone(),
            snapshot.clone(),
            o.clone(),
        );
        let (bar, done_chunks) = (bar.clone(), done_chunks.clone());
        workers.push(tokio::spawn(async move {
            let mut c = crate::pg::connect(&url).await?;
            exec(&mut c, &sql!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; {}",
                Literal::new(&snapshot),
                crate::plan::query::set_mapping_search_path(&m, true)
            ))
            .await?;
            let _ = attached_tx.send(()).await;
            drop(attached_tx);
            let mut snapshot_taken = std::time::Instant::now();
            loop {
                let Some(t) = queue.lock().expect("queue").pop_front() else {
                    break;
                };
                if snapshot_taken.elapsed() > o.max_snapshot_age {
                    // A chunk compares blue and green in one snapshot; between chunks a worker
                    // may move to a fresh one, so no snapshot pins the change log's dead rows
                    // for the whole run.
                    exec(
                        &mut c,
                        &sql!(
                            "COMMIT; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {}",
                            crate::plan::query::set_mapping_search_path(&m, true)
                        ),
                    )
                    .await?;
                    snapshot_taken = std::time::Instant::now();
                }
                let e = &m.tables[t.entry];
                let gt = cat.table(&QName::new(&m.green, &e.name)).expect("planned");
                let green = stream_digest(&mut c, &green_rows_sql(e, gt, &t.green_cond))
                    .await
                    .map_err(|err| chunk_err(e, &err))?;
                let blue = stream_digest(&mut c, &blue_rows_sql(&m, e, gt, &t.blue_cond))
                    .await
                    .map_err(|err| chunk_err(e, &err))?;
                let differences = if green != blue {
                    locate::locate(&mut c, &m, e, gt, locate::Rows::Chunk(&t), o.show_values)
                        .await
                        .map_err(|err| chunk_err(e, &err))?
                } else {
                    Vec::new()
                };
                results.lock().expect("results").push(ChunkResult {
                    entry: t.entry,
                    blue,
                    green,
                    differences,
                });
                let n = done_chunks.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                match &bar {
                    Some(b) => {
                        b.set_position(n as u64);
                        b.set_message(e.name.clone());
                    }
                    None if n % ntasks.div_ceil(10) == 0 || n == ntasks => {
                        eprintln!("bluegreen: validated {n}/{ntasks} chunks ({})", e.name)
                    }
                    None => {}
                }
            }
            exec(&mut c, &sql!("COMMIT")).await?;
            Ok::<(), Diagnostic>(())
        }));
    }
    drop(attached_tx);
    while attached.recv().await.is_some() {}
    exec(&mut main, &sql!("COMMIT")).await?;
    for w in workers {
        w.await
            .map_err(|e| Diagnostic::error("internal", e.to_string()))??;
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let results = Arc::try_unwrap(results)
        .ok()
        .expect("workers done")
        .into_inner()
        .expect("results");
    assert_eq!(results.len(), ntasks);

    let mut per: BTreeMap<usize, (Digest, Digest, usize, usize, Vec<Difference>)> = BTreeMap::new();
    for r in results {
        let p = per.entry(r.entry).or_default();
        p.0.add(r.blue);
        p.1.add(r.green);
        p.2 += 1;
        if r.blue != r.green {
            p.3 += 1;
        }
        p.4.extend(r.differences);
    }
    let mut tables = Vec::new();
    let mut all_diffs = Vec::new();
    for (i, (b, g, chunks, differing, mut diffs)) in per {
        diffs.sort_by(|a, b| (&a.kind, &a.key).cmp(&(&b.kind, &b.key)));
        let count = |k: DifferenceKind| diffs.iter().filter(|d| d.kind == k).count() as u64;
        tables.push(TableResult {
            table: m.tables[i].name.clone(),
            matches: b == g,
            blue_rows: b.rows,
            green_rows: g.rows,
            blue_digest: b.hex(),
            green_digest: g.hex(),
            chunks,
            differing_chunks: differing,
            missing: count(DifferenceKind::Missing),
            extra: count(DifferenceKind::Extra),
            duplicated: count(DifferenceKind::Duplicated),
            changed: count(DifferenceKind::Changed),
            pending_rechecked: 0,
            unverified_hot: 0,
            reverse: None,
            not_compared: false,
        });
        all_diffs.extend(diffs);
    }
    Ok(Outcome {
        tables,
        differences: all_diffs,
        snapshot_lsn: lsn,
        phase,
    })
}

fn chunk_err(e: &TableEntry, err: &sqlx::Error) -> Diagnostic {
    Diagnostic::error(
        "validate-failed",
        format!("comparing {} failed: {err}", e.name),
    )
    .table(&e.name)
}

/// Everything `validate` does: compare, run the checks file, assemble and seal the report, and
/// record the result in the control schema for the cutover gate.
pub async fn run(url: &str, m: &Mapping, o: &Options) -> Result<report::Report, Diagnostic> {
    let checks_file = m.checks.as_deref().map(checks::load).transpose()?;
    let m = &{
        let mut c = crate::pg::connect(url).await?;
        if control::exists(&mut c, m).await?
            && runs::phase(&mut c, m).await? >= control::Phase::Prepared
        {
            // Blue changed shape, or a sync trigger was dropped or disabled: nothing validated
            // now would say anything about the rows written since.
            runs::check_drift(&mut c, m).await?;
            runs::resolved_mapping(&mut c, m).await?
        } else {
            m.clone()
        }
    };
    let mut outcome = compare(url, m, o).await?;
    let reverse = if matches!(
        outcome.phase,
        control::Phase::CutOver | control::Phase::RolledBack
    ) {
        let mut c = crate::pg::connect(url).await?;
        let cat = control::load_catalog(&mut c, m).await?;
        reverse_checks(url, m, &cat).await?
    } else {
        Vec::new()
    };
    // After the flip green is the application's: entries without a reverse only take inserts
    // from blue, so green = M(blue) is no longer theirs to hold.
    let not_compared: Vec<String> = if outcome.phase == control::Phase::CutOver {
        m.tables
            .iter()
            .filter(|e| !reverse.iter().any(|(r, _)| *r == e.name))
            .map(|e| e.name.clone())
            .collect()
    } else {
        Vec::new()
    };
    outcome
        .differences
        .retain(|d| !not_compared.contains(&d.table));
    // Differences of keys a pending change touches are not differences: apply, re-check, decide.
    let settled = lag::settle(
        url,
        m,
        std::mem::take(&mut outcome.differences),
        o.show_values,
    )
    .await?;
    for t in &mut outcome.tables {
        let real: Vec<&Difference> = settled.real.iter().filter(|d| d.table == t.table).collect();
        let count = |k: DifferenceKind| real.iter().filter(|d| d.kind == k).count() as u64;
        t.missing = count(DifferenceKind::Missing);
        t.extra = count(DifferenceKind::Extra);
        t.duplicated = count(DifferenceKind::Duplicated);
        t.changed = count(DifferenceKind::Changed);
        t.pending_rechecked = settled.rechecked.get(&t.table).copied().unwrap_or(0);
        t.unverified_hot = settled.hot.iter().filter(|d| d.table == t.table).count() as u64;
        t.matches = real.is_empty() && (t.unverified_hot == 0 || o.allow_hot);
        if not_compared.contains(&t.table) {
            t.matches = true;
            t.not_compared = true;
        }
        if let Some((_, rr)) = reverse.iter().find(|(e, _)| *e == t.table) {
            t.matches &= rr.matches;
            t.reverse = Some(rr.clone());
        }
    }
    let (pending_applied, hot_total) = (settled.applied, settled.hot.len() as u64);
    let pending_rechecked: u64 = settled.rechecked.values().sum();
    let mut found = settled.real;
    found.sort_by(|a, b| (&a.table, &a.kind, &a.key).cmp(&(&b.table, &b.kind, &b.key)));
    outcome.differences = found;
    let mut conn = crate::pg::connect(url).await?;
    let (checks, performance) = match &checks_file {
        Some(f) => (
            {
                // While cut over, a check that holds only while blue is the application's is
                // reported as skipped, in file order.
                let cut_over = outcome.phase == control::Phase::CutOver;
                let run: Vec<checks::Check> = f
                    .checks
                    .iter()
                    .filter(|c| !(cut_over && c.until_cutover))
                    .cloned()
                    .collect();
                let mut ran = lag::checks_when_caught_up(url, m, &run).await?.into_iter();
                f.checks
                    .iter()
                    .map(|c| {
                        if cut_over && c.until_cutover {
                            checks::CheckResult::skipped(c)
                        } else {
                            ran.next().expect("one result per check run")
                        }
                    })
                    .collect()
            },
            checks::run_budgets(&mut conn, &f.performance).await,
        ),
        None => (Vec::new(), Vec::new()),
    };
    let facts = sqlx::query("SELECT current_user::text AS who, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS at, current_setting('server_version') AS v")
        .fetch_one(&mut conn)
        .await
        .map_err(db_error)?;
    let os_user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let passed = outcome.tables.iter().all(|t| t.matches)
        && checks
            .iter()
            .all(|c| c.passed || (c.inconclusive && o.allow_hot))
        && performance.iter().all(|p| p.passed);
    let total = outcome.differences.len();
    let mut differences = outcome.differences;
    differences.truncate(o.max_diffs);
    let mut r = report::Report {
        format_version: report::FORMAT_VERSION,
        verdict: if passed {
            report::Verdict::Pass
        } else {
            report::Verdict::Fail
        },
        migration: m.migration.clone(),
        phase: outcome.phase,
        ran_by: format!(
            "{os_user} (database role {})",
            facts.get::<String, _>("who")
        ),
        ran_at: facts.get("at"),
        database: crate::pg::redact_url(url),
        server_version: facts.get("v"),
        mapping_file: m.path.display().to_string(),
        mapping_digest: m.digest(),
        snapshot_lsn: outcome.snapshot_lsn,
        values_shown: o.show_values,
        tables: outcome.tables,
        differences_total: total,
        differences_shown: differences.len(),
        pending_applied,
        pending_rechecked,
        unverified_hot: hot_total,
        hot_allowed: o.allow_hot,
        differences,
        checks,
        performance,
        report_digest: String::new(),
    };
    r.seal();
    // The cutover gate reads the latest result; a database without the control schema (validate
    // before prepare) just has nowhere to record it.
    if control::exists(&mut conn, m).await? {
        validations::record(
            &mut conn,
            m,
            &validations::Recorded {
                passed,
                mapping_digest: &r.mapping_digest,
                report_digest: &r.report_digest,
                snapshot_lsn: &r.snapshot_lsn,
                summary: serde_json::json!({"tables": r.tables, "differences_total": r.differences_total, "checks_failed": r.checks.iter().filter(|c| !c.passed).count()}),
            },
        )
        .await?;
        events::record(
            &mut conn,
            m,
            "validate",
            r.verdict.as_str(),
            serde_json::json!({"report_digest": r.report_digest}),
        )
        .await?;
    }
    Ok(r)
}
