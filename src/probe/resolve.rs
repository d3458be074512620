//! Mapping expressions as PostgreSQL resolved them (DESIGN.md, rules from the design review, M5):
//! each expression is put in a temporary view with the mapping's search_path (blue on it) and
//! deparsed with `search_path = pg_catalog`, which qualifies every function, operator and type not
//! in `pg_catalog` (`OPERATOR(public.=)` for citext's `=`, `public.norm(...)`). Copy, validate,
//! the triggers and the appliers run those texts under `search_path = pg_catalog, pg_temp`: the
//! same meaning everywhere, and no object an application role can create on a search path is ever
//! called with the function owner's rights. Done in a transaction that is rolled back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgConnection};

use crate::diag::Diagnostic;
use crate::mapping::{Mapping, TableEntry};
use crate::pg::{db_error, exec};
use crate::plan::query::{group_by_clause, set_mapping_search_path, where_clause};
use crate::sql::scan::{Kind, Token, tokens};
use crate::sql::{Expr, Sql, sql};

/// One entry's expressions, resolved.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedEntry {
    pub columns: BTreeMap<String, String>,
    #[serde(rename = "where")]
    pub where_: Option<String>,
    pub group_by: Vec<String>,
    /// Per `from` item, its ON condition (None for the driving table).
    pub on: Vec<Option<String>>,
    pub sync_key: BTreeMap<String, String>,
}

/// Every entry's expressions, resolved, by entry name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    pub entries: BTreeMap<String, ResolvedEntry>,
}

/// The mapping with every expression replaced by its resolved text.
pub fn apply(m: &Mapping, r: &Resolved) -> Mapping {
    let mut out = m.clone();
    out.resolved = true;
    for e in &mut out.tables {
        let Some(re) = r.entries.get(&e.name) else {
            continue;
        };
        for c in &mut e.columns {
            if let Some(t) = re.columns.get(&c.name) {
                c.expr.text = t.clone();
            }
        }
        if let (Some(w), Some(t)) = (&mut e.where_, &re.where_) {
            w.text = t.clone();
        }
        for (g, t) in e.group_by.iter_mut().zip(&re.group_by) {
            g.text = t.clone();
        }
        for (it, on) in e.from_clause.items.iter_mut().zip(&re.on) {
            if let (Some((_, cond)), Some(t)) = (&mut it.join, on) {
                *cond = t.clone();
            }
        }
        if let Some(sk) = &mut e.sync_key {
            for (c, x) in sk.iter_mut() {
                if let Some(t) = re.sync_key.get(c) {
                    x.text = t.clone();
                }
            }
        }
    }
    out
}

/// Resolve every expression of `m` (in a transaction that is rolled back).
pub async fn resolve(conn: &mut PgConnection, m: &Mapping) -> Result<Resolved, Diagnostic> {
    let mut tx = conn.begin().await.map_err(db_error)?;
    let mut out = Resolved::default();
    for e in &m.tables {
        out.entries
            .insert(e.name.clone(), entry(&mut tx, m, e).await?);
    }
    tx.rollback().await.map_err(db_error)?;
    Ok(out)
}

async fn entry(
    conn: &mut PgConnection,
    m: &Mapping,
    e: &TableEntry,
) -> Result<ResolvedEntry, Diagnostic> {
    let from = e.from_clause.render();
    let grouped = format!("{}{}", where_clause(e, &[]), group_by_clause(e));
    let select = |x: &str| sql!("SELECT {} AS bluegreen_v FROM {from}{grouped}", Expr(x));
    let filter = |x: &str| sql!("SELECT 1 AS bluegreen_v FROM {from} WHERE {}", Expr(x));
    let mut r = ResolvedEntry::default();
    for c in &e.columns {
        let t = deparse(conn, m, &select(&c.expr.text), Part::Select).await?;
        r.columns.insert(c.name.clone(), t);
    }
    if let Some(w) = &e.where_ {
        r.where_ = Some(deparse(conn, m, &filter(&w.text), Part::Where).await?);
    }
    for g in &e.group_by {
        r.group_by
            .push(deparse(conn, m, &select(&g.text), Part::Select).await?);
    }
    for it in &e.from_clause.items {
        r.on.push(match &it.join {
            None => None,
            Some((_, cond)) => Some(deparse(conn, m, &filter(cond), Part::Where).await?),
        });
    }
    if let Some(sk) = &e.sync_key {
        for (c, x) in sk {
            let t = deparse(conn, m, &select(&x.text), Part::Select).await?;
            r.sync_key.insert(c.clone(), t);
        }
    }
    Ok(r)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// The select-list expression before `AS bluegreen_v`.
    Select,
    /// The WHERE condition.
    Where,
}

async fn deparse(
    conn: &mut PgConnection,
    m: &Mapping,
    query: &Sql,
    part: Part,
) -> Result<String, Diagnostic> {
    exec(conn, &set_mapping_search_path(m, true)).await?;
    exec(
        conn,
        &sql!("CREATE OR REPLACE TEMP VIEW bluegreen_resolve AS {query}"),
    )
    .await?;
    exec(conn, &sql!("SET LOCAL search_path = pg_catalog")).await?;
    let def: String = sqlx::query_scalar(
        "SELECT pg_catalog.pg_get_viewdef('bluegreen_resolve'::regclass, false)",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db_error)?;
    exec(conn, &sql!("DROP VIEW bluegreen_resolve")).await?;
    extract(&def, part).ok_or_else(|| {
        Diagnostic::error(
            "resolve-failed",
            format!("cannot read PostgreSQL's rendering of an expression: {def}"),
        )
    })
}

/// The select-list expression (before `AS bluegreen_v`) or the WHERE condition of a view's
/// definition, at parenthesis depth 0.
fn extract(def: &str, part: Part) -> Option<String> {
    let toks = tokens(def).ok()?;
    let depth_of = |toks: &[Token], upto: usize| {
        toks[..upto].iter().fold(0i32, |d, t| {
            if t.is_punct("(") {
                d + 1
            } else if t.is_punct(")") {
                d - 1
            } else {
                d
            }
        })
    };
    let top = |k: usize, w: &str| toks[k].is_word(w) && depth_of(&toks, k) == 0;
    match part {
        Part::Select => {
            let start = toks.iter().position(|t| t.is_word("select"))?;
            let as_ = (start + 1..toks.len().saturating_sub(1)).find(|&k| {
                top(k, "as") && toks[k + 1].kind == Kind::Word && toks[k + 1].text == "bluegreen_v"
            })?;
            Some(def[toks[start].end()..toks[as_].start].trim().to_string())
        }
        Part::Where => {
            let w = (0..toks.len()).find(|&k| top(k, "where"))?;
            let end = (w + 1..toks.len())
                .find(|&k| top(k, "group") || toks[k].is_punct(";"))
                .map_or(def.len(), |k| toks[k].start);
            Some(def[toks[w].end()..end].trim().to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_expression_and_the_condition_back() {
        let def = " SELECT (md5(('org:'::text || (w.email)::text)))::uuid AS bluegreen_v\n   FROM (public.c c\n     JOIN public.w w ON (((w.id = c.wid) AND (c.name OPERATOR(public.=) w.email))))\n  WHERE (public.norm(w.name) = 'x'::text);";
        assert_eq!(
            extract(def, Part::Select).unwrap(),
            "(md5(('org:'::text || (w.email)::text)))::uuid"
        );
        assert_eq!(
            extract(def, Part::Where).unwrap(),
            "(public.norm(w.name) = 'x'::text)"
        );
        let grouped = " SELECT min(w.name) AS bluegreen_v\n   FROM public.w w\n  GROUP BY w.email;";
        assert_eq!(extract(grouped, Part::Select).unwrap(), "min(w.name)");
    }
}
