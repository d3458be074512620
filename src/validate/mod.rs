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
pub mod report;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use rayon::prelude::*;
use serde::Serialize;
use sqlx::{PgConnection, Row};

use crate::catalog::{self, Catalog};
use crate::copy::load_catalog;
use crate::diag::Diagnostic;
use crate::mapping::{Mapping, TableEntry};
use crate::plan::query::{Shape, mapping_select_typed};
use crate::plan::sync::upsert_key;
use crate::sql::{Expr, Ident, Literal, QName, Sql, TypeName, join};
use crate::state::exec;

#[derive(Clone, Debug)]
pub struct Options {
    pub jobs: u32,
    pub chunk_rows: u64,
    pub max_diffs: usize,
    pub show_values: bool,
}

/// Rows hashed per rayon batch while streaming (bounds memory per worker).
const HASH_BATCH: usize = 8_192;

/// count + order-free digest of a set of rendered rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digest {
    pub rows: u64,
    pub sum: u128,
}

impl Digest {
    pub fn add(&mut self, other: Digest) {
        self.rows += other.rows;
        self.sum = self.sum.wrapping_add(other.sum);
    }
    pub fn hex(&self) -> String {
        format!("{:032x}", self.sum)
    }
}

/// Hash rendered rows on the rayon pool.
pub fn digest_rows(rows: &[String]) -> Digest {
    let sum = rows
        .par_iter()
        .map(|r| {
            let h = blake3::hash(r.as_bytes());
            u128::from_le_bytes(h.as_bytes()[..16].try_into().expect("16 bytes"))
        })
        .reduce(|| 0u128, u128::wrapping_add);
    Digest {
        rows: rows.len() as u64,
        sum,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub table: String,
    /// `missing` (in blue's M, not in green), `extra` (in green only), `duplicated` (the key occurs
    /// a different number of times), `changed` (same key, other values).
    pub kind: String,
    pub key: String,
    pub columns: Vec<String>,
    /// The differing values, only with --show-values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
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
}

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
    pub phase: String,
}

/// The key range column of an entry: green's first upsert-key column and the expression that
/// fills it, when that expression can filter blue rows (no aggregate, no value map).
fn range_key<'a>(e: &'a TableEntry, gt: &'a catalog::Table) -> Option<(&'a str, &'a str, &'a str)> {
    let key = upsert_key(e, gt)?;
    let c = e.column(&key[0])?;
    if c.value_map.is_some() {
        return None;
    }
    let ty = gt.column(&c.name)?.type_sql.as_str();
    Some((c.name.as_str(), c.expr.text.as_str(), ty))
}

fn green_rows_sql(e: &TableEntry, gt: &catalog::Table, cond: &str) -> String {
    let cols = join(
        e.columns
            .iter()
            .filter(|c| gt.column(&c.name).is_some())
            .map(|c| Ident::new(&c.name)),
        ", ",
    );
    format!(
        "SELECT ROW({cols})::text FROM {} AS g WHERE {cond}",
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

fn blue_rows_sql(m: &Mapping, e: &TableEntry, gt: &catalog::Table, cond: &str) -> String {
    let cols = join(
        e.columns
            .iter()
            .filter(|c| gt.column(&c.name).is_some())
            .map(|c| format!("b.{}", Ident::new(&c.name))),
        ", ",
    );
    format!(
        "SELECT ROW({cols})::text FROM ({}) AS b",
        blue_select(m, e, gt, cond)
    )
}

/// Plan the chunks of every entry from green's data, inside the snapshot.
async fn plan_tasks(
    conn: &mut PgConnection,
    m: &Mapping,
    cat: &Catalog,
    chunk_rows: u64,
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
        let key = range_key(e, gt);
        let usable = match key {
            Some((_, x, _)) => {
                // An aggregate cannot filter blue rows: then the table is one chunk.
                let probe = Sql(format!(
                    "SAVEPOINT bluegreen_v; SELECT 1 FROM {} WHERE ({x}) IS NULL LIMIT 0",
                    e.from_clause.render()
                ));
                match exec(conn, &probe).await {
                    Ok(()) => {
                        exec(conn, &Sql("RELEASE SAVEPOINT bluegreen_v".into())).await?;
                        true
                    }
                    Err(_) => {
                        exec(conn, &Sql("ROLLBACK TO SAVEPOINT bluegreen_v".into())).await?;
                        false
                    }
                }
            }
            None => false,
        };
        let Some((col, x, ty)) = key.filter(|_| usable) else {
            tasks.push(Task {
                entry: i,
                green_cond: "true".into(),
                blue_cond: "true".into(),
            });
            continue;
        };
        // The chunk count needs an estimate only (copy analysed green); count when never analysed.
        let rows: f64 = if gt.reltuples >= 0.0 {
            gt.reltuples
        } else {
            sqlx::query_scalar(
                Sql(format!("SELECT count(*)::float8 FROM {}", gt.qname())).assert_safe(),
            )
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?
        };
        let n = ((rows / chunk_rows as f64).ceil() as usize).max(1);
        let mut bounds: Vec<String> = Vec::new();
        if n > 1 {
            let fracs = join((1..n).map(|k| format!("{:.6}", k as f64 / n as f64)), ", ");
            let b: Option<Vec<Option<String>>> = sqlx::query_scalar(Sql(format!(
                "SELECT percentile_disc(ARRAY[{fracs}]::float8[]) WITHIN GROUP (ORDER BY {})::text[] FROM {}",
                Ident::new(col),
                gt.qname()
            )).assert_safe())
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
            for v in b.unwrap_or_default().into_iter().flatten() {
                if !bounds.contains(&v) {
                    bounds.push(v);
                }
            }
        }
        let g = format!("g.{}", Ident::new(col));
        let b = format!("({})::{}", Expr(x), TypeName(ty));
        let cond = |v: &str, lo: &Option<String>, hi: &Option<String>| {
            let mut c = vec![format!("{v} IS NOT NULL")];
            if let Some(l) = lo {
                c.push(format!("{v} >= {}::{}", Literal::new(l), TypeName(ty)));
            }
            if let Some(h) = hi {
                c.push(format!("{v} < {}::{}", Literal::new(h), TypeName(ty)));
            }
            c.join(" AND ")
        };
        let mut lo: Option<String> = None;
        for hi in bounds
            .iter()
            .map(|h| Some(h.clone()))
            .chain(std::iter::once(None))
        {
            tasks.push(Task {
                entry: i,
                green_cond: cond(&g, &lo, &hi),
                blue_cond: cond(&b, &lo, &hi),
            });
            lo = hi;
        }
        tasks.push(Task {
            entry: i,
            green_cond: format!("{g} IS NULL"),
            blue_cond: format!("{b} IS NULL"),
        });
    }
    Ok(tasks)
}

fn db(e: sqlx::Error) -> Diagnostic {
    Diagnostic::error("database-error", e.to_string())
}

async fn stream_digest(conn: &mut PgConnection, sql: String) -> Result<Digest, sqlx::Error> {
    let mut total = Digest::default();
    let mut batch: Vec<String> = Vec::with_capacity(HASH_BATCH);
    {
        let mut rows = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql)).fetch(&mut *conn);
        while let Some(r) = rows.try_next().await? {
            batch.push(r);
            if batch.len() == HASH_BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(HASH_BATCH));
                // CPU work off the async runtime, on rayon.
                let d = tokio::task::spawn_blocking(move || digest_rows(&full))
                    .await
                    .expect("hash task");
                total.add(d);
            }
        }
    }
    if !batch.is_empty() {
        let d = tokio::task::spawn_blocking(move || digest_rows(&batch))
            .await
            .expect("hash task");
        total.add(d);
    }
    Ok(total)
}

type Keyed = HashMap<String, Vec<Vec<Option<String>>>>;

async fn keyed_rows(conn: &mut PgConnection, sql: String) -> Result<Keyed, sqlx::Error> {
    let mut out: Keyed = HashMap::new();
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut *conn)
        .await?;
    for r in rows {
        let k: String = r.try_get(0)?;
        let v: Vec<Option<String>> = r.try_get(1)?;
        out.entry(k).or_default().push(v);
    }
    Ok(out)
}

/// Name every difference of a chunk: keys missing, extra, duplicated, changed (with columns).
async fn locate(
    conn: &mut PgConnection,
    m: &Mapping,
    e: &TableEntry,
    gt: &catalog::Table,
    t: &Task,
    show_values: bool,
) -> Result<Vec<Difference>, sqlx::Error> {
    let key =
        upsert_key(e, gt).unwrap_or_else(|| e.columns.iter().map(|c| c.name.clone()).collect());
    let cols: Vec<&str> = e
        .columns
        .iter()
        .filter(|c| gt.column(&c.name).is_some())
        .map(|c| c.name.as_str())
        .collect();
    let arr = |p: &str| {
        format!(
            "ARRAY[{}]::text[]",
            join(
                cols.iter().map(|c| format!("{p}.{}::text", Ident::new(*c))),
                ", "
            )
        )
    };
    let krow = |p: &str| {
        format!(
            "ROW({})::text",
            join(key.iter().map(|c| format!("{p}.{}", Ident::new(c))), ", ")
        )
    };
    let green = keyed_rows(
        conn,
        format!(
            "SELECT {}, {} FROM {} AS g WHERE {}",
            krow("g"),
            arr("g"),
            gt.qname(),
            t.green_cond
        ),
    )
    .await?;
    let blue = keyed_rows(
        conn,
        format!(
            "SELECT {}, {} FROM ({}) AS b",
            krow("b"),
            arr("b"),
            blue_select(m, e, gt, &t.blue_cond)
        ),
    )
    .await?;
    let mut keys: Vec<&String> = blue.keys().chain(green.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    let show = |v: &[Option<String>], idx: &[usize]| {
        idx.iter()
            .map(|i| v[*i].clone().unwrap_or_else(|| "NULL".into()))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    for k in keys {
        let (b, g) = (blue.get(k), green.get(k));
        let diff = |kind: &str,
                    columns: Vec<String>,
                    expected: Option<String>,
                    found: Option<String>| Difference {
            table: e.name.clone(),
            kind: kind.into(),
            key: k.clone(),
            columns,
            expected: expected.filter(|_| show_values),
            found: found.filter(|_| show_values),
        };
        match (b, g) {
            (Some(b), None) => out.push(diff(
                "missing",
                Vec::new(),
                Some(show(&b[0], &(0..cols.len()).collect::<Vec<_>>())),
                None,
            )),
            (None, Some(g)) => out.push(diff(
                "extra",
                Vec::new(),
                None,
                Some(show(&g[0], &(0..cols.len()).collect::<Vec<_>>())),
            )),
            (Some(b), Some(g)) if b.len() != g.len() => out.push(diff(
                "duplicated",
                Vec::new(),
                Some(format!("{} row(s)", b.len())),
                Some(format!("{} row(s)", g.len())),
            )),
            (Some(b), Some(g)) => {
                // Same count per key: pair rows after sorting, compare column by column.
                let mut bs = b.clone();
                let mut gs = g.clone();
                bs.sort();
                gs.sort();
                for (br, gr) in bs.iter().zip(gs.iter()) {
                    let idx: Vec<usize> = (0..cols.len()).filter(|i| br[*i] != gr[*i]).collect();
                    if !idx.is_empty() {
                        out.push(diff(
                            "changed",
                            idx.iter().map(|i| cols[*i].to_string()).collect(),
                            Some(show(br, &idx)),
                            Some(show(gr, &idx)),
                        ));
                    }
                }
            }
            (None, None) => {}
        }
    }
    Ok(out)
}

/// Compare every table in one snapshot with `jobs` workers.
pub async fn compare(url: &str, m: &Mapping, o: &Options) -> Result<Outcome, Diagnostic> {
    let mut main = crate::pg::connect(url).await?;
    let phase = crate::state::phase(&mut main, m).await?;
    let cat = Arc::new(load_catalog(&mut main, m).await?);
    // The exporter holds the snapshot open until every worker has attached to it.
    exec(
        &mut main,
        &Sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY".into()),
    )
    .await?;
    let row = sqlx::query("SELECT pg_export_snapshot() AS s, pg_current_wal_lsn()::text AS lsn")
        .fetch_one(&mut main)
        .await
        .map_err(db)?;
    let snapshot: String = row.get("s");
    let lsn: String = row.get("lsn");
    exec(
        &mut main,
        &crate::plan::query::set_mapping_search_path(m, true),
    )
    .await?;
    let tasks = plan_tasks(&mut main, m, &cat, o.chunk_rows).await?;
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
    for _ in 0..o.jobs.max(1) {
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
            exec(&mut c, &Sql(format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; {}",
                Literal::new(&snapshot),
                crate::plan::query::set_mapping_search_path(&m, true)
            )))
            .await?;
            loop {
                let Some(t) = queue.lock().expect("queue").pop_front() else {
                    break;
                };
                let e = &m.tables[t.entry];
                let gt = cat.table(&QName::new(&m.green, &e.name)).expect("planned");
                let green = stream_digest(&mut c, green_rows_sql(e, gt, &t.green_cond))
                    .await
                    .map_err(|err| chunk_err(e, &err))?;
                let blue = stream_digest(&mut c, blue_rows_sql(&m, e, gt, &t.blue_cond))
                    .await
                    .map_err(|err| chunk_err(e, &err))?;
                let differences = if green != blue {
                    locate(&mut c, &m, e, gt, &t, o.show_values)
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
            exec(&mut c, &Sql("COMMIT".into())).await?;
            Ok::<(), Diagnostic>(())
        }));
    }
    for w in workers {
        w.await
            .map_err(|e| Diagnostic::error("internal", e.to_string()))??;
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    exec(&mut main, &Sql("COMMIT".into())).await?;
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
        let count = |k: &str| diffs.iter().filter(|d| d.kind == k).count() as u64;
        tables.push(TableResult {
            table: m.tables[i].name.clone(),
            matches: b == g,
            blue_rows: b.rows,
            green_rows: g.rows,
            blue_digest: b.hex(),
            green_digest: g.hex(),
            chunks,
            differing_chunks: differing,
            missing: count("missing"),
            extra: count("extra"),
            duplicated: count("duplicated"),
            changed: count("changed"),
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
    let outcome = compare(url, m, o).await?;
    let mut conn = crate::pg::connect(url).await?;
    let (checks, performance) = match &checks_file {
        Some(f) => (
            checks::run_checks(&mut conn, &f.checks).await,
            checks::run_budgets(&mut conn, &f.performance).await,
        ),
        None => (Vec::new(), Vec::new()),
    };
    let facts = sqlx::query("SELECT current_user::text AS who, to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS at, current_setting('server_version') AS v")
        .fetch_one(&mut conn)
        .await
        .map_err(db)?;
    let os_user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let passed = outcome.tables.iter().all(|t| t.matches)
        && checks.iter().all(|c| c.passed)
        && performance.iter().all(|p| p.passed);
    let total = outcome.differences.len();
    let mut differences = outcome.differences;
    differences.truncate(o.max_diffs);
    let mut r = report::Report {
        format_version: report::FORMAT_VERSION,
        verdict: if passed { "PASS" } else { "FAIL" }.into(),
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
        differences,
        checks,
        performance,
        report_digest: String::new(),
    };
    r.seal();
    // The cutover gate reads the latest result; a database without the control schema (validate
    // before prepare) just has nowhere to record it.
    let has_control: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(QName::new(&m.control_schema, "validations").to_string())
        .fetch_one(&mut conn)
        .await
        .map_err(db)?;
    if has_control {
        exec(&mut conn, &Sql(format!(
            "INSERT INTO {} (migration, passed, mapping_digest, report_digest, snapshot_lsn, summary) VALUES ({}, {}, {}, {}, {}, {}::jsonb)",
            QName::new(&m.control_schema, "validations"),
            Literal::new(&m.migration),
            passed,
            Literal::new(&r.mapping_digest),
            Literal::new(&r.report_digest),
            Literal::new(&r.snapshot_lsn),
            Literal::new(serde_json::json!({"tables": r.tables, "differences_total": r.differences_total, "checks_failed": r.checks.iter().filter(|c| !c.passed).count()}).to_string())
        ))).await?;
        crate::state::event(
            &mut conn,
            m,
            "validate",
            &r.verdict,
            serde_json::json!({"report_digest": r.report_digest}),
        )
        .await?;
    }
    Ok(r)
}
