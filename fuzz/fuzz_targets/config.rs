//! The config loader (parse, then validate) on arbitrary text: never panics, a rejected file
//! always names at least one problem, and an accepted one has at least one endpoint, unique names,
//! and base URLs that parse back to themselves. Also the `[storage]`-only reader and `BaseUrl`.
#![no_main]

use ccgate::config::{BaseUrl, Config, StorageConfig};
use libfuzzer_sys::fuzz_target;

fn no_env(_: &str) -> Option<String> {
    None
}

/// Every variable is set: credentials named by `*_env` keys resolve.
fn full_env(name: &str) -> Option<String> {
    Some(format!("value-of-{name}"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for env in [&no_env as &dyn Fn(&str) -> Option<String>, &full_env] {
        match Config::from_toml(text, "fuzz.toml", &env) {
            Ok(c) => {
                assert!(!c.endpoints.is_empty());
                for (i, e) in c.endpoints.iter().enumerate() {
                    assert!(
                        c.endpoints[..i].iter().all(|o| o.name != e.name),
                        "duplicate endpoint name {:?}",
                        e.name
                    );
                    let shown = e.base_url.to_string();
                    assert_eq!(BaseUrl::parse(&shown).as_ref(), Ok(&e.base_url), "{shown}");
                }
            }
            Err(e) => {
                assert!(!e.problems.is_empty());
                let _ = e.to_string();
            }
        }
    }
    match StorageConfig::from_toml(text, "fuzz.toml") {
        Ok(_) => {}
        Err(e) => assert!(!e.problems.is_empty()),
    }
    if let Ok(u) = BaseUrl::parse(text) {
        let shown = u.to_string();
        assert_eq!(BaseUrl::parse(&shown).as_ref(), Ok(&u), "{shown}");
        if let Ok(pq) = http::uri::PathAndQuery::try_from("/v1/messages?beta=true") {
            let _ = u.uri(&pq);
        }
    }
});
