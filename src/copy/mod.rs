//! `prepare` and `copy`: build green beside blue and fill it, resumably, while the application
//! writes (DESIGN.md steps 1 and 2).
//!
//! prepare: control schema, green DDL (secondary indexes and foreign keys recorded, then dropped
//! until the data is in), capture triggers on every blue table the mapping reads, committed before
//! any copy snapshot. copy: chunks of each driving table's key computed from the data (quantiles,
//! a NULL-key chunk, physical ranges without a key) recorded in a ledger; workers claim chunks with
//! `FOR UPDATE SKIP LOCKED`, copy and mark them done in one transaction, so a crash loses only the
//! chunks in flight and several processes can share the work. Then indexes and foreign keys,
//! sequences, and the hand-over to sync (`crate::sync`).

mod progress;

use std::sync::Arc;

use futures::StreamExt;
use sqlx::{Connection, PgConnection, Row};

use crate::catalog::{self, Catalog};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::{self, locking};
use crate::plan::query::{
    Shape, chunk_insert, mapped_columns, mapping_select_typed, set_mapping_search_path,
    where_clause,
};
use crate::plan::sync::referenced_aliases;
use crate::plan::{chunk_key, steps, sync_key};
use crate::sql::{Ident, Literal, QName, Sql, join};
use crate::state::{self, exec};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    InsertSelect,
    Copy,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub jobs: u32,
    pub chunk_rows: u64,
    pub lock_timeout_ms: u64,
    pub engine: Engine,
}

fn db(e: sqlx::Error) -> Diagnostic {
    Diagnostic::error("database-error", e.to_string())
}

pub async fn load_catalog(conn: &mut PgConnection, m: &Mapping) -> Result<Catalog, Diagnostic> {
    exec(conn, &Sql("SET search_path = pg_catalog".into())).await?;
    let schemas = m.catalog_schemas();
    let refs: Vec<&str> = schemas.iter().map(String::as_str).collect();
    let cat = catalog::load(conn, &refs).await.map_err(db)?;
    exec(conn, &set_mapping_search_path(m, false)).await?;
    Ok(cat)
}

/// The catalog with the green foreign keys that are still deferred (dropped for the copy) put
/// back from their recorded definitions, so sync orders its upserts and deletes by them.
pub async fn load_catalog_for_sync(
    conn: &mut PgConnection,
    m: &Mapping,
) -> Result<Catalog, Diagnostic> {
    let mut cat = load_catalog(conn, m).await?;
    for (name, table, def) in pending_foreign_keys(conn, m).await? {
        let Some(pos) = def.find("REFERENCES ") else {
            continue;
        };
        let rest = &def[pos + "REFERENCES ".len()..];
        let target = rest[..rest.find('(').unwrap_or(rest.len())]
            .trim()
            .replace('"', "");
        let ref_table = match target.split_once('.') {
            Some((s, t)) => QName::new(s, t),
            None => QName::new(&m.green, target),
        };
        if let Some(t) = cat
            .tables
            .get_mut(&(table.schema.clone(), table.name.clone()))
            && !t.foreign_keys.iter().any(|f| f.name == name)
        {
            t.foreign_keys.push(catalog::ForeignKey {
                name,
                columns: Vec::new(),
                ref_table,
                ref_columns: Vec::new(),
                definition: def,
                validated: false,
            });
        }
    }
    Ok(cat)
}

/// `prepare`: idempotent; a no-op once the migration is prepared.
pub async fn prepare(url: &str, m: &Mapping, lock_timeout_ms: u64) -> Result<(), Diagnostic> {
    let mut conn = pg::connect(url).await?;
    locking::try_runner_lock(&mut conn, &m.migration, true).await?;
    let r = prepare_locked(&mut conn, m, lock_timeout_ms).await;
    let _ = locking::runner_unlock(&mut conn, &m.migration, true).await;
    r
}

async fn prepare_locked(
    conn: &mut PgConnection,
    m: &Mapping,
    lock_timeout_ms: u64,
) -> Result<(), Diagnostic> {
    exec(conn, &Sql(steps::control_ddl(&m.control_schema))).await?;
    let phase = state::phase(conn, m).await?;
    if phase != "new" {
        state::check_mapping(conn, m).await?;
        state::check_drift(conn, m).await?;
    }
    if state::phase_rank(&phase) >= state::phase_rank("prepared") {
        eprintln!(
            "bluegreen: migration {} is already prepared (phase {phase})",
            m.migration
        );
        return Ok(());
    }
    let runs = QName::new(&m.control_schema, "runs");
    exec(
        conn,
        &Sql(format!(
            "INSERT INTO {runs} (migration, mapping_digest, phase, blue_schema, green_schema) VALUES ({}, {}, 'new', {}, {}) ON CONFLICT (migration) DO UPDATE SET mapping_digest = EXCLUDED.mapping_digest",
            Literal::new(&m.migration),
            Literal::new(m.digest()),
            Literal::new(&m.blue),
            Literal::new(&m.green)
        )),
    )
    .await?;
    state::event(conn, m, "prepare", "started", serde_json::json!({})).await?;

    // Green DDL, once, in one transaction; secondary indexes and foreign keys are recorded and
    // dropped so the copy writes into bare tables (they come back after the data).
    let green_has_tables: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind IN ('r','p'))",
    )
    .bind(&m.green)
    .fetch_one(&mut *conn)
    .await
    .map_err(db)?;
    if !green_has_tables {
        let ddl = std::fs::read_to_string(&m.green_ddl).map_err(|e| {
            Diagnostic::error(
                "missing-file",
                format!("cannot read green_ddl {}: {e}", m.green_ddl.display()),
            )
        })?;
        if let Some((line, word)) = crate::probe::transaction_control(&ddl) {
            return Err(Diagnostic::error(
                "green-ddl-transaction",
                format!(
                    "green_ddl contains {word} (line {line}): bluegreen runs the file in its own transaction"
                ),
            ));
        }
        let mut tx = conn.begin().await.map_err(db)?;
        let green = Ident::new(&m.green);
        exec(
            &mut tx,
            &Sql(format!(
                "CREATE SCHEMA IF NOT EXISTS {green}; SET LOCAL search_path = {green}"
            )),
        )
        .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                Diagnostic::error("green-ddl-failed", format!("green_ddl failed: {e}"))
                    .hint("run `bluegreen plan` to locate the error")
            })?;
        exec(&mut tx, &Sql("SET LOCAL search_path = pg_catalog".into())).await?;
        let cat = catalog::load(&mut tx, &[&m.green]).await.map_err(db)?;
        let deferred = QName::new(&m.control_schema, "deferred");
        for d in steps::deferrals(m, &cat) {
            exec(&mut tx, &Sql(format!(
                "INSERT INTO {deferred} (migration, kind, name, green_table, definition) VALUES ({}, {}, {}, {}, {}) ON CONFLICT DO NOTHING; {}",
                Literal::new(&m.migration), Literal::new(d.kind), Literal::new(&d.name), Literal::new(&d.table.name), Literal::new(&d.definition), d.drop
            ))).await?;
        }
        tx.commit().await.map_err(db)?;
    }

    // The mapping must fit the catalog before anything touches blue (plan checks much more).
    let cat = load_catalog(conn, m).await?;
    static_gate(m, &cat)?;

    // Capture: a trigger per event on every blue table read, under lock_timeout with retry.
    for (n, x) in m.blue_tables_read().iter().enumerate() {
        exec(conn, &crate::plan::sync::capture_trigger_function(m, n)).await?;
        let have: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname LIKE 'bluegreen\\_sync\\_%'")
            .bind(x.to_string())
            .fetch_one(&mut *conn)
            .await
            .map_err(db)?;
        if have == 4 {
            continue;
        }
        let stmts = steps::capture_triggers(m, x, n);
        locking::run_locked(conn, lock_timeout_ms, &stmts, std::slice::from_ref(x)).await?;
        eprintln!("bluegreen: capturing changes on {}", x.display());
    }
    let fp = state::blue_fingerprint(conn, m).await?;
    exec(
        conn,
        &Sql(format!(
            "UPDATE {runs} SET blue_fingerprint = {}, phase = 'prepared', updated_at = now() WHERE migration = {}",
            Literal::new(fp),
            Literal::new(&m.migration)
        )),
    )
    .await?;
    state::event(conn, m, "prepare", "done", serde_json::json!({})).await?;
    Ok(())
}

/// Refuse a mapping that does not fit the catalog (names, keys), before any work.
fn static_gate(m: &Mapping, cat: &Catalog) -> Result<(), Diagnostic> {
    match crate::plan::static_checks(m, cat)
        .into_iter()
        .find(|d| d.is_error())
    {
        Some(d) => Err(d.hint_or("run `bluegreen plan` for every finding")),
        None => Ok(()),
    }
}

/// One planned chunk of one entry.
struct ChunkPlan {
    lower: Option<String>,
    upper: Option<String>,
    null_keys: bool,
}

/// Plan the chunks of every entry not planned yet (serialised across processes).
async fn plan_chunks(
    conn: &mut PgConnection,
    m: &Mapping,
    cat: &Catalog,
    chunk_rows: u64,
) -> Result<(), Diagnostic> {
    let mut tx = conn.begin().await.map_err(db)?;
    exec(
        &mut tx,
        &Sql(format!(
            "SELECT pg_advisory_xact_lock(hashtextextended({}, 1))",
            Literal::new(crate::names::advisory_key(&m.migration))
        )),
    )
    .await?;
    let chunks = QName::new(&m.control_schema, "chunks");
    for e in &m.tables {
        let planned: bool = sqlx::query_scalar(
            Sql(format!(
                "SELECT EXISTS (SELECT 1 FROM {chunks} WHERE migration = $1 AND green_table = $2)"
            ))
            .assert_safe(),
        )
        .bind(&m.migration)
        .bind(&e.name)
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if planned {
            continue;
        }
        let gt = cat.table(&QName::new(&m.green, &e.name)).ok_or_else(|| {
            Diagnostic::error(
                "unknown-green-table",
                format!("green table {} missing", e.name),
            )
        })?;
        let driving = e.from_clause.driving();
        let bt = cat
            .table(&driving.table)
            .ok_or_else(|| Diagnostic::error("unknown-blue-table", driving.table.display()))?;
        let sync = sync_key(e, gt).map(|(k, _)| k).unwrap_or_default();
        let key = chunk_key(e, bt, &sync);
        let alias = Ident::new(&driving.alias);
        let (key_sql, key_type, plans) = if key.starts_with("ctid") {
            let pages: i64 = sqlx::query_scalar(
                Sql(format!(
                    "SELECT (pg_relation_size({}) / current_setting('block_size')::int8)",
                    Literal::new(bt.qname().to_string())
                ))
                .assert_safe(),
            )
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
            let rows = bt.reltuples.max(1.0);
            let n = ((rows / chunk_rows as f64).ceil() as i64).max(1);
            let step = (pages / n).max(1);
            let mut plans = Vec::new();
            let mut lo: Option<i64> = None;
            let mut p = step;
            while p < pages {
                plans.push(ChunkPlan {
                    lower: lo.map(|l| format!("({l},0)")),
                    upper: Some(format!("({p},0)")),
                    null_keys: false,
                });
                lo = Some(p);
                p += step;
            }
            plans.push(ChunkPlan {
                lower: lo.map(|l| format!("({l},0)")),
                upper: None,
                null_keys: false,
            });
            (format!("{alias}.ctid"), "tid".to_string(), plans)
        } else {
            // Quantiles over the driving table alone when the key reads only it.
            let aliases: Vec<&str> = e
                .from_clause
                .items
                .iter()
                .map(|i| i.alias.as_str())
                .collect();
            let only_driving = referenced_aliases(&key, &aliases) == [driving.alias.as_str()];
            let source = if only_driving && e.where_.is_none() {
                format!("{} AS {alias}", bt.qname())
            } else {
                format!("{}{}", e.from_clause.render(), where_clause(e, &[]))
            };
            let key_type: Option<String> = sqlx::query_scalar(
                Sql(format!(
                    "SELECT pg_typeof(({key}))::text FROM {source} LIMIT 1"
                ))
                .assert_safe(),
            )
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
            let key_type = key_type.unwrap_or_else(|| "text".into());
            let rows = if bt.reltuples >= 0.0 {
                bt.reltuples
            } else {
                sqlx::query_scalar::<_, i64>(
                    Sql(format!("SELECT count(*) FROM {}", bt.qname())).assert_safe(),
                )
                .fetch_one(&mut *tx)
                .await
                .map_err(db)? as f64
            };
            let n = ((rows / chunk_rows as f64).ceil() as usize).max(1);
            let mut bounds: Vec<String> = Vec::new();
            if n > 1 {
                let fracs = join((1..n).map(|i| format!("{:.6}", i as f64 / n as f64)), ", ");
                let b: Option<Vec<Option<String>>> = sqlx::query_scalar(Sql(format!(
                    "SELECT percentile_disc(ARRAY[{fracs}]::float8[]) WITHIN GROUP (ORDER BY ({key}))::text[] FROM {source}"
                )).assert_safe())
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
                for v in b.unwrap_or_default().into_iter().flatten() {
                    if !bounds.contains(&v) {
                        bounds.push(v);
                    }
                }
            }
            let mut plans = Vec::new();
            let mut lo: Option<String> = None;
            for b in bounds {
                plans.push(ChunkPlan {
                    lower: lo.clone(),
                    upper: Some(b.clone()),
                    null_keys: false,
                });
                lo = Some(b);
            }
            plans.push(ChunkPlan {
                lower: lo,
                upper: None,
                null_keys: false,
            });
            plans.push(ChunkPlan {
                lower: None,
                upper: None,
                null_keys: true,
            });
            (key, key_type, plans)
        };
        for (i, p) in plans.iter().enumerate() {
            exec(&mut tx, &Sql(format!(
                "INSERT INTO {chunks} (migration, green_table, chunk_no, key_sql, key_type, lower_bound, upper_bound, null_keys) VALUES ({}, {}, {i}, {}, {}, {}, {}, {})",
                Literal::new(&m.migration),
                Literal::new(&e.name),
                Literal::new(&key_sql),
                Literal::new(&key_type),
                opt_lit(&p.lower),
                opt_lit(&p.upper),
                p.null_keys
            ))).await?;
        }
        eprintln!("bluegreen: {}: {} chunks on {key_sql}", e.name, plans.len());
    }
    tx.commit().await.map_err(db)?;
    Ok(())
}

fn opt_lit(v: &Option<String>) -> String {
    match v {
        Some(s) => Literal::new(s).to_string(),
        None => "NULL".into(),
    }
}

/// The range condition of a chunk. Bounds are rendered as literals (COPY takes no parameters).
fn chunk_condition(
    key_sql: &str,
    key_type: &str,
    lower: &Option<String>,
    upper: &Option<String>,
    null_keys: bool,
) -> Vec<String> {
    let ty = crate::sql::TypeName(key_type);
    if null_keys {
        return vec![format!("({key_sql}) IS NULL")];
    }
    let mut c = Vec::new();
    if let Some(l) = lower {
        c.push(format!("({key_sql}) >= {}::{ty}", Literal::new(l)));
    }
    if let Some(u) = upper {
        c.push(format!("({key_sql}) < {}::{ty}", Literal::new(u)));
    }
    if c.is_empty() {
        // The only chunk: everything but NULL keys (they have their own chunk).
        c.push(format!("({key_sql}) IS NOT NULL"));
    }
    c
}

/// `copy`: prepare if needed, copy every pending chunk with `jobs` workers, then finish (indexes,
/// foreign keys, sequences) and hand over to sync (catch up, live).
pub async fn copy(url: &str, m: &Mapping, o: &Options) -> Result<(), Diagnostic> {
    let mut conn = pg::connect(url).await?;
    let phase = state::phase(&mut conn, m).await?;
    if state::phase_rank(&phase) < state::phase_rank("prepared") {
        drop(conn);
        prepare(url, m, o.lock_timeout_ms).await?;
        conn = pg::connect(url).await?;
    }
    state::check_mapping(&mut conn, m).await?;
    state::check_drift(&mut conn, m).await?;
    let phase = state::phase(&mut conn, m).await?;
    if phase == "live" {
        eprintln!(
            "bluegreen: migration {} is already copied and live",
            m.migration
        );
        return Ok(());
    }
    locking::try_runner_lock(&mut conn, &m.migration, false).await?;
    let cat = Arc::new(load_catalog(&mut conn, m).await?);
    static_gate(m, &cat)?;
    if phase == "prepared" {
        state::set_phase(&mut conn, m, "copying").await?;
        state::event(
            &mut conn,
            m,
            "copy",
            "started",
            serde_json::json!({"jobs": o.jobs, "engine": format!("{:?}", o.engine)}),
        )
        .await?;
    }
    plan_chunks(&mut conn, m, &cat, o.chunk_rows).await?;

    let progress = Arc::new(progress::Progress::new(&mut conn, m).await?);
    let mut workers = Vec::new();
    for _ in 0..o.jobs.max(1) {
        let url = url.to_string();
        let m = m.clone();
        let cat = cat.clone();
        let o = o.clone();
        let progress = progress.clone();
        workers.push(tokio::spawn(async move {
            worker(&url, &m, &cat, &o, &progress).await
        }));
    }
    let mut first_err = None;
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(d)) => first_err = first_err.or(Some(d)),
            Err(e) => first_err = first_err.or(Some(Diagnostic::error("internal", e.to_string()))),
        }
    }
    progress.finish();
    if let Some(d) = first_err {
        return Err(d);
    }
    // Chunks claimed by another process may still be in flight: wait for them.
    let chunks = QName::new(&m.control_schema, "chunks");
    loop {
        let pending: i64 = sqlx::query_scalar(
            Sql(format!(
                "SELECT count(*) FROM {chunks} WHERE migration = $1 AND state <> 'done'"
            ))
            .assert_safe(),
        )
        .bind(&m.migration)
        .fetch_one(&mut conn)
        .await
        .map_err(db)?;
        if pending == 0 {
            break;
        }
        // Chunks another process had in flight come back to pending if it died: claim them.
        worker(url, m, &cat, o, &progress).await?;
        eprintln!("bluegreen: waiting for {pending} chunk(s) another process is copying");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let _ = locking::runner_unlock(&mut conn, &m.migration, false).await;
    locking::runner_lock_wait(&mut conn, &m.migration)
        .await
        .map_err(db)?;
    let r = finish(&mut conn, url, m, o).await;
    let _ = locking::runner_unlock(&mut conn, &m.migration, true).await;
    r
}

/// Claim, copy and mark chunks until none is pending.
async fn worker(
    url: &str,
    m: &Mapping,
    cat: &Catalog,
    o: &Options,
    progress: &progress::Progress,
) -> Result<(), Diagnostic> {
    let mut conn = pg::connect(url).await?;
    exec(&mut conn, &set_mapping_search_path(m, false)).await?;
    let mut source = match o.engine {
        Engine::Copy => {
            let mut c = pg::connect(url).await?;
            exec(&mut c, &set_mapping_search_path(m, false)).await?;
            Some(c)
        }
        Engine::InsertSelect => None,
    };
    let chunks = QName::new(&m.control_schema, "chunks");
    loop {
        let mut tx = conn.begin().await.map_err(db)?;
        let row = sqlx::query(Sql(format!(
            "SELECT green_table, chunk_no, key_sql, key_type, lower_bound, upper_bound, null_keys FROM {chunks} WHERE migration = $1 AND state = 'pending' ORDER BY green_table, chunk_no LIMIT 1 FOR UPDATE SKIP LOCKED"
        )).assert_safe())
        .bind(&m.migration)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(row) = row else {
            tx.rollback().await.map_err(db)?;
            return Ok(());
        };
        let table: String = row.get("green_table");
        let chunk_no: i32 = row.get("chunk_no");
        let cond = chunk_condition(
            &row.get::<String, _>("key_sql"),
            &row.get::<String, _>("key_type"),
            &row.get("lower_bound"),
            &row.get("upper_bound"),
            row.get("null_keys"),
        );
        let e = m.entry(&table).ok_or_else(|| {
            Diagnostic::error(
                "mapping-changed",
                format!("chunk ledger names {table}, which the mapping lacks"),
            )
        })?;
        let gt = cat
            .table(&QName::new(&m.green, &e.name))
            .expect("green table in catalog");
        let shape = Shape {
            extra_where: cond,
            ..Shape::default()
        };
        // Physical (ctid) chunks can see a row twice; only the insert skips duplicates.
        let physical = row.get::<String, _>("key_type") == "tid";
        let rows: u64 = match source.as_mut().filter(|_| !physical) {
            None => sqlx::raw_sql(chunk_insert(e, gt, &m.control_schema, &shape).assert_safe())
                .execute(&mut *tx)
                .await
                .map_err(|err| chunk_error(&table, chunk_no, err))?
                .rows_affected(),
            Some(src) => copy_chunk(src, &mut tx, m, e, gt, &shape)
                .await
                .map_err(|err| chunk_error(&table, chunk_no, err))?,
        };
        exec(&mut tx, &Sql(format!(
            "UPDATE {chunks} SET state = 'done', rows_copied = {rows}, done_at = now() WHERE migration = {} AND green_table = {} AND chunk_no = {chunk_no}",
            Literal::new(&m.migration),
            Literal::new(&table)
        ))).await?;
        tx.commit().await.map_err(db)?;
        progress.chunk_done(&table, rows);
    }
}

fn chunk_error(table: &str, chunk: i32, e: sqlx::Error) -> Diagnostic {
    Diagnostic::error("copy-failed", format!("copying chunk {chunk} of {table} failed: {e}"))
        .table(table)
        .hint("fix the cause (run `bluegreen plan` to locate it), then re-run copy: finished chunks are kept")
}

/// The COPY engine: binary `COPY (SELECT M) TO STDOUT` on `src` piped into `COPY green.T FROM
/// STDIN` inside the chunk's transaction, batched into 256 KiB sends; the next buffer is read only
/// after the previous one was written (backpressure), and any error aborts the COPY IN.
async fn copy_chunk(
    src: &mut PgConnection,
    tx: &mut PgConnection,
    m: &Mapping,
    e: &crate::mapping::TableEntry,
    gt: &catalog::Table,
    shape: &Shape<'_>,
) -> Result<u64, sqlx::Error> {
    // Binary COPY needs the exact green types on both sides.
    let select = mapping_select_typed(e, gt, &m.control_schema, shape);
    let target = format!(
        "COPY {} ({}) FROM STDIN (FORMAT binary)",
        gt.qname(),
        join(mapped_columns(e, gt).iter().map(|c| Ident::new(*c)), ", ")
    );
    let mut sink = tx.copy_in_raw(&target).await?;
    let mut stream = src
        .copy_out_raw(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        .await?;
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut failed = None;
    while let Some(part) = stream.next().await {
        match part {
            Ok(bytes) => {
                buf.extend_from_slice(&bytes);
                if buf.len() >= 256 * 1024 {
                    if let Err(e) = sink.send(std::mem::take(&mut buf)).await {
                        failed = Some(e);
                        break;
                    }
                    buf.reserve(256 * 1024);
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(stream);
    if failed.is_none()
        && !buf.is_empty()
        && let Err(e) = sink.send(buf).await
    {
        failed = Some(e);
    }
    match failed {
        Some(e) => {
            let _ = sink.abort(e.to_string()).await;
            Err(e)
        }
        None => sink.finish().await,
    }
}

/// After the data: deferred indexes (in parallel within `jobs`), sequences advanced, statistics;
/// then sync takes over. Foreign keys come back in the live switch (NOT VALID, instant) and are
/// validated after it: chunks were copied at different instants, so green is consistent only once
/// the change log is drained.
async fn finish(
    conn: &mut PgConnection,
    url: &str,
    m: &Mapping,
    o: &Options,
) -> Result<(), Diagnostic> {
    let phase = state::phase(conn, m).await?;
    if state::phase_rank(&phase) < state::phase_rank("copied") {
        let deferred = QName::new(&m.control_schema, "deferred");
        let rows = sqlx::query(Sql(format!("SELECT kind, name, green_table, definition FROM {deferred} WHERE migration = $1 AND NOT done ORDER BY kind DESC, name")).assert_safe())
            .bind(&m.migration)
            .fetch_all(&mut *conn)
            .await
            .map_err(db)?;
        let indexes: Vec<(String, String)> = rows
            .iter()
            .filter(|r| r.get::<String, _>("kind") == "index")
            .map(|r| (r.get("name"), r.get("definition")))
            .collect();
        // Index builds in parallel, at most `jobs` at once.
        let results = futures::stream::iter(indexes.into_iter().map(|(name, def)| {
            let url = url.to_string();
            let m = m.clone();
            async move {
                let mut c = pg::connect(&url).await?;
                exec(&mut c, &Sql(format!("DROP INDEX IF EXISTS {}", QName::new(&m.green, &name)))).await?;
                exec(&mut c, &Sql(def)).await?;
                exec(&mut c, &Sql(format!(
                    "UPDATE {} SET done = true WHERE migration = {} AND kind = 'index' AND name = {}",
                    QName::new(&m.control_schema, "deferred"), Literal::new(&m.migration), Literal::new(&name)
                ))).await?;
                eprintln!("bluegreen: built index {name}");
                Ok::<(), Diagnostic>(())
            }
        }))
        .buffer_unordered(o.jobs.max(1) as usize)
        .collect::<Vec<_>>()
        .await;
        for r in results {
            r?;
        }
        let cat = load_catalog(conn, m).await?;
        for (_, sql) in steps::advance_sequences(m, &cat) {
            exec(conn, &sql).await?;
        }
        for e in &m.tables {
            exec(
                conn,
                &Sql(format!("ANALYZE {}", QName::new(&m.green, &e.name))),
            )
            .await?;
        }
        state::set_phase(conn, m, "copied").await?;
        state::event(conn, m, "copy", "copied", serde_json::json!({})).await?;
    }
    crate::sync::go_live(conn, m, o.lock_timeout_ms).await?;
    validate_foreign_keys(conn, m).await
}

/// Pending green foreign keys, as (name, green table, definition).
pub async fn pending_foreign_keys(
    conn: &mut PgConnection,
    m: &Mapping,
) -> Result<Vec<(String, QName, String)>, Diagnostic> {
    let rows = sqlx::query(Sql(format!(
        "SELECT name, green_table, definition FROM {} WHERE migration = $1 AND kind = 'foreign key' AND NOT done ORDER BY name",
        QName::new(&m.control_schema, "deferred")
    )).assert_safe())
    .bind(&m.migration)
    .fetch_all(&mut *conn)
    .await
    .map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get("name"),
                QName::new(&m.green, r.get::<String, _>("green_table")),
                r.get("definition"),
            )
        })
        .collect())
}

/// The statements adding a pending foreign key unvalidated (instant; enforced for new writes).
pub fn add_foreign_key_not_valid(name: &str, table: &QName, def: &str) -> Sql {
    let n = Ident::new(name);
    Sql(format!(
        "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {n}; ALTER TABLE {table} ADD CONSTRAINT {n} {def} NOT VALID"
    ))
}

/// VALIDATE every foreign key added NOT VALID at the live switch. Runs while live sync keeps
/// green consistent; takes SHARE UPDATE EXCLUSIVE on green tables only, which no writer needs.
async fn validate_foreign_keys(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    for (name, table, _) in pending_foreign_keys(conn, m).await? {
        exec(conn, &Sql(format!("ALTER TABLE {table} VALIDATE CONSTRAINT {}", Ident::new(&name)))).await.map_err(|d| {
            d.table(&table.name).hint("a green foreign key does not hold: the mapping produces child rows whose parent it does not produce (check the joins and filters of both entries)")
        })?;
        exec(conn, &Sql(format!(
            "UPDATE {} SET done = true WHERE migration = {} AND kind = 'foreign key' AND name = {}",
            QName::new(&m.control_schema, "deferred"),
            Literal::new(&m.migration),
            Literal::new(&name)
        )))
        .await?;
        eprintln!("bluegreen: validated foreign key {name}");
    }
    Ok(())
}
