//! Reverse sync (DESIGN.md steps 5 and 6, rules "after cutover"): after the flip the application
//! writes green, and each invertible entry's green table carries a statement trigger that writes
//! the same change back into its driving blue table, so `green = M(blue)` holds on (each green
//! row written comes back through `M` from the blue row its reverse wrote) and a rollback loses
//! nothing.
//!
//! - a green `INSERT` is a plain blue `INSERT` (a key conflict is the green writer's error, never
//!   merged); identity columns are written `OVERRIDING SYSTEM VALUE`, generated ones never;
//! - an `UPDATE` writes only the blue columns whose reversed value changed between the row's old
//!   and new green image (an old session's concurrent write to another column survives); an
//!   update of a green key is refused (a statement trigger cannot pair its rows);
//! - a `DELETE` deletes the blue rows by key; `TRUNCATE` is refused.
//!
//! The loop guard: a transaction-local setting (`names::guard_setting`) holding which applier is
//! writing and at which trigger depth, `f:<depth>` for forward sync, `r:<depth>:<entry>` for a
//! reverse; each sets it around its writes and restores the previous value. A reverse trigger
//! does nothing inside a forward apply (its green writes are the echo of blue); the forward
//! trigger on blue skips the entry whose reverse wrote the blue rows, and re-derives every other
//! entry reading them.
//!
//! After a rollback the reverse triggers stay (sessions opened during the cutover may still write
//! green), and give way: under a short `lock_timeout`, a wait for a blue row is turned into a
//! retryable `40001` for the green straggler, never a wait the blue application depends on.

use super::guard::{STEP_LOCK_TIMEOUT, guard_declare, in_forward_apply, set_guard};
use super::{SyncEntry, function_settings};
use crate::catalog::{Catalog, Table};
use crate::mapping::Mapping;
use crate::names;
use crate::plan::reverse::{Verdict, reverse_plan};
use crate::sql::{Expr, Ident, Literal, QName, Sql, join, sql};

/// What the reverse trigger of one entry writes.
#[derive(Clone, Debug)]
pub struct Reversal {
    pub entry: String,
    pub index: usize,
    pub green: QName,
    pub blue: QName,
    /// (blue column, expression over the green row), generated blue columns left out.
    pub columns: Vec<(String, String)>,
    /// The blue key the rows are found by (primary key, else a strict unique key).
    pub blue_key: Vec<String>,
    /// The green columns that pair an update's old and new rows.
    pub green_key: Vec<String>,
    /// A blue identity column `GENERATED ALWAYS` is written.
    pub overriding: bool,
    /// The blue type of each of `columns`.
    pub types: Vec<String>,
    /// The row owner inserts and deletes blue rows; a column owner (another entry of a split)
    /// only updates the columns it owns, on rows the row owner wrote.
    pub row_owner: bool,
    /// The entry's sync key, as green columns with their types (how `sync_failures` records a
    /// key).
    pub sync_key: Vec<(String, String)>,
    /// Kept row-local: a blue write re-derives it in its own statement, so only the change rows
    /// logged for every entry (a step that gave way) leave its green rows behind.
    pub row_local: bool,
}

/// The entries whose green writes reverse into blue: invertible (every blue column comes back),
/// with the whole blue key among the reversed columns.
pub fn reversals(m: &Mapping, entries: &[SyncEntry], cat: &Catalog) -> Vec<Reversal> {
    let mut out = Vec::new();
    for e in entries {
        let rp = reverse_plan(m, e.entry, cat);
        if !matches!(rp.verdict, Verdict::Invertible | Verdict::ColumnOwner) {
            continue;
        }
        let Some(bt) = cat.table(e.driving()) else {
            continue;
        };
        let Some(blue_key) = blue_key(bt) else {
            continue;
        };
        let columns: Vec<(String, String)> = rp
            .columns
            .iter()
            .filter(|(c, _)| bt.column(c).is_some_and(|bc| bc.generated.is_empty()))
            .cloned()
            .collect();
        if !blue_key.iter().all(|k| columns.iter().any(|(c, _)| c == k)) {
            continue;
        }
        let overriding = columns
            .iter()
            .any(|(c, _)| bt.column(c).is_some_and(|bc| bc.identity == "a"));
        let types = columns
            .iter()
            .map(|(c, _)| {
                bt.column(c)
                    .map(|bc| bc.type_sql.clone())
                    .unwrap_or_default()
            })
            .collect();
        out.push(Reversal {
            entry: e.entry.name.clone(),
            index: e.index,
            green: e.green.qname(),
            blue: bt.qname(),
            columns,
            blue_key,
            green_key: e.upsert_key.clone(),
            overriding,
            types,
            row_owner: rp.verdict == Verdict::Invertible,
            sync_key: e
                .keys
                .iter()
                .map(|k| (k.green.clone(), k.green_type.clone()))
                .collect(),
            row_local: e.row_local(),
        });
    }
    out
}

/// The blue key values of a reversed entry that a green write could not find again: the green
/// key is a cast of the blue key column that does not keep every value (`u.id::uuid` of a text
/// id), and the automatic reverse casts it back to one form (`'BBBB...'` and `'bbbb...'` are one
/// uuid, which comes back as `'bbbb...'`). As a condition over a relation aliased as the driving
/// table (`None` when every key column comes back as it was).
pub fn key_round_trip(e: &SyncEntry, bt: &Table) -> Option<String> {
    let alias = &e.entry.from_clause.driving().alias;
    let key = blue_key(bt)?;
    let declared: Vec<&String> = match &e.entry.reverse {
        crate::mapping::Reverse::Columns(cols) => cols.iter().map(|(c, _)| c).collect(),
        _ => Vec::new(),
    };
    let conds: Vec<String> = e
        .keys
        .iter()
        .filter(|k| k.blue.is_none())
        .filter_map(|k| {
            let c = crate::plan::keys::cast_of(&k.expr, alias)?;
            let bc = bt.column(&c)?;
            if !key.contains(&c) || declared.contains(&&c) {
                return None;
            }
            Some(format!(
                "(({}))::{} IS DISTINCT FROM {}.{}",
                Expr(&k.expr),
                crate::plan::reverse::inverted_cast_type(bc),
                Ident::new(alias),
                Ident::new(&c)
            ))
        })
        .collect();
    (!conds.is_empty()).then(|| join(conds, " OR "))
}

/// A blue key value of `e` (as text) that does not come back from green unchanged, selected from
/// `rel` (a table or a transition table), for messages.
pub fn key_round_trip_example(e: &SyncEntry, bt: &Table, rel: &str) -> Option<String> {
    let cond = key_round_trip(e, bt)?;
    let alias = Ident::new(&e.entry.from_clause.driving().alias);
    let key = blue_key(bt)?;
    Some(format!(
        "SELECT ({})::pg_catalog.text FROM {rel} AS {alias} WHERE {cond} LIMIT 1",
        join(
            key.iter().map(|k| format!("{alias}.{}", Ident::new(k))),
            " OPERATOR(pg_catalog.||) ', ' OPERATOR(pg_catalog.||) "
        )
    ))
}

fn blue_key(bt: &Table) -> Option<Vec<String>> {
    bt.primary_key
        .as_ref()
        .map(|k| k.columns.clone())
        .or_else(|| bt.strict_unique_keys().into_iter().next())
}

/// `<prefix>k0::text = $1[1] AND ...`: a key given as one text array parameter.
fn key_is_param(prefix: &str, key: &[String]) -> String {
    join(
        key.iter()
            .enumerate()
            .map(|(j, k)| format!("{prefix}{}::pg_catalog.text = $1[{}]", Ident::new(k), j + 1)),
        " AND ",
    )
}

impl Reversal {
    fn side(&self, rel: &str) -> String {
        let mut cols: Vec<String> = self
            .green_key
            .iter()
            .enumerate()
            .map(|(j, k)| format!("{} AS gk{j}", Ident::new(k)))
            .collect();
        cols.extend(
            self.columns
                .iter()
                .enumerate()
                .map(|(j, (_, x))| format!("({}) AS v{j}", Expr(x))),
        );
        format!("SELECT {} FROM {rel}", join(cols, ", "))
    }
    fn col_index(&self, c: &str) -> usize {
        self.columns
            .iter()
            .position(|(b, _)| b == c)
            .expect("key columns are reversed")
    }
    fn key_match(&self, b: &str, p: &str, prefix: &str) -> String {
        join(
            self.blue_key
                .iter()
                .map(|k| format!("{b}.{} = {p}.{prefix}{}", Ident::new(k), self.col_index(k))),
            " AND ",
        )
    }

    fn insert(&self) -> String {
        format!(
            "INSERT INTO {} ({}){} SELECT {} FROM ({}) AS n",
            self.blue,
            join(self.columns.iter().map(|(c, _)| Ident::new(c)), ", "),
            if self.overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            },
            join((0..self.columns.len()).map(|j| format!("n.v{j}")), ", "),
            self.side("new_rows")
        )
    }

    fn key_moved(&self) -> String {
        let on = join(
            (0..self.green_key.len()).map(|j| format!("n.gk{j} = o.gk{j}")),
            " AND ",
        );
        format!(
            "EXISTS (SELECT 1 FROM ({}) AS o WHERE NOT EXISTS (SELECT 1 FROM ({}) AS n WHERE {on}))",
            self.side("old_rows"),
            self.side("new_rows")
        )
    }

    /// An update's rows paired old with new (`p`, with `o<j>` / `n<j>` per reversed column) and
    /// the condition that some non-key reversed column changed; `None` when only key columns are
    /// reversed (an update then writes nothing to blue).
    fn paired(&self) -> Option<(String, String)> {
        let set: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| !self.blue_key.contains(c))
            .map(|(j, _)| j)
            .collect();
        if set.is_empty() {
            return None;
        }
        let on = join(
            (0..self.green_key.len()).map(|j| format!("n.gk{j} = o.gk{j}")),
            " AND ",
        );
        let cols: Vec<String> = (0..self.columns.len())
            .map(|j| format!("o.v{j} AS o{j}, n.v{j} AS n{j}"))
            .collect();
        Some((
            format!(
                "(SELECT {} FROM ({}) AS o JOIN ({}) AS n ON {on}) AS p",
                join(cols, ", "),
                self.side("old_rows"),
                self.side("new_rows")
            ),
            join(set.iter().map(|j| Self::differs(*j)), " OR "),
        ))
    }

    fn differs(j: usize) -> String {
        format!("(p.o{j})::pg_catalog.text IS DISTINCT FROM (p.n{j})::pg_catalog.text")
    }

    fn update(&self) -> Option<String> {
        let (paired, any) = self.paired()?;
        let set: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| !self.blue_key.contains(c))
            .map(|(j, (c, _))| {
                format!(
                    "{c} = CASE WHEN {} THEN p.n{j} ELSE b.{c} END",
                    Self::differs(j),
                    c = Ident::new(c)
                )
            })
            .collect();
        Some(format!(
            "UPDATE {b} AS b SET {set} FROM {paired} WHERE {key} AND ({any})",
            b = self.blue,
            set = join(set, ", "),
            key = self.key_match("b", "p", "n"),
        ))
    }

    /// `UPDATE` of the owned columns from the rows of `rel` (a column owner's insert, its retry).
    fn set_owned(&self, rel: &str) -> String {
        let set: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| !self.blue_key.contains(c))
            .map(|(j, (c, _))| format!("{} = p.v{j}", Ident::new(c)))
            .collect();
        format!(
            "UPDATE {} AS b SET {} FROM ({}) AS p WHERE {}",
            self.blue,
            join(set, ", "),
            self.side(rel),
            self.key_match("b", "p", "v")
        )
    }

    fn delete(&self) -> String {
        format!(
            "DELETE FROM {} AS b USING ({}) AS p WHERE {}",
            self.blue,
            self.side("old_rows"),
            self.key_match("b", "p", "v")
        )
    }

    /// `SELECT ... FOR UPDATE` of the green row of one key (`$1`, as `retry`).
    pub fn lock_green(&self) -> Sql {
        sql!(
            "SELECT 1 FROM {} WHERE {} FOR UPDATE",
            self.green,
            key_is_param("", &self.green_key)
        )
    }

    /// The green keys of the statement's rows as `jsonb` text arrays (`reverse_failures`).
    fn failed_keys(&self, rel: &str) -> String {
        format!(
            "SELECT DISTINCT pg_catalog.jsonb_build_array({}) AS k FROM {rel}",
            join(
                self.green_key
                    .iter()
                    .map(|k| format!("{}::pg_catalog.text", Ident::new(k))),
                ", "
            )
        )
    }

    /// Record the statement's keys as reverse failures with the error in flight.
    fn record_failure(&self, m: &Mapping, indent: &str) -> String {
        let ins = |rel: &str| {
            format!(
                "INSERT INTO {} AS f (migration, green_table, green_key, error) SELECT {}, {}, r.k, SQLSTATE || ': ' || SQLERRM FROM ({}) AS r ON CONFLICT (migration, green_table, green_key) DO UPDATE SET error = EXCLUDED.error, failed_at = pg_catalog.now();",
                QName::new(&m.control_schema, "reverse_failures"),
                Literal::new(&m.migration),
                Literal::new(&self.entry),
                self.failed_keys(rel)
            )
        };
        format!(
            "{indent}IF TG_OP = 'DELETE' THEN\n{indent}    {}\n{indent}ELSE\n{indent}    {}\n{indent}END IF;\n",
            ins("old_rows"),
            ins("new_rows")
        )
    }

    /// The statement putting blue back to `R(green)` for one green key (`$1`, the key's values as
    /// text): the row upserted from green, or deleted when green has none (blue's key compared
    /// as text with green's, as an auto-inverted key is green's own value). `sync` retries
    /// reverse failures with it.
    pub fn retry(&self) -> Sql {
        let gk = key_is_param("", &self.green_key);
        if !self.row_owner {
            return sql!(
                "{}",
                self.set_owned(&format!("(SELECT * FROM {} WHERE {gk}) AS g", self.green))
            );
        }
        let bk = key_is_param("b.", &self.blue_key);
        let set: Vec<String> = self
            .columns
            .iter()
            .filter(|(c, _)| !self.blue_key.contains(c))
            .map(|(c, _)| format!("{0} = EXCLUDED.{0}", Ident::new(c)))
            .collect();
        let conflict = if set.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", join(set, ", "))
        };
        sql!(
            "WITH d AS (DELETE FROM {blue} AS b WHERE {bk} AND NOT EXISTS (SELECT 1 FROM {green} WHERE {gk})) INSERT INTO {blue} ({cols}){ov} SELECT {vals} FROM ({side}) AS n ON CONFLICT ({key}) {conflict}",
            blue = self.blue,
            green = self.green,
            cols = join(self.columns.iter().map(|(c, _)| Ident::new(c)), ", "),
            ov = if self.overriding {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            },
            vals = join((0..self.columns.len()).map(|j| format!("n.v{j}")), ", "),
            side = self.side(&format!("(SELECT * FROM {} WHERE {gk}) AS g", self.green)),
            key = join(self.blue_key.iter().map(Ident::new), ", "),
        )
    }

    /// The reverse trigger function (`rolled_back`: after a rollback, giving way to blue).
    ///
    /// A reverse that fails (a green value blue's narrower type cannot hold, a blue constraint)
    /// never fails the green writer: its keys are recorded in `reverse_failures` (which `status`
    /// shows, `validate` counts and finds as `green = M(blue)` differences, and `rollback` refuses on) and
    /// `sync` retries them. Failures that are the writer's: a blue key conflict on a green insert
    /// (never merged: design review L2) and, after a rollback, every one (a wait for a blue row
    /// as 40001, the rest with blue's error: blue is the application's again).
    pub fn function(&self, m: &Mapping, rolled_back: bool) -> Sql {
        let entry = Literal::new(&self.entry);
        let steps = if self.row_owner {
            format!(
                "            IF TG_OP = 'INSERT' THEN\n                {};\n            ELSIF TG_OP = 'UPDATE' THEN\n{}            ELSIF TG_OP = 'DELETE' THEN\n                {};\n            END IF;\n",
                self.insert(),
                self.update()
                    .map(|u| format!("                {u};\n"))
                    .unwrap_or_default(),
                self.delete(),
            )
        } else {
            // A column owner: its inserted rows' columns go onto the blue rows the row owner
            // wrote (a row not there yet is a reverse failure, retried by `sync`); its deletes
            // are the row owner's to make.
            format!(
                "            IF TG_OP = 'INSERT' THEN\n                IF EXISTS (SELECT 1 FROM ({}) AS n WHERE NOT EXISTS (SELECT 1 FROM {} AS b WHERE {})) THEN\n                    RAISE EXCEPTION 'bluegreen: the blue row of a % insert is not there yet (insert the row owner''s row first)', {}::pg_catalog.text USING ERRCODE = 'foreign_key_violation';\n                END IF;\n                {};\n            ELSIF TG_OP = 'UPDATE' THEN\n{}            END IF;\n",
                self.side("new_rows"),
                self.blue,
                self.key_match("b", "n", "v"),
                Literal::new(self.green.display()),
                self.set_owned("new_rows"),
                self.update()
                    .map(|u| format!("                {u};\n"))
                    .unwrap_or_default(),
            )
        };
        let (set, reset, give_way) = if rolled_back {
            (
                format!("        lt := pg_catalog.current_setting('lock_timeout');\n        bluegreen_set := pg_catalog.set_config('lock_timeout', {STEP_LOCK_TIMEOUT}, true);\n"),
                "        bluegreen_set := pg_catalog.set_config('lock_timeout', lt, true);\n".to_string(),
                "        IF SQLSTATE IN ('55P03', '40P01') THEN\n            RAISE EXCEPTION 'bluegreen: the application is back on blue; this write to green gave way to a blue writer' USING ERRCODE = 'serialization_failure', HINT = 'retry, or reconnect to use blue';\n        END IF;\n".to_string(),
            )
        } else {
            (String::new(), String::new(), String::new())
        };
        let key_moved = format!(
            "    IF TG_OP = 'UPDATE' THEN\n        IF {} THEN\n            RAISE EXCEPTION 'bluegreen: an UPDATE of the key of % cannot be written back to blue during the migration', {}::pg_catalog.text USING ERRCODE = 'feature_not_supported', HINT = 'delete the row and insert it with its new key';\n        END IF;\n    END IF;\n",
            self.key_moved(),
            Literal::new(self.green.display()),
        );
        let key_moved = if self.row_owner {
            key_moved
        } else {
            format!(
                "{key_moved}    IF TG_OP = 'DELETE' THEN\n        RAISE EXCEPTION 'bluegreen: a DELETE from % cannot be written back to blue during the migration: its rows are deleted with the row owner''s', {}::pg_catalog.text USING ERRCODE = 'feature_not_supported', HINT = 'delete the row from the table that owns the blue row';\n    END IF;\n",
                Literal::new(self.green.display())
            )
        };
        // After a rollback blue is the application's again: a green straggler's write that cannot
        // reach it fails in its own statement. Recorded and retried later, the retry's whole green
        // row would go over blue writes made meanwhile (third hostile review, findings 3 and 4).
        let failed = if rolled_back {
            format!(
                "        RAISE EXCEPTION 'bluegreen: the application is back on blue (rolled back) and this write to % cannot reach it: %', {}::pg_catalog.text, SQLERRM USING ERRCODE = SQLSTATE, HINT = 'reconnect to use blue';\n",
                Literal::new(self.green.display())
            )
        } else {
            format!(
                "        -- The green write stands; blue lags for these keys until `sync` retries them.\n{}",
                self.record_failure(m, "        ")
            )
        };
        let stale = if rolled_back {
            self.stale(m)
        } else {
            String::new()
        };
        let body = format!(
            "{key_moved}    BEGIN\n{set}{stale}{steps}{reset}    EXCEPTION WHEN OTHERS THEN\n{give_way}        IF SQLSTATE = '23505' AND TG_OP = 'INSERT' THEN\n            RAISE;\n        END IF;\n{failed}    END;\n"
        );
        sql!(
            "CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql {settings} AS $fn$\n#variable_conflict use_column\nDECLARE\n    lt text;\n    bluegreen_set text;\n{declare}BEGIN\n    IF {inside} THEN\n        RETURN NULL;\n    END IF;\n    IF TG_OP = 'TRUNCATE' THEN\n        RAISE EXCEPTION 'bluegreen: TRUNCATE of % cannot be written back to blue during the migration', {g}::pg_catalog.text USING ERRCODE = 'feature_not_supported', HINT = 'DELETE the rows instead';\n    END IF;\n    {push}\n{body}    {pop}\n    RETURN NULL;\nEND\n$fn$",
            f = names::reverse_function(&m.control_schema, &m.migration, self.index),
            settings = function_settings(),
            declare = guard_declare(m),
            inside = in_forward_apply(),
            g = Literal::new(self.green.display()),
            push = set_guard(
                m,
                &format!("'r:' || bluegreen_depth::pg_catalog.text || ':' || {entry}")
            ),
            pop = set_guard(m, "bluegreen_guard"),
        )
    }

    /// After a rollback: a straggler's update or delete of green rows whose blue rows have a
    /// blue write green has not taken yet gives way (40001): pending in the change log (from
    /// another transaction, not the echo of a reverse of this entry), or set aside as a sync
    /// failure of the row's key. Green's row is stale until the follower applies it, and the
    /// reverse would put the straggler's value, computed from the stale row, over the blue
    /// application's committed one. Only rows whose reverse writes blue are judged (an update of
    /// green-only columns waits for nothing); their blue rows are locked first (`FOR NO KEY
    /// UPDATE`, as the reverse's own write would: a blue writer after that waits for the
    /// straggler, and its change is then newer than the straggler's write), and the change log
    /// is read after the lock, in a snapshot of its own.
    fn stale(&self, m: &Mapping) -> String {
        let changes = QName::new(&m.control_schema, "changes");
        let failures = QName::new(&m.control_schema, "sync_failures");
        let entry = Literal::new(&self.entry);
        let mig = Literal::new(&m.migration);
        let image = |img: &str, prefix: &str| {
            join(
                self.blue_key.iter().map(|k| {
                    let j = self.col_index(k);
                    format!(
                        "c.{img} -> {} = pg_catalog.to_jsonb((p.{prefix}{j})::{})",
                        Literal::new(k),
                        self.types[j]
                    )
                }),
                " AND ",
            )
        };
        let sync_key = format!(
            "pg_catalog.jsonb_build_array({})",
            join(
                self.sync_key
                    .iter()
                    .map(|(c, t)| format!("r.{}::{t}", Ident::new(c))),
                ", "
            )
        );
        let raise = format!(
            "RAISE EXCEPTION 'bluegreen: a blue write to this row of % has not reached green yet, so this write to green read a stale row', {}::pg_catalog.text USING ERRCODE = 'serialization_failure', HINT = 'retry once the follower applied it, or reconnect to use blue'",
            Literal::new(self.green.display())
        );
        // `rel`: the relation of the rows judged (aliased `p`), `filter` on them, `prefix` of
        // their reversed values, `green_rows` the transition table for the sync-failure keys.
        let check = |rel: &str, filter: &str, prefix: &str, green_rows: &str| {
            let key = self.key_match("b", "p", prefix);
            format!(
                "            PERFORM 1 FROM {b} AS b, {rel} WHERE {key} AND ({filter}) FOR NO KEY UPDATE OF b;\n            IF EXISTS (SELECT 1 FROM {changes} AS c, {rel} WHERE ({filter}) AND c.migration = {mig} AND c.blue_table = {bt} AND c.txid <> pg_catalog.pg_current_xact_id() AND c.skip_entry IS DISTINCT FROM {entry} AND (c.entries IS NULL OR {entry} = ANY (c.entries)){every} AND (({new}) OR ({old})))\n               OR EXISTS (SELECT 1 FROM {failures} AS f, {green_rows} AS r WHERE f.migration = {mig} AND f.green_table = {entry} AND f.sync_key = {sync_key}) THEN\n                {raise};\n            END IF;\n",
                b = self.blue,
                bt = Literal::new(self.blue.display()),
                new = image("new_row", prefix),
                old = image("old_row", prefix),
                every = if self.row_local {
                    " AND c.all_entries"
                } else {
                    ""
                },
            )
        };
        let update = self
            .paired()
            .map(|(paired, any)| check(&paired, &any, "n", "new_rows"))
            .unwrap_or_default();
        let delete = check(
            &format!("({}) AS p", self.side("old_rows")),
            "true",
            "v",
            "old_rows",
        );
        format!(
            "            IF TG_OP = 'UPDATE' THEN\n{update}            ELSIF TG_OP = 'DELETE' THEN\n{delete}            END IF;\n"
        )
    }

    /// The triggers calling it (created or replaced; fired for every session).
    pub fn triggers(&self, m: &Mapping) -> Vec<Sql> {
        let f = names::reverse_function(&m.control_schema, &m.migration, self.index);
        let mut out: Vec<Sql> = [
            ("ins", "AFTER INSERT", "REFERENCING NEW TABLE AS new_rows "),
            (
                "upd",
                "AFTER UPDATE",
                "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows ",
            ),
            ("del", "AFTER DELETE", "REFERENCING OLD TABLE AS old_rows "),
            ("trunc", "BEFORE TRUNCATE", ""),
        ]
        .into_iter()
        .flat_map(|(ev, when, refs)| {
            let name = Ident::new(names::reverse_trigger(&m.migration, ev));
            [
                sql!(
                    "CREATE OR REPLACE TRIGGER {name} {when} ON {} {refs}FOR EACH STATEMENT EXECUTE FUNCTION {f}()",
                    self.green
                ),
                sql!("ALTER TABLE {} ENABLE ALWAYS TRIGGER {name}", self.green),
            ]
        })
        .collect();
        out.shrink_to_fit();
        out
    }
}
