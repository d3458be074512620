//! The generated trigger functions, one per blue table the mapping reads (its partitions and
//! inheritance children call the same function): the capture body during the copy (log every
//! changed row) and the live body afterwards (row-local entries in the statement, the rest logged
//! for the follower). They take no lock beyond the writer's own writes, never wait for another
//! application transaction on sync's account, and never fail the writer's statement: a row-local
//! step that could fail runs in a subtransaction under a short `lock_timeout`, and if it fails or
//! times out its rows go to the change log, pending, for the follower.

use super::{Mode, SyncEntry, function_settings};
use crate::mapping::Mapping;
use crate::names;
use crate::sql::{Ident, Literal, QName, Sql, join, sql};

/// How long a row-local step inside the writer's statement may wait for a lock (an applier's
/// short transaction) before it gives way to the change log: 50 ms, or half the session's
/// `deadlock_timeout` when that is shorter (in a lock cycle the step gives way, never the
/// writer).
pub const STEP_LOCK_TIMEOUT: &str = "GREATEST(1, LEAST(50, pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.current_setting('deadlock_timeout')::pg_catalog.interval) * 500)))::pg_catalog.int4::pg_catalog.text || 'ms'";

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
            "INSERT INTO {changes} (migration, blue_table, op, old_row, new_row, all_entries) SELECT {mig}, {bt}, '{op}', {old}, {new}, {all_entries} FROM {rel} AS r;"
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
                "INSERT INTO {changes} (migration, blue_table, op, old_row, new_row, all_entries, entries) SELECT {mig}, {bt}, 'U', bluegreen_p.old_image, bluegreen_p.new_image, {all_entries}, bluegreen_p.entries FROM (SELECT CASE WHEN {} THEN pg_catalog.to_jsonb(bluegreen_o.*) END AS old_image, CASE WHEN {} THEN pg_catalog.to_jsonb(bluegreen_n.*) END AS new_image, CASE WHEN {} AND {} THEN pg_catalog.array_remove(ARRAY[{cases}]::pg_catalog.text[], NULL) END AS entries FROM old_rows AS bluegreen_o FULL JOIN new_rows AS bluegreen_n ON {on}) AS bluegreen_p WHERE bluegreen_p.entries IS NULL OR pg_catalog.cardinality(bluegreen_p.entries) > 0;",
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
    let filter = bt.and_then(|bt| UpdateFilter::new(entries, bt));
    let filter = filter.as_ref();
    let followed = entries
        .iter()
        .any(|e| !e.row_local() && !e.aliases_of(x).is_empty());
    let local: Vec<&SyncEntry> = entries
        .iter()
        .filter(|e| e.row_local() && e.driving() == x)
        .collect();
    let mut body = log_truncate(m, x);
    if local.is_empty() {
        if followed {
            body.push_str(&log_rows(m, x, false, filter, "    "));
        }
        return function(m, n, "", &body);
    }
    // The isolation level, read once per statement.
    let declare = "DECLARE\n    lt text;\n    bluegreen_set text;\n    bluegreen_iso text := pg_catalog.current_setting('transaction_isolation');\n";
    // A SERIALIZABLE writer's rows go to the change log for every entry: a row-local step
    // reads blue inside the writer's transaction, and its predicate locks (which outlive the
    // step's subtransaction) would fail application commits that never conflicted (H2-11).
    body.push_str(&format!(
        "    IF bluegreen_iso = 'serializable' THEN\n{}        RETURN NULL;\n    END IF;\n",
        log_rows(m, x, true, filter, "        ")
    ));
    if followed {
        body.push_str(&log_rows(m, x, false, filter, "    "));
    }
    // A step that cannot fail runs bare (no subtransaction) in READ COMMITTED; in REPEATABLE
    // READ a concurrent applier's commit could still raise a serialization error.
    let all_infallible = local
        .iter()
        .all(|e| matches!(e.mode, Mode::RowLocal { infallible: true }));
    if all_infallible {
        body.push_str(&format!(
            "    IF bluegreen_iso = 'read committed' THEN\n{}    ELSE\n{}    END IF;\n",
            row_local_steps(m, &local, "        "),
            guarded(m, x, &local, filter, "        ")
        ));
    } else {
        body.push_str(&guarded(m, x, &local, filter, "    "));
    }
    function(m, n, declare, &body)
}

/// The row-local steps in a subtransaction under a short `lock_timeout`; on any error their rows
/// go to the change log (all entries re-derive them), and the writer's statement goes on.
fn guarded(
    m: &Mapping,
    x: &QName,
    local: &[&SyncEntry],
    filter: Option<&UpdateFilter>,
    indent: &str,
) -> String {
    let inner = format!("{indent}    ");
    format!(
        "{indent}BEGIN\n{inner}lt := pg_catalog.current_setting('lock_timeout');\n{inner}bluegreen_set := pg_catalog.set_config('lock_timeout', {STEP_LOCK_TIMEOUT}, true);\n{}{inner}bluegreen_set := pg_catalog.set_config('lock_timeout', lt, true);\n{indent}EXCEPTION WHEN OTHERS THEN\n{inner}-- Never the writer's failure: the rows go to the change log, pending.\n{}{indent}END;\n",
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
