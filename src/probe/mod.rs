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
//!
//! `ddl.rs` runs the green DDL, `compile.rs` compiles every expression and maps errors back to the
//! file, `deps.rs` finds what each expression reads and whether it is deterministic, `profile.rs`
//! profiles the data.

mod compile;
mod ddl;
mod deps;
mod profile;
pub mod resolve;
mod roundtrip;

use std::collections::BTreeMap;

use sqlx::postgres::PgDatabaseError;
use sqlx::{Connection, PgConnection};

use crate::catalog::{self, Catalog};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::plan::query::{self};
use crate::plan::{EntryFacts, static_checks, steps};
use crate::sql::{QName, Sql, sql};

/// Driving tables estimated larger than this are sampled by `--profile sample`.
pub const SAMPLE_THRESHOLD: f64 = 200_000.0;
/// Rows a sample aims for.
pub const SAMPLE_ROWS: f64 = 100_000.0;
/// About how many driving rows the mapping is evaluated twice on (its determinism check).
pub const TWICE_ROWS: f64 = 10_000.0;

pub use crate::plan::ProfileMode;

pub struct Outcome {
    pub catalog: Catalog,
    pub facts: BTreeMap<String, EntryFacts>,
    pub diagnostics: Vec<Diagnostic>,
    pub green_ddl_ran: bool,
}

/// Stable functions whose result depends on the clock or the session's identity: deterministic
struct Probe<'a> {
    conn: &'a mut PgConnection,
    m: &'a Mapping,
    diags: Vec<Diagnostic>,
    lock_timeout_ms: u64,
}

/// The plan of `m` against the database: every check (in one rolled-back transaction), then
/// `plan::build`. What `plan` prints, and what writing commands check before their first write.
pub async fn plan(
    conn: &mut PgConnection,
    m: &Mapping,
    opts: &crate::plan::Options,
) -> Result<crate::plan::Plan, Diagnostic> {
    let settings = crate::plan::effective_settings(m, opts);
    let out = run(conn, m, settings.lock_timeout_ms, opts.profile).await?;
    Ok(crate::plan::build(
        m,
        &out.catalog,
        &out.facts,
        opts,
        out.green_ddl_ran,
        out.diagnostics,
    ))
}

/// Run every check in one transaction and roll it back.
pub async fn run(
    conn: &mut PgConnection,
    m: &Mapping,
    lock_timeout_ms: u64,
    profile: ProfileMode,
) -> Result<Outcome, Diagnostic> {
    // One snapshot for every check: profiles of two entries (a child's foreign key against its
    // parent's rows) must not see two states of a blue table the application is writing.
    let mut tx = conn
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(db_diag)?;
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

impl Probe<'_> {
    async fn exec(&mut self, sql: &Sql) -> Result<(), sqlx::Error> {
        sqlx::raw_sql(sql.assert_safe())
            .execute(&mut *self.conn)
            .await
            .map(|_| ())
    }

    /// Run `f` under a savepoint; roll back to it on error.
    async fn guarded(&mut self, sql: &Sql) -> Result<(), sqlx::Error> {
        self.exec(&sql!("SAVEPOINT bluegreen_probe")).await?;
        match self.exec(sql).await {
            Ok(()) => {
                self.exec(&sql!("RELEASE SAVEPOINT bluegreen_probe"))
                    .await?;
                Ok(())
            }
            Err(e) => {
                self.exec(&sql!("ROLLBACK TO SAVEPOINT bluegreen_probe"))
                    .await?;
                Err(e)
            }
        }
    }

    /// Compile without running: PREPARE parses, analyses and plans; DEALLOCATE drops it again.
    async fn compile(&mut self, sql: &Sql) -> Result<(), sqlx::Error> {
        let prefix = "PREPARE bluegreen_check AS ";
        let res = self.guarded(&sql!("{prefix}{sql}")).await;
        match res {
            Ok(()) => {
                self.exec(&sql!("DEALLOCATE bluegreen_check")).await?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// `SELECT count(*) ...` under a savepoint; `None` when it cannot be evaluated.
    async fn count_guarded(&mut self, sql: &Sql) -> Result<Option<i64>, sqlx::Error> {
        match self.row_guarded(sql).await? {
            Some(r) => Ok(Some(sqlx::Row::try_get(&r, 0)?)),
            None => Ok(None),
        }
    }

    /// One row of `sql` under a savepoint; `None` when it cannot be evaluated.
    async fn row_guarded(
        &mut self,
        sql: &Sql,
    ) -> Result<Option<sqlx::postgres::PgRow>, sqlx::Error> {
        self.exec(&sql!("SAVEPOINT bluegreen_row")).await?;
        match sqlx::query(sql.assert_safe())
            .fetch_one(&mut *self.conn)
            .await
        {
            Ok(r) => {
                self.exec(&sql!("RELEASE SAVEPOINT bluegreen_row")).await?;
                Ok(Some(r))
            }
            Err(_) => {
                self.exec(&sql!("ROLLBACK TO SAVEPOINT bluegreen_row"))
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
        self.exec(&sql!(
            "SET LOCAL lock_timeout = '{lock_timeout_ms}ms'; SET LOCAL search_path = pg_catalog; SET LOCAL client_min_messages = warning"
        ))
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
        if let Err(e) = self
            .exec(&sql!("{}", steps::control_ddl(&m.control_schema)))
            .await
        {
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
        let mut cat = catalog::load(self.conn, &refs).await.map_err(db_diag)?;
        // Green prepared earlier: the keys the copy leaves out are still green's keys.
        let pending = crate::control::deferred::pending_if_any(self.conn, m).await?;
        crate::control::deferred::restore_keys(&mut cat, &pending)?;
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
}
