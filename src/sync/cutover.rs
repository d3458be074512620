//! `cutover` and `rollback` (DESIGN.md step 5, "the cutover fence", "after cutover"): the gates,
//! then one short transaction that moves the application from blue to green (or back), retried
//! with backoff, each attempt's lock wait below `deadlock_timeout` so the tool gives way, never
//! the application.
//!
//! Cutover, in one transaction:
//! 1. pause the other appliers, lock the blue tables the mapping reads `EXCLUSIVE` in one fixed
//!    order (reads go on), drain the change log on another connection holding no green lock
//!    (`fence::fence_blue`, within `--fence-timeout`);
//! 2. lock the green tables `SHARE ROW EXCLUSIVE` (their triggers are created), check the log
//!    is empty and no sync failure stands;
//! 3. the reverse triggers on green, the post-cutover bodies of the forward triggers, generated
//!    keys interleaved (blue's and green's sequences step by the same increment from disjoint
//!    residues, past every value either side used or cached);
//! 4. record every `search_path` setting of the database and its roles exactly as stored, set
//!    green first for the database and the roles that override it, phase `cut_over`; commit.
//!
//! Rollback mirrors it: lock green `EXCLUSIVE` (no green write in flight), pause the appliers,
//! check that nothing changed the settings since the cutover, restore each byte for byte and
//! compare, forward bodies back to live (marking their green writes with the loop guard), the
//! reverse triggers to their giving-way bodies, phase `rolled_back`; commit. Blue already holds
//! every write made on green (reverse sync ran in the writers' own transactions), so nothing has
//! to be drained for a lossless rollback; the change log the old sessions left is the follower's
//! as before the cutover.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection, Row};

use super::fence::{NotHeld, fence_blue};
use crate::control::writers::{BlueWriter, blue_writers, terminate_blue_writers};
use crate::control::{self, Phase, changes, events, runs};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::locking::{attempt_timeout_ms, blockers, deadlock_timeout_ms, is_transient};
use crate::pg::{db_error, exec};
use crate::plan::cutover::{Previous, Stored, flip_targets, restore_statement, set_statement};
use crate::plan::sync::{Reversal, Stage, forward_trigger_function, reversals, sync_entries};
use crate::plan::{Verdict, reverse::reverse_plan};
use crate::sql::{Ident, QName, join, sql};

/// What `cutover` was asked.
#[derive(Clone, Debug)]
pub struct CutoverOptions {
    pub max_validation_age: Duration,
    pub accept_lossy_rollback: bool,
    pub roles: Vec<String>,
    pub refuse_old_writes: bool,
    pub fence_timeout: Duration,
    pub lock_timeout_ms: u64,
    /// A transaction older than this holding a lock on a blue table refuses the cutover.
    pub max_transaction_age: Duration,
    pub attempts: u32,
}

/// A gate that refused (exit 1), with what to do.
#[derive(Clone, Debug, Serialize)]
pub struct Refusal {
    pub gate: &'static str,
    pub reason: String,
    pub hint: String,
}

fn refusal(gate: &'static str, reason: impl Into<String>, hint: impl Into<String>) -> Refusal {
    Refusal {
        gate,
        reason: reason.into(),
        hint: hint.into(),
    }
}

/// What a flip did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Flipped {
    /// Already in the target phase: nothing done.
    pub already: bool,
    /// How long the application's writes waited at most: from the locks granted to the commit.
    pub writes_blocked_ms: u128,
    pub attempts: u32,
    /// Change-log rows applied inside the fence.
    pub drained: i64,
    pub reverse_triggers: Vec<String>,
    pub sequences: Vec<String>,
    /// The settings altered, as they were.
    pub previous: Vec<Previous>,
    pub statements: Vec<String>,
}

/// The settings record kept in `runs.previous_search_path`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Record {
    targets: Vec<Previous>,
    /// Every `search_path` row before the flip and right after it: (role, in database, value).
    before: Vec<(Option<String>, bool, String)>,
    after: Vec<(Option<String>, bool, String)>,
}

/// The server's own `search_path` (configuration file, `ALTER SYSTEM`), where this role may read
/// it; PostgreSQL's built-in default otherwise.
async fn server_search_path(conn: &mut PgConnection) -> Result<String, Diagnostic> {
    let readable: bool = sqlx::query_scalar(
        "SELECT pg_catalog.has_table_privilege('pg_catalog.pg_file_settings', 'SELECT')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if readable {
        let v: Option<String> = sqlx::query_scalar(
            "SELECT setting FROM pg_catalog.pg_file_settings WHERE name = 'search_path' AND applied ORDER BY seqno DESC LIMIT 1",
        )
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?;
        if let Some(v) = v {
            return Ok(v);
        }
    }
    Ok(crate::plan::cutover::DEFAULT_PATH.to_string())
}

/// The `search_path` rows of `pg_db_role_setting` that apply in this database.
async fn stored_settings(conn: &mut PgConnection) -> Result<Vec<Stored>, Diagnostic> {
    let rows = sqlx::query(
        "SELECT r.rolname::text AS role, s.setdatabase <> 0 AS in_database, pg_catalog.substr(cfg, 13) AS value
         FROM pg_catalog.pg_db_role_setting s
         LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
         CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS cfg
         WHERE s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()))
           AND cfg LIKE 'search\\_path=%'
         ORDER BY 1 NULLS FIRST, 2",
    )
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|r| Stored {
            role: r.get("role"),
            in_database: r.get("in_database"),
            value: r.get("value"),
        })
        .collect())
}

fn as_tuples(s: &[Stored]) -> Vec<(Option<String>, bool, String)> {
    s.iter()
        .map(|x| (x.role.clone(), x.in_database, x.value.clone()))
        .collect()
}

fn describe(rows: &[(Option<String>, bool, String)]) -> String {
    if rows.is_empty() {
        return "(none)".into();
    }
    rows.iter()
        .map(|(r, db, v)| {
            format!(
                "{}{}: {v}",
                r.as_deref().unwrap_or("database"),
                if *db { "" } else { " (all databases)" }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The entries a rollback would lose green writes of (no reverse trigger carries them).
pub fn lossy_entries(m: &Mapping, cat: &crate::catalog::Catalog) -> Vec<(String, Verdict)> {
    let entries = sync_entries(m, cat);
    let rev: Vec<String> = reversals(m, &entries, cat)
        .into_iter()
        .map(|r| r.entry)
        .collect();
    m.tables
        .iter()
        .filter(|e| !rev.contains(&e.name))
        .map(|e| {
            let v = reverse_plan(m, e, cat).verdict;
            // Invertible but without a usable blue key is still lossy.
            (
                e.name.clone(),
                if v == Verdict::Invertible {
                    Verdict::Lossy
                } else {
                    v
                },
            )
        })
        .collect()
}

/// The gates of `cutover`, with no lock held. Empty: every gate passed.
pub async fn cutover_gates(
    conn: &mut PgConnection,
    m: &Mapping,
    o: &CutoverOptions,
) -> Result<Vec<Refusal>, Diagnostic> {
    let mut out = Vec::new();
    let phase = runs::phase(conn, m).await?;
    if phase == Phase::CutOver {
        // Already there (a re-run after a crash or a success): `cutover` says so.
        return Ok(out);
    }
    if !matches!(phase, Phase::Live | Phase::RolledBack) {
        out.push(refusal(
            "phase",
            format!("migration {} is in phase {phase}", m.migration),
            "cutover follows a finished copy (phase live) or a rollback; see `bluegreen status`",
        ));
        return Ok(out);
    }
    if let Err(d) = runs::check_mapping(conn, m).await {
        out.push(refusal("mapping", d.message, d.hint.unwrap_or_default()));
    }
    if let Err(d) = runs::check_drift(conn, m).await {
        out.push(refusal("drift", d.message, d.hint.unwrap_or_default()));
    }
    // A passing validation of this exact mapping, recent enough.
    let last = control::statement(
        m,
        "SELECT passed, mapping_digest, extract(epoch FROM now() - at)::float8 AS age, id, coalesce(snapshot_lsn::pg_catalog.pg_lsn < (SELECT max((e.detail ->> 'lsn')::pg_catalog.pg_lsn) FROM {events} AS e WHERE e.migration = $1 AND e.command = 'rollback' AND e.outcome = 'rolled_back'), false) AS before_rollback FROM {validations} WHERE migration = $1 ORDER BY id DESC LIMIT 1",
    );
    let row = sqlx::query(last.assert_safe())
        .bind(&m.migration)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?;
    match row {
        None => out.push(refusal(
            "validation",
            "no validation has run",
            "run `bluegreen validate` and cut over while it is fresh",
        )),
        Some(r) => {
            let passed: bool = r.get("passed");
            let digest: String = r.get("mapping_digest");
            let age: f64 = r.get("age");
            let id: i64 = r.get("id");
            if !passed {
                out.push(refusal(
                    "validation",
                    format!("the last validation (#{id}) found differences"),
                    "fix them (see its report), validate again, then cut over",
                ));
            } else if digest != m.digest() {
                out.push(refusal(
                    "validation",
                    format!("the last validation (#{id}) checked another version of the mapping"),
                    "validate this mapping, then cut over",
                ));
            } else if r.get::<bool, _>("before_rollback") {
                // Third hostile review, finding 6: after a rollback green can part from
                // M(blue) with nothing pending (a blue trigger rewriting what a reverse wrote),
                // and the fence re-checks only the keys it drains.
                out.push(refusal(
                    "validation",
                    format!("the last validation (#{id}) ran before the last rollback"),
                    "validate again (green after a rollback is what the next cutover moves to), then cut over",
                ));
            } else if age > o.max_validation_age.as_secs_f64() {
                out.push(refusal(
                    "validation",
                    format!(
                        "the last validation (#{id}) is {:.0} s old, older than --max-validation-age ({} s)",
                        age,
                        o.max_validation_age.as_secs()
                    ),
                    "validate again, or raise --max-validation-age",
                ));
            }
        }
    }
    let (failures, _) = changes::failures(conn, m, 0).await?;
    let failed_changes = changes::set_aside(conn, m).await?;
    let reverse = reverse_failures(conn, m).await?;
    if failures + failed_changes + reverse > 0 {
        out.push(refusal(
            "sync failures",
            format!("{failures} key(s) and {failed_changes} change(s) failed to sync, {reverse} green write(s) to reach blue"),
            "see `bluegreen status`; fix the cause and run `bluegreen sync` until none is left",
        ));
    }
    let prepared: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_catalog.pg_prepared_xacts WHERE database = pg_catalog.current_database()",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if prepared > 0 {
        out.push(refusal(
            "prepared transactions",
            format!("{prepared} prepared transaction(s) in this database (their writes commit later, outside any fence)"),
            "COMMIT PREPARED or ROLLBACK PREPARED them first (pg_prepared_xacts)",
        ));
    }
    let tables: Vec<String> = m.blue_tables_read().iter().map(|q| q.to_string()).collect();
    let old: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT pg_catalog.format('pid %s (%s, %s s, %s)', a.pid, a.state, extract(epoch FROM now() - a.xact_start)::int8, pg_catalog.left(a.query, 60))
         FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
         WHERE l.relation = ANY (SELECT pg_catalog.to_regclass(n)::oid FROM pg_catalog.unnest($1::text[]) n)
           AND a.pid <> pg_catalog.pg_backend_pid() AND a.xact_start < now() - pg_catalog.make_interval(secs => $2)",
    )
    .bind(&tables)
    .bind(o.max_transaction_age.as_secs_f64())
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    if !old.is_empty() {
        out.push(refusal(
            "long transactions",
            format!(
                "transactions older than {} s hold locks on blue tables: {}",
                o.max_transaction_age.as_secs(),
                old.join("; ")
            ),
            "let them finish or end them (pg_terminate_backend(pid)); the fence would wait for them",
        ));
    }
    // Privileges: ALTER DATABASE needs the owner (or a superuser); ALTER ROLE ... IN DATABASE
    // needs CREATEROLE for another role.
    let can_db: bool = sqlx::query_scalar(
        "SELECT r.rolsuper OR pg_catalog.pg_has_role(d.datdba, 'MEMBER') FROM pg_catalog.pg_roles r, pg_catalog.pg_database d WHERE r.rolname = current_user AND d.datname = pg_catalog.current_database()",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if !can_db {
        out.push(refusal(
            "privileges",
            format!("{} cannot ALTER DATABASE (not its owner)", "this role"),
            "run cutover as the database owner or a superuser",
        ));
    }
    let stored = stored_settings(conn).await?;
    let server = server_search_path(conn).await?;
    let targets = flip_targets(&m.green, &m.blue, &stored, &o.roles, &server);
    for (p, _) in &targets {
        let Some(r) = &p.role else { continue };
        let ok: Option<bool> = sqlx::query_scalar(
            "SELECT me.rolsuper OR me.rolname = t.rolname OR (me.rolcreaterole AND NOT t.rolsuper) FROM pg_catalog.pg_roles me, pg_catalog.pg_roles t WHERE me.rolname = current_user AND t.rolname = $1",
        )
        .bind(r)
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_error)?;
        match ok {
            None => out.push(refusal(
                "roles",
                format!("role {r} (given with --role) does not exist"),
                "check the name",
            )),
            Some(false) => out.push(refusal(
                "privileges",
                format!("this role cannot ALTER ROLE {r}"),
                "run cutover as a superuser or a role with CREATEROLE",
            )),
            Some(true) => {}
        }
    }
    let m = runs::resolved_mapping(conn, m).await?;
    let cat = control::load_catalog_for_sync(conn, &m).await?;
    let lossy = lossy_entries(&m, &cat);
    if !lossy.is_empty() && !o.accept_lossy_rollback {
        out.push(refusal(
            "lossy rollback",
            format!(
                "a rollback would lose the writes made on green to: {}",
                lossy
                    .iter()
                    .map(|(e, v)| format!("{e} (reverse {v})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "add `reverse:` expressions for them, or accept with --accept-lossy-rollback",
        ));
    }
    // Blue keys a green write could not find again (a text id not in the form its uuid casts
    // back to): every green write to such a row would miss blue after the flip.
    let entries = crate::plan::sync::sync_entries(&m, &cat);
    let reversed = crate::plan::sync::reversals(&m, &entries, &cat);
    for e in entries
        .iter()
        .filter(|e| reversed.iter().any(|r| r.entry == e.entry.name))
    {
        let Some(bt) = cat.table(e.driving()) else {
            continue;
        };
        let Some(q) = crate::plan::sync::key_round_trip_example(e, bt, &bt.qname().to_string())
        else {
            continue;
        };
        let found: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(q))
            .fetch_optional(&mut *conn)
            .await
            .map_err(db_error)?;
        if let Some(k) = found {
            out.push(refusal(
                "keys",
                format!(
                    "{} holds keys that do not come back from green as they are (e.g. {}): {} is keyed by their cast, and a green write to such a row could not find it in blue",
                    bt.qname().display(),
                    crate::sql::Literal::new(&k),
                    e.entry.name
                ),
                "rewrite those keys in the form the cast gives back (for text uuids: SET id = id::uuid::text, with the foreign keys that reference them), then cut over",
            ));
        }
    }
    Ok(out)
}

/// A blue column, and the green columns it fills: (table, column) each.
type SequenceGroup = (QName, String, Vec<(QName, String)>);

/// The sequences to interleave: per blue sequence behind a column an entry maps plainly, the
/// green sequences behind the green columns it fills.
fn sequence_groups(m: &Mapping, cat: &crate::catalog::Catalog) -> Vec<SequenceGroup> {
    let mut out: Vec<SequenceGroup> = Vec::new();
    for e in &m.tables {
        let d = e.from_clause.driving();
        for c in &e.columns {
            if c.value_map.is_some() {
                continue;
            }
            let Some(b) = crate::plan::keys::plain_column_of(&c.expr.text, &d.alias) else {
                continue;
            };
            if cat.table(&d.table).and_then(|t| t.column(&b)).is_none() {
                continue;
            }
            let g = (QName::new(&m.green, &e.name), c.name.clone());
            match out
                .iter_mut()
                .find(|(t, col, _)| *t == d.table && *col == b)
            {
                Some((_, _, gs)) => gs.push(g),
                None => out.push((d.table.clone(), b, vec![g])),
            }
        }
    }
    out
}

/// Interleave generated keys: for a blue column with a sequence and the green columns with
/// sequences it fills, `k` sequences in all, every one steps by `k` from its own residue past the
/// highest value any of them used, cached or stored. Returns what was done.
async fn interleave(
    tx: &mut PgConnection,
    m: &Mapping,
    cat: &crate::catalog::Catalog,
) -> Result<Vec<String>, Diagnostic> {
    sequences(tx, m, cat, false).await
}

/// `finalize`: every sequence `interleave` touched back to plain increments, past every value
/// used or cached.
pub async fn plain_sequences(
    tx: &mut PgConnection,
    m: &Mapping,
    cat: &crate::catalog::Catalog,
) -> Result<Vec<String>, Diagnostic> {
    sequences(tx, m, cat, true).await
}

async fn sequences(
    tx: &mut PgConnection,
    m: &Mapping,
    cat: &crate::catalog::Catalog,
    plain: bool,
) -> Result<Vec<String>, Diagnostic> {
    let mut done = Vec::new();
    for (bt, bc, greens) in sequence_groups(m, cat) {
        let seq_of = async |tx: &mut PgConnection,
                            t: &QName,
                            c: &str|
               -> Result<Option<QName>, Diagnostic> {
            let row = sqlx::query(
                // Owned (serial, identity), or else the sequence the column's default calls
                // (`nextval('s')` on a sequence owned by nothing).
                "SELECT n.nspname::text AS s, c.relname::text AS r FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = COALESCE(pg_catalog.pg_get_serial_sequence($1, $2)::pg_catalog.regclass::pg_catalog.oid, (SELECT d.refobjid FROM pg_catalog.pg_attrdef ad JOIN pg_catalog.pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND d.objid = ad.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass JOIN pg_catalog.pg_class q ON q.oid = d.refobjid AND q.relkind = 'S' WHERE ad.adrelid = $1::pg_catalog.regclass AND a.attname = $2 LIMIT 1))",
            )
            .bind(t.to_string())
            .bind(c)
            .fetch_optional(tx)
            .await
            .map_err(db_error)?;
            Ok(row.map(|r| QName::new(r.get::<String, _>("s"), r.get::<String, _>("r"))))
        };
        let Some(bseq) = seq_of(tx, &bt, &bc).await? else {
            continue;
        };
        let mut members = vec![(bt.clone(), bc.clone(), bseq)];
        for (gt, gc) in greens {
            if let Some(s) = seq_of(tx, &gt, &gc).await?
                && !members.iter().any(|(_, _, x)| *x == s)
            {
                members.push((gt, gc, s));
            }
        }
        if members.len() < 2 {
            continue;
        }
        let k = members.len() as i64;
        // The highest value used anywhere: stored in a column, or handed out (cached included:
        // `last_value` counts every value a session's cache took).
        let mut high: i64 = 0;
        for (t, c, s) in &members {
            let v: Option<i64> = sqlx::query_scalar(
                sql!("SELECT pg_catalog.max({})::int8 FROM {t}", Ident::new(c)).assert_safe(),
            )
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
            let last: Option<i64> = sqlx::query_scalar(
                "SELECT last_value FROM pg_catalog.pg_sequences WHERE schemaname = $1 AND sequencename = $2",
            )
            .bind(&s.schema)
            .bind(&s.name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?
            .flatten();
            high = high.max(v.unwrap_or(0)).max(last.unwrap_or(0));
        }
        if plain {
            for (_, _, s) in &members {
                let start = high + 1;
                exec(
                    tx,
                    &sql!("ALTER SEQUENCE {s} INCREMENT BY 1 RESTART WITH {start}"),
                )
                .await?;
                done.push(format!("{}: from {start} by 1", s.display()));
            }
            continue;
        }
        // The first multiple of k above high, then one residue each.
        let base = (high / k + 1) * k;
        for (i, (_, _, s)) in members.iter().enumerate() {
            let start = base + i as i64;
            exec(
                tx,
                &sql!("ALTER SEQUENCE {s} INCREMENT BY {k} RESTART WITH {start}"),
            )
            .await?;
            done.push(format!("{}: from {start} by {k}", s.display()));
        }
    }
    Ok(done)
}

fn record_of(v: Option<String>) -> Option<Record> {
    v.and_then(|v| serde_json::from_str(&v).ok())
}

/// `cutover`, after its gates passed.
pub async fn cutover(url: &str, m: &Mapping, o: &CutoverOptions) -> Result<Flipped, Diagnostic> {
    let mut conn = crate::pg::connect(url).await?;
    if runs::phase(&mut conn, m).await? == Phase::CutOver {
        return Ok(Flipped {
            already: true,
            ..Flipped::default()
        });
    }
    let m = &runs::resolved_mapping(&mut conn, m).await?;
    let plan = super::plan(&mut conn, m).await?;
    // Catch up before the fence, with writes going on: what the fence drains is then only what
    // was logged since (a lookup renamed just before, touching thousands of keys, is applied
    // here and not while writes wait; design review H5).
    let caught = async {
        let before = super::drain(&mut conn, m, &plan).await?;
        let marked = super::apply::rederive_marked(&mut conn, m, &plan).await?;
        Ok::<_, Diagnostic>((before, marked))
    }
    .await;
    let (before, marked) = match caught {
        // Another cutover committed meanwhile.
        Err(d)
            if d.code == "phase-changed" && runs::phase(&mut conn, m).await? == Phase::CutOver =>
        {
            return Ok(Flipped {
                already: true,
                ..Flipped::default()
            });
        }
        r => r?,
    };
    if before.changes + marked.keys > 0 {
        eprintln!(
            "bluegreen: cutover: caught up {} change(s) and {} key(s) before the fence",
            before.changes, marked.keys
        );
    }
    let cat = control::load_catalog_for_sync(&mut conn, m).await?;
    let entries = sync_entries(m, &cat);
    let revs: Vec<Reversal> = reversals(m, &entries, &cat);
    let reversed: Vec<String> = revs.iter().map(|r| r.entry.clone()).collect();
    let mut greens: Vec<QName> = m
        .tables
        .iter()
        .map(|e| QName::new(&m.green, &e.name))
        .collect();
    greens.sort();
    let deadlock = deadlock_timeout_ms(&mut conn).await?;
    let wait = attempt_timeout_ms(o.lock_timeout_ms, deadlock).min(100);
    let mut delay = Duration::from_millis(50);
    for attempt in 1..=o.attempts {
        let (mut f, granted) = match fence_blue(
            url,
            m,
            &plan,
            o.lock_timeout_ms,
            o.fence_timeout,
            Some(&[Phase::Live, Phase::RolledBack]),
        )
        .await?
        {
            Ok(held) => held,
            Err(NotHeld::Moved(Phase::CutOver)) => {
                return Ok(Flipped {
                    already: true,
                    ..Flipped::default()
                });
            }
            Err(NotHeld::Moved(p)) => {
                return Err(Diagnostic::error(
                    "phase-changed",
                    format!(
                        "migration {} moved to phase {p} while cutover waited for its fence; nothing was changed",
                        m.migration
                    ),
                ));
            }
            Err(why) => {
                if attempt == o.attempts {
                    let who = blockers(&mut conn, &m.blue_tables_read())
                        .await
                        .unwrap_or_default();
                    return Err(Diagnostic::error(
                            "fence-refused",
                            format!(
                                "cutover gave up after {attempt} attempt(s): {}; nothing was changed{}",
                                match why {
                                    NotHeld::NotDrained => "the change log did not drain within --fence-timeout",
                                    _ => "the blue tables could not be locked in time",
                                },
                                if who.is_empty() { String::new() } else { format!("; in the way: {}", who.join("; ")) }
                            ),
                        )
                        .hint("run `bluegreen sync` (or keep a follower running) so little is pending, end long transactions, then re-run"));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        match fence_rest(
            &mut f, m, o, &cat, &entries, &revs, &reversed, &greens, wait,
        )
        .await
        {
            Ok(mut flipped) => {
                exec(&mut f, &sql!("COMMIT")).await?;
                flipped.writes_blocked_ms = granted.elapsed().as_millis();
                flipped.attempts = attempt;
                let _ = f.close().await;
                if let Err(d) = events::record(
                    &mut conn,
                    m,
                    "cutover",
                    "cut_over",
                    serde_json::json!({"writes_blocked_ms": flipped.writes_blocked_ms, "attempts": attempt, "reverse_triggers": flipped.reverse_triggers, "sequences": flipped.sequences, "refuse_old_writes": o.refuse_old_writes}),
                )
                .await
                {
                    eprintln!("bluegreen: warning: cut over, but the audit event was not recorded: {}", d.message);
                }
                return Ok(flipped);
            }
            Err(d) if is_transient(&d) && attempt < o.attempts => {
                let _ = exec(&mut f, &sql!("ROLLBACK")).await;
                eprintln!(
                    "bluegreen: cutover: lock not granted in time inside the fence (attempt {attempt}/{}); retrying",
                    o.attempts
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(d) => {
                let _ = exec(&mut f, &sql!("ROLLBACK")).await;
                return Err(d);
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// Steps 2 to 4 of the fence, inside its transaction.
#[allow(clippy::too_many_arguments)]
async fn fence_rest(
    f: &mut PgConnection,
    m: &Mapping,
    o: &CutoverOptions,
    cat: &crate::catalog::Catalog,
    entries: &[crate::plan::sync::SyncEntry<'_>],
    revs: &[Reversal],
    reversed: &[String],
    greens: &[QName],
    wait_ms: u64,
) -> Result<Flipped, Diagnostic> {
    exec(f, &sql!("SET LOCAL lock_timeout = '{wait_ms}ms'")).await?;
    exec(
        f,
        &sql!(
            "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
            join(greens.iter(), ", ")
        ),
    )
    .await?;
    let left: i64 = sqlx::query_scalar(changes::pending_work(m).assert_safe())
        .bind(&m.migration)
        .fetch_one(&mut *f)
        .await
        .map_err(db_error)?;
    let (failures, _) = changes::failures(f, m, 0).await?;
    let set_aside = changes::set_aside(f, m).await?;
    // A green straggler's write (after a rollback) whose reverse failed, committed after the
    // gates ran (third hostile review, finding 8): the green tables are locked now, so none can
    // be added until the flip commits.
    let failed = failures + set_aside + reverse_failures(f, m).await?;
    if left > 0 || failed > 0 {
        return Err(Diagnostic::error(
            "fence-not-clean",
            format!("inside the fence {left} change(s) are still pending and {failed} key(s) failed (forward or reverse); nothing was changed"),
        )
        .hint("run `bluegreen sync` and see `bluegreen status`, then re-run"));
    }
    let mut flipped = Flipped::default();
    for r in revs {
        exec(f, &r.function(m, false)).await?;
        for t in r.triggers(m) {
            exec(f, &t).await?;
        }
        flipped.reverse_triggers.push(r.green.display());
    }
    let stage = Stage::CutOver {
        refuse_old_writes: o.refuse_old_writes,
    };
    for (n, x) in m.blue_tables_read().iter().enumerate() {
        exec(
            f,
            &forward_trigger_function(m, entries, x, cat.table(x), n, stage, reversed),
        )
        .await?;
    }
    flipped.sequences = interleave(f, m, cat).await?;
    let before = stored_settings(f).await?;
    let database: String = sqlx::query_scalar("SELECT pg_catalog.current_database()::text")
        .fetch_one(&mut *f)
        .await
        .map_err(db_error)?;
    let server = server_search_path(f).await?;
    let targets = flip_targets(&m.green, &m.blue, &before, &o.roles, &server);
    for (p, elements) in &targets {
        let s = set_statement(&database, p.role.as_deref(), elements);
        exec(f, &s).await?;
        flipped.statements.push(s.into_string());
        flipped.previous.push(p.clone());
    }
    let after = stored_settings(f).await?;
    let record = Record {
        targets: targets.into_iter().map(|(p, _)| p).collect(),
        before: as_tuples(&before),
        after: as_tuples(&after),
    };
    sqlx::query(
        control::statement(
            m,
            "UPDATE {runs} SET previous_search_path = $2::jsonb, cutover_at = now(), refuse_old_writes = $3 WHERE migration = $1",
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .bind(serde_json::to_string(&record).expect("serialisable"))
    .bind(o.refuse_old_writes)
    .execute(&mut *f)
    .await
    .map_err(db_error)?;
    runs::set_phase(f, m, Phase::CutOver).await?;
    Ok(flipped)
}

/// What `rollback` was asked.
#[derive(Clone, Debug)]
pub struct RollbackOptions {
    pub lock_timeout_ms: u64,
    pub attempts: u32,
}

/// The gates of `rollback`.
pub async fn rollback_gates(
    conn: &mut PgConnection,
    m: &Mapping,
) -> Result<Vec<Refusal>, Diagnostic> {
    let mut out = Vec::new();
    let phase = runs::phase(conn, m).await?;
    if phase != Phase::CutOver {
        if phase != Phase::RolledBack {
            out.push(refusal(
                "phase",
                format!(
                    "migration {} is in phase {phase}: nothing to roll back",
                    m.migration
                ),
                "rollback follows a cutover; see `bluegreen status`",
            ));
        }
        return Ok(out);
    }
    if let Err(d) = runs::check_drift(conn, m).await {
        out.push(refusal("drift", d.message, d.hint.unwrap_or_default()));
    }
    let failed = reverse_failures(conn, m).await?;
    if failed > 0 {
        out.push(refusal(
            "reverse failures",
            format!("{failed} green write(s) did not reach blue (see `bluegreen status`): a rollback now would lose them"),
            "fix the cause (a value blue's type cannot hold, a blue constraint) and run `bluegreen sync` until none is left",
        ));
    }
    Ok(out)
}

/// `rollback`, after its gates passed.
pub async fn rollback(url: &str, m: &Mapping, o: &RollbackOptions) -> Result<Flipped, Diagnostic> {
    let mut conn = crate::pg::connect(url).await?;
    if runs::phase(&mut conn, m).await? == Phase::RolledBack {
        return Ok(Flipped {
            already: true,
            ..Flipped::default()
        });
    }
    let m = &runs::resolved_mapping(&mut conn, m).await?;
    let cat = control::load_catalog_for_sync(&mut conn, m).await?;
    let entries = sync_entries(m, &cat);
    let revs = reversals(m, &entries, &cat);
    let reversed: Vec<String> = revs.iter().map(|r| r.entry.clone()).collect();
    let mut greens: Vec<QName> = m
        .tables
        .iter()
        .map(|e| QName::new(&m.green, &e.name))
        .collect();
    greens.sort();
    let deadlock = deadlock_timeout_ms(&mut conn).await?;
    let wait = attempt_timeout_ms(o.lock_timeout_ms, deadlock).min(100);
    let mut delay = Duration::from_millis(50);
    let database: String = sqlx::query_scalar("SELECT pg_catalog.current_database()::text")
        .fetch_one(&mut conn)
        .await
        .map_err(db_error)?;
    for attempt in 1..=o.attempts {
        let mut tx = conn.begin().await.map_err(db_error)?;
        let result = async {
            // The appliers first (as the cutover fence): a follower holding their lock shared
            // while it writes green would otherwise wait for this fence's green lock while the
            // fence waits for it.
            sqlx::query("SELECT pg_catalog.pg_advisory_xact_lock($1)")
                .bind(crate::names::appliers_lock(&m.migration))
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            exec(&mut tx, &sql!("SET LOCAL lock_timeout = '{wait}ms'")).await?;
            exec(
                &mut tx,
                &sql!("LOCK TABLE {} IN EXCLUSIVE MODE", join(greens.iter(), ", ")),
            )
            .await?;
            let granted = Instant::now();
            match runs::phase(&mut tx, m).await? {
                Phase::CutOver => {}
                Phase::RolledBack => {
                    return Ok((
                        Flipped {
                            already: true,
                            ..Flipped::default()
                        },
                        granted,
                    ));
                }
                p => {
                    return Err(Diagnostic::error(
                        "phase-changed",
                        format!("migration {} moved to phase {p} while rollback waited; nothing was changed", m.migration),
                    ));
                }
            }
            // Inside the fence: a green writer's reverse failure committed while the gates ran.
            let failed = reverse_failures(&mut tx, m).await?;
            if failed > 0 {
                return Err(Diagnostic::error(
                    "reverse-failures",
                    format!("{failed} green write(s) did not reach blue (see `bluegreen status`); nothing was changed"),
                )
                .hint("fix the cause and run `bluegreen sync` until none is left, then roll back"));
            }
            let record: Option<String> = sqlx::query_scalar(
                control::statement(m, "SELECT previous_search_path::text FROM {runs} WHERE migration = $1")
                    .assert_safe(),
            )
            .bind(&m.migration)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
            let Some(record) = record_of(record) else {
                return Err(Diagnostic::error(
                    "no-settings-record",
                    "the cutover's record of the previous search_path settings is missing or unreadable; nothing was changed",
                )
                .hint("restore the settings by hand (ALTER DATABASE / ALTER ROLE ... SET search_path) if needed; see the cutover event in `bluegreen status`"));
            };
            let now = as_tuples(&stored_settings(&mut tx).await?);
            if now != record.after {
                return Err(Diagnostic::error(
                    "settings-changed",
                    format!(
                        "the search_path settings changed since the cutover set them; nothing was changed.\n  set by cutover: {}\n  now: {}",
                        describe(&record.after),
                        describe(&now)
                    ),
                )
                .hint("put them back as the cutover left them (or restore them by hand and finish with care), then re-run"));
            }
            let mut flipped = Flipped::default();
            for p in &record.targets {
                let s = restore_statement(&database, p);
                exec(&mut tx, &s).await?;
                flipped.statements.push(s.into_string());
                flipped.previous.push(p.clone());
            }
            let restored = as_tuples(&stored_settings(&mut tx).await?);
            if restored != record.before {
                return Err(Diagnostic::error(
                    "settings-not-restored",
                    format!(
                        "restoring the search_path settings would not give back what was there before the cutover; nothing was changed.\n  before: {}\n  restored: {}",
                        describe(&record.before),
                        describe(&restored)
                    ),
                ));
            }
            for (n, x) in m.blue_tables_read().iter().enumerate() {
                exec(
                    &mut tx,
                    &forward_trigger_function(m, &entries, x, cat.table(x), n, Stage::RolledBack, &reversed),
                )
                .await?;
            }
            for r in &revs {
                exec(&mut tx, &r.function(m, true)).await?;
                flipped.reverse_triggers.push(r.green.display());
            }
            // Entries without a reverse were insert-only while green was the application's:
            // re-derived whole, green = M(blue) again (their green writes are the accepted loss).
            // So are reversed entries with a column computed from others (its green value was
            // not recomputed when the application wrote the columns it reads).
            let computed =
                |e: &crate::mapping::TableEntry| !crate::plan::keys::computed_columns(e).is_empty();
            for e in m
                .tables
                .iter()
                .filter(|e| !reversed.contains(&e.name) || computed(e))
            {
                sqlx::query(
                    control::statement(m, "INSERT INTO {rederive} (migration, green_table) VALUES ($1, $2) ON CONFLICT (migration, green_table) DO UPDATE SET requested_at = pg_catalog.clock_timestamp()")
                        .assert_safe(),
                )
                .bind(&m.migration)
                .bind(&e.name)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            }
            sqlx::query(
                control::statement(m, "UPDATE {runs} SET rollback_at = now() WHERE migration = $1")
                    .assert_safe(),
            )
            .bind(&m.migration)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            runs::set_phase(&mut tx, m, Phase::RolledBack).await?;
            Ok::<_, Diagnostic>((flipped, granted))
        }
        .await;
        match result {
            Ok((flipped, _)) if flipped.already => {
                tx.commit().await.map_err(db_error)?;
                return Ok(flipped);
            }
            Ok((mut flipped, granted)) => {
                tx.commit().await.map_err(db_error)?;
                flipped.writes_blocked_ms = granted.elapsed().as_millis();
                flipped.attempts = attempt;
                // Where the WAL was once the rollback had committed: a validation whose snapshot
                // is older proves nothing about the rows written around it (the cutover gate).
                let lsn: Option<String> =
                    sqlx::query_scalar("SELECT pg_catalog.pg_current_wal_lsn()::pg_catalog.text")
                        .fetch_one(&mut conn)
                        .await
                        .ok();
                if let Err(d) = events::record(
                    &mut conn,
                    m,
                    "rollback",
                    "rolled_back",
                    serde_json::json!({"writes_blocked_ms": flipped.writes_blocked_ms, "attempts": attempt, "lsn": lsn}),
                )
                .await
                {
                    eprintln!("bluegreen: warning: rolled back, but the audit event was not recorded: {}", d.message);
                }
                return Ok(flipped);
            }
            Err(d) if is_transient(&d) && attempt < o.attempts => {
                let _ = tx.rollback().await;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(d) if is_transient(&d) => {
                let _ = tx.rollback().await;
                let who = blockers(&mut conn, &greens).await.unwrap_or_default();
                return Err(Diagnostic::error(
                    "fence-refused",
                    format!(
                        "rollback gave up after {attempt} attempt(s): the green tables could not be locked in time; nothing was changed{}",
                        if who.is_empty() { String::new() } else { format!("; in the way: {}", who.join("; ")) }
                    ),
                )
                .hint("end long transactions on green, then re-run"));
            }
            Err(d) => {
                let _ = tx.rollback().await;
                return Err(d);
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// A connection pooler in front of the database, seen by its application name: poolers in
/// transaction mode keep server connections (and their `search_path`) across the flip.
pub async fn pooler_suspected(conn: &mut PgConnection) -> Result<Vec<String>, Diagnostic> {
    sqlx::query_scalar(
        "SELECT DISTINCT a.application_name FROM pg_catalog.pg_stat_activity a WHERE a.datname = pg_catalog.current_database() AND a.application_name ~* '(pgbouncer|odyssey|pgcat|pgpool|supavisor)'",
    )
    .fetch_all(conn)
    .await
    .map_err(db_error)
}

/// After the flip: how the sessions still on blue drained.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Drained {
    pub waited_ms: u128,
    /// Blue writers still seen (within the quiet window) when the wait ended.
    pub still_writing: Vec<BlueWriter>,
    pub terminated: i64,
}

/// A session that has not written blue for this long counts as drained.
pub const QUIET: Duration = Duration::from_secs(2);

/// Wait until no session has written blue for [`QUIET`], at most `timeout`; then, with
/// `terminate`, end the ones still writing.
pub async fn drain_blue_writers(
    conn: &mut PgConnection,
    m: &Mapping,
    timeout: Duration,
    terminate: bool,
) -> Result<Drained, Diagnostic> {
    let start = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let seen = blue_writers(conn, m, QUIET).await?;
        let alive: Vec<BlueWriter> = seen.into_iter().filter(|w| w.alive).collect();
        if alive.is_empty() || start.elapsed() >= timeout {
            let mut d = Drained {
                waited_ms: start.elapsed().as_millis(),
                still_writing: alive,
                terminated: 0,
            };
            if terminate && !d.still_writing.is_empty() {
                d.terminated = terminate_blue_writers(conn, m, QUIET).await?;
            }
            return Ok(d);
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "bluegreen: {} session(s) still write blue ({:.0} s of {} s)",
                alive.len(),
                start.elapsed().as_secs_f64(),
                timeout.as_secs()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reverse failures of this migration (green writes that did not reach blue).
pub async fn reverse_failures(conn: &mut PgConnection, m: &Mapping) -> Result<i64, Diagnostic> {
    sqlx::query_scalar(
        control::statement(
            m,
            "SELECT count(*) FROM {reverse_failures} WHERE migration = $1",
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_one(conn)
    .await
    .map_err(db_error)
}

/// `sync`: retry the green keys whose reverse failed, each in a transaction of its own marked as
/// that entry's reverse (the forward echo re-derives the other entries, not that one). Returns
/// (fixed, left).
pub async fn retry_reverse(conn: &mut PgConnection, m: &Mapping) -> Result<(i64, i64), Diagnostic> {
    if !matches!(
        runs::phase(conn, m).await?,
        Phase::CutOver | Phase::RolledBack
    ) {
        return Ok((0, 0));
    }
    let cat = control::load_catalog_for_sync(conn, m).await?;
    let entries = sync_entries(m, &cat);
    let revs = reversals(m, &entries, &cat);
    let rows = sqlx::query(
        control::statement(
            m,
            "SELECT green_table, green_key::text AS raw, failed_at::text AS at, ARRAY(SELECT x FROM pg_catalog.jsonb_array_elements_text(green_key) WITH ORDINALITY AS t(x, n) ORDER BY n) AS k FROM {reverse_failures} WHERE migration = $1 ORDER BY failed_at LIMIT 1000",
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    let mut fixed = 0;
    for r in rows {
        let entry: String = r.get("green_table");
        let raw: String = r.get("raw");
        let key: Vec<String> = r.get("k");
        let at: String = r.get("at");
        let Some(rev) = revs.iter().find(|x| x.entry == entry) else {
            continue;
        };
        let attempt = async {
            exec(conn, &sql!("BEGIN")).await?;
            sqlx::query("SELECT pg_catalog.set_config($1, $2, true)")
                .bind(crate::names::guard_setting(&m.migration))
                .bind(format!("r:0:{entry}"))
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
            // The green row first (a green writer in flight commits first; its reverse then ran).
            sqlx::query(rev.lock_green().assert_safe())
                .bind(&key)
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
            sqlx::query(rev.retry().assert_safe())
                .bind(&key)
                .execute(&mut *conn)
                .await
                .map_err(|e| crate::pg::db_error_in(e, &rev.retry()))?;
            sqlx::query(
                control::statement(
                    m,
                    // Only the failure as read: a newer one (the key failed again meanwhile) stays.
                    "DELETE FROM {reverse_failures} WHERE migration = $1 AND green_table = $2 AND green_key = $3::jsonb AND failed_at = $4::timestamptz",
                )
                .assert_safe(),
            )
            .bind(&m.migration)
            .bind(&entry)
            .bind(&raw)
            .bind(&at)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
            exec(conn, &sql!("COMMIT")).await
        }
        .await;
        match attempt {
            Ok(()) => fixed += 1,
            Err(d) => {
                let _ = exec(conn, &sql!("ROLLBACK")).await;
                sqlx::query(
                    control::statement(
                        m,
                        "UPDATE {reverse_failures} SET error = $4, failed_at = now() WHERE migration = $1 AND green_table = $2 AND green_key = $3::jsonb",
                    )
                    .assert_safe(),
                )
                .bind(&m.migration)
                .bind(&entry)
                .bind(&raw)
                .bind(format!(
                    "{}: {}",
                    d.sqlstate().unwrap_or(""),
                    d.message.lines().next().unwrap_or("")
                ))
                .execute(&mut *conn)
                .await
                .map_err(db_error)?;
            }
        }
    }
    Ok((fixed, reverse_failures(conn, m).await?))
}
