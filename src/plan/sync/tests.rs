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

#[test]
fn entries_and_their_shapes() {
    let m = mapping(TABLES);
    let cat = catalog();
    let got: Vec<String> = sync_entries(&m, &cat)
        .iter()
        .map(|e| {
            format!(
                "{} keys={:?} upsert={:?} nullable={} row_local={}",
                e.entry.name,
                e.keys.iter().map(|k| &k.1).collect::<Vec<_>>(),
                e.upsert_key,
                e.nullable,
                e.row_local
            )
        })
        .collect();
    expect![[r#"
        leads keys=["l.id"] upsert=["id"] nullable=false row_local=true
        customers keys=["c.id"] upsert=["id"] nullable=false row_local=false
        organizations keys=["w.owner_email"] upsert=["email"] nullable=false row_local=false"#]]
    .assert_eq(&got.join("\n"));
}

#[test]
fn capture_function() {
    let m = mapping(TABLES);
    check(
        capture_trigger_function(&m, 0),
        expect![[r#"
        CREATE OR REPLACE FUNCTION "bluegreen"."bluegreen_m_sync_0"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
        BEGIN
            IF current_setting('bluegreen.applying', true) = 'reverse' THEN
                RETURN NULL;
            END IF;
            IF TG_OP = 'INSERT' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'I', to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', to_jsonb(o), NULL FROM old_rows o
                UNION ALL
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', NULL, to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'D', to_jsonb(o) FROM old_rows o;
            ELSE
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op)
                VALUES ('m', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'T');
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
    let x = QName::new("public", "leads");
    check(
        live_trigger_function(&m, &entries, &x, 0),
        expect![[r#"
        CREATE OR REPLACE FUNCTION "bluegreen"."bluegreen_m_sync_0"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, "public" SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = '3' SET bytea_output = 'hex' SET standard_conforming_strings = 'on' SET max_parallel_workers_per_gather = 0 AS $fn$
        DECLARE
            lock_ids bigint[];
            e0_k0 uuid[];
            e0_ok boolean := true;
        BEGIN
            -- Loop guard: a change the reverse sync is applying is not echoed back.
            IF current_setting('bluegreen.applying', true) = 'reverse' THEN
                RETURN NULL;
            END IF;
            IF current_setting('transaction_isolation') <> 'read committed' THEN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'I', to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', to_jsonb(o), NULL FROM old_rows o
                UNION ALL
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', NULL, to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'D', to_jsonb(o) FROM old_rows o;
            ELSE
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op)
                VALUES ('m', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'T');
            END IF;
                RETURN NULL;
            END IF;
            BEGIN
            IF TG_OP = 'INSERT' THEN
            ELSIF TG_OP = 'UPDATE' THEN
            ELSIF TG_OP = 'DELETE' THEN
            ELSE
                PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:leads:', 0));
                SELECT array_agg(s.k0) INTO e0_k0 FROM (SELECT bluegreen_g."id" AS k0 FROM "v2"."leads" AS bluegreen_g UNION SELECT (l.id)::uuid AS k0 FROM "public"."leads" AS "l") AS s;
            END IF;
            PERFORM set_config('bluegreen.applying', 'forward', true);
            IF TRUE THEN
                BEGIN
                    IF TG_OP = 'TRUNCATE' THEN
                        IF e0_k0 IS NOT NULL THEN
                            INSERT INTO "v2"."leads" AS bluegreen_g ("id", "status")
            SELECT * FROM (SELECT (l.id) AS "id", (l.status) AS "status" FROM "public"."leads" AS "l" WHERE ((l.id)::uuid) IN (SELECT u.k0 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NOT NULL) UNION ALL SELECT (l.id) AS "id", (l.status) AS "status" FROM "public"."leads" AS "l" WHERE EXISTS (SELECT 1 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e0_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (l.id)::uuid)) AS m
            ON CONFLICT ("id") DO UPDATE SET "status" = EXCLUDED."status" WHERE ROW(bluegreen_g."status")::text IS DISTINCT FROM ROW(EXCLUDED."status")::text;
                        END IF;
                    ELSIF TG_OP <> 'DELETE' THEN
                        INSERT INTO "v2"."leads" AS bluegreen_g ("id", "status")
            SELECT * FROM (SELECT (l.id) AS "id", (l.status) AS "status" FROM new_rows AS "l") AS m
            ON CONFLICT ("id") DO UPDATE SET "status" = EXCLUDED."status" WHERE ROW(bluegreen_g."status")::text IS DISTINCT FROM ROW(EXCLUDED."status")::text;
                    END IF;
                    IF TG_OP = 'TRUNCATE' THEN
                        IF e0_k0 IS NOT NULL THEN
                            DELETE FROM "v2"."leads" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT u.k0 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NOT NULL) AND NOT EXISTS (SELECT 1 FROM (SELECT (l.id) AS "id", (l.status) AS "status" FROM "public"."leads" AS "l" WHERE ((l.id)::uuid) IN (SELECT u.k0 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NOT NULL) UNION ALL SELECT (l.id) AS "id", (l.status) AS "status" FROM "public"."leads" AS "l" WHERE EXISTS (SELECT 1 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e0_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (l.id)::uuid)) AS m WHERE m."id"::uuid = bluegreen_g."id");
                        END IF;
                    ELSIF TG_OP = 'UPDATE' THEN
                        DELETE FROM "v2"."leads" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT (l.id)::uuid FROM old_rows AS "l") AND NOT EXISTS (SELECT 1 FROM new_rows AS "l" WHERE ((l.id))::uuid IS NOT DISTINCT FROM bluegreen_g."id");
                    ELSIF TG_OP = 'DELETE' THEN
                        DELETE FROM "v2"."leads" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT (l.id)::uuid FROM old_rows AS "l");
                    END IF;
                EXCEPTION WHEN OTHERS THEN
                    IF e0_k0 IS NULL THEN
                        IF TG_OP = 'INSERT' THEN
                            SELECT array_agg(s.k0) INTO e0_k0 FROM (SELECT DISTINCT (l.id)::uuid AS k0 FROM new_rows AS "l") AS s;
                        ELSIF TG_OP = 'UPDATE' THEN
                            SELECT array_agg(s.k0) INTO e0_k0 FROM (SELECT DISTINCT (l.id)::uuid AS k0 FROM (SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows) AS "l") AS s;
                        ELSIF TG_OP = 'DELETE' THEN
                            SELECT array_agg(s.k0) INTO e0_k0 FROM (SELECT DISTINCT (l.id)::uuid AS k0 FROM old_rows AS "l") AS s;
                        END IF;
                    END IF;
                    e0_ok := false;
                    INSERT INTO "bluegreen"."sync_failures" (migration, green_table, sync_key, error)
                    SELECT DISTINCT 'm', 'leads', jsonb_build_array(u.k0), SQLSTATE || ': ' || SQLERRM FROM unnest(e0_k0) AS u(k0)
                    ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();
                END;
            END IF;
            IF e0_ok AND TRUE AND EXISTS (SELECT 1 FROM "bluegreen"."sync_failures" WHERE migration = 'm' AND green_table = 'leads') THEN
                    IF e0_k0 IS NULL THEN
                        IF TG_OP = 'INSERT' THEN
                            SELECT array_agg(s.k0) INTO e0_k0 FROM (SELECT DISTINCT (l.id)::uuid AS k0 FROM new_rows AS "l") AS s;
                        ELSIF TG_OP = 'UPDATE' THEN
                            SELECT array_agg(s.k0) INTO e0_k0 FROM (SELECT DISTINCT (l.id)::uuid AS k0 FROM (SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows) AS "l") AS s;
                        ELSIF TG_OP = 'DELETE' THEN
                            SELECT array_agg(s.k0) INTO e0_k0 FROM (SELECT DISTINCT (l.id)::uuid AS k0 FROM old_rows AS "l") AS s;
                        END IF;
                    END IF;
                DELETE FROM "bluegreen"."sync_failures" AS x WHERE x.migration = 'm' AND x.green_table = 'leads' AND x.sync_key IN (SELECT jsonb_build_array(u.k0) FROM unnest(e0_k0) AS u(k0));
            END IF;
            PERFORM set_config('bluegreen.applying', '', true);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'bluegreen: sync of this change deferred to the change log (run bluegreen sync): % %', SQLSTATE, SQLERRM;
            IF TG_OP = 'INSERT' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'I', to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', to_jsonb(o), NULL FROM old_rows o
                UNION ALL
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', NULL, to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'D', to_jsonb(o) FROM old_rows o;
            ELSE
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op)
                VALUES ('m', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'T');
            END IF;
            END;
            RETURN NULL;
        END
        $fn$"#]],
    );
}

#[test]
fn live_function_of_a_joined_and_grouped_table() {
    let m = mapping(TABLES);
    let cat = catalog();
    let entries = sync_entries(&m, &cat);
    let x = QName::new("public", "workshops");
    check(
        live_trigger_function(&m, &entries, &x, 2),
        expect![[r#"
        CREATE OR REPLACE FUNCTION "bluegreen"."bluegreen_m_sync_2"() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, "public" SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = '3' SET bytea_output = 'hex' SET standard_conforming_strings = 'on' SET max_parallel_workers_per_gather = 0 AS $fn$
        DECLARE
            lock_ids bigint[];
            e1_k0 uuid[];
            e1_ok boolean := true;
            e2_k0 text[];
            e2_ok boolean := true;
        BEGIN
            -- Loop guard: a change the reverse sync is applying is not echoed back.
            IF current_setting('bluegreen.applying', true) = 'reverse' THEN
                RETURN NULL;
            END IF;
            IF current_setting('transaction_isolation') <> 'read committed' THEN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'I', to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', to_jsonb(o), NULL FROM old_rows o
                UNION ALL
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', NULL, to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'D', to_jsonb(o) FROM old_rows o;
            ELSE
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op)
                VALUES ('m', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'T');
            END IF;
                RETURN NULL;
            END IF;
            BEGIN
            IF TG_OP = 'INSERT' THEN
                SELECT array_agg(DISTINCT hashtextextended('bluegreen:m:customers:j0:' || v."id"::text, 0)) INTO lock_ids FROM new_rows AS v WHERE v."id" IS NOT NULL;
                IF cardinality(lock_ids) > 32 THEN
                    PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:customers:', 0));
                ELSIF lock_ids IS NOT NULL THEN
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended('bluegreen:m:customers:', 0));
                    PERFORM pg_advisory_xact_lock(h) FROM (SELECT h FROM unnest(lock_ids) AS h ORDER BY 1) AS s;
                END IF;
                SELECT array_agg(s.k0) INTO e1_k0 FROM (SELECT DISTINCT (c.id)::uuid AS k0 FROM "public"."customers" AS "c" JOIN new_rows AS "w" ON (w.id = c.workshop_id)) AS s;
                SELECT array_agg(s.k0) INTO e2_k0 FROM (SELECT DISTINCT (w.owner_email)::text AS k0 FROM new_rows AS "w") AS s;
            ELSIF TG_OP = 'UPDATE' THEN
                SELECT array_agg(DISTINCT hashtextextended('bluegreen:m:customers:j0:' || v."id"::text, 0)) INTO lock_ids FROM (SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows) AS v WHERE v."id" IS NOT NULL;
                IF cardinality(lock_ids) > 32 THEN
                    PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:customers:', 0));
                ELSIF lock_ids IS NOT NULL THEN
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended('bluegreen:m:customers:', 0));
                    PERFORM pg_advisory_xact_lock(h) FROM (SELECT h FROM unnest(lock_ids) AS h ORDER BY 1) AS s;
                END IF;
                SELECT array_agg(s.k0) INTO e1_k0 FROM (SELECT DISTINCT (c.id)::uuid AS k0 FROM "public"."customers" AS "c" JOIN (SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows) AS "w" ON (w.id = c.workshop_id)) AS s;
                SELECT array_agg(s.k0) INTO e2_k0 FROM (SELECT DISTINCT (w.owner_email)::text AS k0 FROM (SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows) AS "w") AS s;
            ELSIF TG_OP = 'DELETE' THEN
                SELECT array_agg(DISTINCT hashtextextended('bluegreen:m:customers:j0:' || v."id"::text, 0)) INTO lock_ids FROM old_rows AS v WHERE v."id" IS NOT NULL;
                IF cardinality(lock_ids) > 32 THEN
                    PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:customers:', 0));
                ELSIF lock_ids IS NOT NULL THEN
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended('bluegreen:m:customers:', 0));
                    PERFORM pg_advisory_xact_lock(h) FROM (SELECT h FROM unnest(lock_ids) AS h ORDER BY 1) AS s;
                END IF;
                SELECT array_agg(s.k0) INTO e1_k0 FROM (SELECT DISTINCT (c.id)::uuid AS k0 FROM "public"."customers" AS "c" JOIN old_rows AS "w" ON (w.id = c.workshop_id)) AS s;
                SELECT array_agg(s.k0) INTO e2_k0 FROM (SELECT DISTINCT (w.owner_email)::text AS k0 FROM old_rows AS "w") AS s;
            ELSE
                PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:customers:', 0));
                SELECT array_agg(s.k0) INTO e1_k0 FROM (SELECT bluegreen_g."id" AS k0 FROM "v2"."customers" AS bluegreen_g UNION SELECT (c.id)::uuid AS k0 FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id)) AS s;
                PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:organizations:', 0));
                SELECT array_agg(s.k0) INTO e2_k0 FROM (SELECT bluegreen_g."email" AS k0 FROM "v2"."organizations" AS bluegreen_g UNION SELECT (w.owner_email)::text AS k0 FROM "public"."workshops" AS "w") AS s;
            END IF;
            PERFORM set_config('bluegreen.applying', 'forward', true);
            IF e1_k0 IS NOT NULL THEN
                IF cardinality(e1_k0) > 32 THEN
                    PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:customers:', 0));
                ELSE
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended('bluegreen:m:customers:', 0));
                    PERFORM pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended('bluegreen:m:customers:' || ROW(u.k0)::text, 0) AS h FROM unnest(e1_k0) AS u(k0) ORDER BY 1) AS s;
                END IF;
            END IF;
            IF e2_k0 IS NOT NULL THEN
                IF cardinality(e2_k0) > 32 THEN
                    PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:organizations:', 0));
                ELSE
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended('bluegreen:m:organizations:', 0));
                    PERFORM pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended('bluegreen:m:organizations:' || ROW(u.k0)::text, 0) AS h FROM unnest(e2_k0) AS u(k0) ORDER BY 1) AS s;
                END IF;
            END IF;
            IF e1_k0 IS NOT NULL THEN
                BEGIN
                    INSERT INTO "v2"."customers" AS bluegreen_g ("id", "workshop_id", "city")
            SELECT * FROM (SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE ((c.id)::uuid) IN (SELECT u.k0 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NOT NULL) UNION ALL SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE EXISTS (SELECT 1 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e1_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (c.id)::uuid)) AS m
            ON CONFLICT ("id") DO UPDATE SET "workshop_id" = EXCLUDED."workshop_id", "city" = EXCLUDED."city" WHERE ROW(bluegreen_g."workshop_id", bluegreen_g."city")::text IS DISTINCT FROM ROW(EXCLUDED."workshop_id", EXCLUDED."city")::text;
                EXCEPTION WHEN OTHERS THEN
                    e1_ok := false;
                    INSERT INTO "bluegreen"."sync_failures" (migration, green_table, sync_key, error)
                    SELECT DISTINCT 'm', 'customers', jsonb_build_array(u.k0), SQLSTATE || ': ' || SQLERRM FROM unnest(e1_k0) AS u(k0)
                    ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();
                END;
            END IF;
            IF e2_k0 IS NOT NULL THEN
                BEGIN
                    INSERT INTO "v2"."organizations" AS bluegreen_g ("email", "workshops")
            SELECT * FROM (SELECT (w.owner_email) AS "email", (count(*)) AS "workshops" FROM "public"."workshops" AS "w" WHERE ((w.owner_email)::text) IN (SELECT u.k0 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NOT NULL) GROUP BY (w.owner_email) UNION ALL SELECT (w.owner_email) AS "email", (count(*)) AS "workshops" FROM "public"."workshops" AS "w" WHERE EXISTS (SELECT 1 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e2_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (w.owner_email)::text) GROUP BY (w.owner_email)) AS m
            ON CONFLICT ("email") DO UPDATE SET "workshops" = EXCLUDED."workshops" WHERE ROW(bluegreen_g."workshops")::text IS DISTINCT FROM ROW(EXCLUDED."workshops")::text;
                EXCEPTION WHEN OTHERS THEN
                    e2_ok := false;
                    INSERT INTO "bluegreen"."sync_failures" (migration, green_table, sync_key, error)
                    SELECT DISTINCT 'm', 'organizations', jsonb_build_array(u.k0), SQLSTATE || ': ' || SQLERRM FROM unnest(e2_k0) AS u(k0)
                    ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();
                END;
            END IF;
            IF e2_k0 IS NOT NULL THEN
                BEGIN
                    DELETE FROM "v2"."organizations" AS bluegreen_g WHERE (bluegreen_g."email") IN (SELECT u.k0 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NOT NULL) AND NOT EXISTS (SELECT 1 FROM (SELECT (w.owner_email) AS "email", (count(*)) AS "workshops" FROM "public"."workshops" AS "w" WHERE ((w.owner_email)::text) IN (SELECT u.k0 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NOT NULL) GROUP BY (w.owner_email) UNION ALL SELECT (w.owner_email) AS "email", (count(*)) AS "workshops" FROM "public"."workshops" AS "w" WHERE EXISTS (SELECT 1 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e2_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (w.owner_email)::text) GROUP BY (w.owner_email)) AS m WHERE m."email"::text = bluegreen_g."email");
                EXCEPTION WHEN OTHERS THEN
                    e2_ok := false;
                    INSERT INTO "bluegreen"."sync_failures" (migration, green_table, sync_key, error)
                    SELECT DISTINCT 'm', 'organizations', jsonb_build_array(u.k0), SQLSTATE || ': ' || SQLERRM FROM unnest(e2_k0) AS u(k0)
                    ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();
                END;
            END IF;
            IF e1_k0 IS NOT NULL THEN
                BEGIN
                    DELETE FROM "v2"."customers" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT u.k0 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NOT NULL) AND NOT EXISTS (SELECT 1 FROM (SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE ((c.id)::uuid) IN (SELECT u.k0 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NOT NULL) UNION ALL SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE EXISTS (SELECT 1 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e1_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (c.id)::uuid)) AS m WHERE m."id"::uuid = bluegreen_g."id");
                EXCEPTION WHEN OTHERS THEN
                    e1_ok := false;
                    INSERT INTO "bluegreen"."sync_failures" (migration, green_table, sync_key, error)
                    SELECT DISTINCT 'm', 'customers', jsonb_build_array(u.k0), SQLSTATE || ': ' || SQLERRM FROM unnest(e1_k0) AS u(k0)
                    ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();
                END;
            END IF;
            IF e1_ok AND e1_k0 IS NOT NULL AND EXISTS (SELECT 1 FROM "bluegreen"."sync_failures" WHERE migration = 'm' AND green_table = 'customers') THEN
                DELETE FROM "bluegreen"."sync_failures" AS x WHERE x.migration = 'm' AND x.green_table = 'customers' AND x.sync_key IN (SELECT jsonb_build_array(u.k0) FROM unnest(e1_k0) AS u(k0));
            END IF;
            IF e2_ok AND e2_k0 IS NOT NULL AND EXISTS (SELECT 1 FROM "bluegreen"."sync_failures" WHERE migration = 'm' AND green_table = 'organizations') THEN
                DELETE FROM "bluegreen"."sync_failures" AS x WHERE x.migration = 'm' AND x.green_table = 'organizations' AND x.sync_key IN (SELECT jsonb_build_array(u.k0) FROM unnest(e2_k0) AS u(k0));
            END IF;
            PERFORM set_config('bluegreen.applying', '', true);
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'bluegreen: sync of this change deferred to the change log (run bluegreen sync): % %', SQLSTATE, SQLERRM;
            IF TG_OP = 'INSERT' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'I', to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'UPDATE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row, new_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', to_jsonb(o), NULL FROM old_rows o
                UNION ALL
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'U', NULL, to_jsonb(n) FROM new_rows n;
            ELSIF TG_OP = 'DELETE' THEN
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op, old_row)
                SELECT 'm', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'D', to_jsonb(o) FROM old_rows o;
            ELSE
                INSERT INTO "bluegreen"."changes" (migration, blue_table, op)
                VALUES ('m', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, 'T');
            END IF;
            END;
            RETURN NULL;
        END
        $fn$"#]],
    );
}

#[test]
fn catchup_function_of_a_join_driving_table() {
    let m = mapping(TABLES);
    let cat = catalog();
    let entries = sync_entries(&m, &cat);
    let x = QName::new("public", "customers");
    check(
        catchup_function(&m, &entries, &x, 1),
        expect![[r#"
        CREATE OR REPLACE FUNCTION "bluegreen"."bluegreen_m_catchup_1"(ids bigint[]) RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, "public" SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = '3' SET bytea_output = 'hex' SET standard_conforming_strings = 'on' SET max_parallel_workers_per_gather = 0 AS $fn$
        DECLARE
            lock_ids bigint[];
            e1_k0 uuid[];
            e1_ok boolean := true;
        BEGIN
            IF EXISTS (SELECT 1 FROM "bluegreen"."changes" AS c WHERE c.migration = 'm' AND c.blue_table = 'public.customers' AND c.id = ANY (ids) AND c.op = 'T') THEN
                PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:customers:', 0));
                SELECT array_agg(s.k0) INTO e1_k0 FROM (SELECT bluegreen_g."id" AS k0 FROM "v2"."customers" AS bluegreen_g UNION SELECT (c.id)::uuid AS k0 FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id)) AS s;
            ELSE
                SELECT array_agg(DISTINCT hashtextextended('bluegreen:m:customers:j0:' || v."workshop_id"::text, 0)) INTO lock_ids FROM (SELECT r.* FROM "bluegreen"."changes" AS c CROSS JOIN LATERAL jsonb_populate_record(NULL::"public"."customers", c.old_row) AS r WHERE c.migration = 'm' AND c.blue_table = 'public.customers' AND c.id = ANY (ids) AND c.old_row IS NOT NULL UNION ALL SELECT r.* FROM "bluegreen"."changes" AS c CROSS JOIN LATERAL jsonb_populate_record(NULL::"public"."customers", c.new_row) AS r WHERE c.migration = 'm' AND c.blue_table = 'public.customers' AND c.id = ANY (ids) AND c.new_row IS NOT NULL) AS v WHERE v."workshop_id" IS NOT NULL;
                IF cardinality(lock_ids) > 32 THEN
                    PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:customers:', 0));
                ELSIF lock_ids IS NOT NULL THEN
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended('bluegreen:m:customers:', 0));
                    PERFORM pg_advisory_xact_lock(h) FROM (SELECT h FROM unnest(lock_ids) AS h ORDER BY 1) AS s;
                END IF;
                SELECT array_agg(s.k0) INTO e1_k0 FROM (SELECT DISTINCT (c.id)::uuid AS k0 FROM (SELECT r.* FROM "bluegreen"."changes" AS c CROSS JOIN LATERAL jsonb_populate_record(NULL::"public"."customers", c.old_row) AS r WHERE c.migration = 'm' AND c.blue_table = 'public.customers' AND c.id = ANY (ids) AND c.old_row IS NOT NULL UNION ALL SELECT r.* FROM "bluegreen"."changes" AS c CROSS JOIN LATERAL jsonb_populate_record(NULL::"public"."customers", c.new_row) AS r WHERE c.migration = 'm' AND c.blue_table = 'public.customers' AND c.id = ANY (ids) AND c.new_row IS NOT NULL) AS "c") AS s;
            END IF;
            PERFORM set_config('bluegreen.applying', 'forward', true);
            IF e1_k0 IS NOT NULL THEN
                IF cardinality(e1_k0) > 32 THEN
                    PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:customers:', 0));
                ELSE
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended('bluegreen:m:customers:', 0));
                    PERFORM pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended('bluegreen:m:customers:' || ROW(u.k0)::text, 0) AS h FROM unnest(e1_k0) AS u(k0) ORDER BY 1) AS s;
                END IF;
            END IF;
            IF e1_k0 IS NOT NULL THEN
                BEGIN
                    INSERT INTO "v2"."customers" AS bluegreen_g ("id", "workshop_id", "city")
            SELECT * FROM (SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE ((c.id)::uuid) IN (SELECT u.k0 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NOT NULL) UNION ALL SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE EXISTS (SELECT 1 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e1_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (c.id)::uuid)) AS m
            ON CONFLICT ("id") DO UPDATE SET "workshop_id" = EXCLUDED."workshop_id", "city" = EXCLUDED."city" WHERE ROW(bluegreen_g."workshop_id", bluegreen_g."city")::text IS DISTINCT FROM ROW(EXCLUDED."workshop_id", EXCLUDED."city")::text;
                    DELETE FROM "v2"."customers" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT u.k0 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NOT NULL) AND NOT EXISTS (SELECT 1 FROM (SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE ((c.id)::uuid) IN (SELECT u.k0 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NOT NULL) UNION ALL SELECT (c.id) AS "id", (c.workshop_id) AS "workshop_id", (w.city) AS "city" FROM "public"."customers" AS "c" JOIN "public"."workshops" AS "w" ON (w.id = c.workshop_id) WHERE EXISTS (SELECT 1 FROM unnest(e1_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e1_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (c.id)::uuid)) AS m WHERE m."id"::uuid = bluegreen_g."id");
                EXCEPTION WHEN OTHERS THEN
                    e1_ok := false;
                    INSERT INTO "bluegreen"."sync_failures" (migration, green_table, sync_key, error)
                    SELECT DISTINCT 'm', 'customers', jsonb_build_array(u.k0), SQLSTATE || ': ' || SQLERRM FROM unnest(e1_k0) AS u(k0)
                    ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();
                END;
            END IF;
            IF e1_ok AND e1_k0 IS NOT NULL AND EXISTS (SELECT 1 FROM "bluegreen"."sync_failures" WHERE migration = 'm' AND green_table = 'customers') THEN
                DELETE FROM "bluegreen"."sync_failures" AS x WHERE x.migration = 'm' AND x.green_table = 'customers' AND x.sync_key IN (SELECT jsonb_build_array(u.k0) FROM unnest(e1_k0) AS u(k0));
            END IF;
            PERFORM set_config('bluegreen.applying', '', true);
        END
        $fn$"#]],
    );
}

#[test]
fn retry_functions() {
    let m = mapping(TABLES);
    let cat = catalog();
    let entries = sync_entries(&m, &cat);
    let org = entries
        .iter()
        .find(|e| e.entry.name == "organizations")
        .unwrap();
    check(
        retry_function(&m, org),
        expect![[r#"
        CREATE OR REPLACE FUNCTION "bluegreen"."bluegreen_m_2_retry_organizations"() RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, "public" SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = '3' SET bytea_output = 'hex' SET standard_conforming_strings = 'on' SET max_parallel_workers_per_gather = 0 AS $fn$
        DECLARE
            lock_ids bigint[];
            e2_k0 text[];
            e2_ok boolean := true;
        BEGIN
            SELECT array_agg((f.sync_key->>0)::text) INTO e2_k0 FROM "bluegreen"."sync_failures" AS f WHERE f.migration = 'm' AND f.green_table = 'organizations';
            IF e2_k0 IS NOT NULL THEN
                PERFORM 1 FROM "public"."workshops" AS "w" WHERE ((w.owner_email)::text) IN (SELECT * FROM unnest(e2_k0)) FOR SHARE OF "w";
            END IF;
            PERFORM set_config('bluegreen.applying', 'forward', true);
            IF e2_k0 IS NOT NULL THEN
                IF cardinality(e2_k0) > 32 THEN
                    PERFORM pg_advisory_xact_lock(hashtextextended('bluegreen:m:organizations:', 0));
                ELSE
                    PERFORM pg_advisory_xact_lock_shared(hashtextextended('bluegreen:m:organizations:', 0));
                    PERFORM pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended('bluegreen:m:organizations:' || ROW(u.k0)::text, 0) AS h FROM unnest(e2_k0) AS u(k0) ORDER BY 1) AS s;
                END IF;
            END IF;
            IF e2_k0 IS NOT NULL THEN
                BEGIN
                    INSERT INTO "v2"."organizations" AS bluegreen_g ("email", "workshops")
            SELECT * FROM (SELECT (w.owner_email) AS "email", (count(*)) AS "workshops" FROM "public"."workshops" AS "w" WHERE ((w.owner_email)::text) IN (SELECT u.k0 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NOT NULL) GROUP BY (w.owner_email) UNION ALL SELECT (w.owner_email) AS "email", (count(*)) AS "workshops" FROM "public"."workshops" AS "w" WHERE EXISTS (SELECT 1 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e2_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (w.owner_email)::text) GROUP BY (w.owner_email)) AS m
            ON CONFLICT ("email") DO UPDATE SET "workshops" = EXCLUDED."workshops" WHERE ROW(bluegreen_g."workshops")::text IS DISTINCT FROM ROW(EXCLUDED."workshops")::text;
                    DELETE FROM "v2"."organizations" AS bluegreen_g WHERE (bluegreen_g."email") IN (SELECT u.k0 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NOT NULL) AND NOT EXISTS (SELECT 1 FROM (SELECT (w.owner_email) AS "email", (count(*)) AS "workshops" FROM "public"."workshops" AS "w" WHERE ((w.owner_email)::text) IN (SELECT u.k0 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NOT NULL) GROUP BY (w.owner_email) UNION ALL SELECT (w.owner_email) AS "email", (count(*)) AS "workshops" FROM "public"."workshops" AS "w" WHERE EXISTS (SELECT 1 FROM unnest(e2_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e2_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (w.owner_email)::text) GROUP BY (w.owner_email)) AS m WHERE m."email"::text = bluegreen_g."email");
                EXCEPTION WHEN OTHERS THEN
                    e2_ok := false;
                    INSERT INTO "bluegreen"."sync_failures" (migration, green_table, sync_key, error)
                    SELECT DISTINCT 'm', 'organizations', jsonb_build_array(u.k0), SQLSTATE || ': ' || SQLERRM FROM unnest(e2_k0) AS u(k0)
                    ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();
                END;
            END IF;
            IF e2_ok AND e2_k0 IS NOT NULL AND EXISTS (SELECT 1 FROM "bluegreen"."sync_failures" WHERE migration = 'm' AND green_table = 'organizations') THEN
                DELETE FROM "bluegreen"."sync_failures" AS x WHERE x.migration = 'm' AND x.green_table = 'organizations' AND x.sync_key IN (SELECT jsonb_build_array(u.k0) FROM unnest(e2_k0) AS u(k0));
            END IF;
            PERFORM set_config('bluegreen.applying', '', true);
        END
        $fn$"#]],
    );
    let leads = entries.iter().find(|e| e.entry.name == "leads").unwrap();
    check(
        retry_function(&m, leads),
        expect![[r#"
        CREATE OR REPLACE FUNCTION "bluegreen"."bluegreen_m_0_retry_leads"() RETURNS void LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, "public" SET TimeZone = 'UTC' SET DateStyle = 'ISO, YMD' SET IntervalStyle = 'iso_8601' SET extra_float_digits = '3' SET bytea_output = 'hex' SET standard_conforming_strings = 'on' SET max_parallel_workers_per_gather = 0 AS $fn$
        DECLARE
            lock_ids bigint[];
            e0_k0 uuid[];
            e0_ok boolean := true;
        BEGIN
            SELECT array_agg((f.sync_key->>0)::uuid) INTO e0_k0 FROM "bluegreen"."sync_failures" AS f WHERE f.migration = 'm' AND f.green_table = 'leads';
            IF e0_k0 IS NOT NULL THEN
                PERFORM 1 FROM "public"."leads" AS "l" WHERE ((l.id)::uuid) IN (SELECT * FROM unnest(e0_k0)) FOR SHARE OF "l";
            END IF;
            PERFORM set_config('bluegreen.applying', 'forward', true);
            IF e0_k0 IS NOT NULL THEN
                BEGIN
                    INSERT INTO "v2"."leads" AS bluegreen_g ("id", "status")
            SELECT * FROM (SELECT (l.id) AS "id", (l.status) AS "status" FROM "public"."leads" AS "l" WHERE ((l.id)::uuid) IN (SELECT u.k0 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NOT NULL) UNION ALL SELECT (l.id) AS "id", (l.status) AS "status" FROM "public"."leads" AS "l" WHERE EXISTS (SELECT 1 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e0_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (l.id)::uuid)) AS m
            ON CONFLICT ("id") DO UPDATE SET "status" = EXCLUDED."status" WHERE ROW(bluegreen_g."status")::text IS DISTINCT FROM ROW(EXCLUDED."status")::text;
                    DELETE FROM "v2"."leads" AS bluegreen_g WHERE (bluegreen_g."id") IN (SELECT u.k0 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NOT NULL) AND NOT EXISTS (SELECT 1 FROM (SELECT (l.id) AS "id", (l.status) AS "status" FROM "public"."leads" AS "l" WHERE ((l.id)::uuid) IN (SELECT u.k0 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NOT NULL) UNION ALL SELECT (l.id) AS "id", (l.status) AS "status" FROM "public"."leads" AS "l" WHERE EXISTS (SELECT 1 FROM unnest(e0_k0) AS u(k0) WHERE u.k0 IS NULL) AND EXISTS (SELECT 1 FROM unnest(e0_k0) AS u(k0) WHERE (u.k0 IS NULL) AND u.k0 IS NOT DISTINCT FROM (l.id)::uuid)) AS m WHERE m."id"::uuid = bluegreen_g."id");
                EXCEPTION WHEN OTHERS THEN
                    e0_ok := false;
                    INSERT INTO "bluegreen"."sync_failures" (migration, green_table, sync_key, error)
                    SELECT DISTINCT 'm', 'leads', jsonb_build_array(u.k0), SQLSTATE || ': ' || SQLERRM FROM unnest(e0_k0) AS u(k0)
                    ON CONFLICT (migration, green_table, sync_key) DO UPDATE SET error = EXCLUDED.error, failed_at = now();
                END;
            END IF;
            IF e0_ok AND e0_k0 IS NOT NULL AND EXISTS (SELECT 1 FROM "bluegreen"."sync_failures" WHERE migration = 'm' AND green_table = 'leads') THEN
                DELETE FROM "bluegreen"."sync_failures" AS x WHERE x.migration = 'm' AND x.green_table = 'leads' AND x.sync_key IN (SELECT jsonb_build_array(u.k0) FROM unnest(e0_k0) AS u(k0));
            END IF;
            PERFORM set_config('bluegreen.applying', '', true);
        END
        $fn$"#]],
    );
}

#[test]
fn finds_join_equalities() {
    let m = mapping(
        "  t:
    from: public.customers c JOIN public.workshops w ON w.id = c.workshop_id AND w.active LEFT JOIN public.x y ON (y.k = c.\"K\" AND y.z >= 3)
    columns:
      id: c.id
",
    );
    let got: Vec<String> = join_equalities(&m.tables[0])
        .iter()
        .map(|((a, b), (c, d))| format!("{a}.{b}={c}.{d}"))
        .collect();
    assert_eq!(got, ["w.id=c.workshop_id", "y.k=c.K"]);
}
