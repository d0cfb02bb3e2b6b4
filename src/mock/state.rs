//! What the mock knows: accounts, the tokens it issued, and the knobs tests turn.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

/// What an account signed in to the mock may do, which decides how the inference API answers
/// its valid access tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Account {
    /// An active Grok subscription: inference requests succeed.
    #[default]
    Subscribed,
    /// No active Grok subscription: 403 with xAI's entitlement body, which no refresh fixes.
    NoSubscription,
    /// Out of credits: 403 with xAI's `personal-team-blocked:spending-limit` billing body.
    OutOfCredits,
}

/// The settings a builder starts the mock with; most can change while it runs.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    pub(super) access_token_ttl: Duration,
    pub(super) rotate_refresh_tokens: bool,
    pub(super) inference_latency: Duration,
    pub(super) token_latency: Duration,
    pub(super) token_failure_rate: f64,
    pub(super) refresh_issues_stale_tokens: bool,
    pub(super) seed: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            access_token_ttl: Duration::from_secs(3600),
            rotate_refresh_tokens: true,
            inference_latency: Duration::ZERO,
            token_latency: Duration::ZERO,
            token_failure_rate: 0.0,
            refresh_issues_stale_tokens: false,
            seed: 0x5eed_0fa1_0a17,
        }
    }
}

/// A probability in `0.0..=1.0`; anything else (NaN included) is clamped.
pub(super) fn probability(p: f64) -> f64 {
    if p.is_nan() {
        0.0
    } else {
        p.clamp(0.0, 1.0)
    }
}

/// SplitMix64: a tiny, seedable, deterministic generator (any seed works, zero included).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform float in `0.0..1.0`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
struct AccessEntry {
    serial: u64,
    id: Arc<str>,
    /// Issued already rejected (see [`Settings::refresh_issues_stale_tokens`]).
    born_stale: bool,
    /// `None`: never expires (a lifetime too long for the clock).
    expires: Option<Instant>,
}

#[derive(Debug)]
struct RefreshEntry {
    serial: u64,
    id: Arc<str>,
    used: bool,
}

/// What an access token is worth to the inference API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Access {
    /// Never issued here.
    Unknown,
    /// Issued, but stale: expired, invalidated, or issued stale.
    Stale,
    /// Valid, for this credential id and account.
    Valid(Arc<str>, Account),
}

/// Tokens handed out by a sign-in or a refresh.
#[derive(Debug)]
pub(super) struct Issued {
    pub(super) access_token: String,
    pub(super) refresh_token: Option<String>,
    pub(super) expires_in: Duration,
}

/// Why a refresh token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    Unknown,
    Used,
    Revoked,
}

impl Refused {
    pub(super) fn description(self) -> &'static str {
        match self {
            Self::Unknown => "The refresh token is invalid or expired.",
            Self::Used => "The refresh token has already been used.",
            Self::Revoked => "The refresh token has been revoked.",
        }
    }
}

/// The mock's mutable state, behind one `std::sync::Mutex` that is never held across an await.
#[derive(Debug)]
pub(super) struct State {
    pub(super) settings: Settings,
    rng: SplitMix64,
    serial: u64,
    accounts: HashMap<Arc<str>, Account>,
    access: HashMap<String, AccessEntry>,
    refresh: HashMap<String, RefreshEntry>,
    /// Access tokens with a lower serial are stale.
    access_valid_from: u64,
    /// Refresh tokens with a lower serial are revoked.
    refresh_valid_from: u64,
    fail_next: u32,
    fail_status: StatusCode,
    pub(super) last_token_form: Option<Vec<(String, String)>>,
}

impl State {
    pub(super) fn new(settings: Settings) -> Self {
        Self {
            rng: SplitMix64(settings.seed),
            settings,
            serial: 0,
            accounts: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            access_valid_from: 0,
            refresh_valid_from: 0,
            fail_next: 0,
            fail_status: StatusCode::SERVICE_UNAVAILABLE,
            last_token_form: None,
        }
    }

    fn token(&mut self, kind: &str) -> (u64, String) {
        self.serial += 1;
        let serial = self.serial;
        (
            serial,
            format!("mock-{kind}-{serial}-{:016x}", self.rng.next_u64()),
        )
    }

    fn issue(&mut self, id: Arc<str>, born_stale: bool, with_refresh: bool) -> Issued {
        let ttl = self.settings.access_token_ttl;
        let (serial, access_token) = self.token("at");
        self.access.insert(
            access_token.clone(),
            AccessEntry {
                serial,
                id: id.clone(),
                born_stale,
                expires: Instant::now().checked_add(ttl),
            },
        );
        let refresh_token = with_refresh.then(|| {
            let (serial, refresh_token) = self.token("rt");
            self.refresh.insert(
                refresh_token.clone(),
                RefreshEntry {
                    serial,
                    id,
                    used: false,
                },
            );
            refresh_token
        });
        Issued {
            access_token,
            refresh_token,
            expires_in: ttl,
        }
    }

    /// Signs `id` in as `account`: a valid access token and a refresh token.
    pub(super) fn sign_in(&mut self, id: &str, account: Account) -> Issued {
        let id: Arc<str> = Arc::from(id);
        self.accounts.insert(id.clone(), account);
        self.issue(id, false, true)
    }

    pub(super) fn set_account(&mut self, id: &str, account: Account) {
        self.accounts.insert(Arc::from(id), account);
    }

    pub(super) fn check_access(&self, token: &str) -> Access {
        let Some(entry) = self.access.get(token) else {
            return Access::Unknown;
        };
        let expired = entry.expires.is_some_and(|at| Instant::now() >= at);
        if entry.born_stale || expired || entry.serial < self.access_valid_from {
            return Access::Stale;
        }
        let account = self.accounts.get(&entry.id).copied().unwrap_or_default();
        Access::Valid(entry.id.clone(), account)
    }

    /// Spends a refresh token (when tokens rotate) for a new access token of the same account.
    pub(super) fn redeem(&mut self, refresh_token: &str) -> Result<Issued, Refused> {
        let rotate = self.settings.rotate_refresh_tokens;
        let valid_from = self.refresh_valid_from;
        let entry = self
            .refresh
            .get_mut(refresh_token)
            .ok_or(Refused::Unknown)?;
        if entry.serial < valid_from {
            return Err(Refused::Revoked);
        }
        if entry.used {
            return Err(Refused::Used);
        }
        entry.used = rotate;
        let id = entry.id.clone();
        let born_stale = self.settings.refresh_issues_stale_tokens;
        Ok(self.issue(id, born_stale, rotate))
    }

    pub(super) fn expire_access_tokens(&mut self) {
        self.access_valid_from = self.serial + 1;
    }

    pub(super) fn revoke_refresh_tokens(&mut self) {
        self.refresh_valid_from = self.serial + 1;
    }

    pub(super) fn fail_next(&mut self, n: u32, status: StatusCode) {
        self.fail_next = n;
        self.fail_status = status;
    }

    /// The status to fail this token request with, if a failure is injected.
    pub(super) fn injected_failure(&mut self) -> Option<StatusCode> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            return Some(self.fail_status);
        }
        let p = self.settings.token_failure_rate;
        (p > 0.0 && self.rng.next_f64() < p).then_some(StatusCode::SERVICE_UNAVAILABLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(Settings::default())
    }

    #[test]
    fn tokens_are_deterministic_and_distinct() {
        let (mut a, mut b) = (state(), state());
        let (x, y) = (
            a.sign_in("alice", Account::Subscribed),
            b.sign_in("alice", Account::Subscribed),
        );
        assert_eq!(x.access_token, y.access_token);
        assert_eq!(x.refresh_token, y.refresh_token);
        assert!(
            x.access_token.starts_with("mock-at-1-"),
            "{}",
            x.access_token
        );
        assert!(x
            .refresh_token
            .as_deref()
            .is_some_and(|t| t.starts_with("mock-rt-2-")));
        let z = a.sign_in("alice", Account::Subscribed);
        assert_ne!(x.access_token, z.access_token);
    }

    #[test]
    fn refresh_tokens_rotate_once() {
        let mut s = state();
        let first = s.sign_in("alice", Account::NoSubscription);
        let rt = first.refresh_token.unwrap_or_default();
        let second = s.redeem(&rt).ok();
        assert!(second.as_ref().is_some_and(|i| i.refresh_token.is_some()));
        assert_eq!(s.redeem(&rt).err(), Some(Refused::Used));
        assert_eq!(s.redeem("nope").err(), Some(Refused::Unknown));
        let access = second.map(|i| s.check_access(&i.access_token));
        assert_eq!(
            access,
            Some(Access::Valid(Arc::from("alice"), Account::NoSubscription))
        );
    }

    #[test]
    fn without_rotation_the_refresh_token_stays() {
        let mut s = State::new(Settings {
            rotate_refresh_tokens: false,
            ..Settings::default()
        });
        let rt = s
            .sign_in("a", Account::Subscribed)
            .refresh_token
            .unwrap_or_default();
        for _ in 0..3 {
            let issued = s.redeem(&rt).ok();
            assert!(issued.is_some_and(|i| i.refresh_token.is_none()));
        }
    }

    #[test]
    fn expiry_and_revocation_are_watermarks() {
        let mut s = state();
        let old = s.sign_in("a", Account::Subscribed);
        s.expire_access_tokens();
        s.revoke_refresh_tokens();
        assert_eq!(s.check_access(&old.access_token), Access::Stale);
        let rt = old.refresh_token.unwrap_or_default();
        assert_eq!(s.redeem(&rt).err(), Some(Refused::Revoked));
        let new = s.sign_in("a", Account::Subscribed);
        assert!(matches!(
            s.check_access(&new.access_token),
            Access::Valid(..)
        ));
        assert_eq!(s.check_access("mock-at-1-0000"), Access::Unknown);
    }

    #[test]
    fn zero_ttl_is_stale_at_once() {
        let mut s = State::new(Settings {
            access_token_ttl: Duration::ZERO,
            ..Settings::default()
        });
        let issued = s.sign_in("a", Account::Subscribed);
        assert_eq!(s.check_access(&issued.access_token), Access::Stale);
    }

    #[test]
    fn stale_refreshes() {
        let mut s = state();
        s.settings.refresh_issues_stale_tokens = true;
        let rt = s
            .sign_in("a", Account::Subscribed)
            .refresh_token
            .unwrap_or_default();
        let at = s.redeem(&rt).map(|i| i.access_token).unwrap_or_default();
        assert_eq!(s.check_access(&at), Access::Stale);
    }

    #[test]
    fn injected_failures() {
        let mut s = state();
        s.fail_next(2, StatusCode::BAD_GATEWAY);
        assert_eq!(s.injected_failure(), Some(StatusCode::BAD_GATEWAY));
        assert_eq!(s.injected_failure(), Some(StatusCode::BAD_GATEWAY));
        assert_eq!(s.injected_failure(), None);
        s.settings.token_failure_rate = 1.0;
        assert!((0..100).all(|_| s.injected_failure() == Some(StatusCode::SERVICE_UNAVAILABLE)));
        s.settings.token_failure_rate = 0.5;
        let failed = (0..1000).filter(|_| s.injected_failure().is_some()).count();
        assert!((400..600).contains(&failed), "{failed}");
    }

    #[test]
    fn probabilities_clamp() {
        assert_eq!(probability(f64::NAN), 0.0);
        assert_eq!(probability(-1.0), 0.0);
        assert_eq!(probability(2.0), 1.0);
        assert_eq!(probability(0.25), 0.25);
    }
}
