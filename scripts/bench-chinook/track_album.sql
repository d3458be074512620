\set t random(1, 3503)
\set al random(1, 347)
UPDATE public.track SET album_id = :al WHERE track_id = :t;
