//! The recovery layer's behaviour, through a mock xAI service.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use support::*;
use tower::{BoxError, Layer, Service, ServiceExt};
use xai_oauth_recovery::{
    Credential, CredentialId, Credentials, RecoveryReport, RefreshBudget, RefreshRequest, Skip,
    StaleReason, Verdict, XaiOAuthRecoveryLayer,
};

fn stack(
    api: &MockApi,
    credentials: &Credentials,
    refresher: &Refresher,
) -> xai_oauth_recovery::XaiOAuthRecovery<MockApi, Refresher> {
    XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone()).layer(api.clone())
}

fn report<B>(response: &http::Response<B>) -> Option<RecoveryReport> {
    response.extensions().get::<RecoveryReport>().cloned()
}

/// A refresher made of `answer`, which gets each call's number (from 1), and the count of its
/// calls, readable while the refresher is in the layer.
fn counted_refresher<F, Fut>(
    answer: F,
) -> (
    Arc<AtomicUsize>,
    impl Service<RefreshRequest, Response = Credential, Error = BoxError, Future = Fut>
        + Clone
        + Send
        + 'static,
)
where
    F: Fn(usize, RefreshRequest) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Credential, BoxError>> + Send + 'static,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let refresher = tower::service_fn(move |request| {
        let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
        answer(n, request)
    });
    (calls, refresher)
}

#[tokio::test]
async fn stale_403_refreshes_once_and_retries_with_the_new_token_and_same_body() {
    let api = MockApi::new();
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(Credential::new("default", "old"));
    let mut updates = credentials.subscribe();
    let refresher = Refresher::new();
    let mut svc = stack(&api, &credentials, &refresher);

    let body = br#"{"model":"grok-4","messages":[{"role":"user","content":"hi"}]}"#;
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(request(&body[..]))
        .await
        .unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    let report = report(&response).expect("report");
    assert_eq!(
        report.verdict(),
        &Verdict::StaleToken(StaleReason::Wke("bad-credentials".into()))
    );
    assert!(report.retried() && report.refreshed() && report.skipped().is_none());
    assert_eq!(report.credential_id(), "default");
    let (data, _, error) = read_all(response.into_body()).await;
    assert_eq!(error, None);
    assert_eq!(data, [&b"ok:"[..], &body[..]].concat());

    assert_eq!(refresher.calls(), 1);
    let seen = api.seen();
    assert_eq!(tokens_seen(&seen), ["Bearer old", "Bearer default-fresh-1"]);
    assert_eq!(seen[0].body, Bytes::from_static(body));
    assert_eq!(seen[1].body, Bytes::from_static(body));
    // The other headers travel with the retry.
    assert_eq!(seen[1].headers["content-type"], "application/json");
    assert!(seen[1].headers[http::header::AUTHORIZATION].is_sensitive());

    let published = updates.try_recv().expect("refreshed credential published");
    assert_eq!(published.access_token().secret(), "default-fresh-1");
    assert_eq!(
        credentials.default_credential().access_token().secret(),
        "default-fresh-1"
    );

    // The next request goes out with the fresh token straight away.
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(request("again"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(report_of(&response).is_none());
    assert_eq!(refresher.calls(), 1);
    assert_eq!(api.calls(), 3);
}

fn report_of<B>(response: &http::Response<B>) -> Option<RecoveryReport> {
    report(response)
}

#[tokio::test]
async fn non_stale_403s_come_back_byte_for_byte_without_refresh() {
    for (answer, body, verdict, skip) in [
        (
            Answer::Entitlement,
            ENTITLEMENT_403,
            Verdict::Entitlement,
            Skip::Entitlement,
        ),
        (
            Answer::Billing,
            BILLING_403,
            Verdict::Billing,
            Skip::Billing,
        ),
        (
            Answer::Generic403,
            GENERIC_403,
            Verdict::Unrecognized,
            Skip::Unrecognized,
        ),
    ] {
        let api = MockApi::new();
        api.answer("tok", answer);
        let credentials = Credentials::new(Credential::new("default", "tok"));
        let refresher = Refresher::new();
        let mut svc = stack(&api, &credentials, &refresher);

        let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let report = report(&response).expect("report");
        assert_eq!(report.verdict(), &verdict);
        assert_eq!(report.skipped(), Some(&skip));
        assert!(!report.retried() && !report.refreshed());
        let (data, _, error) = read_all(response.into_body()).await;
        assert_eq!(
            (String::from_utf8(data).unwrap(), error),
            (body.to_owned(), None)
        );
        assert_eq!(refresher.calls(), 0);
        assert_eq!(api.calls(), 1);
    }
}

#[tokio::test]
async fn entitlement_report_explains_itself() {
    let api = MockApi::new();
    api.answer("tok", Answer::Entitlement);
    let credentials = Credentials::new(Credential::new("default", "tok"));
    let mut svc = stack(&api, &credentials, &Refresher::new());
    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    let text = report(&response).unwrap().to_string();
    assert!(
        text.starts_with(
            "this xAI account has no active Grok subscription: refreshing cannot help"
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_stale_requests_cost_one_refresh() {
    // Answers arrive before and after the refresh completes.
    let api =
        MockApi::new().with_latency(|i| Duration::from_micros(((i * 7919) % 40) as u64 * 100));
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::with(Behaviour::Fresh {
        delay: Duration::from_millis(2),
    });
    api.answer("default-fresh-1", Answer::Ok);
    let svc = stack(&api, &credentials, &refresher);

    let mut tasks = Vec::new();
    for i in 0..1000 {
        let mut svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("request {i}");
            let response = svc.ready().await?.call(request(body.clone())).await?;
            let status = response.status();
            let (data, _, _) = read_all(response.into_body()).await;
            Ok::<_, BoxError>((status, data, body))
        }));
    }
    for task in tasks {
        let (status, data, body) = task.await.unwrap().unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(data, format!("ok:{body}").into_bytes());
    }
    assert_eq!(refresher.calls(), 1);
    assert!(api.calls() <= 2000);
}

#[tokio::test]
async fn refreshed_tokens_that_keep_failing_are_bounded_by_the_budget() {
    // Every token is stale: refresh, stale, refresh, ...
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::new();
    let mut svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone())
        .refresh_budget(RefreshBudget::new(3, Duration::from_secs(300)))
        .layer(api.clone());

    let mut skipped = Vec::new();
    for _ in 0..20 {
        let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let report = report(&response).unwrap();
        skipped.push(report.skipped().copied());
        let (data, _, _) = read_all(response.into_body()).await;
        assert_eq!(data, STALE_403.as_bytes());
    }
    assert_eq!(refresher.calls(), 3);
    // Three retried requests (two inner calls each), then one inner call each.
    assert_eq!(api.calls(), 3 * 2 + 17);
    assert_eq!(&skipped[..3], &[None, None, None]);
    assert!(skipped[3..]
        .iter()
        .all(|s| *s == Some(Skip::BudgetExhausted)));
}

#[tokio::test]
async fn terminal_refresh_error_stops_refreshing_until_the_credential_is_replaced() {
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::with(Behaviour::Terminal);
    let mut svc = stack(&api, &credentials, &refresher);

    for _ in 0..5 {
        let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let report = report(&response).unwrap();
        assert_eq!(report.skipped(), Some(&Skip::CredentialDead));
        assert!(report.to_string().starts_with("sign in again"));
    }
    assert_eq!(refresher.calls(), 1);

    // A new sign-in revives it.
    credentials.insert(Credential::new("default", "signed-in-again"));
    api.answer("signed-in-again", Answer::Ok);
    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // And a later stale token refreshes again.
    refresher.set(Behaviour::Fresh {
        delay: Duration::ZERO,
    });
    api.answer("signed-in-again", Answer::Stale);
    api.answer("default-fresh-2", Answer::Ok);
    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(refresher.calls(), 2);
}

#[tokio::test]
async fn one_credentials_exhausted_budget_leaves_anothers_refresh_working() {
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("default", "old"));
    credentials.insert(Credential::new("alice", "alice-old"));
    credentials.insert(Credential::new("bob", "bob-old"));
    let refresher = Refresher::new();
    let mut svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone())
        .refresh_budget(RefreshBudget::new(1, Duration::from_secs(300)))
        .layer(api.clone());

    let as_user = |id: &str| {
        let mut req = request("x");
        req.extensions_mut().insert(CredentialId::new(id));
        req
    };
    // alice's refreshed tokens keep failing: her budget of one runs out.
    for _ in 0..3 {
        let response = svc
            .ready()
            .await
            .unwrap()
            .call(as_user("alice"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }
    assert_eq!(refresher.calls(), 1);
    // bob still refreshes.
    api.answer("bob-fresh-2", Answer::Ok);
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(as_user("bob"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(report(&response).unwrap().credential_id(), "bob");
    assert_eq!(refresher.calls(), 2);
    let seen = api.seen();
    assert_eq!(
        seen.last().unwrap().authorization.as_deref(),
        Some("Bearer bob-fresh-2")
    );
}

#[tokio::test]
async fn unauthorized_without_body_refreshes_and_retries() {
    let api = MockApi::new();
    api.answer("old", Answer::Empty401);
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::new();
    let mut svc = stack(&api, &credentials, &refresher);
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(request("body"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        report(&response).unwrap().verdict(),
        &Verdict::StaleToken(StaleReason::Unauthorized)
    );
    assert_eq!(refresher.calls(), 1);
}

#[tokio::test]
async fn other_statuses_pass_through_untouched_and_streaming() {
    for status in [
        StatusCode::OK,
        StatusCode::NOT_FOUND,
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::INTERNAL_SERVER_ERROR,
    ] {
        let credentials = Credentials::new(Credential::new("default", "tok"));
        let refresher = Refresher::new();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let inner = tower::service_fn(
            move |req: Request<xai_oauth_recovery::body::RequestBody<TestBody>>| {
                seen2.lock().unwrap().push(req.headers().clone());
                let mut trailers = HeaderMap::new();
                trailers.insert("x-checksum", HeaderValue::from_static("abc"));
                let body = TestBody::chunked(STALE_403.as_bytes(), 7).with_trailers(trailers);
                let mut response = http::Response::new(body);
                *response.status_mut() = status;
                async move { infallible(response) }
            },
        );
        let mut svc = XaiOAuthRecoveryLayer::new(credentials, refresher.clone()).layer(inner);
        let mut req = request("x");
        req.headers_mut().insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer callers-own"),
        );
        let response = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(response.status(), status);
        assert!(report(&response).is_none());
        let (data, trailers, error) = read_all(response.into_body()).await;
        assert_eq!(data, STALE_403.as_bytes());
        assert_eq!(trailers.unwrap()["x-checksum"], "abc");
        assert_eq!(error, None);
        assert_eq!(refresher.calls(), 0);
        // The layer's Authorization replaces the caller's.
        let headers = seen.lock().unwrap();
        assert_eq!(
            headers[0]
                .get_all(http::header::AUTHORIZATION)
                .iter()
                .count(),
            1
        );
        assert_eq!(headers[0][http::header::AUTHORIZATION], "Bearer tok");
    }
}

fn forbidden_service(
    body: impl Fn() -> TestBody + Clone + Send + 'static,
    headers: HeaderMap,
) -> impl Service<
    Request<xai_oauth_recovery::body::RequestBody<TestBody>>,
    Response = http::Response<TestBody>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(
        move |_req: Request<xai_oauth_recovery::body::RequestBody<TestBody>>| {
            let mut response = http::Response::new(body());
            *response.status_mut() = StatusCode::FORBIDDEN;
            *response.headers_mut() = headers.clone();
            async move { infallible(response) }
        },
    )
}

#[tokio::test]
async fn over_limit_403_bodies_come_back_whole_and_unclassified() {
    let big = format!("{}{}", STALE_403, " ".repeat(10_000));
    // Declared by Content-Length: not buffered at all.
    let mut declared = HeaderMap::new();
    declared.insert(http::header::CONTENT_LENGTH, HeaderValue::from(big.len()));
    for (headers, chunk) in [(declared, big.len()), (HeaderMap::new(), 1000)] {
        let refresher = Refresher::new();
        let big2 = big.clone();
        let inner = forbidden_service(move || TestBody::chunked(big2.as_bytes(), chunk), headers);
        let mut svc = XaiOAuthRecoveryLayer::new(
            Credentials::new(Credential::new("default", "t")),
            refresher.clone(),
        )
        .max_error_body_bytes(4096)
        .layer(inner);
        let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
        let report = report(&response).unwrap();
        assert_eq!(report.skipped(), Some(&Skip::ErrorBodyTooLarge));
        assert_eq!(report.verdict(), &Verdict::Unrecognized);
        let (data, _, error) = read_all(response.into_body()).await;
        assert_eq!(error, None);
        assert_eq!(data, big.as_bytes());
        assert_eq!(refresher.calls(), 0);
    }
}

#[tokio::test]
async fn error_while_buffering_reaches_the_caller_after_the_prefix() {
    let refresher = Refresher::new();
    let inner = forbidden_service(
        || TestBody::chunked(b"{\"error\":\"The OAuth2", 5).with_error(),
        HeaderMap::new(),
    );
    let mut svc = XaiOAuthRecoveryLayer::new(
        Credentials::new(Credential::new("default", "t")),
        refresher.clone(),
    )
    .layer(inner);
    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    assert_eq!(
        report(&response).unwrap().skipped(),
        Some(&Skip::ErrorBodyFailed)
    );
    let (data, _, error) = read_all(response.into_body()).await;
    assert_eq!(data, b"{\"error\":\"The OAuth2");
    assert_eq!(error.as_deref(), Some("connection reset"));
    assert_eq!(refresher.calls(), 0);
}

#[tokio::test]
async fn classified_403_keeps_its_trailers() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-t", HeaderValue::from_static("1"));
    let t2 = trailers.clone();
    let inner = forbidden_service(
        move || TestBody::chunked(ENTITLEMENT_403.as_bytes(), 10).with_trailers(t2.clone()),
        HeaderMap::new(),
    );
    let mut svc = XaiOAuthRecoveryLayer::new(
        Credentials::new(Credential::new("default", "t")),
        Refresher::new(),
    )
    .layer(inner);
    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    let (data, got, error) = read_all(response.into_body()).await;
    assert_eq!(
        (data, got, error),
        (ENTITLEMENT_403.as_bytes().to_vec(), Some(trailers), None)
    );
}

#[tokio::test]
async fn over_limit_request_body_is_not_retried_but_still_refreshes() {
    let api = MockApi::new();
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::new();
    let mut svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone())
        .max_replay_body_bytes(1024)
        .layer(api.clone());
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let req = Request::post("https://api.x.ai/v1/files")
        .body(TestBody::chunked(&payload, 100))
        .unwrap();
    let response = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let report = report(&response).unwrap();
    assert_eq!(report.skipped(), Some(&Skip::BodyNotReplayable));
    assert!(report.refreshed() && !report.retried());
    let (data, _, _) = read_all(response.into_body()).await;
    assert_eq!(data, STALE_403.as_bytes());
    assert_eq!(api.calls(), 1);
    assert_eq!(api.seen()[0].body, payload);
    assert_eq!(refresher.calls(), 1);
    // The next request goes out fresh.
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(request("small"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(refresher.calls(), 1);
}

#[tokio::test]
async fn chunked_request_bodies_and_trailers_are_replayed() {
    let api = MockApi::new();
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(Credential::new("default", "old"));
    let mut svc = stack(&api, &credentials, &Refresher::new());
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 13) as u8).collect();
    let req = Request::post("https://api.x.ai/v1/chat/completions")
        .body(TestBody::chunked(&payload, 64))
        .unwrap();
    let response = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let seen = api.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].body, payload);
    assert_eq!(seen[1].body, payload);
}

#[tokio::test]
async fn requests_with_an_empty_body_replay_trivially() {
    let api = MockApi::new();
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(Credential::new("default", "old"));
    let mut svc = stack(&api, &credentials, &Refresher::new());
    let req = Request::get("https://api.x.ai/v1/models")
        .body(TestBody::full(""))
        .unwrap();
    let response = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(api.calls(), 2);
}

#[tokio::test]
async fn cancelling_the_request_that_started_a_refresh_neither_cancels_it_nor_strands_others() {
    let api = MockApi::new();
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(Credential::new("default", "old"));
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let (calls, refresher) = counted_refresher(move |_, req: RefreshRequest| {
        let release_rx = release_rx.clone();
        async move {
            if let Some(rx) = release_rx.lock().await.take() {
                let _ = rx.await;
            }
            Ok::<_, BoxError>(Credential::new(req.stale().id(), "default-fresh-1"))
        }
    });
    let svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher).layer(api.clone());

    // The first request starts the refresh, then is dropped while it waits.
    let mut first = svc.clone();
    let first_task =
        tokio::spawn(async move { first.ready().await.unwrap().call(request("first")).await });
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    first_task.abort();
    assert!(first_task.await.unwrap_err().is_cancelled());

    // A second request joins the refresh still in flight.
    let mut second = svc.clone();
    let second_task =
        tokio::spawn(async move { second.ready().await.unwrap().call(request("second")).await });
    while api.calls() < 2 {
        tokio::task::yield_now().await;
    }
    release_tx.send(()).unwrap();
    let response = second_task.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        credentials.default_credential().access_token().secret(),
        "default-fresh-1"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hanging_refresher_is_cut_off_by_the_timeout() {
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::with(Behaviour::Hang);
    let mut svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone())
        .refresh_timeout(Duration::from_secs(5))
        .layer(api.clone());
    let started = tokio::time::Instant::now();
    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        report(&response).unwrap().skipped(),
        Some(&Skip::RefreshFailed)
    );
    let (data, _, _) = read_all(response.into_body()).await;
    assert_eq!(data, STALE_403.as_bytes());
    // The credential is still alive: the next stale request tries again.
    refresher.set(Behaviour::Fresh {
        delay: Duration::ZERO,
    });
    api.answer("default-fresh-2", Answer::Ok);
    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_panicking_or_erroring_refresher_releases_every_waiter() {
    for behaviour in [
        Behaviour::Panic,
        Behaviour::Transient,
        Behaviour::Same,
        Behaviour::Invalid,
    ] {
        let api = MockApi::new();
        let credentials = Credentials::new(Credential::new("default", "old"));
        let refresher = Refresher::with(behaviour);
        let svc = stack(&api, &credentials, &refresher);
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let mut svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                svc.ready().await.unwrap().call(request("x")).await
            }));
        }
        for task in tasks {
            let response = task.await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
            assert_eq!(
                report(&response).unwrap().skipped(),
                Some(&Skip::RefreshFailed)
            );
        }
        assert_eq!(refresher.calls(), 1);
        // The old credential is still in place.
        assert_eq!(
            credentials.default_credential().access_token().secret(),
            "old"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn credentials_about_to_expire_are_refreshed_before_the_request() {
    let api = MockApi::new();
    api.answer("old", Answer::Ok);
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(
        Credential::new("default", "old")
            .with_expires_at(SystemTime::now() + Duration::from_secs(600)),
    );
    let refresher = Refresher::new();
    let mut svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone())
        .refresh_ahead(Duration::from_secs(300))
        .layer(api.clone());

    // Ten minutes left: no refresh.
    svc.ready().await.unwrap().call(request("a")).await.unwrap();
    assert_eq!(refresher.calls(), 0);
    // Four minutes left: refreshed first, then sent with the new token.
    tokio::time::advance(Duration::from_secs(360)).await;
    let response = svc.ready().await.unwrap().call(request("b")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(refresher.calls(), 1);
    assert_eq!(
        tokens_seen(&api.seen()),
        ["Bearer old", "Bearer default-fresh-1"]
    );
}

/// The token endpoint hands out tokens that live two minutes, shorter than the five-minute
/// refresh-ahead window: each refreshed token is used for the first half of its life and
/// refreshed in the second, not refreshed again on every request.
#[tokio::test(start_paused = true)]
async fn tokens_that_live_shorter_than_the_window_are_not_refreshed_on_every_request() {
    let api = MockApi::new();
    // Only the two tokens the test expects are good: a third refresh would show as a 403.
    for n in 1..=2 {
        api.answer(&format!("short-{n}"), Answer::Ok);
    }
    api.answer("old", Answer::Ok);
    let credentials = Credentials::new(
        Credential::new("default", "old")
            .with_expires_at(SystemTime::now() + Duration::from_secs(60)),
    );
    let (calls, refresher) = counted_refresher(|n, req: RefreshRequest| async move {
        Ok::<_, BoxError>(
            Credential::new(req.stale().id(), format!("short-{n}"))
                .with_expires_at(SystemTime::now() + Duration::from_secs(120)),
        )
    });
    let mut svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher)
        .refresh_budget(RefreshBudget::new(100, Duration::from_secs(300)))
        .layer(api.clone());

    // One minute left of a five-minute window: refreshed before the first request.
    for _ in 0..5 {
        let response = svc.ready().await.unwrap().call(request("a")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Half of the new token's two minutes gone: refreshed once more, then used again.
    tokio::time::advance(Duration::from_secs(61)).await;
    for _ in 0..5 {
        let response = svc.ready().await.unwrap().call(request("b")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let seen = tokens_seen(&api.seen());
    assert_eq!(seen.iter().filter(|t| *t == "Bearer short-1").count(), 5);
    assert_eq!(seen.iter().filter(|t| *t == "Bearer short-2").count(), 5);
    assert!(!seen.iter().any(|t| t == "Bearer old"), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_ahead_sends_the_request_with_the_current_token() {
    let api = MockApi::new();
    api.answer("old", Answer::Ok);
    let credentials = Credentials::new(
        Credential::new("default", "old")
            .with_expires_at(SystemTime::now() + Duration::from_secs(60)),
    );
    let refresher = Refresher::with(Behaviour::Transient);
    let mut svc = stack(&api, &credentials, &refresher);
    let response = svc.ready().await.unwrap().call(request("a")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(refresher.calls(), 1);
    assert_eq!(tokens_seen(&api.seen()), ["Bearer old"]);
}

#[tokio::test]
async fn a_request_that_used_an_older_generation_retries_without_refreshing() {
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::new();
    // The inner service replaces the credential while the request is in flight, then says stale.
    let creds = credentials.clone();
    let api2 = api.clone();
    let inner = tower::service_fn(
        move |req: Request<xai_oauth_recovery::body::RequestBody<TestBody>>| {
            let auth = req.headers()[http::header::AUTHORIZATION]
                .to_str()
                .unwrap()
                .to_owned();
            if auth == "Bearer old" {
                creds.insert(Credential::new("default", "new-login"));
            }
            let mut svc = api2.clone();
            async move { svc.call(req).await }
        },
    );
    api.answer("new-login", Answer::Ok);
    let mut svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone()).layer(inner);
    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report = report(&response).unwrap();
    assert!(report.retried() && !report.refreshed());
    assert_eq!(refresher.calls(), 0);
    assert_eq!(tokens_seen(&api.seen()), ["Bearer old", "Bearer new-login"]);
}

#[tokio::test]
async fn an_unknown_credential_or_an_invalid_token_is_an_error_value() {
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("default", "line\nbreak"));
    let mut svc = stack(&api, &credentials, &Refresher::new());
    let error = invalid_token_error(&mut svc).await;
    assert!(!error.to_string().contains("line"));

    let mut req = request("x");
    req.extensions_mut().insert(CredentialId::new("nobody"));
    let error = svc.ready().await.unwrap().call(req).await.unwrap_err();
    assert_eq!(error.to_string(), "no credential with id `nobody`");
    assert_eq!(api.calls(), 0);
}

/// While a stale request waits for its refresh, the application inserts a credential whose
/// token cannot be a header value. The insert wins over the refresh, so there is nothing to
/// retry with: the original 403 comes back whole, reported as a failed refresh (not as a body
/// that could not be replayed), and the next request is an error value.
#[tokio::test]
async fn an_invalid_token_inserted_during_a_refresh_hands_back_the_403_as_a_failed_refresh() {
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("default", "old"));
    let creds = credentials.clone();
    let (calls, refresher) = counted_refresher(move |_, req: RefreshRequest| {
        creds.insert(Credential::new("default", "line\nbreak"));
        async move { Ok::<_, BoxError>(Credential::new(req.stale().id(), "fresh")) }
    });
    api.answer("fresh", Answer::Ok);
    let mut svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher).layer(api.clone());

    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let report = report(&response).unwrap();
    assert_eq!(report.skipped(), Some(&Skip::RefreshFailed));
    let (data, _, _) = read_all(response.into_body()).await;
    assert_eq!(data, STALE_403.as_bytes());
    assert_eq!(api.calls(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // The unusable token is never sent, and it is not refreshed on a guess.
    invalid_token_error(&mut svc).await;
    assert_eq!(api.calls(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Sends a request that must fail before it is sent, with an invalid-token error value.
async fn invalid_token_error<S>(svc: &mut S) -> Box<xai_oauth_recovery::CredentialError>
where
    S: Service<Request<TestBody>, Error = BoxError>,
    S::Response: std::fmt::Debug,
{
    let error = svc
        .ready()
        .await
        .unwrap()
        .call(request("x"))
        .await
        .unwrap_err();
    let error = error
        .downcast::<xai_oauth_recovery::CredentialError>()
        .unwrap();
    assert!(error.is_invalid_token());
    error
}

type MockRequest = Request<xai_oauth_recovery::body::RequestBody<TestBody>>;

/// Takes the next request from a tower-test mock, reading its body as a server would.
async fn next_request(
    handle: &mut tower_test::mock::Handle<MockRequest, http::Response<TestBody>>,
) -> (
    http::request::Parts,
    Bytes,
    tower_test::mock::SendResponse<http::Response<TestBody>>,
) {
    use http_body_util::BodyExt;
    let (req, send) = handle.next_request().await.unwrap();
    let (parts, body) = req.into_parts();
    (parts, body.collect().await.unwrap().to_bytes(), send)
}

#[tokio::test(start_paused = true)]
async fn the_retry_goes_through_poll_ready_and_unready_clones_are_never_called() {
    let (mock, mut handle) = tower_test::mock::pair::<MockRequest, http::Response<TestBody>>();
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = Refresher::new();
    let mut svc = XaiOAuthRecoveryLayer::new(credentials, refresher.clone()).layer(mock);

    handle.allow(1);
    let mut fut = std::pin::pin!(svc.ready().await.unwrap().call(request("payload")));
    let answer = async {
        let (parts, body, send) = next_request(&mut handle).await;
        assert_eq!(parts.headers[http::header::AUTHORIZATION], "Bearer old");
        assert_eq!(body, "payload");
        send.send_response(respond(Answer::Stale, Bytes::new()));
    };
    let (_, early) = tokio::join!(
        answer,
        tokio::time::timeout(Duration::from_secs(1), &mut fut)
    );
    // With paused time the timeout only fires once everything is idle: the refresh is done and
    // the retry waits for readiness. The mock, which panics when called unready, saw nothing.
    assert!(early.is_err(), "the retry must wait for poll_ready");
    assert_eq!(refresher.calls(), 1);
    handle.allow(1);
    let answer = async {
        let (parts, body, send) = next_request(&mut handle).await;
        assert_eq!(
            parts.headers[http::header::AUTHORIZATION],
            "Bearer default-fresh-1"
        );
        assert_eq!(body, "payload");
        send.send_response(respond(Answer::Ok, body));
    };
    let (_, response) = tokio::join!(answer, fut);
    let response = response.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(read_all(response.into_body()).await.0, b"ok:payload");
    assert_eq!(refresher.calls(), 1);
}

#[tokio::test]
async fn inner_errors_on_the_first_attempt_and_on_the_retry_reach_the_caller() {
    let (mock, mut handle) = tower_test::mock::pair::<MockRequest, http::Response<TestBody>>();
    let mut svc = XaiOAuthRecoveryLayer::new(
        Credentials::new(Credential::new("default", "old")),
        Refresher::new(),
    )
    .layer(mock);
    handle.allow(3);
    let task = tokio::spawn(svc.ready().await.unwrap().call(request("x")));
    let (_, _, send) = next_request(&mut handle).await;
    send.send_error(std::io::Error::other("connect refused"));
    assert_eq!(
        task.await.unwrap().unwrap_err().to_string(),
        "connect refused"
    );

    let task = tokio::spawn(svc.ready().await.unwrap().call(request("x")));
    let (_, _, send) = next_request(&mut handle).await;
    send.send_response(respond(Answer::Stale, Bytes::new()));
    let (_, _, send) = next_request(&mut handle).await;
    send.send_error(std::io::Error::other("reset on retry"));
    assert_eq!(
        task.await.unwrap().unwrap_err().to_string(),
        "reset on retry"
    );
}

#[tokio::test]
async fn a_first_attempt_that_did_not_read_the_body_is_not_retried_but_refreshes() {
    let (mock, mut handle) = tower_test::mock::pair::<MockRequest, http::Response<TestBody>>();
    let refresher = Refresher::new();
    let mut svc = XaiOAuthRecoveryLayer::new(
        Credentials::new(Credential::new("default", "old")),
        refresher.clone(),
    )
    .layer(mock);
    handle.allow(1);
    let task = tokio::spawn(svc.ready().await.unwrap().call(request("unread")));
    let (_req, send) = handle.next_request().await.unwrap();
    send.send_response(respond(Answer::Stale, Bytes::new()));
    let response = task.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let report = report(&response).unwrap();
    assert_eq!(report.skipped(), Some(&Skip::BodyNotReplayable));
    assert!(report.refreshed());
    assert_eq!(refresher.calls(), 1);
}

#[tokio::test]
async fn service_fn_refresher_and_spawned_futures_compile_and_work() {
    let api = MockApi::new();
    api.answer("new", Answer::Ok);
    let credentials = Credentials::new(Credential::new("default", "old"));
    let refresher = tower::service_fn(|req: RefreshRequest| async move {
        Ok::<_, BoxError>(Credential::new(req.stale().id(), "new"))
    });
    let svc = tower::ServiceBuilder::new()
        .layer(XaiOAuthRecoveryLayer::new(credentials, refresher))
        .service(api);
    let handle = tokio::spawn(async move {
        let mut svc = svc;
        let response = svc.ready().await?.call(request("x")).await?;
        Ok::<_, BoxError>(response.status())
    });
    assert_eq!(handle.await.unwrap().unwrap(), StatusCode::OK);
}

/// Refreshers whose types hold a `dyn` (a boxed future, a `BoxError` inside an awaited future)
/// trip rust-lang/rust#102211 when the bounds on them are part of the service's `Service`
/// impl: such a service could not be moved into `tokio::spawn`. This only has to compile.
#[tokio::test]
async fn refreshers_holding_dyn_types_work_in_spawned_requests() {
    type Boxed =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Credential, BoxError>> + Send>>;
    let api = MockApi::new();
    api.answer("new", Answer::Ok);
    api.answer("default-fresh-1", Answer::Ok);

    // A closure returning a boxed future.
    let boxed = tower::service_fn(|req: RefreshRequest| -> Boxed {
        Box::pin(async move { Ok(Credential::new(req.stale().id(), "new")) })
    });
    let svc =
        XaiOAuthRecoveryLayer::new(Credentials::new(Credential::new("default", "old")), boxed)
            .layer(api.clone());
    let status = tokio::spawn(async move { svc.oneshot(request("x")).await.map(|r| r.status()) });
    assert_eq!(status.await.unwrap().unwrap(), StatusCode::OK);

    // A closure that wraps another refresher (to log or persist what it hands out).
    let inner = Refresher::new();
    let wrapping = tower::service_fn(move |req: RefreshRequest| {
        let mut inner = inner.clone();
        async move {
            let credential = inner.ready().await?.call(req).await?;
            Ok::<_, BoxError>(credential)
        }
    });
    let svc = XaiOAuthRecoveryLayer::new(
        Credentials::new(Credential::new("default", "old")),
        wrapping,
    )
    .layer(api);
    let status = tokio::spawn(async move { svc.oneshot(request("x")).await.map(|r| r.status()) });
    assert_eq!(status.await.unwrap().unwrap(), StatusCode::OK);
}

#[tokio::test]
async fn no_token_in_debug_or_tracing_output() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(captured.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let api = MockApi::new();
    api.answer("default-fresh-1", Answer::Ok);
    let credentials = Credentials::new(
        Credential::new("default", "old-secret-at").with_refresh_token("secret-rt"),
    );
    credentials.insert(Credential::new("alice", "alice-secret-at"));
    let refresher = Refresher::new();
    let layer = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone());
    let mut svc = layer.clone().layer(api.clone());
    let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut req = request("x");
    req.extensions_mut().insert(CredentialId::new("alice"));
    let response = svc.ready().await.unwrap().call(req).await.unwrap();
    let debug = format!(
        "{layer:?} {svc:?} {credentials:?} {:?} {:?} {response:?}",
        credentials.default_credential(),
        credentials.get("alice"),
    );
    let logs = captured.text();
    assert!(
        logs.contains("refresh"),
        "expected refresh events in: {logs}"
    );
    for secret in [
        "old-secret-at",
        "secret-rt",
        "alice-secret-at",
        "default-fresh-1",
        "default-refresh-1",
    ] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
        assert!(!logs.contains(secret), "{secret} in {logs}");
    }
}
