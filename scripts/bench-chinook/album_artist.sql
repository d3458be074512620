\set al random(1, 347)
\set a random(1, 275)
UPDATE public.album SET artist_id = :a WHERE album_id = :al;
