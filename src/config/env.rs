//! Where configuration comes from besides the file: the environment (behind a seam for tests) and
//! the config path every command resolves the same way.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Reads environment variables; a seam so tests need not touch the process environment.
pub trait Env {
    /// The variable's value, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;

    /// Whether the variable is set, to nothing (which [`Env::var`] reads as not set).
    fn is_empty(&self, _name: &str) -> bool {
        false
    }
}

/// What is wrong with `name` as the name a `*_env` key gives, if anything: a name is letters,
/// digits and `_`, not starting with a digit. The message never repeats the value, which may be
/// the secret itself pasted into the wrong key.
pub(crate) fn var_name_problem(name: &str) -> Option<&'static str> {
    let mut bytes = name.bytes();
    let valid = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    (!valid).then_some(
        "must name an environment variable (letters, digits and `_`); a secret itself goes in the key without `_env`",
    )
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }

    fn is_empty(&self, name: &str) -> bool {
        std::env::var_os(name).is_some_and(|v| v.is_empty())
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// The config file a command uses: `explicit` (`--config`), else `$CCGATE_CONFIG` (an empty value
/// counts as unset), else `<config dir>/ccgate/config.toml` (`$XDG_CONFIG_HOME` on Linux). The flag
/// says whether the user chose the file (by the option or the variable): a chosen file that does
/// not exist is an error, while the platform default may be missing. `None` when nothing names a
/// file and the platform has no config directory.
pub fn resolve_config_path(explicit: Option<&Path>, env: &dyn Env) -> Option<(PathBuf, bool)> {
    if let Some(p) = explicit {
        return Some((p.to_path_buf(), true));
    }
    if let Some(p) = env.var("CCGATE_CONFIG").filter(|p| !p.is_empty()) {
        return Some((PathBuf::from(p), true));
    }
    dirs::config_dir().map(|d| (d.join("ccgate").join("config.toml"), false))
}

/// Where `ccgate` looks for its configuration when `--config` is not given (see
/// [`resolve_config_path`]).
pub fn default_config_path(env: &dyn Env) -> Option<PathBuf> {
    resolve_config_path(None, env).map(|(path, _)| path)
}

/// The default listen address: [`DEFAULT_LISTEN`] as a `SocketAddr`, built without parsing
/// (`minimal_config_gets_defaults` checks that the two agree).
pub fn default_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7860)
}
