//! Checks that need the catalog but no query: names exist, keys resolve, reverse targets exist.
//! `plan` reports them with everything else; `prepare` and `copy` refuse a mapping that fails
//! them before they write anything. Pure.

use crate::catalog::Catalog;
use crate::diag::{Diagnostic, did_you_mean};
use crate::mapping::{Mapping, Reverse};
use crate::sql::QName;

use super::keys::{sync_key, upsert_key};

pub fn static_checks(m: &Mapping, cat: &Catalog) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let green_names: Vec<&str> = cat.tables_in(&m.green).map(|t| t.name.as_str()).collect();
    let blue_names: Vec<String> = cat
        .tables
        .values()
        .filter(|t| t.schema != m.green)
        .map(|t| t.qname().display())
        .collect();
    for e in &m.tables {
        for item in &e.from_clause.items {
            if cat.table(&item.table).is_some_and(|t| t.subscribed) {
                out.push(
                    Diagnostic::error(
                        "subscribed-blue-table",
                        format!("blue table {} is written by a logical-replication subscription", item.table.display()),
                    )
                    .at(Some(e.from.span.clone()))
                    .table(&e.name)
                    .hint("the subscription's apply worker fires no statement triggers, so sync would miss its writes: migrate on the publisher, or stop the subscription's writes first"),
                );
            }
            if cat.table(&item.table).is_none() {
                let wanted = item.table.display();
                out.push(
                    Diagnostic::error(
                        "unknown-blue-table",
                        format!("blue table {wanted} does not exist"),
                    )
                    .at(Some(e.from.span.clone()))
                    .table(&e.name)
                    .maybe_hint(did_you_mean(&wanted, blue_names.iter().map(String::as_str)))
                    .hint_or("check the schema and table name in `from`"),
                );
            } else if item.table.schema == m.green {
                out.push(
                    Diagnostic::error("reads-green", format!("`from` reads green table {}", item.table.display()))
                        .at(Some(e.from.span.clone()))
                        .table(&e.name)
                        .hint("green is computed from blue only: derive values from blue tables (deterministic ids such as md5(key)::uuid)"),
                );
            }
        }
        let Some(gt) = cat.table(&QName::new(&m.green, &e.name)) else {
            out.push(
                Diagnostic::error(
                    "unknown-green-table",
                    format!(
                        "green table {}.{} does not exist after green_ddl ran",
                        m.green, e.name
                    ),
                )
                .at(Some(e.span.clone()))
                .table(&e.name)
                .maybe_hint(did_you_mean(&e.name, green_names.iter().copied()))
                .hint_or(format!("create it in {}", m.green_ddl.display())),
            );
            continue;
        };
        for c in &e.columns {
            match gt.column(&c.name) {
                None => out.push(
                    Diagnostic::error(
                        "unknown-green-column",
                        format!(
                            "green table {}.{} has no column {}",
                            m.green, e.name, c.name
                        ),
                    )
                    .at(Some(c.span.clone()))
                    .table(&e.name)
                    .column(&c.name)
                    .maybe_hint(did_you_mean(&c.name, gt.column_names()))
                    .hint_or(format!(
                        "columns: {}",
                        gt.column_names().collect::<Vec<_>>().join(", ")
                    )),
                ),
                Some(gc) if gc.generated == "s" => out.push(
                    Diagnostic::error(
                        "generated-column",
                        format!("{} is a generated column: PostgreSQL computes it", c.name),
                    )
                    .at(Some(c.span.clone()))
                    .table(&e.name)
                    .column(&c.name)
                    .hint("leave it out of `columns`"),
                ),
                _ => {}
            }
        }
        for gc in &gt.columns {
            if gc.not_null && !gc.has_default() && e.column(&gc.name).is_none() {
                out.push(
                    Diagnostic::error(
                        "unmapped-not-null",
                        format!("green column {} is NOT NULL without a default and not mapped: every insert would fail", gc.name),
                    )
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .column(&gc.name)
                    .hint("map it in `columns`, or give it a DEFAULT in the green DDL"),
                );
            }
        }
        if upsert_key(e, gt).is_none() {
            out.push(
                Diagnostic::error(
                    "no-upsert-key",
                    format!("green table {}.{} has no primary key or NOT NULL unique key made of mapped columns, so sync cannot update its rows", m.green, e.name),
                )
                .at(Some(e.span.clone()))
                .table(&e.name)
                .hint("add a primary key to the green table and map its columns (a nullable unique key matches no row whose key is NULL)"),
            );
        }
        match sync_key(e, gt) {
            None => out.push(
                Diagnostic::error("no-sync-key", "no sync key: the green table has no primary key whose columns are all mapped (plainly, not through `map`)")
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint("add `sync_key: { <green column>: <expression> }` naming what identifies the rows derived from one driving row or group"),
            ),
            Some((keys, _)) => {
                for (col, expr) in &keys {
                    match e.column(col) {
                        None => out.push(
                            Diagnostic::error("bad-sync-key", format!("sync key column {col} is not in `columns`"))
                                .at(Some(e.span.clone()))
                                .table(&e.name)
                                .column(col)
                                .hint("a sync key column must be mapped, so green rows can be found by it"),
                        ),
                        Some(c) if c.value_map.is_some() => out.push(
                            Diagnostic::error("bad-sync-key", format!("sync key column {col} is mapped through `map`: green holds the mapped values, not `{expr}`"))
                                .at(Some(c.span.clone()))
                                .table(&e.name)
                                .column(col)
                                .hint("use a column mapped by a plain expression as the sync key"),
                        ),
                        Some(c) if normalize(&c.expr.text) != normalize(expr) => out.push(
                            Diagnostic::error(
                                "bad-sync-key",
                                format!("sync key {col}: `{expr}` differs from the column's expression `{}`", c.expr.text),
                            )
                            .at(Some(c.span.clone()))
                            .table(&e.name)
                            .column(col)
                            .hint("the sync key must be the value the column is mapped to; write the same expression"),
                        ),
                        _ => {}
                    }
                    if let Some(gc) = gt.column(col).filter(|gc| gc.own_equality) {
                        out.push(
                            Diagnostic::error(
                                "unsupported-key-type",
                                format!(
                                    "sync key column {col} is of type {}, whose `=` is not PostgreSQL's own: sync's generated key comparisons, run under search_path = pg_catalog, would compare it as its base type (a case-only change of a citext key would delete the green row)",
                                    gc.type_sql
                                ),
                            )
                            .at(Some(e.span.clone()))
                            .table(&e.name)
                            .column(col)
                            .hint("key green by a built-in type (for citext: `lower(x.email)::text`, or a surrogate id) until such keys are supported"),
                        );
                    }
                }
            }
        }
        if let Reverse::Columns(cols) = &e.reverse
            && let Some(bt) = e
                .from_clause
                .items
                .first()
                .and_then(|i| cat.table(&i.table))
        {
            for (bc, expr) in cols {
                if bt.column(bc).is_none() {
                    out.push(
                        Diagnostic::error(
                            "unknown-blue-column",
                            format!(
                                "reverse: blue table {} has no column {bc}",
                                bt.qname().display()
                            ),
                        )
                        .at(Some(expr.span.clone()))
                        .table(&e.name)
                        .column(bc)
                        .maybe_hint(did_you_mean(bc, bt.column_names())),
                    );
                }
            }
            if !e.group_by.is_empty() {
                out.push(
                    Diagnostic::error(
                        "reverse-group-by",
                        "an entry with group_by merges rows and cannot carry a reverse",
                    )
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint("write `reverse: none`"),
                );
            }
        }
    }
    out
}

fn normalize(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
