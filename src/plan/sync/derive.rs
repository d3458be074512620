//! The re-derivation statements of one entry: `M(blue)` restricted to a set of sync keys, the
//! upsert of its rows (mapped columns only, only rows whose rendering changes) and the delete of
//! the green rows of those keys that `M(blue)` no longer produces; the fast path's versions over
//! the statement's transition tables.

use super::SyncEntry;
use crate::mapping::Mapping;
use crate::plan::query::{Shape, column_sql, mapped_columns, mapping_select};
use crate::sql::{Expr, Ident, join};

impl SyncEntry<'_> {
    /// `M(blue)` restricted to the keys in the parameter arrays `k0..`: non-NULL keys through an
    /// indexable IN, NULL keys in a second branch the planner skips when there are none.
    pub(super) fn restricted_m(&self, m: &Mapping, prefix: &str) -> String {
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
            .into_string()
        };
        format!(
            "{} UNION ALL {}",
            one(vec![in_keys]),
            one(vec![has_null, null_keys])
        )
    }
    pub(super) fn mapped(&self) -> Vec<&str> {
        mapped_columns(self.entry, self.green)
    }

    /// `INSERT INTO green (mapped columns) SELECT * FROM (<select>) ON CONFLICT (green key)`,
    /// updating only the mapped columns, and only rows whose rendering changes.
    pub(super) fn upsert(&self, select: &str) -> String {
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
    pub(super) fn fast_up_sql(&self, m: &Mapping, changed: &str) -> String {
        let alias = self.entry.from_clause.driving().alias.as_str();
        let shape = Shape {
            replace: Some((alias, changed)),
            ..Shape::default()
        };
        self.upsert(mapping_select(self.entry, self.green, &m.control_schema, &shape).as_str())
    }

    /// `(bluegreen_g.k1, ...)`: the sync-key columns of the green row being deleted.
    pub(super) fn green_key_tuple(&self) -> String {
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
    pub(super) fn fast_del_sql(&self, m: &Mapping, old: &str, new: Option<&str>) -> String {
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

    pub(super) fn conflict_clause(&self) -> String {
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
    pub(super) fn up_sql(&self, m: &Mapping, prefix: &str) -> String {
        self.upsert(&self.restricted_m(m, prefix))
    }

    /// The delete statements over the key arrays `{prefix}0..`: green rows of those keys that
    /// M(blue) no longer produces.
    pub(super) fn del_sql(&self, m: &Mapping, prefix: &str) -> String {
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
}
