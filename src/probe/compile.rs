//! Compile checks of an entry: `from`, `where`, `group_by`, each column expression and its
//! assignment to the green column, the sync key, the reverse expressions; each under a savepoint,
//! each error mapped back to file:line:col, table and column.

use super::{Probe, pg_err};
use crate::catalog::{self, Catalog};
use crate::diag::{Diagnostic, Span};
use crate::mapping::{Reverse, TableEntry};
use crate::plan::query;
use crate::plan::{EntryFacts, ProfileMode};
use crate::sql::{Expr, QName, sql};

/// Translate a character position in `text` (0-based) into a file span, given where the text
/// starts in the file. The value may be quoted in YAML: find it on its line.
fn span_in(source: &str, start: &Span, text: &str, offset: usize) -> Span {
    let line_text = source
        .lines()
        .nth(start.line.saturating_sub(1) as usize)
        .unwrap_or("");
    if !text.contains('\n') {
        let from = (start.column.saturating_sub(1)) as usize;
        let from_byte = line_text
            .char_indices()
            .nth(from)
            .map(|(b, _)| b)
            .unwrap_or(line_text.len());
        if let Some(found) = line_text[from_byte..].find(text) {
            let col = line_text[..from_byte + found].chars().count() + offset + 1;
            return Span {
                column: col as u64,
                ..start.clone()
            };
        }
    }
    start.clone()
}

impl Probe<'_> {
    #[allow(clippy::too_many_arguments)]
    fn expr_error(
        &self,
        e: &sqlx::Error,
        entry: &TableEntry,
        column: Option<&str>,
        text: &str,
        span: &Span,
        offset_in_stmt: usize,
        cat: &Catalog,
    ) -> Diagnostic {
        let Some(p) = pg_err(e) else {
            return Diagnostic::error("expression-error", e.to_string())
                .at(Some(span.clone()))
                .table(&entry.name);
        };
        let code = p.code();
        let pos_in_expr = match p.position() {
            Some(sqlx::postgres::PgErrorPosition::Original(n)) => {
                // The statement is sent as "PREPARE bluegreen_check AS " + sql.
                let n = n
                    .saturating_sub(1)
                    .saturating_sub("PREPARE bluegreen_check AS ".len());
                n.checked_sub(offset_in_stmt)
                    .filter(|k| *k <= text.chars().count())
            }
            _ => None,
        };
        let at = span_in(&self.m.source, span, text, pos_in_expr.unwrap_or(0));
        let kind = match code {
            "42601" => "expression-syntax",
            "42703" => "unknown-blue-column",
            "42P01" => "unknown-table-or-alias",
            "42883" => "unknown-function",
            "42803" => "group-by",
            "42804" | "42846" => "type-mismatch",
            "22P02" | "22023" => "bad-value",
            _ => "expression-error",
        };
        let mut hint = p.hint().map(str::to_string);
        if hint.is_none() && code == "42703" {
            // "column w.nme does not exist": suggest from the tables in `from`.
            let wanted = p.message().split_whitespace().nth(1).unwrap_or("");
            let (alias, col) = wanted.split_once('.').unwrap_or(("", wanted));
            let mut cands: Vec<String> = Vec::new();
            for it in &entry.from_clause.items {
                if (alias.is_empty() || it.alias == alias)
                    && let Some(t) = cat.table(&it.table)
                {
                    cands.extend(t.columns.iter().map(|c| format!("{}.{}", it.alias, c.name)));
                }
            }
            let target = if alias.is_empty() {
                col.to_string()
            } else {
                format!("{alias}.{col}")
            };
            hint = crate::diag::did_you_mean(&target, cands.iter().map(String::as_str));
        }
        if (code == "42804" || code == "42846")
            && let Some(c) = column.and_then(|c| {
                cat.table(&QName::new(&self.m.green, &entry.name))?
                    .column(c)
                    .cloned()
            })
        {
            hint = Some(format!(
                "cast the expression to the green column's type: ({text})::{}",
                c.type_sql
            ));
        }
        let mut d = Diagnostic::error(kind, format!("{} (SQLSTATE {code})", p.message()))
            .at(Some(at))
            .table(&entry.name)
            .maybe_hint(hint);
        if let Some(c) = column {
            d = d.column(c);
        }
        d
    }

    pub(super) async fn entry(
        &mut self,
        e: &TableEntry,
        gt: &catalog::Table,
        cat: &Catalog,
        profile: ProfileMode,
    ) -> Result<EntryFacts, sqlx::Error> {
        let m = self.m;
        let control = &m.control_schema;
        let mut facts = EntryFacts::default();
        let mut ok = true;

        // from alone, then with where: an error is reported where it is.
        let from_only = sql!("SELECT 1 FROM {}", e.from_clause.render());
        if let Err(err) = self.compile(&from_only).await {
            let d = self.expr_error(&err, e, None, &e.from.text, &e.from.span, usize::MAX, cat);
            self.diags.push(d);
            return Ok(facts);
        }
        if let Some(w) = &e.where_ {
            let prefix = format!("SELECT 1 FROM {} WHERE (", e.from_clause.render());
            let sql = sql!("{prefix}{})", w.text);
            if let Err(err) = self.compile(&sql).await {
                let d =
                    self.expr_error(&err, e, None, &w.text, &w.span, prefix.chars().count(), cat);
                self.diags.push(d);
                return Ok(facts);
            }
        }
        // group_by expressions; when one fails, every column would fail with it: stop here.
        for g in &e.group_by {
            let (sql, off) = query::expr_probe(e, &g.text);
            if let Err(err) = self.compile(&sql).await {
                let d = self.expr_error(&err, e, None, &g.text, &g.span, off, cat);
                self.diags.push(d);
                ok = false;
            }
        }
        if !ok {
            return Ok(facts);
        }
        // The sync key must be computable from a single driving row (it selects rows in WHERE
        // clauses): no aggregate, whether given or inferred from the green primary key.
        if let Some((keys, _)) = crate::plan::sync_key(e, gt) {
            for (col, x) in &keys {
                let prefix = format!("SELECT 1 FROM {} WHERE (", e.from_clause.render());
                let sql = sql!("{prefix}{}) IS NOT NULL", x);
                if let Err(err) = self.compile(&sql).await {
                    let span = e
                        .sync_key
                        .as_ref()
                        .and_then(|sk| sk.iter().find(|(c, _)| c == col))
                        .map(|(_, l)| l.span.clone())
                        .or_else(|| e.column(col).map(|c| c.expr.span.clone()))
                        .unwrap_or_else(|| e.span.clone());
                    let mut d =
                        self.expr_error(&err, e, Some(col), x, &span, prefix.chars().count(), cat);
                    d.code = "bad-sync-key";
                    d.hint = Some("a sync key is computed from one driving row (no aggregate): use a group_by expression".into());
                    self.diags.push(d);
                    ok = false;
                }
            }
        }
        // each column: the expression alone, then its assignment to the green column
        for c in &e.columns {
            let Some(gc) = gt.column(&c.name) else {
                continue;
            };
            let (sql, off) = query::expr_probe(e, &c.expr.text);
            if let Err(err) = self.compile(&sql).await {
                let d =
                    self.expr_error(&err, e, Some(&c.name), &c.expr.text, &c.expr.span, off, cat);
                self.diags.push(d);
                ok = false;
                continue;
            }
            let sql = query::assign_probe(e, c, gt, gc, control);
            if let Err(err) = self.compile(&sql).await {
                let mut d = self.expr_error(
                    &err,
                    e,
                    Some(&c.name),
                    &c.expr.text,
                    &c.expr.span,
                    usize::MAX,
                    cat,
                );
                if c.value_map.is_some() && d.code == "bad-value" {
                    d.code = "bad-map-value";
                    d.hint = Some(format!(
                        "every value under `map:` (and `default:`) must be a valid {}",
                        gc.type_sql
                    ));
                }
                self.diags.push(d);
                ok = false;
            }
        }
        // sync key, when given separately: it must compile in the entry's grouping.
        if let Some(sk) = &e.sync_key {
            for (col, x) in sk {
                let (sql, off) = query::expr_probe(e, &x.text);
                if let Err(err) = self.compile(&sql).await {
                    let d = self.expr_error(&err, e, Some(col), &x.text, &x.span, off, cat);
                    self.diags.push(d);
                    ok = false;
                }
            }
        }
        if !ok {
            return Ok(facts);
        }
        facts.reads = self.dependencies(e, gt).await?;
        facts.sync_key_index = self.sync_key_index(e, gt).await?;

        // Reverse expressions compile over the green table and fit the blue column.
        if let Reverse::Columns(cols) = &e.reverse
            && let Some(bt) = cat.table(&e.from_clause.driving().table)
        {
            for (bc, x) in cols {
                let Some(bcol) = bt.column(bc) else { continue };
                let sql = sql!(
                    "SELECT CAST({} AS {}) FROM {}",
                    Expr(&x.text),
                    bcol.type_sql,
                    gt.qname()
                );
                if let Err(err) = self.compile(&sql).await {
                    let msg = pg_err(&err)
                        .map(|p| p.message().to_string())
                        .unwrap_or_else(|| err.to_string());
                    self.diags.push(
                        Diagnostic::error(
                            "reverse-error",
                            format!("reverse expression for blue column {bc}: {msg}"),
                        )
                        .at(Some(x.span.clone()))
                        .table(&e.name)
                        .column(bc)
                        .hint(format!(
                            "reverse expressions read the columns of {} (unqualified)",
                            gt.qname().display()
                        )),
                    );
                }
            }
        }

        facts.compiled = self
            .diags
            .iter()
            .all(|d| !(d.is_error() && d.table.as_deref() == Some(&e.name)));
        if facts.compiled && profile != ProfileMode::None {
            facts.profile = self.profile(e, gt, cat, profile).await?;
        }
        Ok(facts)
    }

    /// The expression index of the driving table that backs a sync key made of expressions (a
    /// cast of a text id to uuid): PostgreSQL deparses the key and each index's leading
    /// expressions in two temporary views over the same alias, and equal view texts mean equal
    /// expressions. `None` when the key is plain columns (the catalog answers that) or nothing
    /// matches.
    async fn sync_key_index(
        &mut self,
        e: &TableEntry,
        gt: &catalog::Table,
    ) -> Result<Option<String>, sqlx::Error> {
        let driving = e.from_clause.driving();
        let Some((keys, _)) = crate::plan::sync_key(e, gt) else {
            return Ok(None);
        };
        if keys.is_empty()
            || keys
                .iter()
                .all(|(_, x)| crate::plan::plain_column_of(x, &driving.alias).is_some())
        {
            return Ok(None);
        }
        let n = keys.len() as i32;
        let indexes: Vec<(String, Vec<String>)> = sqlx::query_as(
            "SELECT c.relname::text, ARRAY(SELECT pg_catalog.pg_get_indexdef(i.indexrelid, k, false) FROM pg_catalog.generate_series(1, $2::int) AS k ORDER BY k)
               FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = $1::regclass AND i.indisvalid AND i.indpred IS NULL AND i.indnkeyatts >= $2::int AND i.indexprs IS NOT NULL
              ORDER BY 1",
        )
        .bind(driving.table.to_string())
        .bind(n)
        .fetch_all(&mut *self.conn)
        .await?;
        let alias = crate::sql::Ident::new(&driving.alias);
        let view = |name: &str, exprs: &mut dyn Iterator<Item = &str>| {
            sql!(
                "CREATE TEMP VIEW {name} AS SELECT {} FROM {} AS {alias}",
                crate::sql::join(
                    exprs
                        .enumerate()
                        .map(|(j, x)| format!("({}) AS k{j}", Expr(x))),
                    ", "
                ),
                driving.table
            )
        };
        let key_view = view("bluegreen_key_v", &mut keys.iter().map(|(_, x)| x.as_str()));
        if self.guarded(&key_view).await.is_err() {
            return Ok(None);
        }
        let mut found = None;
        for (name, exprs) in indexes {
            let index_view = view("bluegreen_index_v", &mut exprs.iter().map(String::as_str));
            if self.guarded(&index_view).await.is_err() {
                continue;
            }
            let same: bool = sqlx::query_scalar(
                "SELECT pg_catalog.pg_get_viewdef('bluegreen_key_v'::regclass) = pg_catalog.replace(pg_catalog.pg_get_viewdef('bluegreen_index_v'::regclass), 'bluegreen_index_v', 'bluegreen_key_v')",
            )
            .fetch_one(&mut *self.conn)
            .await?;
            self.exec(&sql!("DROP VIEW bluegreen_index_v")).await?;
            if same {
                found = Some(name);
                break;
            }
        }
        self.exec(&sql!("DROP VIEW bluegreen_key_v")).await?;
        Ok(found)
    }
}
