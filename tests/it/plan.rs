//! `bluegreen plan` end to end against a real PostgreSQL.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{self, bluegreen, carbot_db, cluster, connect, fingerprint};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn plan_carbot_in_all_formats_writes_nothing() {
    let url = carbot_db("plan_formats").await;
    let before = fingerprint(&url).await;

    let out = bluegreen(&url)
        .args(["plan", "-m", "mappings/carbot.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "plan OK",
        "organizations",
        "chat_sessions",
        "N:1 group_by",
        "== prepare ==",
        "== copy ==",
        "== cutover ==",
        "== rollback ==",
        "SHARE ROW EXCLUSIVE on public.leads",
        "LOCK TABLE",
        "ALTER DATABASE",
    ] {
        assert!(
            text.contains(needle),
            "text output lacks {needle:?}:\n{text}"
        );
    }

    let out = bluegreen(&url)
        .args([
            "plan",
            "-m",
            "mappings/carbot.yaml",
            "--format",
            "json",
            "--profile",
            "full",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["ok"], true);
    let tables = v["tables"].as_array().unwrap();
    let names: Vec<&str> = tables.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "organizations",
            "workshops",
            "customers",
            "leads",
            "customer_vehicles",
            "chat_sessions",
            "chat_messages"
        ]
    );
    // The profile counts what M(blue) really produces: compare with the database's own count.
    let mut c = connect(&url).await;
    for (table, sql) in [
        (
            "leads",
            "SELECT count(*) FROM public.leads l JOIN public.workshops w ON w.id = l.workshop_id WHERE l.deleted_at IS NULL",
        ),
        (
            "organizations",
            "SELECT count(DISTINCT owner_email) FROM public.workshops",
        ),
        (
            "customers",
            "SELECT count(*) FROM public.customers c JOIN public.workshops w ON w.id = c.workshop_id",
        ),
    ] {
        let expected: i64 = sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap();
        let t = tables.iter().find(|t| t["name"] == table).unwrap();
        assert_eq!(
            t["profile"]["rows_produced"].as_i64().unwrap(),
            expected,
            "{table}"
        );
        assert_eq!(t["profile"]["mode"], "full");
    }
    // The round-trip check on perturbed rows (design review C2): the name split loses a green
    // first name with a space in it ('Anna x' + 'Smith' -> 'Anna x Smith' -> 'Anna'); every
    // other reversed column of CarBot survives the trip.
    let trips: Vec<(String, String)> = v["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["code"] == "round-trip")
        .map(|d| {
            (
                d["table"].as_str().unwrap().to_string(),
                d["column"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        trips,
        [("customers".to_string(), "first_name".to_string())],
        "{:#}",
        v["diagnostics"]
    );
    let leads = tables.iter().find(|t| t["name"] == "leads").unwrap();
    assert_eq!(leads["sync_key"][0][0], "id");
    assert_eq!(leads["reverse"]["verdict"], "invertible");
    let orgs = tables
        .iter()
        .find(|t| t["name"] == "organizations")
        .unwrap();
    assert_eq!(orgs["reverse"]["verdict"], "lossy");
    assert!(
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["phase"] == "cutover")
    );

    let out = bluegreen(&url)
        .args(["plan", "-m", "mappings/carbot.yaml", "--format", "markdown"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let md = stdout(&out);
    for needle in [
        "# Runbook",
        "## Pre-checks",
        "## Steps",
        "bluegreen copy -m mappings/carbot.yaml",
        "## Rollback",
        "## Sign-off",
        "```sql",
        "pg_dump --format=custom --schema=public --file=",
        "pg_database_size",
        "pg_read_all_stats",
        "SHOW deadlock_timeout;",
        "Go / no-go",
        "--accept-lossy-rollback --drain-timeout 60",
        "bluegreen rollback -m mappings/carbot.yaml --yes",
        "## Cleanup after the soak",
        "bluegreen finalize -m mappings/carbot.yaml --quiet 10min",
        "Expected: ",
    ] {
        assert!(md.contains(needle), "markdown lacks {needle:?}");
    }

    assert_eq!(
        before,
        fingerprint(&url).await,
        "plan must leave the database unchanged"
    );
}

/// Each fixture in mappings/invalid states on line 1 what `plan` must say:
/// `# expect: code=<code> line=<n> [table=<t>] [column=<c>] [hint=<text>] [message=<text>]`.
/// The fixtures of `mappings/invalid/`, each with the expectation on its first line.
pub fn invalid_fixtures() -> Vec<std::path::PathBuf> {
    let dir = support::root().join("mappings/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "fixtures missing");
    files
}

/// Run `bluegreen <command> -m <fixture>` and check it fails as the fixture's first line says
/// (`# expect: code=... line=... table=... column=... message=... hint=...`): exit 2, a diagnostic
/// `error[code]: file:line:` naming the table and column, the message and hint words.
pub async fn fails_as_expected(
    url: &str,
    command: &str,
    f: &std::path::Path,
) -> Result<(), String> {
    let first = std::fs::read_to_string(f)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let spec = first
        .strip_prefix("# expect:")
        .unwrap_or_else(|| panic!("{}: line 1 must be `# expect: ...`", f.display()))
        .to_string();
    let get = |k: &str| {
        spec.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    let rel = support::rel(f);
    let out = support::run(url, &[command, "-m", &rel]).await;
    let err = stderr(&out);
    let code = get("code").unwrap();
    let line = get("line").unwrap();
    let head = format!("error[{code}]: {rel}:{line}:");
    let diag_line = err.lines().find(|l| l.starts_with(&head));
    let mut ok = out.status.code() == Some(2) && !err.contains("panicked");
    match diag_line {
        None => ok = false,
        Some(l) => {
            if let Some(t) = get("table") {
                ok &= l.contains(&format!("table {t}"));
            }
            if let Some(c) = get("column") {
                ok &= l.contains(&format!("column {c}"));
            }
            if let Some(m) = get("message") {
                ok &= l.contains(&m);
            }
        }
    }
    if let Some(h) = get("hint") {
        ok &= err
            .lines()
            .any(|l| l.trim_start().starts_with("hint:") && l.contains(&h));
    }
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{command} {rel} (exit {:?}) expected `{spec}`, got:\n{err}",
            out.status.code()
        ))
    }
}

#[tokio::test]
async fn invalid_mappings_fail_with_located_errors() {
    let url = carbot_db("plan_invalid").await;
    let before = fingerprint(&url).await;
    let mut failures = Vec::new();
    for f in &invalid_fixtures() {
        if let Err(e) = fails_as_expected(&url, "plan", f).await {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert_eq!(
        before,
        fingerprint(&url).await,
        "a failed plan must leave the database unchanged"
    );
}

#[tokio::test]
async fn unreachable_database_and_wrong_password_are_clear_errors() {
    let out = bluegreen("postgres://postgres@localhost/x?host=/tmp/bluegreen-no-such-dir")
        .args(["plan", "-m", "mappings/carbot.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("error[database-unreachable]"),
        "{}",
        stderr(&out)
    );

    let url = carbot_db("plan_auth").await;
    let mut c = connect(&url).await;
    support::exec(
        &mut c,
        &format!(
            "DROP ROLE IF EXISTS {r}; CREATE ROLE {r} LOGIN PASSWORD 'right-secret'",
            r = bluegreen::pg::cluster::PASSWORD_ROLE
        ),
    )
    .await;
    let bad = cluster().url_with_password(
        "plan_auth",
        bluegreen::pg::cluster::PASSWORD_ROLE,
        "wrong-secret-4711",
    );
    let out = bluegreen(&bad)
        .args(["plan", "-m", "mappings/carbot.yaml"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("error[authentication-failed]"), "{err}");
    assert!(
        !err.contains("wrong-secret-4711") && !stdout(&out).contains("wrong-secret-4711"),
        "password leaked: {err}"
    );
    assert!(err.contains("***"), "{err}");
}

#[test]
fn command_line_mistakes_exit_2() {
    let out = assert_cmd::Command::cargo_bin("bluegreen")
        .unwrap()
        .args(["plan"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = assert_cmd::Command::cargo_bin("bluegreen")
        .unwrap()
        .args([
            "plan",
            "-m",
            "no/such/mapping.yaml",
            "--database-url",
            "postgres://x@localhost/y",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("error[mapping-unreadable]"),
        "{}",
        stderr(&out)
    );
}

fn server_running_in(dir: &str) -> bool {
    let out = Command::new("pgrep")
        .args(["-f", &format!("postgres.*{dir}")])
        .output()
        .unwrap();
    !out.stdout.is_empty()
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cluster_is_stopped_and_removed_on_drop() {
    let c = bluegreen::pg::cluster::Cluster::start().unwrap();
    let dir = c.socket_dir().to_path_buf();
    assert!(dir.join("data/postmaster.pid").exists());
    drop(c);
    assert!(!dir.exists(), "cluster directory left behind");
    assert!(!server_running_in(&dir.display().to_string()));
}

/// The watchdog stops the server when its owner is killed with SIGKILL. The owner is this test
/// binary re-run as a child (BLUEGREEN_WATCHDOG_CHILD names a file): it starts a cluster, writes
/// the cluster's directory to that file, and waits to be killed.
#[test]
fn cluster_is_stopped_when_its_owner_is_killed() {
    if let Some(report) = std::env::var_os("BLUEGREEN_WATCHDOG_CHILD") {
        let c = bluegreen::pg::cluster::Cluster::start().unwrap();
        std::fs::write(&report, c.socket_dir().display().to_string()).unwrap();
        std::thread::sleep(Duration::from_secs(120));
        return;
    }
    let report = tempfile::NamedTempFile::new().unwrap().into_temp_path();
    std::fs::remove_file(&report).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "plan::cluster_is_stopped_when_its_owner_is_killed",
            "--test-threads=1",
        ])
        .env("BLUEGREEN_WATCHDOG_CHILD", &*report)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the child started a cluster", || {
        report.exists()
            && std::fs::metadata(&report)
                .map(|m| m.len() > 0)
                .unwrap_or(false)
    });
    let dir = std::fs::read_to_string(&report).unwrap();
    assert!(
        std::path::Path::new(&dir)
            .join("data/postmaster.pid")
            .exists()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until(
        "the watchdog stopped the orphaned server and removed its directory",
        || !server_running_in(&dir) && !std::path::Path::new(&dir).exists(),
    );
}

/// Without `--database-url` and `DATABASE_URL`, bluegreen connects as psql does: the libpq
/// variables and a password file; a wrong password from the environment is an authentication
/// error that does not print it.
#[tokio::test]
async fn connects_from_the_libpq_variables_and_the_password_file() {
    let url = carbot_db("plan_libpq").await;
    let mut c = connect(&url).await;
    support::exec(
        &mut c,
        "DROP ROLE IF EXISTS libpq_user; CREATE ROLE libpq_user LOGIN SUPERUSER PASSWORD 'pgpass-secret'",
    )
    .await;
    let socket = cluster().socket_dir().display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let passfile = tmp.path().join("pgpass");
    std::fs::write(&passfile, "*:*:plan_libpq:libpq_user:pgpass-secret\n").unwrap();
    std::fs::set_permissions(
        &passfile,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let libpq = |password: Option<&str>| {
        let mut cmd = bluegreen("");
        cmd.env_remove("DATABASE_URL")
            .env("PGHOST", &socket)
            .env("PGPORT", "5432")
            .env("PGUSER", "libpq_user")
            .env("PGDATABASE", "plan_libpq")
            .env("PGPASSFILE", &passfile)
            .env_remove("PGPASSWORD");
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.args(["plan", "-m", "mappings/carbot.yaml", "--profile", "none"]);
        cmd
    };
    let out = libpq(None).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("organizations"), "{}", stdout(&out));
    let out = libpq(Some("wrong-env-secret-99")).output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("error[authentication-failed]"), "{err}");
    assert!(err.contains("PG* variables"), "{err}");
    assert!(
        !err.contains("wrong-env-secret-99"),
        "password leaked: {err}"
    );
}

/// The round-trip check names the columns whose green writes come back changed through
/// `M(R(g'))`, and only those: a declared reverse of a map that merges two green values into one
/// blue value, a reverse that rounds, a value blue's shorter type cannot hold. Renames and casts
/// blue can hold, and a column nothing reverses reads (read-only after cutover, listed
/// elsewhere), are not named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_names_the_columns_a_round_trip_through_blue_changes() {
    let url = crate::support::empty_db("plan_roundtrip").await;
    let mut c = connect(&url).await;
    crate::support::exec(
        &mut c,
        "CREATE TABLE public.ticket (id integer PRIMARY KEY, state text NOT NULL, price numeric(10,2) NOT NULL, code varchar(4) NOT NULL, title text NOT NULL, note text, kind text NOT NULL);
         INSERT INTO public.ticket SELECT i, (ARRAY['new','open','done','dropped'])[1 + i % 4], i * 1.25, 'C' || (i % 100), 't' || i, 'n' || i, CASE WHEN i % 3 = 0 THEN 'A' ELSE 'B' END FROM generate_series(1, 300) i;",
    )
    .await;
    let out = bluegreen(&url)
        .args([
            "plan",
            "-m",
            "tests/fixtures/roundtrip.yaml",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    let mut trips: Vec<String> = v["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["code"] == "round-trip")
        .map(|d| d["column"].as_str().unwrap().to_string())
        .collect();
    trips.sort();
    assert_eq!(trips, ["code", "price", "status"], "{:#}", v["diagnostics"]);
    let msg = v["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["code"] == "round-trip" && d["column"] == "status")
        .unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("comes back as"), "{msg}");
    assert_eq!(
        crate::support::count(
            &mut c,
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('rt_green', 'bluegreen')"
        )
        .await,
        0,
        "plan leaves nothing behind"
    );
}
