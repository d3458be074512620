//! The chunk ledger (`chunks`): which ranges of each green table's driving rows exist, which are
//! done, with how many rows; and the database side of chunking that copy and validate share (the
//! quantile query, row estimates, page counts). The ranges themselves are `plan::chunks`.

use sqlx::{PgConnection, Row};

use super::{query, scalar, table};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;
use crate::plan::chunks::{self, PHYSICAL_KEY_TYPE, Range};
use crate::sql::{Literal, QName, TypeName, sql};

/// A chunk as the ledger holds it.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub green_table: String,
    pub chunk_no: i32,
    /// The key expression the ranges are over (`l.id`, `w.ctid`).
    pub key_sql: String,
    pub key_type: String,
    pub range: Range,
}

impl Chunk {
    /// A physical (ctid) chunk: a row updated meanwhile can be seen by two of them.
    pub fn physical(&self) -> bool {
        self.key_type == PHYSICAL_KEY_TYPE
    }
    /// The range in words, for messages: `l.id from 'a' up to 'b'`, `l.id NULL`.
    pub fn describe(&self) -> String {
        let r = &self.range;
        if r.null_keys {
            return format!("{} NULL", self.key_sql);
        }
        let lit = |v: &Option<String>| v.as_ref().map(|v| Literal::new(v).to_string());
        match (lit(&r.lower), lit(&r.upper)) {
            (None, None) => format!("every {}", self.key_sql),
            (Some(l), None) => format!("{} from {l}", self.key_sql),
            (None, Some(u)) => format!("{} below {u}", self.key_sql),
            (Some(l), Some(u)) => format!("{} from {l} up to {u}", self.key_sql),
        }
    }
    /// The chunk's condition, bounds as literals of the key type (COPY takes no parameters).
    pub fn condition(&self) -> String {
        let ty = TypeName(&self.key_type);
        chunks::condition(&self.key_sql, &self.range, |v| {
            format!("{}::{ty}", Literal::new(v))
        })
    }
}

/// Serialise chunk planning across processes (held until the transaction ends). Key seed 1: the
/// runner lock uses seed 0 on the same text (`pg::locking`).
pub async fn lock_planning(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))")
        .bind(crate::names::advisory_key(&m.migration))
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Whether the chunks of `green_table` were planned already.
pub async fn planned(
    conn: &mut PgConnection,
    m: &Mapping,
    green_table: &str,
) -> Result<bool, Diagnostic> {
    scalar(
        m,
        "SELECT EXISTS (SELECT 1 FROM {chunks} WHERE migration = $1 AND green_table = $2)",
    )
    .bind(green_table)
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// Record the planned ranges of `green_table`, numbered in order.
pub async fn record(
    conn: &mut PgConnection,
    m: &Mapping,
    green_table: &str,
    key_sql: &str,
    key_type: &str,
    ranges: &[Range],
) -> Result<(), Diagnostic> {
    for (i, r) in ranges.iter().enumerate() {
        query(m, "INSERT INTO {chunks} (migration, green_table, chunk_no, key_sql, key_type, lower_bound, upper_bound, null_keys) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(green_table)
            .bind(i as i32)
            .bind(key_sql)
            .bind(key_type)
            .bind(&r.lower)
            .bind(&r.upper)
            .bind(r.null_keys)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

/// Claim the next pending chunk (row-locked until the transaction ends; others skip it).
pub async fn claim(conn: &mut PgConnection, m: &Mapping) -> Result<Option<Chunk>, Diagnostic> {
    let row = sqlx::query(chunks::claim_query(&table(m, "chunks")).assert_safe())
        .bind(&m.migration)
        .fetch_optional(conn)
        .await
        .map_err(db_error)?;
    Ok(row.map(|r| Chunk {
        green_table: r.get("green_table"),
        chunk_no: r.get("chunk_no"),
        key_sql: r.get("key_sql"),
        key_type: r.get("key_type"),
        range: Range {
            lower: r.get("lower_bound"),
            upper: r.get("upper_bound"),
            null_keys: r.get("null_keys"),
        },
    }))
}

/// Mark a claimed chunk done, in the transaction that copied it.
pub async fn mark_done(
    conn: &mut PgConnection,
    m: &Mapping,
    c: &Chunk,
    rows: u64,
) -> Result<(), Diagnostic> {
    sqlx::query(chunks::done_statement(&table(m, "chunks")).assert_safe())
        .bind(&m.migration)
        .bind(&c.green_table)
        .bind(c.chunk_no)
        .bind(rows as i64)
        .execute(conn)
        .await
        .map_err(db_error)?;
    Ok(())
}

/// Chunks not done yet (pending or in flight in some process).
pub async fn not_done(conn: &mut PgConnection, m: &Mapping) -> Result<i64, Diagnostic> {
    scalar(
        m,
        "SELECT count(*) FROM {chunks} WHERE migration = $1 AND state <> 'done'",
    )
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// Per green table: chunks done, chunks planned, rows copied.
pub struct TableProgress {
    pub green_table: String,
    pub done: i64,
    pub total: i64,
    pub rows: i64,
}

pub async fn progress(
    conn: &mut PgConnection,
    m: &Mapping,
) -> Result<Vec<TableProgress>, Diagnostic> {
    let rows = query(m, "SELECT green_table, count(*) FILTER (WHERE state = 'done') AS done, count(*) AS total, coalesce(sum(rows_copied), 0)::int8 AS rows FROM {chunks} WHERE migration = $1 GROUP BY 1 ORDER BY 1")
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|r| TableProgress {
            green_table: r.get("green_table"),
            done: r.get("done"),
            total: r.get("total"),
            rows: r.get("rows"),
        })
        .collect())
}

/// The planner's row estimate of `t` when it has one (`reltuples` >= 0), else a count.
pub async fn estimate_rows(
    conn: &mut PgConnection,
    t: &QName,
    reltuples: f64,
) -> Result<f64, Diagnostic> {
    if reltuples >= 0.0 {
        return Ok(reltuples);
    }
    let n: i64 = sqlx::query_scalar(sql!("SELECT count(*) FROM {t}").assert_safe())
        .fetch_one(conn)
        .await
        .map_err(db_error)?;
    Ok(n as f64)
}

/// Heap pages of `t` (for physical chunks).
pub async fn pages(conn: &mut PgConnection, t: &QName) -> Result<i64, Diagnostic> {
    sqlx::query_scalar(
        "SELECT (pg_relation_size(to_regclass($1)) / current_setting('block_size')::int8)",
    )
    .bind(t.to_string())
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// Key ranges of `key` over `source` for about `n` chunks: the quantile query when `n > 1`.
pub async fn key_ranges(
    conn: &mut PgConnection,
    key: &str,
    source: &str,
    n: usize,
) -> Result<Vec<Range>, Diagnostic> {
    let bounds: Vec<Option<String>> = if n > 1 {
        sqlx::query_scalar::<_, Option<Vec<Option<String>>>>(
            chunks::quantile_query(key, source).assert_safe(),
        )
        .bind(n as i32)
        .fetch_one(conn)
        .await
        .map_err(db_error)?
        .unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(chunks::key_ranges(bounds))
}
