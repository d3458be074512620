//! Scenario tests on real data (Chinook): every shape of DESIGN.md's "Finding the sync keys a
//! change touches" under a concurrent writer, ending with the invariant.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{assert_invariant, bluegreen, chinook_db, chinook_writer, connect, exec};

const MAPPING: &str = "mappings/chinook.yaml";

async fn run(url: &str, args: &[&str]) -> std::process::Output {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || bluegreen(&url).args(&args).output().unwrap())
        .await
        .unwrap()
}

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
    let st = run(&url, &["status", "-m", MAPPING, "--format", "json"]).await;
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(st["failures"].as_array().unwrap().len(), 0, "{st}");
}
