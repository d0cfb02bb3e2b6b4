//! Fault injection: refreshers that fail, hang, panic or answer nonsense; inner services and
//! bodies that fail at every step; requests dropped at every await point; credentials replaced
//! in the middle of a storm; a token endpoint that fails at random.
//!
//! Whatever goes wrong, every request ends, no waiter outlives the refresh timeout, the single
//! flight keeps working afterwards, and the refresher is never called more than once per
//! credential generation.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tower::{BoxError, Layer, Service, ServiceExt};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::{
    Credential, CredentialId, Credentials, RecoveryReport, RefreshBudget, Skip, XaiOAuthRecovery,
    XaiOAuthRecoveryLayer,
};

fn report<B>(response: &Response<B>) -> Option<RecoveryReport> {
    response.extensions().get::<RecoveryReport>().cloned()
}

fn skipped<B>(response: &Response<B>) -> Option<Skip> {
    report(response).and_then(|r| r.skipped().copied())
}

fn layer(credentials: &Credentials, refresher: &Refresher) -> XaiOAuthRecoveryLayer<Refresher> {
    XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone())
        .refresh_budget(RefreshBudget::new(100, Duration::from_secs(3600)))
        .refresh_timeout(Duration::from_secs(5))
}

/// Sends `n` concurrent requests with `body` and returns their responses.
async fn burst<S>(svc: &S, n: usize, body: &'static str) -> Vec<Response<TestBody>>
where
    S: Service<
            Request<TestBody>,
            Response = Response<xai_oauth_recovery::body::ResponseBody<TestBody>>,
            Error = BoxError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let mut tasks = Vec::new();
    for _ in 0..n {
        let svc = svc.clone();
        tasks.push(tokio::spawn(
            async move { svc.oneshot(request(body)).await },
        ));
    }
    let mut responses = Vec::new();
    for task in tasks {
        let response = task
            .await
            .expect("no request panics")
            .expect("no request fails");
        let (parts, body) = response.into_parts();
        let (data, trailers, error) = read_all(body).await;
        assert_eq!(error, None);
        let mut body = TestBody::full(data);
        if let Some(trailers) = trailers {
            body = body.with_trailers(trailers);
        }
        responses.push(Response::from_parts(parts, body));
    }
    responses
}

async fn body_of<B>(response: Response<B>) -> Vec<u8>
where
    B: http_body::Body,
    B::Error: std::fmt::Display,
{
    read_all(response.into_body()).await.0
}

// ---------------------------------------------------------------------------------------------
// Refresher faults

/// Each faulty behaviour: 50 concurrent stale requests cost one refresher call and all come
/// back with the original 403, whole; the credential is untouched (or dead, for a terminal
/// error); and the next refresh of the same credential works.
#[tokio::test]
async fn every_refresher_fault_releases_every_waiter_and_the_next_refresh_works() {
    for (behaviour, skip) in [
        (Behaviour::Transient, Skip::RefreshFailed),
        (Behaviour::Terminal, Skip::CredentialDead),
        (Behaviour::Panic, Skip::RefreshFailed),
        (Behaviour::Same, Skip::RefreshFailed),
        (Behaviour::Invalid, Skip::RefreshFailed),
    ] {
        let api = MockApi::new();
        let credentials = Credentials::new(Credential::new("default", "old"));
        let refresher = Refresher::with(behaviour);
        let svc = layer(&credentials, &refresher).layer(api.clone());

        let responses = burst(&svc, 50, "x").await;
        for response in responses {
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            assert_eq!(skipped(&response), Some(skip));
            assert_eq!(body_of(response).await, STALE_403.as_bytes());
        }
        assert_eq!(refresher.calls(), 1, "{skip:?}");
        assert_eq!(refresher.max_active(), 1);
        assert_eq!(refresher.active(), 0);
        assert_eq!(
            credentials.default_credential().access_token().secret(),
            "old"
        );

        // The single flight is not poisoned: the next stale request refreshes and recovers.
        refresher.set(Behaviour::Fresh {
            delay: Duration::ZERO,
        });
        if skip == Skip::CredentialDead {
            // Dead until a new sign-in replaces it; no refresher call meanwhile.
            let response = svc.clone().oneshot(request("x")).await.unwrap();
            assert_eq!(skipped(&response), Some(Skip::CredentialDead));
            assert_eq!(refresher.calls(), 1);
            credentials.insert(Credential::new("default", "signed-in-again"));
        }
        api.answer("default-fresh-2", Answer::Ok);
        let responses = burst(&svc, 20, "y").await;
        for response in responses {
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body_of(response).await, b"ok:y");
        }
        assert_eq!(refresher.calls(), 2);
        assert_eq!(
            credentials.default_credential().access_token().secret(),
            "default-fresh-2"
        );
    }
}

/// Requests sent with a token before its refresh failed, whose 403 comes back only after the
/// failure, share that failure: they do not call the refresher again. A request sent after
/// the failure may.
#[tokio::test(start_paused = true)]
async fn a_failed_refresh_answers_the_requests_already_sent_with_its_token() {
    for behaviour in [
        Behaviour::Transient,
        Behaviour::Panic,
        Behaviour::Same,
        Behaviour::Invalid,
        Behaviour::Hang,
    ] {
        // Half the answers come at once, the other half ten seconds later (after the refresh
        // failed, even a hung one, cut off at five).
        let api = MockApi::new().with_latency(|i| Duration::from_secs(if i < 25 { 0 } else { 10 }));
        let credentials = Credentials::new(Credential::new("default", "old"));
        let refresher = Refresher::with(behaviour);
        let svc = layer(&credentials, &refresher).layer(api.clone());
        for response in burst(&svc, 50, "x").await {
            assert_eq!(skipped(&response), Some(Skip::RefreshFailed));
            assert_eq!(body_of(response).await, STALE_403.as_bytes());
        }
        assert_eq!(api.calls(), 50);
        assert_eq!(refresher.calls(), 1, "stragglers asked again");

        // Sent after the failure: refreshes again, and this time it works.
        refresher.set(Behaviour::Fresh {
            delay: Duration::ZERO,
        });
        api.answer("default-fresh-2", Answer::Ok);
        let response = svc.oneshot(request("y")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(refresher.calls(), 2);
    }
}

/// Faulty refreshers on a multi-thread runtime, many requests, many credentials: whatever the
/// interleaving, refresher calls never overlap on a credential and stay within the budget, and
/// every request ends with a whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresher_faults_on_a_multi_thread_runtime_stay_within_bounds() {
    let budget = 5;
    for behaviour in [
        Behaviour::Transient,
        Behaviour::Panic,
        Behaviour::Same,
        Behaviour::Invalid,
        Behaviour::Terminal,
    ] {
        let api = MockApi::new().with_latency(|i| Duration::from_micros((i % 5) as u64 * 200));
        let credentials = Credentials::new(Credential::new("default", "old"));
        let refresher = Refresher::with(behaviour);
        let svc = layer(&credentials, &refresher)
            .refresh_budget(RefreshBudget::new(budget, Duration::from_secs(3600)))
            .layer(api.clone());
        for response in burst(&svc, 300, "x").await {
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            assert_eq!(body_of(response).await, STALE_403.as_bytes());
        }
        assert!(
            refresher.calls() <= budget as usize,
            "{}",
            refresher.calls()
        );
        assert_eq!(refresher.max_active(), 1);
        assert_eq!(api.calls(), 300);
    }
}

/// A refresher that never answers: every waiter, however late it joined, is answered when the
/// refresh times out, not later; the hung call is dropped; the next refresh works.
#[tokio::test(start_paused = true)]
async fn a_hanging_refresh_answers_every_waiter_at_its_timeout() {
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::with(Behaviour::Hang);
    let svc = layer(&credentials, &refresher).layer(api.clone());
    let started = tokio::time::Instant::now();

    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            // Join the refresh at 0 s, 0.25 s, ... 4.75 s: all within its 5 s.
            tokio::time::sleep(Duration::from_millis(250 * i)).await;
            let response = svc.oneshot(request("x")).await.unwrap();
            (tokio::time::Instant::now(), response)
        }));
    }
    for task in tasks {
        let (ended, response) = task.await.unwrap();
        assert_eq!(ended - started, Duration::from_secs(5));
        assert_eq!(skipped(&response), Some(Skip::RefreshFailed));
        assert_eq!(body_of(response).await, STALE_403.as_bytes());
    }
    assert_eq!(refresher.calls(), 1);
    assert_eq!(refresher.active(), 0, "the hung call was dropped");

    // A slow refresher that would answer after the timeout counts as failed too.
    refresher.set(Behaviour::Fresh {
        delay: Duration::from_secs(60),
    });
    let response = svc.clone().oneshot(request("x")).await.unwrap();
    assert_eq!(skipped(&response), Some(Skip::RefreshFailed));
    assert_eq!(refresher.active(), 0);
    assert_eq!(
        credentials.default_credential().access_token().secret(),
        "old"
    );

    refresher.set(Behaviour::Fresh {
        delay: Duration::from_secs(1),
    });
    api.answer("default-fresh-3", Answer::Ok);
    let response = svc.clone().oneshot(request("x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(refresher.calls(), 3);
}

/// Sends refreshes of the default credential to one refresher, the others to another.
#[derive(Clone)]
struct ById {
    default: Refresher,
    others: Refresher,
}

impl Service<xai_oauth_recovery::RefreshRequest> for ById {
    type Response = Credential;
    type Error = BoxError;
    type Future = <Refresher as Service<xai_oauth_recovery::RefreshRequest>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: xai_oauth_recovery::RefreshRequest) -> Self::Future {
        if req.stale().id() == "default" {
            self.default.call(req)
        } else {
            self.others.call(req)
        }
    }
}

/// A panic in the refresher, concurrently with requests on other credentials: the others
/// refresh as usual and the panicking one recovers on its next refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_refresh_does_not_disturb_other_credentials() {
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("default", "old"));
    credentials.insert(Credential::new("alice", "alice-old"));
    let panicking = Refresher::with(Behaviour::Panic);
    let fine = Refresher::new();
    // One refresher per credential, by id.
    let refresher = ById {
        default: panicking.clone(),
        others: fine.clone(),
    };
    let svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher).layer(api.clone());
    api.answer("alice-fresh-1", Answer::Ok);

    let mut tasks = Vec::new();
    for i in 0..40 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut req = request("x");
            if i % 2 == 1 {
                req.extensions_mut().insert(CredentialId::new("alice"));
            }
            (i, svc.oneshot(req).await.unwrap())
        }));
    }
    for task in tasks {
        let (i, response) = task.await.unwrap();
        if i % 2 == 1 {
            assert_eq!(response.status(), StatusCode::OK);
        } else {
            assert_eq!(skipped(&response), Some(Skip::RefreshFailed));
        }
    }
    assert_eq!((panicking.calls(), fine.calls()), (1, 1));
    panicking.set(Behaviour::Fresh {
        delay: Duration::ZERO,
    });
    api.answer("default-fresh-2", Answer::Ok);
    let response = svc.oneshot(request("x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Inner service and body faults

/// An inner service scripted per call: each call takes the next answer.
#[derive(Clone)]
struct Scripted {
    answers: Arc<std::sync::Mutex<std::collections::VecDeque<Scripted1>>>,
    calls: Arc<AtomicUsize>,
}

enum Scripted1 {
    Respond(StatusCode, TestBody),
    /// Reads the request body first, then responds.
    ReadThenRespond(StatusCode, TestBody),
    Fail(&'static str),
}

impl Scripted {
    fn new(answers: Vec<Scripted1>) -> Self {
        Self {
            answers: Arc::new(std::sync::Mutex::new(answers.into())),
            calls: Arc::default(),
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<Request<RequestBody<TestBody>>> for Scripted {
    type Response = Response<TestBody>;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Response<TestBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody<TestBody>>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let answer = self.answers.lock().unwrap().pop_front();
        Box::pin(async move {
            let respond = |status, body| {
                let mut response = Response::new(body);
                *response.status_mut() = status;
                response
            };
            match answer {
                Some(Scripted1::Respond(status, body)) => Ok(respond(status, body)),
                Some(Scripted1::ReadThenRespond(status, body)) => {
                    // A server that reads what it can of the body, failed or not.
                    let _ = req.into_body().collect().await;
                    Ok(respond(status, body))
                }
                Some(Scripted1::Fail(message)) => Err(message.into()),
                None => Err("no answer scripted".into()),
            }
        })
    }
}

fn stale() -> TestBody {
    TestBody::full(STALE_403)
}

#[tokio::test]
async fn inner_errors_on_either_attempt_reach_the_caller_and_cost_no_extra_refresh() {
    // The first attempt fails: nothing to classify, no refresh.
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::new();
    let inner = Scripted::new(vec![Scripted1::Fail("connection refused")]);
    let svc = layer(&credentials, &refresher).layer(inner.clone());
    let error = svc.oneshot(request("x")).await.unwrap_err();
    assert_eq!(error.to_string(), "connection refused");
    assert_eq!((inner.calls(), refresher.calls()), (1, 0));

    // The retry fails: the error reaches the caller, the refresh it cost stands, and the next
    // request goes out with the fresh token straight away.
    let inner = Scripted::new(vec![
        Scripted1::ReadThenRespond(StatusCode::FORBIDDEN, stale()),
        Scripted1::Fail("reset on retry"),
        Scripted1::ReadThenRespond(StatusCode::OK, TestBody::full("fine")),
    ]);
    let svc = layer(&credentials, &refresher).layer(inner.clone());
    let error = svc.clone().oneshot(request("x")).await.unwrap_err();
    assert_eq!(error.to_string(), "reset on retry");
    assert_eq!((inner.calls(), refresher.calls()), (2, 1));
    let response = svc.oneshot(request("x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!((inner.calls(), refresher.calls()), (3, 1));
}

/// A 401/403 body that fails while the layer buffers it is handed back as it came: the frames
/// read so far, then the same error; no refresh on a body that could not be read.
#[tokio::test]
async fn an_error_body_failing_mid_stream_is_handed_back_as_it_came() {
    let half = &STALE_403.as_bytes()[..STALE_403.len() / 2];
    for (status, body, data) in [
        (
            StatusCode::FORBIDDEN,
            TestBody::chunked(half, 7).with_error(),
            half,
        ),
        (
            StatusCode::FORBIDDEN,
            TestBody::chunked(STALE_403.as_bytes(), 13).with_error(),
            STALE_403.as_bytes(),
        ),
        (
            StatusCode::UNAUTHORIZED,
            TestBody::chunked(b"", 1).with_error(),
            &b""[..],
        ),
        (
            StatusCode::UNAUTHORIZED,
            TestBody::chunked(half, 5).slow().with_error(),
            half,
        ),
    ] {
        let credentials = Credentials::new(Credential::new("default", "old"));
        let refresher = Refresher::new();
        let inner = Scripted::new(vec![Scripted1::Respond(status, body)]);
        let svc = layer(&credentials, &refresher).layer(inner.clone());
        let response = svc.oneshot(request("x")).await.unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(skipped(&response), Some(Skip::ErrorBodyFailed));
        let (read, trailers, error) = read_all(response.into_body()).await;
        assert_eq!(read, data);
        assert_eq!(trailers, None);
        assert_eq!(error.as_deref(), Some("connection reset"));
        assert_eq!((inner.calls(), refresher.calls()), (1, 0));
    }
}

/// A request body that fails while the first attempt reads it cannot be replayed: the stale
/// 403 still refreshes the credential (the next request goes out fresh), without a retry.
#[tokio::test]
async fn a_request_body_failing_mid_stream_refreshes_without_a_retry() {
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::new();
    let inner = Scripted::new(vec![Scripted1::ReadThenRespond(
        StatusCode::FORBIDDEN,
        stale(),
    )]);
    let svc = layer(&credentials, &refresher).layer(inner.clone());
    let body = TestBody::chunked(b"half a request", 4).with_error();
    let response = svc
        .oneshot(Request::post("/").body(body).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let report = report(&response).unwrap();
    assert_eq!(report.skipped(), Some(&Skip::BodyNotReplayable));
    assert!(report.refreshed());
    assert_eq!(body_of(response).await, STALE_403.as_bytes());
    assert_eq!((inner.calls(), refresher.calls()), (1, 1));
}

/// Trailers and a body error after a buffered 401/403 body survive the hand-back; trailers
/// survive the retry's response too.
#[tokio::test]
async fn trailers_and_late_errors_survive_a_hand_back() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trailer", "yes".parse().unwrap());
    let credentials = Credentials::new(Credential::new("default", "tok"));
    let refresher = Refresher::new();
    let inner = Scripted::new(vec![Scripted1::Respond(
        StatusCode::FORBIDDEN,
        TestBody::chunked(ENTITLEMENT_403.as_bytes(), 9).with_trailers(trailers.clone()),
    )]);
    let svc = layer(&credentials, &refresher).layer(inner);
    let response = svc.oneshot(request("x")).await.unwrap();
    assert_eq!(skipped(&response), Some(Skip::Entitlement));
    let (data, got, error) = read_all(response.into_body()).await;
    assert_eq!(
        (data, got, error),
        (ENTITLEMENT_403.as_bytes().to_vec(), Some(trailers), None)
    );
}

// ---------------------------------------------------------------------------------------------
// Cancellation at every await point

struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// What a cancellation run starts from.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// Stale 403, refresh, retry, 200.
    Stale,
    /// Refresh ahead of expiry, then 200.
    Expiring,
    /// Entitlement 403, buffered and handed back.
    Entitlement,
}

type Stack = XaiOAuthRecovery<Stutter<MockApi>, Refresher>;

fn cancellation_stack(path: Path) -> (Stack, Credentials, Refresher, MockApi) {
    let api = MockApi::new();
    let mut credential = Credential::new("default", "old");
    match path {
        Path::Stale => {}
        Path::Expiring => {
            api.answer("old", Answer::Ok);
            credential = credential.with_expires_at(SystemTime::now() + Duration::from_secs(10));
        }
        Path::Entitlement => api.answer("old", Answer::Entitlement),
    }
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(credential);
    let refresher = Refresher::with(Behaviour::Yield { polls: 3 });
    let svc = layer(&credentials, &refresher).layer(Stutter::new(api.clone(), 2, 16));
    (svc, credentials, refresher, api)
}

/// Polls a request's future `k` times (fewer if it ends), letting every other task run
/// between polls, then drops it. Returns the number of polls it took to end, if it did.
async fn poll_then_drop(svc: &mut Stack, k: usize) -> Option<usize> {
    let waker = Arc::new(CountingWaker(AtomicUsize::new(0)));
    let waker = Waker::from(waker);
    let mut cx = Context::from_waker(&waker);
    let mut future = Box::pin(svc.ready().await.unwrap().call(request("payload")));
    for polls in 1..=k {
        if let Poll::Ready(result) = future.as_mut().poll(&mut cx) {
            let response = result.unwrap();
            // Read the body too: the request is over only when its body is.
            read_all(response.into_body()).await;
            return Some(polls);
        }
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    None
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_after_any_number_of_polls_leaves_the_credential_working() {
    for path in [Path::Stale, Path::Expiring, Path::Entitlement] {
        // How many polls the undisturbed request takes.
        let (mut svc, ..) = cancellation_stack(path);
        let n = poll_then_drop(&mut svc, 10_000)
            .await
            .expect("an undisturbed request ends");
        assert!(n >= 4, "{path:?}: only {n} polls: the stutter did not take");

        for k in 0..=n {
            let (mut svc, credentials, refresher, api) = cancellation_stack(path);
            poll_then_drop(&mut svc, k).await;

            // A new request on the same credential ends, and answers as the path says.
            let response = tokio::time::timeout(Duration::from_secs(60), async {
                let response = svc.ready().await.unwrap().call(request("next")).await;
                let response = response.unwrap();
                let status = response.status();
                (status, read_all(response.into_body()).await.0)
            })
            .await
            .unwrap_or_else(|_| {
                panic!("{path:?}, dropped after {k} polls: the next request hangs")
            });
            match path {
                Path::Entitlement => {
                    assert_eq!(response, (StatusCode::FORBIDDEN, ENTITLEMENT_403.into()));
                    assert_eq!(refresher.calls(), 0);
                }
                Path::Stale | Path::Expiring => {
                    assert_eq!(response, (StatusCode::OK, b"ok:next".to_vec()));
                    // The refresh the dropped request started (if it got that far) served
                    // the next one too.
                    assert_eq!(refresher.calls(), 1, "{path:?}, dropped after {k} polls");
                    assert_eq!(
                        credentials.default_credential().access_token().secret(),
                        "default-fresh-1"
                    );
                }
            }
            assert!(
                api.calls() <= 4,
                "{path:?}, {k} polls: {} inner calls",
                api.calls()
            );
            // Nothing keeps running: no refresh task, no refresher call.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(refresher.active(), 0);
            assert_eq!(
                refresher.handles(),
                2,
                "the refresher's handles: test + layer"
            );
        }
    }
}

/// Many requests dropped at random points while a refresh is in flight, on a multi-thread
/// runtime: the refresh still lands once, and the survivors all end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_aborted_at_random_points_during_a_refresh() {
    let api = MockApi::new();
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::with(Behaviour::Yield { polls: 20 });
    let svc = layer(&credentials, &refresher).layer(Stutter::new(api.clone(), 3, 8));
    let mut rng = Rng::new(3);
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let svc = svc.clone();
        let task = tokio::spawn(async move {
            let response = svc.oneshot(request("x")).await?;
            let status = response.status();
            let (data, _, _) = read_all(response.into_body()).await;
            Ok::<_, BoxError>((status, data))
        });
        let abort = rng.chance(500);
        for _ in 0..rng.below(4) {
            tokio::task::yield_now().await;
        }
        if abort {
            task.abort();
        }
        tasks.push(task);
    }
    for task in tasks {
        match task.await {
            Ok(result) => {
                let (status, data) = result.unwrap();
                assert_eq!((status, data), (StatusCode::OK, b"ok:x".to_vec()));
            }
            Err(error) => assert!(error.is_cancelled()),
        }
    }
    assert_eq!(refresher.calls(), 1);
    let response = svc.oneshot(request("after")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(refresher.calls(), 1);
}

// ---------------------------------------------------------------------------------------------
// Credentials replaced during a storm

/// 1,000 stale requests while the application signs the credential in again 50 times, half of
/// the new tokens stale themselves: every request ends, and the refresher is never asked twice
/// about the same generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_racing_a_storm_of_stale_requests() {
    let api = MockApi::new().with_latency(|i| Duration::from_micros((i % 7) as u64 * 50));
    for n in 1..=2_000 {
        api.answer(&format!("default-fresh-{n}"), Answer::Ok);
    }
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::with(Behaviour::Yield { polls: 5 });
    let svc = layer(&credentials, &refresher)
        .refresh_budget(RefreshBudget::new(1_000, Duration::from_secs(3600)))
        .layer(api.clone());

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inserter = {
        let credentials = credentials.clone();
        let api = api.clone();
        let done = done.clone();
        tokio::spawn(async move {
            for n in 0..50 {
                let token = format!("signed-in-{n}");
                api.answer(
                    &token,
                    if n % 2 == 0 {
                        Answer::Ok
                    } else {
                        Answer::Stale
                    },
                );
                credentials.insert(Credential::new("default", token));
                // The next sign-in after another 20 calls reached the API (or once all
                // requests ended): the requests and the refreshes run between sign-ins.
                while api.calls() < 20 * (n + 1) && !done.load(Ordering::SeqCst) {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..1_000 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("request {i}");
            let response = svc.oneshot(request(body.clone())).await.unwrap();
            let status = response.status();
            let (data, _, error) = read_all(response.into_body()).await;
            assert_eq!(error, None);
            match status {
                StatusCode::OK => assert_eq!(data, format!("ok:{body}").into_bytes()),
                StatusCode::FORBIDDEN => assert_eq!(data, STALE_403.as_bytes()),
                other => panic!("unexpected {other}"),
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    inserter.await.unwrap();

    let stale = refresher.stale_seen();
    let distinct = set(stale.iter().cloned());
    assert_eq!(
        distinct.len(),
        stale.len(),
        "a generation was refreshed twice: {stale:?}"
    );
    // Each call replaced a different generation: the initial credential, one of the 50
    // sign-ins, or a credential an earlier refresh installed.
    let mut generations = set(refresher.issued());
    generations.insert("old".to_owned());
    generations.extend((0..50).map(|n| format!("signed-in-{n}")));
    assert!(distinct.is_subset(&generations), "{stale:?}");

    // After the storm, the single flight works as ever: one stale request, one refresh.
    let before = refresher.calls();
    api.answer("signed-in-last", Answer::Stale);
    credentials.insert(Credential::new("default", "signed-in-last"));
    let response = svc.oneshot(request("after")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(refresher.calls(), before + 1);
    assert!(refresher.max_active() <= 1);
    assert!(api.calls() <= 2_000);
}

/// A credential removed and signed in again while a request on the old one is in flight: the
/// stale 403 of the old token is retried with the new credential, which is not refreshed.
#[tokio::test]
async fn a_credential_removed_and_signed_in_again_is_not_refreshed_for_its_predecessor() {
    let api = MockApi::new();
    api.answer("alice-new", Answer::Ok);
    let credentials = Credentials::new(Credential::new("default", "tok"));
    credentials.insert(Credential::new("alice", "alice-old"));
    let refresher = Refresher::new();
    let creds = credentials.clone();
    let api2 = api.clone();
    // The sign-in happens while the request with the old token is at the server.
    let inner = tower::service_fn(move |req: Request<RequestBody<TestBody>>| {
        if req.headers()[http::header::AUTHORIZATION] == "Bearer alice-old" {
            creds.remove("alice");
            creds.insert(Credential::new("alice", "alice-new"));
        }
        let mut api = api2.clone();
        async move { api.call(req).await }
    });
    let svc = layer(&credentials, &refresher).layer(inner);
    let mut req = request("x");
    req.extensions_mut().insert(CredentialId::new("alice"));
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report = report(&response).unwrap();
    assert!(report.retried() && !report.refreshed(), "{report:?}");
    assert_eq!(refresher.calls(), 0);
    assert_eq!(
        tokens_seen(&api.seen()),
        ["Bearer alice-old", "Bearer alice-new"]
    );
}

// ---------------------------------------------------------------------------------------------
// A token endpoint that fails at random, over real HTTP

#[cfg(feature = "mock")]
mod token_endpoint {
    use super::*;
    use http_body_util::Full;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use xai_oauth_recovery::mock::{Account, MockXai};
    use xai_oauth_recovery::OAuth2Refresher;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_endpoint_failing_at_random_never_kills_the_credential() {
        let xai = MockXai::builder().seed(42).start().await.unwrap();
        xai.set_token_failure_rate(0.5);
        let credentials = Credentials::new(xai.sign_in("default", Account::Subscribed));
        let token_http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let refresher = OAuth2Refresher::new(token_http, xai.token_endpoint(), "faults")
            .allow_insecure_loopback();
        let budget = 60;
        let http: Client<HttpConnector, RequestBody<Full<Bytes>>> =
            Client::builder(TokioExecutor::new()).build_http();
        let svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher)
            .refresh_budget(RefreshBudget::new(budget, Duration::from_secs(3600)))
            .layer(tower::limit::ConcurrencyLimit::new(http, 16));

        let (mut ok, mut failed) = (0, 0);
        for round in 0..20 {
            xai.expire_access_tokens();
            let mut tasks = Vec::new();
            for i in 0..10 {
                let svc = svc.clone();
                let uri = xai.chat_completions_uri();
                tasks.push(tokio::spawn(async move {
                    let body = format!("{{\"round\":{round},\"i\":{i}}}");
                    let request = Request::post(uri)
                        .body(Full::new(Bytes::from(body.clone())))
                        .unwrap();
                    let response = svc.oneshot(request).await.unwrap();
                    let status = response.status();
                    let skip = skipped(&response);
                    let data = response.into_body().collect().await.unwrap().to_bytes();
                    (status, skip, data, body)
                }));
            }
            for task in tasks {
                let (status, skip, data, body) = task.await.unwrap();
                match status {
                    StatusCode::OK => {
                        ok += 1;
                        let json: serde_json::Value = serde_json::from_slice(&data).unwrap();
                        let checksum = format!(
                            "{:016x}",
                            xai_oauth_recovery::mock::fnv1a_64(body.as_bytes())
                        );
                        assert_eq!(json["mock"]["request_fnv1a"], checksum.as_str());
                    }
                    StatusCode::FORBIDDEN => {
                        failed += 1;
                        assert_eq!(data, STALE_403.as_bytes());
                        assert!(
                            matches!(skip, Some(Skip::RefreshFailed | Skip::BudgetExhausted)),
                            "{skip:?}"
                        );
                    }
                    other => panic!("unexpected {other}"),
                }
            }
        }
        let stats = xai.stats();
        assert!(ok > 0 && failed > 0, "{ok} ok, {failed} failed");
        assert!(stats.injected_failures > 0);
        assert!(stats.token_requests <= u64::from(budget), "{stats:?}");
        // A 503 never spends the refresh token: the credential never dies.
        assert_eq!(stats.invalid_grant, 0, "{stats:?}");

        // Once the endpoint heals, the credential recovers on the next stale token.
        xai.set_token_failure_rate(0.0);
        xai.expire_access_tokens();
        let request = Request::post(xai.chat_completions_uri())
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let response = svc.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
