//! The worked examples of the seeds (examples/foodcrm, seed 000; examples/uuids, seed 004), each
//! run the way its runbook says: `plan` (no error, no unindexed sync key), `copy --follow`, then,
//! while an old application session keeps writing blue through everything, `validate`,
//! `cutover`, new sessions writing green, `validate` after the flip, `rollback`, and a last
//! `validate` with the example's checks file. It ends on the invariant checked exactly (green =
//! M(blue) as multisets, every entry) and on both writers' ledgers: every row the new sessions
//! inserted on green is in blue after the rollback, every row the old session inserted on blue is
//! in green.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgDatabaseError;
use sqlx::{Connection, PgConnection};

use crate::random::wait_drained;
use crate::support::{
    self, assert_invariant, both, connect, count, empty_db, exec, run_within, status_json,
};

const LIMIT: Duration = Duration::from_secs(90);

struct Example {
    db: &'static str,
    dir: &'static str,
    /// `SET ...` sizing the generator.
    knob: &'static str,
    mapping: &'static str,
    green: &'static str,
    /// The i-th statement of the old application session (on blue, schema-qualified); `true`
    /// when it inserts one row of the ledger.
    blue_write: fn(u64) -> (String, bool),
    /// The i-th statement of a new session (unqualified: `search_path` picks green).
    green_write: fn(u64) -> (String, bool),
    /// Ledger rows the old session inserted, counted in green.
    blue_ledger_in_green: &'static str,
    /// Ledger rows the new sessions inserted, counted in blue.
    green_ledger_in_blue: &'static str,
}

fn foodcrm_blue(i: u64) -> (String, bool) {
    let r = 1 + i % 400;
    let l = 1 + (i * 7) % 1200;
    let stages = ["neu", "kontaktiert", "muster", "gewonnen", "verloren"];
    match i % 7 {
        0 => (
            format!(
                "INSERT INTO public.gdpr_log (restaurant_id, action, actor, at, detail) VALUES ({r}, 'access', 'blue-writer', '2025-01-01', jsonb_build_object('n', {i}))"
            ),
            true,
        ),
        1 => (
            format!(
                "UPDATE public.leads SET stage = '{}', value_net = value_net + 1, updated_at = '2025-02-01' WHERE id = {l}",
                stages[(i % 5) as usize]
            ),
            false,
        ),
        2 => (
            format!(
                "UPDATE public.restaurants SET chef_name = 'Chef {i}', buyer_name = CASE WHEN {i} % 2 = 0 THEN NULL ELSE 'Buyer {i}' END WHERE id = {r}"
            ),
            false,
        ),
        3 => (
            format!(
                "INSERT INTO public.leads (restaurant_id, owner_email, stage, season, value_net) VALUES ({r}, 'rep2@freshfoodz.example', 'neu', 'spargel', 12.50)"
            ),
            false,
        ),
        4 => (
            "DELETE FROM public.leads WHERE id = (SELECT min(id) FROM public.leads WHERE owner_email = 'rep2@freshfoodz.example' AND season = 'spargel' AND value_net = 12.50)".to_string(),
            false,
        ),
        5 => (
            format!(
                "UPDATE public.restaurants SET country = CASE WHEN country IN ('DE', 'Deutschland') THEN 'Schweiz' ELSE 'DE' END WHERE id = {r}"
            ),
            false,
        ),
        _ => (
            format!("UPDATE public.contact_roles SET label = 'Einkauf {}' WHERE code = 'BUYER'", i % 3),
            false,
        ),
    }
}

fn foodcrm_green(i: u64) -> (String, bool) {
    let r = 1 + (i * 3) % 400;
    let l = 1 + (i * 11) % 1200;
    match i % 4 {
        0 => (
            format!(
                "INSERT INTO gdpr_audit (restaurant_id, action, actor, occurred_at, detail) VALUES ({r}, 'export', 'green-writer', '2025-03-01', jsonb_build_object('n', {i}))"
            ),
            true,
        ),
        1 => (
            format!(
                "UPDATE leads SET stage = 'won', net_amount = net_amount + 2, gross_amount = round((net_amount + 2) * (1 + vat_rate), 2), updated_at = '2025-03-02' WHERE id = {l}"
            ),
            false,
        ),
        2 => (
            format!("UPDATE restaurants SET name = 'Green {i}' WHERE id = {r}"),
            false,
        ),
        _ => (
            format!(
                "INSERT INTO leads (restaurant_id, owner_email, stage, territory, currency, vat_rate, net_amount, gross_amount, created_at)
                 SELECT r.id, 'rep3@freshfoodz.example', 'new', r.territory, CASE r.territory WHEN 'CH' THEN 'CHF' ELSE 'EUR' END, v, 20, round(20 * (1 + v), 2), '2025-03-01'
                 FROM restaurants r, LATERAL (SELECT CASE r.territory WHEN 'CH' THEN 0.081 ELSE 0.190 END AS v) x WHERE r.id = {r}"
            ),
            false,
        ),
    }
}

fn uuids_blue(i: u64) -> (String, bool) {
    let pick =
        |t: &str, n: u64| format!("(SELECT id FROM public.\"{t}\" ORDER BY id OFFSET {n} LIMIT 1)");
    let roles = ["ADMIN", "MODEL", "CLIENT", "AGENCY"];
    match i % 6 {
        0 => (
            format!(
                "INSERT INTO public.\"User\" (id, \"accountId\", email, \"lastName\", role, \"createdAt\") SELECT md5('blue-user:{i}')::uuid::text, {}, 'blue-{i}@example.org', 'Blue', 'MODEL', '2025-01-01'",
                pick("Account", i % 300)
            ),
            true,
        ),
        1 => (
            format!(
                "UPDATE public.\"User\" SET role = '{}', \"firstName\" = 'F{i}' WHERE id = {}",
                roles[(i % 4) as usize],
                pick("User", (i * 7) % 1200)
            ),
            false,
        ),
        2 => (
            format!(
                "UPDATE public.\"Media\" SET \"sizeBytes\" = \"sizeBytes\" + 1 WHERE id = {}",
                pick("Media", (i * 13) % 2400)
            ),
            false,
        ),
        3 => (
            format!(
                "UPDATE public.\"Account\" SET name = 'Agency {i}', \"isActive\" = NOT \"isActive\" WHERE id = {}",
                pick("Account", (i * 3) % 300)
            ),
            false,
        ),
        4 => (
            format!(
                "INSERT INTO public.\"Media\" (id, \"userId\", url, \"mimeType\", \"sizeBytes\", \"createdAt\") SELECT md5('blue-media:{i}')::uuid::text, {}, 'https://x.example/{i}', 'image/png', 5, '2025-01-01'",
                pick("User", (i * 5) % 1200)
            ),
            false,
        ),
        _ => (
            "DELETE FROM public.\"Media\" WHERE id = (SELECT min(id) FROM public.\"Media\" WHERE url LIKE 'https://x.example/%')".to_string(),
            false,
        ),
    }
}

fn uuids_green(i: u64) -> (String, bool) {
    let pick = |t: &str, n: u64| format!("(SELECT id FROM {t} ORDER BY id OFFSET {n} LIMIT 1)");
    match i % 4 {
        0 => (
            format!(
                "INSERT INTO users (id, account_id, email, last_name, role, created_at) SELECT md5('green-user:{i}')::uuid, {}, 'green-{i}@example.org', 'Green', 'talent', '2025-02-01'",
                pick("accounts", i % 300)
            ),
            true,
        ),
        1 => (
            format!(
                "UPDATE users SET role = 'agency_admin', first_name = 'G{i}' WHERE id = {}",
                pick("users", (i * 11) % 1200)
            ),
            false,
        ),
        2 => (
            format!(
                "UPDATE media SET size_bytes = size_bytes + 10 WHERE id = {}",
                pick("media", (i * 17) % 2400)
            ),
            false,
        ),
        _ => (
            format!(
                "INSERT INTO media (id, user_id, url, mime_type, size_bytes, created_at) SELECT md5('green-media:{i}')::uuid, {}, 'https://g.example/{i}', 'image/webp', 7, '2025-02-01'",
                pick("users", (i * 3) % 1200)
            ),
            false,
        ),
    }
}

const FOODCRM: Example = Example {
    db: "ex_foodcrm",
    dir: "examples/foodcrm",
    knob: "SET foodcrm.restaurants = '400';",
    mapping: "mappings/foodcrm.yaml",
    green: "crm_v2",
    blue_write: foodcrm_blue,
    green_write: foodcrm_green,
    blue_ledger_in_green: "SELECT count(*) FROM crm_v2.gdpr_audit WHERE actor = 'blue-writer'",
    green_ledger_in_blue: "SELECT count(*) FROM public.gdpr_log WHERE actor = 'green-writer'",
};

const UUIDS: Example = Example {
    db: "ex_uuids",
    dir: "examples/uuids",
    knob: "SET uuids.accounts = '300';",
    mapping: "mappings/uuids.yaml",
    green: "app_v2",
    blue_write: uuids_blue,
    green_write: uuids_green,
    blue_ledger_in_green: "SELECT count(*) FROM app_v2.users WHERE email LIKE 'blue-%'",
    green_ledger_in_blue: "SELECT count(*) FROM public.\"User\" WHERE email LIKE 'green-%'",
};

/// What a writer did.
#[derive(Default)]
struct Tally {
    statements: AtomicU64,
    ledger: AtomicU64,
    retried: AtomicU64,
}

fn sqlstate(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()
        .and_then(|d| d.try_downcast_ref::<PgDatabaseError>())
        .map(|p| p.code().to_string())
}

/// Run one statement until it commits; 40001 (an old session giving way to a new one through
/// sync, the one sanctioned error) is retried, anything else fails the test.
async fn commit(c: &mut PgConnection, sql: &str, tally: &Tally, who: &str) {
    for _ in 0..200 {
        match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut *c)
            .await
        {
            Ok(_) => return,
            Err(e) if sqlstate(&e).as_deref() == Some("40001") => {
                tally.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("{who}: application write failed: {e}\n{sql}"),
        }
    }
    panic!("{who}: 40001 two hundred times in a row: {sql}");
}

/// The old application: one connection opened before the cutover, kept through every flip.
async fn old_session(url: String, ex: &'static Example, stop: Arc<AtomicBool>, t: Arc<Tally>) {
    let mut c = connect(&url).await;
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (sql, ledger) = (ex.blue_write)(i);
        commit(&mut c, &sql, &t, "the old session").await;
        t.statements.fetch_add(1, Ordering::Relaxed);
        if ledger {
            t.ledger.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The new application: a connection per statement, on green (the cutover's search_path).
async fn new_sessions(url: String, ex: &'static Example, stop: Arc<AtomicBool>, t: Arc<Tally>) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let mut c = PgConnection::connect(&url).await.expect("connect");
        let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(&mut c)
            .await
            .unwrap();
        assert_eq!(schema, ex.green, "a new session after the cutover");
        let (sql, ledger) = (ex.green_write)(i);
        commit(&mut c, &sql, &t, "a new session").await;
        let _ = c.close().await;
        t.statements.fetch_add(1, Ordering::Relaxed);
        if ledger {
            t.ledger.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn ok(url: &str, args: &[&str]) -> String {
    let out = run_within(url, args, LIMIT).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "bluegreen {}: {}",
        args.join(" "),
        both(&out)
    );
    support::stdout(&out)
}

/// A new database `db` holding the example in `dir`: its legacy schema, then its generator sized
/// by `knob` (a `SET`).
async fn load_example(db: &str, dir: &str, knob: &str) -> (String, PgConnection) {
    let url = empty_db(db).await;
    let mut c = connect(&url).await;
    let dir = support::root().join(dir);
    exec(
        &mut c,
        &std::fs::read_to_string(dir.join("legacy.sql")).unwrap(),
    )
    .await;
    if !knob.is_empty() {
        let generate = std::fs::read_to_string(dir.join("generate.sql")).unwrap();
        exec(&mut c, &format!("{knob}\n{generate}")).await;
    }
    (url, c)
}

async fn scenario(ex: &'static Example) {
    let (url, mut c) = load_example(ex.db, ex.dir, ex.knob).await;

    let plan = ok(&url, &["plan", "-m", ex.mapping]).await;
    assert!(plan.contains("plan OK"), "{plan}");
    let out = run_within(&url, &["plan", "-m", ex.mapping], LIMIT).await;
    let diagnostics = support::stderr(&out) + &support::stdout(&out);
    assert!(
        !diagnostics.contains("sync-key-not-indexed") && !diagnostics.contains("error["),
        "{diagnostics}"
    );

    let log = std::env::temp_dir().join(format!("{}-follower.log", ex.db));
    let follower = support::start_follower(&url, ex.mapping, &log, LIMIT).await;

    let stop_old = Arc::new(AtomicBool::new(false));
    let old = Arc::new(Tally::default());
    let old_task = tokio::spawn(old_session(url.clone(), ex, stop_old.clone(), old.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;

    ok(&url, &["validate", "-m", ex.mapping]).await;
    let cut = ok(
        &url,
        &[
            "cutover",
            "-m",
            ex.mapping,
            "--yes",
            "--accept-lossy-rollback",
        ],
    )
    .await;
    assert!(cut.contains("blocked"), "{cut}");

    let stop_new = Arc::new(AtomicBool::new(false));
    let new = Arc::new(Tally::default());
    let new_task = tokio::spawn(new_sessions(url.clone(), ex, stop_new.clone(), new.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = ok(&url, &["validate", "-m", ex.mapping]).await;
    assert!(after.contains("PASS"), "{after}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_new.store(true, Ordering::Relaxed);
    new_task.await.unwrap();

    ok(&url, &["rollback", "-m", ex.mapping, "--yes"]).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop_old.store(true, Ordering::Relaxed);
    old_task.await.unwrap();

    wait_drained(&url, ex.mapping, LIMIT).await;
    support::stop_follower(follower, &log);
    let st = status_json(&url, ex.mapping).await;
    assert_eq!(st["phase"], "rolled_back", "{st}");
    assert_eq!(st["failures_total"], 0, "{st}");
    assert_eq!(st["reverse_failures"], 0, "{st}");

    // The checks file runs here too: a failing check fails validate.
    let report = std::env::temp_dir().join(format!("{}-report", ex.db));
    let last = ok(
        &url,
        &[
            "validate",
            "-m",
            ex.mapping,
            "--report",
            report.to_str().unwrap(),
        ],
    )
    .await;
    assert!(last.contains("PASS"), "{last}");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    let checks = json["checks"].as_array().expect("checks in the report");
    assert!(!checks.is_empty(), "{json:#}");
    assert_invariant(&url, ex.mapping).await;

    let (old_n, new_n) = (
        old.ledger.load(Ordering::Relaxed),
        new.ledger.load(Ordering::Relaxed),
    );
    eprintln!(
        "{}: old session {} statements ({} ledger rows, {} retried after 40001), new sessions {} statements ({} ledger rows, {} retried)",
        ex.db,
        old.statements.load(Ordering::Relaxed),
        old_n,
        old.retried.load(Ordering::Relaxed),
        new.statements.load(Ordering::Relaxed),
        new_n,
        new.retried.load(Ordering::Relaxed),
    );
    assert!(
        old_n > 0 && new_n > 0,
        "both applications wrote ledger rows"
    );
    assert_eq!(
        count(&mut c, ex.blue_ledger_in_green).await as u64,
        old_n,
        "every row the old session inserted on blue is in green"
    );
    assert_eq!(
        count(&mut c, ex.green_ledger_in_blue).await as u64,
        new_n,
        "every row the new sessions inserted on green is in blue after the rollback"
    );
    let deadlocks = support::deadlocks_logged(ex.db);
    assert!(deadlocks.is_empty(), "{deadlocks:#?}");
    let _ = std::fs::remove_dir_all(&report);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foodcrm_seed_000_through_copy_cutover_and_rollback_under_writers() {
    scenario(&FOODCRM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uuids_seed_004_through_copy_cutover_and_rollback_under_writers() {
    scenario(&UUIDS).await;
}

/// The uuid example's expression indexes are what backs its sync keys: without one, `plan`
/// warns again (`probe` compares the key and the index as PostgreSQL deparses both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expression_index_backs_a_cast_sync_key() {
    let (url, mut c) = load_example("ex_uuids_index", UUIDS.dir, "").await;
    exec(&mut c, "DROP INDEX \"User_id_uuid_idx\"").await;
    // An index on another expression of the same column does not count.
    exec(
        &mut c,
        "CREATE INDEX \"User_id_lower_idx\" ON \"User\" (lower(id))",
    )
    .await;
    let out = run_within(&url, &["plan", "-m", "mappings/uuids.yaml"], LIMIT).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    let text = both(&out);
    let warned: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sync-key-not-indexed"))
        .collect();
    assert_eq!(warned.len(), 1, "{text}");
    assert!(warned[0].contains("table users"), "{text}");
}

/// Hostile review of the uuid example: green's key is the uuid of blue's text id, and the reverse
/// casts it back to the lower-case text; a blue row keyed `'BBBB...'` was reachable from blue but
/// from green never again (green updates and deletes of it silently missed blue). The cutover now
/// refuses while blue holds such keys, and after it an old session's write of one is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_keys_green_could_not_write_back_are_refused() {
    let (url, mut c) = load_example("ex_uuids_case", UUIDS.dir, "SET uuids.accounts = '20';").await;
    support::copy_ok(&url, UUIDS.mapping).await;
    ok(&url, &["validate", "-m", UUIDS.mapping]).await;
    let upper = "BBBBBBBB-0000-4000-8000-000000000002";
    exec(
        &mut c,
        &format!(
            "INSERT INTO public.\"User\" (id, \"accountId\", email, role, \"createdAt\") SELECT '{upper}', min(id), 'upper@example.org', 'MODEL', '2025-01-01' FROM public.\"Account\""
        ),
    )
    .await;
    let cut = [
        "cutover",
        "-m",
        UUIDS.mapping,
        "--yes",
        "--accept-lossy-rollback",
    ];
    let out = run_within(&url, &cut, LIMIT).await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(
        both(&out).contains("do not come back from green") && both(&out).contains(upper),
        "{}",
        both(&out)
    );
    assert_eq!(
        status_json(&url, UUIDS.mapping).await["phase"],
        "live",
        "a refused cutover changes nothing"
    );
    exec(
        &mut c,
        &format!("UPDATE public.\"User\" SET id = lower(id) WHERE id = '{upper}'"),
    )
    .await;
    support::drain(&url, UUIDS.mapping).await;
    ok(&url, &["validate", "-m", UUIDS.mapping]).await;
    let mut old = connect(&url).await;
    ok(&url, &cut).await;
    let e = sqlx::raw_sql(sqlx::AssertSqlSafe(
        "INSERT INTO public.\"User\" (id, \"accountId\", email, role, \"createdAt\") SELECT 'CCCCCCCC-0000-4000-8000-000000000003', min(id), 'c@example.org', 'MODEL', '2025-01-01' FROM public.\"Account\"".to_string(),
    ))
    .execute(&mut old)
    .await
    .expect_err("an old session's key green could not write back")
    .to_string();
    assert!(e.contains("not in the form green gives back"), "{e}");
    exec(
        &mut old,
        "INSERT INTO public.\"User\" (id, \"accountId\", email, role, \"createdAt\") SELECT 'cccccccc-0000-4000-8000-000000000003', min(id), 'c@example.org', 'MODEL', '2025-01-01' FROM public.\"Account\"",
    )
    .await;
    let mut green = connect(&url).await;
    exec(
        &mut green,
        "UPDATE users SET first_name = 'Green' WHERE email IN ('upper@example.org', 'c@example.org')",
    )
    .await;
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM public.\"User\" WHERE \"firstName\" = 'Green'"
        )
        .await,
        2,
        "both green writes reached blue"
    );
    support::drain(&url, UUIDS.mapping).await;
    assert_invariant(&url, UUIDS.mapping).await;
    ok(&url, &["validate", "-m", UUIDS.mapping]).await;
}
