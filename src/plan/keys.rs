//! The keys of an entry: its sync key (given, or the green primary key), the green key upserts
//! conflict on, what copy ranges over, and whether an expression is a plain (or cast) column of
//! an alias. Pure; every later step asks these functions, so they agree.

use serde::Serialize;

use crate::catalog;
use crate::mapping::TableEntry;
use crate::sql::Ident;
use crate::sql::scan::{self, Kind};

/// The sync key of an entry, as (green column, expression), and where it came from: given in the
/// mapping, or the green primary key when each of its columns is mapped plainly.
pub fn sync_key(
    entry: &TableEntry,
    green: &catalog::Table,
) -> Option<(Vec<(String, String)>, &'static str)> {
    if let Some(sk) = &entry.sync_key {
        return Some((
            sk.iter()
                .map(|(c, e)| (c.clone(), e.text.clone()))
                .collect(),
            "mapping",
        ));
    }
    let pk = green.primary_key.as_ref()?;
    let cols: Option<Vec<(String, String)>> = pk
        .columns
        .iter()
        .map(|c| {
            entry
                .column(c)
                .filter(|col| col.value_map.is_none())
                .map(|col| (c.clone(), col.expr.text.clone()))
        })
        .collect();
    cols.map(|c| (c, "primary key"))
}

/// The green key an upsert conflicts on: the primary key or the first other arbiter key
/// (`catalog::Table::arbiter_keys`: never a nullable plain UNIQUE) whose columns are all mapped.
pub fn upsert_key(e: &TableEntry, gt: &catalog::Table) -> Option<Vec<String>> {
    gt.arbiter_keys()
        .into_iter()
        .find(|k| k.iter().all(|c| e.column(c).is_some()))
}

/// Whether every value of type `blue` becomes a distinct value of type `green` that casts back
/// to itself (types as `format_type` prints them): the same type, or a widening one (`integer`
/// to `bigint`, `character varying(n)` to a longer one or to `text`, `numeric(p,s)` to more
/// precision at the same scale or to plain `numeric`). Keys that only widen stay row-local, and
/// blue is looked up by the key cast back to blue's type, so blue's own index serves it.
pub fn widening(blue: &str, green: &str) -> bool {
    if blue == green {
        return true;
    }
    let ints = ["smallint", "integer", "bigint"];
    let rank = |t: &str| ints.iter().position(|i| *i == t);
    if let (Some(b), Some(g)) = (rank(blue), rank(green)) {
        return b < g;
    }
    if rank(blue).is_some() && green == "numeric" {
        return true;
    }
    let varchar = "character varying";
    if blue.starts_with(varchar) && (green == "text" || green == varchar) {
        return true;
    }
    if let (Some(b), Some(g)) = (modifier(blue, varchar), modifier(green, varchar)) {
        return b[0] <= g[0];
    }
    if blue.starts_with("numeric") && green == "numeric" {
        return true;
    }
    if let (Some(b), Some(g)) = (modifier(blue, "numeric"), modifier(green, "numeric")) {
        // numeric(p,s): the integer digits p - s and the scale both fit.
        let (bs, gs) = (
            b.get(1).copied().unwrap_or(0),
            g.get(1).copied().unwrap_or(0),
        );
        return bs == gs && b[0] <= g[0];
    }
    false
}

/// `numeric(10,2)` -> `[10, 2]`, `character varying(20)` -> `[20]` (types as `format_type`
/// prints them); None for another base type or no modifier.
fn modifier(t: &str, base: &str) -> Option<Vec<i64>> {
    let inner = t.strip_prefix(base)?.strip_prefix('(')?.strip_suffix(')')?;
    inner.split(',').map(|n| n.trim().parse().ok()).collect()
}

/// The SQL of `text` (a key as green renders it, of type `green`) as a value of `blue`, a type
/// that widens to `green`: NULL where `blue` cannot hold it exactly. Keys read from green (by
/// validate's re-check, or a re-derive after a TRUNCATE) may be values no blue row holds, and
/// the plain cast would raise (2^40 as `integer`) or change them (`character varying(3)`
/// truncates, `numeric(10,2)` rounds) and so find another row.
pub fn narrow_back(text: &str, green: &str, blue: &str) -> String {
    let cast = format!("{text}::{blue}");
    if blue == green {
        return cast;
    }
    let num = format!("{text}::pg_catalog.numeric");
    let range = [
        ("smallint", "-32768", "32767"),
        ("integer", "-2147483648", "2147483647"),
        ("bigint", "-9223372036854775808", "9223372036854775807"),
    ];
    let guard = if let Some((_, lo, hi)) = range.iter().find(|(t, _, _)| *t == blue) {
        Some(format!(
            "{num} BETWEEN {lo} AND {hi} AND {num} = pg_catalog.trunc({num})"
        ))
    } else if let Some([n]) = modifier(blue, "character varying").as_deref() {
        Some(format!("pg_catalog.length({text}) <= {n}"))
    } else if let Some([p, s]) = modifier(blue, "numeric").as_deref() {
        Some(format!(
            "{text} = 'NaN' OR ({num} = pg_catalog.round({num}, {s}) AND pg_catalog.abs({num}) < 1e{})",
            p - s
        ))
    } else {
        None
    };
    match guard {
        Some(g) => format!("CASE WHEN {g} THEN {cast} END"),
        None => cast,
    }
}

/// The blue column of `alias` a key expression reads, when the expression is that column alone
/// or cast to a type it widens to: (column, blue type). Lookups of blue by such a key compare the
/// column itself, so an index on it serves them.
pub fn key_column(
    expr: &str,
    alias: &str,
    blue: &catalog::Table,
    green_type: &str,
) -> Option<(String, String)> {
    // Only a cast to green's own type: `numeric(10,0)` into green's `numeric` rounds, and a
    // rounded key looked up by blue's column finds no row.
    let col = plain_column_of(expr, alias).or_else(|| cast_to(expr, alias, green_type))?;
    let bc = blue.column(&col)?;
    widening(&bc.type_sql, green_type).then(|| (col, bc.type_sql.clone()))
}

/// `alias.column` (either part optionally double-quoted, the whole optionally parenthesised, as
/// PostgreSQL deparses it) as a plain reference to a column of `alias`; returns the column's name.
pub fn plain_column_of(expr: &str, alias: &str) -> Option<String> {
    let t = expr.trim();
    let t = t
        .strip_prefix('(')
        .and_then(|x| x.strip_suffix(')'))
        .unwrap_or(t);
    scan::qualified_column(t)
        .filter(|(a, _)| a == alias)
        .map(|(_, c)| c)
}

/// `alias.column::type` (or `CAST`) where the cast is to exactly `green_type` (as `format_type`
/// prints it; `int8`, `int4`, `int`, `int2` read as their standard names): the column's name. A
/// cast to another type may narrow (`numeric(10,0)` rounds), so its order is not the column's.
pub fn cast_to(expr: &str, alias: &str, green_type: &str) -> Option<String> {
    let col = cast_of(expr, alias)?;
    let toks = scan::tokens(expr).ok()?;
    let ty: Vec<&str> = match toks
        .iter()
        .position(|t| t.is_punct("::") || t.is_word("as"))
    {
        Some(i) if toks[i].is_word("as") => &toks[i + 1..toks.len() - 1],
        Some(i) => &toks[i + 1..],
        None => return None,
    }
    .iter()
    .map(|t| t.text)
    .collect();
    // As format_type prints it: a space between words only (`character varying(40)`).
    let mut joined = String::new();
    for (i, t) in ty.iter().enumerate() {
        let word = |t: &str| t.chars().all(|c| c.is_alphanumeric() || c == '_');
        if i > 0 && word(t) && (word(ty[i - 1]) || ty[i - 1] == ")") {
            joined.push(' ');
        }
        joined.push_str(t);
    }
    let ty = joined.to_ascii_lowercase();
    let ty = match ty.as_str() {
        "int8" => "bigint",
        "int4" | "int" => "integer",
        "int2" => "smallint",
        other => other,
    };
    (ty == green_type).then_some(col)
}

/// The green columns of `e` computed from blue: neither a plain copy nor a cast of a column of
/// the driving table (a value map counts as computed).
pub fn computed_columns(e: &crate::mapping::TableEntry) -> Vec<&str> {
    let d = &e.from_clause.driving().alias;
    e.columns
        .iter()
        .filter(|c| {
            c.value_map.is_some()
                || (plain_column_of(&c.expr.text, d).is_none()
                    && cast_of(&c.expr.text, d).is_none())
        })
        .map(|c| c.name.as_str())
        .collect()
}

/// `alias.column::type` or `CAST(alias.column AS type)`: a column of `alias` read through a
/// cast; returns the column's name.
pub fn cast_of(expr: &str, alias: &str) -> Option<String> {
    let toks = scan::tokens(expr).ok()?;
    let is_type = is_type_name;
    let column = |t: &[scan::Token]| match t {
        [a, dot, c] if dot.is_punct(".") && a.ident()? == alias => c.ident(),
        _ => None,
    };
    match toks.as_slice() {
        [a, dot, c, cast, ty @ ..] if cast.is_punct("::") && is_type(ty) => column(&[*a, *dot, *c]),
        // `(a.c)::type`, as PostgreSQL deparses a cast.
        [open, a, dot, c, close, cast, ty @ ..]
            if open.is_punct("(") && close.is_punct(")") && cast.is_punct("::") && is_type(ty) =>
        {
            column(&[*a, *dot, *c])
        }
        [kw, open, a, dot, c, as_, ty @ .., close]
            if kw.is_word("cast")
                && open.is_punct("(")
                && as_.is_word("as")
                && close.is_punct(")")
                && is_type(ty) =>
        {
            column(&[*a, *dot, *c])
        }
        _ => None,
    }
}

/// Words of PostgreSQL's multi-word type names (`double precision`, `character varying`,
/// `timestamp with time zone`, ...): only these may follow another word in a type.
const TYPE_WORDS: &[&str] = &[
    "double",
    "precision",
    "character",
    "char",
    "varying",
    "national",
    "bit",
    "time",
    "timestamp",
    "with",
    "without",
    "zone",
];

/// A type name and nothing else: `name`, `schema.name`, a multi-word built-in type, then at most
/// one `(n)` or `(n, m)` modifier, then `[]` pairs.
fn is_type_name(t: &[scan::Token]) -> bool {
    let word = |x: &scan::Token| matches!(x.kind, Kind::Word | Kind::QuotedIdent);
    if !t.first().is_some_and(word) {
        return false;
    }
    let mut k = 1;
    if t.get(k).is_some_and(|x| x.is_punct(".")) {
        if !t.get(k + 1).is_some_and(word) {
            return false;
        }
        k += 2;
    } else {
        let multi = |x: &scan::Token| {
            x.kind == Kind::Word && TYPE_WORDS.contains(&x.text.to_ascii_lowercase().as_str())
        };
        if multi(&t[0]) {
            while t.get(k).is_some_and(multi) {
                k += 1;
            }
        }
    }
    if t.get(k).is_some_and(|x| x.is_punct("(")) {
        match &t[k..] {
            [_, n, close, ..] if n.kind == Kind::Number && close.is_punct(")") => k += 3,
            [_, n, comma, m, close, ..]
                if n.kind == Kind::Number
                    && comma.is_punct(",")
                    && m.kind == Kind::Number
                    && close.is_punct(")") =>
            {
                k += 5
            }
            _ => return false,
        }
    }
    while t.get(k).is_some_and(|x| x.is_punct("[")) && t.get(k + 1).is_some_and(|x| x.is_punct("]"))
    {
        k += 2;
    }
    k == t.len()
}

/// What copy ranges over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkKey {
    /// An expression over the entry's `from` (a driving column, or the group key).
    Expr(String),
    /// Physical page ranges of the driving table (no usable key).
    Physical,
}

impl ChunkKey {
    pub fn describe(&self) -> &str {
        match self {
            ChunkKey::Expr(x) => x,
            ChunkKey::Physical => "ctid (physical ranges)",
        }
    }
}

impl Serialize for ChunkKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.describe())
    }
}

/// The first sync-key expression when it is a plain driving column or the entry groups (groups
/// must never be split across chunks); else the driving primary key; else physical ranges. A
/// group key that is a driving column widened (`(c.parent_id)::bigint`) is chunked on the column
/// itself: the cast keeps every value distinct and in order, so no group is split, and blue's
/// index on the column serves each chunk's range (on the cast, every chunk read the whole table).
pub fn chunk_key(
    e: &TableEntry,
    bt: &catalog::Table,
    gt: &catalog::Table,
    sync: &[(String, String)],
) -> ChunkKey {
    let alias = &e.from_clause.driving().alias;
    if let Some((green_col, first)) = sync.first()
        && (!e.group_by.is_empty() || plain_column_of(first, alias).is_some())
    {
        let widened = gt
            .column(green_col)
            .and_then(|c| key_column(first, alias, bt, &c.type_sql));
        return match widened {
            Some((col, _)) if !e.group_by.is_empty() => {
                ChunkKey::Expr(format!("{}.{}", Ident::new(alias), Ident::new(&col)))
            }
            _ => ChunkKey::Expr(first.clone()),
        };
    }
    match &bt.primary_key {
        Some(pk) => ChunkKey::Expr(format!(
            "{}.{}",
            Ident::new(alias),
            Ident::new(&pk.columns[0])
        )),
        None => ChunkKey::Physical,
    }
}

/// The green unique key copy can leave out until the data is in (`prepare` drops it, `copy`
/// builds it after, beside the other indexes, and attaches it as the constraint): the table's
/// only unique index (no exclusion constraint), a PRIMARY KEY or UNIQUE constraint (immediate,
/// plain columns, no INCLUDE, NULLs distinct) whose first column copy's chunks partition: the
/// chunk key is that column's expression, or the blue column it is or widens. Then no two
/// chunks can produce one key value, even where rows change between their snapshots, so the
/// copy needs no arbiter (maintaining a random uuid key row by row cost more than the insert
/// itself: BENCHMARKS.md); a mapping that produces a key twice fails the build after the copy.
pub fn bare_copy_key<'a>(
    e: &TableEntry,
    bt: &catalog::Table,
    gt: &'a catalog::Table,
) -> Option<&'a catalog::Index> {
    if gt.partitioned || gt.inherited || !gt.exclusions.is_empty() {
        return None;
    }
    let mut unique = gt.indexes.iter().filter(|i| i.unique);
    let ix = unique.next()?;
    if unique.next().is_some()
        || !ix.backs_constraint
        || !ix.valid
        || !ix.immediate
        || ix.partial
        || ix.nulls_not_distinct
        || scan::tokens(&ix.definition)
            .ok()?
            .iter()
            .any(|t| t.is_word("include"))
    {
        return None;
    }
    let first = ix.columns.first()?.as_deref()?;
    if ix.columns.iter().any(Option::is_none) {
        return None;
    }
    let col = e.column(first).filter(|c| c.value_map.is_none())?;
    let expr = &col.expr.text;
    let sync = sync_key(e, gt).map(|(k, _)| k).unwrap_or_default();
    let ChunkKey::Expr(chunked) = chunk_key(e, bt, gt, &sync) else {
        return None;
    };
    // The key's first column must be a blue column the chunks range over, alone or widened,
    // with blue's collation: one green value per blue value, equal where blue's are. A computed
    // key, an assignment that rounds (numeric(10,2) into integer: 25.70 and 26.20 are two
    // chunks' rows and one key) or a nondeterministic collation on one side (`a` and `A` in two
    // chunks, one key in green) can put one key value in two chunks.
    let alias = &e.from_clause.driving().alias;
    let gc = gt.column(first)?;
    let (bc, _) = key_column(expr, alias, bt, &gc.type_sql)?;
    let same_collation = bt.column(&bc).map(|c| &c.collation) == Some(&gc.collation);
    let ranges_over_it =
        chunked == *expr || chunked == format!("{}.{}", Ident::new(alias), Ident::new(&bc));
    (same_collation && ranges_over_it).then_some(ix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_cast_columns() {
        assert_eq!(plain_column_of("l.id", "l").as_deref(), Some("id"));
        assert_eq!(
            plain_column_of(" l.\"Name\" ", "l").as_deref(),
            Some("Name")
        );
        assert_eq!(plain_column_of("L.ID", "l").as_deref(), Some("id"));
        assert_eq!(plain_column_of("w.id", "l"), None);
        assert_eq!(plain_column_of("l.id + 1", "l"), None);
        assert_eq!(cast_of("l.id::bigint", "l").as_deref(), Some("id"));
        assert_eq!(
            cast_to("(l.id)::int8", "l", "bigint").as_deref(),
            Some("id")
        );
        assert_eq!(
            cast_to("CAST(l.id AS bigint)", "l", "bigint").as_deref(),
            Some("id")
        );
        assert_eq!(cast_to("l.amt::numeric(10,0)", "l", "numeric"), None);
        assert_eq!(cast_to("l.id::bigint", "l", "integer"), None);
        // Written as format_type prints the type, whatever the spacing.
        assert_eq!(
            cast_to(
                "(l.code)::character varying ( 40 )",
                "l",
                "character varying(40)"
            )
            .as_deref(),
            Some("code")
        );
        assert_eq!(
            cast_to("l.price::numeric(12, 2)", "l", "numeric(12,2)").as_deref(),
            Some("price")
        );
        assert_eq!(
            cast_to(
                "CAST(l.at AS timestamp with time zone)",
                "l",
                "timestamp with time zone"
            )
            .as_deref(),
            Some("at")
        );
        assert_eq!(
            cast_of("l.price::numeric(10, 2)", "l").as_deref(),
            Some("price")
        );
        assert_eq!(
            cast_of("CAST(l.at AS timestamp with time zone)", "l").as_deref(),
            Some("at")
        );
        assert_eq!(cast_of("l.tags::text[]", "l").as_deref(), Some("tags"));
        assert_eq!(cast_of("l.id::bigint + 1", "l"), None);
        assert_eq!(cast_of("(l.id)::bigint", "l").as_deref(), Some("id"));
        assert_eq!(cast_of("l.id", "l"), None);
        assert_eq!(cast_of("l.id::INT", "l").as_deref(), Some("id"));
        assert_eq!(cast_of("l.v::public.citext", "l").as_deref(), Some("v"));
        assert_eq!(cast_of("CAST(l.x AS int) IN (1)", "l"), None);
        assert_eq!(cast_of("l.flag::int IS NOT NULL", "l"), None);
        assert_eq!(cast_of("l.x::text COLLATE \"C\"", "l"), None);
        assert_eq!(
            cast_of("l.x::character varying(20)", "l").as_deref(),
            Some("x")
        );
        assert_eq!(cast_of("(l.aid)::bigint", "l").as_deref(), Some("aid"));
        assert_eq!(plain_column_of("(l.aid)", "l").as_deref(), Some("aid"));
    }

    #[test]
    fn widening_types_keep_every_value() {
        for (b, g) in [
            ("integer", "bigint"),
            ("smallint", "integer"),
            ("integer", "numeric"),
            ("character varying(20)", "text"),
            ("character varying(20)", "character varying(40)"),
            ("numeric(10,2)", "numeric(12,2)"),
            ("numeric(10,2)", "numeric"),
            ("uuid", "uuid"),
        ] {
            assert!(widening(b, g), "{b} -> {g}");
        }
        for (b, g) in [
            ("bigint", "integer"),
            ("text", "character varying(20)"),
            ("numeric(10,2)", "numeric(12,3)"),
            ("integer", "text"),
            ("timestamp without time zone", "date"),
        ] {
            assert!(!widening(b, g), "{b} -> {g}");
        }
    }
}
