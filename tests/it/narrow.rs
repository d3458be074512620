//! An UPDATE is logged for the follower only with the entries whose columns it changed (old and
//! new rows paired by blue's primary key, compared as text): a workshop renamed is nothing to
//! the entries that read only its id. Each step checks what was logged, then applies it and
//! ends on the invariant itself.

use sqlx::PgConnection;

use crate::support::{
    assert_invariant_now, both, connect, copy_ok, count, empty_db, exec, run, sync_and_check,
};

const NARROW: &str = "tests/fixtures/narrow.yaml";

/// The blue tables narrow.yaml reads.
const BLUE: &str = "CREATE TABLE public.w (id integer PRIMARY KEY, name text, city text, amount numeric, doc json, note text, r text, n integer, b integer);
     CREATE TABLE public.c (id integer PRIMARY KEY, w_id integer NOT NULL, v integer);";

/// The change-log rows of table `w`: how many, and the distinct `entries` values (NULL: every
/// entry), sorted.
async fn logged(c: &mut PgConnection) -> (i64, Vec<String>) {
    let n = count(
        c,
        "SELECT count(*) FROM bluegreen.changes WHERE migration = 'narrow' AND blue_table = 'public.w'",
    )
    .await;
    let entries: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT coalesce(entries::text, 'NULL') FROM bluegreen.changes WHERE migration = 'narrow' AND blue_table = 'public.w' ORDER BY 1",
    )
    .fetch_all(&mut *c)
    .await
    .unwrap();
    (n, entries)
}

/// Run `sql`, check what it logged, apply it (`bluegreen sync`) and check the invariant.
async fn step(url: &str, c: &mut PgConnection, sql: &str, rows: i64, entries: &[&str]) {
    exec(c, sql).await;
    let (n, e) = logged(c).await;
    assert_eq!(
        (n, e.iter().map(String::as_str).collect::<Vec<_>>()),
        (rows, entries.to_vec()),
        "logged by {sql}"
    );
    sync_and_check(url, NARROW, sql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_is_logged_only_for_the_entries_whose_columns_it_changed() {
    let url = empty_db("narrow").await;
    let mut c = connect(&url).await;
    exec(&mut c, BLUE).await;
    exec(
        &mut c,
        "INSERT INTO public.w VALUES (1, 'A', 'Berlin', 1.0, '{\"a\": 1, \"b\": 2}', NULL, 'r', 1, 2),
                                     (2, 'B', 'Berlin', 2, '[]', NULL, 'r', 1, 2), (3, 'C', 'Köln', 3, 'null', NULL, 'r', 1, 2);
         INSERT INTO public.c VALUES (10, 1, 1), (20, 2, 2), (30, 3, 3);",
    )
    .await;
    copy_ok(&url, NARROW).await;
    // Nobody reads note (nor r, n and b, named like the aliases generated statements use: a
    // whole-row reference is never taken for one of them); name is workshops', re-derived in the
    // statement itself.
    step(
        &url,
        &mut c,
        "UPDATE public.w SET note = 'x', r = 's', n = 2, b = 3",
        0,
        &[],
    )
    .await;
    step(
        &url,
        &mut c,
        "UPDATE public.w SET name = name || '!', note = 'y'",
        0,
        &[],
    )
    .await;
    // city: totals only, and only the row whose city changed (both images in one change row).
    step(
        &url,
        &mut c,
        "UPDATE public.w SET city = CASE WHEN id = 1 THEN 'Bonn' ELSE city END, note = 'z'",
        1,
        &["{totals}"],
    )
    .await;
    // An equal value with another rendering (1.0 -> 1.00) is a change: green keeps the rendering.
    step(
        &url,
        &mut c,
        "UPDATE public.w SET amount = 1.00 WHERE id = 1",
        1,
        &["{customers}"],
    )
    .await;
    // json keeps its text: a new key order is a change too.
    step(
        &url,
        &mut c,
        "UPDATE public.w SET doc = '{\"b\": 2, \"a\": 1}' WHERE id = 1",
        1,
        &["{customers}"],
    )
    .await;
    // Both at once, on different rows and entries.
    step(
        &url,
        &mut c,
        "UPDATE public.w SET city = CASE WHEN id = 2 THEN 'Bonn' ELSE city END, amount = CASE WHEN id = 3 THEN 4 ELSE amount END",
        2,
        &["{customers}", "{totals}"],
    )
    .await;
    // A key moved: old and new rows no longer pair, so each is logged, for every entry.
    step(
        &url,
        &mut c,
        "UPDATE public.w SET id = 4 WHERE id = 3",
        2,
        &["NULL"],
    )
    .await;
    step(
        &url,
        &mut c,
        "UPDATE public.c SET w_id = 4 WHERE id = 30",
        0,
        &[],
    )
    .await;
    // Inserts and deletes are always logged.
    step(
        &url,
        &mut c,
        "INSERT INTO public.w VALUES (5, 'E', 'Bonn', 5, '{}', NULL, 'r', 1, 2)",
        1,
        &["NULL"],
    )
    .await;
    step(
        &url,
        &mut c,
        "DELETE FROM public.w WHERE id = 1",
        1,
        &["NULL"],
    )
    .await;
    let green: Vec<(i32, String)> =
        sqlx::query_as("SELECT id, amount::text FROM narrow.customers ORDER BY id")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(green, vec![(20, "2".to_string()), (30, "4".to_string())]);
}

const CODE: &str = "tests/fixtures/narrow_code.yaml";

/// An update logged as one row whose new image cannot be followed (its green key does not fit)
/// while its old image can: the old image's key is re-derived (its green row goes), the new image
/// alone is set aside, `sync` exits 1; once the application fixes the row (now the old image is
/// the one that cannot be followed: a full re-derive), `sync` exits 0 and the invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paired_update_whose_new_image_cannot_be_followed_sets_aside_that_image_alone() {
    let url = empty_db("narrow_code").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.w (id integer PRIMARY KEY, name text);
         CREATE TABLE public.s (id integer PRIMARY KEY, code text NOT NULL, w_id integer NOT NULL);
         INSERT INTO public.w VALUES (1, 'A');
         INSERT INTO public.s VALUES (1, '1', 1), (2, '2', 1);",
    )
    .await;
    copy_ok(&url, CODE).await;
    exec(&mut c, "UPDATE public.s SET code = 'x' WHERE id = 1").await;
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM bluegreen.changes WHERE migration = 'narrow_code' AND old_row IS NOT NULL AND new_row IS NOT NULL").await,
        1,
        "one row, both images"
    );
    let out = run(&url, &["sync", "-m", CODE]).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM bluegreen.failed_changes WHERE migration = 'narrow_code' AND old_row IS NULL AND new_row->>'code' = 'x'").await,
        1,
        "the new image alone set aside"
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM bluegreen.rederive WHERE migration = 'narrow_code'"
        )
        .await,
        0,
        "no full re-derive for a new image"
    );
    // The old image's key was found and re-derived: M(blue) cannot be computed for it while a
    // code does not fit, which is recorded against key 1.
    let failed: Vec<String> = sqlx::query_scalar(
        "SELECT sync_key::text FROM bluegreen.sync_failures WHERE migration = 'narrow_code' ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert_eq!(
        failed,
        vec!["[1]".to_string()],
        "the old image's key re-derived"
    );
    exec(&mut c, "UPDATE public.s SET code = '7' WHERE id = 1").await;
    let out = run(&url, &["sync", "-m", CODE]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_invariant_now(&url, CODE).await;
    let green: Vec<i32> = sqlx::query_scalar("SELECT id FROM narrow_code.s ORDER BY id")
        .fetch_all(&mut c)
        .await
        .unwrap();
    assert_eq!(green, vec![2, 7]);
}

/// A row-local UPDATE deletes green rows only where a key left the statement's rows (the
/// trigger skips its delete otherwise): keys moved all at once, some of them, one past another,
/// and many rows renamed in place, each ending on the invariant (the rows left behind by a
/// skipped delete would be green rows M(blue) does not produce).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_local_update_deletes_exactly_the_green_rows_whose_key_left() {
    let url = empty_db("narrow_keys").await;
    let mut c = connect(&url).await;
    exec(&mut c, BLUE).await;
    exec(
        &mut c,
        "INSERT INTO public.w (id, name, city) SELECT i, 'w' || i, 'c' || (i % 7) FROM generate_series(1, 2000) i;
         INSERT INTO public.c SELECT i, i, i FROM generate_series(1, 50) i;",
    )
    .await;
    copy_ok(&url, NARROW).await;
    for sql in [
        "UPDATE public.w SET name = name || '!'",
        "UPDATE public.w SET id = id + 10000",
        "UPDATE public.w SET id = id - 10000 WHERE id > 11000",
        "UPDATE public.w SET id = 20000 WHERE id = (SELECT max(id) FROM public.w)",
        "UPDATE public.w SET id = id + 5000, name = 'moved' WHERE id IN (1001, 1003, 1005)",
        "UPDATE public.w SET name = 'same key' WHERE id BETWEEN 1 AND 10",
    ] {
        exec(&mut c, sql).await;
        sync_and_check(&url, NARROW, sql).await;
    }
    assert_invariant_now(&url, NARROW).await;
}
