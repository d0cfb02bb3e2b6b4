//! Telling a stale OAuth access token apart from everything a refresh cannot fix.

use http::{HeaderMap, StatusCode};

mod challenge;
mod scan;

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

/// Classifies an xAI response from its status, headers and (buffered) body.
///
/// Rules, first match wins; every match is ASCII case-insensitive on the raw body bytes:
///
/// 1. a status other than 401 or 403: [`Verdict::Unrecognized`];
/// 2. a well-known-error marker, `[WKE=unauthenticated:<reason>]` or a JSON `"code"` of
///    `"unauthenticated:<reason>"`: [`StaleReason::Wke`] with the reason lowercased. The reason
///    runs to `]`, `"`, whitespace or the end of the body; the first marker in the body wins;
///    a marker with an empty reason (`[WKE=unauthenticated:]`) is no marker at all;
/// 3. `oauth2 access token could not be validated`: [`StaleReason::TokenNotValidated`];
/// 4. a `WWW-Authenticate` Bearer challenge with `error="invalid_token"` (RFC 6750), quoted
///    or not, in any header of several or among several challenges of one:
///    [`StaleReason::InvalidToken`];
/// 5. `personal-team-blocked` or `spending-limit`: [`Verdict::Billing`];
/// 6. `do not have an active grok subscription`, or `out of available resources` with
///    `grok`, or `does not have permission` with `grok`: [`Verdict::Entitlement`];
/// 7. otherwise a 401 is [`StaleReason::Unauthorized`] and a 403 [`Verdict::Unrecognized`]:
///    a 403 is never refreshed on a guess.
///
/// The stale-token signals win over everything below them: a stale token is recoverable, and
/// once refreshed the next response says whatever else is wrong.
///
/// The body is read as bytes, without parsing it as JSON, in one pass (a second one only when
/// `grok` is in it and nothing above rule 6 decided): non-UTF-8, empty, truncated, HTML or
/// plain-text bodies classify like any other. Nothing is allocated but the reason of a
/// well-known-error marker.
///
/// # Example
///
/// xAI answers 403 with the same `code` for a stale token and for an account without a Grok
/// subscription; the `error` tells them apart:
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use xai_oauth_recovery::{classify, StaleReason, Verdict};
///
/// let stale = br#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#;
/// let entitlement = br#"{"code":"The caller does not have permission to execute the specified operation","error":"You have either run out of available resources or do not have an active Grok subscription. Manage subscriptions at https://grok.com"}"#;
///
/// let headers = HeaderMap::new();
/// assert_eq!(
///     classify(StatusCode::FORBIDDEN, &headers, stale),
///     Verdict::StaleToken(StaleReason::Wke("bad-credentials".into())),
/// );
/// assert_eq!(classify(StatusCode::FORBIDDEN, &headers, entitlement), Verdict::Entitlement);
/// ```
pub fn classify(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
    let unauthorized = status == StatusCode::UNAUTHORIZED;
    if !unauthorized && status != StatusCode::FORBIDDEN {
        return Verdict::Unrecognized;
    }
    let found = scan::scan(body);
    if let Some(reason) = found.wke {
        Verdict::StaleToken(StaleReason::Wke(reason))
    } else if found.token_not_validated {
        Verdict::StaleToken(StaleReason::TokenNotValidated)
    } else if challenge::bearer_invalid_token(headers) {
        Verdict::StaleToken(StaleReason::InvalidToken)
    } else if found.billing {
        Verdict::Billing
    } else if found.entitlement() {
        Verdict::Entitlement
    } else if unauthorized {
        Verdict::StaleToken(StaleReason::Unauthorized)
    } else {
        Verdict::Unrecognized
    }
}

#[cfg(test)]
mod tests {
    use http::header::WWW_AUTHENTICATE;
    use http::HeaderValue;

    use super::*;

    /// The wire bodies of xAI's 401/403 answers.
    const STALE: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#;
    const UNBRACKETED: &str = r#"{"code":"unauthenticated:bad-credentials","error":"The OAuth2 access token could not be validated."}"#;
    const ENTITLEMENT: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"You have either run out of available resources or do not have an active Grok subscription. Manage subscriptions at https://grok.com"}"#;
    const BILLING: &str = r#"{"code":"personal-team-blocked:spending-limit","error":"You have run out of credits or need a Grok subscription..."}"#;
    const GENERIC: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"Forbidden"}"#;

    const UNAUTHORIZED: StatusCode = StatusCode::UNAUTHORIZED;
    const FORBIDDEN: StatusCode = StatusCode::FORBIDDEN;

    fn wke(reason: &str) -> Verdict {
        Verdict::StaleToken(StaleReason::Wke(reason.into()))
    }

    fn stale(reason: StaleReason) -> Verdict {
        Verdict::StaleToken(reason)
    }

    fn headers(challenges: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for challenge in challenges {
            headers.append(
                WWW_AUTHENTICATE,
                HeaderValue::from_str(challenge).unwrap_or_else(|_| HeaderValue::from_static("")),
            );
        }
        headers
    }

    #[track_caller]
    fn check(status: StatusCode, challenges: &[&str], body: impl AsRef<[u8]>, expected: Verdict) {
        let body = body.as_ref();
        assert_eq!(
            classify(status, &headers(challenges), body),
            expected,
            "{status} {challenges:?} {}",
            String::from_utf8_lossy(body)
        );
    }

    #[test]
    fn rule_1_only_401_and_403_are_classified() {
        let invalid = [r#"Bearer error="invalid_token""#];
        for status in [200, 201, 204, 400, 404, 407, 429, 500, 502, 503] {
            let status = StatusCode::from_u16(status).unwrap_or_default();
            for body in [
                STALE,
                UNBRACKETED,
                ENTITLEMENT,
                BILLING,
                GENERIC,
                "",
                "null",
            ] {
                check(status, &[], body, Verdict::Unrecognized);
                check(status, &invalid, body, Verdict::Unrecognized);
            }
        }
    }

    #[test]
    fn the_wire_bodies_with_401_and_403() {
        for status in [UNAUTHORIZED, FORBIDDEN] {
            check(status, &[], STALE, wke("bad-credentials"));
            check(status, &[], UNBRACKETED, wke("bad-credentials"));
            check(status, &[], ENTITLEMENT, Verdict::Entitlement);
            check(status, &[], BILLING, Verdict::Billing);
        }
        check(FORBIDDEN, &[], GENERIC, Verdict::Unrecognized);
        check(UNAUTHORIZED, &[], GENERIC, stale(StaleReason::Unauthorized));
    }

    #[test]
    fn rule_2_well_known_error_reasons() {
        for reason in [
            "bad-credentials",
            "expired-token",
            "revoked",
            "no-credentials",
            "some-future-reason",
        ] {
            let bracketed = STALE.replace("bad-credentials", reason);
            let json_code = UNBRACKETED.replace("bad-credentials", reason);
            for status in [UNAUTHORIZED, FORBIDDEN] {
                check(status, &[], &bracketed, wke(reason));
                check(status, &[], &json_code, wke(reason));
            }
        }
    }

    #[test]
    fn rule_2_markers_in_any_case_and_shape() {
        check(
            FORBIDDEN,
            &[],
            "[wKe=UnAuthenticated:Expired-Token]",
            wke("expired-token"),
        );
        check(FORBIDDEN, &[], STALE.to_uppercase(), wke("bad-credentials"));
        check(
            FORBIDDEN,
            &[],
            r#"{"CODE" : "UNAUTHENTICATED:Revoked"}"#,
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[],
            "{\"code\":\n\t\"unauthenticated:revoked\"}",
            wke("revoked"),
        );
        // OpenAI-style nesting.
        let nested = r#"{"error":{"message":"The OAuth2 access token could not be validated.","type":"invalid_request_error","code":"unauthenticated:expired-token"}}"#;
        check(FORBIDDEN, &[], nested, wke("expired-token"));
        let nested = r#"{"error":{"message":"denied [WKE=unauthenticated:revoked]","type":"permission_error","code":"forbidden"}}"#;
        check(FORBIDDEN, &[], nested, wke("revoked"));
        // Plain text and HTML.
        check(
            FORBIDDEN,
            &[],
            "forbidden [WKE=unauthenticated:no-credentials] see docs",
            wke("no-credentials"),
        );
        check(
            FORBIDDEN,
            &[],
            "<html><body><p>[WKE=unauthenticated:revoked]</p></body></html>",
            wke("revoked"),
        );
    }

    #[test]
    fn rule_2_the_reason_runs_to_a_bracket_quote_whitespace_or_the_end() {
        check(
            FORBIDDEN,
            &[],
            "[WKE=unauthenticated:revoked]tail",
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[],
            "\"[WKE=unauthenticated:revoked\"",
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[],
            "[WKE=unauthenticated:revoked please sign in",
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[],
            "[WKE=unauthenticated:revoked\nnext",
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[],
            "[WKE=unauthenticated:bad-cred",
            wke("bad-cred"),
        );
        check(FORBIDDEN, &[], "[WKE=unauthenticated:a.b,c}", wke("a.b,c}"));
        check(
            FORBIDDEN,
            &[],
            b"[WKE=unauthenticated:caf\xe9]",
            wke("caf\u{fffd}"),
        );
    }

    #[test]
    fn rule_2_the_first_marker_wins() {
        check(
            FORBIDDEN,
            &[],
            "[WKE=unauthenticated:revoked] [WKE=unauthenticated:expired-token]",
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[],
            r#"{"code":"unauthenticated:revoked","error":"[WKE=unauthenticated:expired-token]"}"#,
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[],
            r#"{"error":"[WKE=unauthenticated:expired-token]","code":"unauthenticated:revoked"}"#,
            wke("expired-token"),
        );
    }

    #[test]
    fn rule_2_an_empty_reason_is_no_marker() {
        check(
            FORBIDDEN,
            &[],
            "[WKE=unauthenticated:]",
            Verdict::Unrecognized,
        );
        check(
            UNAUTHORIZED,
            &[],
            "[WKE=unauthenticated:]",
            stale(StaleReason::Unauthorized),
        );
        check(
            FORBIDDEN,
            &[],
            r#"{"code":"unauthenticated:"}"#,
            Verdict::Unrecognized,
        );
        check(
            FORBIDDEN,
            &[],
            "[WKE=unauthenticated: revoked]",
            Verdict::Unrecognized,
        );
        // A later marker still counts, and so do the rules below.
        check(
            FORBIDDEN,
            &[],
            "[WKE=unauthenticated:] [WKE=unauthenticated:revoked]",
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[],
            "[WKE=unauthenticated:] spending-limit",
            Verdict::Billing,
        );
    }

    #[test]
    fn rule_2_needs_the_bracket_or_the_code_key() {
        check(
            FORBIDDEN,
            &[],
            "unauthenticated:revoked",
            Verdict::Unrecognized,
        );
        check(
            FORBIDDEN,
            &[],
            "[unauthenticated:revoked]",
            Verdict::Unrecognized,
        );
        check(
            FORBIDDEN,
            &[],
            r#"{"type":"unauthenticated:revoked"}"#,
            Verdict::Unrecognized,
        );
        check(
            FORBIDDEN,
            &[],
            r#"{"code":"x unauthenticated:revoked"}"#,
            Verdict::Unrecognized,
        );
        check(
            FORBIDDEN,
            &[],
            r#"{"errorcode":"unauthenticated:revoked"}"#,
            Verdict::Unrecognized,
        );
        check(
            UNAUTHORIZED,
            &[],
            "WKE=unauthenticated:revoked",
            stale(StaleReason::Unauthorized),
        );
    }

    #[test]
    fn rule_2_wins_over_everything_below_it() {
        let entitlement_and_marker = ENTITLEMENT.replace(
            "https://grok.com",
            "https://grok.com [WKE=unauthenticated:revoked]",
        );
        check(FORBIDDEN, &[], entitlement_and_marker, wke("revoked"));
        check(
            FORBIDDEN,
            &[],
            format!("[WKE=unauthenticated:revoked] {ENTITLEMENT}"),
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[],
            format!("{BILLING} [WKE=unauthenticated:revoked]"),
            wke("revoked"),
        );
        check(
            FORBIDDEN,
            &[r#"Bearer error="invalid_token""#],
            STALE,
            wke("bad-credentials"),
        );
        // The stale body also says the token could not be validated: the marker is more precise.
        check(UNAUTHORIZED, &[], STALE, wke("bad-credentials"));
    }

    #[test]
    fn rule_3_token_not_validated() {
        let body = r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated."}"#;
        check(FORBIDDEN, &[], body, stale(StaleReason::TokenNotValidated));
        check(
            UNAUTHORIZED,
            &[],
            body,
            stale(StaleReason::TokenNotValidated),
        );
        check(
            FORBIDDEN,
            &[],
            "THE OAUTH2 ACCESS TOKEN COULD NOT BE VALIDATED",
            stale(StaleReason::TokenNotValidated),
        );
        let nested = r#"{"error":{"message":"The OAuth2 access token could not be validated.","type":"invalid_request_error","code":"forbidden"}}"#;
        check(
            FORBIDDEN,
            &[],
            nested,
            stale(StaleReason::TokenNotValidated),
        );
        // Below rule 2, above rules 4 to 6.
        check(
            FORBIDDEN,
            &[r#"Bearer error="invalid_token""#],
            body,
            stale(StaleReason::TokenNotValidated),
        );
        check(
            FORBIDDEN,
            &[],
            format!("{BILLING} {body}"),
            stale(StaleReason::TokenNotValidated),
        );
        check(
            FORBIDDEN,
            &[],
            format!("{ENTITLEMENT} {body}"),
            stale(StaleReason::TokenNotValidated),
        );
        check(
            FORBIDDEN,
            &[],
            "the oauth2 access token could not be",
            Verdict::Unrecognized,
        );
    }

    #[test]
    fn rule_4_rfc_6750_invalid_token() {
        let invalid = stale(StaleReason::InvalidToken);
        for challenges in [
            &[r#"Bearer error="invalid_token""#][..],
            &["Bearer error=invalid_token"],
            &[
                r#"Bearer realm="api.x.ai", error="invalid_token", error_description="The access token expired""#,
            ],
            &[r#"bearer ERROR="INVALID_TOKEN""#],
            &[r#"Basic realm="x", Bearer realm="api.x.ai", error="invalid_token""#],
            &[r#"Basic realm="x""#, r#"Bearer error="invalid_token""#],
            &[
                r#"Bearer realm="a, b""#,
                r#"Bearer scope="x", error="invalid_token""#,
            ],
        ] {
            for status in [UNAUTHORIZED, FORBIDDEN] {
                check(status, challenges, "", invalid.clone());
                check(status, challenges, GENERIC, invalid.clone());
            }
        }
        for challenges in [
            &[r#"Basic realm="x", error="invalid_token""#][..],
            &[r#"Bearer realm="x", Basic error="invalid_token""#],
            &[r#"Bearer error="insufficient_scope""#],
            &[r#"Bearer error_description="invalid_token""#],
            &[r#"Bearer realm="error=invalid_token""#],
            &["Bearer"],
        ] {
            check(FORBIDDEN, challenges, GENERIC, Verdict::Unrecognized);
            check(
                UNAUTHORIZED,
                challenges,
                GENERIC,
                stale(StaleReason::Unauthorized),
            );
        }
        // Above billing and entitlement.
        let invalid_token = [r#"Bearer error="invalid_token""#];
        check(FORBIDDEN, &invalid_token, BILLING, invalid.clone());
        check(FORBIDDEN, &invalid_token, ENTITLEMENT, invalid);
    }

    #[test]
    fn rule_5_billing() {
        for body in [
            BILLING,
            "personal-team-blocked",
            "SPENDING-LIMIT reached",
            r#"{"error":{"message":"Spending-Limit","type":"billing","code":"personal-team-blocked"}}"#,
        ] {
            check(FORBIDDEN, &[], body, Verdict::Billing);
            check(UNAUTHORIZED, &[], body, Verdict::Billing);
        }
        // Above entitlement.
        check(
            FORBIDDEN,
            &[],
            format!("{ENTITLEMENT} {BILLING}"),
            Verdict::Billing,
        );
        check(FORBIDDEN, &[], "spending limit", Verdict::Unrecognized);
    }

    #[test]
    fn rule_6_entitlement() {
        for body in [
            ENTITLEMENT,
            "You do not have an active Grok subscription.",
            "out of available resources (grok)",
            "GROK: the caller does NOT HAVE PERMISSION",
            r#"{"error":{"message":"You do not have an active Grok subscription.","type":"permission_error","code":"forbidden"}}"#,
            r#"{"error":{"message":"The caller does not have permission","type":"grok-4","code":403}}"#,
        ] {
            check(FORBIDDEN, &[], body, Verdict::Entitlement);
            // Above the plain-401 rule.
            check(UNAUTHORIZED, &[], body, Verdict::Entitlement);
        }
        // Each half of a conjunction alone is not enough.
        for body in [
            "out of available resources",
            "does not have permission",
            "grok",
            "grok subscription",
        ] {
            check(FORBIDDEN, &[], body, Verdict::Unrecognized);
            check(UNAUTHORIZED, &[], body, stale(StaleReason::Unauthorized));
        }
    }

    /// `out of available resources` and `does not have permission` are looked for in a second
    /// pass over the body, only once the first has found `grok` and nothing that decides
    /// earlier: whichever comes first, in any case, the verdict is the same.
    #[test]
    fn rule_6_the_phrases_beside_grok_before_and_after_it() {
        let invalid_token = [r#"Bearer error="invalid_token""#];
        let table: [(&str, &[&str], Verdict); 20] = [
            (
                "out of available resources, grok",
                &[],
                Verdict::Entitlement,
            ),
            (
                "grok: out of available resources",
                &[],
                Verdict::Entitlement,
            ),
            (
                "Out Of AVAILABLE Resources (gRoK)",
                &[],
                Verdict::Entitlement,
            ),
            ("does not have permission: grok", &[], Verdict::Entitlement),
            ("GROK Does Not Have Permission", &[], Verdict::Entitlement),
            (
                "you have no access. grok out of available resources",
                &[],
                Verdict::Entitlement,
            ),
            (
                r#"{"error":"out of available resources","model":"grok-4"}"#,
                &[],
                Verdict::Entitlement,
            ),
            (
                "does not have permission, out of available resources, grok",
                &[],
                Verdict::Entitlement,
            ),
            // `grok` without the phrases, or near misses of them.
            ("grok", &[], Verdict::Unrecognized),
            (
                "grok: have patience, capacity available soon",
                &[],
                Verdict::Unrecognized,
            ),
            ("grok out of available resource", &[], Verdict::Unrecognized),
            ("grok does not have permissio", &[], Verdict::Unrecognized),
            (
                "grok: out of  available resources",
                &[],
                Verdict::Unrecognized,
            ),
            (
                "gr ok: out of available resources",
                &[],
                Verdict::Unrecognized,
            ),
            // The phrases without `grok`.
            (
                "progress: out of available resources; does not have permission",
                &[],
                Verdict::Unrecognized,
            ),
            // What decides before them still does, wherever it is.
            (
                "grok out of available resources spending-limit",
                &[],
                Verdict::Billing,
            ),
            (
                "grok out of available resources [WKE=unauthenticated:revoked]",
                &[],
                wke("revoked"),
            ),
            (
                "does not have permission. oauth2 access token could not be validated. grok",
                &[],
                stale(StaleReason::TokenNotValidated),
            ),
            (
                "grok does not have permission",
                &invalid_token,
                stale(StaleReason::InvalidToken),
            ),
            (
                "do not have an active grok subscription; does not have permission",
                &[],
                Verdict::Entitlement,
            ),
        ];
        for (body, challenges, expected) in table {
            check(FORBIDDEN, challenges, body, expected.clone());
            check(FORBIDDEN, challenges, body.to_uppercase(), expected.clone());
            let expected = match expected {
                Verdict::Unrecognized => stale(StaleReason::Unauthorized),
                other => other,
            };
            check(UNAUTHORIZED, challenges, body, expected);
        }
    }

    #[test]
    fn rule_7_the_rest() {
        for body in [
            &b""[..],
            b"null",
            b"[]",
            b"[1, 2, 3]",
            b"{}",
            b"Forbidden",
            b"<html><head><title>403 Forbidden</title></head><body>nginx</body></html>",
            b"\xff\xfe\x00\x80 not utf-8 \xc3",
            br#"{"code":"The caller does not have permiss"#,
            GENERIC.as_bytes(),
        ] {
            check(UNAUTHORIZED, &[], body, stale(StaleReason::Unauthorized));
            check(FORBIDDEN, &[], body, Verdict::Unrecognized);
        }
    }

    #[test]
    fn truncated_wire_bodies_never_panic() {
        for body in [STALE, UNBRACKETED, ENTITLEMENT, BILLING, GENERIC] {
            for cut in 0..=body.len() {
                let prefix = body.as_bytes().get(..cut).unwrap_or_default();
                let _ = classify(FORBIDDEN, &HeaderMap::new(), prefix);
                let suffix = body.as_bytes().get(cut..).unwrap_or_default();
                let _ = classify(UNAUTHORIZED, &HeaderMap::new(), suffix);
            }
        }
    }

    #[test]
    fn the_classifier_trait_uses_classify() {
        let classifier = XaiClassifier;
        assert!(classifier.inspects(FORBIDDEN) && classifier.inspects(UNAUTHORIZED));
        assert!(!classifier.inspects(StatusCode::OK));
        assert_eq!(
            classifier.classify(FORBIDDEN, &HeaderMap::new(), STALE.as_bytes()),
            wke("bad-credentials")
        );
    }
}
