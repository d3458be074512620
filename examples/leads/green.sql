-- The one-large-table benchmark (scripts/bench figures 8 and 9, mappings/leads.yaml): CarBot's
-- legacy leads (examples/carbot/legacy.sql, filled by examples/carbot/generate.sql) as one green
-- table with a primary key and three secondary indexes.
CREATE TYPE lead_status   AS ENUM ('new', 'contacted', 'qualified', 'won', 'lost');
CREATE TYPE lead_priority AS ENUM ('low', 'medium', 'high');

CREATE TABLE leads (
    id                 uuid PRIMARY KEY,
    workshop_id        uuid,
    first_name         text,
    last_name          text,
    email              text,
    phone              text,
    subject            text NOT NULL,
    vehicle_info       jsonb NOT NULL DEFAULT '{}',
    status             lead_status NOT NULL DEFAULT 'new',
    priority           lead_priority NOT NULL DEFAULT 'medium',
    lead_score         integer NOT NULL DEFAULT 50,
    chat_history       jsonb NOT NULL DEFAULT '[]',
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL
);

CREATE INDEX leads_workshop_id_created_at_idx ON leads (workshop_id, created_at);
CREATE INDEX leads_status_idx                 ON leads (status);
CREATE INDEX leads_email_idx                  ON leads (email);
