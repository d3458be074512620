-- String-id legacy data generator: deterministic and set-based (no random(), no now()). Ids are
-- md5-derived uuids in the lowercase text form the ORM writes.
-- Knob: the custom setting uuids.accounts (default 300 when unset or empty); users = 4 per
-- account, media = 2 per user. Re-running it starts over.

TRUNCATE "Media", "User", "Account";

INSERT INTO "Account" (id, email, name, "isActive", "createdAt")
SELECT md5('account:' || i)::uuid::text, 'account' || i || '@example.org', 'Agency ' || i, i % 9 <> 0,
       '2024-01-01 00:00:00'::timestamp + make_interval(mins => i)
FROM generate_series(1, coalesce(nullif(current_setting('uuids.accounts', true), '')::integer, 300)) AS i;

INSERT INTO "User" (id, "accountId", email, "firstName", "lastName", role, "createdAt")
SELECT md5('user:' || a.n || ':' || k)::uuid::text, a.id, 'user' || a.n || '.' || k || '@example.org',
       CASE WHEN k <> 3 THEN 'First' || a.n END, 'Last' || k,
       (ARRAY['ADMIN', 'MODEL', 'CLIENT', 'AGENCY'])[1 + (a.n + k) % 4]::"UserRole",
       a."createdAt" + make_interval(hours => k)
FROM (SELECT id, "createdAt", row_number() OVER (ORDER BY "createdAt") AS n FROM "Account") AS a,
     generate_series(0, 3) AS k;

INSERT INTO "Media" (id, "userId", url, "mimeType", "sizeBytes", "createdAt")
SELECT md5('media:' || u.id || ':' || k)::uuid::text, u.id, 'https://cdn.example.org/' || md5(u.id || k) || '.jpg',
       CASE WHEN k = 0 THEN 'image/jpeg' ELSE 'image/png' END, 1000 + (abs(hashtext(u.id)) % 500000) + k,
       u."createdAt" + make_interval(days => k)
FROM "User" u, generate_series(0, 1) AS k;

ANALYZE "Account", "User", "Media";
