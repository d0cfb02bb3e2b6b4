//! What the mock counts, and the checksum it reports request bodies with.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of what a [`MockXai`](super::MockXai) has answered, from
/// [`MockXai::stats`](super::MockXai::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MockStats {
    /// Requests to the inference API (`/v1/...`), whatever the answer.
    pub inference_requests: u64,
    /// Inference requests answered 200.
    pub inference_ok: u64,
    /// Inference requests without a bearer token, answered 401.
    pub unauthorized_401: u64,
    /// Inference requests with an unknown or stale access token, answered with the stale-token 403.
    pub stale_403: u64,
    /// Inference requests of an [`Account::NoSubscription`](super::Account::NoSubscription)
    /// account, answered with the entitlement 403.
    pub entitlement_403: u64,
    /// Inference requests of an [`Account::OutOfCredits`](super::Account::OutOfCredits)
    /// account, answered with the billing 403.
    pub billing_403: u64,
    /// Requests to the token endpoint, whatever the answer.
    pub token_requests: u64,
    /// Refreshes answered 200.
    pub refreshes_ok: u64,
    /// Token requests answered with an error, for whatever reason (the counters below included).
    pub refresh_failures: u64,
    /// Token requests answered `invalid_grant`: unknown, used or revoked refresh tokens.
    pub invalid_grant: u64,
    /// Token requests failed on purpose, by
    /// [`fail_next_token_requests`](super::MockXai::fail_next_token_requests) or
    /// [`set_token_failure_rate`](super::MockXai::set_token_failure_rate).
    pub injected_failures: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counter(AtomicU64);

impl Counter {
    /// Adds one and returns the new count.
    pub(super) fn bump(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) inference_requests: Counter,
    pub(super) inference_ok: Counter,
    pub(super) unauthorized_401: Counter,
    pub(super) stale_403: Counter,
    pub(super) entitlement_403: Counter,
    pub(super) billing_403: Counter,
    pub(super) token_requests: Counter,
    pub(super) refreshes_ok: Counter,
    pub(super) refresh_failures: Counter,
    pub(super) invalid_grant: Counter,
    pub(super) injected_failures: Counter,
}

impl Counters {
    pub(super) fn snapshot(&self) -> MockStats {
        MockStats {
            inference_requests: self.inference_requests.get(),
            inference_ok: self.inference_ok.get(),
            unauthorized_401: self.unauthorized_401.get(),
            stale_403: self.stale_403.get(),
            entitlement_403: self.entitlement_403.get(),
            billing_403: self.billing_403.get(),
            token_requests: self.token_requests.get(),
            refreshes_ok: self.refreshes_ok.get(),
            refresh_failures: self.refresh_failures.get(),
            invalid_grant: self.invalid_grant.get(),
            injected_failures: self.injected_failures.get(),
        }
    }
}

/// The 64-bit FNV-1a hash of `bytes`: the checksum a [`MockXai`](super::MockXai) reports, in
/// 16 lowercase hex digits, for the body of every inference request it answers 200
/// (`x-mock-request-fnv1a` header and `mock.request_fnv1a` field), so that a test can check that
/// a replayed request body arrived byte for byte.
///
/// ```
/// use xai_oauth_recovery::mock::fnv1a_64;
///
/// assert_eq!(format!("{:016x}", fnv1a_64(b"")), "cbf29ce484222325");
/// assert_eq!(format!("{:016x}", fnv1a_64(b"a")), "af63dc4c8601ec8c");
/// ```
pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_known_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
