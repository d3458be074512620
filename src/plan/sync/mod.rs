//! The SQL that keeps `green.T = M(blue)` (DESIGN.md, "How the invariant is kept", step 3), and
//! which entries are kept in step how.
//!
//! Every entry is re-derived by sync key: `M(blue)` restricted to the touched keys is upserted on
//! the mapped columns (green-only columns survive), and the green rows of those keys that `M(blue)`
//! no longer produces are deleted. Two ways, chosen per entry ([`Mode`]):
//!
//! - **Row-local** entries (one blue row per green row through a strict unique key, no join, no
//!   `group_by`, green's unique keys and foreign keys implied by blue's): re-derived inside the
//!   writer's own statement by the trigger, from blue read by the keys of the transition tables.
//!   The blue row lock the writer holds orders concurrent writers; nothing else is locked.
//! - **Follower** entries (everything else): the trigger only appends the changed rows to the
//!   change log; an applier (`crate::sync`) re-derives them after the writer committed, from
//!   committed blue, holding the touched keys among appliers (never against the application).
//!
//! `derive.rs` renders the re-derivation statements (the applier's, with the keys as `$n` text
//! arrays, and the trigger's, over transition tables); `keys.rs` finds the keys a change touches;
//! `functions.rs` assembles the trigger functions. Pure: mapping + catalog in, SQL text out.

mod derive;
mod functions;
mod guard;
mod keys;
mod reverse;
#[cfg(test)]
mod tests;

use crate::catalog::{self, Catalog};
use crate::mapping::{Mapping, TableEntry};
use crate::plan::keys::{key_column, sync_key, upsert_key};
use crate::sql::scan::{referenced_aliases, tokens};
use crate::sql::{Literal, QName, join};
use std::collections::BTreeSet;

pub use derive::ApplierEntry;
pub use functions::{capture_trigger_function, forward_trigger_function, live_trigger_function};
pub use reverse::{Reversal, key_round_trip, key_round_trip_example, reversals};

/// Where the migration stands, as far as the trigger bodies are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Before cutover: blue is the application's; green follows.
    Live,
    /// After cutover: green is the application's; old sessions' blue writes still reach it
    /// (or are refused).
    CutOver { refuse_old_writes: bool },
    /// After a rollback: blue is the application's again; the reverse triggers stay for green
    /// stragglers and give way.
    RolledBack,
}

/// Settings pinned on every generated function, so expressions evaluate as in `plan` and `copy`
/// whatever the application session's settings are: the session settings every connection pins
/// (`crate::session`), a search_path an application role cannot put objects on (expressions are
/// deparsed fully qualified at prepare; `pg_temp` last so a temporary object never shadows), and no
/// parallel plans inside a trigger.
fn function_settings() -> String {
    let mut s = String::from("SECURITY DEFINER SET search_path = pg_catalog, pg_temp");
    for (name, value) in crate::session::function_settings() {
        s.push_str(&format!(" SET {name} = {}", Literal::new(value)));
    }
    s.push_str(" SET max_parallel_workers_per_gather = 0");
    s
}

/// One sync-key column.
#[derive(Clone, Debug)]
pub struct Key {
    /// The green column.
    pub green: String,
    /// The expression that fills it (over the entry's `from`).
    pub expr: String,
    pub green_type: String,
    /// The blue column the expression reads, alone or cast to a type it widens to: (alias,
    /// column, blue type). Lookups of blue by this key compare that column, so its index serves.
    pub blue: Option<(String, String, String)>,
}

/// How an entry is kept in step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In the writer's statement. `infallible`: every value is a blue column (or a widening cast,
    /// or a map with a default) into a green table with no CHECK, no foreign key and no unique key
    /// but the arbiter, so the step cannot fail and runs without a subtransaction.
    RowLocal { infallible: bool },
    /// By the follower, after the writer committed; `reason` says why not row-local.
    Follower { reason: String },
}

/// One entry with what sync needs about it.
pub struct SyncEntry<'a> {
    pub index: usize,
    pub entry: &'a TableEntry,
    pub green: &'a catalog::Table,
    pub keys: Vec<Key>,
    /// The green columns `ON CONFLICT` uses (an arbiter key, fully mapped).
    pub upsert_key: Vec<String>,
    /// Some sync-key column of green is nullable, so NULL keys need their own branch.
    pub nullable: bool,
    pub mode: Mode,
    /// Per blue table the entry reads, the columns it reads there (None: cannot tell, or the
    /// table is not in the catalog).
    pub columns_read: Vec<(QName, Option<Vec<String>>)>,
}

/// Columns every table has that no mapping names in `columns`, and that change with every update.
const SYSTEM_COLUMNS: [&str; 6] = ["xmin", "xmax", "cmin", "cmax", "ctid", "tableoid"];

impl SyncEntry<'_> {
    pub fn row_local(&self) -> bool {
        matches!(self.mode, Mode::RowLocal { .. })
    }
    /// The blue tables this entry reads, with the aliases that read each.
    pub fn reads(&self) -> Vec<(&QName, Vec<&str>)> {
        let mut out: Vec<(&QName, Vec<&str>)> = Vec::new();
        for it in &self.entry.from_clause.items {
            match out.iter_mut().find(|(t, _)| *t == &it.table) {
                Some((_, a)) => a.push(&it.alias),
                None => out.push((&it.table, vec![&it.alias])),
            }
        }
        out
    }
    pub fn aliases_of(&self, x: &QName) -> Vec<&str> {
        self.entry
            .from_clause
            .items
            .iter()
            .filter(|i| &i.table == x)
            .map(|i| i.alias.as_str())
            .collect()
    }
    pub fn driving(&self) -> &QName {
        &self.entry.from_clause.driving().table
    }
    /// The columns of blue table `bt` this entry reads, through any alias of it, in any
    /// expression or condition; None when it cannot tell (a whole-row reference, `alias.*`, the
    /// table named without its alias, text it cannot scan). An UPDATE that leaves all of them as
    /// they were changes nothing the entry derives. Conservative: any word equal to a column
    /// name of `bt` and not qualified by another alias counts as read.
    pub fn scan_columns_read(&self, bt: &catalog::Table) -> Option<BTreeSet<String>> {
        let x = bt.qname();
        let mine = self.aliases_of(&x);
        let others: Vec<&str> = self
            .entry
            .from_clause
            .items
            .iter()
            .filter(|i| i.table != x)
            .map(|i| i.alias.as_str())
            .collect();
        let e = self.entry;
        let mut texts: Vec<&str> = e.columns.iter().map(|c| c.expr.text.as_str()).collect();
        texts.extend(self.keys.iter().map(|k| k.expr.as_str()));
        texts.extend(e.sync_key.iter().flatten().map(|(_, l)| l.text.as_str()));
        texts.extend(e.where_.iter().map(|l| l.text.as_str()));
        texts.extend(e.group_by.iter().map(|l| l.text.as_str()));
        texts.extend(
            e.from_clause
                .items
                .iter()
                .filter_map(|i| i.join.as_ref().map(|(_, on)| on.as_str())),
        );
        let mut read = BTreeSet::new();
        for text in texts {
            let toks = tokens(text).ok()?;
            for (k, t) in toks.iter().enumerate() {
                let Some(name) = t.ident() else { continue };
                let after_dot = k > 0 && toks[k - 1].is_punct(".");
                let before_dot = toks.get(k + 1).is_some_and(|n| n.is_punct("."));
                // A system column changes with every update (H4-3).
                if SYSTEM_COLUMNS.contains(&name.as_str()) && !before_dot {
                    return None;
                }
                // Anything named in a schema but the catalog's may read any column of any table,
                // the entry's own included: a function (`schema.f(`, H4-4), a type whose cast
                // calls one (`::schema.t`, which is all the deparsed text shows of the cast's
                // function: H5-2), an operator (`OPERATOR(schema.`), a table.
                if before_dot
                    && name != "pg_catalog"
                    && !mine.contains(&name.as_str())
                    && !others.contains(&name.as_str())
                {
                    return None;
                }
                if t.is_word("operator")
                    && toks.get(k + 1).is_some_and(|n| n.is_punct("("))
                    && toks.get(k + 2).and_then(|n| n.ident()).as_deref() != Some("pg_catalog")
                {
                    return None;
                }
                if before_dot {
                    // The table named without its alias (`public.t.c`, `t.c`).
                    let next = toks.get(k + 2).and_then(|n| n.ident());
                    if (name == x.name && !mine.contains(&name.as_str()))
                        || (name == x.schema && next.as_deref() == Some(x.name.as_str()))
                    {
                        return None;
                    }
                    if mine.contains(&name.as_str())
                        && toks
                            .get(k + 2)
                            .is_some_and(|n| n.text == "*" || n.is_punct("("))
                    {
                        return None;
                    }
                    continue;
                }
                let qualifier = after_dot
                    .then(|| k.checked_sub(2).and_then(|q| toks[q].ident()))
                    .flatten();
                match qualifier {
                    Some(q) if others.contains(&q.as_str()) => continue,
                    Some(q) if !mine.contains(&q.as_str()) => {
                        // `schema.function` or `(row).field`: a column only if it is one.
                        if bt.column(&name).is_some() {
                            read.insert(name);
                        }
                        continue;
                    }
                    _ => {}
                }
                if !after_dot && mine.contains(&name.as_str()) {
                    // The alias alone: the whole row.
                    return None;
                }
                if bt.column(&name).is_some() {
                    read.insert(name);
                }
            }
        }
        Some(read)
    }
}

/// The entries sync can key (a sync key and an arbiter key), parents before children, each with
/// its mode.
pub fn sync_entries<'a>(m: &'a Mapping, cat: &'a Catalog) -> Vec<SyncEntry<'a>> {
    let mut out = Vec::new();
    for (index, e) in m.tables.iter().enumerate() {
        let Some(gt) = cat.table(&QName::new(&m.green, &e.name)) else {
            continue;
        };
        let Some((keys, _)) = sync_key(e, gt) else {
            continue;
        };
        let Some(upsert_key) = upsert_key(e, gt) else {
            continue;
        };
        let aliases = e.from_clause.aliases();
        let keys: Vec<Key> = keys
            .into_iter()
            .filter_map(|(c, x)| {
                let green_type = gt.column(&c)?.type_sql.clone();
                let blue = match referenced_aliases(&x, &aliases).as_slice() {
                    [a] => e
                        .from_clause
                        .item_by_alias(a)
                        .and_then(|it| cat.table(&it.table))
                        .and_then(|bt| key_column(&x, a, bt, &green_type))
                        .map(|(col, ty)| (a.to_string(), col, ty)),
                    _ => None,
                };
                Some(Key {
                    green: c,
                    expr: x,
                    green_type,
                    blue,
                })
            })
            .collect();
        let nullable = keys
            .iter()
            .any(|k| gt.column(&k.green).is_none_or(|gc| !gc.not_null));
        out.push(SyncEntry {
            index,
            entry: e,
            green: gt,
            keys,
            upsert_key,
            nullable,
            mode: Mode::Follower {
                reason: String::new(),
            },
            columns_read: Vec::new(),
        });
    }
    for e in &mut out {
        let read: Vec<(QName, Option<Vec<String>>)> = e
            .reads()
            .into_iter()
            .map(|(x, _)| {
                let cols = cat
                    .table(x)
                    .and_then(|bt| e.scan_columns_read(bt))
                    .map(|c| c.into_iter().collect());
                (x.clone(), cols)
            })
            .collect();
        e.columns_read = read;
    }
    classify(&mut out, m, cat);
    order_by_foreign_keys(out, m)
}

/// Why `e` cannot be re-derived in the writer's statement on its own terms (shape, key, green
/// unique keys), or None.
fn own_reason(e: &SyncEntry, cat: &Catalog) -> Option<String> {
    let d = e.entry.from_clause.driving();
    if !e.entry.group_by.is_empty() {
        return Some("it groups blue rows (group_by)".into());
    }
    if e.entry.from_clause.items.len() > 1 {
        let joined: Vec<String> = e.entry.from_clause.items[1..]
            .iter()
            .map(|i| i.table.display())
            .collect();
        return Some(format!("it reads {} through a join", joined.join(", ")));
    }
    let Some(bt) = cat.table(&d.table) else {
        return Some("its driving table is not in the catalog".into());
    };
    if bt.inherited {
        return Some(format!(
            "{} has inheritance children: its keys do not hold across them",
            bt.qname().display()
        ));
    }
    // An exclusion constraint can make one writer wait for (or deadlock with) another on green
    // where blue has no such wait.
    if let Some(x) = e.green.exclusions.first() {
        return Some(format!("green exclusion constraint {}", x.name));
    }
    let mut cols = Vec::new();
    for k in &e.keys {
        match &k.blue {
            Some((a, c, _)) if *a == d.alias => cols.push(c.clone()),
            _ => {
                return Some(format!(
                    "sync key {} (`{}`) is not a column of {} (or a cast that keeps every value)",
                    k.green,
                    k.expr,
                    bt.qname().display()
                ));
            }
        }
    }
    if !bt
        .strict_unique_keys()
        .iter()
        .any(|uk| uk.iter().all(|c| cols.contains(c)))
    {
        return Some(format!(
            "its sync key ({}) does not contain a unique NOT NULL key of {}",
            cols.join(", "),
            bt.qname().display()
        ));
    }
    // A NULL in a sync key never matches the trigger's `IN` on keys: a moved row's green row
    // would stay (H6, the nullable sync-key probe).
    if let Some(c) = cols
        .iter()
        .find(|c| !bt.column(c).is_some_and(|b| b.not_null))
    {
        return Some(format!(
            "sync key column {}.{c} can be NULL",
            bt.qname().display()
        ));
    }
    // The step's upsert finds green rows by its conflict key and its delete by the sync key: when
    // they differ, an update of the conflict key inserts a second green row of the same sync key
    // and the delete, finding the sync key still in blue, keeps the old one (H6).
    let sync_cols: BTreeSet<&str> = e.keys.iter().map(|k| k.green.as_str()).collect();
    let conflict_cols: BTreeSet<&str> = e.upsert_key.iter().map(String::as_str).collect();
    if sync_cols != conflict_cols {
        return Some(format!(
            "its sync key ({}) is not green's conflict key ({})",
            join(&sync_cols, ", "),
            join(&conflict_cols, ", ")
        ));
    }
    // Every green unique key must be implied by a blue one through plain column mappings, or two
    // writers could wait for each other on green's index in an order they never waited in blue.
    for ix in e.green.indexes.iter().filter(|ix| ix.unique) {
        let blue_cols: Option<Vec<String>> = ix
            .columns
            .iter()
            .map(|c| {
                let c = c.as_ref()?;
                let col = e.entry.column(c)?;
                let gt = &e.green.column(c)?.type_sql;
                if col.value_map.is_some() {
                    return None;
                }
                key_column(&col.expr.text, &d.alias, bt, gt).map(|(b, _)| b)
            })
            .collect();
        let implied = !ix.partial
            && blue_cols.is_some_and(|bc| {
                bt.strict_unique_keys()
                    .iter()
                    .any(|uk| uk.iter().all(|c| bc.contains(c)))
            });
        if !implied {
            return Some(format!(
                "green unique key {} is not implied by a unique key of {}",
                ix.name,
                bt.qname().display()
            ));
        }
    }
    None
}

/// Decide each entry's mode. Row-local also needs every green foreign key between the entry's
/// table and another entry's table to connect row-local entries whose blue driving tables carry a
/// foreign key the same way (DESIGN.md, rules from the design review, H1): otherwise the
/// in-statement step would meet a parent the follower has not written yet.
fn classify(entries: &mut [SyncEntry], m: &Mapping, cat: &Catalog) {
    let mut reasons: Vec<Option<String>> = entries.iter().map(|e| own_reason(e, cat)).collect();
    loop {
        let mut changed = false;
        for i in 0..entries.len() {
            if reasons[i].is_some() {
                continue;
            }
            if let Some(r) = foreign_key_reason(i, entries, &reasons, m, cat) {
                reasons[i] = Some(r);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    for (e, r) in entries.iter_mut().zip(reasons) {
        e.mode = match r {
            Some(reason) => Mode::Follower { reason },
            None => Mode::RowLocal {
                infallible: infallible(e, cat),
            },
        };
    }
}

fn foreign_key_reason(
    i: usize,
    entries: &[SyncEntry],
    reasons: &[Option<String>],
    m: &Mapping,
    cat: &Catalog,
) -> Option<String> {
    let me = &entries[i];
    for (j, other) in entries.iter().enumerate() {
        if j == i {
            continue;
        }
        // (child, parent, fk name) for foreign keys in either direction between the two.
        let mut links = Vec::new();
        for fk in &me.green.foreign_keys {
            if fk.ref_table == other.green.qname() {
                links.push((me, other, fk.name.as_str()));
            }
        }
        for fk in &other.green.foreign_keys {
            if fk.ref_table == me.green.qname() {
                links.push((other, me, fk.name.as_str()));
            }
        }
        for (child, parent, name) in links {
            if reasons[j].is_some() {
                return Some(format!(
                    "green foreign key {name} links it to {}, which the follower keeps",
                    other.entry.name
                ));
            }
            let enforced = cat.table(child.driving()).is_some_and(|bt| {
                bt.foreign_keys
                    .iter()
                    .any(|f| &f.ref_table == parent.driving() && f.validated)
            });
            if !enforced {
                return Some(format!(
                    "green foreign key {name} is not enforced in blue between {} and {}",
                    child.driving().display(),
                    parent.driving().display()
                ));
            }
        }
    }
    let _ = m;
    None
}

/// A row-local step that cannot fail (see [`Mode::RowLocal`]).
fn infallible(e: &SyncEntry, cat: &Catalog) -> bool {
    let d = e.entry.from_clause.driving();
    let Some(bt) = cat.table(&d.table) else {
        return false;
    };
    let gt = e.green;
    let no_constraints = gt.checks.is_empty()
        && gt.foreign_keys.is_empty()
        && cat
            .tables
            .values()
            .all(|t| t.foreign_keys.iter().all(|f| f.ref_table != gt.qname()))
        && gt.exclusions.is_empty()
        && gt.indexes.iter().filter(|ix| ix.unique).count() <= 1;
    no_constraints
        && e.entry.columns.iter().all(|c| {
            let Some(gc) = gt.column(&c.name) else {
                return true;
            };
            match &c.value_map {
                Some(vm) => matches!(&vm.default, Some(d) if d.is_some() || !gc.not_null),
                None => {
                    key_column(&c.expr.text, &d.alias, bt, &gc.type_sql).is_some_and(|(col, _)| {
                        !gc.not_null || bt.column(&col).is_some_and(|b| b.not_null)
                    })
                }
            }
        })
}

/// Parents before children among the green tables (green foreign keys); ties keep mapping order.
fn order_by_foreign_keys<'a>(mut entries: Vec<SyncEntry<'a>>, m: &Mapping) -> Vec<SyncEntry<'a>> {
    let mut ordered: Vec<SyncEntry<'a>> = Vec::new();
    while !entries.is_empty() {
        let pos = entries
            .iter()
            .position(|e| {
                e.green.foreign_keys.iter().all(|fk| {
                    fk.ref_table.schema != m.green
                        || fk.ref_table.name == e.green.name
                        || !entries.iter().any(|o| o.green.name == fk.ref_table.name)
                })
            })
            .unwrap_or(0); // a cycle: keep mapping order
        ordered.push(entries.remove(pos));
    }
    ordered
}
