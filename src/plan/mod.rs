//! Mapping + Catalog (+ the facts `probe` measured) -> [`Plan`]: per green table what will be
//! copied, how it is chunked and kept in sync, whether it can be rolled back losslessly, and every
//! SQL statement the later steps run with the lock each takes. Pure: no sqlx, no tokio, no I/O, so
//! all of it is unit-tested without a database.

pub mod query;
pub mod render;
pub mod steps;
pub mod sync;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::catalog::{self, Catalog};
use crate::diag::{Diagnostic, Severity, did_you_mean};
use crate::mapping::{Mapping, Reverse, TableEntry};
use crate::sql::QName;

/// Rows copied per second per job, used only for the runbook's duration estimates (measured on
/// the 2-core reference machine with deferred indexes; see BENCHMARKS.md).
pub const ROWS_PER_SECOND_PER_JOB: f64 = 100_000.0;

/// Defaults for settings neither the mapping nor the command line gave.
pub const DEFAULT_JOBS: u32 = 4;
pub const DEFAULT_CHUNK_ROWS: u64 = 100_000;
pub const DEFAULT_LOCK_TIMEOUT_MS: u64 = 2_000;

/// What `probe` learned about one entry from the live database.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EntryFacts {
    /// Every expression compiled and fits its green column.
    pub compiled: bool,
    /// Relations the entry reads, as PostgreSQL resolved them.
    pub reads: Vec<QName>,
    pub profile: Option<Profile>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    /// `sample` or `full`.
    pub mode: String,
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
pub struct EffectiveSettings {
    pub jobs: u32,
    pub chunk_rows: u64,
    pub lock_timeout_ms: u64,
    pub profile: String,
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
    pub chunk_key: String,
    pub chunks: u64,
    pub sync_key: Vec<(String, String)>,
    /// `mapping` or `primary key`.
    pub sync_key_source: String,
    pub sync_key_indexed: bool,
    pub reverse: ReversePlan,
    pub defaults: Vec<String>,
    pub profile: Option<Profile>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReversePlan {
    /// `invertible`, `lossy` (reverse: none or uncovered columns), `not applicable` (another entry
    /// carries this driving table's reverse) or `no` (group_by).
    pub verdict: String,
    /// Blue column -> expression over the green table.
    pub columns: Vec<(String, String)>,
    pub auto: Vec<String>,
    pub declared: Vec<String>,
    pub missing: Vec<String>,
}

/// The sync key of an entry: given in the mapping, or the green primary key when each of its
/// columns is mapped.
pub fn sync_key(
    entry: &TableEntry,
    green: &catalog::Table,
) -> Option<(Vec<(String, String)>, &'static str)> {
    if let Some(sk) = &entry.sync_key {
        return Some((
            sk.iter()
                .map(|(c, e)| (c.clone(), e.text.clone()))
                .collect(),
            "mapping",
        ));
    }
    let pk = green.primary_key.as_ref()?;
    let cols: Option<Vec<(String, String)>> = pk
        .columns
        .iter()
        .map(|c| {
            entry
                .column(c)
                .filter(|col| col.value_map.is_none())
                .map(|col| (c.clone(), col.expr.text.clone()))
        })
        .collect();
    cols.map(|c| (c, "primary key"))
}

/// `alias.column` (the column optionally double-quoted) as a plain reference to a column of
/// `alias`; returns the column name.
pub fn plain_column_of<'a>(expr: &'a str, alias: &str) -> Option<&'a str> {
    let (a, c) = expr.trim().split_once('.')?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
    };
    let c = match c.strip_prefix('"').and_then(|c| c.strip_suffix('"')) {
        Some(q) if !q.contains('"') && !q.is_empty() => q,
        _ if plain(c) => c,
        _ => return None,
    };
    (a == alias).then_some(c)
}

/// `alias.column::type` or `CAST(alias.column AS type)`: a column read through a cast.
fn cast_of<'a>(expr: &'a str, alias: &str) -> Option<&'a str> {
    // The whole expression must be the cast: a type name, optionally with a modifier or [].
    let is_type = |t: &str| {
        let t = t.trim();
        let base = t.trim_end_matches("[]");
        let base = match base.split_once('(') {
            Some((b, rest)) => {
                if !rest.ends_with(')')
                    || !rest[..rest.len() - 1]
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == ',' || c == ' ')
                {
                    return false;
                }
                b
            }
            None => base,
        };
        !base.is_empty()
            && base.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == ' ' || c == '.'
            })
    };
    let e = expr.trim();
    if let Some((inner, ty)) = e.split_once("::") {
        return if is_type(ty) {
            plain_column_of(inner, alias)
        } else {
            None
        };
    }
    let lower = e.to_ascii_lowercase();
    if lower.starts_with("cast(") && e.ends_with(')') {
        let inner = &e[5..e.len() - 1];
        let pos = inner.to_ascii_lowercase().find(" as ")?;
        return if is_type(&inner[pos + 4..]) {
            plain_column_of(&inner[..pos], alias)
        } else {
            None
        };
    }
    None
}

/// Checks that need the catalog but no query: names exist, keys resolve, reverse targets exist.
pub fn static_checks(m: &Mapping, cat: &Catalog) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let green_names: Vec<&str> = cat.tables_in(&m.green).map(|t| t.name.as_str()).collect();
    let blue_names: Vec<String> = cat
        .tables
        .values()
        .filter(|t| t.schema != m.green)
        .map(|t| t.qname().display())
        .collect();
    for e in &m.tables {
        for item in &e.from_clause.items {
            if cat.table(&item.table).is_none() {
                let wanted = item.table.display();
                out.push(
                    Diagnostic::error(
                        "unknown-blue-table",
                        format!("blue table {wanted} does not exist"),
                    )
                    .at(Some(e.from.span.clone()))
                    .table(&e.name)
                    .maybe_hint(did_you_mean(&wanted, blue_names.iter().map(String::as_str)))
                    .hint_or("check the schema and table name in `from`"),
                );
            } else if item.table.schema == m.green {
                out.push(
                    Diagnostic::error("reads-green", format!("`from` reads green table {}", item.table.display()))
                        .at(Some(e.from.span.clone()))
                        .table(&e.name)
                        .hint("green is computed from blue only: derive values from blue tables (deterministic ids such as md5(key)::uuid)"),
                );
            }
        }
        let Some(gt) = cat.table(&QName::new(&m.green, &e.name)) else {
            out.push(
                Diagnostic::error(
                    "unknown-green-table",
                    format!(
                        "green table {}.{} does not exist after green_ddl ran",
                        m.green, e.name
                    ),
                )
                .at(Some(e.span.clone()))
                .table(&e.name)
                .maybe_hint(did_you_mean(&e.name, green_names.iter().copied()))
                .hint_or(format!("create it in {}", m.green_ddl.display())),
            );
            continue;
        };
        for c in &e.columns {
            match gt.column(&c.name) {
                None => out.push(
                    Diagnostic::error(
                        "unknown-green-column",
                        format!(
                            "green table {}.{} has no column {}",
                            m.green, e.name, c.name
                        ),
                    )
                    .at(Some(c.span.clone()))
                    .table(&e.name)
                    .column(&c.name)
                    .maybe_hint(did_you_mean(&c.name, gt.column_names()))
                    .hint_or(format!(
                        "columns: {}",
                        gt.column_names().collect::<Vec<_>>().join(", ")
                    )),
                ),
                Some(gc) if gc.generated == "s" => out.push(
                    Diagnostic::error(
                        "generated-column",
                        format!("{} is a generated column: PostgreSQL computes it", c.name),
                    )
                    .at(Some(c.span.clone()))
                    .table(&e.name)
                    .column(&c.name)
                    .hint("leave it out of `columns`"),
                ),
                _ => {}
            }
        }
        for gc in &gt.columns {
            if gc.not_null && !gc.has_default() && e.column(&gc.name).is_none() {
                out.push(
                    Diagnostic::error(
                        "unmapped-not-null",
                        format!("green column {} is NOT NULL without a default and not mapped: every insert would fail", gc.name),
                    )
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .column(&gc.name)
                    .hint("map it in `columns`, or give it a DEFAULT in the green DDL"),
                );
            }
        }
        match sync_key(e, gt) {
            None => out.push(
                Diagnostic::error("no-sync-key", "no sync key: the green table has no primary key whose columns are all mapped (plainly, not through `map`)")
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint("add `sync_key: { <green column>: <expression> }` naming what identifies the rows derived from one driving row or group"),
            ),
            Some((keys, _)) => {
                for (col, expr) in &keys {
                    match e.column(col) {
                        None => out.push(
                            Diagnostic::error("bad-sync-key", format!("sync key column {col} is not in `columns`"))
                                .at(Some(e.span.clone()))
                                .table(&e.name)
                                .column(col)
                                .hint("a sync key column must be mapped, so green rows can be found by it"),
                        ),
                        Some(c) if c.value_map.is_some() => out.push(
                            Diagnostic::error("bad-sync-key", format!("sync key column {col} is mapped through `map`: green holds the mapped values, not `{expr}`"))
                                .at(Some(c.span.clone()))
                                .table(&e.name)
                                .column(col)
                                .hint("use a column mapped by a plain expression as the sync key"),
                        ),
                        Some(c) if normalize(&c.expr.text) != normalize(expr) => out.push(
                            Diagnostic::error(
                                "bad-sync-key",
                                format!("sync key {col}: `{expr}` differs from the column's expression `{}`", c.expr.text),
                            )
                            .at(Some(c.span.clone()))
                            .table(&e.name)
                            .column(col)
                            .hint("the sync key must be the value the column is mapped to; write the same expression"),
                        ),
                        _ => {}
                    }
                }
            }
        }
        if let Reverse::Columns(cols) = &e.reverse
            && let Some(bt) = e
                .from_clause
                .items
                .first()
                .and_then(|i| cat.table(&i.table))
        {
            for (bc, expr) in cols {
                if bt.column(bc).is_none() {
                    out.push(
                        Diagnostic::error(
                            "unknown-blue-column",
                            format!(
                                "reverse: blue table {} has no column {bc}",
                                bt.qname().display()
                            ),
                        )
                        .at(Some(expr.span.clone()))
                        .table(&e.name)
                        .column(bc)
                        .maybe_hint(did_you_mean(bc, bt.column_names())),
                    );
                }
            }
            if !e.group_by.is_empty() {
                out.push(
                    Diagnostic::error(
                        "reverse-group-by",
                        "an entry with group_by merges rows and cannot carry a reverse",
                    )
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint("write `reverse: none`"),
                );
            }
        }
    }
    out
}

fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Diagnostic {
    /// Set a hint only if none is set yet.
    pub fn hint_or(mut self, h: impl Into<String>) -> Self {
        if self.hint.is_none() {
            self.hint = Some(h.into());
        }
        self
    }
}

/// How each entry's driving table is reversed (green -> blue), and which entry owns it.
fn reverse_plan(m: &Mapping, e: &TableEntry, cat: &Catalog) -> ReversePlan {
    let mut rp = ReversePlan {
        verdict: String::new(),
        columns: Vec::new(),
        auto: Vec::new(),
        declared: Vec::new(),
        missing: Vec::new(),
    };
    let driving = e.from_clause.driving();
    if matches!(e.reverse, Reverse::None) {
        rp.verdict = "lossy".into();
        return rp;
    }
    if !e.group_by.is_empty() {
        rp.verdict = "no".into();
        return rp;
    }
    // Another entry on the same driving table that declares its reverse owns it.
    if matches!(e.reverse, Reverse::Auto)
        && m.tables.iter().any(|o| {
            o.name != e.name
                && matches!(o.reverse, Reverse::Columns(_))
                && o.from_clause.items.first().map(|i| &i.table) == Some(&driving.table)
        })
    {
        rp.verdict = "not applicable".into();
        return rp;
    }
    let Some(bt) = cat.table(&driving.table) else {
        rp.verdict = "no".into();
        return rp;
    };
    let declared: BTreeMap<&str, &str> = match &e.reverse {
        Reverse::Columns(cols) => cols
            .iter()
            .map(|(c, x)| (c.as_str(), x.text.as_str()))
            .collect(),
        _ => BTreeMap::new(),
    };
    for bc in &bt.columns {
        if let Some(x) = declared.get(bc.name.as_str()) {
            rp.columns.push((bc.name.clone(), x.to_string()));
            rp.declared.push(bc.name.clone());
            continue;
        }
        let auto = e.columns.iter().find(|c| {
            c.value_map.is_none()
                && (plain_column_of(&c.expr.text, &driving.alias) == Some(bc.name.as_str())
                    || cast_of(&c.expr.text, &driving.alias) == Some(bc.name.as_str()))
        });
        match auto {
            Some(c) => {
                rp.columns.push((
                    bc.name.clone(),
                    format!("{}::{}", crate::sql::Ident::new(&c.name), bc.type_sql),
                ));
                rp.auto.push(bc.name.clone());
            }
            None => rp.missing.push(bc.name.clone()),
        }
    }
    rp.verdict = if rp.missing.is_empty() {
        "invertible"
    } else {
        "lossy"
    }
    .into();
    rp
}

/// Options of `plan` that are not in the mapping.
#[derive(Clone, Debug)]
pub struct Options {
    pub jobs: Option<u32>,
    pub chunk_rows: Option<u64>,
    pub lock_timeout_ms: Option<u64>,
    pub profile: String,
}

pub fn effective_settings(m: &Mapping, o: &Options) -> EffectiveSettings {
    EffectiveSettings {
        jobs: o.jobs.or(m.settings.jobs).unwrap_or(DEFAULT_JOBS),
        chunk_rows: o
            .chunk_rows
            .or(m.settings.chunk_rows)
            .unwrap_or(DEFAULT_CHUNK_ROWS),
        lock_timeout_ms: o
            .lock_timeout_ms
            .or(m.settings.lock_timeout.map(|d| d.as_millis() as u64))
            .unwrap_or(DEFAULT_LOCK_TIMEOUT_MS),
        profile: o.profile.clone(),
    }
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
            .map(|x| plain_column_of(x, &driving.alias).map(str::to_string))
            .collect();
        let sync_key_indexed = plain.as_ref().is_some_and(|cols| bt.has_index_on(cols));
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
        let chunk_key = chunk_key(e, bt, &sync);
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
        let nullable_key = plain.as_ref().is_some_and(|cols| {
            cols.iter()
                .any(|c| bt.column(c).is_some_and(|bc| !bc.not_null))
        });
        let chunks = ((est_driving / settings.chunk_rows as f64).ceil() as u64).max(1)
            + u64::from(nullable_key);
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
        let reverse = reverse_plan(m, e, cat);
        if reverse.verdict == "lossy" && !matches!(e.reverse, Reverse::None) {
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
        if reverse.verdict == "invertible" || reverse.verdict == "lossy" {
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

/// What copy ranges over: the first sync-key expression when it is a plain driving column or the
/// entry groups (groups must never be split across chunks); else the driving primary key; else
/// physical ranges.
pub fn chunk_key(e: &TableEntry, bt: &catalog::Table, sync: &[(String, String)]) -> String {
    let alias = &e.from_clause.driving().alias;
    if let Some((_, first)) = sync.first()
        && (!e.group_by.is_empty() || plain_column_of(first, alias).is_some())
    {
        return first.clone();
    }
    match &bt.primary_key {
        Some(pk) => format!(
            "{}.{}",
            crate::sql::Ident::new(alias),
            crate::sql::Ident::new(&pk.columns[0])
        ),
        None => "ctid (physical ranges)".into(),
    }
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
