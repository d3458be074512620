//! Naming every difference of a chunk whose digests differ: rows of both sides fetched by key,
//! then keys missing, extra, duplicated, or changed (with the differing columns).

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{PgConnection, Row};

use super::{Task, blue_select};
use crate::catalog;
use crate::mapping::{Mapping, TableEntry};
use crate::plan::upsert_key;
use crate::sql::{Ident, Sql, join, sql};

/// How a key differs between M(blue) and green.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DifferenceKind {
    /// In M(blue), not in green.
    Missing,
    /// In green only.
    Extra,
    /// The key occurs a different number of times.
    Duplicated,
    /// Same key, other values.
    Changed,
}

impl DifferenceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DifferenceKind::Missing => "missing",
            DifferenceKind::Extra => "extra",
            DifferenceKind::Duplicated => "duplicated",
            DifferenceKind::Changed => "changed",
        }
    }
}

impl std::fmt::Display for DifferenceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    pub table: String,
    pub kind: DifferenceKind,
    pub key: String,
    pub columns: Vec<String>,
    /// The differing values, only with --show-values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
}

type Keyed = HashMap<String, Vec<Vec<Option<String>>>>;

async fn keyed_rows(conn: &mut PgConnection, sql: Sql) -> Result<Keyed, sqlx::Error> {
    let mut out: Keyed = HashMap::new();
    let rows = sqlx::query(sql.assert_safe()).fetch_all(&mut *conn).await?;
    for r in rows {
        let k: String = r.try_get(0)?;
        let v: Vec<Option<String>> = r.try_get(1)?;
        out.entry(k).or_default().push(v);
    }
    Ok(out)
}

/// Name every difference of a chunk: keys missing, extra, duplicated, changed (with columns).
pub(super) async fn locate(
    conn: &mut PgConnection,
    m: &Mapping,
    e: &TableEntry,
    gt: &catalog::Table,
    t: &Task,
    show_values: bool,
) -> Result<Vec<Difference>, sqlx::Error> {
    let key =
        upsert_key(e, gt).unwrap_or_else(|| e.columns.iter().map(|c| c.name.clone()).collect());
    let cols: Vec<&str> = e
        .columns
        .iter()
        .filter(|c| gt.column(&c.name).is_some())
        .map(|c| c.name.as_str())
        .collect();
    let arr = |p: &str| {
        format!(
            "ARRAY[{}]::text[]",
            join(
                cols.iter().map(|c| format!("{p}.{}::text", Ident::new(*c))),
                ", "
            )
        )
    };
    let krow = |p: &str| {
        format!(
            "ROW({})::text",
            join(key.iter().map(|c| format!("{p}.{}", Ident::new(c))), ", ")
        )
    };
    let green = keyed_rows(
        conn,
        sql!(
            "SELECT {}, {} FROM {} AS g WHERE {}",
            krow("g"),
            arr("g"),
            gt.qname(),
            t.green_cond
        ),
    )
    .await?;
    let blue = keyed_rows(
        conn,
        sql!(
            "SELECT {}, {} FROM ({}) AS b",
            krow("b"),
            arr("b"),
            blue_select(m, e, gt, &t.blue_cond)
        ),
    )
    .await?;
    let mut keys: Vec<&String> = blue.keys().chain(green.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    let show = |v: &[Option<String>], idx: &[usize]| {
        idx.iter()
            .map(|i| v[*i].clone().unwrap_or_else(|| "NULL".into()))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    for k in keys {
        let (b, g) = (blue.get(k), green.get(k));
        let diff = |kind: DifferenceKind,
                    columns: Vec<String>,
                    expected: Option<String>,
                    found: Option<String>| Difference {
            table: e.name.clone(),
            kind,
            key: k.clone(),
            columns,
            expected: expected.filter(|_| show_values),
            found: found.filter(|_| show_values),
        };
        match (b, g) {
            (Some(b), None) => out.push(diff(
                DifferenceKind::Missing,
                Vec::new(),
                Some(show(&b[0], &(0..cols.len()).collect::<Vec<_>>())),
                None,
            )),
            (None, Some(g)) => out.push(diff(
                DifferenceKind::Extra,
                Vec::new(),
                None,
                Some(show(&g[0], &(0..cols.len()).collect::<Vec<_>>())),
            )),
            (Some(b), Some(g)) if b.len() != g.len() => out.push(diff(
                DifferenceKind::Duplicated,
                Vec::new(),
                Some(format!("{} row(s)", b.len())),
                Some(format!("{} row(s)", g.len())),
            )),
            (Some(b), Some(g)) => {
                // Same count per key: pair rows after sorting, compare column by column.
                let mut bs = b.clone();
                let mut gs = g.clone();
                bs.sort();
                gs.sort();
                for (br, gr) in bs.iter().zip(gs.iter()) {
                    let idx: Vec<usize> = (0..cols.len()).filter(|i| br[*i] != gr[*i]).collect();
                    if !idx.is_empty() {
                        out.push(diff(
                            DifferenceKind::Changed,
                            idx.iter().map(|i| cols[*i].to_string()).collect(),
                            Some(show(br, &idx)),
                            Some(show(gr, &idx)),
                        ));
                    }
                }
            }
            (None, None) => {}
        }
    }
    Ok(out)
}
