//! Hostile review 6: the row-local UPDATE's delete runs only when an old key is missing from the
//! new keys (`key_left`), and `lock_timeout` is set by assignment to a new variable
//! `bluegreen_set`. All fixed: keys compared by their type's own equality, not as text (H6-1..3);
//! `#variable_conflict use_column` (H6-4, and a green key named `lt`); a sync key with a nullable
//! column, or other than green's conflict key, is kept by the follower (the two probes). Each
//! test ends on the invariant.

use sqlx::PgConnection;

use crate::support::{
    assert_invariant_now, connect, copy_ok, count, empty_db, exec, sync_and_check,
};

const ENUM: &str = "tests/fixtures/hostile6_enum.yaml";
const REGPROC: &str = "tests/fixtures/hostile6_regproc.yaml";
const NAMES: &str = "tests/fixtures/hostile6_names.yaml";
const SETKEY: &str = "tests/fixtures/hostile6_setkey.yaml";
const LTKEY: &str = "tests/fixtures/hostile6_ltkey.yaml";
const RICH: &str = "tests/fixtures/hostile6_rich.yaml";
const NULLKEY: &str = "tests/fixtures/hostile6_nullkey.yaml";
const OTHERKEY: &str = "tests/fixtures/hostile6_otherkey.yaml";

/// Run `sql`, check that a row-local step gave nothing to the follower (but a SERIALIZABLE
/// writer's rows, logged by design: H2-11), then drain and check the invariant.
async fn step(url: &str, c: &mut PgConnection, mapping: &str, sql: &str) {
    exec(c, sql).await;
    if !sql.contains("SERIALIZABLE") {
        let logged = count(c, "SELECT count(*) FROM bluegreen.changes").await;
        assert_eq!(logged, 0, "{sql}: logged for the follower");
    }
    sync_and_check(url, mapping, sql).await;
}

/// H6-1: a key type whose cast to text is the application's own (`CREATE CAST (kind AS text)
/// WITH FUNCTION`, here a case-folding label): 'Draft' and 'draft' are two enum values with one
/// text. When keys were compared as text, renaming 'Draft' to 'draft' found no key left, the
/// delete was skipped and green kept the row of 'Draft'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_1_a_key_whose_text_cast_is_not_injective_leaves_the_old_green_row() {
    let url = empty_db("hostile6_1").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TYPE public.kind AS ENUM ('draft', 'Draft', 'done');
         CREATE FUNCTION public.kind_label(public.kind) RETURNS text LANGUAGE sql IMMUTABLE
           AS $$SELECT pg_catalog.lower(pg_catalog.concat($1))$$;
         CREATE CAST (public.kind AS text) WITH FUNCTION public.kind_label(public.kind);
         CREATE TABLE public.t (k public.kind PRIMARY KEY, v integer);
         INSERT INTO public.t VALUES ('Draft', 1), ('done', 2);",
    )
    .await;
    copy_ok(&url, ENUM).await;
    exec(&mut c, "UPDATE public.t SET k = 'draft' WHERE k = 'Draft'").await;
    sync_and_check(&url, ENUM, "the update").await;
    assert_invariant_now(&url, ENUM).await;
}

/// H6-2: the same with a built-in type, `regproc`: two overloads of one function both render as
/// `public.handler` (regprocout names an overloaded function without its arguments). Moving the
/// key from one overload to the other skipped the delete when keys were compared as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_2_a_regproc_key_moved_between_overloads_leaves_the_old_green_row() {
    let url = empty_db("hostile6_2").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE FUNCTION public.handler(integer) RETURNS integer LANGUAGE sql AS 'SELECT 1';
         CREATE FUNCTION public.handler(text) RETURNS integer LANGUAGE sql AS 'SELECT 2';
         CREATE FUNCTION public.other() RETURNS integer LANGUAGE sql AS 'SELECT 3';
         CREATE TABLE public.hooks (fn regproc PRIMARY KEY, note text);
         INSERT INTO public.hooks VALUES ('public.handler(integer)'::regprocedure, 'a'), ('public.other()'::regprocedure, 'b');",
    )
    .await;
    copy_ok(&url, REGPROC).await;
    exec(
        &mut c,
        "UPDATE public.hooks SET fn = 'public.handler(text)'::regprocedure WHERE fn = 'public.handler(integer)'::regprocedure",
    )
    .await;
    sync_and_check(&url, REGPROC, "the update").await;
    assert_invariant_now(&url, REGPROC).await;
}

/// H6-3: comparing keys as text (`IF EXISTS (... o.k::pg_catalog.text ...)`) ran the key type's
/// cast to text in every UPDATE, outside any subtransaction on the infallible READ COMMITTED
/// path: a cast function that raises for some value failed the application's UPDATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_3_a_text_cast_that_raises_fails_the_application_update() {
    let url = empty_db("hostile6_3").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TYPE public.kind AS ENUM ('draft', 'Draft', 'done', 'secret');
         CREATE FUNCTION public.kind_label(public.kind) RETURNS text LANGUAGE plpgsql IMMUTABLE
           AS $$BEGIN IF pg_catalog.concat($1) = 'secret' THEN RAISE EXCEPTION 'no label for secret'; END IF; RETURN pg_catalog.lower(pg_catalog.concat($1)); END$$;
         CREATE CAST (public.kind AS text) WITH FUNCTION public.kind_label(public.kind);
         CREATE TABLE public.t (k public.kind PRIMARY KEY, v integer);
         INSERT INTO public.t VALUES ('done', 2);",
    )
    .await;
    copy_ok(&url, ENUM).await;
    exec(&mut c, "INSERT INTO public.t VALUES ('secret', 3)").await;
    // The application's statement must succeed whatever sync does.
    exec(&mut c, "UPDATE public.t SET v = v + 1 WHERE k = 'secret'").await;
    sync_and_check(&url, ENUM, "the update").await;
    assert_invariant_now(&url, ENUM).await;
}

/// H6-4: a green conflict key column named `bluegreen_set`, a plpgsql variable of the trigger
/// function: `ON CONFLICT ("bluegreen_set")` is resolved as a column reference, and under
/// plpgsql's default variable_conflict = error it was ambiguous: on the READ COMMITTED path (the
/// steps run bare, no subtransaction) the application's INSERT and UPDATE failed. Fixed by
/// `#variable_conflict use_column`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_4_a_green_key_named_bluegreen_set_fails_the_application_insert() {
    let url = empty_db("hostile6_4").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.n (id integer PRIMARY KEY, bluegreen_set text NOT NULL UNIQUE, v integer);
         INSERT INTO public.n VALUES (1, 'a', 1);",
    )
    .await;
    copy_ok(&url, SETKEY).await;
    exec(&mut c, "INSERT INTO public.n VALUES (2, 'b', 2)").await;
    exec(&mut c, "UPDATE public.n SET v = v + 1").await;
    assert_invariant_now(&url, SETKEY).await;
}

/// The same with a green conflict key column named `lt`, the variable the function declared
/// before the review (an older flaw, fixed the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_probe_a_green_key_named_lt_fails_the_application_insert() {
    let url = empty_db("hostile6_lt").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.n (id integer PRIMARY KEY, lt integer NOT NULL UNIQUE, v integer);
         INSERT INTO public.n VALUES (1, 10, 1);",
    )
    .await;
    copy_ok(&url, LTKEY).await;
    exec(&mut c, "INSERT INTO public.n VALUES (2, 20, 2)").await;
    exec(&mut c, "UPDATE public.n SET v = v + 1").await;
    assert_invariant_now(&url, LTKEY).await;
}

/// Held: blue and green columns named `lt` and `bluegreen_set` (the trigger function's
/// variables; plpgsql's variable_conflict is `error`) but not green's conflict key, read by
/// entries with and without `where`,
/// keyed by different unique keys of one blue table, at every isolation level (READ COMMITTED
/// runs the steps bare, the others in the subtransaction that assigns `bluegreen_set`). No step
/// may give way to the change log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_held_columns_named_like_the_trigger_variables() {
    let url = empty_db("hostile6_names").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.n (id integer PRIMARY KEY, lt integer, bluegreen_set text, code text NOT NULL UNIQUE);
         INSERT INTO public.n SELECT i, i % 3, 's' || i, 'c' || i FROM generate_series(1, 50) i;",
    )
    .await;
    copy_ok(&url, NAMES).await;
    for iso in ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"] {
        for sql in [
            "UPDATE public.n SET lt = lt + 1",
            "UPDATE public.n SET bluegreen_set = bluegreen_set || 'x' WHERE id <= 10",
            "UPDATE public.n SET code = code || 'x' WHERE id <= 5",
            "UPDATE public.n SET id = id + 1000 WHERE id BETWEEN 11 AND 20",
            "UPDATE public.n SET bluegreen_set = 'hidden' WHERE id = 21",
            "UPDATE public.n SET lt = 0 WHERE id = 22",
            "INSERT INTO public.n VALUES (5000, 1, 'ins', 'ci') ON CONFLICT (id) DO UPDATE SET lt = EXCLUDED.lt",
            "INSERT INTO public.n VALUES (5000, 2, 'ins2', 'ci2') ON CONFLICT (id) DO UPDATE SET bluegreen_set = EXCLUDED.bluegreen_set, id = 5001",
            "DELETE FROM public.n WHERE id = 23",
        ] {
            let tx = format!("BEGIN ISOLATION LEVEL {iso}; {sql}; COMMIT");
            exec(&mut c, &tx).await;
            let logged = count(
                &mut c,
                "SELECT count(*) FROM bluegreen.changes WHERE migration = 'hostile6_names'",
            )
            .await;
            // A SERIALIZABLE writer's rows are logged by design (H2-11).
            if iso != "SERIALIZABLE" {
                assert_eq!(
                    logged, 0,
                    "{tx}: a row-local step gave way to the change log"
                );
            }
            sync_and_check(&url, NAMES, &tx).await;
        }
        exec(&mut c, "DELETE FROM public.n WHERE id >= 5000").await;
    }
    assert_invariant_now(&url, NAMES).await;
}

/// Held: statements whose keys stay put while blue changes under them in the same statement:
/// application AFTER ROW and AFTER STATEMENT triggers (before and after sync's, by name) that
/// move or delete the rows just updated, self-referencing ON UPDATE/DELETE CASCADE keys, a rule,
/// INSERT ... ON CONFLICT DO UPDATE (moving the key too), MERGE, writable CTEs handing a unique
/// value from a deleted row to an updated one, a partitioned table with rows moved across
/// partitions, REPEATABLE READ, and a key moved away and back in one transaction; two row-local
/// entries on one blue table by different keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_held_blue_changed_under_the_statement() {
    let url = empty_db("hostile6_rich").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.p (id integer PRIMARY KEY, parent integer REFERENCES public.p (id) ON UPDATE CASCADE ON DELETE CASCADE,
                                name text, code text NOT NULL UNIQUE);
         CREATE TABLE public.r (id integer PRIMARY KEY, p_id integer REFERENCES public.p (id) ON UPDATE CASCADE ON DELETE CASCADE, v integer);
         CREATE TABLE public.q (id integer NOT NULL, name text, PRIMARY KEY (id)) PARTITION BY RANGE (id);
         CREATE TABLE public.q1 PARTITION OF public.q FOR VALUES FROM (0) TO (1000);
         CREATE TABLE public.q2 PARTITION OF public.q FOR VALUES FROM (1000) TO (1000000);
         INSERT INTO public.p SELECT i, CASE WHEN i > 10 THEN i % 10 + 1 END, 'p' || i, 'c' || i FROM generate_series(1, 60) i;
         INSERT INTO public.r SELECT i, i % 60 + 1, i FROM generate_series(1, 100) i;
         INSERT INTO public.q SELECT i, 'q' || i FROM generate_series(1, 50) i;
         CREATE FUNCTION public.bounce() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.name = 'bounce' THEN UPDATE public.p SET id = id + 500, name = 'bounced', code = code || '!' WHERE id = NEW.id; END IF;
           IF NEW.name = 'vanish' THEN DELETE FROM public.p WHERE id = NEW.id; END IF;
           RETURN NULL;
         END $$;
         CREATE TRIGGER a_bounce AFTER UPDATE ON public.p FOR EACH ROW EXECUTE FUNCTION public.bounce();
         CREATE FUNCTION public.doom() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF pg_trigger_depth() > 1 THEN RETURN NULL; END IF;
           DELETE FROM public.p WHERE name = 'doomed';
           UPDATE public.p SET id = id + 700, name = 'renamed' WHERE name = 'rename me';
           RETURN NULL;
         END $$;
         CREATE TRIGGER a_doom AFTER UPDATE ON public.p FOR EACH STATEMENT EXECUTE FUNCTION public.doom();
         CREATE FUNCTION public.swap_back() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF pg_trigger_depth() > 1 THEN RETURN NULL; END IF;
           UPDATE public.p SET code = 'z' || code WHERE name = 'late';
           UPDATE public.p SET id = id + 900, name = 'late done' WHERE name = 'late';
           RETURN NULL;
         END $$;
         CREATE TRIGGER z_late AFTER UPDATE ON public.p FOR EACH STATEMENT EXECUTE FUNCTION public.swap_back();
         CREATE RULE r_neg AS ON UPDATE TO public.r WHERE NEW.v < 0 DO ALSO DELETE FROM public.r WHERE id = OLD.id;",
    )
    .await;
    copy_ok(&url, RICH).await;
    for sql in [
        "UPDATE public.p SET name = name || 'x'",
        "UPDATE public.p SET id = id + 100 WHERE id = 1",
        "UPDATE public.p SET name = 'bounce' WHERE id = 2",
        "UPDATE public.p SET name = 'vanish' WHERE id = 3",
        "UPDATE public.p SET name = 'doomed' WHERE id IN (4, 14)",
        "UPDATE public.p SET name = 'rename me' WHERE id = 5",
        "UPDATE public.p SET name = 'late' WHERE id = 6",
        "DELETE FROM public.p WHERE id = 7",
        "UPDATE public.r SET v = -1 WHERE id BETWEEN 1 AND 5",
        "UPDATE public.r SET v = v + 1",
        "INSERT INTO public.p (id, name, code) VALUES (8, 'upsert', 'c8') ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
        "INSERT INTO public.p (id, name, code) VALUES (9, 'upsert', 'c9') ON CONFLICT (id) DO UPDATE SET id = p.id + 2000",
        "MERGE INTO public.p AS t USING (VALUES (15, 'del'), (16, 'upd'), (17, 'key'), (3000, 'ins')) AS s (id, what) ON t.id = s.id
           WHEN MATCHED AND s.what = 'del' THEN DELETE
           WHEN MATCHED AND s.what = 'upd' THEN UPDATE SET name = 'merged'
           WHEN MATCHED THEN UPDATE SET id = t.id + 3000, code = 'm' || t.code
           WHEN NOT MATCHED THEN INSERT (id, name, code) VALUES (s.id, 'merged in', 'c' || s.id)",
        "WITH d AS (DELETE FROM public.p WHERE id = 18 RETURNING code) UPDATE public.p SET code = (SELECT code FROM d) WHERE id = 19",
        "WITH d AS (DELETE FROM public.p WHERE id = 20 RETURNING id) UPDATE public.p SET name = 'cte' WHERE id = 21",
        "WITH a AS (UPDATE public.p SET name = 'a' WHERE id = 22 RETURNING id) UPDATE public.p SET id = 4022 WHERE id = 23",
        "UPDATE public.q SET id = id + 1000 WHERE id <= 5",
        "UPDATE public.q SET name = name || 'y'",
        "UPDATE public.q1 SET name = 'direct' WHERE id = 10",
        "UPDATE public.q SET id = id - 1000 WHERE id BETWEEN 1001 AND 1002",
        "BEGIN ISOLATION LEVEL REPEATABLE READ; UPDATE public.p SET name = 'rr'; UPDATE public.p SET id = id + 5000 WHERE id = 24; COMMIT",
        "BEGIN ISOLATION LEVEL SERIALIZABLE; UPDATE public.p SET name = 'bounce' WHERE id = 25; UPDATE public.p SET name = 'late' WHERE id = 26; COMMIT",
        "BEGIN; UPDATE public.p SET id = 9000 WHERE id = 27; UPDATE public.p SET id = 27 WHERE id = 9000; COMMIT",
        "BEGIN; UPDATE public.p SET code = 'tmp' WHERE id = 28; UPDATE public.p SET code = 'c28', name = 'back' WHERE id = 28; COMMIT",
    ] {
        step(&url, &mut c, RICH, sql).await;
    }
    assert_invariant_now(&url, RICH).await;
}

/// An older flaw the review probed: a sync key that contains blue's key and a nullable column.
/// The trigger's delete compared the key as a row with IN, which never matches a NULL: moving
/// the id of a row whose `code` is NULL left its green row. Such an entry is now the follower's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_probe_a_nullable_sync_key_column_keeps_the_moved_row() {
    let url = empty_db("hostile6_nullkey").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.s (id integer PRIMARY KEY, code text, v integer);
         INSERT INTO public.s VALUES (1, NULL, 1), (2, 'b', 2);",
    )
    .await;
    copy_ok(&url, NULLKEY).await;
    let sql = "UPDATE public.s SET id = 10 WHERE id = 1";
    exec(&mut c, sql).await;
    sync_and_check(&url, NULLKEY, sql).await;
    assert_invariant_now(&url, NULLKEY).await;
}

/// An older flaw the review probed: a sync key (blue's id) other than green's conflict key
/// (green's primary key, blue's other unique key `code`): a new code inserted a second green row
/// of the same id, and the delete (by sync key) found the id still in blue. Such an entry is now
/// the follower's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_probe_a_sync_key_other_than_the_conflict_key_keeps_the_old_row() {
    let url = empty_db("hostile6_otherkey").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.o (id integer PRIMARY KEY, code text NOT NULL UNIQUE, v integer);
         INSERT INTO public.o VALUES (1, 'a', 1), (2, 'b', 2);",
    )
    .await;
    copy_ok(&url, OTHERKEY).await;
    let sql = "UPDATE public.o SET code = 'z' WHERE id = 1";
    exec(&mut c, sql).await;
    sync_and_check(&url, OTHERKEY, sql).await;
    assert_invariant_now(&url, OTHERKEY).await;
}

/// Held: two sessions. A writer whose UPDATE keeps its keys (so its delete is skipped) commits
/// while a second one waits on its rows, then goes on from the rows A left (EvalPlanQual): a
/// DELETE of them, an UPDATE moving their keys, an UPDATE keeping them, an ON CONFLICT upsert;
/// and the other way round, A moving keys while B's key-keeping UPDATE waits and follows the moved
/// row; READ COMMITTED and REPEATABLE READ waiters (a serialization error, or a row moved to
/// another partition under a waiter, is PostgreSQL's own, as without sync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h6_held_two_sessions_on_the_same_rows() {
    let url = empty_db("hostile6_conc").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.p (id integer PRIMARY KEY, parent integer REFERENCES public.p (id) ON UPDATE CASCADE ON DELETE CASCADE,
                                name text, code text NOT NULL UNIQUE);
         CREATE TABLE public.r (id integer PRIMARY KEY, p_id integer, v integer);
         CREATE TABLE public.q (id integer NOT NULL, name text, PRIMARY KEY (id)) PARTITION BY RANGE (id);
         CREATE TABLE public.q1 PARTITION OF public.q FOR VALUES FROM (0) TO (1000);
         CREATE TABLE public.q2 PARTITION OF public.q FOR VALUES FROM (1000) TO (1000000);
         INSERT INTO public.p SELECT i, NULL, 'p' || i, 'c' || i FROM generate_series(1, 60) i;
         INSERT INTO public.q SELECT i, 'q' || i FROM generate_series(1, 50) i;",
    )
    .await;
    copy_ok(&url, RICH).await;
    let pairs: [(&str, &str); 8] = [
        (
            "UPDATE public.p SET name = 'a' WHERE id BETWEEN 1 AND 5",
            "DELETE FROM public.p WHERE id BETWEEN 1 AND 5",
        ),
        (
            "UPDATE public.p SET name = 'a' WHERE id BETWEEN 6 AND 10",
            "UPDATE public.p SET id = id + 1000, code = code || 'm' WHERE name = 'a' AND id BETWEEN 6 AND 10",
        ),
        (
            "UPDATE public.p SET id = id + 2000 WHERE id BETWEEN 11 AND 15",
            "UPDATE public.p SET name = 'followed' WHERE name LIKE 'p1%'",
        ),
        (
            "UPDATE public.p SET code = code || 'z' WHERE id BETWEEN 16 AND 20",
            "UPDATE public.p SET name = 'b' WHERE code LIKE '%z' OR id BETWEEN 16 AND 20",
        ),
        (
            "UPDATE public.p SET name = 'c' WHERE id = 21",
            "INSERT INTO public.p (id, name, code) VALUES (21, 'u', 'c21') ON CONFLICT (id) DO UPDATE SET id = 3021",
        ),
        (
            "UPDATE public.q SET name = 'a' WHERE id BETWEEN 1 AND 5",
            "UPDATE public.q SET id = id + 1000 WHERE id BETWEEN 1 AND 5",
        ),
        (
            "UPDATE public.q SET id = id + 1000 WHERE id BETWEEN 6 AND 10",
            "UPDATE public.q SET name = 'moved' WHERE name LIKE 'q%'",
        ),
        (
            "UPDATE public.p SET name = 'd' WHERE id BETWEEN 22 AND 25",
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1; UPDATE public.p SET name = 'rr' WHERE id BETWEEN 22 AND 25; COMMIT",
        ),
    ];
    for (a, b) in pairs {
        exec(&mut c, &format!("BEGIN; {a}")).await;
        let url2 = url.clone();
        let b2 = b.to_string();
        let waiter = tokio::spawn(async move {
            let mut d = connect(&url2).await;
            let r = sqlx::raw_sql(sqlx::AssertSqlSafe(b2.clone()))
                .execute(&mut d)
                .await;
            if r.is_err() {
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut d).await;
            }
            r.map(|_| ()).map_err(|e| e.to_string())
        });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        exec(&mut c, "COMMIT").await;
        match waiter.await.unwrap() {
            Ok(()) => {}
            // PostgreSQL's own errors, with or without sync's triggers.
            Err(e)
                if e.contains("could not serialize")
                    || e.contains("moved to another partition") => {}
            Err(e) => panic!("{b}: {e}"),
        }
        sync_and_check(&url, RICH, &format!("{a} / {b}")).await;
    }
    assert_invariant_now(&url, RICH).await;
}
