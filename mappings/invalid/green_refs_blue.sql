-- A green DDL with a foreign key into blue: creating it locks public.workshops against writes.
CREATE TABLE workshops (
    id uuid PRIMARY KEY REFERENCES public.workshops (id),
    organization_id uuid,
    name text NOT NULL
);
