-- Food CRM legacy data generator: deterministic and set-based (no random(), no now()).
-- Knob: the custom setting foodcrm.restaurants (default 500 when unset or empty), e.g.
--     SET foodcrm.restaurants = 100000;   -- then send this whole file
-- Leads = 3 per restaurant, GDPR log rows = 2 per restaurant. Re-running it starts over.
-- Edge cases on purpose: the country spelled four ways, ~1/7 of restaurants without a buyer and
-- ~1/5 without a managing director, leads outside any season, samples never sent.

TRUNCATE gdpr_log, leads, restaurants, contact_roles RESTART IDENTITY;

INSERT INTO contact_roles VALUES ('CHEF', 'Küchenchef'), ('BUYER', 'Einkauf'), ('GF', 'Geschäftsführung');

INSERT INTO restaurants (name, street, zip, city, country, chef_name, chef_email, chef_phone,
                         buyer_name, buyer_email, buyer_phone, gf_name, gf_email, gf_phone, created_at)
SELECT 'Restaurant ' || i,
       'Hauptstrasse ' || (1 + i % 120),
       CASE WHEN i % 3 = 0 THEN lpad((1000 + i % 8999)::text, 4, '0') ELSE lpad((10000 + i % 89999)::text, 5, '0') END,
       (ARRAY['Berlin', 'München', 'Hamburg', 'Zürich', 'Basel', 'Köln', 'Bern', 'Frankfurt'])[1 + i % 8],
       (ARRAY['DE', 'Deutschland', 'CH', 'Schweiz'])[1 + i % 4],
       'Chef ' || i, 'chef' || i || '@example.org', '+49 30 ' || (100000 + i),
       CASE WHEN i % 7 <> 0 THEN 'Buyer ' || i END,
       CASE WHEN i % 7 <> 0 THEN 'buyer' || i || '@example.org' END,
       NULL,
       CASE WHEN i % 5 <> 0 THEN 'GF ' || i END,
       CASE WHEN i % 5 <> 0 THEN 'gf' || i || '@example.org' END,
       CASE WHEN i % 5 <> 0 THEN '+41 44 ' || (200000 + i) END,
       '2024-01-01 00:00:00+00'::timestamptz + make_interval(mins => i)
FROM generate_series(1, coalesce(nullif(current_setting('foodcrm.restaurants', true), '')::integer, 500)) AS i;

INSERT INTO leads (restaurant_id, owner_email, stage, season, sample_sent, value_net, created_at, updated_at)
SELECT r.id,
       'rep' || (1 + (r.id + k) % 6) || '@freshfoodz.example',
       (ARRAY['neu', 'kontaktiert', 'muster', 'gewonnen', 'verloren'])[1 + (r.id * 3 + k) % 5],
       (ARRAY['spargel', 'oktoberfest', 'weihnachten', NULL])[1 + (r.id + k) % 4],
       CASE WHEN (r.id + k) % 3 = 0 THEN '2024-04-01'::date + (r.id % 200) END,
       ((r.id * 37 + k * 11) % 5000) + 0.5 * (k % 2),
       '2024-02-01 00:00:00+00'::timestamptz + make_interval(hours => r.id + k),
       CASE WHEN k = 2 THEN '2024-06-01 00:00:00+00'::timestamptz END
FROM restaurants r, generate_series(0, 2) AS k;

INSERT INTO gdpr_log (restaurant_id, action, actor, at, detail)
SELECT r.id,
       (ARRAY['export', 'access', 'rectify', 'erase'])[1 + (r.id + k) % 4],
       CASE WHEN k = 0 THEN 'dpo@freshfoodz.example' ELSE 'rep' || (1 + r.id % 6) || '@freshfoodz.example' END,
       '2024-03-01 00:00:00+00'::timestamptz + make_interval(mins => r.id * 2 + k),
       jsonb_build_object('ticket', 'GDPR-' || (r.id * 2 + k), 'fields', CASE WHEN k = 0 THEN '["email"]'::jsonb ELSE '["phone", "name"]'::jsonb END)
FROM restaurants r, generate_series(0, 1) AS k;

ANALYZE restaurants, contact_roles, leads, gdpr_log;
