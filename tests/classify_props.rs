//! Properties of `classify` over arbitrary bodies and headers.

use http::header::{HeaderName, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, StatusCode};
use proptest::collection::vec;
use proptest::prelude::*;
use xai_oauth_recovery::{classify, StaleReason, Verdict};

/// Pieces of xAI error bodies, JSON syntax and the rules' phrases, to build bodies that reach
/// every rule more often than random bytes do.
const FRAGMENTS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    " ",
    "\n",
    "\"code\":\"",
    "\"error\":\"",
    "\"message\":",
    "[WKE=",
    "bad-credentials",
    "The caller does not have permission to execute the specified operation",
    "The OAuth2 access token could not be validated.",
    "oauth2 access token",
    "You have either run out of available resources or do not have an active Grok subscription.",
    "do not have an active grok subscription",
    "out of available resources",
    "does not have permission",
    "grok",
    "personal-team-blocked",
    "spending-limit",
    "Forbidden",
    "<html><body>",
    "null",
];

const UNAUTHENTICATED: &str = "unauthenticated:";

fn contains_ignore_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Arbitrary bytes, or bodies made of fragments and random bytes; `with_unauthenticated`
/// decides whether `unauthenticated:` may be a fragment.
fn body(with_unauthenticated: bool) -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        4 => proptest::sample::select(FRAGMENTS).prop_map(|f| f.as_bytes().to_vec()),
        1 => Just(if with_unauthenticated { UNAUTHENTICATED } else { "" }.as_bytes().to_vec()),
        1 => vec(any::<u8>(), 0..8),
    ];
    prop_oneof![
        vec(any::<u8>(), 0..600),
        vec(fragment, 0..24).prop_map(|parts| parts.concat()),
    ]
}

fn status() -> impl Strategy<Value = StatusCode> {
    prop_oneof![
        3 => Just(StatusCode::UNAUTHORIZED),
        3 => Just(StatusCode::FORBIDDEN),
        1 => (100u16..1000).prop_map(|s| StatusCode::from_u16(s).unwrap_or_default()),
    ]
}

/// Header values: RFC 6750-like challenges or arbitrary visible bytes.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    let challenge = (
        proptest::sample::select(&["Bearer", "bearer", "Basic", "Negotiate", "DPoP", ""][..]),
        vec(
            (
                proptest::sample::select(
                    &["error", "realm", "scope", "error_description", "ERROR"][..],
                ),
                proptest::sample::select(
                    &[
                        "\"invalid_token\"",
                        "invalid_token",
                        "\"a, b\"",
                        "\"x\\\"y\"",
                        "\"",
                        "=",
                        "",
                    ][..],
                ),
            ),
            0..4,
        ),
    )
        .prop_map(|(scheme, params)| {
            let params: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{scheme} {}", params.join(", ")).into_bytes()
        });
    let visible = vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..80);
    prop_oneof![challenge, visible]
}

fn headers() -> impl Strategy<Value = HeaderMap> {
    let name = prop_oneof![
        3 => Just(WWW_AUTHENTICATE),
        1 => "[a-z][a-z0-9-]{0,12}".prop_map(|n| {
            HeaderName::from_bytes(n.as_bytes()).unwrap_or(WWW_AUTHENTICATE)
        }),
    ];
    vec((name, header_value()), 0..4).prop_map(|pairs| {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                headers.append(name, value);
            }
        }
        headers
    })
}

fn flip_case(body: &[u8], flips: &[bool]) -> Vec<u8> {
    body.iter()
        .zip(flips.iter().chain(std::iter::repeat(&false)))
        .map(|(&b, &flip)| match (flip, b) {
            (true, b'a'..=b'z') => b.to_ascii_uppercase(),
            (true, b'A'..=b'Z') => b.to_ascii_lowercase(),
            _ => b,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn never_panics(status in status(), headers in headers(), body in body(true)) {
        let verdict = classify(status, &headers, &body);
        if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
            prop_assert_eq!(verdict, Verdict::Unrecognized);
        }
    }

    #[test]
    fn an_inserted_marker_is_found(
        forbidden in any::<bool>(),
        headers in headers(),
        body in body(false).prop_filter("no other marker", |b| !contains_ignore_case(b, UNAUTHENTICATED.as_bytes())),
        at in any::<prop::sample::Index>(),
        reason in "[a-z0-9-]{1,24}",
        marker_case in vec(any::<bool>(), 21),
    ) {
        let status = if forbidden { StatusCode::FORBIDDEN } else { StatusCode::UNAUTHORIZED };
        let marker = flip_case(b"[WKE=unauthenticated:", &marker_case);
        let at = at.index(body.len() + 1);
        let mut with_marker = body.get(..at).unwrap_or_default().to_vec();
        with_marker.extend_from_slice(&marker);
        with_marker.extend_from_slice(reason.as_bytes());
        with_marker.push(b']');
        with_marker.extend_from_slice(body.get(at..).unwrap_or_default());
        prop_assert_eq!(
            classify(status, &headers, &with_marker),
            Verdict::StaleToken(StaleReason::Wke(reason))
        );
    }

    #[test]
    fn the_verdict_ignores_ascii_case(
        status in status(),
        headers in headers(),
        body in body(true),
        flips in vec(any::<bool>(), 0..600),
    ) {
        prop_assert_eq!(
            classify(status, &headers, &body),
            classify(status, &headers, &flip_case(&body, &flips))
        );
    }
}
