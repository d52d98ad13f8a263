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
            let recorded = FOUND.with(|f| match &mut *f.borrow_mut() {
                Some(list) => {
                    list.push(TypeProblem {
                        span,
                        message: message.clone(),
                    });
                    true
                }
                None => false,
            });
            if recorded {
                Ok(None)
            } else {
                Err(D::Error::custom(message))
            }
        }
    }
}

fn article(type_name: &str) -> String {
    match type_name {
        "integer" | "array" => format!("an {type_name}"),
        other => format!("a {other}"),
    }
}
