//! Table tests of loading and validating configuration text.
use crate::config::*;

fn no_env(_: &str) -> Option<String> {
    None
}

fn problems(text: &str) -> Vec<Problem> {
    Config::from_toml(text, "t.toml", &no_env)
        .expect_err("config should be rejected")
        .problems
}

const ONE: &str =
    "[[endpoints]]\nname = \"a\"\nbase_url = \"https://api.example.com\"\napi_key = \"k\"\n";

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::from_toml(ONE, "t.toml", &no_env).expect("valid");
    assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(c.server.strategy, Strategy::Priority);
    assert_eq!(c.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    assert_eq!(c.health.failure_threshold, 3);
    let e = &c.endpoints[0];
    assert_eq!((e.priority, e.weight, e.enabled), (1, 100, true));
    assert_eq!(e.credential, Credential::ApiKey(Secret::new("k")));
    assert_eq!(e.base_url.to_string(), "https://api.example.com");
    assert!(!e.http2, "HTTP/1.1 unless asked");
}

#[test]
fn http2_is_a_boolean_per_endpoint() {
    let c = Config::from_toml(&format!("{ONE}http2 = true\n"), "t.toml", &no_env).expect("valid");
    assert!(c.endpoints[0].http2);
    let got: Vec<(Option<usize>, String)> = problems(&format!("{ONE}http2 = \"yes\"\n"))
        .into_iter()
        .map(|p| (p.line, p.key))
        .collect();
    assert_eq!(got, vec![(Some(5), "endpoints[0].http2".into())]);
}

#[test]
fn every_problem_is_reported_with_line_and_key() {
    let text = r#"[server]
listen = "0.0.0.0:80"
strategy = "fastest"

[timeouts]
idle = "soon"

[[endpoints]]
name = "a"
base_url = "ftp://x"
api_key = "k"

[[endpoints]]
name = "a"
base_url = "https://b.example"
api_key = "k"
auth_token = "t"
weight = 0
"#;
    let got: Vec<(Option<usize>, String)> = problems(text)
        .into_iter()
        .map(|p| (p.line, p.key))
        .collect();
    let want: Vec<(Option<usize>, String)> = vec![
        (Some(2), "server.listen".into()),
        (Some(3), "server.strategy".into()),
        (Some(6), "timeouts.idle".into()),
        (Some(10), "endpoints[0].base_url".into()),
        // The duplicate is found although the first `a` is broken (issue 21 #2).
        (Some(14), "endpoints[1].name".into()),
        (Some(17), "endpoints[1].auth_token".into()),
        (Some(18), "endpoints[1].weight".into()),
    ];
    assert_eq!(got, want);
}

#[test]
fn duplicate_names_are_rejected() {
    let text = format!("{ONE}\n{ONE}");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "endpoints[1].name");
    assert_eq!(p[0].line, Some(7));
}

#[test]
fn unknown_key_names_its_line() {
    let p = problems("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n");
    assert_eq!(p.len(), 2, "{p:?}"); // and: no endpoints
    assert_eq!(p[0].line, Some(3));
    assert_eq!(p[0].key, "server.lisen");
    assert!(p[0].message.contains("unknown key"), "{}", p[0].message);
}

#[test]
fn unknown_keys_are_reported_with_every_other_problem() {
    let p = problems(
        "[server]\nlisen = 1\n[timeouts]\nidle = \"soon\"\n[[endpoints]]\nname = \"a\"\nbase_url = \"http://x\"\napi_key = \"k\"\ncolour = 1\n[[endpoints]]\nname = \"b\"\nbase_url = \"ftp://x\"\napi_key = \"k\"\n[nope]\nx = 1\n",
    );
    let keys: Vec<(Option<usize>, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
    assert_eq!(
        keys,
        [
            (Some(2), "server.lisen"),
            (Some(4), "timeouts.idle"),
            (Some(9), "endpoints[0].colour"),
            (Some(12), "endpoints[1].base_url"),
            (Some(14), "nope"),
        ]
    );
}

#[test]
fn a_syntax_error_never_echoes_the_value() {
    let p =
        problems("[[endpoints]]\nname = \"a\"\nbase_url = \"http://x\"\napi_key = sk-ant-SECRET\n");
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].line, Some(4));
    assert_eq!(p[0].key, "api_key");
    assert!(!format!("{p:?}").contains("SECRET"), "{p:?}");
}

#[test]
fn syntax_error_names_its_line() {
    let p = problems("[server\nlisten = 1\n");
    assert_eq!(p[0].line, Some(1));
}

#[test]
fn credentials_from_env() {
    let env = |k: &str| (k == "MY_TOKEN").then(|| "tok".to_string());
    let text = "[[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\nauth_token_env = \"MY_TOKEN\"\n";
    let c = Config::from_toml(text, "t", &env).expect("valid");
    assert_eq!(
        c.endpoints[0].credential,
        Credential::AuthToken(Secret::new("tok"))
    );
    let missing = text.replace("MY_TOKEN", "OTHER");
    let p = Config::from_toml(&missing, "t", &env)
        .expect_err("missing var")
        .problems;
    assert_eq!(p[0].key, "endpoints[0].auth_token_env");
    assert_eq!(p[0].line, Some(4));
}

/// A secret pasted into a `*_env` key is refused without being repeated in the message (audit:
/// "environment variable `sk-ant-...` is not set").
#[test]
fn a_secret_in_an_env_key_is_not_repeated() {
    const SECRET: &str = "sk-ant-api03-pasted-by-mistake";
    let texts = [
        format!(
            "[[endpoints]]\nname = \"a\"\nbase_url = \"http://h\"\napi_key_env = \"{SECRET}\"\n"
        ),
        format!("[server]\naccess_token_env = \"{SECRET}\"\n\n{ONE}"),
        format!("[cluster]\nredis_url_env = \"{SECRET}\"\n\n{ONE}"),
    ];
    for (text, key) in texts.iter().zip([
        "endpoints[0].api_key_env",
        "server.access_token_env",
        "cluster.redis_url_env",
    ]) {
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, key);
        assert!(
            p[0].message.contains("must name an environment variable"),
            "{p:?}"
        );
        assert!(!format!("{p:?}").contains(SECRET), "{p:?}");
    }
    // An access token no client could send.
    for token in ["two words", "line\\r\\nbreak", "tab\\there"] {
        let p = problems(&format!("[server]\naccess_token = \"{token}\"\n\n{ONE}"));
        assert_eq!(p[0].key, "server.access_token", "{token}: {p:?}");
    }
    // Names as the environment has them are fine.
    let env = |k: &str| (k == "_KEY_2").then(|| "k".to_string());
    let ok = "[[endpoints]]\nname = \"a\"\nbase_url = \"http://h\"\napi_key_env = \"_KEY_2\"\n";
    Config::from_toml(ok, "t", &env).expect("valid");
}

#[test]
fn missing_credential_and_name() {
    let p = problems("[[endpoints]]\nbase_url = \"http://h\"\n");
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["endpoints[0].name", "endpoints[0].api_key"]);
}

#[test]
fn no_endpoints_is_a_problem() {
    let p = problems("[server]\n");
    assert_eq!(p[0].key, "endpoints");
}

#[test]
fn non_loopback_needs_access_token() {
    let text = format!("[server]\nlisten = \"0.0.0.0:7860\"\naccess_token = \"s\"\n{ONE}");
    assert!(Config::from_toml(&text, "t", &no_env).is_ok());
}

#[test]
fn base_url_prefix_is_kept_without_trailing_slash() {
    let b = BaseUrl::parse("https://relay.example/api/").expect("valid");
    assert_eq!(b.path_prefix, "/api");
    assert_eq!(
        BaseUrl::parse("https://relay.example")
            .expect("valid")
            .path_prefix,
        ""
    );
    assert!(BaseUrl::parse("https://user:pw@relay.example").is_err());
    assert!(BaseUrl::parse("relay.example").is_err());
}

#[test]
fn base_url_uri_keeps_prefix_path_and_query() {
    let pq = |s: &str| http::uri::PathAndQuery::try_from(s).expect("valid");
    let cases = [
        (
            "https://relay.example/api/",
            "/v1/messages?beta=true",
            "https://relay.example/api/v1/messages?beta=true",
        ),
        (
            "http://127.0.0.1:8080",
            "/v1/messages?beta=true",
            "http://127.0.0.1:8080/v1/messages?beta=true",
        ),
        ("http://127.0.0.1:8080/", "/", "http://127.0.0.1:8080/"),
        (
            "https://relay.example",
            "/v1/models",
            "https://relay.example/v1/models",
        ),
    ];
    for (base, path, want) in cases {
        let uri = BaseUrl::parse(base)
            .expect("valid")
            .uri(&pq(path))
            .expect("uri");
        assert_eq!(uri.to_string(), want, "{base} + {path}");
        assert_eq!(
            uri.to_string(),
            BaseUrl::parse(base).expect("valid").join(path)
        );
    }
}

#[test]
fn pointing_at_itself_is_rejected() {
    let text = "[server]\nlisten = \"127.0.0.1:7860\"\n[[endpoints]]\nname = \"a\"\nbase_url = \"http://localhost:7860\"\napi_key = \"k\"\n";
    assert_eq!(problems(text)[0].key, "endpoints[0].base_url");
}

#[test]
fn env_fallback_config() {
    let env = |k: &str| match k {
        "ANTHROPIC_AUTH_TOKEN" => Some("t".to_string()),
        "ANTHROPIC_BASE_URL" => Some("https://relay.example/api".to_string()),
        _ => None,
    };
    let c = Config::from_anthropic_env(&env)
        .expect("some")
        .expect("valid");
    assert_eq!(
        c.endpoints[0].credential,
        Credential::AuthToken(Secret::new("t"))
    );
    assert_eq!(c.endpoints[0].base_url.path_prefix, "/api");
    assert!(Config::from_anthropic_env(&no_env).is_none());
}

#[test]
fn storage_defaults_and_problems() {
    let c = Config::from_toml(ONE, "t.toml", &no_env).expect("valid");
    assert_eq!(c.storage, StorageConfig::default());
    assert!(c.storage.enabled);
    assert_eq!(c.storage.flush_interval, Duration::from_secs(5));
    let text = format!(
        "[storage]\nenabled = false\npath = \"/tmp/x.db\"\nflush_interval = \"200ms\"\n{ONE}"
    );
    let c = Config::from_toml(&text, "t.toml", &no_env).expect("valid");
    assert!(!c.storage.enabled);
    assert_eq!(c.storage.path, Some(PathBuf::from("/tmp/x.db")));
    assert_eq!(c.storage.flush_interval, Duration::from_millis(200));
    let text = format!("[storage]\npath = \"\"\nflush_interval = \"1ms\"\nflsh = 1\n{ONE}");
    let got: Vec<(Option<usize>, String)> = problems(&text)
        .into_iter()
        .map(|p| (p.line, p.key))
        .collect();
    assert_eq!(
        got,
        [
            (Some(2), "storage.path".to_string()),
            (Some(3), "storage.flush_interval".to_string()),
            (Some(4), "storage.flsh".to_string()),
        ]
    );
    let only = StorageConfig::from_toml(
        "[server]\nwhatever = 1\n[storage]\nflush_interval = \"2s\"\n",
        "t.toml",
    )
    .expect("only [storage] is checked");
    assert_eq!(only.flush_interval, Duration::from_secs(2));
    let e = StorageConfig::from_toml("[storage]\nflush_interval = \"soon\"\n", "t.toml")
        .expect_err("bad duration");
    assert_eq!(e.problems[0].line, Some(2));
    // A file `toml` cannot read is reported where it breaks, under the table or key of that line
    // (as every reader of the config does), and never with the offending value.
    for (text, line, key) in [
        ("[server\nlisten = 1\n", 1, "server"),
        (
            "[storage]\nflush_interval = soon-SECRET\n",
            2,
            "flush_interval",
        ),
    ] {
        let e = StorageConfig::from_toml(text, "t.toml").expect_err("unreadable");
        let p = &e.problems[0];
        assert_eq!((p.line, p.key.as_str()), (Some(line), key), "{text}");
        assert!(!format!("{e:?}").contains("SECRET"), "{e:?}");
        let e = Prices::from_toml(text, "t.toml").expect_err("unreadable");
        assert_eq!(e.problems[0].key, key, "{text}");
    }
}

#[test]
fn secrets_are_redacted_in_debug() {
    let c = Config::from_toml(ONE, "t", &no_env).expect("valid");
    assert!(!format!("{c:?}").contains("\"k\""));
}

#[test]
fn model_patterns_match_globs() {
    let m = ModelPatterns::new(vec!["claude-sonnet-*".into(), "claude-haiku-4-?".into()]);
    for (model, serves) in [
        ("claude-sonnet-4-5", true),
        ("claude-sonnet-", true),
        ("claude-haiku-4-5", true),
        ("claude-haiku-4-50", false),
        ("claude-opus-4-1", false),
        ("xclaude-sonnet-4", false),
        ("", false),
    ] {
        assert_eq!(m.serves(model), serves, "{model}");
    }
    let any = ModelPatterns::new(vec!["*".into()]);
    assert!(any.serves("") && any.serves("anything"));
    let mid = ModelPatterns::new(vec!["claude-*-4-*".into()]);
    assert!(mid.serves("claude-opus-4-1") && !mid.serves("claude-opus-3-1"));
}

#[test]
fn models_are_validated() {
    let text = format!("{ONE}models = []\n");
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "endpoints[0].models");
    let text = format!("{ONE}models = [\"claude-sonnet-*\", \"claude-haiku-*\"]\n");
    let c = Config::from_toml(&text, "t.toml", &no_env).expect("valid");
    let models = c.endpoints[0].models.as_ref().expect("models");
    assert!(models.serves("claude-haiku-4-5") && !models.serves("claude-opus-4-1"));
}

#[test]
fn relay_limits_have_defaults_and_ranges() {
    let c = Config::from_toml(ONE, "t.toml", &no_env).expect("valid");
    assert_eq!(c.relay, RelayLimits::default());
    assert_eq!(c.relay.max_json_bytes, 4 * 1024 * 1024);
    let set = format!(
        "[relay]\nmax_json_bytes = 2048\nmax_preamble_bytes = 4096\nmax_preamble_events = 10\n\
         max_response_header_bytes = 8192\n{ONE}"
    );
    let c = Config::from_toml(&set, "t.toml", &no_env).expect("valid");
    assert_eq!(
        c.relay,
        RelayLimits {
            max_json_bytes: 2048,
            max_preamble_bytes: 4096,
            max_preamble_events: 10,
            max_response_header_bytes: 8192,
        }
    );
    let keys: Vec<String> = problems(&format!(
        "[relay]\nmax_json_bytes = 0\nmax_preamble_events = 1\nmax_response_header_bytes = 1048576\n{ONE}"
    ))
    .into_iter()
    .map(|p| p.key)
    .collect();
    assert_eq!(
        keys,
        [
            "relay.max_json_bytes",
            "relay.max_preamble_events",
            "relay.max_response_header_bytes"
        ]
    );
}

#[test]
fn base_url_ports_and_fragments_are_checked() {
    let with_url =
        |url: &str| format!("[[endpoints]]\nname = \"a\"\nbase_url = \"{url}\"\napi_key = \"k\"\n");
    for bad in [
        "http://127.0.0.1:99999",
        "http://127.0.0.1:65536",
        "https://h:0",
        "http://[::1]:70000/p",
        "http://h/p#f",
    ] {
        let got = problems(&with_url(bad));
        assert_eq!(got.len(), 1, "{bad}: {got:?}");
        assert_eq!(got[0].key, "endpoints[0].base_url", "{bad}");
    }
    for good in [
        "http://127.0.0.1:65535",
        "http://[::1]:8080/p",
        "http://[::1]/p",
        "https://h",
    ] {
        Config::from_toml(&with_url(good), "t.toml", &no_env).expect(good);
    }
}

#[test]
fn is_self_knows_every_way_to_name_the_listener() {
    let url = |s: &str| BaseUrl::parse(s).expect(s);
    let on = |s: &str| s.parse::<std::net::SocketAddr>().expect(s);
    for (base, listen, want) in [
        ("http://localhost:7860", "127.0.0.1:7860", true),
        ("http://LOCALHOST:7860", "127.0.0.1:7860", true),
        ("http://localhost.:7860", "127.0.0.1:7860", true),
        ("http://127.0.0.1:7860", "127.0.0.1:7860", true),
        ("http://0.0.0.0:7860", "127.0.0.1:7860", true),
        ("http://127.0.0.1:7860", "0.0.0.0:7860", true),
        ("http://[::1]:7860", "[::]:7860", true),
        ("http://10.1.2.3:7860", "10.1.2.3:7860", true),
        // Not this listener: another loopback address, another port, another host.
        ("http://127.0.0.2:7860", "127.0.0.1:7860", false),
        ("http://localhost:7861", "127.0.0.1:7860", false),
        ("http://relay.example:7860", "127.0.0.1:7860", false),
        ("http://localhost:7860", "127.0.0.1:0", false),
    ] {
        assert_eq!(is_self(&url(base), on(listen)), want, "{base} on {listen}");
    }
}

#[test]
fn durations_are_bounded() {
    for (key, value) in [
        ("[server]\nheader_read_timeout", "18446744073709551615s"),
        ("[health]\nrate_limit_cooldown", "8000y"),
        ("[health]\nprobe_interval", "366d"),
        ("[retry_budget]\nwindow", "2h"),
        ("[retry_budget]\nwindow", "1000000y"),
    ] {
        let text = format!("{key} = \"{value}\"\n{ONE}");
        let got = problems(&text);
        assert_eq!(got.len(), 1, "{key} = {value}: {got:?}");
        assert_eq!(got[0].line, Some(2), "{key}");
    }
    let text =
        format!("[health]\nrate_limit_cooldown = \"365d\"\n[retry_budget]\nwindow = \"1h\"\n{ONE}");
    Config::from_toml(&text, "t.toml", &no_env).expect("the longest accepted");
}

#[test]
fn dot_names_are_refused() {
    for name in [".", ".."] {
        let text = format!(
            "[[endpoints]]\nname = \"{name}\"\nbase_url = \"https://h\"\napi_key = \"k\"\n"
        );
        assert_eq!(problems(&text)[0].key, "endpoints[0].name", "{name}");
    }
}

#[test]
fn an_endless_file_is_refused_not_read_to_the_end() {
    let err = Config::load(std::path::Path::new("/dev/zero"), &no_env).expect_err("refused");
    let text = err.to_string();
    assert!(text.contains("larger than 16 MiB"), "{text}");
}

#[test]
fn an_empty_credential_variable_is_called_empty() {
    struct EmptyKey;
    impl crate::config::env::Env for EmptyKey {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
        fn is_empty(&self, name: &str) -> bool {
            name == "EMPTY_KEY"
        }
    }
    let text = "[[endpoints]]\nname = \"a\"\nbase_url = \"https://h\"\napi_key_env = \"EMPTY_KEY\"\n[[endpoints]]\nname = \"b\"\nbase_url = \"https://h\"\napi_key_env = \"UNSET_KEY\"\n";
    let err = Config::from_toml(text, "t.toml", &EmptyKey).expect_err("no credentials");
    let messages: Vec<&str> = err.problems.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "environment variable `EMPTY_KEY` is empty",
            "environment variable `UNSET_KEY` is not set"
        ]
    );
}

#[test]
fn a_table_of_the_wrong_type_hides_no_other_problem() {
    let text = "server = \"x\"\nhealth = 5\n\n[[endpoints]]\nname = \"a\"\nbase_url = \"ftp://h\"\napi_key = \"k\"\n";
    let got: Vec<(Option<usize>, String, String)> = problems(text)
        .into_iter()
        .map(|p| (p.line, p.key, p.message))
        .collect();
    assert_eq!(
        got,
        [
            (
                Some(1),
                "server".to_string(),
                "expected a table, found a string".to_string()
            ),
            (
                Some(2),
                "health".to_string(),
                "expected a table, found an integer".to_string()
            ),
            (
                Some(6),
                "endpoints[0].base_url".to_string(),
                "`ftp://h` must start with http:// or https://".to_string()
            ),
        ]
    );
    assert_eq!(
        problems("endpoints = 5\n")[0].message,
        "expected a table, found an integer"
    );
    // Tables of the right type are read as before, spans and all, `[cluster]` included.
    let c = Config::from_toml(
        &format!("[cluster]\nredis_url = \"redis://127.0.0.1:1\"\n[server]\nstrategy = \"round_robin\"\n{ONE}"),
        "t.toml",
        &no_env,
    )
    .expect("valid");
    assert_eq!(c.server.strategy, Strategy::RoundRobin);
    assert!(c.cluster.is_some());
}
