//! The randomized concurrency test: several sessions issue random single- and multi-row INSERT,
//! UPDATE (sync-key and join-column changes included) and DELETE statements, some touching a
//! parent and its children in one statement, an occasional TRUNCATE, in READ COMMITTED and in
//! REPEATABLE READ transactions, while `copy` runs, then live with a follower that is killed
//! (SIGKILL) and restarted; at the end the follower drains and the exact invariant is checked.
//!
//! Every session's statements come from one seed (printed; `BLUEGREEN_SEED=<n>` replays the
//! statement streams, `BLUEGREEN_SOAK_SECONDS=<s>` runs the live part that long: `scripts/soak`).
//! An application statement may fail for its own reasons (a unique key, a serialization failure
//! of its REPEATABLE READ transaction, a deadlock between its own sessions); one that fails inside
//! bluegreen's trigger functions fails the test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgDatabaseError;

use crate::support::{self, carbot_db, chinook_db, connect, run, status_json};

/// xorshift64*: small, seedable, the same on every machine.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The seed of a randomized test: `BLUEGREEN_SEED`, else from the clock (printed by the test).
pub fn seed() -> u64 {
    std::env::var("BLUEGREEN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                % 1_000_000_007
        })
}

/// How long a randomized test writes: `BLUEGREEN_SOAK_SECONDS`, else `default` (the CI run).
pub fn live_seconds(default: u64) -> u64 {
    std::env::var("BLUEGREEN_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One random CarBot statement (`k` makes the values unique per statement).
fn carbot_statement(r: &mut Rng, k: u64) -> String {
    let pick = |t: &str, col: &str, k: u64| {
        format!("(SELECT {col} FROM public.{t} ORDER BY md5({col}::text || '{k}') LIMIT 1)")
    };
    let lead = pick("leads", "id", k);
    let ws = pick("workshops", "id", k);
    let cust = pick("customers", "id", k);
    let status = ["new", "contacted", "qualified", "converted", "lost"][r.below(5) as usize];
    match r.below(20) {
        0 => format!(
            "INSERT INTO public.leads (id, workshop_id, kunde_id, name, email, status, priority, lead_score, fahrzeug, \"timestamp\")
             SELECT md5('lead:{k}')::uuid, {ws}, 'k{k}', 'Lead {k}', 'l{k}@example.org', '{status}', 'high', {}, 'VW Golf {k}', '2024-05-01' ON CONFLICT DO NOTHING",
            r.below(101)
        ),
        1 => format!("UPDATE public.leads SET status = '{status}', priority = NULL WHERE id = {lead}"),
        2 => format!("UPDATE public.leads SET id = md5('moved:{k}')::uuid WHERE id = {lead}"),
        3 => format!("DELETE FROM public.leads WHERE id = {lead}"),
        4 => format!("UPDATE public.leads SET deleted_at = CASE WHEN deleted_at IS NULL THEN '2024-07-01'::timestamptz END, fahrzeug = '' WHERE id = {lead}"),
        5 => format!("UPDATE public.leads SET workshop_id = {ws} WHERE id IN (SELECT id FROM public.leads ORDER BY md5(id::text || '{k}') LIMIT {})", 1 + r.below(20)),
        6 => format!("UPDATE public.workshops SET city = 'City {k}', name = 'Workshop {k}' WHERE id = {ws}"),
        7 => format!("UPDATE public.workshops SET owner_email = 'owner{}@example.org' WHERE id = {ws}", r.below(7)),
        8 => format!(
            "INSERT INTO public.workshops (id, owner_email, name, city, created_at) VALUES (md5('ws:{k}')::uuid, 'owner{}@example.org', 'New {k}', 'Berlin', '2024-01-02') ON CONFLICT DO NOTHING",
            r.below(9)
        ),
        9 => format!("UPDATE public.customers SET name = 'Anna{k} Maria Schmidt', workshop_id = {ws} WHERE id = {cust}"),
        10 => format!("INSERT INTO public.customers (id, workshop_id, name, email) SELECT md5('cust:{k}')::uuid, {ws}, 'Solo{k}', NULL ON CONFLICT DO NOTHING"),
        11 => format!(
            "INSERT INTO public.chat_messages (workshop_id, session_id, lead_id, sender, message, created_at)
             SELECT {ws}, coalesce((SELECT session_id FROM public.chat_messages ORDER BY md5(id::text || '{k}') LIMIT 1), 's{k}'), {}, 'user', 'hello {k}', '2024-03-03'",
            if r.chance(50) { lead.clone() } else { "NULL".into() }
        ),
        12 => format!("DELETE FROM public.chat_messages WHERE id IN (SELECT id FROM public.chat_messages ORDER BY md5(id::text || '{k}') LIMIT {})", 1 + r.below(5)),
        13 => format!("UPDATE public.leads SET lead_score = (coalesce(lead_score, 0) + 1) % 100 WHERE workshop_id = {ws}"),
        14 => format!("DELETE FROM public.customers WHERE id = {cust}"),
        // A parent and its children in one statement.
        15 => format!(
            "WITH w AS (DELETE FROM public.workshops WHERE id = (SELECT id FROM public.workshops WHERE name LIKE 'New %' ORDER BY md5(id::text || '{k}') LIMIT 1) RETURNING id),
                  c AS (DELETE FROM public.customers WHERE workshop_id IN (SELECT id FROM w))
             DELETE FROM public.leads WHERE workshop_id IN (SELECT id FROM w)"
        ),
        16 => format!(
            "WITH w AS (INSERT INTO public.workshops (id, owner_email, name, city) VALUES (md5('wsc:{k}')::uuid, 'owner{}@example.org', 'New {k}', 'Köln') ON CONFLICT DO NOTHING RETURNING id)
             INSERT INTO public.customers (id, workshop_id, name) SELECT md5('cc:{k}')::uuid, id, 'Kim {k} Lee' FROM w",
            r.below(9)
        ),
        17 => format!("UPDATE public.customers SET workshop_id = NULL WHERE id = {cust}"),
        18 => format!("UPDATE public.chat_messages SET session_id = 's{}' WHERE id IN (SELECT id FROM public.chat_messages ORDER BY md5(id::text || '{k}') LIMIT 3)", r.below(50)),
        _ => format!("UPDATE public.leads SET fahrzeug = 'Audi A{} (20{:02})' WHERE id = {lead}", r.below(8), r.below(25)),
    }
}

/// One random Chinook statement.
fn chinook_statement(r: &mut Rng, k: u64) -> String {
    let track = format!(
        "(SELECT track_id FROM public.track ORDER BY md5(track_id::text || '{k}') LIMIT 1)"
    );
    match r.below(14) {
        0 => format!(
            "UPDATE public.genre SET name = 'Genre {k}' WHERE genre_id = {}",
            1 + r.below(25)
        ),
        1 => format!(
            "UPDATE public.track SET genre_id = CASE WHEN genre_id IS NULL THEN {} ELSE NULL END WHERE track_id = {track}",
            1 + r.below(25)
        ),
        2 => format!(
            "UPDATE public.album SET artist_id = {} WHERE album_id = {}",
            1 + r.below(200),
            1 + r.below(340)
        ),
        3 => format!(
            "UPDATE public.playlist_track SET track_id = {track} WHERE (playlist_id, track_id) = (SELECT playlist_id, track_id FROM public.playlist_track ORDER BY md5(playlist_id::text || track_id::text || '{k}') LIMIT 1)"
        ),
        4 => format!(
            "INSERT INTO public.track (track_id, name, album_id, media_type_id, genre_id, milliseconds, unit_price) VALUES ({}, 'New {k}', {}, 1, {}, {}, 0.99) ON CONFLICT DO NOTHING",
            100_000 + k,
            1 + r.below(340),
            if r.chance(30) { "NULL".to_string() } else { (1 + r.below(25)).to_string() },
            100_000 + r.below(500_000)
        ),
        5 => format!("DELETE FROM public.playlist_track WHERE track_id = {track}"),
        6 => format!(
            "UPDATE public.track SET milliseconds = milliseconds + 1000, unit_price = unit_price + 0.01 WHERE album_id = {}",
            1 + r.below(340)
        ),
        7 => format!(
            "INSERT INTO public.playlist_track (playlist_id, track_id) SELECT {}, {track} ON CONFLICT DO NOTHING",
            1 + r.below(18)
        ),
        8 => format!(
            "DELETE FROM public.track WHERE track_id = (SELECT track_id FROM public.track t WHERE NOT EXISTS (SELECT 1 FROM public.invoice_line l WHERE l.track_id = t.track_id) AND NOT EXISTS (SELECT 1 FROM public.playlist_track p WHERE p.track_id = t.track_id) ORDER BY md5(track_id::text || '{k}') LIMIT 1)"
        ),
        9 => format!(
            "UPDATE public.track SET album_id = {} WHERE track_id = {track}",
            1 + r.below(340)
        ),
        // A parent and its children in one statement.
        10 => format!(
            "WITH p AS (DELETE FROM public.playlist_track WHERE track_id = (SELECT track_id FROM public.track WHERE track_id >= 100000 ORDER BY md5(track_id::text || '{k}') LIMIT 1) RETURNING track_id)
             DELETE FROM public.track WHERE track_id IN (SELECT track_id FROM p) AND NOT EXISTS (SELECT 1 FROM public.invoice_line l WHERE l.track_id = track.track_id)"
        ),
        11 => format!(
            "UPDATE public.track SET genre_id = {} WHERE genre_id = {}",
            1 + r.below(25),
            1 + r.below(25)
        ),
        12 => format!(
            "INSERT INTO public.playlist_track (playlist_id, track_id) SELECT {}, track_id FROM public.track ORDER BY md5(track_id::text || '{k}') LIMIT {} ON CONFLICT DO NOTHING",
            1 + r.below(18),
            1 + r.below(30)
        ),
        _ => format!(
            "UPDATE public.album SET title = 'Album {k}' WHERE album_id = {}",
            1 + r.below(340)
        ),
    }
}

/// Whether a failed application statement failed inside bluegreen (its trigger functions or
/// tables), which sync must never cause.
fn failed_in_sync(e: &sqlx::Error) -> bool {
    let Some(pg) = e
        .as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
    else {
        return false;
    };
    let ctx = pg.r#where().unwrap_or("");
    ctx.contains("bluegreen") || pg.message().contains("bluegreen")
}

#[derive(Default)]
struct Tally {
    statements: AtomicU64,
    own_errors: AtomicU64,
}

/// A session running random statements until `stop`: autocommit mostly, sometimes a REPEATABLE
/// READ or READ COMMITTED transaction of two or three statements. Panics (failing the test) on
/// an error raised inside sync.
async fn session(
    url: String,
    seed: u64,
    id: u64,
    statement: fn(&mut Rng, u64) -> String,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let mut c = connect(&url).await;
    let mut r = Rng::new(seed ^ (id + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let k = id * 10_000_000 + n;
        let tx = match r.below(10) {
            0 | 1 => Some("BEGIN ISOLATION LEVEL REPEATABLE READ"),
            2 => Some("BEGIN"),
            _ => None,
        };
        let count = if tx.is_some() { 2 + r.below(2) } else { 1 };
        let stmts: Vec<String> = (0..count).map(|j| statement(&mut r, k * 4 + j)).collect();
        let text = match tx {
            Some(b) => format!("{b}; {}; COMMIT", stmts.join("; ")),
            None => stmts[0].clone(),
        };
        tally.statements.fetch_add(count, Ordering::Relaxed);
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(text.clone()))
            .execute(&mut c)
            .await
        {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut c).await;
            assert!(
                !failed_in_sync(&e),
                "seed {seed}: an application statement failed inside sync: {e}\n{text}"
            );
            tally.own_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn follower(url: &str, mapping: &str) -> std::process::Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("bluegreen"))
        .current_dir(support::root())
        .env("DATABASE_URL", url)
        .args(["sync", "--follow", "-m", mapping])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the follower")
}

fn terminate(mut child: std::process::Child) -> std::process::ExitStatus {
    // SAFETY: a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().expect("follower exits")
}

/// Wait until nothing is pending (change log, full re-derives) and no key is failed (a parent
/// met "not yet" across batches is retried once the log is drained); the time it took.
pub async fn wait_drained(url: &str, mapping: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let st = status_json(url, mapping).await;
        if st["backlog"] == 0
            && st["failures_total"] == 0
            && st["rederive"].as_array().is_some_and(|a| a.is_empty())
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "the follower did not drain the change log within {limit:?}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scenario(
    url: String,
    mapping: &str,
    statement: fn(&mut Rng, u64) -> String,
    truncate: &str,
) {
    let seed = seed();
    eprintln!("random: {mapping} with seed {seed} (replay: BLUEGREEN_SEED={seed})");
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let sessions: Vec<_> = (0..3)
        .map(|id| {
            tokio::spawn(session(
                url.clone(),
                seed,
                id,
                statement,
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = run(
        &url,
        &["copy", "-m", mapping, "--jobs", "2", "--chunk-rows", "500"],
    )
    .await;
    assert!(
        out.status.success(),
        "seed {seed}: copy failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.contains("chunks on") && !l.contains("capturing"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let live = live_seconds(4);
    let mut f = follower(&url, mapping);
    tokio::time::sleep(Duration::from_secs(live / 2 + 1)).await;
    // Killed mid-batch: its claims roll back with its connection; a new one takes over.
    f.kill().unwrap();
    f.wait().unwrap();
    let mut c = connect(&url).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(truncate.to_string()))
        .execute(&mut c)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: {truncate}: {e}"));
    let f = follower(&url, mapping);
    tokio::time::sleep(Duration::from_secs(live / 2 + 1)).await;
    stop.store(true, Ordering::Relaxed);
    for s in sessions {
        s.await
            .unwrap_or_else(|e| panic!("seed {seed}: a session panicked: {e}"));
    }
    let took = wait_drained(&url, mapping, Duration::from_secs(60)).await;
    let status = terminate(f);
    assert!(
        status.success(),
        "seed {seed}: the follower exited {status}"
    );
    eprintln!(
        "random: {} statements ({} failed for their own reasons); drained {:?} after the writers stopped",
        tally.statements.load(Ordering::Relaxed),
        tally.own_errors.load(Ordering::Relaxed),
        took
    );
    let st = status_json(&url, mapping).await;
    assert_eq!(st["failures_total"], 0, "seed {seed}: {st}");
    assert_eq!(st["failed_changes"], 0, "seed {seed}: {st}");
    // The killed follower's row stays, as gone; the stopped one left.
    assert!(
        st["followers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["alive"] == false),
        "seed {seed}: a stopped follower stays registered alive: {st}"
    );
    assert!(
        st["followers"].as_array().unwrap().len() <= 1,
        "seed {seed}: the stopped follower did not leave: {st}"
    );
    let v = support::invariant_violations(&url, mapping).await;
    if !v.is_empty() {
        let out = run(
            &url,
            &[
                "validate",
                "-m",
                mapping,
                "--show-values",
                "--max-diffs",
                "20",
                "--format",
                "json",
            ],
        )
        .await;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        panic!(
            "seed {seed}: green != M(blue): {v:?}\ndifferences: {}",
            report["differences"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_writes_on_carbot_through_copy_and_a_restarted_follower() {
    let url = carbot_db("random_carbot").await;
    scenario(
        url,
        "mappings/carbot.yaml",
        carbot_statement,
        "TRUNCATE public.chat_messages",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_writes_on_chinook_through_copy_and_a_restarted_follower() {
    let url = chinook_db("random_chinook").await;
    scenario(
        url,
        "mappings/chinook.yaml",
        chinook_statement,
        "TRUNCATE public.playlist_track",
    )
    .await;
}
