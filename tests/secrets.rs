//! Secret hygiene: no access or refresh token, old or new, ever shows in tracing output (at
//! TRACE level, from every thread, through faults and load), nor in the `Debug` or `Display`
//! of any public type.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::chaos::{ChaosApi, ChaosRefresher, Settings, World};
use support::*;
use tower::{BoxError, Layer, Service, ServiceExt};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::mock::{Account, MockXai};
use xai_oauth_recovery::{
    Credential, CredentialId, Credentials, OAuth2Refresher, RecoveryReport, RefreshBudget,
    RefreshError, RefreshReason, RefreshRequest, XaiOAuthRecoveryLayer,
};

/// Everything every thread of this test binary logs, at TRACE level.
///
/// The subscriber is the binary's global default rather than a per-thread one: with per-thread
/// defaults, a callsite that another test (running in parallel, without a subscriber) hits
/// first can have its interest cached as "never", and its events are then lost to the capture.
fn captured() -> Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let captured = Captured::default();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(captured.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            captured
        })
        .clone()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn assert_no_secret(text: &str, secrets: &BTreeSet<String>, what: &str) {
    assert!(!secrets.is_empty());
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what}: `{secret}` shows in:\n{}",
            excerpt(text, secret)
        );
    }
}

fn excerpt<'a>(text: &'a str, secret: &str) -> &'a str {
    let at = text.find(secret).unwrap_or(0);
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    &text[start..end]
}

// ---------------------------------------------------------------------------------------------
// Scenarios, each returning the tokens it issued

/// A round of the randomized load, refresher faults included.
async fn load(secrets: &mut BTreeSet<String>) {
    let world = World::new(Settings {
        seed: 0x5ec2e7,
        ..Settings::default()
    });
    let credentials = world.credentials();
    let svc = XaiOAuthRecoveryLayer::new(
        credentials.clone(),
        ChaosRefresher {
            world: world.clone(),
        },
    )
    .refresh_budget(RefreshBudget::new(50, Duration::from_secs(3600)))
    .refresh_timeout(Duration::from_millis(100))
    .max_replay_body_bytes(1024)
    .layer(ChaosApi {
        world: world.clone(),
    });
    let mut tasks = Vec::new();
    for id in 0..2_000 {
        let (world, svc, credentials) = (world.clone(), svc.clone(), credentials.clone());
        tasks.push(tokio::spawn(async move {
            if id % 97 == 0 {
                world.chaos(&credentials);
            }
            world.run_one(svc, id).await
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(world.violations(), Vec::<String>::new());
    assert!(world.counts().refresher_calls > 0);
    secrets.extend(world.issued());
}

/// Every refresher fault, inner errors, failing bodies, cancelled requests, refresh ahead.
async fn faults(secrets: &mut BTreeSet<String>) {
    let initial =
        || Credential::new("default", "at-initial-s3cr3t").with_refresh_token("rt-initial-s3cr3t");
    secrets.extend([
        "at-initial-s3cr3t".to_owned(),
        "rt-initial-s3cr3t".to_owned(),
    ]);
    for behaviour in [
        Behaviour::Fresh {
            delay: Duration::ZERO,
        },
        Behaviour::Transient,
        Behaviour::Terminal,
        Behaviour::Panic,
        Behaviour::Same,
        Behaviour::Invalid,
        Behaviour::Hang,
    ] {
        let api = MockApi::new();
        api.answer("default-fresh-1", Answer::Ok);
        let credentials = Credentials::new(initial());
        let refresher = Refresher::with(behaviour);
        let svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone())
            .refresh_timeout(Duration::from_millis(50))
            .layer(api.clone());
        let mut tasks = Vec::new();
        for i in 0..20 {
            let svc = svc.clone();
            let task = tokio::spawn(async move {
                let response = svc.oneshot(request("x")).await?;
                read_all(response.into_body()).await;
                Ok::<_, BoxError>(())
            });
            if i % 5 == 4 {
                task.abort();
            }
            tasks.push(task);
        }
        for task in tasks {
            let _ = task.await;
        }
        secrets.extend(refresher.issued());
    }
    secrets.insert("bad\ntoken".to_owned());

    // Inner errors on the first attempt and on the retry; a stale body failing mid-stream.
    let credentials = Credentials::new(initial());
    let refresher = Refresher::new();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let inner = tower::service_fn(move |_req: Request<RequestBody<TestBody>>| {
        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let mut response = Response::new(match n % 3 {
                0 => return Err::<Response<TestBody>, BoxError>("connection refused".into()),
                1 => TestBody::chunked(STALE_403.as_bytes(), 11).with_error(),
                _ => TestBody::full(STALE_403),
            });
            *response.status_mut() = StatusCode::FORBIDDEN;
            Ok(response)
        }
    });
    let svc = XaiOAuthRecoveryLayer::new(credentials, refresher.clone()).layer(inner);
    for _ in 0..6 {
        if let Ok(response) = svc.clone().oneshot(request("x")).await {
            read_all(response.into_body()).await;
        }
    }
    secrets.extend(refresher.issued());

    // Refresh ahead of expiry, on a named credential.
    let api = MockApi::new();
    api.answer("alice-fresh-1", Answer::Ok);
    let credentials = Credentials::new(initial());
    credentials.insert(
        Credential::new("alice", "at-alice-s3cr3t")
            .with_refresh_token("rt-alice-s3cr3t")
            .with_expires_at(SystemTime::now() + Duration::from_secs(10)),
    );
    secrets.extend(["at-alice-s3cr3t".to_owned(), "rt-alice-s3cr3t".to_owned()]);
    let refresher = Refresher::new();
    let svc = XaiOAuthRecoveryLayer::new(credentials, refresher.clone()).layer(api);
    let mut req = request("x");
    req.extensions_mut().insert(CredentialId::new("alice"));
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    secrets.extend(refresher.issued());
}

/// `OAuth2Refresher` over real HTTP against the mock xAI: rotations, random token endpoint
/// failures, revoked refresh tokens, refreshed tokens that keep failing.
async fn oauth2(secrets: &mut BTreeSet<String>) {
    let xai = MockXai::builder().seed(99).start().await.unwrap();
    let token_http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let refresher = OAuth2Refresher::new(token_http, xai.token_endpoint(), "secrets-test")
        .allow_insecure_loopback();
    let http: Client<HttpConnector, RequestBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();
    let signed_in = xai.sign_in("default", Account::Subscribed);
    secrets.insert(signed_in.access_token().secret().to_owned());
    secrets.extend(signed_in.refresh_token().map(|t| t.secret().to_owned()));
    let credentials = Credentials::new(signed_in);
    let mut updates = credentials.subscribe();
    let svc = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher)
        .refresh_budget(RefreshBudget::new(100, Duration::from_secs(3600)))
        .layer(tower::limit::ConcurrencyLimit::new(http, 8));
    let send = |svc: &xai_oauth_recovery::XaiOAuthRecovery<_, _>| {
        let request = Request::post(xai.chat_completions_uri())
            .body(Full::new(Bytes::from_static(b"{\"model\":\"grok-4\"}")))
            .unwrap();
        svc.clone().oneshot(request)
    };
    xai.set_token_failure_rate(0.3);
    for round in 0..12 {
        xai.expire_access_tokens();
        match round {
            4 => xai.set_refresh_issues_stale_tokens(true),
            6 => xai.set_refresh_issues_stale_tokens(false),
            8 => xai.revoke_refresh_tokens(),
            10 => {
                let again = xai.sign_in("default", Account::Subscribed);
                secrets.insert(again.access_token().secret().to_owned());
                secrets.extend(again.refresh_token().map(|t| t.secret().to_owned()));
                credentials.insert(again);
            }
            _ => {}
        }
        let responses = futures_join(vec![send(&svc), send(&svc), send(&svc), send(&svc)]).await;
        for response in responses {
            let response = response.unwrap();
            response.into_body().collect().await.unwrap();
        }
    }
    while let Some(credential) = updates.try_recv() {
        secrets.insert(credential.access_token().secret().to_owned());
        secrets.extend(credential.refresh_token().map(|t| t.secret().to_owned()));
    }
    // Every token the mock issues carries one of these prefixes: none may show either.
    secrets.extend(["mock-at-".to_owned(), "mock-rt-".to_owned()]);
    assert!(xai.stats().refreshes_ok > 0 && xai.stats().refresh_failures > 0);
}

/// A token endpoint that echoes the tokens it was sent, and hands out new ones in its errors.
async fn echoing_token_endpoint(secrets: &mut BTreeSet<String>) {
    let http = tower::service_fn(|req: Request<Full<Bytes>>| async move {
        let body = req.into_body().collect().await?.to_bytes();
        let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
        let refresh = form
            .iter()
            .find(|(k, _)| k == "refresh_token")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let answer = if refresh.ends_with("-1") {
            (
                400,
                format!(
                    r#"{{"error":"invalid_grant {refresh}","error_description":"refresh token {refresh} was used; it belonged to at-echo-s3cr3t"}}"#
                ),
            )
        } else {
            (
                200,
                format!(
                    r#"{{"access_token":"at-echo-new-s3cr3t","token_type":"{refresh}","refresh_token":"rt-echo-new-s3cr3t"}}"#
                ),
            )
        };
        let mut response = Response::new(Full::new(Bytes::from(answer.1)));
        *response.status_mut() = StatusCode::from_u16(answer.0)?;
        Ok::<_, BoxError>(response)
    });
    secrets.extend(
        [
            "at-echo-s3cr3t",
            "rt-echo-s3cr3t-1",
            "rt-echo-s3cr3t-2",
            "at-echo-new-s3cr3t",
            "rt-echo-new-s3cr3t",
        ]
        .map(str::to_owned),
    );
    let refresher = OAuth2Refresher::new(
        http,
        http::Uri::from_static("https://auth.x.ai/oauth2/token"),
        "echo",
    );
    for refresh in ["rt-echo-s3cr3t-1", "rt-echo-s3cr3t-2"] {
        let stale = Credential::new("echo", "at-echo-s3cr3t").with_refresh_token(refresh);
        let request = RefreshRequest::new(stale, RefreshReason::ExpiresSoon);
        let error = refresher.clone().oneshot(request).await.unwrap_err();
        let shown = format!("{error} {error:?} {:?}", std::error::Error::source(&error));
        tracing::warn!(%error, "as an application would log it");
        assert_no_secret(&shown, secrets, "a refresh error");
    }
}

/// Joins futures without another dependency.
async fn futures_join<F: std::future::Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send,
{
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[test]
fn no_token_in_tracing_output_through_faults_and_load() {
    let captured = captured();
    let mut secrets = BTreeSet::new();
    runtime().block_on(async {
        load(&mut secrets).await;
        faults(&mut secrets).await;
        oauth2(&mut secrets).await;
        echoing_token_endpoint(&mut secrets).await;
    });

    let logs = captured.text();
    // The capture saw the layer at work on the runtime's threads, at every level.
    for expected in [
        "refreshing credential",
        "credential refreshed",
        "refresh failed",
        "refresh timed out",
        "refresh ended without an answer",
        "refresher returned the stale access token again",
        "refresher returned an unusable credential",
        "refresh failed for good",
        "refresh budget exhausted",
        "retrying with a newer credential",
        "refreshing at the token endpoint",
        "DEBUG",
        "WARN",
    ] {
        assert!(logs.contains(expected), "no `{expected}` in the logs");
    }
    assert!(secrets.len() > 50, "only {} secrets", secrets.len());
    assert_no_secret(&logs, &secrets, "tracing output");
}

// ---------------------------------------------------------------------------------------------
// Debug and Display

#[tokio::test]
async fn debug_and_display_of_every_public_type_redact_secrets() {
    let captured = captured();
    let secrets: BTreeSet<String> = [
        "at-dbg-s3cr3t",
        "rt-dbg-s3cr3t",
        "client-s3cr3t",
        "mock-at-",
        "mock-rt-",
    ]
    .map(str::to_owned)
    .into();
    let credential = Credential::new("default", "at-dbg-s3cr3t")
        .with_refresh_token("rt-dbg-s3cr3t")
        .with_expires_at(SystemTime::now() + Duration::from_secs(3600));
    let credentials = Credentials::new(credential.clone());
    credentials.insert(credential.clone().with_id("alice"));
    let mut updates = credentials.subscribe();
    let refresh_request = RefreshRequest::new(credential.clone(), RefreshReason::ExpiresSoon);
    let refresh_error = RefreshError::terminal("invalid_grant");
    let bad = Credentials::new(Credential::new("bad", "at-dbg-s3cr3t\n"));

    // A stale 403 retried with a token the refresher hands out.
    let api = MockApi::new();
    api.answer("default-fresh-1", Answer::Ok);
    let refresher = Refresher::new();
    let seen_body = Arc::new(std::sync::Mutex::new(String::new()));
    let seen = seen_body.clone();
    let inner = tower::service_fn(move |req: Request<RequestBody<TestBody>>| {
        *seen.lock().unwrap() = format!("{:?} {:?}", req.body(), req);
        let mut api = api.clone();
        async move { api.call(req).await }
    });
    let layer = XaiOAuthRecoveryLayer::new(credentials.clone(), refresher.clone());
    let svc = layer.clone().layer(inner);
    let mut ready = svc.clone();
    let future = ready.ready().await.unwrap().call(request("x"));
    let future_debug = format!("{future:?}");
    let response = future.await.unwrap();
    let report = response
        .extensions()
        .get::<RecoveryReport>()
        .cloned()
        .unwrap();
    let response_debug = format!("{response:?} {:?}", response.body());
    let published = updates.try_recv().unwrap();
    let mut bad_svc = XaiOAuthRecoveryLayer::new(bad, refresher.clone()).layer(MockApi::new());
    let credential_error = bad_svc
        .ready()
        .await
        .unwrap()
        .call(request("x"))
        .await
        .unwrap_err();

    let xai = MockXai::start().await.unwrap();
    let mock_credential = xai.sign_in("m", Account::Subscribed);
    let token_http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let oauth = OAuth2Refresher::new(token_http, xai.token_endpoint(), "app")
        .client_secret("client-s3cr3t")
        .allow_insecure_loopback();

    let shown = [
        format!("{credential:?} {credential:#?}"),
        format!(
            "{:?} {}",
            credential.access_token(),
            credential.access_token()
        ),
        format!(
            "{:?} {}",
            credential.refresh_token().unwrap(),
            credential.refresh_token().unwrap()
        ),
        format!("{credentials:?} {credentials:#?}"),
        format!("{updates:?}"),
        format!("{published:?}"),
        format!("{credential_error} {credential_error:?}"),
        format!("{refresh_request:?} {refresh_request:#?}"),
        format!("{refresh_error} {refresh_error:?}"),
        format!("{report} {report:?}"),
        format!("{layer:?} {layer:#?}"),
        format!("{svc:?} {svc:#?}"),
        future_debug,
        seen_body.lock().unwrap().clone(),
        response_debug,
        format!("{oauth:?} {oauth:#?}"),
        format!("{xai:?} {xai:#?} {mock_credential:?}"),
        format!("{:?}", MockXai::builder()),
        format!("{:?}", CredentialId::new("alice")),
    ];
    for shown in &shown {
        assert_no_secret(shown, &secrets, "Debug/Display");
        assert_no_secret(
            shown,
            &refresher.issued().into_iter().collect(),
            "Debug/Display",
        );
        assert_no_secret(
            shown,
            &[mock_credential.access_token().secret().to_owned()].into(),
            "Debug/Display",
        );
    }
    // The Authorization header the inner service got is marked sensitive: its Debug hides it.
    assert!(shown[13].contains("Sensitive"), "{}", shown[13]);
    assert_no_secret(&captured.text(), &secrets, "tracing output");
}

/// A spent budget is logged at WARN once, not once for every request it turns away; when the
/// budget allows a refresh again and runs out again, that is logged again.
#[tokio::test(start_paused = true)]
async fn a_spent_budget_warns_once_per_exhaustion() {
    let captured = captured();
    // Every token is stale: each request asks for a refresh.
    let api = MockApi::new();
    let credentials = Credentials::new(Credential::new("budget-logger", "old"));
    let refresher = Refresher::new();
    let mut svc = XaiOAuthRecoveryLayer::new(credentials, refresher.clone())
        .refresh_budget(RefreshBudget::new(1, Duration::from_secs(300)))
        .layer(api);
    let warnings = || {
        captured
            .text()
            .lines()
            .filter(|line| {
                line.contains("WARN")
                    && line.contains("budget-logger")
                    && line.contains("refresh budget exhausted")
            })
            .count()
    };

    for round in 1..=2 {
        for _ in 0..10 {
            let response = svc.ready().await.unwrap().call(request("x")).await.unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
        }
        assert_eq!(refresher.calls(), round);
        assert_eq!(warnings(), round);
        tokio::time::advance(Duration::from_secs(301)).await;
    }
}
