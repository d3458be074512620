//! The randomized concurrency test across cutover and rollback: after `copy --follow` went live,
//! three or four application sessions write while a driver flips the application between blue
//! and green two to four times (`validate` + `cutover`, `rollback`, `validate` + `cutover`, ...).
//!
//! "Old" sessions keep the connection they opened before the first cutover (they stay on blue
//! through every flip); "new" sessions connect for every transaction and follow `search_path`
//! (green after a cutover, blue after a rollback; `current_schema()` says which). Each session
//! inserts, updates (absolute and read-modify-write, single- and multi-row) and deletes rows in a
//! key range of its own (negative ids, never handed out by a sequence) and rows whose id a
//! sequence generated for it, so the last value it committed for each key is known: its ledger.
//! A few statements, at most one per transaction, write shared keys that may conflict (a
//! unique-key violation there is the application's own error; such rows are not ledgered).
//!
//! Allowed application errors: 40001 (the transaction is retried and counted) and 23505 / 23503
//! on a shared key. Anything else (a deadlock, a lock timeout, an error raised in sync, a write
//! that found its own row missing) fails the test. At the end the follower drains, `validate`
//! must pass, green = M(blue) is checked (every entry when on blue; the invertible ones when cut
//! over, plus blue = green on them directly), every ledgered key must hold its last committed
//! value in green and in blue, and the server must have logged no deadlock for the database.
//!
//! The seed is printed and in every failure; `BLUEGREEN_SEED=<n>` replays its statement streams
//! and its flip schedule (the interleaving itself is up to the machine); `BLUEGREEN_SOAK_SECONDS`
//! writes longer than the CI default of about 17 s, with more flips.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgDatabaseError;
use sqlx::{Connection, PgConnection, Row};

use crate::random::{Rng, live_seconds, seed, wait_drained};
use crate::support::{self, both, connect, empty_db, exec, run_within, status_json};

const LIMIT: Duration = Duration::from_secs(60);
/// Keys each session owns in its explicit range (reused: deleted, then inserted again).
const POOL: i64 = 24;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// cutover_small: `acct` (invertible, row-local), `acct_upper` (row-local, no reverse) and
    /// `by_owner` (group_by, the follower's, no reverse), all read from `public.acct`.
    Small,
    /// cutover_join: `cj` (invertible, the follower's: it reads `w` through a join).
    Join,
}

struct Fixture {
    kind: Kind,
    db: &'static str,
    mapping: &'static str,
    blue_sql: &'static str,
    green: &'static str,
    /// The invertible entry and the blue table it reverses into.
    blue_table: &'static str,
    green_table: &'static str,
    /// Columns compared between the two (as the invariant would, in green's types).
    cols: &'static str,
    /// Existing shared rows 1..=shared.
    shared: i64,
}

const SMALL: Fixture = Fixture {
    kind: Kind::Small,
    db: "rcut_small",
    mapping: "tests/fixtures/cutover_small.yaml",
    blue_sql: "CREATE TABLE public.acct (id serial PRIMARY KEY, owner text NOT NULL, balance integer NOT NULL DEFAULT 0);
        ALTER SEQUENCE public.acct_id_seq CACHE 20;
        INSERT INTO public.acct (owner, balance) SELECT 'o' || (i % 7), i FROM generate_series(1, 50) i;",
    green: "small_green",
    blue_table: "acct",
    green_table: "acct",
    cols: "id, owner, balance::int8",
    shared: 50,
};

const JOIN: Fixture = Fixture {
    kind: Kind::Join,
    db: "rcut_join",
    mapping: "tests/fixtures/cutover_join.yaml",
    blue_sql: "CREATE TABLE public.w (id integer PRIMARY KEY, name text);
        CREATE TABLE public.c (id integer PRIMARY KEY, w_id integer NOT NULL REFERENCES public.w, v integer NOT NULL);
        INSERT INTO public.w VALUES (1, 'one'), (2, 'two'), (3, 'three');
        INSERT INTO public.c SELECT i, 1 + i % 3, i FROM generate_series(1, 200) i;",
    green: "joined_green",
    blue_table: "c",
    green_table: "cj",
    cols: "id, w_id, v::int8",
    shared: 200,
};

/// The w names of the join fixture (never renamed here: a new session writes `wname` itself,
/// computed from the w it points at, as the new application would).
fn wname(w: i64) -> &'static str {
    ["one", "two", "three"][(w - 1) as usize]
}

/// A row's ledgered value: (owner, balance) for acct, (w_id, v) for c / cj.
#[derive(Clone, Debug, PartialEq)]
struct Val {
    a: String,
    b: i64,
}

#[derive(Clone, Debug)]
enum Op {
    Insert(i64, Val),
    /// An insert taking the sequence's id (small only): the id becomes the session's.
    InsertDefault(Val),
    Update(i64, Val),
    Add(i64, i64),
    AddMany(Vec<i64>, i64),
    Delete(i64),
    /// Shared keys: not ledgered; may conflict.
    SharedAdd(i64, i64),
    SharedSet(i64, String),
    SharedInsert(i64),
    SharedDelete(i64),
}

impl Op {
    fn shared(&self) -> bool {
        matches!(
            self,
            Op::SharedAdd(..) | Op::SharedSet(..) | Op::SharedInsert(_) | Op::SharedDelete(_)
        )
    }
}

/// The statement for `op` in the schema the session is on (unqualified names: the session's
/// `search_path` decides, as for the application).
fn render(fx: &Fixture, op: &Op, green: bool) -> String {
    let t = if green { fx.green_table } else { fx.blue_table };
    match fx.kind {
        Kind::Small => match op {
            Op::Insert(k, v) => format!(
                "INSERT INTO acct (id, owner, balance) VALUES ({k}, '{}', {})",
                v.a, v.b
            ),
            Op::InsertDefault(v) => format!(
                "INSERT INTO acct (owner, balance) VALUES ('{}', {}) RETURNING id::int8",
                v.a, v.b
            ),
            Op::Update(k, v) => format!(
                "UPDATE acct SET owner = '{}', balance = {} WHERE id = {k}",
                v.a, v.b
            ),
            Op::Add(k, d) | Op::SharedAdd(k, d) => {
                format!("UPDATE acct SET balance = balance + ({d}) WHERE id = {k}")
            }
            Op::AddMany(ks, d) => format!(
                "UPDATE acct SET balance = balance + ({d}) WHERE id IN ({})",
                join(ks)
            ),
            Op::Delete(k) | Op::SharedDelete(k) => format!("DELETE FROM acct WHERE id = {k}"),
            Op::SharedSet(k, owner) => format!("UPDATE acct SET owner = '{owner}' WHERE id = {k}"),
            Op::SharedInsert(k) => {
                format!("INSERT INTO acct (id, owner, balance) VALUES ({k}, 'shared', 0)")
            }
        },
        Kind::Join => {
            let w = |v: &Val| v.a.parse::<i64>().unwrap();
            match op {
                Op::Insert(k, v) if green => format!(
                    "INSERT INTO cj (id, w_id, v, wname) VALUES ({k}, {}, {}, '{}')",
                    w(v),
                    v.b,
                    wname(w(v))
                ),
                Op::Insert(k, v) => {
                    format!(
                        "INSERT INTO c (id, w_id, v) VALUES ({k}, {}, {})",
                        w(v),
                        v.b
                    )
                }
                Op::InsertDefault(_) => unreachable!("c has no sequence"),
                Op::Update(k, v) if green => format!(
                    "UPDATE cj SET w_id = {}, wname = '{}', v = {} WHERE id = {k}",
                    w(v),
                    wname(w(v)),
                    v.b
                ),
                Op::Update(k, v) => {
                    format!("UPDATE c SET w_id = {}, v = {} WHERE id = {k}", w(v), v.b)
                }
                Op::Add(k, d) | Op::SharedAdd(k, d) => {
                    format!("UPDATE {t} SET v = v + ({d}) WHERE id = {k}")
                }
                Op::AddMany(ks, d) => {
                    format!("UPDATE {t} SET v = v + ({d}) WHERE id IN ({})", join(ks))
                }
                Op::Delete(k) | Op::SharedDelete(k) => format!("DELETE FROM {t} WHERE id = {k}"),
                Op::SharedSet(k, w) if green => format!(
                    "UPDATE cj SET w_id = {w}, wname = '{}' WHERE id = {k}",
                    wname(w.parse().unwrap())
                ),
                Op::SharedSet(k, w) => format!("UPDATE c SET w_id = {w} WHERE id = {k}"),
                Op::SharedInsert(k) if green => {
                    format!("INSERT INTO cj (id, w_id, v, wname) VALUES ({k}, 1, 0, 'one')")
                }
                Op::SharedInsert(k) => format!("INSERT INTO c (id, w_id, v) VALUES ({k}, 1, 0)"),
            }
        }
    }
}

fn join(ks: &[i64]) -> String {
    ks.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one session committed last for each of its keys (None: deleted).
type Ledger = BTreeMap<i64, Option<Val>>;

#[derive(Default)]
struct Tally {
    commits: AtomicU64,
    on_green: AtomicU64,
    old_commits: AtomicU64,
    retried_40001: AtomicU64,
    shared_conflicts: AtomicU64,
    fatal: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, stop: &AtomicBool, what: String) {
        eprintln!("random_cutover: FATAL: {what}");
        self.fatal.lock().unwrap().push(what);
        stop.store(true, Ordering::Relaxed);
    }
}

struct Session {
    fx: &'static Fixture,
    url: String,
    seed: u64,
    id: u64,
    /// Opened before the first cutover and kept (stays on blue), or one connection per
    /// transaction (follows search_path).
    old: bool,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
}

/// The SQLSTATE and text of a database error.
fn pg_error(e: &sqlx::Error) -> Option<(String, String)> {
    let pg = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())?;
    Some((
        pg.code().to_string(),
        format!(
            "{} {}{}",
            pg.code(),
            pg.message(),
            pg.r#where()
                .map(|w| format!(" (where: {w})"))
                .unwrap_or_default()
        ),
    ))
}

async fn on_green(c: &mut PgConnection, fx: &Fixture) -> Result<bool, sqlx::Error> {
    let s: Option<String> = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(c)
        .await?;
    Ok(s.as_deref() == Some(fx.green))
}

enum Outcome {
    Committed(Vec<Option<i64>>),
    Retry,
    /// A shared key's own constraint (23505/23503): the transaction is lost, as the application
    /// would see it.
    Conflict,
}

impl Session {
    fn own_key(&self, n: i64) -> i64 {
        -(100_000 * (self.id as i64 + 1) + n)
    }

    /// The next transaction's operations, given what the ledger says exists.
    fn plan(&self, r: &mut Rng, ledger: &Ledger, extra: &[i64]) -> Vec<Op> {
        let mut state: BTreeMap<i64, bool> = BTreeMap::new();
        let exists = |state: &BTreeMap<i64, bool>, k: i64| {
            state
                .get(&k)
                .copied()
                .unwrap_or_else(|| matches!(ledger.get(&k), Some(Some(_))))
        };
        let small = self.fx.kind == Kind::Small;
        let val = |r: &mut Rng| Val {
            a: if small {
                format!("o{}", r.below(10))
            } else {
                (1 + r.below(3)).to_string()
            },
            b: r.below(1000) as i64,
        };
        let n = 1 + r.below(3);
        let mut ops = Vec::new();
        for _ in 0..n {
            // The session's keys: its explicit range, and ids a sequence gave it.
            let k = if !extra.is_empty() && r.chance(25) {
                extra[r.below(extra.len() as u64) as usize]
            } else {
                self.own_key(r.below(POOL as u64) as i64)
            };
            let op = if small && r.chance(8) {
                Op::InsertDefault(val(r))
            } else if !exists(&state, k) {
                Op::Insert(k, val(r))
            } else {
                match r.below(10) {
                    0..=2 => Op::Update(k, val(r)),
                    3..=5 => Op::Add(k, r.below(11) as i64 - 5),
                    6 => {
                        let mut ks: Vec<i64> = (0..POOL)
                            .map(|n| self.own_key(n))
                            .filter(|k| exists(&state, *k))
                            .filter(|_| r.chance(40))
                            .collect();
                        ks.push(k);
                        ks.sort();
                        ks.dedup();
                        Op::AddMany(ks, 1 + r.below(3) as i64)
                    }
                    _ => Op::Delete(k),
                }
            };
            match &op {
                Op::Insert(k, _) => {
                    state.insert(*k, true);
                }
                Op::Delete(k) => {
                    state.insert(*k, false);
                }
                _ => {}
            }
            ops.push(op);
        }
        // At most one shared key per transaction: its own locks can then never form a cycle
        // with another session's (own keys are disjoint), so any deadlock is sync's.
        if r.chance(30) {
            let shared = match r.below(6) {
                0 | 1 => Op::SharedAdd(1 + r.below(self.fx.shared as u64) as i64, 1),
                2 => Op::SharedSet(
                    1 + r.below(self.fx.shared as u64) as i64,
                    if small {
                        format!("o{}", r.below(7))
                    } else {
                        (1 + r.below(3)).to_string()
                    },
                ),
                3 | 4 => Op::SharedInsert(-(1 + r.below(10) as i64)),
                _ => Op::SharedDelete(-(1 + r.below(10) as i64)),
            };
            let at = r.below(ops.len() as u64 + 1) as usize;
            ops.insert(at, shared);
        }
        ops
    }

    /// Run `ops` in one transaction on `c`.
    async fn attempt(
        &self,
        c: &mut PgConnection,
        green: bool,
        rr: bool,
        ops: &[Op],
    ) -> Result<Outcome, String> {
        let begin = if rr {
            "BEGIN ISOLATION LEVEL REPEATABLE READ"
        } else {
            "BEGIN"
        };
        let mut returned = Vec::new();
        let mut failed: Option<(usize, sqlx::Error, String)> = None;
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(begin))
            .execute(&mut *c)
            .await
        {
            return Err(format!("BEGIN: {e}"));
        }
        for (i, op) in ops.iter().enumerate() {
            let sql = render(self.fx, op, green);
            let r = match op {
                Op::InsertDefault(_) => {
                    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.clone()))
                        .fetch_one(&mut *c)
                        .await
                        .map(|id| (1, Some(id)))
                }
                _ => sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                    .execute(&mut *c)
                    .await
                    .map(|d| (d.rows_affected(), None)),
            };
            match r {
                Ok((n, id)) => {
                    let want = match op {
                        Op::AddMany(ks, _) => Some(ks.len() as u64),
                        op if op.shared() => None,
                        _ => Some(1),
                    };
                    if want.is_some_and(|w| w != n) {
                        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *c).await;
                        return Err(format!(
                            "a write to the session's own rows met {n} row(s), the ledger says {want:?}: a committed write was lost on {} (before this one)\n  {sql}",
                            if green { self.fx.green } else { "blue" }
                        ));
                    }
                    returned.push(id);
                }
                Err(e) => {
                    failed = Some((i, e, sql));
                    break;
                }
            }
        }
        let (i, e, sql) = match failed {
            None => match sqlx::raw_sql("COMMIT").execute(&mut *c).await {
                Ok(_) => return Ok(Outcome::Committed(returned)),
                Err(e) => (usize::MAX, e, "COMMIT".to_string()),
            },
            Some(f) => f,
        };
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *c).await;
        let Some((code, text)) = pg_error(&e) else {
            return Err(format!("{e}\n  in: {sql}"));
        };
        let shared = ops.get(i).is_some_and(|op| op.shared());
        match code.as_str() {
            "40001" => Ok(Outcome::Retry),
            "23505" | "23503" if shared => Ok(Outcome::Conflict),
            _ => Err(format!(
                "application error {text}\n  in: {sql}\n  (on {}, transaction {ops:?})",
                if green { self.fx.green } else { "blue" }
            )),
        }
    }

    async fn run(self) -> Ledger {
        let mut r = Rng::new(self.seed ^ (self.id + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut ledger = Ledger::new();
        let mut extra: Vec<i64> = Vec::new();
        let mut held = if self.old {
            let mut c = connect(&self.url).await;
            exec(&mut c, "SET application_name = 'rcut-old'").await;
            assert!(
                !on_green(&mut c, self.fx).await.unwrap(),
                "seed {}: an old session opened on green",
                self.seed
            );
            Some(c)
        } else {
            None
        };
        let mut txn: u64 = 0;
        'outer: while !self.stop.load(Ordering::Relaxed) {
            txn += 1;
            let ops = self.plan(&mut r, &ledger, &extra);
            let rr = r.chance(15);
            let pause = r.below(4);
            let mut tries = 0;
            loop {
                tries += 1;
                let mut fresh = None;
                let c = match held.as_mut() {
                    Some(c) => c,
                    None => match PgConnection::connect(&self.url).await {
                        Ok(c) => fresh.insert(c),
                        Err(e) => {
                            self.tally
                                .fail(&self.stop, format!("seed {}: connect: {e}", self.seed));
                            break 'outer;
                        }
                    },
                };
                let green = match on_green(c, self.fx).await {
                    Ok(g) => g,
                    Err(e) => {
                        self.tally.fail(
                            &self.stop,
                            format!("seed {}: current_schema(): {e}", self.seed),
                        );
                        break 'outer;
                    }
                };
                let outcome = self.attempt(c, green, rr, &ops).await;
                if let Some(c) = fresh {
                    let _ = c.close().await;
                }
                match outcome {
                    Ok(Outcome::Committed(returned)) => {
                        self.tally.commits.fetch_add(1, Ordering::Relaxed);
                        if green {
                            self.tally.on_green.fetch_add(1, Ordering::Relaxed);
                        }
                        if self.old {
                            self.tally.old_commits.fetch_add(1, Ordering::Relaxed);
                        }
                        for (op, id) in ops.iter().zip(returned) {
                            apply(&mut ledger, &mut extra, op, id);
                        }
                        break;
                    }
                    Ok(Outcome::Retry) => {
                        self.tally.retried_40001.fetch_add(1, Ordering::Relaxed);
                        if tries >= 100 {
                            self.tally.fail(
                                &self.stop,
                                format!(
                                    "seed {}: session {} transaction {txn} failed with 40001 {tries} times: {ops:?}",
                                    self.seed, self.id
                                ),
                            );
                            break 'outer;
                        }
                        tokio::time::sleep(Duration::from_millis(2 * tries.min(10))).await;
                    }
                    Ok(Outcome::Conflict) => {
                        self.tally.shared_conflicts.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        self.tally.fail(
                            &self.stop,
                            format!(
                                "seed {}: session {} ({}) transaction {txn}: {e}",
                                self.seed,
                                self.id,
                                if self.old { "old" } else { "new" }
                            ),
                        );
                        break 'outer;
                    }
                }
            }
            if pause > 0 {
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
        ledger
    }
}

fn apply(ledger: &mut Ledger, extra: &mut Vec<i64>, op: &Op, id: Option<i64>) {
    match op {
        Op::Insert(k, v) | Op::Update(k, v) => {
            ledger.insert(*k, Some(v.clone()));
        }
        Op::InsertDefault(v) => {
            let k = id.expect("RETURNING id");
            ledger.insert(k, Some(v.clone()));
            extra.push(k);
        }
        Op::Add(k, d) => add(ledger, *k, *d),
        Op::AddMany(ks, d) => ks.iter().for_each(|k| add(ledger, *k, *d)),
        Op::Delete(k) => {
            ledger.insert(*k, None);
        }
        _ => {}
    }
}

fn add(ledger: &mut Ledger, k: i64, d: i64) {
    if let Some(Some(v)) = ledger.get_mut(&k) {
        v.b += d;
    }
}

/// Each ledgered key as `table` holds it now.
async fn found(
    c: &mut PgConnection,
    fx: &Fixture,
    table: &str,
    keys: &[i64],
) -> BTreeMap<i64, Val> {
    let (a, b) = match fx.kind {
        Kind::Small => ("owner", "balance"),
        Kind::Join => ("w_id", "v"),
    };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT id::int8, {a}::text, {b}::int8 FROM {table} WHERE id = ANY($1::int8[])"
    )))
    .bind(keys)
    .fetch_all(c)
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get::<i64, _>(0),
            Val {
                a: r.get(1),
                b: r.get(2),
            },
        )
    })
    .collect()
}

async fn scenario(fx: &'static Fixture) {
    let seed = seed();
    eprintln!(
        "random_cutover: {} with seed {seed} (replay: BLUEGREEN_SEED={seed})",
        fx.mapping
    );
    let url = empty_db(fx.db).await;
    let mut c = connect(&url).await;
    exec(&mut c, fx.blue_sql).await;
    let started = Instant::now();
    let log = std::env::temp_dir().join(format!("{}-follower-{seed}.log", fx.db));
    let f = support::start_follower(&url, fx.mapping, &log, LIMIT).await;

    let mut d = Rng::new(seed ^ 0x5EED_F11B);
    let sessions = 3 + d.below(2);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    // Session 0 old, session 1 new, the others either.
    let kinds: Vec<bool> = (0..sessions)
        .map(|i| i == 0 || (i > 1 && d.chance(50)))
        .collect();
    let handles: Vec<_> = kinds
        .iter()
        .enumerate()
        .map(|(i, old)| {
            tokio::spawn(
                Session {
                    fx,
                    url: url.clone(),
                    seed,
                    id: i as u64,
                    old: *old,
                    stop: stop.clone(),
                    tally: tally.clone(),
                }
                .run(),
            )
        })
        .collect();

    // The driver: 2 to 4 flips, a validation before each cutover, ~20 s of writes in all.
    // About 17 s of writes in CI; `BLUEGREEN_SOAK_SECONDS` runs longer, one more flip per 15 s.
    let secs = live_seconds(17);
    let flips = 2 + d.below(3) + secs.saturating_sub(17) / 15;
    let gap = secs * 1000 / (flips + 1);
    let mut schedule = vec![format!(
        "{sessions} sessions (old: {:?}), {flips} flips",
        kinds
    )];
    let initial = 1000 + d.below(1500);
    tokio::time::sleep(Duration::from_millis(initial)).await;
    let mut problems = Vec::new();
    let mut cmd = async |args: &[&str], schedule: &mut Vec<String>| -> bool {
        let t = Instant::now();
        let out = run_within(&url, args, LIMIT).await;
        schedule.push(format!(
            "{} at {:?}: exit {:?} in {:?}",
            args[0],
            started.elapsed(),
            out.status.code(),
            t.elapsed()
        ));
        if out.status.code() != Some(0) {
            problems.push(format!(
                "seed {seed}: `bluegreen {}` failed: {}",
                args.join(" "),
                both(&out)
            ));
            return false;
        }
        true
    };
    for i in 0..flips {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let ok = if i % 2 == 0 {
            cmd(&["validate", "-m", fx.mapping], &mut schedule).await
                && cmd(
                    &[
                        "cutover",
                        "-m",
                        fx.mapping,
                        "--yes",
                        "--accept-lossy-rollback",
                    ],
                    &mut schedule,
                )
                .await
        } else {
            cmd(&["rollback", "-m", fx.mapping, "--yes"], &mut schedule).await
        };
        if !ok {
            break;
        }
        let wait = gap * 6 / 10 + d.below(gap * 8 / 10);
        if d.chance(35) {
            tokio::time::sleep(Duration::from_millis(wait / 2)).await;
            // A validation while the application writes, on whichever side it is.
            if !cmd(&["validate", "-m", fx.mapping], &mut schedule).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait / 2)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut ledgers = Vec::new();
    for h in handles {
        ledgers.push(
            h.await
                .unwrap_or_else(|e| panic!("seed {seed}: a session panicked: {e}")),
        );
    }
    let writes_took = started.elapsed();
    let schedule = schedule.join("\n  ");
    let fatal = tally.fatal.lock().unwrap().clone();
    assert!(
        fatal.is_empty() && problems.is_empty(),
        "seed {seed}: {}\n{}\nschedule:\n  {schedule}",
        fatal.join("\n"),
        problems.join("\n")
    );
    eprintln!(
        "random_cutover: seed {seed}: {} commits ({} on green, {} by old sessions), {} retried after 40001, {} shared-key conflicts, writes for {writes_took:?}\n  {schedule}",
        tally.commits.load(Ordering::Relaxed),
        tally.on_green.load(Ordering::Relaxed),
        tally.old_commits.load(Ordering::Relaxed),
        tally.retried_40001.load(Ordering::Relaxed),
        tally.shared_conflicts.load(Ordering::Relaxed),
    );

    let took = wait_drained(&url, fx.mapping, LIMIT).await;
    support::stop_follower(f, &log);
    let st = status_json(&url, fx.mapping).await;
    let phase = st["phase"].as_str().unwrap_or_default().to_string();
    eprintln!("random_cutover: seed {seed}: drained in {took:?}, phase {phase}");
    assert_eq!(st["failures_total"], 0, "seed {seed}: {st}");
    assert_eq!(st["reverse_failures"], 0, "seed {seed}: {st}");
    assert_eq!(st["failed_changes"], 0, "seed {seed}: {st}");

    let out = run_within(
        &url,
        &["validate", "-m", fx.mapping, "--show-values"],
        LIMIT,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "seed {seed}: validate at the end ({phase}): {}\nschedule:\n  {schedule}",
        both(&out)
    );
    // green = M(blue): every entry on blue (nothing pending: drained first); the invertible
    // entry when cut over (the others are the new application's, insert-only from blue).
    if phase != "cut_over" {
        support::drain(&url, fx.mapping).await;
    }
    let v: Vec<(String, i64)> = support::invariant_violations(&url, fx.mapping)
        .await
        .into_iter()
        .filter(|(e, _)| phase != "cut_over" || e == fx.green_table)
        .collect();
    assert!(
        v.is_empty(),
        "seed {seed}: green != M(blue) ({phase}): {v:?}\nschedule:\n  {schedule}"
    );
    let blue = format!("public.{}", fx.blue_table);
    let green = format!("{}.{}", fx.green, fx.green_table);
    let n = support::multiset_differ(&mut c, &blue, &green, fx.cols).await;
    assert_eq!(
        n, 0,
        "seed {seed}: {blue} and {green} differ in {n} row(s) ({phase})\nschedule:\n  {schedule}"
    );

    // Every ledgered key holds its last committed value on both sides.
    let mut lost = Vec::new();
    for (s, ledger) in ledgers.iter().enumerate() {
        let keys: Vec<i64> = ledger.keys().copied().collect();
        for table in [&blue, &green] {
            let have = found(&mut c, fx, table, &keys).await;
            for (k, want) in ledger {
                let got = have.get(k);
                if want.as_ref() != got {
                    lost.push(format!(
                        "seed {seed}: {table} key {k} (session {s}, {}): expected {want:?}, found {got:?}",
                        if kinds[s] { "old" } else { "new" }
                    ));
                }
            }
        }
    }
    assert!(
        lost.is_empty(),
        "seed {seed}: {} write(s) lost:\n{}\nschedule:\n  {schedule}",
        lost.len(),
        lost.join("\n")
    );
    let ledgered: usize = ledgers.iter().map(|l| l.len()).sum();
    eprintln!("random_cutover: seed {seed}: {ledgered} ledgered keys all present on both sides");

    let deadlocks = support::deadlocks_logged(fx.db);
    assert!(
        deadlocks.is_empty(),
        "seed {seed}: deadlocks in the server log: {deadlocks:#?}\nschedule:\n  {schedule}"
    );
    assert!(
        tally.on_green.load(Ordering::Relaxed) > 0 && tally.old_commits.load(Ordering::Relaxed) > 0,
        "seed {seed}: the run never wrote green, or no old session wrote"
    );
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_writes_across_cutover_and_rollback_on_the_small_fixture() {
    scenario(&SMALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_writes_across_cutover_and_rollback_on_the_join_fixture() {
    scenario(&JOIN).await;
}
