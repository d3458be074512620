//! Parses an entry's `from:` clause: the driving table with its alias, then `JOIN ... ON ...` items.
//! Sync needs this structure (which alias reads which blue table, and through which condition), so
//! it is parsed here once; the condition text itself is passed to PostgreSQL verbatim and judged
//! there.

use crate::sql::scan::{self, Kind};
use crate::sql::{Expr, QName};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinKind {
    Inner,
    Left,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FromItem {
    pub table: QName,
    pub alias: String,
    /// `None` for the driving table (the first item).
    pub join: Option<(JoinKind, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FromClause {
    pub items: Vec<FromItem>,
}

impl FromClause {
    pub fn driving(&self) -> &FromItem {
        &self.items[0]
    }
    /// Every item's alias, in order.
    pub fn aliases(&self) -> Vec<&str> {
        self.items.iter().map(|i| i.alias.as_str()).collect()
    }
    pub fn item_by_alias(&self, alias: &str) -> Option<&FromItem> {
        self.items.iter().find(|i| i.alias == alias)
    }
    /// Render the clause with every table name through the renderer, the ON conditions
    /// parenthesised. `replace` swaps one alias's table for another relation (a sample, a set of
    /// changed rows).
    pub fn render_with(&self, replace: Option<(&str, &str)>) -> String {
        let mut out = String::new();
        for item in &self.items {
            let rel = match replace {
                Some((alias, rel)) if alias == item.alias => rel.to_string(),
                _ => item.table.to_string(),
            };
            let alias = crate::sql::Ident::new(&item.alias);
            match &item.join {
                None => out.push_str(&format!("{rel} AS {alias}")),
                Some((kind, on)) => {
                    let kw = match kind {
                        JoinKind::Inner => "JOIN",
                        JoinKind::Left => "LEFT JOIN",
                    };
                    out.push_str(&format!(" {kw} {rel} AS {alias} ON {}", Expr(on)));
                }
            }
        }
        out
    }
    pub fn render(&self) -> String {
        self.render_with(None)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Word { text: String, quoted: bool },
    Dot,
    Comma,
    Other,
}

/// Tokens with their byte offsets (through the one SQL lexer); parentheses nest, and only
/// depth-0 tokens are returned.
fn tokens(src: &str) -> Result<Vec<(usize, Tok)>, String> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    for t in scan::tokens(src).map_err(|e| format!("unterminated {}", e.what))? {
        let tok = match t.kind {
            Kind::Word => Tok::Word {
                text: t.text.to_string(),
                quoted: false,
            },
            Kind::QuotedIdent => Tok::Word {
                text: t.ident().unwrap_or_default(),
                quoted: true,
            },
            _ if t.is_punct("(") => {
                depth += 1;
                continue;
            }
            _ if t.is_punct(")") => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| "unbalanced `)`".to_string())?;
                continue;
            }
            _ if t.is_punct(".") => Tok::Dot,
            _ if t.is_punct(",") => Tok::Comma,
            _ => Tok::Other,
        };
        if depth == 0 {
            out.push((t.start, tok));
        }
    }
    if depth != 0 {
        return Err("unbalanced `(`".into());
    }
    Ok(out)
}

fn is_kw(t: &Tok, kw: &str) -> bool {
    matches!(t, Tok::Word { text, quoted: false } if text.eq_ignore_ascii_case(kw))
}

fn name_of(t: &Tok) -> Option<String> {
    match t {
        Tok::Word { text, quoted: true } => Some(text.clone()),
        // Unquoted identifiers fold to lower case, as PostgreSQL does.
        Tok::Word {
            text,
            quoted: false,
        } => Some(text.to_lowercase()),
        _ => None,
    }
}

const RESERVED: &[&str] = &[
    "join", "left", "right", "full", "inner", "outer", "cross", "on", "using", "natural", "where",
    "lateral",
];

/// Parse `schema.table alias [ [INNER|LEFT [OUTER]] JOIN schema.table alias ON cond ]*`.
/// Tables without a schema are taken from `default_schema` (the mapping's `blue`).
pub fn parse(src: &str, default_schema: &str) -> Result<FromClause, String> {
    let toks = tokens(src)?;
    let mut pos = 0;
    let mut items = Vec::new();
    let mut pending_join: Option<JoinKind> = None;
    loop {
        // table name
        let Some((_, t)) = toks.get(pos) else {
            return Err(if items.is_empty() {
                "empty `from`: name the driving table, for example `public.leads l`".into()
            } else {
                "a table name must follow JOIN".into()
            });
        };
        let first = name_of(t)
            .filter(|n| {
                !RESERVED.contains(&n.as_str()) || matches!(t, Tok::Word { quoted: true, .. })
            })
            .ok_or_else(|| "expected a table name".to_string())?;
        pos += 1;
        let table = if matches!(toks.get(pos), Some((_, Tok::Dot))) {
            let second = toks
                .get(pos + 1)
                .and_then(|(_, t)| name_of(t))
                .ok_or_else(|| format!("expected a table name after `{first}.`"))?;
            pos += 2;
            QName::new(first, second)
        } else {
            QName::new(default_schema, first)
        };
        if is_kw_at(&toks, pos, "as") {
            pos += 1;
        }
        let alias = match toks.get(pos) {
            Some((_, t @ Tok::Word { .. }))
                if !RESERVED.iter().any(|k| is_kw(t, k))
                    || matches!(t, Tok::Word { quoted: true, .. }) =>
            {
                pos += 1;
                name_of(t).unwrap()
            }
            _ => table.name.clone(),
        };
        if items.iter().any(|i: &FromItem| i.alias == alias) {
            return Err(format!(
                "alias `{alias}` is used twice: give each table its own alias"
            ));
        }
        let join = match pending_join.take() {
            None => None,
            Some(kind) => {
                if !is_kw_at(&toks, pos, "on") {
                    return Err(format!(
                        "JOIN {} needs an `ON` condition (USING and NATURAL are not supported)",
                        table.display()
                    ));
                }
                let cond_start = toks[pos].0 + 2;
                pos += 1;
                let mut end = pos;
                while end < toks.len() && !starts_join(&toks, end) {
                    end += 1;
                }
                let cond_end = toks.get(end).map(|(o, _)| *o).unwrap_or(src.len());
                let cond = src[cond_start..cond_end].trim();
                if cond.is_empty() {
                    return Err("empty ON condition".into());
                }
                pos = end;
                Some((kind, cond.to_string()))
            }
        };
        items.push(FromItem { table, alias, join });
        if pos >= toks.len() {
            break;
        }
        let (_, t) = &toks[pos];
        if matches!(t, Tok::Comma) {
            return Err("comma joins are not supported: write `JOIN <table> <alias> ON <condition>` so sync can follow the dependency".into());
        }
        let kind = if is_kw(t, "join") || is_kw(t, "inner") {
            JoinKind::Inner
        } else if is_kw(t, "left") {
            JoinKind::Left
        } else if is_kw(t, "right") || is_kw(t, "full") || is_kw(t, "cross") || is_kw(t, "natural")
        {
            return Err(format!(
                "{} joins are not supported: the driving table comes first, joined tables with JOIN or LEFT JOIN ... ON",
                word(t).to_uppercase()
            ));
        } else if is_kw(t, "where") {
            return Err("put the filter in the entry's `where:` key, not in `from`".into());
        } else {
            return Err(format!("unexpected `{}`: expected JOIN", word(t)));
        };
        // consume JOIN keywords
        while pos < toks.len()
            && ["inner", "left", "outer", "join"]
                .iter()
                .any(|k| is_kw(&toks[pos].1, k))
        {
            let is_join = is_kw(&toks[pos].1, "join");
            pos += 1;
            if is_join {
                break;
            }
        }
        pending_join = Some(kind);
    }
    Ok(FromClause { items })
}

fn word(t: &Tok) -> String {
    match t {
        Tok::Word { text, .. } => text.clone(),
        Tok::Dot => ".".into(),
        Tok::Comma => ",".into(),
        Tok::Other => "symbol".into(),
    }
}

fn is_kw_at(toks: &[(usize, Tok)], pos: usize, kw: &str) -> bool {
    toks.get(pos).is_some_and(|(_, t)| is_kw(t, kw))
}

fn starts_join(toks: &[(usize, Tok)], pos: usize) -> bool {
    let t = &toks[pos].1;
    is_kw(t, "join")
        || ((is_kw(t, "left") || is_kw(t, "inner") || is_kw(t, "right") || is_kw(t, "full"))
            && toks[pos + 1..]
                .iter()
                .take(2)
                .any(|(_, t)| is_kw(t, "join")))
        || matches!(t, Tok::Comma)
        || is_kw(t, "where")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(src: &str, expect: expect_test::Expect) {
        let got = match parse(src, "public") {
            Ok(fc) => fc
                .items
                .iter()
                .map(|i| match &i.join {
                    None => format!("{} {}", i.table.display(), i.alias),
                    Some((k, on)) => format!("{k:?} {} {} ON [{on}]", i.table.display(), i.alias),
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("error: {e}"),
        };
        expect.assert_eq(&got);
    }

    #[test]
    fn parses_from_clauses() {
        check("public.leads l", expect_test::expect!["public.leads l"]);
        check("leads", expect_test::expect!["public.leads leads"]);
        check(
            "public.customers c JOIN public.workshops w ON w.id = c.workshop_id",
            expect_test::expect![[r#"
                public.customers c
                Inner public.workshops w ON [w.id = c.workshop_id]"#]],
        );
        check(
            r#"track AS t LEFT OUTER JOIN "Genre" g ON (g.id = t.genre_id AND g.name <> 'join x') inner join album a on a.id = t.album_id"#,
            expect_test::expect![[r#"
                public.track t
                Left public.Genre g ON [(g.id = t.genre_id AND g.name <> 'join x')]
                Inner public.album a ON [a.id = t.album_id]"#]],
        );
        check("Leads L", expect_test::expect!["public.leads l"]);
        check(
            "public.customers c JOIN public.workshops w ON c.workshop_id = w.id — orphans dropped",
            expect_test::expect![[r#"
                public.customers c
                Inner public.workshops w ON [c.workshop_id = w.id — orphans dropped]"#]],
        );
    }

    #[test]
    fn rejects_what_sync_cannot_follow() {
        check(
            "a, b",
            expect_test::expect![
                "error: comma joins are not supported: write `JOIN <table> <alias> ON <condition>` so sync can follow the dependency"
            ],
        );
        check(
            "a x RIGHT JOIN b y ON x.id = y.id",
            expect_test::expect![
                "error: RIGHT joins are not supported: the driving table comes first, joined tables with JOIN or LEFT JOIN ... ON"
            ],
        );
        check(
            "a x JOIN b y USING (id)",
            expect_test::expect![
                "error: JOIN public.b needs an `ON` condition (USING and NATURAL are not supported)"
            ],
        );
        check(
            "a x JOIN b x ON true",
            expect_test::expect!["error: alias `x` is used twice: give each table its own alias"],
        );
        check(
            "",
            expect_test::expect![
                "error: empty `from`: name the driving table, for example `public.leads l`"
            ],
        );
        check(
            "a x WHERE x.y",
            expect_test::expect![
                "error: put the filter in the entry's `where:` key, not in `from`"
            ],
        );
    }
}
