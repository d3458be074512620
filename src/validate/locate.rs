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
    /// The sync keys of the rows involved (column texts), for the re-check of pending keys.
    #[serde(skip)]
    pub sync_keys: Vec<Vec<Option<String>>>,
}

type Keyed = HashMap<String, Vec<Vec<Option<String>>>>;

async fn keyed_rows(
    conn: &mut PgConnection,
    sql: Sql,
    binds: &[Vec<Option<String>>],
) -> Result<Keyed, sqlx::Error> {
    let mut out: Keyed = HashMap::new();
    let mut q = sqlx::query(sql.assert_safe());
    for b in binds {
        q = q.bind(b);
    }
    for r in q.fetch_all(&mut *conn).await? {
        let k: String = r.try_get(0)?;
        let v: Vec<Option<String>> = r.try_get(1)?;
        out.entry(k).or_default().push(v);
    }
    Ok(out)
}

/// Which rows of an entry to compare: a chunk's conditions, or a set of sync keys.
pub(super) enum Rows<'a> {
    Chunk(&'a Task),
    /// The applier's key-restricted M(blue) and green condition, the keys as column arrays.
    Keys {
        blue: &'a Sql,
        green_condition: &'a str,
        keys: &'a [Vec<Option<String>>],
    },
}

/// Name every difference of a chunk or key set: keys missing, extra, duplicated, changed (with
/// columns).
pub(super) async fn locate(
    conn: &mut PgConnection,
    m: &Mapping,
    e: &TableEntry,
    gt: &catalog::Table,
    rows: Rows<'_>,
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
    let sync_idx: Vec<usize> = crate::plan::sync_key(e, gt)
        .map(|(k, _)| k)
        .unwrap_or_default()
        .iter()
        .filter_map(|(c, _)| cols.iter().position(|x| x == c))
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
    let (green_cond, blue_from, binds): (String, String, &[Vec<Option<String>>]) = match rows {
        Rows::Chunk(t) => (
            t.green_cond.clone(),
            blue_select(m, e, gt, &t.blue_cond).into_string(),
            &[],
        ),
        Rows::Keys {
            blue,
            green_condition,
            keys,
        } => (green_condition.to_string(), blue.as_str().to_string(), keys),
    };
    let green = keyed_rows(
        conn,
        sql!(
            "SELECT {}, {} FROM {} AS bluegreen_g WHERE {green_cond}",
            krow("bluegreen_g"),
            arr("bluegreen_g"),
            gt.qname(),
        ),
        binds,
    )
    .await?;
    let blue = keyed_rows(
        conn,
        sql!("SELECT {}, {} FROM ({blue_from}) AS b", krow("b"), arr("b")),
        binds,
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
        let mut sync_keys: Vec<Vec<Option<String>>> = b
            .into_iter()
            .chain(g)
            .flatten()
            .map(|row| sync_idx.iter().map(|i| row[*i].clone()).collect())
            .collect();
        sync_keys.sort();
        sync_keys.dedup();
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
            sync_keys: sync_keys.clone(),
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
