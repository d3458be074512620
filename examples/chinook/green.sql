-- Green schema for the Chinook sample database (data/chinook.sql, MIT licence): shapes that
-- migrations meet, used by the scenario tests.
CREATE TABLE tracks (                -- 1:1 with casts and a LEFT JOIN lookup
    id          integer PRIMARY KEY,
    name        text NOT NULL,
    album_id    integer,
    genre       text,
    seconds     integer NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0)
);
CREATE TABLE artist_stats (          -- N:1 GROUP BY over a JOIN
    artist_id integer PRIMARY KEY,
    albums    integer NOT NULL,
    tracks    integer NOT NULL,
    total_ms  bigint NOT NULL
);
CREATE TABLE genre_counts (          -- N:1 on a nullable key: one row for the NULL genre
    genre_id integer,
    tracks   integer NOT NULL,
    CONSTRAINT genre_counts_genre_id_key UNIQUE NULLS NOT DISTINCT (genre_id)
);
CREATE TABLE playlist_entries (      -- composite key
    playlist_id integer NOT NULL,
    track_id    integer NOT NULL,
    PRIMARY KEY (playlist_id, track_id)
);
