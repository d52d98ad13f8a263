//! Validation of one `[[endpoints]]` entry: name, base URL, exactly one credential, priority and
//! weight, models, model map, CA file and probe mode, every problem under its full key.

use crate::config::env::Env;
use crate::config::problems::Problems;
use crate::config::raw::*;
use crate::config::*;

pub(super) fn validate_endpoint(
    i: usize,
    spanned: &Spanned<RawEndpoint>,
    p: &mut Problems<'_>,
    env: &dyn Env,
    default_probe: ProbeMode,
) -> Option<EndpointConfig> {
    let ep = spanned.get_ref();
    let key = |k: &str| format!("endpoints[{i}].{k}");
    let before = p.list.len();

    let name = match &ep.name {
        None => {
            if !p.has(&key("name")) {
                p.at(spanned, key("name"), "is required");
            }
            String::new()
        }
        Some(n) => {
            let v = n.get_ref();
            if v.is_empty()
                || v.len() > 64
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                p.at(
                    n,
                    key("name"),
                    format!("`{v}` must be 1-64 characters of letters, digits, `-`, `_` or `.`"),
                );
            } else if v == "." || v == ".." {
                // A path segment of its own in `/_ccgate/endpoints/{name}/…`: unreachable there.
                p.at(n, key("name"), format!("`{v}` cannot name an endpoint"));
            }
            v.clone()
        }
    };
    let base_url = match &ep.base_url {
        None => {
            if !p.has(&key("base_url")) {
                p.at(spanned, key("base_url"), "is required");
            }
            None
        }
        Some(u) => match BaseUrl::parse(u.get_ref()) {
            Ok(b) => Some(b),
            Err(m) => {
                p.at(u, key("base_url"), m);
                None
            }
        },
    };

    let given: Vec<(&str, &Spanned<String>)> = [
        ("api_key", &ep.api_key),
        ("auth_token", &ep.auth_token),
        ("api_key_env", &ep.api_key_env),
        ("auth_token_env", &ep.auth_token_env),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let mistyped_credential = ["api_key", "auth_token", "api_key_env", "auth_token_env"]
        .iter()
        .any(|k| p.has(&key(k)));
    let client = match &ep.credential {
        None => false,
        Some(c) if c.get_ref() == "client" => {
            if let Some((k, _)) = given.first() {
                p.at(
                    c,
                    key("credential"),
                    format!(
                        "`credential = \"client\"` forwards the client's own credential: remove {k}"
                    ),
                );
            }
            true
        }
        Some(c) => {
            p.at(
                c,
                key("credential"),
                format!(
                    "`{}` is not a credential source; the only one is \"client\"",
                    c.get_ref()
                ),
            );
            false
        }
    };
    let credential = match given.as_slice() {
        _ if client => Some(Credential::Client),
        [] if mistyped_credential || p.has(&key("credential")) => None,
        [] => {
            p.at(
                spanned,
                key("api_key"),
                "no credential: set one of api_key, auth_token, api_key_env, auth_token_env or credential = \"client\"",
            );
            None
        }
        [(k, v)] => {
            let value = if k.ends_with("_env") {
                p.env_var(v, key(k), env)
            } else if v.get_ref().is_empty() {
                p.at(*v, key(k), "must not be empty");
                None
            } else {
                Some(v.get_ref().clone())
            };
            value.and_then(|s| {
                if s.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                    p.at(
                        *v,
                        key(k),
                        "the credential contains spaces or control characters",
                    );
                    return None;
                }
                Some(if k.starts_with("api_key") {
                    Credential::ApiKey(Secret::new(s))
                } else {
                    Credential::AuthToken(Secret::new(s))
                })
            })
        }
        [_, (k, v), ..] => {
            let names: Vec<&str> = given.iter().map(|(k, _)| *k).collect();
            p.at(
                *v,
                key(k),
                format!(
                    "an endpoint has exactly one credential, but {} are set",
                    names.join(", ")
                ),
            );
            None
        }
    };
    let priority = p.int_in(
        &ep.priority,
        &key("priority"),
        0,
        1_000_000,
        i64::from(DEFAULT_PRIORITY),
    ) as u32;
    let weight = p.int_in(
        &ep.weight,
        &key("weight"),
        1,
        1_000_000,
        i64::from(DEFAULT_WEIGHT),
    ) as u32;
    let model_map = ep
        .model_map
        .as_ref()
        .map(|m| m.get_ref().clone())
        .unwrap_or_default();
    if let Some(m) = &ep.model_map
        && m.get_ref()
            .iter()
            .any(|(k, v)| k.is_empty() || v.is_empty())
    {
        p.at(m, key("model_map"), "model names must not be empty");
    }
    let models = ep.models.as_ref().map(|m| {
        let list = m.get_ref();
        if list.is_empty() {
            p.at(
                m,
                key("models"),
                "lists no model: leave it out to serve every model",
            );
        }
        if list.iter().any(|s| s.trim().is_empty()) {
            p.at(m, key("models"), "model patterns must not be empty");
        }
        ModelPatterns::new(list.clone())
    });
    let ca_file = ep.ca_file.as_ref().map(|f| PathBuf::from(f.get_ref()));
    if let (Some(f), Some(path)) = (&ep.ca_file, &ca_file)
        && !path.is_file()
    {
        p.at(
            f,
            key("ca_file"),
            format!("`{}` is not a readable file", path.display()),
        );
    }
    let probe = match &ep.probe {
        None => default_probe,
        Some(v) => ProbeMode::parse(v.get_ref()).unwrap_or_else(|m| {
            p.at(v, key("probe"), m);
            default_probe
        }),
    };
    if p.list.len() != before {
        return None;
    }
    Some(EndpointConfig {
        name,
        base_url: base_url?,
        credential: credential?,
        priority,
        weight,
        enabled: ep.enabled.as_ref().is_none_or(|e| *e.get_ref()),
        model_map,
        models,
        ca_file,
        http2: ep.http2.as_ref().is_some_and(|h| *h.get_ref()),
        probe,
    })
}
