//! The reviewers' web page: one self-contained HTML document (its script
//! and style inline, nothing fetched from elsewhere) that lists pending
//! requests with their context, approves (with a reason, an edit or a
//! grant) and denies through the same API, and signs out. It follows
//! `GET /v1/watch` (read with `fetch`, since `EventSource` cannot send a
//! token) and lists the requests again on every event, reconnecting with
//! a backoff; a slow poll covers a stream cut without notice. It is served
//! without authentication, since it holds no data: every call it makes
//! carries the reviewer's token.
//!
//! The page is sent with a Content-Security-Policy that allows exactly its
//! own inline script and style (by their SHA-256) and calls to this API,
//! nothing else: statement text shown on the page comes from the requester,
//! and even if it ever reached the page as markup, no other script would
//! run and nothing could be sent elsewhere.

use std::sync::LazyLock;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};
use sha2::{Digest, Sha256};

/// The page.
pub const PAGE: &str = include_str!("page.html");

/// The text between `<TAG>` and `</TAG>` in the page (its one inline
/// script or style).
fn inline(tag: &str) -> &'static str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    PAGE.split_once(open.as_str())
        .and_then(|(_, rest)| rest.split_once(close.as_str()))
        .map_or("", |(inner, _)| inner)
}

/// `'sha256-...'` of a text, as CSP writes a hash source.
fn hash_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The page's Content-Security-Policy.
pub static CONTENT_SECURITY_POLICY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; connect-src 'self'; script-src {}; style-src {}; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash_source(inline("script")),
        hash_source(inline("style")),
    )
});

/// The page as an HTTP response, with headers that keep it from being
/// framed, sniffed, cached or given scripts it does not carry.
pub fn page_response() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    let fixed: [(HeaderName, &'static str); 6] = [
        (hyper::header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (hyper::header::X_FRAME_OPTIONS, "DENY"),
        (hyper::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (hyper::header::REFERRER_POLICY, "no-referrer"),
        (hyper::header::CACHE_CONTROL, "no-store"),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if let Ok(csp) = HeaderValue::from_str(&CONTENT_SECURITY_POLICY) {
        headers.insert(hyper::header::CONTENT_SECURITY_POLICY, csp);
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_page_fetches_nothing_from_elsewhere() {
        for outside in ["<script src", "<link", "http://", "https://", "@import"] {
            assert!(!PAGE.contains(outside), "the page refers to {outside}");
        }
        // Every call goes to this API, by path.
        assert!(PAGE.contains("fetch(path"));
        for path in [
            "\"/v1/requests\"",
            "\"/v1/requests/\"",
            "\"/v1/watch\"",
            "\"/v1/whoami\"",
        ] {
            assert!(PAGE.contains(path), "{path}");
        }
    }

    #[test]
    fn the_page_writes_request_data_as_text_never_as_markup() {
        // Statement text and identities come from the requester: shown
        // with textContent, so a statement cannot inject script.
        assert!(!PAGE.contains("innerHTML"));
        assert!(!PAGE.contains("insertAdjacentHTML"));
        assert!(!PAGE.contains("document.write"));
    }

    #[test]
    fn the_policy_allows_exactly_the_pages_own_script_and_style() {
        // One of each, so the hashes cover all the page runs and styles.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(!PAGE.contains(" style=\""), "inline style attributes");
        assert!(!PAGE.contains(" onclick=\""), "inline handlers");
        let script = inline("script");
        assert!(script.contains("function refresh()"));
        let csp = CONTENT_SECURITY_POLICY.as_str();
        assert!(csp.contains(&hash_source(script)), "{csp}");
        assert!(csp.contains(&hash_source(inline("style"))), "{csp}");
        assert!(csp.starts_with("default-src 'none'; connect-src 'self';"));
        assert!(!csp.contains("unsafe"), "{csp}");

        let response = page_response();
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        assert_eq!(header("content-type"), "text/html; charset=utf-8");
        assert_eq!(header("x-frame-options"), "DENY");
        assert_eq!(header("content-security-policy"), csp);
    }

    #[test]
    fn a_hash_source_is_base64_of_sha256() {
        // SHA-256 of the empty string.
        assert_eq!(
            hash_source(""),
            "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
        );
    }
}
