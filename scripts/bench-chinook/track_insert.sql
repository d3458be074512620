\set id random(100000, 1100000)
\set al random(1, 347)
\set g random(1, 25)
INSERT INTO public.track (track_id, name, album_id, media_type_id, genre_id, milliseconds, unit_price) VALUES (:id, 'New ' || :id, :al, 1, :g, 200000 + :id % 100000, 0.99) ON CONFLICT DO NOTHING;
