//! Format-preserving edits of the config file, for `ccgate endpoints add|remove|enable|disable`.
//!
//! The file is edited with `toml_edit`, which keeps every comment, blank line and key order the user
//! wrote: an added endpoint becomes one new `[[endpoints]]` block after the last one, a removed
//! endpoint takes only its own block (and the comment lines directly above its header) with it, and
//! `enable`/`disable` touch only the `enabled` value of one block (keeping an inline comment after
//! it). These functions work on text and return text; the caller validates the result with
//! [`crate::config::Config::from_toml`] and writes it with [`write_atomic`].
//!
//! **Invariant:** nothing here ever puts a credential into an error message or a listing: TOML
//! syntax errors are reported by line and message only (never with the offending line, which may
//! hold a key), and [`Listed`] names a credential's kind, not its value.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use toml_edit::{ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value};

use crate::config::{DEFAULT_PRIORITY, DEFAULT_WEIGHT, toml_string};

/// The one credential of a new endpoint, as given on the command line.
#[derive(Clone)]
pub enum NewCredential {
    /// `api_key = "..."`.
    ApiKey(String),
    /// `auth_token = "..."`.
    AuthToken(String),
    /// `api_key_env = "VAR"`.
    ApiKeyEnv(String),
    /// `auth_token_env = "VAR"`.
    AuthTokenEnv(String),
}

impl NewCredential {
    /// The one credential among those given, first in this order: an API key, a bearer token, a
    /// variable holding an API key, a variable holding a bearer token. `None` when none is given.
    pub fn first_of(
        api_key: Option<String>,
        auth_token: Option<String>,
        api_key_env: Option<String>,
        auth_token_env: Option<String>,
    ) -> Option<Self> {
        api_key
            .map(Self::ApiKey)
            .or(auth_token.map(Self::AuthToken))
            .or(api_key_env.map(Self::ApiKeyEnv))
            .or(auth_token_env.map(Self::AuthTokenEnv))
    }

    /// The credential as one TOML line, `key = "value"` (quoted by [`toml_string`]), for a file
    /// written from scratch.
    pub fn toml_line(&self) -> String {
        let (key, value) = self.key_and_value();
        format!("{key} = {}", toml_string(value))
    }

    fn key_and_value(&self) -> (&'static str, &str) {
        match self {
            Self::ApiKey(v) => ("api_key", v),
            Self::AuthToken(v) => ("auth_token", v),
            Self::ApiKeyEnv(v) => ("api_key_env", v),
            Self::AuthTokenEnv(v) => ("auth_token_env", v),
        }
    }
}

impl fmt::Debug for NewCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret itself never reaches a Debug string; variable names are not secret.
        match self {
            Self::ApiKey(_) => f.write_str("ApiKey(***)"),
            Self::AuthToken(_) => f.write_str("AuthToken(***)"),
            Self::ApiKeyEnv(v) => write!(f, "ApiKeyEnv({v})"),
            Self::AuthTokenEnv(v) => write!(f, "AuthTokenEnv({v})"),
        }
    }
}

/// An endpoint to add.
#[derive(Clone, Debug)]
pub struct NewEndpoint {
    /// Unique name.
    pub name: String,
    /// Base URL.
    pub base_url: String,
    /// Its one credential.
    pub credential: NewCredential,
    /// `priority`, written only when given.
    pub priority: Option<u32>,
    /// `weight`, written only when given.
    pub weight: Option<u32>,
}

/// Why an edit could not be made. The messages never contain a credential.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// The file is not TOML.
    #[error("line {line}: not valid TOML: {message}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// The parser's message, without the offending line.
        message: String,
    },
    /// `endpoints` is something other than a list of tables.
    #[error("`endpoints` is not a list of [[endpoints]] tables; edit the file by hand")]
    Shape,
    /// No endpoint has that name.
    #[error("no endpoint named `{name}` (configured: {})", list_or_none(.have))]
    NotFound {
        /// The name asked for.
        name: String,
        /// The names there are.
        have: Vec<String>,
    },
    /// The name is taken.
    #[error("an endpoint named `{0}` already exists; remove it first or pick another name")]
    Exists(String),
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// One endpoint as the file declares it, for `ccgate endpoints list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Name (empty when missing).
    pub name: String,
    /// Base URL as written.
    pub base_url: String,
    /// `priority` (default [`DEFAULT_PRIORITY`]).
    pub priority: i64,
    /// `weight` (default [`DEFAULT_WEIGHT`]).
    pub weight: i64,
    /// `enabled` (default true).
    pub enabled: bool,
    /// Which credential key is set: `api_key`, `auth_token`, or `api_key_env (VAR)` /
    /// `auth_token_env (VAR)` — never the secret.
    pub credential: String,
}

fn parse(text: &str) -> Result<DocumentMut, EditError> {
    text.parse::<DocumentMut>().map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start).min(text.len());
        let line = text.as_bytes()[..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        EditError::Syntax {
            line,
            message: e.message().trim().replace('\n', "; "),
        }
    })
}

/// A view of the endpoint entries, whichever TOML form the file uses.
enum Entries<'a> {
    Tables(&'a mut ArrayOfTables),
    Inline(&'a mut toml_edit::Array),
    Missing,
}

fn entries(doc: &mut DocumentMut) -> Result<Entries<'_>, EditError> {
    match doc.get_mut("endpoints") {
        None => Ok(Entries::Missing),
        Some(Item::ArrayOfTables(a)) => Ok(Entries::Tables(a)),
        Some(Item::Value(Value::Array(a)))
            if a.iter().all(|v| matches!(v, Value::InlineTable(_))) =>
        {
            Ok(Entries::Inline(a))
        }
        Some(_) => Err(EditError::Shape),
    }
}

fn names(doc: &mut DocumentMut) -> Result<Vec<String>, EditError> {
    let name_of = |v: Option<&str>| v.unwrap_or("").to_string();
    Ok(match entries(doc)? {
        Entries::Tables(a) => a
            .iter()
            .map(|t| name_of(t.get("name").and_then(Item::as_str)))
            .collect(),
        Entries::Inline(a) => a
            .iter()
            .filter_map(Value::as_inline_table)
            .map(|t| name_of(t.get("name").and_then(Value::as_str)))
            .collect(),
        Entries::Missing => Vec::new(),
    })
}

fn position(doc: &mut DocumentMut, name: &str) -> Result<usize, EditError> {
    let have = names(doc)?;
    have.iter()
        .position(|n| n == name)
        .ok_or_else(|| EditError::NotFound {
            name: name.to_string(),
            have,
        })
}

/// Adds an endpoint as a new `[[endpoints]]` block after the last one.
pub fn add(text: &str, ep: &NewEndpoint) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    if names(&mut doc)?.iter().any(|n| n == &ep.name) {
        return Err(EditError::Exists(ep.name.clone()));
    }
    let (cred_key, cred_value) = ep.credential.key_and_value();
    let mut fields: Vec<(&str, Value)> = vec![
        ("name", ep.name.as_str().into()),
        ("base_url", ep.base_url.as_str().into()),
        (cred_key, cred_value.into()),
    ];
    if let Some(p) = ep.priority {
        fields.push(("priority", i64::from(p).into()));
    }
    if let Some(w) = ep.weight {
        fields.push(("weight", i64::from(w).into()));
    }
    match entries(&mut doc)? {
        Entries::Tables(a) => a.push(table_of(fields)),
        Entries::Inline(a) => {
            let mut t = InlineTable::new();
            for (k, v) in fields {
                t.insert(k, v);
            }
            a.push(t);
        }
        Entries::Missing => {
            let mut a = ArrayOfTables::new();
            a.push(table_of(fields));
            doc.insert("endpoints", Item::ArrayOfTables(a));
        }
    }
    Ok(doc.to_string())
}

fn table_of(fields: Vec<(&str, Value)>) -> Table {
    let mut t = Table::new();
    for (k, v) in fields {
        t.insert(k, Item::Value(v));
    }
    t
}

/// Removes the endpoint named `name`, with its block.
pub fn remove(text: &str, name: &str) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let i = position(&mut doc, name)?;
    match entries(&mut doc)? {
        Entries::Tables(a) => {
            a.remove(i);
        }
        Entries::Inline(a) => {
            a.remove(i);
        }
        Entries::Missing => {}
    }
    Ok(doc.to_string())
}

/// Sets `enabled` of the endpoint named `name`, keeping any comment after the value.
pub fn set_enabled(text: &str, name: &str, enabled: bool) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let i = position(&mut doc, name)?;
    let with_decor = |old: Option<&Value>| {
        let mut v = Value::from(enabled);
        if let Some(old) = old {
            *v.decor_mut() = old.decor().clone();
        }
        v
    };
    match entries(&mut doc)? {
        Entries::Tables(a) => {
            if let Some(t) = a.get_mut(i) {
                let v = with_decor(t.get("enabled").and_then(Item::as_value));
                t.insert("enabled", Item::Value(v));
            }
        }
        Entries::Inline(a) => {
            if let Some(t) = a.get_mut(i).and_then(Value::as_inline_table_mut) {
                let v = with_decor(t.get("enabled"));
                t.insert("enabled", v);
            }
        }
        Entries::Missing => {}
    }
    Ok(doc.to_string())
}

/// The endpoints the file declares, in file order, as written (defaults filled in).
pub fn list(text: &str) -> Result<Vec<Listed>, EditError> {
    let mut doc = parse(text)?;
    let tables: Vec<Table> = match entries(&mut doc)? {
        Entries::Tables(a) => a.iter().cloned().collect(),
        Entries::Inline(a) => a
            .iter()
            .filter_map(Value::as_inline_table)
            .map(|t| t.clone().into_table())
            .collect(),
        Entries::Missing => Vec::new(),
    };
    Ok(tables.iter().map(listed).collect())
}

fn listed(t: &Table) -> Listed {
    let s = |k: &str| t.get(k).and_then(Item::as_str).unwrap_or("").to_string();
    let credential = ["api_key", "auth_token", "api_key_env", "auth_token_env"]
        .iter()
        .filter(|k| t.contains_key(k))
        .map(|k| {
            if k.ends_with("_env") {
                format!("{k} ({})", s(k))
            } else {
                (*k).to_string()
            }
        })
        .collect::<Vec<_>>();
    Listed {
        name: s("name"),
        base_url: s("base_url"),
        priority: t
            .get("priority")
            .and_then(Item::as_integer)
            .unwrap_or(i64::from(DEFAULT_PRIORITY)),
        weight: t
            .get("weight")
            .and_then(Item::as_integer)
            .unwrap_or(i64::from(DEFAULT_WEIGHT)),
        enabled: t.get("enabled").and_then(Item::as_bool).unwrap_or(true),
        credential: if credential.is_empty() {
            "none".into()
        } else {
            credential.join(" + ")
        },
    }
}

/// Replaces `path` with `bytes` atomically: a temporary file in the same directory, synced, then
/// renamed over the target, so a reader (or a crash) sees the old file or the new one, never half
/// of one. A symlink is followed, so the file it points at is replaced and the link stays. The new
/// file gets the old file's permissions, or `new_mode` when there was no file.
pub fn write_atomic(path: &Path, bytes: &[u8], new_mode: u32) -> std::io::Result<()> {
    replace(path, bytes, Mode::KeepOr(new_mode))
}

/// Like [`write_atomic`], but the new file is readable and writable by its owner only (mode
/// `0600`), whatever the old file's permissions were. The mode is set before the rename, so the new
/// bytes are never readable by others.
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace(path, bytes, Mode::Exactly(0o600))
}

/// Holds the directory of `path` (its real file, through a symlink) locked while a command reads,
/// edits, writes and applies it: two commands at once take turns instead of each writing its
/// own edit over the other's. The directory, not the file: the file is replaced by a rename at
/// every write. Unlocked when the returned handle is dropped (or the process ends). `None` where
/// directories cannot be locked (a file system without locks, or not Unix): edits then do not
/// take turns, as before there was a lock.
pub fn lock_for_edit(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    #[cfg(unix)]
    {
        let handle = std::fs::File::open(dir_of(&resolve_symlink(path)))?;
        match handle.lock() {
            Ok(()) => Ok(Some(handle)),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => Ok(None),
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(None)
    }
}

/// `edited` with the line endings of `original`: the TOML editor writes `\n`, and a file whose
/// every line ended in `\r\n` keeps them (only the lines an edit touches may change).
pub fn keep_line_endings(original: &str, edited: String) -> String {
    let lines = original.matches('\n').count();
    if lines == 0 || original.matches("\r\n").count() != lines {
        return edited;
    }
    edited.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// Whether users other than the owner may read `path` (Unix; never elsewhere).
pub fn readable_by_others(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

/// The permissions of a replaced file.
#[cfg_attr(not(unix), allow(dead_code))]
enum Mode {
    /// The old file's, or this one when there was no file.
    KeepOr(u32),
    /// This one.
    Exactly(u32),
}

fn replace(path: &Path, bytes: &[u8], mode: Mode) -> std::io::Result<()> {
    let target = resolve_symlink(path);
    let dir = dir_of(&target);
    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    #[cfg(unix)]
    let mode = match mode {
        Mode::KeepOr(new_mode) => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&target).map_or(new_mode, |m| m.permissions().mode() & 0o7777)
        }
        Mode::Exactly(mode) => mode,
    };
    #[cfg(not(unix))]
    let _ = mode;
    // A unique name per attempt, so two concurrent writers never share a temporary file.
    let tmp = loop {
        let candidate = dir.join(format!(
            ".{file_name}.ccgate-{}-{:08x}.tmp",
            std::process::id(),
            fastrand::u32(..)
        ));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Owner-only while it is being written; the final mode is set before the rename.
            opts.mode(0o600);
        }
        match opts.open(&candidate) {
            Ok(f) => break (candidate, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let (tmp_path, mut file) = tmp;
    let result = (|| {
        file.write_all(bytes)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp_path, &target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_path);
    }
    result
}

/// The directory `file` is in (`.` for a bare file name).
fn dir_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The file a path finally names, following symlinks (also a dangling link's target), so an edit
/// replaces the file and keeps the link.
fn resolve_symlink(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    for _ in 0..16 {
        match std::fs::read_link(&p) {
            Ok(link) => {
                p = if link.is_absolute() {
                    link
                } else {
                    p.parent().map_or(link.clone(), |d| d.join(&link))
                };
            }
            Err(_) => break,
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# top comment\n\n[server]\nlisten = \"127.0.0.1:7860\"  # inline\n\n# about a\n[[endpoints]]\nname = \"a\"   # the first\nbase_url = \"http://a\"\napi_key = \"k\"\nenabled = true  # keep me\n# trailing in a\n\n[health]\nfailure_threshold = 3\n\n# trailing of doc\n";

    fn new(name: &str) -> NewEndpoint {
        NewEndpoint {
            name: name.into(),
            base_url: "https://relay.example/api".into(),
            credential: NewCredential::AuthToken("t0k\"en".into()),
            priority: Some(2),
            weight: None,
        }
    }

    #[test]
    fn add_inserts_one_block_and_keeps_everything_else() {
        let out = add(FILE, &new("b")).expect("added");
        let block = "\n[[endpoints]]\nname = \"b\"\nbase_url = \"https://relay.example/api\"\nauth_token = 't0k\"en'\npriority = 2\n";
        assert!(out.contains(block), "{out}");
        assert_eq!(out.replacen(block, "", 1), FILE);
        let l = list(&out).expect("listed");
        assert_eq!(l[1].name, "b");
        assert_eq!(l[1].credential, "auth_token");
        assert_eq!((l[1].priority, l[1].weight, l[1].enabled), (2, 100, true));
    }

    #[test]
    fn add_refuses_a_taken_name() {
        assert!(matches!(add(FILE, &new("a")), Err(EditError::Exists(_))));
    }

    #[test]
    fn add_to_a_file_without_endpoints_and_to_inline_arrays() {
        let out = add("[server]\nlisten = \"127.0.0.1:0\"\n", &new("b")).expect("added");
        assert!(out.starts_with("[server]\nlisten = \"127.0.0.1:0\"\n"));
        assert_eq!(list(&out).expect("listed")[0].name, "b");
        let inline = "endpoints = [{ name = \"a\", base_url = \"http://a\", api_key = \"k\" }]\n";
        let out = add(inline, &new("b")).expect("added");
        let names: Vec<String> = list(&out)
            .expect("listed")
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(
            add("endpoints = 3\n", &new("b")),
            Err(EditError::Shape)
        ));
    }

    #[test]
    fn enable_keeps_the_inline_comment_and_adds_the_key_when_missing() {
        let out = set_enabled(FILE, "a", false).expect("edited");
        assert_eq!(
            out,
            FILE.replace("enabled = true  # keep me", "enabled = false  # keep me")
        );
        let without = FILE.replace("enabled = true  # keep me\n", "");
        let out = set_enabled(&without, "a", false).expect("edited");
        assert_eq!(
            out,
            FILE.replace("enabled = true  # keep me\n", "enabled = false\n")
        );
        assert!(!list(&out).expect("listed")[0].enabled);
    }

    #[test]
    fn remove_takes_only_its_block() {
        let two = add(FILE, &new("b")).expect("added");
        assert_eq!(remove(&two, "b").expect("removed"), FILE);
        let err = remove(FILE, "zz").expect_err("unknown");
        assert_eq!(err.to_string(), "no endpoint named `zz` (configured: a)");
    }

    #[test]
    fn syntax_errors_name_the_line_but_not_the_value() {
        let text = "[[endpoints]]\nname = \"a\"\napi_key = sk-ant-SECRET\n";
        let err = list(text).expect_err("invalid");
        let msg = err.to_string();
        assert!(msg.starts_with("line 3:"), "{msg}");
        assert!(!msg.contains("SECRET"), "{msg}");
    }

    #[test]
    fn listing_names_the_credential_kind_only() {
        let text = "[[endpoints]]\nname = \"a\"\nbase_url = \"http://a\"\napi_key_env = \"VAR\"\n[[endpoints]]\nname = \"b\"\nbase_url = \"http://b\"\napi_key = \"sk-secret\"\n";
        let l = list(text).expect("listed");
        assert_eq!(l[0].credential, "api_key_env (VAR)");
        assert_eq!(l[1].credential, "api_key");
        assert!(!format!("{l:?}").contains("sk-secret"));
    }

    #[test]
    fn the_first_credential_given_wins_and_writes_one_line() {
        let c = |a: Option<&str>, b: Option<&str>, c: Option<&str>, d: Option<&str>| {
            let s = |v: Option<&str>| v.map(String::from);
            NewCredential::first_of(s(a), s(b), s(c), s(d)).map(|c| c.toml_line())
        };
        assert_eq!(
            c(Some("k\"1"), Some("t"), None, None).as_deref(),
            Some("api_key = 'k\"1'")
        );
        assert_eq!(
            c(None, Some("t"), Some("V"), None).as_deref(),
            Some("auth_token = \"t\"")
        );
        assert_eq!(
            c(None, None, Some("V"), Some("W")).as_deref(),
            Some("api_key_env = \"V\"")
        );
        assert_eq!(
            c(None, None, None, Some("W")).as_deref(),
            Some("auth_token_env = \"W\"")
        );
        assert_eq!(c(None, None, None, None), None);
    }

    #[cfg(unix)]
    #[test]
    fn private_atomic_write_is_owner_only_whatever_was_there() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "old").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_atomic_private(&path, b"new").expect("written");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let fresh = dir.path().join("fresh");
        write_atomic_private(&fresh, b"x").expect("written");
        let mode = std::fs::metadata(&fresh)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(left.len(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn atomic_write_keeps_the_mode_and_follows_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real.toml");
        std::fs::write(&real, "old").expect("write");
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        write_atomic(&link, b"new", 0o644).expect("written");
        assert_eq!(std::fs::read_to_string(&real).expect("read"), "new");
        assert!(
            std::fs::symlink_metadata(&link)
                .expect("stat")
                .file_type()
                .is_symlink()
        );
        let mode = std::fs::metadata(&real).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let fresh = dir.path().join("fresh");
        write_atomic(&fresh, b"x", 0o640).expect("written");
        let mode = std::fs::metadata(&fresh)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o640);
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(left.len(), 3);
    }
}
