-- CarBot legacy data generator: deterministic, set-based, one multi-statement string.
--
-- Knob: the custom setting carbot.leads (default 1000 when unset or empty), e.g.
--     SET carbot.leads = 1000000;   -- then send this whole file
-- Everything else scales from it:
--     workshops     = greatest(5, leads / 200)
--     owners        = greatest(2, workshops * 3 / 5)   (workshop i belongs to owner 1 + (i-1) % owners,
--                                                      so several workshops share an owner_email)
--     customers     = leads / 2       (~3% orphans pointing at deleted workshops, ~10% single-word names)
--     chat sessions = leads, 2..8 messages each (~5 per lead); 3 of 4 sessions are linked to their lead
-- No random(), no now(): every value is derived from the generate_series index through md5 and modulo,
-- and every timestamp from the fixed base 2024-01-01 00:00:00+00, so two runs give identical rows.
-- Run with search_path = the legacy schema, after legacy.sql. Re-running it starts over (TRUNCATE).
-- (The OFFSET 0 fences below keep each per-row hash computed once instead of inlined at every use.)
--
-- Edge cases present on purpose: ~1.2% leads and ~3% customers whose workshop does not exist,
-- ~5% soft-deleted leads, fahrzeug NULL (~15%) and '' (~5%), priority NULL (~10%), lead_score NULL
-- (~10%), anliegen NULL (~1%), all five statuses, customer emails NULL (~6%) or invalid (~3%),
-- workshops with NULL business_type (~20%) or NULL opening_hours (~10%), customers.active NULL (~5%).

TRUNCATE chat_messages, leads, customers, workshops RESTART IDENTITY;

DROP TABLE IF EXISTS pg_temp.carbot_gen;
DROP TABLE IF EXISTS pg_temp.carbot_gen_src;
CREATE TEMP TABLE carbot_gen_src AS
SELECT s.n AS n_leads,
       greatest(5, s.n / 200) AS n_workshops,
       greatest(2, greatest(5, s.n / 200) * 3 / 5) AS n_owners,
       s.n / 2 AS n_customers,
       ARRAY['Berlin','Hamburg','München','Köln','Frankfurt am Main','Stuttgart','Düsseldorf','Leipzig',
             'Dortmund','Essen','Bremen','Dresden','Hannover','Nürnberg','Duisburg','Bochum','Wuppertal',
             'Bielefeld','Bonn','Münster'] AS cities,
       ARRAY[10115,20095,80331,50667,60311,70173,40213,4109,44135,45127,28195,1067,30159,90402,47051,
             44787,42103,33602,53111,48143] AS plz,
       ARRAY['030','040','089','0221','069','0711','0211','0341','0231','0201','0421','0351','0511',
             '0911','0203','0234','0202','0521','0228','0251'] AS area,
       ARRAY['Hauptstraße','Bahnhofstraße','Industriestraße','Gewerbestraße','Gartenstraße','Schulstraße',
             'Dorfstraße','Bergstraße','Lindenstraße','Am Gewerbepark','Werkstattweg','Kirchweg',
             'Ringstraße','Mühlenweg','Friedrichstraße','Kantstraße'] AS streets,
       ARRAY['Autowerkstatt','Kfz-Meisterbetrieb','Autoservice','Reifen- & Autoservice',
             'Karosserie & Lack','Autohaus','Kfz-Technik'] AS kinds,
       ARRAY['independent','franchise','dealership','chain','mobile_service'] AS business_types,
       ARRAY['Inspektion','Ölwechsel','Reifenwechsel','HU/AU','Bremsenservice','Klimaservice',
             'Karosserie','Unfallinstandsetzung','Glasreparatur','Elektrik/Diagnose'] AS services,
       ARRAY['Max','Anna','Lukas','Laura','Jonas','Lea','Felix','Sophie','Paul','Marie','Jürgen',
             'Sabine','Thomas','Petra','Michael','Andrea','Stefan','Claudia','Jörg','Birgit','Özlem',
             'Mehmet','Ayşe','Kemal','Agnieszka','Piotr','Élodie','Giuseppe','Hans-Peter','Karl-Heinz',
             'Ingrid','Uwe'] AS first_names,
       -- the last three contain a space: "Karl von Bergen" splits into first 'Karl', last 'von Bergen'
       ARRAY['Müller','Schmidt','Schneider','Fischer','Weber','Meyer','Wagner','Becker','Schulz',
             'Hoffmann','Schäfer','Koch','Bauer','Richter','Klein','Wolf','Schröder','Neumann',
             'Schwarz','Zimmermann','Braun','Krüger','Hofmann','Hartmann','Lange','Schmitt','Werner',
             'Krause','Köhler','König','Yılmaz','Kaya','Nowak','Kowalski','Rossi','Groß','Weiß',
             'von Bergen','de Vries','van der Berg'] AS last_names,
       ARRAY['web.de','gmx.de','gmail.com','t-online.de','outlook.de','posteo.de','icloud.com',
             'freenet.de'] AS domains,
       ARRAY['VW Golf VII 1.6 TDI (2016)','VW Polo (2019)','Opel Astra K (2018)',
             'BMW 320d Touring (2017)','Mercedes-Benz C 200 (2020)','Audi A4 Avant (2015)',
             'Ford Focus (2014)','Skoda Octavia Combi (2019)','Seat Leon (2021)',
             'Toyota Yaris Hybrid (2022)','Renault Clio (2013)','Fiat 500 (2016)','Hyundai i30 (2018)',
             'Kia Ceed (2020)','Tesla Model 3 (2021)','VW Transporter T6 (2017)','Mazda CX-5 (2019)',
             'Opel Corsa','golf 4','BMW X1 (2012)','Audi Q5','Dacia Duster (2020)','Peugeot 208 (2019)',
             'Citroën C3 (2017)'] AS vehicles,
       ARRAY['Inspektion fällig','Ölwechsel','Reifenwechsel auf Winterreifen','HU/AU Termin',
             'Bremsen quietschen','Motorkontrollleuchte leuchtet','Klimaanlage kühlt nicht',
             'Unfallschaden hinten links','Steinschlag in der Windschutzscheibe','Auto springt nicht an',
             'Kostenvoranschlag Zahnriemen','Auspuff ist laut','Batterie schwach',
             'Ölverlust unter dem Auto','Rückruf: Airbag prüfen','Termin: Räder einlagern'] AS anliegen,
       ARRAY['Hallo! Ich bin der CarBot Ihrer Werkstatt. Wie kann ich helfen?',
             'Danke! Um welches Fahrzeug geht es?','Wann passt Ihnen ein Termin?',
             'Ich habe Ihre Anfrage an die Werkstatt weitergeleitet.',
             'Können Sie mir Ihre Telefonnummer geben?','Wir melden uns innerhalb von 24 Stunden.',
             'Ein Termin ist ab Montag möglich.','Gibt es sonst noch etwas?'] AS bot_lines,
       ARRAY['Hallo, ich brauche einen Termin.','Mein Auto macht komische Geräusche.',
             'Was kostet eine Inspektion?','Geht es diese Woche noch?','Meine Nummer ist 0171 2345678',
             'Danke!','Ist das Auto bis Freitag fertig?','Können Sie auch Reifen einlagern?'] AS user_lines,
       timestamptz '2024-01-01 00:00:00+00' AS base
FROM (SELECT greatest(0, coalesce(nullif(current_setting('carbot.leads', true), ''), '1000')::int) AS n) s;

-- The dictionaries are read for every generated row: keep them uncompressed (no TOAST), or each
-- subscript would decompress the whole array again.
CREATE TEMP TABLE carbot_gen (LIKE carbot_gen_src);
ALTER TABLE carbot_gen
    ALTER cities SET STORAGE PLAIN, ALTER plz SET STORAGE PLAIN, ALTER area SET STORAGE PLAIN,
    ALTER streets SET STORAGE PLAIN, ALTER kinds SET STORAGE PLAIN, ALTER business_types SET STORAGE PLAIN,
    ALTER services SET STORAGE PLAIN, ALTER first_names SET STORAGE PLAIN,
    ALTER last_names SET STORAGE PLAIN, ALTER domains SET STORAGE PLAIN, ALTER vehicles SET STORAGE PLAIN,
    ALTER anliegen SET STORAGE PLAIN, ALTER bot_lines SET STORAGE PLAIN, ALTER user_lines SET STORAGE PLAIN;
INSERT INTO carbot_gen SELECT * FROM carbot_gen_src;
DROP TABLE carbot_gen_src;

-- workshops ---------------------------------------------------------------------------------------
INSERT INTO workshops (id, owner_id, owner_email, name, slug, phone, address, city, postal_code,
                       business_type, opening_hours, services, is_active, created_at, updated_at)
SELECT md5('workshop:' || g.i)::uuid,
       md5('owner:' || v.oi)::uuid,
       'inhaber' || v.oi || '@autogruppe-' || v.oi || '.de',
       v.title,
       regexp_replace(translate(lower(v.title), 'äöüßışçé', 'aousisce'), '[^a-z0-9]+', '-', 'g') || '-' || g.i,
       p.area[v.ci] || ' ' || (100000 + (g.i::bigint * 7919) % 900000),
       p.streets[1 + get_byte(v.h, 3) % 16] || ' ' || (1 + get_byte(v.h, 4) % 120),
       p.cities[v.ci],
       lpad((p.plz[v.ci] + get_byte(v.h, 5) % 40)::text, 5, '0'),
       CASE WHEN get_byte(v.h, 6) % 5 = 0 THEN NULL ELSE p.business_types[1 + get_byte(v.h, 7) % 5] END,
       CASE get_byte(v.h, 8) % 10
           WHEN 0 THEN NULL
           WHEN 1 THEN '{"mo-fr": "07:30-17:00"}'::jsonb
           WHEN 2 THEN '{}'::jsonb
           ELSE jsonb_build_object('mon', '08:00-18:00', 'tue', '08:00-18:00', 'wed', '08:00-18:00',
                                   'thu', '08:00-18:00', 'fri', '08:00-' || (16 + get_byte(v.h, 9) % 3) || ':00',
                                   'sat', CASE WHEN get_byte(v.h, 9) % 2 = 0 THEN '09:00-13:00' END)
       END,
       ARRAY(SELECT s.name FROM unnest(p.services) WITH ORDINALITY AS s(name, k)
             WHERE ((get_byte(v.h, 10) << 8 | get_byte(v.h, 11)) >> (s.k::int - 1)) & 1 = 1
             ORDER BY s.k),
       get_byte(v.h, 12) % 20 <> 0,
       v.created,
       v.created + (get_byte(v.h, 13) % 300) * interval '1 day' + get_byte(v.h, 14) * interval '1 minute'
FROM carbot_gen p
CROSS JOIN generate_series(1, p.n_workshops) AS g(i)
CROSS JOIN LATERAL (
    SELECT h, oi, ci,
           p.kinds[1 + get_byte(h, 1) % 7] || ' ' || p.last_names[1 + get_byte(h, 2) % 37] || ' '
               || p.cities[ci] AS title,
           p.base - (400 + (get_byte(h, 15) << 8 | get_byte(h, 14)) % 700) * interval '1 day'
               + (g.i * 7) % 86400 * interval '1 second' AS created
    FROM (SELECT decode(md5('workshop:' || g.i), 'hex') AS h,
                 1 + (g.i - 1) % p.n_owners AS oi
          OFFSET 0) a
    CROSS JOIN LATERAL (SELECT 1 + get_byte(a.h, 0) % 20 AS ci) c
    OFFSET 0
) v;

-- customers ---------------------------------------------------------------------------------------
INSERT INTO customers (id, workshop_id, name, email, phone, address, city, postal_code, active,
                       created_at, updated_at)
SELECT md5('customer:' || g.i)::uuid,
       CASE WHEN get_byte(v.h, 0) % 100 < 3
            THEN md5('workshop:deleted:' || g.i % 11)::uuid          -- orphan: no such workshop
            ELSE md5('workshop:' || (1 + ((get_byte(v.h, 1) << 16) | (get_byte(v.h, 2) << 8)
                                          | get_byte(v.h, 3)) % p.n_workshops))::uuid
       END,
       v.full_name,
       CASE WHEN get_byte(v.h, 8) % 100 < 6 THEN NULL
            WHEN get_byte(v.h, 8) % 100 = 6 THEN 'keine Angabe'
            WHEN get_byte(v.h, 8) % 100 = 7 THEN v.local || '(at)web.de'
            WHEN get_byte(v.h, 8) % 100 = 8 THEN v.local || '@gmx'
            ELSE v.local || (CASE WHEN get_byte(v.h, 9) % 3 = 0 THEN (get_byte(v.h, 9) % 90 + 10)::text ELSE '' END)
                 || '@' || p.domains[1 + get_byte(v.h, 10) % 8]
       END,
       CASE WHEN get_byte(v.h, 9) % 10 = 1 THEN NULL
            ELSE p.area[v.ci] || ' ' || (1000000 + (g.i::bigint * 104729) % 9000000) END,
       p.streets[1 + get_byte(v.h, 11) % 16] || ' ' || (1 + get_byte(v.h, 12) % 150),
       p.cities[v.ci],
       lpad((p.plz[v.ci] + get_byte(v.h, 13) % 40)::text, 5, '0'),
       CASE get_byte(v.h, 14) % 20 WHEN 0 THEN false WHEN 1 THEN NULL ELSE true END,
       v.created,
       v.created + (get_byte(v.h, 15) % 200) * interval '1 day'
FROM carbot_gen p
CROSS JOIN generate_series(1, p.n_customers) AS g(i)
CROSS JOIN LATERAL (
    SELECT h, ci, full_name, created,
           translate(lower(replace(full_name, ' ', '.')), 'äöüßéışç', 'aouseisc') AS local
    FROM (SELECT decode(md5('customer:' || g.i), 'hex') AS h OFFSET 0) a
    CROSS JOIN LATERAL (
        SELECT 1 + get_byte(a.h, 7) % 20 AS ci,
               CASE get_byte(a.h, 4) % 10
                   WHEN 0 THEN CASE WHEN get_byte(a.h, 5) % 2 = 0
                                    THEN p.first_names[1 + get_byte(a.h, 6) % 32]
                                    ELSE p.last_names[1 + get_byte(a.h, 6) % 37] END   -- single word
                   WHEN 1 THEN p.first_names[1 + get_byte(a.h, 6) % 32] || ' '
                               || p.first_names[1 + get_byte(a.h, 5) % 32] || ' '
                               || p.last_names[1 + get_byte(a.h, 7) % 40]
                   ELSE p.first_names[1 + get_byte(a.h, 6) % 32] || ' '
                        || p.last_names[1 + (get_byte(a.h, 5) + get_byte(a.h, 7)) % 40]
               END AS full_name,
               p.base - interval '730 days'
                   + ((g.i::bigint * 63072000) / greatest(p.n_customers, 1)) * interval '1 second' AS created
        OFFSET 0
    ) b
    OFFSET 0
) v;

-- leads -------------------------------------------------------------------------------------------
INSERT INTO leads (id, workshop_id, kunde_id, name, email, telefon, anliegen, fahrzeug, status, priority,
                   lead_score, chatverlauf, "timestamp", created_at, updated_at, deleted_at)
SELECT md5('lead:' || g.i)::uuid,
       v.workshop_id,
       'kd_' || substr(md5('client:' || g.i), 1, 12),
       v.full_name,
       CASE WHEN get_byte(v.h, 15) % 100 < 4 THEN NULL
            WHEN get_byte(v.h, 15) % 100 = 4 THEN 'n/a'
            WHEN get_byte(v.h, 15) % 100 = 5 THEN v.local || '@'
            ELSE v.local || '@' || p.domains[1 + get_byte(v.h, 9) % 8]
       END,
       CASE WHEN get_byte(v.h, 14) % 10 = 1 THEN NULL
            ELSE '+49 1' || (50 + get_byte(v.h, 9) % 30) || ' ' || lpad(((g.i::bigint * 7919) % 10000000)::text, 7, '0') END,
       v.anliegen,
       CASE WHEN get_byte(v.h, 8) % 20 < 3 THEN NULL
            WHEN get_byte(v.h, 8) % 20 = 3 THEN ''
            ELSE p.vehicles[1 + get_byte(v.h, 13) % 24] END,
       v.status,
       CASE get_byte(v.h, 5) % 10
           WHEN 0 THEN NULL WHEN 1 THEN 'high' WHEN 2 THEN 'high'
           WHEN 3 THEN 'medium' WHEN 4 THEN 'medium' WHEN 5 THEN 'medium' WHEN 6 THEN 'medium'
           ELSE 'low' END,
       CASE WHEN get_byte(v.h, 6) % 10 = 0 THEN NULL
            ELSE (get_byte(v.h, 6) << 8 | get_byte(v.h, 7)) % 101 END,
       CASE WHEN g.i % 4 <> 0 AND get_byte(v.h, 1) % 2 = 0 THEN
           jsonb_build_array(
               jsonb_build_object('role', 'bot', 'text', p.bot_lines[1]),
               jsonb_build_object('role', 'user', 'text', coalesce(v.anliegen, p.user_lines[1])),
               jsonb_build_object('role', 'bot', 'text', p.bot_lines[2]))
       END,
       v.created - (get_byte(v.h, 11) % 30) * interval '1 minute',
       v.created,
       v.updated,
       CASE WHEN (g.i * 37) % 20 = 3 THEN v.updated + interval '1 day' END   -- 5% soft-deleted
FROM carbot_gen p
CROSS JOIN generate_series(1, p.n_leads) AS g(i)
CROSS JOIN LATERAL (
    SELECT h, full_name, anliegen, status, created,
           CASE WHEN get_byte(h, 3) < 3
                THEN md5('workshop:gone:' || g.i % 17)::uuid                 -- orphan: no such workshop
                ELSE md5('workshop:' || (1 + ((get_byte(h, 0) << 16) | (get_byte(h, 1) << 8)
                                          | get_byte(h, 2)) % p.n_workshops))::uuid
           END AS workshop_id,
           translate(lower(replace(full_name, ' ', '.')), 'äöüßéışç', 'aouseisc') AS local,
           CASE WHEN status = 'new' THEN created
                ELSE created + (get_byte(h, 10) % 14) * interval '1 day' + get_byte(h, 9) * interval '1 minute'
           END AS updated
    FROM (SELECT decode(md5('lead:' || g.i), 'hex') AS h OFFSET 0) a
    CROSS JOIN LATERAL (
        SELECT CASE WHEN get_byte(a.h, 14) % 20 = 0 THEN p.first_names[1 + get_byte(a.h, 12) % 32]
                    ELSE p.first_names[1 + get_byte(a.h, 12) % 32] || ' ' || p.last_names[1 + get_byte(a.h, 13) % 40]
               END AS full_name,
               CASE WHEN get_byte(a.h, 10) % 100 = 0 THEN NULL
                    ELSE p.anliegen[1 + get_byte(a.h, 11) % 16] END AS anliegen,
               CASE WHEN get_byte(a.h, 4) % 20 < 6 THEN 'new'
                    WHEN get_byte(a.h, 4) % 20 < 11 THEN 'contacted'
                    WHEN get_byte(a.h, 4) % 20 < 15 THEN 'qualified'
                    WHEN get_byte(a.h, 4) % 20 < 18 THEN 'converted'
                    ELSE 'lost' END AS status,
               p.base + ((g.i::bigint * 31536000) / p.n_leads + get_byte(a.h, 7) * 13) * interval '1 second' AS created
        OFFSET 0
    ) b
    OFFSET 0
) v;

-- chat_messages: one session per lead index, 2..8 messages, ids (j-1)*8 + k -------------------------
INSERT INTO chat_messages (id, workshop_id, session_id, lead_id, sender, message, created_at)
SELECT (s.j - 1) * 8 + k.k,
       s.workshop_id,
       s.session_id,
       s.lead_id,
       CASE WHEN k.k % 2 = 1 THEN 'bot' ELSE 'user' END,
       CASE WHEN k.k = 1 THEN p.bot_lines[1]
            WHEN k.k = 2 THEN coalesce(s.anliegen, p.user_lines[1])
            WHEN k.k % 2 = 1 THEN p.bot_lines[1 + (s.j + k.k) % 8]
            ELSE p.user_lines[1 + (s.j * 3 + k.k) % 8] END,
       s.started + ((k.k - 1) * 45 + k.k * k.k) * interval '1 second'
FROM carbot_gen p
CROSS JOIN LATERAL (
    -- same derivations as the leads above (workshop, anliegen, first contact), from the same hash
    SELECT g.j,
           CASE WHEN get_byte(a.h, 3) < 3
                THEN md5('workshop:gone:' || g.j % 17)::uuid
                ELSE md5('workshop:' || (1 + ((get_byte(a.h, 0) << 16) | (get_byte(a.h, 1) << 8)
                                          | get_byte(a.h, 2)) % p.n_workshops))::uuid
           END AS workshop_id,
           'sess-' || lpad(to_hex(g.j), 6, '0') || '-' || substr(md5('session:' || g.j), 1, 8) AS session_id,
           CASE WHEN g.j % 4 <> 0 THEN md5('lead:' || g.j)::uuid END AS lead_id,
           CASE WHEN get_byte(a.h, 10) % 100 = 0 THEN NULL
                ELSE p.anliegen[1 + get_byte(a.h, 11) % 16] END AS anliegen,
           2 + (get_byte(a.h, 4) + get_byte(a.h, 9)) % 7 AS n_msgs,
           p.base + ((g.j::bigint * 31536000) / p.n_leads + get_byte(a.h, 7) * 13) * interval '1 second'
               - (get_byte(a.h, 11) % 30) * interval '1 minute' - interval '10 minutes' AS started
    FROM generate_series(1, p.n_leads) AS g(j)
    CROSS JOIN LATERAL (SELECT decode(md5('lead:' || g.j), 'hex') AS h OFFSET 0) a
    OFFSET 0
) s
CROSS JOIN LATERAL generate_series(1, s.n_msgs) AS k(k);

SELECT setval(pg_get_serial_sequence('chat_messages', 'id'), coalesce(max(id), 0) + 1, false)
FROM chat_messages;

DROP TABLE carbot_gen;

ANALYZE workshops, customers, leads, chat_messages;
