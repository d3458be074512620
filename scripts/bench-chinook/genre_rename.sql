\set g random(1, 25)
\set n random(1, 1000000)
UPDATE public.genre SET name = 'Genre ' || :n WHERE genre_id = :g;
