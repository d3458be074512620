//! The one SQL renderer. Every identifier and literal that reaches the database goes through
//! [`Ident`], [`QName`] or [`Literal`]; user text never reaches SQL any other way.
//!
//! Mapping expressions are the one exception by design: they *are* SQL written by the migration
//! engineer, and they are always wrapped in parentheses ([`Expr`]) so that operator precedence of the
//! surrounding statement cannot change their meaning. PostgreSQL is their judge (`plan` compiles each
//! one before anything else runs).
//!
//! [`Sql`] is the finished statement. Its text is private: a statement is composed with the
//! [`sql!`] macro from renderer types and other statements, or is user SQL that is verbatim by
//! definition ([`Sql::verbatim`]: the green DDL file, the queries of a checks file).
//! [`Sql::assert_safe`] hands it to sqlx, which accepts only `&'static str` or
//! `AssertSqlSafe(..)`: the wrapper is applied here and nowhere else. [`scan`] is the one lexer
//! for user-written SQL text.

pub mod scan;

use std::fmt;

/// A PostgreSQL identifier, rendered double-quoted with embedded quotes doubled.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(pub String);

impl Ident {
    pub fn new(s: impl Into<String>) -> Self {
        Ident(s.into())
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        f.write_str(&self.0.replace('"', "\"\""))?;
        f.write_str("\"")
    }
}

/// A schema-qualified name: `"schema"."name"`. Serialised as `schema.name` (for reports).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QName {
    pub schema: String,
    pub name: String,
}

impl QName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        QName {
            schema: schema.into(),
            name: name.into(),
        }
    }
    /// `schema.name` without quotes, for messages (never for SQL).
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

impl serde::Serialize for QName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.display())
    }
}

impl fmt::Display for QName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", Ident::new(&self.schema), Ident::new(&self.name))
    }
}

/// A string literal, rendered as a standard-conforming `'...'` with quotes doubled, or `E'...'`
/// when it contains a backslash (so the result does not depend on `standard_conforming_strings`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Literal(pub String);

impl Literal {
    pub fn new(s: impl Into<String>) -> Self {
        Literal(s.into())
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.contains('\\') {
            f.write_str("E'")?;
            f.write_str(&self.0.replace('\\', "\\\\").replace('\'', "''"))?;
        } else {
            f.write_str("'")?;
            f.write_str(&self.0.replace('\'', "''"))?;
        }
        f.write_str("'")
    }
}

/// A user-written SQL expression from the mapping, always parenthesised when rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expr<'a>(pub &'a str);

impl fmt::Display for Expr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A newline before the closing parenthesis keeps a trailing `-- comment` harmless.
        if self.0.contains("--") {
            write!(f, "({}\n)", self.0)
        } else {
            write!(f, "({})", self.0)
        }
    }
}

/// A type name as `format_type()` printed it (already valid, quoted SQL from the server catalog).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeName<'a>(pub &'a str);

impl fmt::Display for TypeName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A rendered SQL statement.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct Sql(String);

impl Sql {
    /// Text composed from renderer types; use [`sql!`], which calls this.
    #[doc(hidden)]
    pub(crate) fn rendered(text: String) -> Sql {
        Sql(text)
    }
    /// SQL the migration engineer wrote and that runs as written: the `green_ddl` file and the
    /// queries of a checks file. PostgreSQL judges it (`plan` runs it first, rolled back).
    pub fn verbatim(text: impl Into<String>) -> Sql {
        Sql(text.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn into_string(self) -> String {
        self.0
    }
    /// Hand the statement to sqlx. Sound because every part of it came through this module.
    pub fn assert_safe(&self) -> sqlx::AssertSqlSafe<String> {
        sqlx::AssertSqlSafe(self.0.clone())
    }
}

impl fmt::Display for Sql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Build a [`Sql`] with `format!` syntax; arguments must be renderer types, other [`Sql`], or
/// text built from them.
macro_rules! sql {
    ($($arg:tt)*) => { $crate::sql::Sql::rendered(format!($($arg)*)) };
}
pub(crate) use sql;

/// Join displayable parts with a separator.
pub fn join<T: fmt::Display>(items: impl IntoIterator<Item = T>, sep: &str) -> String {
    let mut out = String::new();
    for (i, it) in items.into_iter().enumerate() {
        if i > 0 {
            out.push_str(sep);
        }
        out.push_str(&it.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_escaped() {
        assert_eq!(Ident::new("a\"b").to_string(), "\"a\"\"b\"");
        assert_eq!(QName::new("pub lic", "T").to_string(), "\"pub lic\".\"T\"");
    }

    #[test]
    fn literals_are_quoted_and_escaped() {
        assert_eq!(Literal::new("it's").to_string(), "'it''s'");
        assert_eq!(Literal::new("a\\b'").to_string(), "E'a\\\\b'''");
    }

    #[test]
    fn expressions_are_parenthesised_and_comments_closed() {
        assert_eq!(Expr("a + b").to_string(), "(a + b)");
        assert_eq!(Expr("a -- note").to_string(), "(a -- note\n)");
    }
}
