//! cutover and rollback (DESIGN.md step 5, "the cutover fence", "after cutover"): the application
//! moves to green and back while it writes, nothing it committed on either side is lost, generated
//! keys never collide, the previous `search_path` settings come back byte for byte, and a cutover
//! that cannot get its locks gives up having changed nothing. Each scenario ends on the exact
//! comparison of blue and green as multisets.

use std::process::Stdio;
use std::time::Duration;

use sqlx::PgConnection;

use crate::support::{
    both, cluster, connect, control_rows, copy_ok, count, empty_db, exec, fingerprint,
    invariant_violations, run_within, stdout,
};

const PGB: &str = "mappings/pgbench_cutover.yaml";
const SMALL: &str = "tests/fixtures/cutover_small.yaml";
const LIMIT: Duration = Duration::from_secs(120);

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

/// The database's fingerprint less the control schema's sequence positions (a refusal is
/// recorded in the audit trail: that is all it writes).
async fn unchanged(url: &str) -> Vec<String> {
    fingerprint(url)
        .await
        .into_iter()
        .filter(|l| !l.starts_with("seq bluegreen."))
        .collect()
}

/// pgbench from the cluster's binaries against database `db`.
fn pgbench(db: &str, args: &[&str]) -> std::process::Command {
    let cl = cluster();
    let mut c = std::process::Command::new(cl.bindir().join("pgbench"));
    c.args([
        "-h",
        &cl.socket_dir().display().to_string(),
        "-U",
        "postgres",
    ])
    .args(args)
    .arg(db)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

use crate::support::multiset_differ as differ;

/// Both directions for the pgbench mapping: every table the same in blue and green.
async fn assert_pgbench_sides_equal(c: &mut PgConnection, what: &str) {
    for (t, cols) in [
        ("pgbench_branches", "bid, bbalance::int8, filler"),
        ("pgbench_tellers", "tid, bid, tbalance::int8, filler"),
        ("pgbench_accounts", "aid, bid, abalance::int8, filler"),
        (
            "pgbench_history",
            "hid, tid, bid, aid, delta::int8, mtime, filler",
        ),
    ] {
        let n = differ(c, &format!("public.{t}"), &format!("pgb_green.{t}"), cols).await;
        assert_eq!(n, 0, "{what}: blue and green {t} differ in {n} row(s)");
    }
}

async fn sums(c: &mut PgConnection, schema: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for q in [
        "SELECT coalesce(sum(abalance), 0)::int8 FROM {s}.pgbench_accounts",
        "SELECT coalesce(sum(tbalance), 0)::int8 FROM {s}.pgbench_tellers",
        "SELECT coalesce(sum(bbalance), 0)::int8 FROM {s}.pgbench_branches",
        "SELECT coalesce(sum(delta), 0)::int8 FROM {s}.pgbench_history",
    ] {
        out.push(count(c, &q.replace("{s}", schema)).await);
    }
    out
}

fn processed(out: &std::process::Output) -> (i64, i64) {
    let text = String::from_utf8_lossy(&out.stdout);
    let grab = |label: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("no `{label}` in pgbench output:\n{text}"))
    };
    (
        grab("number of transactions actually processed: "),
        grab("number of failed transactions: "),
    )
}

/// The acceptance scenario: pgbench as the application, with a new connection per
/// transaction (so each transaction follows search_path: blue, then green, then blue, then green)
/// and with long-lived sessions opened before the first flip (blue throughout), through copy,
/// validate, cutover, rollback and a second cutover. Afterwards the four sums agree in both
/// schemas, history holds exactly the committed transactions, blue and green are equal as
/// multisets, validate passes, and the server logged no deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pgbench_moves_to_green_and_back_and_forward_again_losing_nothing() {
    let db = "cut_pgbench";
    let url = empty_db(db).await;
    let init = pgbench(db, &["-i", "-s", "1", "-q"]).output().unwrap();
    assert!(init.status.success(), "pgbench -i: {}", both(&init));
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY; ALTER SEQUENCE pgbench_history_hid_seq CACHE 20",
    )
    .await;
    let seconds = "30";
    let common = [
        "-n",
        "-c",
        "2",
        "-T",
        seconds,
        "--max-tries=1000",
        "-b",
        "tpcb-like",
    ];
    let long = pgbench(db, &common).spawn().unwrap();
    let mut per_txn: Vec<&str> = common.to_vec();
    per_txn.push("-C");
    let fresh = pgbench(db, &per_txn).spawn().unwrap();
    copy_ok(&url, PGB).await;
    ok(&url, &["validate", "-m", PGB]).await;
    let first = ok(&url, &["cutover", "-m", PGB, "--yes"]).await;
    assert!(first.contains("writes blocked at most"), "{first}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    // New sessions wrote green meanwhile: their writes reached blue through the reverse triggers.
    ok(&url, &["rollback", "-m", PGB, "--yes"]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // A validation from before the rollback no longer opens the gate (third hostile review,
    // finding 6).
    let stale = run_within(&url, &["cutover", "-m", PGB, "--yes"], LIMIT).await;
    assert_eq!(stale.status.code(), Some(1), "{}", both(&stale));
    assert!(stale_reason(&stale), "{}", both(&stale));
    ok(&url, &["validate", "-m", PGB]).await;
    ok(&url, &["cutover", "-m", PGB, "--yes"]).await;
    let long = tokio::task::spawn_blocking(move || long.wait_with_output().unwrap())
        .await
        .unwrap();
    let fresh = tokio::task::spawn_blocking(move || fresh.wait_with_output().unwrap())
        .await
        .unwrap();
    let (n_long, failed_long) = processed(&long);
    let (n_fresh, failed_fresh) = processed(&fresh);
    assert_eq!(
        (failed_long, failed_fresh),
        (0, 0),
        "{}\n{}",
        both(&long),
        both(&fresh)
    );
    assert!(
        n_long > 0 && n_fresh > 0,
        "{}\n{}",
        both(&long),
        both(&fresh)
    );
    ok(&url, &["sync", "-m", PGB]).await;
    let blue = sums(&mut c, "public").await;
    let green = sums(&mut c, "pgb_green").await;
    assert!(
        blue.iter().all(|s| *s == blue[0]),
        "blue sums {blue:?} (green {green:?})"
    );
    assert_eq!(blue, green, "blue and green sums");
    let history = n_long + n_fresh;
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM public.pgbench_history").await,
        history
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM pgb_green.pgbench_history").await,
        history
    );
    assert_pgbench_sides_equal(&mut c, "after the second cutover").await;
    assert!(invariant_violations(&url, PGB).await.is_empty());
    ok(&url, &["validate", "-m", PGB]).await;
    let deadlocks = crate::support::deadlocks_logged(db);
    assert!(deadlocks.is_empty(), "deadlocks: {deadlocks:?}");
}

fn stale_reason(out: &std::process::Output) -> bool {
    both(out).contains("ran before the last rollback")
}

const SMALL_BLUE: &str = "CREATE TABLE public.acct (id serial PRIMARY KEY, owner text NOT NULL, balance integer NOT NULL DEFAULT 0);
    ALTER SEQUENCE public.acct_id_seq CACHE 20;
    INSERT INTO public.acct (owner, balance) SELECT 'o' || (i % 7), i FROM generate_series(1, 50) i;";

async fn small(db: &str) -> (String, PgConnection) {
    let url = empty_db(db).await;
    let mut c = connect(&url).await;
    exec(&mut c, SMALL_BLUE).await;
    copy_ok(&url, SMALL).await;
    ok(&url, &["validate", "-m", SMALL]).await;
    (url, c)
}

async fn cut_over_small(url: &str) {
    ok(
        url,
        &["cutover", "-m", SMALL, "--yes", "--accept-lossy-rollback"],
    )
    .await;
}

/// The invertible entry of the small mapping, both directions.
async fn assert_acct_sides_equal(c: &mut PgConnection, what: &str) {
    let n = differ(
        c,
        "public.acct",
        "small_green.acct",
        "id, owner, balance::int8",
    )
    .await;
    assert_eq!(n, 0, "{what}: blue and green acct differ in {n} row(s)");
}

/// A session on the new search_path (a fresh connection after the flip).
async fn green_session(url: &str) -> PgConnection {
    let mut c = connect(url).await;
    let path: String = sqlx::query_scalar("SELECT current_setting('search_path')")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert!(path.starts_with("small_green"), "search_path {path}");
    c
}

/// Design review C1: an old session's +100 and a new session's +5 on one account, the new one
/// waiting for the old one's open transaction: both survive, on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_sessions_write_and_a_new_sessions_write_on_one_row_both_survive() {
    let (url, mut old) = small("cut_c1").await;
    cut_over_small(&url).await;
    let mut new = green_session(&url).await;
    let before = count(
        &mut old,
        "SELECT balance::int8 FROM public.acct WHERE id = 1",
    )
    .await;
    exec(
        &mut old,
        "BEGIN; UPDATE acct SET balance = balance + 100 WHERE id = 1",
    )
    .await;
    let url2 = url.clone();
    let waiter = tokio::spawn(async move {
        let _ = url2;
        exec(
            &mut new,
            "UPDATE acct SET balance = balance + 5 WHERE id = 1",
        )
        .await;
        new
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    exec(&mut old, "COMMIT").await;
    let mut new = waiter.await.unwrap();
    // And the other way round: the new session first, the old one waiting.
    exec(
        &mut new,
        "BEGIN; UPDATE acct SET balance = balance + 7 WHERE id = 1",
    )
    .await;
    let blocked = tokio::spawn(async move {
        let r = sqlx::raw_sql("UPDATE acct SET balance = balance + 1000 WHERE id = 1")
            .execute(&mut old)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        (old, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    exec(&mut new, "COMMIT").await;
    let (mut old, r) = blocked.await.unwrap();
    // The old session either waited for the blue row and went on, or gave way (40001) while
    // its step waited for the green row: then the +1000 is not committed anywhere.
    let plus = match r {
        Ok(()) => 1000,
        Err(e) => {
            assert!(e.contains("40001") || e.contains("retry"), "{e}");
            0
        }
    };
    let want = before + 100 + 5 + 7 + plus;
    assert_eq!(
        count(
            &mut old,
            "SELECT balance::int8 FROM public.acct WHERE id = 1"
        )
        .await,
        want
    );
    assert_eq!(
        count(
            &mut old,
            "SELECT balance FROM small_green.acct WHERE id = 1"
        )
        .await,
        want
    );
    assert_acct_sides_equal(&mut old, "after C1").await;
}

/// Writes on green after cutover are in blue after rollback; a green insert reverses into blue
/// and reaches the sibling entries reading that blue table (acct_upper in the statement,
/// by_owner through the follower); generated keys of both sides never collide, across cutover,
/// rollback and a second cutover, with sequence caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn green_writes_reach_blue_and_siblings_and_keys_never_collide() {
    let (url, mut old) = small("cut_keys").await;
    // An old session with a cached range of blue ids, opened before the flip.
    exec(&mut old, "INSERT INTO acct (owner) VALUES ('before')").await;
    cut_over_small(&url).await;
    let mut new = green_session(&url).await;
    for i in 0..30 {
        exec(
            &mut new,
            &format!(
                "INSERT INTO acct (owner, balance) VALUES ('green{}', {i})",
                i % 3
            ),
        )
        .await;
        exec(
            &mut old,
            &format!(
                "INSERT INTO acct (owner, balance) VALUES ('blue{}', {i})",
                i % 3
            ),
        )
        .await;
    }
    exec(&mut new, "UPDATE acct SET balance = balance * 2 WHERE owner LIKE 'green%'; DELETE FROM acct WHERE id = 3").await;
    ok(&url, &["sync", "-m", SMALL]).await;
    assert_acct_sides_equal(&mut old, "after cutover").await;
    // The sibling entries got the rows green inserted (insert-only after the flip).
    assert_eq!(
        count(
            &mut old,
            "SELECT count(*) FROM small_green.acct_upper WHERE owner_upper LIKE 'GREEN%'"
        )
        .await,
        30
    );
    assert_eq!(
        count(
            &mut old,
            "SELECT count(*) FROM small_green.by_owner WHERE owner LIKE 'green%'"
        )
        .await,
        3
    );
    ok(&url, &["rollback", "-m", SMALL, "--yes"]).await;
    // After the rollback blue is the application's again: a fresh session writes blue, and the
    // straggler on green still reaches blue.
    let mut back = connect(&url).await;
    for i in 0..20 {
        exec(
            &mut back,
            &format!("INSERT INTO acct (owner) VALUES ('back{i}')"),
        )
        .await;
        exec(
            &mut new,
            &format!("INSERT INTO acct (owner) VALUES ('straggler{i}')"),
        )
        .await;
    }
    ok(&url, &["sync", "-m", SMALL]).await;
    assert_acct_sides_equal(&mut old, "after rollback").await;
    assert!(
        invariant_violations(&url, SMALL).await.is_empty(),
        "green = M(blue) after rollback"
    );
    ok(&url, &["validate", "-m", SMALL]).await;
    cut_over_small(&url).await;
    let mut again = green_session(&url).await;
    for i in 0..20 {
        exec(
            &mut again,
            &format!("INSERT INTO acct (owner) VALUES ('again{i}')"),
        )
        .await;
        exec(
            &mut back,
            &format!("INSERT INTO acct (owner) VALUES ('old{i}')"),
        )
        .await;
    }
    ok(&url, &["sync", "-m", SMALL]).await;
    assert_acct_sides_equal(&mut old, "after the second cutover").await;
    assert_eq!(
        count(
            &mut old,
            "SELECT count(*) - count(DISTINCT id) FROM public.acct"
        )
        .await,
        0
    );
    assert_eq!(
        count(&mut old, "SELECT count(*) FROM public.acct").await,
        50 + 1 + 60 - 1 + 40 + 40
    );
}

/// A role with its own search_path, a quoted schema name with a comma, a single-literal setting,
/// a role-wide and an in-database setting for one role, a role given with --role and none: the
/// flip puts green first for each, and rollback restores every byte of pg_db_role_setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_every_search_path_setting_byte_for_byte() {
    let db = "cut_paths";
    let url = empty_db(db).await;
    let mut c = connect(&url).await;
    exec(&mut c, SMALL_BLUE).await;
    exec(
        &mut c,
        &format!(
            "DO $$ BEGIN
                 CREATE ROLE cut_r1; CREATE ROLE cut_r2; CREATE ROLE cut_r3; CREATE ROLE \"Cut R4\";
             EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             ALTER ROLE cut_r1 SET search_path = \"a, b\", public;
             ALTER ROLE cut_r2 IN DATABASE {db} SET search_path = '\"$user\", public';
             ALTER ROLE cut_r3 SET search_path = x;
             ALTER ROLE cut_r3 IN DATABASE {db} SET search_path = \"My Schema\", public;
             ALTER DATABASE {db} SET search_path = \"my, schema\", public;
             ALTER DATABASE {db} SET work_mem = '8MB';"
        ),
    )
    .await;
    let settings = "SELECT coalesce(r.rolname, '-') || ' ' || s.setdatabase::text || ' ' || array_to_string(s.setconfig, '|') FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole WHERE coalesce(r.rolname, '') LIKE 'cut%' OR coalesce(r.rolname, '') = 'Cut R4' OR s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY 1";
    let snapshot = async |c: &mut PgConnection| -> Vec<String> {
        sqlx::query_scalar(settings).fetch_all(c).await.unwrap()
    };
    let before = snapshot(&mut c).await;
    copy_ok(&url, SMALL).await;
    ok(&url, &["validate", "-m", SMALL]).await;
    ok(
        &url,
        &[
            "cutover",
            "-m",
            SMALL,
            "--yes",
            "--accept-lossy-rollback",
            "--role",
            "Cut R4",
        ],
    )
    .await;
    let flipped = snapshot(&mut c).await;
    let joined = flipped.join("\n");
    for want in [
        "search_path=small_green, \"my, schema\", public",
        "cut_r1",
        "search_path=small_green, \"a, b\", public",
        "search_path=small_green, \"My Schema\", public",
        "Cut R4",
        "work_mem=8MB",
    ] {
        assert!(
            joined.contains(want),
            "after cutover, no `{want}` in:\n{joined}"
        );
    }
    // cut_r2's one element (`"$user", public` as a single schema name) names no blue schema:
    // left alone.
    let r2 = |rows: &[String]| -> Vec<String> {
        rows.iter()
            .filter(|l| l.starts_with("cut_r2"))
            .cloned()
            .collect()
    };
    assert_eq!(r2(&flipped), r2(&before), "{joined}");
    ok(&url, &["rollback", "-m", SMALL, "--yes"]).await;
    assert_eq!(
        snapshot(&mut c).await,
        before,
        "rollback restores every setting"
    );
    // A setting changed behind the tool's back after a cutover stops the rollback, unchanged.
    ok(&url, &["validate", "-m", SMALL]).await;
    ok(
        &url,
        &["cutover", "-m", SMALL, "--yes", "--accept-lossy-rollback"],
    )
    .await;
    exec(
        &mut c,
        &format!("ALTER DATABASE {db} SET search_path = elsewhere"),
    )
    .await;
    let changed = snapshot(&mut c).await;
    let out = run_within(&url, &["rollback", "-m", SMALL, "--yes"], LIMIT).await;
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(
        both(&out).contains("changed since the cutover"),
        "{}",
        both(&out)
    );
    assert_eq!(snapshot(&mut c).await, changed);
}

/// Tables a rollback would lose green writes to refuse the cutover (exit 1, nothing changed)
/// unless accepted; so does a missing validation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_cutover_is_refused_unless_accepted_and_a_refusal_changes_nothing() {
    let url = empty_db("cut_lossy").await;
    let mut c = connect(&url).await;
    exec(&mut c, SMALL_BLUE).await;
    copy_ok(&url, SMALL).await;
    let before = unchanged(&url).await;
    let out = run_within(
        &url,
        &["cutover", "-m", SMALL, "--yes", "--accept-lossy-rollback"],
        LIMIT,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(
        stdout(&out).contains("no validation has run"),
        "{}",
        both(&out)
    );
    assert_eq!(unchanged(&url).await, before);
    ok(&url, &["validate", "-m", SMALL]).await;
    let out = run_within(&url, &["cutover", "-m", SMALL, "--yes"], LIMIT).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let text = stdout(&out);
    assert!(
        text.contains("acct_upper")
            && text.contains("by_owner")
            && text.contains("--accept-lossy-rollback"),
        "{text}"
    );
    assert!(
        !text.contains("acct (reverse"),
        "acct is invertible: {text}"
    );
    assert_eq!(unchanged(&url).await, before);
    // Without --yes and no terminal: refused before anything is done.
    let out = run_within(
        &url,
        &["cutover", "-m", SMALL, "--accept-lossy-rollback"],
        LIMIT,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(both(&out).contains("--yes"), "{}", both(&out));
    assert_eq!(unchanged(&url).await, before);
    cut_over_small(&url).await;
    assert_ne!(unchanged(&url).await, before);
}

/// A transaction holding a lock on a blue table makes the cutover give up after its attempts,
/// naming it, with nothing changed; the application's other writes went on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_cutover_gives_up_naming_the_blocker_and_changes_nothing() {
    let (url, mut c) = small("cut_blocked").await;
    let before = unchanged(&url).await;
    let mut blocker = connect(&url).await;
    exec(
        &mut blocker,
        "BEGIN; LOCK TABLE public.acct IN ROW EXCLUSIVE MODE",
    )
    .await;
    let pid = count(&mut blocker, "SELECT pg_backend_pid()::int8").await;
    let out = run_within(
        &url,
        &[
            "cutover",
            "-m",
            SMALL,
            "--yes",
            "--accept-lossy-rollback",
            "--attempts",
            "2",
        ],
        LIMIT,
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert!(both(&out).contains(&format!("pid {pid}")), "{}", both(&out));
    assert!(both(&out).contains("nothing was changed"), "{}", both(&out));
    exec(&mut blocker, "ROLLBACK").await;
    assert_eq!(unchanged(&url).await, before);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM bluegreen.runs WHERE phase = 'live'"
        )
        .await,
        1
    );
    cut_over_small(&url).await;
}

/// kill -9 of cutover and of rollback at any moment, then a re-run: the phase, the triggers and
/// the settings agree, and the writes on both sides are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_and_rollback_killed_at_any_moment_then_rerun_are_consistent() {
    let (url, mut c) = small("cut_kill").await;
    for (i, delay) in [5u64, 40, 80, 150, 300].into_iter().enumerate() {
        for cmd in ["cutover", "rollback"] {
            let mut args = vec![cmd, "-m", SMALL, "--yes"];
            if cmd == "cutover" {
                args.push("--accept-lossy-rollback");
            }
            let mut child = crate::support::command(&url, &args).spawn().unwrap();
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let _ = child.kill();
            let _ = child.wait();
            // Whatever the kill left, the re-run finishes the move.
            ok(&url, &args).await;
            let phase: String = sqlx::query_scalar("SELECT phase FROM bluegreen.runs")
                .fetch_one(&mut c)
                .await
                .unwrap();
            let path: Option<String> = sqlx::query_scalar(
                "SELECT array_to_string(setconfig, ',') FROM pg_db_role_setting WHERE setrole = 0 AND setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_optional(&mut c)
            .await
            .unwrap();
            match cmd {
                "cutover" => {
                    assert_eq!(phase, "cut_over");
                    assert!(path.unwrap_or_default().contains("small_green"));
                    let mut g = green_session(&url).await;
                    exec(&mut g, &format!("INSERT INTO acct (owner) VALUES ('g{i}')")).await;
                }
                _ => {
                    assert_eq!(phase, "rolled_back");
                    assert_eq!(path, None, "the database had no setting before");
                    exec(
                        &mut c,
                        &format!("INSERT INTO public.acct (owner) VALUES ('b{i}')"),
                    )
                    .await;
                }
            }
            assert_acct_sides_equal(&mut c, &format!("{cmd} killed after {delay} ms")).await;
        }
        ok(&url, &["validate", "-m", SMALL]).await;
    }
}

/// Design review H6: a session that pins its search_path to blue keeps writing blue after the
/// flip; its writes reach green and it is seen as a blue writer by user and application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_pinned_to_blue_is_seen_writing_blue_after_the_flip() {
    let (url, _c) = small("cut_h6").await;
    cut_over_small(&url).await;
    let mut pinned = connect(&url).await;
    exec(
        &mut pinned,
        "SET application_name = 'legacy-worker'; SET search_path = public",
    )
    .await;
    exec(
        &mut pinned,
        "UPDATE acct SET balance = balance + 1 WHERE id = 2",
    )
    .await;
    assert_acct_sides_equal(&mut pinned, "after a pinned write").await;
    let out = ok(
        &url,
        &["cutover", "-m", SMALL, "--yes", "--accept-lossy-rollback"],
    )
    .await;
    assert!(out.contains("already"), "{out}");
    let seen = count(
        &mut pinned,
        "SELECT count(*) FROM bluegreen.blue_writers WHERE application_name = 'legacy-worker' AND usename = 'postgres'",
    )
    .await;
    assert_eq!(seen, 1);
    let out = ok(&url, &["status", "-m", SMALL]).await;
    assert!(
        out.contains("legacy-worker"),
        "status names the blue writer:\n{out}"
    );
}

/// Everything bluegreen generated for a migration that is still in the database: triggers and
/// functions by the one list of generated names, and the control schema's tables.
async fn leftovers(c: &mut PgConnection, mapping: &str) -> Vec<String> {
    let m = bluegreen::mapping::load(&crate::support::root().join(mapping)).unwrap();
    let g = bluegreen::names::generated(
        &m.control_schema,
        &m.migration,
        m.blue_tables_read().len(),
        m.tables.len(),
    );
    let mut out: Vec<String> = sqlx::query_scalar(
        "SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname = ANY($1)
         UNION ALL SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $2
         UNION ALL SELECT 'table ' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $2 AND c.relkind = 'r' AND c.relname NOT IN ('runs', 'validations', 'events')
         ORDER BY 1",
    )
    .bind(&g.triggers)
    .bind(&m.control_schema)
    .fetch_all(&mut *c)
    .await
    .unwrap();
    let functions: Vec<String> = g.functions.iter().map(|f| f.to_string()).collect();
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT 'function ' || f FROM unnest($1::text[]) f WHERE to_regproc(f) IS NOT NULL",
    )
    .bind(&functions)
    .fetch_all(&mut *c)
    .await
    .unwrap();
    out.extend(left);
    out
}

/// finalize after a cutover: refused while a session still writes blue, then nothing generated
/// is left but the archive (the run, its validations and its events), sequences step by one
/// again past every used value, and the application keeps writing green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_leaves_nothing_but_the_archive() {
    let (url, mut c) = small("cut_final").await;
    let out = run_within(&url, &["finalize", "-m", SMALL, "--yes"], LIMIT).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "not cut over yet: {}",
        both(&out)
    );
    cut_over_small(&url).await;
    exec(&mut c, "UPDATE acct SET balance = 0 WHERE id = 1").await;
    let out = run_within(&url, &["finalize", "-m", SMALL, "--yes"], LIMIT).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(stdout(&out).contains("wrote blue"), "{}", both(&out));
    let out = run_within(
        &url,
        &["finalize", "-m", SMALL, "--yes", "--abandon"],
        LIMIT,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "abandon while cut over: {}",
        both(&out)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ok(&url, &["sync", "-m", SMALL]).await;
    let done = ok(&url, &["finalize", "-m", SMALL, "--yes", "--quiet", "1s"]).await;
    assert!(done.contains("only the archive is left"), "{done}");
    assert_eq!(leftovers(&mut c, SMALL).await, Vec::<String>::new());
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pg_sequence WHERE seqincrement <> 1"
        )
        .await,
        0
    );
    let mut g = connect(&url).await;
    exec(&mut g, "INSERT INTO acct (owner) VALUES ('after')").await;
    assert_eq!(
        count(
            &mut g,
            "SELECT count(*) - count(DISTINCT id) FROM small_green.acct"
        )
        .await,
        0
    );
    // The archive: the run finalized, every command's event with who, where and what.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM bluegreen.runs WHERE phase = 'finalized'"
        )
        .await,
        1
    );
    let cutovers = count(
        &mut c,
        "SELECT count(*) FROM bluegreen.events WHERE command = 'cutover' AND outcome = 'cut_over' AND os_user <> '' AND host <> '' AND args::text LIKE '%--yes%' AND started_at <= at AND (detail->>'writes_blocked_ms') IS NOT NULL",
    )
    .await;
    assert_eq!(cutovers, 1);
    let out = ok(&url, &["status", "-m", SMALL]).await;
    assert!(
        out.contains("phase finalized") && out.contains("finalize finalized"),
        "{out}"
    );
    assert_eq!(
        leftovers(&mut c, SMALL).await,
        Vec::<String>::new(),
        "status wrote nothing"
    );
    let again = ok(&url, &["finalize", "-m", SMALL, "--yes"]).await;
    assert!(again.contains("already finalized"), "{again}");
}

/// finalize --abandon after a rollback drops green and every generated object; blue is as the
/// application left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_abandon_after_a_rollback_drops_green() {
    let (url, mut c) = small("cut_abandon").await;
    cut_over_small(&url).await;
    let mut g = green_session(&url).await;
    exec(&mut g, "INSERT INTO acct (owner) VALUES ('kept')").await;
    ok(&url, &["rollback", "-m", SMALL, "--yes"]).await;
    let out = run_within(&url, &["finalize", "-m", SMALL, "--yes"], LIMIT).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "rolled back needs --abandon: {}",
        both(&out)
    );
    ok(&url, &["finalize", "-m", SMALL, "--yes", "--abandon"]).await;
    assert_eq!(leftovers(&mut c, SMALL).await, Vec::<String>::new());
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'small_green'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.acct WHERE owner = 'kept'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM pg_sequence WHERE seqincrement <> 1"
        )
        .await,
        0
    );
    exec(&mut c, "INSERT INTO public.acct (owner) VALUES ('plain')").await;
}

/// validate after cutover: green = M(blue) goes on being checked exactly for the invertible
/// tables (the condition of a lossless rollback), blue rows nobody wrote since the flip are not
/// held to R(green) (legacy values R(M(b)) normalizes), and the entries without a reverse are the
/// new application's and not compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_after_cutover_checks_green_against_blue() {
    let (url, _c) = small("cut_validate").await;
    cut_over_small(&url).await;
    let mut g = green_session(&url).await;
    exec(
        &mut g,
        "UPDATE acct SET owner = 'renamed' WHERE id = 4; INSERT INTO acct (owner) VALUES ('new')",
    )
    .await;
    let out = ok(&url, &["validate", "-m", SMALL]).await;
    assert!(
        out.contains("reverse sync to public.acct: no failure"),
        "{out}"
    );
    assert!(
        out.contains("acct_upper") && out.contains("not compared after cutover"),
        "{out}"
    );
    // A green write that skipped its reverse (the loop guard set by hand, as only an applier
    // does): blue no longer holds it, and the forward comparison names the key.
    let m = bluegreen::mapping::load(&crate::support::root().join(SMALL)).unwrap();
    let guard = bluegreen::names::guard_setting(&m.migration);
    exec(
        &mut g,
        &format!("BEGIN; SELECT set_config('{guard}', 'f:0', true); UPDATE acct SET balance = 999 WHERE id = 5; COMMIT"),
    )
    .await;
    let out = run_within(&url, &["validate", "-m", SMALL], LIMIT).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    let text = stdout(&out);
    assert!(
        text.contains("DIFFERS") && text.contains("changed 1") && text.contains("(5)"),
        "{text}"
    );
}

const JOINED: &str = "tests/fixtures/cutover_join.yaml";

/// Design review C1 on an entry the follower keeps: after the flip an old session's write to its
/// driving table is re-derived in the old session's statement (not left to the follower, where a
/// new session's read-modify-write of the stale green row would lose it); both sessions' writes
/// survive in either order, and a write to the joined table reaches green through the follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_sessions_write_to_a_follower_kept_entry_survives_a_new_sessions_write() {
    let url = empty_db("cut_joined").await;
    let mut old = connect(&url).await;
    exec(
        &mut old,
        "CREATE TABLE public.w (id integer PRIMARY KEY, name text);
         CREATE TABLE public.c (id integer PRIMARY KEY, w_id integer NOT NULL REFERENCES public.w, v integer NOT NULL);
         INSERT INTO public.w VALUES (1, 'one'), (2, 'two');
         INSERT INTO public.c SELECT i, 1 + i % 2, i FROM generate_series(1, 20) i;",
    )
    .await;
    copy_ok(&url, JOINED).await;
    ok(&url, &["validate", "-m", JOINED]).await;
    ok(&url, &["cutover", "-m", JOINED, "--yes"]).await;
    let mut new = connect(&url).await;
    exec(&mut old, "BEGIN; UPDATE c SET v = v + 100 WHERE id = 1").await;
    let waiter = tokio::spawn(async move {
        exec(&mut new, "UPDATE cj SET v = v + 5 WHERE id = 1").await;
        new
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    exec(&mut old, "COMMIT").await;
    let mut new = waiter.await.unwrap();
    exec(&mut new, "BEGIN; UPDATE cj SET v = v + 7 WHERE id = 1").await;
    let blocked = tokio::spawn(async move {
        let r = sqlx::raw_sql("UPDATE c SET v = v + 1000 WHERE id = 1")
            .execute(&mut old)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        (old, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    exec(&mut new, "COMMIT").await;
    let (mut old, r) = blocked.await.unwrap();
    let plus = match r {
        Ok(()) => 1000,
        Err(e) => {
            assert!(e.contains("40001") || e.contains("retry"), "{e}");
            0
        }
    };
    let want = 1 + 100 + 5 + 7 + plus;
    assert_eq!(
        count(&mut old, "SELECT v::int8 FROM public.c WHERE id = 1").await,
        want
    );
    assert_eq!(
        count(&mut old, "SELECT v FROM joined_green.cj WHERE id = 1").await,
        want
    );
    // The joined table: logged, applied by the follower (here `sync`), green row locked first.
    exec(
        &mut old,
        "UPDATE w SET name = 'uno' WHERE id = 1; INSERT INTO c VALUES (21, 1, 0)",
    )
    .await;
    ok(&url, &["sync", "-m", JOINED]).await;
    assert_eq!(
        count(
            &mut old,
            "SELECT count(*) FROM joined_green.cj WHERE wname = 'uno'"
        )
        .await,
        11
    );
    let n = differ(&mut old, "public.c", "joined_green.cj", "id, w_id, v::int8").await;
    assert_eq!(n, 0, "blue c and green cj differ");
    assert!(
        invariant_violations(&url, JOINED).await.is_empty(),
        "green = M(blue)"
    );
    ok(&url, &["validate", "-m", JOINED]).await;
}

/// Hostile review of the cutover, finding 1: two cutovers started at once flip once (the second,
/// waiting for the first one's fence, finds it done), so the record of the previous settings is
/// the real one and the rollback restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cutovers_at_once_flip_once_and_the_rollback_restores_the_settings() {
    let db = "cut_twice";
    let url = empty_db(db).await;
    let mut c = connect(&url).await;
    exec(&mut c, SMALL_BLUE).await;
    exec(
        &mut c,
        &format!("ALTER DATABASE {db} SET search_path = app, public"),
    )
    .await;
    copy_ok(&url, SMALL).await;
    ok(&url, &["validate", "-m", SMALL]).await;
    let setting = "SELECT array_to_string(setconfig, '|') FROM pg_db_role_setting WHERE setrole = 0 AND setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let before: String = sqlx::query_scalar(setting).fetch_one(&mut c).await.unwrap();
    let args = ["cutover", "-m", SMALL, "--yes", "--accept-lossy-rollback"];
    let a = crate::support::command(&url, &args).spawn().unwrap();
    let b = crate::support::command(&url, &args).spawn().unwrap();
    let a = crate::support::wait_child(a, LIMIT, "cutover a".into()).await;
    let b = crate::support::wait_child(b, LIMIT, "cutover b".into()).await;
    assert_eq!(
        (a.status.code(), b.status.code()),
        (Some(0), Some(0)),
        "{}\n{}",
        both(&a),
        both(&b)
    );
    assert_eq!(
        count(&mut c, "SELECT count(*) FROM bluegreen.events WHERE command = 'cutover' AND outcome = 'cut_over'").await,
        1,
        "one flip"
    );
    ok(&url, &["rollback", "-m", SMALL, "--yes"]).await;
    let after: String = sqlx::query_scalar(setting).fetch_one(&mut c).await.unwrap();
    assert_eq!(after, before);
}

/// Hostile review finding 4: a blue key from a sequence no column owns is interleaved with
/// green's identity too: new and old sessions' inserts never collide, and none is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unowned_sequence_is_interleaved_too() {
    const SEQ: &str = "tests/fixtures/cutover_seq.yaml";
    let url = empty_db("cut_seq").await;
    let mut old = connect(&url).await;
    exec(
        &mut old,
        "CREATE SEQUENCE public.note_seq;
         CREATE TABLE public.note (id integer PRIMARY KEY DEFAULT nextval('public.note_seq'), body text);
         INSERT INTO public.note (body) SELECT 'n' || i FROM generate_series(1, 100) i;",
    )
    .await;
    copy_ok(&url, SEQ).await;
    exec(
        &mut old,
        "INSERT INTO public.note (body) SELECT 'late' || i FROM generate_series(1, 5) i",
    )
    .await;
    ok(&url, &["validate", "-m", SEQ]).await;
    ok(&url, &["cutover", "-m", SEQ, "--yes"]).await;
    let mut new = connect(&url).await;
    for i in 0..10 {
        exec(
            &mut new,
            &format!("INSERT INTO note (body) VALUES ('green{i}')"),
        )
        .await;
        exec(
            &mut old,
            &format!("INSERT INTO note (body) VALUES ('blue{i}')"),
        )
        .await;
    }
    assert_eq!(
        count(&mut old, "SELECT count(*) FROM public.note").await,
        125
    );
    assert_eq!(
        count(&mut old, "SELECT count(*) FROM seqs_green.note").await,
        125
    );
    let n = differ(&mut old, "public.note", "seqs_green.note", "id, body").await;
    assert_eq!(n, 0);
}

/// Hostile review finding 6: a green write blue cannot take (a balance past blue's `integer`,
/// green's is `bigint`) stands on green: the reverse records it as a reverse failure instead of
/// failing the new application's statement; rollback refuses while it stands, `sync` retries it,
/// and once green holds a value blue can take again the retry clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_write_blue_cannot_take_stands_and_holds_the_rollback_back() {
    let (url, mut c) = small("cut_revfail").await;
    cut_over_small(&url).await;
    let mut g = green_session(&url).await;
    exec(&mut g, "UPDATE acct SET balance = 3000000000 WHERE id = 1").await;
    assert_eq!(
        count(&mut c, "SELECT balance FROM small_green.acct WHERE id = 1").await,
        3_000_000_000
    );
    assert_eq!(control_rows(&mut c, "reverse_failures", "small").await, 1);
    let st = ok(&url, &["status", "-m", SMALL]).await;
    assert!(
        st.contains("reverse failures: 1") && st.contains("22003"),
        "{st}"
    );
    let out = run_within(&url, &["rollback", "-m", SMALL, "--yes"], LIMIT).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(
        stdout(&out).contains("did not reach blue"),
        "{}",
        both(&out)
    );
    let out = run_within(&url, &["sync", "-m", SMALL], LIMIT).await;
    assert_eq!(out.status.code(), Some(1), "still failing: {}", both(&out));
    let out = run_within(&url, &["validate", "-m", SMALL], LIMIT).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    // An old session's write to that row would re-derive it from the stale blue row over the
    // green write (second hostile review F2): refused while the failure stands.
    let e = sqlx::raw_sql("UPDATE public.acct SET owner = 'renamed' WHERE id = 1")
        .execute(&mut c)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("has not reached blue yet"), "{e}");
    exec(
        &mut c,
        "UPDATE public.acct SET owner = 'other' WHERE id = 2",
    )
    .await;
    assert_eq!(
        count(&mut c, "SELECT balance FROM small_green.acct WHERE id = 1").await,
        3_000_000_000
    );
    // A blue key conflict on a green insert is the green writer's error, never merged.
    let e = sqlx::raw_sql("INSERT INTO acct (id, owner) VALUES (2, 'dup')")
        .execute(&mut g)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate key"), "{e}");
    exec(&mut g, "UPDATE acct SET balance = 5 WHERE id = 1").await;
    ok(&url, &["sync", "-m", SMALL]).await;
    assert_eq!(control_rows(&mut c, "reverse_failures", "small").await, 0);
    assert_acct_sides_equal(&mut c, "after the retry").await;
    ok(&url, &["rollback", "-m", SMALL, "--yes"]).await;
}

/// A green value longer than blue's `character varying(8)` (green's column is `text`): the
/// inverted cast used to truncate it silently, so blue held its first eight characters and a
/// rollback lost the rest. Now blue's own length check refuses it: a reverse failure that stands
/// on green and holds the rollback back, like any value blue cannot take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_value_too_long_for_blue_is_never_truncated_into_it() {
    too_long_for_blue("cut_varchar", "", "owner varchar(8)").await;
}

/// The same through a domain over `varchar(8)` (an explicit cast to the domain truncates too:
/// the hostile review of that change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_value_too_long_for_a_blue_domain_is_never_truncated_into_it() {
    too_long_for_blue(
        "cut_domain",
        "CREATE DOMAIN public.owner_name AS varchar(8);",
        "owner public.owner_name",
    )
    .await;
}

async fn too_long_for_blue(db: &str, before: &str, owner: &str) {
    let url = empty_db(db).await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        &format!("{before}{}", SMALL_BLUE.replace("owner text", owner)),
    )
    .await;
    copy_ok(&url, SMALL).await;
    ok(&url, &["validate", "-m", SMALL]).await;
    cut_over_small(&url).await;
    let mut g = green_session(&url).await;
    exec(
        &mut g,
        "UPDATE acct SET owner = 'a much longer owner' WHERE id = 1",
    )
    .await;
    exec(&mut g, "UPDATE acct SET owner = 'short' WHERE id = 2").await;
    let blue: Vec<String> =
        sqlx::query_scalar("SELECT owner::text FROM public.acct WHERE id IN (1, 2) ORDER BY id")
            .fetch_all(&mut c)
            .await
            .unwrap();
    assert_eq!(blue, ["o1", "short"], "blue after the green writes");
    assert_eq!(control_rows(&mut c, "reverse_failures", "small").await, 1);
    let st = ok(&url, &["status", "-m", SMALL]).await;
    assert!(
        st.contains("reverse failures: 1") && st.contains("22001"),
        "{st}"
    );
    let out = run_within(&url, &["rollback", "-m", SMALL, "--yes"], LIMIT).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    exec(&mut g, "UPDATE acct SET owner = 'fits' WHERE id = 1").await;
    ok(&url, &["sync", "-m", SMALL]).await;
    assert_eq!(control_rows(&mut c, "reverse_failures", "small").await, 0);
    assert_acct_sides_equal(&mut c, "after the retry").await;
    ok(&url, &["rollback", "-m", SMALL, "--yes"]).await;
    assert_acct_sides_equal(&mut c, "after the rollback").await;
}

/// Design review H5: a lookup renamed just before the cutover touches thousands of keys; they
/// are applied before the fence, with writes going on, so the fence drains next to nothing and
/// the application's writes meanwhile are never held for long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_renamed_just_before_the_cutover_is_applied_before_the_fence() {
    let url = empty_db("cut_h5").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.w (id integer PRIMARY KEY, name text);
         CREATE TABLE public.c (id integer PRIMARY KEY, w_id integer NOT NULL REFERENCES public.w, v integer NOT NULL);
         INSERT INTO public.w VALUES (1, 'one'), (2, 'two');
         INSERT INTO public.c SELECT i, 1 + i % 2, i FROM generate_series(1, 20000) i;",
    )
    .await;
    copy_ok(&url, JOINED).await;
    ok(&url, &["validate", "-m", JOINED]).await;
    exec(&mut c, "UPDATE w SET name = 'uno' WHERE id = 1").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (u, s) = (url.clone(), stop.clone());
    let writer = tokio::spawn(async move {
        let mut app = connect(&u).await;
        let mut i = 0;
        let mut longest = Duration::ZERO;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            i += 1;
            let took = crate::support::must_not_wait(
                &mut app,
                "an application write during the cutover",
                &format!(
                    "UPDATE public.c SET v = v + 1 WHERE id = {}",
                    2 + 2 * (i % 1000)
                ),
                Duration::from_secs(10),
            )
            .await;
            longest = longest.max(took);
        }
        (i, longest)
    });
    let out = ok(&url, &["cutover", "-m", JOINED, "--yes"]).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (writes, longest) = writer.await.unwrap();
    assert!(writes > 0);
    eprintln!("{writes} writes during the cutover, longest {longest:?}; {out}");
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM joined_green.cj WHERE wname = 'uno'"
        )
        .await,
        10000
    );
    let n = differ(&mut c, "public.c", "joined_green.cj", "id, w_id, v::int8").await;
    assert_eq!(n, 0, "blue c and green cj differ");
    assert!(invariant_violations(&url, JOINED).await.is_empty());
}

const SPLIT: &str = "tests/fixtures/cutover_split.yaml";

/// A split (DESIGN.md, `reverse`): customers is the row owner of blue customer, addresses the
/// column owner of its country. A green write to addresses.country reverses into blue and
/// re-derives the sibling customers (its computed country_code) but not addresses itself; a
/// column owner's row inserted before its row owner's is a reverse failure until `sync` retries
/// it; a row owner's delete takes the column owner's green row with it. No lossy tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_reverses_through_its_row_owner_and_its_column_owner() {
    let url = empty_db("cut_split").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.customer (id integer PRIMARY KEY, name text NOT NULL, country text);
         INSERT INTO public.customer SELECT i, 'c' || i, 'de' FROM generate_series(1, 20) i;",
    )
    .await;
    copy_ok(&url, SPLIT).await;
    let plan = ok(&url, &["plan", "-m", SPLIT]).await;
    assert!(plan.contains("column owner"), "{plan}");
    assert!(
        plan.contains(
            "read-only after cutover (computed from blue, no reverse reads them): country_code"
        ),
        "{plan}"
    );
    ok(&url, &["validate", "-m", SPLIT]).await;
    ok(&url, &["cutover", "-m", SPLIT, "--yes"]).await;
    let mut g = connect(&url).await;
    exec(&mut g, "UPDATE addresses SET country = 'ch' WHERE id = 1").await;
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.customer WHERE id = 1 AND country = 'ch'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM split_green.customers WHERE id = 1 AND country_code = 'CH'"
        )
        .await,
        1
    );
    exec(&mut g, "UPDATE customers SET name = 'renamed' WHERE id = 2").await;
    exec(&mut g, "BEGIN; INSERT INTO customers (id, name) VALUES (100, 'new'); INSERT INTO addresses VALUES (100, 'fr'); COMMIT").await;
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM split_green.customers WHERE id = 100 AND country_code = 'FR'"
        )
        .await,
        1
    );
    // The column owner's row first: recorded, retried once the row owner's row is there.
    exec(&mut g, "INSERT INTO addresses VALUES (101, 'it')").await;
    assert_eq!(control_rows(&mut c, "reverse_failures", "split").await, 1);
    exec(
        &mut g,
        "INSERT INTO customers (id, name) VALUES (101, 'late')",
    )
    .await;
    // The row owner's reverse must not reset the column owner's green value (second hostile
    // review F1: the partner step set it to blue's NULL, and the retry made that permanent).
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM split_green.addresses WHERE id = 101 AND country = 'it'"
        )
        .await,
        1
    );
    ok(&url, &["sync", "-m", SPLIT]).await;
    assert_eq!(control_rows(&mut c, "reverse_failures", "split").await, 0);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.customer WHERE id = 101 AND country = 'it'"
        )
        .await,
        1
    );
    // A column owner's delete has nothing to delete in blue: refused (F6).
    let e = sqlx::raw_sql("DELETE FROM addresses WHERE id = 4")
        .execute(&mut g)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot be written back"), "{e}");
    exec(&mut g, "DELETE FROM customers WHERE id = 3").await;
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM split_green.addresses WHERE id = 3"
        )
        .await,
        0
    );
    let n = differ(
        &mut c,
        "public.customer",
        "(SELECT c.id, c.name, a.country FROM split_green.customers c JOIN split_green.addresses a USING (id)) AS g",
        "id, name, country",
    )
    .await;
    assert_eq!(n, 0, "blue customer = R(green)");
    assert!(
        invariant_violations(&url, SPLIT).await.is_empty(),
        "green = M(blue)"
    );
    ok(&url, &["validate", "-m", SPLIT]).await;
    ok(&url, &["rollback", "-m", SPLIT, "--yes"]).await;
}

/// The cutover fence's step 3: the keys the frozen backlog touches are found before its drain and
/// re-verified after it; a green row that still differs from M(blue) at one of them is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_reverifies_the_keys_it_drained() {
    let url = empty_db("cut_verify").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.w (id integer PRIMARY KEY, name text);
         CREATE TABLE public.c (id integer PRIMARY KEY, w_id integer NOT NULL REFERENCES public.w, v integer NOT NULL);
         INSERT INTO public.w VALUES (1, 'one'), (2, 'two');
         INSERT INTO public.c SELECT i, 1 + i % 2, i FROM generate_series(1, 200) i;",
    )
    .await;
    copy_ok(&url, JOINED).await;
    exec(&mut c, "UPDATE w SET name = 'uno' WHERE id = 1").await;
    let m = bluegreen::mapping::load(&crate::support::root().join(JOINED)).unwrap();
    let mut a = connect(&url).await;
    let m = bluegreen::control::runs::resolved_mapping(&mut a, &m)
        .await
        .unwrap();
    let plan = bluegreen::sync::plan(&mut a, &m).await.unwrap();
    let keys = bluegreen::sync::apply::keys_pending(&mut a, &m, &plan, 1000)
        .await
        .unwrap()
        .expect("under the limit");
    assert_eq!(keys.values().map(|k| k.len()).sum::<usize>(), 100);
    bluegreen::sync::drain(&mut a, &m, &plan).await.unwrap();
    assert!(
        bluegreen::sync::apply::verify_keys(&mut a, &plan, &keys)
            .await
            .unwrap()
            .is_empty()
    );
    exec(&mut c, "UPDATE joined_green.cj SET v = -1 WHERE id = 2").await;
    let differ = bluegreen::sync::apply::verify_keys(&mut a, &plan, &keys)
        .await
        .unwrap();
    assert_eq!(differ.len(), 1, "{differ:?}");
    assert!(differ[0].starts_with("cj (first key"), "{differ:?}");
    exec(&mut c, "UPDATE joined_green.cj SET v = 2 WHERE id = 2").await;
}

/// Design review L2: a green insert whose key a blue row outside the mapping holds (a
/// soft-deleted lead) fails for the green writer instead of being merged into it; the blue rows
/// outside the mapping stay as they are, and blue = R(green) on the keys green holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_insert_meeting_a_soft_deleted_blue_row_fails_and_is_never_merged() {
    const SOFT: &str = "tests/fixtures/cutover_soft.yaml";
    let url = empty_db("cut_soft").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE public.leads (id integer PRIMARY KEY, status text NOT NULL, deleted_at timestamptz);
         INSERT INTO public.leads SELECT i, 'new', CASE WHEN i % 5 = 0 THEN now() END FROM generate_series(1, 20) i;",
    )
    .await;
    copy_ok(&url, SOFT).await;
    ok(&url, &["validate", "-m", SOFT]).await;
    ok(&url, &["cutover", "-m", SOFT, "--yes"]).await;
    let mut g = connect(&url).await;
    let e = sqlx::raw_sql("INSERT INTO leads VALUES (5, 'won')")
        .execute(&mut g)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("duplicate key"), "{e}");
    exec(
        &mut g,
        "UPDATE leads SET status = 'won' WHERE id = 1; INSERT INTO leads VALUES (21, 'new')",
    )
    .await;
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.leads WHERE deleted_at IS NOT NULL AND status = 'new'"
        )
        .await,
        4
    );
    let n = differ(
        &mut c,
        "(SELECT id, status FROM public.leads WHERE deleted_at IS NULL) AS b",
        "soft_green.leads",
        "id, status",
    )
    .await;
    assert_eq!(n, 0);
    ok(&url, &["validate", "-m", SOFT]).await;
}
