//! The SQL that prepare, copy, cutover and rollback run, each statement with the lock it takes, so
//! a reviewer sees before the maintenance window exactly what will touch the live tables.

use serde::Serialize;

use super::EffectiveSettings;
use super::keys::{ChunkKey, chunk_key, sync_key};
use super::query::{Shape, chunk_insert};
use crate::catalog::Catalog;
use crate::mapping::Mapping;
use crate::names;
use crate::sql::{Ident, Literal, QName, Sql, join, sql};

#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// `prepare`, `copy`, `cutover` or `rollback`.
    pub phase: &'static str,
    pub what: String,
    pub sql: String,
    /// The lock taken, and on what.
    pub lock: String,
}

fn step(
    phase: &'static str,
    what: impl Into<String>,
    sql: impl Into<String>,
    lock: impl Into<String>,
) -> Step {
    Step {
        phase,
        what: what.into(),
        sql: sql.into(),
        lock: lock.into(),
    }
}

/// The control schema's DDL (tables for run state, chunk ledger, change log, sync failures,
/// audit events; the helper raising on unmapped values). Idempotent.
pub fn control_ddl(control: &str) -> String {
    include_str!("control.sql")
        .replace("{control_literal}", &Literal::new(control).to_string())
        .replace("{control}", &Ident::new(control).to_string())
}

/// The capture triggers on `target` (blue table `n` of the mapping, or one of its partitions or
/// inheritance children, which call the same function): one statement-level trigger per event
/// with its transition tables, and one for TRUNCATE, which row triggers never see. Each fires
/// `ALWAYS`, so `session_replication_role = replica` (pg_restore, logical replication, a DBA's
/// bulk fix) does not skip it.
pub fn capture_triggers(m: &Mapping, target: &QName, n: usize) -> Vec<Sql> {
    let f = names::sync_function(&m.control_schema, &m.migration, n);
    let refs = |ev: &str| match ev {
        "ins" => "REFERENCING NEW TABLE AS new_rows ",
        "upd" => "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows ",
        "del" => "REFERENCING OLD TABLE AS old_rows ",
        _ => "",
    };
    names::EVENTS
        .iter()
        .flat_map(|(ev, event)| {
            let t = Ident::new(names::sync_trigger(&m.migration, ev));
            [
                sql!(
                    "CREATE OR REPLACE TRIGGER {t} AFTER {event} ON {target} {}FOR EACH STATEMENT EXECUTE FUNCTION {f}()",
                    refs(ev)
                ),
                sql!("ALTER TABLE {target} ENABLE ALWAYS TRIGGER {t}"),
            ]
        })
        .collect()
}

/// What a deferral holds back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeferralKind {
    Index,
    ForeignKey,
    /// A PRIMARY KEY or UNIQUE constraint left out of the copy (`plan::keys::bare_copy_key`):
    /// its index built with the others, then attached (`ALTER TABLE ... USING INDEX`).
    PrimaryKey,
    UniqueKey,
}

impl DeferralKind {
    /// As stored in the `kind` column of the control schema's `deferred`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeferralKind::Index => "index",
            DeferralKind::ForeignKey => "foreign key",
            DeferralKind::PrimaryKey => "primary key",
            DeferralKind::UniqueKey => "unique key",
        }
    }
    pub fn parse(s: &str) -> Option<DeferralKind> {
        [
            DeferralKind::Index,
            DeferralKind::ForeignKey,
            DeferralKind::PrimaryKey,
            DeferralKind::UniqueKey,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
    /// Restored by building an index (`definition` is its `CREATE ... INDEX`).
    pub fn builds_index(self) -> bool {
        self != DeferralKind::ForeignKey
    }
}

/// `ALTER TABLE table ADD CONSTRAINT name PRIMARY KEY | UNIQUE USING INDEX name`: a deferred
/// key's index, built after the copy, made the constraint again (instant).
pub fn attach_key(kind: DeferralKind, table: &QName, name: &str) -> Sql {
    let what = if kind == DeferralKind::PrimaryKey {
        "PRIMARY KEY"
    } else {
        "UNIQUE"
    };
    let n = Ident::new(name);
    sql!("ALTER TABLE {table} ADD CONSTRAINT {n} {what} USING INDEX {n}")
}

/// A green secondary index or foreign key that `prepare` records and drops, and `copy` restores
/// after the data (indexes built, foreign keys added NOT VALID at the live switch).
pub struct Deferral {
    pub kind: DeferralKind,
    pub name: String,
    pub table: QName,
    /// `CREATE INDEX ...` or the constraint definition.
    pub definition: String,
    /// The table a foreign key references.
    pub ref_table: Option<QName>,
    pub drop: Sql,
}

/// A secondary index copy builds after the data: not a constraint's, and not unique. A unique
/// index stays while copy writes, an arbiter of the chunks' `ON CONFLICT DO NOTHING`: rows that
/// change between two chunks' snapshots (an email handed from one row to another) would put one
/// value in two chunks' rows, and its build after the copy would fail.
fn deferred_index(ix: &crate::catalog::Index) -> bool {
    !ix.backs_constraint && !ix.unique
}

/// In the order they are dropped: foreign keys first (a key they reference is dropped after
/// them), then secondary indexes, then the keys copy leaves out.
pub fn deferrals(m: &Mapping, cat: &Catalog) -> Vec<Deferral> {
    let mut out = Vec::new();
    let mut keys = Vec::new();
    for gt in cat.tables_in(&m.green) {
        for ix in gt.indexes.iter().filter(|ix| deferred_index(ix)) {
            out.push(Deferral {
                kind: DeferralKind::Index,
                name: ix.name.clone(),
                table: gt.qname(),
                definition: ix.definition.clone(),
                ref_table: None,
                drop: sql!("DROP INDEX {}", QName::new(&gt.schema, &ix.name)),
            });
        }
        let bare = m.entry(&gt.name).and_then(|e| {
            let bt = cat.table(&e.from_clause.driving().table)?;
            super::keys::bare_copy_key(e, bt, gt)
        });
        if let Some(ix) = bare {
            keys.push(Deferral {
                kind: if ix.primary {
                    DeferralKind::PrimaryKey
                } else {
                    DeferralKind::UniqueKey
                },
                name: ix.name.clone(),
                table: gt.qname(),
                definition: ix.definition.clone(),
                ref_table: None,
                drop: sql!(
                    "ALTER TABLE {} DROP CONSTRAINT {}",
                    gt.qname(),
                    Ident::new(&ix.name)
                ),
            });
        }
        for fk in &gt.foreign_keys {
            out.push(Deferral {
                kind: DeferralKind::ForeignKey,
                name: fk.name.clone(),
                table: gt.qname(),
                definition: fk.definition.clone(),
                ref_table: Some(fk.ref_table.clone()),
                drop: sql!(
                    "ALTER TABLE {} DROP CONSTRAINT {}",
                    gt.qname(),
                    Ident::new(&fk.name)
                ),
            });
        }
    }
    out.sort_by_key(|d| d.kind != DeferralKind::ForeignKey);
    out.extend(keys);
    out
}

/// The statements adding a deferred foreign key unvalidated (instant; enforced for new writes).
pub fn add_foreign_key_not_valid(name: &str, table: &QName, def: &str) -> Sql {
    let n = Ident::new(name);
    sql!(
        "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {n}; ALTER TABLE {table} ADD CONSTRAINT {n} {def} NOT VALID"
    )
}

/// `setval` for every green sequence that owns a mapped column (serial or identity): past the
/// highest id green holds, so generated ids never collide with copied or synced ones.
pub fn advance_sequences(m: &Mapping, cat: &Catalog) -> Vec<(QName, Sql)> {
    cat.sequences
        .iter()
        .filter(|s| s.name.schema == m.green)
        .filter_map(|seq| {
            let (owner, col) = seq.owner.as_ref()?;
            m.entry(&owner.name).and_then(|e| e.column(col))?;
            Some((
                seq.name.clone(),
                sql!(
                    "SELECT setval({}, greatest((SELECT max({}) FROM {owner}), 1))",
                    Literal::new(seq.name.to_string()),
                    Ident::new(col)
                ),
            ))
        })
        .collect()
}

/// All steps, in the order they run.
pub fn all(m: &Mapping, cat: &Catalog, s: &EffectiveSettings) -> Vec<Step> {
    let mut out = Vec::new();
    let control = &m.control_schema;
    let lt = format!("SET lock_timeout = '{}ms'", s.lock_timeout_ms);
    let retry = format!(
        "under lock_timeout {} ms, retried with backoff",
        s.lock_timeout_ms
    );
    let green_tables: Vec<QName> = m
        .tables
        .iter()
        .map(|e| QName::new(&m.green, &e.name))
        .collect();
    let blue_read = m.blue_tables_read();

    // prepare
    out.push(step(
        "prepare",
        "one runner per migration",
        format!(
            "SELECT pg_try_advisory_lock(hashtextextended({}, 0))",
            Literal::new(names::advisory_key(&m.migration))
        ),
        "session advisory lock; no table lock",
    ));
    out.push(step(
        "prepare",
        "control schema",
        control_ddl(control),
        format!("none on application tables (creates {control}.*)"),
    ));
    out.push(step(
        "prepare",
        format!("green schema and DDL from {}", m.green_ddl.display()),
        format!(
            "CREATE SCHEMA {};\nSET LOCAL search_path = {};\n-- the statements of {}",
            Ident::new(&m.green),
            Ident::new(&m.green),
            m.green_ddl.display()
        ),
        "ACCESS EXCLUSIVE on the new green objects only",
    ));
    for d in deferrals(m, cat) {
        out.push(step(
            "prepare",
            format!("defer {} {} until after the copy", d.kind.as_str(), d.name),
            d.drop.into_string(),
            format!("ACCESS EXCLUSIVE on {} (empty, unused)", d.table.display()),
        ));
    }
    for (n, bt) in blue_read.iter().enumerate() {
        out.push(step(
            "prepare",
            format!(
                "capture function for {} (logs changed rows until sync goes live)",
                bt.display()
            ),
            crate::plan::sync::capture_trigger_function(m, bt, n).into_string(),
            "none",
        ));
        let mut sql = vec![lt.clone()];
        sql.extend(capture_triggers(m, bt, n).into_iter().map(Sql::into_string));
        out.push(step(
            "prepare",
            format!("capture changes on {}", bt.display()),
            sql.join(";\n"),
            format!(
                "SHARE ROW EXCLUSIVE on {} (blocks writes for the moment it is held; {retry})",
                bt.display()
            ),
        ));
    }

    // copy
    for e in &m.tables {
        let Some(gt) = cat.table(&QName::new(&m.green, &e.name)) else {
            continue;
        };
        let Some(bt) = cat.table(&e.from_clause.driving().table) else {
            continue;
        };
        let sync = sync_key(e, gt).map(|(k, _)| k).unwrap_or_default();
        let froms = e
            .from_clause
            .items
            .iter()
            .map(|i| i.table.display())
            .collect::<Vec<_>>()
            .join(", ");
        let key = match chunk_key(e, bt, gt, &sync) {
            ChunkKey::Physical => format!("{}.ctid", Ident::new(&e.from_clause.driving().alias)),
            ChunkKey::Expr(key) => {
                let source = super::chunks::quantile_source(e, bt, &key);
                out.push(step(
                    "copy",
                    format!("{}: chunk boundaries from the data (quantiles)", e.name),
                    super::chunks::quantile_query(&key, &source).into_string(),
                    format!("ACCESS SHARE on {froms}"),
                ));
                key
            }
        };
        let shape = Shape {
            extra_where: vec![super::chunks::printed_condition(&key)],
            ..Shape::default()
        };
        let chunks = QName::new(control, "chunks");
        out.push(step(
            "copy",
            format!(
                "{}: each chunk, claimed from the ledger and marked done in one transaction",
                e.name
            ),
            format!(
                "{};\n{};\n{}",
                super::chunks::claim_query(&chunks),
                chunk_insert(e, gt, control, &shape),
                super::chunks::done_statement(&chunks),
            ),
            format!(
                "ROW EXCLUSIVE on {}; ACCESS SHARE on {froms}",
                gt.qname().display(),
            ),
        ));
    }
    for gt in green_tables.iter().filter_map(|q| cat.table(q)) {
        for ix in gt.indexes.iter().filter(|ix| deferred_index(ix)) {
            out.push(step(
                "copy",
                format!("build deferred index {}", ix.name),
                ix.definition.clone(),
                format!("SHARE on {} (green, not yet in use)", gt.qname().display()),
            ));
        }
    }
    for d in deferrals(m, cat)
        .into_iter()
        .filter(|d| matches!(d.kind, DeferralKind::PrimaryKey | DeferralKind::UniqueKey))
    {
        out.push(step(
            "copy",
            format!(
                "build deferred {} {} (with the indexes), then attach it",
                d.kind.as_str(),
                d.name
            ),
            format!(
                "{};
{}",
                d.definition,
                attach_key(d.kind, &d.table, &d.name)
            ),
            format!(
                "SHARE on {t} while it builds, then ACCESS EXCLUSIVE on {t} (instant; green, not yet in use)",
                t = d.table.display()
            ),
        ));
    }
    for gt in green_tables.iter().filter_map(|q| cat.table(q)) {
        for fk in &gt.foreign_keys {
            out.push(step(
                "copy",
                format!("foreign key {} added unvalidated, then validated", fk.name),
                format!(
                    "ALTER TABLE {t} ADD CONSTRAINT {n} {d} NOT VALID;\nALTER TABLE {t} VALIDATE CONSTRAINT {n}",
                    t = gt.qname(),
                    n = Ident::new(&fk.name),
                    d = fk.definition
                ),
                format!(
                    "SHARE ROW EXCLUSIVE on {} and {} (instant), then SHARE UPDATE EXCLUSIVE while validating",
                    gt.qname().display(),
                    fk.ref_table.display()
                ),
            ));
        }
    }
    for (seq, sql) in advance_sequences(m, cat) {
        out.push(step(
            "copy",
            format!("advance {} past the copied ids", seq.display()),
            sql.into_string(),
            "none (sequence update)",
        ));
    }
    for q in &green_tables {
        out.push(step(
            "copy",
            format!("statistics for {}", q.display()),
            format!("ANALYZE {q}"),
            "SHARE UPDATE EXCLUSIVE on green only",
        ));
    }
    out.push(step(
        "copy",
        "catch up: re-derive the sync keys touched since capture began, then switch triggers to live mode",
        format!(
            "SELECT id, blue_table, op, old_row, new_row FROM {} WHERE migration = {} ORDER BY id LIMIT $1;\n-- per green table: DELETE the green rows of the touched sync keys that M(blue) no longer produces;\n-- INSERT ... SELECT M(blue) WHERE <sync key> IN (touched keys) ON CONFLICT (<green key>) DO UPDATE SET <mapped columns only>",
            QName::new(control, "changes"),
            Literal::new(&m.migration)
        ),
        "ROW EXCLUSIVE on green tables; ACCESS SHARE on blue tables",
    ));

    // cutover
    let blue_list = join(blue_read.iter(), ", ");
    let stored: Vec<crate::plan::cutover::Stored> = cat
        .search_path_settings
        .iter()
        .map(|s| crate::plan::cutover::Stored {
            role: s.role.clone(),
            in_database: s.in_this_database,
            value: s.search_path.clone(),
        })
        .collect();
    // The database's setting and every role's whose own would override it: green first, each
    // recorded as stored and restored byte for byte on rollback.
    let targets = crate::plan::cutover::flip_targets(
        &m.green,
        &m.blue,
        &stored,
        &[],
        crate::plan::cutover::DEFAULT_PATH,
    );
    let database = &cat.server.database;
    let flip: Vec<String> = targets
        .iter()
        .map(|(p, e)| {
            crate::plan::cutover::set_statement(database, p.role.as_deref(), e).into_string()
        })
        .collect();
    let restore: Vec<String> = targets
        .iter()
        .map(|(p, _)| crate::plan::cutover::restore_statement(database, p).into_string())
        .collect();
    out.push(step(
        "cutover",
        "fence blue writes (reads go on), drain sync, reverse sync on, flip search_path: one short transaction, retried",
        format!(
            "BEGIN;\nSELECT pg_advisory_xact_lock(<appliers of {mig}>);  -- followers pause between batches\n{lt};\nLOCK TABLE {blue_list} IN EXCLUSIVE MODE;\n-- drain the change log on another connection, within --fence-timeout (no green lock held)\nLOCK TABLE {green_list} IN SHARE ROW EXCLUSIVE MODE;\n-- check: nothing pending, no sync failure\n-- reverse triggers on the invertible green tables; blue triggers to their post-cutover bodies\n-- generated keys interleaved: each blue sequence and the green ones it fills step by the same increment from disjoint residues, past every value used or cached\n{};\nUPDATE {} SET phase = 'cut_over', previous_search_path = <every search_path setting as stored>, cutover_at = now() WHERE migration = {mig};\nCOMMIT",
            flip.join(";\n"),
            QName::new(control, "runs"),
            green_list = join(green_tables.iter(), ", "),
            mig = Literal::new(&m.migration)
        ),
        format!("EXCLUSIVE on {} (writes wait, reads go on; {retry}); SHARE ROW EXCLUSIVE on the green tables for their triggers", blue_read.iter().map(QName::display).collect::<Vec<_>>().join(", ")),
    ));

    // rollback
    let green_list = join(green_tables.iter(), ", ");
    out.push(step(
        "rollback",
        "fence green writes, restore the previous search_path byte for byte: one short transaction, retried",
        format!(
            "BEGIN;\n{lt};\nLOCK TABLE {green_list} IN EXCLUSIVE MODE;\n-- blue already holds every green write (reverse sync runs in the writer's transaction)\n-- check: the settings are as the cutover left them\n{};\n-- check: the settings are byte for byte as before the cutover\n-- blue triggers back to live sync; reverse triggers stay, giving way to blue writers (40001)\n-- entries without a reverse marked for a full re-derive\nUPDATE {} SET phase = 'rolled_back', rollback_at = now() WHERE migration = {};\nCOMMIT",
            restore.join(";\n"),
            QName::new(control, "runs"),
            Literal::new(&m.migration)
        ),
        format!("EXCLUSIVE on {} (writes wait, reads go on; {retry})", green_tables.iter().map(QName::display).collect::<Vec<_>>().join(", ")),
    ));
    out
}
