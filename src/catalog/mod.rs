//! pg_catalog -> plain [`Catalog`] values: what `plan` and the later commands need to know about
//! the blue and green schemas (tables, columns and types, keys, indexes, constraints, sequences and
//! identity columns, size estimates, `search_path` settings, server version). Loading is the only
//! I/O here; everything else in the crate reads these plain structs.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};

use crate::sql::QName;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Catalog {
    pub server: Server,
    /// Keyed by (schema, table).
    pub tables: BTreeMap<(String, String), Table>,
    pub sequences: Vec<Sequence>,
    pub search_path_settings: Vec<SearchPathSetting>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Server {
    pub version: String,
    pub version_num: i32,
    pub database: String,
    pub user: String,
    pub is_superuser: bool,
    pub search_path: String,
    pub schemas: Vec<String>,
    /// `shared_buffers` in bytes.
    #[serde(skip)]
    pub shared_buffers: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Table {
    #[serde(skip)]
    pub oid: i64,
    pub schema: String,
    pub name: String,
    pub partitioned: bool,
    /// Inheritance children (not partitions): the parent's keys do not span them.
    pub inherited: bool,
    /// A logical-replication subscription writes it (its apply worker fires no statement
    /// triggers).
    pub subscribed: bool,
    /// `pg_class.reltuples`: -1 when never analysed.
    pub reltuples: f64,
    pub total_bytes: i64,
    pub heap_bytes: i64,
    pub columns: Vec<Column>,
    pub primary_key: Option<Key>,
    pub unique: Vec<Key>,
    pub checks: Vec<Check>,
    pub foreign_keys: Vec<ForeignKey>,
    pub indexes: Vec<Index>,
    /// Exclusion constraints.
    pub exclusions: Vec<Key>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Column {
    pub name: String,
    /// As `format_type` prints it: valid, quoted SQL.
    pub type_sql: String,
    #[serde(skip)]
    pub type_oid: i64,
    pub not_null: bool,
    pub default_sql: Option<String>,
    /// `a` (always), `d` (by default) or empty.
    pub identity: String,
    /// `s` (stored generated) or empty.
    pub generated: String,
    /// The type's `=` is not pg_catalog's (citext's, an extension's): comparisons generated under
    /// `search_path = pg_catalog` would not use it.
    #[serde(default)]
    pub own_equality: bool,
    /// For a domain, its base type as `format_type` prints it (with the length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_base: Option<String>,
    /// The column's collation as `regcollation` prints it; `None` for a type without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collation: Option<String>,
    /// `pg_stats.correlation`: how far the column's order is from the heap's (`None` until
    /// analysed). Chunk planning reads it (`plan::chunks::scattered`).
    #[serde(skip)]
    pub correlation: Option<f64>,
}

impl Column {
    pub fn has_default(&self) -> bool {
        self.default_sql.is_some() || !self.identity.is_empty() || !self.generated.is_empty()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Key {
    pub name: String,
    pub columns: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    /// The boolean expression over the table's columns.
    pub expr: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ForeignKey {
    pub name: String,
    pub columns: Vec<String>,
    pub ref_table: QName,
    pub ref_columns: Vec<String>,
    pub definition: String,
    pub validated: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Index {
    pub name: String,
    pub unique: bool,
    pub primary: bool,
    /// `None` for an expression column.
    pub columns: Vec<Option<String>>,
    pub partial: bool,
    pub nulls_not_distinct: bool,
    /// False for an index a failed CREATE INDEX CONCURRENTLY left behind.
    pub valid: bool,
    /// False for a DEFERRABLE unique constraint: duplicates may exist inside a transaction.
    pub immediate: bool,
    pub definition: String,
    /// The index belongs to a PRIMARY KEY, UNIQUE or EXCLUDE constraint.
    pub backs_constraint: bool,
    pub bytes: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sequence {
    pub name: QName,
    /// The column that owns it (serial or identity), if any.
    pub owner: Option<(QName, String)>,
    pub last_value: Option<i64>,
    pub identity: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct SearchPathSetting {
    /// `None`: the database-level setting.
    pub role: Option<String>,
    /// false: `ALTER ROLE ... SET` for all databases.
    pub in_this_database: bool,
    pub search_path: String,
}

impl Table {
    pub fn qname(&self) -> QName {
        QName::new(&self.schema, &self.name)
    }
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }
    /// Unique keys usable to identify rows: the primary key, then UNIQUE constraints and unique
    /// non-partial indexes on plain columns.
    pub fn unique_keys(&self) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = Vec::new();
        for ix in &self.indexes {
            if ix.unique && !ix.partial && ix.columns.iter().all(Option::is_some) {
                let cols: Vec<String> = ix.columns.iter().flatten().cloned().collect();
                if !out.contains(&cols) {
                    if ix.primary {
                        out.insert(0, cols);
                    } else {
                        out.push(cols);
                    }
                }
            }
        }
        out
    }
    /// Keys that hold at every statement's end: unique, valid, not deferrable, not partial, on
    /// plain NOT NULL columns.
    pub fn strict_unique_keys(&self) -> Vec<Vec<String>> {
        if self.inherited {
            // A key of the parent holds within the parent only; children may repeat its values.
            return Vec::new();
        }
        self.indexes
            .iter()
            .filter(|ix| {
                ix.unique
                    && ix.valid
                    && ix.immediate
                    && !ix.partial
                    && ix.columns.iter().all(Option::is_some)
            })
            .map(|ix| {
                ix.columns
                    .iter()
                    .flatten()
                    .cloned()
                    .collect::<Vec<String>>()
            })
            .filter(|cols| {
                cols.iter()
                    .all(|c| self.column(c).is_some_and(|col| col.not_null))
            })
            .collect()
    }

    /// Keys `INSERT ... ON CONFLICT` can arbitrate on so that every row meets its one match: valid,
    /// immediate, not partial, on plain columns, and either NOT NULL or `NULLS NOT DISTINCT` (a
    /// nullable plain UNIQUE never conflicts on NULL, so every upsert of a NULL key would insert a
    /// duplicate). The primary key first.
    pub fn arbiter_keys(&self) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = Vec::new();
        for ix in &self.indexes {
            if !(ix.unique
                && ix.valid
                && ix.immediate
                && !ix.partial
                && ix.columns.iter().all(Option::is_some))
            {
                continue;
            }
            let cols: Vec<String> = ix.columns.iter().flatten().cloned().collect();
            let nulls_ok = ix.nulls_not_distinct
                || cols
                    .iter()
                    .all(|c| self.column(c).is_some_and(|col| col.not_null));
            if nulls_ok && !out.contains(&cols) {
                if ix.primary {
                    out.insert(0, cols);
                } else {
                    out.push(cols);
                }
            }
        }
        out
    }

    /// True when some index's leading columns are exactly `cols` (in any order).
    pub fn has_index_on(&self, cols: &[String]) -> bool {
        self.indexes.iter().any(|ix| {
            !ix.partial
                && ix.columns.len() >= cols.len()
                && ix.columns[..cols.len()]
                    .iter()
                    .all(|c| c.as_ref().is_some_and(|c| cols.contains(c)))
        })
    }
}

/// `t` and every partition and inheritance child below it (writes straight to a child fire only
/// the child's statement triggers), parents first.
pub async fn with_descendants(
    conn: &mut sqlx::PgConnection,
    t: &QName,
) -> Result<Vec<QName>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "WITH RECURSIVE d(oid, depth) AS (
             SELECT to_regclass($1)::oid, 0
             UNION ALL
             SELECT i.inhrelid, d.depth + 1 FROM pg_catalog.pg_inherits i JOIN d ON i.inhparent = d.oid
         )
         SELECT n.nspname::text, c.relname::text FROM d JOIN pg_catalog.pg_class c ON c.oid = d.oid
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace ORDER BY d.depth, 1, 2",
    )
    .bind(t.to_string())
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|(s, n)| QName::new(s, n)).collect())
}

impl Catalog {
    pub fn table(&self, q: &QName) -> Option<&Table> {
        self.tables.get(&(q.schema.clone(), q.name.clone()))
    }
    pub fn tables_in<'a>(&'a self, schema: &'a str) -> impl Iterator<Item = &'a Table> + 'a {
        self.tables.values().filter(move |t| t.schema == schema)
    }
    pub fn schema_exists(&self, schema: &str) -> bool {
        self.server.schemas.iter().any(|s| s == schema)
    }
}

fn get<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(
    row: &'r PgRow,
    col: &str,
) -> Result<T, sqlx::Error> {
    row.try_get(col)
}

/// Read the catalog of `schemas` (plus server facts) on `conn`, in whatever transaction it is in.
pub async fn load(conn: &mut PgConnection, schemas: &[&str]) -> Result<Catalog, sqlx::Error> {
    let schemas: Vec<String> = schemas.iter().map(|s| s.to_string()).collect();
    let srow = sqlx::query(include_str!("server.sql"))
        .fetch_one(&mut *conn)
        .await?;
    let server = Server {
        version: get(&srow, "server_version")?,
        version_num: get(&srow, "server_version_num")?,
        database: get(&srow, "database")?,
        user: get(&srow, "current_user")?,
        is_superuser: get::<Option<bool>>(&srow, "is_superuser")?.unwrap_or(false),
        search_path: get(&srow, "search_path")?,
        shared_buffers: get(&srow, "shared_buffers")?,
        schemas: get::<Option<Vec<String>>>(&srow, "schemas")?.unwrap_or_default(),
    };

    let mut by_oid: BTreeMap<i64, Table> = BTreeMap::new();
    for r in sqlx::query(include_str!("tables.sql"))
        .bind(&schemas)
        .fetch_all(&mut *conn)
        .await?
    {
        let t = Table {
            oid: get(&r, "oid")?,
            schema: get(&r, "schema")?,
            name: get(&r, "name")?,
            partitioned: get::<String>(&r, "kind")? == "p",
            inherited: get(&r, "inherited")?,
            subscribed: get(&r, "subscribed")?,
            reltuples: get(&r, "reltuples")?,
            total_bytes: get(&r, "total_bytes")?,
            heap_bytes: get(&r, "heap_bytes")?,
            columns: Vec::new(),
            primary_key: None,
            unique: Vec::new(),
            checks: Vec::new(),
            foreign_keys: Vec::new(),
            indexes: Vec::new(),
            exclusions: Vec::new(),
        };
        by_oid.insert(t.oid, t);
    }
    let oids: Vec<i64> = by_oid.keys().copied().collect();

    for r in sqlx::query(include_str!("columns.sql"))
        .bind(&oids)
        .fetch_all(&mut *conn)
        .await?
    {
        let oid: i64 = get(&r, "table_oid")?;
        if let Some(t) = by_oid.get_mut(&oid) {
            t.columns.push(Column {
                name: get(&r, "name")?,
                type_sql: get(&r, "type_sql")?,
                type_oid: get(&r, "type_oid")?,
                not_null: get(&r, "not_null")?,
                default_sql: get(&r, "default_sql")?,
                identity: get(&r, "identity")?,
                generated: get(&r, "generated")?,
                own_equality: get(&r, "own_equality")?,
                domain_base: get(&r, "domain_base")?,
                collation: get(&r, "collation")?,
                correlation: get(&r, "correlation")?,
            });
        }
    }

    for r in sqlx::query(include_str!("constraints.sql"))
        .bind(&oids)
        .fetch_all(&mut *conn)
        .await?
    {
        let oid: i64 = get(&r, "table_oid")?;
        let Some(t) = by_oid.get_mut(&oid) else {
            continue;
        };
        let name: String = get(&r, "name")?;
        let columns: Vec<String> = get(&r, "columns")?;
        match get::<String>(&r, "kind")?.as_str() {
            "p" => t.primary_key = Some(Key { name, columns }),
            "u" => t.unique.push(Key { name, columns }),
            "x" => t.exclusions.push(Key { name, columns }),
            "c" => t.checks.push(Check {
                name,
                expr: get::<Option<String>>(&r, "check_expr")?.unwrap_or_default(),
            }),
            "f" => t.foreign_keys.push(ForeignKey {
                name,
                columns,
                ref_table: QName::new(
                    get::<Option<String>>(&r, "ref_schema")?.unwrap_or_default(),
                    get::<Option<String>>(&r, "ref_table")?.unwrap_or_default(),
                ),
                ref_columns: get(&r, "ref_columns")?,
                definition: get(&r, "definition")?,
                validated: get(&r, "validated")?,
            }),
            _ => {}
        }
    }

    for r in sqlx::query(include_str!("indexes.sql"))
        .bind(&oids)
        .fetch_all(&mut *conn)
        .await?
    {
        let oid: i64 = get(&r, "table_oid")?;
        let Some(t) = by_oid.get_mut(&oid) else {
            continue;
        };
        t.indexes.push(Index {
            name: get(&r, "name")?,
            unique: get(&r, "is_unique")?,
            primary: get(&r, "is_primary")?,
            columns: get::<Option<Vec<Option<String>>>>(&r, "columns")?.unwrap_or_default(),
            partial: get(&r, "is_partial")?,
            nulls_not_distinct: get(&r, "nulls_not_distinct")?,
            valid: get(&r, "is_valid")?,
            immediate: get(&r, "is_immediate")?,
            definition: get(&r, "definition")?,
            backs_constraint: get(&r, "backs_constraint")?,
            bytes: get(&r, "bytes")?,
        });
    }

    let mut sequences = Vec::new();
    for r in sqlx::query(include_str!("sequences.sql"))
        .bind(&schemas)
        .fetch_all(&mut *conn)
        .await?
    {
        let owner = match (
            get::<Option<String>>(&r, "owner_schema")?,
            get::<Option<String>>(&r, "owner_table")?,
            get::<Option<String>>(&r, "owner_column")?,
        ) {
            (Some(s), Some(t), Some(c)) => Some((QName::new(s, t), c)),
            _ => None,
        };
        sequences.push(Sequence {
            name: QName::new(get::<String>(&r, "schema")?, get::<String>(&r, "name")?),
            owner,
            last_value: get(&r, "last_value")?,
            identity: get::<Option<bool>>(&r, "is_identity")?.unwrap_or(false),
        });
    }

    let mut search_path_settings = Vec::new();
    for r in sqlx::query(include_str!("settings.sql"))
        .fetch_all(&mut *conn)
        .await?
    {
        search_path_settings.push(SearchPathSetting {
            role: get(&r, "role")?,
            in_this_database: get(&r, "in_this_database")?,
            search_path: get(&r, "search_path")?,
        });
    }

    let tables = by_oid
        .into_values()
        .map(|t| ((t.schema.clone(), t.name.clone()), t))
        .collect();
    Ok(Catalog {
        server,
        tables,
        sequences,
        search_path_settings,
    })
}
