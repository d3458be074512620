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

use crate::catalog::{self, Catalog};
use crate::mapping::{JoinKind, Mapping, TableEntry};
use crate::names;
use crate::plan::query::{Shape, column_sql, mapped_columns, mapping_select};
use crate::sql::{Expr, Ident, Literal, QName, Sql, join};

/// Above this many keys in one statement, re-derivation locks the whole entry instead of each key.
pub const MAX_KEY_LOCKS: usize = 32;

/// Settings pinned on every generated function, so expressions evaluate as in `plan` and `copy`
/// whatever the application session's settings are.
fn function_settings(m: &Mapping) -> String {
    format!(
        "SECURITY DEFINER SET search_path = {} SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = 3 SET max_parallel_workers_per_gather = 0",
        crate::plan::query::mapping_search_path(m)
    )
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

/// The green key an upsert conflicts on: the primary key or the first unique key whose columns
/// are all mapped (plainly).
pub fn upsert_key(e: &TableEntry, gt: &catalog::Table) -> Option<Vec<String>> {
    gt.unique_keys()
        .into_iter()
        .find(|k| k.iter().all(|c| e.column(c).is_some()))
}

pub fn sync_entries<'a>(m: &'a Mapping, cat: &'a Catalog) -> Vec<SyncEntry<'a>> {
    let mut out = Vec::new();
    for (index, e) in m.tables.iter().enumerate() {
        let Some(gt) = cat.table(&QName::new(&m.green, &e.name)) else {
            continue;
        };
        let Some((keys, _)) = super::sync_key(e, gt) else {
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
            .map(|(_, x, _)| super::plain_column_of(x, &driving.alias).map(str::to_string))
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
    fn unnest(&self, prefix: &str) -> String {
        format!(
            "unnest({}) AS u({})",
            join((0..self.keys.len()).map(|j| format!("{prefix}{j}")), ", "),
            join((0..self.keys.len()).map(|j| format!("k{j}")), ", ")
        )
    }
    fn all_not_null(&self) -> String {
        join(
            (0..self.keys.len()).map(|j| format!("u.k{j} IS NOT NULL")),
            " AND ",
        )
    }
    fn any_null(&self) -> String {
        join(
            (0..self.keys.len()).map(|j| format!("u.k{j} IS NULL")),
            " OR ",
        )
    }
    fn key_tuple(&self) -> String {
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
    /// `M(blue)` restricted to the keys in the parameter arrays `k0..`: non-NULL keys through an
    /// indexable IN, NULL keys in a second branch the planner skips when there are none.
    fn restricted_m(&self, m: &Mapping, prefix: &str) -> String {
        let u = self.unnest(prefix);
        let in_keys = format!(
            "{} IN (SELECT {} FROM {u} WHERE {})",
            self.key_tuple(),
            join((0..self.keys.len()).map(|j| format!("u.k{j}")), ", "),
            self.all_not_null()
        );
        let null_keys = format!(
            "EXISTS (SELECT 1 FROM {u} WHERE ({}) AND {})",
            self.any_null(),
            join(
                self.keys.iter().enumerate().map(|(j, (_, x, ty))| format!(
                    "u.k{j} IS NOT DISTINCT FROM {}::{ty}",
                    Expr(x)
                )),
                " AND "
            )
        );
        let has_null = format!("EXISTS (SELECT 1 FROM {u} WHERE {})", self.any_null());
        let one = |extra_where: Vec<String>| {
            mapping_select(
                self.entry,
                self.green,
                &m.control_schema,
                &Shape {
                    extra_where,
                    ..Shape::default()
                },
            )
            .0
        };
        format!(
            "{} UNION ALL {}",
            one(vec![in_keys]),
            one(vec![has_null, null_keys])
        )
    }
    fn mapped(&self) -> Vec<&str> {
        mapped_columns(self.entry, self.green)
    }

    /// `INSERT INTO green (mapped columns) SELECT * FROM (<select>) ON CONFLICT (green key)`,
    /// updating only the mapped columns, and only rows whose rendering changes.
    fn upsert(&self, select: &str) -> String {
        let cols = self.mapped();
        let overriding = cols
            .iter()
            .any(|c| self.green.column(c).is_some_and(|gc| gc.identity == "a"));
        format!(
            "INSERT INTO {t} AS bluegreen_g ({cols}){ov}\n    SELECT * FROM ({select}) AS m\n    ON CONFLICT ({key}) {conflict};",
            t = self.green.qname(),
            cols = join(cols.iter().map(|c| Ident::new(*c)), ", "),
            ov = if overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            },
            key = join(self.upsert_key.iter().map(Ident::new), ", "),
            conflict = self.conflict_clause(),
        )
    }

    /// The fast path's upsert: M(blue) over the changed rows themselves.
    fn fast_up_sql(&self, m: &Mapping, changed: &str) -> String {
        let alias = self.entry.from_clause.driving().alias.as_str();
        let shape = Shape {
            replace: Some((alias, changed)),
            ..Shape::default()
        };
        self.upsert(mapping_select(self.entry, self.green, &m.control_schema, &shape).as_str())
    }

    /// `(bluegreen_g.k1, ...)`: the sync-key columns of the green row being deleted.
    fn green_key_tuple(&self) -> String {
        format!(
            "({})",
            join(
                self.keys
                    .iter()
                    .map(|(c, _, _)| format!("bluegreen_g.{}", Ident::new(c))),
                ", "
            )
        )
    }

    /// The fast path's delete: green rows of the old rows' keys that the new rows (if any) no
    /// longer produce.
    fn fast_del_sql(&self, m: &Mapping, old: &str, new: Option<&str>) -> String {
        let alias = Ident::new(&self.entry.from_clause.driving().alias);
        let green_key = self.green_key_tuple();
        let old_keys = join(
            self.keys
                .iter()
                .map(|(_, x, ty)| format!("{}::{ty}", Expr(x))),
            ", ",
        );
        let produced = match new {
            None => String::new(),
            Some(new) => {
                let eq = join(
                    self.upsert_key.iter().filter_map(|c| {
                        let col = self.entry.column(c)?;
                        let gc = self.green.column(c)?;
                        Some(format!(
                            "({})::{} IS NOT DISTINCT FROM bluegreen_g.{}",
                            column_sql(self.entry, col, gc, &m.control_schema, false),
                            gc.type_sql,
                            Ident::new(c)
                        ))
                    }),
                    " AND ",
                );
                let w = self
                    .entry
                    .where_
                    .as_ref()
                    .map(|w| format!(" AND {}", Expr(&w.text)))
                    .unwrap_or_default();
                format!(" AND NOT EXISTS (SELECT 1 FROM {new} AS {alias} WHERE {eq}{w})")
            }
        };
        format!(
            "DELETE FROM {t} AS bluegreen_g WHERE {green_key} IN (SELECT {old_keys} FROM {old} AS {alias}){produced};",
            t = self.green.qname()
        )
    }

    fn conflict_clause(&self) -> String {
        let cols = self.mapped();
        let others: Vec<&str> = cols
            .iter()
            .copied()
            .filter(|c| !self.upsert_key.iter().any(|k| k == c))
            .collect();
        if others.is_empty() {
            "DO NOTHING".to_string()
        } else {
            // Compare the rendered rows, not the values: 1.98 and 1.980 are equal numerics but
            // different green rows to `validate`.
            format!(
                "DO UPDATE SET {} WHERE ROW({})::text IS DISTINCT FROM ROW({})::text",
                join(
                    others
                        .iter()
                        .map(|c| format!("{0} = EXCLUDED.{0}", Ident::new(*c))),
                    ", "
                ),
                join(
                    others
                        .iter()
                        .map(|c| format!("bluegreen_g.{}", Ident::new(*c))),
                    ", "
                ),
                join(
                    others
                        .iter()
                        .map(|c| format!("EXCLUDED.{}", Ident::new(*c))),
                    ", "
                )
            )
        }
    }

    /// The upsert over the key arrays `{prefix}0..` (inlined in trigger functions, so its plan is
    /// cached there).
    fn up_sql(&self, m: &Mapping, prefix: &str) -> String {
        self.upsert(&self.restricted_m(m, prefix))
    }

    /// The delete statements over the key arrays `{prefix}0..`: green rows of those keys that
    /// M(blue) no longer produces.
    fn del_sql(&self, m: &Mapping, prefix: &str) -> String {
        let green_key = self.green_key_tuple();
        let u = self.unnest(prefix);
        let produced = format!(
            "NOT EXISTS (SELECT 1 FROM ({}) AS m WHERE {})",
            self.restricted_m(m, prefix),
            join(
                self.upsert_key.iter().map(|c| {
                    let ty = self
                        .green
                        .column(c)
                        .map(|g| g.type_sql.as_str())
                        .unwrap_or("");
                    let nullable = self.green.column(c).is_none_or(|g| !g.not_null);
                    if nullable {
                        format!(
                            "m.{0}::{ty} IS NOT DISTINCT FROM bluegreen_g.{0}",
                            Ident::new(c)
                        )
                    } else {
                        format!("m.{0}::{ty} = bluegreen_g.{0}", Ident::new(c))
                    }
                }),
                " AND "
            )
        );
        format!(
            "DELETE FROM {t} AS bluegreen_g WHERE {green_key} IN (SELECT {ks} FROM {u} WHERE {nn}) AND {produced};{nulls}",
            nulls = if self.nullable {
                format!(
                    "\n    IF EXISTS (SELECT 1 FROM {u} WHERE {anynull}) THEN\n        DELETE FROM {t} AS bluegreen_g WHERE EXISTS (SELECT 1 FROM {u} WHERE ({anynull}) AND {match}) AND {produced};\n    END IF;",
                    t = self.green.qname(),
                    anynull = self.any_null(),
                    r#match = join(
                        self.keys.iter().enumerate().map(|(j, (c, _, _))| format!(
                            "u.k{j} IS NOT DISTINCT FROM bluegreen_g.{}",
                            Ident::new(c)
                        )),
                        " AND "
                    ),
                )
            } else {
                String::new()
            },
            t = self.green.qname(),
            ks = join((0..self.keys.len()).map(|j| format!("u.k{j}")), ", "),
            nn = self.all_not_null(),
        )
    }

    /// `SELECT array_agg(s.k0), ... INTO eN_k0, ... FROM (<source>) AS s;`: fill the key arrays.
    fn collect_keys(&self, source: &str) -> String {
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
    fn aliases_of(&self, x: &QName) -> Vec<&str> {
        self.entry
            .from_clause
            .items
            .iter()
            .filter(|i| &i.table == x)
            .map(|i| i.alias.as_str())
            .collect()
    }

    /// `SELECT DISTINCT <keys> ...` for a change to alias `alias` whose rows are in `changed`.
    fn touched_keys(&self, alias: &str, changed: &str) -> String {
        let sel = join(
            self.keys
                .iter()
                .enumerate()
                .map(|(j, (_, x, ty))| format!("{}::{ty} AS k{j}", Expr(x))),
            ", ",
        );
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
    fn all_keys(&self) -> String {
        let sel = join(
            self.keys
                .iter()
                .enumerate()
                .map(|(j, (_, x, ty))| format!("{}::{ty} AS k{j}", Expr(x))),
            ", ",
        );
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

/// The aliases an expression qualifies columns with (`w.city` -> `w`), outside quotes.
pub fn referenced_aliases<'a>(expr: &str, aliases: &[&'a str]) -> Vec<&'a str> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        let c = b[i];
        if c == b'\'' {
            in_str = !in_str;
            i += 1;
            continue;
        }
        if !in_str && (c.is_ascii_alphabetic() || c == b'_' || c == b'"') {
            let start = i;
            let word = if c == b'"' {
                let end = expr[i + 1..]
                    .find('"')
                    .map(|e| i + 1 + e)
                    .unwrap_or(b.len() - 1);
                i = end + 1;
                expr[start + 1..end].to_string()
            } else {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                expr[start..i].to_lowercase()
            };
            let prev_dot = start > 0 && b[start - 1] == b'.';
            if !prev_dot
                && b.get(i) == Some(&b'.')
                && let Some(a) = aliases.iter().find(|a| **a == word)
                && !out.contains(a)
            {
                out.push(*a);
            }
            continue;
        }
        i += 1;
    }
    out
}

/// The changed rows of blue table `x`, read from the change-log rows `ids` (catch-up).
fn changes_relation(m: &Mapping, x: &QName) -> String {
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

/// Variable declarations and the apply phase (lock, upsert parents first, delete children first,
/// each entry in its own subtransaction) for blue table `x`. `find` fills the key arrays.
fn apply_block(
    m: &Mapping,
    entries: &[SyncEntry],
    x: &QName,
    find: &str,
    lock: bool,
    fast: bool,
) -> (String, String) {
    let touching: Vec<&SyncEntry> = entries
        .iter()
        .filter(|e| !e.aliases_of(x).is_empty())
        .collect();
    let mut decl = String::new();
    for e in &touching {
        for (j, (_, _, ty)) in e.keys.iter().enumerate() {
            decl.push_str(&format!("    e{}_k{j} {ty}[];\n", e.index));
        }
        decl.push_str(&format!("    e{}_ok boolean := true;\n", e.index));
    }
    let failures = QName::new(&m.control_schema, "sync_failures");
    let mut body = String::new();
    body.push_str(find);
    body.push_str("    PERFORM set_config('bluegreen.applying', 'forward', true);\n");
    let args = |e: &SyncEntry| {
        join(
            (0..e.keys.len()).map(|j| format!("e{}_k{j}", e.index)),
            ", ",
        )
    };
    let unnest_vars = |e: &SyncEntry| {
        format!(
            "unnest({}) AS u({})",
            args(e),
            join((0..e.keys.len()).map(|j| format!("k{j}")), ", ")
        )
    };
    let key_json = |e: &SyncEntry| {
        format!(
            "jsonb_build_array({})",
            join((0..e.keys.len()).map(|j| format!("u.k{j}")), ", ")
        )
    };
    let is_fast = |e: &SyncEntry| fast && e.row_local && &e.entry.from_clause.driving().table == x;
    // The fast path finds its keys only when it needs them: to record or clear a failure.
    let fill = |e: &SyncEntry| {
        let alias = e.entry.from_clause.driving().alias.as_str();
        format!(
            "            IF e{i}_k0 IS NULL THEN\n                IF TG_OP = 'INSERT' THEN\n                    {}\n                ELSIF TG_OP = 'UPDATE' THEN\n                    {}\n                ELSIF TG_OP = 'DELETE' THEN\n                    {}\n                END IF;\n            END IF;\n",
            e.collect_keys(&e.touched_keys(alias, "new_rows")),
            e.collect_keys(&e.touched_keys(
                alias,
                "(SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows)"
            )),
            e.collect_keys(&e.touched_keys(alias, "old_rows")),
            i = e.index,
        )
    };
    let record = |e: &SyncEntry| {
        let prefix = if is_fast(e) { fill(e) } else { String::new() };
        prefix
            + &format!(
                "            e{i}_ok := false;\n            INSERT INTO {failures} (migration, green_table, sync_key, error)\n            SELECT DISTINCT {mig}, {t}, {kj}, SQLSTATE || ': ' || SQLERRM FROM {u}\n            ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();\n",
                i = e.index,
                mig = Literal::new(&m.migration),
                t = Literal::new(&e.entry.name),
                kj = key_json(e),
                u = unnest_vars(e)
            )
    };
    // Lock every touched key first, in one global order (entry order, then key hash). A statement
    // touching many keys takes the entry's lock exclusively instead (bounded lock-table use);
    // per-key lockers hold it shared. Catch-up runs alone under the runner lock and skips this.
    // An entry that reads one blue table, ungrouped, changed through that table, derives each
    // green row from the blue row of the same key alone: the blue row lock already serialises
    // writers, so no advisory lock is needed.
    let self_contained = |e: &SyncEntry| {
        e.entry.group_by.is_empty()
            && e.entry.from_clause.items.len() == 1
            && &e.entry.from_clause.items[0].table == x
    };
    for e in touching.iter().filter(|e| lock && !self_contained(e)) {
        body.push_str(&format!(
            "    IF {first} IS NOT NULL THEN\n        IF cardinality({first}) > {MAX_KEY_LOCKS} THEN\n            PERFORM pg_advisory_xact_lock(hashtextextended({p}, 0));\n        ELSE\n            PERFORM pg_advisory_xact_lock_shared(hashtextextended({p}, 0));\n            PERFORM pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended({p} || ROW({ks})::text, 0) AS h FROM {u} ORDER BY 1) AS s;\n        END IF;\n    END IF;\n",
            first = format!("e{}_k0", e.index),
            p = Literal::new(format!("bluegreen:{}:{}:", m.migration, e.entry.name)),
            ks = join((0..e.keys.len()).map(|j| format!("u.k{j}")), ", "),
            u = unnest_vars(e)
        ));
    }
    let guard = |e: &SyncEntry| {
        if is_fast(e) {
            "TRUE".to_string()
        } else {
            format!("e{}_k0 IS NOT NULL", e.index)
        }
    };
    let up = |e: &SyncEntry| {
        let generic = e.up_sql(m, &format!("e{}_k", e.index));
        if is_fast(e) {
            format!(
                "IF TG_OP = 'TRUNCATE' THEN\n                IF e{i}_k0 IS NOT NULL THEN\n                    {generic}\n                END IF;\n            ELSIF TG_OP <> 'DELETE' THEN\n                {fast}\n            END IF;",
                i = e.index,
                fast = e.fast_up_sql(m, "new_rows")
            )
        } else {
            generic
        }
    };
    let del = |e: &SyncEntry| {
        let generic = e.del_sql(m, &format!("e{}_k", e.index));
        if is_fast(e) {
            format!(
                "IF TG_OP = 'TRUNCATE' THEN\n                IF e{i}_k0 IS NOT NULL THEN\n                    {generic}\n                END IF;\n            ELSIF TG_OP = 'UPDATE' THEN\n                {upd}\n            ELSIF TG_OP = 'DELETE' THEN\n                {dele}\n            END IF;",
                i = e.index,
                upd = e.fast_del_sql(m, "old_rows", Some("new_rows")),
                dele = e.fast_del_sql(m, "old_rows", None)
            )
        } else {
            generic
        }
    };
    if let [e] = touching.as_slice() {
        // One entry: upsert and delete in a single subtransaction (half the cost per statement).
        body.push_str(&format!(
            "    IF {g} THEN\n        BEGIN\n            {up}\n            {del}\n        EXCEPTION WHEN OTHERS THEN\n{rec}        END;\n    END IF;\n",
            g = guard(e),
            up = up(e),
            del = del(e),
            rec = record(e)
        ));
    }
    for e in touching.iter().filter(|_| touching.len() > 1) {
        body.push_str(&format!(
            "    IF {g} THEN\n        BEGIN\n            {sql}\n        EXCEPTION WHEN OTHERS THEN\n{rec}        END;\n    END IF;\n",
            g = guard(e),
            sql = up(e),
            rec = record(e)
        ));
    }
    for e in touching.iter().rev().filter(|_| touching.len() > 1) {
        body.push_str(&format!(
            "    IF {g} THEN\n        BEGIN\n            {sql}\n        EXCEPTION WHEN OTHERS THEN\n{rec}        END;\n    END IF;\n",
            g = guard(e),
            sql = del(e),
            rec = record(e)
        ));
    }
    // Keys that re-derived cleanly are no longer failed.
    for e in &touching {
        body.push_str(&format!(
            "    IF e{i}_ok AND {g} AND EXISTS (SELECT 1 FROM {failures} WHERE migration = {mig} AND green_table = {t}) THEN\n{fill}        DELETE FROM {failures} AS x WHERE x.migration = {mig} AND x.green_table = {t} AND x.sync_key IN (SELECT {kj} FROM {u});\n    END IF;\n",
            i = e.index,
            g = guard(e),
            fill = if is_fast(e) { fill(e) } else { String::new() },
            mig = Literal::new(&m.migration),
            t = Literal::new(&e.entry.name),
            kj = key_json(e),
            u = unnest_vars(e),
        ));
    }
    body.push_str("    PERFORM set_config('bluegreen.applying', '', true);\n");
    (decl, body)
}

/// Key-finding statements for blue table `x` whose changed rows are in `changed`.
/// The simple equalities `p.a = q.b` among the conjuncts of an entry's ON conditions, as
/// ((alias, column), (alias, column)). Writes through either side of one of them are serialised
/// on the joined value (see `join_locks`); other conditions are not followed by locks.
pub fn join_equalities(e: &TableEntry) -> Vec<((String, String), (String, String))> {
    let mut out = Vec::new();
    for item in &e.from_clause.items {
        let Some((_, on)) = &item.join else { continue };
        let on = on.trim();
        let on = on
            .strip_prefix('(')
            .and_then(|x| x.strip_suffix(')'))
            .filter(|x| !x.contains(['(', ')']))
            .unwrap_or(on);
        if on.contains(['(', ')']) {
            continue;
        }
        let lower = on.to_ascii_lowercase();
        let mut parts = Vec::new();
        let mut rest = 0;
        for (i, _) in lower.match_indices(" and ") {
            parts.push(&on[rest..i]);
            rest = i + 5;
        }
        parts.push(&on[rest..]);
        let col = |t: &str| -> Option<(String, String)> {
            let (a, c) = t.trim().split_once('.')?;
            let ok = |w: &str| {
                !w.is_empty() && w.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            };
            (ok(a) && ok(c)).then(|| (a.to_lowercase(), c.to_lowercase()))
        };
        for p in parts {
            if let Some((l, r)) = p.split_once('=')
                && !l.ends_with(['<', '>', '!'])
                && let (Some(l), Some(r)) = (col(l), col(r))
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
fn join_locks(m: &Mapping, e: &SyncEntry, x: &QName, changed: &str, indent: &str) -> String {
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
fn find_keys(
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

fn find_all_keys(m: &Mapping, entries: &[SyncEntry], x: &QName, indent: &str) -> String {
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

/// The change-log statements of a trigger (capture mode, and the live mode's fallback).
fn log_changes(m: &Mapping) -> String {
    let changes = QName::new(&m.control_schema, "changes");
    let mig = Literal::new(&m.migration);
    format!(
        "    IF TG_OP = 'INSERT' THEN
        INSERT INTO {changes} (migration, blue_table, op, new_row)
        SELECT {mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'I', to_jsonb(n) FROM new_rows n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO {changes} (migration, blue_table, op, old_row, new_row)
        SELECT {mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', to_jsonb(o), NULL FROM old_rows o
        UNION ALL
        SELECT {mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', NULL, to_jsonb(n) FROM new_rows n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {changes} (migration, blue_table, op, old_row)
        SELECT {mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'D', to_jsonb(o) FROM old_rows o;
    ELSE
        INSERT INTO {changes} (migration, blue_table, op)
        VALUES ({mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'T');
    END IF;
"
    )
}

/// The live trigger function for blue table `x`: re-derive inside the writer's transaction.
///
/// Whatever cannot be re-derived right here never fails the application's write: a writer
/// outside READ COMMITTED (its snapshot would not see a concurrent writer's commit after a lock
/// wait), or any error outside the per-entry blocks (a key that does not fit its green type, a
/// deadlock between lock waits), sends the changed rows to the change log instead, where `status`
/// shows them as backlog and `sync` re-derives them.
pub fn live_trigger_function(m: &Mapping, entries: &[SyncEntry], x: &QName, n: usize) -> Sql {
    let find = format!(
        "    IF TG_OP = 'INSERT' THEN\n{}    ELSIF TG_OP = 'UPDATE' THEN\n{}    ELSIF TG_OP = 'DELETE' THEN\n{}    ELSE\n{}    END IF;\n",
        find_keys(m, entries, x, "new_rows", "        ", true),
        find_keys(
            m,
            entries,
            x,
            "(SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows)",
            "        ",
            true
        ),
        find_keys(m, entries, x, "old_rows", "        ", true),
        find_all_keys(m, entries, x, "        "),
    );
    let (decl, body) = apply_block(m, entries, x, &find, true, true);
    let wrapped = format!(
        "    BEGIN\n{body}    EXCEPTION WHEN OTHERS THEN\n        RAISE WARNING 'bluegreen: sync of this change deferred to the change log (run bluegreen sync): % %', SQLSTATE, SQLERRM;\n{}    END;\n",
        log_changes(m)
    );
    // Always inside the outer block: recording or clearing a failure computes keys, and that
    // can fail too (a key that does not fit its green type); the write must still succeed.
    let main = wrapped;
    Sql(format!(
        "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql {settings} AS $fn$\nDECLARE\n    lock_ids bigint[];\n{decl}BEGIN\n    -- Loop guard: a change the reverse sync is applying is not echoed back.\n    IF current_setting('bluegreen.applying', true) = 'reverse' THEN\n        RETURN NULL;\n    END IF;\n    IF current_setting('transaction_isolation') <> 'read committed' THEN\n{log}        RETURN NULL;\n    END IF;\n{main}    RETURN NULL;\nEND\n$fn$",
        f = names::sync_function(&m.control_schema, &m.migration, n),
        settings = function_settings(m),
        log = log_changes(m),
    ))
}

/// The capture trigger function for blue table `x` (during copy): log the changed rows.
pub fn capture_trigger_function(m: &Mapping, n: usize) -> Sql {
    Sql(format!(
        "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$\nBEGIN\n    IF current_setting('bluegreen.applying', true) = 'reverse' THEN\n        RETURN NULL;\n    END IF;\n{log}    RETURN NULL;\nEND\n$fn$",
        f = names::sync_function(&m.control_schema, &m.migration, n),
        log = log_changes(m),
    ))
}

/// `catchup_X(ids)`: re-derive the keys touched by the change-log rows `ids` of blue table `x`.
/// Takes the same locks as the live triggers: in live mode it runs beside them.
pub fn catchup_function(m: &Mapping, entries: &[SyncEntry], x: &QName, n: usize) -> Sql {
    let ch = QName::new(&m.control_schema, "changes");
    let find = format!(
        "    IF EXISTS (SELECT 1 FROM {ch} AS c WHERE c.migration = {mig} AND c.blue_table = {bt} AND c.id = ANY (ids) AND c.op = 'T') THEN\n{}    ELSE\n{}    END IF;\n",
        find_all_keys(m, entries, x, "        "),
        find_keys(m, entries, x, &changes_relation(m, x), "        ", false),
        mig = Literal::new(&m.migration),
        bt = Literal::new(x.display()),
    );
    let (decl, body) = apply_block(m, entries, x, &find, true, false);
    Sql(format!(
        "CREATE OR REPLACE FUNCTION {f}(ids bigint[]) RETURNS void LANGUAGE plpgsql {settings} AS $fn$\nDECLARE\n    lock_ids bigint[];\n{decl}BEGIN\n{body}END\n$fn$",
        f = names::catchup_function(&m.control_schema, &m.migration, n),
        settings = function_settings(m),
    ))
}

/// `retry_E()`: re-derive every key recorded as failed for entry E. The blue rows of those keys
/// are locked FOR SHARE first, so a writer in flight on them commits before the re-derivation
/// reads (writers of self-contained entries take no advisory locks).
pub fn retry_function(m: &Mapping, e: &SyncEntry) -> Sql {
    let failures = QName::new(&m.control_schema, "sync_failures");
    let decl = format!(
        "    lock_ids bigint[];\n{}    e{}_ok boolean := true;\n",
        join(
            e.keys
                .iter()
                .enumerate()
                .map(|(j, (_, _, ty))| format!("    e{}_k{j} {ty}[];\n", e.index)),
            ""
        ),
        e.index
    );
    let vars = join(
        (0..e.keys.len()).map(|j| format!("e{}_k{j}", e.index)),
        ", ",
    );
    let fill = format!(
        "    SELECT {} INTO {vars} FROM {failures} AS f WHERE f.migration = {} AND f.green_table = {};\n    IF e{i}_k0 IS NOT NULL THEN\n        PERFORM 1 FROM {from} WHERE {tuple} IN (SELECT * FROM unnest({vars})) FOR SHARE OF {driving};\n    END IF;\n",
        join(
            e.keys
                .iter()
                .enumerate()
                .map(|(j, (_, _, ty))| format!("array_agg((f.sync_key->>{j})::{ty})")),
            ", "
        ),
        Literal::new(&m.migration),
        Literal::new(&e.entry.name),
        i = e.index,
        from = e.entry.from_clause.render(),
        tuple = e.key_tuple(),
        driving = Ident::new(&e.entry.from_clause.driving().alias),
    );
    // Apply for this entry alone, reusing the same block with a one-entry list.
    let one = [SyncEntry {
        index: e.index,
        entry: e.entry,
        green: e.green,
        keys: e.keys.clone(),
        upsert_key: e.upsert_key.clone(),
        nullable: e.nullable,
        row_local: false,
    }];
    let x = &e.entry.from_clause.driving().table;
    let (_, body) = apply_block(m, &one, x, &fill, true, false);
    Sql(format!(
        "CREATE OR REPLACE FUNCTION {f}() RETURNS void LANGUAGE plpgsql {settings} AS $fn$\nDECLARE\n{decl}BEGIN\n{body}END\n$fn$",
        f = names::entry_function(
            &m.control_schema,
            &m.migration,
            e.index,
            "retry",
            &e.entry.name
        ),
        settings = function_settings(m),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_aliases_outside_strings() {
        let a = ["l", "w", "c"];
        assert_eq!(
            referenced_aliases("md5('org:' || w.owner_email)::uuid", &a),
            ["w"]
        );
        assert_eq!(
            referenced_aliases("coalesce(l.x, 'w.y') || c.\"Name\"", &a),
            ["l", "c"]
        );
        assert_eq!(referenced_aliases("public.l.x", &a), Vec::<&str>::new());
        assert_eq!(referenced_aliases("min(W.city)", &a), ["w"]);
    }

    #[test]
    fn finds_join_equalities() {
        let fc = crate::mapping::from::parse(
            "public.customers c JOIN public.workshops w ON w.id = c.workshop_id AND w.active LEFT JOIN public.x y ON (y.k = c.k AND y.z >= 3)",
            "public",
        )
        .unwrap();
        let e = TableEntry {
            name: "t".into(),
            span: crate::diag::Span::new(std::path::Path::new("m.yaml"), 1, 1),
            from: crate::mapping::Located {
                text: String::new(),
                span: crate::diag::Span::new(std::path::Path::new("m.yaml"), 1, 1),
            },
            from_clause: fc,
            where_: None,
            group_by: Vec::new(),
            sync_key: None,
            columns: Vec::new(),
            reverse: crate::mapping::Reverse::Auto,
        };
        let got: Vec<String> = join_equalities(&e)
            .iter()
            .map(|((a, b), (c, d))| format!("{a}.{b}={c}.{d}"))
            .collect();
        assert_eq!(got, ["w.id=c.workshop_id", "y.k=c.k"]);
    }
}
