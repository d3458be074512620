//! Blue is looked up by its own indexes when green's keys are wider (the issue: "every lookup of
//! blue by key, in triggers, catch-up, the follower, retry and validate, is served by blue's own
//! indexes: cast the touched key values to blue's type, never blue's column to green's").
//!
//! Blue keys are `integer`, green's `bigint` (tests/fixtures/explain_widen.yaml): one row-local
//! entry (the trigger re-derives it in the writer's statement), one lookup through a join and one
//! `group_by` (both the follower's), over 20,000 parents and 40,000 children, analyzed.
//! `auto_explain` logs the plan of every statement of every new session of the test's database,
//! nested statements (the triggers' own) included, with `enable_seqscan = off`: a Seq Scan on a
//! blue table in any plan means no index of blue could serve it. The plans are read back from the
//! cluster's server log (entries prefixed `db=<database>`), one segment per phase: the catch-up of
//! a copy, application writes (single- and multi-row INSERT, UPDATE of values and keys, DELETE,
//! cascades), a drain, a follower, forced failures and their retry, validate's re-checks.
//!
//! No blue table may be read by a Seq Scan, nor with a key compared through a cast (in a scan's
//! own conditions, or, for a scan without an index condition, anywhere in the plan); every phase
//! must show bluegreen's statements reading blue through an index condition on blue's indexes,
//! each index named (so the check cannot pass by seeing nothing). A negative control first shows
//! the check catches `(p.id)::bigint IN (...)` and its kin. Left out, and listed: validate's
//! `LIMIT 0` probes (they read no row) and the matching of changes set aside by their whole row
//! image (no lookup by key, and no index serves it; it runs only while changes are set aside).
//! Copy's own chunk reads are the second test's (a `group_by` entry's widened group key
//! included). The first
//! test ends on the invariant.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgConnection;

use crate::support::{self, Problems, assert_invariant, connect, empty_db, exec};

const MAPPING: &str = "tests/fixtures/explain_widen.yaml";
const MIGRATION: &str = "explain_widen";
const DB: &str = "explain_widen";

/// The blue tables (schema public), their key columns and their indexes.
const BLUE_TABLES: &[&str] = &["parent", "child"];
const BLUE_KEYS: &[&str] = &["id", "parent_id"];
const BLUE_INDEXES: &[&str] = &["parent_pkey", "child_pkey", "child_parent_id_idx"];

/// Marks the test's own statements (the application's, the negative control's), so they are told
/// apart from the statements bluegreen generates (nested statements carry their own text).
const APP: &str = "/* explain: application */";
const NEGATIVE: &str = "/* explain: negative control */";

const BLUE: &str = "
    CREATE TABLE public.parent (id integer PRIMARY KEY, name text NOT NULL);
    CREATE TABLE public.child (
        id integer PRIMARY KEY,
        parent_id integer NOT NULL REFERENCES public.parent ON UPDATE CASCADE ON DELETE CASCADE,
        n integer NOT NULL);
    CREATE INDEX child_parent_id_idx ON public.child (parent_id);
    INSERT INTO public.parent SELECT g, 'parent ' || g FROM generate_series(1, 20000) g;
    INSERT INTO public.child SELECT g, 1 + g % 20000, g % 1000 FROM generate_series(1, 40000) g;
    ANALYZE public.parent, public.child;";

/// What a bluegreen command may take at most (a stall fails the test, never hangs it).
const SLOW: Duration = Duration::from_secs(180);

fn both(o: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn command(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("bluegreen"));
    cmd.current_dir(support::root())
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Wait for a child process, at most `limit` (then it is killed and the test fails).
async fn wait_child(child: Child, limit: Duration, what: &str) -> Output {
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

/// `bluegreen <args>`, within [`SLOW`].
async fn bluegreen(url: &str, args: &[&str]) -> Output {
    let child = command(url, args).spawn().unwrap();
    wait_child(child, SLOW, &args.join(" ")).await
}

async fn count(c: &mut PgConnection, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(c)
        .await
        .unwrap_or_else(|e| panic!("{e}\nin: {sql}"))
}

/// Change-log rows pending for the migration.
async fn pending(c: &mut PgConnection) -> i64 {
    count(
        c,
        &format!("SELECT count(*) FROM bluegreen.changes WHERE migration = '{MIGRATION}'"),
    )
    .await
}

/// `(green table, sync key)` of every recorded failure.
async fn failures(c: &mut PgConnection) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT green_table, sync_key::text FROM bluegreen.sync_failures WHERE migration = $1 ORDER BY 1, 2",
    )
    .bind(MIGRATION)
    .fetch_all(c)
    .await
    .unwrap()
}

/// The application: each statement in its own transaction (autocommit), in a new session (so
/// `auto_explain` is loaded), marked [`APP`].
async fn app(url: &str, statements: &[&str]) {
    let mut c = connect(url).await;
    for s in statements {
        let sql = format!("{APP} {s}");
        support::must_not_wait(&mut c, "application", &sql, Duration::from_secs(30)).await;
    }
}

/// The server log from byte `from` on (the log only grows).
fn log_from(from: usize) -> String {
    support::cluster()
        .log()
        .get(from..)
        .unwrap_or_default()
        .to_string()
}

fn log_len() -> usize {
    support::cluster().log().len()
}

/// One plan auto_explain logged for the test's database.
struct Logged {
    query: String,
    plan: Value,
}

/// The plans in a segment of the server log: an entry is a line with the log prefix and the lines
/// after it that begin with a tab (PostgreSQL indents the continuation of a message so).
fn plans_in(segment: &str, db: &str) -> Vec<Logged> {
    let mut entries: Vec<Vec<&str>> = Vec::new();
    for line in segment.lines() {
        match (line.strip_prefix('\t'), entries.last_mut()) {
            (Some(rest), Some(e)) => e.push(rest),
            _ => entries.push(vec![line]),
        }
    }
    let marker = format!("db={db} ");
    entries
        .into_iter()
        .filter(|e| e[0].contains(&marker) && e[0].trim_end().ends_with("plan:"))
        .map(|e| {
            let text = e[1..].join("\n");
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("auto_explain JSON: {err}\n{text}"));
            Logged {
                query: v["Query Text"].as_str().unwrap_or_default().to_string(),
                plan: v["Plan"].clone(),
            }
        })
        .collect()
}

/// Every node of a plan tree, depth first.
fn nodes(plan: &Value) -> Vec<&Value> {
    let mut out = vec![plan];
    if let Some(children) = plan["Plans"].as_array() {
        for c in children {
            out.extend(nodes(c));
        }
    }
    out
}

const CONDITIONS: &[&str] = &[
    "Index Cond",
    "Recheck Cond",
    "Filter",
    "Join Filter",
    "Hash Cond",
    "Merge Cond",
    "TID Cond",
];

/// `(alias.key)::`: a blue key column cast in a condition.
fn casts_key(cond: &str, alias: &str) -> Option<String> {
    BLUE_KEYS
        .iter()
        .map(|k| format!("({alias}.{k})::"))
        .find(|pat| cond.contains(pat.as_str()))
}

/// What one plan does to blue.
#[derive(Default)]
struct Verdict {
    /// Blue read through an index condition: (index, condition).
    served: Vec<(String, String)>,
    /// Blue read whole by an index without a condition (no key lookup: a full read).
    full_reads: Vec<String>,
    /// Lookups of blue that no blue index serves.
    violations: Vec<String>,
}

fn examine(p: &Logged) -> Verdict {
    let all = nodes(&p.plan);
    let mut v = Verdict::default();
    let cond_of = |n: &Value, k: &str| n[k].as_str().map(str::to_string);
    for n in &all {
        let ty = n["Node Type"].as_str().unwrap_or_default();
        // Bitmap index scans name the index only (the heap scan above names the table).
        if ty == "Bitmap Index Scan" {
            let ix = n["Index Name"].as_str().unwrap_or_default();
            if BLUE_INDEXES.contains(&ix) {
                match cond_of(n, "Index Cond") {
                    Some(ic) => v.served.push((ix.to_string(), ic)),
                    None => v.full_reads.push(format!("{ty} on {ix}")),
                }
            }
            continue;
        }
        let rel = n["Relation Name"].as_str().unwrap_or_default();
        let schema = n["Schema"].as_str().unwrap_or_default();
        if schema != "public" || !BLUE_TABLES.contains(&rel) {
            continue;
        }
        let alias = n["Alias"].as_str().unwrap_or(rel);
        let what = format!("{ty} on public.{rel} AS {alias}");
        let index_cond = cond_of(n, "Index Cond");
        match ty {
            "Index Scan" | "Index Only Scan" => {
                let ix = n["Index Name"].as_str().unwrap_or_default().to_string();
                if let Some(ic) = &index_cond {
                    // Served by the index, unless a key is compared through a cast all the same
                    // (in the condition, or filtered after it).
                    let cast = [
                        ("Index Cond", Some(ic.clone())),
                        ("Filter", cond_of(n, "Filter")),
                    ]
                    .into_iter()
                    .find_map(|(k, c)| {
                        let c = c?;
                        casts_key(&c, alias).map(|pat| format!("`{pat}` in {k} {c}"))
                    });
                    match cast {
                        Some(c) => v.violations.push(format!("{what} using {ix}: {c}")),
                        None => v.served.push((ix, ic.clone())),
                    }
                    continue;
                }
            }
            "Bitmap Heap Scan" => {}
            // The target of a write, not a read.
            "ModifyTable" => continue,
            _ => {
                v.violations.push(format!(
                    "{what}{}",
                    cond_of(n, "Filter")
                        .map(|f| format!(" (Filter: {f})"))
                        .unwrap_or_default()
                ));
                continue;
            }
        }
        // A scan without an index condition of its own (a bitmap heap scan's is below it): a key
        // compared through a cast anywhere in the plan is a lookup no index of blue serves.
        let cast = all.iter().find_map(|m| {
            CONDITIONS.iter().find_map(|k| {
                let c = m[*k].as_str()?;
                if ty == "Bitmap Heap Scan" && *k == "Recheck Cond" {
                    return None;
                }
                casts_key(c, alias).map(|pat| format!("`{pat}` in {k} {c}"))
            })
        });
        match (cast, ty) {
            (Some(c), _) => v.violations.push(format!("{what}: {c}")),
            (None, "Bitmap Heap Scan") => {}
            (None, _) => v.full_reads.push(format!(
                "{what} using {}",
                n["Index Name"].as_str().unwrap_or_default()
            )),
        }
    }
    v
}

/// The plans of one phase.
struct Phase {
    name: &'static str,
    plans: Vec<Logged>,
}

/// Statements bluegreen generated: neither the test's own nor PostgreSQL's referential actions
/// (`UPDATE ONLY "public"."child" ... OPERATOR(pg_catalog.=)`), which read blue too.
fn generated_statement(q: &str) -> bool {
    let referential_action = q.contains(" ONLY \"") && q.contains("OPERATOR(pg_catalog.=");
    !(q.contains(APP) || q.contains(NEGATIVE) || referential_action)
}

/// Statements that read blue without looking it up by key, and why they are no such lookup: the
/// assertion on lookups by key leaves them out (each is still listed in the output).
fn not_a_key_lookup(q: &str) -> Option<&'static str> {
    if q.trim_end().ends_with("LIMIT 0") {
        // validate::filters_rows: whether an expression can filter the rows at all.
        return Some("a probe that reads no row (LIMIT 0)");
    }
    if q.contains("pg_catalog.to_jsonb(b) = ") {
        // sync::apply::set_aside and requeue_failed_changes (only while changes are set aside).
        return Some("a change set aside matched to blue by its whole row image");
    }
    None
}

/// Statements an applier runs (the catch-up, `sync`, the follower, retries, validate's
/// re-checks): they take the keys or the change-log ids as array parameters.
fn applier_statement(q: &str) -> bool {
    q.contains("$1::text[]") || q.contains("$1::int8[]")
}

impl Phase {
    /// The plans logged for `db` since byte `from` of the server log.
    fn read(name: &'static str, db: &str, from: usize) -> Phase {
        Phase {
            name,
            plans: plans_in(&log_from(from), db),
        }
    }

    /// Keep only the plans `keep` selects.
    fn only(mut self, keep: impl Fn(&Logged) -> bool) -> Phase {
        self.plans.retain(|p| keep(p));
        self
    }

    /// Every lookup of blue in the phase must be served by one of blue's indexes; statements
    /// bluegreen generated must have read blue through each index of `indexes` at least once, and
    /// through an index condition at least `min_served` times, appliers' included when `applier`.
    fn check(&self, problems: &mut Problems, min_served: usize, indexes: &[&str], applier: bool) {
        let mut served: Vec<(String, String)> = Vec::new();
        let mut served_applier = 0;
        let mut full = Vec::new();
        let mut generated = 0;
        let mut left_out: Vec<&str> = Vec::new();
        for p in self.plans.iter().filter(|p| !p.query.contains(NEGATIVE)) {
            if let Some(why) = not_a_key_lookup(&p.query) {
                left_out.push(why);
                continue;
            }
            let v = examine(p);
            for x in &v.violations {
                problems.check(false, || {
                    let plan = p.plan.to_string();
                    format!(
                        "{}: {x}\n  in: {}\n  plan: {}",
                        self.name,
                        p.query,
                        &plan[..plan.len().min(1500)]
                    )
                });
            }
            if !generated_statement(&p.query) {
                continue;
            }
            generated += 1;
            if applier_statement(&p.query) {
                served_applier += v.served.len();
            }
            served.extend(v.served);
            full.extend(v.full_reads);
        }
        eprintln!(
            "{}: {} plans ({generated} of generated statements); generated statements read blue through an index condition {} times ({served_applier} in appliers' statements); full index reads: {full:?}; left out as no lookup by key: {left_out:?}",
            self.name,
            self.plans.len(),
            served.len(),
        );
        problems.check(served.len() >= min_served, || {
            format!(
                "{}: generated statements read blue through its indexes only {} times (at least {min_served} expected)",
                self.name,
                served.len()
            )
        });
        for ix in indexes {
            problems.check(served.iter().any(|(i, _)| i == ix), || {
                format!(
                    "{}: no generated statement looked blue up through {ix}",
                    self.name
                )
            });
        }
        if applier {
            problems.check(served_applier > 0, || {
                format!(
                    "{}: no applier statement read blue through its indexes",
                    self.name
                )
            });
        }
    }
}

impl Phase {
    /// Some generated statement whose text contains `needle` read blue through an index
    /// condition on one of blue's indexes.
    fn require(&self, problems: &mut Problems, needle: &str) {
        let n: usize = self
            .plans
            .iter()
            .filter(|p| generated_statement(&p.query) && p.query.contains(needle))
            .map(|p| examine(p).served.len())
            .sum();
        problems.check(n > 0, || {
            format!(
                "{}: no generated statement containing `{needle}` read blue through its indexes",
                self.name
            )
        });
    }
}

/// `bluegreen sync --follow` as a child process.
struct Follower {
    child: Child,
}

impl Follower {
    async fn start(url: &str) -> Follower {
        let child = command(url, &["sync", "--follow", "-m", MAPPING])
            .spawn()
            .unwrap();
        let f = Follower { child };
        let mut c = connect(url).await;
        let start = Instant::now();
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM bluegreen.followers WHERE migration = $1 AND pid = $2",
            )
            .bind(MIGRATION)
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
        wait_child(self.child, Duration::from_secs(30), "sync --follow").await
    }
}

/// Wait until the change log is empty (a follower applies it), at most a minute.
async fn wait_until_drained(url: &str) {
    let mut c = connect(url).await;
    let start = Instant::now();
    while pending(&mut c).await > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the follower did not drain the change log within a minute"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Application writes of every kind, single-row and multi-row, on both blue tables; `k` keeps
/// inserted keys apart between calls.
fn writes(k: i32) -> Vec<String> {
    let (p, c) = (30_000 + 100 * k, 100_000 + 1000 * k);
    vec![
        format!(
            "UPDATE public.parent SET name = 'renamed {k}' WHERE id = {}",
            10 + k
        ),
        format!(
            "UPDATE public.parent SET name = name || ' m{k}' WHERE id BETWEEN {} AND {}",
            100 + 50 * k,
            140 + 50 * k
        ),
        format!(
            "INSERT INTO public.parent SELECT g, 'new ' || g FROM generate_series({p}, {}) g",
            p + 20
        ),
        format!("INSERT INTO public.parent VALUES ({}, 'one')", p + 50),
        format!(
            "UPDATE public.parent SET id = {} WHERE id = {}",
            p + 60,
            1000 + k
        ),
        format!(
            "DELETE FROM public.parent WHERE id BETWEEN {} AND {}",
            p + 10,
            p + 15
        ),
        format!("DELETE FROM public.parent WHERE id = {}", 2000 + k),
        format!("UPDATE public.child SET n = n + 1 WHERE id = {}", 20 + k),
        format!(
            "UPDATE public.child SET n = n + 1 WHERE parent_id BETWEEN {} AND {}",
            300 + 20 * k,
            310 + 20 * k
        ),
        format!(
            "UPDATE public.child SET parent_id = {} WHERE id = {}",
            3000 + k,
            40 + k
        ),
        format!(
            "UPDATE public.child SET id = {} WHERE id = {}",
            c + 500,
            60 + k
        ),
        format!(
            "INSERT INTO public.child SELECT g, {p} + g % 10, g % 7 FROM generate_series({c}, {}) g",
            c + 30
        ),
        format!(
            "INSERT INTO public.child VALUES ({}, {}, 1)",
            c + 40,
            4000 + k
        ),
        format!(
            "DELETE FROM public.child WHERE id BETWEEN {c} AND {}",
            c + 5
        ),
        format!("DELETE FROM public.child WHERE id = {}", 80 + k),
        format!(
            "BEGIN; UPDATE public.parent SET name = 'in a transaction' WHERE id = {0}; \
             UPDATE public.child SET n = n + 2 WHERE parent_id = {0}; \
             INSERT INTO public.child VALUES ({1}, {0}, 3); COMMIT",
            500 + k,
            c + 50
        ),
    ]
}

async fn app_writes(url: &str, k: i32) {
    let w = writes(k);
    let refs: Vec<&str> = w.iter().map(String::as_str).collect();
    app(url, &refs).await;
}

/// A database holding the blue tables, whose every new session explains every statement it runs
/// (nested ones included) with sequential scans disabled.
async fn explained_db(db: &str) -> String {
    let url = empty_db(db).await;
    let mut c = connect(&url).await;
    exec(&mut c, BLUE).await;
    exec(
        &mut c,
        &format!(
            "ALTER DATABASE {db} SET session_preload_libraries = 'auto_explain';
             ALTER DATABASE {db} SET auto_explain.log_min_duration = 0;
             ALTER DATABASE {db} SET auto_explain.log_nested_statements = on;
             ALTER DATABASE {db} SET auto_explain.log_verbose = on;
             ALTER DATABASE {db} SET auto_explain.log_format = 'json';
             ALTER DATABASE {db} SET enable_seqscan = off"
        ),
    )
    .await;
    url
}

/// Back to plain sessions.
async fn unexplained(url: &str, db: &str) {
    let mut c = connect(url).await;
    exec(&mut c, &format!("ALTER DATABASE {db} RESET ALL")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widened_keys_look_up_blue_by_its_own_index() {
    let url = explained_db(DB).await;
    let mut problems = Problems::default();
    let all = BLUE_INDEXES;

    // The negative control first: the check must catch blue's key cast to green's type, whether
    // the planner answers with a Seq Scan or with an index read whole and filtered.
    let mark = log_len();
    let negatives = [
        format!(
            "{NEGATIVE} SELECT p.name FROM public.parent AS p WHERE (p.id)::bigint IN (SELECT pg_catalog.unnest('{{7,8,9}}'::text[])::bigint)"
        ),
        format!(
            "{NEGATIVE} SELECT p.id FROM public.parent AS p WHERE (p.id)::bigint = ANY ('{{7,8,9}}'::bigint[])"
        ),
        format!(
            "{NEGATIVE} SELECT c.n FROM public.child AS c JOIN (SELECT pg_catalog.unnest('{{7,8}}'::bigint[]) AS k) AS u ON (c.parent_id)::bigint = u.k"
        ),
        format!(
            "{NEGATIVE} SELECT c.n FROM public.child AS c WHERE c.parent_id = 7 AND (c.id)::bigint = 7"
        ),
    ];
    {
        let mut c = connect(&url).await;
        for q in &negatives {
            exec(&mut c, q).await;
        }
    }
    let control = Phase::read("negative control", DB, mark);
    let caught: Vec<Vec<String>> = control
        .plans
        .iter()
        .filter(|p| p.query.contains(NEGATIVE))
        .map(|p| examine(p).violations)
        .collect();
    assert_eq!(
        caught.len(),
        negatives.len(),
        "auto_explain did not log every statement of the negative control"
    );
    assert!(
        caught.iter().all(|v| !v.is_empty()),
        "the check misses a lookup of blue by its key cast to green's type: {caught:?}"
    );
    eprintln!("negative control caught: {caught:?}");

    // Catch-up: what the application writes between prepare and copy is logged by the capture
    // triggers and applied by the copy's catch-up (the appliers' statements; the copy's own chunk
    // reads are the other test's).
    let out = bluegreen(&url, &["prepare", "-m", MAPPING]).await;
    assert!(out.status.success(), "prepare: {}", both(&out));
    app_writes(&url, 0).await;
    let mark = log_len();
    let out = bluegreen(&url, &["copy", "-m", MAPPING, "--chunk-rows", "5000"]).await;
    assert!(out.status.success(), "copy: {}", both(&out));
    Phase::read("catch-up", DB, mark)
        .only(|p| applier_statement(&p.query))
        .check(&mut problems, 6, all, true);

    // Live: the application's writes, the row-local entry re-derived by the triggers.
    let mark = log_len();
    app_writes(&url, 1).await;
    let triggers = Phase::read("triggers", DB, mark);
    // (9: an UPDATE that moves no key runs no delete, and so no read of blue for one.)
    triggers.check(&mut problems, 9, &["parent_pkey"], false);
    // The row-local upsert reads blue by the keys of `new_rows`; its delete, of `old_rows`.
    triggers.require(&mut problems, "FROM new_rows");
    triggers.require(&mut problems, "FROM old_rows");

    // A drain: the follower's entries applied by `bluegreen sync`.
    let mark = log_len();
    let out = bluegreen(&url, &["sync", "-m", MAPPING]).await;
    assert_eq!(out.status.code(), Some(0), "sync: {}", both(&out));
    Phase::read("sync", DB, mark).check(&mut problems, 6, all, true);

    // The follower, while the application writes.
    let mark = log_len();
    let follower = Follower::start(&url).await;
    app_writes(&url, 2).await;
    wait_until_drained(&url).await;
    let out = follower.stop().await;
    assert!(out.status.success(), "sync --follow: {}", both(&out));
    Phase::read("follower", DB, mark).check(&mut problems, 10, all, true);

    // Failures and their retry: green rejects a row-local key (the trigger's step gives way to
    // the change log, the applier fails it too) and a follower key; blue fixes the first, green
    // stops rejecting the second, and the next `sync` retries both.
    let mark = log_len();
    app(
        &url,
        &[
            "UPDATE public.parent SET name = 'rejected' WHERE id = 42",
            "UPDATE public.child SET n = 5000000 WHERE id = 43",
        ],
    )
    .await;
    let out = bluegreen(&url, &["sync", "-m", MAPPING]).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "sync with failures: {}",
        both(&out)
    );
    let mut c = connect(&url).await;
    assert_eq!(
        failures(&mut c).await,
        vec![
            ("children".to_string(), "[43]".to_string()),
            ("parents".to_string(), "[42]".to_string())
        ]
    );
    app(
        &url,
        &["UPDATE public.parent SET name = 'fixed' WHERE id = 42"],
    )
    .await;
    exec(
        &mut c,
        "ALTER TABLE explain_widen.children DROP CONSTRAINT children_n_check",
    )
    .await;
    let out = bluegreen(&url, &["sync", "-m", MAPPING]).await;
    assert_eq!(out.status.code(), Some(0), "sync retrying: {}", both(&out));
    assert_eq!(failures(&mut c).await, vec![]);
    let retry = Phase::read("retry", DB, mark);
    retry.check(&mut problems, 6, all, true);
    // The row-local key re-derived by the applier: its blue row locked FOR SHARE by its key.
    retry.require(&mut problems, "FOR SHARE");

    // Validate, with changes pending: it applies them and re-checks their keys.
    app_writes(&url, 3).await;
    assert!(pending(&mut c).await > 0, "nothing pending for validate");
    let mark = log_len();
    let out = bluegreen(&url, &["validate", "-m", MAPPING, "--chunk-rows", "5000"]).await;
    assert_eq!(out.status.code(), Some(0), "validate: {}", both(&out));
    let validate = Phase::read("validate", DB, mark);
    validate.check(&mut problems, 6, all, true);
    // The re-check of the pending keys: M(blue) for those keys, rendered.
    validate.require(&mut problems, "ROW(b.");

    problems.assert_none();
    unexplained(&url, DB).await;
    assert_invariant(&url, MAPPING).await;
}

/// Copy's own chunk reads: each chunk must read blue through blue's index too. The group_by
/// entry's group key is widened (`(c.parent_id)::bigint`): its chunks range over blue's column
/// (on the cast, which no index of blue serves, each chunk read the whole child table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widened_keys_copy_chunks_range_over_blues_own_index() {
    let db = "explain_widen_copy";
    let url = explained_db(db).await;
    let mut problems = Problems::default();
    let mark = log_len();
    let out = bluegreen(&url, &["copy", "-m", MAPPING, "--chunk-rows", "5000"]).await;
    assert!(out.status.success(), "copy: {}", both(&out));
    Phase::read("copy", db, mark)
        .only(|p| p.query.starts_with("INSERT INTO") && p.query.ends_with("ON CONFLICT DO NOTHING"))
        .check(&mut problems, 8, BLUE_INDEXES, false);
    problems.assert_none();
    unexplained(&url, db).await;
    assert_invariant(&url, MAPPING).await;
}
