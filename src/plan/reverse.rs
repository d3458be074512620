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
    /// Another entry on the same driving table is the row owner; this one writes back the blue
    /// columns only it rebuilds (updates only).
    #[serde(rename = "column owner")]
    ColumnOwner,
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
            Verdict::ColumnOwner => "column owner",
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
    /// Mapped green columns no reverse expression of this entry reads (computed from blue): a
    /// green write to them does not reach blue and is recomputed by the next write to what they
    /// are computed from ("read-only after cutover", design review C2).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub read_only: Vec<String>,
}

/// Blue column -> (expression over the green table, declared under `reverse:`).
type Rebuilt = BTreeMap<String, (String, bool)>;

/// The blue columns of `bt` that entry `e` can rebuild from its green table: declared under
/// `reverse:`, or inverted automatically (a plain rename or a cast of a driving column), with the
/// expression over the green table and whether it was declared.
fn reversible(e: &TableEntry, bt: &crate::catalog::Table) -> Rebuilt {
    let driving = e.from_clause.driving();
    let mut out = BTreeMap::new();
    if let Reverse::Columns(cols) = &e.reverse {
        for (c, x) in cols {
            out.insert(c.clone(), (x.text.clone(), true));
        }
    }
    for bc in &bt.columns {
        if out.contains_key(&bc.name) {
            continue;
        }
        let auto = e.columns.iter().find(|c| {
            c.value_map.is_none()
                && (plain_column_of(&c.expr.text, &driving.alias).as_deref()
                    == Some(bc.name.as_str())
                    || cast_of(&c.expr.text, &driving.alias).as_deref() == Some(bc.name.as_str()))
        });
        if let Some(c) = auto {
            out.insert(
                bc.name.clone(),
                (
                    format!(
                        "{}::{}",
                        crate::sql::Ident::new(&c.name),
                        inverted_cast_type(bc)
                    ),
                    false,
                ),
            );
        }
    }
    out
}

/// The type an inverted cast of a value into blue column `bc` names: its type without a length
/// ([`unconstrained`]); for a domain over a length-limited type, the domain's base type without
/// it (an explicit cast to the domain truncates as well; the assignment to the column applies the
/// domain's length and constraints).
pub fn inverted_cast_type(bc: &crate::catalog::Column) -> String {
    match &bc.domain_base {
        Some(base) if unconstrained(base) != *base => unconstrained(base),
        _ => unconstrained(&bc.type_sql),
    }
}

/// The type an inverted cast names: `type_sql` without the length of a string or bit type.
/// An explicit cast to `character varying(8)` truncates a longer green value silently, and the
/// rollback would lose its end; cast to the unconstrained type, the blue column's assignment
/// checks the length and a value blue cannot take is a reverse failure, standing on green.
fn unconstrained(type_sql: &str) -> String {
    const LENGTHED: [(&str, &str); 4] = [
        ("character varying(", "character varying"),
        ("character(", "pg_catalog.bpchar"),
        ("bit varying(", "bit varying"),
        ("bit(", "bit varying"),
    ];
    for (prefix, base) in LENGTHED {
        if let Some(rest) = type_sql.strip_prefix(prefix)
            && let Some(close) = rest.find(')')
        {
            return format!("{base}{}", &rest[close + 1..]);
        }
    }
    type_sql.to_string()
}

/// How each entry's driving table is reversed (green -> blue), and which entry owns what. Several
/// entries may read one driving table (a split): each blue column is reversed by at most one of
/// them, every reversing entry rebuilds the whole blue key, and one is the row owner (the first
/// with a declared `reverse`, else the first) that alone inserts and deletes blue rows; the others
/// own the columns the row owner does not rebuild, and update only those.
pub fn reverse_plan(m: &Mapping, e: &TableEntry, cat: &Catalog) -> ReversePlan {
    let mut rp = ReversePlan {
        verdict: Verdict::No,
        columns: Vec::new(),
        auto: Vec::new(),
        declared: Vec::new(),
        missing: Vec::new(),
        read_only: Vec::new(),
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
    let Some(bt) = cat.table(&driving.table) else {
        rp.verdict = Verdict::No;
        return rp;
    };
    let key: Vec<String> = bt
        .primary_key
        .as_ref()
        .map(|k| k.columns.clone())
        .or_else(|| bt.strict_unique_keys().into_iter().next())
        .unwrap_or_default();
    // The entries that could reverse this table, each with what it rebuilds; those that cannot
    // rebuild the key cannot find the blue rows to write.
    let peers: Vec<(&TableEntry, Rebuilt)> = m
        .tables
        .iter()
        .filter(|o| {
            o.from_clause.driving().table == driving.table
                && !matches!(o.reverse, Reverse::None)
                && o.group_by.is_empty()
        })
        .map(|o| (o, reversible(o, bt)))
        .filter(|(_, r)| !key.is_empty() && key.iter().all(|k| r.contains_key(k)))
        .collect();
    let owner = peers
        .iter()
        .find(|(o, _)| matches!(o.reverse, Reverse::Columns(_)))
        .or(peers.first())
        .map(|(o, _)| o.name.clone());
    let mine = peers.iter().find(|(o, _)| o.name == e.name);
    let Some((_, my_cols)) = mine else {
        // Cannot rebuild the blue key (or another entry owns the table and this one nothing).
        rp.verdict = if owner.is_some() {
            Verdict::NotApplicable
        } else {
            Verdict::Lossy
        };
        rp.missing = bt
            .columns
            .iter()
            .filter(|c| c.generated.is_empty())
            .map(|c| c.name.clone())
            .collect();
        return rp;
    };
    let is_owner = owner.as_deref() == Some(e.name.as_str());
    // Each blue column to the row owner if it rebuilds it, else to the first peer that does.
    let assigned = |c: &str| -> Option<&str> {
        let first_owner = peers
            .iter()
            .find(|(o, r)| Some(&o.name) == owner.as_ref() && r.contains_key(c));
        first_owner
            .or_else(|| peers.iter().find(|(_, r)| r.contains_key(c)))
            .map(|(o, _)| o.name.as_str())
    };
    let mut owns_other = false;
    for bc in bt.columns.iter().filter(|c| c.generated.is_empty()) {
        let who = assigned(&bc.name);
        let keyed = key.contains(&bc.name);
        if who == Some(e.name.as_str()) || (keyed && my_cols.contains_key(&bc.name)) {
            let (x, declared) = &my_cols[&bc.name];
            rp.columns.push((bc.name.clone(), x.clone()));
            if *declared {
                rp.declared.push(bc.name.clone());
            } else {
                rp.auto.push(bc.name.clone());
            }
            if !keyed {
                owns_other = true;
            }
        } else if who.is_none() && is_owner {
            rp.missing.push(bc.name.clone());
        }
    }
    // The green columns the reverse expressions name (as identifiers, conservatively).
    let read: std::collections::BTreeSet<String> = rp
        .columns
        .iter()
        .flat_map(|(_, x)| {
            crate::sql::scan::tokens(x)
                .map(|t| t.iter().filter_map(|t| t.ident()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    rp.read_only = e
        .columns
        .iter()
        .filter(|c| !read.contains(&c.name))
        .map(|c| c.name.clone())
        .collect();
    rp.verdict = if is_owner {
        if rp.missing.is_empty() {
            Verdict::Invertible
        } else {
            Verdict::Lossy
        }
    } else if owns_other {
        Verdict::ColumnOwner
    } else {
        Verdict::NotApplicable
    };
    rp
}

#[cfg(test)]
mod tests {
    use super::unconstrained;

    #[test]
    fn inverted_casts_drop_the_length_blue_checks_on_assignment() {
        assert_eq!(unconstrained("character varying(8)"), "character varying");
        assert_eq!(
            unconstrained("character varying(8)[]"),
            "character varying[]"
        );
        assert_eq!(unconstrained("character(2)"), "pg_catalog.bpchar");
        assert_eq!(unconstrained("bit(3)"), "bit varying");
        assert_eq!(unconstrained("bit varying(5)"), "bit varying");
        assert_eq!(unconstrained("numeric(10,2)"), "numeric(10,2)");
        assert_eq!(unconstrained("integer"), "integer");
        assert_eq!(unconstrained("text"), "text");
    }
}
