\set id random(100000, 1100000)
DELETE FROM public.track WHERE track_id = (SELECT track_id FROM public.track WHERE track_id >= :id ORDER BY track_id LIMIT 1);
