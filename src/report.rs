//! What the layer did about a 401/403, left in the response's extensions.

use std::fmt;
use std::sync::Arc;

use crate::classify::{StaleReason, Verdict};

/// Why a 401/403 was handed back without a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Skip {
    /// The account has no active subscription: refreshing cannot help.
    Entitlement,
    /// The account is out of credits or over its spending limit.
    Billing,
    /// The classifier did not recognise the response: a 403 is never refreshed on a guess.
    Unrecognized,
    /// The credential's refresh budget is spent for now.
    BudgetExhausted,
    /// The refresh failed (refresher error, timeout, panic or unusable credential).
    RefreshFailed,
    /// A terminal refresh error marked the credential dead: sign in again.
    CredentialDead,
    /// The request body could not be replayed (too large, not read to its end, or failed).
    /// The credential was still refreshed, so the next request goes out with a fresh token.
    BodyNotReplayable,
    /// The 401/403 body was larger than `max_error_body_bytes`: it was not classified.
    ErrorBodyTooLarge,
    /// The 401/403 body failed while it was read: it was not classified.
    ErrorBodyFailed,
}

/// What the layer made of a 401/403 response and what it did about it.
///
/// Every response whose first attempt was a 401/403 carries one in its extensions, also when
/// the retry succeeded. Its `Display` explains the outcome to a person.
///
/// ```
/// # async fn demo(response: http::Response<()>) {
/// use xai_oauth_recovery::{RecoveryReport, Skip};
///
/// if let Some(report) = response.extensions().get::<RecoveryReport>() {
///     if report.skipped() == Some(&Skip::Entitlement) {
///         eprintln!("{report}");
///     }
/// }
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    verdict: Verdict,
    credential: Arc<str>,
    retried: bool,
    refreshed: bool,
    skipped: Option<Skip>,
}

impl RecoveryReport {
    pub(crate) fn new(verdict: Verdict, credential: Arc<str>) -> Self {
        Self {
            verdict,
            credential,
            retried: false,
            refreshed: false,
            skipped: None,
        }
    }

    pub(crate) fn skip(mut self, skip: Skip) -> Self {
        self.skipped = Some(skip);
        self
    }

    pub(crate) fn set_refreshed(mut self, refreshed: bool) -> Self {
        self.refreshed = refreshed;
        self
    }

    pub(crate) fn set_retried(mut self) -> Self {
        self.retried = true;
        self
    }

    /// The classifier's verdict on the first response.
    pub fn verdict(&self) -> &Verdict {
        &self.verdict
    }

    /// The id of the credential the request used.
    pub fn credential_id(&self) -> &str {
        &self.credential
    }

    /// Whether the request was sent again; the response is then the retry's.
    pub fn retried(&self) -> bool {
        self.retried
    }

    /// Whether this request started or joined a refresh that produced a new credential.
    pub fn refreshed(&self) -> bool {
        self.refreshed
    }

    /// Why there was no retry, if there was none.
    pub fn skipped(&self) -> Option<&Skip> {
        self.skipped.as_ref()
    }
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = &self.credential;
        match (self.skipped, &self.verdict) {
            (None, Verdict::StaleToken(reason)) if self.retried => {
                if self.refreshed {
                    write!(f, "the access token of credential `{id}` was stale ({}): refreshed it and retried the request once", Reason(reason))
                } else {
                    write!(f, "the access token of credential `{id}` was stale ({}): retried once with the credential another request had just refreshed", Reason(reason))
                }
            }
            (Some(Skip::Entitlement), _) => f.write_str(
                "this xAI account has no active Grok subscription: refreshing cannot help (manage subscriptions at https://grok.com)",
            ),
            (Some(Skip::Billing), _) => f.write_str(
                "this xAI account is out of credits or over its spending limit: refreshing cannot help",
            ),
            (Some(Skip::Unrecognized), _) => f.write_str(
                "the response did not say the token was stale: handed back as it came, without a refresh",
            ),
            (Some(Skip::BudgetExhausted), _) => write!(
                f,
                "the access token of credential `{id}` is stale but its refresh budget is spent: not refreshing again for now"
            ),
            (Some(Skip::RefreshFailed), _) => write!(
                f,
                "the access token of credential `{id}` is stale and refreshing it failed: try again later"
            ),
            (Some(Skip::CredentialDead), _) => write!(
                f,
                "sign in again: the refresh token of credential `{id}` was revoked or rejected"
            ),
            (Some(Skip::BodyNotReplayable), _) => write!(
                f,
                "the access token of credential `{id}` was stale{}, but the request body could not be replayed: send the request again",
                if self.refreshed { " and was refreshed" } else { "" }
            ),
            (Some(Skip::ErrorBodyTooLarge), _) => f.write_str(
                "the error body was larger than the layer buffers: handed back unclassified",
            ),
            (Some(Skip::ErrorBodyFailed), _) => f.write_str(
                "the error body failed while it was read: handed back as it came",
            ),
            (None, verdict) => write!(f, "{verdict:?}"),
        }
    }
}

struct Reason<'a>(&'a StaleReason);

impl fmt::Display for Reason<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            StaleReason::Wke(reason) => write!(f, "unauthenticated:{reason}"),
            StaleReason::TokenNotValidated => {
                f.write_str("the OAuth2 access token could not be validated")
            }
            StaleReason::Unauthorized => f.write_str("401 Unauthorized"),
            StaleReason::InvalidToken => f.write_str("invalid_token"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_entitlement_and_dead_credentials_to_a_person() {
        let report =
            RecoveryReport::new(Verdict::Entitlement, Arc::from("alice")).skip(Skip::Entitlement);
        assert!(report.to_string().starts_with(
            "this xAI account has no active Grok subscription: refreshing cannot help"
        ));
        let report = RecoveryReport::new(
            Verdict::StaleToken(StaleReason::Wke("revoked".into())),
            Arc::from("alice"),
        )
        .skip(Skip::CredentialDead);
        assert_eq!(
            report.to_string(),
            "sign in again: the refresh token of credential `alice` was revoked or rejected"
        );
    }

    #[test]
    fn explains_a_recovery() {
        let report = RecoveryReport::new(
            Verdict::StaleToken(StaleReason::Wke("bad-credentials".into())),
            Arc::from("default"),
        )
        .set_refreshed(true)
        .set_retried();
        assert_eq!(
            report.to_string(),
            "the access token of credential `default` was stale (unauthenticated:bad-credentials): refreshed it and retried the request once"
        );
        assert!(report.retried() && report.refreshed() && report.skipped().is_none());
    }

    fn assert_extension<T: Clone + Send + Sync + 'static>() {}

    #[test]
    fn is_an_http_extension() {
        assert_extension::<RecoveryReport>();
        assert_extension::<crate::CredentialId>();
    }
}
