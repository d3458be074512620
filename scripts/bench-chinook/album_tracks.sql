\set al random(1, 347)
UPDATE public.track SET milliseconds = milliseconds + 1000, unit_price = unit_price + 0.01 WHERE album_id = :al;
