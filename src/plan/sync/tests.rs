//! The generated sync SQL, pinned: join equalities, and snapshots of the capture, live, catch-up
//! and retry functions for a 1:1 entry, a join entry and a `group_by` entry, so a change to any of
//! them shows as a diff (`UPDATE_EXPECT=1 cargo test` rewrites the snapshots).

use expect_test::{Expect, expect};

use super::*;
use crate::catalog::Catalog;
use crate::plan::tests::{col, mapping, table};
use crate::sql::Sql;

const TABLES: &str = "  leads:
    from: public.leads l
    columns:
      id: l.id
      status: l.status
  accounts:
    from: public.accounts a
    columns:
      id: a.aid::bigint
      balance: a.abalance
  customers:
    from: public.customers c JOIN public.workshops w ON w.id = c.workshop_id
    columns:
      id: c.id
      workshop_id: c.workshop_id
      city: w.city
  organizations:
    from: public.workshops w
    group_by: [w.owner_email]
    sync_key: { email: w.owner_email }
    columns:
      email: w.owner_email
      workshops: count(*)
    reverse: none
";

fn catalog() -> Catalog {
    let mut c = Catalog::default();
    c.server.database = "app".into();
    for t in [
        table(
            "public",
            "leads",
            vec![col("id", "uuid", true), col("status", "text", false)],
            &["id"],
        ),
        table(
            "public",
            "workshops",
            vec![
                col("id", "uuid", true),
                col("owner_email", "text", true),
                col("city", "text", false),
            ],
            &["id"],
        ),
        table(
            "public",
            "customers",
            vec![col("id", "uuid", true), col("workshop_id", "uuid", false)],
            &["id"],
        ),
        table(
            "v2",
            "leads",
            vec![col("id", "uuid", true), col("status", "text", false)],
            &["id"],
        ),
        table(
            "public",
            "accounts",
            vec![
                col("aid", "integer", true),
                col("abalance", "integer", false),
            ],
            &["aid"],
        ),
        table(
            "v2",
            "accounts",
            vec![col("id", "bigint", true), col("balance", "bigint", false)],
            &["id"],
        ),
        table(
            "v2",
            "customers",
            vec![
                col("id", "uuid", true),
                col("workshop_id", "uuid", false),
                col("city", "text", false),
            ],
            &["id"],
        ),
        table(
            "v2",
            "organizations",
            vec![
                col("email", "text", true),
                col("workshops", "bigint", false),
            ],
            &["email"],
        ),
    ] {
        c.tables.insert((t.schema.clone(), t.name.clone()), t);
    }
    c
}

fn check(sql: Sql, expect: Expect) {
    expect.assert_eq(sql.as_str());
}

fn shapes(m: &crate::mapping::Mapping, cat: &Catalog) -> String {
    sync_entries(m, cat)
        .iter()
        .map(|e| {
            format!(
                "{} keys={:?} upsert={:?} nullable={} {:?}",
                e.entry.name,
                e.keys
                    .iter()
                    .map(|k| format!("{} <- {} (blue {:?})", k.green, k.expr, k.blue))
                    .collect::<Vec<_>>(),
                e.upsert_key,
                e.nullable,
                e.mode
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn entries_and_their_modes() {
    expect![[r#"
        leads keys=["id <- l.id (blue Some((\"l\", \"id\", \"uuid\")))"] upsert=["id"] nullable=false RowLocal { infallible: true }
        accounts keys=["id <- a.aid::bigint (blue Some((\"a\", \"aid\", \"integer\")))"] upsert=["id"] nullable=false RowLocal { infallible: true }
        customers keys=["id <- c.id (blue Some((\"c\", \"id\", \"uuid\")))"] upsert=["id"] nullable=false Follower { reason: "it reads public.workshops through a join" }
        organizations keys=["email <- w.owner_email (blue Some((\"w\", \"owner_email\", \"text\")))"] upsert=["email"] nullable=false Follower { reason: "it groups blue rows (group_by)" }"#]].assert_eq(&shapes(&mapping(TABLES), &catalog()));
}

#[test]
fn row_local_needs_a_unique_key_implied_uniques_and_foreign_keys_among_row_local_entries() {
    let mut cat = catalog();
    // A green unique key blue does not have (H4): follower.
    let leads = cat
        .tables
        .get_mut(&("v2".to_string(), "leads".to_string()))
        .unwrap();
    leads.indexes.push(crate::catalog::Index {
        name: "leads_status_key".into(),
        unique: true,
        primary: false,
        columns: vec![Some("status".into())],
        partial: false,
        nulls_not_distinct: false,
        valid: true,
        immediate: true,
        definition: String::new(),
        backs_constraint: true,
        bytes: 0,
    });
    // A green foreign key from accounts to leads, not in blue (H1): follower.
    let accounts = cat
        .tables
        .get_mut(&("v2".to_string(), "accounts".to_string()))
        .unwrap();
    accounts.foreign_keys.push(crate::catalog::ForeignKey {
        name: "accounts_lead_fkey".into(),
        columns: vec!["id".into()],
        ref_table: QName::new("v2", "leads"),
        ref_columns: vec!["id".into()],
        definition: String::new(),
        validated: true,
    });
    // A sync key that is not unique in blue (F5): follower.
    let m = mapping(&format!(
        "{TABLES}  by_status:
    from: public.leads l
    sync_key: {{ status: l.status }}
    columns:
      status: l.status
"
    ));
    cat.tables.insert(
        ("v2".into(), "by_status".into()),
        table(
            "v2",
            "by_status",
            vec![col("status", "text", true)],
            &["status"],
        ),
    );
    expect![[r#"
        leads keys=["id <- l.id (blue Some((\"l\", \"id\", \"uuid\")))"] upsert=["id"] nullable=false Follower { reason: "green unique key leads_status_key is not implied by a unique key of public.leads" }
        accounts keys=["id <- a.aid::bigint (blue Some((\"a\", \"aid\", \"integer\")))"] upsert=["id"] nullable=false Follower { reason: "green foreign key accounts_lead_fkey links it to leads, which the follower keeps" }
        customers keys=["id <- c.id (blue Some((\"c\", \"id\", \"uuid\")))"] upsert=["id"] nullable=false Follower { reason: "it reads public.workshops through a join" }
        organizations keys=["email <- w.owner_email (blue Some((\"w\", \"owner_email\", \"text\")))"] upsert=["email"] nullable=false Follower { reason: "it groups blue rows (group_by)" }
        by_status keys=["status <- l.status (blue Some((\"l\", \"status\", \"text\")))"] upsert=["status"] nullable=false Follower { reason: "its sync key (status) does not contain a unique NOT NULL key of public.leads" }"#]].assert_eq(&shapes(&m, &cat));
}

#[test]
fn capture_function() {
    let m = mapping(TABLES);
    check(
        capture_trigger_function(&m, &QName::new("public", "leads"), 0),
        expect![[r#"
            CREATE OR REPLACE FUNCTION "bluegreen"."bluegreen_m_sync_0"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = '3' SET bytea_output = 'hex' SET standard_conforming_strings = 'on' SET max_parallel_workers_per_gather = 0 AS $fn$
            #variable_conflict use_column
            BEGIN
                IF TG_OP = 'TRUNCATE' THEN
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, all_entries) VALUES ('m', 'public.leads', 'T', true);
                    RETURN NULL;
                END IF;
                IF TG_OP = 'INSERT' THEN
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.leads', 'I', NULL, pg_catalog.to_jsonb(r.*), true FROM new_rows AS r;
                ELSIF TG_OP = 'UPDATE' THEN
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.leads', 'U', pg_catalog.to_jsonb(r.*), NULL, true FROM old_rows AS r;
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.leads', 'U', NULL, pg_catalog.to_jsonb(r.*), true FROM new_rows AS r;
                ELSIF TG_OP = 'DELETE' THEN
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.leads', 'D', pg_catalog.to_jsonb(r.*), NULL, true FROM old_rows AS r;
                END IF;
                RETURN NULL;
            END
            $fn$"#]],
    );
}

#[test]
fn live_function_of_a_row_local_table() {
    let m = mapping(TABLES);
    let cat = catalog();
    let entries = sync_entries(&m, &cat);
    let x = QName::new("public", "accounts");
    check(
        live_trigger_function(&m, &entries, &x, cat.table(&x), 1),
        expect![[r#"
            CREATE OR REPLACE FUNCTION "bluegreen"."bluegreen_m_sync_1"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = '3' SET bytea_output = 'hex' SET standard_conforming_strings = 'on' SET max_parallel_workers_per_gather = 0 AS $fn$
            #variable_conflict use_column
            DECLARE
                lt text;
                bluegreen_set text;
                bluegreen_iso text := pg_catalog.current_setting('transaction_isolation');
            BEGIN
                IF TG_OP = 'TRUNCATE' THEN
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, all_entries) VALUES ('m', 'public.accounts', 'T', true);
                    RETURN NULL;
                END IF;
                IF bluegreen_iso = 'serializable' THEN
                    IF TG_OP = 'INSERT' THEN
                        INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.accounts', 'I', NULL, pg_catalog.to_jsonb(r.*), true FROM new_rows AS r;
                    ELSIF TG_OP = 'UPDATE' THEN
                        INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries, entries) SELECT 'm', 'public.accounts', 'U', bluegreen_p.old_image, bluegreen_p.new_image, true, bluegreen_p.entries FROM (SELECT CASE WHEN pg_catalog.num_nonnulls(bluegreen_o."aid") = 1 THEN pg_catalog.to_jsonb(bluegreen_o.*) END AS old_image, CASE WHEN pg_catalog.num_nonnulls(bluegreen_n."aid") = 1 THEN pg_catalog.to_jsonb(bluegreen_n.*) END AS new_image, CASE WHEN pg_catalog.num_nonnulls(bluegreen_o."aid") = 1 AND pg_catalog.num_nonnulls(bluegreen_n."aid") = 1 THEN pg_catalog.array_remove(ARRAY[CASE WHEN (ROW(bluegreen_o."abalance", bluegreen_o."aid")::pg_catalog.text) COLLATE pg_catalog."C" <> (ROW(bluegreen_n."abalance", bluegreen_n."aid")::pg_catalog.text) COLLATE pg_catalog."C" THEN 'accounts' END]::pg_catalog.text[], NULL) END AS entries FROM old_rows AS bluegreen_o FULL JOIN new_rows AS bluegreen_n ON (bluegreen_o."aid"::pg_catalog.text) COLLATE pg_catalog."C" = (bluegreen_n."aid"::pg_catalog.text) COLLATE pg_catalog."C") AS bluegreen_p WHERE bluegreen_p.entries IS NULL OR pg_catalog.cardinality(bluegreen_p.entries) > 0;
                    ELSIF TG_OP = 'DELETE' THEN
                        INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.accounts', 'D', pg_catalog.to_jsonb(r.*), NULL, true FROM old_rows AS r;
                    END IF;
                    RETURN NULL;
                END IF;
                IF bluegreen_iso = 'read committed' THEN
                    IF TG_OP = 'INSERT' THEN
                        INSERT INTO "v2"."accounts" AS bluegreen_g ("id", "balance") SELECT * FROM (SELECT (a.aid::bigint) AS "id", (a.abalance) AS "balance" FROM "public"."accounts" AS "a" WHERE ("a"."aid") IN (SELECT n."aid" FROM new_rows AS n)) AS m ON CONFLICT ("id") DO UPDATE SET "balance" = EXCLUDED."balance" WHERE ROW(bluegreen_g."balance")::text IS DISTINCT FROM ROW(EXCLUDED."balance")::text;
                    ELSIF TG_OP = 'UPDATE' THEN
                        INSERT INTO "v2"."accounts" AS bluegreen_g ("id", "balance") SELECT * FROM (SELECT (a.aid::bigint) AS "id", (a.abalance) AS "balance" FROM "public"."accounts" AS "a" WHERE ("a"."aid") IN (SELECT n."aid" FROM new_rows AS n)) AS m ON CONFLICT ("id") DO UPDATE SET "balance" = EXCLUDED."balance" WHERE ROW(bluegreen_g."balance")::text IS DISTINCT FROM ROW(EXCLUDED."balance")::text;
                        IF EXISTS (SELECT o."aid" FROM old_rows AS o EXCEPT SELECT n."aid" FROM new_rows AS n) THEN
                            DELETE FROM "v2"."accounts" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT o."aid"::bigint FROM old_rows AS o WHERE NOT EXISTS (SELECT 1 FROM "public"."accounts" AS "a" WHERE "a"."aid" = o."aid"));
                        END IF;
                    ELSIF TG_OP = 'DELETE' THEN
                        DELETE FROM "v2"."accounts" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT o."aid"::bigint FROM old_rows AS o WHERE NOT EXISTS (SELECT 1 FROM "public"."accounts" AS "a" WHERE "a"."aid" = o."aid"));
                    END IF;
                ELSE
                    BEGIN
                        lt := pg_catalog.current_setting('lock_timeout');
                        bluegreen_set := pg_catalog.set_config('lock_timeout', GREATEST(1, LEAST(50, pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.current_setting('deadlock_timeout')::pg_catalog.interval) * 500)))::pg_catalog.int4::pg_catalog.text || 'ms', true);
                        IF TG_OP = 'INSERT' THEN
                            INSERT INTO "v2"."accounts" AS bluegreen_g ("id", "balance") SELECT * FROM (SELECT (a.aid::bigint) AS "id", (a.abalance) AS "balance" FROM "public"."accounts" AS "a" WHERE ("a"."aid") IN (SELECT n."aid" FROM new_rows AS n)) AS m ON CONFLICT ("id") DO UPDATE SET "balance" = EXCLUDED."balance" WHERE ROW(bluegreen_g."balance")::text IS DISTINCT FROM ROW(EXCLUDED."balance")::text;
                        ELSIF TG_OP = 'UPDATE' THEN
                            INSERT INTO "v2"."accounts" AS bluegreen_g ("id", "balance") SELECT * FROM (SELECT (a.aid::bigint) AS "id", (a.abalance) AS "balance" FROM "public"."accounts" AS "a" WHERE ("a"."aid") IN (SELECT n."aid" FROM new_rows AS n)) AS m ON CONFLICT ("id") DO UPDATE SET "balance" = EXCLUDED."balance" WHERE ROW(bluegreen_g."balance")::text IS DISTINCT FROM ROW(EXCLUDED."balance")::text;
                            IF EXISTS (SELECT o."aid" FROM old_rows AS o EXCEPT SELECT n."aid" FROM new_rows AS n) THEN
                                DELETE FROM "v2"."accounts" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT o."aid"::bigint FROM old_rows AS o WHERE NOT EXISTS (SELECT 1 FROM "public"."accounts" AS "a" WHERE "a"."aid" = o."aid"));
                            END IF;
                        ELSIF TG_OP = 'DELETE' THEN
                            DELETE FROM "v2"."accounts" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT o."aid"::bigint FROM old_rows AS o WHERE NOT EXISTS (SELECT 1 FROM "public"."accounts" AS "a" WHERE "a"."aid" = o."aid"));
                        END IF;
                        bluegreen_set := pg_catalog.set_config('lock_timeout', lt, true);
                    EXCEPTION WHEN OTHERS THEN
                        -- Never the writer's failure: the rows go to the change log, pending.
                        IF TG_OP = 'INSERT' THEN
                            INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.accounts', 'I', NULL, pg_catalog.to_jsonb(r.*), true FROM new_rows AS r;
                        ELSIF TG_OP = 'UPDATE' THEN
                            INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries, entries) SELECT 'm', 'public.accounts', 'U', bluegreen_p.old_image, bluegreen_p.new_image, true, bluegreen_p.entries FROM (SELECT CASE WHEN pg_catalog.num_nonnulls(bluegreen_o."aid") = 1 THEN pg_catalog.to_jsonb(bluegreen_o.*) END AS old_image, CASE WHEN pg_catalog.num_nonnulls(bluegreen_n."aid") = 1 THEN pg_catalog.to_jsonb(bluegreen_n.*) END AS new_image, CASE WHEN pg_catalog.num_nonnulls(bluegreen_o."aid") = 1 AND pg_catalog.num_nonnulls(bluegreen_n."aid") = 1 THEN pg_catalog.array_remove(ARRAY[CASE WHEN (ROW(bluegreen_o."abalance", bluegreen_o."aid")::pg_catalog.text) COLLATE pg_catalog."C" <> (ROW(bluegreen_n."abalance", bluegreen_n."aid")::pg_catalog.text) COLLATE pg_catalog."C" THEN 'accounts' END]::pg_catalog.text[], NULL) END AS entries FROM old_rows AS bluegreen_o FULL JOIN new_rows AS bluegreen_n ON (bluegreen_o."aid"::pg_catalog.text) COLLATE pg_catalog."C" = (bluegreen_n."aid"::pg_catalog.text) COLLATE pg_catalog."C") AS bluegreen_p WHERE bluegreen_p.entries IS NULL OR pg_catalog.cardinality(bluegreen_p.entries) > 0;
                        ELSIF TG_OP = 'DELETE' THEN
                            INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.accounts', 'D', pg_catalog.to_jsonb(r.*), NULL, true FROM old_rows AS r;
                        END IF;
                    END;
                END IF;
                RETURN NULL;
            END
            $fn$"#]],
    );
}

#[test]
fn live_function_of_a_table_the_follower_keeps() {
    let m = mapping(TABLES);
    let cat = catalog();
    let entries = sync_entries(&m, &cat);
    let x = QName::new("public", "workshops");
    check(
        live_trigger_function(&m, &entries, &x, cat.table(&x), 2),
        expect![[r#"
            CREATE OR REPLACE FUNCTION "bluegreen"."bluegreen_m_sync_2"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = '3' SET bytea_output = 'hex' SET standard_conforming_strings = 'on' SET max_parallel_workers_per_gather = 0 AS $fn$
            #variable_conflict use_column
            BEGIN
                IF TG_OP = 'TRUNCATE' THEN
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, all_entries) VALUES ('m', 'public.workshops', 'T', true);
                    RETURN NULL;
                END IF;
                IF TG_OP = 'INSERT' THEN
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.workshops', 'I', NULL, pg_catalog.to_jsonb(r.*), false FROM new_rows AS r;
                ELSIF TG_OP = 'UPDATE' THEN
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries, entries) SELECT 'm', 'public.workshops', 'U', bluegreen_p.old_image, bluegreen_p.new_image, false, bluegreen_p.entries FROM (SELECT CASE WHEN pg_catalog.num_nonnulls(bluegreen_o."id") = 1 THEN pg_catalog.to_jsonb(bluegreen_o.*) END AS old_image, CASE WHEN pg_catalog.num_nonnulls(bluegreen_n."id") = 1 THEN pg_catalog.to_jsonb(bluegreen_n.*) END AS new_image, CASE WHEN pg_catalog.num_nonnulls(bluegreen_o."id") = 1 AND pg_catalog.num_nonnulls(bluegreen_n."id") = 1 THEN pg_catalog.array_remove(ARRAY[CASE WHEN (ROW(bluegreen_o."city", bluegreen_o."id")::pg_catalog.text) COLLATE pg_catalog."C" <> (ROW(bluegreen_n."city", bluegreen_n."id")::pg_catalog.text) COLLATE pg_catalog."C" THEN 'customers' END, CASE WHEN (ROW(bluegreen_o."owner_email")::pg_catalog.text) COLLATE pg_catalog."C" <> (ROW(bluegreen_n."owner_email")::pg_catalog.text) COLLATE pg_catalog."C" THEN 'organizations' END]::pg_catalog.text[], NULL) END AS entries FROM old_rows AS bluegreen_o FULL JOIN new_rows AS bluegreen_n ON (bluegreen_o."id"::pg_catalog.text) COLLATE pg_catalog."C" = (bluegreen_n."id"::pg_catalog.text) COLLATE pg_catalog."C") AS bluegreen_p WHERE bluegreen_p.entries IS NULL OR pg_catalog.cardinality(bluegreen_p.entries) > 0;
                ELSIF TG_OP = 'DELETE' THEN
                    INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row, all_entries) SELECT 'm', 'public.workshops', 'D', pg_catalog.to_jsonb(r.*), NULL, false FROM old_rows AS r;
                END IF;
                RETURN NULL;
            END
            $fn$"#]],
    );
}

fn applier(m: &crate::mapping::Mapping, cat: &Catalog, name: &str) -> ApplierEntry {
    sync_entries(m, cat)
        .iter()
        .find(|e| e.entry.name == name)
        .unwrap()
        .applier(m)
}

#[test]
fn applier_of_a_widened_key_looks_blue_up_by_blue_s_own_type() {
    let (m, cat) = (mapping(TABLES), catalog());
    let a = applier(&m, &cat, "accounts");
    let text = format!(
        "{}\n{}\n{}\n{}",
        a.lock_blue.unwrap(),
        a.lock_green.unwrap(),
        a.upsert,
        a.delete
    );
    expect![[r#"
        SELECT 1 FROM "public"."accounts" AS "a" WHERE ("a"."aid") IN (SELECT CASE WHEN u.k0::pg_catalog.numeric BETWEEN -2147483648 AND 2147483647 AND u.k0::pg_catalog.numeric = pg_catalog.trunc(u.k0::pg_catalog.numeric) THEN u.k0::integer END FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL) FOR SHARE
        SELECT 1 FROM "v2"."accounts" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT u.k0::bigint FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL) FOR NO KEY UPDATE
        INSERT INTO "v2"."accounts" AS bluegreen_g ("id", "balance") SELECT * FROM (SELECT (a.aid::bigint) AS "id", (a.abalance) AS "balance" FROM "public"."accounts" AS "a" WHERE ("a"."aid") IN (SELECT CASE WHEN u.k0::pg_catalog.numeric BETWEEN -2147483648 AND 2147483647 AND u.k0::pg_catalog.numeric = pg_catalog.trunc(u.k0::pg_catalog.numeric) THEN u.k0::integer END FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL)) AS m ON CONFLICT ("id") DO UPDATE SET "balance" = EXCLUDED."balance" WHERE ROW(bluegreen_g."balance")::text IS DISTINCT FROM ROW(EXCLUDED."balance")::text
        DELETE FROM "v2"."accounts" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT u.k0::bigint FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL) AND NOT EXISTS (SELECT 1 FROM (SELECT (a.aid::bigint) AS "id", (a.abalance) AS "balance" FROM "public"."accounts" AS "a" WHERE ("a"."aid") IN (SELECT CASE WHEN u.k0::pg_catalog.numeric BETWEEN -2147483648 AND 2147483647 AND u.k0::pg_catalog.numeric = pg_catalog.trunc(u.k0::pg_catalog.numeric) THEN u.k0::integer END FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL)) AS m WHERE m."id"::bigint = bluegreen_g."id")"#]].assert_eq(&text);
}

#[test]
fn applier_of_a_join_entry() {
    let (m, cat) = (mapping(TABLES), catalog());
    let a = applier(&m, &cat, "customers");
    let finders: Vec<String> = a
        .finders
        .iter()
        .map(|(x, f)| format!("{}: {f}", x.display()))
        .collect();
    let text = format!("{}\n{}\n{}", finders.join("\n"), a.upsert, a.delete);
    expect![[r#"
        public.customers: SELECT DISTINCT (((c.id))::uuid)::text AS k0 FROM (SELECT r.* FROM "bluegreen"."changes" AS bluegreen_c CROSS JOIN LATERAL (VALUES (bluegreen_c.old_row), (CASE WHEN $2::pg_catalog.bool THEN NULL ELSE bluegreen_c.new_row END)) AS bluegreen_i (image) CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::"public"."customers", bluegreen_i.image) AS r WHERE bluegreen_c.id = ANY ($1::int8[]) AND bluegreen_i.image IS NOT NULL) AS "c"
        public.workshops: SELECT DISTINCT (((c.id))::uuid)::text AS k0 FROM "public"."customers" AS "c" JOIN (SELECT r.* FROM "bluegreen"."changes" AS bluegreen_c CROSS JOIN LATERAL (VALUES (bluegreen_c.old_row), (CASE WHEN $2::pg_catalog.bool THEN NULL ELSE bluegreen_c.new_row END)) AS bluegreen_i (image) CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::"public"."workshops", bluegreen_i.image) AS r WHERE bluegreen_c.id = ANY ($1::int8[]) AND bluegreen_i.image IS NOT NULL) AS "w" ON (w.id = c.workshop_id)
        INSERT INTO "v2"."customers" AS bluegreen_g ("id", "workshop_id", "city") SELECT * FROM (SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE ("c"."id") IN (SELECT u.k0::uuid FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL)) AS m ON CONFLICT ("id") DO UPDATE SET "workshop_id" = EXCLUDED."workshop_id", "city" = EXCLUDED."city" WHERE ROW(bluegreen_g."workshop_id", bluegreen_g."city")::text IS DISTINCT FROM ROW(EXCLUDED."workshop_id", EXCLUDED."city")::text
        DELETE FROM "v2"."customers" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT u.k0::uuid FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL) AND NOT EXISTS (SELECT 1 FROM (SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE ("c"."id") IN (SELECT u.k0::uuid FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL)) AS m WHERE m."id"::uuid = bluegreen_g."id")"#]].assert_eq(&text);
}

#[test]
fn applier_of_a_grouped_entry() {
    let (m, cat) = (mapping(TABLES), catalog());
    let a = applier(&m, &cat, "organizations");
    let text = format!("{}\n{}\n{}", a.upsert, a.all_keys, a.blue_rows);
    expect![[r#"
        INSERT INTO "v2"."organizations" AS bluegreen_g ("email", "workshops") SELECT * FROM (SELECT (w.owner_email) AS "email", (count(*)) AS "workshops" FROM "public"."workshops" AS "w" WHERE ("w"."owner_email") IN (SELECT u.k0::text FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL) GROUP BY (w.owner_email)) AS m ON CONFLICT ("email") DO UPDATE SET "workshops" = EXCLUDED."workshops" WHERE ROW(bluegreen_g."workshops")::text IS DISTINCT FROM ROW(EXCLUDED."workshops")::text
        SELECT bluegreen_g."email"::text FROM "v2"."organizations" AS bluegreen_g UNION SELECT (((w.owner_email))::text)::text FROM "public"."workshops" AS "w"
        SELECT ARRAY[b."email"::text]::text[], ROW(b."email", b."workshops")::text FROM (SELECT ((w.owner_email))::text AS "email", ((count(*)))::bigint AS "workshops" FROM "public"."workshops" AS "w" WHERE ("w"."owner_email") IN (SELECT u.k0::text FROM ROWS FROM (pg_catalog.unnest($1::text[])) AS u(k0) WHERE u.k0 IS NOT NULL) GROUP BY (w.owner_email)) AS b"#]].assert_eq(&text);
}

/// The columns of a blue table an entry reads: through its alias, unqualified words that name a
/// column, never another alias's columns; a whole-row reference or `alias.*` is "cannot tell".
#[test]
fn columns_an_entry_reads() {
    let cat = catalog();
    let ws = cat.table(&QName::new("public", "workshops")).unwrap();
    let read = |yaml: &str, name: &str| {
        let m = mapping(yaml);
        sync_entries(&m, &cat)
            .iter()
            .find(|e| e.entry.name == name)
            .unwrap()
            .scan_columns_read(ws)
            .map(|c| c.into_iter().collect::<Vec<_>>())
    };
    assert_eq!(
        read(TABLES, "customers"),
        Some(vec!["city".to_string(), "id".to_string()])
    );
    assert_eq!(
        read(TABLES, "organizations"),
        Some(vec!["owner_email".to_string()])
    );
    let entry = |columns: &str| {
        format!(
            "  customers:\n    from: public.customers c JOIN public.workshops w ON w.id = c.workshop_id\n    columns:\n      id: c.id\n      workshop_id: c.workshop_id\n{columns}"
        )
    };
    // `c.city` is the customer's column, not the workshop's; an unqualified `owner_email` may be.
    assert_eq!(
        read(
            &entry("      city: coalesce(c.city, owner_email)\n"),
            "customers"
        ),
        Some(vec!["id".to_string(), "owner_email".to_string()])
    );
    assert_eq!(
        read(
            &entry("      city: pg_catalog.to_jsonb(w)::text\n"),
            "customers"
        ),
        None
    );
    assert_eq!(read(&entry("      city: (w.*)::text\n"), "customers"), None);
    assert_eq!(
        read(&entry("      city: public.workshops.city\n"), "customers"),
        None
    );
    // A system column changes with every update; a function of the schema's may read anything.
    assert_eq!(
        read(&entry("      city: w.xmin::text\n"), "customers"),
        None
    );
    assert_eq!(
        read(&entry("      city: public.city_of(w.id)\n"), "customers"),
        None
    );
    // A cast to a type of the schema's may call a function of it; deparsed, only the type shows.
    assert_eq!(
        read(
            &entry("      city: ((w.id)::public.label)::text\n"),
            "customers"
        ),
        None
    );
    assert_eq!(
        read(
            &entry("      city: pg_catalog.upper(w.city)\n"),
            "customers"
        ),
        Some(vec!["city".to_string(), "id".to_string()])
    );
}
