-- Primary key, unique, check, foreign key and exclusion constraints of the given tables.
SELECT con.conrelid::int8 AS table_oid,
       con.conname::text AS name,
       con.contype::text AS kind,
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.ord)
                 FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum), '{}') AS columns,
       pg_get_constraintdef(con.oid) AS definition,
       CASE WHEN con.contype = 'c' THEN pg_get_expr(con.conbin, con.conrelid) END AS check_expr,
       CASE WHEN con.contype = 'f' THEN fn.nspname::text END AS ref_schema,
       CASE WHEN con.contype = 'f' THEN fc.relname::text END AS ref_table,
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.ord)
                 FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum), '{}') AS ref_columns,
       con.convalidated AS validated
FROM pg_constraint con
LEFT JOIN pg_class fc ON fc.oid = con.confrelid
LEFT JOIN pg_namespace fn ON fn.oid = fc.relnamespace
WHERE con.conrelid = ANY($1::int8[]::oid[])
ORDER BY con.conrelid, con.contype, con.conname
