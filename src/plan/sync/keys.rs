//! Finding the sync keys a change touches (DESIGN.md, "Finding the sync keys a change touches"):
//! the entry's sync-key expressions over its `from`, with the changed alias reading the changed
//! rows (old and new images) and its join made inner. The applier evaluates it after the writer
//! committed, on committed blue, so a key a concurrent transaction moves into a changed row's reach
//! is found through that transaction's own change: chains of joins need no locks.

use super::SyncEntry;
use crate::mapping::{JoinKind, TableEntry};
use crate::sql::scan::referenced_aliases;
use crate::sql::{Expr, Ident, QName, Sql, join, sql};

impl SyncEntry<'_> {
    /// `((<sync-key expression>)::<green type>)::text AS k0, ...`: the keys of the rows a query
    /// reads, as the applier passes them back.
    fn key_texts(&self) -> String {
        join(
            self.keys
                .iter()
                .enumerate()
                .map(|(j, k)| format!("(({})::{})::text AS k{j}", Expr(&k.expr), k.green_type)),
            ", ",
        )
    }

    /// `SELECT DISTINCT <keys> ...` for a change to alias `alias` whose rows are in `changed`.
    fn touched_keys(&self, alias: &str, changed: &str) -> String {
        let sel = self.key_texts();
        let aliases = self.entry.from_clause.aliases();
        // Keys read only from the changed alias come straight from its rows.
        let only_this = self.keys.iter().all(|k| {
            let refs = referenced_aliases(&k.expr, &aliases);
            !refs.is_empty() && refs.iter().all(|a| *a == alias)
        });
        if only_this {
            format!(
                "SELECT DISTINCT {sel} FROM {changed} AS {}",
                Ident::new(alias)
            )
        } else {
            format!(
                "SELECT DISTINCT {sel} FROM {}",
                render_changed(self.entry, alias, changed)
            )
        }
    }

    /// The keys of the rows of `rel` (a transition table of the driving table), as
    /// `SELECT DISTINCT k0, ...` in the applier's text form; None when a key reads another alias
    /// than the driving one (its keys need the join: the follower's).
    pub(super) fn keys_of_driving_rows(&self, rel: &str) -> Option<String> {
        let d = &self.entry.from_clause.driving().alias;
        let aliases = self.entry.from_clause.aliases();
        self.keys
            .iter()
            .all(|k| {
                let refs = referenced_aliases(&k.expr, &aliases);
                !refs.is_empty() && refs.iter().all(|a| a == d)
            })
            .then(|| self.touched_keys(d, rel))
    }

    /// The keys touched by the change-log rows `$1` (ids) of blue table `x`, through every alias
    /// that reads it (through their old images only when `$2`).
    pub(super) fn find_keys_in_log(&self, m: &crate::mapping::Mapping, x: &QName) -> Sql {
        let changed = changes_relation(&QName::new(&m.control_schema, "changes"), x);
        sql!(
            "{}",
            join(
                self.aliases_of(x)
                    .iter()
                    .map(|a| self.touched_keys(a, &changed)),
                " UNION "
            )
        )
    }
}

/// The entry's `from` with `alias` reading `changed`, its join made inner: only rows that matched
/// a changed row are touched.
fn render_changed(e: &TableEntry, alias: &str, changed: &str) -> String {
    let mut fc = e.from_clause.clone();
    for it in &mut fc.items {
        if it.alias == alias
            && let Some((kind, _)) = &mut it.join
        {
            *kind = JoinKind::Inner;
        }
    }
    fc.render_with(Some((alias, changed)))
}

/// The old and new images of the change-log rows `$1` (ids) as rows of blue table `x`, in one
/// read of the log (a scan per image read every row twice); only the old images when `$2` is true
/// (an update logged as one row whose new image cannot be followed).
fn changes_relation(changes: &QName, x: &QName) -> String {
    format!(
        "(SELECT r.* FROM {changes} AS bluegreen_c CROSS JOIN LATERAL (VALUES (bluegreen_c.old_row), (CASE WHEN $2::pg_catalog.bool THEN NULL ELSE bluegreen_c.new_row END)) AS bluegreen_i (image) CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::{x}, bluegreen_i.image) AS r WHERE bluegreen_c.id = ANY ($1::int8[]) AND bluegreen_i.image IS NOT NULL)"
    )
}
