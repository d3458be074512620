//! Fifth hostile review of live sync, against commit 54680ff (apply_keys' lock bound set once,
//! `ApplierEntry::holds`, the fence's short lock attempts). One test per finding (H5-1..), each
//! with real sessions and ending on the invariant itself (`green.T = M(blue)`, exact multisets).
//! Both findings fixed: set-aside images compared as jsonb on the entry's columns (H5-1), any
//! name qualified by a schema but pg_catalog (a cast's type among them) makes an entry's columns
//! "cannot tell" (H5-2).
//! A test that fails on the current code is `#[ignore]`d with the reason; attacks that held stay
//! as regression tests.

use sqlx::PgConnection;

use crate::support::{
    assert_invariant_now, both, connect, control_rows, copy_ok, empty_db, exec, run,
};

/// `bluegreen sync -m <mapping>`, which must exit `code`.
async fn sync_exits(url: &str, mapping: &str, code: i32) {
    let out = run(url, &["sync", "-m", mapping]).await;
    assert_eq!(out.status.code(), Some(code), "{}", both(&out));
}

/// Change-log rows, failed keys and set-aside changes of `migration`.
async fn left(c: &mut PgConnection, migration: &str) -> (i64, i64, i64) {
    (
        control_rows(c, "changes", migration).await,
        control_rows(c, "sync_failures", migration).await,
        control_rows(c, "failed_changes", migration).await,
    )
}

const JSON: &str = "tests/fixtures/hostile5_json.yaml";

/// H5-1: `ApplierEntry::holds` (set_aside and requeue) decides whether blue still holds a
/// set-aside new image by comparing `ROW(b.cols)::text` of the blue row with the same of
/// `jsonb_populate_record(NULL::w, new_row)`. The image went through `to_jsonb`, which turns a
/// `json` column into jsonb (normalised: `{"a":1}` comes back `{"a": 1}`), so the row blue still
/// holds never "holds": the new image of the renumbering (whose keys cannot be found: division by
/// zero on customer 30) is not even set aside. Sync exits 1 once; after the application fixes
/// customer 30 the next sync exits 0 with nothing recorded or pending, and customer 31 (reached
/// only through the renumbering) never reaches green. (Before 54680ff the test was
/// `to_jsonb(b) = new_row`, in jsonb: equal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h5_1_a_json_column_makes_a_held_image_look_superseded() {
    let url = empty_db("hostile5_1").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        r#"CREATE TABLE public.w (id integer PRIMARY KEY, d integer NOT NULL, j json);
         CREATE TABLE public.c (id integer PRIMARY KEY, w_id integer NOT NULL, q integer NOT NULL, d integer NOT NULL);
         INSERT INTO public.w VALUES (1, 5, '{"a":1}');
         INSERT INTO public.c VALUES (10, 1, 1, 9), (30, 3, 1, 0), (31, 3, 1, 7);"#,
    )
    .await;
    copy_ok(&url, JSON).await;
    exec(&mut c, "UPDATE public.w SET id = 3, d = 0 WHERE id = 1").await;
    let out = run(&url, &["sync", "-m", JSON]).await;
    eprintln!("first sync: {:?}\n{}", out.status.code(), both(&out));
    eprintln!(
        "left after first sync: {:?}",
        left(&mut c, "hostile5_json").await
    );
    exec(&mut c, "UPDATE public.c SET d = 1 WHERE id = 30").await;
    sync_exits(&url, JSON, 0).await;
    assert_eq!(left(&mut c, "hostile5_json").await, (0, 0, 0));
    assert_invariant_now(&url, JSON).await;
}

const CAST: &str = "tests/fixtures/hostile5_cast.yaml";

/// H5-2: a cast with a function (`CREATE CAST (integer AS public.wl) WITH FUNCTION
/// public.wl_of(integer)`, wl an enum) is deparsed as `(w.id)::public.wl`: the function's name
/// appears nowhere in the resolved text, so the H4-4 rule ("a call of a function outside
/// pg_catalog: cannot tell") never fires and the entry reads only `w.id`. wl_of reads the
/// workshop's name (plan warns `stable-function`, whose hint the mapping follows: w is in
/// `from`): a rename is logged for no entry (the change log stays empty), sync exits 0, and green
/// keeps the old name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h5_2_a_cast_function_reading_the_table_misses_updates() {
    let url = empty_db("hostile5_2").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.w (id integer PRIMARY KEY, name text);
         CREATE TABLE public.c (id integer PRIMARY KEY, w_id integer NOT NULL);
         CREATE TYPE public.wl AS ENUM ('A', 'B');
         CREATE FUNCTION public.wl_of(integer) RETURNS public.wl LANGUAGE sql STABLE AS 'SELECT name::public.wl FROM public.w WHERE id = $1';
         CREATE CAST (integer AS public.wl) WITH FUNCTION public.wl_of(integer);
         INSERT INTO public.w VALUES (1, 'A');
         INSERT INTO public.c VALUES (10, 1);",
    )
    .await;
    copy_ok(&url, CAST).await;
    exec(&mut c, "UPDATE public.w SET name = 'B'").await;
    eprintln!(
        "left after rename: {:?}",
        left(&mut c, "hostile5_cast").await
    );
    sync_exits(&url, CAST, 0).await;
    assert_eq!(left(&mut c, "hostile5_cast").await, (0, 0, 0));
    assert_invariant_now(&url, CAST).await;
}

/// Held (control for H5-1): the same statements with a `jsonb` column, which survives the
/// to_jsonb/populate round trip unchanged: the image is set aside, requeued, and customer 31
/// reaches green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h5_held_a_jsonb_column_keeps_the_set_aside_image() {
    let url = empty_db("hostile5_1b").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        r#"CREATE TABLE public.w (id integer PRIMARY KEY, d integer NOT NULL, j jsonb);
         CREATE TABLE public.c (id integer PRIMARY KEY, w_id integer NOT NULL, q integer NOT NULL, d integer NOT NULL);
         INSERT INTO public.w VALUES (1, 5, '{"a":1}');
         INSERT INTO public.c VALUES (10, 1, 1, 9), (30, 3, 1, 0), (31, 3, 1, 7);"#,
    )
    .await;
    copy_ok(&url, JSON).await;
    exec(&mut c, "UPDATE public.w SET id = 3, d = 0 WHERE id = 1").await;
    sync_exits(&url, JSON, 1).await;
    assert_eq!(left(&mut c, "hostile5_json").await, (0, 0, 1));
    exec(&mut c, "UPDATE public.c SET d = 1 WHERE id = 30").await;
    sync_exits(&url, JSON, 0).await;
    assert_eq!(left(&mut c, "hostile5_json").await, (0, 0, 0));
    assert_invariant_now(&url, JSON).await;
}
