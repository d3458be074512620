-- search_path set for the current database and for roles (in this database or everywhere).
SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE r.rolname::text END AS role,
       s.setdatabase <> 0 AS in_this_database,
       substr(cfg, length('search_path=') + 1) AS search_path
FROM pg_db_role_setting s
LEFT JOIN pg_roles r ON r.oid = s.setrole
CROSS JOIN LATERAL unnest(s.setconfig) cfg
WHERE (s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
       OR s.setdatabase = 0)
  AND cfg LIKE 'search_path=%'
ORDER BY 1 NULLS FIRST
