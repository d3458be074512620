//! The SQL that keeps `green.T = M(blue)`: re-derivation by sync key (DESIGN.md, "How the
//! invariant is kept", step 3) rendered as plpgsql functions in the control schema.
//!
//! Per entry E two statements over arrays of sync keys: an upsert of `M(blue)` restricted to those
//! keys (mapped columns only, so green-only columns survive) and a delete of the green rows of those
//! keys that `M(blue)` no longer produces. They are inlined in the per-blue-table functions: the
//! trigger function (`capture` body during copy: log the changed rows; `live` body afterwards:
//! re-derive inside the writer's transaction), `catchup_X(ids)` replaying change-log rows, and
//! `retry_E()` for recorded failures. All find the touched keys with one rule: the entry's sync-key
//! expressions evaluated over its `from`, with X's alias reading the changed rows. Upserts run
//! parents first, deletes children first (green foreign keys). Each entry runs in its own
//! subtransaction: a failure is recorded with its keys, never raised to the application. Writers
//! are serialised on joined values and keys with transaction-level advisory locks; entries fed by
//! one table through a strict key take a fast path straight from the transition tables.
//!
//! Pure: mapping + catalog in, SQL text out.

mod derive;
mod functions;
mod keys;
#[cfg(test)]
mod tests;

use crate::catalog::{self, Catalog};
use crate::mapping::{Mapping, TableEntry};
use crate::plan::keys::{plain_column_of, sync_key, upsert_key};
use crate::sql::{Expr, Literal, QName, join};

pub use functions::{
    capture_trigger_function, catchup_function, live_trigger_function, retry_function,
};
pub use keys::join_equalities;

/// Above this many keys in one statement, re-derivation locks the whole entry instead of each key.
pub const MAX_KEY_LOCKS: usize = 32;

/// Settings pinned on every generated function, so expressions evaluate as in `plan` and `copy`
/// whatever the application session's settings are: the session settings every connection pins
/// (`crate::session`), the mapping's search_path, and no parallel plans inside a trigger.
fn function_settings(m: &Mapping) -> String {
    let mut s = format!(
        "SECURITY DEFINER SET search_path = {}",
        crate::plan::query::mapping_search_path(m)
    );
    for (name, value) in crate::session::function_settings() {
        s.push_str(&format!(" SET {name} = {}", Literal::new(value)));
    }
    s.push_str(" SET max_parallel_workers_per_gather = 0");
    s
}

/// One entry with what sync needs about it.
pub struct SyncEntry<'a> {
    pub index: usize,
    pub entry: &'a TableEntry,
    pub green: &'a catalog::Table,
    /// (green column, expression, green type)
    pub keys: Vec<(String, String, String)>,
    /// The green columns `ON CONFLICT` uses: the primary key, or a unique key, fully mapped.
    pub upsert_key: Vec<String>,
    /// Some sync-key column of green is nullable, so NULL keys need their own branch.
    pub nullable: bool,
    /// One blue table, ungrouped, keyed by plain columns that include a unique key of it: each
    /// green row comes from exactly one blue row, so a change re-derives from the changed rows
    /// alone (the live fast path: no second read of blue, no key arrays).
    pub row_local: bool,
}

/// The entries sync can key (a sync key and an upsert key), parents before children.
pub fn sync_entries<'a>(m: &'a Mapping, cat: &'a Catalog) -> Vec<SyncEntry<'a>> {
    let mut out = Vec::new();
    for (index, e) in m.tables.iter().enumerate() {
        let Some(gt) = cat.table(&QName::new(&m.green, &e.name)) else {
            continue;
        };
        let Some((keys, _)) = sync_key(e, gt) else {
            continue;
        };
        let Some(upsert_key) = upsert_key(e, gt) else {
            continue;
        };
        let keys: Vec<(String, String, String)> = keys
            .into_iter()
            .filter_map(|(c, x)| {
                let ty = gt.column(&c)?.type_sql.clone();
                Some((c, x, ty))
            })
            .collect();
        let nullable = keys
            .iter()
            .any(|(c, _, _)| gt.column(c).is_none_or(|gc| !gc.not_null));
        let driving = e.from_clause.driving();
        let key_cols: Option<Vec<String>> = keys
            .iter()
            .map(|(_, x, _)| plain_column_of(x, &driving.alias))
            .collect();
        // The fast path needs one green row per blue row: a strict blue key (valid, immediate,
        // NOT NULL) inside the sync key, and key values that reach green unchanged (same type).
        let row_local = e.group_by.is_empty()
            && e.from_clause.items.len() == 1
            && !nullable
            && key_cols.as_ref().is_some_and(|cols| {
                cat.table(&driving.table).is_some_and(|bt| {
                    bt.strict_unique_keys()
                        .iter()
                        .any(|uk| uk.iter().all(|c| cols.contains(c)))
                        && keys.iter().zip(cols.iter()).all(|((_, _, gty), bc)| {
                            bt.column(bc).is_some_and(|b| &b.type_sql == gty)
                        })
                })
            });
        out.push(SyncEntry {
            index,
            entry: e,
            green: gt,
            keys,
            upsert_key,
            nullable,
            row_local,
        });
    }
    order_by_foreign_keys(out, m)
}

/// Parents before children among the green tables (green foreign keys); ties keep mapping order.
fn order_by_foreign_keys<'a>(mut entries: Vec<SyncEntry<'a>>, m: &Mapping) -> Vec<SyncEntry<'a>> {
    let mut ordered: Vec<SyncEntry<'a>> = Vec::new();
    while !entries.is_empty() {
        let pos = entries
            .iter()
            .position(|e| {
                e.green.foreign_keys.iter().all(|fk| {
                    fk.ref_table.schema != m.green
                        || fk.ref_table.name == e.green.name
                        || !entries.iter().any(|o| o.green.name == fk.ref_table.name)
                })
            })
            .unwrap_or(0); // a cycle: keep mapping order
        ordered.push(entries.remove(pos));
    }
    ordered
}

impl SyncEntry<'_> {
    pub(super) fn unnest(&self, prefix: &str) -> String {
        format!(
            "unnest({}) AS u({})",
            join((0..self.keys.len()).map(|j| format!("{prefix}{j}")), ", "),
            join((0..self.keys.len()).map(|j| format!("k{j}")), ", ")
        )
    }
    pub(super) fn all_not_null(&self) -> String {
        join(
            (0..self.keys.len()).map(|j| format!("u.k{j} IS NOT NULL")),
            " AND ",
        )
    }
    pub(super) fn any_null(&self) -> String {
        join(
            (0..self.keys.len()).map(|j| format!("u.k{j} IS NULL")),
            " OR ",
        )
    }
    pub(super) fn key_tuple(&self) -> String {
        format!(
            "({})",
            join(
                self.keys
                    .iter()
                    .map(|(_, x, ty)| format!("{}::{ty}", Expr(x))),
                ", "
            )
        )
    }
}
