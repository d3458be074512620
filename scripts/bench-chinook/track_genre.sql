\set t random(1, 3503)
\set g random(1, 25)
UPDATE public.track SET genre_id = CASE WHEN genre_id IS NULL THEN :g ELSE NULL END WHERE track_id = :t;
