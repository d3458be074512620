//! What an expression reads and whether it is deterministic, asked of PostgreSQL: a temporary
//! view over the expression, its `pg_depend` rows and its query tree (`deps.sql`). Built-in
//! functions are pinned and never appear in `pg_depend`, so the query tree is read as well.

use sqlx::Row;

use super::Probe;
use crate::catalog;
use crate::diag::{Diagnostic, Span};
use crate::mapping::TableEntry;
use crate::plan::query;
use crate::sql::{Expr, QName, sql};

/// within a statement, different on every re-derivation.
const TIME_OR_IDENTITY: &[&str] = &[
    "now",
    "transaction_timestamp",
    "statement_timestamp",
    "current_setting",
    "current_user",
    "session_user",
    "current_schema",
    "current_schemas",
    "current_database",
    "inet_client_addr",
    "pg_backend_pid",
    "txid_current",
    "pg_current_xact_id",
    "age",
    "timeofday",
    "pg_postmaster_start_time",
    "pg_conf_load_time",
];

/// `'now'`, `'today'`, `'tomorrow'`, `'yesterday'` as a string literal in an expression.
fn special_datetime_literal(expr: &str) -> Option<&'static str> {
    let lower = expr.to_ascii_lowercase();
    ["now", "today", "tomorrow", "yesterday"]
        .into_iter()
        .find(|w| lower.contains(&format!("'{w}'")))
}

impl Probe<'_> {
    /// Every relation the entry's columns and `where` read, as PostgreSQL resolved them; green
    /// reads, undeclared dependencies and non-deterministic functions are reported.
    pub(super) async fn dependencies(
        &mut self,
        e: &TableEntry,
        gt: &catalog::Table,
    ) -> Result<Vec<QName>, sqlx::Error> {
        let m = self.m;
        let control = &m.control_schema;
        // Dependencies and volatility, per column (so a finding names its column).
        let declared: Vec<QName> = e
            .from_clause
            .items
            .iter()
            .map(|i| i.table.clone())
            .collect();
        let mut reads: Vec<QName> = Vec::new();
        let mut targets: Vec<(Option<&str>, String, &Span)> = e
            .columns
            .iter()
            .filter_map(|c| {
                Some((
                    Some(c.name.as_str()),
                    query::column_sql(e, c, gt.column(&c.name)?, control, false),
                    &c.expr.span,
                ))
            })
            .collect();
        if let Some(w) = &e.where_ {
            targets.push((None, "1".into(), &w.span));
        }
        for (col, sql_expr, span) in targets {
            let view = sql!(
                "CREATE TEMP VIEW bluegreen_probe AS SELECT {} AS v FROM {}{}{}",
                Expr(&sql_expr),
                e.from_clause.render(),
                query::where_clause(e, &[]),
                query::group_by_clause(e)
            );
            if let Err(err) = self.guarded(&view).await {
                let mut d = Diagnostic::error("expression-error", err.to_string())
                    .at(Some(span.clone()))
                    .table(&e.name);
                if let Some(c) = col {
                    d = d.column(c);
                }
                self.diags.push(d);
                continue;
            }
            let rows = sqlx::query(include_str!("deps.sql"))
                .fetch_all(&mut *self.conn)
                .await?;
            let (sqlvalue, windowed): (bool, bool) = sqlx::query_as(
                "SELECT coalesce(bool_or(r.ev_action::text LIKE '%SQLVALUEFUNCTION%'), false), coalesce(bool_or(r.ev_action::text LIKE '%{WINDOWFUNC %'), false) FROM pg_rewrite r WHERE r.ev_class = 'bluegreen_probe'::regclass",
            )
            .fetch_one(&mut *self.conn)
            .await?;
            self.exec(&sql!("DROP VIEW bluegreen_probe")).await?;
            if windowed {
                // Copy computes M one chunk at a time and sync one key at a time: a window's value
                // depends on rows neither of them sees.
                self.diags.push(
                    Diagnostic::error("window-function", "calls a window function (... OVER ...): its value depends on other rows, which copy (one chunk at a time) and sync (one changed key at a time) do not see, so green would silently differ from M(blue)")
                        .at(Some(span.clone()))
                        .table(&e.name)
                        .maybe_column(col)
                        .hint("compute the value from the row and the rows joined in `from` (an aggregate with `group_by` is fine); a rank or running total belongs in a view or query over green, not in a stored column"),
                );
            }
            let mut flagged: Vec<String> = Vec::new();
            if sqlvalue {
                flagged.push("CURRENT_DATE / CURRENT_TIMESTAMP / CURRENT_USER depend on the clock or the session".to_string());
            }
            // Special date/time input strings are folded into constants when the statement is
            // parsed, so no function shows in the query tree: look for them in the text.
            if let Some(word) = special_datetime_literal(&sql_expr) {
                flagged.push(format!(
                    "'{word}' is read as the current date or time when the statement is parsed"
                ));
            }
            for r in rows {
                let kind: String = r.try_get("kind")?;
                let schema: String = r.try_get("schema")?;
                let name: String = r.try_get("name")?;
                let volatile: Option<String> = r.try_get("volatility")?;
                if kind == "relation" {
                    let q = QName::new(&schema, &name);
                    if !reads.contains(&q) {
                        reads.push(q.clone());
                    }
                    if schema == m.green {
                        self.diags.push(
                            Diagnostic::error("reads-green", format!("reads green table {}", q.display()))
                                .at(Some(span.clone()))
                                .table(&e.name)
                                .maybe_column(col)
                                .hint("green is computed from blue only: derive the value from blue (e.g. md5(natural_key)::uuid)"),
                        );
                    } else if !declared.contains(&q) {
                        self.diags.push(
                            Diagnostic::error("undeclared-dependency", format!("reads {} outside `from`: sync could not follow changes to it", q.display()))
                                .at(Some(span.clone()))
                                .table(&e.name)
                                .maybe_column(col)
                                .hint(format!("declare it in `from` as `JOIN {} x ON ...` and read x.<column> instead of a subquery", q.display())),
                        );
                    }
                } else if schema != *control {
                    let v = volatile.unwrap_or_default();
                    if v == "v" {
                        flagged.push(format!("{schema}.{name}() is VOLATILE"));
                    } else if schema == "pg_catalog" && TIME_OR_IDENTITY.contains(&name.as_str()) {
                        flagged.push(format!("{name}() depends on the clock or the session"));
                    } else if schema != "pg_catalog" && v == "s" {
                        self.diags.push(
                            Diagnostic::warning("stable-function", format!("{schema}.{name}() is STABLE: if it reads tables, sync cannot follow changes to them"))
                                .at(Some(span.clone()))
                                .table(&e.name)
                                .maybe_column(col)
                                .hint("declare the tables it reads in `from` and inline the logic, or mark the function IMMUTABLE if it reads none"),
                        );
                    }
                }
            }
            for why in flagged {
                {
                    self.diags.push(
                        Diagnostic::error("volatile-expression", format!("non-deterministic: {why}; sync and validate recompute green from blue and would get another answer"))
                            .at(Some(span.clone()))
                            .table(&e.name)
                            .maybe_column(col)
                            .hint("derive it from blue data: md5('prefix:' || natural_key)::uuid for ids, keep the blue timestamp for times"),
                    );
                }
            }
        }
        Ok(reads)
    }
}
