//! Request admission: what a request must look like before it goes anywhere. The method, the
//! form of the target and the path are checked here, once, for every request; the path is
//! normalised, and its first segment decides where the request goes (the control plane, the
//! Prometheus exposition, the proxy, or a local answer). Nothing here touches an endpoint or a
//! counter: a refused request is answered at the door and counted nowhere.
//!
//! The rules, and why:
//!
//! - **Methods**: the Anthropic API uses `GET`, `POST` and `DELETE`; `HEAD` and `OPTIONS` (a
//!   browser's preflight) are harmless and forwarded. Everything else (`TRACE`, `CONNECT`, `PUT`,
//!   `PATCH`, WebDAV and made-up methods) gets a local 405 with `Allow`: an upstream would refuse
//!   it anyway, and its refusal must not be blamed on the endpoint.
//! - **Target form**: origin form (`/path?query`), or absolute form (`http://host/path`, whose
//!   host is ignored: the upstream comes from the config only). `*` and authority form get 400.
//! - **Path**: percent-encoded unreserved characters are decoded (`%2e` is `.`, `%5F` is `_`,
//!   RFC 3986 §6.2.2.2), empty segments are merged (`//` is `/`), and dot-segments are removed
//!   (§5.2.4). A path that climbs above the root gets 400 instead of being clipped, and so does an
//!   encoded `/` or `\` (`%2F`, `%5C`) or a literal `\`: no API path has one, and an upstream or a
//!   CDN that decodes them could otherwise be walked out of the endpoint's base path.
//! - **Where it goes**: a first segment of `_ccgate` in any case is ccgate's own prefix and goes
//!   to the control plane (rewritten to `/_ccgate`), never upstream; `/metrics` is the Prometheus
//!   exposition (the control plane's `/_ccgate/metrics`, with the same access rules); `HEAD /` is
//!   Claude Code's pre-connect, answered locally; `/v1`, `/v1/...` and `/api/...` (Claude Code's
//!   event logging) are the API and are forwarded. Anything else gets a local 404.

use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Response, StatusCode, Uri, header};

use crate::proxy::response::{self, GateBody};

/// The methods ccgate forwards, as the `Allow` header of a 405 says them.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, DELETE, OPTIONS";

/// ccgate's own path prefix (its first segment, in canonical case).
const ADMIN_SEGMENT: &str = "_ccgate";

/// Where an admitted request goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// ccgate's own views and switches (`/_ccgate...`, and `/metrics` rewritten to them).
    Control,
    /// Claude Code's credential-less `HEAD /` pre-connect: answered locally, counted nowhere.
    Preconnect,
    /// An API path: proxied to an endpoint.
    Api,
}

/// An admitted request: where it goes and its normalised origin-form target.
#[derive(Clone, Debug)]
pub struct Admitted {
    /// Where it goes.
    pub destination: Destination,
    /// The normalised path and the query as the client sent it; `None` when the request's own
    /// origin-form target already is that (the common case: nothing to rebuild).
    pub target: Option<PathAndQuery>,
}

/// Why a request is refused at the door.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A method the API does not use.
    #[error("ccgate: this method is not used by the Anthropic API")]
    Method,
    /// Not origin or absolute form (`*`, `host:port`), or a malformed percent-encoding.
    #[error("ccgate: the request target must be a path such as /v1/messages")]
    Target,
    /// `..` segments climb above the root.
    #[error("ccgate: the path climbs above the root")]
    Climbs,
    /// An encoded slash or a backslash inside a segment.
    #[error("ccgate: encoded slashes (%2F, %5C) and backslashes are not accepted in paths")]
    Separator,
    /// Not an API path.
    #[error(
        "ccgate: not an API path; ccgate forwards /v1/... and /api/..., and serves its own views under /_ccgate/"
    )]
    UnknownPath,
    /// An HTTP/1.1 request without a `Host`, or any request with more than one (RFC 9112 §3.2:
    /// a server answers 400; a second `Host` would also pass the loopback check on the first).
    #[error("ccgate: a request carries exactly one Host header (HTTP/1.1 requires it)")]
    Host,
    /// Without an access token: a `Host` that is not a loopback name (a page on another site
    /// reaching the loopback listener through DNS rebinding).
    #[error(
        "ccgate: the Host header names no loopback address; use localhost or 127.0.0.1, or set server.access_token"
    )]
    ForeignHost,
    /// Without an access token: an `Origin` that is not a loopback name (a page on another site
    /// making the user's browser send the request).
    #[error(
        "ccgate: a request from a web page on another site; set server.access_token to let web pages in"
    )]
    ForeignOrigin,
}

impl Refusal {
    /// The local answer: Anthropic-shaped, with `Allow` on a 405.
    pub fn answer(self) -> Response<GateBody> {
        let message = self.to_string();
        match self {
            Self::Method => response::method_not_allowed(ALLOWED_METHODS),
            Self::Target | Self::Climbs | Self::Separator | Self::Host => {
                response::error(StatusCode::BAD_REQUEST, "invalid_request_error", &message)
            }
            Self::ForeignHost | Self::ForeignOrigin => {
                response::error(StatusCode::FORBIDDEN, "permission_error", &message)
            }
            Self::UnknownPath => {
                let mut r = response::error(StatusCode::NOT_FOUND, "not_found_error", &message);
                r.headers_mut()
                    .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                r
            }
        }
    }
}

/// Refuses a request whose `Host` lines are not what HTTP allows: exactly one in HTTP/1.1, at
/// most one otherwise (HTTP/1.0 may leave it out; HTTP/2 names its authority apart).
pub fn host_lines(version: http::Version, headers: &http::HeaderMap) -> Result<(), Refusal> {
    let mut lines = headers.get_all(header::HOST).iter();
    let first = lines.next();
    if lines.next().is_some() || (first.is_none() && version == http::Version::HTTP_11) {
        return Err(Refusal::Host);
    }
    Ok(())
}

/// On a gateway without an access token, which trusts whatever reaches its loopback listener:
/// refuses what a browser sends on behalf of a page from another site. A `Host` (or HTTP/2
/// authority) that is not a loopback name is DNS rebinding (the page's own name, resolved to
/// 127.0.0.1, so that the browser lets the page read the answers); an `Origin` that is not a
/// loopback name is a page that makes the user's browser post to the gateway, spending the
/// endpoints' keys. Clients that are not browsers send no `Origin` and name the gateway by the
/// address they were given; pages served from localhost pass.
pub fn foreign_browser(headers: &http::HeaderMap, uri: &Uri) -> Option<Refusal> {
    let host = headers
        .get(header::HOST)
        .map(HeaderValue::as_bytes)
        .or_else(|| uri.authority().map(|a| a.as_str().as_bytes()));
    if host.is_some_and(|h| !local_name(h)) {
        return Some(Refusal::ForeignHost);
    }
    let origin = headers.get(header::ORIGIN)?.as_bytes();
    // `scheme://host[:port]`; `null` (a sandboxed page, a file) has no host and is refused.
    let host = origin
        .windows(3)
        .position(|w| w == b"://")
        .map(|i| &origin[i + 3..]);
    if host.is_none_or(|h| !local_name(h)) {
        return Some(Refusal::ForeignOrigin);
    }
    None
}

/// Whether `host[:port]` names this machine's loopback: `localhost` and its subdomains, and
/// loopback addresses (`127.0.0.0/8`, `[::1]`, IPv4-mapped ones, and the unspecified `0.0.0.0`
/// and `[::]`, which connect to it).
fn local_name(host: &[u8]) -> bool {
    // What every request names in practice, before anything is parsed.
    if host
        .strip_prefix(b"127.0.0.1")
        .is_some_and(|port| port.is_empty() || port[0] == b':')
    {
        return true;
    }
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`.
        match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || port.starts_with(':') => v6,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map_or(host, |(name, _port)| name)
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    // Names `/etc/hosts` gives the loopback addresses on common systems.
    const LOOPBACK_NAMES: [&str; 4] = [
        "localhost",
        "localhost.localdomain",
        "ip6-localhost",
        "ip6-loopback",
    ];
    if LOOPBACK_NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
        || name.len() > ".localhost".len()
            && name[name.len() - ".localhost".len()..].eq_ignore_ascii_case(".localhost")
    {
        return true;
    }
    // `0.0.0.0` and `[::]` reach the loopback listener too, and no page is served from them.
    name.parse::<std::net::IpAddr>().is_ok_and(|ip| {
        let ip = ip.to_canonical();
        ip.is_loopback() || ip.is_unspecified()
    })
}

/// Admits a request by its method and target, or says why not.
pub fn admit(method: &Method, uri: &Uri) -> Result<Admitted, Refusal> {
    if !allowed(method) {
        return Err(Refusal::Method);
    }
    let path = uri.path();
    if !path.starts_with('/') {
        return Err(Refusal::Target);
    }
    // The common case, an origin-form API path with nothing to normalise, keeps its target as
    // it came: no segment list, no re-rendering, no new URI.
    if uri.scheme().is_none() && is_plain(path) {
        let api = path == "/v1"
            || path.starts_with("/v1/")
            || (path.starts_with("/api/") && path.len() > "/api/".len());
        if api {
            return Ok(Admitted {
                destination: Destination::Api,
                target: None,
            });
        }
    }
    let segments = normalise(path)?;
    let first = segments.segments.first().map(String::as_str);
    let (destination, path) = match first {
        Some(s) if s.eq_ignore_ascii_case(ADMIN_SEGMENT) => {
            let mut p = segments.render();
            p.replace_range(1..1 + ADMIN_SEGMENT.len(), ADMIN_SEGMENT);
            (Destination::Control, p)
        }
        Some("metrics") if segments.segments.len() == 1 && !segments.trailing_slash => {
            (Destination::Control, "/_ccgate/metrics".to_owned())
        }
        Some("v1") => (Destination::Api, segments.render()),
        Some("api") if segments.segments.len() > 1 => (Destination::Api, segments.render()),
        None if method == Method::HEAD => (Destination::Preconnect, "/".to_owned()),
        _ => return Err(Refusal::UnknownPath),
    };
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let target = PathAndQuery::try_from(target).map_err(|_| Refusal::Target)?;
    Ok(Admitted {
        destination,
        target: Some(target),
    })
}

/// Whether `path` (starting with `/`) is already what [`normalise`] would make of it: no escapes,
/// no backslash, no empty segment but a trailing one, no `.` or `..` segment.
fn is_plain(path: &str) -> bool {
    if path.bytes().any(|b| b == b'%' || b == b'\\') {
        return false;
    }
    let mut segments = path[1..].split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg == "." || seg == ".." || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

fn allowed(method: &Method) -> bool {
    [
        Method::GET,
        Method::POST,
        Method::HEAD,
        Method::DELETE,
        Method::OPTIONS,
    ]
    .contains(method)
}

/// A path as its segments, dot-segments removed.
#[derive(Debug, Default)]
struct Segments {
    segments: Vec<String>,
    trailing_slash: bool,
}

impl Segments {
    fn render(&self) -> String {
        let mut p = String::with_capacity(64);
        for s in &self.segments {
            p.push('/');
            p.push_str(s);
        }
        if self.trailing_slash || p.is_empty() {
            p.push('/');
        }
        p
    }
}

/// Splits `path` (starting with `/`) into normalised segments.
fn normalise(path: &str) -> Result<Segments, Refusal> {
    let mut out = Segments::default();
    let mut raw = path[1..].split('/').peekable();
    while let Some(seg) = raw.next() {
        let seg = decode_unreserved(seg)?;
        let last = raw.peek().is_none();
        match seg.as_str() {
            "" | "." => {}
            ".." => {
                if out.segments.pop().is_none() {
                    return Err(Refusal::Climbs);
                }
            }
            _ => {
                out.segments.push(seg);
                out.trailing_slash = false;
                continue;
            }
        }
        // `/a/`, `/a/.` and `/a/b/..` all end in a slash (RFC 3986 §5.2.4).
        if last {
            out.trailing_slash = !out.segments.is_empty();
        }
    }
    Ok(out)
}

/// Decodes percent-encoded unreserved characters in one segment and upper-cases the hex digits
/// of the encodings it keeps; refuses encoded separators and malformed encodings.
fn decode_unreserved(seg: &str) -> Result<String, Refusal> {
    let b = seg.as_bytes();
    let mut out = String::with_capacity(seg.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3).ok_or(Refusal::Target)?;
                let v = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(Refusal::Target)?;
                match v {
                    b'/' | b'\\' => return Err(Refusal::Separator),
                    v if v.is_ascii_alphanumeric() || b"-._~".contains(&v) => out.push(v as char),
                    v => out.push_str(&format!("%{v:02X}")),
                }
                i += 3;
            }
            b'\\' => return Err(Refusal::Separator),
            c => {
                out.push(c as char);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_table() {
        for host in [
            "localhost",
            "LOCALHOST:7860",
            "localhost.",
            "app.localhost:3000",
            "localhost.localdomain:7860",
            "ip6-localhost:7860",
            "127.0.0.1",
            "127.0.0.1:7860",
            "127.9.9.9:1",
            "[::1]",
            "[::1]:7860",
            "[::ffff:127.0.0.1]:80",
            "0.0.0.0:7860",
            "[::]:7860",
        ] {
            assert!(local_name(host.as_bytes()), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:7860",
            "localhost.evil.example",
            "notlocalhost",
            "10.0.0.1:7860",
            "192.168.1.2",
            "[::2]:80",
            "[::1]x",
            "",
            "127.0.0.1.evil.example",
        ] {
            assert!(!local_name(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn foreign_browsers_table() {
        let uri: Uri = "/v1/messages".parse().expect("uri");
        let check = |host: Option<&str>, origin: Option<&str>| {
            let mut h = http::HeaderMap::new();
            if let Some(v) = host {
                h.insert(header::HOST, HeaderValue::from_str(v).expect("value"));
            }
            if let Some(v) = origin {
                h.insert(header::ORIGIN, HeaderValue::from_str(v).expect("value"));
            }
            foreign_browser(&h, &uri)
        };
        assert_eq!(check(Some("127.0.0.1:7860"), None), None);
        assert_eq!(check(None, None), None);
        assert_eq!(
            check(Some("localhost:7860"), Some("http://localhost:3000")),
            None
        );
        assert_eq!(
            check(Some("127.0.0.1:7860"), Some("http://[::1]:8080")),
            None
        );
        assert_eq!(
            check(Some("evil.example:7860"), None),
            Some(Refusal::ForeignHost)
        );
        assert_eq!(
            check(Some("127.0.0.1:7860"), Some("https://evil.example")),
            Some(Refusal::ForeignOrigin)
        );
        assert_eq!(
            check(Some("127.0.0.1:7860"), Some("null")),
            Some(Refusal::ForeignOrigin)
        );
        // HTTP/2: the authority stands for the Host header.
        let h2: Uri = "http://evil.example:7860/v1/messages".parse().expect("uri");
        assert_eq!(
            foreign_browser(&http::HeaderMap::new(), &h2),
            Some(Refusal::ForeignHost)
        );
    }

    #[test]
    fn a_plain_api_target_is_kept_as_it_came() {
        for (target, kept) in [
            ("/v1/messages?beta=true", true),
            ("/v1", true),
            ("/v1/messages/", true),
            ("/api/event_logging/batch", true),
            ("/v1//messages", false),
            ("/v1/./messages", false),
            ("/v1/%6Dessages", false),
            ("http://other.host/v1/messages", false),
        ] {
            let uri: Uri = target.parse().expect("uri");
            let a = admit(&Method::POST, &uri).expect("admitted");
            assert_eq!(a.target.is_none(), kept, "{target}");
        }
    }

    fn check(method: Method, target: &str, expected: Result<(Destination, &str), Refusal>) {
        let uri: Uri = target.parse().unwrap_or_else(|e| panic!("{target}: {e}"));
        let got = admit(&method, &uri).map(|a| {
            let target = a.target.as_ref().map_or_else(
                || uri.path_and_query().map_or("/", PathAndQuery::as_str),
                PathAndQuery::as_str,
            );
            (a.destination, target.to_owned())
        });
        let expected = expected.map(|(d, t)| (d, t.to_owned()));
        assert_eq!(got, expected, "{method} {target}");
    }

    #[test]
    fn api_paths_are_forwarded_normalised() {
        use Destination::Api;
        check(
            Method::POST,
            "/v1/messages?beta=true",
            Ok((Api, "/v1/messages?beta=true")),
        );
        check(Method::GET, "/v1/models/", Ok((Api, "/v1/models/")));
        check(Method::GET, "/v1//models", Ok((Api, "/v1/models")));
        check(Method::GET, "/v1/./models/.", Ok((Api, "/v1/models/")));
        check(Method::GET, "/v1/x/../models", Ok((Api, "/v1/models")));
        check(Method::GET, "/v1/x/%2E%2e/models", Ok((Api, "/v1/models")));
        check(Method::GET, "/%76%31/models", Ok((Api, "/v1/models")));
        check(
            Method::GET,
            "/v1/files/a%20b%c3%a9",
            Ok((Api, "/v1/files/a%20b%C3%A9")),
        );
        check(Method::DELETE, "/v1/files/f1", Ok((Api, "/v1/files/f1")));
        check(
            Method::POST,
            "/api/event_logging/batch",
            Ok((Api, "/api/event_logging/batch")),
        );
        check(
            Method::POST,
            "http://other.host/v1/messages?q",
            Ok((Api, "/v1/messages?q")),
        );
        check(Method::GET, "/v1", Ok((Api, "/v1")));
    }

    #[test]
    fn control_paths_in_any_disguise_go_to_the_control_plane() {
        use Destination::Control;
        for t in [
            "/_ccgate/endpoints",
            "/_CCGATE/endpoints",
            "//_ccgate/endpoints",
            "/_ccgate//endpoints",
            "/%5Fccgate/endpoints",
            "/v1/../_ccgate/endpoints",
            "/_ccgate/%2e%2e/_ccgate/endpoints",
        ] {
            check(Method::GET, t, Ok((Control, "/_ccgate/endpoints")));
        }
        check(Method::GET, "/_ccgate/", Ok((Control, "/_ccgate/")));
        check(Method::GET, "/metrics", Ok((Control, "/_ccgate/metrics")));
        check(
            Method::GET,
            "/metrics?x=1",
            Ok((Control, "/_ccgate/metrics?x=1")),
        );
        check(Method::HEAD, "/", Ok((Destination::Preconnect, "/")));
    }

    #[test]
    fn refusals() {
        check(Method::TRACE, "/v1/messages", Err(Refusal::Method));
        check(Method::CONNECT, "example.com:443", Err(Refusal::Method));
        check(Method::PUT, "/v1/messages", Err(Refusal::Method));
        check(
            Method::from_bytes(b"PROPFIND").unwrap_or_default(),
            "/v1",
            Err(Refusal::Method),
        );
        check(Method::POST, "*", Err(Refusal::Target));
        check(Method::GET, "/v1/%zz", Err(Refusal::Target));
        check(Method::GET, "/v1/%2", Err(Refusal::Target));
        check(Method::GET, "/v1/../../admin", Err(Refusal::Climbs));
        check(Method::GET, "/..", Err(Refusal::Climbs));
        check(Method::GET, "/v1/%2e%2e/%2E%2E/admin", Err(Refusal::Climbs));
        check(Method::GET, "/_ccgate%2fendpoints", Err(Refusal::Separator));
        check(Method::GET, "/v1/a%5Cb", Err(Refusal::Separator));
        check(Method::GET, "/", Err(Refusal::UnknownPath));
        check(Method::GET, "/favicon.ico", Err(Refusal::UnknownPath));
        check(Method::GET, "/v2/messages", Err(Refusal::UnknownPath));
        check(Method::GET, "/api", Err(Refusal::UnknownPath));
        check(Method::GET, "/metrics/x", Err(Refusal::UnknownPath));
    }
}
