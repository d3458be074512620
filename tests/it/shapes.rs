//! Scenario tests on real data (Chinook): every shape of DESIGN.md's "Finding the sync keys a
//! change touches" under a concurrent writer, ending with the invariant.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{assert_invariant, chinook_db, chinook_writer, connect, exec, run};

const MAPPING: &str = "mappings/chinook.yaml";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chinook_shapes_under_concurrent_writes() {
    let url = chinook_db("shapes").await;
    let out = run(&url, &["plan", "-m", MAPPING]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(chinook_writer(url.clone(), 1, stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = run(
        &url,
        &["copy", "-m", MAPPING, "--jobs", "3", "--chunk-rows", "400"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Live, still writing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(writes > 50, "writer ran {writes} statements only");
    assert_invariant(&url, MAPPING).await;

    // The NULL group exists and is maintained; a renamed lookup row reaches every track.
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "UPDATE public.track SET genre_id = NULL WHERE track_id IN (1, 2, 3)",
    )
    .await;
    exec(
        &mut c,
        "UPDATE public.genre SET name = 'Renamed Rock' WHERE genre_id = 1",
    )
    .await;
    // These entries are kept by the follower: they converge once it applied the changes.
    crate::support::drain(&url, MAPPING).await;
    let nulls: i32 =
        sqlx::query_scalar("SELECT tracks FROM chinook_v2.genre_counts WHERE genre_id IS NULL")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert!(nulls >= 3);
    let renamed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM chinook_v2.tracks WHERE genre = 'Renamed Rock'")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert!(renamed > 0);
    assert_invariant(&url, MAPPING).await;
    let st = crate::support::status_json(&url, MAPPING).await;
    assert_eq!(st["failures"].as_array().unwrap().len(), 0, "{st}");
}

/// Two writers meeting in one green row through different blue tables: a track moved to genre 5
/// (not committed yet) while genre 5 is renamed. Neither waits for the other on sync's account
/// (the entry is the follower's: the writers only log their rows); the follower re-derives from
/// committed blue after both committed: green shows the new name for the moved track.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_meeting_through_a_join_are_serialised() {
    let url = chinook_db("shapes_race").await;
    crate::support::copy_ok(&url, MAPPING).await;
    let mut t1 = connect(&url).await;
    exec(
        &mut t1,
        "BEGIN; UPDATE public.track SET genre_id = 5 WHERE track_id = 1",
    )
    .await;
    let url2 = url.clone();
    let t2 = tokio::spawn(async move {
        let mut c = connect(&url2).await;
        exec(
            &mut c,
            "UPDATE public.genre SET name = 'Renamed while moving' WHERE genre_id = 5",
        )
        .await;
    });
    // The rename commits while the move is still open: it must not wait for it.
    tokio::time::timeout(Duration::from_secs(10), t2)
        .await
        .expect("the rename waited for the move")
        .unwrap();
    exec(&mut t1, "COMMIT").await;
    crate::support::drain(&url, MAPPING).await;
    let mut c = connect(&url).await;
    let genre: String = sqlx::query_scalar("SELECT genre FROM chinook_v2.tracks WHERE id = 1")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(genre, "Renamed while moving");
    assert_invariant(&url, MAPPING).await;
}

/// An application role with rights on its own tables only: the sync functions run as their
/// owner (SECURITY DEFINER), so its writes neither fail nor lose their green rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_role_without_rights_on_green_writes_through_sync() {
    let url = chinook_db("shapes_role").await;
    crate::support::copy_ok(&url, MAPPING).await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "DROP ROLE IF EXISTS chinook_app; CREATE ROLE chinook_app LOGIN PASSWORD 'app-pw';
         GRANT USAGE ON SCHEMA public TO chinook_app;
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO chinook_app",
    )
    .await;
    let app_url =
        crate::support::cluster().url_with_password("shapes_role", "chinook_app", "app-pw");
    let mut app = connect(&app_url).await;
    exec(
        &mut app,
        "UPDATE public.genre SET name = 'Written by the app' WHERE genre_id = 2",
    )
    .await;
    exec(&mut app, "DELETE FROM public.playlist_track WHERE playlist_id = 1 AND track_id IN (SELECT track_id FROM public.playlist_track WHERE playlist_id = 1 LIMIT 3)").await;
    assert_invariant(&url, MAPPING).await;
}

/// A writer in REPEATABLE READ cannot re-derive with a fresh snapshot: its change goes to the
/// change log (the write succeeds), `status` shows the backlog, `sync` re-derives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeatable_read_writers_are_deferred_to_sync() {
    let url = chinook_db("shapes_rr").await;
    crate::support::copy_ok(&url, MAPPING).await;
    let mut c = connect(&url).await;
    exec(&mut c, "BEGIN ISOLATION LEVEL REPEATABLE READ; UPDATE public.track SET genre_id = NULL WHERE track_id = 7; COMMIT").await;
    let st = crate::support::status_json(&url, MAPPING).await;
    assert!(st["backlog"].as_i64().unwrap() > 0, "{st}");
    let out = run(&url, &["sync", "-m", MAPPING]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_invariant(&url, MAPPING).await;
}
