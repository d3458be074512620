//! The `search_path` flip of cutover and its exact undo at rollback. Pure.
//!
//! What is recorded is each setting exactly as `pg_db_role_setting` stores it (the text after
//! `search_path=`), for every target the flip alters: the database (`ALTER DATABASE ... SET`) and
//! each role that needs its own in-database setting (`ALTER ROLE ... IN DATABASE ... SET`): the
//! roles given with `--role`, and every role whose own setting (in this database, or for all
//! databases) would override the database's. Rollback sets each back from the recorded text, or
//! resets it where there was none, and the engine compares what the catalog then holds with the
//! record, byte for byte, before it commits.
//!
//! PostgreSQL stores a list setting element by element through `quote_identifier`, joined by
//! `", "`; an element given as a string literal is stored the same way. So the recorded text is
//! split quote-aware into its elements (`"a, b"` is one schema, `"$user"` one element), and each
//! is passed back as a literal: stored again, it is the same text.

use serde::{Deserialize, Serialize};

use crate::sql::{Ident, Literal, Sql, join, sql};

/// One setting the flip alters, as it was before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Previous {
    /// None: the database's own setting; Some: this role's setting in this database.
    pub role: Option<String>,
    /// The stored text after `search_path=`; None when there was no such setting.
    pub value: Option<String>,
}

/// A role's settings as `pg_db_role_setting` holds them, for choosing what the flip sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// None: every role (`ALTER DATABASE` when `in_database`, `ALTER ROLE ALL` otherwise).
    pub role: Option<String>,
    /// Set for this database (else for every database).
    pub in_database: bool,
    pub value: String,
}

/// The elements of a stored list setting (`SplitIdentifierString`'s rules: commas between
/// elements, double quotes around one that needs them, `""` inside quotes for a quote, blanks
/// around an element ignored, an unquoted element folded to lower case).
pub fn parse_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = value.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut item = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        item.push('"');
                    } else {
                        break;
                    }
                } else {
                    item.push(c);
                }
            }
            while chars.peek().is_some_and(|c| *c != ',') {
                chars.next();
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                item.push(c);
                chars.next();
            }
            item = item.trim_end().to_lowercase();
        }
        out.push(item);
        if chars.next().is_none() {
            break;
        }
    }
    out
}

/// The right-hand side of `SET search_path = ...` that stores exactly these elements.
fn list_sql(elements: &[String]) -> String {
    if elements.is_empty() {
        // An empty list is stored as `""`: one empty element.
        return "''".to_string();
    }
    join(elements.iter().map(Literal::new), ", ")
}

/// The green-first path for a previous one: green, then the previous elements without it.
pub fn green_first(green: &str, previous: &[String]) -> Vec<String> {
    let mut out = vec![green.to_string()];
    out.extend(previous.iter().filter(|e| *e != green).cloned());
    out
}

/// PostgreSQL's built-in default, when nothing else sets the path.
pub const DEFAULT_PATH: &str = "\"$user\", public";

/// What the flip records and sets: per target, the previous stored value and the new elements.
/// `stored`: the `search_path` rows of `pg_db_role_setting` that apply in this database;
/// `roles`: the roles given with `--role`; `server`: the server's own setting (configuration
/// file, `ALTER SYSTEM`), the path of sessions nothing else sets it for. A role whose own path
/// does not name `blue` is left alone unless given: it does not read the application's tables
/// unqualified, and green first could shadow what it does read.
pub fn flip_targets(
    green: &str,
    blue: &str,
    stored: &[Stored],
    roles: &[String],
    server: &str,
) -> Vec<(Previous, Vec<String>)> {
    let db = stored
        .iter()
        .find(|s| s.role.is_none() && s.in_database)
        .map(|s| s.value.clone());
    let all = stored
        .iter()
        .find(|s| s.role.is_none() && !s.in_database)
        .map(|s| s.value.clone());
    let base = db.clone().or(all).unwrap_or_else(|| server.to_string());
    let mut out = vec![(
        Previous {
            role: None,
            value: db,
        },
        green_first(green, &parse_list(&base)),
    )];
    let mut names: Vec<String> = stored.iter().filter_map(|s| s.role.clone()).collect();
    names.extend(roles.iter().cloned());
    names.sort();
    names.dedup();
    for r in names {
        let mine = |in_db: bool| {
            stored
                .iter()
                .find(|s| s.role.as_deref() == Some(r.as_str()) && s.in_database == in_db)
                .map(|s| s.value.clone())
        };
        let in_db = mine(true);
        let effective = in_db
            .clone()
            .or(mine(false))
            .unwrap_or_else(|| base.clone());
        if !roles.contains(&r) && !parse_list(&effective).iter().any(|e| e == blue) {
            continue;
        }
        out.push((
            Previous {
                role: Some(r),
                value: in_db,
            },
            green_first(green, &parse_list(&effective)),
        ));
    }
    out
}

fn target(database: &str, role: Option<&str>) -> String {
    match role {
        None => format!("ALTER DATABASE {}", Ident::new(database)),
        Some(r) => format!(
            "ALTER ROLE {} IN DATABASE {}",
            Ident::new(r),
            Ident::new(database)
        ),
    }
}

/// `ALTER ... SET search_path` to these elements.
pub fn set_statement(database: &str, role: Option<&str>, elements: &[String]) -> Sql {
    sql!(
        "{} SET search_path = {}",
        target(database, role),
        list_sql(elements)
    )
}

/// The statement putting one recorded setting back.
pub fn restore_statement(database: &str, p: &Previous) -> Sql {
    match &p.value {
        Some(v) => set_statement(database, p.role.as_deref(), &parse_list(v)),
        None => sql!("{} RESET search_path", target(database, p.role.as_deref())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_quote_aware() {
        assert_eq!(parse_list("\"$user\", public"), vec!["$user", "public"]);
        assert_eq!(parse_list("\"a, b\", public"), vec!["a, b", "public"]);
        assert_eq!(
            parse_list("\"\"\"$user\"\", public\""),
            vec!["\"$user\", public"]
        );
        assert_eq!(parse_list("\"\""), vec![""]);
        assert_eq!(parse_list(""), Vec::<String>::new());
        assert_eq!(parse_list("Abc ,  x"), vec!["abc", "x"]);
    }

    #[test]
    fn the_flip_puts_green_first_and_covers_overriding_roles() {
        let stored = vec![
            Stored {
                role: None,
                in_database: true,
                value: "app, public".into(),
            },
            Stored {
                role: Some("worker".into()),
                in_database: false,
                value: "\"a, b\"".into(),
            },
        ];
        let t = flip_targets("green", "a, b", &stored, &["web".into()], DEFAULT_PATH);
        assert_eq!(t.len(), 3);
        // A role whose own path never named blue is left alone.
        assert_eq!(
            flip_targets("green", "app", &stored, &[], DEFAULT_PATH).len(),
            1
        );
        assert_eq!(t[0].0.value.as_deref(), Some("app, public"));
        assert_eq!(t[0].1, vec!["green", "app", "public"]);
        assert_eq!(t[1].0.role.as_deref(), Some("web"));
        assert_eq!(t[1].0.value, None);
        assert_eq!(t[1].1, vec!["green", "app", "public"]);
        assert_eq!(t[2].0.role.as_deref(), Some("worker"));
        assert_eq!(t[2].1, vec!["green", "a, b"]);
        assert_eq!(
            set_statement("d", Some("worker"), &t[2].1).into_string(),
            "ALTER ROLE \"worker\" IN DATABASE \"d\" SET search_path = 'green', 'a, b'"
        );
        assert_eq!(
            restore_statement("d", &t[1].0).into_string(),
            "ALTER ROLE \"web\" IN DATABASE \"d\" RESET search_path"
        );
    }
}
