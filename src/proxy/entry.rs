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
}

impl Refusal {
    /// The local answer: Anthropic-shaped, with `Allow` on a 405.
    pub fn answer(self) -> Response<GateBody> {
        let message = self.to_string();
        match self {
            Self::Method => response::method_not_allowed(ALLOWED_METHODS),
            Self::Target | Self::Climbs | Self::Separator => {
                response::error(StatusCode::BAD_REQUEST, "invalid_request_error", &message)
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
