//! Stage one without stopping at a wrong type: a leaf value of the wrong type (`priority =
//! "high"`, `weight = 1.5`) is recorded as a problem and read as absent, so validation goes on and
//! reports it beside every other problem, under its full dotted key.
//!
//! serde gives a field's deserializer no way to reach a caller's problem list, so the problems go
//! to a list owned by the current thread for the duration of one [`collect`] call. Outside such a
//! call a wrong type stays a hard error.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;

use serde::de::{Deserialize, DeserializeOwned, Deserializer, Error as _};
use toml::Spanned;

/// A value of the wrong type: where it is written and what was expected.
pub(super) struct TypeProblem {
    /// Byte range of the value in the source.
    pub(super) span: Range<usize>,
    /// `expected an integer, found a string`.
    pub(super) message: String,
}

thread_local! {
    static FOUND: RefCell<Option<Vec<TypeProblem>>> = const { RefCell::new(None) };
}

/// Runs `parse`, collecting the type problems its lenient fields find instead of failing.
pub(super) fn collect<T>(parse: impl FnOnce() -> T) -> (T, Vec<TypeProblem>) {
    let outer = FOUND.with(|f| f.borrow_mut().replace(Vec::new()));
    let out = parse();
    let found = FOUND.with(|f| std::mem::replace(&mut *f.borrow_mut(), outer));
    (out, found.unwrap_or_default())
}

/// What a leaf type is called in a problem message.
pub(super) trait Expected {
    /// `an integer`, `a string`, ...
    const WHAT: &'static str;
}

impl Expected for i64 {
    const WHAT: &'static str = "an integer";
}
impl Expected for f64 {
    const WHAT: &'static str = "a number";
}
impl Expected for bool {
    const WHAT: &'static str = "true or false";
}
impl Expected for String {
    const WHAT: &'static str = "a string";
}
impl Expected for BTreeMap<String, String> {
    const WHAT: &'static str = "a table of strings";
}
impl Expected for Vec<String> {
    const WHAT: &'static str = "a list of strings";
}

/// `#[serde(default, deserialize_with = "lenient")]` for an `Option<Spanned<T>>` leaf: a value of
/// the wrong type is recorded (inside [`collect`]) and read as absent. The message names the types,
/// never the value, which may be a misplaced secret.
pub(super) fn lenient<'de, D, T>(de: D) -> Result<Option<Spanned<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Expected,
{
    let value = Spanned::<toml::Value>::deserialize(de)?;
    let span = value.span();
    let inner = value.into_inner();
    let found = inner.type_str();
    match T::deserialize(inner) {
        Ok(v) => Ok(Some(Spanned::new(span, v))),
        Err(_) => {
            let message = format!("expected {}, found {}", T::WHAT, article(found));
            if record(span, &message) {
                Ok(None)
            } else {
                Err(D::Error::custom(message))
            }
        }
    }
}

/// `#[serde(default, deserialize_with = "lenient_table")]` for a top-level table (or array of
/// tables): one of another type (`server = "x"`) is recorded (inside [`collect`]) and read as
/// absent, so the rest of the file is still read and every other problem reported with it. A
/// table is read through the file's own deserializer, so the spans inside it are kept.
pub(super) fn lenient_table<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    let value = Spanned::<TableOr<T>>::deserialize(de)?;
    let span = value.span();
    match value.into_inner() {
        TableOr::Table(t) => Ok(t),
        TableOr::Other(found) => {
            let message = format!("expected a table, found {}", article(found));
            if record(span, &message) {
                Ok(T::default())
            } else {
                Err(D::Error::custom(message))
            }
        }
    }
}

/// A table (or array of tables) read as `T`, or the type found instead.
enum TableOr<T> {
    Table(T),
    Other(&'static str),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for TableOr<T> {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
        use serde::de::{MapAccess, SeqAccess, Visitor};

        struct V<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = TableOr<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(TableOr::Table)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                T::deserialize(SeqAccessDeserializer::new(seq)).map(TableOr::Table)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(TableOr::Other("string"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(TableOr::Other("integer"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(TableOr::Other("integer"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(TableOr::Other("float"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(TableOr::Other("boolean"))
            }
        }

        de.deserialize_any(V(std::marker::PhantomData))
    }
}

/// Records a type problem for the [`collect`] under way; `false` outside one.
fn record(span: Range<usize>, message: &str) -> bool {
    FOUND.with(|f| match &mut *f.borrow_mut() {
        Some(list) => {
            list.push(TypeProblem {
                span,
                message: message.to_owned(),
            });
            true
        }
        None => false,
    })
}

fn article(type_name: &str) -> String {
    match type_name {
        "integer" | "array" => format!("an {type_name}"),
        other => format!("a {other}"),
    }
}
