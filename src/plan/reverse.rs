//! How each entry's driving table is reversed (green -> blue) for a lossless rollback, and which
//! entry owns it. Pure.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::catalog::Catalog;
use crate::mapping::{Mapping, Reverse, TableEntry};

use super::keys::{cast_of, plain_column_of};

/// Whether rollback can rebuild the driving table's rows from green.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Verdict {
    /// Every blue column comes back (renames and casts inverted, the rest declared).
    #[serde(rename = "invertible")]
    Invertible,
    /// `reverse: none`, or blue columns nothing rebuilds: rollback loses writes made on green.
    #[serde(rename = "lossy")]
    Lossy,
    /// Another entry on the same driving table carries its reverse.
    #[serde(rename = "not applicable")]
    NotApplicable,
    /// Cannot be inverted at all (`group_by` merges rows).
    #[serde(rename = "no")]
    No,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Invertible => "invertible",
            Verdict::Lossy => "lossy",
            Verdict::NotApplicable => "not applicable",
            Verdict::No => "no",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ReversePlan {
    pub verdict: Verdict,
    /// Blue column -> expression over the green table.
    pub columns: Vec<(String, String)>,
    pub auto: Vec<String>,
    pub declared: Vec<String>,
    pub missing: Vec<String>,
}

/// How each entry's driving table is reversed (green -> blue), and which entry owns it.
pub fn reverse_plan(m: &Mapping, e: &TableEntry, cat: &Catalog) -> ReversePlan {
    let mut rp = ReversePlan {
        verdict: Verdict::No,
        columns: Vec::new(),
        auto: Vec::new(),
        declared: Vec::new(),
        missing: Vec::new(),
    };
    let driving = e.from_clause.driving();
    if matches!(e.reverse, Reverse::None) {
        rp.verdict = Verdict::Lossy;
        return rp;
    }
    if !e.group_by.is_empty() {
        rp.verdict = Verdict::No;
        return rp;
    }
    // Another entry on the same driving table that declares its reverse owns it.
    if matches!(e.reverse, Reverse::Auto)
        && m.tables.iter().any(|o| {
            o.name != e.name
                && matches!(o.reverse, Reverse::Columns(_))
                && o.from_clause.items.first().map(|i| &i.table) == Some(&driving.table)
        })
    {
        rp.verdict = Verdict::NotApplicable;
        return rp;
    }
    let Some(bt) = cat.table(&driving.table) else {
        rp.verdict = Verdict::No;
        return rp;
    };
    let declared: BTreeMap<&str, &str> = match &e.reverse {
        Reverse::Columns(cols) => cols
            .iter()
            .map(|(c, x)| (c.as_str(), x.text.as_str()))
            .collect(),
        _ => BTreeMap::new(),
    };
    for bc in &bt.columns {
        if let Some(x) = declared.get(bc.name.as_str()) {
            rp.columns.push((bc.name.clone(), x.to_string()));
            rp.declared.push(bc.name.clone());
            continue;
        }
        let auto = e.columns.iter().find(|c| {
            c.value_map.is_none()
                && (plain_column_of(&c.expr.text, &driving.alias).as_deref()
                    == Some(bc.name.as_str())
                    || cast_of(&c.expr.text, &driving.alias).as_deref() == Some(bc.name.as_str()))
        });
        match auto {
            Some(c) => {
                rp.columns.push((
                    bc.name.clone(),
                    format!("{}::{}", crate::sql::Ident::new(&c.name), bc.type_sql),
                ));
                rp.auto.push(bc.name.clone());
            }
            None => rp.missing.push(bc.name.clone()),
        }
    }
    rp.verdict = if rp.missing.is_empty() {
        Verdict::Invertible
    } else {
        Verdict::Lossy
    };
    rp
}
