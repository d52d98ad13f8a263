//! Where the running gateway is and how to reach it: the config read leniently for the CLI's own
//! purposes, `--url` or `server.listen`, the access token, and a small client for its `/_ccgate/`
//! surface. The CLI never shares memory or files with the gateway beyond the config file itself.
//!
//! **Invariant:** access tokens only ever go into a request header.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::config::{Config, ConfigError, Env, Secret, resolve_config_path};
use crate::transport::replay::ReplayBody;

/// Stands in for an environment variable that is not set in the CLI's own environment: the
/// gateway may well have it, so an edit is not refused for it.
const UNSET_PLACEHOLDER: &str = "ccgate-unset-variable";

/// A config loaded for the CLI's own purposes (where the gateway listens, its token): a `*_env`
/// credential whose variable is not set here does not fail it.
pub struct Lenient {
    /// The configuration (credentials from unset variables hold a placeholder).
    pub config: Config,
    /// Variables the file names that are not set in this environment.
    pub unset: Vec<String>,
    /// Every variable the file names (`*_env` keys), set here or not, in file order.
    pub read: Vec<String>,
}

impl Lenient {
    /// Validates `text`, treating unset variables as set.
    pub fn from_toml(text: &str, source_name: &str, env: &dyn Env) -> Result<Self, ConfigError> {
        let unset = RefCell::new(Vec::new());
        let read = RefCell::new(Vec::<String>::new());
        let lenient = |name: &str| {
            let mut read = read.borrow_mut();
            if !read.iter().any(|r| r == name) {
                read.push(name.to_string());
            }
            env.var(name).or_else(|| {
                unset.borrow_mut().push(name.to_string());
                Some(UNSET_PLACEHOLDER.to_string())
            })
        };
        let config = Config::from_toml(text, source_name, &lenient)?;
        Ok(Self {
            config,
            unset: unset.into_inner(),
            read: read.into_inner(),
        })
    }

    /// The access token, unless it comes from a variable that is not set here.
    pub fn access_token(&self) -> Option<Secret> {
        self.config
            .server
            .access_token
            .clone()
            .filter(|t| t.expose() != UNSET_PLACEHOLDER)
    }
}

/// Where the running gateway is and how to authenticate to it.
#[derive(Clone)]
pub struct Target {
    /// `http://host:port` (no trailing slash).
    pub url: String,
    /// The access token, sent as `x-api-key`.
    pub token: Option<Secret>,
    /// Whether an endpoint of its config forwards the client's own credential
    /// (`credential = "client"`): Claude Code must then keep its login in `authorization` and
    /// send the access token in `x-ccgate-token`.
    pub client_credential: bool,
}

impl Target {
    /// The gateway a loaded config describes: at `url` (a `--url`, normalised) when given, else at
    /// `http://<server.listen>` (loopback for a wildcard address), with the config's access token.
    /// `None` when there is no `url` and `server.listen` uses port 0, so the address is not known.
    /// When there is a gateway to call but the access token comes from a variable that is not set
    /// here, says so on stderr: the gateway is then called without a token.
    pub fn from_lenient(loaded: &Lenient, url: Option<&str>) -> anyhow::Result<Option<Self>> {
        let url = url.map(normalize_url).transpose()?;
        let Some(url) = url.or_else(|| url_of_listen(loaded.config.server.listen)) else {
            return Ok(None);
        };
        let token = loaded.access_token();
        if token.is_none() && loaded.config.server.access_token.is_some() {
            eprintln!(
                "warning: server.access_token_env names a variable that is not set here; no access token is sent"
            );
        }
        Ok(Some(Self {
            url,
            token,
            client_credential: uses_client_credential(&loaded.config),
        }))
    }
}

/// Normalises a `--url`: `http://` is assumed when no scheme is given; the trailing slash goes.
pub fn normalize_url(url: &str) -> anyhow::Result<String> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let uri: http::Uri = with_scheme
        .parse()
        .map_err(|e| anyhow!("--url {url}: not a URL ({e})"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => bail!("--url {url}: must start with http:// or https://"),
    }
    if uri.authority().is_none() {
        bail!("--url {url}: has no host");
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

/// The URL a client on this machine uses for a listen address; `None` for port 0.
pub fn url_of_listen(addr: SocketAddr) -> Option<String> {
    if addr.port() == 0 {
        return None;
    }
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Some(format!("http://{}", SocketAddr::new(ip, addr.port())))
}

/// The config file named by `--config`, `$CCGATE_CONFIG` or the platform default.
pub fn config_path(explicit: Option<&Path>, env: &dyn Env) -> anyhow::Result<PathBuf> {
    resolve_config_path(explicit, env)
        .map(|(path, _)| path)
        .context("no config directory on this platform; pass --config")
}

/// Whether an endpoint of `config` forwards the client's own credential.
pub fn uses_client_credential(config: &crate::config::Config) -> bool {
    config
        .endpoints
        .iter()
        .any(|e| matches!(e.credential, crate::config::Credential::Client))
}

/// Finds the running gateway: `--url`, else `server.listen` of the config (loopback for a
/// wildcard address), with the config's access token. Without a config file, the default address;
/// a file named by `--config` or `$CCGATE_CONFIG` must exist.
pub fn find_target(
    explicit_config: Option<&Path>,
    url: Option<&str>,
    env: &dyn Env,
) -> anyhow::Result<Target> {
    // A bad --url is reported before anything is read.
    let url = url.map(normalize_url).transpose()?;
    let (path, chosen) = resolve_config_path(explicit_config, env)
        .context("no config directory on this platform; pass --config")?;
    let text = match crate::config::read_capped(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !chosen => None,
        Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
    };
    let Some(text) = text else {
        let default = url_of_listen(crate::config::default_listen()).unwrap_or_default();
        return Ok(Target {
            url: url.unwrap_or(default),
            token: None,
            client_credential: false,
        });
    };
    let loaded = match Lenient::from_toml(&text, &path.display().to_string(), env) {
        Ok(l) => l,
        // With --url, a broken config only costs us the token.
        Err(e) if url.is_some() => {
            eprintln!(
                "warning: {} does not load, so no access token is sent:\n{e}",
                path.display()
            );
            return Ok(Target {
                url: url.unwrap_or_default(),
                token: None,
                client_credential: false,
            });
        }
        Err(e) => return Err(e.into()),
    };
    Target::from_lenient(&loaded, url.as_deref())?.ok_or_else(|| {
        anyhow!(
            "server.listen in {} uses port 0, so the gateway's address is not known: pass --url http://ADDR (the address `ccgate serve` printed)",
            path.display()
        )
    })
}

/// Why a call to the gateway got no answer: nothing answered (connection refused, timeout, no
/// such host); the message says which.
#[derive(Debug)]
pub struct CallError(pub String);

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A small client for the gateway's `/_ccgate/` surface.
pub struct AdminClient {
    target: Target,
    client: crate::transport::upstream::UpstreamClient,
}

/// An answer from the gateway.
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The message of an Anthropic-shaped error body, or the status.
    pub fn error_message(&self) -> String {
        crate::wire::anthropic::error_message(&self.body)
            .unwrap_or_else(|| format!("HTTP {}", self.status))
    }
}

impl AdminClient {
    /// A client for `target`.
    pub fn new(target: Target) -> anyhow::Result<Self> {
        let timeouts = crate::config::Timeouts {
            connect: Duration::from_secs(3),
            first_byte: Duration::from_secs(30),
            idle: Duration::from_secs(30),
        };
        let client = crate::transport::upstream::build_client(None, &timeouts)?;
        Ok(Self { target, client })
    }

    /// The gateway's URL.
    pub fn url(&self) -> &str {
        &self.target.url
    }

    /// `GET /_ccgate/{path}` as JSON (checked to be the view ccgate answers there), or the error a command reports for it: the gateway cannot
    /// be reached, wants its access token, or answered something else (`expected` names what the
    /// gateway should be, say "a ccgate").
    pub async fn get_json(&self, path: &str, expected: &str) -> anyhow::Result<Value> {
        let a = self.call(Method::GET, path).await.map_err(|e| {
            anyhow!("cannot reach the gateway: {e}\nIs `ccgate serve` running? (pass --url if it listens elsewhere)")
        })?;
        match a.status {
            StatusCode::OK => {
                let v = a.json();
                match view_member(path) {
                    Some(m) if v.get(m).is_none() => bail!(
                        "the gateway at {} answered /_ccgate/{path} without `{m}`; is it {expected}?",
                        self.url()
                    ),
                    _ => Ok(v),
                }
            }
            StatusCode::UNAUTHORIZED => bail!(
                "the gateway at {} wants its access token: set server.access_token (or access_token_env) in the config this command reads",
                self.url()
            ),
            _ => bail!(
                "the gateway at {} answered {}: {}; is it {expected}?",
                self.url(),
                a.status,
                a.error_message()
            ),
        }
    }

    /// Whether a ccgate gateway answers here: `GET /_ccgate/health`, asked without the access
    /// token (the path needs none, and a server that is not ccgate must not be sent it), and told
    /// from another server that answers 200 by the mark on ccgate's answer.
    pub async fn is_ccgate(&self) -> Result<bool, CallError> {
        let req = self.request(Method::GET, "health")?;
        let asked = async {
            let resp = self.client.request(req).await.map_err(|e| {
                CallError(format!(
                    "nothing answered at {}: {}",
                    self.target.url,
                    crate::transport::error_chain(&e)
                ))
            })?;
            let ok = resp.status().is_success();
            let marked = resp
                .headers()
                .contains_key(crate::proxy::gateway::HEALTH_MARK);
            // Read to its end, so the connection closes cleanly; a gateway from before the mark
            // is known by its answer, `{"status":"ok"}` exactly.
            let body = resp.into_body().collect().await.map(|b| b.to_bytes());
            let older = body.is_ok_and(|b| {
                serde_json::from_slice::<serde_json::Value>(&b)
                    .is_ok_and(|v| v == serde_json::json!({"status": "ok"}))
            });
            Ok(ok && (marked || older))
        };
        self.within(10, asked).await
    }

    /// `fut`, or an error naming the gateway when it takes longer than `secs` seconds.
    async fn within<T>(
        &self,
        secs: u64,
        fut: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        tokio::time::timeout(Duration::from_secs(secs), fut)
            .await
            .unwrap_or_else(|_| {
                Err(CallError(format!(
                    "{} did not answer within {secs}s",
                    self.target.url
                )))
            })
    }

    /// `METHOD /_ccgate/{path}` from the CLI, without a token.
    fn request(&self, method: Method, path: &str) -> Result<Request<ReplayBody>, CallError> {
        let uri = format!("{}/_ccgate/{path}", self.target.url);
        Request::builder()
            .method(method)
            .uri(&uri)
            .header(
                http::header::USER_AGENT,
                concat!("ccgate-cli/", env!("CARGO_PKG_VERSION")),
            )
            .body(ReplayBody::from(Bytes::new()))
            .map_err(|e| CallError(format!("{uri}: {e}")))
    }

    /// `METHOD /_ccgate/{path}`, whole answer.
    pub async fn call(&self, method: Method, path: &str) -> Result<Answer, CallError> {
        let uri = format!("{}/_ccgate/{path}", self.target.url);
        let mut req = self.request(method, path)?;
        if let Some(t) = &self.target.token
            && let Ok(mut v) = http::HeaderValue::from_str(t.expose())
        {
            v.set_sensitive(true);
            req.headers_mut().insert("x-api-key", v);
        }
        let fut = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let detail = crate::transport::error_chain(&e);
                let detail = match &self.target.token {
                    Some(t) => detail.replace(t.expose(), "***"),
                    None => detail,
                };
                CallError(format!("nothing answered at {}: {detail}", self.target.url))
            })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallError(format!("{uri}: {e}")))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        self.within(60, fut).await
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The member ccgate's answer to `GET /_ccgate/{path}` always has (the view's main field), by
/// which a command tells ccgate from another server that answers 200 with JSON.
fn view_member(path: &str) -> Option<&'static str> {
    match path.split(['?', '/']).next()? {
        "endpoints" => Some("endpoints"),
        "failure-queue" => Some("entries"),
        "stats" => Some("total_requests"),
        "requests" => Some("requests"),
        "cluster" => Some("enabled"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn urls() {
        assert_eq!(
            normalize_url("127.0.0.1:7860/").expect("ok"),
            "http://127.0.0.1:7860"
        );
        assert!(normalize_url("ftp://x").is_err());
        let any: SocketAddr = "0.0.0.0:7860".parse().expect("addr");
        assert_eq!(url_of_listen(any).as_deref(), Some("http://127.0.0.1:7860"));
        let v6: SocketAddr = "[::]:80".parse().expect("addr");
        assert_eq!(url_of_listen(v6).as_deref(), Some("http://[::1]:80"));
        let zero: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        assert_eq!(url_of_listen(zero), None);
    }

    #[test]
    fn lenient_loading_tolerates_unset_variables_only() {
        let env = |_: &str| None;
        let text = "[server]\naccess_token_env = \"TOK\"\n[[endpoints]]\nname = \"a\"\nbase_url = \"http://h\"\napi_key_env = \"KEY\"\n";
        let l = Lenient::from_toml(text, "t", &env).expect("lenient");
        assert_eq!(l.unset, ["TOK", "KEY"]);
        assert!(l.access_token().is_none());
        let bad = text.replace("http://h", "ftp://h");
        assert!(Lenient::from_toml(&bad, "t", &env).is_err());
    }

    #[test]
    fn targets_come_from_the_url_or_the_listen_address() {
        let env = |_: &str| None;
        let ep = "[[endpoints]]\nname = \"a\"\nbase_url = \"http://a\"\napi_key = \"k\"\n";
        let text = "[server]\nlisten = \"0.0.0.0:7861\"\naccess_token = \"tok\"\n";
        let l = Lenient::from_toml(&format!("{text}{ep}"), "t", &env).expect("lenient");
        let t = Target::from_lenient(&l, None).expect("ok").expect("known");
        assert_eq!(t.url, "http://127.0.0.1:7861");
        assert_eq!(t.token.as_ref().map(Secret::expose), Some("tok"));
        let t = Target::from_lenient(&l, Some("h:1/"))
            .expect("ok")
            .expect("known");
        assert_eq!(t.url, "http://h:1");
        assert!(Target::from_lenient(&l, Some("ftp://h")).is_err());
        let zero = Lenient::from_toml(
            &format!("[server]\nlisten = \"127.0.0.1:0\"\n{ep}"),
            "t",
            &env,
        )
        .expect("lenient");
        assert!(Target::from_lenient(&zero, None).expect("ok").is_none());
        let unset = Lenient::from_toml(
            &format!("[server]\naccess_token_env = \"TOK\"\n{ep}"),
            "t",
            &env,
        )
        .expect("lenient");
        let t = Target::from_lenient(&unset, None)
            .expect("ok")
            .expect("known");
        assert_eq!(t.url, "http://127.0.0.1:7860");
        assert!(t.token.is_none());
    }

    #[test]
    fn a_config_named_by_the_variable_must_exist() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir
            .path()
            .join("missing.toml")
            .to_string_lossy()
            .into_owned();
        let env = |name: &str| (name == "CCGATE_CONFIG").then(|| missing.clone());
        let err = find_target(None, None, &env).err().expect("refused");
        assert!(err.to_string().contains("missing.toml"), "{err}");
        assert!(find_target(Some(Path::new(&missing)), None, &|_: &str| None).is_err());
    }
}
