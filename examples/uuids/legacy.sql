-- String ids to uuid (seed 004): the legacy schema as an ORM (Prisma) created it. Ids are uuids
-- stored as text, table and column names are quoted CamelCase, roles are an ORM-made enum, and
-- there are no audit columns. Run into the schema `public` of an empty database;
-- examples/uuids/generate.sql fills it.

CREATE TYPE "UserRole" AS ENUM ('ADMIN', 'MODEL', 'CLIENT', 'AGENCY');

CREATE TABLE "Account" (
    id           text PRIMARY KEY,
    email        text NOT NULL UNIQUE,
    name         text NOT NULL,
    "isActive"   boolean NOT NULL DEFAULT true,
    "createdAt"  timestamp(3) NOT NULL
);

CREATE TABLE "User" (
    id           text PRIMARY KEY,
    "accountId"  text NOT NULL REFERENCES "Account" (id) ON DELETE CASCADE,
    email        text NOT NULL,
    "firstName"  text,
    "lastName"   text,
    role         "UserRole" NOT NULL DEFAULT 'CLIENT',
    "createdAt"  timestamp(3) NOT NULL
);
CREATE INDEX "User_accountId_idx" ON "User" ("accountId");

CREATE TABLE "Media" (
    id           text PRIMARY KEY,
    "userId"     text NOT NULL REFERENCES "User" (id) ON DELETE CASCADE,
    url          text NOT NULL,
    "mimeType"   text NOT NULL,
    "sizeBytes"  integer NOT NULL,
    "createdAt"  timestamp(3) NOT NULL
);
CREATE INDEX "Media_userId_idx" ON "Media" ("userId");

-- Added before the migration, as `bluegreen plan` advised: green's keys are the uuid form of the
-- text ids, and live sync finds the blue rows of a green key through these expression indexes.
CREATE INDEX "Account_id_uuid_idx" ON "Account" ((id::uuid));
CREATE INDEX "User_id_uuid_idx" ON "User" ((id::uuid));
CREATE INDEX "Media_id_uuid_idx" ON "Media" ((id::uuid));
