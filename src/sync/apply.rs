//! The applier: re-derives the keys the change log touches, for the follower, `sync`, the
//! catch-up at the live switch and validate's re-checks (DESIGN.md, rules from the design review:
//! appliers).
//!
//! One batch is one READ COMMITTED transaction:
//! 1. claim change-log rows `FOR UPDATE SKIP LOCKED` (several appliers share the log; ids are not
//!    commit order, so rows are claimed and deleted by id, never up to a watermark);
//! 2. find the keys they touch, per entry (coalesced: a key touched by many changes is re-derived
//!    once); a row whose keys cannot even be found is set aside with its images as the failure;
//! 3. take the keys' stripes (advisory locks, bounded per transaction, in one sorted statement,
//!    so appliers serialise per key and never deadlock among themselves; the application never
//!    takes them);
//! 4. in new statements, so they see every commit before the locks: re-derive, upserts parents
//!    first, deletes children first, each entry in a savepoint; a failure is narrowed to its keys
//!    by halving and recorded with the database's error, never blocking the other keys;
//! 5. delete exactly the claimed rows, commit.
//!
//! Row-local entries (which writers re-derive in their own statements) are applied holding their
//! blue rows `FOR SHARE` and their green rows `FOR UPDATE` first, under a short `lock_timeout`: a
//! writer in flight on a key commits before the applier reads it, and none overwrites the
//! applier's work with older values. Blue before green is the writers' own order; a timeout (a
//! writer holding rows in another order) leaves the batch in the log for a later try.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use sqlx::{Connection, PgConnection, Row};

use crate::catalog::Catalog;
use crate::control::table;
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::names;
use crate::pg::{db_error, exec};
use crate::plan::sync::{ApplierEntry, sync_entries};
use crate::sql::{Literal, QName, Sql, sql};

/// One key: its sync-key column values as text (NULL as None).
pub type Key = Vec<Option<String>>;

/// Keys re-derived per transaction at most; a larger fan-out is split.
pub const KEYS_PER_TRANSACTION: usize = 2_000;
/// How long an apply may wait for a row lock, at most (a row-local entry's blue rows, which a
/// writer holds; any green row): below the server's `deadlock_timeout` too
/// (`Plan::lock_timeout_ms`), so in a lock cycle the applier gives way.
const ROW_LOCAL_LOCK_TIMEOUT_MS: u64 = 100;

/// What the applier runs, for a mapping and the catalog.
pub struct Plan {
    pub entries: Vec<ApplierEntry>,
    /// An apply's lock wait (ms), clamped below `deadlock_timeout`.
    pub lock_timeout_ms: u64,
    /// The applier of a fence, which holds blue writes and the other appliers off.
    pub fenced: bool,
    /// After cutover, the entries whose green writes reverse into blue: their green rows are
    /// locked before blue is read (a new session's write commits first, with its reversed blue
    /// row), and every other entry only inserts what green lacks. None before cutover.
    pub cut_over: Option<BTreeSet<String>>,
}

impl Plan {
    /// Refuses a mapping with an entry sync cannot key.
    pub fn new(m: &Mapping, cat: &Catalog) -> Result<Plan, Diagnostic> {
        let entries = sync_entries(m, cat);
        for e in &m.tables {
            if !entries.iter().any(|s| s.entry.name == e.name) {
                return Err(Diagnostic::error(
                    "no-upsert-key",
                    format!("green table {} has no primary key or NOT NULL unique key made of mapped columns, so sync cannot update its rows", e.name),
                )
                .table(&e.name)
                .hint("add a primary key to the green table and map its columns"));
            }
        }
        Ok(Plan {
            entries: entries.iter().map(|e| e.applier(m)).collect(),
            lock_timeout_ms: ROW_LOCAL_LOCK_TIMEOUT_MS,
            fenced: false,
            cut_over: None,
        })
    }
    pub fn entry(&self, name: &str) -> Option<&ApplierEntry> {
        self.entries.iter().find(|e| e.name == name)
    }
    /// The plan for the applier of a fence on blue writes: no writer can be in flight, so
    /// row-local keys need not (and must not: the fence holds the table) have their blue rows
    /// locked; no other applier runs (the fence holds their lock).
    pub fn fenced(&self) -> Plan {
        Plan {
            entries: self
                .entries
                .iter()
                .cloned()
                .map(|mut e| {
                    e.lock_blue = None;
                    e
                })
                .collect(),
            lock_timeout_ms: self.lock_timeout_ms,
            fenced: true,
            cut_over: self.cut_over.clone(),
        }
    }
}

/// What one call applied.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    /// Change-log rows consumed.
    pub changes: usize,
    /// Keys re-derived.
    pub keys: usize,
    /// Keys (or change rows) recorded as failed.
    pub failed: usize,
}

fn is_transient(d: &Diagnostic) -> bool {
    crate::pg::locking::is_transient(d)
}

/// Start an applier transaction: READ COMMITTED, holding the appliers' lock shared (a fence
/// holds it exclusively, and its own applier runs without).
async fn begin(conn: &mut PgConnection, m: &Mapping, plan: &Plan) -> Result<(), Diagnostic> {
    exec(conn, &sql!("BEGIN ISOLATION LEVEL READ COMMITTED")).await?;
    // The loop guard: this transaction's green writes are forward sync, which the reverse
    // triggers (after cutover) must not write back into blue.
    sqlx::query("SELECT pg_catalog.set_config($1, 'f:0', true)")
        .bind(names::guard_setting(&m.migration))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    if plan.fenced {
        return Ok(());
    }
    // With the appliers' lock held, the phase cannot change under this transaction (cutover
    // and rollback take it exclusively): one planned for the other side of a flip gives way.
    sqlx::query("SELECT pg_catalog.pg_advisory_xact_lock_shared($1)")
        .bind(names::appliers_lock(&m.migration))
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    // In a statement of its own, after the lock: READ COMMITTED takes a statement's snapshot
    // before it waits, and a phase read with the lock wait would miss the flip it waited for.
    let phase: Option<String> = sqlx::query_scalar(
        sql!(
            "SELECT phase FROM {} WHERE migration = $1",
            table(m, "runs")
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    if phase.as_deref() == Some(crate::control::Phase::Finalized.as_str()) {
        rollback(conn).await;
        return Err(Diagnostic::error(
            "finalized",
            format!("migration {} is finalized: sync is over", m.migration),
        ));
    }
    if (phase.as_deref() == Some(crate::control::Phase::CutOver.as_str()))
        != plan.cut_over.is_some()
    {
        rollback(conn).await;
        return Err(Diagnostic::error(
            "phase-changed",
            format!(
                "migration {} moved to phase {} since this applier planned its work",
                m.migration,
                phase.unwrap_or_default()
            ),
        )
        .hint("run the command again"));
    }
    Ok(())
}

async fn rollback(conn: &mut PgConnection) {
    let _ = exec(conn, &sql!("ROLLBACK")).await;
}

/// Claim up to `limit` change-log rows with ids up to `upto` and apply them, in one transaction
/// (two or more when the keys they touch exceed [`KEYS_PER_TRANSACTION`]).
pub async fn apply_batch(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
    limit: i64,
    upto: i64,
) -> Result<Applied, Diagnostic> {
    begin(conn, m, plan).await?;
    // Every lock wait of the batch is bounded, the tables its statements read included: a key
    // finder waiting for a table an application transaction locked (TRUNCATE, LOCK) while the
    // batch kept the locks of the statements before it made the application the deadlock victim
    // (hostile review 2, H2-6). Past the timeout the batch rolls back, its claims go back to the
    // log, and it is tried again.
    if !plan.fenced {
        exec(
            conn,
            &sql!("SET LOCAL lock_timeout = '{}ms'", plan.lock_timeout_ms),
        )
        .await?;
    }
    match claim_and_apply(conn, m, plan, limit, upto).await {
        Ok((applied, None)) => {
            exec(conn, &sql!("COMMIT")).await?;
            Ok(applied)
        }
        Ok((_, Some((ids, keys)))) => {
            // Too many keys for one transaction: release the claim, apply in bounded
            // transactions, then delete the rows (re-deriving twice is harmless).
            exec(conn, &sql!("COMMIT")).await?;
            let mut applied = apply_keys_bounded(conn, m, plan, &keys).await?;
            begin(conn, m, plan).await?;
            delete_changes(conn, m, &ids).await?;
            exec(conn, &sql!("COMMIT")).await?;
            applied.changes = ids.len();
            Ok(applied)
        }
        Err(d) if is_transient(&d) => {
            rollback(conn).await;
            Ok(Applied::default())
        }
        Err(d) => {
            rollback(conn).await;
            Err(d)
        }
    }
}

type Oversized = Option<(Vec<i64>, BTreeMap<usize, BTreeSet<Key>>)>;

async fn claim_and_apply(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
    limit: i64,
    upto: i64,
) -> Result<(Applied, Oversized), Diagnostic> {
    // The oldest rows, and every other row their transactions logged: a statement that deletes a
    // parent and its children is applied in one batch, in foreign-key order. Two statements, each
    // by its index whatever the planner believes of the log: its statistics are those of the
    // empty table it was at the live switch until autovacuum comes by, and with them the oldest
    // rows were found by sorting the whole backlog (170 ms at 230,000 rows, against 1 ms by the
    // primary key in order), and their transactions' other rows by ANDing a bitmap of the whole
    // backlog. Most of what a follower did; hence the planner settings, for the first statement
    // only, and the txid index for the second.
    exec(conn, &sql!("SELECT pg_catalog.set_config(s, 'off', true) FROM pg_catalog.unnest(ARRAY['enable_seqscan', 'enable_bitmapscan', 'enable_sort']) AS s")).await?;
    let mut rows = sqlx::query(sql!(
        "SELECT id, txid::pg_catalog.text AS txid, blue_table, op, all_entries, entries, skip_entry FROM {c} WHERE migration = $1 AND id <= $3 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        c = table(m, "changes")
    ).assert_safe())
    .bind(&m.migration)
    .bind(limit)
    .bind(upto)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    exec(conn, &sql!("SELECT pg_catalog.set_config(name, reset_val, true) FROM pg_catalog.pg_settings WHERE name IN ('enable_seqscan', 'enable_bitmapscan', 'enable_sort')")).await?;
    if !rows.is_empty() {
        let first: HashSet<i64> = rows.iter().map(|r| r.get("id")).collect();
        let txids: Vec<String> = rows
            .iter()
            .map(|r| r.get::<String, _>("txid"))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let rest = sqlx::query(sql!(
            "SELECT id, blue_table, op, all_entries, entries, skip_entry FROM {c} WHERE txid = ANY($2::text[]::pg_catalog.xid8[]) AND migration = $1 FOR UPDATE SKIP LOCKED",
            c = table(m, "changes")
        ).assert_safe())
        .bind(&m.migration)
        .bind(&txids)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?;
        // The first rows come again (this transaction holds their locks, which SKIP LOCKED does
        // not skip): set aside here, as `id <> ALL(first)` would compare every pair.
        rows.extend(
            rest.into_iter()
                .filter(|r| !first.contains(&r.get::<i64, _>("id"))),
        );
        rows.sort_by_key(|r| r.get::<i64, _>("id"));
    }
    if rows.is_empty() {
        return Ok((Applied::default(), None));
    }
    let mut ids = Vec::new();
    // blue table -> its rows: (id, for every entry, the entries an update concerns)
    type Logged = (i64, bool, Option<Vec<String>>, Option<String>);
    let mut by_table: BTreeMap<String, Vec<Logged>> = BTreeMap::new();
    let mut truncated: BTreeSet<String> = BTreeSet::new();
    for r in &rows {
        let id: i64 = r.get("id");
        let t: String = r.get("blue_table");
        ids.push(id);
        if r.get::<String, _>("op") == "T" {
            truncated.insert(t);
            continue;
        }
        by_table.entry(t).or_default().push((
            id,
            r.get("all_entries"),
            r.get("entries"),
            r.get("skip_entry"),
        ));
    }
    for t in &truncated {
        for e in &plan.entries {
            if e.finders.iter().any(|(x, _)| &x.display() == t) {
                request_rederive(conn, m, &e.name).await?;
            }
        }
    }
    let mut applied = Applied {
        changes: ids.len(),
        ..Applied::default()
    };
    let mut keys: BTreeMap<usize, BTreeSet<Key>> = BTreeMap::new();
    for (pos, e) in plan.entries.iter().enumerate() {
        for (x, finder) in &e.finders {
            let Some(logged) = by_table.get(&x.display()) else {
                continue;
            };
            // Row-local entries re-derive only the rows logged for every entry (their writers
            // did the rest); an update is nothing to an entry whose columns it left unchanged.
            let these: Vec<i64> = logged
                .iter()
                .filter(|(_, every, concerns, skip)| {
                    (*every || !e.row_local)
                        && concerns.as_ref().is_none_or(|c| c.contains(&e.name))
                        // An echo of a reverse is skipped while cut over (green is the
                        // application's); after a rollback blue is, and it is re-derived.
                        && (plan.cut_over.is_none() || skip.as_deref() != Some(e.name.as_str()))
                })
                .map(|(id, _, _, _)| *id)
                .collect();
            if these.is_empty() {
                continue;
            }
            let (found, failed) = find_keys(conn, m, e, x, finder, &these).await?;
            applied.failed += failed;
            keys.entry(pos).or_default().extend(found);
        }
    }
    let total: usize = keys.values().map(BTreeSet::len).sum();
    if total > KEYS_PER_TRANSACTION {
        return Ok((applied, Some((ids, keys))));
    }
    let o = apply_keys(conn, m, plan, &keys, Phases::Both, &mut Failed::new()).await?;
    applied.keys = o.keys;
    applied.failed += o.failed;
    delete_changes(conn, m, &ids).await?;
    Ok((applied, None))
}

async fn delete_changes(
    conn: &mut PgConnection,
    m: &Mapping,
    ids: &[i64],
) -> Result<(), Diagnostic> {
    crate::control::changes::delete(conn, m, ids).await
}

async fn request_rederive(
    conn: &mut PgConnection,
    m: &Mapping,
    entry: &str,
) -> Result<(), Diagnostic> {
    sqlx::query(sql!(
        "INSERT INTO {} (migration, green_table) VALUES ($1, $2) ON CONFLICT (migration, green_table) DO UPDATE SET requested_at = pg_catalog.clock_timestamp()",
        table(m, "rederive")
    ).assert_safe())
    .bind(&m.migration)
    .bind(entry)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

async fn savepoint(conn: &mut PgConnection, name: &str) -> Result<(), Diagnostic> {
    exec(conn, &sql!("SAVEPOINT {name}")).await
}
async fn release(conn: &mut PgConnection, name: &str) -> Result<(), Diagnostic> {
    exec(conn, &sql!("RELEASE SAVEPOINT {name}")).await
}
async fn rollback_to(conn: &mut PgConnection, name: &str) -> Result<(), Diagnostic> {
    exec(conn, &sql!("ROLLBACK TO SAVEPOINT {name}")).await
}

/// The keys in `rows` (one text column per key column).
fn keys_of<C: FromIterator<Key>>(
    e: &ApplierEntry,
    rows: &[sqlx::postgres::PgRow],
) -> Result<C, Diagnostic> {
    rows.iter()
        .map(|r| {
            (0..e.nkeys)
                .map(|j| r.try_get::<Option<String>, _>(j).map_err(db_error))
                .collect()
        })
        .collect()
}

/// The keys the change-log rows `ids` touch (through their old images only when `old_only`).
async fn run_finder(
    conn: &mut PgConnection,
    e: &ApplierEntry,
    finder: &Sql,
    ids: &[i64],
    old_only: bool,
) -> Result<Vec<Key>, Diagnostic> {
    let rows = sqlx::query(finder.assert_safe())
        .bind(ids)
        .bind(old_only)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?;
    keys_of(e, &rows)
}

/// The keys the rows `ids` of table `x` touch for entry `e`. A row whose keys cannot be found
/// (its key does not fit the green type, a row it joins does not, a lock it waited for) is:
/// - a new image blue still holds: moved to `failed_changes` for this entry, and retried;
/// - a new image blue no longer holds: dropped, as a later change replaced it, and that one (whose
///   old image is this row) is followed instead;
/// - an old image (a delete, an update's before): the keys it reached are reached by no later
///   change, so the whole entry is marked for a full re-derive, pending until that succeeds;
/// - an update logged as one row: its old image's keys are found alone, and only when that fails
///   too is it the old image's failure.
async fn find_keys(
    conn: &mut PgConnection,
    m: &Mapping,
    e: &ApplierEntry,
    x: &QName,
    finder: &Sql,
    ids: &[i64],
) -> Result<(Vec<Key>, usize), Diagnostic> {
    savepoint(conn, "bluegreen_find").await?;
    match run_finder(conn, e, finder, ids, false).await {
        Ok(k) => {
            release(conn, "bluegreen_find").await?;
            return Ok((k, 0));
        }
        // A lock not granted in time: the whole batch gives way (and is tried again), never
        // keeping the locks it holds while it waits again row by row.
        Err(d) if is_transient(&d) => return Err(d),
        Err(_) => rollback_to(conn, "bluegreen_find").await?,
    }
    // One row at a time, to set aside only the rows that fail.
    let mut keys = Vec::new();
    let mut failed = 0;
    for id in ids {
        savepoint(conn, "bluegreen_find1").await?;
        match run_finder(conn, e, finder, std::slice::from_ref(id), false).await {
            Ok(k) => {
                release(conn, "bluegreen_find1").await?;
                keys.extend(k);
                continue;
            }
            Err(d) if is_transient(&d) => return Err(d),
            Err(d) => {
                rollback_to(conn, "bluegreen_find1").await?;
                failed += 1;
                let image = failed_image(conn, m, e, finder, *id, &mut keys).await?;
                set_aside(conn, m, e, x, *id, image, &d).await?;
            }
        }
    }
    Ok((keys, failed))
}

/// Which image of change-log row `id` cannot be followed. An update logged as one row (both
/// images) whose old image can be is the new image's failure alone: the old image's keys go to
/// `keys`.
async fn failed_image(
    conn: &mut PgConnection,
    m: &Mapping,
    e: &ApplierEntry,
    finder: &Sql,
    id: i64,
    keys: &mut Vec<Key>,
) -> Result<Image, Diagnostic> {
    let (old, new): (bool, bool) = sqlx::query_as(
        sql!(
            "SELECT old_row IS NOT NULL, new_row IS NOT NULL FROM {} WHERE migration = $1 AND id = $2",
            table(m, "changes")
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?
    .unwrap_or((false, true));
    if !old {
        return Ok(Image::New);
    }
    if !new {
        return Ok(Image::Old);
    }
    savepoint(conn, "bluegreen_find_old").await?;
    match run_finder(conn, e, finder, std::slice::from_ref(&id), true).await {
        Ok(k) => {
            release(conn, "bluegreen_find_old").await?;
            keys.extend(k);
            Ok(Image::New)
        }
        Err(d) if is_transient(&d) => Err(d),
        Err(_) => {
            rollback_to(conn, "bluegreen_find_old").await?;
            Ok(Image::Old)
        }
    }
}

/// The image of a change-log row whose keys cannot be found.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Image {
    Old,
    New,
}

async fn set_aside(
    conn: &mut PgConnection,
    m: &Mapping,
    e: &ApplierEntry,
    x: &QName,
    id: i64,
    image: Image,
    d: &Diagnostic,
) -> Result<(), Diagnostic> {
    if image == Image::Old {
        eprintln!(
            "bluegreen: {}: the keys a change to {} reached cannot be found ({}): the whole table is re-derived",
            e.name,
            x.display(),
            d.message
        );
        return request_rederive(conn, m, &e.name).await;
    }
    eprintln!(
        "bluegreen: {}: a change to {} cannot be followed: {}",
        e.name,
        x.display(),
        d.message
    );
    // The new image alone (an update's old image, logged in the same row, was followed), while
    // blue still holds it as this entry sees it.
    let holds = e.holds(x);
    sqlx::query(sql!(
        "INSERT INTO {} (id, migration, green_table, blue_table, op, old_row, new_row, all_entries, error) SELECT id, migration, $3, blue_table, op, NULL, new_row, all_entries, $4 FROM {} AS r WHERE migration = $1 AND id = $2 AND {holds} ON CONFLICT (id, green_table) DO UPDATE SET error = EXCLUDED.error, failed_at = pg_catalog.now()",
        table(m, "failed_changes"),
        table(m, "changes")
    ).assert_safe())
    .bind(&m.migration)
    .bind(id)
    .bind(&e.name)
    .bind(error_text(d))
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

fn error_text(d: &Diagnostic) -> String {
    match d.sqlstate() {
        Some(code) => format!("{code}: {}", d.message),
        None => d.message.clone(),
    }
}

/// Which half of a re-derivation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phases {
    /// Upserts (parents first), then deletes (children first).
    Both,
    Upserts,
    Deletes,
}

/// Apply `keys` (per entry position) in bounded transactions of their own. One transaction when
/// they fit; else the upserts of every entry (parents first), then the deletes (children first),
/// each entry's keys in transactions of [`KEYS_PER_TRANSACTION`], so a child is never written
/// before its parent nor a parent deleted before its children. A key whose upsert failed is
/// neither deleted nor cleared of its failure by the later transactions.
pub async fn apply_keys_bounded(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
    keys: &BTreeMap<usize, BTreeSet<Key>>,
) -> Result<Applied, Diagnostic> {
    let total: usize = keys.values().map(BTreeSet::len).sum();
    let mut failed = Failed::new();
    if total <= KEYS_PER_TRANSACTION {
        return in_transaction(conn, m, plan, keys, Phases::Both, &mut failed).await;
    }
    let mut applied = Applied::default();
    let order: Vec<usize> = (0..plan.entries.len()).collect();
    for (phase, positions) in [
        (Phases::Upserts, order.clone()),
        (Phases::Deletes, order.into_iter().rev().collect::<Vec<_>>()),
    ] {
        for pos in positions {
            let Some(ks) = keys.get(&pos) else { continue };
            let ks: Vec<&Key> = ks.iter().collect();
            for chunk in ks.chunks(KEYS_PER_TRANSACTION) {
                let mut one = BTreeMap::new();
                one.insert(pos, chunk.iter().map(|k| (*k).clone()).collect());
                let o = in_transaction(conn, m, plan, &one, phase, &mut failed).await?;
                if phase == Phases::Upserts {
                    applied.keys += o.keys;
                }
                applied.failed += o.failed;
            }
        }
    }
    Ok(applied)
}

/// Keys (per entry position) that failed earlier in the same re-derivation.
pub type Failed = BTreeMap<usize, BTreeSet<Key>>;

async fn in_transaction(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
    keys: &BTreeMap<usize, BTreeSet<Key>>,
    phases: Phases,
    failed: &mut Failed,
) -> Result<Applied, Diagnostic> {
    begin(conn, m, plan).await?;
    let mut f = failed.clone();
    match apply_keys(conn, m, plan, keys, phases, &mut f).await {
        Ok(o) => {
            exec(conn, &sql!("COMMIT")).await?;
            *failed = f;
            Ok(o)
        }
        Err(d) => {
            rollback(conn).await;
            Err(d)
        }
    }
}

/// Lock waits that give way in one call before the remaining keys are set aside untried (each
/// costs the plan's lock timeout).
const WAITS_PER_CALL: usize = 8;

/// Re-derive `keys` (per entry position) in the caller's transaction: stripes, then upserts
/// parents first and deletes children first (or the one half `phases` names). A key that fails,
/// or whose rows an application transaction holds past the lock timeout, is recorded in
/// `sync_failures` (and added to `failed`) and retried later; the others apply. Keys already in
/// `failed` are not deleted, and their failures stay.
pub async fn apply_keys(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
    keys: &BTreeMap<usize, BTreeSet<Key>>,
    phases: Phases,
    failed: &mut Failed,
) -> Result<Applied, Diagnostic> {
    let mut stripes: Vec<i64> = keys
        .iter()
        .flat_map(|(p, ks)| {
            let name = &plan.entries[*p].name;
            ks.iter()
                .map(move |k| names::stripe_lock(&m.migration, name, names::stripe_of(k)))
        })
        .collect();
    stripes.sort_unstable();
    stripes.dedup();
    if stripes.is_empty() {
        return Ok(Applied::default());
    }
    // Stripes are waited for without a bound (only appliers take them); every statement after
    // them under the plan's bound, every entry's, not only a row-local one's (whose blue rows the
    // application holds): a session holding a green row of a follower-kept entry (by hand, before
    // cutover) held `sync` and validate for as long as it liked. The caller's own bound (the
    // claim's, or none) is put back at the end.
    let outer: String = sqlx::query_scalar("SELECT pg_catalog.current_setting('lock_timeout')")
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
    exec(conn, &sql!("SET LOCAL lock_timeout = 0")).await?;
    sqlx::query("SELECT pg_catalog.pg_advisory_xact_lock(s) FROM (SELECT pg_catalog.unnest($1::int8[]) AS s ORDER BY 1) AS x")
        .bind(&stripes)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    exec(
        conn,
        &sql!("SET LOCAL lock_timeout = '{}ms'", plan.lock_timeout_ms),
    )
    .await?;
    let mut applied = Applied::default();
    let mut failures: BTreeMap<usize, Vec<(Key, Diagnostic)>> = BTreeMap::new();
    let mut waits = 0;
    for pos in keys.keys() {
        failures.insert(*pos, Vec::new());
        applied.keys += keys[pos].len();
    }
    for (pos, e) in plan.entries.iter().enumerate() {
        if phases == Phases::Deletes {
            break;
        }
        let Some(ks) = keys.get(&pos) else { continue };
        let ks: Vec<Key> = ks.iter().cloned().collect();
        let mut up = vec![];
        match &plan.cut_over {
            Some(rev) if !rev.contains(&e.name) => up.push(e.insert_missing.clone()),
            Some(_) => {
                // The green rows first, then the keys whose green write has not reached blue (a
                // reverse failure): re-deriving those from blue would put the stale blue row over
                // the application's write, and the reverse retry would then make that permanent
                // (third hostile review, finding 1). They wait as sync failures until `sync`
                // has written them back.
                let mut lock: Vec<Sql> = e.lock_blue.clone().into_iter().collect();
                lock.push(e.green_lock.clone());
                let f = failures.entry(pos).or_default();
                phase(conn, e, &lock, &ks, f, &mut waits).await?;
                let standing = standing_reverse_failures(conn, e, &ks).await?;
                f.extend(standing.into_iter().map(|k| {
                    (
                        k,
                        Diagnostic::error(
                            "reverse-failure-stands",
                            format!("a green write to this key of {} has not reached blue yet (a reverse failure)", e.name),
                        )
                        .hint("fix its cause (see `bluegreen status`) and run `bluegreen sync`"),
                    )
                }));
                let skip: BTreeSet<&Key> = f.iter().map(|(k, _)| k).collect();
                let ks: Vec<Key> = ks.iter().filter(|k| !skip.contains(k)).cloned().collect();
                up.push(e.upsert.clone());
                up.extend(e.unique_update.clone());
                phase(conn, e, &up, &ks, f, &mut waits).await?;
                continue;
            }
            None => {
                if e.row_local {
                    up.extend(e.lock_blue.clone());
                    up.extend(e.lock_green.clone());
                }
                up.push(e.upsert.clone());
                up.extend(e.unique_update.clone());
            }
        }
        let f = failures.entry(pos).or_default();
        phase(conn, e, &up, &ks, f, &mut waits).await?;
    }
    for (pos, e) in plan.entries.iter().enumerate().rev() {
        if phases == Phases::Upserts {
            break;
        }
        let Some(ks) = keys.get(&pos) else { continue };
        let skip: BTreeSet<&Key> = failures[&pos]
            .iter()
            .map(|(k, _)| k)
            .chain(failed.get(&pos).into_iter().flatten())
            .collect();
        let ks: Vec<Key> = ks.iter().filter(|k| !skip.contains(k)).cloned().collect();
        let mut del = vec![];
        match &plan.cut_over {
            // Insert-only after cutover.
            Some(rev) if !rev.contains(&e.name) => continue,
            Some(_) => {
                if phases == Phases::Deletes {
                    del.extend(e.lock_blue.clone());
                }
                del.push(e.green_lock.clone());
            }
            None => {
                // A delete in a transaction of its own takes the row locks the upsert took.
                if e.row_local && phases == Phases::Deletes {
                    del.extend(e.lock_blue.clone());
                    del.extend(e.lock_green.clone());
                }
            }
        }
        del.push(e.delete.clone());
        del.extend(e.delete_null.clone());
        let f = failures.entry(pos).or_default();
        phase(conn, e, &del, &ks, f, &mut waits).await?;
    }
    exec(
        conn,
        &sql!(
            "SELECT pg_catalog.set_config('lock_timeout', {}, true)",
            Literal::new(&outer)
        ),
    )
    .await?;
    for (pos, e) in plan.entries.iter().enumerate() {
        let Some(ks) = keys.get(&pos) else { continue };
        let new = &failures[&pos];
        applied.failed += new.len();
        let before = failed.entry(pos).or_default();
        // Keys that failed earlier keep their failure.
        let clear: BTreeSet<Key> = ks
            .iter()
            .filter(|k| !before.contains(*k))
            .cloned()
            .collect();
        record_failures(conn, m, e, &clear, new).await?;
        before.extend(new.iter().map(|(k, _)| k.clone()));
    }
    Ok(applied)
}

/// The keys among `keys` whose green row has a standing reverse failure (after cutover).
async fn standing_reverse_failures(
    conn: &mut PgConnection,
    e: &ApplierEntry,
    keys: &[Key],
) -> Result<Vec<Key>, Diagnostic> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let mut q = sqlx::query(e.reverse_failed.assert_safe());
    for j in 0..e.nkeys {
        q = q.bind(
            keys.iter()
                .map(|k| k[j].clone())
                .collect::<Vec<Option<String>>>(),
        );
    }
    let rows = q.fetch_all(&mut *conn).await.map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|r| {
            (0..e.nkeys)
                .map(|j| r.get::<Option<String>, _>(j))
                .collect()
        })
        .collect())
}

/// Run `stmts` for `keys` in a savepoint; on a failure, halve the keys until the failing ones
/// are alone and record them in `failures`. A lock wait that gives way (an application
/// transaction holds a row past the lock timeout) is narrowed the same way, up to
/// [`WAITS_PER_CALL`] waits (`waits` counts them across the call); past that the keys left are
/// recorded with it untried.
async fn phase(
    conn: &mut PgConnection,
    e: &ApplierEntry,
    stmts: &[Sql],
    keys: &[Key],
    failures: &mut Vec<(Key, Diagnostic)>,
    waits: &mut usize,
) -> Result<(), Diagnostic> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut todo: Vec<&[Key]> = vec![keys];
    let mut gave_way: Option<Diagnostic> = None;
    while let Some(ks) = todo.pop() {
        if let Some(d) = &gave_way
            && *waits >= WAITS_PER_CALL
        {
            failures.extend(ks.iter().map(|k| (k.clone(), d.clone())));
            continue;
        }
        savepoint(conn, "bluegreen_apply").await?;
        match run_statements(conn, e, stmts, ks).await {
            Ok(()) => release(conn, "bluegreen_apply").await?,
            Err(d) => {
                rollback_to(conn, "bluegreen_apply").await?;
                if is_transient(&d) {
                    *waits += 1;
                    gave_way = Some(d.clone());
                }
                if ks.len() == 1 {
                    failures.push((ks[0].clone(), d));
                } else {
                    let (a, b) = ks.split_at(ks.len() / 2);
                    todo.push(a);
                    todo.push(b);
                }
            }
        }
    }
    Ok(())
}

async fn run_statements(
    conn: &mut PgConnection,
    e: &ApplierEntry,
    stmts: &[Sql],
    keys: &[Key],
) -> Result<(), Diagnostic> {
    let columns: Vec<Vec<Option<String>>> = (0..e.nkeys)
        .map(|j| keys.iter().map(|k| k[j].clone()).collect())
        .collect();
    for s in stmts {
        let mut q = sqlx::query(s.assert_safe());
        for c in &columns {
            q = q.bind(c);
        }
        q.execute(&mut *conn).await.map_err(db_error)?;
    }
    Ok(())
}

/// Record the keys that failed, and clear the ones that applied.
async fn record_failures(
    conn: &mut PgConnection,
    m: &Mapping,
    e: &ApplierEntry,
    keys: &BTreeSet<Key>,
    failed: &[(Key, Diagnostic)],
) -> Result<(), Diagnostic> {
    let bad: BTreeSet<&Key> = failed.iter().map(|(k, _)| k).collect();
    let good: Vec<&Key> = keys.iter().filter(|k| !bad.contains(k)).collect();
    let columns = |ks: &[&Key]| -> Vec<Vec<Option<String>>> {
        (0..e.nkeys)
            .map(|j| ks.iter().map(|k| k[j].clone()).collect())
            .collect()
    };
    if !good.is_empty() {
        let mut q = sqlx::query(e.clear_failures.assert_safe());
        for c in columns(&good) {
            q = q.bind(c);
        }
        q.bind(&m.migration)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    if !failed.is_empty() {
        let ks: Vec<&Key> = failed.iter().map(|(k, _)| k).collect();
        let errors: Vec<String> = failed.iter().map(|(_, d)| error_text(d)).collect();
        let mut q = sqlx::query(e.record_failures.assert_safe());
        for c in columns(&ks) {
            q = q.bind(c);
        }
        q.bind(errors)
            .bind(&m.migration)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
    }
    Ok(())
}

/// Re-derive up to `limit` keys recorded as failed (small batches: the blue rows of row-local
/// keys are held `FOR SHARE` while they are applied).
pub async fn retry_failures(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
    limit: i64,
) -> Result<Applied, Diagnostic> {
    let rows = sqlx::query(sql!(
        "SELECT green_table, ARRAY(SELECT x FROM pg_catalog.jsonb_array_elements_text(sync_key) WITH ORDINALITY AS t(x, n) ORDER BY n) AS k FROM {} WHERE migration = $1 AND pg_catalog.jsonb_typeof(sync_key) = 'array' ORDER BY failed_at LIMIT $2",
        table(m, "sync_failures")
    ).assert_safe())
    .bind(&m.migration)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    let mut keys: BTreeMap<usize, BTreeSet<Key>> = BTreeMap::new();
    for r in rows {
        let name: String = r.get("green_table");
        let Some(pos) = plan.entries.iter().position(|e| e.name == name) else {
            continue;
        };
        // Each value as the server renders it (a numeric of any precision exactly: parsed as
        // JSON on the client, a long one came back as another number, and its failure never
        // cleared).
        let k: Key = r.get("k");
        if k.len() == plan.entries[pos].nkeys {
            keys.entry(pos).or_default().insert(k);
        }
    }
    if keys.is_empty() {
        return Ok(Applied::default());
    }
    apply_keys_bounded(conn, m, plan, &keys).await
}

/// Put change-log rows set aside earlier back into the log, for another try; first drop the new
/// images blue no longer holds: that version of the row was updated or deleted since, and the
/// change that replaced it was logged (and is applied) on its own. A row that cannot be followed
/// thus stops counting once the application fixes it. (An old image is requeued: when its keys
/// still cannot be found, it turns into a full re-derive.)
pub async fn requeue_failed_changes(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
) -> Result<u64, Diagnostic> {
    let f = table(m, "failed_changes");
    let any: bool = sqlx::query_scalar(
        sql!("SELECT EXISTS (SELECT 1 FROM {f} WHERE migration = $1)").assert_safe(),
    )
    .bind(&m.migration)
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    if !any {
        return Ok(0);
    }
    let mut tx = conn.begin().await.map_err(db_error)?;
    // It reads every blue table: under the appliers' lock wait, and on a lock not granted in time
    // (an application's TRUNCATE or LOCK) it gives way until the next run.
    exec(
        &mut tx,
        &sql!("SET LOCAL lock_timeout = '{}ms'", plan.lock_timeout_ms),
    )
    .await?;
    match requeue_in(&mut tx, m, plan).await {
        Ok(n) => {
            tx.commit().await.map_err(db_error)?;
            Ok(n)
        }
        Err(d) if is_transient(&d) => Ok(0),
        Err(d) => Err(d),
    }
}

async fn requeue_in(tx: &mut PgConnection, m: &Mapping, plan: &Plan) -> Result<u64, Diagnostic> {
    let f = table(m, "failed_changes");
    let c = table(m, "changes");
    // Per entry: an update of columns the entry does not read is logged for no entry, so an
    // image is superseded only when blue no longer holds it as that entry sees it (H4-6).
    let mut read: Vec<(&QName, &ApplierEntry)> = plan
        .entries
        .iter()
        .flat_map(|e| e.finders.iter().map(move |(x, _)| (x, e)))
        .collect();
    read.sort_by_key(|(x, e)| (x.display(), e.name.clone()));
    for (x, e) in read {
        let holds = e.holds(x);
        sqlx::query(sql!(
            "DELETE FROM {f} AS r WHERE r.migration = $1 AND r.blue_table = $2 AND r.green_table = $3 AND r.op <> 'T' AND r.old_row IS NULL AND r.new_row IS NOT NULL AND NOT {holds}"
        ).assert_safe())
        .bind(&m.migration)
        .bind(x.display())
        .bind(&e.name)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    }
    let n = sqlx::query(sql!(
        "INSERT INTO {c} (migration, blue_table, op, old_row, new_row, all_entries) SELECT DISTINCT ON (id) migration, blue_table, op, old_row, new_row, true FROM {f} WHERE migration = $1 ORDER BY id"
    ).assert_safe())
    .bind(&m.migration)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?
    .rows_affected();
    sqlx::query(sql!("DELETE FROM {f} WHERE migration = $1").assert_safe())
        .bind(&m.migration)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    Ok(n)
}

/// Re-derive whole every entry a TRUNCATE marked: all keys green holds or M(blue) produces, in
/// bounded transactions; the mark goes only if no newer TRUNCATE renewed it meanwhile.
pub async fn rederive_marked(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
) -> Result<Applied, Diagnostic> {
    let marks = sqlx::query(
        sql!(
            "SELECT green_table, requested_at::text AS at FROM {} WHERE migration = $1",
            table(m, "rederive")
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    // Every marked entry at once, so parents are written before children and children deleted
    // before parents across them.
    let mut map = BTreeMap::new();
    let mut done = Vec::new();
    for r in marks {
        let name: String = r.get("green_table");
        let at: String = r.get("at");
        let Some(pos) = plan.entries.iter().position(|e| e.name == name) else {
            continue;
        };
        // Keys that cannot all be computed yet (a row whose key does not fit green): the mark
        // stays, pending, and the next round tries again.
        let keys = match run_all_keys(conn, &plan.entries[pos]).await {
            Ok(k) => k,
            Err(d) => {
                eprintln!("bluegreen: {name}: a full re-derive waits: {}", d.message);
                continue;
            }
        };
        eprintln!(
            "bluegreen: {name}: re-deriving all {} key(s) (after a TRUNCATE, or a change whose keys could not be found)",
            keys.len()
        );
        map.insert(pos, keys);
        done.push((name, at));
    }
    if map.is_empty() {
        return Ok(Applied::default());
    }
    let applied = apply_keys_bounded(conn, m, plan, &map).await?;
    for (name, at) in done {
        sqlx::query(sql!(
            "DELETE FROM {} WHERE migration = $1 AND green_table = $2 AND requested_at <= $3::timestamptz",
            table(m, "rederive")
        ).assert_safe())
        .bind(&m.migration)
        .bind(&name)
        .bind(&at)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    Ok(applied)
}

async fn run_all_keys(
    conn: &mut PgConnection,
    e: &ApplierEntry,
) -> Result<BTreeSet<Key>, Diagnostic> {
    let rows = sqlx::query(e.all_keys.assert_safe())
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?;
    keys_of(e, &rows)
}

/// The keys the change log touches right now, per entry (for the fence to re-verify once it has
/// drained them); None when more than `limit` (then not re-verified key by key).
pub async fn keys_pending(
    conn: &mut PgConnection,
    m: &Mapping,
    plan: &Plan,
    limit: usize,
) -> Result<Option<BTreeMap<usize, BTreeSet<Key>>>, Diagnostic> {
    let rows = sqlx::query(
        sql!(
            "SELECT id, blue_table FROM {} WHERE migration = $1 AND op <> 'T'",
            table(m, "changes")
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    let mut by_table: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &rows {
        by_table
            .entry(r.get("blue_table"))
            .or_default()
            .push(r.get("id"));
    }
    let mut out: BTreeMap<usize, BTreeSet<Key>> = BTreeMap::new();
    for (pos, e) in plan.entries.iter().enumerate() {
        for (x, finder) in &e.finders {
            let Some(ids) = by_table.get(&x.display()) else {
                continue;
            };
            let Ok(found) = run_finder(conn, e, finder, ids, false).await else {
                // A key that cannot even be found is the drain's to set aside.
                continue;
            };
            out.entry(pos).or_default().extend(found);
        }
        if out.values().map(BTreeSet::len).sum::<usize>() > limit {
            return Ok(None);
        }
    }
    Ok(Some(out))
}

/// Re-verify `green = M(blue)` for `keys` (after the fence drained them): the entries and the
/// first keys where green differs, empty when all match.
pub async fn verify_keys(
    conn: &mut PgConnection,
    plan: &Plan,
    keys: &BTreeMap<usize, BTreeSet<Key>>,
) -> Result<Vec<String>, Diagnostic> {
    let mut differ = Vec::new();
    for (pos, ks) in keys {
        let e = &plan.entries[*pos];
        let ks: Vec<Key> = ks.iter().cloned().collect();
        for chunk in ks.chunks(KEYS_PER_TRANSACTION) {
            let columns: Vec<Vec<Option<String>>> = (0..e.nkeys)
                .map(|j| chunk.iter().map(|k| k[j].clone()).collect())
                .collect();
            let mut sides = Vec::new();
            for s in [&e.blue_rows, &e.green_rows] {
                let mut q = sqlx::query(s.assert_safe());
                for c in &columns {
                    q = q.bind(c);
                }
                let mut rows: Vec<(Vec<Option<String>>, Option<String>)> = q
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(db_error)?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                rows.sort();
                sides.push(rows);
            }
            if sides[0] != sides[1] {
                let first = sides[0]
                    .iter()
                    .chain(&sides[1])
                    .find(|r| !(sides[0].contains(r) && sides[1].contains(r)))
                    .map(|(k, _)| format!("{k:?}"))
                    .unwrap_or_default();
                differ.push(format!("{} (first key {first})", e.name));
                break;
            }
        }
    }
    Ok(differ)
}
