-- What the temporary view bluegreen_probe reads: relations, and functions (directly or behind an
-- operator) with their volatility.
WITH d AS (
    SELECT DISTINCT dep.refclassid, dep.refobjid
    FROM pg_depend dep
    JOIN pg_rewrite r ON dep.classid = 'pg_rewrite'::regclass AND dep.objid = r.oid
    WHERE r.ev_class = 'bluegreen_probe'::regclass AND dep.refobjid <> 'bluegreen_probe'::regclass
)
SELECT 'relation' AS kind, n.nspname::text AS schema, c.relname::text AS name, NULL::text AS volatility
FROM d JOIN pg_class c ON d.refclassid = 'pg_class'::regclass AND c.oid = d.refobjid
JOIN pg_namespace n ON n.oid = c.relnamespace
UNION ALL
SELECT 'function', n.nspname::text, p.proname::text, p.provolatile::text
FROM d JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND p.oid = d.refobjid
JOIN pg_namespace n ON n.oid = p.pronamespace
UNION ALL
SELECT 'function', n.nspname::text, p.proname::text, p.provolatile::text
FROM d JOIN pg_operator o ON d.refclassid = 'pg_operator'::regclass AND o.oid = d.refobjid
JOIN pg_proc p ON p.oid = o.oprcode
JOIN pg_namespace n ON n.oid = p.pronamespace
