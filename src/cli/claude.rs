//! `ccgate claude enable|disable`: points Claude Code at the gateway through its `settings.json`
//! (`env.ANTHROPIC_BASE_URL`, and `env.ANTHROPIC_AUTH_TOKEN` when the gateway has an access
//! token), and takes it away again.
//!
//! `enable` keeps two files beside the settings: `settings.json.ccgate-backup`, the original bytes,
//! and `settings.json.ccgate-record`, which says exactly which keys ccgate set, what they held
//! before (or that they were absent), and the exact text ccgate wrote. `disable` then restores:
//!
//! - when the file is still exactly what ccgate wrote, the backup goes back byte for byte (or the
//!   file is removed, when there was none before);
//! - when someone changed the file meanwhile, only ccgate's keys are undone — each one only if it
//!   still holds the value ccgate set — and every other change stays.
//!
//! **Invariant:** a settings file that is not valid JSON is never overwritten, and the user's
//! settings are never deleted, except a file that ccgate itself created and nobody changed since.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cli::edit::write_atomic;
use crate::config::Env;

/// The key that points Claude Code at a gateway.
pub const BASE_URL_KEY: &str = "ANTHROPIC_BASE_URL";
/// The key that carries the client credential Claude Code sends.
pub const AUTH_TOKEN_KEY: &str = "ANTHROPIC_AUTH_TOKEN";

/// The variable Claude Code reads extra request headers from (`Name: Value` lines).
pub const CUSTOM_HEADERS_KEY: &str = "ANTHROPIC_CUSTOM_HEADERS";

/// How Claude Code presents the gateway's access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenVia {
    /// As its credential (`ANTHROPIC_AUTH_TOKEN`): for a gateway whose endpoints hold their own
    /// keys, so that Claude Code needs no login of its own.
    AuthToken,
    /// In an `x-ccgate-token` header (`ANTHROPIC_CUSTOM_HEADERS`): for a gateway with
    /// `credential = "client"` endpoints, which need Claude Code's own login in `authorization`
    /// (`ANTHROPIC_AUTH_TOKEN` would take its place).
    Header,
}

impl TokenVia {
    /// The way for a gateway whose config has (or lacks) client-credential endpoints.
    pub fn for_gateway(client_credential: bool) -> Self {
        if client_credential {
            Self::Header
        } else {
            Self::AuthToken
        }
    }

    /// The variable it sets.
    pub fn key(self) -> &'static str {
        match self {
            Self::AuthToken => AUTH_TOKEN_KEY,
            Self::Header => CUSTOM_HEADERS_KEY,
        }
    }

    /// The variable to set and its value, given what that variable holds now (`current`: other
    /// custom headers are kept, an old `x-ccgate-token` line is replaced).
    pub fn variable(self, token: &str, current: Option<&str>) -> (&'static str, String) {
        match self {
            Self::AuthToken => (self.key(), token.to_string()),
            Self::Header => {
                let mut lines: Vec<&str> = current
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| {
                        let name = l.split(':').next().unwrap_or_default().trim();
                        !l.trim().is_empty() && !name.eq_ignore_ascii_case("x-ccgate-token")
                    })
                    .collect();
                let own = format!("x-ccgate-token: {token}");
                lines.push(&own);
                (self.key(), lines.join("\n"))
            }
        }
    }
}

/// Where Claude Code's settings live, and ccgate's files beside them.
#[derive(Clone, Debug)]
pub struct Paths {
    /// `settings.json`.
    pub settings: PathBuf,
    /// The original bytes, kept by `enable`.
    pub backup: PathBuf,
    /// What `enable` changed.
    pub record: PathBuf,
}

impl Paths {
    /// `$CLAUDE_CONFIG_DIR/settings.json` when that is set, else `$HOME/.claude/settings.json`.
    pub fn locate(env: &dyn Env) -> Result<Self, ClaudeError> {
        let dir = match env.var("CLAUDE_CONFIG_DIR") {
            Some(d) => PathBuf::from(d),
            None => env
                .var("HOME")
                .map(PathBuf::from)
                .or_else(dirs::home_dir)
                .ok_or(ClaudeError::NoHome)?
                .join(".claude"),
        };
        Ok(Self::in_dir(&dir))
    }

    /// The files in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            settings: dir.join("settings.json"),
            backup: dir.join("settings.json.ccgate-backup"),
            record: dir.join("settings.json.ccgate-record"),
        }
    }
}

/// Why Claude Code's settings were left alone.
#[derive(Debug, thiserror::Error)]
pub enum ClaudeError {
    /// Neither `$HOME` nor `$CLAUDE_CONFIG_DIR` says where the settings are.
    #[error("cannot find Claude Code's settings: set HOME or CLAUDE_CONFIG_DIR")]
    NoHome,
    /// The settings file is not JSON, or not an object.
    #[error(
        "{path} is not a valid settings file ({reason}); ccgate left it unchanged — fix it or move it away, then try again"
    )]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// ccgate's record beside the settings is damaged.
    #[error("{path} is damaged ({reason}); the original settings are in {backup}")]
    Record {
        /// The record.
        path: String,
        /// What is wrong.
        reason: String,
        /// The backup.
        backup: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClaudeError + '_ {
    move |source| ClaudeError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One key ccgate set in `env`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct KeyRecord {
    key: String,
    /// What it held before ccgate first set it; `None` when it was absent.
    previous: Option<Value>,
    /// What ccgate set it to.
    set: String,
}

/// `settings.json.ccgate-record`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    /// Format version.
    ccgate_record: u32,
    /// Whether `settings.json` existed before ccgate first changed it.
    existed: bool,
    /// Whether the backup still describes the file minus ccgate's changes, so `disable` may put
    /// it back byte for byte (false once someone else changed the file between two `enable`s).
    restore_backup: bool,
    /// Whether the settings had an `env` object before.
    env_existed: bool,
    /// Whether ccgate created the settings directory.
    created_dir: bool,
    /// The keys ccgate set.
    keys: Vec<KeyRecord>,
    /// The exact text ccgate last wrote to `settings.json`.
    written: String,
}

/// What `enable` did.
#[derive(Debug)]
pub struct Enabled {
    /// The settings file.
    pub settings: PathBuf,
    /// The keys now set (names only).
    pub keys: Vec<&'static str>,
    /// Where the original is kept, if there was one.
    pub backup: Option<PathBuf>,
    /// `env.ANTHROPIC_API_KEY` is set too: Claude Code will send it as well.
    pub api_key_also_set: bool,
}

/// What `disable` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Disabled {
    /// The original file is back, byte for byte.
    Restored,
    /// The file did not exist before ccgate created it, and is gone again.
    Removed,
    /// Someone changed the file meanwhile: only ccgate's keys were undone.
    KeysUndone,
    /// There was nothing of ccgate's to undo.
    NothingToDo,
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, ClaudeError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn parse_settings(path: &Path, bytes: &[u8]) -> Result<Map<String, Value>, ClaudeError> {
    let invalid = |reason: String| ClaudeError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    // An empty file is what some editors leave behind; treat it as no settings.
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(invalid("the top level is not a JSON object".into())),
        // serde_json's message names a line and column, never the text around it.
        Err(e) => Err(invalid(format!("invalid JSON: {e}"))),
    }
}

fn env_object<'a>(
    root: &'a mut Map<String, Value>,
    path: &Path,
) -> Result<&'a mut Map<String, Value>, ClaudeError> {
    root.entry("env")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| ClaudeError::Invalid {
            path: path.display().to_string(),
            reason: "`env` is not a JSON object".into(),
        })
}

/// Pretty JSON as Claude Code writes it (two-space indent), ending in a newline when the original
/// did (or when there was no original).
fn render(root: &Map<String, Value>, trailing_newline: bool) -> String {
    let mut s = serde_json::to_string_pretty(root).unwrap_or_else(|_| "{}".into());
    if trailing_newline {
        s.push('\n');
    }
    s
}

fn read_record(paths: &Paths) -> Result<Option<Record>, ClaudeError> {
    let Some(bytes) = read_optional(&paths.record)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ClaudeError::Record {
            path: paths.record.display().to_string(),
            reason: e.to_string(),
            backup: paths.backup.display().to_string(),
        })
}

fn write_record(paths: &Paths, record: &Record) -> Result<(), ClaudeError> {
    let text = serde_json::to_string_pretty(record).unwrap_or_default();
    write_atomic(&paths.record, text.as_bytes(), 0o600).map_err(io_err(&paths.record))
}

/// Points Claude Code at `url`, with `token` presented `via` the way the gateway needs when it
/// has one.
pub fn enable(
    paths: &Paths,
    url: &str,
    token: Option<&str>,
    via: TokenVia,
) -> Result<Enabled, ClaudeError> {
    let settings = &paths.settings;
    let original = read_optional(settings)?;
    let mut root = match &original {
        Some(bytes) => parse_settings(settings, bytes)?,
        None => Map::new(),
    };
    // Check the shape before anything is written, backup included.
    let env_existed = root.contains_key("env");
    env_object(&mut root, settings)?;
    let dir = settings.parent().map(Path::to_path_buf);
    let dir_exists = dir.as_deref().is_none_or(Path::is_dir);
    let mut record = match (read_record(paths)?, &original) {
        // Enabled before, and the file is still there: keep the first record's "before" values.
        (Some(mut r), Some(bytes)) => {
            if bytes.as_slice() != r.written.as_bytes() {
                r.restore_backup = false;
            }
            r
        }
        // First enable (or the settings vanished since: start afresh).
        (_, original) => {
            if let Some(bytes) = original {
                write_atomic(&paths.backup, bytes, 0o600).map_err(io_err(&paths.backup))?;
            }
            Record {
                ccgate_record: 1,
                existed: original.is_some(),
                restore_backup: true,
                env_existed,
                created_dir: !dir_exists,
                keys: Vec::new(),
                written: String::new(),
            }
        }
    };
    let env = env_object(&mut root, settings)?;
    let mut wanted: Vec<(&'static str, String)> = vec![(BASE_URL_KEY, url.to_string())];
    if let Some(t) = token {
        // What the variable held before ccgate set it, not ccgate's own earlier value.
        let key = via.key();
        let before = match record.keys.iter().find(|k| k.key == key) {
            Some(k) => k.previous.clone(),
            None => env.get(key).cloned(),
        };
        wanted.push(via.variable(t, before.as_ref().and_then(Value::as_str)));
    }
    // A key set by an earlier enable that is no longer wanted (the gateway dropped its access
    // token): give it back its old value now.
    record.keys.retain(|k| {
        if wanted.iter().any(|(w, _)| *w == k.key) {
            return true;
        }
        undo_key(env, k);
        false
    });
    for (key, value) in &wanted {
        match record.keys.iter_mut().find(|k| k.key == *key) {
            Some(k) => k.set.clone_from(value),
            None => record.keys.push(KeyRecord {
                key: (*key).to_string(),
                previous: env.get(*key).cloned(),
                set: value.clone(),
            }),
        }
        env.insert((*key).to_string(), Value::String(value.clone()));
    }
    let api_key_also_set = env.contains_key("ANTHROPIC_API_KEY");
    let newline = original.as_ref().is_none_or(|b| b.ends_with(b"\n"));
    let text = render(&root, newline);
    record.written = text.clone();
    if let Some(dir) = &dir {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    // The record first: if we stop between the two writes, the record does not match the file,
    // and `disable` falls back to undoing keys, which is always safe.
    write_record(paths, &record)?;
    write_atomic(settings, text.as_bytes(), 0o600).map_err(io_err(settings))?;
    Ok(Enabled {
        settings: settings.clone(),
        keys: wanted.iter().map(|(k, _)| *k).collect(),
        backup: record.existed.then(|| paths.backup.clone()),
        api_key_also_set,
    })
}

/// Puts back what a key held before ccgate set it, if it still holds ccgate's value.
fn undo_key(env: &mut Map<String, Value>, k: &KeyRecord) {
    if env.get(&k.key).and_then(Value::as_str) != Some(k.set.as_str()) {
        return;
    }
    match &k.previous {
        Some(v) => {
            env.insert(k.key.clone(), v.clone());
        }
        None => {
            env.shift_remove(&k.key);
        }
    }
}

/// Undoes `enable`: see the module docs for exactly what comes back.
pub fn disable(paths: &Paths) -> Result<Disabled, ClaudeError> {
    let Some(record) = read_record(paths)? else {
        return Ok(Disabled::NothingToDo);
    };
    let settings = &paths.settings;
    let outcome = match read_optional(settings)? {
        None => Disabled::NothingToDo,
        Some(current) if record.restore_backup && current == record.written.as_bytes() => {
            if record.existed {
                let backup = std::fs::read(&paths.backup).map_err(io_err(&paths.backup))?;
                write_atomic(settings, &backup, 0o600).map_err(io_err(settings))?;
                Disabled::Restored
            } else {
                std::fs::remove_file(settings).map_err(io_err(settings))?;
                Disabled::Removed
            }
        }
        Some(current) => {
            let mut root = parse_settings(settings, &current)?;
            if let Some(env) = root.get_mut("env").and_then(Value::as_object_mut) {
                for k in &record.keys {
                    undo_key(env, k);
                }
                if env.is_empty() && !record.env_existed {
                    root.shift_remove("env");
                }
            }
            let text = render(&root, current.ends_with(b"\n"));
            if text.as_bytes() != current.as_slice() {
                write_atomic(settings, text.as_bytes(), 0o600).map_err(io_err(settings))?;
            }
            Disabled::KeysUndone
        }
    };
    for f in [&paths.record, &paths.backup] {
        match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(f)(e)),
            _ => {}
        }
    }
    if outcome == Disabled::Removed && record.created_dir {
        // Only when empty: anything else in it is not ours.
        if let Some(dir) = settings.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(original: Option<&str>) -> (tempfile::TempDir, Paths) {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::in_dir(&dir.path().join(".claude"));
        if let Some(text) = original {
            std::fs::create_dir_all(dir.path().join(".claude")).expect("mkdir");
            std::fs::write(&paths.settings, text).expect("write");
        }
        (dir, paths)
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).expect("read")
    }

    const ORIGINAL: &str = "{\n    \"model\": \"opus\",\n  \"env\": {\"FOO\": \"1\", \"ANTHROPIC_BASE_URL\": \"http://old\"},\n  \"permissions\": {\"allow\": [\"Bash(ls)\"]}\n}";

    #[test]
    fn enable_sets_keys_in_place_and_disable_restores_bytes() {
        let (_d, p) = setup(Some(ORIGINAL));
        let e = enable(
            &p,
            "http://127.0.0.1:7860",
            Some("tok"),
            TokenVia::AuthToken,
        )
        .expect("enabled");
        assert_eq!(e.keys, [BASE_URL_KEY, AUTH_TOKEN_KEY]);
        let v: Value = serde_json::from_str(&read(&p.settings)).expect("json");
        let keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        assert_eq!(keys, ["model", "env", "permissions"]);
        let env: Vec<(&String, &Value)> = v["env"].as_object().expect("env").iter().collect();
        assert_eq!(
            format!("{env:?}"),
            r#"[("FOO", String("1")), ("ANTHROPIC_BASE_URL", String("http://127.0.0.1:7860")), ("ANTHROPIC_AUTH_TOKEN", String("tok"))]"#
        );
        // Enabling twice keeps the first "before" values.
        enable(&p, "http://127.0.0.1:9999", None, TokenVia::AuthToken).expect("enabled again");
        assert_eq!(disable(&p).expect("disabled"), Disabled::Restored);
        assert_eq!(read(&p.settings), ORIGINAL);
        assert!(!p.backup.exists() && !p.record.exists());
    }

    /// With `credential = "client"` endpoints the token goes in a header, beside the user's own
    /// custom headers, and Claude Code's login stays its own; disable gives the headers back.
    #[test]
    fn for_client_credential_endpoints_the_token_travels_in_a_header() {
        let original = "{\"env\": {\"ANTHROPIC_CUSTOM_HEADERS\": \"x-team: blue\"}}\n";
        let (_d, p) = setup(Some(original));
        let e = enable(&p, "http://gw", Some("tok"), TokenVia::Header).expect("enabled");
        assert_eq!(e.keys, [BASE_URL_KEY, CUSTOM_HEADERS_KEY]);
        let v: Value = serde_json::from_str(&read(&p.settings)).expect("json");
        assert_eq!(
            v["env"][CUSTOM_HEADERS_KEY],
            "x-team: blue\nx-ccgate-token: tok"
        );
        assert!(v["env"].get(AUTH_TOKEN_KEY).is_none(), "{v}");
        // Again with a new token: one token line, the user's header kept once.
        enable(&p, "http://gw", Some("tok2"), TokenVia::Header).expect("enabled again");
        let v: Value = serde_json::from_str(&read(&p.settings)).expect("json");
        assert_eq!(
            v["env"][CUSTOM_HEADERS_KEY],
            "x-team: blue\nx-ccgate-token: tok2"
        );
        assert_eq!(disable(&p).expect("disabled"), Disabled::Restored);
        assert_eq!(read(&p.settings), original);
    }

    #[test]
    fn without_a_file_disable_removes_what_enable_created() {
        let (d, p) = setup(None);
        enable(&p, "http://x", None, TokenVia::AuthToken).expect("enabled");
        assert!(p.settings.exists());
        assert_eq!(disable(&p).expect("disabled"), Disabled::Removed);
        assert!(!p.settings.exists());
        assert!(!d.path().join(".claude").exists());
        assert_eq!(disable(&p).expect("again"), Disabled::NothingToDo);
    }

    #[test]
    fn changes_made_meanwhile_are_kept() {
        let (_d, p) = setup(Some(ORIGINAL));
        enable(&p, "http://gw", Some("tok"), TokenVia::AuthToken).expect("enabled");
        let mut v: Value = serde_json::from_str(&read(&p.settings)).expect("json");
        v["theme"] = "dark".into();
        v["env"]["ANTHROPIC_AUTH_TOKEN"] = "mine".into();
        std::fs::write(&p.settings, serde_json::to_string(&v).expect("json")).expect("write");
        assert_eq!(disable(&p).expect("disabled"), Disabled::KeysUndone);
        let v: Value = serde_json::from_str(&read(&p.settings)).expect("json");
        assert_eq!(v["theme"], "dark");
        assert_eq!(v["env"]["ANTHROPIC_BASE_URL"], "http://old");
        // Changed by the user after ccgate set it: theirs now.
        assert_eq!(v["env"]["ANTHROPIC_AUTH_TOKEN"], "mine");
        assert_eq!(v["env"]["FOO"], "1");
    }

    #[test]
    fn invalid_json_is_refused_and_left_alone() {
        for bad in ["{\"env\": ", "[1, 2]", "{\"env\": 3}"] {
            let (_d, p) = setup(Some(bad));
            let err = enable(&p, "http://gw", None, TokenVia::AuthToken).expect_err("refused");
            assert!(matches!(err, ClaudeError::Invalid { .. }), "{err}");
            assert_eq!(read(&p.settings), bad);
            assert!(!p.record.exists() && !p.backup.exists());
        }
    }
}
