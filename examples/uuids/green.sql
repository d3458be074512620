-- String ids to uuid, green side (schema app_v2): real uuid keys with every foreign key
-- rewritten to them, snake_case names, the role enum remapped (MODEL is now talent, AGENCY is an
-- agency admin), and audit columns added with defaults (not mapped: the application fills them
-- from now on).

CREATE TYPE user_role AS ENUM ('admin', 'talent', 'client', 'agency_admin');

CREATE TABLE accounts (
    id          uuid PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    name        text NOT NULL,
    is_active   boolean NOT NULL,
    created_at  timestamptz NOT NULL,
    created_by  text NOT NULL DEFAULT 'migration',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     integer NOT NULL DEFAULT 1
);

CREATE TABLE users (
    id          uuid PRIMARY KEY,
    account_id  uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    email       text NOT NULL,
    first_name  text,
    last_name   text,
    role        user_role NOT NULL,
    created_at  timestamptz NOT NULL,
    created_by  text NOT NULL DEFAULT 'migration',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     integer NOT NULL DEFAULT 1
);
CREATE INDEX users_account_id_idx ON users (account_id);

CREATE TABLE media (
    id          uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    url         text NOT NULL,
    mime_type   text NOT NULL,
    size_bytes  bigint NOT NULL,
    created_at  timestamptz NOT NULL,
    created_by  text NOT NULL DEFAULT 'migration',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX media_user_id_idx ON media (user_id);
