//! `OAuth2Refresher` against a real token endpoint on 127.0.0.1, alone and through the layer.

#[path = "support/token_server.rs"]
mod token_server;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::{
    classify, Classify, Credential, Credentials, OAuth2Refresher, RecoveryReport, RefreshBudget,
    RefreshError, RefreshReason, RefreshRequest, Skip, StaleReason, Verdict, XaiOAuthRecoveryLayer,
};

use token_server::{Answer, TokenServer};

type Http = Client<HttpConnector, Full<Bytes>>;
type Refresher = OAuth2Refresher<Http, Full<Bytes>>;

const TOKEN_PATH: &str = "/oauth2/token";
const STALE_BODY: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#;

fn http() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

fn refresher(server: &TokenServer) -> Refresher {
    OAuth2Refresher::new(http(), server.uri(TOKEN_PATH), "test-client").allow_insecure_loopback()
}

fn stale() -> Credential {
    Credential::new("alice", "at-1").with_refresh_token("rt-1")
}

async fn refresh(
    refresher: &Refresher,
    credential: Credential,
) -> Result<Credential, RefreshError> {
    let request = RefreshRequest::new(credential, RefreshReason::ExpiresSoon);
    refresher.clone().oneshot(request).await
}

fn secs_from_now(at: Option<SystemTime>) -> Option<u64> {
    Some(at?.duration_since(SystemTime::now()).ok()?.as_secs())
}

#[tokio::test]
async fn success_rotates_the_refresh_token_and_honours_expires_in() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer(Answer::token("at-2", Some("rt-2"), Some(3600)));

    let fresh = refresh(&refresher(&server), stale()).await?;

    assert_eq!(fresh.id(), "alice");
    assert_eq!(fresh.access_token().secret(), "at-2");
    assert_eq!(fresh.refresh_token().map(|t| t.secret()), Some("rt-2"));
    let left = secs_from_now(fresh.expires_at());
    assert!(
        left.is_some_and(|left| (3590..=3600).contains(&left)),
        "{left:?}"
    );
    assert_eq!(server.received().len(), 1);
    Ok(())
}

#[tokio::test]
async fn the_form_is_checked_field_by_field() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer_always(Answer::token("at-2", Some("rt-2"), None));
    let awkward = Credential::new("alice", "at-1").with_refresh_token("rt/1+2=3&x y");

    refresh(&refresher(&server), awkward.clone()).await?;
    let with_extras = refresher(&server)
        .client_secret("s&cret")
        .scope("api offline");
    refresh(&with_extras, awkward).await?;

    let received = server.received();
    assert_eq!(received.len(), 2);
    for request in &received {
        assert_eq!(request.method, http::Method::POST);
        assert_eq!(request.path, TOKEN_PATH);
        assert_eq!(
            request.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        assert_eq!(request.header("accept"), Some("application/json"));
        assert_eq!(request.header("authorization"), None);
    }
    let fields = |i: usize| -> Vec<(&str, &str)> {
        received[i]
            .form
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    };
    assert_eq!(
        fields(0),
        [
            ("grant_type", "refresh_token"),
            ("client_id", "test-client"),
            ("refresh_token", "rt/1+2=3&x y"),
        ]
    );
    assert_eq!(
        fields(1),
        [
            ("grant_type", "refresh_token"),
            ("client_id", "test-client"),
            ("refresh_token", "rt/1+2=3&x y"),
            ("client_secret", "s&cret"),
            ("scope", "api offline"),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn an_answer_without_refresh_token_keeps_the_old_one() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer(Answer::token("at-2", None, Some(60)));
    server.answer(Answer::json(
        200,
        r#"{"access_token":"at-3","token_type":"bearer","refresh_token":""}"#,
    ));
    let refresher = refresher(&server);

    let fresh = refresh(&refresher, stale()).await?;
    assert_eq!(fresh.access_token().secret(), "at-2");
    assert_eq!(fresh.refresh_token().map(|t| t.secret()), Some("rt-1"));

    let fresh = refresh(&refresher, fresh).await?;
    assert_eq!(fresh.access_token().secret(), "at-3");
    assert_eq!(fresh.refresh_token().map(|t| t.secret()), Some("rt-1"));
    assert_eq!(fresh.expires_at(), None);
    Ok(())
}

fn jwt(exp: u64) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.c2ln",
        engine.encode(r#"{"alg":"RS256"}"#),
        engine.encode(format!(r#"{{"sub":"user","exp":{exp}}}"#))
    )
}

#[tokio::test]
async fn the_jwt_exp_claim_stands_in_for_expires_in() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    let exp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs()
        + 900;
    server.answer(Answer::token(&jwt(exp), Some("rt-2"), None));
    // `expires_in` wins over the claim when both are there.
    server.answer(Answer::token(&jwt(exp), Some("rt-3"), Some(7200)));
    let refresher = refresher(&server);

    let fresh = refresh(&refresher, stale()).await?;
    assert_eq!(
        fresh.expires_at(),
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp))
    );
    let fresh = refresh(&refresher, fresh).await?;
    let left = secs_from_now(fresh.expires_at());
    assert!(
        left.is_some_and(|left| (7190..=7200).contains(&left)),
        "{left:?}"
    );
    Ok(())
}

#[tokio::test]
async fn error_statuses_over_the_wire() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    let refresher = refresher(&server);
    let table: &[(Answer, bool)] = &[
        (
            Answer::json(
                400,
                r#"{"error":"invalid_grant","error_description":"refresh token already used"}"#,
            ),
            true,
        ),
        (Answer::json(401, r#"{"error":"invalid_client"}"#), true),
        (Answer::text(400, ""), true),
        (Answer::json(403, r#"{"error":"access_denied"}"#), true),
        (Answer::json(429, r#"{"error":"slow_down"}"#), false),
        (Answer::text(500, "boom"), false),
        (Answer::text(503, "<html>unavailable</html>"), false),
        (Answer::json(200, r#"{"access_token": "at-2", "#), false),
        (Answer::json(200, r#"["at-2"]"#), false),
        (Answer::text(200, "access_token=at-2"), false),
    ];
    for (answer, terminal) in table {
        server.answer(answer.clone());
        let error = match refresh(&refresher, stale()).await {
            Ok(_) => return Err(format!("{answer:?} accepted").into()),
            Err(error) => error,
        };
        assert_eq!(error.is_terminal(), *terminal, "{answer:?}: {error}");
        let message = error.to_string();
        assert!(
            !message.contains("rt-1") && !message.contains("at-2"),
            "{message}"
        );
        assert_eq!(message, message.to_lowercase(), "{message}");
        if *terminal {
            assert!(message.contains("sign in"), "{message}");
        }
    }
    assert_eq!(server.received().len(), table.len());
    Ok(())
}

#[tokio::test]
async fn an_oversized_answer_is_transient() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    let big = format!(
        r#"{{"access_token":"at-2","token_type":"Bearer","padding":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    // With a content-length, and streamed without one.
    server.answer(Answer::json(200, big));
    server.answer(Answer::Chunked { len: 1024 * 1024 });
    let refresher = refresher(&server);
    for _ in 0..2 {
        let error = refresh(&refresher, stale()).await.err();
        assert!(
            error.as_ref().is_some_and(
                |e| e.is_transient() && e.to_string().contains("larger than 65536 bytes")
            ),
            "{error:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_hanging_endpoint_is_cut_by_the_timeout() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer(Answer::Hang);
    let refresher = refresher(&server).timeout(Duration::from_millis(200));

    let started = Instant::now();
    let error = refresh(&refresher, stale()).await.err();
    let took = started.elapsed();

    assert!(
        error.as_ref().is_some_and(RefreshError::is_transient),
        "{error:?}"
    );
    assert_eq!(
        error.map(|e| e.to_string()),
        Some("token refresh failed: the token endpoint did not answer within 200ms".into())
    );
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(5),
        "{took:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_redirect_is_not_followed() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer(Answer::redirect(307, server.uri("/elsewhere").to_string()));
    server.answer_always(Answer::token("at-2", Some("rt-2"), None));

    let error = refresh(&refresher(&server), stale()).await.err();

    assert!(
        error
            .as_ref()
            .is_some_and(|e| e.is_transient() && e.to_string().contains("redirect")),
        "{error:?}"
    );
    let paths: Vec<String> = server.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, [TOKEN_PATH]);
    Ok(())
}

/// The hyper client behind a counter of the requests it was given.
fn counting_http(
    count: Arc<AtomicUsize>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<hyper::body::Incoming>,
    Error = hyper_util::client::legacy::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    let http = http();
    service_fn(move |request: Request<Full<Bytes>>| {
        count.fetch_add(1, Ordering::SeqCst);
        http.request(request)
    })
}

#[tokio::test]
async fn refused_endpoints_get_nothing() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer_always(Answer::token("at-2", Some("rt-2"), None));
    let sent = Arc::new(AtomicUsize::new(0));
    let https_loopback: Uri = format!("https://127.0.0.1:{}{TOKEN_PATH}", server.port()).parse()?;
    let cases: Vec<(&str, Uri, bool)> = vec![
        // Plain HTTP to the loopback server, without allow_insecure_loopback.
        ("plain http", server.uri(TOKEN_PATH), false),
        // HTTPS, but to a host off the allowlist.
        ("https loopback off the allowlist", https_loopback, false),
        (
            "https off the allowlist",
            Uri::from_static("https://auth.example.com/oauth2/token"),
            true,
        ),
        (
            "look-alike host",
            Uri::from_static("https://evilx.ai/oauth2/token"),
            true,
        ),
        (
            "suffix trick",
            Uri::from_static("https://x.ai.evil.com/oauth2/token"),
            true,
        ),
        (
            "plain http to x.ai",
            Uri::from_static("http://auth.x.ai/oauth2/token"),
            true,
        ),
        (
            "user info",
            Uri::from_static("https://auth.x.ai@evil.com/oauth2/token"),
            true,
        ),
    ];
    for (case, endpoint, insecure_loopback) in cases {
        let mut refresher =
            OAuth2Refresher::new(counting_http(sent.clone()), endpoint, "test-client");
        if insecure_loopback {
            refresher = refresher.allow_insecure_loopback();
        }
        assert!(refresher.check_endpoint().is_err(), "{case}");
        let request = RefreshRequest::new(stale(), RefreshReason::ExpiresSoon);
        let error = refresher.oneshot(request).await.err();
        assert!(
            error.as_ref().is_some_and(RefreshError::is_terminal),
            "{case}: {error:?}"
        );
        assert!(
            error.is_some_and(|e| e.to_string().contains("refusing to send credentials")),
            "{case}"
        );
    }
    assert_eq!(sent.load(Ordering::SeqCst), 0);
    assert_eq!(server.connections(), 0);
    assert!(server.received().is_empty());
    Ok(())
}

#[tokio::test]
async fn no_refresh_token_is_terminal_and_sends_nothing() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    let error = refresh(&refresher(&server), Credential::new("alice", "at-1"))
        .await
        .err();
    assert_eq!(
        error.as_ref().map(|e| (e.is_terminal(), e.to_string())),
        Some((
            true,
            "token refresh failed, sign in again: no refresh token: sign in again".into()
        ))
    );
    assert_eq!(server.connections(), 0);
    Ok(())
}

#[tokio::test]
async fn the_refresher_future_is_send() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer(Answer::token("at-2", Some("rt-2"), None));
    let request = RefreshRequest::new(stale(), RefreshReason::ExpiresSoon);
    let fresh = tokio::spawn(refresher(&server).oneshot(request)).await??;
    assert_eq!(fresh.access_token().secret(), "at-2");
    Ok(())
}

#[tokio::test]
async fn discovery_applies_the_same_checks() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    let discovery = server.uri("/.well-known/openid-configuration");
    let token_endpoint = server.uri(TOKEN_PATH).to_string();
    let document = serde_json::json!({
        "issuer": "https://auth.x.ai",
        "token_endpoint": token_endpoint,
        "authorization_endpoint": "https://auth.x.ai/oauth2/authorize",
    });
    server.answer(Answer::json(200, document.to_string()));
    server.answer(Answer::token("at-2", Some("rt-2"), None));

    // Discovered with the loopback allowance, then used.
    let discovered = OAuth2Refresher::new(
        http(),
        Uri::from_static("https://auth.x.ai/unused"),
        "test-client",
    )
    .allow_insecure_loopback()
    .timeout(Duration::from_secs(5))
    .discover_endpoint(discovery.clone())
    .await?;
    assert_eq!(discovered.token_endpoint().to_string(), token_endpoint);
    let fresh =
        tokio::spawn(discovered.oneshot(RefreshRequest::new(stale(), RefreshReason::ExpiresSoon)))
            .await??;
    assert_eq!(fresh.access_token().secret(), "at-2");
    let paths: Vec<String> = server.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/.well-known/openid-configuration", TOKEN_PATH]);

    // The defaults refuse plain HTTP to the discovery URI: nothing is sent.
    let refused = OAuth2Refresher::discover(http(), discovery.clone(), "test-client").await;
    assert!(refused.err().is_some_and(|e| e.is_terminal()));
    assert_eq!(server.received().len(), 2);

    // A document naming an endpoint off the allowlist is refused.
    let evil = serde_json::json!({ "token_endpoint": "https://x.ai.evil.com/oauth2/token" });
    server.answer(Answer::json(200, evil.to_string()));
    let refused = OAuth2Refresher::new(
        http(),
        Uri::from_static("https://auth.x.ai/unused"),
        "test-client",
    )
    .allow_insecure_loopback()
    .discover_endpoint(discovery.clone())
    .await
    .err();
    assert!(
        refused.is_some_and(|e| e.is_terminal() && e.to_string().contains("not on the allowlist"))
    );

    // A missing document is terminal; an unavailable one transient.
    server.answer(Answer::text(404, "not found"));
    server.answer(Answer::text(503, "later"));
    for terminal in [true, false] {
        let error = OAuth2Refresher::new(
            http(),
            Uri::from_static("https://auth.x.ai/unused"),
            "test-client",
        )
        .allow_insecure_loopback()
        .discover_endpoint(discovery.clone())
        .await
        .err();
        assert_eq!(error.map(|e| e.is_terminal()), Some(terminal));
    }
    Ok(())
}

#[test]
fn debug_shows_configuration_not_secrets() {
    let refresher = OAuth2Refresher::xai(http(), "my-client")
        .client_secret("client-sekret")
        .allow_host("*.example.com");
    let shown = format!("{refresher:?}");
    assert!(!shown.contains("client-sekret"), "{shown}");
    for part in [
        "https://auth.x.ai/oauth2/token",
        "my-client",
        "[redacted]",
        "\"*.x.ai\"",
        "\"*.example.com\"",
    ] {
        assert!(shown.contains(part), "{part} missing from {shown}");
    }
}

// ---- Through the layer ----

/// xAI's classifier recognises the stale-token body; the fallback keeps these tests about the
/// refresher independent of the classifier's rules.
#[derive(Clone, Copy, Debug)]
struct Wke;

impl Classify for Wke {
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Verdict {
        match classify(status, headers, body) {
            Verdict::Unrecognized
                if status == StatusCode::FORBIDDEN
                    && body
                        .windows(9)
                        .any(|w| w.eq_ignore_ascii_case(b"[wke=unau")) =>
            {
                Verdict::StaleToken(StaleReason::Wke("bad-credentials".into()))
            }
            verdict => verdict,
        }
    }
}

/// A stand-in for xAI: `good` works, every other token gets the stale-token 403. Like a server,
/// it reads the request body before it answers (the layer replays what was read).
fn xai(
    good: &'static str,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
) -> impl Service<
    Request<RequestBody<Full<Bytes>>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone
       + Send {
    service_fn(move |request: Request<RequestBody<Full<Bytes>>>| {
        let seen = seen.clone();
        async move {
            let (parts, body) = request.into_parts();
            let _ = body.collect().await;
            let auth = parts
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if let Ok(mut seen) = seen.lock() {
                seen.push(auth.clone());
            }
            let response = if auth == format!("Bearer {good}") {
                Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")))
            } else {
                let mut response =
                    Response::new(Full::new(Bytes::from_static(STALE_BODY.as_bytes())));
                *response.status_mut() = StatusCode::FORBIDDEN;
                response
            };
            Ok::<_, Infallible>(response)
        }
    })
}

fn api_request() -> Result<Request<Full<Bytes>>, http::Error> {
    Request::post("https://api.x.ai/v1/chat/completions")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"grok-4\"}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_stale_403_refresh_over_tcp_retry_200() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer(Answer::token("at-2", Some("rt-2"), Some(3600)));
    let credentials = Credentials::new(stale());
    let mut updates = credentials.subscribe();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client = ServiceBuilder::new()
        .layer(XaiOAuthRecoveryLayer::new(credentials.clone(), refresher(&server)).classifier(Wke))
        .service(xai("at-2", seen.clone()));

    // Moved into a task: the whole stack is Send.
    let response = tokio::spawn(async move {
        let mut client = client;
        client.ready().await?.call(api_request()?).await
    })
    .await??;

    // Published before the retry went out, so it is there as soon as the response is.
    let published = updates.try_recv();
    assert_eq!(response.status(), StatusCode::OK);
    let report = response.extensions().get::<RecoveryReport>().cloned();
    assert!(report.is_some_and(|r| r.retried() && r.refreshed()));
    assert_eq!(
        response.into_body().collect().await?.to_bytes(),
        "{\"ok\":true}"
    );

    let published = published.ok_or("no credential published")?;
    assert_eq!(published.id(), "alice");
    assert_eq!(published.access_token().secret(), "at-2");
    assert_eq!(published.refresh_token().map(|t| t.secret()), Some("rt-2"));
    assert!(published.expires_at().is_some());
    assert_eq!(credentials.default_credential(), published);

    let seen = seen.lock().map(|seen| seen.clone()).unwrap_or_default();
    assert_eq!(seen, ["Bearer at-1", "Bearer at-2"]);
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert!(received[0]
        .form
        .contains(&("refresh_token".to_owned(), "rt-1".to_owned())));
    Ok(())
}

#[tokio::test]
async fn invalid_grant_kills_the_credential_and_the_layer_stops_calling() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer_always(Answer::json(
        400,
        r#"{"error":"invalid_grant","error_description":"refresh token revoked"}"#,
    ));
    let credentials = Credentials::new(stale());
    let mut client = ServiceBuilder::new()
        .layer(XaiOAuthRecoveryLayer::new(credentials, refresher(&server)).classifier(Wke))
        .service(xai("at-2", Arc::default()));

    for _ in 0..3 {
        let response = client.ready().await?.call(api_request()?).await?;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let report = response.extensions().get::<RecoveryReport>();
        assert_eq!(
            report.and_then(|r| r.skipped()),
            Some(&Skip::CredentialDead)
        );
        // The original body comes back whole.
        assert_eq!(response.into_body().collect().await?.to_bytes(), STALE_BODY);
    }
    assert_eq!(server.received().len(), 1);
    Ok(())
}

#[tokio::test]
async fn unavailable_is_transient_and_counted_by_the_budget() -> Result<(), BoxError> {
    let server = TokenServer::start().await?;
    server.answer_always(Answer::text(503, "unavailable"));
    let credentials = Credentials::new(stale());
    let mut client = ServiceBuilder::new()
        .layer(
            XaiOAuthRecoveryLayer::new(credentials, refresher(&server))
                .classifier(Wke)
                .refresh_budget(RefreshBudget::new(2, Duration::from_secs(300))),
        )
        .service(xai("at-2", Arc::default()));

    let mut skips = Vec::new();
    for _ in 0..3 {
        let response = client.ready().await?.call(api_request()?).await?;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        skips.push(
            response
                .extensions()
                .get::<RecoveryReport>()
                .and_then(|r| r.skipped().copied()),
        );
    }
    assert_eq!(
        skips,
        [
            Some(Skip::RefreshFailed),
            Some(Skip::RefreshFailed),
            Some(Skip::BudgetExhausted)
        ]
    );
    // The third stale request made no token request.
    assert_eq!(server.received().len(), 2);
    Ok(())
}
