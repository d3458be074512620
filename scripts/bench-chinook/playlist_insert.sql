\set p random(1, 18)
\set t random(1, 3503)
INSERT INTO public.playlist_track (playlist_id, track_id) VALUES (:p, :t) ON CONFLICT DO NOTHING;
