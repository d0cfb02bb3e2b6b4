//! Asking for a new credential: the refresher service, its errors, and the per-credential
//! single flight that makes N concurrent failures cost one refresher call.

use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;
use tower::util::Oneshot;
use tower::BoxError;
use tower_service::Service;

use crate::budget::{RefreshBudget, Spent};
use crate::classify::StaleReason;
use crate::credential::{Credential, Credentials, Current, Slot};

/// Why a refresh was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshReason {
    /// A response said the access token is stale.
    StaleToken(StaleReason),
    /// The access token expires within the layer's refresh-ahead window.
    ExpiresSoon,
}

/// What a [`TokenRefresher`] is asked: a new credential to replace `stale`.
#[derive(Debug, Clone)]
pub struct RefreshRequest {
    stale: Credential,
    reason: RefreshReason,
}

impl RefreshRequest {
    /// A request to replace `stale`.
    pub fn new(stale: Credential, reason: RefreshReason) -> Self {
        Self { stale, reason }
    }

    /// The credential to replace (its refresh token, if any, is what a refresh grant spends).
    pub fn stale(&self) -> &Credential {
        &self.stale
    }

    /// Why the refresh was asked for.
    pub fn reason(&self) -> &RefreshReason {
        &self.reason
    }
}

/// A service that turns a [`RefreshRequest`] into a new [`Credential`] with the same id.
///
/// Any `Service<RefreshRequest, Response = Credential> + Clone + Send + 'static` whose future
/// is `Send` and whose error converts into a [`BoxError`] is one, `tower::service_fn` closures
/// included. Return a [`RefreshError::terminal`] when only a new sign-in can help: the
/// credential is then marked dead and the refresher is not called for it again until the
/// application replaces it with [`Credentials::insert`]. Any other error counts as transient.
///
/// ```
/// use tower::{service_fn, BoxError};
/// use xai_oauth_recovery::{Credential, RefreshRequest, TokenRefresher};
///
/// fn assert_refresher<R: TokenRefresher>(_: &R) {}
///
/// let refresher = service_fn(|req: RefreshRequest| async move {
///     Ok::<_, BoxError>(Credential::new(req.stale().id(), "fresh-token"))
/// });
/// assert_refresher(&refresher);
/// ```
pub trait TokenRefresher:
    Service<
        RefreshRequest,
        Response = Credential,
        Error = <Self as TokenRefresher>::Error,
        Future = <Self as TokenRefresher>::Future,
    > + Clone
    + Send
    + 'static
{
    /// The refresher's error.
    type Error: Into<BoxError>;
    /// The refresher's future.
    type Future: Future<Output = Result<Credential, <Self as TokenRefresher>::Error>>
        + Send
        + 'static;
}

impl<T> TokenRefresher for T
where
    T: Service<RefreshRequest, Response = Credential> + Clone + Send + 'static,
    T::Error: Into<BoxError>,
    T::Future: Send + 'static,
{
    type Error = T::Error;
    type Future = T::Future;
}

/// A refresh that failed.
///
/// Refreshers return [`RefreshError::terminal`] when only a new sign-in can help (a revoked or
/// reused refresh token, `invalid_grant`, a denied account) and [`RefreshError::transient`]
/// when trying again later may work (a timeout, a 5xx).
#[derive(Debug)]
pub struct RefreshError {
    terminal: bool,
    source: BoxError,
}

impl RefreshError {
    /// Only a new sign-in can help: the layer marks the credential dead.
    pub fn terminal(source: impl Into<BoxError>) -> Self {
        Self {
            terminal: true,
            source: source.into(),
        }
    }

    /// Trying again later may work.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            terminal: false,
            source: source.into(),
        }
    }

    /// Whether only a new sign-in can help.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// Whether trying again later may work.
    pub fn is_transient(&self) -> bool {
        !self.terminal
    }
}

impl fmt::Display for RefreshError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terminal {
            write!(f, "token refresh failed, sign in again: {}", self.source)
        } else {
            write!(f, "token refresh failed: {}", self.source)
        }
    }
}

impl std::error::Error for RefreshError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// How a refresh ended, as every request waiting on it sees it.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// A credential newer than the one the request used. `refreshed` is true when it comes from
    /// a refresh that this request started or joined, false when another request's refresh (or
    /// an `insert`) had already installed it.
    Fresh {
        current: Arc<Current>,
        refreshed: bool,
    },
    /// The credential's budget is spent.
    BudgetExhausted,
    /// The refresher failed (error, timeout, panic, unusable credential).
    Failed,
    /// A terminal refresh error marked the credential dead.
    Dead,
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Fresh { current, refreshed } => f
                .debug_struct("Fresh")
                .field("generation", &current.generation)
                .field("refreshed", refreshed)
                .finish(),
            Outcome::BudgetExhausted => f.write_str("BudgetExhausted"),
            Outcome::Failed => f.write_str("Failed"),
            Outcome::Dead => f.write_str("Dead"),
        }
    }
}

/// Per-credential state behind the slot's lock: the refresh in flight and the budget's log.
#[derive(Default)]
pub(crate) struct FlightState {
    in_flight: Option<Arc<Flight>>,
    spent: Spent,
    /// The budget's exhaustion was logged at WARN: until it allows a refresh again, the
    /// requests it turns away log at DEBUG.
    exhaustion_warned: bool,
}

/// A refresh in flight, as the requests waiting for it share it: its outcome, once it has
/// one, and their wake-up.
///
/// One `Notify` wakes the waiters in the order they began to wait, so a caller that collects
/// responses in order (`join_all`) gets them in order instead of buffering them.
#[derive(Default)]
struct Flight {
    outcome: OnceLock<Outcome>,
    done: Arc<Notify>,
}

impl Flight {
    /// Records the outcome and wakes every waiter. Only the first outcome counts.
    fn end(&self, outcome: Outcome) {
        let _ = self.outcome.set(outcome);
        self.done.notify_waiters();
    }
}

pin_project! {
    /// A wait for the outcome of a refresh, or an outcome known at once.
    ///
    /// Waits take no part in Tokio's cooperative budget: a refresh ends once, for every
    /// request of the credential at the same moment, and when one task drives thousands of
    /// them (a `join_all`), budgeted waits would make it yield after a hundred or so and poll
    /// every other one again at each turn, a cost quadratic in the number of waiting requests.
    pub(crate) struct Wait {
        #[pin]
        state: WaitState,
    }
}

pin_project! {
    #[project = WaitProj]
    enum WaitState {
        Ready { outcome: Option<Outcome> },
        Waiting { flight: Arc<Flight>, #[pin] notified: OwnedNotified },
    }
}

impl Wait {
    fn ready(outcome: Outcome) -> Self {
        Self {
            state: WaitState::Ready {
                outcome: Some(outcome),
            },
        }
    }

    /// Waits for `flight`. The wake-up is registered now, before the outcome is first looked
    /// at: an outcome sent in between is not missed.
    fn on(flight: Arc<Flight>) -> Self {
        let notified = flight.done.clone().notified_owned();
        Self {
            state: WaitState::Waiting { flight, notified },
        }
    }
}

impl Future for Wait {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match self.project().state.project() {
            WaitProj::Ready { outcome } => Poll::Ready(outcome.take().unwrap_or(Outcome::Failed)),
            WaitProj::Waiting { flight, notified } => {
                if let Some(outcome) = flight.outcome.get() {
                    return Poll::Ready(outcome.clone());
                }
                ready!(notified.poll(cx));
                // The outcome is set before the wake-up; `Failed` only if that ever broke.
                Poll::Ready(flight.outcome.get().cloned().unwrap_or(Outcome::Failed))
            }
        }
    }
}

impl fmt::Debug for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            WaitState::Ready { .. } => "ready",
            WaitState::Waiting { .. } => "waiting",
        };
        f.debug_struct("Wait").field("state", &state).finish()
    }
}

/// A refresher call in progress, its types erased.
type Refreshing = Pin<Box<dyn Future<Output = Result<Credential, BoxError>> + Send>>;

/// The refresher, its type erased once, where the layer is built.
///
/// Nothing the service and its future do then needs a bound on the refresher's types. Such
/// bounds (`Error: Into<BoxError>`, `Future: 'static`) cannot be proven for a refresher whose
/// types hold a `dyn` (a boxed future, a `BoxError`) while the compiler checks that a future
/// holding the service is `Send` (rust-lang/rust#102211): `tokio::spawn` would refuse a
/// request on a service whose refresher is, for example, a `service_fn` closure that awaits
/// another refresher.
pub(crate) struct DynRefresher(Box<dyn Fn(RefreshRequest) -> Refreshing + Send + Sync>);

impl DynRefresher {
    pub(crate) fn new<R: TokenRefresher>(refresher: R) -> Self {
        // The mutex makes any `Send` refresher shareable; it is held only to clone it.
        let refresher = Mutex::new(refresher);
        Self(Box::new(move |request| {
            let refresher = refresher
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let call = Oneshot::new(refresher, request);
            Box::pin(async move { call.await.map_err(Into::into) })
        }))
    }

    fn call(&self, request: RefreshRequest) -> Refreshing {
        (self.0)(request)
    }
}

/// What the layer needs to run refreshes.
pub(crate) struct Refresh {
    pub(crate) refresher: DynRefresher,
    pub(crate) credentials: Credentials,
    pub(crate) budget: RefreshBudget,
    pub(crate) timeout: Duration,
}

impl Refresh {
    /// Asks for a credential newer than generation `used` of `slot`, for a request sent when
    /// `failed` refreshes of that generation had failed.
    ///
    /// Joins the refresh in flight if there is one; returns the current credential if it is
    /// already newer; shares the failure of a refresh of the same generation that failed after
    /// the request was sent (its answer was on the way while the refresh failed: asking again
    /// at once would turn one failure into as many refresher calls as the budget allows);
    /// otherwise starts a refresh if the credential is alive and its budget allows it. The
    /// refresh runs on its own task: cancelling the request that started it neither cancels it
    /// nor strands the others waiting on it.
    pub(crate) fn newer_than(
        &self,
        slot: &Arc<Slot>,
        used: u64,
        failed: u64,
        reason: impl FnOnce() -> RefreshReason,
    ) -> Wait {
        let mut state = slot.flight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(flight) = &state.in_flight {
            return Wait::on(flight.clone());
        }
        let current = slot.load_full();
        if current.generation != used {
            return ready(Outcome::Fresh {
                current,
                refreshed: false,
            });
        }
        if current.dead {
            return ready(Outcome::Dead);
        }
        if current.failures != failed {
            tracing::debug!(credential = %slot.id, generation = current.generation, "a refresh failed since the request was sent: not asking again");
            return ready(Outcome::Failed);
        }
        let handle = match tokio::runtime::Handle::try_current() {
            Ok(handle) => handle,
            Err(_) => {
                tracing::warn!(credential = %slot.id, "cannot refresh outside a Tokio runtime");
                return ready(Outcome::Failed);
            }
        };
        if !state
            .spent
            .try_spend(&self.budget, tokio::time::Instant::now())
        {
            if mem::replace(&mut state.exhaustion_warned, true) {
                tracing::debug!(credential = %slot.id, "refresh budget still exhausted: not refreshing");
            } else {
                tracing::warn!(
                    credential = %slot.id,
                    max_refreshes = self.budget.max_refreshes(),
                    window = ?self.budget.window(),
                    "refresh budget exhausted: not refreshing (logged once until the budget allows a refresh)"
                );
            }
            return ready(Outcome::BudgetExhausted);
        }
        state.exhaustion_warned = false;
        let flight = Arc::new(Flight::default());
        state.in_flight = Some(flight.clone());
        let wait = Wait::on(flight.clone());
        drop(state);

        let reason = reason();
        tracing::debug!(credential = %slot.id, generation = current.generation, ?reason, "refreshing credential");
        let request = RefreshRequest::new(current.credential.clone(), reason);
        let guard = Finish {
            slot: slot.clone(),
            credentials: self.credentials.clone(),
            from: current,
            flight: Some(flight),
        };
        let call = tokio::time::timeout(self.timeout, self.refresher.call(request));
        handle.spawn(async move {
            let result = call.await;
            guard.finish(result);
        });
        wait
    }
}

/// The slot's current credential, as the outcome of a wait that needs no refresh.
pub(crate) fn current(slot: &Slot) -> Wait {
    ready(Outcome::Fresh {
        current: slot.load_full(),
        refreshed: false,
    })
}

fn ready(outcome: Outcome) -> Wait {
    Wait::ready(outcome)
}

/// What the refresher's answer amounts to, before it is installed.
enum Ended {
    Credential(Credential),
    Failed,
    Dead,
}

/// Ends a refresh exactly once: from the task when the refresher answers, or from `Drop` when
/// the refresher panicked or the runtime dropped the task. Waiters are never left hanging.
struct Finish {
    slot: Arc<Slot>,
    credentials: Credentials,
    from: Arc<Current>,
    flight: Option<Arc<Flight>>,
}

impl Finish {
    fn finish<E: Into<BoxError>>(
        mut self,
        result: Result<Result<Credential, E>, tokio::time::error::Elapsed>,
    ) {
        let id = &self.slot.id;
        let ended = match result {
            Ok(Ok(credential)) => Ended::Credential(credential),
            Ok(Err(error)) => {
                let error: BoxError = error.into();
                match error.downcast_ref::<RefreshError>() {
                    Some(refresh) if refresh.is_terminal() => {
                        tracing::warn!(credential = %id, error = %refresh, "refresh failed for good: the credential is dead until replaced");
                        Ended::Dead
                    }
                    _ => {
                        tracing::warn!(credential = %id, %error, "refresh failed");
                        Ended::Failed
                    }
                }
            }
            Err(_) => {
                tracing::warn!(credential = %id, "refresh timed out");
                Ended::Failed
            }
        };
        self.send(ended);
    }

    fn send(&mut self, ended: Ended) {
        let Some(flight) = self.flight.take() else {
            return;
        };
        let id = &self.slot.id;
        let mut state = self
            .slot
            .flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = self.slot.load_full();
        let replaced = now.generation != self.from.generation;
        let outcome = match ended {
            // The application installed a credential while the refresh ran: it wins.
            _ if replaced => Outcome::Fresh {
                current: now,
                refreshed: true,
            },
            Ended::Credential(credential) => {
                if credential.id() != &**id {
                    tracing::warn!(credential = %id, returned = %credential.id(), "refresher returned a credential with another id: installing it under the id it refreshed");
                }
                if credential.access_token() == self.from.credential.access_token() {
                    tracing::warn!(credential = %id, "refresher returned the stale access token again");
                    self.slot.mark_failed();
                    Outcome::Failed
                } else {
                    match self.slot.try_install(credential) {
                        Ok(installed) => {
                            // Published before any waiter can retry with it, so an application
                            // that persists rotated refresh tokens never falls behind a request.
                            self.credentials.publish(installed.credential.clone());
                            tracing::debug!(credential = %id, generation = installed.generation, "credential refreshed");
                            Outcome::Fresh {
                                current: installed,
                                refreshed: true,
                            }
                        }
                        Err(error) => {
                            tracing::warn!(credential = %id, %error, "refresher returned an unusable credential");
                            self.slot.mark_failed();
                            Outcome::Failed
                        }
                    }
                }
            }
            Ended::Dead => {
                self.slot.mark_dead();
                Outcome::Dead
            }
            Ended::Failed => {
                self.slot.mark_failed();
                Outcome::Failed
            }
        };
        state.in_flight = None;
        drop(state);
        flight.end(outcome);
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if self.flight.is_some() {
            tracing::warn!(credential = %self.slot.id, "refresh ended without an answer (the refresher panicked or its task was dropped)");
            self.send(Ended::Failed);
        }
    }
}
