-- What the temporary view bluegreen_probe reads: relations, and every function it calls (directly,
-- behind an operator, as an aggregate or window function) with its volatility. Built-in objects are
-- "pinned" and never recorded in pg_depend, so functions are read from the view's query tree.
WITH rule AS (
    SELECT r.oid, r.ev_action::text AS tree
    FROM pg_rewrite r
    WHERE r.ev_class = 'bluegreen_probe'::regclass
),
rels AS (
    SELECT DISTINCT m[1]::oid AS oid
    FROM rule, regexp_matches(rule.tree, ':relid (\d+)', 'g') m
    UNION
    SELECT dep.refobjid
    FROM pg_depend dep JOIN rule ON dep.classid = 'pg_rewrite'::regclass AND dep.objid = rule.oid
    WHERE dep.refclassid = 'pg_class'::regclass
),
funcs AS (
    SELECT DISTINCT m[1]::oid AS oid
    FROM rule, regexp_matches(rule.tree, ':(?:funcid|opfuncid|aggfnoid|winfnoid) (\d+)', 'g') m
    UNION
    SELECT dep.refobjid
    FROM pg_depend dep JOIN rule ON dep.classid = 'pg_rewrite'::regclass AND dep.objid = rule.oid
    WHERE dep.refclassid = 'pg_proc'::regclass
)
SELECT 'relation' AS kind, n.nspname::text AS schema, c.relname::text AS name, NULL::text AS volatility
FROM rels JOIN pg_class c ON c.oid = rels.oid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid <> 'bluegreen_probe'::regclass
UNION ALL
SELECT 'function', n.nspname::text, p.proname::text, p.provolatile::text
FROM funcs JOIN pg_proc p ON p.oid = funcs.oid
JOIN pg_namespace n ON n.oid = p.pronamespace
