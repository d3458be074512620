//! `validate` against a real PostgreSQL: passes under concurrent writes, finds and locates every
//! kind of planted difference, is blind to session settings, and writes a report that parses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::{carbot_db, carbot_writer, connect, empty_db, exec, run};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_passes_repeatedly_under_concurrent_writes() {
    let url = carbot_db("validate_live").await;
    crate::support::copy_ok(&url, "mappings/carbot.yaml").await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(carbot_writer(url.clone(), 7, stop.clone()));
    for _ in 0..3 {
        let out = run(
            &url,
            &[
                "validate",
                "-m",
                "mappings/carbot.yaml",
                "--jobs",
                "3",
                "--chunk-rows",
                "500",
            ],
        )
        .await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("PASS"));
    }
    stop.store(true, Ordering::Relaxed);
    assert!(w.await.unwrap() > 10);
}

const TYPES: &str = "tests/fixtures/types.yaml";

async fn types_db(name: &str) -> String {
    let url = empty_db(name).await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE items (id integer PRIMARY KEY, label text, amount numeric, at timestamptz, doc json);
         INSERT INTO items SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'item ' || g END, g / 2.0 + 1,
                '2024-01-01 10:00:00.123456+00'::timestamptz + g * interval '1 hour', json_build_object('a', g, 'b', g * 2)
         FROM generate_series(1, 100) g;
         CREATE TABLE tags (id integer PRIMARY KEY, code text NOT NULL, n integer NOT NULL);
         INSERT INTO tags SELECT g, 'Tag' || g, g FROM generate_series(1, 20) g;",
    )
    .await;
    crate::support::copy_ok(&url, TYPES).await;
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_differences_are_found_and_located() {
    let url = types_db("validate_planted").await;
    let out = run(&url, &["validate", "-m", TYPES, "--chunk-rows", "10"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let mut c = connect(&url).await;
    exec(
        &mut c,
        "UPDATE types_v2.items SET label = 'Sensitive-Value-42' WHERE id = 3; -- a changed value
         DELETE FROM types_v2.items WHERE id = 4;                           -- a missing row
         INSERT INTO types_v2.items (id, label) VALUES (1000, 'extra');     -- an extra row
         UPDATE types_v2.items SET label = '' WHERE id = 10;                -- NULL in blue, '' in green
         UPDATE types_v2.items SET amount = 3.50, amount2 = 3.50 WHERE id = 5; -- 3.5 in blue: numeric keeps the scale, numeric(10,2) does not
         UPDATE types_v2.items SET at = at + interval '1 microsecond', at0 = at0 WHERE id = 6; -- precision: only at sees it
         UPDATE types_v2.items SET doc = '{\"b\": 14, \"a\": 7}', docb = '{\"b\": 14, \"a\": 7}' WHERE id = 7; -- key order: json sees it, jsonb does not
         UPDATE types_v2.items SET id = 500 WHERE id = 8;                   -- a row moved to another chunk
        ",
    )
    .await;
    // A duplicated key: two blue rows map to one green key (the upsert of the second fails and is
    // recorded; green holds one).
    exec(&mut c, "INSERT INTO public.tags VALUES (100, 'TAG1', 5)").await;

    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r");
    let out = run(
        &url,
        &[
            "validate",
            "-m",
            TYPES,
            "--chunk-rows",
            "10",
            "--report",
            report.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let summary = text(&out.stdout);
    assert!(
        summary.contains("FAIL") && summary.contains("items") && summary.contains("DIFFERS"),
        "{summary}"
    );

    let mut rd = csv::Reader::from_path(report.join("differences.csv")).unwrap();
    let rows: Vec<(String, String, String, String)> = rd
        .records()
        .map(|r| {
            let r = r.unwrap();
            (
                r[0].to_string(),
                r[1].to_string(),
                r[2].to_string(),
                r[3].to_string(),
            )
        })
        .collect();
    let has = |table: &str, kind: &str, key: &str, cols: &str| {
        rows.iter()
            .any(|r| r.0 == table && r.1 == kind && r.2 == key && r.3 == cols)
    };
    let expected = [
        ("items", "changed", "(3)", "label"),
        ("items", "missing", "(4)", ""),
        ("items", "extra", "(1000)", ""),
        ("items", "changed", "(10)", "label"),
        ("items", "changed", "(5)", "amount"),
        ("items", "changed", "(6)", "at"),
        ("items", "changed", "(7)", "doc"),
        ("items", "missing", "(8)", ""),
        ("items", "extra", "(500)", ""),
        ("tags", "duplicated", "(tag1)", ""),
    ];
    for (t, k, key, cols) in expected {
        assert!(
            has(t, k, key, cols),
            "not found: {t} {k} {key} [{cols}] in {rows:?}"
        );
    }
    // Nothing else is reported: not amount2 (numeric(10,2)), at0 (seconds), docb (jsonb).
    let known: Vec<&str> = vec![
        "(3)", "(4)", "(1000)", "(10)", "(5)", "(6)", "(7)", "(8)", "(500)", "(tag1)",
    ];
    for r in &rows {
        assert!(known.contains(&r.2.as_str()), "unexpected difference {r:?}");
    }

    // Values are masked unless asked for; the report parses and its digest holds.
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("**Verdict: FAIL**"));
    let json = std::fs::read_to_string(report.join("report.json")).unwrap();
    for (name, content) in [
        ("report.md", &md),
        ("report.json", &json),
        (
            "differences.csv",
            &std::fs::read_to_string(report.join("differences.csv")).unwrap(),
        ),
    ] {
        assert!(
            !content.contains("Sensitive-Value-42") && !content.contains("item 3"),
            "{name} shows values"
        );
    }
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["verdict"], "FAIL");
    assert_eq!(v["values_shown"], false);
    assert!(bluegreen::validate::report::verify_digest(&json));
    assert!(!bluegreen::validate::report::verify_digest(
        &json.replace("FAIL", "PASS")
    ));
    assert!(
        csv::Reader::from_path(report.join("tables.csv"))
            .unwrap()
            .records()
            .count()
            == 2
    );

    // With --show-values the values appear.
    let out = run(
        &url,
        &[
            "validate",
            "-m",
            TYPES,
            "--chunk-rows",
            "10",
            "--show-values",
            "--format",
            "json",
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d3 = v["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["key"] == "(3)")
        .unwrap()
        .clone();
    assert_eq!(d3["found"], "Sensitive-Value-42");
    assert_eq!(d3["expected"], "item 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_do_not_depend_on_server_settings() {
    let url = types_db("validate_settings").await;
    let digests = |out: std::process::Output| {
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out.stderr)));
        v["tables"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| format!("{} {} {}", t["table"], t["blue_digest"], t["green_digest"]))
            .collect::<Vec<_>>()
    };
    let before = digests(run(&url, &["validate", "-m", TYPES, "--format", "json"]).await);
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "ALTER DATABASE validate_settings SET TimeZone = 'Asia/Kolkata';
         ALTER DATABASE validate_settings SET DateStyle = 'SQL, DMY';
         ALTER DATABASE validate_settings SET IntervalStyle = 'postgres_verbose';
         ALTER DATABASE validate_settings SET extra_float_digits = 0",
    )
    .await;
    let after = digests(run(&url, &["validate", "-m", TYPES, "--format", "json"]).await);
    assert_eq!(before, after);
}

/// A row-local entry (fed by one blue table through its unique key): a write green rejects
/// commits on blue; its step gives way to the change log and the applier records the failure
/// with its key; after the next good write the retry clears it; deletes and key changes reach
/// green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_local_entries_sync_fails_safe_and_recovers() {
    let url = types_db("validate_fast").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "UPDATE public.items SET amount = -5000 WHERE id = 12",
    )
    .await;
    crate::support::drain(&url, TYPES).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM bluegreen.sync_failures WHERE green_table = 'items' AND sync_key = '[12]'")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1, "the rejected write must be recorded with its key");
    exec(&mut c, "UPDATE public.items SET amount = 12 WHERE id = 12").await;
    crate::support::drain(&url, TYPES).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM bluegreen.sync_failures")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 0, "a good write to the key clears its failure");
    exec(&mut c, "UPDATE public.items SET id = id + 1000 WHERE id BETWEEN 20 AND 29; DELETE FROM public.items WHERE id BETWEEN 30 AND 35; INSERT INTO public.items (id, label) VALUES (5000, NULL)").await;
    exec(&mut c, "UPDATE public.tags SET n = n + 1").await;
    let out = run(&url, &["validate", "-m", TYPES]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Keys a row-local step must not trust: a DEFERRABLE key (duplicates between statements), a
/// key whose green type is narrower than blue's, a nullable sync key. The application's writes succeed
/// and green ends equal to M(blue) (or, for the key that does not fit, the failure is reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_the_fast_path_cannot_trust() {
    let url = empty_db("validate_edge").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE d (id integer, v text, CONSTRAINT d_pk PRIMARY KEY (id) DEFERRABLE INITIALLY DEFERRED);
         INSERT INTO d VALUES (1, 'a'), (2, 'b');
         CREATE TABLE o (id bigint PRIMARY KEY, v text);
         INSERT INTO o VALUES (1, 'x');
         CREATE TABLE u (id integer PRIMARY KEY, email text UNIQUE, v text, active boolean NOT NULL);
         INSERT INTO u VALUES (1, 'a@x', 'a', true), (2, NULL, 'b', true), (3, NULL, 'c', true);",
    )
    .await;
    crate::support::copy_ok(&url, "tests/fixtures/edge.yaml").await;
    exec(
        &mut c,
        "BEGIN; UPDATE d SET id = 2 WHERE v = 'a'; UPDATE d SET id = 1 WHERE v = 'b'; COMMIT",
    )
    .await;
    exec(
        &mut c,
        "DELETE FROM u WHERE id = 2; UPDATE u SET active = false WHERE id = 3",
    )
    .await;
    // Does not fit green's integer: the write still commits on blue.
    exec(&mut c, "INSERT INTO o VALUES (3000000000, 'big')").await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM public.o")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 2);
    let st = crate::support::status_json(&url, "tests/fixtures/edge.yaml").await;
    let reported = st["failures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["table"] == "o")
        || st["backlog"].as_i64().unwrap() > 0;
    assert!(
        reported,
        "the write green cannot take must be reported: {st}"
    );
    exec(&mut c, "DELETE FROM o WHERE id = 3000000000").await;
    let _ = run(&url, &["sync", "-m", "tests/fixtures/edge.yaml"]).await;
    crate::support::assert_invariant(&url, "tests/fixtures/edge.yaml").await;
}

/// Which column a table is split on: a computed key (`md5(...)::uuid`) would make every chunk
/// compute it over the whole of blue, so validate ranges over a unique key that is a blue column
/// (the session key, served by blue's index), or compares the table in one chunk. Never across
/// collations: with green's text key under ICU and blue's under C, a range holds other rows on
/// each side, and every chunk differs and is compared row by row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_ranges_over_a_blue_column_and_never_across_collations() {
    const RANGES: &str = "tests/fixtures/ranges.yaml";
    let url = empty_db("validate_ranges").await;
    let mut c = connect(&url).await;
    exec(
        &mut c,
        "CREATE TABLE msgs (id bigint PRIMARY KEY, session text NOT NULL, body text);
         CREATE INDEX ON msgs (session);
         INSERT INTO msgs SELECT g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'B' END || (g % 400), 'm' || g
         FROM generate_series(1, 2000) g;
         CREATE TABLE codes (code text PRIMARY KEY, n integer NOT NULL);
         INSERT INTO codes SELECT chr(CASE WHEN g % 2 = 0 THEN 65 ELSE 97 END + g % 26) || g, g
         FROM generate_series(1, 500) g;
         CREATE TABLE amounts (amt numeric(10,2) PRIMARY KEY, label text NOT NULL);
         INSERT INTO amounts SELECT g - 0.4, 'a' || g FROM generate_series(1, 200) g;
         CREATE TABLE narrow (id integer PRIMARY KEY, v text NOT NULL);
         INSERT INTO narrow SELECT g, 'v' || g FROM generate_series(1, 200) g;",
    )
    .await;
    crate::support::copy_ok(&url, RANGES).await;
    // green = M(blue) exactly (a multiset comparison, not validate's digests): every
    // difference validate names below is real, and its PASS here must be one.
    crate::support::assert_invariant(&url, RANGES).await;
    let validate = || async {
        let out = run(
            &url,
            &[
                "validate",
                "-m",
                RANGES,
                "--chunk-rows",
                "50",
                "--format",
                "json",
            ],
        )
        .await;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}{}", text(&out.stdout), text(&out.stderr)));
        (out.status.code(), v)
    };
    let (code, v) = validate().await;
    let table = |v: &serde_json::Value, name: &str| {
        v["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name)
            .unwrap_or_else(|| panic!("{name} in {v}"))
            .clone()
    };
    assert_eq!(code, Some(0), "{v:#}");
    assert!(
        table(&v, "sessions")["chunks"].as_u64().unwrap() >= 8,
        "{v:#}"
    );
    assert!(
        table(&v, "narrow")["chunks"].as_u64().unwrap() >= 4,
        "{v:#}"
    );
    for one in ["sessions_ci", "codes", "computed", "rounded"] {
        assert_eq!(table(&v, one)["chunks"], 1, "{one}: {v:#}");
    }
    for t in v["tables"].as_array().unwrap() {
        assert_eq!(t["differing_chunks"], 0, "{v:#}");
    }
    // A difference in a table ranged over its second unique key is found and named by its key.
    exec(
        &mut c,
        "UPDATE ranges_green.sessions SET n = n + 1 WHERE session_key = 'a10';",
    )
    .await;
    let (code, v) = validate().await;
    assert_eq!(code, Some(1), "{v:#}");
    let s = table(&v, "sessions");
    assert_eq!(
        (
            s["changed"].as_u64(),
            s["missing"].as_u64(),
            s["extra"].as_u64()
        ),
        (Some(1), Some(0), Some(0)),
        "{v:#}"
    );
    assert_eq!(table(&v, "codes")["matches"], true, "{v:#}");
}
