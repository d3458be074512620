//! One test per rule of DESIGN.md's "Rules from the design review" that applies before cutover
//! (H1-H4, M1, M2, M4-M6 of `reviews/design-attack.md`), each built from the review's interleaving
//! with real concurrent sessions against the throwaway cluster, each asserting what the rule
//! demands (so it fails while the rule is broken), and each ending on the invariant itself
//! (`green.T = M(blue)` as multisets, support::assert_invariant after draining the change log),
//! never on a row count.
//!
//! A wait is bounded, never slept through: every bluegreen command runs as a child process under
//! a time limit, every application statement under a timeout far above its normal duration.
//! Where a test needs an applier to be slow at one precise point, the mapping calls a function
//! that sleeps only in bluegreen's own sessions (`application_name = 'bluegreen'`) and only for
//! one key: the application's statements and the invariant's own query never sleep.

use std::process::{Child, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgConnection;

use crate::support::{
    self, Problems, assert_invariant, assert_invariant_now, both, command, connect, copy_ok, count,
    drain, empty_db, exec, run_within, status_json, stderr, wait_child,
};

const H1: &str = "tests/fixtures/rules_h1.yaml";
const H2: &str = "tests/fixtures/rules_h2.yaml";
const H3: &str = "tests/fixtures/rules_h3.yaml";
const H4: &str = "tests/fixtures/rules_h4.yaml";
const M1: &str = "tests/fixtures/rules_m1.yaml";
const M1C: &str = "tests/fixtures/rules_m1c.yaml";
const M2: &str = "tests/fixtures/rules_m2.yaml";
const M4: &str = "tests/fixtures/rules_m4.yaml";
const M5: &str = "tests/fixtures/rules_m5.yaml";
const M6: &str = "tests/fixtures/rules_m6.yaml";

/// Far above what any application statement here needs when nothing blocks it.
const NO_WAIT: Duration = Duration::from_secs(10);
/// What a `sync` that must not wait for an open application transaction may take at most.
const QUICK: Duration = Duration::from_secs(20);
/// What any other bluegreen command may take at most (a stall fails the test, never hangs it).
const SLOW: Duration = Duration::from_secs(180);

async fn int(c: &mut PgConnection, sql: &str) -> Option<i32> {
    sqlx::query_scalar::<_, Option<i32>>(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_optional(c)
        .await
        .unwrap_or_else(|e| panic!("{e}\nin: {sql}"))
        .flatten()
}

async fn text(c: &mut PgConnection, sql: &str) -> Option<String> {
    sqlx::query_scalar::<_, Option<String>>(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_optional(c)
        .await
        .unwrap_or_else(|e| panic!("{e}\nin: {sql}"))
        .flatten()
}

/// Run `sql` on `c`, which must succeed within [`NO_WAIT`]. Returns how long it took.
async fn must_not_wait(c: &mut PgConnection, what: &str, sql: &str) -> Duration {
    support::must_not_wait(c, what, sql, NO_WAIT).await
}

/// `bluegreen sync --follow` as a child process.
struct Follower {
    child: Child,
}

impl Follower {
    /// Start a follower and wait until it has registered in `bluegreen.followers`.
    async fn start(url: &str, mapping: &str, migration: &str) -> Follower {
        let child = command(url, &["sync", "--follow", "-m", mapping])
            .spawn()
            .unwrap();
        let f = Follower { child };
        let mut c = connect(url).await;
        let start = Instant::now();
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM bluegreen.followers WHERE migration = $1 AND pid = $2",
            )
            .bind(migration)
            .bind(f.child.id() as i32)
            .fetch_one(&mut c)
            .await
            .unwrap();
            if n == 1 {
                return f;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the follower never registered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then wait for it to leave.
    async fn stop(self) -> Output {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        wait_child(self.child, Duration::from_secs(30), "sync --follow".into()).await
    }
}

/// Whether each entry of `mapping` is row-local, as sync classifies it against the database.
async fn row_local(url: &str, mapping: &str) -> Vec<(String, bool)> {
    let m = bluegreen::mapping::load(&support::root().join(mapping)).unwrap();
    let mut c = connect(url).await;
    let cat = bluegreen::control::load_catalog_for_sync(&mut c, &m)
        .await
        .unwrap();
    let mut out: Vec<(String, bool)> = bluegreen::plan::sync::sync_entries(&m, &cat)
        .iter()
        .map(|e| (e.entry.name.clone(), e.row_local()))
        .collect();
    out.sort();
    out
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

/// Change-log rows (committed) plus full re-derives pending for `migration`.
async fn pending(c: &mut PgConnection, migration: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM bluegreen.changes WHERE migration = $1)
              + (SELECT count(*) FROM bluegreen.rederive WHERE migration = $1)",
    )
    .bind(migration)
    .fetch_one(c)
    .await
    .unwrap()
}

/// Wait until nothing is pending and no key is failed for `migration` (a running follower applies
/// and retries), at most `limit`; false when that never happened.
async fn wait_until_settled(url: &str, migration: &str, limit: Duration) -> bool {
    let mut c = connect(url).await;
    let start = Instant::now();
    loop {
        if pending(&mut c, migration).await == 0 && failures(&mut c, migration).await.is_empty() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll `sql` (a boolean query) until it is true, at most `limit`; whether it became true.
async fn wait_until(c: &mut PgConnection, sql: &str, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        let yes: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut *c)
            .await
            .unwrap_or_else(|e| panic!("{e}\nin: {sql}"));
        if yes {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// True once some bluegreen session of this database sleeps inside a mapping expression.
const APPLIER_SLEEPING: &str = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'bluegreen' AND wait_event = 'PgSleep')";

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

/// `validate --format json` with `extra` arguments: exit code and the report.
async fn validate_json(
    url: &str,
    mapping: &str,
    extra: &[&str],
) -> (Option<i32>, serde_json::Value, String) {
    let mut args = vec!["validate", "-m", mapping, "--format", "json"];
    args.extend_from_slice(extra);
    let out = run_within(url, &args, SLOW).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (out.status.code(), v, both(&out))
}

/// H1: green foreign keys across sync modes. Green `shops` (one row per blue shop) references
/// `orgs` (grouped by owner: the follower's), and green `custs` references `shops`, as CarBot's
/// workshops, organizations and customers do. The rule: `plan` makes `shops` and `custs` the
/// follower's and says why (an in-statement insert of a shop with a new owner would meet a
/// missing green org, an in-statement delete of a shop would meet its green customers); then
/// the review's two statements (a shop with a new owner; customers and their shop deleted in one
/// transaction) from two sessions beside a running follower never fail, and no failure is left
/// once the log is drained. Last, the 23503 made deterministic: in one transaction the
/// application moves shop 11's customers to shop 12 with names green's CHECK rejects (so their
/// apply fails and green keeps them under shop 11) and deletes shop 11; `sync` meets 23503 on the
/// green shop's delete. Once the customers are fixed in blue, one `sync` applies them and then
/// the shop, and leaves no failure: 23503 was "not yet", retried after the other side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_h1_foreign_keys_across_sync_modes_make_23503_not_yet() {
    let url = empty_db("rules_h1").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.shops (id integer PRIMARY KEY, owner_email text NOT NULL, name text);
         CREATE TABLE public.custs (id integer PRIMARY KEY, shop_id integer NOT NULL REFERENCES public.shops (id), name text);
         INSERT INTO public.shops SELECT g, 'owner' || (g % 5) || '@example.org', 'shop ' || g FROM generate_series(1, 50) g;
         INSERT INTO public.custs SELECT g, 1 + g % 50, 'cust ' || g FROM generate_series(1, 500) g;",
    )
    .await;
    let mut problems = Problems::default();
    for (name, other) in [("shops", "orgs"), ("custs", "shops")] {
        let (out, mode) = plan_sync_mode(&url, H1, name).await;
        assert_eq!(out.status.code(), Some(0), "{}", both(&out));
        problems.check(
            mode["mode"] == "follower"
                && mode["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("foreign key") && r.contains(other)),
            || format!("plan must show {name} kept by the follower (green foreign key to {other}): {mode}"),
        );
    }
    copy_ok(&url, H1).await;
    let modes = row_local(&url, H1).await;
    problems.check(modes.iter().all(|(_, rl)| !rl), || {
        format!("sync keeps an entry linked by a green foreign key to the follower's row-local: {modes:?}")
    });

    let f = Follower::start(&url, H1, "rules_h1").await;
    let a = tokio::spawn({
        let url = url.clone();
        async move {
            let mut a = connect(&url).await;
            for i in 0..20 {
                must_not_wait(
                    &mut a,
                    "A's shop with a new owner",
                    &format!(
                        "INSERT INTO public.shops VALUES ({}, 'new{i}@x.de', 'new {i}')",
                        1000 + i
                    ),
                )
                .await;
                must_not_wait(
                    &mut a,
                    "A's customer of the new shop",
                    &format!(
                        "INSERT INTO public.custs VALUES ({}, {}, 'c {i}')",
                        10_000 + i,
                        1000 + i
                    ),
                )
                .await;
            }
        }
    });
    let b = tokio::spawn({
        let url = url.clone();
        async move {
            let mut b = connect(&url).await;
            for w in 1..=10 {
                must_not_wait(
                    &mut b,
                    "B's delete of a shop and its customers",
                    &format!(
                        "BEGIN; DELETE FROM public.custs WHERE shop_id = {w}; DELETE FROM public.shops WHERE id = {w}; COMMIT"
                    ),
                )
                .await;
            }
        }
    });
    a.await.unwrap();
    b.await.unwrap();
    let settled = wait_until_settled(&url, "rules_h1", Duration::from_secs(60)).await;
    let left = failures(&mut c, "rules_h1").await;
    problems.check(settled, || {
        format!(
            "beside the follower, changes or failures stayed for 60 s after the writes: {left:?}"
        )
    });
    if settled {
        let v = support::invariant_violations(&url, H1).await;
        problems.check(v.is_empty(), || {
            format!("the follower settled but green != M(blue): {v:?}")
        });
    }
    let out = f.stop().await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));

    // The deterministic 23503: the customers of shop 11 move to shop 12 with names green's
    // CHECK rejects (their apply fails, so green keeps them under shop 11), and shop 11 goes.
    must_not_wait(
        &mut c,
        "the move of shop 11's customers and the delete of shop 11",
        "BEGIN; UPDATE public.custs SET shop_id = 12, name = 'bad ' || name WHERE shop_id = 11; DELETE FROM public.shops WHERE id = 11; COMMIT",
    )
    .await;
    let out = run_within(&url, &["sync", "-m", H1], QUICK).await;
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", both(&out));
    let held = failures(&mut c, "rules_h1").await;
    eprintln!("H1: while the customers' apply failed: {held:?}");
    assert!(
        held.iter()
            .any(|(t, _, e)| t == "custs" && e.starts_with("23514")),
        "the customers' apply did not fail (the interleaving was not exercised): {held:?}"
    );
    let shop_in_green = count(&mut c, "SELECT count(*) FROM rules_h1.shops WHERE id = 11").await;
    problems.check(shop_in_green == 1, || {
        "green shop 11 went while its green customers were still there".into()
    });
    // The other side is fixed: one sync applies the customers, then the shop's delete.
    must_not_wait(
        &mut c,
        "the fix of the customers' names",
        "UPDATE public.custs SET name = substr(name, 5) WHERE name LIKE 'bad %'",
    )
    .await;
    let out = run_within(&url, &["sync", "-m", H1], QUICK).await;
    problems.check(out.status.code() == Some(0), || {
        format!(
            "one sync after the other side was fixed must apply everything and exit 0: {}",
            both(&out)
        )
    });
    let left = failures(&mut c, "rules_h1").await;
    problems.check(left.is_empty(), || {
        format!("a 23503 stayed a failure although its other side was applied and the log drained: {left:?}")
    });
    let st = status_json(&url, H1).await;
    problems.check(st["failures_total"] == 0, || {
        format!("status shows failures: {}", st["failures"])
    });
    problems.assert_none();
    assert_invariant_now(&url, H1).await;
    assert_invariant(&url, H1).await;
}

/// H2: row-local values come from the blue rows, not the transition tables. The application has
/// an AFTER ROW trigger that rewrites the row it was fired for in a nested statement (as
/// `updated_at` maintenance does): the nested statement's sync runs first, then the outer
/// statement's with its own (now stale) transition row. The review's `UPDATE t SET x = 1, y =
/// 'outer' WHERE id = 1` (and an INSERT of the same kind) leave blue with the nested value, and
/// green must hold it at once (row-local entries are never pending), for a bare step and for a
/// guarded one; then two sessions do the same concurrently, in autocommit and in multi-statement
/// transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_h2_row_local_values_are_read_from_blue_after_a_nested_rewrite() {
    let url = empty_db("rules_h2").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.t (id integer PRIMARY KEY, x integer, y text);
         INSERT INTO public.t SELECT g, 0, 'v' || g FROM generate_series(1, 100) g;
         CREATE FUNCTION public.t_touch() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           UPDATE public.t SET y = 'nested:' || NEW.y WHERE id = NEW.id AND y NOT LIKE 'nested:%';
           RETURN NULL;
         END $$;
         CREATE TRIGGER t_touch AFTER INSERT OR UPDATE ON public.t FOR EACH ROW EXECUTE FUNCTION public.t_touch();",
    )
    .await;
    copy_ok(&url, H2).await;
    assert_eq!(
        row_local(&url, H2).await,
        vec![("t".to_string(), true), ("t_checked".to_string(), true)]
    );
    let mut problems = Problems::default();
    let mut a = connect(&url).await;
    for (sql, id) in [
        ("UPDATE public.t SET x = 1, y = 'outer' WHERE id = 1", 1),
        ("INSERT INTO public.t VALUES (1001, 5, 'ins')", 1001),
    ] {
        must_not_wait(&mut a, "the application's write", sql).await;
        let blue = text(&mut c, &format!("SELECT y FROM public.t WHERE id = {id}")).await;
        assert!(
            blue.as_deref().is_some_and(|y| y.starts_with("nested:")),
            "the application's trigger did not rewrite the row: blue y = {blue:?}"
        );
        for g in ["t", "t_checked"] {
            let green = text(
                &mut c,
                &format!("SELECT y FROM rules_h2.{g} WHERE id = {id}"),
            )
            .await;
            problems.check(green == blue, || {
                format!("after `{sql}` blue y = {blue:?} but green {g}.y = {green:?} (taken from the outer statement's transition table)")
            });
        }
        let p = pending(&mut c, "rules_h2").await;
        problems.check(p == 0, || {
            format!("after `{sql}`: {p} change(s) pending for row-local entries")
        });
        let v = support::invariant_violations(&url, H2).await;
        problems.check(v.is_empty(), || {
            format!("after `{sql}`, with nothing drained: green != M(blue): {v:?}")
        });
    }

    // Two sessions concurrently, each row rewritten by the nested statement.
    let mut tasks = Vec::new();
    for s in 0..2u32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = connect(&url).await;
            for i in 0..40u32 {
                let id = 1 + s * 40 + i % 40;
                let sql = if i % 2 == 0 {
                    format!("UPDATE public.t SET x = x + 1, y = 's{s}-{i}' WHERE id = {id}")
                } else {
                    format!(
                        "BEGIN; INSERT INTO public.t VALUES ({}, {i}, 'ins{s}-{i}'); UPDATE public.t SET y = 'tx{s}-{i}' WHERE id = {id}; UPDATE public.t SET x = x + 1 WHERE id = {id}; COMMIT",
                        2000 + s * 100 + i
                    )
                };
                must_not_wait(&mut w, "a concurrent write", &sql).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stale = count(
        &mut c,
        "SELECT count(*) FROM public.t b LEFT JOIN rules_h2.t g USING (id) WHERE g.y IS DISTINCT FROM b.y",
    )
    .await;
    problems.check(stale == 0, || {
        format!("{stale} green row(s) hold the outer statement's value, not blue's")
    });
    if pending(&mut c, "rules_h2").await == 0 {
        let v = support::invariant_violations(&url, H2).await;
        problems.check(v.is_empty(), || {
            format!("nothing pending after the concurrent writes, yet green != M(blue): {v:?}")
        });
    }
    problems.assert_none();
    assert_invariant(&url, H2).await;
}

/// H3: an applier re-deriving a row-local key reads the blue row `FOR SHARE`, so a writer's newer
/// in-statement value is never overwritten by the applier's older M(blue). The review's
/// interleaving, made exact by a mapping that sleeps for key 1 in bluegreen's sessions only: the
/// applier (`sync`) holds key 1 and computes M(blue) for it (sleeping); S then updates blue row 1
/// (its step writes green 1); S commits; the applier writes. Green must end with S's value. Twice:
/// key 1 pending because its step gave way to the change log (a session held the green row), and
/// pending as part of a full re-derive (a TRUNCATE). Overlap: review::f3 (row-local part) runs
/// the applier after S's update is already open; here S comes in while the applier is computing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_h3_an_applier_reads_a_row_local_blue_row_for_share() {
    let url = empty_db("rules_h3").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.acct (id integer PRIMARY KEY, bal integer NOT NULL);
         INSERT INTO public.acct SELECT g, 0 FROM generate_series(1, 20) g;
         CREATE FUNCTION public.rules_h3_slow(v integer, k integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$
         BEGIN
           IF k = 1 AND current_setting('application_name') = 'bluegreen' THEN
             PERFORM pg_sleep(0.4);
           END IF;
           RETURN v;
         END $$;",
    )
    .await;
    copy_ok(&url, H3).await;
    assert_eq!(row_local(&url, H3).await, vec![("acct".to_string(), true)]);
    let mut problems = Problems::default();
    let mut probe = connect(&url).await;

    // (a) Key 1 in the change log: its step gave way to a session holding the green row.
    let mut holder = connect(&url).await;
    exec(
        &mut holder,
        "BEGIN; SELECT 1 FROM rules_h3.acct WHERE id = 1 FOR UPDATE",
    )
    .await;
    let mut s = connect(&url).await;
    must_not_wait(
        &mut s,
        "S1 while green's row is held",
        "UPDATE public.acct SET bal = 111 WHERE id = 1",
    )
    .await;
    exec(&mut holder, "ROLLBACK").await;
    assert!(
        pending(&mut c, "rules_h3").await > 0,
        "S1's step did not give way to the change log"
    );

    for (round, setup, value) in [
        ("a: a change that gave way", None, 222),
        (
            "b: a full re-derive after TRUNCATE",
            Some(
                "BEGIN; TRUNCATE public.acct; INSERT INTO public.acct SELECT g, 0 FROM generate_series(1, 20) g; COMMIT",
            ),
            333,
        ),
    ] {
        if let Some(sql) = setup {
            must_not_wait(&mut s, "the truncate and reload", sql).await;
            assert!(
                pending(&mut c, "rules_h3").await > 0,
                "{round}: nothing pending"
            );
        }
        let sync = tokio::spawn({
            let url = url.clone();
            async move { run_within(&url, &["sync", "-m", H3], QUICK).await }
        });
        let sleeping = wait_until(&mut probe, APPLIER_SLEEPING, Duration::from_secs(15)).await;
        assert!(sleeping, "{round}: the applier never computed key 1");
        // S comes between the applier's key and its write.
        let writer = tokio::spawn({
            let url = url.clone();
            async move {
                let mut s2 = connect(&url).await;
                must_not_wait(
                    &mut s2,
                    "S's update while the applier computes key 1",
                    &format!("UPDATE public.acct SET bal = {value} WHERE id = 1"),
                )
                .await
            }
        });
        let out = sync.await.unwrap();
        let took = writer.await.unwrap();
        eprintln!(
            "H3 {round}: S's update took {took:?}; sync {:?}",
            out.status.code()
        );
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", both(&out));
        let green = int(&mut c, "SELECT bal FROM rules_h3.acct WHERE id = 1").await;
        problems.check(green == Some(value), || {
            format!("{round}: green key 1 holds {green:?} after S committed {value}: the applier wrote its older M(blue)")
        });
        let p = pending(&mut c, "rules_h3").await;
        let v = support::invariant_violations(&url, H3).await;
        problems.check(p > 0 || v.is_empty(), || {
            format!("{round}: nothing pending, yet green != M(blue): {v:?}")
        });
        drain(&url, H3).await;
    }
    problems.assert_none();
    assert_invariant(&url, H3).await;
}

/// H4: green constraints lock, so row-local eligibility needs every green UNIQUE implied by a
/// blue one, the in-statement step gives way under a short lock_timeout, and appliers never put
/// key columns in an upsert's SET.
/// (b) The review's interleaving on a green UNIQUE blue lacks (`T1: INSERT (1,'a'); T2: INSERT
/// (2,'b'); T1: INSERT (3,'b'); T2: INSERT (4,'a')`, which would be a 40P01 between two
/// application transactions were the entry row-local): `plan` makes it the follower's, no
/// statement waits, both commit, and the duplicates are sync failures (23505), one of each pair.
/// (c) An application with `statement_timeout = 300ms` whose guarded step meets a held green
/// row: its statement succeeds, the key goes to the change log as pending, not to the failures.
/// (a) A pending key whose green row a session holds `FOR KEY SHARE` (what a green foreign-key
/// check takes): `sync` applies it without waiting, which an upsert with its key in SET could
/// not. Overlap: hostile::h4 (an EXCLUDE, not a UNIQUE) and hostile::h2ab (b) (the same lock as
/// (a), taken by a child insert).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_h4_green_constraints_never_make_the_application_wait_or_fail() {
    let url = empty_db("rules_h4").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.names (id integer PRIMARY KEY, name text NOT NULL);
         INSERT INTO public.names SELECT g, 'n' || g FROM generate_series(1, 50) g;
         CREATE TABLE public.acct (id integer PRIMARY KEY, bal integer NOT NULL);
         INSERT INTO public.acct SELECT g, 0 FROM generate_series(1, 20) g;",
    )
    .await;
    let mut problems = Problems::default();
    let (out, mode) = plan_sync_mode(&url, H4, "names").await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    problems.check(
        mode["mode"] == "follower"
            && mode["reason"]
                .as_str()
                .is_some_and(|r| r.contains("unique")),
        || format!("plan must show names kept by the follower (green UNIQUE blue lacks): {mode}"),
    );
    copy_ok(&url, H4).await;
    let modes = row_local(&url, H4).await;
    problems.check(
        modes == vec![("acct".to_string(), true), ("names".to_string(), false)],
        || format!("sync modes: {modes:?}"),
    );

    // (b)
    let mut t1 = connect(&url).await;
    let mut t2 = connect(&url).await;
    must_not_wait(
        &mut t1,
        "T1",
        "BEGIN; INSERT INTO public.names VALUES (101, 'a')",
    )
    .await;
    must_not_wait(
        &mut t2,
        "T2",
        "BEGIN; INSERT INTO public.names VALUES (102, 'b')",
    )
    .await;
    must_not_wait(
        &mut t1,
        "T1's 'b'",
        "INSERT INTO public.names VALUES (103, 'b')",
    )
    .await;
    must_not_wait(
        &mut t2,
        "T2's 'a'",
        "INSERT INTO public.names VALUES (104, 'a')",
    )
    .await;
    must_not_wait(&mut t1, "T1's commit", "COMMIT").await;
    must_not_wait(&mut t2, "T2's commit", "COMMIT").await;
    let out = run_within(&url, &["sync", "-m", H4], SLOW).await;
    problems.check(out.status.code() == Some(1), || {
        format!(
            "sync must exit 1 with the duplicates failed: {}",
            both(&out)
        )
    });
    let failed = failures(&mut c, "rules_h4").await;
    let keys: Vec<&str> = failed.iter().map(|(_, k, _)| k.as_str()).collect();
    problems.check(
        failed.len() == 2
            && failed
                .iter()
                .all(|(t, _, e)| t == "names" && e.starts_with("23505"))
            && (keys.contains(&"[101]") ^ keys.contains(&"[104]"))
            && (keys.contains(&"[102]") ^ keys.contains(&"[103]")),
        || format!("expected one key of each duplicated name failed with 23505: {failed:?}"),
    );
    let ids: Vec<i32> = failed
        .iter()
        .filter_map(|(_, k, _)| k.trim_matches(|ch| ch == '[' || ch == ']').parse().ok())
        .collect();
    sqlx::query("DELETE FROM public.names WHERE id = ANY ($1)")
        .bind(&ids)
        .execute(&mut c)
        .await
        .unwrap();
    let out = run_within(&url, &["sync", "-m", H4], SLOW).await;
    problems.check(out.status.code() == Some(0), || {
        format!("sync once blue gave the duplicates up: {}", both(&out))
    });
    assert_invariant_now(&url, H4).await;

    // (c)
    let mut holder = connect(&url).await;
    exec(
        &mut holder,
        "BEGIN; SELECT 1 FROM rules_h4.acct WHERE id = 1 FOR UPDATE",
    )
    .await;
    let mut app = connect(&url).await;
    exec(&mut app, "SET statement_timeout = '300ms'").await;
    let r = tokio::time::timeout(
        NO_WAIT,
        sqlx::raw_sql("UPDATE public.acct SET bal = 5 WHERE id = 1").execute(&mut app),
    )
    .await
    .expect("the application's update waited 10 s");
    problems.check(r.is_ok(), || {
        format!("the application's update (statement_timeout 300ms) failed beside a held green row: {r:?}")
    });
    let p = pending(&mut c, "rules_h4").await;
    let failed = failures(&mut c, "rules_h4").await;
    problems.check(p > 0 && failed.is_empty(), || {
        format!("the step that gave way must leave its key pending ({p} pending), not failed: {failed:?}")
    });
    exec(&mut holder, "ROLLBACK").await;
    exec(&mut app, "RESET statement_timeout").await;
    drain(&url, H4).await;
    assert_invariant_now(&url, H4).await;

    // (a)
    exec(
        &mut holder,
        "BEGIN; SELECT 1 FROM rules_h4.acct WHERE id = 2 FOR UPDATE",
    )
    .await;
    must_not_wait(
        &mut app,
        "the update while green's row is held",
        "UPDATE public.acct SET bal = 7 WHERE id = 2",
    )
    .await;
    exec(&mut holder, "ROLLBACK").await;
    assert!(
        pending(&mut c, "rules_h4").await > 0,
        "the step did not give way"
    );
    let mut fk = connect(&url).await;
    exec(
        &mut fk,
        "BEGIN; SELECT 1 FROM rules_h4.acct WHERE id = 2 FOR KEY SHARE",
    )
    .await;
    let out = run_within(&url, &["sync", "-m", H4], QUICK).await;
    problems.check(out.status.code() == Some(0), || {
        format!(
            "sync beside a FOR KEY SHARE holder of the key's green row must exit 0: {}",
            both(&out)
        )
    });
    let bal = int(&mut c, "SELECT bal FROM rules_h4.acct WHERE id = 2").await;
    problems.check(bal == Some(7), || {
        format!("sync did not apply key 2 beside the FOR KEY SHARE holder: green bal {bal:?}")
    });
    exec(&mut fk, "ROLLBACK").await;
    problems.assert_none();
    assert_invariant(&url, H4).await;
}

/// M1 (a): a key pending in every snapshot is never passed unverified. Two writers update
/// group 1 without pause (each change logged for the follower's entry), and an application
/// transaction stays open holding a row of another group, so validate's fenced last look cannot
/// lock blue: `validate` must report group 1 "unverified (hot)" and exit 1, and with
/// `--allow-hot` exit 0, still reporting it. Once the writes pause, validate passes with nothing
/// unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_m1_a_hot_key_is_reported_unverified_never_passed() {
    let url = empty_db("rules_m1").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, grp integer NOT NULL, v integer NOT NULL);
         INSERT INTO public.items SELECT g, g % 10, g FROM generate_series(1, 1000) g;",
    )
    .await;
    copy_ok(&url, M1).await;
    let mut problems = Problems::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            tokio::spawn(support::write_until_stopped(
                url.clone(),
                stop.clone(),
                move |i| {
                    format!(
                        "UPDATE public.items SET v = v + 1 WHERE id = {}",
                        1 + ((i * 2 + w) % 5) * 10
                    )
                },
            ))
        })
        .collect();
    let mut open = connect(&url).await;
    must_not_wait(
        &mut open,
        "the open transaction",
        "BEGIN; UPDATE public.items SET v = v WHERE id = 999",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, r, all) = validate_json(&url, M1, &[]).await;
    problems.check(
        code == Some(1)
            && r["verdict"] == "FAIL"
            && r["unverified_hot"].as_u64().is_some_and(|n| n >= 1),
        || format!("validate must exit 1 with group 1 unverified (hot): {all}"),
    );
    let (code, r, all) = validate_json(&url, M1, &["--allow-hot"]).await;
    problems.check(
        code == Some(0)
            && r["hot_allowed"] == true
            && r["unverified_hot"].as_u64().is_some_and(|n| n >= 1),
        || format!("validate --allow-hot must exit 0 still reporting group 1 unverified: {all}"),
    );
    exec(&mut open, "COMMIT").await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let n = w.await.unwrap();
        eprintln!("M1: a writer ran {n} statements");
    }
    let (code, r, all) = validate_json(&url, M1, &[]).await;
    problems.check(
        code == Some(0) && r["unverified_hot"] == 0 && r["differences_total"] == 0,
        || format!("validate once writes paused: {all}"),
    );
    problems.assert_none();
    assert_invariant(&url, M1).await;
}

/// M1 (c): no snapshot validate takes is held longer than `--max-snapshot-age` (a long one pins
/// the change log's dead rows). Validation is made to take seconds (the mapping sleeps in
/// bluegreen's sessions), with `--max-snapshot-age 500ms` and small chunks, while a writer keeps
/// writing; a probe samples, every 20 ms, the age of the transaction of every bluegreen session
/// of the database that holds a snapshot (`backend_xmin`). None may be older than the limit plus
/// one chunk's time and some slack (1.5 s in all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_m1_c_no_validate_snapshot_outlives_max_snapshot_age() {
    let url = empty_db("rules_m1c").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.s (id integer PRIMARY KEY, v integer);
         INSERT INTO public.s SELECT g, g FROM generate_series(1, 60) g;
         CREATE FUNCTION public.rules_m1_slow(v integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$
         BEGIN
           IF current_setting('application_name') = 'bluegreen' THEN
             PERFORM pg_sleep(0.05);
           END IF;
           RETURN v;
         END $$;",
    )
    .await;
    copy_ok(&url, M1C).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(support::write_until_stopped(
        url.clone(),
        stop.clone(),
        |i| format!("UPDATE public.s SET v = v + 1 WHERE id = {}", 1 + i % 60),
    ));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (url, done) = (url.clone(), done.clone());
        async move {
            let mut p = connect(&url).await;
            let (mut oldest, mut who) = (0f64, String::new());
            let mut samples = 0u32;
            while !done.load(Ordering::Relaxed) {
                let row: Option<(f64, String)> = sqlx::query_as(
                    "SELECT extract(epoch FROM clock_timestamp() - xact_start)::float8, state || ': ' || left(query, 200)
                     FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name = 'bluegreen' AND backend_xmin IS NOT NULL
                     ORDER BY xact_start LIMIT 1",
                )
                .fetch_optional(&mut p)
                .await
                .unwrap();
                if let Some((a, q)) = row {
                    samples += 1;
                    if a > oldest {
                        (oldest, who) = (a, q);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (oldest, who, samples)
        }
    });
    let started = Instant::now();
    let (code, r, all) = validate_json(
        &url,
        M1C,
        &[
            "--max-snapshot-age",
            "500ms",
            "--chunk-rows",
            "4",
            "--jobs",
            "1",
        ],
    )
    .await;
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let (oldest, who, samples) = sampler.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    eprintln!(
        "M1c: validate took {took:?}; oldest snapshot seen {oldest:.2} s in {samples} samples, held by `{who}`"
    );
    let mut problems = Problems::default();
    problems.check(code == Some(0) && r["verdict"] == "PASS", || {
        format!("validate beside the writer: {all}")
    });
    problems.check(took > Duration::from_secs(2), || {
        format!("validate took only {took:?}: the interleaving was not exercised")
    });
    problems.check(oldest < 1.5, || {
        format!("a bluegreen session held a snapshot for {oldest:.2} s with --max-snapshot-age 500ms (validate ran {took:?}): {who}")
    });
    problems.assert_none();
    assert_invariant(&url, M1C).await;
}

/// Rule M1's re-checks and every applier (DESIGN.md: "keep each transaction short"): a session
/// holding a green row of a follower-kept entry (before cutover only by hand) makes `sync` record
/// the key as "not yet" and finish, never wait for it; once the row is released the next `sync`
/// applies it. (Found by the rule tests: only row-local entries had a bounded lock wait.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_m1_d_an_applier_gives_way_to_a_held_green_row() {
    let url = empty_db("rules_m1d").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, grp integer NOT NULL, v integer NOT NULL);
         INSERT INTO public.items SELECT g, g % 10, g FROM generate_series(1, 1000) g;",
    )
    .await;
    copy_ok(&url, M1).await;
    let mut holder = connect(&url).await;
    must_not_wait(
        &mut holder,
        "the session holding group 1's green row",
        "BEGIN; SELECT 1 FROM rules_m1.totals WHERE grp = 1 FOR UPDATE",
    )
    .await;
    must_not_wait(
        &mut c,
        "the application's update of group 1 and 2",
        "UPDATE public.items SET v = v + 1 WHERE grp IN (1, 2)",
    )
    .await;
    let out = run_within(&url, &["sync", "-m", M1], QUICK).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "sync must finish, with group 1 not yet applied: {}",
        both(&out)
    );
    let two: i64 = count(
        &mut c,
        "SELECT count(*) FROM rules_m1.totals t WHERE t.grp = 2 AND t.total = (SELECT sum(v) FROM public.items WHERE grp = 2)",
    )
    .await;
    assert_eq!(two, 1, "group 2 is applied although group 1 is held");
    exec(&mut holder, "COMMIT").await;
    let out = run_within(&url, &["sync", "-m", M1], QUICK).await;
    assert!(out.status.success(), "sync once released: {}", both(&out));
    assert_invariant(&url, M1).await;
}

/// M2: the change-log rules, beside a running follower. (1) Ids are not commit order: T1 logs a
/// change and stays open, T2 logs a later id and commits, the follower applies it, then T1
/// commits: the follower must still apply T1's (no watermark). (2) A lookup row reaching 20,000
/// keys (more than the server's whole lock table holds) is re-derived with a bounded number of
/// advisory locks per transaction, while an application session keeps writing. (3) TRUNCATE of
/// the lookup table marks every entry reading it, the row-local one included, for a full
/// re-derive, pending until done. Overlap: review::f8 bounds the writer's locks; this bounds the
/// applier's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_m2_change_log_claims_by_id_bounds_fan_out_and_truncate_rederives() {
    let url = empty_db("rules_m2").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.cats (id integer PRIMARY KEY, name text);
         INSERT INTO public.cats SELECT g, 'cat ' || g FROM generate_series(1, 5) g;
         CREATE TABLE public.items (id integer PRIMARY KEY, cat_id integer NOT NULL, v integer);
         INSERT INTO public.items SELECT g, CASE WHEN g <= 20000 THEN 1 ELSE 2 + g % 4 END, g FROM generate_series(1, 20400) g;",
    )
    .await;
    copy_ok(&url, M2).await;
    assert_eq!(
        row_local(&url, M2).await,
        vec![("cats".to_string(), true), ("items".to_string(), false)]
    );
    let mut problems = Problems::default();
    let f = Follower::start(&url, M2, "rules_m2").await;

    // (1) Ids are not commit order, several times.
    let mut t1 = connect(&url).await;
    let mut t2 = connect(&url).await;
    for i in 0..5 {
        must_not_wait(
            &mut t1,
            "T1",
            &format!(
                "BEGIN; UPDATE public.items SET v = {} WHERE id = {}",
                100 + i,
                20001 + i
            ),
        )
        .await;
        must_not_wait(
            &mut t2,
            "T2",
            &format!(
                "UPDATE public.items SET v = {} WHERE id = {}",
                200 + i,
                20101 + i
            ),
        )
        .await;
        let settled = wait_until_settled(&url, "rules_m2", Duration::from_secs(30)).await;
        assert!(settled, "round {i}: the follower did not apply T2's change");
        must_not_wait(&mut t1, "T1's commit", "COMMIT").await;
        let settled = wait_until_settled(&url, "rules_m2", Duration::from_secs(30)).await;
        assert!(settled, "round {i}: the follower did not apply T1's change");
        let v = support::invariant_violations(&url, M2).await;
        problems.check(v.is_empty(), || {
            format!("round {i}: the follower skipped T1's change (lower id, later commit): {v:?}")
        });
    }

    // (2) A fan-out of 20,000 keys beside an application session.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(support::write_until_stopped(
        url.clone(),
        stop.clone(),
        |i| {
            format!(
                "UPDATE public.items SET v = v + 1 WHERE id = {}",
                20001 + i % 400
            )
        },
    ));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let (url, done) = (url.clone(), done.clone());
        async move {
            let mut p = connect(&url).await;
            let mut most = 0i64;
            while !done.load(Ordering::Relaxed) {
                let n: Option<i64> = sqlx::query_scalar(
                    "SELECT max(n) FROM (SELECT count(*) AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                     WHERE a.datname = current_database() AND a.application_name = 'bluegreen' AND l.locktype = 'advisory'
                     GROUP BY l.pid) x",
                )
                .fetch_one(&mut p)
                .await
                .unwrap();
                most = most.max(n.unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        }
    });
    must_not_wait(
        &mut c,
        "the rename of the lookup row",
        "UPDATE public.cats SET name = 'renamed' WHERE id = 1",
    )
    .await;
    let applied = wait_until(
        &mut t2,
        "SELECT count(*) = 20000 FROM rules_m2.items WHERE cat_name = 'renamed'",
        Duration::from_secs(120),
    )
    .await;
    done.store(true, Ordering::Relaxed);
    let most = sampler.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    let n = writer.await.unwrap();
    problems.check(applied, || {
        "the follower did not apply the fan-out within 120 s".into()
    });
    let settled = wait_until_settled(&url, "rules_m2", Duration::from_secs(60)).await;
    eprintln!(
        "M2: the fan-out applied beside {n} application statements; most advisory locks held by one bluegreen backend: {most}"
    );
    problems.check(settled, || {
        "the follower did not settle after the writer stopped".into()
    });
    problems.check(most <= bluegreen::names::STRIPES as i64 + 8, || {
        format!(
            "a bluegreen backend held {most} advisory locks at once (stripes: {})",
            bluegreen::names::STRIPES
        )
    });
    let renamed = count(
        &mut c,
        "SELECT count(*) FROM rules_m2.items WHERE cat_name = 'renamed'",
    )
    .await;
    problems.check(renamed == 20000, || {
        format!("{renamed} of 20000 green items show the new name")
    });
    let v = support::invariant_violations(&url, M2).await;
    problems.check(v.is_empty(), || {
        format!("after the fan-out: green != M(blue): {v:?}")
    });
    let out = f.stop().await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));

    // (3) TRUNCATE of the lookup table: every entry reading it is pending until re-derived.
    must_not_wait(
        &mut c,
        "the truncate and partial reload of the lookup table",
        "BEGIN; TRUNCATE public.cats; INSERT INTO public.cats VALUES (2, 'two'), (3, 'three'); COMMIT",
    )
    .await;
    // Logged as a TRUNCATE for every entry (row-local ones included), pending until done.
    let marked = count(
        &mut c,
        "SELECT count(*) FROM bluegreen.changes WHERE migration = 'rules_m2' AND op = 'T' AND all_entries",
    )
    .await
        + count(
            &mut c,
            "SELECT count(*) FROM bluegreen.rederive WHERE migration = 'rules_m2'",
        )
        .await;
    problems.check(marked > 0, || {
        "TRUNCATE left nothing pending for the entries reading the table".into()
    });
    let st = status_json(&url, M2).await;
    eprintln!("M2: status after the TRUNCATE: {st}");
    let f = Follower::start(&url, M2, "rules_m2").await;
    let settled = wait_until_settled(&url, "rules_m2", Duration::from_secs(120)).await;
    problems.check(settled, || {
        "the follower did not finish the full re-derive".into()
    });
    let v = support::invariant_violations(&url, M2).await;
    problems.check(v.is_empty(), || {
        format!("after the full re-derive: green != M(blue): {v:?}")
    });
    let out = f.stop().await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    problems.assert_none();
    assert_invariant(&url, M2).await;
}

/// M4: capture covers partitions. Two sessions write straight to the partitions of a
/// list-partitioned blue table (inserts, updates, deletes) while a third writes through the root
/// (including rows moved between partitions); once drained, green = M(blue). Then attaching a
/// partition (with rows) and detaching one are drift: `validate` refuses with ddl-drift and
/// `status` warns; undone, both are quiet again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_m4_writes_to_partitions_are_captured_and_attach_detach_is_drift() {
    let url = empty_db("rules_m4").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.ev (region integer NOT NULL, id integer NOT NULL, v integer, PRIMARY KEY (region, id)) PARTITION BY LIST (region);
         CREATE TABLE public.ev_1 PARTITION OF public.ev FOR VALUES IN (1);
         CREATE TABLE public.ev_2 PARTITION OF public.ev FOR VALUES IN (2);
         INSERT INTO public.ev SELECT 1 + g % 2, g, g FROM generate_series(1, 400) g;",
    )
    .await;
    copy_ok(&url, M4).await;
    let mut tasks = Vec::new();
    for s in 0..3u32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = connect(&url).await;
            for i in 0..30u32 {
                let k = 1000 + s * 100 + i;
                let sql = match (s, i % 3) {
                    (0, 0) => format!("INSERT INTO public.ev_1 VALUES (1, {k}, {i})"),
                    (0, 1) => format!("UPDATE public.ev_2 SET v = v + 1 WHERE id = {}", 2 * (1 + i)),
                    (0, _) => format!("DELETE FROM public.ev_1 WHERE id = {}", 2 * i + 1),
                    (1, 0) => format!("INSERT INTO public.ev_2 VALUES (2, {k}, {i})"),
                    (1, 1) => format!("UPDATE public.ev_1 SET v = -v WHERE id = {}", 101 + 2 * i),
                    (1, _) => format!("BEGIN; DELETE FROM public.ev_2 WHERE id = {}; UPDATE public.ev_1 SET v = 0 WHERE id = {}; COMMIT", 202 + 2 * i, 201 + 2 * i),
                    (_, 0) => format!("UPDATE public.ev SET region = 2 WHERE region = 1 AND id = {}", 301 + 2 * i),
                    (_, 1) => format!("INSERT INTO public.ev VALUES (1, {k}, {i})"),
                    (_, _) => format!("UPDATE public.ev SET v = v * 2 WHERE id = {}", 302 + 2 * i),
                };
                must_not_wait(&mut w, "a write", &sql).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_invariant(&url, M4).await;

    let mut problems = Problems::default();
    for (what, change, undo) in [
        (
            "a partition attached",
            "CREATE TABLE public.ev_3 (region integer NOT NULL, id integer NOT NULL, v integer, PRIMARY KEY (region, id));
             INSERT INTO public.ev_3 SELECT 3, g, g FROM generate_series(1, 10) g;
             ALTER TABLE public.ev ATTACH PARTITION public.ev_3 FOR VALUES IN (3);",
            "ALTER TABLE public.ev DETACH PARTITION public.ev_3; DROP TABLE public.ev_3;",
        ),
        (
            "a partition detached",
            "ALTER TABLE public.ev DETACH PARTITION public.ev_2",
            "ALTER TABLE public.ev ATTACH PARTITION public.ev_2 FOR VALUES IN (2)",
        ),
    ] {
        exec(&mut c, change).await;
        let out = run_within(&url, &["validate", "-m", M4], SLOW).await;
        problems.check(
            out.status.code() == Some(2) && stderr(&out).contains("ddl-drift"),
            || format!("validate must refuse with ddl-drift after {what}: {}", both(&out)),
        );
        let st = status_json(&url, M4).await;
        problems.check(
            st["warnings"].as_array().is_some_and(|w| !w.is_empty()),
            || format!("status must warn about drift after {what}: {}", st["warnings"]),
        );
        exec(&mut c, undo).await;
        let out = run_within(&url, &["validate", "-m", M4], SLOW).await;
        problems.check(out.status.code() == Some(0), || {
            format!("validate once {what} was undone: {}", both(&out))
        });
    }
    problems.assert_none();
    assert_invariant(&url, M4).await;
}

/// M5: mapping expressions keep blue's operators. With `citext` installed in blue, `p.a = p.b`
/// and a join `ON t.lead = p.a` compare case-insensitively; under `search_path = pg_catalog` they
/// would silently become text's `=`. After copy and concurrent writes from two sessions (new
/// people whose two names differ only in case, team leads renamed in another case), green's
/// `same` and its memberships are what blue's own operators say, in the row-local triggers and
/// in the follower alike; then the invariant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_m5_citext_operators_keep_their_meaning_everywhere() {
    let url = empty_db("rules_m5").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE EXTENSION citext SCHEMA public;
         CREATE TABLE public.people (id integer PRIMARY KEY, a public.citext NOT NULL, b public.citext NOT NULL);
         CREATE TABLE public.teams (id integer PRIMARY KEY, lead public.citext);
         INSERT INTO public.people SELECT g, 'Name' || g, CASE WHEN g % 2 = 0 THEN 'NAME' || g ELSE 'other' || g END FROM generate_series(1, 100) g;
         INSERT INTO public.teams SELECT g, 'NAME' || (g * 3) FROM generate_series(1, 20) g;",
    )
    .await;
    copy_ok(&url, M5).await;
    let f = Follower::start(&url, M5, "rules_m5").await;
    let a = tokio::spawn({
        let url = url.clone();
        async move {
            let mut w = connect(&url).await;
            for i in 0..30 {
                must_not_wait(
                    &mut w,
                    "A's new person",
                    &format!(
                        "INSERT INTO public.people VALUES ({}, 'Mixed{i}', 'mIXED{i}')",
                        1000 + i
                    ),
                )
                .await;
                must_not_wait(
                    &mut w,
                    "A's rename",
                    &format!(
                        "UPDATE public.people SET b = upper(a::text) WHERE id = {}",
                        1 + 2 * i
                    ),
                )
                .await;
            }
        }
    });
    let b = tokio::spawn({
        let url = url.clone();
        async move {
            let mut w = connect(&url).await;
            for i in 0..30 {
                must_not_wait(
                    &mut w,
                    "B's team lead",
                    &format!(
                        "UPDATE public.teams SET lead = 'mixed{i}' WHERE id = {}",
                        1 + i % 20
                    ),
                )
                .await;
            }
        }
    });
    a.await.unwrap();
    b.await.unwrap();
    let mut problems = Problems::default();
    let settled = wait_until_settled(&url, "rules_m5", Duration::from_secs(60)).await;
    problems.check(settled, || "the follower did not settle".into());
    // Blue's own meaning, with blue on the search path (this session's default).
    let mut wrong = count(
        &mut c,
        "SELECT count(*) FROM public.people p JOIN rules_m5.people g USING (id) WHERE g.same IS DISTINCT FROM (p.a = p.b)",
    )
    .await;
    let case_only = count(
        &mut c,
        "SELECT count(*) FROM rules_m5.people g JOIN public.people p USING (id) WHERE g.same AND p.a::text <> p.b::text",
    )
    .await;
    problems.check(wrong == 0, || {
        format!("{wrong} green row(s) of people compare a and b with text's =, not citext's")
    });
    problems.check(case_only > 0, || {
        "no green row says a = b for names that differ only in case".into()
    });
    wrong = count(
        &mut c,
        "SELECT count(*) FROM (
           (SELECT p.id, t.id FROM public.people p JOIN public.teams t ON t.lead = p.a
            EXCEPT ALL SELECT person_id, team_id FROM rules_m5.memberships)
           UNION ALL
           (SELECT person_id, team_id FROM rules_m5.memberships
            EXCEPT ALL SELECT p.id, t.id FROM public.people p JOIN public.teams t ON t.lead = p.a)) d",
    )
    .await;
    let members = count(&mut c, "SELECT count(*) FROM rules_m5.memberships").await;
    problems.check(wrong == 0 && members > 0, || {
        format!("green memberships differ from blue's citext join by {wrong} row(s) ({members} in green)")
    });
    let out = f.stop().await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let out = run_within(&url, &["validate", "-m", M5], SLOW).await;
    problems.check(out.status.code() == Some(0), || {
        format!("validate: {}", both(&out))
    });
    problems.assert_none();
    assert_invariant(&url, M5).await;
}

/// M6: a row-local step that cannot fail runs without a subtransaction. Two sessions each run a
/// 200-statement transaction (updates, inserts, deletes) on an infallible row-local entry,
/// concurrently; before committing, every green row the transaction wrote carries its own
/// top-level xid as xmin, none a subtransaction's (a subxid per statement would overflow the
/// 64-entry subxid cache and double XID consumption). After commit nothing is pending and green
/// = M(blue) at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_m6_a_bare_step_takes_no_subtransaction() {
    let url = empty_db("rules_m6").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.items (id integer PRIMARY KEY, v integer);
         INSERT INTO public.items SELECT g, g FROM generate_series(1, 1000) g;",
    )
    .await;
    copy_ok(&url, M6).await;
    assert_eq!(row_local(&url, M6).await, vec![("items".to_string(), true)]);
    let mut tasks = Vec::new();
    for s in 0..2i32 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut w = connect(&url).await;
            exec(&mut w, "BEGIN").await;
            for i in 0..200i32 {
                let id = 1 + s * 500 + i;
                let sql = match i % 4 {
                    0 | 1 => format!("UPDATE public.items SET v = v + 1 WHERE id = {id}"),
                    2 => format!("INSERT INTO public.items VALUES ({}, {i})", 10_000 + s * 1000 + i),
                    _ => format!("DELETE FROM public.items WHERE id = {id}"),
                };
                must_not_wait(&mut w, "a statement of the long transaction", &sql).await;
            }
            // The green rows this transaction wrote: a row written in a subtransaction carries
            // that subtransaction's xid as xmin, one written in the statement itself the
            // top-level xid.
            let touched: Vec<i32> = (0..200i32)
                .filter_map(|i| match i % 4 {
                    0 | 1 => Some(1 + s * 500 + i),
                    2 => Some(10_000 + s * 1000 + i),
                    _ => None,
                })
                .collect();
            let (own, other): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE xmin::text::bigint = pg_current_xact_id()::text::bigint % 4294967296),
                        count(*) FILTER (WHERE xmin::text::bigint <> pg_current_xact_id()::text::bigint % 4294967296)
                 FROM rules_m6.items WHERE id = ANY ($1)",
            )
            .bind(&touched)
            .fetch_one(&mut w)
            .await
            .unwrap();
            exec(&mut w, "COMMIT").await;
            (own, other, touched.len() as i64)
        }));
    }
    let mut problems = Problems::default();
    for (s, t) in tasks.into_iter().enumerate() {
        let (own, other, written) = t.await.unwrap();
        problems.check(own == written && other == 0, || {
            format!("session {s}: of the {written} green rows its 200-statement transaction wrote, {own} carry its own xid and {other} a subtransaction's")
        });
    }
    let p = pending(&mut c, "rules_m6").await;
    problems.check(p == 0, || {
        format!("{p} change(s) pending for a row-local entry")
    });
    problems.assert_none();
    assert_invariant_now(&url, M6).await;
    assert_invariant(&url, M6).await;
}
