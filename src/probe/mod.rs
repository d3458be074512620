//! The database side of `plan`: everything PostgreSQL must judge, done inside ONE transaction that
//! is always rolled back, so `plan` leaves no schema, table, trigger or sequence value behind.
//!
//! In that transaction it creates the control schema and runs `green_ddl` (DDL is transactional in
//! PostgreSQL), loads the catalog, then for every entry: compiles `from`/`where`, each column
//! expression and its assignment to the green column (errors mapped back to file:line:col,
//! table.column), finds every relation and function the entry reads through a temporary view and
//! `pg_depend` (undeclared dependencies, green reads, volatile functions), and profiles the data
//! (value-map coverage, NOT NULL / CHECK / UNIQUE violations, results that differ when evaluated
//! twice). Each check runs under a savepoint so one failure does not hide the others.
//!
//! It takes no lock stronger than ACCESS SHARE on a blue table, and runs under `lock_timeout`.

use std::collections::BTreeMap;

use sqlx::postgres::PgDatabaseError;
use sqlx::{Connection, PgConnection, Row};

use crate::catalog::{self, Catalog};
use crate::diag::{Diagnostic, Span};
use crate::mapping::{Mapping, Reverse, TableEntry};
use crate::plan::query::{self, Shape};
use crate::plan::{EntryFacts, Profile, static_checks, steps};
use crate::sql::{Expr, Ident, Literal, QName, Sql, join};

/// Driving tables estimated larger than this are sampled by `--profile sample`.
pub const SAMPLE_THRESHOLD: f64 = 200_000.0;
/// Rows a sample aims for.
pub const SAMPLE_ROWS: f64 = 100_000.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileMode {
    None,
    Sample,
    Full,
}

pub struct Outcome {
    pub catalog: Catalog,
    pub facts: BTreeMap<String, EntryFacts>,
    pub diagnostics: Vec<Diagnostic>,
    pub green_ddl_ran: bool,
}

/// Stable functions whose result depends on the clock or the session's identity: deterministic
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

struct Probe<'a> {
    conn: &'a mut PgConnection,
    m: &'a Mapping,
    diags: Vec<Diagnostic>,
    lock_timeout_ms: u64,
}

/// Run every check in one transaction and roll it back.
pub async fn run(
    conn: &mut PgConnection,
    m: &Mapping,
    lock_timeout_ms: u64,
    profile: ProfileMode,
) -> Result<Outcome, Diagnostic> {
    let mut tx = conn.begin().await.map_err(db_diag)?;
    let result = Probe {
        conn: &mut tx,
        m,
        diags: Vec::new(),
        lock_timeout_ms,
    }
    .run(lock_timeout_ms, profile)
    .await;
    // Whatever happened, nothing survives.
    tx.rollback().await.map_err(db_diag)?;
    result
}

fn db_diag(e: sqlx::Error) -> Diagnostic {
    Diagnostic::error("database-error", e.to_string())
}

fn pg_err(e: &sqlx::Error) -> Option<&PgDatabaseError> {
    e.as_database_error()?.try_downcast_ref::<PgDatabaseError>()
}

/// `'now'`, `'today'`, `'tomorrow'`, `'yesterday'` as a string literal in an expression.
fn special_datetime_literal(expr: &str) -> Option<&'static str> {
    let lower = expr.to_ascii_lowercase();
    ["now", "today", "tomorrow", "yesterday"]
        .into_iter()
        .find(|w| lower.contains(&format!("'{w}'")))
}

/// A statement from `green_ddl` that would end bluegreen's transaction. Quoted strings, dollar
/// quotes and comments are skipped; the first word of each statement is checked.
pub fn transaction_control(sql: &str) -> Option<(usize, String)> {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut stmt_start = true;
    let mut line = 1;
    let mut atomic = 0usize;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            i += 2;
            continue;
        }
        if c == b'\'' || c == b'"' {
            // E'...' strings take backslash escapes; standard strings and identifiers do not.
            let escapes = c == b'\'' && i > 0 && (b[i - 1] == b'E' || b[i - 1] == b'e');
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\n' {
                    line += 1;
                }
                if escapes && b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            stmt_start = false;
            continue;
        }
        if c == b'$' {
            // $tag$ ... $tag$
            if let Some(end) = sql[i + 1..].find('$') {
                let tag = &sql[i..i + end + 2];
                if tag[1..tag.len() - 1]
                    .chars()
                    .all(|ch| ch.is_alphanumeric() || ch == '_')
                    && let Some(close) = sql[i + tag.len()..].find(tag)
                {
                    line += sql[i..i + tag.len() + close].matches('\n').count();
                    i += tag.len() + close + tag.len();
                    stmt_start = false;
                    continue;
                }
            }
        }
        if c == b';' {
            stmt_start = true;
            i += 1;
            continue;
        }
        if stmt_start && c.is_ascii_alphabetic() {
            let end = sql[i..]
                .find(|ch: char| !ch.is_ascii_alphabetic())
                .map(|e| i + e)
                .unwrap_or(sql.len());
            let word = sql[i..end].to_ascii_uppercase();
            // `BEGIN ATOMIC ... END` is a function body (SQL-standard syntax), not a transaction.
            if word == "BEGIN"
                && sql[end..]
                    .trim_start()
                    .to_ascii_uppercase()
                    .starts_with("ATOMIC")
            {
                atomic += 1;
                stmt_start = false;
                i = end;
                continue;
            }
            if word == "END" && atomic > 0 {
                atomic -= 1;
                stmt_start = false;
                i = end;
                continue;
            }
            if [
                "BEGIN",
                "COMMIT",
                "END",
                "ROLLBACK",
                "START",
                "ABORT",
                "SAVEPOINT",
                "RELEASE",
                "PREPARE",
            ]
            .contains(&word.as_str())
            {
                // PREPARE TRANSACTION only; a plain PREPARE statement is harmless but unusual.
                let rest = sql[end..].trim_start().to_ascii_uppercase();
                if word != "PREPARE" || rest.starts_with("TRANSACTION") {
                    return Some((line, word));
                }
            }
            stmt_start = false;
            i = end;
            continue;
        }
        if !c.is_ascii_whitespace() {
            stmt_start = false;
        }
        i += 1;
    }
    None
}

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
    async fn exec(&mut self, sql: &Sql) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(sql.assert_safe())
            .execute(&mut *self.conn)
            .await
            .map(|_| ())
    }

    /// Run `f` under a savepoint; roll back to it on error.
    async fn guarded(&mut self, sql: &Sql) -> Result<(), sqlx::Error> {
        self.exec(&Sql("SAVEPOINT bluegreen_probe".into())).await?;
        match self.exec(sql).await {
            Ok(()) => {
                self.exec(&Sql("RELEASE SAVEPOINT bluegreen_probe".into()))
                    .await?;
                Ok(())
            }
            Err(e) => {
                self.exec(&Sql("ROLLBACK TO SAVEPOINT bluegreen_probe".into()))
                    .await?;
                Err(e)
            }
        }
    }

    /// Compile without running: PREPARE parses, analyses and plans; DEALLOCATE drops it again.
    async fn compile(&mut self, sql: &Sql) -> Result<(), sqlx::Error> {
        let prefix = "PREPARE bluegreen_check AS ";
        let res = self.guarded(&Sql(format!("{prefix}{sql}"))).await;
        match res {
            Ok(()) => {
                self.exec(&Sql("DEALLOCATE bluegreen_check".into())).await?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `SELECT count(*) ...` under a savepoint; `None` when it cannot be evaluated.
    async fn count_guarded(&mut self, sql: &Sql) -> Result<Option<i64>, sqlx::Error> {
        self.exec(&Sql("SAVEPOINT bluegreen_count".into())).await?;
        match sqlx::query_scalar::<_, i64>(sql.assert_safe())
            .fetch_one(&mut *self.conn)
            .await
        {
            Ok(n) => {
                self.exec(&Sql("RELEASE SAVEPOINT bluegreen_count".into()))
                    .await?;
                Ok(Some(n))
            }
            Err(_) => {
                self.exec(&Sql("ROLLBACK TO SAVEPOINT bluegreen_count".into()))
                    .await?;
                Ok(None)
            }
        }
    }

    async fn run(
        mut self,
        lock_timeout_ms: u64,
        profile: ProfileMode,
    ) -> Result<Outcome, Diagnostic> {
        let m = self.m;
        self.exec(&Sql(format!(
            "SET LOCAL lock_timeout = '{lock_timeout_ms}ms'; SET LOCAL search_path = pg_catalog; SET LOCAL client_min_messages = warning"
        )))
        .await
        .map_err(db_diag)?;
        // Server facts only (the tables come after green_ddl ran).
        let pre = catalog::load(self.conn, &[]).await.map_err(db_diag)?;
        if !pre.server.schemas.contains(&m.blue) {
            return Err(Diagnostic::error(
                "unknown-blue-schema",
                format!(
                    "blue schema `{}` does not exist in database {}",
                    m.blue, pre.server.database
                ),
            )
            .maybe_hint(crate::diag::did_you_mean(
                &m.blue,
                pre.server.schemas.iter().map(String::as_str),
            ))
            .hint_or("set `blue:` in the mapping to the schema the application uses today"));
        }
        if pre.server.version_num < 150_000 {
            self.diags.push(Diagnostic::warning(
                "old-server",
                format!(
                    "PostgreSQL {} : bluegreen is tested on 15 and later",
                    pre.server.version
                ),
            ));
        }

        // Control schema, so the generated SQL compiles exactly as it will run.
        if let Err(e) = self.exec(&Sql(steps::control_ddl(&m.control_schema))).await {
            return Err(Diagnostic::error("control-schema", format!("cannot create the control schema `{}`: {e}", m.control_schema))
                .hint("the role needs CREATE on the database; or set `control_schema:` to a schema it may create"));
        }

        // Green DDL, unless green already exists (prepare ran): then check against it.
        let green_exists = pre.server.schemas.contains(&m.green)
            && sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind IN ('r','p'))")
                .bind(&m.green)
                .fetch_one(&mut *self.conn)
                .await
                .map_err(db_diag)?;
        let mut green_ddl_ran = false;
        if green_exists {
            self.diags.push(Diagnostic::info(
                "green-exists",
                format!("green schema `{}` already has tables (prepared earlier): checked against them, green_ddl not re-run", m.green),
            ));
        } else {
            self.green_ddl().await?;
            green_ddl_ran = true;
            let still_open: bool =
                sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
                    .fetch_one(&mut *self.conn)
                    .await
                    .map_err(db_diag)?;
            if !still_open {
                return Err(Diagnostic::error(
                    "green-ddl-transaction",
                    "green_ddl ended bluegreen's transaction (a COMMIT or ROLLBACK in the file): what it created before that point WAS committed",
                )
                .at(Some(m.green_ddl_span.clone()))
                .hint(format!("drop the schemas it created ({} and {}), remove transaction control from the file, and run plan again", m.green, m.control_schema)));
            }
        }
        let schemas = m.catalog_schemas();
        let refs: Vec<&str> = schemas.iter().map(String::as_str).collect();
        let cat = catalog::load(self.conn, &refs).await.map_err(db_diag)?;
        let statics = static_checks(m, &cat);
        let broken: Vec<String> = statics
            .iter()
            .filter(|d| d.is_error())
            .filter_map(|d| d.table.clone())
            .collect();
        self.diags.extend(statics);

        let mut facts = BTreeMap::new();
        self.exec(&query::set_mapping_search_path(m, true))
            .await
            .map_err(db_diag)?;
        for e in &m.tables {
            if broken.contains(&e.name) || e.from_clause.items.is_empty() {
                continue;
            }
            let Some(gt) = cat.table(&QName::new(&m.green, &e.name)) else {
                continue;
            };
            let f = self.entry(e, gt, &cat, profile).await.map_err(db_diag)?;
            facts.insert(e.name.clone(), f);
        }
        Ok(Outcome {
            catalog: cat,
            facts,
            diagnostics: self.diags,
            green_ddl_ran,
        })
    }

    async fn green_ddl(&mut self) -> Result<(), Diagnostic> {
        let m = self.m;
        let ddl = std::fs::read_to_string(&m.green_ddl).map_err(|e| {
            Diagnostic::error(
                "missing-file",
                format!("cannot read green_ddl {}: {e}", m.green_ddl.display()),
            )
            .at(Some(m.green_ddl_span.clone()))
        })?;
        if let Some((line, word)) = transaction_control(&ddl) {
            return Err(Diagnostic::error(
                "green-ddl-transaction",
                format!(
                    "green_ddl contains {word}: bluegreen runs the file in its own transaction"
                ),
            )
            .at(Some(Span::new(&m.green_ddl, line as u64, 1)))
            .hint("remove transaction control statements from the file"));
        }
        let green = Ident::new(&m.green);
        self.exec(&Sql(format!(
            "CREATE SCHEMA IF NOT EXISTS {green}; SET LOCAL search_path = {green}"
        )))
        .await
        .map_err(db_diag)?;
        // The file is the user's own DDL, run as written: its text is the statement.
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(ddl.clone()))
            .execute(&mut *self.conn)
            .await
        {
            let (msg, pos) = match pg_err(&e) {
                Some(p) => (
                    format!("{} (SQLSTATE {})", p.message(), p.code()),
                    match p.position() {
                        Some(sqlx::postgres::PgErrorPosition::Original(n)) => Some(n),
                        _ => None,
                    },
                ),
                None => (e.to_string(), None),
            };
            let span = pos.map(|n| {
                let before: String = ddl.chars().take(n.saturating_sub(1)).collect();
                let line = before.matches('\n').count() as u64 + 1;
                let col = before.rsplit('\n').next().unwrap_or("").chars().count() as u64 + 1;
                Span::new(&m.green_ddl, line, col)
            });
            return Err(
                Diagnostic::error("green-ddl-failed", format!("green_ddl failed: {msg}"))
                    .at(span.or(Some(Span::new(&m.green_ddl, 1, 1))))
                    .hint(
                        "fix the green DDL file; it runs with search_path set to the green schema",
                    ),
            );
        }
        // The file may have changed session settings (pg_dump output sets lock_timeout = 0): pin
        // them again. And it must not have locked anything outside green and the control schema
        // (a REFERENCES to a blue table would hold SHARE ROW EXCLUSIVE on it for the whole plan).
        self.exec(&Sql(format!(
            "SET LOCAL lock_timeout = '{}ms'; SET LOCAL statement_timeout = 0; SET LOCAL search_path = pg_catalog",
            self.lock_timeout_ms
        )))
        .await
        .map_err(db_diag)?;
        let foreign: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT format('%s (%s)', l.relation::regclass, l.mode) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND l.mode NOT IN ('AccessShareLock') AND c.relkind IN ('r', 'p')
               AND n.nspname NOT IN ($1, $2, 'pg_catalog', 'pg_toast') AND n.nspname NOT LIKE 'pg\\_temp%'",
        )
        .bind(&m.green)
        .bind(&m.control_schema)
        .fetch_all(&mut *self.conn)
        .await
        .map_err(db_diag)?;
        if !foreign.is_empty() {
            return Err(Diagnostic::error(
                "green-ddl-locks-blue",
                format!("green_ddl takes locks on tables outside the green schema: {}", foreign.join(", ")),
            )
            .at(Some(m.green_ddl_span.clone()))
            .hint("green must not reference blue tables (foreign keys to blue block the application's writes while they are created); keep green self-contained"));
        }
        Ok(())
    }

    /// An expression error mapped back to the file.
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

    async fn entry(
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
        let from_only = Sql(format!("SELECT 1 FROM {}", e.from_clause.render()));
        if let Err(err) = self.compile(&from_only).await {
            let d = self.expr_error(&err, e, None, &e.from.text, &e.from.span, usize::MAX, cat);
            self.diags.push(d);
            return Ok(facts);
        }
        if let Some(w) = &e.where_ {
            let prefix = format!("SELECT 1 FROM {} WHERE (", e.from_clause.render());
            let sql = Sql(format!("{prefix}{})", w.text));
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
                let sql = Sql(format!("{prefix}{}) IS NOT NULL", x));
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
            let view = Sql(format!(
                "CREATE TEMP VIEW bluegreen_probe AS SELECT {} AS v FROM {}{}{}",
                Expr(&sql_expr),
                e.from_clause.render(),
                query::where_clause(e, &[]),
                query::group_by_clause(e)
            ));
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
            let sqlvalue: bool = sqlx::query_scalar(
                "SELECT coalesce(bool_or(r.ev_action::text LIKE '%SQLVALUEFUNCTION%'), false) FROM pg_rewrite r WHERE r.ev_class = 'bluegreen_probe'::regclass",
            )
            .fetch_one(&mut *self.conn)
            .await?;
            self.exec(&Sql("DROP VIEW bluegreen_probe".into())).await?;
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
                                .maybe_col(col)
                                .hint("green is computed from blue only: derive the value from blue (e.g. md5(natural_key)::uuid)"),
                        );
                    } else if !declared.contains(&q) {
                        self.diags.push(
                            Diagnostic::error("undeclared-dependency", format!("reads {} outside `from`: sync could not follow changes to it", q.display()))
                                .at(Some(span.clone()))
                                .table(&e.name)
                                .maybe_col(col)
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
                                .maybe_col(col)
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
                            .maybe_col(col)
                            .hint("derive it from blue data: md5('prefix:' || natural_key)::uuid for ids, keep the blue timestamp for times"),
                    );
                }
            }
        }
        facts.reads = reads;

        // Reverse expressions compile over the green table and fit the blue column.
        if let Reverse::Columns(cols) = &e.reverse
            && let Some(bt) = cat.table(&e.from_clause.driving().table)
        {
            for (bc, x) in cols {
                let Some(bcol) = bt.column(bc) else { continue };
                let sql = Sql(format!(
                    "SELECT CAST({} AS {}) FROM {}",
                    Expr(&x.text),
                    bcol.type_sql,
                    gt.qname()
                ));
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

    async fn profile(
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
        let sampled_rel = format!(
            "(SELECT * FROM {} TABLESAMPLE SYSTEM ({:.6}) REPEATABLE (7))",
            bt.qname(),
            fraction * 100.0
        );
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
        let select_sql = query::mapping_select_extra(e, gt, &m.control_schema, &shape, &raw_list).0;
        let create = Sql(format!(
            "CREATE TEMP TABLE bluegreen_profile ({}) ON COMMIT DROP;\nINSERT INTO bluegreen_profile ({}) {select_sql}",
            defs.join(", "),
            insert_cols.join(", ")
        ));
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
        let driving_rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {sampled} AS s",
            sampled = if sample {
                sampled_rel.clone()
            } else {
                bt.qname().to_string()
            }
        )))
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
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM bluegreen_profile WHERE {} IS NULL{unmapped_excluded}",
                Ident::new(&c.name)
            )))
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
            let q = Sql(format!(
                "SELECT count(*) FROM bluegreen_profile WHERE NOT ({})",
                ck.expr
            ));
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
            let q = Sql(format!(
                "SELECT count(*), coalesce(sum(n), 0)::int8 FROM (SELECT count(*) AS n FROM bluegreen_profile WHERE {not_null} GROUP BY {cols} HAVING count(*) > 1) d"
            ));
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
            let q = Sql(format!(
                "SELECT count(*) FROM bluegreen_profile AS c WHERE {not_null} AND NOT EXISTS (SELECT 1 FROM ({parent_rows}) AS p WHERE {matches})"
            ));
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
            let q = Sql(format!(
                "SELECT bluegreen_raw_{i} AS v, count(*) AS n FROM bluegreen_profile WHERE bluegreen_raw_{i} IS NOT NULL AND bluegreen_raw_{i} NOT IN ({keys}) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20"
            ));
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
        // Evaluated twice in one statement, the mapping must give the same rows.
        let twice = Sql(format!(
            "SELECT count(*) FROM ((SELECT t::text FROM ({select}) t) EXCEPT ALL (SELECT t::text FROM ({select}) t)) d"
        ));
        if let Some(n) = self.count_guarded(&twice).await?
            && n > 0
        {
            self.diags.push(
                Diagnostic::error("non-deterministic-result", format!("evaluating the mapping twice {scope} gave {n} different row(s)"))
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint("a function marked IMMUTABLE or STABLE returns different values: make the expressions depend on blue data only"),
            );
        }
        self.exec(&Sql("DROP TABLE bluegreen_profile".into()))
            .await?;
        Ok(Some(Profile {
            mode: if sample { "sample" } else { "full" }.into(),
            fraction,
            driving_rows_read: driving_rows,
            rows_produced: produced,
            avg_row_bytes: width,
        }))
    }
}

impl Diagnostic {
    fn maybe_col(self, c: Option<&str>) -> Self {
        match c {
            Some(c) => self.column(c),
            None => self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_transaction_control_outside_quotes() {
        assert_eq!(
            transaction_control("CREATE TABLE a (x int);\nCOMMIT;"),
            Some((2, "COMMIT".into()))
        );
        assert_eq!(
            transaction_control(
                "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;\n-- COMMIT\nSELECT 'COMMIT';"
            ),
            None
        );
        assert_eq!(
            transaction_control("begin;\ncreate table t (x int);"),
            Some((1, "BEGIN".into()))
        );
        assert_eq!(
            transaction_control("CREATE TABLE t (x int); PREPARE TRANSACTION 'x'"),
            Some((1, "PREPARE".into()))
        );
    }
}
