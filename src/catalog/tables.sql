-- Tables and partitioned tables of the given schemas, with size estimates.
SELECT c.oid::int8 AS oid,
       n.nspname::text AS schema,
       c.relname::text AS name,
       c.relkind::text AS kind,
       c.reltuples::float8 AS reltuples,
       pg_total_relation_size(c.oid)::int8 AS total_bytes,
       pg_relation_size(c.oid)::int8 AS heap_bytes,
       EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class k ON k.oid = i.inhrelid
               WHERE i.inhparent = c.oid AND NOT k.relispartition) AS inherited,
       EXISTS (SELECT 1 FROM pg_subscription_rel s WHERE s.srrelid = c.oid) AS subscribed
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY n.nspname, c.relname
