\set p random(1, 18)
\set t random(1, 3503)
DELETE FROM public.playlist_track WHERE playlist_id = :p AND track_id = :t;
