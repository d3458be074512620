//! One test per problem of the hostile review of live sync (H1..H8), each set up with real
//! concurrent sessions: it fails while the problem is there. Every test ends on the invariant
//! itself (`green.T = M(blue)`, support::assert_invariant or assert_invariant_now), never on a row
//! count.
//!
//! A wait is bounded, never slept through: every bluegreen command runs as a child process under a
//! time limit (killed when over it, failing the test), every application statement under a
//! timeout far above its normal duration.

use std::process::Output;
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use crate::support::{
    self, Problems, assert_invariant, assert_invariant_now, both, connect, copy_ok, count, drain,
    empty_db, exec, run_within, status_json, stderr, stdout,
};

const CHECK: &str = "tests/fixtures/hostile_check.yaml";
const PLAIN: &str = "tests/fixtures/hostile_plain.yaml";
const ACCT: &str = "tests/fixtures/hostile_acct.yaml";
const BOOK: &str = "tests/fixtures/hostile_book.yaml";
const LEGACY: &str = "tests/fixtures/hostile_legacy.yaml";
const PT: &str = "tests/fixtures/hostile_pt.yaml";

/// Far above what any application statement here needs when nothing blocks it.
const NO_WAIT: Duration = Duration::from_secs(10);
/// What a `sync` that must not wait for an open application transaction may take at most.
const QUICK: Duration = Duration::from_secs(15);
/// What any other bluegreen command may take at most (a stall fails the test, never hangs it).
const SLOW: Duration = Duration::from_secs(180);

async fn backend_pid(c: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(c)
        .await
        .unwrap()
}

async fn int(c: &mut PgConnection, sql: &str) -> Option<i32> {
    sqlx::query_scalar::<_, Option<i32>>(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_optional(c)
        .await
        .unwrap_or_else(|e| panic!("{e}\nin: {sql}"))
        .flatten()
}

/// Run `sql` on `c`, which must succeed within [`NO_WAIT`]. Returns how long it took.
async fn must_not_wait(c: &mut PgConnection, what: &str, sql: &str) -> Duration {
    support::must_not_wait(c, what, sql, NO_WAIT).await
}

/// Whether each entry of `mapping` is row-local, as sync classifies it against the database.
async fn row_local(url: &str, mapping: &str) -> Vec<(String, bool)> {
    let m = bluegreen::mapping::load(&support::root().join(mapping)).unwrap();
    let mut c = connect(url).await;
    let cat = bluegreen::control::load_catalog_for_sync(&mut c, &m)
        .await
        .unwrap();
    bluegreen::plan::sync::sync_entries(&m, &cat)
        .iter()
        .map(|e| (e.entry.name.clone(), e.row_local()))
        .collect()
}

/// `(green table, sync key as text, error)` of every recorded failure of `migration`.
async fn failures(c: &mut PgConnection, migration: &str) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT green_table, sync_key::text, error FROM bluegreen.sync_failures WHERE migration = $1 ORDER BY 1, 2",
    )
    .bind(migration)
    .fetch_all(c)
    .await
    .unwrap()
}

/// Change-log rows pending for `migration`, and how many of them a row-local step that gave way
/// logged (`all_entries`).
async fn logged(c: &mut PgConnection, migration: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE all_entries) FROM bluegreen.changes WHERE migration = $1",
    )
    .bind(migration)
    .fetch_one(c)
    .await
    .unwrap()
}

/// `plan --format json` (which must run), and the `sync` object of table `name`.
async fn plan_sync_mode(url: &str, mapping: &str, name: &str) -> (Output, serde_json::Value) {
    let out = run_within(
        url,
        &[
            "plan",
            "-m",
            mapping,
            "--format",
            "json",
            "--profile",
            "none",
        ],
        SLOW,
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("plan --format json: {e}\n{}", both(&out)));
    let t = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("plan has no table {name}: {v}"))
        .clone();
    (out, t["sync"].clone())
}

/// H1: a re-derivation of more than 2000 keys (split into several transactions) keeps the failure
/// recorded by one of them. Blue is truncated and reloaded in one transaction with one row green's
/// CHECK rejects: `sync` exits 1 with exactly that key failed (23514), every other key applied;
/// once blue is fixed, `sync` exits 0 and green = M(blue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_a_split_rederivation_keeps_its_own_failures() {
    let url = empty_db("hostile_h1").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         INSERT INTO public.items SELECT g, g % 1000 FROM generate_series(1, 3000) g;",
    )
    .await;
    copy_ok(&url, CHECK).await;
    assert_eq!(
        row_local(&url, CHECK).await,
        vec![("items".to_string(), true)]
    );
    // Key 1 violates green's CHECK; every other key gets a new value green must follow.
    must_not_wait(
        &mut c,
        "the truncate and reload",
        "BEGIN; TRUNCATE public.items;
         INSERT INTO public.items SELECT g, CASE WHEN g = 1 THEN 1000 ELSE (g * 7) % 1000 END FROM generate_series(1, 3000) g;
         COMMIT",
    )
    .await;
    let out = run_within(&url, &["sync", "-m", CHECK], SLOW).await;
    let mut problems = Problems::default();
    problems.check(out.status.code() == Some(1), || {
        format!("sync must exit 1 with key 1 failed: {}", both(&out))
    });
    let failed = failures(&mut c, "hostile_check").await;
    problems.check(
        failed.len() == 1
            && failed[0].0 == "items"
            && failed[0].1 == "[1]"
            && failed[0].2.starts_with("23514"),
        || format!("expected exactly key [1] failed with 23514 (CHECK), found {failed:?}"),
    );
    let st = status_json(&url, CHECK).await;
    problems.check(st["failures_total"] == 1, || {
        format!("status must show the one failure: {}", st["failures"])
    });
    // Every other key applied: green equals blue off key 1; key 1 keeps its old (valid) row.
    let off = count(
        &mut c,
        "SELECT count(*) FROM (
           (SELECT id, v FROM public.items WHERE id <> 1 EXCEPT ALL SELECT id, v FROM hostile_check.items WHERE id <> 1)
           UNION ALL
           (SELECT id, v FROM hostile_check.items WHERE id <> 1 EXCEPT ALL SELECT id, v FROM public.items WHERE id <> 1)) d",
    )
    .await;
    problems.check(off == 0, || {
        format!("{off} row(s) of keys other than 1 differ between green and blue after sync")
    });
    let v1 = int(&mut c, "SELECT v FROM hostile_check.items WHERE id = 1").await;
    problems.check(v1 == Some(1), || {
        format!("green key 1 holds {v1:?}, expected its old value 1")
    });
    let left = logged(&mut c, "hostile_check").await;
    problems.check(left.0 == 0, || {
        format!("{} change(s) left in the log after sync", left.0)
    });
    problems.assert_none();

    // Blue fixed: nothing left, green = M(blue).
    must_not_wait(
        &mut c,
        "the fix",
        "UPDATE public.items SET v = 999 WHERE id = 1",
    )
    .await;
    let out = run_within(&url, &["sync", "-m", CHECK], SLOW).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let st = status_json(&url, CHECK).await;
    assert_eq!(st["failures_total"], 0, "{st}");
    assert_invariant(&url, CHECK).await;
}

/// H2 (a, b): an application transaction holding an uncommitted child row (its foreign-key check
/// holds the parent `FOR KEY SHARE`, in blue and in green) makes no other application statement on
/// the parent wait or give way to the change log, and no applier or validate wait for it.
///
/// "Does not wait" is made exact: the writers set `deadlock_timeout = 2ms` (they are superusers
/// here), which brings a row-local step's lock wait down to 1 ms; any wait at all would send
/// their rows to the change log (`all_entries`), which the test checks stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2ab_an_open_child_insert_stalls_no_one() {
    let url = empty_db("hostile_h2ab").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.accounts (id integer PRIMARY KEY, email text NOT NULL UNIQUE, name text);
         CREATE TABLE public.orders (id integer PRIMARY KEY, account_id integer NOT NULL REFERENCES public.accounts (id), amount integer);
         INSERT INTO public.accounts SELECT g, 'a' || g || '@example.org', 'name ' || g FROM generate_series(1, 100) g;
         INSERT INTO public.orders SELECT g, 1 + g % 100, g FROM generate_series(1, 1000) g;",
    )
    .await;
    copy_ok(&url, ACCT).await;
    assert_eq!(
        row_local(&url, ACCT).await,
        vec![("accounts".to_string(), true), ("orders".to_string(), true)]
    );
    assert_eq!(logged(&mut c, "hostile_acct").await, (0, 0));

    let mut b = connect(&url).await;
    must_not_wait(
        &mut b,
        "B's child insert",
        "BEGIN; INSERT INTO public.orders VALUES (100001, 1, 5)",
    )
    .await;
    let mut problems = Problems::default();

    // (a) Other application statements on account 1, re-derived in their own statements.
    let mut a = connect(&url).await;
    exec(&mut a, "SET deadlock_timeout = '2ms'").await;
    for (what, sql) in [
        (
            "A's update of the parent",
            "UPDATE public.accounts SET name = 'x' WHERE id = 1",
        ),
        (
            "A's second child of the parent",
            "INSERT INTO public.orders VALUES (100002, 1, 7)",
        ),
        (
            "A's update of the parent's other children",
            "UPDATE public.orders SET amount = amount + 1 WHERE account_id = 1",
        ),
        (
            "A's update of the parent's unique key",
            "UPDATE public.accounts SET email = 'renamed@example.org' WHERE id = 2",
        ),
    ] {
        let took = must_not_wait(&mut a, what, sql).await;
        let (_, fell_back) = logged(&mut c, "hostile_acct").await;
        problems.check(fell_back == 0, || {
            format!("{what} ({took:?}) waited and gave way to the change log beside B's open insert: {sql}")
        });
    }
    let name = sqlx::query_scalar::<_, Option<String>>(
        "SELECT name FROM hostile_acct.accounts WHERE id = 1",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    problems.check(name.as_deref() == Some("x"), || {
        format!("A's update was not re-derived in its statement: green name {name:?}")
    });
    problems.check(
        count(
            &mut c,
            "SELECT count(*) FROM hostile_acct.orders WHERE id = 100002",
        )
        .await
            == 1,
        || "A's child insert is not in green".into(),
    );
    assert_invariant_now(&url, ACCT).await;

    // (b) Pending work for account 1 in the change log (a step that gave way to a session holding
    // the green row), then `sync` and `validate` with B still open.
    let mut h = connect(&url).await;
    exec(
        &mut h,
        "BEGIN; SELECT 1 FROM hostile_acct.accounts WHERE id = 1 FOR NO KEY UPDATE",
    )
    .await;
    let mut a2 = connect(&url).await;
    must_not_wait(
        &mut a2,
        "A's update while green's row is held",
        "UPDATE public.accounts SET name = 'y' WHERE id = 1",
    )
    .await;
    exec(&mut h, "ROLLBACK").await;
    let (pending, fell_back) = logged(&mut c, "hostile_acct").await;
    assert!(
        fell_back > 0,
        "the step did not give way to the change log while the green row was held (pending {pending})"
    );
    let out = run_within(&url, &["sync", "-m", ACCT], QUICK).await;
    problems.check(out.status.code() == Some(0), || {
        format!(
            "sync beside B's open insert must apply account 1 and exit 0: {}",
            both(&out)
        )
    });
    let name = sqlx::query_scalar::<_, Option<String>>(
        "SELECT name FROM hostile_acct.accounts WHERE id = 1",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    problems.check(name.as_deref() == Some("y"), || {
        format!("sync did not apply account 1 beside B's open insert: green name {name:?}")
    });
    problems.check(logged(&mut c, "hostile_acct").await.0 == 0, || {
        "sync left changes in the log".into()
    });
    let out = run_within(&url, &["validate", "-m", ACCT], Duration::from_secs(60)).await;
    problems.check(out.status.code() == Some(0), || {
        format!("validate beside B's open insert: {}", both(&out))
    });
    problems.assert_none();
    exec(&mut b, "COMMIT").await;
    assert_invariant_now(&url, ACCT).await;
    assert_invariant(&url, ACCT).await;
}

/// H2 (c): a blue row an application transaction holds `FOR UPDATE` stalls neither the copy's
/// catch-up nor `sync`: the held key is set aside (failed with 55P03, or left pending), every other
/// key applies, and a later `sync` after the holder commits applies the held key too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_a_held_blue_row_is_set_aside_not_waited_for() {
    let url = empty_db("hostile_h2c").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         INSERT INTO public.items SELECT g, 0 FROM generate_series(1, 100) g;",
    )
    .await;
    let out = run_within(&url, &["prepare", "-m", CHECK], SLOW).await;
    assert!(out.status.success(), "{}", both(&out));
    // Captured changes, then a reader holding key 1 through the copy.
    must_not_wait(
        &mut c,
        "the captured updates",
        "UPDATE public.items SET v = 5 WHERE id = 1; UPDATE public.items SET v = 7 WHERE id = 2;",
    )
    .await;
    assert!(logged(&mut c, "hostile_check").await.0 >= 2);
    let mut b = connect(&url).await;
    must_not_wait(
        &mut b,
        "B's lock",
        "BEGIN; SELECT id FROM public.items WHERE id = 1 FOR UPDATE",
    )
    .await;
    let mut problems = Problems::default();
    let started = Instant::now();
    let out = run_within(&url, &["copy", "-m", CHECK], Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "copy beside B's row lock: {}",
        both(&out)
    );
    eprintln!("H2c: copy beside the held row took {took:?}");
    let key1_set_aside = |failed: &[(String, String, String)], pending: i64| {
        pending > 0
            || failed
                .iter()
                .any(|(t, k, e)| t == "items" && k == "[1]" && e.starts_with("55P03"))
    };
    let failed = failures(&mut c, "hostile_check").await;
    let (pending, _) = logged(&mut c, "hostile_check").await;
    problems.check(key1_set_aside(&failed, pending), || {
        format!("after the copy key 1 is neither failed (55P03) nor pending: {failed:?}")
    });
    problems.check(failed.iter().all(|(_, k, _)| k == "[1]"), || {
        format!("keys other than 1 failed in the catch-up: {failed:?}")
    });
    problems.check(
        int(&mut c, "SELECT v FROM hostile_check.items WHERE id = 2").await == Some(7),
        || "key 2 not applied by the copy".into(),
    );
    exec(&mut b, "COMMIT").await;
    let out = run_within(&url, &["sync", "-m", CHECK], QUICK).await;
    problems.check(out.status.code() == Some(0), || {
        format!("sync after B committed: {}", both(&out))
    });
    problems.check(failures(&mut c, "hostile_check").await.is_empty(), || {
        "failures left after B committed and sync ran".into()
    });
    assert_invariant_now(&url, CHECK).await;

    // Live: keys 1 and 2 pending in the change log (their steps gave way to a session holding the
    // green rows), then B holds blue row 1 while `sync` runs.
    let mut h = connect(&url).await;
    exec(
        &mut h,
        "BEGIN; SELECT 1 FROM hostile_check.items WHERE id IN (1, 2) FOR UPDATE",
    )
    .await;
    must_not_wait(
        &mut c,
        "the updates while green's rows are held",
        "UPDATE public.items SET v = 15 WHERE id = 1; UPDATE public.items SET v = 17 WHERE id = 2;",
    )
    .await;
    exec(&mut h, "ROLLBACK").await;
    let (_, fell_back) = logged(&mut c, "hostile_check").await;
    assert!(fell_back >= 2, "the steps did not give way ({fell_back})");
    must_not_wait(
        &mut b,
        "B's lock",
        "BEGIN; SELECT id FROM public.items WHERE id = 1 FOR UPDATE",
    )
    .await;
    let started = Instant::now();
    let out = run_within(&url, &["sync", "-m", CHECK], QUICK).await;
    eprintln!("H2c: sync beside the held row took {:?}", started.elapsed());
    problems.check(out.status.code() == Some(1), || {
        format!(
            "sync beside B's row lock must exit 1 (key 1 left): {}",
            both(&out)
        )
    });
    problems.check(
        int(&mut c, "SELECT v FROM hostile_check.items WHERE id = 2").await == Some(17),
        || "sync did not apply key 2 beside B's lock on key 1".into(),
    );
    problems.check(
        int(&mut c, "SELECT v FROM hostile_check.items WHERE id = 1").await == Some(5),
        || "key 1 changed in green while B held it".into(),
    );
    let failed = failures(&mut c, "hostile_check").await;
    let (pending, _) = logged(&mut c, "hostile_check").await;
    problems.check(key1_set_aside(&failed, pending), || {
        format!("key 1 is neither failed (55P03) nor pending: {failed:?}")
    });
    exec(&mut b, "COMMIT").await;
    let out = run_within(&url, &["sync", "-m", CHECK], QUICK).await;
    problems.check(out.status.code() == Some(0), || {
        format!("sync after B committed: {}", both(&out))
    });
    problems.check(
        int(&mut c, "SELECT v FROM hostile_check.items WHERE id = 1").await == Some(15),
        || "key 1 not applied after B committed".into(),
    );
    problems.assert_none();
    assert_invariant_now(&url, CHECK).await;
    assert_invariant(&url, CHECK).await;
}

/// Whether some bluegreen session waits for a lock backend `pid` holds.
async fn bluegreen_blocked_by(probe: &mut PgConnection, pid: i32) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'bluegreen' AND $1 = ANY (pg_blocking_pids(pid)))",
    )
    .bind(pid)
    .fetch_one(probe)
    .await
    .unwrap()
}

/// H3: with `deadlock_timeout = 20ms` (set for this test's database only), an applier holding key
/// 1 `FOR SHARE` while it waits for key 2, which an application transaction W holds and then
/// follows with key 1, never makes W the deadlock victim: the applier's lock waits stay below the
/// deadlock check. Repeated, each time with a full re-derive (a TRUNCATE) so the applier takes every
/// key's blue row while W is between its two updates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_an_applier_never_makes_the_application_the_deadlock_victim() {
    let url = empty_db("hostile_h3").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         INSERT INTO public.items SELECT g, g FROM generate_series(1, 20) g;
         ALTER DATABASE hostile_h3 SET deadlock_timeout = '20ms';",
    )
    .await;
    let mut w = connect(&url).await;
    let dt: String = sqlx::query_scalar("SHOW deadlock_timeout")
        .fetch_one(&mut w)
        .await
        .unwrap();
    assert_eq!(
        dt, "20ms",
        "the database setting does not reach new sessions"
    );
    copy_ok(&url, PLAIN).await;
    let w_pid = backend_pid(&mut w).await;
    let mut probe = connect(&url).await;
    let mut problems = Problems::default();
    let (mut crossed, rounds) = (0, 12);
    for i in 0..rounds {
        exec(
            &mut c,
            "BEGIN; TRUNCATE public.items; INSERT INTO public.items SELECT g, g FROM generate_series(1, 20) g; COMMIT",
        )
        .await;
        must_not_wait(
            &mut w,
            "W's first update",
            "BEGIN; UPDATE public.items SET v = v + 1 WHERE id = 2",
        )
        .await;
        let sync = tokio::spawn({
            let url = url.clone();
            async move { run_within(&url, &["sync", "-m", PLAIN], SLOW).await }
        });
        // W's second update once the applier waits for W's first (or a varying moment later).
        let start = Instant::now();
        let mut seen = false;
        while !sync.is_finished() && start.elapsed() < Duration::from_secs(20) {
            if bluegreen_blocked_by(&mut probe, w_pid).await {
                seen = true;
                break;
            }
        }
        if seen {
            crossed += 1;
        }
        if i % 3 == 1 {
            tokio::time::sleep(Duration::from_millis(5 * i)).await;
        }
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            sqlx::raw_sql("UPDATE public.items SET v = v + 1 WHERE id = 1").execute(&mut w),
        )
        .await;
        match r {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.check(false, || {
                format!(
                    "round {i}: W's second update failed (applier seen waiting for W: {seen}): {e}"
                )
            }),
            Err(_) => panic!("round {i}: W's second update waited 30 s"),
        }
        // COMMIT of an aborted transaction rolls back; both end it.
        exec(&mut w, "COMMIT").await;
        let out = sync.await.unwrap();
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", both(&out));
    }
    eprintln!("H3: the applier waited for W in {crossed} of {rounds} rounds");
    assert!(
        crossed > 0,
        "the applier never waited for W: the interleaving was never exercised"
    );
    problems.assert_none();
    exec(&mut c, "ALTER DATABASE hostile_h3 RESET deadlock_timeout").await;
    drain(&url, PLAIN).await;
    let st = status_json(&url, PLAIN).await;
    assert_eq!(st["failures_total"], 0, "{st}");
    assert_invariant(&url, PLAIN).await;
}

/// H4: a green exclusion constraint blue does not have makes the entry the follower's (`plan`
/// says so): an overlapping insert never fails the application (it is a sync failure instead), and
/// two sessions inserting crossing overlaps never deadlock in the application. Once blue drops
/// the overlapping rows, nothing is left and green = M(blue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h4_an_exclusion_constraint_makes_the_entry_the_followers() {
    let url = empty_db("hostile_h4").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.bookings (id integer PRIMARY KEY, during int4range NOT NULL);
         INSERT INTO public.bookings SELECT g, int4range(g * 10, g * 10 + 5) FROM generate_series(1, 100) g;",
    )
    .await;
    let mut problems = Problems::default();
    let (out, mode) = plan_sync_mode(&url, BOOK, "bookings").await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    problems.check(
        mode["mode"] == "follower"
            && mode["reason"]
                .as_str()
                .is_some_and(|r| r.contains("exclusion")),
        || format!("plan must show bookings kept by the follower (exclusion constraint): {mode}"),
    );
    let text = run_within(&url, &["plan", "-m", BOOK, "--profile", "none"], SLOW).await;
    problems.check(stdout(&text).contains("live sync: follower"), || {
        format!("plan's text does not show the follower: {}", stdout(&text))
    });
    copy_ok(&url, BOOK).await;
    let modes = row_local(&url, BOOK).await;
    problems.check(modes == vec![("bookings".to_string(), false)], || {
        format!("sync keeps bookings row-local: {modes:?}")
    });

    must_not_wait(
        &mut c,
        "an overlapping insert",
        "INSERT INTO public.bookings VALUES (1001, int4range(11, 13))",
    )
    .await;
    let mut s1 = connect(&url).await;
    let mut s2 = connect(&url).await;
    must_not_wait(
        &mut s1,
        "S1",
        "BEGIN; INSERT INTO public.bookings VALUES (2001, int4range(2000, 2010))",
    )
    .await;
    must_not_wait(
        &mut s2,
        "S2",
        "BEGIN; INSERT INTO public.bookings VALUES (3001, int4range(3000, 3010))",
    )
    .await;
    must_not_wait(
        &mut s1,
        "S1's insert overlapping S2's",
        "INSERT INTO public.bookings VALUES (3002, int4range(3005, 3006))",
    )
    .await;
    must_not_wait(
        &mut s2,
        "S2's insert overlapping S1's",
        "INSERT INTO public.bookings VALUES (2002, int4range(2001, 2002))",
    )
    .await;
    must_not_wait(&mut s1, "S1's commit", "COMMIT").await;
    must_not_wait(&mut s2, "S2's commit", "COMMIT").await;

    let out = run_within(&url, &["sync", "-m", BOOK], SLOW).await;
    problems.check(out.status.code() == Some(1), || {
        format!("sync must exit 1 with the overlaps failed: {}", both(&out))
    });
    let failed = failures(&mut c, "hostile_book").await;
    let keys: Vec<&str> = failed.iter().map(|(_, k, _)| k.as_str()).collect();
    problems.check(
        failed.len() == 3
            && failed.iter().all(|(_, _, e)| e.starts_with("23P01"))
            && keys.contains(&"[1001]")
            && (keys.contains(&"[2001]") ^ keys.contains(&"[2002]"))
            && (keys.contains(&"[3001]") ^ keys.contains(&"[3002]")),
        || format!("expected 1001 and one key of each crossing pair failed with 23P01: {failed:?}"),
    );
    problems.assert_none();
    // Blue gives the overlapping rows up: the failures go, green = M(blue).
    let ids: Vec<i32> = failed
        .iter()
        .filter_map(|(_, k, _)| k.trim_matches(|ch| ch == '[' || ch == ']').parse().ok())
        .collect();
    sqlx::query("DELETE FROM public.bookings WHERE id = ANY ($1)")
        .bind(&ids)
        .execute(&mut c)
        .await
        .unwrap();
    let out = run_within(&url, &["sync", "-m", BOOK], SLOW).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_invariant(&url, BOOK).await;
}

/// H5: a blue table that a logical-replication subscription writes (its apply worker fires no
/// statement triggers) is refused by `plan`, `prepare` and `copy` with `subscribed-blue-table`,
/// and nothing is written.
///
/// Feasibility: the throwaway cluster runs with `wal_level = replica`, so no logical slot can be
/// created. The subscription is made with `connect = true` (it asks the publisher, a second
/// database of the same cluster, for its tables, which fills `pg_subscription_rel`) but
/// `create_slot = false`, `slot_name = NONE`, `enabled = false`: no slot, no worker, and
/// `DROP SUBSCRIPTION` needs no publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h5_a_subscription_target_is_refused() {
    let url = empty_db("hostile_h5").await;
    let pub_url = empty_db("hostile_h5_pub").await;
    let mut p = connect(&pub_url).await;
    exec(
        &mut p,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         CREATE PUBLICATION hostile_h5_pub FOR TABLE public.items;",
    )
    .await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         INSERT INTO public.items SELECT g, g FROM generate_series(1, 50) g;",
    )
    .await;
    let socket: String = sqlx::query_scalar("SHOW unix_socket_directories")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let socket = socket.split(',').next().unwrap().trim().to_string();
    exec(
        &mut c,
        &format!(
            "CREATE SUBSCRIPTION hostile_h5_sub CONNECTION 'host={socket} dbname=hostile_h5_pub user=postgres'
             PUBLICATION hostile_h5_pub WITH (connect = true, enabled = false, create_slot = false, slot_name = NONE, copy_data = false)"
        ),
    )
    .await;
    let subscribed = count(
        &mut c,
        "SELECT count(*) FROM pg_subscription_rel WHERE srrelid = 'public.items'::regclass",
    )
    .await;
    assert_eq!(subscribed, 1, "the subscription did not list public.items");

    let mut problems = Problems::default();
    let before = support::fingerprint(&url).await;
    let out = run_within(
        &url,
        &["plan", "-m", PLAIN, "--format", "json", "--profile", "none"],
        SLOW,
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let codes: Vec<String> = v["diagnostics"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .filter(|d| d["severity"] == "error")
                .map(|d| d["code"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    problems.check(
        out.status.code() == Some(2) && codes.iter().any(|c| c == "subscribed-blue-table"),
        || {
            format!(
                "plan must refuse with subscribed-blue-table (errors {codes:?}): {}",
                both(&out)
            )
        },
    );
    for cmd in ["prepare", "copy"] {
        let out = run_within(&url, &[cmd, "-m", PLAIN], SLOW).await;
        problems.check(
            out.status.code() == Some(2) && stderr(&out).contains("error[subscribed-blue-table]"),
            || {
                format!(
                    "{cmd} must refuse with error[subscribed-blue-table]: {}",
                    both(&out)
                )
            },
        );
    }
    let after = support::fingerprint(&url).await;
    let added: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    let removed: Vec<&String> = before.iter().filter(|l| !after.contains(l)).collect();
    problems.check(added.is_empty() && removed.is_empty(), || {
        format!("the refused commands wrote: added {added:?}, removed {removed:?}")
    });
    problems.assert_none();

    // Without the subscription the same migration copies and holds.
    exec(&mut c, "DROP SUBSCRIPTION hostile_h5_sub").await;
    copy_ok(&url, PLAIN).await;
    must_not_wait(
        &mut c,
        "a write",
        "UPDATE public.items SET v = 0 WHERE id <= 5",
    )
    .await;
    assert_invariant(&url, PLAIN).await;
}

/// H6: a blue table with an inheritance child (whose rows M(blue) reads too, and whose keys blue's
/// primary key does not cover) is the follower's (`plan` says so): a child row duplicating a parent
/// key, and an `UPDATE ONLY` of the parent row, both succeed in the application; green's
/// duplicate-key conflict is a recorded sync failure, not silence. Once blue gives the duplicate
/// up, nothing is left and green = M(blue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_inheritance_children_make_the_entry_the_followers() {
    let url = empty_db("hostile_h6").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         CREATE TABLE public.items_archive () INHERITS (public.items);
         INSERT INTO public.items SELECT g, g FROM generate_series(1, 50) g;
         INSERT INTO public.items_archive VALUES (1001, 1), (1002, 2);",
    )
    .await;
    let mut problems = Problems::default();
    let (out, mode) = plan_sync_mode(&url, PLAIN, "items").await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    problems.check(
        mode["mode"] == "follower"
            && mode["reason"]
                .as_str()
                .is_some_and(|r| r.contains("inheritance")),
        || format!("plan must show items kept by the follower (inheritance child): {mode}"),
    );
    copy_ok(&url, PLAIN).await;
    let modes = row_local(&url, PLAIN).await;
    problems.check(modes == vec![("items".to_string(), false)], || {
        format!("sync keeps items row-local: {modes:?}")
    });
    let mut app = connect(&url).await;
    for (what, sql) in [
        (
            "a child row duplicating a parent key",
            "INSERT INTO public.items_archive VALUES (5, 9)",
        ),
        (
            "an update of the parent row only",
            "UPDATE ONLY public.items SET v = 3 WHERE id = 5",
        ),
        (
            "an update through parent and child",
            "UPDATE public.items SET v = v + 100 WHERE id IN (6, 1001)",
        ),
        (
            "a delete of a child row",
            "DELETE FROM public.items_archive WHERE id = 1002",
        ),
    ] {
        must_not_wait(&mut app, what, sql).await;
    }
    let out = run_within(&url, &["sync", "-m", PLAIN], SLOW).await;
    problems.check(out.status.code() == Some(1), || {
        format!("sync must exit 1 with key 5 failed: {}", both(&out))
    });
    let failed = failures(&mut c, "hostile_plain").await;
    problems.check(failed.len() == 1 && failed[0].1 == "[5]", || {
        format!("expected the duplicate key 5 recorded as failed: {failed:?}")
    });
    let off = count(
        &mut c,
        "SELECT count(*) FROM (
           (SELECT id, v FROM public.items WHERE id <> 5 EXCEPT ALL SELECT id, v FROM hostile_plain.items WHERE id <> 5)
           UNION ALL
           (SELECT id, v FROM hostile_plain.items WHERE id <> 5 EXCEPT ALL SELECT id, v FROM public.items WHERE id <> 5)) d",
    )
    .await;
    problems.check(off == 0, || {
        format!("{off} row(s) of keys other than 5 differ between green and M(blue)")
    });
    problems.assert_none();
    must_not_wait(
        &mut app,
        "the fix",
        "DELETE FROM public.items_archive WHERE id = 5",
    )
    .await;
    let out = run_within(&url, &["sync", "-m", PLAIN], SLOW).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_invariant(&url, PLAIN).await;
}

/// `sync --format json`: its exit code and the warnings of the status it reports.
async fn sync_json(url: &str, mapping: &str) -> (Option<i32>, serde_json::Value, String) {
    let out = run_within(url, &["sync", "-m", mapping, "--format", "json"], SLOW).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (
        out.status.code(),
        v["status"]["warnings"].clone(),
        both(&out),
    )
}

/// H7: `validate` refuses (exit 2, `ddl-drift`) while a capture trigger is disabled; a blue schema
/// other than public copies, and `status`, `sync --format json` and `validate` report no drift
/// after prepare and copy, whatever the sessions' search_path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h7_drift_is_the_triggers_not_the_schema() {
    let url = empty_db("hostile_h7").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         INSERT INTO public.items SELECT g, g FROM generate_series(1, 50) g;
         CREATE SCHEMA legacy;
         CREATE TABLE legacy.s (id integer PRIMARY KEY, n integer);
         INSERT INTO legacy.s SELECT g, g FROM generate_series(1, 50) g;",
    )
    .await;
    let mut problems = Problems::default();

    // A non-public blue schema: no drift anywhere after prepare and copy.
    let out = run_within(&url, &["prepare", "-m", LEGACY], SLOW).await;
    assert!(out.status.success(), "{}", both(&out));
    let st = status_json(&url, LEGACY).await;
    problems.check(st["warnings"].as_array().unwrap().is_empty(), || {
        format!("status warns right after prepare: {}", st["warnings"])
    });
    let out = run_within(&url, &["copy", "-m", LEGACY], SLOW).await;
    assert!(
        out.status.success(),
        "copy of a blue schema other than public: {}",
        both(&out)
    );
    let (code, warnings, all) = sync_json(&url, LEGACY).await;
    problems.check(
        code == Some(0) && warnings.as_array().is_some_and(|w| w.is_empty()),
        || format!("sync --format json right after copy reports drift: {all}"),
    );
    exec(&mut c, "UPDATE legacy.s SET n = 0 WHERE id <= 3").await;
    // Sessions whose search_path finds legacy first compute the same fingerprint.
    exec(
        &mut c,
        "ALTER DATABASE hostile_h7 SET search_path = legacy, public",
    )
    .await;
    let (code, warnings, all) = sync_json(&url, LEGACY).await;
    problems.check(
        code == Some(0) && warnings.as_array().is_some_and(|w| w.is_empty()),
        || format!("sync --format json with search_path = legacy, public reports drift: {all}"),
    );
    let out = run_within(&url, &["validate", "-m", LEGACY], SLOW).await;
    problems.check(out.status.code() == Some(0), || {
        format!("validate with search_path = legacy, public: {}", both(&out))
    });
    exec(&mut c, "ALTER DATABASE hostile_h7 RESET search_path").await;
    let out = run_within(&url, &["validate", "-m", LEGACY], SLOW).await;
    problems.check(out.status.code() == Some(0), || {
        format!("validate of the legacy migration: {}", both(&out))
    });

    // A disabled capture trigger: validate refuses, for public and for legacy.
    copy_ok(&url, PLAIN).await;
    for (mapping, table, trigger) in [
        (PLAIN, "public.items", "bluegreen_hostile_plain_upd"),
        (LEGACY, "legacy.s", "bluegreen_hostile_legacy_ins"),
    ] {
        exec(
            &mut c,
            &format!("ALTER TABLE {table} DISABLE TRIGGER {trigger}"),
        )
        .await;
        let out = run_within(&url, &["validate", "-m", mapping], SLOW).await;
        problems.check(
            out.status.code() == Some(2) && stderr(&out).contains("error[ddl-drift]"),
            || {
                format!(
                    "validate must refuse with ddl-drift while {trigger} is disabled: {}",
                    both(&out)
                )
            },
        );
        let (code, _, all) = sync_json(&url, mapping).await;
        problems.check(code == Some(2) && all.contains("ddl-drift"), || {
            format!("sync must refuse with ddl-drift while {trigger} is disabled: {all}")
        });
        exec(
            &mut c,
            &format!("ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}"),
        )
        .await;
        let out = run_within(&url, &["validate", "-m", mapping], SLOW).await;
        problems.check(out.status.code() == Some(0), || {
            format!("validate once {trigger} is back: {}", both(&out))
        });
    }
    problems.assert_none();
    assert_invariant(&url, PLAIN).await;
    assert_invariant(&url, LEGACY).await;
}

/// H8: a row-local entry whose green table holds key columns only (its upsert is `DO NOTHING`):
/// an application insert of a key green already holds (from before a TRUNCATE of blue), open while
/// `sync` re-derives every key, never loses its green row; nor does a concurrent delete and
/// re-insert of another key. Hundreds of rounds, each checked against the invariant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h8_a_key_only_row_local_entry_loses_no_row() {
    let url = empty_db("hostile_h8").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.pt (playlist_id integer NOT NULL, track_id integer NOT NULL, PRIMARY KEY (playlist_id, track_id));
         INSERT INTO public.pt SELECT 1, g FROM generate_series(1, 20) g;",
    )
    .await;
    copy_ok(&url, PT).await;
    assert_eq!(
        row_local(&url, PT).await,
        vec![("playlist_entries".to_string(), true)]
    );
    let mut a = connect(&url).await;
    let rounds: u64 = 60;
    for i in 0..rounds {
        let k = 1 + i % 20;
        let k2 = 1 + (i + 7) % 20;
        // Blue loses every row and gets all but (1, k) back; green still holds (1, k).
        exec(
            &mut c,
            &format!(
                "BEGIN; TRUNCATE public.pt; INSERT INTO public.pt SELECT 1, g FROM generate_series(1, 20) g WHERE g <> {k}; COMMIT"
            ),
        )
        .await;
        must_not_wait(
            &mut a,
            "A's insert",
            &format!("BEGIN; INSERT INTO public.pt VALUES (1, {k}) ON CONFLICT DO NOTHING"),
        )
        .await;
        let sync = tokio::spawn({
            let url = url.clone();
            async move { run_within(&url, &["sync", "-m", PT], SLOW).await }
        });
        let b = tokio::spawn({
            let url = url.clone();
            async move {
                let mut b = connect(&url).await;
                must_not_wait(
                    &mut b,
                    "B's delete",
                    &format!("DELETE FROM public.pt WHERE playlist_id = 1 AND track_id = {k2}"),
                )
                .await;
                must_not_wait(
                    &mut b,
                    "B's re-insert",
                    &format!("INSERT INTO public.pt VALUES (1, {k2}) ON CONFLICT DO NOTHING"),
                )
                .await;
            }
        });
        tokio::time::sleep(Duration::from_millis((i * 37) % 300)).await;
        must_not_wait(&mut a, "A's commit", "COMMIT").await;
        b.await.unwrap();
        let out = sync.await.unwrap();
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", both(&out));
        // Anything set aside is retried; a lost row is not (nothing records it).
        drain(&url, PT).await;
        let v = support::invariant_violations(&url, PT).await;
        assert!(
            v.is_empty(),
            "round {i}: green != M(blue) after A's insert of (1, {k}) beside a full re-derive: {v:?}"
        );
    }
    assert_invariant(&url, PT).await;
}
