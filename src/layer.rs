//! The layer and its builder.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::budget::RefreshBudget;
use crate::classify::{Classify, XaiClassifier};
use crate::credential::Credentials;
use crate::refresh::{DynRefresher, Refresh, TokenRefresher};
use crate::service::XaiOAuthRecovery;

pub(crate) const DEFAULT_REFRESH_TIMEOUT: Duration = Duration::from_secs(20);
pub(crate) const DEFAULT_REFRESH_AHEAD: Duration = Duration::from_secs(300);
pub(crate) const DEFAULT_MAX_ERROR_BODY_BYTES: usize = 64 * 1024;
pub(crate) const DEFAULT_MAX_REPLAY_BODY_BYTES: usize = 1024 * 1024;

/// The settings a layer and its services share.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) budget: RefreshBudget,
    pub(crate) refresh_timeout: Duration,
    pub(crate) refresh_ahead: Duration,
    pub(crate) max_error_body_bytes: usize,
    pub(crate) max_replay_body_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            budget: RefreshBudget::default(),
            refresh_timeout: DEFAULT_REFRESH_TIMEOUT,
            refresh_ahead: DEFAULT_REFRESH_AHEAD,
            max_error_body_bytes: DEFAULT_MAX_ERROR_BODY_BYTES,
            max_replay_body_bytes: DEFAULT_MAX_REPLAY_BODY_BYTES,
        }
    }
}

/// What every clone of a service shares: credentials, refresher, classifier and settings.
pub(crate) struct Shared<R, C> {
    pub(crate) refresh: Refresh,
    _refresher: PhantomData<fn() -> R>,
    pub(crate) classifier: C,
    pub(crate) refresh_ahead: Duration,
    pub(crate) max_error_body_bytes: usize,
    pub(crate) max_replay_body_bytes: usize,
}

impl<R: TokenRefresher, C> Shared<R, C> {
    pub(crate) fn new(
        credentials: Credentials,
        refresher: R,
        classifier: C,
        settings: &Settings,
    ) -> Self {
        Self {
            refresh: Refresh {
                refresher: DynRefresher::new(refresher),
                credentials,
                budget: settings.budget,
                timeout: settings.refresh_timeout,
            },
            _refresher: PhantomData,
            classifier,
            refresh_ahead: settings.refresh_ahead,
            max_error_body_bytes: settings.max_error_body_bytes,
            max_replay_body_bytes: settings.max_replay_body_bytes,
        }
    }
}

impl<R, C: fmt::Debug> fmt::Debug for Shared<R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("credentials", &self.refresh.credentials)
            .field("budget", &self.refresh.budget)
            .field("refresh_timeout", &self.refresh.timeout)
            .field("classifier", &self.classifier)
            .field("refresh_ahead", &self.refresh_ahead)
            .field("max_error_body_bytes", &self.max_error_body_bytes)
            .field("max_replay_body_bytes", &self.max_replay_body_bytes)
            .finish_non_exhaustive()
    }
}

/// Applies [`XaiOAuthRecovery`] to a service: sets `Authorization: Bearer` from
/// [`Credentials`], and recovers from stale-token 401/403 responses with one refresh per
/// credential and one retry per request.
///
/// Building it needs no async runtime. Every service it makes (and every clone of those) shares
/// one single-flight and one refresh budget per credential, through the [`Credentials`].
///
/// ```
/// use std::time::Duration;
/// use tower::{service_fn, BoxError};
/// use xai_oauth_recovery::{Credential, Credentials, RefreshBudget, RefreshRequest, XaiOAuthRecoveryLayer};
///
/// let credentials = Credentials::new(Credential::new("default", "token"));
/// let refresher = service_fn(|req: RefreshRequest| async move {
///     Ok::<_, BoxError>(Credential::new(req.stale().id(), "new-token"))
/// });
/// let layer = XaiOAuthRecoveryLayer::new(credentials, refresher)
///     .refresh_budget(RefreshBudget::new(3, Duration::from_secs(300)))
///     .refresh_timeout(Duration::from_secs(10))
///     .max_error_body_bytes(16 * 1024);
/// ```
pub struct XaiOAuthRecoveryLayer<R, C = XaiClassifier> {
    credentials: Credentials,
    refresher: R,
    classifier: C,
    settings: Settings,
}

impl<R> XaiOAuthRecoveryLayer<R> {
    /// A layer that authorizes requests with `credentials` and refreshes them with `refresher`,
    /// with xAI's classifier and the default bounds.
    pub fn new(credentials: Credentials, refresher: R) -> Self {
        Self {
            credentials,
            refresher,
            classifier: XaiClassifier,
            settings: Settings::default(),
        }
    }
}

/// Generates the builder methods that change [`Settings`], for the layer and for the other
/// front ends built on the same core. The type must have a method
/// `map_settings(self, f: impl FnOnce(&mut Settings)) -> Self`.
macro_rules! settings_builders {
    () => {
        /// At most this many refreshes per credential per window (default: 3 per 5 minutes).
        pub fn refresh_budget(self, budget: $crate::RefreshBudget) -> Self {
            self.map_settings(|settings| settings.budget = budget)
        }

        /// How long a refresh may take before every request waiting on it gives up on it
        /// (default: 20 seconds).
        pub fn refresh_timeout(self, timeout: ::std::time::Duration) -> Self {
            self.map_settings(|settings| settings.refresh_timeout = timeout)
        }

        /// Refresh a credential before sending a request when its access token expires within
        /// this window (default: 5 minutes). A zero window refreshes only tokens already expired.
        ///
        /// A token that a refresh returned uses at most half of the lifetime it came with as its
        /// window: one that lives shorter than twice the window is used for the first half of
        /// its life and refreshed in the second, instead of being refreshed on every request.
        pub fn refresh_ahead(self, ahead: ::std::time::Duration) -> Self {
            self.map_settings(|settings| settings.refresh_ahead = ahead)
        }

        /// Buffer at most this many bytes of a 401/403 body to classify it (default: 64 KiB).
        /// A larger body is handed back whole, unclassified.
        pub fn max_error_body_bytes(self, max: usize) -> Self {
            self.map_settings(|settings| settings.max_error_body_bytes = max)
        }

        /// Keep at most this many bytes of a request body for a retry (default: 1 MiB). A larger
        /// body is sent just the same but cannot be retried.
        pub fn max_replay_body_bytes(self, max: usize) -> Self {
            self.map_settings(|settings| settings.max_replay_body_bytes = max)
        }
    };
}
#[cfg(feature = "reqwest")]
pub(crate) use settings_builders;

impl<R, C> XaiOAuthRecoveryLayer<R, C> {
    settings_builders!();

    /// Uses another classifier, for example one for another OAuth provider.
    pub fn classifier<C2: Classify>(self, classifier: C2) -> XaiOAuthRecoveryLayer<R, C2> {
        XaiOAuthRecoveryLayer {
            credentials: self.credentials,
            refresher: self.refresher,
            classifier,
            settings: self.settings,
        }
    }

    /// The credentials the layer uses.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub(crate) fn map_settings(mut self, f: impl FnOnce(&mut Settings)) -> Self {
        f(&mut self.settings);
        self
    }

    /// What the services share, built from the layer's configuration.
    pub(crate) fn shared(&self) -> Shared<R, C>
    where
        R: TokenRefresher,
        C: Clone,
    {
        Shared::new(
            self.credentials.clone(),
            self.refresher.clone(),
            self.classifier.clone(),
            &self.settings,
        )
    }
}

impl<S, R: TokenRefresher, C: Clone> Layer<S> for XaiOAuthRecoveryLayer<R, C> {
    type Service = XaiOAuthRecovery<S, R, C>;

    fn layer(&self, inner: S) -> Self::Service {
        XaiOAuthRecovery::from_shared(inner, Arc::new(self.shared()))
    }
}

impl<R: Clone, C: Clone> Clone for XaiOAuthRecoveryLayer<R, C> {
    fn clone(&self) -> Self {
        Self {
            credentials: self.credentials.clone(),
            refresher: self.refresher.clone(),
            classifier: self.classifier.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<R, C: fmt::Debug> fmt::Debug for XaiOAuthRecoveryLayer<R, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("XaiOAuthRecoveryLayer")
            .field("credentials", &self.credentials)
            .field("classifier", &self.classifier)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
