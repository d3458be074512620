\set c random(1, 59)
\set n random(1, 1000000)
UPDATE public.customer SET company = 'Company ' || :n WHERE customer_id = :c;
