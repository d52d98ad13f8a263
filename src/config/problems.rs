//! The problems a configuration has, collected with their line (from the value's span) and full
//! dotted key, so that every one is reported in one pass.

use crate::config::*;

/// The longest duration any setting takes: longer ones are mistakes, and past it clock
/// arithmetic and dates shown in views would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Collects problems with line numbers resolved against the source text.
pub(super) struct Problems<'a> {
    pub(super) text: &'a str,
    pub(super) list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub(super) fn new(text: &'a str) -> Self {
        Self {
            text,
            list: Vec::new(),
        }
    }

    /// `value` when nothing was wrong, else every problem found, reported against `source_name`
    /// in the order they were found.
    pub(super) fn finish<T>(self, source_name: &str, value: T) -> Result<T, ConfigError> {
        if self.list.is_empty() {
            Ok(value)
        } else {
            Err(self.into_error(source_name))
        }
    }

    /// The problems found, reported against `source_name`.
    pub(super) fn into_error(self, source_name: &str) -> ConfigError {
        ConfigError {
            source_name: source_name.into(),
            problems: self.list,
        }
    }

    /// Whether a problem was already reported under `key` (a value of the wrong type is read as
    /// absent: it must not be reported again as missing).
    pub(super) fn has(&self, key: &str) -> bool {
        self.list.iter().any(|p| p.key == key)
    }

    pub(super) fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(super) fn at<T>(
        &mut self,
        spanned: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let line = Some(self.line_of(spanned.span().start));
        self.list.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    /// The value of the environment variable that the `*_env` key `key` (at `var`) names; a
    /// problem is noted when the name is no variable name (without repeating it: it may be the
    /// secret itself) or the variable is not set.
    pub(super) fn env_var(
        &mut self,
        var: &Spanned<String>,
        key: impl Into<String>,
        env: &dyn crate::config::env::Env,
    ) -> Option<String> {
        let name = var.get_ref();
        if let Some(problem) = crate::config::env::var_name_problem(name) {
            self.at(var, key, problem);
            return None;
        }
        let value = env.var(name);
        if value.is_none() {
            // The environment's reader takes an empty value for none: say which it was.
            let what = if env.is_empty(name) {
                "is empty"
            } else {
                "is not set"
            };
            self.at(var, key, format!("environment variable `{name}` {what}"));
        }
        value
    }

    pub(super) fn at_line(
        &mut self,
        line: Option<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.list.push(Problem {
            line,
            key: key.into(),
            message: message.into(),
        });
    }

    pub(super) fn duration(
        &mut self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.at(v, key, "must be longer than zero");
                default
            }
            Ok(d) if d > MAX_DURATION => {
                self.at(v, key, "must be at most 365 days");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.at(
                    v,
                    key,
                    format!(
                        "`{}` is not a duration like \"30s\" or \"5m\" ({e})",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    pub(super) fn int_in(
        &mut self,
        v: &Option<Spanned<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: i64,
    ) -> i64 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < min || n > max {
            self.at(v, key, format!("{n} is out of range ({min}..={max})"));
            return default;
        }
        n
    }
}
