//! Telling a stale OAuth access token apart from everything a refresh cannot fix.

use http::{HeaderMap, StatusCode};

/// What a 401/403 response means for the caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Verdict {
    /// The access token was not accepted: refreshing it and retrying once can help.
    StaleToken(StaleReason),
    /// The account has no active Grok subscription (or lacks the entitlement): nothing the client does helps.
    Entitlement,
    /// The account ran out of credits or hit its spending limit.
    Billing,
    /// Not a response this classifier recognises: it is handed back untouched.
    Unrecognized,
}

/// Why a response was judged to carry a stale token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StaleReason {
    /// xAI's well-known error marker `unauthenticated:<reason>`, with the reason lowercased
    /// (for example `"bad-credentials"` or `"expired-token"`).
    Wke(String),
    /// The body says the OAuth2 access token could not be validated.
    TokenNotValidated,
    /// A plain 401 with nothing more specific in it.
    Unauthorized,
    /// An RFC 6750 `WWW-Authenticate: Bearer error="invalid_token"` challenge.
    InvalidToken,
}

/// Decides what a 401/403 response means. [`XaiClassifier`] is the default.
pub trait Classify {
    /// Whether responses with this status are worth buffering and classifying. Responses with
    /// other statuses pass through untouched, their bodies streaming. The default inspects
    /// 401 and 403.
    fn inspects(&self, status: StatusCode) -> bool {
        status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
    }

    /// Classifies a response from its status, headers and whole body.
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict;
}

/// The default classifier: xAI's rules, as implemented by [`classify`].
#[derive(Debug, Clone, Copy, Default)]
pub struct XaiClassifier;

impl Classify for XaiClassifier {
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
        classify(status, headers, body)
    }
}

/// Classifies an xAI response.
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
    if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
        return Verdict::Unrecognized;
    }
    let lower = body.to_ascii_lowercase();
    let has = |n: &str| memchr::memmem::find(&lower, n.as_bytes()).is_some();
    if let Some(i) = memchr::memmem::find(&lower, b"unauthenticated:") {
        let rest = &lower[i + 16..];
        let end = rest
            .iter()
            .position(|b| matches!(b, b']' | b'"') || b.is_ascii_whitespace())
            .unwrap_or(rest.len());
        if end > 0 {
            return Verdict::StaleToken(StaleReason::Wke(
                String::from_utf8_lossy(&rest[..end]).into_owned(),
            ));
        }
    }
    if has("oauth2 access token could not be validated") {
        return Verdict::StaleToken(StaleReason::TokenNotValidated);
    }
    for v in headers.get_all(http::header::WWW_AUTHENTICATE) {
        let v = v.as_bytes().to_ascii_lowercase();
        if memchr::memmem::find(&v, b"bearer").is_some()
            && memchr::memmem::find(&v, b"invalid_token").is_some()
        {
            return Verdict::StaleToken(StaleReason::InvalidToken);
        }
    }
    if has("personal-team-blocked") || has("spending-limit") {
        return Verdict::Billing;
    }
    if has("do not have an active grok subscription")
        || (has("grok") && (has("out of available resources") || has("does not have permission")))
    {
        return Verdict::Entitlement;
    }
    if status == StatusCode::UNAUTHORIZED {
        Verdict::StaleToken(StaleReason::Unauthorized)
    } else {
        Verdict::Unrecognized
    }
}
