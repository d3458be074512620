//! The one lexer for SQL text written by users (mapping expressions, `from` clauses, green DDL).
//!
//! It knows what PostgreSQL's lexer knows about where a token ends: standard strings (`''`
//! doubled), escape strings (`E'\''`), quoted identifiers (`""` doubled), dollar quotes
//! (`$tag$ ... $tag$`, but `$1` is a parameter), line and nested block comments, and operators
//! (a run of operator characters, never containing `--` or `/*`, trailing `+`/`-` trimmed as
//! <https://www.postgresql.org/docs/15/sql-syntax-lexical.html#SQL-SYNTAX-OPERATORS> says). It does
//! not parse: callers look at the token stream (the first word of a statement, `alias.column`
//! pairs, the conjuncts of an ON condition). PostgreSQL stays the judge of the text itself.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An unquoted word: a keyword or an identifier, as written.
    Word,
    /// A double-quoted identifier, quotes included (see [`Token::ident`]).
    QuotedIdent,
    /// `'...'`, `E'...'` (prefix included), `B'...'`, `X'...'`, `N'...'`.
    String,
    /// `$tag$ ... $tag$`.
    DollarString,
    Number,
    /// `$1`.
    Param,
    Operator,
    /// `(`, `)`, `[`, `]`, `,`, `;`, `:`, `::`, `.` or any other single character.
    Punct,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token<'a> {
    pub kind: Kind,
    pub text: &'a str,
    /// Byte offset in the scanned text.
    pub start: usize,
    /// 1-based line of the token's first character.
    pub line: usize,
}

impl Token<'_> {
    /// An unquoted word equal to `kw`, ignoring case.
    pub fn is_word(&self, kw: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(kw)
    }
    pub fn is_punct(&self, p: &str) -> bool {
        self.kind == Kind::Punct && self.text == p
    }
    /// The identifier this token names: an unquoted word folded to lower case (as PostgreSQL
    /// folds it), a quoted one with its quotes removed and `""` undoubled.
    pub fn ident(&self) -> Option<String> {
        match self.kind {
            // PostgreSQL folds ASCII letters only.
            Kind::Word => Some(self.text.to_ascii_lowercase()),
            Kind::QuotedIdent => Some(self.text[1..self.text.len() - 1].replace("\"\"", "\"")),
            _ => None,
        }
    }
    pub fn end(&self) -> usize {
        self.start + self.text.len()
    }
}

/// Text that does not end where it must.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanError {
    /// `string literal`, `quoted identifier`, `dollar-quoted string` or `comment`.
    pub what: &'static str,
    pub line: usize,
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unterminated {} (from line {})", self.what, self.line)
    }
}

const OP_CHARS: &str = "+-*/<>=~!@#%^&|`?";

/// The tokens of `src`, without whitespace and comments.
pub fn tokens(src: &str) -> Result<Vec<Token<'_>>, ScanError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let newlines = |s: &str| s.matches('\n').count();
    while i < b.len() {
        let c = src[i..].chars().next().expect("in bounds");
        let start = i;
        let start_line = line;
        let unterminated = |what| ScanError {
            what,
            line: start_line,
        };
        if c.is_whitespace() {
            if c == '\n' {
                line += 1;
            }
            i += c.len_utf8();
            continue;
        }
        if src[i..].starts_with("--") {
            i = src[i..].find('\n').map_or(b.len(), |n| i + n);
            continue;
        }
        if src[i..].starts_with("/*") {
            // Block comments nest in PostgreSQL.
            // Bytes, not characters: `/` and `*` never occur inside a multi-byte character.
            let mut depth = 0usize;
            loop {
                if i >= b.len() {
                    return Err(unterminated("comment"));
                }
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
            continue;
        }
        let kind = if c == '\'' || (is_string_prefix(c) && b.get(i + 1) == Some(&b'\'')) {
            let escapes = c == 'e' || c == 'E';
            if c != '\'' {
                i += 1;
            }
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(unterminated("string literal")),
                    Some(b'\\') if escapes => i += 2,
                    Some(b'\'') if b.get(i + 1) == Some(&b'\'') => i += 2,
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            line += newlines(&src[start..i.min(b.len())]);
            Kind::String
        } else if c == '"' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(unterminated("quoted identifier")),
                    Some(b'"') if b.get(i + 1) == Some(&b'"') => i += 2,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(_) => i += 1,
                }
            }
            line += newlines(&src[start..i]);
            Kind::QuotedIdent
        } else if c == '$' && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            i += 1;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            Kind::Param
        } else if let Some(tag) = dollar_tag(&src[i..]) {
            let body = i + tag.len();
            match src[body..].find(tag) {
                None => return Err(unterminated("dollar-quoted string")),
                Some(n) => i = body + n + tag.len(),
            }
            line += newlines(&src[start..i]);
            Kind::DollarString
        } else if c.is_ascii_digit() || (c == '.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                // 1e-5: the sign belongs to the exponent.
                if (b[i] == b'e' || b[i] == b'E') && matches!(b.get(i + 1), Some(b'+' | b'-')) {
                    i += 1;
                }
                i += 1;
            }
            Kind::Number
        } else if c.is_alphabetic() || c == '_' {
            while let Some(ch) = src[i..].chars().next() {
                if ch.is_alphanumeric() || ch == '_' || ch == '$' {
                    i += ch.len_utf8();
                } else {
                    break;
                }
            }
            Kind::Word
        } else if OP_CHARS.contains(c) {
            while i < b.len()
                && OP_CHARS.contains(b[i] as char)
                && !src[i..].starts_with("--")
                && !src[i..].starts_with("/*")
            {
                i += 1;
            }
            // `a=-1` is `=` then `-1`: a multi-character operator cannot end in + or - unless it
            // holds one of ~ ! @ # % ^ & | ` ?.
            let op = &src[start..i];
            if op.len() > 1 && !op.contains(['~', '!', '@', '#', '%', '^', '&', '|', '`', '?']) {
                let trimmed = op.trim_end_matches(['+', '-']);
                i = start + trimmed.len().max(1);
            }
            Kind::Operator
        } else if src[i..].starts_with("::") {
            i += 2;
            Kind::Punct
        } else {
            i += c.len_utf8();
            Kind::Punct
        };
        out.push(Token {
            kind,
            text: &src[start..i],
            start,
            line: start_line,
        });
    }
    Ok(out)
}

fn is_string_prefix(c: char) -> bool {
    matches!(c, 'e' | 'E' | 'b' | 'B' | 'x' | 'X' | 'n' | 'N')
}

/// `$tag$` or `$$` at the start of `s`.
fn dollar_tag(s: &str) -> Option<&str> {
    let rest = s.strip_prefix('$')?;
    let end = rest.find('$')?;
    let tag = &rest[..end];
    let ok = tag
        .chars()
        .enumerate()
        .all(|(k, ch)| ch == '_' || ch.is_alphabetic() || (k > 0 && ch.is_ascii_digit()));
    ok.then(|| &s[..end + 2])
}

/// The aliases an expression qualifies columns with (`w.city` -> `w`; `"W".x` -> `W`), in order of
/// first appearance; `schema.table.column` names no alias.
pub fn referenced_aliases<'a>(expr: &str, aliases: &[&'a str]) -> Vec<&'a str> {
    let Ok(toks) = tokens(expr) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, t) in toks.iter().enumerate() {
        let Some(name) = t.ident() else { continue };
        let after_dot = k > 0 && toks[k - 1].is_punct(".");
        let before_dot = toks.get(k + 1).is_some_and(|n| n.is_punct("."));
        if !after_dot
            && before_dot
            && let Some(a) = aliases.iter().find(|a| **a == name)
            && !out.contains(a)
        {
            out.push(*a);
        }
    }
    out
}

/// `condition` split at its top-level `AND`s (outside parentheses), each conjunct trimmed; a
/// condition wrapped whole in one pair of parentheses is unwrapped first.
pub fn conjuncts(condition: &str) -> Vec<&str> {
    let Ok(toks) = tokens(condition) else {
        return vec![condition.trim()];
    };
    let mut toks = &toks[..];
    let mut text = condition;
    // Unwrap `( ... )` when the first parenthesis closes at the very end.
    while let (Some(first), Some(last)) = (toks.first(), toks.last())
        && first.is_punct("(")
        && last.is_punct(")")
        && closing_paren(toks, 0) == Some(toks.len() - 1)
    {
        text = &condition[first.end()..last.start];
        toks = &toks[1..toks.len() - 1];
    }
    let base = text.as_ptr() as usize - condition.as_ptr() as usize;
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut from = base;
    for t in toks {
        match t.text {
            "(" | "[" if t.kind == Kind::Punct => depth += 1,
            ")" | "]" if t.kind == Kind::Punct => depth -= 1,
            _ => {}
        }
        if depth == 0 && t.is_word("and") {
            out.push(condition[from..t.start].trim());
            from = t.end();
        }
    }
    out.push(condition[from..base + text.len()].trim());
    out
}

fn closing_paren(toks: &[Token], open: usize) -> Option<usize> {
    let mut depth = 0;
    for (k, t) in toks.iter().enumerate().skip(open) {
        if t.is_punct("(") {
            depth += 1;
        } else if t.is_punct(")") {
            depth -= 1;
            if depth == 0 {
                return Some(k);
            }
        }
    }
    None
}

/// `alias.column` (either part optionally quoted) as the whole of `expr`: (alias, column), each
/// as PostgreSQL resolves the identifier.
pub fn qualified_column(expr: &str) -> Option<(String, String)> {
    match tokens(expr).ok()?.as_slice() {
        [a, dot, c] if dot.is_punct(".") => Some((a.ident()?, c.ident()?)),
        _ => None,
    }
}

/// A statement of `sql` that would end or nest a transaction (`BEGIN`, `COMMIT`, `SAVEPOINT`,
/// `PREPARE TRANSACTION`, ...), as (line, keyword). `BEGIN ATOMIC ... END` is a function body.
pub fn transaction_control(sql: &str) -> Result<Option<(usize, String)>, ScanError> {
    const WORDS: &[&str] = &[
        "BEGIN",
        "COMMIT",
        "END",
        "ROLLBACK",
        "START",
        "ABORT",
        "SAVEPOINT",
        "RELEASE",
        "PREPARE",
    ];
    let toks = tokens(sql)?;
    let mut stmt_start = true;
    let mut atomic = 0usize;
    for (k, t) in toks.iter().enumerate() {
        let next = toks.get(k + 1);
        if t.is_punct(";") {
            stmt_start = true;
            continue;
        }
        let was_start = std::mem::replace(&mut stmt_start, false);
        if t.is_word("begin") && next.is_some_and(|n| n.is_word("atomic")) {
            atomic += 1;
            continue;
        }
        if t.is_word("atomic") && k > 0 && toks[k - 1].is_word("begin") {
            // The body's first statement (or its `END`) starts here.
            stmt_start = true;
            continue;
        }
        if was_start && t.is_word("end") && atomic > 0 {
            atomic -= 1;
            continue;
        }
        if !was_start || t.kind != Kind::Word {
            continue;
        }
        let word = t.text.to_ascii_uppercase();
        if WORDS.contains(&word.as_str())
            // PREPARE TRANSACTION only; a plain PREPARE statement is harmless.
            && (word != "PREPARE" || next.is_some_and(|n| n.is_word("transaction")))
        {
            return Ok(Some((t.line, word)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(src: &str) -> Vec<(Kind, &str)> {
        tokens(src)
            .unwrap()
            .into_iter()
            .map(|t| (t.kind, t.text))
            .collect()
    }

    #[test]
    fn strings_identifiers_dollar_quotes_and_comments() {
        use Kind::*;
        assert_eq!(
            kinds(r#"E'it\'s' || 'a''b' "x""y" $f$ ; $f$ $1 -- c"#),
            [
                (String, r"E'it\'s'"),
                (Operator, "||"),
                (String, "'a''b'"),
                (QuotedIdent, "\"x\"\"y\""),
                (DollarString, "$f$ ; $f$"),
                (Param, "$1"),
            ]
        );
        assert_eq!(
            kinds("a=-1 /* x /* y */ z */ b::int"),
            [
                (Word, "a"),
                (Operator, "="),
                (Operator, "-"),
                (Number, "1"),
                (Word, "b"),
                (Punct, "::"),
                (Word, "int"),
            ]
        );
        assert_eq!(kinds("é — x"), [(Word, "é"), (Punct, "—"), (Word, "x")]);
        assert_eq!(kinds("/* café */ x -- thé\ny"), [(Word, "x"), (Word, "y")]);
        assert_eq!(tokens("/* ü").unwrap_err().what, "comment");
        assert_eq!(
            tokens("'open").unwrap_err(),
            ScanError {
                what: "string literal",
                line: 1
            }
        );
        assert_eq!(tokens("x\n\"y").unwrap_err().line, 2);
    }

    #[test]
    fn finds_aliases_outside_strings() {
        let a = ["l", "w", "c"];
        assert_eq!(
            referenced_aliases("md5('org:' || w.owner_email)::uuid", &a),
            ["w"]
        );
        assert_eq!(
            referenced_aliases("coalesce(l.x, 'w.y') || c.\"Name\"", &a),
            ["l", "c"]
        );
        assert_eq!(referenced_aliases("public.l.x", &a), Vec::<&str>::new());
        assert_eq!(referenced_aliases("min(W.city)", &a), ["w"]);
        assert_eq!(referenced_aliases(r"E'\'w.x' || l.y", &a), ["l"]);
    }

    #[test]
    fn splits_conditions_at_top_level_and() {
        assert_eq!(
            conjuncts("w.id = c.workshop_id AND w.active"),
            ["w.id = c.workshop_id", "w.active"]
        );
        assert_eq!(
            conjuncts("(y.k = c.k AND y.z >= 3)"),
            ["y.k = c.k", "y.z >= 3"]
        );
        assert_eq!(
            conjuncts("(a.x = b.y) OR (a.z and b.q)"),
            ["(a.x = b.y) OR (a.z and b.q)"]
        );
        assert_eq!(conjuncts("a.x = 'p and q'"), ["a.x = 'p and q'"]);
    }

    #[test]
    fn finds_transaction_control_outside_quotes() {
        let t = |s| transaction_control(s).unwrap();
        assert_eq!(
            t("CREATE TABLE a (x int);\nCOMMIT;"),
            Some((2, "COMMIT".into()))
        );
        assert_eq!(
            t(
                "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$;\n-- COMMIT\nSELECT 'COMMIT';"
            ),
            None
        );
        assert_eq!(
            t("begin;\ncreate table t (x int);"),
            Some((1, "BEGIN".into()))
        );
        assert_eq!(
            t("CREATE TABLE t (x int); PREPARE TRANSACTION 'x'"),
            Some((1, "PREPARE".into()))
        );
        assert_eq!(
            t(
                "CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; END;\nSELECT 1"
            ),
            None
        );
        assert_eq!(
            t("CREATE FUNCTION f() RETURNS int BEGIN ATOMIC SELECT 1; END;\nEND"),
            Some((2, "END".into()))
        );
        assert_eq!(t("SELECT E'\\';COMMIT'"), None);
        assert_eq!(
            t("CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC END;\nEND;"),
            Some((2, "END".into()))
        );
    }
}
