//! One throwaway cluster per test process, a fresh database per test cloned from a template that
//! holds the CarBot legacy schema and data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use bluegreen::pg::cluster::Cluster;
use sqlx::{Connection, PgConnection};
use tokio::sync::OnceCell;

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static CARBOT_TEMPLATE: OnceCell<()> = OnceCell::const_new();

pub const CARBOT_LEADS: u32 = 2000;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| Cluster::start().expect("starting a throwaway PostgreSQL"))
}

pub async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url).await.expect("connect")
}

/// Run a multi-statement SQL text.
pub async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(conn)
        .await
        .unwrap_or_else(|e| panic!("{e}\nin:\n{}", &sql[..sql.len().min(400)]));
}

/// Load the CarBot legacy schema and `leads` generated rows into the database at `url`.
pub async fn load_carbot(url: &str, leads: u32) {
    let mut c = connect(url).await;
    let dir = root().join("examples/carbot");
    exec(
        &mut c,
        &std::fs::read_to_string(dir.join("legacy.sql")).unwrap(),
    )
    .await;
    let gen_sql = format!(
        "SET carbot.leads = '{leads}';\n{}",
        std::fs::read_to_string(dir.join("generate.sql")).unwrap()
    );
    exec(&mut c, &gen_sql).await;
}

/// A new empty database.
pub async fn empty_db(name: &str) -> String {
    let cl = cluster();
    let mut admin = connect(&cl.url("postgres")).await;
    exec(&mut admin, &format!("DROP DATABASE IF EXISTS \"{name}\"")).await;
    exec(&mut admin, &format!("CREATE DATABASE \"{name}\"")).await;
    cl.url(name)
}

/// A new database holding the CarBot legacy data (cloned from a template built once).
pub async fn carbot_db(name: &str) -> String {
    let cl = cluster();
    CARBOT_TEMPLATE
        .get_or_init(|| async {
            let url = empty_db("carbot_template").await;
            load_carbot(&url, CARBOT_LEADS).await;
        })
        .await;
    let mut admin = connect(&cl.url("postgres")).await;
    exec(&mut admin, &format!("DROP DATABASE IF EXISTS \"{name}\"")).await;
    exec(
        &mut admin,
        &format!("CREATE DATABASE \"{name}\" TEMPLATE carbot_template"),
    )
    .await;
    cl.url(name)
}

/// Run the bluegreen binary off the async runtime and collect its output.
pub async fn run(url: &str, args: &[&str]) -> std::process::Output {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || bluegreen(&url).args(&args).output().unwrap())
        .await
        .unwrap()
}

/// `bluegreen copy -m <mapping>`, which must succeed.
pub async fn copy_ok(url: &str, mapping: &str) {
    let out = run(url, &["copy", "-m", mapping]).await;
    assert!(
        out.status.success(),
        "copy failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `bluegreen status --format json` as a value.
pub async fn status_json(url: &str, mapping: &str) -> serde_json::Value {
    let out = run(url, &["status", "-m", mapping, "--format", "json"]).await;
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status: {e}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// The bluegreen binary, with the database URL set.
pub fn bluegreen(url: &str) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::cargo_bin("bluegreen").unwrap();
    cmd.current_dir(root())
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG");
    cmd
}

/// Everything a command could leave behind: schemas, relations, functions, triggers, sequence
/// positions. Two equal snapshots mean nothing was written.
pub async fn fingerprint(url: &str) -> Vec<String> {
    let mut c = connect(url).await;
    sqlx::query_scalar::<_, String>(
        "SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%'
         UNION ALL SELECT 'rel ' || c.oid::regclass::text || ' ' || c.relkind::text FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
         UNION ALL SELECT 'trigger ' || tgname FROM pg_trigger WHERE NOT tgisinternal
         UNION ALL SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p
           JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
         UNION ALL SELECT 'seq ' || schemaname || '.' || sequencename || ' ' || coalesce(last_value, 0) FROM pg_sequences
         UNION ALL SELECT 'setting ' || array_to_string(setconfig, ',') FROM pg_db_role_setting
           WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY 1",
    )
    .fetch_all(&mut c)
    .await
    .unwrap()
}

pub fn rel(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

/// The invariant of DESIGN.md for every entry: green.T = M(blue) as multisets on the mapped
/// columns. Returns the entries that differ, with the number of differing rows.
pub async fn invariant_violations(url: &str, mapping: &str) -> Vec<(String, i64)> {
    let m = bluegreen::mapping::load(&root().join(mapping)).unwrap();
    let mut c = connect(url).await;
    let cat = bluegreen::control::load_catalog(&mut c, &m).await.unwrap();
    let mut out = Vec::new();
    for e in &m.tables {
        let gt = cat
            .table(&bluegreen::sql::QName::new(&m.green, &e.name))
            .expect("green table");
        let sql = bluegreen::plan::query::invariant_diff(e, gt, &m.control_schema);
        let n: i64 = sqlx::query_scalar(sql.assert_safe())
            .fetch_one(&mut c)
            .await
            .unwrap();
        if n != 0 {
            out.push((e.name.clone(), n));
        }
    }
    out
}

/// Assert the invariant holds for every entry of `mapping`, once nothing is pending: the change
/// log is drained first (`bluegreen sync`, as a follower would), since keys of entries the
/// follower keeps are allowed to lag until it applies them (DESIGN.md, "The invariant").
pub async fn assert_invariant(url: &str, mapping: &str) {
    drain(url, mapping).await;
    assert_invariant_now(url, mapping).await;
}

/// Apply everything the change log holds (`bluegreen sync`; a non-zero exit is the caller's to
/// judge, through failures in `status`).
pub async fn drain(url: &str, mapping: &str) {
    let out = run(url, &["sync", "-m", mapping]).await;
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "sync failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Apply the change log (`bluegreen sync`, which must exit 0: nothing failed) and assert the
/// invariant; `what` (the statement just run) names the step in a failure.
pub async fn sync_and_check(url: &str, mapping: &str, what: &str) {
    let out = run_within(url, &["sync", "-m", mapping], Duration::from_secs(60)).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "sync after {what}: {}",
        both(&out)
    );
    let v = invariant_violations(url, mapping).await;
    assert!(v.is_empty(), "after {what}: green != M(blue): {v:?}");
}

/// Assert the invariant holds right now, with nothing drained first.
pub async fn assert_invariant_now(url: &str, mapping: &str) {
    let v = invariant_violations(url, mapping).await;
    assert!(v.is_empty(), "green != M(blue): {v:?}");
}

/// A simulated CarBot application: a second connection writing to every blue table the mapping
/// reads (inserts, updates including key updates and moves between groups, deletes, bulk
/// updates), deterministically from `seed`, until `stop` is set. Returns the statements run.
pub async fn carbot_writer(
    url: String,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    write_until_stopped(url, stop, move |i| carbot_write(seed * 1_000_000 + i, i)).await
}

/// Run the statements `next(1)`, `next(2)`, ... on one connection until `stop` is set; every one
/// must succeed (sync must never fail an application write). Returns how many ran.
pub async fn write_until_stopped(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    next: impl Fn(u64) -> String,
) -> u64 {
    use std::sync::atomic::Ordering;
    let mut c = connect(&url).await;
    let mut i: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let sql = next(i);
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut c)
            .await
        {
            panic!("application write failed (sync must never fail it): {e}\n{sql}");
        }
    }
    i
}

/// The i-th write of the simulated application.
pub fn carbot_write(k: u64, i: u64) -> String {
    let some_lead =
        format!("(SELECT id FROM public.leads ORDER BY md5(id::text || '{k}') LIMIT 1)");
    let some_workshop =
        format!("(SELECT id FROM public.workshops ORDER BY md5(id::text || '{k}') LIMIT 1)");
    let some_customer =
        format!("(SELECT id FROM public.customers ORDER BY md5(id::text || '{k}') LIMIT 1)");
    let statuses = ["new", "contacted", "qualified", "converted", "lost"];
    let status = statuses[(i % 5) as usize];
    match i % 14 {
        0 => format!(
            "INSERT INTO public.leads (id, workshop_id, kunde_id, name, email, status, priority, lead_score, fahrzeug, \"timestamp\")
             SELECT md5('lead:{k}')::uuid, {some_workshop}, 'k{k}', 'Lead {k}', 'l{k}@example.org', '{status}', 'high', {score}, 'VW Golf {k}', '2024-05-01'"
            , score = i % 100
        ),
        1 => format!("UPDATE public.leads SET status = '{status}', priority = NULL, updated_at = '2024-06-01' WHERE id = {some_lead}"),
        2 => format!("UPDATE public.leads SET id = md5('moved:{k}')::uuid WHERE id = {some_lead}"),
        3 => format!("DELETE FROM public.leads WHERE id = {some_lead}"),
        4 => format!("UPDATE public.leads SET deleted_at = CASE WHEN deleted_at IS NULL THEN '2024-07-01'::timestamptz END, fahrzeug = '' WHERE id = {some_lead}"),
        5 => format!("UPDATE public.workshops SET city = 'City {k}', name = 'Workshop {k}' WHERE id = {some_workshop}"),
        6 => format!("UPDATE public.workshops SET owner_email = 'owner{}@example.org' WHERE id = {some_workshop}", k % 7),
        7 => format!(
            "INSERT INTO public.workshops (id, owner_email, name, city, created_at) VALUES (md5('ws:{k}')::uuid, 'owner{}@example.org', 'New {k}', 'Berlin', '2024-01-02')",
            k % 5
        ),
        8 => format!("UPDATE public.customers SET name = 'Anna{k} Maria Schmidt', workshop_id = {some_workshop} WHERE id = {some_customer}"),
        9 => format!(
            "INSERT INTO public.customers (id, workshop_id, name, email) SELECT md5('cust:{k}')::uuid, {some_workshop}, 'Solo{k}', NULL"
        ),
        10 => format!(
            "INSERT INTO public.chat_messages (workshop_id, session_id, lead_id, sender, message, created_at)
             SELECT w, s, NULL, 'user', 'hello {k}', '2024-03-03' FROM (SELECT {some_workshop} AS w, (SELECT session_id FROM public.chat_messages ORDER BY md5(id::text || '{k}') LIMIT 1) AS s) x"
        ),
        11 => format!("DELETE FROM public.chat_messages WHERE id = (SELECT id FROM public.chat_messages ORDER BY md5(id::text || '{k}') LIMIT 1)"),
        12 => format!("UPDATE public.leads SET lead_score = (coalesce(lead_score, 0) + 1) % 100 WHERE workshop_id = {some_workshop}"),
        _ => format!("DELETE FROM public.customers WHERE id = {some_customer}"),
    }
}

/// A new database holding the Chinook sample data (examples/chinook/data, MIT licence).
pub async fn chinook_db(name: &str) -> String {
    let url = empty_db(name).await;
    let path = root().join("examples/chinook/data/chinook.sql");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // The script creates its own database and connects with psql's \c: keep what follows.
    let body = text
        .split_once("\\c chinook;")
        .map(|(_, b)| b)
        .expect("\\c chinook; in chinook.sql");
    let mut c = connect(&url).await;
    exec(&mut c, body).await;
    exec(&mut c, "ANALYZE").await;
    url
}

/// The `i`th statement of a simulated Chinook application (`k` makes values unique): lookups
/// renamed, tracks moved between genres (and to no genre), albums moved between artists,
/// composite keys updated, rows inserted and deleted.
pub fn chinook_statement(i: u64, k: u64) -> String {
    let some_track = format!(
        "(SELECT track_id FROM public.track ORDER BY md5(track_id::text || '{k}') LIMIT 1)"
    );
    match i % 10 {
        0 => format!(
            "UPDATE public.genre SET name = 'Genre {k}' WHERE genre_id = {}",
            1 + k % 25
        ),
        1 => format!(
            "UPDATE public.track SET genre_id = CASE WHEN genre_id IS NULL THEN {} ELSE NULL END WHERE track_id = {some_track}",
            1 + k % 25
        ),
        2 => format!(
            "UPDATE public.album SET artist_id = {} WHERE album_id = {}",
            1 + k % 200,
            1 + k % 340
        ),
        3 => format!(
            "UPDATE public.playlist_track SET track_id = {some_track} WHERE (playlist_id, track_id) = (SELECT playlist_id, track_id FROM public.playlist_track ORDER BY md5(playlist_id::text || track_id::text || '{k}') LIMIT 1) AND NOT EXISTS (SELECT 1 FROM public.playlist_track q WHERE q.playlist_id = playlist_track.playlist_id AND q.track_id = {some_track})"
        ),
        4 => format!(
            "INSERT INTO public.track (track_id, name, album_id, media_type_id, genre_id, milliseconds, unit_price) VALUES ({}, 'New {k}', {}, 1, {}, {}, 0.99)",
            100_000 + k,
            1 + k % 340,
            if k.is_multiple_of(3) {
                "NULL".to_string()
            } else {
                (1 + k % 25).to_string()
            },
            100_000 + k % 500_000
        ),
        5 => format!("DELETE FROM public.playlist_track WHERE track_id = {some_track}"),
        6 => format!(
            "UPDATE public.track SET milliseconds = milliseconds + 1000, unit_price = unit_price + 0.01 WHERE album_id = {}",
            1 + k % 340
        ),
        7 => format!(
            "INSERT INTO public.playlist_track (playlist_id, track_id) SELECT {}, {some_track} ON CONFLICT DO NOTHING",
            1 + k % 18
        ),
        8 => format!(
            "DELETE FROM public.track WHERE track_id = (SELECT track_id FROM public.track t WHERE NOT EXISTS (SELECT 1 FROM public.invoice_line l WHERE l.track_id = t.track_id) AND NOT EXISTS (SELECT 1 FROM public.playlist_track p WHERE p.track_id = t.track_id) ORDER BY md5(track_id::text || '{k}') LIMIT 1)"
        ),
        _ => format!(
            "UPDATE public.track SET album_id = {} WHERE track_id = {some_track}",
            1 + k % 340
        ),
    }
}

/// One session of the simulated Chinook application, until `stop`; the statements it ran.
pub async fn chinook_writer(
    url: String,
    seed: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    use std::sync::atomic::Ordering;
    let mut c = connect(&url).await;
    let mut i: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let sql = chinook_statement(i, seed * 100_000 + i);
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
            .execute(&mut c)
            .await
        {
            panic!("application write failed (sync must never fail it): {e}\n{sql}");
        }
    }
    i
}

/// Deviations collected through a test, so one run shows every one of them (each also printed).
#[derive(Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let w = what();
            eprintln!("PROBLEM: {w}");
            self.0.push(w);
        }
    }
    pub fn assert_none(self) {
        assert!(
            self.0.is_empty(),
            "{} problem(s):\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

/// Run `sql` on `c`, which must succeed within `limit` (an application statement that must not
/// wait on sync's account). Returns how long it took.
pub async fn must_not_wait(
    c: &mut sqlx::PgConnection,
    what: &str,
    sql: &str,
    limit: std::time::Duration,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    match tokio::time::timeout(
        limit,
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut *c),
    )
    .await
    {
        Ok(Ok(_)) => started.elapsed(),
        Ok(Err(e)) => panic!("{what}: the application's statement failed: {e}\n{sql}"),
        Err(_) => panic!(
            "{what}: the application's statement waited more than {:?}\n{sql}",
            started.elapsed()
        ),
    }
}

// Child processes and one-value queries, for the concurrency tests (review rounds, rules).

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn both(o: &Output) -> String {
    format!("exit {:?}\n{}{}", o.status.code(), stdout(o), stderr(o))
}

pub async fn count(c: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(c)
        .await
        .unwrap_or_else(|e| panic!("{e}\nin: {sql}"))
}

/// Rows of `migration` in the control table `bluegreen.<table>` (changes, sync_failures,
/// failed_changes, rederive).
pub async fn control_rows(c: &mut PgConnection, table: &str, migration: &str) -> i64 {
    count(
        c,
        &format!("SELECT count(*) FROM bluegreen.{table} WHERE migration = '{migration}'"),
    )
    .await
}

pub fn command(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("bluegreen"));
    cmd.current_dir(root())
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Wait for a child process, at most `limit` (then it is killed and the test fails).
pub async fn wait_child(child: Child, limit: Duration, what: String) -> Output {
    let pid = child.id();
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
    match tokio::time::timeout(limit, waited).await {
        Ok(out) => out.unwrap(),
        Err(_) => {
            // SAFETY: killing our own child process.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("`bluegreen {what}` (pid {pid}) did not finish within {limit:?}");
        }
    }
}

/// `bluegreen <args>`, which must finish within `limit`.
pub async fn run_within(url: &str, args: &[&str], limit: Duration) -> Output {
    let child = command(url, args).spawn().unwrap();
    wait_child(child, limit, args.join(" ")).await
}

/// Rows of `a` not in `b` plus rows of `b` not in `a`, as multisets, on `cols`.
pub async fn multiset_differ(c: &mut PgConnection, a: &str, b: &str, cols: &str) -> i64 {
    count(
        c,
        &format!(
            "SELECT (SELECT count(*) FROM (SELECT {cols} FROM {a} EXCEPT ALL SELECT {cols} FROM {b}) x)
                  + (SELECT count(*) FROM (SELECT {cols} FROM {b} EXCEPT ALL SELECT {cols} FROM {a}) y)"
        ),
    )
    .await
}

/// The `deadlock detected` lines the test cluster's log holds for database `db`.
pub fn deadlocks_logged(db: &str) -> Vec<String> {
    cluster()
        .log()
        .lines()
        .filter(|l| l.contains(&format!("db={db} ")) && l.contains("deadlock detected"))
        .map(String::from)
        .collect()
}

/// `bluegreen copy --follow -m mapping` in the background, its stderr to `log`; returns once the
/// migration is live (the follower running), failing if it exits first or takes over `limit`.
pub async fn start_follower(
    url: &str,
    mapping: &str,
    log: &Path,
    limit: Duration,
) -> std::process::Child {
    let mut f = std::process::Command::new(assert_cmd::cargo::cargo_bin("bluegreen"))
        .current_dir(root())
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .args(["copy", "--follow", "-m", mapping])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start copy --follow");
    let started = std::time::Instant::now();
    loop {
        let st = status_json(url, mapping).await;
        if st["phase"] == "live" {
            return f;
        }
        assert!(
            f.try_wait().unwrap().is_none(),
            "copy --follow exited before going live: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        assert!(started.elapsed() < limit, "not live after {limit:?}: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stop a follower started by [`start_follower`] (SIGTERM) and require a clean exit.
pub fn stop_follower(mut f: std::process::Child, log: &Path) {
    // SAFETY: a signal to our own child process.
    unsafe { libc::kill(f.id() as i32, libc::SIGTERM) };
    let status = f.wait().unwrap();
    assert!(
        status.success(),
        "the follower exited {status}: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}
