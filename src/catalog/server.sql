-- Server and session facts.
SELECT current_setting('server_version') AS server_version,
       current_setting('server_version_num')::int4 AS server_version_num,
       current_database()::text AS database,
       current_user::text AS current_user,
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS is_superuser,
       current_setting('search_path') AS search_path,
       pg_size_bytes(current_setting('shared_buffers'))::int8 AS shared_buffers,
       (SELECT array_agg(nspname::text ORDER BY nspname) FROM pg_namespace
        WHERE nspname NOT LIKE 'pg\_%' AND nspname <> 'information_schema') AS schemas
