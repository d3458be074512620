//! Finding the sync keys a change touches (DESIGN.md, "Finding the sync keys a change touches"):
//! the entry's sync-key expressions over its `from`, with the changed alias reading the changed
//! rows; and the advisory locks on joined values that serialise writers meeting in one green row.

use super::{MAX_KEY_LOCKS, SyncEntry};
use crate::mapping::{JoinKind, Mapping, TableEntry};
use crate::sql::scan::{Kind, conjuncts, qualified_column, referenced_aliases, tokens};
use crate::sql::{Expr, Ident, Literal, QName, join};

impl SyncEntry<'_> {
    /// `SELECT array_agg(s.k0), ... INTO eN_k0, ... FROM (<source>) AS s;`: fill the key arrays.
    pub(super) fn collect_keys(&self, source: &str) -> String {
        format!(
            "SELECT {} INTO {} FROM ({source}) AS s;",
            join(
                (0..self.keys.len()).map(|j| format!("array_agg(s.k{j})")),
                ", "
            ),
            join(
                (0..self.keys.len()).map(|j| format!("e{}_k{j}", self.index)),
                ", "
            )
        )
    }

    /// Aliases of this entry that read blue table `x`.
    pub(super) fn aliases_of(&self, x: &QName) -> Vec<&str> {
        self.entry
            .from_clause
            .items
            .iter()
            .filter(|i| &i.table == x)
            .map(|i| i.alias.as_str())
            .collect()
    }

    /// `<sync-key expression>::<green type> AS k0, ...`: the keys of the rows a query reads.
    fn key_select(&self) -> String {
        join(
            self.keys
                .iter()
                .enumerate()
                .map(|(j, (_, x, ty))| format!("{}::{ty} AS k{j}", Expr(x))),
            ", ",
        )
    }

    /// `SELECT DISTINCT <keys> ...` for a change to alias `alias` whose rows are in `changed`.
    pub(super) fn touched_keys(&self, alias: &str, changed: &str) -> String {
        let sel = self.key_select();
        let only_this = self.keys.iter().all(|(_, x, _)| {
            let refs = referenced_aliases(
                x,
                &self
                    .entry
                    .from_clause
                    .items
                    .iter()
                    .map(|i| i.alias.as_str())
                    .collect::<Vec<_>>(),
            );
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

    /// Every key green holds or M(blue) produces (after a TRUNCATE).
    pub(super) fn all_keys(&self) -> String {
        let sel = self.key_select();
        let green_sel = join(
            self.keys
                .iter()
                .enumerate()
                .map(|(j, (c, _, _))| format!("bluegreen_g.{} AS k{j}", Ident::new(c))),
            ", ",
        );
        format!(
            "SELECT {green_sel} FROM {} AS bluegreen_g UNION SELECT {sel} FROM {}",
            self.green.qname(),
            self.entry.from_clause.render()
        )
    }
}

/// The entry's `from` with `alias` reading `changed`, its join made inner: only rows that matched
/// a changed row are touched.
pub(super) fn render_changed(e: &TableEntry, alias: &str, changed: &str) -> String {
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

/// The changed rows of blue table `x`, read from the change-log rows `ids` (catch-up).
pub(super) fn changes_relation(m: &Mapping, x: &QName) -> String {
    let ch = QName::new(&m.control_schema, "changes");
    let filter = format!(
        "c.migration = {} AND c.blue_table = {} AND c.id = ANY (ids)",
        Literal::new(&m.migration),
        Literal::new(x.display())
    );
    format!(
        "(SELECT r.* FROM {ch} AS c CROSS JOIN LATERAL jsonb_populate_record(NULL::{x}, c.old_row) AS r WHERE {filter} AND c.old_row IS NOT NULL UNION ALL SELECT r.* FROM {ch} AS c CROSS JOIN LATERAL jsonb_populate_record(NULL::{x}, c.new_row) AS r WHERE {filter} AND c.new_row IS NOT NULL)"
    )
}

/// The simple equalities `p.a = q.b` among the conjuncts of an entry's ON conditions, as
/// ((alias, column), (alias, column)). Writes through either side of one of them are serialised
/// on the joined value (see `join_locks`); other conditions are not followed by locks.
pub fn join_equalities(e: &TableEntry) -> Vec<((String, String), (String, String))> {
    let mut out = Vec::new();
    for item in &e.from_clause.items {
        let Some((_, on)) = &item.join else { continue };
        for part in conjuncts(on) {
            let Ok(toks) = tokens(part) else { continue };
            // alias.column = alias.column, and nothing else in the conjunct.
            if let Some(eq) = toks
                .iter()
                .position(|t| t.text == "=" && t.kind == Kind::Operator)
                && let (Some(l), Some(r)) = (
                    qualified_column(&part[..toks[eq].start]),
                    qualified_column(&part[toks[eq].end()..]),
                )
            {
                out.push((l, r));
            }
        }
    }
    out
}

/// Advisory locks on the joined values a change to `x` carries, so that two writers meeting in
/// one green row through different blue tables (a track's genre changed while the genre is
/// renamed) are serialised, and the second re-derives after the first commits. Taken before the
/// touched keys are found, so they are found in a snapshot that sees the first writer's commit.
pub(super) fn join_locks(
    m: &Mapping,
    e: &SyncEntry,
    x: &QName,
    changed: &str,
    indent: &str,
) -> String {
    let mut s = String::new();
    let aliases = e.aliases_of(x);
    let entry_lock = Literal::new(format!("bluegreen:{}:{}:", m.migration, e.entry.name));
    for (k, (l, r)) in join_equalities(e.entry).iter().enumerate() {
        for (a, c) in [l, r] {
            if !aliases.contains(&a.as_str()) {
                continue;
            }
            let p = Literal::new(format!("bluegreen:{}:{}:j{k}:", m.migration, e.entry.name));
            s.push_str(&format!(
                "{indent}SELECT array_agg(DISTINCT hashtextextended({p} || v.{col}::text, 0)) INTO lock_ids FROM {changed} AS v WHERE v.{col} IS NOT NULL;\n\
                 {indent}IF cardinality(lock_ids) > {MAX_KEY_LOCKS} THEN\n\
                 {indent}    PERFORM pg_advisory_xact_lock(hashtextextended({entry_lock}, 0));\n\
                 {indent}ELSIF lock_ids IS NOT NULL THEN\n\
                 {indent}    PERFORM pg_advisory_xact_lock_shared(hashtextextended({entry_lock}, 0));\n\
                 {indent}    PERFORM pg_advisory_xact_lock(h) FROM (SELECT h FROM unnest(lock_ids) AS h ORDER BY 1) AS s;\n\
                 {indent}END IF;\n",
                col = Ident::new(c),
            ));
        }
    }
    s
}

/// Key-finding statements for blue table `x` whose changed rows are in `changed`, each preceded
/// by the join-value locks of its entry.
pub(super) fn find_keys(
    m: &Mapping,
    entries: &[SyncEntry],
    x: &QName,
    changed: &str,
    indent: &str,
    skip_row_local: bool,
) -> String {
    let mut s = String::new();
    for e in entries {
        let aliases = e.aliases_of(x);
        if aliases.is_empty()
            || (skip_row_local && e.row_local && &e.entry.from_clause.driving().table == x)
        {
            continue;
        }
        s.push_str(&join_locks(m, e, x, changed, indent));
        let union = join(
            aliases.iter().map(|a| e.touched_keys(a, changed)),
            " UNION ",
        );
        s.push_str(&format!("{indent}{}\n", e.collect_keys(&union)));
    }
    s
}

pub(super) fn find_all_keys(m: &Mapping, entries: &[SyncEntry], x: &QName, indent: &str) -> String {
    let mut s = String::new();
    for e in entries.iter().filter(|e| !e.aliases_of(x).is_empty()) {
        // After a TRUNCATE every key may be touched: serialise on the whole entry.
        s.push_str(&format!(
            "{indent}PERFORM pg_advisory_xact_lock(hashtextextended({}, 0));\n",
            Literal::new(format!("bluegreen:{}:{}:", m.migration, e.entry.name))
        ));
        s.push_str(&format!("{indent}{}\n", e.collect_keys(&e.all_keys())));
    }
    s
}
