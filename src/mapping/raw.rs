//! The YAML shape of a mapping file, deserialised by serde-saphyr. Only this file knows the YAML
//! crate. Shapes that YAML allows in several spellings (a column as a plain expression or as
//! `{expr, map, default}`, `reverse: none` or a map) have hand-written visitors so that every value
//! keeps its line and column.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_saphyr::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMapping {
    pub migration: Spanned<Scalar>,
    pub blue: Option<Spanned<Scalar>>,
    pub green: Spanned<Scalar>,
    pub green_ddl: Spanned<Scalar>,
    pub checks: Option<Spanned<Scalar>>,
    pub control_schema: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub settings: Option<RawSettings>,
    pub tables: Spanned<Ordered<RawEntry>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    pub jobs: Option<Spanned<u32>>,
    pub chunk_rows: Option<Spanned<u64>>,
    pub lock_timeout: Option<Spanned<Scalar>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEntry {
    pub from: Spanned<Scalar>,
    #[serde(rename = "where")]
    pub where_: Option<Spanned<Scalar>>,
    #[serde(default)]
    pub group_by: Option<Vec<Spanned<Scalar>>>,
    pub sync_key: Option<Spanned<Ordered<Scalar>>>,
    pub columns: Spanned<Ordered<ColumnSpec>>,
    pub reverse: Option<Spanned<RawReverse>>,
}

/// A scalar read as text whatever YAML made of it (`50`, `true` and `'x'` are all expressions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A YAML mapping kept in file order, each key and value with its location. Duplicate keys are
/// refused here as well as by the parser, so a repeated table entry can never silently win.
pub struct Ordered<V>(pub Vec<(Spanned<Scalar>, Spanned<V>)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Vis<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Vis<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping of names to values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(Spanned<Scalar>, Spanned<V>)> = Vec::new();
                while let Some(k) = map.next_key::<Spanned<Scalar>>()? {
                    if let Some((first, _)) = out.iter().find(|(e, _)| e.value == k.value) {
                        return Err(de::Error::custom(format!(
                            "duplicate key `{}` (first defined at line {})",
                            k.value.0,
                            first.referenced.line()
                        )));
                    }
                    let v = map.next_value::<Spanned<V>>()?;
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Ordered(Vec::new()))
            }
        }
        d.deserialize_map(Vis(PhantomData))
    }
}

/// A column: `name: <expr>` or `name: {expr: <expr>, map: {...}, default: <value>}`.
#[allow(clippy::large_enum_variant)] // short-lived, one per column while parsing
pub enum ColumnSpec {
    Plain(String),
    Mapped {
        expr: Spanned<Scalar>,
        map: Spanned<Ordered<Option<Scalar>>>,
        /// `None`: no default given; `Some(None)`: `default: ~` (NULL).
        default: Option<Spanned<Option<Scalar>>>,
    },
}

const COLUMN_KEYS: &[&str] = &["expr", "map", "default"];

impl<'de> Deserialize<'de> for ColumnSpec {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ColumnSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an SQL expression, or a mapping with `expr`, `map` and `default`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ColumnSpec, E> {
                Ok(ColumnSpec::Plain(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<ColumnSpec, E> {
                Ok(ColumnSpec::Plain(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ColumnSpec, E> {
                Ok(ColumnSpec::Plain(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ColumnSpec, E> {
                Ok(ColumnSpec::Plain(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ColumnSpec, E> {
                Ok(ColumnSpec::Plain(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ColumnSpec, E> {
                Ok(ColumnSpec::Plain(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<ColumnSpec, E> {
                Err(E::custom(
                    "empty column expression: write an SQL expression, or leave the column out to take its default",
                ))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<ColumnSpec, A::Error> {
                let mut expr = None;
                let mut map = None;
                let mut default = None;
                while let Some(k) = m.next_key::<String>()? {
                    match k.as_str() {
                        "expr" if expr.is_none() => expr = Some(m.next_value()?),
                        "map" if map.is_none() => map = Some(m.next_value()?),
                        "default" if default.is_none() => default = Some(m.next_value()?),
                        "expr" | "map" | "default" => {
                            return Err(de::Error::duplicate_field(
                                COLUMN_KEYS.iter().find(|c| **c == k).unwrap(),
                            ));
                        }
                        other => return Err(de::Error::unknown_field(other, COLUMN_KEYS)),
                    }
                }
                let expr = expr.ok_or_else(|| de::Error::missing_field("expr"))?;
                let map = map.ok_or_else(|| {
                    de::Error::custom(
                        "a column written as a mapping needs `map:` (for a plain expression write `column: <expr>`)",
                    )
                })?;
                Ok(ColumnSpec::Mapped { expr, map, default })
            }
        }
        d.deserialize_any(V)
    }
}

/// `reverse: none`, or a map of blue column -> expression over the green table.
pub enum RawReverse {
    None,
    Columns(Ordered<Scalar>),
}

impl<'de> Deserialize<'de> for RawReverse {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawReverse;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "`none` or a mapping of blue columns to expressions over the green table",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawReverse, E> {
                if v == "none" {
                    Ok(RawReverse::None)
                } else {
                    Err(E::custom(format!(
                        "reverse must be `none` or a mapping of blue columns to expressions, found `{v}`"
                    )))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<RawReverse, A::Error> {
                Ordered::deserialize(de::value::MapAccessDeserializer::new(m))
                    .map(RawReverse::Columns)
            }
        }
        d.deserialize_any(V)
    }
}
