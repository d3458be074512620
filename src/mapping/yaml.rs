//! Reading YAML text (mapping files, checks files): serde-saphyr with duplicate keys refused (a
//! repeated table entry must never silently replace another), and its errors turned into located
//! diagnostics that name the table entry and column of the line. With `raw.rs` (the shapes), the
//! only place that knows the YAML crate.

use std::path::Path;

use serde::de::{DeserializeOwned, IgnoredAny};

use crate::diag::{Diagnostic, Span, did_you_mean};

/// Deserialise `source` (read from `path`) into `T`. The text is first parsed as YAML alone, so
/// a syntax error is reported where the text stops being valid YAML, in the parser's words, before
/// any key is read (a deserialiser reading keys would otherwise stop earlier with a misleading
/// "missing key" or "invalid type" somewhere else).
pub fn read<T: DeserializeOwned>(path: &Path, source: &str) -> Result<T, Diagnostic> {
    let options = || {
        serde_saphyr::options! {
            duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        }
    };
    if let Err(e) = serde_saphyr::from_str_with_options::<IgnoredAny>(source, options()) {
        let d = yaml_error(path, source, &e);
        if d.code == "duplicate-key" {
            return Err(d);
        }
        let line = d.span.as_ref().map_or(usize::MAX, |s| s.line as usize);
        let hint = match unclosed_flow(source, line) {
            Some((l, c, ch)) => format!("the `{ch}` opened at line {l}, column {c} is never closed: close it, or quote the value"),
            None => "check indentation, brackets and quoting; quote expressions that contain `: ` or start with a quote or a bracket".into(),
        };
        return Err(Diagnostic {
            code: "yaml-syntax",
            hint: Some(hint),
            ..d
        });
    }
    serde_saphyr::from_str_with_options(source, options()).map_err(|e| yaml_error(path, source, &e))
}

/// A flow sequence or mapping (`key: [a, b` / `key: {a: b`) opened on a line before `before` and
/// not closed on it: the usual cause of a syntax error reported lines later.
fn unclosed_flow(source: &str, before: usize) -> Option<(usize, usize, char)> {
    for (i, line) in source.lines().enumerate().take(before.saturating_sub(1)) {
        let Some((_, value)) = line.split_once(": ") else {
            continue;
        };
        let value = value.trim_start();
        let Some(open) = value.chars().next().filter(|c| *c == '[' || *c == '{') else {
            continue;
        };
        let close = if open == '[' { ']' } else { '}' };
        let (mut depth, mut quote) = (0i32, None);
        for c in value.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '\'' | '"') => quote = Some(c),
                (None, '#') => break,
                (None, c) if c == open => depth += 1,
                (None, c) if c == close => depth -= 1,
                _ => {}
            }
        }
        if depth > 0 {
            let col = line[..line.len() - value.len()].chars().count() + 1;
            return Some((i + 1, col, open));
        }
    }
    None
}

fn yaml_error(path: &Path, source: &str, e: &serde_saphyr::Error) -> Diagnostic {
    let loc = e.location().filter(|l| l.line() > 0);
    let span = loc.map(|l| Span::new(path, l.line(), l.column()));
    let full = e.without_snippet().to_string();
    // serde-saphyr appends " at line L column C"; the span carries that already.
    let mut msg = full
        .split(" at line ")
        .next()
        .unwrap_or(&full)
        .trim()
        .to_string();
    let (code, hint) = if let Some(name) = backticked(&msg, "unknown field `") {
        let expected: Vec<String> = msg
            .split("expected one of ")
            .nth(1)
            .or_else(|| msg.split("expected ").nth(1))
            .map(|s| {
                s.split(',')
                    .map(|n| n.trim().trim_matches('`').to_string())
                    .collect()
            })
            .unwrap_or_default();
        let hint = did_you_mean(&name, expected.iter().map(String::as_str))
            .unwrap_or_else(|| format!("valid keys here: {}", expected.join(", ")));
        msg = format!("unknown key `{name}`");
        ("unknown-key", Some(hint))
    } else if let Some(rest) = msg.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest)
            .to_string();
        msg = format!("duplicate key `{key}`");
        (
            "duplicate-key",
            Some("each key may appear once: a repeated entry would silently replace another; rename or merge them".to_string()),
        )
    } else if msg.contains("duplicate") {
        (
            "duplicate-key",
            Some("each key may appear once".to_string()),
        )
    } else if let Some(name) = backticked(&msg, "missing field `") {
        msg = format!("missing key `{name}`");
        ("missing-key", Some(format!("add `{name}:`")))
    } else {
        ("yaml-syntax", Some("check indentation and quoting; quote expressions that contain `: ` or start with a quote".to_string()))
    };
    let mut d = Diagnostic::error(code, msg).at(span).maybe_hint(hint);
    if let Some(l) = loc {
        let (table, column) = yaml_context(source, l.line() as usize);
        d.table = table;
        d.column = column;
    }
    d
}

/// The table entry and column a line of the mapping file belongs to, read from indentation (for
/// messages about YAML errors, which serde reports by line only).
fn yaml_context(source: &str, line: usize) -> (Option<String>, Option<String>) {
    let lines: Vec<&str> = source.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let key = |l: &str| {
        let t = l.trim_start();
        (!t.is_empty() && !t.starts_with('#'))
            .then(|| t.split(':').next().unwrap_or("").trim().to_string())
    };
    let Some(tables_at) = lines.iter().position(|l| l.starts_with("tables:")) else {
        return (None, None);
    };
    if line <= tables_at + 1 {
        return (None, None);
    }
    let Some(entry_indent) = lines[tables_at + 1..]
        .iter()
        .find(|l| key(l).is_some())
        .map(|l| indent(l))
    else {
        return (None, None);
    };
    let mut table = None;
    let mut column = None;
    let mut columns_indent = None;
    let mut column_indent = None;
    for l in &lines[tables_at + 1..line.min(lines.len())] {
        let Some(k) = key(l) else { continue };
        let ind = indent(l);
        if ind < entry_indent {
            return (None, None);
        }
        if ind == entry_indent {
            table = Some(k);
            (column, columns_indent, column_indent) = (None, None, None);
        } else if columns_indent.is_some_and(|ci| ind > ci) {
            if *column_indent.get_or_insert(ind) == ind {
                column = Some(k);
            }
        } else {
            (column, column_indent) = (None, None);
            columns_indent = (k == "columns").then_some(ind);
        }
    }
    (table, column)
}

fn backticked(msg: &str, prefix: &str) -> Option<String> {
    let rest = &msg[msg.find(prefix)? + prefix.len()..];
    Some(rest[..rest.find('`')?].to_string())
}
