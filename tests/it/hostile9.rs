//! Hostile review 9, of copy leaving out a green key its chunks partition (bce087c) and of the
//! guards that narrow a key read from green back to blue's type (a46b6cd). Findings: a key
//! reached through a rounding assignment or compared under another collation was taken for a
//! partitioned one (one key value in two chunks, the build after the copy failed); a numeric
//! scale above the precision, or a negative one, passed the guard unchecked. And, older, a
//! unique index that is not a constraint was deferred like a secondary index (an email handed
//! between two chunks' rows failed its build); comparisons of M's key with green's under
//! differing collations failed with 42P22. Interleavings are made with held locks and observed
//! in `pg_stat_activity` and the chunk ledger, not slept.

use std::time::Duration;

use crate::support::{
    assert_invariant_now, both, command, connect, count, empty_db, exec, run, stderr,
    sync_and_check, wait_child,
};
use sqlx::PgConnection;

const ROUND: &str = "tests/fixtures/hostile9_round.yaml";
const SCALE: &str = "tests/fixtures/hostile9_scale.yaml";

async fn wait_for(c: &mut PgConnection, sql: &str, what: &str) {
    for _ in 0..600 {
        if count(c, sql).await > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// `copy -m mapping --jobs 1 --chunk-rows 10` started while a session holds `green_table` in
/// SHARE mode: returned once its first chunk's INSERT waits on that lock (claimed, not yet in its
/// snapshot), with the holding session (commit it to let the chunk go on) and the copy.
async fn copy_held_at_its_first_chunk(
    url: &str,
    c: &mut PgConnection,
    mapping: &str,
    green_table: &str,
) -> (PgConnection, std::process::Child) {
    let mut a = connect(url).await;
    exec(
        &mut a,
        &format!("BEGIN; LOCK TABLE {green_table} IN SHARE MODE"),
    )
    .await;
    let child = command(
        url,
        &["copy", "-m", mapping, "--jobs", "1", "--chunk-rows", "10"],
    )
    .spawn()
    .unwrap();
    wait_for(
        c,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO%'",
        "the first chunk waiting on green",
    )
    .await;
    (a, child)
}

/// A transaction holding every pending chunk of `migration` but the claimed one (roll it back to
/// let copy go on), and the chunks it holds.
async fn hold_the_other_chunks(url: &str, migration: &str) -> (PgConnection, Vec<i32>) {
    let mut b = connect(url).await;
    exec(&mut b, "BEGIN").await;
    let locked: Vec<i32> = sqlx::query_scalar(
        "SELECT chunk_no FROM bluegreen.chunks WHERE migration = $1 AND state = 'pending' ORDER BY chunk_no FOR UPDATE SKIP LOCKED",
    )
    .bind(migration)
    .fetch_all(&mut b)
    .await
    .unwrap();
    (b, locked)
}

/// Green's key `amt integer` is mapped plainly from blue's `amt numeric(10,2)` (the assignment
/// rounds), and the chunks range over blue's values: a row copied at 9.70 (-> 10) by one chunk
/// and, after the application moves it to 10.20, again (-> 10) by the next. At no instant does
/// blue hold two rows that round alike: the mapping is fine. The key stays while copy writes, so
/// the second insert is a no-op and the catch-up re-derives key 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_moving_between_chunks_under_a_rounding_key_is_copied_once() {
    let url = empty_db("hostile9_round").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.amounts (amt numeric(10,2) PRIMARY KEY, label text NOT NULL);
         INSERT INTO public.amounts SELECT g, 'a' || g FROM generate_series(1, 40) g;
         ANALYZE public.amounts;",
    )
    .await;
    let out = run(&url, &["prepare", "-m", ROUND]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM bluegreen.deferred WHERE migration = 'hostile9_round' AND kind = 'primary key' AND NOT done").await,
        0,
        "a key blue's column reaches through a rounding assignment is kept while copy writes"
    );

    // Session A holds green, so the copy's first chunk waits after its claim.
    let (mut a, child) =
        copy_held_at_its_first_chunk(&url, &mut c, ROUND, "hostile9_round.rounded").await;
    // Session B locks every other pending chunk: the one missing is the claimed one.
    let (mut b, locked) = hold_the_other_chunks(&url, "hostile9_round").await;
    let (claimed, hi): (i32, Option<String>) = sqlx::query_as(
        "SELECT chunk_no, upper_bound FROM bluegreen.chunks WHERE migration = 'hostile9_round' AND state = 'pending' AND NOT (chunk_no = ANY($1))",
    )
    .bind(&locked)
    .fetch_one(&mut c)
    .await
    .unwrap();
    let hi: f64 = hi
        .expect("claimed chunk has an upper bound")
        .parse()
        .unwrap();
    eprintln!("claimed chunk {claimed} upper bound {hi}; others locked: {locked:?}");
    // Before the first chunk's snapshot: no row rounds to `hi` but one just below it.
    exec(
        &mut c,
        &format!(
            "DELETE FROM public.amounts WHERE amt = {hi};
             UPDATE public.amounts SET amt = {hi} - 0.3 WHERE amt = {hi} - 1;"
        ),
    )
    .await;
    exec(&mut a, "COMMIT").await;
    drop(a);
    wait_for(
        &mut c,
        &format!("SELECT count(*) FROM bluegreen.chunks WHERE migration = 'hostile9_round' AND chunk_no = {claimed} AND state = 'done'"),
        "the first chunk done",
    )
    .await;
    // The application moves the row into the next chunk's range; it still rounds to `hi`.
    exec(
        &mut c,
        &format!("UPDATE public.amounts SET amt = {hi} + 0.2 WHERE amt = {hi} - 0.3"),
    )
    .await;
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) - count(DISTINCT round(amt)) FROM public.amounts"
        )
        .await,
        0,
        "blue never holds two rows with one green key"
    );
    exec(&mut b, "ROLLBACK").await;
    let out = wait_child(child, Duration::from_secs(120), "copy".into()).await;
    if out.status.code() != Some(0) {
        // The migration is wedged: a re-run fails the same way, and sync refuses (not copied).
        let again = run(&url, &["copy", "-m", ROUND]).await;
        let sync = run(&url, &["sync", "-m", ROUND]).await;
        panic!(
            "copy failed though the mapping is fine: {}\n--- re-run: {:?} {}\n--- sync: {:?} {}",
            stderr(&out),
            again.status.code(),
            stderr(&again),
            sync.status.code(),
            stderr(&sync)
        );
    }
    sync_and_check(&url, ROUND, "copy with a row moved between chunks").await;
}

/// narrow_back's numeric(p,s) guard bounds |v| by 1e(p-s); with s > p (PostgreSQL 15:
/// numeric(2,5) holds |v| < 0.001) 1e0 lets 0.5 through and the cast raises. A green key blue's
/// type cannot hold must be an extra row (keys.rs), not an error that stops validate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrow_back_lets_through_a_value_a_scale_above_precision_cannot_hold() {
    let url = empty_db("hostile9_scale").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.tiny (v numeric(2,5) PRIMARY KEY, n integer NOT NULL);
         INSERT INTO public.tiny SELECT g / 100000.0, g FROM generate_series(1, 50) g;",
    )
    .await;
    let out = run(&url, &["copy", "-m", SCALE]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_invariant_now(&url, SCALE).await;
    exec(&mut c, "INSERT INTO hostile9_scale.tiny VALUES (0.5, 1)").await;
    let out = run(&url, &["validate", "-m", SCALE, "--format", "json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
}

/// A negative scale (PostgreSQL 15: numeric(3,-2) rounds to hundreds) is no modifier
/// narrow_back parses, so it casts without a guard: green's 150 by hand becomes 200, a key blue
/// holds. validate must report the hand row as one extra row, nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrow_back_casts_a_negative_scale_key_unguarded_onto_another_row() {
    let url = empty_db("hostile9_negscale").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.tiny (v numeric(3,-2) PRIMARY KEY, n integer NOT NULL);
         INSERT INTO public.tiny SELECT g * 100, g FROM generate_series(1, 50) g;",
    )
    .await;
    let out = run(&url, &["copy", "-m", SCALE]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_invariant_now(&url, SCALE).await;
    exec(&mut c, "INSERT INTO hostile9_scale.tiny VALUES (150, 2)").await;
    let out = run(&url, &["validate", "-m", SCALE, "--format", "json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    let t = &v["tables"][0];
    assert_eq!(
        (
            t["extra"].as_u64(),
            t["missing"].as_u64(),
            t["changed"].as_u64()
        ),
        (Some(1), Some(0), Some(0)),
        "{v:#}"
    );
}

/// Same types on both sides (blue integer, green integer): the key is left out; status and
/// validate between prepare and the end of the copy, a copy killed while its first chunk waits,
/// then a re-run, writes, and sync: green = M(blue) with its key back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_copy_re_run_with_the_key_left_out_keeps_the_invariant() {
    let url = empty_db("hostile9_kill").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.amounts (amt integer PRIMARY KEY, label text NOT NULL);
         INSERT INTO public.amounts SELECT g, 'a' || g FROM generate_series(1, 40) g;
         ANALYZE public.amounts;",
    )
    .await;
    let out = run(&url, &["prepare", "-m", ROUND]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let (mut a, mut child) =
        copy_held_at_its_first_chunk(&url, &mut c, ROUND, "hostile9_round.rounded").await;
    // Between prepare and the end of the copy, with the key left out: status reads the state,
    // validate finds green incomplete (a verdict, not an error). (plan's probes write into
    // green, which the held lock blocks.)
    for (args, code) in [
        (&["status", "-m", ROUND][..], 0),
        (&["validate", "-m", ROUND][..], 1),
    ] {
        let out = run(&url, args).await;
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", both(&out));
    }
    child.kill().unwrap();
    let _ = child.wait();
    exec(&mut c, "UPDATE public.amounts SET amt = amt + 100 WHERE amt < 5; DELETE FROM public.amounts WHERE amt = 20").await;
    exec(&mut a, "COMMIT").await;
    wait_for(
        &mut c,
        "SELECT 1 - count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'INSERT INTO%' AND state = 'active'",
        "the killed copy's insert gone",
    )
    .await;
    let out = run(
        &url,
        &["copy", "-m", ROUND, "--jobs", "2", "--chunk-rows", "10"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pg_constraint WHERE contype = 'p' AND conrelid = 'hostile9_round.rounded'::regclass").await,
        1
    );
    exec(
        &mut c,
        "UPDATE public.amounts SET amt = amt + 1000 WHERE amt > 30",
    )
    .await;
    sync_and_check(&url, ROUND, "a killed copy re-run").await;
}

/// Green's key compares case-insensitively, blue's column in "C" order: 'K30' (chunk 1 in C
/// order) copied, then the application writes it back as 'k30' (a later chunk), copied again.
/// Blue never holds two case-variants at once.
///
/// Copy now keeps this key while it writes (the collations differ) and the follower's
/// comparisons of M's key with green's carry green's collation (they failed with 42P22), but the
/// invariant still fails, for a reason older than this review: green holds the key as `K30`,
/// M(blue) says `k30`, and an upsert on a key equal under green's collation never rewrites the
/// key column. Open (issue 9's note).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known: an upsert never rewrites a key column that is equal under a nondeterministic collation"]
async fn a_case_change_moves_a_row_between_chunks_under_a_case_insensitive_key() {
    const CI: &str = "tests/fixtures/hostile9_ci.yaml";
    let url = empty_db("hostile9_ci").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.codes (code text COLLATE \"C\" PRIMARY KEY, n integer NOT NULL);
         INSERT INTO public.codes SELECT 'k' || lpad(g::text, 2, '0'), g FROM generate_series(1, 40) g;
         ANALYZE public.codes;",
    )
    .await;
    let out = run(&url, &["prepare", "-m", CI]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let (mut a, child) = copy_held_at_its_first_chunk(&url, &mut c, CI, "hostile9_ci.coded").await;
    let (mut b, locked) = hold_the_other_chunks(&url, "hostile9_ci").await;
    eprintln!("locked {locked:?}");
    exec(
        &mut c,
        "UPDATE public.codes SET code = 'K30' WHERE code = 'k30'",
    )
    .await;
    exec(&mut a, "COMMIT").await;
    wait_for(
        &mut c,
        "SELECT count(*) FROM bluegreen.chunks WHERE migration = 'hostile9_ci' AND state = 'done'",
        "the first chunk done",
    )
    .await;
    exec(
        &mut c,
        "UPDATE public.codes SET code = 'k30' WHERE code = 'K30'",
    )
    .await;
    exec(&mut b, "ROLLBACK").await;
    let out = wait_child(child, Duration::from_secs(120), "copy".into()).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "copy failed though the mapping is fine: {}",
        stderr(&out)
    );
    sync_and_check(&url, CI, "copy with a case change between chunks").await;
}

/// Green's second unique key is a plain UNIQUE INDEX (not a constraint), on email; the chunks
/// range over id. Person 1 (the first chunk) is copied with `a@x`; then the application hands
/// `a@x` to person 35 (a later chunk) and gives person 1 another. Both copies hold `a@x`, at no
/// instant did blue. Deferred like a secondary index, the unique index failed its build after
/// the copy; kept while copy writes, it is an arbiter of the chunk's `ON CONFLICT DO NOTHING`
/// and the catch-up re-derives both people.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_handed_between_two_chunks_rows_under_a_unique_index() {
    const EMAIL: &str = "tests/fixtures/hostile9_email.yaml";
    let url = empty_db("hostile9_email").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.people (id integer PRIMARY KEY, email text NOT NULL UNIQUE);
         INSERT INTO public.people SELECT g, 'p' || g || '@x' FROM generate_series(1, 40) g;
         UPDATE public.people SET email = 'a@x' WHERE id = 1;
         ANALYZE public.people;",
    )
    .await;
    let out = run(&url, &["prepare", "-m", EMAIL]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM bluegreen.deferred WHERE migration = 'hostile9_email' AND NOT done").await,
        0,
        "no key is left out of a table with two unique keys, and no unique index either"
    );
    let (mut a, child) =
        copy_held_at_its_first_chunk(&url, &mut c, EMAIL, "hostile9_email.people").await;
    // Every other chunk held, so the first one's copy of person 1 is done before the hand-over.
    let (mut b, _locked) = hold_the_other_chunks(&url, "hostile9_email").await;
    exec(&mut a, "COMMIT").await;
    wait_for(
        &mut c,
        "SELECT count(*) FROM hostile9_email.people WHERE id = 1",
        "person 1 copied",
    )
    .await;
    exec(
        &mut c,
        "BEGIN; UPDATE public.people SET email = 'b@x' WHERE id = 1;
         UPDATE public.people SET email = 'a@x' WHERE id = 35; COMMIT;",
    )
    .await;
    exec(&mut b, "ROLLBACK").await;
    let out = wait_child(child, Duration::from_secs(120), "copy".into()).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "copy failed though blue never held one email twice: {}",
        stderr(&out)
    );
    sync_and_check(&url, EMAIL, "an email handed over between two chunks").await;
}
