//! Green secondary indexes, foreign keys and the keys copy's chunks partition, held back while
//! the copy writes into bare tables (`deferred`): recorded and dropped by `prepare`, rebuilt by
//! `copy` after the data (keys attached to their index, foreign keys NOT VALID at the live switch,
//! validated after it). Until then [`restore_keys`] puts the keys back into the catalog.

use sqlx::{PgConnection, Row};

use super::query;
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::{db_error, exec};
use crate::plan::steps::{Deferral, DeferralKind};
use crate::sql::QName;

/// A deferred object not restored yet.
#[derive(Clone, Debug)]
pub struct Pending {
    pub kind: DeferralKind,
    pub name: String,
    pub table: QName,
    /// `CREATE [UNIQUE] INDEX ...` (an index or a key), or a foreign key's definition
    /// (`FOREIGN KEY (...) REFERENCES ...`).
    pub definition: String,
    /// The table a foreign key references (recorded at prepare).
    pub ref_table: Option<QName>,
}

/// Record `d` and drop it (in the caller's transaction, with the green DDL).
pub async fn defer(conn: &mut PgConnection, m: &Mapping, d: &Deferral) -> Result<(), Diagnostic> {
    query(m, "INSERT INTO {deferred} (migration, kind, name, green_table, definition, ref_table) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING")
    .bind(d.kind.as_str())
    .bind(&d.name)
    .bind(&d.table.name)
    .bind(&d.definition)
    .bind(d.ref_table.as_ref().map(QName::to_string))
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    exec(conn, &d.drop).await
}

/// Everything not restored yet: indexes first, then foreign keys, each by name.
pub async fn pending(conn: &mut PgConnection, m: &Mapping) -> Result<Vec<Pending>, Diagnostic> {
    let rows = query(m, "SELECT kind, name, green_table, definition, (parse_ident(ref_table))[1] AS ref_schema, (parse_ident(ref_table))[2] AS ref_name FROM {deferred} WHERE migration = $1 AND NOT done ORDER BY kind DESC, name")
    .fetch_all(conn)
    .await
    .map_err(db_error)?;
    let mut out = Vec::new();
    for r in rows {
        let kind: String = r.get("kind");
        let kind = DeferralKind::parse(&kind).ok_or_else(|| {
            Diagnostic::error(
                "unknown-deferral",
                format!("the control schema holds a deferred object of kind `{kind}`, which this version of bluegreen does not know"),
            )
        })?;
        let definition: String = r.get("definition");
        let ref_table = match (
            r.get::<Option<String>, _>("ref_schema"),
            r.get::<Option<String>, _>("ref_name"),
        ) {
            (Some(s), Some(n)) => Some(QName::new(s, n)),
            // Recorded before `ref_table` existed: read it from the definition.
            _ if kind == DeferralKind::ForeignKey => referenced_table(&definition, &m.green),
            _ => None,
        };
        out.push(Pending {
            kind,
            name: r.get("name"),
            table: QName::new(&m.green, r.get::<String, _>("green_table")),
            definition,
            ref_table,
        });
    }
    Ok(out)
}

/// The table after `REFERENCES` in a constraint definition (unqualified: in `default_schema`).
fn referenced_table(definition: &str, default_schema: &str) -> Option<QName> {
    let toks = crate::sql::scan::tokens(definition).ok()?;
    let at = toks.iter().position(|t| t.is_word("references"))?;
    let first = toks.get(at + 1)?.ident()?;
    match (toks.get(at + 2), toks.get(at + 3)) {
        (Some(dot), Some(name)) if dot.is_punct(".") => Some(QName::new(first, name.ident()?)),
        _ => Some(QName::new(default_schema, first)),
    }
}

/// [`pending`], or nothing where the control schema does not exist yet.
pub async fn pending_if_any(
    conn: &mut PgConnection,
    m: &Mapping,
) -> Result<Vec<Pending>, Diagnostic> {
    let table = QName::new(&m.control_schema, "deferred").to_string();
    let exists: bool = sqlx::query_scalar("SELECT pg_catalog.to_regclass($1) IS NOT NULL")
        .bind(&table)
        .fetch_one(&mut *conn)
        .await
        .map_err(db_error)?;
    if !exists {
        return Ok(Vec::new());
    }
    pending(conn, m).await
}

/// Put the keys copy left out (dropped until their index is built after the data) back into
/// `cat` as the constraints they were, so every command between `prepare` and the end of the
/// copy sees green's keys as the DDL declares them (`pending`: what is still deferred).
pub fn restore_keys(
    cat: &mut crate::catalog::Catalog,
    pending: &[Pending],
) -> Result<(), Diagnostic> {
    for p in pending {
        if !matches!(p.kind, DeferralKind::PrimaryKey | DeferralKind::UniqueKey) {
            continue;
        }
        let Some(t) = cat
            .tables
            .get_mut(&(p.table.schema.clone(), p.table.name.clone()))
        else {
            continue;
        };
        let columns = key_columns(&p.definition).ok_or_else(|| {
            Diagnostic::error(
                "unknown-deferral",
                format!(
                    "cannot read the columns of deferred key {} from `{}`",
                    p.name, p.definition
                ),
            )
        })?;
        let primary = p.kind == DeferralKind::PrimaryKey;
        // A build interrupted before the attach leaves a plain unique index of that name.
        t.indexes.retain(|ix| ix.name != p.name);
        t.indexes.push(crate::catalog::Index {
            name: p.name.clone(),
            unique: true,
            primary,
            columns: columns.iter().cloned().map(Some).collect(),
            partial: false,
            nulls_not_distinct: false,
            valid: true,
            immediate: true,
            definition: p.definition.clone(),
            backs_constraint: true,
            bytes: 0,
        });
        let key = crate::catalog::Key {
            name: p.name.clone(),
            columns,
        };
        if primary {
            t.primary_key = Some(key);
        } else if !t.unique.iter().any(|u| u.name == p.name) {
            t.unique.push(key);
        }
    }
    Ok(())
}

/// The columns of a unique index's definition (`CREATE UNIQUE INDEX n ON t USING btree (a, "B")`).
fn key_columns(definition: &str) -> Option<Vec<String>> {
    let toks = crate::sql::scan::tokens(definition).ok()?;
    let using = toks.iter().position(|t| t.is_word("using"))?;
    let open = using + 2;
    if !toks.get(open)?.is_punct("(") {
        return None;
    }
    let mut out = Vec::new();
    for (i, t) in toks[open + 1..].iter().enumerate() {
        match i % 2 {
            0 => out.push(t.ident()?),
            _ if t.is_punct(",") => {}
            _ if t.is_punct(")") => return Some(out),
            _ => return None,
        }
    }
    None
}

/// The deferred foreign keys not validated yet.
pub async fn pending_foreign_keys(
    conn: &mut PgConnection,
    m: &Mapping,
) -> Result<Vec<Pending>, Diagnostic> {
    Ok(pending(conn, m)
        .await?
        .into_iter()
        .filter(|p| p.kind == DeferralKind::ForeignKey)
        .collect())
}

/// Mark a deferred object restored.
pub async fn mark_done(
    conn: &mut PgConnection,
    m: &Mapping,
    kind: DeferralKind,
    name: &str,
) -> Result<(), Diagnostic> {
    query(
        m,
        "UPDATE {deferred} SET done = true WHERE migration = $1 AND kind = $2 AND name = $3",
    )
    .bind(kind.as_str())
    .bind(name)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_columns_from_index_definitions() {
        assert_eq!(
            super::key_columns("CREATE UNIQUE INDEX leads_pkey ON leads_v2.leads USING btree (id)"),
            Some(vec!["id".to_string()])
        );
        assert_eq!(
            super::key_columns("CREATE UNIQUE INDEX \"K\" ON g.t USING btree (a, \"B c\")"),
            Some(vec!["a".to_string(), "B c".to_string()])
        );
        assert_eq!(
            super::key_columns("CREATE UNIQUE INDEX k ON g.t USING btree (lower(a))"),
            None
        );
    }

    #[test]
    fn referenced_tables_from_definitions() {
        let r = |d| super::referenced_table(d, "g").map(|q| q.display());
        assert_eq!(
            r("FOREIGN KEY (organization_id) REFERENCES organizations(id)").as_deref(),
            Some("g.organizations")
        );
        assert_eq!(
            r("FOREIGN KEY (a) REFERENCES \"Other\".\"T x\"(id) ON DELETE CASCADE").as_deref(),
            Some("Other.T x")
        );
        assert_eq!(r("CHECK (a > 0)"), None);
    }
}
