//! The generated trigger functions, one per blue table the mapping reads (its partitions and
//! inheritance children call the same function): the capture body during the copy (log every
//! changed row) and the live body afterwards (row-local entries in the statement, the rest logged
//! for the follower). They take no lock beyond the writer's own writes, never wait for another
//! application transaction on sync's account, and never fail the writer's statement: a row-local
//! step that could fail runs in a subtransaction under a short `lock_timeout`, and if it fails or
//! times out its rows go to the change log, pending, for the follower.

use super::guard::{GIVE_WAY, STEP_LOCK_TIMEOUT, guard_declare, set_guard};
use super::{Mode, Stage, SyncEntry, function_settings};
use crate::mapping::Mapping;
use crate::names;
use crate::sql::{Ident, Literal, QName, Sql, join, sql};

/// Which entries an UPDATE's rows concern: its old and new rows paired by a strict unique key of
/// the blue table (compared as text under the "C" collation, so a new rendering of an equal key
/// leaves a row unpaired, and a case-insensitive column never pairs two rows with one: H4-2),
/// and per entry reading the table: its name, whether it is row-local, the columns it reads
/// (None: every update concerns it).
pub struct UpdateFilter {
    pub pair_key: Vec<String>,
    pub entries: Vec<(String, bool, Option<Vec<String>>)>,
}

impl UpdateFilter {
    /// None when the table has no strict unique key to pair rows by, or no entry reading it can
    /// tell which columns it reads (then every updated row is logged for every entry).
    pub fn new(entries: &[SyncEntry], bt: &crate::catalog::Table) -> Option<UpdateFilter> {
        let x = bt.qname();
        let pair_key = bt.strict_unique_keys().into_iter().next()?;
        let entries: Vec<(String, bool, Option<Vec<String>>)> = entries
            .iter()
            .filter(|e| !e.aliases_of(&x).is_empty())
            .map(|e| {
                let cols = e.columns_read.iter().find(|(t, _)| *t == x);
                (
                    e.entry.name.clone(),
                    e.row_local(),
                    cols.and_then(|(_, c)| c.clone()),
                )
            })
            .collect();
        if entries.iter().all(|(_, _, c)| c.is_none()) {
            return None;
        }
        Some(UpdateFilter { pair_key, entries })
    }
}

/// The change-log statements for the statement's transition tables. `all_entries`: every entry
/// reading the table re-derives the rows (capture, a row-local step that gave way), or only the
/// entries the follower keeps. With a filter, an updated row is logged once, both images in one
/// change row, with the entries whose columns it changed, and not at all when it changed none (a
/// rename of a workshop is nothing to the entries that read only its id); a row that cannot be
/// paired is logged as an old image and a new image of their own.
fn log_rows(
    m: &Mapping,
    x: &QName,
    all_entries: bool,
    filter: Option<&UpdateFilter>,
    indent: &str,
) -> String {
    log_rows_skipping(m, x, all_entries, filter, None, indent)
}

/// [`log_rows`], each row marked with the entry whose reverse wrote it (`skip`, an SQL text
/// expression): the applier does not re-derive that entry from them.
fn log_rows_skipping(
    m: &Mapping,
    x: &QName,
    all_entries: bool,
    filter: Option<&UpdateFilter>,
    skip: Option<&str>,
    indent: &str,
) -> String {
    let (skip_col, skip_val) = match skip {
        Some(v) => (", skip_entry", format!(", {v}")),
        None => ("", String::new()),
    };
    let changes = QName::new(&m.control_schema, "changes");
    let mig = Literal::new(&m.migration);
    let bt = Literal::new(x.display());
    let ins = |op: &str, image: &str, rel: &str| {
        let (old, new) = if image == "old" {
            ("pg_catalog.to_jsonb(r.*)", "NULL")
        } else {
            ("NULL", "pg_catalog.to_jsonb(r.*)")
        };
        format!(
            "INSERT INTO {changes} (migration, blue_table, op, old_row, new_row, all_entries{skip_col}) SELECT {mig}, {bt}, '{op}', {old}, {new}, {all_entries}{skip_val} FROM {rel} AS r;"
        )
    };
    let update = match filter {
        None => format!(
            "{}\n{indent}    {}",
            ins("U", "old", "old_rows"),
            ins("U", "new", "new_rows")
        ),
        Some(f) => {
            let col = |r: &str, c: &str| format!("{r}.{}", Ident::new(c));
            let on = join(
                f.pair_key.iter().map(|c| {
                    format!(
                        "({}::pg_catalog.text) COLLATE pg_catalog.\"C\" = ({}::pg_catalog.text) COLLATE pg_catalog.\"C\"",
                        col("bluegreen_o", c),
                        col("bluegreen_n", c)
                    )
                }),
                " AND ",
            );
            // Presence of the datum: `IS NOT NULL` of a row value is false when a field is NULL
            // (hostile review 4, H4-1).
            let present =
                |r: &str| format!("pg_catalog.num_nonnulls({}) = 1", col(r, &f.pair_key[0]));
            // Rows logged for the follower only concern the entries it keeps.
            let cases = join(
                f.entries
                    .iter()
                    .filter(|(_, row_local, _)| all_entries || !row_local)
                    .map(|(name, _, cols)| match cols {
                        None => Literal::new(name).to_string(),
                        Some(cols) if cols.is_empty() => "NULL".to_string(),
                        Some(cols) => {
                            let row = |r: &str| {
                                format!(
                                    "(ROW({})::pg_catalog.text) COLLATE pg_catalog.\"C\"",
                                    join(cols.iter().map(|c| col(r, c)), ", ")
                                )
                            };
                            format!(
                                "CASE WHEN {} <> {} THEN {} END",
                                row("bluegreen_o"),
                                row("bluegreen_n"),
                                Literal::new(name)
                            )
                        }
                    }),
                ", ",
            );
            format!(
                "INSERT INTO {changes} (migration, blue_table, op, old_row, new_row, all_entries, entries{skip_col}) SELECT {mig}, {bt}, 'U', bluegreen_p.old_image, bluegreen_p.new_image, {all_entries}, bluegreen_p.entries{skip_val} FROM (SELECT CASE WHEN {} THEN pg_catalog.to_jsonb(bluegreen_o.*) END AS old_image, CASE WHEN {} THEN pg_catalog.to_jsonb(bluegreen_n.*) END AS new_image, CASE WHEN {} AND {} THEN pg_catalog.array_remove(ARRAY[{cases}]::pg_catalog.text[], NULL) END AS entries FROM old_rows AS bluegreen_o FULL JOIN new_rows AS bluegreen_n ON {on}) AS bluegreen_p WHERE bluegreen_p.entries IS NULL OR pg_catalog.cardinality(bluegreen_p.entries) > 0;",
                present("bluegreen_o"),
                present("bluegreen_n"),
                present("bluegreen_o"),
                present("bluegreen_n"),
            )
        }
    };
    format!(
        "{indent}IF TG_OP = 'INSERT' THEN\n{indent}    {}\n{indent}ELSIF TG_OP = 'UPDATE' THEN\n{indent}    {update}\n{indent}ELSIF TG_OP = 'DELETE' THEN\n{indent}    {}\n{indent}END IF;\n",
        ins("I", "new", "new_rows"),
        ins("D", "old", "old_rows"),
    )
}

/// A TRUNCATE marks every entry reading the table for a full re-derive (row-local ones too:
/// there are no transition rows to re-derive from).
fn log_truncate(m: &Mapping, x: &QName) -> String {
    format!(
        "    IF TG_OP = 'TRUNCATE' THEN\n        INSERT INTO {} (migration, blue_table, op, all_entries) VALUES ({}, {}, 'T', true);\n        RETURN NULL;\n    END IF;\n",
        QName::new(&m.control_schema, "changes"),
        Literal::new(&m.migration),
        Literal::new(x.display()),
    )
}

/// A trigger function. `#variable_conflict use_column`: a name in a generated statement is a
/// column even when a variable of the function has it (a green key column named `lt` made the
/// upsert's `ON CONFLICT (lt)` ambiguous and failed the writer's statement: H6-4); the
/// function's own variables are only read where no table is in scope.
fn function(m: &Mapping, n: usize, declare: &str, body: &str) -> Sql {
    sql!(
        "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql {settings} AS $fn$\n#variable_conflict use_column\n{declare}BEGIN\n{body}    RETURN NULL;\nEND\n$fn$",
        f = names::sync_function(&m.control_schema, &m.migration, n),
        settings = function_settings(),
    )
}

/// The capture trigger function for blue table `x` (the `n`th the mapping reads), during the
/// copy: log every changed row for every entry.
pub fn capture_trigger_function(m: &Mapping, x: &QName, n: usize) -> Sql {
    let body = format!(
        "{}{}",
        log_truncate(m, x),
        log_rows(m, x, true, None, "    ")
    );
    function(m, n, "", &body)
}

/// The live trigger function for blue table `x` (`bt` in the catalog, when it is there): log the
/// changed rows when an entry the follower keeps reads `x`, and re-derive the row-local entries
/// driven by `x` right here.
pub fn live_trigger_function(
    m: &Mapping,
    entries: &[SyncEntry],
    x: &QName,
    bt: Option<&crate::catalog::Table>,
    n: usize,
) -> Sql {
    live_body(m, entries, x, bt, n, false)
}

/// The forward trigger function for blue table `x` at a stage of the migration: live (before
/// cutover), cut over, rolled back (the live body, its green writes marked with the loop guard so
/// the reverse triggers that stay on green do not echo them). `reversed`: the entries whose green
/// writes reverse into blue.
pub fn forward_trigger_function(
    m: &Mapping,
    entries: &[SyncEntry],
    x: &QName,
    bt: Option<&crate::catalog::Table>,
    n: usize,
    stage: Stage,
    reversed: &[String],
) -> Sql {
    match stage {
        Stage::Live => live_body(m, entries, x, bt, n, false),
        Stage::RolledBack => live_body(m, entries, x, bt, n, true),
        Stage::CutOver { refuse_old_writes } => {
            cut_over_body(m, entries, x, bt, n, refuse_old_writes, reversed)
        }
    }
}

/// The entry whose reverse wrote the statement's blue rows, one trigger level up (the loop
/// guard says `r:<depth>:<entry>`), else NULL.
const REVERSE_SOURCE: &str = "CASE WHEN pg_catalog.left(bluegreen_guard, 2) = 'r:' AND pg_catalog.split_part(bluegreen_guard, ':', 2)::pg_catalog.int4 = bluegreen_depth - 1 THEN pg_catalog.substr(bluegreen_guard, pg_catalog.length(pg_catalog.split_part(bluegreen_guard, ':', 2)) + 4) END";

fn live_body(
    m: &Mapping,
    entries: &[SyncEntry],
    x: &QName,
    bt: Option<&crate::catalog::Table>,
    n: usize,
    guard: bool,
) -> Sql {
    let filter = bt.and_then(|bt| UpdateFilter::new(entries, bt));
    let filter = filter.as_ref();
    let followed = entries
        .iter()
        .any(|e| !e.row_local() && !e.aliases_of(x).is_empty());
    let local: Vec<&SyncEntry> = entries
        .iter()
        .filter(|e| e.row_local() && e.driving() == x)
        .collect();
    // After a rollback, the blue rows a green straggler's reverse wrote are logged as its echo
    // (`skip_entry`): the straggler's own later writes do not take them for a blue write green
    // has not seen. The applier re-derives them all the same once rolled back.
    let skip = guard.then_some(REVERSE_SOURCE);
    let mut body = log_truncate(m, x);
    if local.is_empty() {
        if followed {
            body.push_str(&log_rows_skipping(m, x, false, filter, skip, "    "));
        }
        let declare = if guard {
            format!("DECLARE\n{}", guard_declare(m))
        } else {
            String::new()
        };
        return function(m, n, &declare, &body);
    }
    // The isolation level, read once per statement.
    let mut declare = "DECLARE\n    lt text;\n    bluegreen_set text;\n    bluegreen_iso text := pg_catalog.current_setting('transaction_isolation');\n".to_string();
    if guard {
        declare.push_str(&guard_declare(m));
    }
    // A SERIALIZABLE writer's rows go to the change log for every entry: a row-local step
    // reads blue inside the writer's transaction, and its predicate locks (which outlive the
    // step's subtransaction) would fail application commits that never conflicted (H2-11).
    body.push_str(&format!(
        "    IF bluegreen_iso = 'serializable' THEN\n{}        RETURN NULL;\n    END IF;\n",
        log_rows_skipping(m, x, true, filter, skip, "        ")
    ));
    if followed {
        body.push_str(&log_rows_skipping(m, x, false, filter, skip, "    "));
    }
    // A step that cannot fail runs bare (no subtransaction) in READ COMMITTED; in REPEATABLE
    // READ a concurrent applier's commit could still raise a serialization error.
    let all_infallible = local
        .iter()
        .all(|e| matches!(e.mode, Mode::RowLocal { infallible: true }));
    if guard {
        body.push_str(&format!(
            "    {}\n",
            set_guard(m, "'f:' || bluegreen_depth::pg_catalog.text")
        ));
    }
    if all_infallible {
        body.push_str(&format!(
            "    IF bluegreen_iso = 'read committed' THEN\n{}    ELSE\n{}    END IF;\n",
            row_local_steps(m, &local, "        "),
            guarded(m, x, &local, filter, "        ", !guard)
        ));
    } else {
        body.push_str(&guarded(m, x, &local, filter, "    ", !guard));
    }
    if guard {
        body.push_str(&format!("    {}\n", set_guard(m, "bluegreen_guard")));
    }
    function(m, n, &declare, &body)
}

/// After the flip. A blue write is either the echo of a reverse (the guard names the entry whose
/// green write caused it: every other entry reading the table re-derives, that one not) or an old
/// session's (opened before the flip, or pinned to blue): recorded in `blue_writers` per
/// session, refused with `--refuse-old-writes`, and otherwise re-derived in its own statement
/// under a short `lock_timeout`; a wait for a green row a new session holds gives way with
/// `40001` to the old session, so old and new sessions never deadlock through sync. Entries
/// without a reverse are insert-only from blue (green is the new application's). An old
/// session's write to the driving table of a reversed entry the follower keeps is refused: the
/// follower would apply it after a new session may have read the green row and written it back
/// (design review C1).
fn cut_over_body(
    m: &Mapping,
    entries: &[SyncEntry],
    x: &QName,
    bt: Option<&crate::catalog::Table>,
    n: usize,
    refuse_old_writes: bool,
    reversed: &[String],
) -> Sql {
    let filter = bt.and_then(|bt| UpdateFilter::new(entries, bt));
    let filter = filter.as_ref();
    let followed = entries
        .iter()
        .any(|e| !e.row_local() && !e.aliases_of(x).is_empty());
    let local: Vec<&SyncEntry> = entries
        .iter()
        .filter(|e| e.row_local() && e.driving() == x)
        .collect();
    // Reversed entries the follower keeps, driven by this table: an old session's write
    // re-derives them in its own statement too (their keys straight from its rows), or, when a
    // key needs a join, is refused.
    let kept: Vec<&SyncEntry> = entries
        .iter()
        .filter(|e| !e.row_local() && e.driving() == x && reversed.contains(&e.entry.name))
        .collect();
    let in_statement: Vec<&SyncEntry> = kept
        .iter()
        .copied()
        .filter(|e| e.keys_of_driving_rows("new_rows").is_some())
        .collect();
    let denied: Vec<&str> = kept
        .iter()
        .filter(|e| e.keys_of_driving_rows("new_rows").is_none())
        .map(|e| e.entry.name.as_str())
        .collect();
    let mut declare = String::from("DECLARE\n    lt text;\n    bluegreen_set text;\n");
    declare.push_str(&guard_declare(m));
    declare.push_str("    bluegreen_src text;\n    bluegreen_old boolean;\n    bluegreen_defer boolean := false;\n");
    let nkeys = local
        .iter()
        .chain(in_statement.iter())
        .map(|e| e.keys.len())
        .max()
        .unwrap_or(0);
    for j in 0..nkeys {
        declare.push_str(&format!("    bluegreen_k{j} text[];\n"));
    }
    let writers = QName::new(&m.control_schema, "blue_writers");
    let moved = format!(
        "RAISE EXCEPTION 'bluegreen: migration % moved the application to schema %; this session still writes %', {}, {}, {}::pg_catalog.text USING ERRCODE = 'object_not_in_prerequisite_state'",
        Literal::new(&m.migration),
        Literal::new(&m.green),
        Literal::new(x.display()),
    );
    let mut old = format!(
        "        INSERT INTO {writers} AS w (migration, pid, backend_start, usename, application_name, client_addr, blue_table) SELECT {mig}, a.pid, a.backend_start, pg_catalog.session_user()::pg_catalog.text, a.application_name, a.client_addr::pg_catalog.text, {bt} FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) AS a ON CONFLICT (migration, pid, backend_start) DO UPDATE SET last_write = pg_catalog.clock_timestamp(), writes = w.writes + 1, blue_table = EXCLUDED.blue_table;\n",
        mig = Literal::new(&m.migration),
        bt = Literal::new(x.display()),
    );
    if refuse_old_writes {
        old.push_str(&format!(
            "        {moved}, HINT = 'reconnect: new sessions use the new schema (cutover --refuse-old-writes)';\n"
        ));
    }
    old.push_str(&format!(
        "        IF TG_OP = 'TRUNCATE' THEN\n            {moved}, HINT = 'reconnect: a TRUNCATE of blue after cutover cannot reach green';\n        END IF;\n"
    ));
    // A blue key written in a form green would not give back (an upper-case uuid text when
    // green's key is the uuid): green's row would be found, but no green write could reach this
    // blue row again (hostile review of the uuid example). Refused in the old session.
    if let Some(bt) = bt {
        for e in entries
            .iter()
            .filter(|e| e.driving() == x && reversed.contains(&e.entry.name))
        {
            let (Some(cond), Some(example)) = (
                super::key_round_trip(e, bt),
                super::key_round_trip_example(e, bt, "new_rows"),
            ) else {
                continue;
            };
            old.push_str(&format!(
                "        IF TG_OP IN ('INSERT', 'UPDATE') THEN\n            -- A statement of its own: a DELETE's trigger has no new_rows to plan against.\n            IF EXISTS (SELECT 1 FROM new_rows AS {alias} WHERE {cond}) THEN\n                RAISE EXCEPTION 'bluegreen: key % of % is not in the form green gives back (%), so no green write could reach this row after the cutover', ({example}), {bt}::pg_catalog.text, {ent}::pg_catalog.text USING ERRCODE = 'check_violation', HINT = 'write the key as green stores it, cast back (a lower-case uuid), or reconnect to use the new schema';\n            END IF;\n        END IF;\n",
                alias = Ident::new(&e.entry.from_clause.driving().alias),
                bt = Literal::new(x.display()),
                ent = Literal::new(&e.entry.name),
            ));
        }
    }
    if !denied.is_empty() {
        old.push_str(&format!(
            "        {moved}, HINT = {};\n",
            Literal::new(format!(
                "reconnect: {} is kept by the follower and written by new sessions, so a write here could be lost",
                denied.join(", ")
            ))
        ));
    }
    // A key whose green write has not reached blue (a reverse failure): re-deriving it from blue
    // would put the stale blue row over the application's, and the retry would then make that
    // permanent. The old session's write to it is refused until `sync` has written it back. The
    // green rows are locked first and the failures read after, in a statement of their own: a
    // new session's write whose reverse fails commits its failure with its green row, so a check
    // before the wait would miss it (third hostile review, finding 5: 35 of 40 writes lost).
    let failed = QName::new(&m.control_schema, "reverse_failures");
    let guarded: String = local
        .iter()
        .chain(in_statement.iter())
        .filter(|e| reversed.contains(&e.entry.name) && e.keys_of_driving_rows("new_rows").is_some())
        .map(|e| {
            let n = e.keys.len();
            let cols = join((0..n).map(|j| format!("k{j}")), ", ");
            let arrays = join((0..n).map(|j| format!("bluegreen_k{j}")), ", ");
            let built = join((0..n).map(|j| format!("u.k{j}")), ", ");
            let ind = "            ";
            format!(
                "{}{ind}EXECUTE {} USING {arrays};\n{ind}IF EXISTS (SELECT 1 FROM {failed} AS f WHERE f.migration = {mig} AND f.green_table = {ent} AND f.green_key IN (SELECT pg_catalog.jsonb_build_array({built}) FROM pg_catalog.unnest({arrays}) AS u({cols}))) THEN\n{ind}    RAISE EXCEPTION 'bluegreen: a row of % changed on green has not reached blue yet (a reverse failure); this blue write to it is refused', {ent}::pg_catalog.text USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'see `bluegreen status`; fix the cause and run `bluegreen sync`, or reconnect to use the new schema';\n{ind}END IF;\n",
                collect_keys(e, ind),
                Literal::new(e.applier(m).green_lock.into_string()),
                mig = Literal::new(&m.migration),
                ent = Literal::new(&e.entry.name),
            )
        })
        .collect();
    if !guarded.is_empty() {
        old.push_str(&format!(
            "        BEGIN\n            lt := pg_catalog.current_setting('lock_timeout');\n            bluegreen_set := pg_catalog.set_config('lock_timeout', {STEP_LOCK_TIMEOUT}, true);\n{guarded}            bluegreen_set := pg_catalog.set_config('lock_timeout', lt, true);\n        EXCEPTION WHEN OTHERS THEN\n            IF SQLSTATE IN ('55P03', '40P01') THEN\n                {GIVE_WAY};\n            END IF;\n            RAISE;\n        END;\n"
        ));
    }
    if !in_statement.is_empty() {
        old.push_str(&format!(
            "        {}\n        BEGIN\n            lt := pg_catalog.current_setting('lock_timeout');\n            bluegreen_set := pg_catalog.set_config('lock_timeout', {STEP_LOCK_TIMEOUT}, true);\n{}            bluegreen_set := pg_catalog.set_config('lock_timeout', lt, true);\n        EXCEPTION WHEN OTHERS THEN\n            IF SQLSTATE IN ('55P03', '40P01') THEN\n                {GIVE_WAY};\n            END IF;\n            RAISE;\n        END;\n        {}\n",
            set_guard(m, "'f:' || bluegreen_depth::pg_catalog.text"),
            in_statement
                .iter()
                .map(|e| old_session_apply(m, e, "            "))
                .collect::<String>(),
            set_guard(m, "bluegreen_guard"),
        ));
    }
    let mut body = format!(
        "    bluegreen_src := {REVERSE_SOURCE};\n    bluegreen_old := NOT (pg_catalog.left(bluegreen_guard, 2) IN ('r:', 'f:') AND pg_catalog.split_part(bluegreen_guard, ':', 2)::pg_catalog.int4 < bluegreen_depth);\n    IF bluegreen_old THEN\n{old}    END IF;\n"
    );
    body.push_str(&log_truncate(m, x));
    if followed {
        body.push_str(&log_rows_skipping(
            m,
            x,
            false,
            filter,
            Some("bluegreen_src"),
            "    ",
        ));
    }
    if !local.is_empty() {
        let inner = "        ";
        body.push_str(&format!(
            "    {}\n    BEGIN\n{inner}lt := pg_catalog.current_setting('lock_timeout');\n{inner}bluegreen_set := pg_catalog.set_config('lock_timeout', {STEP_LOCK_TIMEOUT}, true);\n{}{inner}bluegreen_set := pg_catalog.set_config('lock_timeout', lt, true);\n    EXCEPTION WHEN OTHERS THEN\n{inner}IF bluegreen_old THEN\n{inner}    IF SQLSTATE IN ('55P03', '40P01') THEN\n{inner}        {GIVE_WAY};\n{inner}    END IF;\n{inner}    RAISE;\n{inner}END IF;\n{}    END;\n    IF bluegreen_defer THEN\n{}    END IF;\n    {}\n",
            set_guard(m, "'f:' || bluegreen_depth::pg_catalog.text"),
            cut_over_steps(m, &local, reversed, inner),
            log_rows_skipping(m, x, true, filter, Some("bluegreen_src"), inner),
            log_rows_skipping(m, x, true, filter, Some("bluegreen_src"), inner),
            set_guard(m, "bluegreen_guard"),
        ));
    }
    function(m, n, &declare, &body)
}

/// An old session's write re-deriving a reversed entry the follower keeps, in its own statement:
/// the keys of its changed rows as text arrays, then the applier's own statements for them (green
/// rows locked first, upsert, other unique keys, the rows no longer produced deleted), run with
/// `EXECUTE ... USING`.
fn old_session_apply(m: &Mapping, e: &SyncEntry, indent: &str) -> String {
    let a = e.applier(m);
    let n = e.keys.len();
    let mut stmts = vec![a.green_lock.clone(), a.upsert.clone()];
    stmts.extend(a.unique_update.clone());
    stmts.push(a.delete.clone());
    stmts.extend(a.delete_null.clone());
    let using = join((0..n).map(|j| format!("bluegreen_k{j}")), ", ");
    let run: String = stmts
        .iter()
        .map(|s| {
            format!(
                "{indent}EXECUTE {} USING {using};\n",
                Literal::new(s.clone().into_string())
            )
        })
        .collect();
    format!("{}{run}", collect_keys(e, indent))
}

/// The keys of the statement's changed rows (new images for an insert, old for a delete, both
/// for an update) into the `bluegreen_k<j>` text arrays.
fn collect_keys(e: &SyncEntry, indent: &str) -> String {
    let n = e.keys.len();
    let into = join((0..n).map(|j| format!("bluegreen_k{j}")), ", ");
    let agg = join(
        (0..n).map(|j| format!("pg_catalog.array_agg(u.k{j})")),
        ", ",
    );
    let keys = |rel: &str| e.keys_of_driving_rows(rel).expect("checked by the caller");
    format!(
        "{indent}IF TG_OP = 'INSERT' THEN\n{indent}    SELECT {agg} INTO {into} FROM ({}) AS u;\n{indent}ELSIF TG_OP = 'UPDATE' THEN\n{indent}    SELECT {agg} INTO {into} FROM ({} UNION {}) AS u;\n{indent}ELSE\n{indent}    SELECT {agg} INTO {into} FROM ({}) AS u;\n{indent}END IF;\n",
        keys("new_rows"),
        keys("new_rows"),
        keys("old_rows"),
        keys("old_rows"),
    )
}

/// The row-local steps after the flip: each entry skipped when its own reverse wrote the rows;
/// entries without a reverse only insert what green does not have.
fn cut_over_steps(m: &Mapping, local: &[&SyncEntry], reversed: &[String], indent: &str) -> String {
    let unless_src = |e: &SyncEntry, stmts: Vec<String>| {
        let lines: String = stmts
            .iter()
            .map(|s| format!("{indent}        {s};\n"))
            .collect();
        format!(
            "{indent}    IF bluegreen_src IS DISTINCT FROM {} THEN\n{lines}{indent}    END IF;\n",
            Literal::new(&e.entry.name)
        )
    };
    let is_rev = |e: &SyncEntry| reversed.contains(&e.entry.name);
    let ups: String = local
        .iter()
        .map(|e| {
            if !is_rev(e) {
                // Insert-only: a row green cannot take (a green CHECK) waits as a sync failure,
                // as before the flip (DESIGN rule 7), whoever wrote blue: the follower's later
                // insert of what green lacks cannot overwrite a newer green write (third hostile
                // review, finding 7). A reversed entry's failure stays the old session's error:
                // green is the application's, and a blue write it does not hold would be lost to
                // the next green write of the row.
                return unless_src(
                    e,
                    vec![format!(
                        "BEGIN\n{indent}            {};\n{indent}        EXCEPTION WHEN OTHERS THEN\n{indent}            IF SQLSTATE IN ('55P03', '40P01') THEN\n{indent}                RAISE;\n{indent}            END IF;\n{indent}            bluegreen_defer := true;\n{indent}        END",
                        e.row_local_insert(m)
                    )],
                );
            }
            // A reversed entry: re-derived in full for an old session's write; for a split
            // partner's reverse, its existing rows only updated (the application writes its own).
            let full: String = e
                .row_local_upsert(m)
                .iter()
                .map(|s| format!("{indent}        {s};\n"))
                .collect();
            let partner = e
                .row_local_update_only(m)
                .map(|s| format!("{indent}        {s};\n"))
                .unwrap_or_default();
            format!(
                "{indent}    IF bluegreen_src IS NULL THEN\n{full}{indent}    ELSIF bluegreen_src <> {} THEN\n{partner}{indent}        NULL;\n{indent}    END IF;\n",
                Literal::new(&e.entry.name)
            )
        })
        .collect();
    let dels = |update: bool| -> String {
        local
            .iter()
            .rev()
            .filter(|e| is_rev(e))
            .map(|e| {
                let del = e.row_local_delete();
                match (update, e.key_left()) {
                    (true, Some(left)) => {
                        unless_src(e, vec![format!("IF EXISTS ({left}) THEN {del}; END IF")])
                    }
                    _ => unless_src(e, vec![del]),
                }
            })
            .collect()
    };
    format!(
        "{indent}IF TG_OP = 'INSERT' THEN\n{ups}{indent}ELSIF TG_OP = 'UPDATE' THEN\n{ups}{}{indent}ELSIF TG_OP = 'DELETE' THEN\n{}{indent}END IF;\n",
        dels(true),
        dels(false),
    )
}

/// The row-local steps in a subtransaction under a short `lock_timeout`; on any error their rows
/// go to the change log (all entries re-derive them), and the writer's statement goes on.
/// `short_wait` false after a rollback: the blue writer then waits for a green row a straggler
/// on green holds (the straggler's reverse gives way within milliseconds), rather than going on
/// and committing a blue write the straggler's reverse, waiting for the blue row, would then
/// overwrite with a value computed from green before it.
fn guarded(
    m: &Mapping,
    x: &QName,
    local: &[&SyncEntry],
    filter: Option<&UpdateFilter>,
    indent: &str,
    short_wait: bool,
) -> String {
    let inner = format!("{indent}    ");
    let (set, reset) = if short_wait {
        (
            format!(
                "{inner}lt := pg_catalog.current_setting('lock_timeout');\n{inner}bluegreen_set := pg_catalog.set_config('lock_timeout', {STEP_LOCK_TIMEOUT}, true);\n"
            ),
            format!("{inner}bluegreen_set := pg_catalog.set_config('lock_timeout', lt, true);\n"),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "{indent}BEGIN\n{set}{}{reset}{indent}EXCEPTION WHEN OTHERS THEN\n{inner}-- Never the writer's failure: the rows go to the change log, pending.\n{}{indent}END;\n",
        row_local_steps(m, local, &inner),
        log_rows(m, x, true, filter, &inner)
    )
}

/// Upserts parents first, deletes children first (green foreign keys), by statement kind.
fn row_local_steps(m: &Mapping, local: &[&SyncEntry], indent: &str) -> String {
    let ups: Vec<String> = local.iter().flat_map(|e| e.row_local_upsert(m)).collect();
    let dels: Vec<(String, Option<String>)> = local
        .iter()
        .rev()
        .map(|e| (e.row_local_delete(), e.key_left()))
        .collect();
    let line = |s: &String| format!("{indent}    {s};\n");
    let upserts: String = ups.iter().map(line).collect();
    // An UPDATE leaves a green row behind only where a key left old_rows (or a `where` now
    // filters the row out): the delete statement runs only then.
    let update_dels: String = dels
        .iter()
        .map(|(del, left)| match left {
            Some(left) => format!(
                "{indent}    IF EXISTS ({left}) THEN\n{indent}        {del};\n{indent}    END IF;\n"
            ),
            None => format!("{indent}    {del};\n"),
        })
        .collect();
    format!(
        "{indent}IF TG_OP = 'INSERT' THEN\n{}{indent}ELSIF TG_OP = 'UPDATE' THEN\n{}{}{indent}ELSIF TG_OP = 'DELETE' THEN\n{}{indent}END IF;\n",
        upserts,
        upserts,
        update_dels,
        dels.iter().map(|(d, _)| line(d)).collect::<String>(),
    )
}
