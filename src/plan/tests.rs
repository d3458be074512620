//! Mapping + synthetic catalog -> plan, with no database.

use std::collections::BTreeMap;
use std::path::Path;

use expect_test::expect;

use super::query::{Shape, insert_select};
use super::*;
use crate::catalog::{Catalog, Column, Index, Key, Table};

pub(crate) fn col(name: &str, ty: &str, not_null: bool) -> Column {
    Column {
        name: name.into(),
        type_sql: ty.into(),
        type_oid: 0,
        not_null,
        default_sql: None,
        identity: String::new(),
        generated: String::new(),
        own_equality: false,
        domain_base: None,
        collation: None,
        correlation: None,
    }
}

pub(crate) fn table(schema: &str, name: &str, cols: Vec<Column>, pk: &[&str]) -> Table {
    let pk: Vec<String> = pk.iter().map(|s| s.to_string()).collect();
    Table {
        oid: 0,
        schema: schema.into(),
        name: name.into(),
        partitioned: false,
        inherited: false,
        subscribed: false,
        exclusions: Vec::new(),
        reltuples: 250_000.0,
        total_bytes: 0,
        heap_bytes: 50_000_000,
        columns: cols,
        primary_key: (!pk.is_empty()).then(|| Key {
            name: format!("{name}_pkey"),
            columns: pk.clone(),
        }),
        unique: Vec::new(),
        checks: Vec::new(),
        foreign_keys: Vec::new(),
        indexes: if pk.is_empty() {
            Vec::new()
        } else {
            vec![Index {
                name: format!("{name}_pkey"),
                unique: true,
                primary: true,
                columns: pk.iter().cloned().map(Some).collect(),
                partial: false,
                nulls_not_distinct: false,
                valid: true,
                immediate: true,
                definition: String::new(),
                backs_constraint: true,
                bytes: 0,
            }]
        },
    }
}

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.server.database = "app".into();
    for t in [
        table(
            "public",
            "customers",
            vec![
                col("id", "integer", true),
                col("name", "text", true),
                col("email", "text", false),
                col("status", "text", false),
            ],
            &["id"],
        ),
        table("public", "audit", vec![col("id", "integer", true)], &["id"]),
        table(
            "v2",
            "customers",
            vec![
                col("id", "bigint", true),
                col("first_name", "text", true),
                col("last_name", "text", false),
                col("email", "text", false),
                col("state", "v2.state", true),
            ],
            &["id"],
        ),
    ] {
        c.tables.insert((t.schema.clone(), t.name.clone()), t);
    }
    c
}

pub(crate) fn mapping(tables_yaml: &str) -> Mapping {
    let src = format!("migration: m\ngreen: v2\ngreen_ddl: Cargo.toml\ntables:\n{tables_yaml}");
    crate::mapping::parse(
        Path::new("Cargo.toml")
            .parent()
            .unwrap()
            .join("x.yaml")
            .as_path(),
        &src,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

const CUSTOMERS: &str = "  customers:
    from: public.customers c
    columns:
      id: c.id::bigint
      first_name: split_part(c.name, ' ', 1)
      last_name: nullif(split_part(c.name, ' ', 2), '')
      email: c.email
      state: { expr: c.status, map: { active: open, gone: closed } }
    reverse:
      name: concat_ws(' ', first_name, last_name)
";

fn opts() -> Options {
    Options {
        jobs: None,
        chunk_rows: Some(100_000),
        lock_timeout_ms: None,
        profile: ProfileMode::None,
    }
}

#[test]
fn renders_the_mapping_as_one_insert_select() {
    let m = mapping(CUSTOMERS);
    let cat = catalog();
    let gt = cat.table(&QName::new("v2", "customers")).unwrap();
    let sql = insert_select(
        &m.tables[0],
        gt,
        "bluegreen",
        &Shape {
            extra_where: vec!["(c.id) >= $1".into()],
            ..Shape::default()
        },
    );
    expect![[r#"INSERT INTO "v2"."customers" ("id", "first_name", "last_name", "email", "state") SELECT (c.id::bigint) AS "id", (split_part(c.name, ' ', 1)) AS "first_name", (nullif(split_part(c.name, ' ', 2), '')) AS "last_name", (c.email) AS "email", CASE (c.status)::text WHEN 'active' THEN 'open'::v2.state WHEN 'gone' THEN 'closed'::v2.state ELSE "bluegreen"."unmapped_value"('customers.state', (c.status)::text)::v2.state END AS "state" FROM "public"."customers" AS "c" WHERE (c.id) >= $1"#]]
        .assert_eq(sql.as_str());
}

#[test]
fn infers_sync_key_reverse_and_estimates() {
    let m = mapping(CUSTOMERS);
    let cat = catalog();
    assert!(static_checks(&m, &cat).is_empty());
    let plan = build(&m, &cat, &BTreeMap::new(), &opts(), true, Vec::new());
    let t = &plan.tables[0];
    assert_eq!(
        t.sync_key,
        vec![("id".to_string(), "c.id::bigint".to_string())]
    );
    assert_eq!(t.sync_key_source, "primary key");
    // c.id::bigint is not a plain column: the key is not known to be indexed.
    assert!(!t.sync_key_indexed);
    assert_eq!(t.reverse.verdict, Verdict::Lossy);
    assert_eq!(t.reverse.auto, ["id", "email"]);
    assert_eq!(t.reverse.declared, ["name"]);
    assert_eq!(t.reverse.missing, ["status"]);
    // Three ranges and the NULL keys' chunk, as copy records them.
    assert_eq!(t.chunks, 4);
    assert_eq!(plan.unmapped_blue_tables, ["audit"]);
    let codes: Vec<&str> = plan.diagnostics.iter().map(|d| d.code).collect();
    assert_eq!(
        codes,
        [
            "sync-key-not-indexed",
            "not-invertible",
            "blue-table-unmapped"
        ]
    );
}

#[test]
fn static_checks_name_table_column_and_suggest() {
    let m = mapping(
        "  customers:
    from: public.customer c
    columns:
      id: c.id
  custmers:
    from: public.customers c
    columns:
      id: c.id
",
    );
    let got: Vec<String> = static_checks(&m, &catalog())
        .iter()
        .map(|d| d.to_string())
        .collect();
    expect![[r#"
        error[unknown-blue-table]: x.yaml:6:11: table customers: blue table public.customer does not exist
          hint: did you mean `public.customers`?
        error[unmapped-not-null]: x.yaml:5:3: table customers, column first_name: green column first_name is NOT NULL without a default and not mapped: every insert would fail
          hint: map it in `columns`, or give it a DEFAULT in the green DDL
        error[unmapped-not-null]: x.yaml:5:3: table customers, column state: green column state is NOT NULL without a default and not mapped: every insert would fail
          hint: map it in `columns`, or give it a DEFAULT in the green DDL
        error[unknown-green-table]: x.yaml:9:3: table custmers: green table v2.custmers does not exist after green_ddl ran
          hint: did you mean `customers`?"#]]
    .assert_eq(&got.join("\n"));
}

#[test]
fn steps_lock_blue_tables_only_briefly_and_under_lock_timeout() {
    let m = mapping(CUSTOMERS);
    let plan = build(&m, &catalog(), &BTreeMap::new(), &opts(), true, Vec::new());
    let capture = plan
        .steps
        .iter()
        .find(|s| s.what == "capture changes on public.customers")
        .unwrap();
    assert!(capture.sql.starts_with("SET lock_timeout = '2000ms'"));
    assert_eq!(capture.sql.matches("CREATE OR REPLACE TRIGGER").count(), 4);
    assert!(
        capture
            .lock
            .starts_with("SHARE ROW EXCLUSIVE on public.customers")
    );
    let cutover = plan.steps.iter().find(|s| s.phase == "cutover").unwrap();
    assert!(
        cutover
            .sql
            .contains("LOCK TABLE \"public\".\"customers\" IN EXCLUSIVE MODE")
    );
    assert!(
        cutover
            .sql
            .contains("ALTER DATABASE \"app\" SET search_path = 'v2', '$user', 'public'")
    );
    let rollback = plan.steps.iter().find(|s| s.phase == "rollback").unwrap();
    assert!(
        rollback
            .sql
            .contains("ALTER DATABASE \"app\" RESET search_path")
    );
}

#[test]
fn search_path_values_reach_sql_as_literals() {
    let s = crate::plan::cutover::set_statement(
        "app",
        None,
        &crate::plan::cutover::parse_list("\"a\"\"; DROP\", public"),
    );
    assert_eq!(
        s.into_string(),
        "ALTER DATABASE \"app\" SET search_path = 'a\"; DROP', 'public'"
    );
}
