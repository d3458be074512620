-- Indexes of the given tables. Expression columns appear as NULL in `columns`.
SELECT i.indrelid::int8 AS table_oid,
       ic.relname::text AS name,
       i.indisunique AS is_unique,
       i.indisprimary AS is_primary,
       (SELECT array_agg(a.attname::text ORDER BY k.ord)
        FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
        LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE k.ord <= i.indnkeyatts) AS columns,
       i.indpred IS NOT NULL AS is_partial,
       i.indnullsnotdistinct AS nulls_not_distinct,
       i.indisvalid AS is_valid,
       i.indimmediate AS is_immediate,
       pg_get_indexdef(i.indexrelid) AS definition,
       EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = i.indexrelid
                                                AND con.conrelid = i.indrelid) AS backs_constraint,
       pg_relation_size(i.indexrelid)::int8 AS bytes
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
WHERE i.indrelid = ANY($1::int8[]::oid[])
ORDER BY i.indrelid, ic.relname
