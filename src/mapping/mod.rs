//! The mapping file: YAML -> a validated [`Mapping`]. This module owns the file format (see
//! DESIGN.md, "The mapping file") and every check that needs no database: keys, names, paths, the
//! `from` clause structure, reverse rules. It never talks to PostgreSQL; `plan` judges the SQL.

pub mod from;
mod raw;
pub mod yaml;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_saphyr::Spanned;

use crate::diag::{Diagnostic, Rejected, Span};
pub use from::{FromClause, FromItem, JoinKind};
use raw::{ColumnSpec, RawEntry, RawMapping, RawReverse, Scalar};

/// A text value from the file with where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Located {
    pub text: String,
    #[serde(skip)]
    pub span: Span,
}

#[derive(Clone, Debug, Serialize)]
pub struct Mapping {
    /// The mapping file as given on the command line.
    pub path: PathBuf,
    /// The file's text, for digests and snippets.
    #[serde(skip)]
    pub source: String,
    pub migration: String,
    pub blue: String,
    pub green: String,
    pub control_schema: String,
    /// Resolved relative to the mapping file.
    pub green_ddl: PathBuf,
    #[serde(skip)]
    pub green_ddl_span: Span,
    pub checks: Option<PathBuf>,
    pub settings: Settings,
    pub tables: Vec<TableEntry>,
    /// The expressions are PostgreSQL's fully qualified renderings (`probe::resolve`), to run
    /// under `search_path = pg_catalog, pg_temp`; false: as written, with blue on the path.
    #[serde(skip)]
    pub resolved: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Settings {
    pub jobs: Option<u32>,
    pub chunk_rows: Option<u64>,
    #[serde(serialize_with = "ser_duration_ms")]
    pub lock_timeout: Option<Duration>,
}

fn ser_duration_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_millis() as u64)),
        None => s.serialize_none(),
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TableEntry {
    /// Green table name.
    pub name: String,
    #[serde(skip)]
    pub span: Span,
    pub from: Located,
    #[serde(skip)]
    pub from_clause: FromClause,
    #[serde(rename = "where")]
    pub where_: Option<Located>,
    pub group_by: Vec<Located>,
    /// Green column -> expression. `None`: inferred from the green primary key by `plan`.
    pub sync_key: Option<Vec<(String, Located)>>,
    pub columns: Vec<Column>,
    pub reverse: Reverse,
}

#[derive(Clone, Debug, Serialize)]
pub struct Column {
    pub name: String,
    #[serde(skip)]
    pub span: Span,
    pub expr: Located,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_map: Option<ValueMap>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ValueMap {
    /// Blue value (as text) -> green value (as text, NULL when `~`).
    pub entries: Vec<(String, Option<String>)>,
    /// `None`: no default (an unmapped value is a plan error); `Some(None)`: NULL.
    pub default: Option<Option<String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "columns")]
pub enum Reverse {
    /// No `reverse` key: plain renames and casts are inverted automatically.
    Auto,
    /// `reverse: none`: rollback loses green-side writes to this table.
    None,
    /// Blue column -> expression over the green table's columns.
    Columns(Vec<(String, Located)>),
}

impl TableEntry {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

impl Mapping {
    pub fn entry(&self, name: &str) -> Option<&TableEntry> {
        self.tables.iter().find(|t| t.name == name)
    }
    /// blake3 of the mapping file's bytes: what a validation report and the cutover gate refer to.
    pub fn digest(&self) -> String {
        blake3::hash(self.source.as_bytes()).to_hex().to_string()
    }
    /// The schemas whose catalog the commands need: blue, green, and any other schema an entry's
    /// `from` names.
    pub fn catalog_schemas(&self) -> Vec<String> {
        let mut out = vec![self.blue.clone(), self.green.clone()];
        for q in self.blue_tables_read() {
            if !out.contains(&q.schema) {
                out.push(q.schema);
            }
        }
        out
    }

    /// Every blue table any entry reads (driving and joined), in first-use order.
    pub fn blue_tables_read(&self) -> Vec<crate::sql::QName> {
        let mut out: Vec<crate::sql::QName> = Vec::new();
        for e in &self.tables {
            for i in &e.from_clause.items {
                if !out.contains(&i.table) {
                    out.push(i.table.clone());
                }
            }
        }
        out
    }
}

/// Read and validate a mapping file. Every problem found is returned, not only the first.
pub fn load(path: &Path) -> Result<Mapping, Rejected> {
    let source = std::fs::read_to_string(path).map_err(|e| {
        Rejected(vec![
            Diagnostic::error(
                "mapping-unreadable",
                format!("cannot read {}: {e}", path.display()),
            )
            .hint("check the path given with --mapping"),
        ])
    })?;
    parse(path, &source)
}

/// Validate mapping text as if it had been read from `path` (paths resolve relative to it).
pub fn parse(path: &Path, source: &str) -> Result<Mapping, Rejected> {
    let raw: RawMapping = yaml::read(path, source).map_err(|d| Rejected(vec![d]))?;
    Converter {
        path,
        source,
        diags: Vec::new(),
    }
    .convert(raw, source)
}

struct Converter<'a> {
    path: &'a Path,
    source: &'a str,
    diags: Vec<Diagnostic>,
}

impl Converter<'_> {
    fn span<T>(&self, s: &Spanned<T>) -> Span {
        Span::new(self.path, s.referenced.line(), s.referenced.column())
    }
    fn located(&self, s: &Spanned<Scalar>) -> Located {
        Located {
            text: self.text(s).trim().to_string(),
            span: self.span(s),
        }
    }
    /// A scalar's text as written (YAML reads the key `n` as false and `on` as true).
    fn text(&self, s: &Spanned<Scalar>) -> String {
        self.as_written(&s.referenced, s.value.0.clone())
    }
    /// A plain (unquoted) scalar exactly as written in the file: YAML would read `01067` as the
    /// number 1067, `1.10` as 1.1 and `yes` as true, which must not change a value-map entry.
    fn as_written(&self, loc: &serde_saphyr::Location, parsed: String) -> String {
        let span = loc.span();
        let (Some(off), Some(len)) = (span.byte_offset(), span.byte_len()) else {
            return parsed;
        };
        let Some(raw) = self.source.get(off as usize..(off + len) as usize) else {
            return parsed;
        };
        let raw = raw.trim();
        if raw.is_empty() || raw.starts_with(['\'', '"', '|', '>', '&', '*', '!']) {
            parsed
        } else {
            raw.to_string()
        }
    }

    fn err(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    fn name(&mut self, s: &Spanned<Scalar>, what: &str) -> String {
        let v = self.text(s);
        let ok = !v.is_empty()
            && v.len() <= 63
            && v.chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && v.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            self.err(
                Diagnostic::error("bad-name", format!("{what} `{v}` is not a plain lower-case SQL name"))
                    .at(Some(self.span(s)))
                    .hint("use lower-case letters, digits and underscores, at most 63 characters, starting with a letter"),
            );
        }
        v
    }

    fn convert(mut self, raw: RawMapping, source: &str) -> Result<Mapping, Rejected> {
        let migration = self.name(&raw.migration, "migration");
        let blue = match &raw.blue {
            Some(b) => self.name(b, "blue schema"),
            None => "public".to_string(),
        };
        let green = self.name(&raw.green, "green schema");
        let control_schema = match &raw.control_schema {
            Some(c) => self.name(c, "control schema"),
            None => "bluegreen".to_string(),
        };
        if green == blue {
            self.err(
                Diagnostic::error(
                    "same-schema",
                    format!("green schema `{green}` is the blue schema"),
                )
                .at(Some(self.span(&raw.green)))
                .hint("green is built beside blue: give it a new schema name such as `app_v2`"),
            );
        }
        for (s, what) in [(&green, "green"), (&blue, "blue")] {
            if *s == control_schema || s.starts_with("pg_") || s == "information_schema" {
                self.err(
                    Diagnostic::error(
                        "reserved-schema",
                        format!("{what} schema `{s}` is reserved"),
                    )
                    .at(Some(self.span(&raw.green))),
                );
            }
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let green_ddl_span = self.span(&raw.green_ddl);
        let green_ddl = dir.join(&raw.green_ddl.value.0);
        if !green_ddl.is_file() {
            self.err(
                Diagnostic::error(
                    "missing-file",
                    format!("green_ddl file {} does not exist", green_ddl.display()),
                )
                .at(Some(green_ddl_span.clone()))
                .hint("paths are relative to the mapping file's folder"),
            );
        }
        let checks = raw.checks.as_ref().map(|c| {
            let p = dir.join(&c.value.0);
            if !p.is_file() {
                self.err(
                    Diagnostic::error(
                        "missing-file",
                        format!("checks file {} does not exist", p.display()),
                    )
                    .at(Some(self.span(c)))
                    .hint("paths are relative to the mapping file's folder"),
                );
            }
            p
        });
        let settings = self.settings(raw.settings.unwrap_or_default());

        let mut tables: Vec<TableEntry> = Vec::new();
        if raw.tables.value.0.is_empty() {
            self.err(
                Diagnostic::error("no-tables", "`tables:` is empty")
                    .at(Some(self.span(&raw.tables)))
                    .hint("add one entry per green table"),
            );
        }
        for (key, entry) in raw.tables.value.0 {
            let name = self.name(&key, "green table");
            let span = self.span(&key);
            tables.push(self.entry(name, span, entry.value, &blue));
        }
        self.reverse_owners(&tables);
        if !self.diags.is_empty() {
            return Err(Rejected(self.diags));
        }
        Ok(Mapping {
            resolved: false,
            path: self.path.to_path_buf(),
            source: source.to_string(),
            migration,
            blue,
            green,
            control_schema,
            green_ddl,
            green_ddl_span,
            checks,
            settings,
            tables,
        })
    }

    fn settings(&mut self, raw: raw::RawSettings) -> Settings {
        let mut s = Settings {
            jobs: raw.jobs.as_ref().map(|j| j.value),
            chunk_rows: raw.chunk_rows.as_ref().map(|c| c.value),
            lock_timeout: None,
        };
        if let Some(j) = &raw.jobs
            && (j.value == 0 || j.value > 256)
        {
            self.err(
                Diagnostic::error("bad-setting", "settings.jobs must be between 1 and 256")
                    .at(Some(self.span(j))),
            );
        }
        if let Some(c) = &raw.chunk_rows
            && c.value == 0
        {
            self.err(
                Diagnostic::error("bad-setting", "settings.chunk_rows must be at least 1")
                    .at(Some(self.span(c))),
            );
        }
        if let Some(lt) = &raw.lock_timeout {
            match parse_duration(&lt.value.0) {
                Some(d) => s.lock_timeout = Some(d),
                None => self.err(
                    Diagnostic::error(
                        "bad-setting",
                        format!("settings.lock_timeout `{}` is not a duration", lt.value.0),
                    )
                    .at(Some(self.span(lt)))
                    .hint("write a number with a unit: 500ms, 2s, 1min"),
                ),
            }
        }
        s
    }

    fn entry(&mut self, name: String, span: Span, raw: RawEntry, blue: &str) -> TableEntry {
        let from = self.located(&raw.from);
        let from_clause = match from::parse(&from.text, blue) {
            Ok(fc) => fc,
            Err(msg) => {
                self.err(
                    Diagnostic::error("bad-from", msg)
                        .at(Some(from.span.clone()))
                        .table(&name),
                );
                FromClause { items: Vec::new() }
            }
        };
        let where_ = raw.where_.as_ref().map(|w| self.located(w));
        let group_by = raw
            .group_by
            .unwrap_or_default()
            .iter()
            .map(|g| self.located(g))
            .collect();
        let mut columns = Vec::new();
        if raw.columns.value.0.is_empty() {
            self.err(
                Diagnostic::error("no-columns", "`columns:` is empty")
                    .at(Some(self.span(&raw.columns)))
                    .table(&name)
                    .hint("map at least the green primary key"),
            );
        }
        for (k, v) in raw.columns.value.0 {
            let col_span = self.span(&k);
            let value_span = self.span(&v);
            let (expr, value_map) = match v.value {
                ColumnSpec::Plain(text) => (
                    Located {
                        text: text.trim().to_string(),
                        span: value_span,
                    },
                    None,
                ),
                ColumnSpec::Mapped { expr, map, default } => {
                    if map.value.0.is_empty() {
                        self.err(
                            Diagnostic::error("empty-map", "`map:` is empty")
                                .at(Some(self.span(&map)))
                                .table(&name)
                                .column(self.text(&k))
                                .hint("list `blue value: green value` pairs"),
                        );
                    }
                    let entries = map
                        .value
                        .0
                        .into_iter()
                        .map(|(bk, gv)| {
                            let key = self.as_written(&bk.referenced, bk.value.0);
                            let value = gv.value.map(|v| self.as_written(&gv.referenced, v.0));
                            (key, value)
                        })
                        .collect();
                    let default =
                        default.map(|d| d.value.map(|v| self.as_written(&d.referenced, v.0)));
                    (self.located(&expr), Some(ValueMap { entries, default }))
                }
            };
            if expr.text.is_empty() {
                self.err(
                    Diagnostic::error("empty-expression", "empty expression")
                        .at(Some(expr.span.clone()))
                        .table(&name)
                        .column(self.text(&k)),
                );
            }
            columns.push(Column {
                name: self.text(&k),
                span: col_span,
                expr,
                value_map,
            });
        }
        let sync_key = raw.sync_key.map(|sk| {
            if sk.value.0.is_empty() {
                self.err(
                    Diagnostic::error("bad-sync-key", "`sync_key:` is empty")
                        .at(Some(self.span(&sk)))
                        .table(&name)
                        .hint("name the green columns that identify the rows derived from one driving row or group, e.g. `sync_key: { id: l.id }`"),
                );
            }
            sk.value
                .0
                .iter()
                .map(|(k, v)| (self.text(k), self.located(v)))
                .collect()
        });
        let reverse = match raw.reverse.map(|r| r.value) {
            None => Reverse::Auto,
            Some(RawReverse::None) => Reverse::None,
            Some(RawReverse::Columns(cols)) => Reverse::Columns(
                cols.0
                    .iter()
                    .map(|(k, v)| (self.text(k), self.located(v)))
                    .collect(),
            ),
        };
        TableEntry {
            name,
            span,
            from,
            from_clause,
            where_,
            group_by,
            sync_key,
            columns,
            reverse,
        }
    }

    /// At most one entry per driving table carries an explicit `reverse`.
    fn reverse_owners(&mut self, tables: &[TableEntry]) {
        for (i, e) in tables.iter().enumerate() {
            if !matches!(e.reverse, Reverse::Columns(_)) || e.from_clause.items.is_empty() {
                continue;
            }
            let driving = &e.from_clause.driving().table;
            if let Some(prev) = tables[..i].iter().find(|p| {
                matches!(p.reverse, Reverse::Columns(_))
                    && !p.from_clause.items.is_empty()
                    && &p.from_clause.driving().table == driving
            }) {
                self.err(
                    Diagnostic::error(
                        "reverse-twice",
                        format!(
                            "{} already has a reverse in entry `{}`: at most one entry per driving table carries `reverse`",
                            driving.display(),
                            prev.name
                        ),
                    )
                    .at(Some(e.span.clone()))
                    .table(&e.name)
                    .hint("keep the reverse on the entry that holds the blue table's key, drop it here"),
                );
            }
        }
    }
}

/// Parse a PostgreSQL-style duration: `500ms`, `2s`, `1min`, `1h`, or a bare number of ms.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "" | "ms" => n,
        "s" => n * 1000.0,
        "min" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => return None,
    };
    // 0 would mean "wait forever" to PostgreSQL: never accept it.
    (ms.is_finite() && ms >= 1.0).then(|| Duration::from_millis(ms as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1min"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("100"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("2 parsecs"), None);
    }

    #[test]
    fn value_map_scalars_are_kept_as_written() {
        let src = "migration: m\ngreen: v2\ngreen_ddl: Cargo.toml\ntables:\n  t:\n    from: a x\n    columns:\n      zip:\n        expr: x.zip\n        map: { 01067: Dresden, 1.10: '1.10', yes: on }\n        default: 007\n";
        let m = parse(std::path::Path::new("x.yaml"), src).unwrap_or_else(|e| panic!("{e}"));
        let vm = m.tables[0].columns[0].value_map.clone().unwrap();
        assert_eq!(
            vm.entries,
            vec![
                ("01067".to_string(), Some("Dresden".to_string())),
                ("1.10".to_string(), Some("1.10".to_string())),
                ("yes".to_string(), Some("on".to_string())),
            ]
        );
        assert_eq!(vm.default, Some(Some("007".to_string())));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("0.5ms"), None);
    }
}
