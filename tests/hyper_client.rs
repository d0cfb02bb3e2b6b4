//! The layer over a hyper-util client, against the mock xAI server over real TCP, refreshing
//! through `OAuth2Refresher` over a second hyper-util client.
#![cfg(feature = "mock")]

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use xai_oauth_recovery::body::{RequestBody, ResponseBody};
use xai_oauth_recovery::mock::{fnv1a_64, Account, MockXai};
use xai_oauth_recovery::{
    Credentials, OAuth2Refresher, RecoveryReport, Skip, StaleReason, Verdict, XaiOAuthRecovery,
    XaiOAuthRecoveryLayer,
};

/// The API client: the layer hands it `RequestBody<Full<Bytes>>`.
type Api = Client<HttpConnector, RequestBody<Full<Bytes>>>;
/// The refresher's client sends plain forms.
type TokenHttp = Client<HttpConnector, Full<Bytes>>;
type Refresher = OAuth2Refresher<TokenHttp, Full<Bytes>>;

const CHAT: &[u8] = br#"{"model":"grok-4","messages":[{"role":"user","content":"Say hi."}]}"#;

fn layer(xai: &MockXai, credentials: &Credentials) -> XaiOAuthRecoveryLayer<Refresher> {
    let token_http: TokenHttp = Client::builder(TokioExecutor::new()).build_http();
    let refresher = OAuth2Refresher::new(token_http, xai.token_endpoint(), "test-client")
        .allow_insecure_loopback();
    XaiOAuthRecoveryLayer::new(credentials.clone(), refresher)
}

fn client(layer: XaiOAuthRecoveryLayer<Refresher>) -> XaiOAuthRecovery<Api, Refresher> {
    let api: Api = Client::builder(TokioExecutor::new()).build_http();
    ServiceBuilder::new().layer(layer).service(api)
}

fn chat(xai: &MockXai, body: &'static [u8]) -> Result<Request<Full<Bytes>>, http::Error> {
    Request::post(xai.chat_completions_uri())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body)))
}

struct Reply {
    status: StatusCode,
    report: Option<RecoveryReport>,
    read_bytes: Option<String>,
    read_fnv1a: Option<String>,
    body: Bytes,
}

async fn send(
    client: &mut XaiOAuthRecovery<Api, Refresher>,
    request: Request<Full<Bytes>>,
) -> Result<Reply, BoxError> {
    let response: Response<ResponseBody<_>> = client.ready().await?.call(request).await?;
    let header = |name: &str| {
        let value = response.headers().get(name);
        value.and_then(|v| v.to_str().ok()).map(str::to_owned)
    };
    let (read_bytes, read_fnv1a) = (
        header("x-mock-request-bytes"),
        header("x-mock-request-fnv1a"),
    );
    Ok(Reply {
        status: response.status(),
        report: response.extensions().get::<RecoveryReport>().cloned(),
        read_bytes,
        read_fnv1a,
        body: response.into_body().collect().await?.to_bytes(),
    })
}

#[tokio::test]
async fn a_stale_token_is_refreshed_through_oauth2_and_the_request_retried() -> Result<(), BoxError>
{
    let xai = MockXai::start().await?;
    let signed_in = xai.sign_in("alice", Account::Subscribed);
    let credentials = Credentials::new(signed_in.clone());
    let mut updates = credentials.subscribe();
    let mut client = client(layer(&xai, &credentials));
    xai.expire_access_tokens();

    let reply = send(&mut client, chat(&xai, CHAT)?).await?;

    assert_eq!(reply.status, StatusCode::OK);
    let report = reply.report.ok_or("no report")?;
    assert!(report.retried() && report.refreshed(), "{report:?}");
    assert_eq!(
        report.verdict(),
        &Verdict::StaleToken(StaleReason::Wke("bad-credentials".into()))
    );
    // The retried request carried the same body, byte for byte.
    assert_eq!(reply.read_bytes, Some(CHAT.len().to_string()));
    assert_eq!(reply.read_fnv1a, Some(format!("{:016x}", fnv1a_64(CHAT))));
    let answer: serde_json::Value = serde_json::from_slice(&reply.body)?;
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["mock"]["request_bytes"], CHAT.len());

    // The rotation, as an application that persists credentials observes it.
    let rotated = updates.try_recv().ok_or("no credential published")?;
    assert_eq!(rotated.id(), "alice");
    assert_ne!(rotated.access_token(), signed_in.access_token());
    assert_ne!(rotated.refresh_token(), signed_in.refresh_token());
    assert!(rotated.refresh_token().is_some());
    assert_eq!(credentials.default_credential(), rotated);
    assert!(updates.try_recv().is_none());
    // The token endpoint got the signed-in refresh token, for the test's client id.
    let form = xai.last_token_form().ok_or("no token request")?;
    let field = |name: &str| {
        let found = form.iter().find(|(key, _)| key == name);
        found.map(|(_, value)| value.clone())
    };
    assert_eq!(field("grant_type").as_deref(), Some("refresh_token"));
    assert_eq!(field("client_id").as_deref(), Some("test-client"));
    assert_eq!(
        field("refresh_token").as_deref(),
        signed_in.refresh_token().map(|t| t.secret())
    );

    // The next request goes out with the rotated token: no 403, no refresh.
    let reply = send(&mut client, chat(&xai, CHAT)?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.report.is_none());

    let stats = xai.stats();
    assert_eq!((stats.token_requests, stats.refreshes_ok), (1, 1));
    assert_eq!((stats.stale_403, stats.inference_ok), (1, 2));
    Ok(())
}

#[tokio::test]
async fn a_revoked_refresh_token_marks_the_credential_dead_after_one_token_request(
) -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    let mut updates = credentials.subscribe();
    let mut client = client(layer(&xai, &credentials));
    xai.expire_access_tokens();
    xai.revoke_refresh_tokens();

    for _ in 0..3 {
        let reply = send(&mut client, chat(&xai, CHAT)?).await?;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
        let report = reply.report.ok_or("no report")?;
        assert_eq!(report.skipped(), Some(&Skip::CredentialDead));
        assert!(!report.retried());
        assert_eq!(
            report.to_string(),
            "sign in again: the refresh token of credential `alice` was revoked or rejected"
        );
        // The original 403, whole.
        let body = String::from_utf8_lossy(&reply.body).into_owned();
        assert!(
            body.contains("[WKE=unauthenticated:bad-credentials]"),
            "{body}"
        );
    }

    let stats = xai.stats();
    assert_eq!((stats.token_requests, stats.invalid_grant), (1, 1));
    assert_eq!(stats.stale_403, 3);
    assert!(updates.try_recv().is_none());

    // Signing in again revives it.
    credentials.insert(xai.sign_in("alice", Account::Subscribed));
    let reply = send(&mut client, chat(&xai, CHAT)?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(xai.stats().token_requests, 1);
    Ok(())
}

#[tokio::test]
async fn a_body_over_the_replay_limit_is_not_retried_but_the_credential_is_refreshed(
) -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    let mut client = client(layer(&xai, &credentials).max_replay_body_bytes(16));
    xai.expire_access_tokens();

    let reply = send(&mut client, chat(&xai, CHAT)?).await?;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let report = reply.report.ok_or("no report")?;
    assert_eq!(report.skipped(), Some(&Skip::BodyNotReplayable));
    assert!(report.refreshed() && !report.retried());

    // Sent again by the caller, it goes out with the refreshed token.
    let reply = send(&mut client, chat(&xai, CHAT)?).await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.read_fnv1a, Some(format!("{:016x}", fnv1a_64(CHAT))));
    let stats = xai.stats();
    assert_eq!(
        (stats.token_requests, stats.stale_403, stats.inference_ok),
        (1, 1, 1)
    );
    Ok(())
}
