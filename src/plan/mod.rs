//! Mapping + Catalog (+ the facts `probe` measured) -> [`Plan`]: per green table what will be
//! copied, how it is chunked and kept in sync, whether it can be rolled back losslessly, and every
//! SQL statement the later steps run with the lock each takes. Pure: no sqlx, no tokio, no I/O, so
//! all of it is unit-tested without a database.

pub mod checks;
pub mod chunks;
pub mod cutover;
pub mod keys;
pub mod query;
pub mod render;
pub mod reverse;
pub mod settings;
pub mod steps;
pub mod sync;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::catalog::Catalog;
use crate::diag::{Diagnostic, Severity};
use crate::mapping::{Mapping, Reverse};
use crate::sql::QName;

pub use checks::static_checks;
pub use keys::{ChunkKey, chunk_key, plain_column_of, sync_key, upsert_key};
pub use reverse::{ReversePlan, Verdict};
pub use settings::{EffectiveSettings, Options, ProfileMode, effective_settings};

/// Rows copied per second per job, used only for the runbook's duration estimates (measured on
/// the 2-core reference machine with deferred indexes; see BENCHMARKS.md).
pub const ROWS_PER_SECOND_PER_JOB: f64 = 100_000.0;

/// How live sync keeps a green table (`plan` prints it per table).
#[derive(Clone, Debug, Serialize)]
pub struct SyncMode {
    /// `row-local`: re-derived in the writer's own statement; `follower`: logged by the writer,
    /// re-derived by `bluegreen sync --follow` after it commits; `none`: sync cannot key it.
    pub mode: &'static str,
    /// Why not row-local.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A row-local step that could fail runs in a subtransaction (its rows go to the change log
    /// if it fails).
    pub subtransaction: bool,
}

/// What `probe` learned about one entry from the live database.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EntryFacts {
    /// Every expression compiled and fits its green column.
    pub compiled: bool,
    /// Relations the entry reads, as PostgreSQL resolved them.
    pub reads: Vec<QName>,
    pub profile: Option<Profile>,
    /// An expression index of the driving table whose leading expressions are the sync key's
    /// (`"User_id_uuid_idx"` on `(id::uuid)`), as PostgreSQL deparses both.
    pub sync_key_index: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    /// `sample` or `full`.
    pub mode: ProfileMode,
    /// Fraction of the driving table read (1.0 for full).
    pub fraction: f64,
    pub driving_rows_read: i64,
    pub rows_produced: i64,
    pub avg_row_bytes: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub migration: String,
    pub mapping_file: String,
    pub mapping_digest: String,
    pub blue: String,
    pub green: String,
    pub control_schema: String,
    pub server_version: String,
    pub database: String,
    pub settings: EffectiveSettings,
    pub green_ddl_ran: bool,
    pub tables: Vec<TablePlan>,
    pub unmapped_blue_tables: Vec<String>,
    pub steps: Vec<steps::Step>,
    pub estimates: Estimates,
    pub diagnostics: Vec<Diagnostic>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Estimates {
    pub total_rows: f64,
    pub total_bytes: f64,
    pub copy_seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TablePlan {
    pub name: String,
    pub green: QName,
    pub driving: QName,
    pub joins: Vec<QName>,
    /// `1:1`, `1:N filter` or `N:1 group_by`.
    pub shape: String,
    pub estimated_driving_rows: f64,
    pub estimated_rows: f64,
    pub estimated_bytes: f64,
    pub chunk_key: ChunkKey,
    pub chunks: u64,
    pub sync_key: Vec<(String, String)>,
    /// `mapping` or `primary key`.
    pub sync_key_source: String,
    pub sync_key_indexed: bool,
    pub reverse: ReversePlan,
    /// How live sync keeps the table: `row-local` (in the writer's statement) or `follower`.
    pub sync: SyncMode,
    pub defaults: Vec<String>,
    pub profile: Option<Profile>,
}

/// Assemble the plan. `diagnostics` are those found so far (mapping, static checks, probe).
pub fn build(
    m: &Mapping,
    cat: &Catalog,
    facts: &BTreeMap<String, EntryFacts>,
    opts: &Options,
    green_ddl_ran: bool,
    mut diagnostics: Vec<Diagnostic>,
) -> Plan {
    let settings = effective_settings(m, opts);
    let sync_modes: Vec<(String, SyncMode)> = sync::sync_entries(m, cat)
        .iter()
        .map(|e| {
            let mode = match &e.mode {
                sync::Mode::RowLocal { infallible } => SyncMode {
                    mode: "row-local",
                    reason: None,
                    subtransaction: !infallible,
                },
                sync::Mode::Follower { reason } => SyncMode {
                    mode: "follower",
                    reason: Some(reason.clone()),
                    subtransaction: false,
                },
            };
            (e.entry.name.clone(), mode)
        })
        .collect();
    let mut tables = Vec::new();
    for e in &m.tables {
        let Some(gt) = cat.table(&QName::new(&m.green, &e.name)) else {
            continue;
        };
        let driving = e.from_clause.driving();
        let Some(bt) = cat.table(&driving.table) else {
            continue;
        };
        let f = facts.get(&e.name).cloned().unwrap_or_default();
        let (sync, source) = sync_key(e, gt).unwrap_or_default();
        let key_exprs: Vec<&str> = sync.iter().map(|(_, x)| x.as_str()).collect();
        // The sync key is backed by a blue index when it is made of plain driving columns that
        // lead some index; otherwise each write would scan the driving table.
        let plain: Option<Vec<String>> = key_exprs
            .iter()
            .map(|x| plain_column_of(x, &driving.alias))
            .collect();
        let sync_key_indexed =
            plain.as_ref().is_some_and(|cols| bt.has_index_on(cols)) || f.sync_key_index.is_some();
        if !sync.is_empty() && !sync_key_indexed {
            diagnostics.push(
                Diagnostic::warning(
                    "sync-key-not-indexed",
                    format!(
                        "sync key ({}) is not backed by an index on {}: each captured write would scan it",
                        key_exprs.join(", "),
                        bt.qname().display()
                    ),
                )
                .at(Some(e.span.clone()))
                .table(&e.name)
                .hint(match &plain {
                    Some(cols) => format!("CREATE INDEX CONCURRENTLY ON {} ({})", bt.qname(), cols.join(", ")),
                    None => "use plain columns of the driving table as the sync key, or add an expression index".into(),
                }),
            );
        }
        let chunk_key = chunk_key(e, bt, gt, &sync);
        let est_driving = if bt.reltuples >= 0.0 {
            bt.reltuples
        } else {
            f.profile
                .as_ref()
                .map(|p| p.driving_rows_read as f64)
                .unwrap_or(0.0)
        };
        let (est_rows, est_bytes) = match &f.profile {
            Some(p) if p.driving_rows_read > 0 => {
                let ratio = p.rows_produced as f64 / p.driving_rows_read as f64;
                let rows = (est_driving * ratio).round();
                (rows, rows * p.avg_row_bytes)
            }
            Some(p) => (
                p.rows_produced as f64,
                p.rows_produced as f64 * p.avg_row_bytes,
            ),
            None => (est_driving, bt.heap_bytes as f64),
        };
        // As copy plans them (`copy::plan_chunks`): a key in no order on a heap too large to stay
        // cached gets a few large chunks; key ranges always end with the NULL keys' own chunk.
        let chunks = match &chunk_key {
            ChunkKey::Expr(k) => {
                let scattered =
                    chunks::scattered_key(k, &driving.alias, bt, cat.server.shared_buffers);
                chunks::planned_count(est_driving, settings.chunk_rows, settings.jobs, scattered)
                    as u64
                    + 1
            }
            ChunkKey::Physical => chunks::count(est_driving, settings.chunk_rows) as u64,
        };
        let defaults = gt
            .columns
            .iter()
            .filter(|c| e.column(&c.name).is_none())
            .map(|c| c.name.clone())
            .collect();
        let shape = if !e.group_by.is_empty() {
            "N:1 group_by"
        } else if e.where_.is_some()
            || e.from_clause
                .items
                .iter()
                .any(|i| matches!(i.join, Some((crate::mapping::JoinKind::Inner, _))))
        {
            "1:1 filtered"
        } else {
            "1:1"
        };
        let reverse = reverse::reverse_plan(m, e, cat);
        if reverse.verdict == Verdict::Lossy && !matches!(e.reverse, Reverse::None) {
            diagnostics.push(
                Diagnostic::warning(
                    "not-invertible",
                    format!(
                        "rollback cannot rebuild blue columns {} of {} from green",
                        reverse.missing.join(", "),
                        bt.qname().display()
                    ),
                )
                .at(Some(e.span.clone()))
                .table(&e.name)
                .hint("add them under `reverse:` as expressions over the green table, or write `reverse: none` to accept a lossy rollback"),
            );
        }
        if matches!(reverse.verdict, Verdict::Invertible | Verdict::Lossy) {
            for bc in &bt.columns {
                if bc.not_null
                    && !bc.has_default()
                    && reverse.missing.contains(&bc.name)
                    && !matches!(e.reverse, Reverse::None)
                {
                    diagnostics.push(
                        Diagnostic::warning(
                            "reverse-insert-fails",
                            format!("blue column {} is NOT NULL without a default and the reverse leaves it unfilled: rows inserted on green after cutover cannot reach blue", bc.name),
                        )
                        .at(Some(e.span.clone()))
                        .table(&e.name)
                        .column(&bc.name),
                    );
                }
            }
        }
        if matches!(e.reverse, Reverse::None) {
            diagnostics.push(
                Diagnostic::info("rollback-loses-writes", "reverse: none: rollback loses writes made to this table on green; cutover needs --accept-lossy-rollback")
                    .at(Some(e.span.clone()))
                    .table(&e.name),
            );
        }
        tables.push(TablePlan {
            name: e.name.clone(),
            green: gt.qname(),
            driving: driving.table.clone(),
            joins: e.from_clause.items[1..]
                .iter()
                .map(|i| i.table.clone())
                .collect(),
            shape: shape.into(),
            estimated_driving_rows: est_driving.max(0.0),
            estimated_rows: est_rows.max(0.0),
            estimated_bytes: est_bytes.max(0.0),
            chunk_key,
            chunks,
            sync_key: sync,
            sync_key_source: source.into(),
            sync_key_indexed,
            reverse,
            sync: sync_modes
                .iter()
                .find(|(n, _)| n == &e.name)
                .map(|(_, s)| s.clone())
                .unwrap_or(SyncMode {
                    mode: "none",
                    reason: Some("sync cannot key this table (no arbiter key)".into()),
                    subtransaction: false,
                }),
            defaults,
            profile: f.profile.clone(),
        });
    }
    let read: Vec<QName> = m.blue_tables_read();
    let unmapped_blue_tables: Vec<String> = cat
        .tables_in(&m.blue)
        .filter(|t| !read.contains(&t.qname()))
        .map(|t| t.name.clone())
        .collect();
    for t in &unmapped_blue_tables {
        diagnostics.push(
            Diagnostic::info("blue-table-unmapped", format!("blue table {}.{t} is not read by any entry: it stays in blue and is not synced", m.blue))
                .table(t),
        );
    }
    let total_rows: f64 = tables.iter().map(|t| t.estimated_rows).sum();
    let total_driving: f64 = tables.iter().map(|t| t.estimated_driving_rows).sum();
    let estimates = Estimates {
        total_rows,
        total_bytes: tables.iter().map(|t| t.estimated_bytes).sum(),
        copy_seconds: total_driving
            / (ROWS_PER_SECOND_PER_JOB * f64::from(settings.jobs.min(cpu_bound_jobs())))
            + 1.0,
    };
    diagnostics.sort_by_key(|d| d.severity);
    let steps = steps::all(m, cat, &settings);
    Plan {
        migration: m.migration.clone(),
        mapping_file: m.path.display().to_string(),
        mapping_digest: m.digest(),
        blue: m.blue.clone(),
        green: m.green.clone(),
        control_schema: m.control_schema.clone(),
        server_version: cat.server.version.clone(),
        database: cat.server.database.clone(),
        settings,
        green_ddl_ran,
        tables,
        unmapped_blue_tables,
        steps,
        estimates,
        diagnostics,
    }
}

/// Parallel copy scales with server cores, not with jobs beyond them; the estimate assumes the
/// server has at least 2.
fn cpu_bound_jobs() -> u32 {
    2
}

impl Plan {
    pub fn errors(&self) -> usize {
        self.diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }
}

#[cfg(test)]
mod tests;
