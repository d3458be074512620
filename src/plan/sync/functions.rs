//! The generated plpgsql functions: per blue table the trigger function (`capture` body during the
//! copy, `live` body afterwards) and `catchup_X(ids)`; per entry `retry_E()`. All share
//! [`apply_block`]: find the touched keys, lock them, upsert parents first, delete children first,
//! each entry in its own subtransaction whose failure is recorded, never raised.

use super::keys::{changes_relation, find_all_keys, find_keys};
use super::{MAX_KEY_LOCKS, SyncEntry, function_settings};
use crate::mapping::Mapping;
use crate::names;
use crate::sql::{Ident, Literal, QName, Sql, join, sql};

/// Variable declarations and the apply phase (lock, upsert parents first, delete children first,
/// each entry in its own subtransaction) for blue table `x`. `find` fills the key arrays.
pub(super) fn apply_block(
    m: &Mapping,
    entries: &[SyncEntry],
    x: &QName,
    find: &str,
    lock: bool,
    fast: bool,
) -> (String, String) {
    let touching: Vec<&SyncEntry> = entries
        .iter()
        .filter(|e| !e.aliases_of(x).is_empty())
        .collect();
    let mut decl = String::new();
    for e in &touching {
        for (j, (_, _, ty)) in e.keys.iter().enumerate() {
            decl.push_str(&format!("    e{}_k{j} {ty}[];\n", e.index));
        }
        decl.push_str(&format!("    e{}_ok boolean := true;\n", e.index));
    }
    let failures = QName::new(&m.control_schema, "sync_failures");
    let mut body = String::new();
    body.push_str(find);
    body.push_str("    PERFORM set_config('bluegreen.applying', 'forward', true);\n");
    let args = |e: &SyncEntry| {
        join(
            (0..e.keys.len()).map(|j| format!("e{}_k{j}", e.index)),
            ", ",
        )
    };
    let unnest_vars = |e: &SyncEntry| {
        format!(
            "unnest({}) AS u({})",
            args(e),
            join((0..e.keys.len()).map(|j| format!("k{j}")), ", ")
        )
    };
    let key_json = |e: &SyncEntry| {
        format!(
            "jsonb_build_array({})",
            join((0..e.keys.len()).map(|j| format!("u.k{j}")), ", ")
        )
    };
    let is_fast = |e: &SyncEntry| fast && e.row_local && &e.entry.from_clause.driving().table == x;
    // The fast path finds its keys only when it needs them: to record or clear a failure.
    let fill = |e: &SyncEntry| {
        let alias = e.entry.from_clause.driving().alias.as_str();
        format!(
            "            IF e{i}_k0 IS NULL THEN\n                IF TG_OP = 'INSERT' THEN\n                    {}\n                ELSIF TG_OP = 'UPDATE' THEN\n                    {}\n                ELSIF TG_OP = 'DELETE' THEN\n                    {}\n                END IF;\n            END IF;\n",
            e.collect_keys(&e.touched_keys(alias, "new_rows")),
            e.collect_keys(&e.touched_keys(
                alias,
                "(SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows)"
            )),
            e.collect_keys(&e.touched_keys(alias, "old_rows")),
            i = e.index,
        )
    };
    let record = |e: &SyncEntry| {
        let prefix = if is_fast(e) { fill(e) } else { String::new() };
        prefix
            + &format!(
                "            e{i}_ok := false;\n            INSERT INTO {failures} (migration, green_table, sync_key, error)\n            SELECT DISTINCT {mig}, {t}, {kj}, SQLSTATE || ': ' || SQLERRM FROM {u}\n            ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();\n",
                i = e.index,
                mig = Literal::new(&m.migration),
                t = Literal::new(&e.entry.name),
                kj = key_json(e),
                u = unnest_vars(e)
            )
    };
    // Lock every touched key first, in one global order (entry order, then key hash). A statement
    // touching many keys takes the entry's lock exclusively instead (bounded lock-table use);
    // per-key lockers hold it shared. Catch-up runs alone under the runner lock and skips this.
    // An entry that reads one blue table, ungrouped, changed through that table, derives each
    // green row from the blue row of the same key alone: the blue row lock already serialises
    // writers, so no advisory lock is needed.
    let self_contained = |e: &SyncEntry| {
        e.entry.group_by.is_empty()
            && e.entry.from_clause.items.len() == 1
            && &e.entry.from_clause.items[0].table == x
    };
    for e in touching.iter().filter(|e| lock && !self_contained(e)) {
        body.push_str(&format!(
            "    IF {first} IS NOT NULL THEN\n        IF cardinality({first}) > {MAX_KEY_LOCKS} THEN\n            PERFORM pg_advisory_xact_lock(hashtextextended({p}, 0));\n        ELSE\n            PERFORM pg_advisory_xact_lock_shared(hashtextextended({p}, 0));\n            PERFORM pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended({p} || ROW({ks})::text, 0) AS h FROM {u} ORDER BY 1) AS s;\n        END IF;\n    END IF;\n",
            first = format!("e{}_k0", e.index),
            p = Literal::new(format!("bluegreen:{}:{}:", m.migration, e.entry.name)),
            ks = join((0..e.keys.len()).map(|j| format!("u.k{j}")), ", "),
            u = unnest_vars(e)
        ));
    }
    let guard = |e: &SyncEntry| {
        if is_fast(e) {
            "TRUE".to_string()
        } else {
            format!("e{}_k0 IS NOT NULL", e.index)
        }
    };
    let up = |e: &SyncEntry| {
        let generic = e.up_sql(m, &format!("e{}_k", e.index));
        if is_fast(e) {
            format!(
                "IF TG_OP = 'TRUNCATE' THEN\n                IF e{i}_k0 IS NOT NULL THEN\n                    {generic}\n                END IF;\n            ELSIF TG_OP <> 'DELETE' THEN\n                {fast}\n            END IF;",
                i = e.index,
                fast = e.fast_up_sql(m, "new_rows")
            )
        } else {
            generic
        }
    };
    let del = |e: &SyncEntry| {
        let generic = e.del_sql(m, &format!("e{}_k", e.index));
        if is_fast(e) {
            format!(
                "IF TG_OP = 'TRUNCATE' THEN\n                IF e{i}_k0 IS NOT NULL THEN\n                    {generic}\n                END IF;\n            ELSIF TG_OP = 'UPDATE' THEN\n                {upd}\n            ELSIF TG_OP = 'DELETE' THEN\n                {dele}\n            END IF;",
                i = e.index,
                upd = e.fast_del_sql(m, "old_rows", Some("new_rows")),
                dele = e.fast_del_sql(m, "old_rows", None)
            )
        } else {
            generic
        }
    };
    if let [e] = touching.as_slice() {
        // One entry: upsert and delete in a single subtransaction (half the cost per statement).
        body.push_str(&format!(
            "    IF {g} THEN\n        BEGIN\n            {up}\n            {del}\n        EXCEPTION WHEN OTHERS THEN\n{rec}        END;\n    END IF;\n",
            g = guard(e),
            up = up(e),
            del = del(e),
            rec = record(e)
        ));
    }
    for e in touching.iter().filter(|_| touching.len() > 1) {
        body.push_str(&format!(
            "    IF {g} THEN\n        BEGIN\n            {sql}\n        EXCEPTION WHEN OTHERS THEN\n{rec}        END;\n    END IF;\n",
            g = guard(e),
            sql = up(e),
            rec = record(e)
        ));
    }
    for e in touching.iter().rev().filter(|_| touching.len() > 1) {
        body.push_str(&format!(
            "    IF {g} THEN\n        BEGIN\n            {sql}\n        EXCEPTION WHEN OTHERS THEN\n{rec}        END;\n    END IF;\n",
            g = guard(e),
            sql = del(e),
            rec = record(e)
        ));
    }
    // Keys that re-derived cleanly are no longer failed.
    for e in &touching {
        body.push_str(&format!(
            "    IF e{i}_ok AND {g} AND EXISTS (SELECT 1 FROM {failures} WHERE migration = {mig} AND green_table = {t}) THEN\n{fill}        DELETE FROM {failures} AS x WHERE x.migration = {mig} AND x.green_table = {t} AND x.sync_key IN (SELECT {kj} FROM {u});\n    END IF;\n",
            i = e.index,
            g = guard(e),
            fill = if is_fast(e) { fill(e) } else { String::new() },
            mig = Literal::new(&m.migration),
            t = Literal::new(&e.entry.name),
            kj = key_json(e),
            u = unnest_vars(e),
        ));
    }
    body.push_str("    PERFORM set_config('bluegreen.applying', '', true);\n");
    (decl, body)
}

/// The change-log statements of a trigger (capture mode, and the live mode's fallback).
pub(super) fn log_changes(m: &Mapping) -> String {
    let changes = QName::new(&m.control_schema, "changes");
    let mig = Literal::new(&m.migration);
    format!(
        "    IF TG_OP = 'INSERT' THEN
        INSERT INTO {changes} (migration, blue_table, op, new_row)
        SELECT {mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'I', to_jsonb(n) FROM new_rows n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO {changes} (migration, blue_table, op, old_row, new_row)
        SELECT {mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', to_jsonb(o), NULL FROM old_rows o
        UNION ALL
        SELECT {mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', NULL, to_jsonb(n) FROM new_rows n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {changes} (migration, blue_table, op, old_row)
        SELECT {mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'D', to_jsonb(o) FROM old_rows o;
    ELSE
        INSERT INTO {changes} (migration, blue_table, op)
        VALUES ({mig}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'T');
    END IF;
"
    )
}

/// The live trigger function for blue table `x`: re-derive inside the writer's transaction.
///
/// Whatever cannot be re-derived right here never fails the application's write: a writer
/// outside READ COMMITTED (its snapshot would not see a concurrent writer's commit after a lock
/// wait), or any error outside the per-entry blocks (a key that does not fit its green type, a
/// deadlock between lock waits), sends the changed rows to the change log instead, where `status`
/// shows them as backlog and `sync` re-derives them.
pub fn live_trigger_function(m: &Mapping, entries: &[SyncEntry], x: &QName, n: usize) -> Sql {
    let find = format!(
        "    IF TG_OP = 'INSERT' THEN\n{}    ELSIF TG_OP = 'UPDATE' THEN\n{}    ELSIF TG_OP = 'DELETE' THEN\n{}    ELSE\n{}    END IF;\n",
        find_keys(m, entries, x, "new_rows", "        ", true),
        find_keys(
            m,
            entries,
            x,
            "(SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows)",
            "        ",
            true
        ),
        find_keys(m, entries, x, "old_rows", "        ", true),
        find_all_keys(m, entries, x, "        "),
    );
    let (decl, body) = apply_block(m, entries, x, &find, true, true);
    let wrapped = format!(
        "    BEGIN\n{body}    EXCEPTION WHEN OTHERS THEN\n        RAISE WARNING 'bluegreen: sync of this change deferred to the change log (run bluegreen sync): % %', SQLSTATE, SQLERRM;\n{}    END;\n",
        log_changes(m)
    );
    // Always inside the outer block: recording or clearing a failure computes keys, and that
    // can fail too (a key that does not fit its green type); the write must still succeed.
    let main = wrapped;
    sql!(
        "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql {settings} AS $fn$\nDECLARE\n    lock_ids bigint[];\n{decl}BEGIN\n    -- Loop guard: a change the reverse sync is applying is not echoed back.\n    IF current_setting('bluegreen.applying', true) = 'reverse' THEN\n        RETURN NULL;\n    END IF;\n    IF current_setting('transaction_isolation') <> 'read committed' THEN\n{log}        RETURN NULL;\n    END IF;\n{main}    RETURN NULL;\nEND\n$fn$",
        f = names::sync_function(&m.control_schema, &m.migration, n),
        settings = function_settings(m),
        log = log_changes(m),
    )
}

/// The capture trigger function for blue table `x` (during copy): log the changed rows.
pub fn capture_trigger_function(m: &Mapping, n: usize) -> Sql {
    sql!(
        "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$\nBEGIN\n    IF current_setting('bluegreen.applying', true) = 'reverse' THEN\n        RETURN NULL;\n    END IF;\n{log}    RETURN NULL;\nEND\n$fn$",
        f = names::sync_function(&m.control_schema, &m.migration, n),
        log = log_changes(m),
    )
}

/// `catchup_X(ids)`: re-derive the keys touched by the change-log rows `ids` of blue table `x`.
/// Takes the same locks as the live triggers: in live mode it runs beside them.
pub fn catchup_function(m: &Mapping, entries: &[SyncEntry], x: &QName, n: usize) -> Sql {
    let ch = QName::new(&m.control_schema, "changes");
    let find = format!(
        "    IF EXISTS (SELECT 1 FROM {ch} AS c WHERE c.migration = {mig} AND c.blue_table = {bt} AND c.id = ANY (ids) AND c.op = 'T') THEN\n{}    ELSE\n{}    END IF;\n",
        find_all_keys(m, entries, x, "        "),
        find_keys(m, entries, x, &changes_relation(m, x), "        ", false),
        mig = Literal::new(&m.migration),
        bt = Literal::new(x.display()),
    );
    let (decl, body) = apply_block(m, entries, x, &find, true, false);
    sql!(
        "CREATE OR REPLACE FUNCTION {f}(ids bigint[]) RETURNS void LANGUAGE plpgsql {settings} AS $fn$\nDECLARE\n    lock_ids bigint[];\n{decl}BEGIN\n{body}END\n$fn$",
        f = names::catchup_function(&m.control_schema, &m.migration, n),
        settings = function_settings(m),
    )
}

/// `retry_E()`: re-derive every key recorded as failed for entry E. The blue rows of those keys
/// are locked FOR SHARE first, so a writer in flight on them commits before the re-derivation
/// reads (writers of self-contained entries take no advisory locks).
pub fn retry_function(m: &Mapping, e: &SyncEntry) -> Sql {
    let failures = QName::new(&m.control_schema, "sync_failures");
    let decl = format!(
        "    lock_ids bigint[];\n{}    e{}_ok boolean := true;\n",
        join(
            e.keys
                .iter()
                .enumerate()
                .map(|(j, (_, _, ty))| format!("    e{}_k{j} {ty}[];\n", e.index)),
            ""
        ),
        e.index
    );
    let vars = join(
        (0..e.keys.len()).map(|j| format!("e{}_k{j}", e.index)),
        ", ",
    );
    let fill = format!(
        "    SELECT {} INTO {vars} FROM {failures} AS f WHERE f.migration = {} AND f.green_table = {};\n    IF e{i}_k0 IS NOT NULL THEN\n        PERFORM 1 FROM {from} WHERE {tuple} IN (SELECT * FROM unnest({vars})) FOR SHARE OF {driving};\n    END IF;\n",
        join(
            e.keys
                .iter()
                .enumerate()
                .map(|(j, (_, _, ty))| format!("array_agg((f.sync_key->>{j})::{ty})")),
            ", "
        ),
        Literal::new(&m.migration),
        Literal::new(&e.entry.name),
        i = e.index,
        from = e.entry.from_clause.render(),
        tuple = e.key_tuple(),
        driving = Ident::new(&e.entry.from_clause.driving().alias),
    );
    // Apply for this entry alone, reusing the same block with a one-entry list.
    let one = [SyncEntry {
        index: e.index,
        entry: e.entry,
        green: e.green,
        keys: e.keys.clone(),
        upsert_key: e.upsert_key.clone(),
        nullable: e.nullable,
        row_local: false,
    }];
    let x = &e.entry.from_clause.driving().table;
    let (_, body) = apply_block(m, &one, x, &fill, true, false);
    sql!(
        "CREATE OR REPLACE FUNCTION {f}() RETURNS void LANGUAGE plpgsql {settings} AS $fn$\nDECLARE\n{decl}BEGIN\n{body}END\n$fn$",
        f = names::retry_function(&m.control_schema, &m.migration, e.index, &e.entry.name),
        settings = function_settings(m),
    )
}
