-- Sequences in the given schemas and the column that owns each (serial or identity), if any.
SELECT sn.nspname::text AS schema,
       s.relname::text AS name,
       tn.nspname::text AS owner_schema,
       t.relname::text AS owner_table,
       a.attname::text AS owner_column,
       ps.last_value AS last_value,
       d.deptype = 'i' AS is_identity
FROM pg_class s
JOIN pg_namespace sn ON sn.oid = s.relnamespace
JOIN pg_sequences ps ON ps.schemaname = sn.nspname AND ps.sequencename = s.relname
LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
                      AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
LEFT JOIN pg_class t ON t.oid = d.refobjid
LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE s.relkind = 'S' AND sn.nspname = ANY($1)
ORDER BY sn.nspname, s.relname
