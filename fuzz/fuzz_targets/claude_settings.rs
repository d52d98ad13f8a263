//! The Claude Code `settings.json` editor (`claude::enable` / `claude::disable`) on arbitrary file
//! contents, in a scratch directory:
//! - never panics;
//! - a file that is not a JSON object (or whose `env` is not an object) is refused and left
//!   byte-for-byte alone, with no backup or record written;
//! - otherwise `enable` sets the keys, and `disable` right after restores the original bytes;
//! - and when the file changes between the two, `disable` undoes only ccgate's keys: the result is
//!   the original object plus the change.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use ccgate::cli::claude::{self, AUTH_TOKEN_KEY, BASE_URL_KEY, Disabled, Paths};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

const URL: &str = "http://127.0.0.1:7860";
const TOKEN: &str = "gateway-token";

fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        // tmpfs when there is one: the editor renames and syncs files on every run.
        let shm = Path::new("/dev/shm");
        let b = tempfile::Builder::new()
            .prefix("ccgate-fuzz-")
            .tempdir_in(if shm.is_dir() { shm } else { Path::new("/tmp") });
        b.expect("scratch dir")
    })
    .path()
}

fn expected_refusal(data: &[u8]) -> bool {
    if data.iter().all(u8::is_ascii_whitespace) {
        return false;
    }
    match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(m)) => m.get("env").is_some_and(|e| !e.is_object()),
        _ => true,
    }
}

fn object(bytes: &[u8]) -> Map<String, Value> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Map::new();
    }
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => m,
        other => panic!("not an object: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // Byte 0: bit 0 — with a token; bit 1 — change the file between enable and disable.
    let Some((&flags, original)) = data.split_first() else {
        return;
    };
    let token = (flags & 1 != 0).then_some(TOKEN);
    let meddle = flags & 2 != 0;

    let dir = scratch();
    let paths = Paths::in_dir(dir);
    for f in [&paths.settings, &paths.backup, &paths.record] {
        let _ = std::fs::remove_file(f);
    }
    std::fs::write(&paths.settings, original).expect("write settings");

    let enabled = claude::enable(&paths, URL, token, claude::TokenVia::AuthToken);
    if expected_refusal(original) {
        assert!(enabled.is_err(), "accepted {original:?}");
        assert_eq!(std::fs::read(&paths.settings).expect("settings"), original);
        assert!(!paths.backup.exists() && !paths.record.exists());
        return;
    }
    enabled.unwrap_or_else(|e| panic!("refused {original:?}: {e}"));

    let written = std::fs::read(&paths.settings).expect("settings");
    let now = object(&written);
    let env = now.get("env").and_then(Value::as_object).expect("env");
    assert_eq!(env.get(BASE_URL_KEY).and_then(Value::as_str), Some(URL));
    assert_eq!(
        env.get(AUTH_TOKEN_KEY).and_then(Value::as_str),
        token.or(
            // Without a token, ccgate leaves whatever was there.
            object(original)
                .get("env")
                .and_then(|e| e.get(AUTH_TOKEN_KEY))
                .and_then(Value::as_str),
        )
    );

    if !meddle {
        assert_eq!(
            claude::disable(&paths).expect("disable"),
            Disabled::Restored
        );
        assert_eq!(std::fs::read(&paths.settings).expect("settings"), original);
    } else {
        let mut changed = now.clone();
        changed.insert("ccgate_fuzz_extra".into(), Value::Bool(true));
        let text = serde_json::to_string_pretty(&changed).expect("render");
        std::fs::write(&paths.settings, text).expect("write settings");
        assert_eq!(
            claude::disable(&paths).expect("disable"),
            Disabled::KeysUndone
        );
        let mut want = object(original);
        want.insert("ccgate_fuzz_extra".into(), Value::Bool(true));
        let after = object(&std::fs::read(&paths.settings).expect("settings"));
        assert_eq!(after, want, "original {original:?}");
    }
    assert!(!paths.backup.exists() && !paths.record.exists());
});
