-- Columns of the given tables in attnum order.
SELECT a.attrelid::int8 AS table_oid,
       a.attname::text AS name,
       format_type(a.atttypid, a.atttypmod) AS type_sql,
       a.atttypid::int8 AS type_oid,
       a.attnotnull AS not_null,
       pg_get_expr(d.adbin, d.adrelid) AS default_sql,
       a.attidentity::text AS identity,
       a.attgenerated::text AS generated,
       -- A domain's base type with its length (`character varying(5)` for a domain over it).
       CASE WHEN t.typtype = 'd' THEN format_type(t.typbasetype, t.typtypmod) END AS domain_base,
       -- The column's collation (NULL for a type without one).
       CASE WHEN a.attcollation <> 0 THEN a.attcollation::regcollation::text END AS collation,
       -- `=` on the type (a domain's base type) defined outside pg_catalog (citext's).
       EXISTS (SELECT 1 FROM pg_operator o
               WHERE o.oprname = '=' AND o.oprleft = COALESCE(NULLIF(t.typbasetype, 0), a.atttypid)
                 AND o.oprright = o.oprleft AND o.oprnamespace <> 'pg_catalog'::regnamespace) AS own_equality,
       -- How far the column's order is from the heap's (NULL until analysed; pg_stats shows only
       -- columns the user may read).
       (SELECT s.correlation::float8 FROM pg_stats s
        WHERE s.schemaname = n.nspname AND s.tablename = c.relname AND s.attname = a.attname
          AND NOT s.inherited) AS correlation
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = ANY($1::int8[]::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
