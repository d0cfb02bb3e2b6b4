//! Credentials: secrets that never print, and the shared handle the layer reads them from.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderValue;
use tokio::sync::broadcast;

/// A secret string whose `Debug` and `Display` never show it.
macro_rules! secret {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a token string.
            pub fn new(secret: impl Into<String>) -> Self {
                Self(Arc::from(secret.into()))
            }

            /// The token itself. Handle with care: this is the only way to see it.
            pub fn secret(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("[redacted]")
            }
        }
    };
}

secret! {
    /// An OAuth access token. Its `Debug` and `Display` never show the secret.
    AccessToken
}

secret! {
    /// An OAuth refresh token. Its `Debug` and `Display` never show the secret.
    RefreshToken
}

/// One OAuth credential: an id the application chooses, an access token, and optionally a
/// refresh token and the access token's expiry.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use xai_oauth_recovery::Credential;
///
/// let cred = Credential::new("alice", "access-token")
///     .with_refresh_token("refresh-token")
///     .with_expires_at(SystemTime::now() + Duration::from_secs(3600));
/// assert_eq!(cred.id(), "alice");
/// assert_eq!(cred.access_token().secret(), "access-token");
/// // Secrets never show in Debug output.
/// assert!(!format!("{cred:?}").contains("access-token"));
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    id: Arc<str>,
    access_token: AccessToken,
    refresh_token: Option<RefreshToken>,
    expires_at: Option<SystemTime>,
}

impl Credential {
    /// A credential with an id and an access token.
    pub fn new(id: impl Into<String>, access_token: impl Into<String>) -> Self {
        Self {
            id: Arc::from(id.into()),
            access_token: AccessToken::new(access_token),
            refresh_token: None,
            expires_at: None,
        }
    }

    /// Sets the refresh token.
    pub fn with_refresh_token(mut self, refresh_token: impl Into<String>) -> Self {
        self.refresh_token = Some(RefreshToken::new(refresh_token));
        self
    }

    /// Sets when the access token expires.
    pub fn with_expires_at(mut self, expires_at: SystemTime) -> Self {
        self.expires_at = Some(expires_at);
        self
    }

    /// Returns the same credential under another id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Arc::from(id.into());
        self
    }

    /// The credential's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The access token.
    pub fn access_token(&self) -> &AccessToken {
        &self.access_token
    }

    /// The refresh token, if there is one.
    pub fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }

    /// When the access token expires, if known.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at
    }

    pub(crate) fn set_id(&mut self, id: Arc<str>) {
        self.id = id;
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("id", &self.id)
            .field("access_token", &self.access_token)
            .field("refresh_token", &self.refresh_token)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Names the credential a request uses, as a request extension. Requests without one use the
/// default credential of [`Credentials`].
///
/// ```
/// use xai_oauth_recovery::CredentialId;
///
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(CredentialId::new("alice"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CredentialId(Arc<str>);

impl CredentialId {
    /// Names a credential.
    pub fn new(id: impl Into<String>) -> Self {
        Self(Arc::from(id.into()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn as_arc(&self) -> &Arc<str> {
        &self.0
    }
}

impl fmt::Display for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a credential cannot authorize a request.
#[derive(Debug, Clone)]
pub struct CredentialError {
    kind: CredentialErrorKind,
    id: Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CredentialErrorKind {
    Unknown,
    InvalidToken,
}

impl CredentialError {
    pub(crate) fn unknown(id: &str) -> Self {
        Self {
            kind: CredentialErrorKind::Unknown,
            id: Arc::from(id),
        }
    }

    pub(crate) fn invalid_token(id: Arc<str>) -> Self {
        Self {
            kind: CredentialErrorKind::InvalidToken,
            id,
        }
    }

    /// The request named a [`CredentialId`] that [`Credentials`] does not hold.
    pub fn is_unknown_credential(&self) -> bool {
        self.kind == CredentialErrorKind::Unknown
    }

    /// The access token contains bytes that cannot go into an HTTP header.
    pub fn is_invalid_token(&self) -> bool {
        self.kind == CredentialErrorKind::InvalidToken
    }

    /// The id of the credential concerned.
    pub fn credential_id(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            CredentialErrorKind::Unknown => write!(f, "no credential with id `{}`", self.id),
            CredentialErrorKind::InvalidToken => write!(
                f,
                "the access token of credential `{}` is not a valid header value",
                self.id
            ),
        }
    }
}

impl std::error::Error for CredentialError {}

/// The state of one credential as the layer sees it: the credential, its generation and the
/// ready-made `Authorization` header value.
#[derive(Clone)]
pub(crate) struct Current {
    pub(crate) credential: Credential,
    pub(crate) generation: u64,
    pub(crate) header: Result<HeaderValue, CredentialError>,
    /// The expiry as a monotonic instant (so that paused time in tests moves it).
    pub(crate) expires: Option<tokio::time::Instant>,
    /// For a credential a refresh installed: half of the lifetime it came with. The
    /// refresh-ahead window never exceeds it, so that a token that lives shorter than the
    /// window is not refreshed again on every request.
    pub(crate) ahead_cap: Option<Duration>,
    pub(crate) dead: bool,
    /// How many refreshes of this generation failed: a request sent before a failure shares
    /// it instead of asking again.
    pub(crate) failures: u64,
}

impl Current {
    fn new(credential: Credential, generation: u64) -> Self {
        let header = bearer_header(&credential);
        let expires = credential.expires_at.map(|at| {
            let now = tokio::time::Instant::now();
            match at.duration_since(SystemTime::now()) {
                Ok(left) => now.checked_add(left).unwrap_or(now + FAR_FUTURE),
                Err(_) => now,
            }
        });
        Self {
            credential,
            generation,
            header,
            expires,
            ahead_cap: None,
            dead: false,
            failures: 0,
        }
    }

    /// A credential a refresh returned: its refresh-ahead window is at most half of the
    /// lifetime it came with.
    fn refreshed(credential: Credential, generation: u64) -> Self {
        let mut current = Self::new(credential, generation);
        current.ahead_cap = current
            .expires
            .map(|expires| expires.saturating_duration_since(tokio::time::Instant::now()) / 2);
        current
    }

    /// Whether the access token expires within `ahead` from now (within half of its lifetime
    /// if a refresh installed it and it lives shorter than twice `ahead`).
    pub(crate) fn expires_within(&self, ahead: Duration) -> bool {
        let ahead = self.ahead_cap.map_or(ahead, |cap| cap.min(ahead));
        match self.expires {
            Some(expires) => tokio::time::Instant::now()
                .checked_add(ahead)
                .is_none_or(|limit| expires <= limit),
            None => false,
        }
    }
}

const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn bearer_header(credential: &Credential) -> Result<HeaderValue, CredentialError> {
    let token = credential.access_token.secret();
    let mut value = String::with_capacity(7 + token.len());
    value.push_str("Bearer ");
    value.push_str(token);
    match HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
        Ok(mut header) => {
            header.set_sensitive(true);
            Ok(header)
        }
        Err(_) => Err(CredentialError::invalid_token(credential.id.clone())),
    }
}

/// One credential's slot: its current state, the refresh in flight and the budget's log.
/// The serial number of the next slot.
static NEXT_SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A holder's cache of a slot's current credential.
pub(crate) type CurrentCache = arc_swap::Cache<Arc<ArcSwap<Current>>, Arc<Current>>;

pub(crate) struct Slot {
    pub(crate) id: Arc<str>,
    /// Tells slots apart for as long as the process runs, even after one is dropped and
    /// another takes its place in memory.
    pub(crate) serial: u64,
    current: Arc<ArcSwap<Current>>,
    pub(crate) flight: Mutex<crate::refresh::FlightState>,
}

impl Slot {
    fn new(credential: Credential) -> Self {
        Self {
            id: credential.id.clone(),
            serial: NEXT_SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            current: Arc::new(ArcSwap::from_pointee(Current::new(credential, 0))),
            flight: Mutex::new(crate::refresh::FlightState::default()),
        }
    }

    /// The current state, cheap enough for every request.
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Current>> {
        self.current.load()
    }

    pub(crate) fn load_full(&self) -> Arc<Current> {
        self.current.load_full()
    }

    /// A cache of the slot's current credential, for one holder: a load through it is one
    /// relaxed atomic read while the credential has not changed.
    pub(crate) fn cache(&self) -> CurrentCache {
        arc_swap::Cache::new(self.current.clone())
    }

    /// Installs a new credential, moving the generation on. Call with the flight lock held.
    pub(crate) fn install(&self, mut credential: Credential) -> Arc<Current> {
        credential.set_id(self.id.clone());
        let generation = self.current.load().generation + 1;
        let current = Arc::new(Current::new(credential, generation));
        self.current.store(current.clone());
        current
    }

    /// Installs a refreshed credential unless its token cannot go into a header. Call with the
    /// flight lock held.
    pub(crate) fn try_install(
        &self,
        mut credential: Credential,
    ) -> Result<Arc<Current>, CredentialError> {
        credential.set_id(self.id.clone());
        let generation = self.current.load().generation + 1;
        let current = Current::refreshed(credential, generation);
        if let Err(error) = &current.header {
            return Err(error.clone());
        }
        let current = Arc::new(current);
        self.current.store(current.clone());
        Ok(current)
    }

    /// Marks the current credential dead. Call with the flight lock held.
    pub(crate) fn mark_dead(&self) {
        let old = self.current.load_full();
        let dead = Current {
            dead: true,
            ..Current::clone(&old)
        };
        self.current.store(Arc::new(dead));
    }

    /// Counts a failed refresh of the current generation. Call with the flight lock held.
    pub(crate) fn mark_failed(&self) {
        let old = self.current.load_full();
        let failed = Current {
            failures: old.failures + 1,
            ..Current::clone(&old)
        };
        self.current.store(Arc::new(failed));
    }
}

struct Inner {
    default: Arc<Slot>,
    others: RwLock<HashMap<Arc<str>, Arc<Slot>>>,
    updates: broadcast::Sender<Credential>,
}

/// The credentials a layer authorizes requests with: a default one and others by id.
///
/// A cheap-to-clone shared handle: the application keeps one clone to insert credentials and to
/// observe refreshed ones, the layer keeps another. Creating it needs no async runtime.
///
/// ```
/// use xai_oauth_recovery::{Credential, Credentials};
///
/// let credentials = Credentials::new(Credential::new("default", "token-1"));
/// credentials.insert(Credential::new("alice", "token-2"));
/// assert_eq!(credentials.get("alice").unwrap().access_token().secret(), "token-2");
/// assert!(credentials.get("bob").is_none());
/// ```
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

impl Credentials {
    /// Holds `default`, used by requests that carry no [`CredentialId`].
    pub fn new(default: Credential) -> Self {
        let (updates, _) = broadcast::channel(64);
        Self {
            inner: Arc::new(Inner {
                default: Arc::new(Slot::new(default)),
                others: RwLock::new(HashMap::new()),
                updates,
            }),
        }
    }

    /// Installs a credential, or replaces the one with the same id (the default one included).
    ///
    /// Replacing moves the credential's generation on, so requests that fail with the old token
    /// retry with the new one without a refresh, and it revives a credential that a terminal
    /// refresh error marked dead. The refresh budget is kept: it protects the token endpoint
    /// whatever the application does.
    pub fn insert(&self, credential: Credential) {
        let slot = match self.slot(credential.id()) {
            Some(slot) => slot,
            None => {
                let mut others = self
                    .inner
                    .others
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                match others.get(credential.id()) {
                    Some(slot) => slot.clone(),
                    None => {
                        let slot = Arc::new(Slot::new(credential));
                        others.insert(slot.id.clone(), slot);
                        return;
                    }
                }
            }
        };
        let _flight = slot.flight.lock().unwrap_or_else(PoisonError::into_inner);
        slot.install(credential);
    }

    /// The credential with this id, if there is one.
    pub fn get(&self, id: &str) -> Option<Credential> {
        self.slot(id).map(|slot| slot.load().credential.clone())
    }

    /// The default credential.
    pub fn default_credential(&self) -> Credential {
        self.inner.default.load().credential.clone()
    }

    /// Removes a credential other than the default one, returning it.
    pub fn remove(&self, id: &str) -> Option<Credential> {
        let mut others = self
            .inner
            .others
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        others.remove(id).map(|slot| slot.load().credential.clone())
    }

    /// Observes every credential that a refresh installs, for example to persist rotated refresh
    /// tokens. A refreshed credential is published before any request retries with it.
    pub fn subscribe(&self) -> CredentialUpdates {
        CredentialUpdates {
            rx: self.inner.updates.subscribe(),
        }
    }

    pub(crate) fn default_slot(&self) -> &Arc<Slot> {
        &self.inner.default
    }

    pub(crate) fn slot(&self, id: &str) -> Option<Arc<Slot>> {
        if &*self.inner.default.id == id {
            return Some(self.inner.default.clone());
        }
        self.inner
            .others
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    pub(crate) fn publish(&self, credential: Credential) {
        // No subscriber is not an error.
        let _ = self.inner.updates.send(credential);
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let others = self
            .inner
            .others
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut ids: Vec<&str> = others.keys().map(|id| &**id).collect();
        ids.sort_unstable();
        f.debug_struct("Credentials")
            .field("default", &self.inner.default.id)
            .field("others", &ids)
            .finish()
    }
}

/// A stream of refreshed credentials, from [`Credentials::subscribe`].
#[derive(Debug)]
pub struct CredentialUpdates {
    rx: broadcast::Receiver<Credential>,
}

impl CredentialUpdates {
    /// The next refreshed credential, or `None` once the [`Credentials`] are gone.
    ///
    /// A subscriber that falls more than 64 refreshes behind skips the oldest ones; the latest
    /// credential of every id is always available from [`Credentials::get`].
    pub async fn recv(&mut self) -> Option<Credential> {
        loop {
            match self.rx.recv().await {
                Ok(credential) => return Some(credential),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }

    /// The next refreshed credential if one is waiting, without blocking.
    pub fn try_recv(&mut self) -> Option<Credential> {
        loop {
            match self.rx.try_recv() {
                Ok(credential) => return Some(credential),
                Err(broadcast::error::TryRecvError::Lagged(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let cred = Credential::new("alice", "sekret-access")
            .with_refresh_token("sekret-refresh")
            .with_expires_at(SystemTime::UNIX_EPOCH);
        let shown = format!(
            "{cred:?} {} {}",
            cred.access_token(),
            cred.refresh_token()
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(!shown.contains("sekret"), "{shown}");
        assert!(shown.contains("alice"));
    }

    #[test]
    fn invalid_token_is_an_error_value() {
        let current = Current::new(Credential::new("bad", "line\nbreak"), 0);
        let err = current
            .header
            .err()
            .map(|e| (e.is_invalid_token(), e.to_string()));
        assert_eq!(
            err,
            Some((
                true,
                "the access token of credential `bad` is not a valid header value".into()
            ))
        );
    }

    #[test]
    fn header_is_sensitive_bearer() {
        let current = Current::new(Credential::new("a", "tok"), 0);
        let header = current.header.ok();
        assert_eq!(
            header.as_ref().map(|h| h.as_bytes()),
            Some(&b"Bearer tok"[..])
        );
        assert_eq!(header.map(|h| h.is_sensitive()), Some(true));
    }

    #[test]
    fn insert_replaces_and_moves_generation() {
        let creds = Credentials::new(Credential::new("default", "t0"));
        assert_eq!(creds.default_slot().load().generation, 0);
        creds.insert(Credential::new("default", "t1"));
        assert_eq!(creds.default_slot().load().generation, 1);
        assert_eq!(creds.default_credential().access_token().secret(), "t1");
        creds.insert(Credential::new("alice", "a0"));
        creds.insert(Credential::new("alice", "a1"));
        let alice = creds.slot("alice").map(|s| {
            (
                s.load().generation,
                s.load().credential.access_token().secret().to_owned(),
            )
        });
        assert_eq!(alice, Some((1, "a1".to_owned())));
        assert_eq!(
            creds.remove("alice").map(|c| c.id().to_owned()),
            Some("alice".into())
        );
        assert!(creds.get("alice").is_none());
    }

    #[test]
    fn expiry_window() {
        let soon = Current::new(
            Credential::new("a", "t").with_expires_at(SystemTime::now() + Duration::from_secs(60)),
            0,
        );
        assert!(soon.expires_within(Duration::from_secs(300)));
        assert!(!soon.expires_within(Duration::from_secs(1)));
        let never = Current::new(Credential::new("a", "t"), 0);
        assert!(!never.expires_within(Duration::from_secs(300)));
        let past = Current::new(
            Credential::new("a", "t").with_expires_at(SystemTime::UNIX_EPOCH),
            0,
        );
        assert!(past.expires_within(Duration::ZERO));
    }

    /// A refreshed token that lives two minutes is refreshed ahead in its last minute, not
    /// at once because the window is five minutes; an inserted one keeps the whole window.
    #[tokio::test(start_paused = true)]
    async fn a_refreshed_token_shorter_than_the_window_keeps_half_its_life() {
        let credential = || {
            Credential::new("a", "t").with_expires_at(SystemTime::now() + Duration::from_secs(120))
        };
        let window = Duration::from_secs(300);
        let inserted = Current::new(credential(), 1);
        assert!(inserted.expires_within(window));
        let refreshed = Current::refreshed(credential(), 1);
        assert!(!refreshed.expires_within(window));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(refreshed.expires_within(window));
        // A long-lived refreshed token keeps the whole window.
        let long = Current::refreshed(
            Credential::new("a", "t")
                .with_expires_at(SystemTime::now() + Duration::from_secs(3600)),
            1,
        );
        assert!(!long.expires_within(window));
        tokio::time::advance(Duration::from_secs(3600 - 299)).await;
        assert!(long.expires_within(window));
        // An already expired one is refreshed whatever its cap.
        let expired = Current::refreshed(
            Credential::new("a", "t").with_expires_at(SystemTime::UNIX_EPOCH),
            1,
        );
        assert!(expired.expires_within(window));
    }
}
