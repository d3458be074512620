//! Sync keys computed by a cast. A key that is a blue column, alone or widened, is looked up in
//! blue by that column (its index serves); a cast that can change a value (`numeric(10,0)`
//! rounds 2.60 to 3) is not such a key: blue holds no 3.00, so looking it up by the column would
//! find nothing and delete green's row. And a green key blue's type cannot hold (written into
//! green by hand) is a difference validate names, not an error that stops it.

use crate::support::{
    assert_invariant_now, both, connect, copy_ok, count, empty_db, exec, run, stderr,
    sync_and_check,
};

const CAST_KEYS: &str = "tests/fixtures/cast_keys.yaml";

const BLUE: &str =
    "CREATE TABLE public.amounts (amt numeric(10,2) PRIMARY KEY, label text NOT NULL);
     INSERT INTO public.amounts SELECT g - 0.4, 'a' || g FROM generate_series(1, 50) g;
     CREATE TABLE public.narrow (id integer PRIMARY KEY, v text NOT NULL);
     INSERT INTO public.narrow SELECT g, 'v' || g FROM generate_series(1, 50) g;
     CREATE TABLE public.codes (code character varying(3) PRIMARY KEY, n integer NOT NULL);
     INSERT INTO public.codes SELECT 'c' || g, g FROM generate_series(1, 50) g;
     CREATE TABLE public.prices (price numeric(6,2) PRIMARY KEY, n integer NOT NULL);
     INSERT INTO public.prices SELECT g + 0.01, g FROM generate_series(1, 50) g;
     CREATE TABLE public.names (name text PRIMARY KEY, n integer NOT NULL);
     INSERT INTO public.names SELECT 'n' || g, g FROM generate_series(1, 50) g;";

/// A database holding [`BLUE`], prepared with cast_keys.yaml, and a session on it.
async fn prepared(name: &str) -> (String, sqlx::PgConnection) {
    let url = empty_db(name).await;
    let mut c = connect(&url).await;
    exec(&mut c, BLUE).await;
    let out = run(&url, &["prepare", "-m", CAST_KEYS]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    (url, c)
}

/// The green tables of cast_keys.yaml that hold a primary key constraint, sorted.
async fn with_primary_key(c: &mut sqlx::PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT conrelid::regclass::text FROM pg_constraint WHERE contype = 'p' AND connamespace = 'cast_keys'::regnamespace ORDER BY 1",
    )
    .fetch_all(c)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rounded_key_is_looked_up_by_its_value_and_a_widened_one_by_blue_s_column() {
    let url = empty_db("cast_keys").await;
    let mut c = connect(&url).await;
    exec(&mut c, BLUE).await;
    copy_ok(&url, CAST_KEYS).await;
    assert_invariant_now(&url, CAST_KEYS).await;
    for sql in [
        "UPDATE public.amounts SET label = 'changed' WHERE amt = 2.60",
        "INSERT INTO public.amounts VALUES (70.6, 'new')",
        "DELETE FROM public.amounts WHERE amt = 4.60",
        "UPDATE public.amounts SET amt = 300.6 WHERE amt = 9.60",
        "UPDATE public.amounts SET label = label || '!' WHERE amt < 20",
        "UPDATE public.narrow SET v = 'changed' WHERE id = 2",
        "UPDATE public.narrow SET id = 1000 WHERE id = 3",
        "DELETE FROM public.narrow WHERE id = 4",
    ] {
        exec(&mut c, sql).await;
        sync_and_check(&url, CAST_KEYS, sql).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_key_blue_s_type_cannot_hold_is_an_extra_row_not_an_error() {
    let url = empty_db("cast_keys_extra").await;
    let mut c = connect(&url).await;
    exec(&mut c, BLUE).await;
    copy_ok(&url, CAST_KEYS).await;
    assert_invariant_now(&url, CAST_KEYS).await;
    // 2^40 fits green's bigint, not blue's integer: the lag-aware re-check must not cast it.
    // 'c10x' as blue's character varying(3) is 'c10', and 1.005 as numeric(6,2) is 1.01: both
    // blue rows exist, and neither may be taken for the row green holds by hand.
    exec(
        &mut c,
        "INSERT INTO cast_keys.widened VALUES (1099511627776, 'by hand'), (7000, 'by hand too');
         INSERT INTO cast_keys.coded VALUES ('c10x', 10);
         INSERT INTO cast_keys.priced VALUES (1.005, 1), (12345.01, 1);",
    )
    .await;
    let out = run(&url, &["validate", "-m", CAST_KEYS, "--format", "json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    for (table, extra) in [("widened", 2), ("coded", 1), ("priced", 2), ("rounded", 0)] {
        let t = v["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == table)
            .unwrap_or_else(|| panic!("{table} in {v}"));
        assert_eq!(
            (
                t["extra"].as_u64(),
                t["missing"].as_u64(),
                t["changed"].as_u64()
            ),
            (Some(extra), Some(0), Some(0)),
            "{table}: {v:#}"
        );
    }
}

/// Copy leaves out a green key its chunks partition (the table's only unique key, its first
/// column the chunk key or the blue column it widens) and builds it after the data; a key that
/// a rounding cast computes is kept while copy writes. Every key is a constraint again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_builds_a_key_its_chunks_partition_after_the_data() {
    let (url, mut c) = prepared("cast_keys_bare").await;
    let left_out: Vec<String> = sqlx::query_scalar(
        "SELECT green_table || ' ' || kind FROM bluegreen.deferred WHERE migration = 'cast_keys' AND NOT done ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert_eq!(
        left_out,
        [
            "coded primary key",
            "priced primary key",
            "widened primary key"
        ],
        "rounded's key is computed by a cast that does not keep every value; folded's compares under another collation than blue's"
    );
    assert_eq!(
        with_primary_key(&mut c).await,
        ["cast_keys.folded", "cast_keys.rounded"]
    );
    // What sees green between prepare and the end of the copy sees its keys as declared.
    let out = run(&url, &["plan", "-m", CAST_KEYS, "--profile", "none"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    copy_ok(&url, CAST_KEYS).await;
    assert_eq!(
        with_primary_key(&mut c).await,
        [
            "cast_keys.coded",
            "cast_keys.folded",
            "cast_keys.priced",
            "cast_keys.rounded",
            "cast_keys.widened"
        ]
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM bluegreen.deferred WHERE migration = 'cast_keys' AND NOT done"
        )
        .await,
        0
    );
    assert_invariant_now(&url, CAST_KEYS).await;
    exec(
        &mut c,
        "UPDATE public.narrow SET v = v || '!' WHERE id < 10",
    )
    .await;
    sync_and_check(&url, CAST_KEYS, "an update after the copy").await;
}

/// A mapping that produces one key twice (a join repeating it), copied without the checks
/// before writing: the key's build after the copy fails, naming the table and the key, and a
/// second run fails the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_mapping_produces_twice_fails_its_build_after_the_copy() {
    const DUP: &str = "tests/fixtures/dup_key.yaml";
    let url = empty_db("dup_key").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.p (id integer PRIMARY KEY);
         INSERT INTO public.p SELECT generate_series(1, 100);
         CREATE TABLE public.q (id integer PRIMARY KEY, p_id integer NOT NULL);
         INSERT INTO public.q SELECT g, 1 + g % 100 FROM generate_series(1, 150) g;",
    )
    .await;
    for attempt in 0..2 {
        let out = run(&url, &["copy", "-m", DUP, "--profile", "none"]).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "attempt {attempt}: {err}");
        assert!(
            err.contains("error[duplicate-key]")
                && err.contains("table dup")
                && err.contains("primary key dup_pkey")
                && err.contains("is duplicated")
                && err.contains("plan --profile full"),
            "attempt {attempt}: {err}"
        );
    }
}

/// The index builds after the copy wait past `deadlock_timeout` on green (no application uses it
/// yet), which is when a waiting backend cancels an autovacuum worker in its way: at 10 million
/// rows, autovacuum of the table copy just filled held every build's attempts below
/// `deadlock_timeout` off until the copy gave up. Here a session holds what a vacuum holds (SHARE
/// UPDATE EXCLUSIVE) on one green table for 12 s, longer than all six short attempts and their
/// backoff took (about 8 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_builds_outwait_what_a_vacuum_of_green_holds() {
    let (url, mut c) = prepared("cast_keys_vacuum").await;
    let mut holder = connect(&url).await;
    exec(
        &mut holder,
        "BEGIN; LOCK TABLE cast_keys.widened IN SHARE UPDATE EXCLUSIVE MODE",
    )
    .await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(12)).await;
        exec(&mut holder, "COMMIT").await;
    });
    let out = run(&url, &["copy", "-m", CAST_KEYS]).await;
    release.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_eq!(with_primary_key(&mut c).await.len(), 5);
    assert_invariant_now(&url, CAST_KEYS).await;
}
