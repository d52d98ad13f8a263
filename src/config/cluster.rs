//! `[cluster]`: the opt-in table that makes several instances share health through one Redis.
//!
//! Only what the file says is checked here (the URL's scheme and that it names a host, the key
//! prefix and instance name as key parts); the cluster layer turns it into its own config when the
//! gateway starts. The URL may carry a password, so it is a [`Secret`] from the moment it is read:
//! problems name the key, never the value.

use std::time::Duration;

use toml::Spanned;

use crate::config::Secret;
use crate::config::env::Env;
use crate::config::problems::Problems;
use crate::config::raw::RawCluster;

/// Default `cluster.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "ccgate";

/// The validated `[cluster]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `redis://` or `rediss://` URL, password included (secret).
    pub redis_url: Secret,
    /// Prefix of every key and channel.
    pub key_prefix: String,
    /// This instance's name; `None` means `HOST-PID`.
    pub instance: Option<String>,
    /// How often this instance adds its counter deltas to the cluster totals.
    pub flush_interval: Duration,
}

/// A key part: non-empty, no whitespace or control characters.
fn key_part_ok(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Checks a Redis URL's shape without echoing it (it may hold a password).
fn url_problem(url: &str) -> Option<&'static str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some("must be a redis:// or rediss:// URL");
    };
    if !matches!(scheme, "redis" | "rediss") {
        return Some("must be a redis:// or rediss:// URL");
    }
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() || host.starts_with(':') {
        return Some("names no host");
    }
    None
}

fn secret_url(
    raw: &RawCluster,
    p: &mut Problems<'_>,
    env: &dyn Env,
) -> Option<(Secret, Spanned<()>)> {
    let span = |s: &Spanned<String>| Spanned::new(s.span(), ());
    match (&raw.redis_url, &raw.redis_url_env) {
        (Some(u), Some(_)) => {
            p.at(
                u,
                "cluster.redis_url",
                "set either redis_url or redis_url_env, not both",
            );
            None
        }
        (Some(u), None) => Some((Secret::new(u.get_ref().clone()), span(u))),
        (None, Some(var)) => p
            .env_var(var, "cluster.redis_url_env", env)
            .map(|v| (Secret::new(v), span(var))),
        (None, None) => {
            p.at_line(
                None,
                "cluster.redis_url",
                "[cluster] needs redis_url or redis_url_env",
            );
            None
        }
    }
}

/// Validates `[cluster]`, if present.
pub(super) fn validate_cluster(
    raw: &Option<RawCluster>,
    p: &mut Problems<'_>,
    env: &dyn Env,
) -> Option<ClusterSettings> {
    let raw = raw.as_ref()?;
    let url = secret_url(raw, p, env);
    if let Some((secret, at)) = &url
        && let Some(m) = url_problem(secret.expose())
    {
        let key = if raw.redis_url.is_some() {
            "cluster.redis_url"
        } else {
            "cluster.redis_url_env"
        };
        p.at(at, key, m);
    }
    let key_prefix = match &raw.key_prefix {
        None => DEFAULT_KEY_PREFIX.to_owned(),
        Some(v) => {
            if !key_part_ok(v.get_ref()) {
                p.at(
                    v,
                    "cluster.key_prefix",
                    "must be non-empty, without spaces or control characters",
                );
            }
            v.get_ref().clone()
        }
    };
    let instance = raw.instance.as_ref().map(|v| {
        if !key_part_ok(v.get_ref()) {
            p.at(
                v,
                "cluster.instance",
                "must be non-empty, without spaces or control characters",
            );
        }
        v.get_ref().clone()
    });
    let flush_interval = p.duration(
        &raw.flush_interval,
        "cluster.flush_interval",
        Duration::from_secs(1),
    );
    Some(ClusterSettings {
        redis_url: url?.0,
        key_prefix,
        instance,
        flush_interval,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(cluster: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let text = format!(
            "[[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\n\n[cluster]\n{cluster}\n"
        );
        let env = |v: &str| (v == "REDIS_URL").then(|| "rediss://u:envpw@host:6380".to_owned());
        crate::config::Config::from_toml(&text, "test", &env)
    }

    #[test]
    fn cluster_table_is_validated_and_its_password_never_shown() {
        let c = load("redis_url = \"redis://:s3cret@127.0.0.1:6379/0\"").expect("valid");
        let s = c.cluster.as_ref().expect("cluster");
        assert_eq!(s.key_prefix, DEFAULT_KEY_PREFIX);
        assert_eq!(s.instance, None);
        assert!(!format!("{c:?}").contains("s3cret"));
        let c = load("redis_url_env = \"REDIS_URL\"\ninstance = \"gw-1\"").expect("valid");
        let s = c.cluster.expect("cluster");
        assert_eq!(s.redis_url.expose(), "rediss://u:envpw@host:6380");
        assert_eq!(s.instance.as_deref(), Some("gw-1"));
        for bad in [
            "redis_url = \"http://:s3cret@host\"",
            "redis_url = \"redis://:s3cret@\"",
            "redis_url_env = \"NOPE\"",
            "key_prefix = \"a b\"\nredis_url = \"redis://h\"",
            "instance = \"\"\nredis_url = \"redis://h\"",
            "redis_url = \"redis://h\"\nredis_url_env = \"REDIS_URL\"",
            "key_prefix = \"p\"",
            "redis_url = \"redis://h\"\nunknown = 1",
        ] {
            let e = load(bad).expect_err(bad).to_string();
            assert!(e.contains("cluster."), "{bad}: {e}");
            assert!(!e.contains("s3cret"), "{bad}: {e}");
        }
        let none = crate::config::Config::from_toml(
            "[[endpoints]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\n",
            "test",
            &|_: &str| None,
        )
        .expect("valid");
        assert!(none.cluster.is_none());
    }

    #[test]
    fn url_shapes() {
        assert_eq!(url_problem("redis://127.0.0.1:6379/0"), None);
        assert_eq!(url_problem("rediss://u:pw@host:6380"), None);
        assert!(url_problem("http://host").is_some());
        assert!(url_problem("redis://").is_some());
        assert!(url_problem("redis://:pw@").is_some());
        assert!(url_problem("host:6379").is_some());
    }
}
