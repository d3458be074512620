//! The data profile: M(blue) over the driving table (or a sample) into a scratch table with
//! green's columns, then value-map coverage, NOT NULL / CHECK / UNIQUE / foreign-key violations,
//! and the mapping evaluated twice.

use sqlx::Row;

use super::{Probe, SAMPLE_ROWS, SAMPLE_THRESHOLD, TWICE_ROWS, pg_err};
use crate::catalog::{self, Catalog};
use crate::diag::Diagnostic;
use crate::mapping::TableEntry;
use crate::plan::query::{self, Shape};
use crate::plan::{Profile, ProfileMode};
use crate::sql::{Expr, Ident, Literal, join, sql};

impl Probe<'_> {
    pub(super) async fn profile(
        &mut self,
        e: &TableEntry,
        gt: &catalog::Table,
        cat: &Catalog,
        mode: ProfileMode,
    ) -> Result<Option<Profile>, sqlx::Error> {
        let m = self.m;
        let driving = e.from_clause.driving();
        let bt = cat.table(&driving.table).expect("checked");
        let sample = mode == ProfileMode::Sample && bt.reltuples > SAMPLE_THRESHOLD;
        let fraction = if sample {
            (SAMPLE_ROWS / bt.reltuples).min(1.0)
        } else {
            1.0
        };
        // The driving table's rows, a fraction of its pages (the same ones on every evaluation).
        let sampled = |fraction: f64| {
            format!(
                "(SELECT * FROM {} TABLESAMPLE SYSTEM ({:.6}) REPEATABLE (7))",
                bt.qname(),
                fraction * 100.0
            )
        };
        let sampled_rel = sampled(fraction);
        let shape = Shape {
            replace: sample.then_some((driving.alias.as_str(), sampled_rel.as_str())),
            extra_where: Vec::new(),
            lenient: true,
        };
        // A scratch table with every green column (green types, no constraints) plus the raw text
        // of each mapped value, filled with M(blue) over the profiled rows.
        let mut defs: Vec<String> = gt
            .columns
            .iter()
            .map(|c| format!("{} {}", Ident::new(&c.name), c.type_sql))
            .collect();
        let raw_cols: Vec<(usize, &crate::mapping::Column)> = e
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.value_map.is_some())
            .collect();
        for (i, _) in &raw_cols {
            defs.push(format!("bluegreen_raw_{i} text"));
        }
        let mut insert_cols: Vec<String> = query::mapped_columns(e, gt)
            .iter()
            .map(|c| Ident::new(*c).to_string())
            .collect();
        let raw_list: Vec<String> = raw_cols
            .iter()
            .map(|(i, c)| format!("{}::text AS bluegreen_raw_{i}", Expr(&c.expr.text)))
            .collect();
        insert_cols.extend(raw_cols.iter().map(|(i, _)| format!("bluegreen_raw_{i}")));
        let select = query::mapping_select(e, gt, &m.control_schema, &shape);
        let select_sql = query::mapping_select_extra(e, gt, &m.control_schema, &shape, &raw_list);
        let create = sql!(
            "CREATE TEMP TABLE bluegreen_profile ({}) ON COMMIT DROP;\nINSERT INTO bluegreen_profile ({}) {select_sql}",
            defs.join(", "),
            insert_cols.join(", ")
        );
        if let Err(err) = self.guarded(&create).await {
            let msg = pg_err(&err)
                .map(|p| {
                    format!(
                        "{}{}",
                        p.message(),
                        p.detail().map(|d| format!(" ({d})")).unwrap_or_default()
                    )
                })
                .unwrap_or_else(|| err.to_string());
            self.diags.push(
                Diagnostic::error("profile-failed", format!("evaluating the mapping on the data fails: {msg}"))
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint("copy would fail the same way: fix the expression or filter such rows with `where`"),
            );
            return Ok(None);
        }
        let driving_rows: i64 = sqlx::query_scalar(
            sql!(
                "SELECT count(*) FROM {sampled} AS s",
                sampled = if sample {
                    sampled_rel.clone()
                } else {
                    bt.qname().to_string()
                }
            )
            .assert_safe(),
        )
        .fetch_one(&mut *self.conn)
        .await?;
        let row = sqlx::query("SELECT count(*) AS n, coalesce(avg(pg_column_size(p.*)), 0)::float8 AS w FROM bluegreen_profile p")
            .fetch_one(&mut *self.conn)
            .await?;
        let produced: i64 = row.try_get("n")?;
        let width: f64 = row.try_get("w")?;
        let scope = if sample {
            format!("in a {:.1}% sample", fraction * 100.0)
        } else {
            "in the data".to_string()
        };

        // NOT NULL
        for c in &e.columns {
            let Some(gc) = gt.column(&c.name) else {
                continue;
            };
            if !gc.not_null {
                continue;
            }
            // A value outside a default-less map is reported as unmapped, not again as NULL.
            let unmapped_excluded = raw_cols
                .iter()
                .find(|(_, rc)| {
                    rc.name == c.name
                        && rc.value_map.as_ref().is_some_and(|vm| vm.default.is_none())
                })
                .map(|(i, rc)| {
                    let keys = join(
                        rc.value_map
                            .as_ref()
                            .unwrap()
                            .entries
                            .iter()
                            .map(|(k, _)| Literal::new(k)),
                        ", ",
                    );
                    format!(" AND (bluegreen_raw_{i} IS NULL OR bluegreen_raw_{i} IN ({keys}))")
                })
                .unwrap_or_default();
            let n: i64 = sqlx::query_scalar(
                sql!(
                    "SELECT count(*) FROM bluegreen_profile WHERE {} IS NULL{unmapped_excluded}",
                    Ident::new(&c.name)
                )
                .assert_safe(),
            )
            .fetch_one(&mut *self.conn)
            .await?;
            if n > 0 {
                self.diags.push(
                    Diagnostic::error(
                        "not-null-violation",
                        format!(
                            "{n} row(s) {scope} map to NULL, but green column {} is NOT NULL",
                            c.name
                        ),
                    )
                    .at(Some(c.expr.span.clone()))
                    .table(&e.name)
                    .column(&c.name)
                    .hint("coalesce(...) to a value, or exclude such rows with `where`"),
                );
            }
        }
        // CHECK
        for ck in &gt.checks {
            let q = sql!(
                "SELECT count(*) FROM bluegreen_profile WHERE NOT ({})",
                ck.expr
            );
            // A check that cannot be evaluated on the scratch table (it reads unmapped columns
            // in a way that errors) is skipped: the copy itself will enforce it.
            if let Some(n) = self.count_guarded(&q).await?
                && n > 0
            {
                self.diags.push(
                    Diagnostic::error(
                        "check-violation",
                        format!("{n} row(s) {scope} break CHECK {} ({})", ck.name, ck.expr),
                    )
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint("adjust the mapping (e.g. clamp with least/greatest) or the constraint"),
                );
            }
        }
        // UNIQUE (primary key included)
        for key in gt.unique_keys() {
            let cols = join(key.iter().map(Ident::new), ", ");
            // UNIQUE NULLS NOT DISTINCT counts NULLs as equal; plain UNIQUE lets them repeat.
            let nulls_equal = gt.indexes.iter().any(|ix| {
                ix.unique && ix.nulls_not_distinct && ix.columns.iter().flatten().eq(key.iter())
            });
            let not_null = if nulls_equal {
                "true".to_string()
            } else {
                join(
                    key.iter().map(|c| format!("{} IS NOT NULL", Ident::new(c))),
                    " AND ",
                )
            };
            let q = sql!(
                "SELECT count(*), coalesce(sum(n), 0)::int8 FROM (SELECT count(*) AS n FROM bluegreen_profile WHERE {not_null} GROUP BY {cols} HAVING count(*) > 1) d"
            );
            let r = sqlx::query(q.assert_safe())
                .fetch_one(&mut *self.conn)
                .await?;
            let groups: i64 = r.try_get(0)?;
            let rows: i64 = r.try_get(1)?;
            if groups > 0 {
                self.diags.push(
                    Diagnostic::error("unique-violation", format!("{groups} value(s) of ({}) occur more than once {scope} ({rows} rows): green's unique key would reject them", key.join(", ")))
                        .at(Some(e.span.clone()))
                        .table(&e.name)
                        .hint("group the rows (group_by) or make the key expression distinguish them"),
                );
            }
        }
        // Foreign keys between green tables: every referenced row must be one the parent's entry
        // produces (else VALIDATE fails at the end of the copy and live sync records failures).
        for fk in &gt.foreign_keys {
            if fk.ref_table.schema != m.green || fk.columns.is_empty() {
                continue;
            }
            let Some(parent) = m.entry(&fk.ref_table.name) else {
                self.diags.push(
                    Diagnostic::warning("fk-parent-unmapped", format!("foreign key {} references {}, which no entry fills: rows that reference it will fail", fk.name, fk.ref_table.display()))
                        .at(Some(e.span.clone()))
                        .table(&e.name)
                        .hint("map the parent table too, or leave the referencing columns to NULL"),
                );
                continue;
            };
            let Some(pt) = cat.table(&fk.ref_table) else {
                continue;
            };
            if fk.ref_columns.iter().any(|c| parent.column(c).is_none()) {
                continue;
            }
            let parent_rows =
                query::mapping_select_typed(parent, pt, &m.control_schema, &Shape::default());
            let not_null = join(
                fk.columns
                    .iter()
                    .map(|c| format!("c.{} IS NOT NULL", Ident::new(c))),
                " AND ",
            );
            let matches = join(
                fk.columns
                    .iter()
                    .zip(&fk.ref_columns)
                    .map(|(c, r)| format!("p.{} = c.{}", Ident::new(r), Ident::new(c))),
                " AND ",
            );
            let q = sql!(
                "SELECT count(*) FROM bluegreen_profile AS c WHERE {not_null} AND NOT EXISTS (SELECT 1 FROM ({parent_rows}) AS p WHERE {matches})"
            );
            if let Some(n) = self.count_guarded(&q).await?
                && n > 0
            {
                self.diags.push(
                    Diagnostic::error(
                        "fk-violation",
                        format!("{n} row(s) {scope} reference {} rows that entry `{}` does not produce (foreign key {})", fk.ref_table.display(), parent.name, fk.name),
                    )
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint(format!("filter this entry the way `{}` is filtered (e.g. JOIN the parent's driving table in `from`)", parent.name)),
                );
            }
        }
        // Value maps
        for (i, c) in &raw_cols {
            let vm = c.value_map.as_ref().unwrap();
            let keys = join(vm.entries.iter().map(|(k, _)| Literal::new(k)), ", ");
            let q = sql!(
                "SELECT bluegreen_raw_{i} AS v, count(*) AS n FROM bluegreen_profile WHERE bluegreen_raw_{i} IS NOT NULL AND bluegreen_raw_{i} NOT IN ({keys}) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20"
            );
            let rows = sqlx::query(q.assert_safe())
                .fetch_all(&mut *self.conn)
                .await?;
            for r in rows {
                let v: String = r.try_get("v")?;
                let n: i64 = r.try_get("n")?;
                match &vm.default {
                    None => self.diags.push(
                        Diagnostic::error("unmapped-value", format!("value {} ({n} row(s) {scope}) is not in `map` and there is no `default`", Literal::new(&v)))
                            .at(Some(c.span.clone()))
                            .table(&e.name)
                            .column(&c.name)
                            .hint(format!("add `{v}: <green value>` under map, or a `default:`")),
                    ),
                    Some(d) => self.diags.push(
                        Diagnostic::info("default-used", format!("value {} ({n} row(s) {scope}) is not in `map`: it becomes the default {}", Literal::new(&v), d.as_deref().unwrap_or("NULL")))
                            .at(Some(c.span.clone()))
                            .table(&e.name)
                            .column(&c.name),
                    ),
                }
            }
        }
        // Evaluated twice in one statement, the mapping must give the same rows. A function that
        // lies about its volatility differs on nearly every row, so a sample of about
        // TWICE_ROWS driving rows shows it (over the whole profile this cost two more
        // evaluations of M: 6 of the 13 s CarBot's plan took at 250,000 leads).
        let twice_fraction = (TWICE_ROWS / bt.reltuples.max(1.0)).min(fraction);
        let twice_rel = sampled(twice_fraction);
        let twice_select = if twice_fraction < 1.0 {
            query::mapping_select(
                e,
                gt,
                &m.control_schema,
                &Shape {
                    replace: Some((driving.alias.as_str(), twice_rel.as_str())),
                    extra_where: Vec::new(),
                    lenient: true,
                },
            )
        } else {
            select.clone()
        };
        let twice = sql!(
            "SELECT count(*) FROM ((SELECT t::text FROM ({twice_select}) t) EXCEPT ALL (SELECT t::text FROM ({twice_select}) t)) d"
        );
        if let Some(n) = self.count_guarded(&twice).await?
            && n > 0
        {
            self.diags.push(
                Diagnostic::error("non-deterministic-result", format!("evaluating the mapping twice on {} gave {n} different row(s)", if twice_fraction < 1.0 { format!("a {:.2}% sample", twice_fraction * 100.0) } else { "the data".to_string() }))
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint("a function marked IMMUTABLE or STABLE returns different values: make the expressions depend on blue data only"),
            );
        }
        self.round_trip(e, gt, cat).await?;
        self.exec(&sql!("DROP TABLE bluegreen_profile")).await?;
        Ok(Some(Profile {
            mode: if sample {
                ProfileMode::Sample
            } else {
                ProfileMode::Full
            },
            fraction,
            driving_rows_read: driving_rows,
            rows_produced: produced,
            avg_row_bytes: width,
        }))
    }
}
