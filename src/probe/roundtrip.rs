//! The round-trip check of an invertible entry (DESIGN.md "reverse", design review C2): after
//! the cutover the new application writes green rows `g'` that `M` never produced, the reverse
//! writes `R(g')` into blue, and `validate` (and every rollback) expects `M(R(g')) = g'`. Checking
//! it on `g = M(b)` proves nothing (`M(R(M(b)))` is `M(b)` for most mappings), so each green
//! column a reverse reads is perturbed on a sample of profiled rows, twice: the value of another
//! row (green's own domain: a mapped status, a foreign key that exists), and an edit by type (text
//! gets a suffix, a number one more, a date a day later, a boolean its negation). The perturbed
//! rows go through `R` and back through `M` (the driving table replaced by them, every join and
//! `where` as written); a column whose value comes back different is named, with an example.
//!
//! Everything runs on the profile's scratch table inside the plan's rolled-back transaction:
//! nothing is written to blue or green.

use sqlx::Row;

use super::Probe;
use crate::catalog::{self, Catalog};
use crate::diag::Diagnostic;
use crate::mapping::{Mapping, TableEntry};
use crate::plan::query::{self, Shape};
use crate::plan::reverse::{Verdict, reverse_plan};
use crate::sql::{Expr, Ident, Literal, join, sql};

/// Profiled rows the check perturbs, per column and perturbation.
const ROWS: u32 = 500;

/// How one column's values are perturbed.
#[derive(Clone, Copy, PartialEq)]
enum Perturbation {
    /// The value of the next row (by key), wrapping around.
    OtherRow,
    /// An edit by type.
    Edit,
}

/// The edit of a value of `type_sql` (`v` names it), if the type has one.
fn edit(type_sql: &str, v: &str) -> Option<String> {
    let t = type_sql.trim_end_matches("[]");
    if t != type_sql {
        return None;
    }
    let fractional = ["real", "double precision", "numeric"];
    Some(
        if t == "text" || t.starts_with("character varying") || t == "citext" {
            format!("{v} OPERATOR(pg_catalog.||) ' x'")
        } else if ["smallint", "integer", "bigint"].contains(&t) {
            format!("{v} OPERATOR(pg_catalog.+) 1")
        } else if fractional.contains(&t) || t.starts_with("numeric(") {
            // One more, and a digit further right than most data: a blue scale that is shorter
            // than green's rounds it away.
            format!("{v} OPERATOR(pg_catalog.+) 1.001")
        } else if t == "boolean" {
            format!("NOT {v}")
        } else if t == "date" {
            format!("{v} OPERATOR(pg_catalog.+) 1")
        } else if t.starts_with("timestamp") {
            format!("{v} OPERATOR(pg_catalog.+) pg_catalog.make_interval(days => 1)")
        } else {
            return None;
        },
    )
}

/// What one column's round trip found.
struct Finding {
    differ: i64,
    tried: i64,
    example: Option<(String, String)>,
}

impl Probe<'_> {
    /// The round-trip check of `e` on the rows of the scratch table `bluegreen_profile`.
    pub(super) async fn round_trip(
        &mut self,
        e: &TableEntry,
        gt: &catalog::Table,
        cat: &Catalog,
    ) -> Result<(), sqlx::Error> {
        let m: &Mapping = self.m;
        let rp = reverse_plan(m, e, cat);
        if rp.verdict != Verdict::Invertible {
            return Ok(());
        }
        let driving = e.from_clause.driving();
        let Some(bt) = cat.table(&driving.table) else {
            return Ok(());
        };
        let Some(key) = gt.primary_key.as_ref().map(|k| k.columns.clone()) else {
            return Ok(());
        };
        if key.iter().any(|k| e.column(k).is_none()) {
            return Ok(());
        }
        let mapped = query::mapped_columns(e, gt);
        let green_cols: Vec<&catalog::Column> = gt.columns.iter().collect();
        let order = join(key.iter().map(Ident::new), ", ");
        // R over the perturbed rows: each blue column its reverse rebuilds, in blue's type (an
        // explicit cast: a value blue cannot hold comes back different, and is named).
        let reversed = join(
            rp.columns.iter().map(|(b, x)| {
                let ty = bt.column(b).map(|c| c.type_sql.as_str()).unwrap_or("text");
                format!("({})::{ty} AS {}", Expr(x), Ident::new(b))
            }),
            ", ",
        );
        let back = query::mapping_select(
            e,
            gt,
            &m.control_schema,
            &Shape {
                replace: Some((driving.alias.as_str(), "bluegreen_rt_b")),
                extra_where: Vec::new(),
                lenient: true,
            },
        );
        // `=`, not IS NOT DISTINCT FROM: the key is green's primary key (never NULL in the sample;
        // a NULL that comes back is no match, as it should be), and `=` lets the join hash (a
        // nested loop over the two CTEs cost 0.5 s per probe).
        let on = join(
            key.iter()
                .map(|k| format!("t.{k} = p.{k}", k = Ident::new(k))),
            " AND ",
        );
        // The sample, taken once: every probe below reads it (sorting the whole scratch table
        // per probe cost about 0.1 s each, some 60 per CarBot plan).
        self.exec(&sql!(
            "CREATE TEMP TABLE bluegreen_rt_sample ON COMMIT DROP AS SELECT * FROM bluegreen_profile ORDER BY {order} LIMIT {ROWS}"
        ))
        .await?;
        for c in &e.columns {
            if key.contains(&c.name) || rp.read_only.contains(&c.name) {
                continue;
            }
            let Some(gc) = gt.column(&c.name) else {
                continue;
            };
            if !mapped.contains(&c.name.as_str()) {
                continue;
            }
            let col = Ident::new(&c.name);
            let mut worst: Option<Finding> = None;
            for how in [Perturbation::OtherRow, Perturbation::Edit] {
                let value = match how {
                    Perturbation::OtherRow => format!(
                        "coalesce(pg_catalog.lead(g.{col}) OVER (ORDER BY {o}), pg_catalog.first_value(g.{col}) OVER (ORDER BY {o}))",
                        o = join(key.iter().map(|k| format!("g.{}", Ident::new(k))), ", ")
                    ),
                    Perturbation::Edit => match edit(&gc.type_sql, &format!("g.{col}")) {
                        Some(x) => x,
                        None => continue,
                    },
                };
                let ty = &gc.type_sql;
                let select_g = join(
                    green_cols.iter().map(|gc2| {
                        if gc2.name == c.name {
                            format!("v.bluegreen_v::{ty} AS {col}")
                        } else {
                            format!("v.{}", Ident::new(&gc2.name))
                        }
                    }),
                    ", ",
                );
                // A perturbed value must be one green can hold unchanged (no truncation), in a
                // row green's CHECK constraints accept (a status outside green's list is not a
                // write the new application can make).
                let checks = if gt.checks.is_empty() {
                    "true".to_string()
                } else {
                    join(
                        gt.checks
                            .iter()
                            .map(|ck| format!("({}) IS NOT FALSE", ck.expr)),
                        " AND ",
                    )
                };
                let q = sql!(
                    "WITH bluegreen_rt_v AS (SELECT g.*, ({value}) AS bluegreen_v FROM bluegreen_rt_sample AS g),
                     bluegreen_rt_g AS (SELECT * FROM (SELECT {select_g} FROM bluegreen_rt_v AS v
                         WHERE v.bluegreen_v IS NOT NULL AND v.bluegreen_v IS DISTINCT FROM v.{col}
                           AND (v.bluegreen_v::{ty})::pg_catalog.text IS NOT DISTINCT FROM (v.bluegreen_v)::pg_catalog.text) AS bluegreen_rt_x
                         WHERE {checks}),
                     bluegreen_rt_b AS (SELECT {reversed} FROM bluegreen_rt_g),
                     bluegreen_rt_m AS MATERIALIZED ({back})
                     SELECT (SELECT count(*) FROM bluegreen_rt_g)::int8 AS tried,
                            count(*)::int8 AS differ,
                            (pg_catalog.array_agg(p.{col}::pg_catalog.text ORDER BY {porder}))[1] AS sent,
                            (pg_catalog.array_agg(CASE WHEN t.{first} IS NULL THEN NULL ELSE coalesce(t.{col}::pg_catalog.text, 'NULL') END ORDER BY {porder}))[1] AS came
                       FROM bluegreen_rt_g AS p LEFT JOIN bluegreen_rt_m AS t ON {on}
                      WHERE (t.{first} IS NULL AND {missing_counts}) OR (t.{first} IS NOT NULL AND t.{col} IS DISTINCT FROM p.{col})",
                    first = Ident::new(&key[0]),
                    porder = join(key.iter().map(|k| format!("p.{}", Ident::new(k))), ", "),
                    missing_counts = if how == Perturbation::OtherRow {
                        "true"
                    } else {
                        "false"
                    },
                );
                let Some(row) = self.row_guarded(&q).await? else {
                    // The round trip cannot be evaluated here (a blue generated column `M` reads,
                    // a cast that fails on a perturbed value): not judged.
                    continue;
                };
                let tried: i64 = row.try_get("tried")?;
                let differ: i64 = row.try_get("differ")?;
                if differ == 0 {
                    continue;
                }
                let sent: Option<String> = row.try_get("sent")?;
                let came: Option<String> = row.try_get("came")?;
                let example = sent.map(|s| (s, came.unwrap_or_else(|| "no row".into())));
                if worst.as_ref().is_none_or(|w| differ > w.differ) {
                    worst = Some(Finding {
                        differ,
                        tried,
                        example,
                    });
                }
            }
            if let Some(f) = worst {
                let example = f
                    .example
                    .map(|(s, c)| {
                        format!(
                            " (e.g. {} comes back as {})",
                            Literal::new(&s),
                            if c == "no row" || c == "NULL" {
                                c
                            } else {
                                Literal::new(&c).to_string()
                            }
                        )
                    })
                    .unwrap_or_default();
                self.diags.push(
                    Diagnostic::warning(
                        "round-trip",
                        format!(
                            "a green write to {}.{} does not survive the round trip through blue: {} of {} perturbed sample rows give a different value after M(R(g)){example}",
                            e.name, c.name, f.differ, f.tried
                        ),
                    )
                    .at(Some(c.expr.span.clone()))
                    .table(&e.name)
                    .column(&c.name)
                    .hint("after the cutover such a write reaches blue changed: validate reports the row (green is not M(blue)) and a rollback gives the application blue's value; declare a `reverse` that rebuilds what the column is computed from"),
                );
            }
        }
        self.exec(&sql!("DROP TABLE bluegreen_rt_sample")).await?;
        Ok(())
    }
}
