//! The live dashboard page (`GET /_ccgate/`): one self-contained page that polls the JSON views.

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use crate::proxy::gateway::Gateway;
use crate::proxy::response::{self, GateBody};

/// The live dashboard (`GET /_ccgate/`): one self-contained page that polls the JSON views above.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// `GET /_ccgate/` and `/_ccgate`. A browser cannot set headers on a page load, so besides the
/// usual headers this one route also takes the access token as `?token=`; the page's script then
/// sends it as `x-api-key` on every fetch. The JSON views never accept it from the query.
pub fn page(
    gw: &Gateway,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
) -> Response<GateBody> {
    if method != Method::GET && method != Method::HEAD {
        return response::method_not_allowed("GET, HEAD");
    }
    let query_ok = || {
        query_param(uri.query().unwrap_or(""), "token")
            .and_then(|t| HeaderValue::from_str(&t).ok())
            .is_some_and(|t| {
                // The same constant-time check as for headers, on the token from the query.
                let mut h = HeaderMap::new();
                h.insert("x-api-key", t);
                gw.authorized(&h)
            })
    };
    if !gw.authorized(headers) && !query_ok() {
        return response::error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "ccgate: missing or wrong access token (open the dashboard as /_ccgate/?token=...)",
        );
    }
    let mut r = response::body("text/html; charset=utf-8", DASHBOARD_HTML);
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page's URL may carry the token: never send it on as a referrer, and only let the page
    // talk to this gateway (no external assets exist; this keeps it that way).
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    r
}

/// The percent-decoded value of `key` in a query string (`+` is a space, as in forms).
fn query_param(query: &str, key: &str) -> Option<String> {
    let raw = query
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))?;
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let (hi, lo) = (bytes.next().and_then(hex)?, bytes.next().and_then(hex)?);
                hi << 4 | lo
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}
