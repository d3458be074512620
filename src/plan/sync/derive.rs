//! The re-derivation statements of one entry: `M(blue)` restricted to a set of sync keys, the
//! upsert of its rows (mapped columns only, no unique key's columns in `SET`, only rows whose
//! rendering changes; other unique keys' changed values in an `UPDATE` of their own) and the delete of the green rows of those keys that `M(blue)` no longer produces.
//!
//! Two renderings. The applier's ([`ApplierEntry`]) takes the keys as `$1..$n` text arrays, one per
//! sync-key column, cast in the statement: to blue's type where the key is a blue column (so blue's
//! index serves the lookup, whatever green's type), to green's type otherwise. The trigger's
//! (row-local entries only) reads the keys from the statement's transition tables and the values
//! from blue itself, by those keys: the writer holds those rows and sees its own latest version,
//! even after an application trigger rewrote the row in a nested statement.

use super::{Key, SyncEntry};
use crate::mapping::Mapping;
use crate::plan::query::{Shape, mapped_columns, mapping_select, mapping_select_typed};
use crate::sql::{Expr, Ident, Literal, QName, Sql, join, sql};

/// Everything an applier runs for one entry, rendered once.
#[derive(Clone, Debug)]
pub struct ApplierEntry {
    pub index: usize,
    /// The green table's name (the entry's name).
    pub name: String,
    pub green: QName,
    pub row_local: bool,
    /// Sync-key columns, and whether one of them is nullable.
    pub nkeys: usize,
    pub nullable: bool,
    /// The green column names of the sync key, in key order.
    pub key_columns: Vec<String>,
    /// Per blue table the entry reads: the keys touched by the change-log rows `$1` (ids), as
    /// text, one column per key column (through their old images only when `$2`).
    pub finders: Vec<(QName, Sql)>,
    /// Per blue table the entry reads, the columns it reads there (None: cannot tell).
    pub columns_read: Vec<(QName, Option<Vec<String>>)>,
    pub upsert: Sql,
    /// The changed values of green's other unique keys (see `unique_others`).
    pub unique_update: Option<Sql>,
    /// Green rows of the non-NULL keys that M(blue) no longer produces.
    pub delete: Sql,
    /// The same for NULL keys (nullable sync keys only).
    pub delete_null: Option<Sql>,
    /// Row-local entries: the blue rows of the keys, `FOR SHARE` (a writer in flight on them
    /// commits first, and none starts until the applier is done), then green's
    /// `FOR NO KEY UPDATE` (a writer's step on them commits first; a foreign-key check holding
    /// them `FOR KEY SHARE` is no conflict).
    pub lock_blue: Option<Sql>,
    pub lock_green: Option<Sql>,
    /// The green rows of the keys `FOR NO KEY UPDATE` (after cutover, every reversed entry: a
    /// new session's write to them commits before the applier reads blue).
    pub green_lock: Sql,
    /// After cutover, for reversed entries: the keys `$1..` (as text columns) whose green row
    /// has a standing reverse failure (blue does not hold that green write yet).
    pub reverse_failed: Sql,
    /// After cutover, for entries without a reverse: insert the rows green lacks, nothing else.
    pub insert_missing: Sql,
    /// Every key green holds or M(blue) produces (a full re-derive, after a TRUNCATE).
    pub all_keys: Sql,
    /// `(key text[], row text)` of M(blue) restricted to the keys, in green's types; and of green.
    pub blue_rows: Sql,
    pub green_rows: Sql,
    /// M(blue) restricted to the keys `$1..`, cast to green's types, an unmapped value NULL
    /// (validate's re-check).
    pub blue_typed: Sql,
    /// The condition on `bluegreen_g` (green) selecting the keys `$1..`.
    pub green_key_condition: String,
    /// Record keys `$1..$n` as failed with the errors `$n+1` (text[]); migration `$n+2`.
    pub record_failures: Sql,
    /// Clear the failures of keys `$1..$n`; migration `$n+1`.
    pub clear_failures: Sql,
}

impl SyncEntry<'_> {
    /// The key arrays as a relation `u(k0, ...)`, zipped (`ROWS FROM`: the multi-argument
    /// `unnest` is syntax, not a function one can qualify).
    fn key_params(&self) -> String {
        format!(
            "ROWS FROM ({}) AS u({})",
            join(
                (1..=self.keys.len()).map(|j| format!("pg_catalog.unnest(${j}::text[])")),
                ", "
            ),
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
    /// `(blue side) IN (SELECT (key values) FROM u WHERE non-NULL)`: blue columns compared as
    /// themselves with the key cast to their type; other keys compared as green values.
    fn keys_in(&self) -> String {
        let lhs = join(self.keys.iter().map(blue_side), ", ");
        let rhs = join(
            self.keys.iter().enumerate().map(|(j, k)| match &k.blue {
                Some((_, _, bt)) => {
                    crate::plan::keys::narrow_back(&format!("u.k{j}"), &k.green_type, bt)
                }
                None => format!("u.k{j}::{}", k.green_type),
            }),
            ", ",
        );
        format!(
            "({lhs}) IN (SELECT {rhs} FROM {} WHERE {})",
            self.key_params(),
            self.all_not_null()
        )
    }
    /// NULL keys: matched with IS NOT DISTINCT FROM, in a branch the planner skips when no key
    /// is NULL.
    fn null_keys(&self) -> Vec<String> {
        let u = self.key_params();
        vec![
            format!("EXISTS (SELECT 1 FROM {u} WHERE {})", self.any_null()),
            format!(
                "EXISTS (SELECT 1 FROM {u} WHERE ({}) AND {})",
                self.any_null(),
                join(
                    self.keys.iter().enumerate().map(|(j, k)| format!(
                        "u.k{j}::{} IS NOT DISTINCT FROM ({})::{}",
                        k.green_type,
                        Expr(&k.expr),
                        k.green_type
                    )),
                    " AND "
                )
            ),
        ]
    }
    /// `M(blue)` restricted to the keys `$1..`.
    fn restricted_m(&self, m: &Mapping, typed: bool) -> String {
        let one = |extra_where: Vec<String>| {
            let shape = Shape {
                extra_where,
                lenient: typed,
                ..Shape::default()
            };
            if typed {
                mapping_select_typed(self.entry, self.green, &m.control_schema, &shape)
            } else {
                mapping_select(self.entry, self.green, &m.control_schema, &shape)
            }
            .into_string()
        };
        let mut s = one(vec![self.keys_in()]);
        if self.nullable {
            s = format!("{s} UNION ALL {}", one(self.null_keys()));
        }
        s
    }
    fn mapped(&self) -> Vec<&str> {
        mapped_columns(self.entry, self.green)
    }

    /// `INSERT INTO green (mapped columns) SELECT * FROM (<select>) ON CONFLICT (green key)`,
    /// updating only the mapped columns that are not the conflict key, and only rows whose
    /// rendering changes.
    fn upsert(&self, select: &str) -> String {
        let cols = self.mapped();
        let overriding = cols
            .iter()
            .any(|c| self.green.column(c).is_some_and(|gc| gc.identity == "a"));
        format!(
            "INSERT INTO {t} AS bluegreen_g ({cols}){ov} SELECT * FROM ({select}) AS m ON CONFLICT ({key}) {conflict}",
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

    /// Mapped columns of a green unique index other than the conflict key: never in the upsert's
    /// `SET`, where they would make PostgreSQL lock the row `FOR UPDATE` (waiting on every
    /// foreign-key check holding it `FOR KEY SHARE`) even when they do not change.
    fn unique_others(&self) -> Vec<&str> {
        self.mapped()
            .into_iter()
            .filter(|c| !self.upsert_key.iter().any(|k| k == c))
            .filter(|c| {
                self.green
                    .indexes
                    .iter()
                    .any(|ix| ix.unique && ix.columns.iter().flatten().any(|x| x == c))
            })
            .collect()
    }

    /// The mapped columns the upsert's `SET` writes: neither the conflict key nor another unique
    /// key's.
    fn set_columns(&self) -> Vec<&str> {
        let unique = self.unique_others();
        self.mapped()
            .into_iter()
            .filter(|c| !self.upsert_key.iter().any(|k| k == c) && !unique.contains(c))
            .collect()
    }

    /// Whether the upsert is `DO NOTHING`: it then leaves an existing green row unlocked, so the
    /// trigger locks the rows first (an applier must not delete a row the writer re-derives).
    fn upsert_locks_nothing(&self) -> bool {
        self.set_columns().is_empty()
    }

    /// `UPDATE` of the other unique-key columns of existing rows, where they changed (the only
    /// rows it locks `FOR UPDATE`).
    /// The columns the upsert never writes whose rendering can still change: other unique keys'
    /// (see `set_columns`), and the conflict key's own when its type renders equal values apart
    /// (numeric `1.0` and `1.00`): the upsert meets the row by equality and never rewrites its key,
    /// and the delete finds the key still produced, so green kept the old rendering for ever.
    fn rewritten_columns(&self) -> Vec<&str> {
        let mut cols = self.unique_others();
        for k in &self.upsert_key {
            if self
                .green
                .column(k)
                .is_some_and(|c| renders_equal_values_apart(&c.type_sql))
            {
                cols.push(k);
            }
        }
        cols
    }

    fn unique_update(&self, select: &str) -> Option<String> {
        let cols = self.rewritten_columns();
        if cols.is_empty() {
            return None;
        }
        let list = |p: &str| join(cols.iter().map(|c| format!("{p}{}", Ident::new(*c))), ", ");
        Some(format!(
            "UPDATE {t} AS bluegreen_g SET {set} FROM ({select}) AS m WHERE {on} AND ROW({g})::text IS DISTINCT FROM ROW({n})::text",
            t = self.green.qname(),
            set = join(
                cols.iter().map(|c| format!("{0} = m.{0}", Ident::new(*c))),
                ", "
            ),
            on = join(
                self.upsert_key.iter().map(|c| format!(
                    "bluegreen_g.{0} = m.{0}{1}",
                    Ident::new(c),
                    self.green_collation(c)
                )),
                " AND "
            ),
            g = list("bluegreen_g."),
            n = list("m."),
        ))
    }

    fn conflict_clause(&self) -> String {
        let others = self.set_columns();
        if others.is_empty() {
            return "DO NOTHING".to_string();
        }
        // Compare the rendered rows, not the values: 1.98 and 1.980 are equal numerics but
        // different green rows to `validate`.
        let list = |p: &str| {
            join(
                others.iter().map(|c| format!("{p}{}", Ident::new(*c))),
                ", ",
            )
        };
        format!(
            "DO UPDATE SET {} WHERE ROW({})::text IS DISTINCT FROM ROW({})::text",
            join(
                others
                    .iter()
                    .map(|c| format!("{0} = EXCLUDED.{0}", Ident::new(*c))),
                ", "
            ),
            list("bluegreen_g."),
            list("EXCLUDED.")
        )
    }

    /// `(bluegreen_g.k1, ...)`: the sync-key columns of a green row.
    fn green_key_tuple(&self) -> String {
        format!(
            "({})",
            join(
                self.keys
                    .iter()
                    .map(|k| format!("bluegreen_g.{}", Ident::new(&k.green))),
                ", "
            )
        )
    }
    fn green_keys_in(&self) -> String {
        format!(
            "{} IN (SELECT {} FROM {} WHERE {})",
            self.green_key_tuple(),
            join(
                self.keys
                    .iter()
                    .enumerate()
                    .map(|(j, k)| format!("u.k{j}::{}", k.green_type)),
                ", "
            ),
            self.key_params(),
            self.all_not_null()
        )
    }
    fn green_null_keys_in(&self) -> String {
        format!(
            "EXISTS (SELECT 1 FROM {} WHERE ({}) AND {})",
            self.key_params(),
            self.any_null(),
            join(
                self.keys.iter().enumerate().map(|(j, k)| format!(
                    "u.k{j}::{} IS NOT DISTINCT FROM bluegreen_g.{}",
                    k.green_type,
                    Ident::new(&k.green)
                )),
                " AND "
            )
        )
    }
    /// Not produced by M(blue) for the keys: compared on the arbiter key, with `=` on its NOT
    /// NULL columns (the same answer there, and the planner can hash the anti-join: IS NOT
    /// DISTINCT FROM compared every green row with every derived one, 80 ms for a batch of 1,500
    /// tracks) and IS NOT DISTINCT FROM on the nullable ones of a NULLS NOT DISTINCT key.
    /// ` COLLATE <green's>` for M's side of a comparison with green's column `c`: M's column
    /// carries blue's collation, and two columns of differing implicit collations cannot be
    /// compared (42P22: a key copied from a "C" column into a case-insensitive one).
    fn green_collation(&self, c: &str) -> String {
        match self.green.column(c).and_then(|g| g.collation.as_deref()) {
            Some(coll) => format!(" COLLATE {coll}"),
            None => String::new(),
        }
    }
    fn not_produced(&self, m: &Mapping) -> String {
        format!(
            "NOT EXISTS (SELECT 1 FROM ({}) AS m WHERE {})",
            self.restricted_m(m, false),
            join(
                self.upsert_key.iter().map(|c| {
                    let col = self.green.column(c);
                    let ty = col.map(|g| g.type_sql.as_str()).unwrap_or("");
                    let eq = if col.is_some_and(|g| g.not_null) {
                        "="
                    } else {
                        "IS NOT DISTINCT FROM"
                    };
                    format!(
                        "m.{0}::{ty}{1} {eq} bluegreen_g.{0}",
                        Ident::new(c),
                        self.green_collation(c)
                    )
                }),
                " AND "
            )
        )
    }

    /// `jsonb_build_array(u.k0::<green type>, ...)`: a key as `sync_failures` records it (typed,
    /// as green holds it).
    fn key_json(&self) -> String {
        format!(
            "pg_catalog.jsonb_build_array({})",
            join(
                self.keys
                    .iter()
                    .enumerate()
                    .map(|(j, k)| format!("u.k{j}::{}", k.green_type)),
                ", "
            )
        )
    }

    /// Everything the applier runs for this entry.
    pub fn applier(&self, m: &Mapping) -> ApplierEntry {
        let t = self.green.qname();
        let key_text = join(
            self.keys
                .iter()
                .map(|k| format!("bluegreen_g.{}::text", Ident::new(&k.green))),
            ", ",
        );
        let rows = |p: &str| {
            join(
                self.mapped()
                    .iter()
                    .map(|c| format!("{p}.{}", Ident::new(*c))),
                ", ",
            )
        };
        let arr = |p: &str| {
            format!(
                "ARRAY[{}]::text[]",
                join(
                    self.keys
                        .iter()
                        .map(|k| format!("{p}.{}::text", Ident::new(&k.green))),
                    ", "
                )
            )
        };
        let green_where = if self.nullable {
            format!(
                "({} OR {})",
                self.green_keys_in(),
                self.green_null_keys_in()
            )
        } else {
            self.green_keys_in()
        };
        let green_lock = sql!(
            "SELECT 1 FROM {t} AS bluegreen_g WHERE {} FOR NO KEY UPDATE",
            self.green_keys_in()
        );
        let (lock_blue, lock_green) = if self.row_local() {
            let d = self.entry.from_clause.driving();
            (
                Some(sql!(
                    "SELECT 1 FROM {} AS {} WHERE {} FOR SHARE",
                    d.table,
                    Ident::new(&d.alias),
                    self.keys_in()
                )),
                Some(sql!(
                    "SELECT 1 FROM {t} AS bluegreen_g WHERE {} FOR NO KEY UPDATE",
                    self.green_keys_in()
                )),
            )
        } else {
            (None, None)
        };
        ApplierEntry {
            index: self.index,
            name: self.entry.name.clone(),
            green: t.clone(),
            row_local: self.row_local(),
            nkeys: self.keys.len(),
            nullable: self.nullable,
            key_columns: self.keys.iter().map(|k| k.green.clone()).collect(),
            finders: self
                .reads()
                .into_iter()
                .map(|(x, _)| (x.clone(), self.find_keys_in_log(m, x)))
                .collect(),
            columns_read: self.columns_read.clone(),
            upsert: sql!("{}", self.upsert(&self.restricted_m(m, false))),
            unique_update: self
                .unique_update(&self.restricted_m(m, false))
                .map(|u| sql!("{}", u)),
            delete: sql!(
                "DELETE FROM {t} AS bluegreen_g WHERE {} AND {}",
                self.green_keys_in(),
                self.not_produced(m)
            ),
            delete_null: self.nullable.then(|| {
                sql!(
                    "DELETE FROM {t} AS bluegreen_g WHERE {} AND {}",
                    self.green_null_keys_in(),
                    self.not_produced(m)
                )
            }),
            lock_blue,
            lock_green,
            green_lock,
            reverse_failed: sql!(
                "SELECT {key_text} FROM {t} AS bluegreen_g WHERE {green_where} AND pg_catalog.jsonb_build_array({}) IN (SELECT f.green_key FROM {} AS f WHERE f.migration = {} AND f.green_table = {})",
                join(
                    self.upsert_key
                        .iter()
                        .map(|c| format!("bluegreen_g.{}::pg_catalog.text", Ident::new(c))),
                    ", "
                ),
                QName::new(&m.control_schema, "reverse_failures"),
                Literal::new(&m.migration),
                Literal::new(&self.entry.name),
            ),
            insert_missing: sql!("{}", self.insert_missing(&self.restricted_m(m, false))),
            all_keys: sql!(
                "SELECT {key_text} FROM {t} AS bluegreen_g UNION {}",
                self.all_keys_of_blue()
            ),
            blue_rows: sql!(
                "SELECT {}, ROW({})::text FROM ({}) AS b",
                arr("b"),
                rows("b"),
                self.restricted_m(m, true)
            ),
            blue_typed: sql!("{}", self.restricted_m(m, true)),
            green_key_condition: green_where.clone(),
            green_rows: sql!(
                "SELECT {}, ROW({})::text FROM {t} AS bluegreen_g WHERE {green_where}",
                arr("bluegreen_g"),
                rows("bluegreen_g")
            ),
            record_failures: {
                let n = self.keys.len();
                sql!(
                    "INSERT INTO {f} (migration, green_table, sync_key, error) SELECT ${m_}, {entry}, {kj}, u.e FROM ROWS FROM ({arrays}, pg_catalog.unnest(${e}::text[])) AS u({cols}, e) ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = pg_catalog.now()",
                    f = QName::new(&m.control_schema, "sync_failures"),
                    m_ = n + 2,
                    e = n + 1,
                    entry = crate::sql::Literal::new(&self.entry.name),
                    kj = self.key_json(),
                    arrays = join(
                        (1..=n).map(|j| format!("pg_catalog.unnest(${j}::text[])")),
                        ", "
                    ),
                    cols = join((0..n).map(|j| format!("k{j}")), ", "),
                )
            },
            clear_failures: sql!(
                "DELETE FROM {f} WHERE migration = ${m_} AND green_table = {entry} AND sync_key IN (SELECT {kj} FROM {u})",
                f = QName::new(&m.control_schema, "sync_failures"),
                m_ = self.keys.len() + 1,
                entry = crate::sql::Literal::new(&self.entry.name),
                kj = self.key_json(),
                u = self.key_params(),
            ),
        }
    }

    /// M(blue) for the blue rows whose keys are in the statement's `new_rows` (read from blue by
    /// key, not from the transition table: rule H2).
    fn row_local_select(&self, m: &Mapping) -> Sql {
        let d = self.entry.from_clause.driving();
        let cols = self.blue_key_columns();
        let keys = format!(
            "({}) IN (SELECT {} FROM new_rows AS n)",
            join(
                cols.iter()
                    .map(|c| format!("{}.{}", Ident::new(&d.alias), Ident::new(c))),
                ", "
            ),
            join(cols.iter().map(|c| format!("n.{}", Ident::new(c))), ", ")
        );
        mapping_select(
            self.entry,
            self.green,
            &m.control_schema,
            &Shape {
                extra_where: vec![keys],
                ..Shape::default()
            },
        )
    }

    /// The trigger's upsert of a row-local entry: M(blue) for the blue rows whose keys are in the
    /// statement's `new_rows`. A `DO NOTHING` upsert is preceded by locking the existing green
    /// rows of those keys: otherwise an applier re-deriving a key (it cannot see the writer's
    /// uncommitted blue row) could delete the green row the writer's upsert skipped.
    pub(super) fn row_local_upsert(&self, m: &Mapping) -> Vec<String> {
        let cols = self.blue_key_columns();
        let select = self.row_local_select(m);
        let mut out = Vec::new();
        if self.upsert_locks_nothing() {
            let gk = join(
                self.keys
                    .iter()
                    .zip(&cols)
                    .map(|(k, c)| format!("n.{}::{}", Ident::new(c), k.green_type)),
                ", ",
            );
            out.push(format!(
                "PERFORM 1 FROM {t} AS bluegreen_g WHERE {g} IN (SELECT {gk} FROM new_rows AS n) FOR NO KEY UPDATE",
                t = self.green.qname(),
                g = self.green_key_tuple(),
            ));
        }
        out.push(self.upsert(select.as_str()));
        out.extend(self.unique_update(select.as_str()));
        out
    }

    /// The trigger's insert-only step after cutover (an entry without a reverse: green is the new
    /// application's, so blue only adds the rows green does not have).
    pub(super) fn row_local_insert(&self, m: &Mapping) -> String {
        let select = self.row_local_select(m);
        self.insert_missing(select.as_str())
    }

    /// The trigger's update-only step after cutover, when another entry's reverse wrote the blue
    /// rows (a split's partner): the green rows the application wrote are updated where M(blue)
    /// now says otherwise (a column computed from the partner's), never inserted (the
    /// application inserts its own rows of each part).
    pub(super) fn row_local_update_only(&self, m: &Mapping) -> Option<String> {
        let select = self.row_local_select(m);
        // Only the columns computed from blue (not a plain copy of a blue column): a plain one is
        // this entry's own to write back, and blue may not hold its value yet (its reverse runs
        // after the partner's, or failed).
        let computed = crate::plan::keys::computed_columns(self.entry);
        let set: Vec<&str> = self
            .mapped()
            .into_iter()
            .filter(|c| !self.upsert_key.iter().any(|k| k == c) && computed.contains(c))
            .collect();
        if set.is_empty() {
            return None;
        }
        let list = |p: &str| join(set.iter().map(|c| format!("{p}{}", Ident::new(*c))), ", ");
        Some(format!(
            "UPDATE {t} AS bluegreen_g SET {s} FROM ({select}) AS m WHERE {on} AND ROW({g})::text IS DISTINCT FROM ROW({n})::text",
            t = self.green.qname(),
            s = join(
                set.iter().map(|c| format!("{0} = m.{0}", Ident::new(*c))),
                ", "
            ),
            on = join(
                self.upsert_key.iter().map(|c| format!(
                    "bluegreen_g.{0} = m.{0}{1}",
                    Ident::new(c),
                    self.green_collation(c)
                )),
                " AND "
            ),
            g = list("bluegreen_g."),
            n = list("m."),
        ))
    }

    /// `INSERT ... ON CONFLICT (green key) DO NOTHING`.
    fn insert_missing(&self, select: &str) -> String {
        let cols = self.mapped();
        let overriding = cols
            .iter()
            .any(|c| self.green.column(c).is_some_and(|gc| gc.identity == "a"));
        format!(
            "INSERT INTO {t} AS bluegreen_g ({cols}){ov} SELECT * FROM ({select}) AS m ON CONFLICT ({key}) DO NOTHING",
            t = self.green.qname(),
            cols = join(cols.iter().map(|c| Ident::new(*c)), ", "),
            ov = if overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            },
            key = join(self.upsert_key.iter().map(Ident::new), ", "),
        )
    }

    /// The trigger's delete of a row-local entry: the green rows of `old_rows`' keys whose blue
    /// row is gone or no longer passes `where`.
    pub(super) fn row_local_delete(&self) -> String {
        let d = self.entry.from_clause.driving();
        let alias = Ident::new(&d.alias);
        let cols = self.blue_key_columns();
        let old = join(
            self.keys
                .iter()
                .zip(&cols)
                .map(|(k, c)| format!("o.{}::{}", Ident::new(c), k.green_type)),
            ", ",
        );
        let same = join(
            cols.iter()
                .map(|c| format!("{alias}.{0} = o.{0}", Ident::new(c))),
            " AND ",
        );
        let w = self
            .entry
            .where_
            .as_ref()
            .map(|w| format!(" AND {}", Expr(&w.text)))
            .unwrap_or_default();
        format!(
            "DELETE FROM {t} AS bluegreen_g WHERE {gk} IN (SELECT {old} FROM old_rows AS o WHERE NOT EXISTS (SELECT 1 FROM {x} AS {alias} WHERE {same}{w}))",
            t = self.green.qname(),
            gk = self.green_key_tuple(),
            x = d.table,
        )
    }

    /// A query finding an UPDATE's old key that is in no new row, for a row-local entry without
    /// `where` (`None` with one: a row can leave it without its key changing). Compared by the
    /// key type's own equality, as the delete compares blue's keys (a key's text can be the same
    /// for two keys, an enum with its own cast or a `regproc` of an overloaded function, and a
    /// cast to text can raise: H6-1..3), by `EXCEPT`, which hashes or sorts: the plan is made
    /// once, with a one-row statement, and a nested loop kept for a bulk update would be
    /// quadratic.
    pub(super) fn key_left(&self) -> Option<String> {
        if self.entry.where_.is_some() {
            return None;
        }
        let cols = self.blue_key_columns();
        let side = |a: &str| join(cols.iter().map(|c| format!("{a}.{}", Ident::new(c))), ", ");
        Some(format!(
            "SELECT {} FROM old_rows AS o EXCEPT SELECT {} FROM new_rows AS n",
            side("o"),
            side("n")
        ))
    }

    /// The blue columns of a row-local entry's keys (they exist: that is what row-local means).
    fn blue_key_columns(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| {
                k.blue
                    .as_ref()
                    .map(|(_, c, _)| c.clone())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The keys M(blue) produces, as text.
    fn all_keys_of_blue(&self) -> String {
        format!(
            "SELECT {} FROM {}{}",
            join(
                self.keys
                    .iter()
                    .map(|k| format!("(({})::{})::text", Expr(&k.expr), k.green_type)),
                ", "
            ),
            self.entry.from_clause.render(),
            crate::plan::query::where_clause(self.entry, &[])
        )
    }
}

/// The blue side of a key comparison: the blue column itself where the key is one.
fn blue_side(k: &Key) -> String {
    match &k.blue {
        Some((a, c, _)) => format!("{}.{}", Ident::new(a), Ident::new(c)),
        None => format!("({})::{}", Expr(&k.expr), k.green_type),
    }
}

/// Whether two equal values of the type (as `format_type` prints it) can render differently:
/// numeric scale (`1.0`, `1.00`), a float's signed zero.
fn renders_equal_values_apart(type_sql: &str) -> bool {
    type_sql.starts_with("numeric") || type_sql == "real" || type_sql == "double precision"
}

impl ApplierEntry {
    /// The condition "blue table `x` still holds the row image `r.new_row`" as this entry sees
    /// it: equal on the columns it reads (compared as text, as the trigger compares them), or
    /// as a whole row when it cannot tell. An update of other columns is logged for no entry, so
    /// it does not supersede the image (H4-6).
    pub fn holds(&self, x: &QName) -> String {
        let cols = self
            .columns_read
            .iter()
            .find(|(t, _)| t == x)
            .and_then(|(_, c)| c.as_deref());
        holds_image(x, cols)
    }
}

fn holds_image(x: &QName, cols: Option<&[String]>) -> String {
    match cols {
        None => {
            format!("EXISTS (SELECT 1 FROM {x} AS b WHERE pg_catalog.to_jsonb(b.*) = r.new_row)")
        }
        // Compared as the image was written (`to_jsonb`): a `json` column's text does not
        // survive the round trip through jsonb, so comparing column texts never matched (H5-1).
        Some(cols) => {
            let project = |image: &str| {
                format!(
                    "pg_catalog.jsonb_build_array({})",
                    join(
                        cols.iter()
                            .map(|c| format!("{image} -> {}", crate::sql::Literal::new(c))),
                        ", "
                    )
                )
            };
            format!(
                "EXISTS (SELECT 1 FROM {x} AS b WHERE {} = {})",
                project("pg_catalog.to_jsonb(b.*)"),
                project("r.new_row")
            )
        }
    }
}
