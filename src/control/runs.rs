//! This migration's row in `runs`: its phase (saved before the work it announces, so an
//! interrupted command knows where it stopped), the blue fingerprint that detects DDL drift, and
//! the digest of the mapping it was prepared with.

use sqlx::{Connection, PgConnection};

use super::{Phase, exists, query, scalar, table};
use crate::diag::Diagnostic;
use crate::mapping::Mapping;
use crate::pg::db_error;
use crate::probe::resolve::Resolved;
use crate::sql::{Ident, sql};

/// The current phase: `new` when nothing was prepared; an error for a phase this version does
/// not know (a newer bluegreen wrote it), never a guess.
pub async fn phase(conn: &mut PgConnection, m: &Mapping) -> Result<Phase, Diagnostic> {
    if !exists(conn, m).await? {
        return Ok(Phase::New);
    }
    let Some(text) = field(conn, m, "phase").await? else {
        return Ok(Phase::New);
    };
    parse(m, &text)
}

fn parse(m: &Mapping, text: &str) -> Result<Phase, Diagnostic> {
    Phase::parse(text).ok_or_else(|| {
        Diagnostic::error(
            "unknown-phase",
            format!(
                "migration {} is in phase `{text}`, which this version of bluegreen does not know",
                m.migration
            ),
        )
        .hint("run the bluegreen version that wrote it (see `bluegreen status` events)")
    })
}

/// Move to phase `to`, refusing a transition `Phase::can_move_to` does not allow; already being
/// there is not a move (two copy processes both start copying). Takes the row lock, so two
/// commands never both make a move from the same phase.
pub async fn set_phase(conn: &mut PgConnection, m: &Mapping, to: Phase) -> Result<(), Diagnostic> {
    let now: Option<String> = scalar(
        m,
        "SELECT phase FROM {runs} WHERE migration = $1 FOR UPDATE",
    )
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    let from = match now {
        Some(t) => parse(m, &t)?,
        None => Phase::New,
    };
    if from == to {
        return Ok(());
    }
    if !from.can_move_to(to) {
        return Err(Diagnostic::error(
            "phase-transition",
            format!(
                "migration {} is in phase {from}: it cannot move to {to}",
                m.migration
            ),
        )
        .hint("see `bluegreen status` for where the migration stands"));
    }
    query(
        m,
        "UPDATE {runs} SET phase = $2, updated_at = now() WHERE migration = $1",
    )
    .bind(to.as_str())
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Create this migration's row (phase `new`), or refresh its mapping digest while still new.
pub async fn register(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    query(m, "INSERT INTO {runs} (migration, mapping_digest, phase, blue_schema, green_schema) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (migration) DO UPDATE SET mapping_digest = EXCLUDED.mapping_digest")
    .bind(m.digest())
    .bind(Phase::New.as_str())
    .bind(&m.blue)
    .bind(&m.green)
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// The mapping with its expressions as PostgreSQL resolved them at prepare (stored in `runs`, so
/// every later command runs exactly those texts); resolved now, and stored, for a migration
/// prepared before they were kept.
pub async fn resolved_mapping(conn: &mut PgConnection, m: &Mapping) -> Result<Mapping, Diagnostic> {
    if m.resolved {
        return Ok(m.clone());
    }
    let stored = if exists(conn, m).await? {
        field(conn, m, "resolved").await?
    } else {
        None
    };
    let r = match stored.and_then(|t| serde_json::from_str::<Resolved>(&t).ok()) {
        Some(r) => r,
        None => {
            let r = crate::probe::resolve::resolve(conn, m).await?;
            store_resolved(conn, m, &r).await?;
            r
        }
    };
    Ok(crate::probe::resolve::apply(m, &r))
}

/// Keep the resolved expressions with the run (a no-op before the run's row exists).
pub async fn store_resolved(
    conn: &mut PgConnection,
    m: &Mapping,
    r: &Resolved,
) -> Result<(), Diagnostic> {
    if !exists(conn, m).await? {
        return Ok(());
    }
    query(
        m,
        "UPDATE {runs} SET resolved = $2::jsonb WHERE migration = $1",
    )
    .bind(serde_json::to_string(r).expect("serialises"))
    .execute(conn)
    .await
    .map_err(db_error)?;
    Ok(())
}

/// Record the blue fingerprint and move to `prepared`.
pub async fn mark_prepared(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    let fp = blue_fingerprint(conn, m).await?;
    query(
        m,
        "UPDATE {runs} SET blue_fingerprint = $2 WHERE migration = $1",
    )
    .bind(fp)
    .execute(&mut *conn)
    .await
    .map_err(db_error)?;
    set_phase(conn, m, Phase::Prepared).await
}

/// One text column of this migration's row (None when there is no row or it is NULL).
async fn field(
    conn: &mut PgConnection,
    m: &Mapping,
    column: &str,
) -> Result<Option<String>, Diagnostic> {
    let v: Option<Option<String>> = sqlx::query_scalar(
        sql!(
            "SELECT {}::text FROM {} WHERE migration = $1",
            Ident::new(column),
            table(m, "runs")
        )
        .assert_safe(),
    )
    .bind(&m.migration)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db_error)?;
    Ok(v.flatten())
}

/// What sync depends on in blue, one line each: the columns, types and collations of every blue
/// table the mapping reads, their unique indexes (the live trigger pairs an update's rows by one:
/// dropping it is drift, H4-5), their partitions and inheritance children (attaching or detaching
/// one is drift),
/// and this migration's capture triggers on each with their state and function (a trigger
/// disabled, dropped or pointed elsewhere is drift: sync would be bypassed).
pub async fn blue_fingerprint(conn: &mut PgConnection, m: &Mapping) -> Result<String, Diagnostic> {
    let names: Vec<String> = m.blue_tables_read().iter().map(|q| q.to_string()).collect();
    let triggers: Vec<String> = crate::names::EVENTS
        .iter()
        .map(|(ev, _)| crate::names::sync_trigger(&m.migration, ev))
        .collect();
    // Under search_path = pg_catalog every name prints schema-qualified, whatever the session's
    // search_path (the fingerprint must not depend on who computes it, or where).
    // (Inside a caller's transaction `begin` is a savepoint: the setting is put back by hand.)
    let mut tx = conn.begin().await.map_err(db_error)?;
    let old: String = sqlx::query_scalar(
        "SELECT pg_catalog.current_setting('search_path'), pg_catalog.set_config('search_path', 'pg_catalog', true)",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    let text: Option<String> = sqlx::query_scalar(
        "WITH RECURSIVE t(oid) AS (
             SELECT to_regclass(n)::oid FROM pg_catalog.unnest($1::text[]) n
             UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN t ON i.inhparent = t.oid
         ), lines(l) AS (
             SELECT pg_catalog.format('%s.%s %s %s collate %s', a.attrelid::regclass, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attcollation::regcollation)
             FROM pg_catalog.pg_attribute a WHERE a.attrelid IN (SELECT oid FROM t) AND a.attnum > 0 AND NOT a.attisdropped
             UNION ALL
             SELECT pg_catalog.format('unique index on %s valid %s immediate %s: %s', x.indrelid::regclass, x.indisvalid, x.indimmediate, pg_catalog.pg_get_indexdef(x.indexrelid))
             FROM pg_catalog.pg_index x WHERE x.indrelid IN (SELECT oid FROM t) AND x.indisunique
             UNION ALL
             SELECT pg_catalog.format('child %s of %s', i.inhrelid::regclass, i.inhparent::regclass)
             FROM pg_catalog.pg_inherits i WHERE i.inhparent IN (SELECT oid FROM t)
             UNION ALL
             SELECT pg_catalog.format('trigger %s on %s enabled %s calls %s', g.tgname, g.tgrelid::regclass, g.tgenabled, g.tgfoid::regprocedure)
             FROM pg_catalog.pg_trigger g WHERE g.tgrelid IN (SELECT oid FROM t) AND g.tgname = ANY ($2)
         )
         SELECT pg_catalog.string_agg(l, E'\\n' ORDER BY l) FROM lines",
    )
    .bind(&names)
    .bind(&triggers)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    sqlx::query("SELECT pg_catalog.set_config('search_path', $1, true)")
        .bind(&old)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(text.unwrap_or_default())
}

/// Refuse to go on when a blue table's columns or types changed since `prepare`.
pub async fn check_drift(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    let Some(saved) = field(conn, m, "blue_fingerprint").await? else {
        return Ok(());
    };
    let now = blue_fingerprint(conn, m).await?;
    if saved == now {
        return Ok(());
    }
    let before: Vec<&str> = saved.lines().collect();
    let after: Vec<&str> = now.lines().collect();
    let mut changes: Vec<String> = before
        .iter()
        .filter(|l| !after.contains(l))
        .map(|l| format!("- {l}"))
        .collect();
    changes.extend(
        after
            .iter()
            .filter(|l| !before.contains(l))
            .map(|l| format!("+ {l}")),
    );
    Err(Diagnostic::error(
        "ddl-drift",
        format!("blue changed since prepare (columns, types, partitions or capture triggers):\n  {}", changes.join("\n  ")),
    )
    .hint("DDL on blue during a migration is not followed, and a disabled or dropped capture trigger bypasses sync: revert the change (ALTER TABLE ... ENABLE ALWAYS TRIGGER), or finalize this migration and plan a new one"))
}

/// Refuse a mapping whose text changed since `prepare`.
pub async fn check_mapping(conn: &mut PgConnection, m: &Mapping) -> Result<(), Diagnostic> {
    match field(conn, m, "mapping_digest").await? {
        Some(d) if d != m.digest() => Err(Diagnostic::error(
            "mapping-changed",
            format!(
                "{} changed since prepare (blake3 {} then, {} now)",
                m.path.display(),
                &d[..16],
                &m.digest()[..16]
            ),
        )
        .hint(
            "run with the mapping that was prepared; a changed mapping needs a new migration name",
        )),
        _ => Ok(()),
    }
}
