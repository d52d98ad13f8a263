//! What cluster mode needs to know: where Redis is (a secret, since its URL may carry a password),
//! the key prefix that separates gateways sharing one Redis, and this instance's name. The config
//! loader builds a [`ClusterConfig`] from the `[cluster]` table; the timings in [`LinkOptions`] have
//! defaults that suit production and are shortened by tests.

use std::fmt;
use std::time::Duration;

/// A Redis URL (`redis://`, `rediss://`, `unix://`, `redis+unix://`). Its password is a secret like
/// the endpoint keys: `Debug` and `Display` print the URL with the password replaced by `***` (a
/// bare user-info part, which Redis may read as a password, is replaced whole).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Wraps a URL after checking its scheme and that the client accepts it. The error never
    /// contains the URL itself.
    pub fn new(url: impl Into<String>) -> Result<Self, ClusterConfigError> {
        let url = url.into();
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        if !matches!(scheme, "redis" | "rediss" | "unix" | "redis+unix") {
            return Err(ClusterConfigError::new(
                "cluster.redis_url: scheme must be redis, rediss or unix",
            ));
        }
        if let Err(e) = redis::Client::open(url.as_str()) {
            // Only the error's kind: its detail may quote the URL.
            return Err(ClusterConfigError(format!(
                "cluster.redis_url: not a valid Redis URL ({:?})",
                e.kind()
            )));
        }
        Ok(Self(url))
    }

    /// The URL itself, password included: only for opening the connection.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password (or bare user-info) replaced by `***`.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return "***".to_owned();
        };
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        match authority.rfind('@') {
            None => self.0.clone(),
            Some(at) => {
                let (userinfo, host) = (&authority[..at], &authority[at + 1..]);
                let shown = match userinfo.split_once(':') {
                    Some((user, _password)) => format!("{user}:***"),
                    None => "***".to_owned(),
                };
                format!("{scheme}://{shown}@{host}{tail}")
            }
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// The validated `[cluster]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Where Redis is (secret: its `Debug` hides the password).
    pub redis_url: RedisUrl,
    /// Prefix of every key and channel, so several gateways can share one Redis.
    pub key_prefix: String,
    /// This instance's name in the cluster view and in the news it publishes; unique per instance.
    pub instance: String,
}

impl ClusterConfig {
    /// Checks the prefix and instance name (non-empty, no whitespace or control characters, since
    /// both become parts of keys and of space-separated values in scripts).
    pub fn new(
        redis_url: RedisUrl,
        key_prefix: impl Into<String>,
        instance: impl Into<String>,
    ) -> Result<Self, ClusterConfigError> {
        let key_prefix = key_prefix.into();
        let instance = instance.into();
        for (what, value) in [("key_prefix", &key_prefix), ("instance", &instance)] {
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(ClusterConfigError(format!(
                    "cluster.{what}: must be non-empty, without spaces or control characters"
                )));
            }
        }
        Ok(Self {
            redis_url,
            key_prefix,
            instance,
        })
    }

    /// The default instance name: `HOST-PID`, unique on one machine and readable in the view.
    pub fn default_instance() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{host}-{}", std::process::id())
    }
}

/// A problem in the `[cluster]` table (never contains the Redis URL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfigError(String);

impl ClusterConfigError {
    fn new(msg: &str) -> Self {
        Self(msg.to_owned())
    }
}

impl fmt::Display for ClusterConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClusterConfigError {}

/// Timings of the link. The defaults keep Redis off the request path by a wide margin and notice a
/// lost Redis within about a heartbeat.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    /// Bound on opening a connection (TCP, TLS, `AUTH`, `SUBSCRIBE`).
    pub connect_timeout: Duration,
    /// Bound on any one command or script.
    pub command_timeout: Duration,
    /// How often the supervisor stamps this instance's heartbeat (which also checks the link and
    /// notices a Redis that lost its data).
    pub heartbeat_interval: Duration,
    /// First wait before reconnecting; doubles up to `backoff_max` (with jitter).
    pub backoff_min: Duration,
    /// Longest wait between reconnection attempts.
    pub backoff_max: Duration,
    /// How long an instance's own totals row outlives its last flush (the cluster-wide sums keep
    /// its contribution forever).
    pub instance_retention: Duration,
    /// Events buffered per subscriber before it lags (a lagging subscriber re-reads the shared
    /// view).
    pub event_capacity: usize,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_millis(500),
            heartbeat_interval: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            instance_retention: Duration::from_secs(24 * 3600),
            event_capacity: 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str, shown: &str) {
        let u = RedisUrl::new(url).expect("valid url");
        assert_eq!(u.redacted(), shown);
        assert_eq!(format!("{u}"), shown);
        assert_eq!(format!("{u:?}"), format!("RedisUrl({shown:?})"));
    }

    #[test]
    fn passwords_never_printed() {
        check("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0");
        check("redis://:s3cret@host:6379", "redis://:***@host:6379");
        check(
            "rediss://user:s3cret@host:6380/2",
            "rediss://user:***@host:6380/2",
        );
        check("redis://s3cret@host", "redis://***@host");
        check("rediss://u:p%40ss@h?x=1", "rediss://u:***@h?x=1");
        let cfg = ClusterConfig::new(
            RedisUrl::new("redis://:s3cret@host:6379").expect("url"),
            "ccgate",
            "a",
        )
        .expect("config");
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("host:6379"), "{debug}");
    }

    #[test]
    fn bad_values_refused_without_echoing_the_url() {
        let e = RedisUrl::new("http://:s3cret@host").expect_err("scheme");
        assert!(!e.to_string().contains("s3cret"));
        let url = RedisUrl::new("redis://h").expect("url");
        assert!(ClusterConfig::new(url.clone(), "", "a").is_err());
        assert!(ClusterConfig::new(url.clone(), "p", "a b").is_err());
        assert!(ClusterConfig::new(url, "p", "a").is_ok());
        assert!(!ClusterConfig::default_instance().is_empty());
    }
}
