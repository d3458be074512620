//! `copy` and live sync against a real PostgreSQL, under a concurrent writer: every test ends by
//! checking the invariant green.T = M(blue) exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{self, assert_invariant, carbot_db, carbot_writer, connect, exec, run};

const MAPPING: &str = "mappings/carbot.yaml";

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn with_writer<F: std::future::Future<Output = T>, T>(
    url: &str,
    seed: u64,
    f: F,
) -> (T, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(carbot_writer(url.to_string(), seed, stop.clone()));
    // Let the writer get going before the work starts.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = f.await;
    stop.store(true, Ordering::Relaxed);
    let n = w.await.expect("writer panicked");
    (t, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_under_concurrent_writes_keeps_the_invariant_then_live_sync_keeps_it() {
    let url = carbot_db("copy_live").await;
    let (out, writes) = with_writer(
        &url,
        1,
        run(
            &url,
            &["copy", "-m", MAPPING, "--jobs", "4", "--chunk-rows", "300"],
        ),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        writes > 20,
        "the writer ran only {writes} statements during the copy"
    );
    assert_invariant(&url, MAPPING).await;
    // Live: more writes, checked again; then status shows no backlog and no failures.
    let ((), writes) = with_writer(&url, 2, tokio::time::sleep(Duration::from_millis(1500))).await;
    assert!(writes > 20);
    assert_invariant(&url, MAPPING).await;
    let st = crate::support::status_json(&url, MAPPING).await;
    assert_eq!(st["phase"], "live");
    assert_eq!(st["backlog"], 0);
    assert_eq!(st["failures"].as_array().unwrap().len(), 0, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_update_and_truncate_in_live_mode() {
    let url = carbot_db("copy_bulk").await;
    crate::support::copy_ok(&url, MAPPING).await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "UPDATE public.leads SET status = 'qualified', lead_score = 77 WHERE status <> 'lost'",
    )
    .await;
    exec(
        &mut c,
        "UPDATE public.workshops SET owner_email = 'one@example.org'",
    )
    .await;
    assert_invariant(&url, MAPPING).await;
    // TRUNCATE fires no row trigger: the statement trigger re-derives everything it touches.
    exec(&mut c, "TRUNCATE public.chat_messages").await;
    assert_invariant(&url, MAPPING).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM carbot_v2.chat_sessions")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_halfway_then_copy_again() {
    interrupted_halfway_then_copy_again("copy_kill", false).await;
}

/// Ctrl-C: the command stops at once with exit 2, the chunks in flight roll back with their
/// connections, and the next `copy` resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_halfway_then_copy_again() {
    interrupted_halfway_then_copy_again("copy_sigint", true).await;
}

async fn interrupted_halfway_then_copy_again(name: &str, sigint: bool) {
    let url = carbot_db(name).await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(carbot_writer(url.clone(), 3, stop.clone()));
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("bluegreen"))
        .current_dir(support::root())
        .env("DATABASE_URL", &url)
        .args(["copy", "-m", MAPPING, "--jobs", "1", "--chunk-rows", "40"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut c = connect(&url).await;
    let start = std::time::Instant::now();
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM bluegreen.chunks WHERE state = 'done'")
                .fetch_one(&mut c)
                .await
                .unwrap_or(0);
        if done >= 5 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "copy made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if sigint {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("error[interrupted]"));
    } else {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let (pending, done): (i64, i64) = sqlx::query_as("SELECT count(*) FILTER (WHERE state <> 'done'), count(*) FILTER (WHERE state = 'done') FROM bluegreen.chunks")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert!(
        pending > 0 && done >= 5,
        "killed too late to test a resume ({pending} pending)"
    );
    let out = run(&url, &["copy", "-m", MAPPING, "--jobs", "2"]).await;
    stop.store(true, Ordering::Relaxed);
    w.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_invariant(&url, MAPPING).await;
    // No duplicates: every green primary key once (the invariant is a multiset equality; this
    // names the failure more plainly).
    let dups: i64 = sqlx::query_scalar("SELECT count(*) - count(DISTINCT id) FROM carbot_v2.leads")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(dups, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copy_processes_share_the_work() {
    let url = carbot_db("copy_two").await;
    let out = run(&url, &["prepare", "-m", MAPPING]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let ((a, b), _) = with_writer(&url, 4, async {
        tokio::join!(
            run(
                &url,
                &["copy", "-m", MAPPING, "--jobs", "2", "--chunk-rows", "100"]
            ),
            run(
                &url,
                &["copy", "-m", MAPPING, "--jobs", "2", "--chunk-rows", "100"]
            )
        )
    })
    .await;
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(b.status.success(), "{}", stderr(&b));
    assert_invariant(&url, MAPPING).await;
}

/// Green after `copy` with the given flags, as sorted text of every green table.
async fn green_contents(name: &str, args: &[&str]) -> Vec<String> {
    let url = carbot_db(name).await;
    let mut full = vec!["copy", "-m", MAPPING];
    full.extend_from_slice(args);
    let out = run(&url, &full).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_invariant(&url, MAPPING).await;
    let mut c = connect(&url).await;
    let mut v = Vec::new();
    for t in [
        "organizations",
        "workshops",
        "customers",
        "leads",
        "customer_vehicles",
        "chat_sessions",
        "chat_messages",
    ] {
        let s: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM carbot_v2.{t} t"
        )))
        .fetch_one(&mut c)
        .await
        .unwrap();
        v.push(format!("{t} {s}"));
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_engines_give_the_same_green() {
    let reference = green_contents("copy_j1", &["--jobs", "1", "--engine", "insert-select"]).await;
    assert_eq!(
        reference,
        green_contents(
            "copy_j4",
            &[
                "--jobs",
                "4",
                "--chunk-rows",
                "250",
                "--engine",
                "insert-select"
            ]
        )
        .await
    );
    assert_eq!(
        reference,
        green_contents(
            "copy_c4",
            &["--jobs", "4", "--chunk-rows", "250", "--engine", "copy"]
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_green_rejects_still_commits_and_is_reported_then_retried() {
    let url = carbot_db("copy_reject").await;
    crate::support::copy_ok(&url, MAPPING).await;
    let mut c = connect(&url).await;
    // green.leads has CHECK (lead_score BETWEEN 0 AND 100); blue has none.
    exec(&mut c, "UPDATE public.leads SET lead_score = 500 WHERE id = (SELECT min(id::text)::uuid FROM public.leads WHERE deleted_at IS NULL AND workshop_id IN (SELECT id FROM public.workshops))").await;
    let score: i32 = sqlx::query_scalar("SELECT max(lead_score) FROM public.leads")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(score, 500, "the application's write must commit");
    // leads is the follower's: the failure is recorded when it applies the change.
    crate::support::drain(&url, MAPPING).await;
    let st = crate::support::status_json(&url, MAPPING).await;
    let failures = st["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 1, "{st}");
    assert_eq!(failures[0]["table"], "leads");
    assert!(
        failures[0]["error"].as_str().unwrap().contains("check"),
        "{st}"
    );
    let out = run(&url, &["sync", "-m", MAPPING]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "sync must report the failure it cannot fix"
    );
    // Fixed on blue: the next write re-derives the key and clears the failure.
    exec(
        &mut c,
        "UPDATE public.leads SET lead_score = 50 WHERE lead_score = 500",
    )
    .await;
    let out = run(&url, &["sync", "-m", MAPPING]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_invariant(&url, MAPPING).await;

    // A green-only column written on green survives a later re-derivation of its row.
    exec(&mut c, "UPDATE carbot_v2.workshops SET timezone = 'Europe/Zurich' WHERE id = (SELECT min(id::text)::uuid FROM public.workshops)").await;
    exec(&mut c, "UPDATE public.workshops SET name = 'Renamed' WHERE id = (SELECT min(id::text)::uuid FROM public.workshops)").await;
    crate::support::drain(&url, MAPPING).await;
    let (tz, name): (String, String) = sqlx::query_as("SELECT timezone, name FROM carbot_v2.workshops WHERE id = (SELECT min(id::text)::uuid FROM public.workshops)")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!((tz.as_str(), name.as_str()), ("Europe/Zurich", "Renamed"));
    assert_invariant(&url, MAPPING).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_behind_a_long_transaction_retries_then_names_it() {
    let url = carbot_db("copy_locked").await;
    let mut holder = connect(&url).await;
    exec(&mut holder, "BEGIN; UPDATE public.workshops SET city = city WHERE id = (SELECT min(id::text)::uuid FROM public.workshops)").await;
    // The application keeps writing other rows meanwhile; none may wait anywhere near long.
    let stop = Arc::new(AtomicBool::new(false));
    let app_url = url.clone();
    let app_stop = stop.clone();
    let app = tokio::spawn(async move {
        let mut c = connect(&app_url).await;
        exec(&mut c, "SET lock_timeout = '1500ms'").await;
        let mut n = 0;
        while !app_stop.load(Ordering::Relaxed) {
            sqlx::raw_sql("UPDATE public.workshops SET name = name WHERE id = (SELECT max(id::text)::uuid FROM public.workshops)")
                .execute(&mut c)
                .await
                .expect("an application write waited longer than 1.5 s");
            n += 1;
        }
        n
    });
    let out = run(&url, &["prepare", "-m", MAPPING, "--lock-timeout", "300ms"]).await;
    stop.store(true, Ordering::Relaxed);
    let writes = app.await.unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("error[lock-timeout]") && err.contains("public.workshops"),
        "{err}"
    );
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    assert!(
        err.contains(&format!("pid {pid}")),
        "the blocker is not named: {err}"
    );
    assert!(err.contains("retrying") || err.contains("attempt"), "{err}");
    assert!(writes > 0);
    exec(&mut holder, "ROLLBACK").await;
    // Once the transaction is gone, prepare (and copy) go through.
    crate::support::copy_ok(&url, MAPPING).await;
    assert_invariant(&url, MAPPING).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_on_blue_is_detected_and_refused() {
    let url = carbot_db("copy_drift").await;
    let out = run(&url, &["prepare", "-m", MAPPING]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "ALTER TABLE public.leads ALTER COLUMN kunde_id TYPE varchar(200)",
    )
    .await;
    let out = run(&url, &["copy", "-m", MAPPING]).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("error[ddl-drift]") && err.contains("kunde_id"),
        "{err}"
    );
}

/// An application transaction that writes `leads` and then `workshops` while copy takes its locks
/// in the mapping's order (`workshops` before `leads`): copy's lock waits end before the server's
/// deadlock check (its lock_timeout is clamped below deadlock_timeout, even when asked for 5 s), so
/// it gives way, retries and succeeds, and every application transaction commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_and_live_switch_give_way_to_writers_locking_in_the_opposite_order() {
    let url = carbot_db("copy_opposite_order").await;
    let stop = Arc::new(AtomicBool::new(false));
    let app = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let mut c = connect(&url).await;
            let (mut committed, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let tx = "BEGIN;
                    UPDATE public.leads SET lead_score = lead_score WHERE id = (SELECT id FROM public.leads ORDER BY id LIMIT 1);
                    SELECT pg_sleep(0.4);
                    UPDATE public.workshops SET city = city WHERE id = (SELECT id FROM public.workshops ORDER BY id LIMIT 1);
                    COMMIT;";
                match sqlx::raw_sql(tx).execute(&mut c).await {
                    Ok(_) => committed += 1,
                    Err(e) => {
                        failed.push(e.to_string());
                        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut c).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (committed, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = run(&url, &["copy", "-m", MAPPING, "--lock-timeout", "5s"]).await;
    stop.store(true, Ordering::Relaxed);
    let (committed, failed) = app.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        failed.is_empty(),
        "application transactions failed: {failed:?}\ncopy:\n{}",
        stderr(&out)
    );
    assert!(committed >= 2, "the application committed {committed}");
    assert_invariant(&url, MAPPING).await;
}

/// The review's F12 interleaving against the locking every table-locking step uses: the tool locks
/// `workshops` then waits for `leads`, which an application transaction holds; more than
/// `deadlock_timeout` later the application asks for `workshops`. Were the tool still waiting
/// (its `--lock-timeout 5s`), the application's own deadlock check would abort it; the tool's
/// attempts end below `deadlock_timeout`, so the application's statement goes through, commits,
/// and the tool's next attempt succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locking_gives_way_before_the_application_could_be_the_deadlock_victim() {
    use bluegreen::pg::locking::run_locked;
    use bluegreen::sql::QName;
    let url = carbot_db("copy_deadlock_victim").await;
    let mut app = connect(&url).await;
    exec(
        &mut app,
        "BEGIN; UPDATE public.leads SET lead_score = lead_score WHERE id = (SELECT id FROM public.leads ORDER BY id LIMIT 1)",
    )
    .await;
    let tool = {
        let url = url.clone();
        tokio::spawn(async move {
            let mut c = bluegreen::pg::connect(&url).await.unwrap();
            let tables = [
                QName::new("public", "workshops"),
                QName::new("public", "leads"),
            ];
            run_locked(&mut c, 5_000, &tables, async |tx| {
                sqlx::raw_sql(
                    "LOCK TABLE public.workshops, public.leads IN SHARE ROW EXCLUSIVE MODE",
                )
                .execute(tx)
                .await
                .map(|_| ())
                .map_err(bluegreen::pg::db_error)
            })
            .await
        })
    };
    // Wait until the tool waits for the application's lock on leads.
    let mut probe = connect(&url).await;
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE application_name = 'bluegreen' AND wait_event_type = 'Lock')",
        )
        .fetch_one(&mut probe)
        .await
        .unwrap();
        if waiting {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the tool's own deadlock check (deadlock_timeout is 1 s), the application asks for
    // the table the tool locked first.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    exec(
        &mut app,
        "UPDATE public.workshops SET city = city WHERE id = (SELECT id FROM public.workshops ORDER BY id LIMIT 1); COMMIT",
    )
    .await;
    tool.await
        .unwrap()
        .expect("the tool's lock succeeds after giving way");
}

/// A control schema made before `deferred.ref_table` existed is upgraded by the next prepare, and
/// copy then restores and validates the green foreign keys through it.
#[tokio::test]
async fn an_older_control_schema_is_upgraded_in_place() {
    let url = carbot_db("copy_old_control").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE SCHEMA bluegreen; CREATE TABLE bluegreen.deferred (
            migration text NOT NULL, kind text NOT NULL, name text NOT NULL, green_table text NOT NULL,
            definition text NOT NULL, done boolean NOT NULL DEFAULT false, PRIMARY KEY (migration, kind, name))",
    )
    .await;
    let out = run(&url, &["copy", "-m", MAPPING]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let unvalidated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND NOT convalidated AND connamespace = 'carbot_v2'::regnamespace",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    let fks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND connamespace = 'carbot_v2'::regnamespace",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    assert!(
        fks > 0 && unvalidated == 0,
        "{fks} foreign keys, {unvalidated} not validated"
    );
    assert_invariant(&url, MAPPING).await;
}

/// A database-level `statement_timeout` (a common production default) never cancels bluegreen's
/// own long statements: a copy chunk and a validate range that each take seconds here (the
/// mapping of `tests/fixtures/rules_m1c.yaml` sleeps 50 ms a row in bluegreen's sessions only)
/// finish under `ALTER DATABASE ... SET statement_timeout = '500ms'`, and the application's own
/// sessions keep the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_statement_timeout_never_cancels_bluegreen() {
    let url = support::empty_db("copy_statement_timeout").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.s (id integer PRIMARY KEY, v integer);
         INSERT INTO public.s SELECT g, g FROM generate_series(1, 30) g;
         CREATE FUNCTION public.rules_m1_slow(v integer) RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$
         BEGIN
           IF current_setting('application_name') = 'bluegreen' THEN
             PERFORM pg_sleep(0.05);
           END IF;
           RETURN v;
         END $$;
         ALTER DATABASE copy_statement_timeout SET statement_timeout = '500ms';",
    )
    .await;
    let m = "tests/fixtures/rules_m1c.yaml";
    let out = run(
        &url,
        &["copy", "-m", m, "--jobs", "1", "--chunk-rows", "1000"],
    )
    .await;
    assert!(out.status.success(), "copy: {}", stderr(&out));
    let out = run(&url, &["validate", "-m", m, "--jobs", "1"]).await;
    assert!(out.status.success(), "validate: {}", stderr(&out));
    let mut app = connect(&url).await;
    let limit: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&mut app)
        .await
        .unwrap();
    assert_eq!(
        limit, "500ms",
        "the application's sessions keep the database's limit"
    );
    exec(&mut app, "RESET statement_timeout").await;
    assert_invariant(&url, m).await;
}

/// A key in no order on its heap (a random uuid), over a heap larger than half of
/// shared_buffers: every range of it has rows on nearly every page, so copy and validate plan a
/// few large chunks (4, a multiple of the 2 jobs, plus the NULL keys') instead of one per
/// `chunk_rows` (each would read the whole heap again). `plan` says the same, and green is M(blue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_no_order_on_a_large_heap_gets_a_few_large_chunks() {
    const MAPPING: &str = "tests/fixtures/scattered.yaml";
    let url = crate::support::empty_db("scattered").await;
    let mut c = crate::support::connect(&url).await;
    // fillfactor 10 spreads 60,000 rows over about 150 MB of heap (the test cluster's
    // shared_buffers is 256 MB).
    crate::support::exec(
        &mut c,
        "CREATE TABLE public.events (id uuid PRIMARY KEY, payload text NOT NULL) WITH (fillfactor = 10);
         INSERT INTO public.events SELECT md5(g::text)::uuid, repeat(md5(g::text), 6) FROM generate_series(1, 60000) g;
         ANALYZE public.events;",
    )
    .await;
    let heap: i64 =
        sqlx::query_scalar("SELECT pg_relation_size('public.events') - pg_size_bytes(current_setting('shared_buffers')) / 2")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert!(
        heap > 0,
        "the heap must exceed half of shared_buffers by {heap}"
    );

    let out = run(&url, &["plan", "-m", MAPPING, "--format", "json"]).await;
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The ranges, and the NULL keys' own chunk (empty here), as copy records them.
    assert_eq!(plan["tables"][0]["chunks"], 5, "{}", plan["tables"]);

    let out = run(&url, &["copy", "-m", MAPPING]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("e.id is in no order on public.events") && err.contains("5 chunks on e.id"),
        "{err}"
    );
    let planned = crate::support::count(
        &mut c,
        "SELECT count(*) FROM bluegreen.chunks WHERE migration = 'scattered' AND state = 'done'",
    )
    .await;
    assert_eq!(planned, 5);

    let out = run(&url, &["validate", "-m", MAPPING, "--format", "json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["tables"][0]["chunks"], 5, "{}", r["tables"]);
    crate::support::assert_invariant_now(&url, MAPPING).await;
}
