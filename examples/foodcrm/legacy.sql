-- Food CRM (seed 000): the legacy schema of a B2B food wholesaler's CRM, selling to restaurants in
-- Germany and Switzerland. Written as it grew: each restaurant row carries its three contacts as
-- column triples (CHEF / BUYER / GF = Geschäftsführer, managing director), the country is free
-- text, leads carry the sales rep's email as their owner and the season of the campaign they came
-- from, and a GDPR audit log records every access and erasure (it must arrive intact).
-- Run into the schema `public` of an empty database; examples/foodcrm/generate.sql fills it.

CREATE TABLE restaurants (
    id            serial PRIMARY KEY,
    name          text NOT NULL,
    street        text,
    zip           text,
    city          text,
    country       text NOT NULL,          -- 'DE', 'Deutschland', 'CH', 'Schweiz' (free text)
    chef_name     text,
    chef_email    text,
    chef_phone    text,
    buyer_name    text,
    buyer_email   text,
    buyer_phone   text,
    gf_name       text,
    gf_email      text,
    gf_phone      text,
    created_at    timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00'
);

-- The labels the old UI shows next to the contact column triples.
CREATE TABLE contact_roles (
    code   text PRIMARY KEY,                -- 'CHEF', 'BUYER', 'GF'
    label  text NOT NULL
);

CREATE TABLE leads (
    id             serial PRIMARY KEY,
    restaurant_id  integer NOT NULL REFERENCES restaurants (id) ON DELETE CASCADE,
    owner_email    text NOT NULL,           -- the sales rep who protects the lead
    stage          text NOT NULL,           -- 'neu', 'kontaktiert', 'muster', 'gewonnen', 'verloren'
    season         text,                    -- 'spargel', 'oktoberfest', 'weihnachten' or NULL
    sample_sent    date,
    value_net      numeric(10,2) NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00',
    updated_at     timestamptz
);
CREATE INDEX leads_restaurant_idx ON leads (restaurant_id);
-- Added before the migration, as `bluegreen plan` advised (season_totals is kept by season).
CREATE INDEX leads_season_idx ON leads (season);

CREATE TABLE gdpr_log (
    id             bigserial PRIMARY KEY,
    restaurant_id  integer,                 -- no foreign key: erasures outlive their restaurant
    action         text NOT NULL,           -- 'export', 'access', 'rectify', 'erase'
    actor          text NOT NULL,
    at             timestamptz NOT NULL,
    detail         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX gdpr_log_restaurant_idx ON gdpr_log (restaurant_id);
