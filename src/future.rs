//! The response future: an unboxed state machine. Only the refresh wait is boxed, and it only
//! exists on the stale-token path.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::header::AUTHORIZATION;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::BoxError;
use tower_service::Service;

use crate::body::{content_length, Held, RequestBody, ResponseBody};
use crate::classify::{Classify, Verdict};
use crate::layer::Shared;
use crate::refresh::{Outcome, RefreshReason, Wait};
use crate::report::{RecoveryReport, Skip};
use crate::service::Attempt;

pin_project! {
    /// The future of [`XaiOAuthRecovery`](crate::XaiOAuthRecovery).
    pub struct ResponseFuture<S, ReqB, ResB, R, C>
    where
        S: Service<Request<RequestBody<ReqB>>>,
        ResB: Body,
    {
        #[pin]
        state: State<S::Future, ReqB, ResB>,
        inner: S,
        shared: Arc<Shared<R, C>>,
        attempt: Option<Attempt>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, ReqB, ResB>
    where
        ResB: Body,
    {
        // The states after the first attempt's are rare: their payloads are boxed, which keeps
        // the future small for the 2xx path (it is moved when it is returned and pinned).
        /// The credential expires soon: waiting for its refresh before the first attempt.
        Expiring { #[pin] wait: Wait, request: Option<Box<Request<RequestBody<ReqB>>>> },
        /// The first attempt.
        First { #[pin] future: F },
        /// Reading a 401/403 body to classify it.
        Buffering { held: Option<Pin<Box<Held<ResB>>>> },
        /// Waiting for a newer credential.
        Refreshing { #[pin] wait: Wait, held: Option<Pin<Box<Held<ResB>>>> },
        /// Waiting for the inner service to be ready for the retry.
        RetryReady {
            request: Option<Box<Request<RequestBody<ReqB>>>>,
            report: Option<RecoveryReport>,
        },
        /// The retry.
        Retry { #[pin] future: F, report: Option<RecoveryReport> },
        /// The request could not be sent.
        Failed { error: Option<BoxError> },
        Done,
    }
}

impl<S, ReqB, ResB, R, C> ResponseFuture<S, ReqB, ResB, R, C>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ResB: Body,
{
    pub(crate) fn first(
        mut inner: S,
        shared: Arc<Shared<R, C>>,
        attempt: Attempt,
        request: Request<RequestBody<ReqB>>,
    ) -> Self {
        let future = inner.call(request);
        Self {
            state: State::First { future },
            inner,
            shared,
            attempt: Some(attempt),
        }
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn expiring(
        inner: S,
        shared: Arc<Shared<R, C>>,
        attempt: Attempt,
        wait: Wait,
        request: Request<RequestBody<ReqB>>,
    ) -> Self {
        Self {
            state: State::Expiring {
                wait,
                request: Some(Box::new(request)),
            },
            inner,
            shared,
            attempt: Some(attempt),
        }
    }

    #[cold]
    #[inline(never)]
    pub(crate) fn failed(inner: S, shared: Arc<Shared<R, C>>, error: BoxError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
            inner,
            shared,
            attempt: None,
        }
    }
}

impl<S, ReqB, ResB, R, C> Future for ResponseFuture<S, ReqB, ResB, R, C>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ReqB: Body,
    ResB: Body,
    C: Classify,
{
    type Output = Result<Response<ResponseBody<ResB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::First { future } => {
                    let response = ready!(future.poll(cx)).map_err(Into::into)?;
                    let shared = &**this.shared;
                    if !shared.classifier.inspects(response.status()) {
                        this.state.set(State::Done);
                        return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                    }
                    let (parts, body) = response.into_parts();
                    let limit = shared.max_error_body_bytes as u64;
                    let declared = content_length(&parts.headers);
                    if declared.is_some_and(|len| len > limit) || body.size_hint().lower() > limit {
                        let report = report(
                            this.shared,
                            this.attempt,
                            Verdict::Unrecognized,
                            Skip::ErrorBodyTooLarge,
                        );
                        tracing::debug!(credential = %report.credential_id(), status = %parts.status, "error body over the limit: handed back unclassified");
                        this.state.set(State::Done);
                        let mut response = Response::from_parts(parts, ResponseBody::inner(body));
                        response.extensions_mut().insert(report);
                        return Poll::Ready(Ok(response));
                    }
                    this.state.set(State::Buffering {
                        held: Some(Held::new(parts, body)),
                    });
                }
                StateProj::Buffering { held } => {
                    let limit = this.shared.max_error_body_bytes;
                    if let Some(held) = held.as_mut() {
                        ready!(held.as_mut().project().buffered.poll_fill(cx, limit));
                    }
                    let Some(mut held) = held.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    match decide(this.shared, this.attempt, &held) {
                        Decision::HandBack(report) => {
                            this.state.set(State::Done);
                            return hand_back(held, report);
                        }
                        Decision::Refresh(wait, report) => {
                            *held.as_mut().project().report = Some(report);
                            this.state.set(State::Refreshing {
                                wait,
                                held: Some(held),
                            });
                        }
                    }
                }
                StateProj::Refreshing { wait, held } => {
                    let outcome = ready!(wait.poll(cx));
                    let Some(mut held) = held.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    let Some(report) = held.as_mut().project().report.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    let (current, refreshed) = match outcome {
                        Outcome::Fresh { current, refreshed } => (current, refreshed),
                        other => {
                            let skip = match other {
                                Outcome::BudgetExhausted => Skip::BudgetExhausted,
                                Outcome::Dead => Skip::CredentialDead,
                                _ => Skip::RefreshFailed,
                            };
                            let report = report.skip(skip);
                            tracing::debug!(credential = %report.credential_id(), ?skip, "no retry");
                            this.state.set(State::Done);
                            return hand_back(held, report);
                        }
                    };
                    let report = report.set_refreshed(refreshed);
                    let Ok(header) = &current.header else {
                        // A credential inserted meanwhile holds a token no header can carry.
                        let report = report.skip(Skip::RefreshFailed);
                        tracing::debug!(credential = %report.credential_id(), "the current credential's token is not a valid header value: no retry");
                        this.state.set(State::Done);
                        return hand_back(held, report);
                    };
                    let retry = this
                        .attempt
                        .as_ref()
                        .and_then(|attempt| attempt.retained.take::<ReqB>(header.clone()));
                    let Some(request) = retry else {
                        let report = report.skip(Skip::BodyNotReplayable);
                        tracing::debug!(credential = %report.credential_id(), "request body not replayable: no retry");
                        this.state.set(State::Done);
                        return hand_back(held, report);
                    };
                    // The original response is not handed back: let its connection go now.
                    drop(held);
                    tracing::debug!(credential = %report.credential_id(), generation = current.generation, refreshed, "retrying with a newer credential");
                    let report = Some(report.set_retried());
                    match this.inner.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let future = this.inner.call(request);
                            this.state.set(State::Retry { future, report });
                        }
                        Poll::Ready(Err(error)) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Err(error.into()));
                        }
                        Poll::Pending => {
                            this.state.set(State::RetryReady {
                                request: Some(Box::new(request)),
                                report,
                            });
                            return Poll::Pending;
                        }
                    }
                }
                StateProj::RetryReady { request, report } => {
                    ready!(this.inner.poll_ready(cx)).map_err(Into::into)?;
                    let (Some(request), report) = (request.take(), report.take()) else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    let future = this.inner.call(*request);
                    this.state.set(State::Retry { future, report });
                }
                StateProj::Retry { future, report } => {
                    let response = ready!(future.poll(cx)).map_err(Into::into)?;
                    let mut response = response.map(ResponseBody::inner);
                    if let Some(report) = report.take() {
                        tracing::debug!(credential = %report.credential_id(), status = %response.status(), "retry answered");
                        response.extensions_mut().insert(report);
                    }
                    this.state.set(State::Done);
                    return Poll::Ready(Ok(response));
                }
                StateProj::Expiring { wait, request } => {
                    let outcome = ready!(wait.poll(cx));
                    let Some(request) = request.take() else {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    let mut request = *request;
                    if let Outcome::Fresh { current, .. } = outcome {
                        if let (Ok(header), Some(attempt)) =
                            (&current.header, this.attempt.as_mut())
                        {
                            request.headers_mut().insert(AUTHORIZATION, header.clone());
                            // The retry sets the header it retries with: its head keeps none.
                            attempt.generation = current.generation;
                            attempt.failures = current.failures;
                        }
                    } else if let Some(attempt) = this.attempt.as_ref() {
                        tracing::debug!(credential = %attempt.credential_id(this.shared), ?outcome, "refresh ahead of expiry did not happen: sending with the current token");
                    }
                    // `poll_ready` readied `inner` before `call` stored it here.
                    let future = this.inner.call(request);
                    this.state.set(State::First { future });
                }
                StateProj::Failed { error } => {
                    let error = error.take().unwrap_or_else(polled_after_completion);
                    this.state.set(State::Done);
                    return Poll::Ready(Err(error));
                }
                StateProj::Done => return Poll::Ready(Err(polled_after_completion())),
            }
        }
    }
}

impl<S, ReqB, ResB, R, C> fmt::Debug for ResponseFuture<S, ReqB, ResB, R, C>
where
    S: Service<Request<RequestBody<ReqB>>>,
    ResB: Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Expiring { .. } => "expiring",
            State::First { .. } => "first",
            State::Buffering { .. } => "buffering",
            State::Refreshing { .. } => "refreshing",
            State::RetryReady { .. } => "retry_ready",
            State::Retry { .. } => "retry",
            State::Failed { .. } => "failed",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

enum Decision {
    HandBack(RecoveryReport),
    Refresh(Wait, RecoveryReport),
}

/// Classifies a buffered 401/403 and decides what to do about it.
fn decide<R, C, B>(shared: &Shared<R, C>, attempt: &Option<Attempt>, held: &Held<B>) -> Decision
where
    C: Classify,
    B: Body,
{
    let (Some(parts), buffered) = (held.parts(), &held.buffered) else {
        return Decision::HandBack(report(
            shared,
            attempt,
            Verdict::Unrecognized,
            Skip::ErrorBodyFailed,
        ));
    };
    if !buffered.is_complete() {
        let skip = if buffered.overflowed() {
            Skip::ErrorBodyTooLarge
        } else {
            Skip::ErrorBodyFailed
        };
        let report = report(shared, attempt, Verdict::Unrecognized, skip);
        tracing::debug!(credential = %report.credential_id(), status = %parts.status, ?skip, "error body not classified: handed back as it came");
        return Decision::HandBack(report);
    }
    let verdict = shared
        .classifier
        .classify(parts.status, &parts.headers, &buffered.contiguous());
    let id = attempt
        .as_ref()
        .map(|attempt| attempt.credential_id(shared))
        .unwrap_or_else(|| Arc::from(""));
    let report = RecoveryReport::new(verdict, id);
    let reason = match report.verdict() {
        Verdict::StaleToken(reason) => reason,
        verdict @ Verdict::Entitlement => {
            tracing::warn!(credential = %report.credential_id(), status = %parts.status, ?verdict, "the account has no active Grok subscription: not refreshing");
            return Decision::HandBack(report.skip(Skip::Entitlement));
        }
        verdict @ Verdict::Billing => {
            tracing::warn!(credential = %report.credential_id(), status = %parts.status, ?verdict, "the account is out of credits: not refreshing");
            return Decision::HandBack(report.skip(Skip::Billing));
        }
        verdict => {
            tracing::debug!(credential = %report.credential_id(), status = %parts.status, ?verdict, "unrecognized: not refreshing");
            return Decision::HandBack(report.skip(Skip::Unrecognized));
        }
    };
    let slot = attempt.as_ref().and_then(|attempt| {
        let slot = attempt.slot(shared)?;
        let same = slot.serial == attempt.serial;
        Some((same, slot, attempt.generation, attempt.failures))
    });
    match slot {
        Some((true, slot, generation, failures)) => {
            tracing::debug!(credential = %report.credential_id(), status = %parts.status, reason = ?reason, "stale token: asking for a newer credential");
            let reason = || RefreshReason::StaleToken(reason.clone());
            let wait = shared
                .refresh
                .newer_than(&slot, generation, failures, reason);
            Decision::Refresh(wait, report)
        }
        Some((false, slot, ..)) => {
            // Removed and inserted again while the request was out: whatever generation the new
            // credential is at, it is newer than the one the request used. Retry with it.
            tracing::debug!(credential = %report.credential_id(), "the credential was replaced: retrying with the new one");
            Decision::Refresh(crate::refresh::current(&slot), report)
        }
        None => {
            tracing::debug!(credential = %report.credential_id(), "the credential was removed: no refresh");
            Decision::HandBack(report.skip(Skip::RefreshFailed))
        }
    }
}

fn report<R, C>(
    shared: &Shared<R, C>,
    attempt: &Option<Attempt>,
    verdict: Verdict,
    skip: Skip,
) -> RecoveryReport {
    let id = attempt
        .as_ref()
        .map(|attempt| attempt.credential_id(shared))
        .unwrap_or_else(|| Arc::from(""));
    RecoveryReport::new(verdict, id).skip(skip)
}

/// The original response, whole, with `report`.
fn hand_back<B: Body>(
    held: Pin<Box<Held<B>>>,
    report: RecoveryReport,
) -> Poll<Result<Response<ResponseBody<B>>, BoxError>> {
    Poll::Ready(Held::hand_back(held, report).ok_or_else(polled_after_completion))
}

fn polled_after_completion() -> BoxError {
    "response future polled after completion".into()
}
