//! Hostile review 7: SERIALIZABLE writers of row-local tables are logged for the follower
//! (8de029e), and entries with a nullable sync-key column or a sync key other than green's
//! conflict key are the follower's (5dbe206). Each test ends on the invariant.

use std::time::Duration;

use sqlx::PgConnection;

use crate::support::{
    assert_invariant_now, both, command, connect, copy_ok, empty_db, exec, must_not_wait,
    run_within, sync_and_check,
};

const SER: &str = "tests/fixtures/hostile2_ser.yaml";
const NULLKEY: &str = "tests/fixtures/hostile6_nullkey.yaml";
const OTHERKEY: &str = "tests/fixtures/hostile6_otherkey.yaml";
const QUICK: Duration = Duration::from_secs(5);
const SLOW: Duration = Duration::from_secs(60);

async fn ok(c: &mut PgConnection, s: &str) {
    must_not_wait(c, s, s, QUICK).await;
}

/// SERIALIZABLE, READ COMMITTED and REPEATABLE READ writers of the same rows of a row-local
/// entry, in stale-green windows (the SERIALIZABLE writer's rows not yet applied): key moves,
/// re-inserts of a moved key, savepoints rolled back after logging, SET TRANSACTION before the
/// first statement, a RC writer waiting on the SERIALIZABLE one's row, validate while it is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h7_serializable_mixed_with_rc_and_rr_on_the_same_rows() {
    let url = empty_db("hostile7_mix").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         INSERT INTO public.items SELECT g, g FROM generate_series(1, 200) g;",
    )
    .await;
    copy_ok(&url, SER).await;
    let mut s = connect(&url).await;
    let mut r = connect(&url).await;
    let mut q = connect(&url).await;
    // 1. SERIALIZABLE moves keys, with a savepoint rolled back after logging; committed, not
    //    applied: RC and RR writers then write the moved and the freed keys on stale green.
    for st in [
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        "UPDATE public.items SET v = 1000 WHERE id = 1",
        "UPDATE public.items SET id = 5000 WHERE id = 2",
        "SAVEPOINT a",
        "DELETE FROM public.items WHERE id BETWEEN 3 AND 5",
        "UPDATE public.items SET id = id + 10000 WHERE id BETWEEN 6 AND 8",
        "ROLLBACK TO SAVEPOINT a",
        "DELETE FROM public.items WHERE id = 9",
        "INSERT INTO public.items VALUES (6000, 6)",
        "UPDATE public.items SET id = 9 WHERE id = 10",
        "COMMIT",
    ] {
        ok(&mut s, st).await;
    }
    ok(&mut r, "INSERT INTO public.items VALUES (2, 77)").await;
    ok(&mut r, "UPDATE public.items SET id = 3000 WHERE id = 5000").await;
    ok(&mut r, "UPDATE public.items SET id = 10 WHERE id = 9").await;
    ok(&mut r, "DELETE FROM public.items WHERE id = 6000").await;
    for st in [
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        "UPDATE public.items SET v = v + 1 WHERE id IN (1, 2, 3000, 10)",
        "INSERT INTO public.items VALUES (5000, 50), (9, 90)",
        "COMMIT",
    ] {
        ok(&mut q, st).await;
    }
    sync_and_check(&url, SER, "stale-green RC/RR writers").await;

    // 2. SET TRANSACTION before the first statement; a RC writer waits on the SERIALIZABLE one's
    //    row and goes on after its commit; the RR one begun before it.
    ok(&mut q, "BEGIN ISOLATION LEVEL REPEATABLE READ").await;
    ok(&mut q, "SELECT count(*) FROM public.items").await;
    ok(
        &mut s,
        "BEGIN; SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    )
    .await;
    ok(
        &mut s,
        "UPDATE public.items SET v = -1 WHERE id BETWEEN 20 AND 30",
    )
    .await;
    ok(
        &mut s,
        "UPDATE public.items SET id = id + 20000 WHERE id BETWEEN 31 AND 35",
    )
    .await;
    // validate while the SERIALIZABLE writer is open (its writes in flight)
    let out = run_within(&url, &["validate", "-m", SER, "--jobs", "1"], SLOW).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "validate with a SERIALIZABLE writer open: {}",
        both(&out)
    );
    let url2 = url.clone();
    let waiter = tokio::spawn(async move {
        let mut w = connect(&url2).await;
        sqlx::raw_sql("UPDATE public.items SET v = v * 2 WHERE id BETWEEN 25 AND 40")
            .execute(&mut w)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ok(
        &mut s,
        "INSERT INTO public.items SELECT g, g FROM generate_series(31, 33) g",
    )
    .await;
    ok(&mut s, "COMMIT").await;
    let res = tokio::time::timeout(SLOW, waiter).await.unwrap().unwrap();
    assert!(res.is_ok(), "the RC waiter failed: {res:?}");
    ok(&mut q, "INSERT INTO public.items VALUES (7777, 7)").await;
    ok(&mut q, "DELETE FROM public.items WHERE id = 7777").await;
    ok(&mut q, "INSERT INTO public.items VALUES (7777, 8)").await;
    ok(&mut q, "COMMIT").await;
    sync_and_check(&url, SER, "SET TRANSACTION + waiter").await;

    // 3. RC writer first, then SERIALIZABLE on the same key after it.
    ok(&mut r, "BEGIN").await;
    ok(&mut r, "UPDATE public.items SET id = 8888 WHERE id = 50").await;
    ok(&mut r, "COMMIT").await;
    ok(&mut s, "BEGIN ISOLATION LEVEL SERIALIZABLE").await;
    ok(&mut s, "INSERT INTO public.items VALUES (50, 5)").await;
    ok(
        &mut s,
        "UPDATE public.items SET id = 50 + 9000 WHERE id = 8888",
    )
    .await;
    ok(&mut s, "COMMIT").await;
    ok(
        &mut r,
        "UPDATE public.items SET v = 123 WHERE id IN (50, 9050)",
    )
    .await;
    sync_and_check(&url, SER, "RC then SERIALIZABLE").await;
    assert_invariant_now(&url, SER).await;
}

/// A follower running while SERIALIZABLE and READ COMMITTED writers of the same keys alternate,
/// with a savepoint rolled back after logging; killed, drained, and the invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h7_follower_running_with_serializable_and_rc_writers() {
    let url = empty_db("hostile7_follow").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         INSERT INTO public.items SELECT g, g FROM generate_series(1, 100) g;",
    )
    .await;
    copy_ok(&url, SER).await;
    let mut child = command(&url, &["sync", "--follow", "-m", SER])
        .spawn()
        .unwrap();
    let mut s = connect(&url).await;
    let mut r = connect(&url).await;
    let mut failures = Vec::new();
    for i in 0..60 {
        let k = 1 + (i % 20);
        let stmts = [
            format!(
                "BEGIN ISOLATION LEVEL SERIALIZABLE; UPDATE public.items SET v = v + 1 WHERE id = {k}; SAVEPOINT a; DELETE FROM public.items WHERE id = {k}; ROLLBACK TO SAVEPOINT a; UPDATE public.items SET id = id + 1000 WHERE id = {}; COMMIT",
                k + 40
            ),
            format!(
                "UPDATE public.items SET id = id - 1000 WHERE id = {}",
                k + 1040
            ),
            format!(
                "DELETE FROM public.items WHERE id = {k}; INSERT INTO public.items VALUES ({k}, {i})"
            ),
        ];
        for (j, st) in stmts.iter().enumerate() {
            let w = if j == 0 { &mut s } else { &mut r };
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(st.clone()))
                .execute(&mut *w)
                .await
            {
                failures.push(format!("{st}: {e}"));
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *w).await;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // SAFETY: our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(
        failures.is_empty(),
        "application statements failed: {failures:?}"
    );
    sync_and_check(&url, SER, "follower run").await;
    assert_invariant_now(&url, SER).await;
}

/// The nullable sync-key entry (the follower's since 5dbe206): inserts, deletes, key moves into
/// and out of NULL, updates of a NULL-keyed row, by READ COMMITTED and SERIALIZABLE writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h7_nullable_sync_key_follower_cases() {
    let url = empty_db("hostile7_nullkey").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.s (id integer PRIMARY KEY, code text, v integer);
         INSERT INTO public.s VALUES (1, NULL, 1), (2, 'b', 2), (3, NULL, 3);",
    )
    .await;
    copy_ok(&url, NULLKEY).await;
    for st in [
        "INSERT INTO public.s VALUES (4, NULL, 4), (5, 'e', 5)",
        "UPDATE public.s SET v = 10 WHERE code IS NULL",
        "UPDATE public.s SET code = 'x' WHERE id = 1",
        "UPDATE public.s SET code = NULL WHERE id = 2",
        "DELETE FROM public.s WHERE id = 3",
        "UPDATE public.s SET id = 30 WHERE id = 4",
        "UPDATE public.s SET id = 4, code = 'd' WHERE id = 30",
        "BEGIN ISOLATION LEVEL SERIALIZABLE; INSERT INTO public.s VALUES (6, NULL, 6); UPDATE public.s SET code = NULL WHERE id = 5; DELETE FROM public.s WHERE id = 2; COMMIT",
        "BEGIN; DELETE FROM public.s WHERE id = 6; INSERT INTO public.s VALUES (6, NULL, 60); UPDATE public.s SET code = NULL, id = 7 WHERE id = 1; COMMIT",
        "UPDATE public.s SET code = CASE WHEN code IS NULL THEN 'n' || id ELSE NULL END",
        "DELETE FROM public.s",
        "INSERT INTO public.s VALUES (1, NULL, 1), (2, NULL, 2)",
    ] {
        exec(&mut c, st).await;
        sync_and_check(&url, NULLKEY, st).await;
    }
    assert_invariant_now(&url, NULLKEY).await;
}

/// The entry whose sync key (id) is not green's conflict key (code): codes rotated between rows
/// in one transaction, a code moved to a row whose old code another row takes, ids moved, rows
/// deleted and re-inserted with another's old code, READ COMMITTED and SERIALIZABLE, with sync
/// between transactions and a claim of part of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h7_sync_key_other_than_conflict_key_follower_cases() {
    let url = empty_db("hostile7_otherkey").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.o (id integer PRIMARY KEY, code text NOT NULL UNIQUE, v integer);
         INSERT INTO public.o VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3);",
    )
    .await;
    copy_ok(&url, OTHERKEY).await;
    for st in [
        "BEGIN; UPDATE public.o SET code = 't' WHERE id = 1; UPDATE public.o SET code = 'a' WHERE id = 2; UPDATE public.o SET code = 'b' WHERE id = 1; COMMIT",
        "UPDATE public.o SET code = 'z' WHERE id = 3; UPDATE public.o SET code = 'c' WHERE id = 1",
        "BEGIN ISOLATION LEVEL SERIALIZABLE; UPDATE public.o SET id = 10 WHERE id = 2; INSERT INTO public.o VALUES (2, 'a2', 20); COMMIT",
        "DELETE FROM public.o WHERE id = 10; INSERT INTO public.o VALUES (11, 'a', 11)",
        "UPDATE public.o SET id = 12, code = 'z2' WHERE id = 3; INSERT INTO public.o VALUES (3, 'z', 33)",
        "UPDATE public.o SET id = id + 100",
        "UPDATE public.o SET code = code || '_'",
    ] {
        exec(&mut c, st).await;
        sync_and_check(&url, OTHERKEY, st).await;
    }
    // Two transactions logged before one sync, the second taking the first's old code.
    exec(&mut c, "UPDATE public.o SET code = 'q' WHERE id = 101").await;
    exec(&mut c, "UPDATE public.o SET code = 'c_' WHERE id = 111").await;
    exec(&mut c, "UPDATE public.o SET code = 'a_' WHERE id = 102").await;
    sync_and_check(&url, OTHERKEY, "chained code moves").await;
    assert_invariant_now(&url, OTHERKEY).await;
}
