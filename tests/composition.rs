//! The layer in a real stack: tower-http's tracing and decompression, tower's generic retry and
//! timeout, over a hyper-util client.
//!
//! The order, outermost first: `TraceLayer`, the generic retry, this layer, the timeout,
//! `DecompressionLayer`, the client. Decompression sits below the layer so that the layer
//! classifies decompressed 401/403 bodies; the generic retry sits above it so that its retries
//! go through the layer (and its refresh budget) like any other request.
#![cfg(feature = "mock")]

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::retry::{Policy, Retry, RetryLayer};
use tower::timeout::{Timeout, TimeoutLayer};
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::compression::CompressionLayer;
use tower_http::decompression::{Decompression, DecompressionLayer};
use tower_http::trace::{Trace, TraceLayer};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::mock::{fnv1a_64, Account, MockXai};
use xai_oauth_recovery::{
    Credential, Credentials, OAuth2Refresher, RecoveryReport, RefreshBudget, RefreshRequest, Skip,
    TokenRefresher, Verdict, XaiOAuthRecovery, XaiOAuthRecoveryLayer,
};

const STALE_403: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#;
const CHAT: &[u8] = br#"{"model":"grok-4","messages":[{"role":"user","content":"Say hi."}]}"#;

type Api = Client<HttpConnector, RequestBody<Full<Bytes>>>;

fn api() -> Api {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A generic retry policy: retries errors and 5xx (and, if told to, 403s: the mistake of
/// treating every 403 as transient) up to `left` more times.
#[derive(Clone, Debug)]
struct RetryPolicy {
    left: usize,
    retry_forbidden: bool,
}

impl RetryPolicy {
    fn server_errors(left: usize) -> Self {
        Self {
            left,
            retry_forbidden: false,
        }
    }

    fn server_errors_and_forbidden(left: usize) -> Self {
        Self {
            left,
            retry_forbidden: true,
        }
    }
}

impl<B: Clone, ResB, E> Policy<Request<B>, Response<ResB>, E> for RetryPolicy {
    type Future = Ready<()>;

    fn retry(
        &mut self,
        _request: &mut Request<B>,
        result: &mut Result<Response<ResB>, E>,
    ) -> Option<Self::Future> {
        let again = match result {
            Ok(response) => {
                response.status().is_server_error()
                    || (self.retry_forbidden && response.status() == StatusCode::FORBIDDEN)
            }
            Err(_) => true,
        };
        if again && self.left > 0 {
            self.left -= 1;
            Some(ready(()))
        } else {
            None
        }
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        Some(request.clone())
    }
}

/// The whole stack, in the documented order, outermost first.
type Stack<R> = Trace<
    Retry<RetryPolicy, XaiOAuthRecovery<Timeout<Decompression<Api>>, R>>,
    SharedClassifier<ServerErrorsAsFailures>,
>;

fn stack<R>(layer: XaiOAuthRecoveryLayer<R>, policy: RetryPolicy) -> Stack<R>
where
    R: TokenRefresher,
{
    ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(RetryLayer::new(policy))
        .layer(layer)
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .layer(DecompressionLayer::new())
        .service(api())
}

/// A refresher that counts its calls and hands out `token-<n>`.
#[derive(Clone, Default)]
struct Counting {
    calls: Arc<AtomicUsize>,
}

impl Counting {
    fn refresher(&self) -> impl TokenRefresher + Sync {
        let calls = self.calls.clone();
        service_fn(move |request: RefreshRequest| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 2;
            async move { Ok::<_, BoxError>(Credential::new(request.stale().id(), format!("token-{n}"))) }
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A server on 127.0.0.1 that gzips what it can, like an API behind a compressing proxy:
/// `Bearer token-2` gets a 200 that echoes the body's checksum, anything else the stale 403.
async fn gzip_server() -> Result<Uri, BoxError> {
    async fn answer(
        request: Request<hyper::body::Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let fresh = request
            .headers()
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            == Some(&b"Bearer token-2"[..]);
        let body = match request.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let (status, answer) = if fresh {
            let answer = format!(
                r#"{{"ok":true,"request_fnv1a":"{:016x}"}}"#,
                fnv1a_64(&body)
            );
            (StatusCode::OK, Bytes::from(answer))
        } else {
            (
                StatusCode::FORBIDDEN,
                Bytes::from_static(STALE_403.as_bytes()),
            )
        };
        let mut response = Response::new(Full::new(answer));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(response)
    }

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr: SocketAddr = listener.local_addr()?;
    let service = ServiceBuilder::new()
        .layer(CompressionLayer::new())
        .service(service_fn(answer));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| service.clone().oneshot(request));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(format!("http://{addr}/v1/chat/completions").parse()?)
}

fn post(uri: &Uri, body: &'static [u8]) -> Result<Request<Full<Bytes>>, http::Error> {
    Request::post(uri)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(body)))
}

fn report<B>(response: &Response<B>) -> Option<RecoveryReport> {
    response.extensions().get::<RecoveryReport>().cloned()
}

#[tokio::test]
async fn the_server_really_gzips_its_403() -> Result<(), BoxError> {
    let uri = gzip_server().await?;
    let plain: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = post(&uri, CHAT)?;
    request
        .headers_mut()
        .insert(ACCEPT_ENCODING, HeaderValue::from_static("gzip"));

    let response = plain.request(request).await?;

    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        response.headers().get(CONTENT_ENCODING),
        Some(&HeaderValue::from_static("gzip"))
    );
    let body = response.into_body().collect().await?.to_bytes();
    assert!(body.starts_with(&[0x1f, 0x8b]), "not gzip: {body:?}");
    Ok(())
}

#[tokio::test]
async fn a_gzipped_stale_403_is_recognised_and_recovered_below_decompression(
) -> Result<(), BoxError> {
    let uri = gzip_server().await?;
    let counting = Counting::default();
    let credentials = Credentials::new(Credential::new("default", "token-1"));
    let layer = XaiOAuthRecoveryLayer::new(credentials.clone(), counting.refresher());
    let mut client = stack(layer, RetryPolicy::server_errors(2));

    let response = client.ready().await?.call(post(&uri, CHAT)?).await?;

    assert_eq!(response.status(), StatusCode::OK);
    let report = report(&response).ok_or("no report")?;
    assert!(report.retried() && report.refreshed(), "{report:?}");
    assert!(matches!(report.verdict(), Verdict::StaleToken(_)));
    assert_eq!(counting.calls(), 1);
    let body = response.into_body().collect().await?.to_bytes();
    let expected = format!(r#"{{"ok":true,"request_fnv1a":"{:016x}"}}"#, fnv1a_64(CHAT));
    assert_eq!(body, expected.as_bytes());
    Ok(())
}

#[tokio::test]
async fn above_decompression_the_layer_cannot_read_a_gzipped_403() -> Result<(), BoxError> {
    let uri = gzip_server().await?;
    let counting = Counting::default();
    let credentials = Credentials::new(Credential::new("default", "token-1"));
    // The wrong order: decompression outside the layer.
    let mut client = ServiceBuilder::new()
        .layer(DecompressionLayer::new())
        .layer(XaiOAuthRecoveryLayer::new(
            credentials,
            counting.refresher(),
        ))
        .service(api());

    let response = client.ready().await?.call(post(&uri, CHAT)?).await?;

    // The caller gets the stale 403, decompressed, but nothing was recovered.
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let report = report(&response).ok_or("no report")?;
    assert_eq!(report.verdict(), &Verdict::Unrecognized);
    assert_eq!(report.skipped(), Some(&Skip::Unrecognized));
    assert_eq!(counting.calls(), 0);
    let body = response.into_body().collect().await?.to_bytes();
    assert_eq!(body, STALE_403.as_bytes());
    Ok(())
}

#[tokio::test]
async fn a_generic_retry_outside_does_not_multiply_refreshes() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    let token_http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let refresher = OAuth2Refresher::new(token_http, xai.token_endpoint(), "test-client")
        .allow_insecure_loopback();
    let budget = RefreshBudget::new(3, Duration::from_secs(300));
    let layer = XaiOAuthRecoveryLayer::new(credentials, refresher).refresh_budget(budget);
    // The worst case: a policy that retries every 403, and refreshed tokens that stay stale.
    let mut client = stack(layer, RetryPolicy::server_errors_and_forbidden(3));
    xai.expire_access_tokens();
    xai.set_refresh_issues_stale_tokens(true);

    const REQUESTS: u64 = 5;
    for _ in 0..REQUESTS {
        let response = client
            .ready()
            .await?
            .call(post(&xai.chat_completions_uri(), CHAT)?)
            .await?;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        // The generic retry's last attempt found the budget spent.
        let report = report(&response).ok_or("no report")?;
        assert_eq!(report.skipped(), Some(&Skip::BudgetExhausted));
        response.into_body().collect().await?;
    }

    let stats = xai.stats();
    // 5 requests x 4 attempts, each of which would have refreshed without a budget: 3 refreshes.
    assert_eq!((stats.token_requests, stats.refreshes_ok), (3, 3));
    // Every attempt reached the server once, plus the layer's own retry after each refresh.
    assert_eq!(stats.inference_requests, REQUESTS * 4 + 3);
    assert_eq!(stats.stale_403, stats.inference_requests);
    Ok(())
}

#[tokio::test]
async fn the_stack_serves_plain_requests_and_concurrent_stale_ones() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    let token_http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let refresher = OAuth2Refresher::new(token_http, xai.token_endpoint(), "test-client")
        .allow_insecure_loopback();
    let client = stack(
        XaiOAuthRecoveryLayer::new(credentials, refresher),
        RetryPolicy::server_errors(2),
    );

    let response = client
        .clone()
        .oneshot(post(&xai.chat_completions_uri(), CHAT)?)
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(report(&response).is_none());
    response.into_body().collect().await?;

    xai.expire_access_tokens();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let client = client.clone();
        let request = post(&xai.chat_completions_uri(), CHAT)?;
        requests.spawn(async move {
            let response = client.oneshot(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, BoxError>(status)
        });
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status??, StatusCode::OK);
    }
    let stats = xai.stats();
    assert_eq!(stats.token_requests, 1);
    assert_eq!(stats.inference_ok, 21);
    Ok(())
}
