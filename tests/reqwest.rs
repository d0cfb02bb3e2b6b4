//! The reqwest-middleware integration: a real `reqwest::Client` against the mock xAI server.
#![cfg(all(feature = "reqwest", feature = "mock"))]

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Extensions, StatusCode};
use http_body::Frame;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware, Middleware, Next};
use tower::BoxError;
use xai_oauth_recovery::mock::{fnv1a_64, Account, MockXai};
use xai_oauth_recovery::reqwest::XaiOAuthRecoveryMiddleware;
use xai_oauth_recovery::{
    CredentialError, CredentialId, Credentials, OAuth2Refresher, RecoveryReport, Skip, StaleReason,
    TokenRefresher, Verdict,
};

const CHAT: &str = r#"{"model":"grok-4","messages":[{"role":"user","content":"Say hi."}]}"#;

fn http() -> reqwest::Client {
    // Loopback only: no proxy from the environment.
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_else(|error| panic!("reqwest client: {error}"))
}

/// `OAuth2Refresher` over the same reqwest client, through a `tower::service_fn`.
fn refresher(xai: &MockXai, client: reqwest::Client) -> impl TokenRefresher + Sync {
    let token_http = tower::service_fn(move |request: http::Request<Bytes>| {
        let client = client.clone();
        async move {
            let response = client.execute(reqwest::Request::try_from(request)?).await?;
            Ok::<_, reqwest::Error>(http::Response::<reqwest::Body>::from(response))
        }
    });
    OAuth2Refresher::new(token_http, xai.token_endpoint(), "test-client").allow_insecure_loopback()
}

fn client(xai: &MockXai, credentials: &Credentials) -> ClientWithMiddleware {
    let middleware = XaiOAuthRecoveryMiddleware::new(credentials.clone(), refresher(xai, http()));
    ClientBuilder::new(http()).with(middleware).build()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

fn report(response: &reqwest::Response) -> Result<RecoveryReport, BoxError> {
    response
        .extensions()
        .get::<RecoveryReport>()
        .cloned()
        .ok_or_else(|| "no RecoveryReport in the response".into())
}

fn checksum(body: &[u8]) -> String {
    format!("{:016x}", fnv1a_64(body))
}

#[tokio::test]
async fn a_stale_token_is_refreshed_once_and_the_post_retried_with_its_body() -> Result<(), BoxError>
{
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    let before = credentials.default_credential();
    xai.expire_access_tokens();

    let response = client(&xai, &credentials)
        .post(xai.chat_completions_uri().to_string())
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await?;

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.url().as_str(),
        xai.chat_completions_uri().to_string()
    );
    let stats = xai.stats();
    assert_eq!((stats.refreshes_ok, stats.token_requests), (1, 1));
    assert_eq!((stats.stale_403, stats.inference_ok), (1, 1));
    assert_eq!(
        header(&response, "x-mock-request-bytes"),
        Some(CHAT.len().to_string().as_str())
    );
    assert_eq!(
        header(&response, "x-mock-request-fnv1a"),
        Some(checksum(CHAT.as_bytes()).as_str())
    );
    let report = report(&response)?;
    assert!(report.retried() && report.refreshed(), "{report:?}");
    assert_eq!(report.skipped(), None);
    assert_eq!(
        report.verdict(),
        &Verdict::StaleToken(StaleReason::Wke("bad-credentials".into()))
    );
    assert_eq!(report.credential_id(), "alice");
    let body = response.bytes().await?;
    assert!(body.starts_with(b"{"), "{body:?}");
    let after = credentials.default_credential();
    assert_ne!(after.access_token(), before.access_token());
    assert_ne!(after.refresh_token(), before.refresh_token());
    Ok(())
}

#[tokio::test]
async fn an_entitlement_403_comes_back_byte_for_byte_without_a_refresh() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credential = xai.sign_in("alice", Account::NoSubscription);
    let credentials = Credentials::new(credential.clone());

    // What the server says to a plain client, for comparison.
    let plain = http()
        .post(xai.chat_completions_uri().to_string())
        .bearer_auth(credential.access_token().secret())
        .body(CHAT)
        .send()
        .await?;
    assert_eq!(plain.status(), StatusCode::FORBIDDEN);
    let expected = plain.bytes().await?;

    let response = client(&xai, &credentials)
        .post(xai.chat_completions_uri().to_string())
        .body(CHAT)
        .send()
        .await?;

    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let report = report(&response)?;
    assert_eq!(report.verdict(), &Verdict::Entitlement);
    assert_eq!(report.skipped(), Some(&Skip::Entitlement));
    assert!(!report.retried() && !report.refreshed());
    assert!(report
        .to_string()
        .contains("no active Grok subscription: refreshing cannot help"));
    assert_eq!(response.bytes().await?, expected);
    let stats = xai.stats();
    assert_eq!(stats.token_requests, 0);
    assert_eq!(stats.entitlement_403, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_stale_requests_cost_one_refresh() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    xai.expire_access_tokens();
    let client = client(&xai, &credentials);

    let mut requests = tokio::task::JoinSet::new();
    for i in 0..50 {
        let request = client
            .post(xai.chat_completions_uri().to_string())
            .body(format!(r#"{{"model":"grok-4","n":{i}}}"#));
        requests.spawn(async move {
            let response = request.send().await?;
            let status = response.status();
            let retried = response
                .extensions()
                .get::<RecoveryReport>()
                .is_some_and(RecoveryReport::retried);
            Ok::<_, reqwest_middleware::Error>((status, retried))
        });
    }
    let mut retried = 0;
    while let Some(joined) = requests.join_next().await {
        let (status, was_retried) = joined??;
        assert_eq!(status, StatusCode::OK);
        retried += usize::from(was_retried);
    }

    let stats = xai.stats();
    assert_eq!((stats.token_requests, stats.refreshes_ok), (1, 1));
    assert_eq!(stats.inference_ok, 50);
    // Every request that met the stale token was retried; none was retried twice.
    assert_eq!(stats.stale_403, retried as u64);
    assert_eq!(stats.inference_requests, 50 + stats.stale_403);
    Ok(())
}

/// A streaming request body: chunks arrive through a channel while the request is in flight.
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
    }
}

fn streaming_body(chunks: &[&'static str]) -> reqwest::Body {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let chunks: Vec<Bytes> = chunks
        .iter()
        .map(|c| Bytes::from_static(c.as_bytes()))
        .collect();
    tokio::spawn(async move {
        for chunk in chunks {
            if tx.send(chunk).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    });
    reqwest::Body::wrap(ChannelBody { rx })
}

#[tokio::test]
async fn a_streaming_body_is_recorded_while_it_streams_and_replayed() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    xai.expire_access_tokens();
    let chunks = [
        r#"{"model":"grok-4","#,
        r#""messages":[{"role":"user","#,
        r#""content":"streamed"#,
        r#" in four chunks"}]}"#,
    ];
    let whole = chunks.concat();

    // reqwest itself cannot clone a request with a streaming body.
    let request = http()
        .post(xai.chat_completions_uri().to_string())
        .body(streaming_body(&chunks))
        .build()?;
    assert!(request.try_clone().is_none());

    let response = client(&xai, &credentials)
        .post(xai.chat_completions_uri().to_string())
        .body(streaming_body(&chunks))
        .send()
        .await?;

    assert_eq!(response.status(), StatusCode::OK);
    assert!(report(&response)?.retried());
    assert_eq!(
        header(&response, "x-mock-request-bytes"),
        Some(whole.len().to_string().as_str())
    );
    assert_eq!(
        header(&response, "x-mock-request-fnv1a"),
        Some(checksum(whole.as_bytes()).as_str())
    );
    let stats = xai.stats();
    assert_eq!(
        (stats.refreshes_ok, stats.stale_403, stats.inference_ok),
        (1, 1, 1)
    );
    Ok(())
}

/// Records, for every request that reaches it, whether reqwest could clone it.
#[derive(Clone, Default)]
struct ObserveClonable {
    seen: Arc<Mutex<Vec<bool>>>,
}

#[async_trait::async_trait]
impl Middleware for ObserveClonable {
    async fn handle(
        &self,
        request: reqwest::Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        let clonable = request.try_clone().is_some();
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(clonable);
        next.run(request, extensions).await
    }
}

#[tokio::test]
async fn a_body_held_in_memory_stays_clonable_for_the_middleware_after_it() -> Result<(), BoxError>
{
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    xai.expire_access_tokens();
    let observe = ObserveClonable::default();
    let client = ClientBuilder::new(http())
        .with(XaiOAuthRecoveryMiddleware::new(
            credentials.clone(),
            refresher(&xai, http()),
        ))
        .with(observe.clone())
        .build();

    let response = client
        .post(xai.chat_completions_uri().to_string())
        .body(CHAT)
        .send()
        .await?;

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "x-mock-request-fnv1a"),
        Some(checksum(CHAT.as_bytes()).as_str())
    );
    // The first attempt and the retry.
    assert_eq!(
        *observe.seen.lock().unwrap_or_else(|e| e.into_inner()),
        [true, true]
    );
    Ok(())
}

#[tokio::test]
async fn the_credential_is_named_in_either_extensions() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    credentials.insert(xai.sign_in("bob", Account::Subscribed));
    credentials.insert(xai.sign_in("carol", Account::Subscribed));
    let client = client(&xai, &credentials);

    // reqwest-middleware's extensions.
    let response = client
        .post(xai.chat_completions_uri().to_string())
        .with_extension(CredentialId::new("bob"))
        .body(CHAT)
        .send()
        .await?;
    assert_eq!(header(&response, "x-mock-credential-id"), Some("bob"));

    // The request's own extensions, from an `http::Request`; they win.
    let mut request = http::Request::post(xai.chat_completions_uri().to_string()).body(CHAT)?;
    request.extensions_mut().insert(CredentialId::new("carol"));
    let mut extensions = Extensions::new();
    extensions.insert(CredentialId::new("bob"));
    let response = client
        .execute_with_extensions(reqwest::Request::try_from(request)?, &mut extensions)
        .await?;
    assert_eq!(header(&response, "x-mock-credential-id"), Some("carol"));

    // Neither: the default credential.
    let response = client
        .post(xai.chat_completions_uri().to_string())
        .body(CHAT)
        .send()
        .await?;
    assert_eq!(header(&response, "x-mock-credential-id"), Some("alice"));
    Ok(())
}

#[tokio::test]
async fn a_named_stale_credential_is_refreshed_alone() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    xai.expire_access_tokens();
    credentials.insert(xai.sign_in("bob", Account::Subscribed));
    let alice = credentials.default_credential();

    // Bob's token is fresh, Alice's is stale.
    let response = client(&xai, &credentials)
        .post(xai.chat_completions_uri().to_string())
        .with_extension(CredentialId::new("bob"))
        .body(CHAT)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.extensions().get::<RecoveryReport>().is_none());
    assert_eq!(xai.stats().token_requests, 0);
    assert_eq!(credentials.default_credential(), alice);
    Ok(())
}

#[tokio::test]
async fn an_unknown_credential_is_a_middleware_error() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));

    let result = client(&xai, &credentials)
        .post(xai.chat_completions_uri().to_string())
        .with_extension(CredentialId::new("nobody"))
        .body(CHAT)
        .send()
        .await;

    match result {
        Err(reqwest_middleware::Error::Middleware(error)) => {
            let error = error.downcast_ref::<CredentialError>();
            assert!(error.is_some_and(CredentialError::is_unknown_credential));
        }
        other => panic!("expected a middleware error, got {other:?}"),
    }
    assert_eq!(xai.stats().inference_requests, 0);
    Ok(())
}

#[tokio::test]
async fn a_connection_error_stays_a_reqwest_error() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    // A port nobody listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;

    let result = client(&xai, &credentials)
        .post(format!("http://{closed}/v1/chat/completions"))
        .body(CHAT)
        .send()
        .await;

    match result {
        Err(reqwest_middleware::Error::Reqwest(error)) => assert!(error.is_connect(), "{error}"),
        other => panic!("expected a reqwest error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_revoked_refresh_token_hands_back_the_403_with_a_report() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    xai.expire_access_tokens();
    xai.revoke_refresh_tokens();
    let client = client(&xai, &credentials);

    for _ in 0..2 {
        let response = client
            .post(xai.chat_completions_uri().to_string())
            .body(CHAT)
            .send()
            .await?;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let report = report(&response)?;
        assert_eq!(report.skipped(), Some(&Skip::CredentialDead));
        assert!(report.to_string().starts_with("sign in again"));
        let body = response.text().await?;
        assert!(
            body.contains("[WKE=unauthenticated:bad-credentials]"),
            "{body}"
        );
    }
    let stats = xai.stats();
    assert_eq!((stats.token_requests, stats.invalid_grant), (1, 1));
    Ok(())
}
