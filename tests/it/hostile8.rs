//! Third hostile review of the cutover (cutover, rollback, finalize; findings 1 to 6 and 8): a
//! green write whose reverse failed, rebuilt from stale blue by the follower; finalize's gates
//! checked before its locked transaction; a rolled-back straggler's failed reverse retried later
//! over newer blue writes (twice); the old session's reverse-failure check raced by a new
//! session; a second cutover on a validation older than the rollback; a reverse failure committed
//! after the second cutover's gates. Interleavings are made with held transactions and observed
//! in `pg_stat_activity` / `pg_locks`, not slept. Each test ends on the invariant: green =
//! M(blue) (or, while a reverse failure stands, that failure still listed and green still
//! holding the application's write).

use std::process::{Child, Output};
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use crate::support::{
    Problems, assert_invariant, both, command, connect, control_rows, copy_ok, count, empty_db,
    exec, run_within, stdout, wait_child,
};

const SMALL: &str = "tests/fixtures/cutover_small.yaml";
const JOINED: &str = "tests/fixtures/cutover_join.yaml";
const SPLIT: &str = "tests/fixtures/cutover_split.yaml";
const LIMIT: Duration = Duration::from_secs(60);

/// `bluegreen <args>`, which must exit 0; its stdout.
async fn ok(url: &str, args: &[&str]) -> String {
    let out = run_within(url, args, LIMIT).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}: {}",
        args.join(" "),
        both(&out)
    );
    stdout(&out)
}

/// Run `sql` (one statement, autocommit or inside the caller's transaction): Ok, or the error.
async fn try_exec(c: &mut PgConnection, sql: &str) -> Result<(), String> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(c)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn text(c: &mut PgConnection, sql: &str) -> Option<String> {
    sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(c)
        .await
        .unwrap_or_else(|e| panic!("{e}\nin: {sql}"))
}

async fn phase(c: &mut PgConnection) -> String {
    text(c, "SELECT phase FROM bluegreen.runs")
        .await
        .unwrap_or_default()
}

async fn pid(c: &mut PgConnection) -> i64 {
    count(c, "SELECT pg_backend_pid()::int8").await
}

/// A fresh session on the new search_path: `green` first (a session opened after the flip).
async fn green_session(url: &str, green: &str) -> PgConnection {
    let mut c = connect(url).await;
    let path = text(&mut c, "SELECT current_setting('search_path')")
        .await
        .unwrap_or_default();
    assert!(
        path.starts_with(green),
        "search_path {path}, want {green} first"
    );
    c
}

/// A fresh session on blue's search_path (after a rollback): no `green` in it.
async fn blue_session(url: &str, green: &str) -> PgConnection {
    let mut c = connect(url).await;
    let path = text(&mut c, "SELECT current_setting('search_path')")
        .await
        .unwrap_or_default();
    assert!(
        !path.contains(green),
        "search_path {path} still has {green}"
    );
    c
}

/// The server's clock now: bluegreen backends started after it are the next command's.
async fn server_now(c: &mut PgConnection) -> String {
    text(c, "SELECT clock_timestamp()::text").await.unwrap()
}

/// Poll `pred` (a boolean query, on `mon`) until it holds or `child` exits; true when it held.
async fn until_or_exit(mon: &mut PgConnection, pred: &str, child: &mut Child, what: &str) -> bool {
    let started = Instant::now();
    loop {
        if sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(pred.to_string()))
            .fetch_one(&mut *mon)
            .await
            .unwrap_or_else(|e| panic!("{e}\nin: {pred}"))
        {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: not seen within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A bluegreen backend of this database (connected since `since`) blocked by the backend
/// `holder`.
fn blocked_by(holder: i64, since: &str) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'bluegreen' AND backend_start >= '{since}'::timestamptz AND {holder} = ANY (pg_blocking_pids(pid)))"
    )
}

/// A bluegreen backend of this database (connected since `since`) blocked by `holder`, or one
/// that has run a `LOCK TABLE` or `DROP TRIGGER`: the command is past its gates and at its locks.
/// (The last statement stays in pg_stat_activity after a lock timeout, so an attempt that gave
/// up already is seen too.)
fn at_its_locks(holder: i64, since: &str) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'bluegreen' AND backend_start >= '{since}'::timestamptz AND ({holder} = ANY (pg_blocking_pids(pid)) OR query ILIKE 'LOCK TABLE%' OR query ILIKE 'DROP TRIGGER%'))"
    )
}

/// green = M(blue) for the joined mapping, both directions, without the tool's help.
async fn joined_sides_differ(c: &mut PgConnection) -> i64 {
    count(
        c,
        "SELECT (SELECT count(*) FROM (SELECT c.id, c.w_id, c.v::int8, w.name FROM public.c c JOIN public.w w ON w.id = c.w_id
                                       EXCEPT ALL SELECT id, w_id, v, wname FROM joined_green.cj) x)
              + (SELECT count(*) FROM (SELECT id, w_id, v, wname FROM joined_green.cj
                                       EXCEPT ALL SELECT c.id, c.w_id, c.v::int8, w.name FROM public.c c JOIN public.w w ON w.id = c.w_id) y)",
    )
    .await
}

/// The invertible entry of the small mapping, both directions.
async fn acct_sides_differ(c: &mut PgConnection) -> i64 {
    count(
        c,
        "SELECT (SELECT count(*) FROM (SELECT id, owner, balance::int8 FROM public.acct EXCEPT ALL SELECT id, owner, balance FROM small_green.acct) x)
              + (SELECT count(*) FROM (SELECT id, owner, balance FROM small_green.acct EXCEPT ALL SELECT id, owner, balance::int8 FROM public.acct) y)",
    )
    .await
}

const JOINED_BLUE: &str = "CREATE TABLE public.w (id integer PRIMARY KEY, name text NOT NULL);
    CREATE TABLE public.c (id integer PRIMARY KEY, w_id integer NOT NULL REFERENCES public.w, v bigint NOT NULL{check});
    INSERT INTO public.w VALUES (1, 'w1'), (2, 'w2');
    INSERT INTO public.c SELECT i, 1 + i % 2, 10 FROM generate_series(1, 6) i;";

/// The joined mapping's blue tables (c.v with `check` appended), copied and validated.
async fn joined(db: &str, check: &str) -> (String, PgConnection) {
    let url = empty_db(db).await;
    let mut c = connect(&url).await;
    exec(&mut c, &JOINED_BLUE.replace("{check}", check)).await;
    copy_ok(&url, JOINED).await;
    ok(&url, &["validate", "-m", JOINED]).await;
    (url, c)
}

/// The small mapping's blue acct (`extra` appended to its definition, `after` run after it),
/// copied and validated.
async fn small(db: &str, extra: &str, after: &str) -> (String, PgConnection) {
    let url = empty_db(db).await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        &format!(
            "CREATE TABLE public.acct (id serial PRIMARY KEY, owner text NOT NULL, balance integer NOT NULL DEFAULT 0{extra});
             {after}
             INSERT INTO public.acct (owner, balance) SELECT 'o' || i, 100 FROM generate_series(1, 50) i;"
        ),
    )
    .await;
    copy_ok(&url, SMALL).await;
    ok(&url, &["validate", "-m", SMALL]).await;
    (url, c)
}

async fn cut_over(url: &str, mapping: &str) {
    ok(
        url,
        &["cutover", "-m", mapping, "--yes", "--accept-lossy-rollback"],
    )
    .await;
}

/// Third hostile review of the cutover, finding 1: the follower re-derived a key whose green
/// write had a standing reverse failure (an old session renamed the joined row) from the stale
/// blue row, and the retry then "fixed" the failure by copying the clobbered green row to blue:
/// the application's committed v = 5000 was gone on both sides and validate passed. The key
/// must wait: after `sync` green still holds 5000, the failure still stands (blue's CHECK still
/// rejects it) and validate exits 1 naming it; the rest of the rename is applied. Once blue can
/// take the write, `sync` brings it to blue and the rename to the key: green = M(blue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_f1_the_follower_never_rebuilds_a_key_whose_reverse_failed() {
    let (url, mut c) = joined("hostile8_f1", " CHECK (v < 1000)").await;
    cut_over(&url, JOINED).await;
    let mut new = green_session(&url, "joined_green").await;
    // The new session's write: blue's CHECK refuses its reverse; the green write stands.
    exec(&mut new, "UPDATE cj SET v = 5000 WHERE id = 1").await;
    assert_eq!(control_rows(&mut c, "reverse_failures", "joined").await, 1);
    // An old session (still on blue) renames the w row that id 1 joins (w_id = 2).
    let mut old = connect(&url).await;
    exec(&mut old, "SET search_path = public").await;
    let renamed = try_exec(&mut old, "UPDATE w SET name = 'w2-renamed' WHERE id = 2").await;
    eprintln!("the old session's rename: {renamed:?}");
    // The follower's work, and the reverse retry (blue still refuses 5000: exit 1).
    let out = run_within(&url, &["sync", "-m", JOINED], LIMIT).await;
    assert_eq!(
        count(&mut c, "SELECT v FROM joined_green.cj WHERE id = 1").await,
        5000,
        "the new session's committed green write was lost: {}",
        both(&out)
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM bluegreen.reverse_failures WHERE migration = 'joined' AND green_table = 'cj' AND green_key = '[\"1\"]'").await,
        1,
        "the reverse failure of cj key 1 no longer stands, though blue cannot take 5000"
    );
    assert_eq!(
        count(&mut c, "SELECT v FROM public.c WHERE id = 1").await,
        10
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "sync with a reverse failure standing: {}",
        both(&out)
    );
    if renamed.is_ok() {
        // The rename reached every other key of w 2.
        assert_eq!(
            count(
                &mut c,
                "SELECT count(*) FROM joined_green.cj WHERE w_id = 2 AND id <> 1 AND wname = 'w2-renamed'"
            )
            .await,
            2
        );
    }
    let v = run_within(&url, &["validate", "-m", JOINED], LIMIT).await;
    assert_eq!(
        v.status.code(),
        Some(1),
        "validate with a standing reverse failure: {}",
        both(&v)
    );
    assert!(
        stdout(&v).contains("cj") && stdout(&v).contains("[\"1\"]"),
        "validate names the failed key: {}",
        both(&v)
    );
    // The cause fixed (blue takes the write): it reaches blue, the rename reaches the key.
    exec(&mut c, "ALTER TABLE public.c DROP CONSTRAINT c_v_check").await;
    // (One run retries the reverse after the applier has set the key aside again: the key's
    // sync failure may be left for the next run.)
    let first = run_within(&url, &["sync", "-m", JOINED], LIMIT).await;
    assert!(
        matches!(first.status.code(), Some(0 | 1)),
        "{}",
        both(&first)
    );
    ok(&url, &["sync", "-m", JOINED]).await;
    assert_invariant(&url, JOINED).await;
    assert_eq!(control_rows(&mut c, "reverse_failures", "joined").await, 0);
    assert_eq!(
        count(&mut c, "SELECT v FROM public.c WHERE id = 1").await,
        5000
    );
    assert_eq!(
        count(&mut c, "SELECT v FROM joined_green.cj WHERE id = 1").await,
        5000
    );
    assert_eq!(joined_sides_differ(&mut c).await, 0, "green = M(blue)");
    ok(&url, &["validate", "-m", JOINED]).await;
}

/// Third hostile review of the cutover, finding 2: finalize checked "no blue writer seen,
/// nothing pending" once, before its locked transaction: an old session's blue write in flight
/// committed after the check, finalize got its locks once it did and deleted the change log; the
/// write never reached green. finalize must refuse (exit 1), or, if it finalizes, green must hold
/// the write: blue and green never part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_f2_finalize_rechecks_its_gates_under_its_locks() {
    let (url, mut c) = joined("hostile8_f2", "").await;
    // An old session, connected before the flip (blue search_path).
    let mut old = connect(&url).await;
    cut_over(&url, JOINED).await;
    exec(&mut old, "SET search_path = public").await;
    exec(
        &mut old,
        "BEGIN; UPDATE w SET name = 'w2-renamed' WHERE id = 2",
    )
    .await;
    let old_pid = pid(&mut old).await;
    let since = server_now(&mut c).await;
    let mut child = command(&url, &["finalize", "-m", JOINED, "--yes", "--quiet", "60s"])
        .spawn()
        .unwrap();
    // finalize past its gates, waiting for the old session's lock (or at its locks already).
    let seen = until_or_exit(
        &mut c,
        &at_its_locks(old_pid, &since),
        &mut child,
        "finalize at its locks",
    )
    .await;
    exec(&mut old, "COMMIT").await;
    let out: Output = wait_child(child, LIMIT, "finalize".into()).await;
    eprintln!(
        "finalize (at its locks before the commit: {seen}): {}",
        both(&out)
    );
    match out.status.code() {
        Some(0) => {
            // Finalized: nothing syncs any more, so green must hold the write already.
            assert_eq!(phase(&mut c).await, "finalized");
            assert_eq!(
                count(
                    &mut c,
                    "SELECT count(*) FROM joined_green.cj WHERE w_id = 2 AND wname IS DISTINCT FROM 'w2-renamed'"
                )
                .await,
                0,
                "finalized without the old session's committed write: {}",
                both(&out)
            );
        }
        Some(1) => {
            assert_eq!(phase(&mut c).await, "cut_over", "{}", both(&out));
            ok(&url, &["sync", "-m", JOINED]).await;
            assert_eq!(
                count(
                    &mut c,
                    "SELECT count(*) FROM joined_green.cj WHERE w_id = 2 AND wname = 'w2-renamed'"
                )
                .await,
                3
            );
            assert_invariant(&url, JOINED).await;
            ok(&url, &["validate", "-m", JOINED]).await;
        }
        _ => panic!(
            "finalize with an old session's write in flight must refuse (exit 1) or finalize holding it: {}",
            both(&out)
        ),
    }
    assert_eq!(
        joined_sides_differ(&mut c).await,
        0,
        "blue and green parted"
    );
}

/// Third hostile review of the cutover, finding 3: after a rollback a green straggler's write
/// whose reverse failed (blue FK: the parent not there yet) was recorded and retried by `sync` as
/// a whole-row green -> blue upsert, which waited for a blue application's row lock and then
/// wrote green's stale v over its committed v = 7. The straggler's write must fail in its own
/// statement; the blue application's two committed writes (the parent, v = 7) survive on both
/// sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_f3_after_a_rollback_a_stragglers_failed_reverse_fails_its_statement() {
    let (url, mut c) = joined("hostile8_f3", "").await;
    cut_over(&url, JOINED).await;
    let mut straggler = green_session(&url, "joined_green").await;
    ok(&url, &["rollback", "-m", JOINED, "--yes"]).await;
    ok(&url, &["sync", "-m", JOINED]).await;
    let mut p = Problems::default();
    // The straggler moves id 1 to w 99, which blue does not have yet.
    let r = try_exec(&mut straggler, "UPDATE cj SET w_id = 99 WHERE id = 1").await;
    p.check(r.is_err(), || {
        "the straggler's write whose reverse fails (no w 99 in blue) succeeded; it must fail in its own statement".into()
    });
    if r.is_err() {
        assert_eq!(
            count(
                &mut c,
                "SELECT w_id::int8 FROM joined_green.cj WHERE id = 1"
            )
            .await,
            2,
            "the failed statement's write is not committed"
        );
        assert_eq!(control_rows(&mut c, "reverse_failures", "joined").await, 0);
    }
    // The blue application: the parent arrives, then v of id 1, in flight while sync runs.
    let mut app = blue_session(&url, "joined_green").await;
    exec(&mut app, "INSERT INTO w VALUES (99, 'w99')").await;
    exec(&mut app, "BEGIN; UPDATE c SET v = 7 WHERE id = 1").await;
    let app_pid = pid(&mut app).await;
    let since = server_now(&mut c).await;
    let mut child = command(&url, &["sync", "-m", JOINED]).spawn().unwrap();
    let waited = until_or_exit(&mut c, &blocked_by(app_pid, &since), &mut child, "sync").await;
    exec(&mut app, "COMMIT").await;
    let out = wait_child(child, LIMIT, "sync".into()).await;
    eprintln!(
        "sync (waited for the application: {waited}): {}",
        both(&out)
    );
    ok(&url, &["sync", "-m", JOINED]).await;
    let blue_v = count(&mut c, "SELECT v FROM public.c WHERE id = 1").await;
    let green_v = count(&mut c, "SELECT v FROM joined_green.cj WHERE id = 1").await;
    p.check(blue_v == 7 && green_v == 7, || {
        format!("the blue application's committed v = 7 was lost: blue {blue_v}, green {green_v}")
    });
    p.check(
        count(&mut c, "SELECT count(*) FROM public.w WHERE id = 99").await == 1,
        || "the blue application's w 99 was lost".into(),
    );
    p.assert_none();
    assert_eq!(control_rows(&mut c, "reverse_failures", "joined").await, 0);
    assert_invariant(&url, JOINED).await;
    assert_eq!(joined_sides_differ(&mut c).await, 0, "green = M(blue)");
    ok(&url, &["validate", "-m", JOINED]).await;
}

/// Third hostile review of the cutover, finding 4: second review F1 again in the rolled-back
/// phase: a green straggler's column-owner row inserted before its row owner's was recorded as a
/// reverse failure, the row owner's insert then re-derived every row-local entry from blue (the
/// partner too: addresses.country reset to blue's NULL), and the retry made that permanent. The
/// column owner's insert must fail in the straggler's own statement; the committed writes after
/// it (the straggler's row-owner insert, a blue application's country) survive on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_f4_after_a_rollback_a_column_owners_early_row_fails_its_statement() {
    let url = empty_db("hostile8_f4").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.customer (id integer PRIMARY KEY, name text NOT NULL, country text);
         INSERT INTO public.customer SELECT i, 'c' || i, 'de' FROM generate_series(1, 5) i;",
    )
    .await;
    copy_ok(&url, SPLIT).await;
    ok(&url, &["validate", "-m", SPLIT]).await;
    ok(&url, &["cutover", "-m", SPLIT, "--yes"]).await;
    let mut straggler = green_session(&url, "split_green").await;
    ok(&url, &["rollback", "-m", SPLIT, "--yes"]).await;
    ok(&url, &["sync", "-m", SPLIT]).await;
    let mut p = Problems::default();
    let r = try_exec(&mut straggler, "INSERT INTO addresses VALUES (101, 'it')").await;
    p.check(r.is_err(), || {
        "the straggler's column-owner insert (no blue customer 101 yet) succeeded; it must fail in its own statement".into()
    });
    if r.is_err() {
        assert_eq!(
            count(
                &mut c,
                "SELECT count(*) FROM split_green.addresses WHERE id = 101"
            )
            .await,
            0,
            "the failed statement's row is not committed"
        );
        assert_eq!(control_rows(&mut c, "reverse_failures", "split").await, 0);
    }
    exec(
        &mut straggler,
        "INSERT INTO customers (id, name) VALUES (101, 'late')",
    )
    .await;
    if r.is_ok() {
        // What the straggler committed must still be there.
        let country = text(
            &mut c,
            "SELECT country FROM split_green.addresses WHERE id = 101",
        )
        .await;
        p.check(country.as_deref() == Some("it"), || {
            format!("the straggler's committed addresses.country 'it' became {country:?}")
        });
    }
    let mut app = blue_session(&url, "split_green").await;
    exec(
        &mut app,
        "UPDATE customer SET country = 'fr' WHERE id = 101",
    )
    .await;
    let out = run_within(&url, &["sync", "-m", SPLIT], LIMIT).await;
    eprintln!("sync: {}", both(&out));
    let blue = text(
        &mut c,
        "SELECT name || '/' || coalesce(country, '-') FROM public.customer WHERE id = 101",
    )
    .await;
    p.check(blue.as_deref() == Some("late/fr"), || {
        format!("blue customer 101 is {blue:?}, want late/fr (both committed writes)")
    });
    let green = text(
        &mut c,
        "SELECT c.name || '/' || coalesce(c.country_code, '-') || '/' || coalesce(a.country, '-') FROM split_green.customers c JOIN split_green.addresses a USING (id) WHERE id = 101",
    )
    .await;
    p.check(green.as_deref() == Some("late/FR/fr"), || {
        format!("green customers/addresses 101 is {green:?}, want late/FR/fr")
    });
    p.assert_none();
    assert_eq!(control_rows(&mut c, "reverse_failures", "split").await, 0);
    assert_invariant(&url, SPLIT).await;
    ok(&url, &["validate", "-m", SPLIT]).await;
}

/// Third hostile review of the cutover, finding 5: second review F2's fix (an old session's
/// write to a key whose reverse failed is refused) read reverse_failures before its in-statement
/// re-derive waited for the green row: a new session whose reverse failed, committing while the
/// old session's step waited, had its committed green write overwritten by the stale blue row
/// (35 of 40 lost). Per round: the old session's statement waits for the new session's green row
/// lock, the new session commits; either the old session got an error or green keeps the new
/// session's value with its failure standing. Nothing is lost after `sync` either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_f5_an_old_session_racing_a_new_sessions_failed_reverse_loses_nothing() {
    const ROUNDS: i64 = 20;
    let (url, mut c) = small("hostile8_f5", " CHECK (balance >= 0)", "").await;
    cut_over(&url, SMALL).await;
    let mut p = Problems::default();
    let (mut raced, mut refused) = (0, 0);
    for i in 1..=ROUNDS {
        let mut new = green_session(&url, "small_green").await;
        let mut old = connect(&url).await;
        exec(&mut old, "SET search_path = public").await;
        // The new session's write: blue's CHECK refuses its reverse, the green write stands.
        exec(
            &mut new,
            &format!("BEGIN; UPDATE acct SET balance = -5 WHERE id = {i}"),
        )
        .await;
        let new_pid = pid(&mut new).await;
        let old_pid = pid(&mut old).await;
        let racer = tokio::spawn(async move {
            let r = try_exec(
                &mut old,
                &format!("UPDATE acct SET owner = owner || '+' WHERE id = {i}"),
            )
            .await;
            (old, r)
        });
        // Commit while the old session's statement waits for the green row (its step gives way
        // after at most 50 ms: then it has failed already, and that is a refusal too).
        let started = Instant::now();
        loop {
            let waiting = count(
                &mut c,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {old_pid} AND {new_pid} = ANY (pg_blocking_pids(pid))"),
            )
            .await
                > 0;
            if waiting {
                raced += 1;
                break;
            }
            if racer.is_finished() || started.elapsed() > Duration::from_secs(5) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        exec(&mut new, "COMMIT").await;
        let (_old, r) = racer.await.unwrap();
        if r.is_err() {
            refused += 1;
        }
        let g = count(
            &mut c,
            &format!("SELECT balance FROM small_green.acct WHERE id = {i}"),
        )
        .await;
        let failed = count(
            &mut c,
            &format!("SELECT count(*) FROM bluegreen.reverse_failures WHERE migration = 'small' AND green_table = 'acct' AND green_key = '[\"{i}\"]'"),
        )
        .await;
        p.check(r.is_err() || (g == -5 && failed == 1), || {
            format!("round {i}: the old session's write went through and the new session's committed balance -5 is {g} (failure recorded: {failed})")
        });
    }
    eprintln!("{ROUNDS} rounds: old statement seen waiting {raced}, refused {refused}");
    assert!(
        raced > 0,
        "the old session was never seen waiting for the green row: the race was not exercised"
    );
    let out = run_within(&url, &["sync", "-m", SMALL], LIMIT).await;
    p.check(out.status.code() == Some(1), || {
        format!("sync (blue still refuses -5) must exit 1: {}", both(&out))
    });
    let kept = count(
        &mut c,
        &format!("SELECT count(*) FROM small_green.acct WHERE id <= {ROUNDS} AND balance = -5"),
    )
    .await;
    p.check(kept == ROUNDS, || {
        format!("after sync green keeps {kept} of the {ROUNDS} new sessions' committed balances")
    });
    let standing = control_rows(&mut c, "reverse_failures", "small").await;
    p.check(standing == ROUNDS, || {
        format!("{standing} reverse failures stand, want {ROUNDS} (blue still refuses -5)")
    });
    p.assert_none();
    // The application fixes its balances: they reach blue; green = M(blue).
    let mut new = green_session(&url, "small_green").await;
    exec(
        &mut new,
        &format!("UPDATE acct SET balance = 5 WHERE id <= {ROUNDS}"),
    )
    .await;
    ok(&url, &["sync", "-m", SMALL]).await;
    assert_eq!(control_rows(&mut c, "reverse_failures", "small").await, 0);
    assert_invariant(&url, SMALL).await;
    assert_eq!(acct_sides_differ(&mut c).await, 0, "green = M(blue)");
    assert_eq!(
        count(
            &mut c,
            &format!("SELECT count(*) FROM public.acct WHERE id <= {ROUNDS} AND balance = 5")
        )
        .await,
        ROUNDS
    );
    ok(&url, &["validate", "-m", SMALL]).await;
}

/// Third hostile review of the cutover, finding 6: a blue BEFORE trigger rewrote what a reverse
/// wrote (owner lower-cased) and the forward echo skipped the entry, so green kept 'Bob' and blue
/// held 'bob'; after the rollback green != M(blue) with nothing pending, and the second cutover
/// accepted the validation made before the first one and flipped. It must refuse (exit 1),
/// changing nothing, until a validation newer than the rollback passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_f6_a_second_cutover_needs_a_validation_newer_than_the_rollback() {
    let (url, mut c) = small(
        "hostile8_f6",
        "",
        "CREATE FUNCTION public.norm() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN NEW.owner := lower(NEW.owner); RETURN NEW; END$$;
         CREATE TRIGGER norm BEFORE INSERT OR UPDATE ON public.acct FOR EACH ROW EXECUTE FUNCTION public.norm();",
    )
    .await;
    cut_over(&url, SMALL).await;
    let mut new = green_session(&url, "small_green").await;
    exec(&mut new, "UPDATE acct SET owner = 'Bob' WHERE id = 1").await;
    ok(&url, &["rollback", "-m", SMALL, "--yes"]).await;
    ok(&url, &["sync", "-m", SMALL]).await;
    let path = "SELECT coalesce((SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting WHERE setrole = 0 AND setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())), '')";
    let before = text(&mut c, path).await;
    let out = run_within(
        &url,
        &["cutover", "-m", SMALL, "--yes", "--accept-lossy-rollback"],
        LIMIT,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "the second cutover on the validation made before the first one: {}",
        both(&out)
    );
    assert!(
        both(&out).contains("before the last rollback"),
        "{}",
        both(&out)
    );
    assert_eq!(phase(&mut c).await, "rolled_back");
    assert_eq!(
        text(&mut c, path).await,
        before,
        "the search_path was flipped"
    );
    // A validation now finds what the old one could not (green 'Bob', blue 'bob').
    let v = run_within(&url, &["validate", "-m", SMALL], LIMIT).await;
    eprintln!("validate after the rollback: {}", both(&v));
    assert!(matches!(v.status.code(), Some(0 | 1)), "{}", both(&v));
    // Blue rewrites the row (its trigger again): green follows, validation passes, cut over.
    exec(&mut c, "UPDATE public.acct SET owner = owner WHERE id = 1").await;
    assert_invariant(&url, SMALL).await;
    ok(&url, &["validate", "-m", SMALL]).await;
    cut_over(&url, SMALL).await;
    ok(&url, &["validate", "-m", SMALL]).await;
    assert_eq!(acct_sides_differ(&mut c).await, 0, "green = M(blue)");
    assert_eq!(
        text(&mut c, "SELECT owner FROM small_green.acct WHERE id = 1").await,
        text(&mut c, "SELECT owner FROM public.acct WHERE id = 1").await
    );
}

/// Third hostile review of the cutover, finding 8: after a rollback a green straggler's write
/// whose reverse failed committed after the second cutover's gates ran and before its fence took
/// its locks; the fence re-checked the change log and forward failures, not reverse failures,
/// and flipped with green != M(blue) and a standing reverse failure. First as the review did it
/// (the straggler's write in flight while the cutover starts: it must fail, or the cutover must
/// refuse); then with a reverse failure committed by a transaction the fence waits for (one
/// recorded the way the reverse records them), which the fence must refuse, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_f8_the_second_cutovers_fence_rechecks_reverse_failures() {
    let (url, mut c) = small("hostile8_f8", " CHECK (balance >= 0)", "").await;
    let mut straggler = straggler_after_rollback(&url, SMALL, "small_green").await;
    ok(&url, &["validate", "-m", SMALL]).await;
    let straggler_pid = pid(&mut straggler).await;
    let args = ["cutover", "-m", SMALL, "--yes", "--accept-lossy-rollback"];
    let path = "SELECT coalesce((SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting WHERE setrole = 0 AND setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())), '')";
    // 1. As the review did it: the straggler's write (blue's CHECK refuses -5) in flight.
    exec(&mut straggler, "BEGIN").await;
    let r = try_exec(&mut straggler, "UPDATE acct SET balance = -5 WHERE id = 1").await;
    if let Err(e) = &r {
        // Failed in the straggler's own statement (findings 3 and 4): nothing to fence.
        eprintln!("the straggler's write failed: {e}");
        exec(&mut straggler, "ROLLBACK").await;
    } else {
        let since = server_now(&mut c).await;
        let mut child = command(&url, &args).spawn().unwrap();
        let seen = until_or_exit(
            &mut c,
            &at_its_locks(straggler_pid, &since),
            &mut child,
            "cutover at its fence",
        )
        .await;
        exec(&mut straggler, "COMMIT").await;
        let out = wait_child(child, LIMIT, args.join(" ")).await;
        assert!(seen, "the cutover ended before its fence: {}", both(&out));
        assert!(
            matches!(out.status.code(), Some(1 | 2)),
            "the second cutover flipped with a reverse failure committed after its gates: {}",
            both(&out)
        );
        assert_eq!(phase(&mut c).await, "rolled_back", "{}", both(&out));
        assert_eq!(control_rows(&mut c, "reverse_failures", "small").await, 1);
        exec(&mut straggler, "UPDATE acct SET balance = 5 WHERE id = 1").await;
        ok(&url, &["sync", "-m", SMALL]).await;
    }
    assert_eq!(control_rows(&mut c, "reverse_failures", "small").await, 0);
    // 2. A reverse failure committed after the gates, by a transaction holding the green and
    //    blue rows the fence needs (a green write that reached blue, and a failure recorded as
    //    the reverse records one): the fence waits for it, then must see the failure.
    let before = text(&mut c, path).await;
    exec(
        &mut straggler,
        "BEGIN; UPDATE acct SET balance = 7 WHERE id = 2;
         INSERT INTO bluegreen.reverse_failures (migration, green_table, green_key, error)
           VALUES ('small', 'acct', '[\"2\"]', '23514: new row for relation \"acct\" violates check constraint \"acct_balance_check\"')",
    )
    .await;
    let since = server_now(&mut c).await;
    let mut child = command(&url, &args).spawn().unwrap();
    let seen = until_or_exit(
        &mut c,
        &at_its_locks(straggler_pid, &since),
        &mut child,
        "cutover at its fence",
    )
    .await;
    exec(&mut straggler, "COMMIT").await;
    let out = wait_child(child, LIMIT, args.join(" ")).await;
    assert!(seen, "the cutover ended before its fence: {}", both(&out));
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "the second cutover flipped with a reverse failure committed after its gates: {}",
        both(&out)
    );
    assert!(both(&out).contains("nothing was changed"), "{}", both(&out));
    assert_eq!(phase(&mut c).await, "rolled_back", "{}", both(&out));
    assert_eq!(
        text(&mut c, path).await,
        before,
        "the search_path was flipped"
    );
    assert_eq!(control_rows(&mut c, "reverse_failures", "small").await, 1);
    // `sync` retries it (blue takes 7), then the cutover goes through: green = M(blue).
    ok(&url, &["sync", "-m", SMALL]).await;
    assert_eq!(control_rows(&mut c, "reverse_failures", "small").await, 0);
    assert_invariant(&url, SMALL).await;
    ok(&url, &["validate", "-m", SMALL]).await;
    cut_over(&url, SMALL).await;
    ok(&url, &["sync", "-m", SMALL]).await;
    ok(&url, &["validate", "-m", SMALL]).await;
    assert_eq!(acct_sides_differ(&mut c).await, 0, "green = M(blue)");
    assert_eq!(
        count(&mut c, "SELECT balance FROM small_green.acct WHERE id = 2").await,
        7
    );
    assert_eq!(
        count(&mut c, "SELECT balance::int8 FROM public.acct WHERE id = 2").await,
        7
    );
}

/// Cut over and rolled back, with a session opened while cut over (still on green: a
/// straggler) and the change log applied; returns the straggler.
async fn straggler_after_rollback(url: &str, mapping: &str, green: &str) -> PgConnection {
    cut_over(url, mapping).await;
    let straggler = green_session(url, green).await;
    ok(url, &["rollback", "-m", mapping, "--yes"]).await;
    ok(url, &["sync", "-m", mapping]).await;
    straggler
}

/// The joined mapping copied, cut over and rolled back, with a straggler.
async fn rolled_back_with_a_straggler(db: &str) -> (String, PgConnection, PgConnection) {
    let (url, c) = joined(db, "").await;
    let straggler = straggler_after_rollback(&url, JOINED, "joined_green").await;
    (url, c, straggler)
}

/// The known limit "after a rollback, a straggler on green and a blue writer on the same row of
/// an entry the follower keeps": the blue application's `+100` committed on blue, its change still
/// waiting for the follower, so green's row is stale; a straggler still on green then adds 5 to
/// the stale value and its reverse wrote it over blue's committed `+100`. The straggler's write
/// now gives way (40001) while a blue write to its row is pending; once the follower applied it,
/// the straggler's retry reads the current value and both writes survive on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rollback_a_stragglers_stale_write_gives_way_to_a_pending_blue_write() {
    let (url, mut c, mut straggler) = rolled_back_with_a_straggler("hostile8_stale").await;
    let mut app = blue_session(&url, "joined_green").await;
    exec(&mut app, "UPDATE c SET v = v + 100 WHERE id = 1").await;
    assert_eq!(
        count(&mut c, "SELECT v FROM joined_green.cj WHERE id = 1").await,
        10,
        "the blue write waits for the follower (cj is the follower's)"
    );
    let r = try_exec(&mut straggler, "UPDATE cj SET v = v + 5 WHERE id = 1").await;
    let blue_v = count(&mut c, "SELECT v FROM public.c WHERE id = 1").await;
    assert_eq!(
        blue_v, 110,
        "the straggler's stale write went over the blue application's committed +100 ({r:?})"
    );
    let e = r.expect_err("the straggler's write on a stale row must give way");
    assert!(
        e.contains("40001") || e.contains("gave way") || e.contains("not reached green"),
        "{e}"
    );
    ok(&url, &["sync", "-m", JOINED]).await;
    exec(&mut straggler, "UPDATE cj SET v = v + 5 WHERE id = 1").await;
    assert_eq!(
        count(&mut c, "SELECT v FROM public.c WHERE id = 1").await,
        115
    );
    assert_eq!(
        count(&mut c, "SELECT v FROM joined_green.cj WHERE id = 1").await,
        115
    );
    // A straggler's write to a row nobody changed on blue goes through as before.
    exec(&mut straggler, "UPDATE cj SET v = v + 1 WHERE id = 2").await;
    assert_eq!(
        count(&mut c, "SELECT v FROM public.c WHERE id = 2").await,
        11
    );
    assert_invariant(&url, JOINED).await;
    assert_eq!(joined_sides_differ(&mut c).await, 0, "green = M(blue)");
    ok(&url, &["validate", "-m", JOINED]).await;
}

/// Hostile review of the stale-straggler rule, finding 1: the applier could not take the green
/// row the straggler held, set the key aside as a sync failure and deleted its change row; the
/// straggler's check, reading only the change log, then let its stale value over the blue
/// application's committed `+100` (and validate passed). A standing sync failure of the row's
/// key now makes the straggler give way too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rollback_a_straggler_gives_way_to_a_blue_write_set_aside_as_a_sync_failure() {
    let (url, mut c, mut straggler) = rolled_back_with_a_straggler("hostile8_stale_failure").await;
    exec(
        &mut straggler,
        "BEGIN; SELECT * FROM cj WHERE id = 1 FOR UPDATE",
    )
    .await;
    let mut app = blue_session(&url, "joined_green").await;
    exec(&mut app, "UPDATE c SET v = v + 100 WHERE id = 1").await;
    // The applier meets the straggler's lock: key 1 set aside, its change row gone.
    let _ = run_within(&url, &["sync", "-m", JOINED], LIMIT).await;
    assert_eq!(
        control_rows(&mut c, "sync_failures", "joined").await,
        1,
        "the applier set key 1 aside"
    );
    let r = try_exec(&mut straggler, "UPDATE cj SET v = v + 5 WHERE id = 1").await;
    let _ = try_exec(&mut straggler, "ROLLBACK").await;
    assert_eq!(
        count(&mut c, "SELECT v FROM public.c WHERE id = 1").await,
        110,
        "the straggler's stale write went over the blue application's +100 ({r:?})"
    );
    assert!(r.is_err(), "the straggler's write must give way");
    ok(&url, &["sync", "-m", JOINED]).await;
    exec(&mut straggler, "UPDATE cj SET v = v + 5 WHERE id = 1").await;
    assert_eq!(
        count(&mut c, "SELECT v FROM public.c WHERE id = 1").await,
        115
    );
    assert_invariant(&url, JOINED).await;
    assert_eq!(joined_sides_differ(&mut c).await, 0, "green = M(blue)");
    ok(&url, &["validate", "-m", JOINED]).await;
}

/// Hostile review of the stale-straggler rule, findings 3 and 4: a straggler's update of a
/// green-only column writes nothing to blue and must not lock the blue row (a blue writer of it
/// does not wait), and a straggler's second write to a row is not held back by the echo of its
/// own first one (no follower running).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rollback_a_straggler_neither_blocks_blue_for_nothing_nor_itself() {
    let (url, mut c, mut straggler) = rolled_back_with_a_straggler("hostile8_stale_self").await;
    exec(
        &mut straggler,
        "BEGIN; UPDATE cj SET wname = 'zz' WHERE id = 2",
    )
    .await;
    let mut app = blue_session(&url, "joined_green").await;
    crate::support::must_not_wait(
        &mut app,
        "a blue write to a row whose green twin a straggler changed only in a green-only column",
        "UPDATE c SET v = v + 1 WHERE id = 2",
        Duration::from_secs(5),
    )
    .await;
    exec(&mut straggler, "ROLLBACK").await;
    ok(&url, &["sync", "-m", JOINED]).await;
    exec(&mut straggler, "UPDATE cj SET v = v + 1 WHERE id = 3").await;
    exec(&mut straggler, "UPDATE cj SET v = v + 1 WHERE id = 3").await;
    assert_eq!(
        count(&mut c, "SELECT v FROM public.c WHERE id = 3").await,
        12
    );
    ok(&url, &["sync", "-m", JOINED]).await;
    assert_invariant(&url, JOINED).await;
    assert_eq!(joined_sides_differ(&mut c).await, 0, "green = M(blue)");
    ok(&url, &["validate", "-m", JOINED]).await;
}

/// Third hostile review of the stale-straggler rule, finding 2: after a rollback a blue insert
/// into a row-local entry's table is re-derived in its own statement (green is current) and
/// logged only for the follower's entries; a straggler's update of that row gave way for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rollback_a_straggler_does_not_give_way_to_a_row_local_write_green_already_has() {
    let (url, mut c) = small("hostile8_stale_local", "", "").await;
    let mut straggler = straggler_after_rollback(&url, SMALL, "small_green").await;
    let mut app = blue_session(&url, "small_green").await;
    exec(
        &mut app,
        "INSERT INTO acct (id, owner, balance) VALUES (1000, 'new', 1)",
    )
    .await;
    exec(
        &mut straggler,
        "UPDATE acct SET balance = balance + 1 WHERE id = 1000",
    )
    .await;
    assert_eq!(
        count(
            &mut c,
            "SELECT balance::int8 FROM public.acct WHERE id = 1000"
        )
        .await,
        2
    );
    ok(&url, &["sync", "-m", SMALL]).await;
    assert_invariant(&url, SMALL).await;
    assert_eq!(acct_sides_differ(&mut c).await, 0);
}
