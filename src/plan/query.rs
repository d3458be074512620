//! Renders an entry's mapping as SQL: the select list, `M(blue)` as a query, and the statements
//! built on it. Pure: mapping + catalog in, [`Sql`] out. Every later command (copy, sync, validate)
//! evaluates the mapping through these functions, so what `plan` compiles is what runs.

use crate::catalog;
use crate::mapping::{Column, TableEntry};
use crate::sql::{Expr, Ident, Literal, QName, Sql, TypeName, join, sql};

/// The SQL for one mapped column, before assignment to the green column. `lenient` (profiling
/// only) turns a value outside a default-less map into NULL instead of an error, so that all such
/// values can be counted.
pub fn column_sql(
    entry: &TableEntry,
    col: &Column,
    green_col: &catalog::Column,
    control: &str,
    lenient: bool,
) -> String {
    let Some(vm) = &col.value_map else {
        return Expr(&col.expr.text).to_string();
    };
    let ty = TypeName(&green_col.type_sql);
    let mut s = format!("CASE {}::text", Expr(&col.expr.text));
    for (k, v) in &vm.entries {
        match v {
            Some(v) => s.push_str(&format!(
                " WHEN {} THEN {}::{ty}",
                Literal::new(k),
                Literal::new(v)
            )),
            None => s.push_str(&format!(" WHEN {} THEN NULL::{ty}", Literal::new(k))),
        }
    }
    match &vm.default {
        Some(Some(d)) => s.push_str(&format!(" ELSE {}::{ty} END", Literal::new(d))),
        Some(None) => s.push_str(&format!(" ELSE NULL::{ty} END")),
        None if lenient => s.push_str(&format!(" ELSE NULL::{ty} END")),
        // No default: a value outside the map is an error, never a silent NULL. NULL stays NULL.
        None => s.push_str(&format!(
            " ELSE {}({}, {}::text)::{ty} END",
            QName::new(control, "unmapped_value"),
            Literal::new(format!("{}.{}", entry.name, col.name)),
            Expr(&col.expr.text)
        )),
    }
    s
}

/// The `search_path` mapping SQL is evaluated with everywhere (plan, copy, sync functions,
/// validate): built-ins first, then the blue schema for unqualified user functions.
pub fn mapping_search_path(m: &crate::mapping::Mapping) -> String {
    if m.resolved {
        // Every name in the expressions is qualified: nothing an application role can create
        // on a search path is consulted, and `pg_temp` comes last so it never shadows.
        "pg_catalog, pg_temp".to_string()
    } else {
        format!("pg_catalog, {}", Ident::new(&m.blue))
    }
}

/// `SET [LOCAL] search_path` to [`mapping_search_path`].
pub fn set_mapping_search_path(m: &crate::mapping::Mapping, local: bool) -> Sql {
    sql!(
        "SET {}search_path = {}",
        if local { "LOCAL " } else { "" },
        mapping_search_path(m)
    )
}

/// `(where)` and extra conditions joined by AND, or nothing.
pub fn where_clause(entry: &TableEntry, extra: &[String]) -> String {
    let mut conds: Vec<String> = entry
        .where_
        .iter()
        .map(|w| Expr(&w.text).to_string())
        .collect();
    conds.extend(extra.iter().cloned());
    if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    }
}

pub fn group_by_clause(entry: &TableEntry) -> String {
    if entry.group_by.is_empty() {
        String::new()
    } else {
        format!(
            " GROUP BY {}",
            join(entry.group_by.iter().map(|g| Expr(&g.text)), ", ")
        )
    }
}

/// Options for rendering `M(blue)`.
#[derive(Default, Clone)]
pub struct Shape<'a> {
    /// Replace the relation read by an alias (a sample, a set of changed rows).
    pub replace: Option<(&'a str, &'a str)>,
    /// Extra conditions ANDed to `where` (a chunk range, a key set).
    pub extra_where: Vec<String>,
    /// Unmapped values become NULL instead of raising (profiling only).
    pub lenient: bool,
}

/// `SELECT <mapped columns AS green names> FROM <from> WHERE ... GROUP BY ...`: `M(blue)` on the
/// mapped columns, in entry order.
pub fn mapping_select(
    entry: &TableEntry,
    green: &catalog::Table,
    control: &str,
    shape: &Shape,
) -> Sql {
    mapping_select_extra(entry, green, control, shape, &[])
}

/// [`mapping_select`] with extra select-list items appended (profiling adds raw values).
pub fn mapping_select_extra(
    entry: &TableEntry,
    green: &catalog::Table,
    control: &str,
    shape: &Shape,
    extra: &[String],
) -> Sql {
    let cols = entry
        .columns
        .iter()
        .filter_map(|c| {
            let gc = green.column(&c.name)?;
            Some(format!(
                "{} AS {}",
                column_sql(entry, c, gc, control, shape.lenient),
                Ident::new(&c.name)
            ))
        })
        .chain(extra.iter().cloned());
    select_from(entry, cols, shape)
}

/// `SELECT <cols> FROM <from> WHERE ... GROUP BY ...` shaped by `shape`.
fn select_from(entry: &TableEntry, cols: impl Iterator<Item = String>, shape: &Shape) -> Sql {
    sql!(
        "SELECT {} FROM {}{}{}",
        join(cols, ", "),
        entry.from_clause.render_with(shape.replace),
        where_clause(entry, &shape.extra_where),
        group_by_clause(entry)
    )
}

/// The mapped green column names, in entry order (only those that exist in green).
pub fn mapped_columns<'a>(entry: &'a TableEntry, green: &'a catalog::Table) -> Vec<&'a str> {
    entry
        .columns
        .iter()
        .filter(|c| green.column(&c.name).is_some())
        .map(|c| c.name.as_str())
        .collect()
}

/// `INSERT INTO green.T (mapped columns) SELECT M(blue)`, with `OVERRIDING SYSTEM VALUE` when an
/// identity-always column is mapped.
pub fn insert_select(
    entry: &TableEntry,
    green: &catalog::Table,
    control: &str,
    shape: &Shape,
) -> Sql {
    let cols = mapped_columns(entry, green);
    let overriding = cols
        .iter()
        .any(|c| green.column(c).is_some_and(|gc| gc.identity == "a"));
    sql!(
        "INSERT INTO {} ({}){} {}",
        green.qname(),
        join(cols.iter().map(|c| Ident::new(*c)), ", "),
        if overriding {
            " OVERRIDING SYSTEM VALUE"
        } else {
            ""
        },
        mapping_select(entry, green, control, shape)
    )
}

/// The statement that copies one chunk: [`insert_select`], skipping rows already there. A row can
/// move between chunks while the copy runs (a ctid range, a changed key) and be copied twice; the
/// change log re-derives it anyway.
pub fn chunk_insert(
    entry: &TableEntry,
    green: &catalog::Table,
    control: &str,
    shape: &Shape,
) -> Sql {
    sql!(
        "{} ON CONFLICT DO NOTHING",
        insert_select(entry, green, control, shape)
    )
}

/// Compile-only probe of one expression: `SELECT (expr) FROM <from> WHERE ... GROUP BY ...`.
pub fn expr_probe(entry: &TableEntry, expr: &str) -> (Sql, usize) {
    let head = "SELECT ";
    let body = Expr(expr).to_string();
    (
        sql!(
            "{head}{body} FROM {}{}{}",
            entry.from_clause.render(),
            where_clause(entry, &[]),
            group_by_clause(entry)
        ),
        // Offset (in characters) of the expression text inside the statement: after "(".
        head.chars().count() + 1,
    )
}

/// Compile-only probe of one column's assignment to its green column.
pub fn assign_probe(
    entry: &TableEntry,
    col: &Column,
    green: &catalog::Table,
    gc: &catalog::Column,
    control: &str,
) -> Sql {
    sql!(
        "INSERT INTO {} ({}) SELECT {} FROM {}{}{}",
        green.qname(),
        Ident::new(&col.name),
        column_sql(entry, col, gc, control, false),
        entry.from_clause.render(),
        where_clause(entry, &[]),
        group_by_clause(entry)
    )
}

/// `M(blue)` with every column cast to its green type, in entry order (what green must hold, and
/// what binary COPY and `validate` need: identical types on both sides).
pub fn mapping_select_typed(
    entry: &TableEntry,
    green: &catalog::Table,
    control: &str,
    shape: &Shape,
) -> Sql {
    let cols = entry.columns.iter().filter_map(|c| {
        let gc = green.column(&c.name)?;
        Some(format!(
            "({})::{} AS {}",
            column_sql(entry, c, gc, control, shape.lenient),
            TypeName(&gc.type_sql),
            Ident::new(&c.name)
        ))
    });
    select_from(entry, cols, shape)
}

/// The number of rows by which green.T and M(blue) differ as multisets on the mapped columns
/// (rows of one missing from the other, both ways): 0 exactly when the invariant holds.
pub fn invariant_diff(entry: &TableEntry, green: &catalog::Table, control: &str) -> Sql {
    let m = mapping_select_typed(entry, green, control, &Shape::default());
    let g = format!(
        "SELECT {} FROM {}",
        join(
            mapped_columns(entry, green).iter().map(|c| Ident::new(*c)),
            ", "
        ),
        green.qname()
    );
    sql!(
        "SELECT (SELECT count(*) FROM ((SELECT t::text FROM ({m}) t) EXCEPT ALL (SELECT t::text FROM ({g}) t)) a) + (SELECT count(*) FROM ((SELECT t::text FROM ({g}) t) EXCEPT ALL (SELECT t::text FROM ({m}) t)) b)"
    )
}
