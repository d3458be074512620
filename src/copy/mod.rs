//! `prepare` and `copy`: build green beside blue and fill it, resumably, while the application
//! writes (DESIGN.md steps 1 and 2).
//!
//! copy: chunks of each driving table's key computed from the data (`plan::chunks`: quantiles, a
//! NULL-key chunk, physical ranges without a key) recorded in the ledger (`control::chunks`);
//! workers claim chunks with `FOR UPDATE SKIP LOCKED`, copy and mark them done in one
//! transaction, so a crash loses only the chunks in flight and several processes can share the
//! work. Then `finish`: indexes, sequences, statistics. `cmd::copy` then hands over to sync
//! (`sync::go_live`) and comes back for `validate_foreign_keys`: no engine calls another.

mod engine;
mod finish;
mod prepare;
mod progress;

use std::sync::Arc;

use sqlx::{Connection, PgConnection};

use crate::catalog::Catalog;
use crate::control::{self, Phase, chunks, events, runs};
use crate::diag::Diagnostic;
use crate::mapping::{Mapping, TableEntry};
use crate::pg::{self, db_error, exec, locking};
use crate::plan::chunks::{
    PHYSICAL_KEY_TYPE, count, physical_ranges, planned_count, quantile_source, scattered_key,
};
use crate::plan::query::{Shape, chunk_insert, set_mapping_search_path};
use crate::plan::{ChunkKey, chunk_key, sync_key};
use crate::sql::{Ident, QName, sql};

pub use finish::validate_foreign_keys;
pub use prepare::prepare;

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

/// Plan the chunks of every entry not planned yet (serialised across processes).
async fn plan_chunks(
    conn: &mut PgConnection,
    m: &Mapping,
    cat: &Catalog,
    chunk_rows: u64,
    jobs: u32,
) -> Result<(), Diagnostic> {
    let mut tx = conn.begin().await.map_err(db_error)?;
    chunks::lock_planning(&mut tx, m).await?;
    for e in &m.tables {
        if chunks::planned(&mut tx, m, &e.name).await? {
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
        let (key_sql, key_type, ranges) = match chunk_key(e, bt, gt, &sync) {
            ChunkKey::Physical => {
                let pages = chunks::pages(&mut tx, &bt.qname()).await?;
                let n = count(bt.reltuples.max(1.0), chunk_rows);
                (
                    format!("{}.ctid", Ident::new(&driving.alias)),
                    PHYSICAL_KEY_TYPE.to_string(),
                    physical_ranges(pages, n),
                )
            }
            ChunkKey::Expr(key) => {
                let source = quantile_source(e, bt, &key);
                let key_type: Option<String> = sqlx::query_scalar(
                    sql!("SELECT pg_typeof(({key}))::text FROM {source} LIMIT 1").assert_safe(),
                )
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
                let rows = chunks::estimate_rows(&mut tx, &bt.qname(), bt.reltuples).await?;
                let scattered = scattered_key(&key, &driving.alias, bt, cat.server.shared_buffers);
                let n = planned_count(rows, chunk_rows, jobs, scattered);
                let asked = count(rows, chunk_rows);
                if n < asked {
                    eprintln!(
                        "bluegreen: {}: {key} is in no order on {}, which is larger than half of shared_buffers: {n} chunks of about {:.0} rows instead of {} (each chunk reads nearly the whole heap)",
                        e.name,
                        bt.qname().display(),
                        rows / n as f64,
                        asked
                    );
                }
                let ranges = chunks::key_ranges(&mut tx, &key, &source, n).await?;
                (key, key_type.unwrap_or_else(|| "text".into()), ranges)
            }
        };
        chunks::record(&mut tx, m, &e.name, &key_sql, &key_type, &ranges).await?;
        eprintln!(
            "bluegreen: {}: {} chunks on {key_sql}",
            e.name,
            ranges.len()
        );
    }
    tx.commit().await.map_err(db_error)
}

/// `copy`: prepare if needed, copy every pending chunk with `jobs` workers, then finish (indexes,
/// foreign keys, sequences) and hand over to sync (catch up, live).
pub async fn copy(url: &str, m: &Mapping, o: &Options) -> Result<(), Diagnostic> {
    let mut conn = pg::connect(url).await?;
    if runs::phase(&mut conn, m).await? < Phase::Prepared {
        drop(conn);
        prepare(url, m, o.lock_timeout_ms).await?;
        conn = pg::connect(url).await?;
    }
    runs::check_mapping(&mut conn, m).await?;
    runs::check_drift(&mut conn, m).await?;
    let phase = runs::phase(&mut conn, m).await?;
    if phase >= Phase::Copied {
        eprintln!(
            "bluegreen: migration {} is already copied (phase {phase})",
            m.migration
        );
        return Ok(());
    }
    locking::try_runner_lock(&mut conn, &m.migration, false).await?;
    let m = &runs::resolved_mapping(&mut conn, m).await?;
    let cat = Arc::new(control::load_catalog(&mut conn, m).await?);
    prepare::static_gate(m, &cat)?;
    if phase == Phase::Prepared {
        runs::set_phase(&mut conn, m, Phase::Copying).await?;
        events::record(
            &mut conn,
            m,
            "copy",
            "started",
            serde_json::json!({"jobs": o.jobs, "engine": format!("{:?}", o.engine)}),
        )
        .await?;
    }
    plan_chunks(&mut conn, m, &cat, o.chunk_rows, o.jobs).await?;

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
    loop {
        let pending = chunks::not_done(&mut conn, m).await?;
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
        .map_err(db_error)?;
    let r = finish::finish(&mut conn, url, m, o).await;
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
    loop {
        let mut tx = conn.begin().await.map_err(db_error)?;
        let Some(chunk) = chunks::claim(&mut tx, m).await? else {
            tx.rollback().await.map_err(db_error)?;
            return Ok(());
        };
        let table = chunk.green_table.clone();
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
            extra_where: vec![chunk.condition()],
            ..Shape::default()
        };
        // Physical (ctid) chunks can see a row twice; only the insert skips duplicates.
        let rows: u64 = match source.as_mut().filter(|_| !chunk.physical()) {
            None => sqlx::raw_sql(chunk_insert(e, gt, &m.control_schema, &shape).assert_safe())
                .execute(&mut *tx)
                .await
                .map_err(|err| chunk_error(e, &chunk, err))?
                .rows_affected(),
            Some(src) => engine::copy_chunk(src, &mut tx, m, e, gt, &shape)
                .await
                .map_err(|err| chunk_error(e, &chunk, err))?,
        };
        chunks::mark_done(&mut tx, m, &chunk, rows).await?;
        tx.commit().await.map_err(db_error)?;
        progress.chunk_done(&table, rows);
    }
}

/// A chunk that failed, told in the mapping's terms: the green table, the chunk's key range, and
/// (where the database names a column, or the failing value map names itself) the column and its
/// expression in the mapping file. Never a line of a generated statement; the failing row's values
/// (the server's "Failing row contains ..." detail) are left out.
fn chunk_error(e: &TableEntry, chunk: &control::chunks::Chunk, err: sqlx::Error) -> Diagnostic {
    use sqlx::postgres::PgDatabaseError;
    let pg = err
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>());
    let Some(pg) = pg else {
        let d = db_error(err);
        return Diagnostic {
            code: "copy-failed",
            message: format!(
                "copying chunk {} of {} ({}) failed: {}",
                chunk.chunk_no,
                e.name,
                chunk.describe(),
                d.message
            ),
            ..d
        }
        .table(&e.name);
    };
    let mut message = pg.message().to_string();
    if let Some(detail) = pg
        .detail()
        .filter(|d| !d.starts_with("Failing row contains"))
    {
        message.push_str(&format!(" ({detail})"));
    }
    // The value map's own error names `<entry>.<column>`.
    let named = format!("of {}.", e.name);
    let column = pg.column().map(str::to_string).or_else(|| {
        let rest = &pg.message()[pg.message().find(&named)? + named.len()..];
        Some(rest.split_whitespace().next()?.to_string())
    });
    let col = column.as_deref().and_then(|c| e.column(c));
    let mut d = Diagnostic::error(
        "copy-failed",
        format!(
            "copying chunk {} of {} ({}) failed: {message} [SQLSTATE {}]",
            chunk.chunk_no,
            e.name,
            chunk.describe(),
            pg.code()
        ),
    )
    .at(Some(col.map_or(e.span.clone(), |c| c.expr.span.clone())))
    .table(&e.name)
    .maybe_column(col.map(|c| c.name.as_str()))
    .hint(match col {
        Some(c) => format!(
            "the mapping of {} (`{}`) produces a value green rejects for some rows of this range: fix the expression or filter such rows with `where`, check with `bluegreen plan --profile full`, then re-run copy (finished chunks are kept)",
            c.name, c.expr.text
        ),
        None => "fix the cause (`bluegreen plan --profile full` checks every row), then re-run copy: finished chunks are kept".to_string(),
    });
    d.sqlstate = Some(pg.code().to_string());
    d
}
