//! The mock xAI server, driven over real TCP.
#![cfg(feature = "mock")]

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tower::BoxError;
use xai_oauth_recovery::mock::{fnv1a_64, Account, MockXai};
use xai_oauth_recovery::Credential;

const STALE: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"The OAuth2 access token could not be validated. [WKE=unauthenticated:bad-credentials]"}"#;
const ENTITLEMENT: &str = r#"{"code":"The caller does not have permission to execute the specified operation","error":"You have either run out of available resources or do not have an active Grok subscription. Manage subscriptions at https://grok.com"}"#;
const BILLING: &str = r#"{"code":"personal-team-blocked:spending-limit","error":"You have run out of credits or need a Grok subscription..."}"#;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Result<Value, BoxError> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("<not utf-8>")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Result<Reply, BoxError> {
    let response = client.request(req).await?;
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

async fn chat(
    client: &HttpClient,
    xai: &MockXai,
    token: Option<&str>,
    body: &'static [u8],
) -> Result<Reply, BoxError> {
    let mut req =
        Request::post(xai.chat_completions_uri()).header("content-type", "application/json");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    send(client, req.body(Full::new(Bytes::from_static(body)))?).await
}

async fn refresh(
    client: &HttpClient,
    xai: &MockXai,
    fields: &[(&str, &str)],
) -> Result<Reply, BoxError> {
    let form = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    let req = Request::post(xai.token_endpoint())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from(form)))?;
    send(client, req).await
}

async fn refresh_token(
    client: &HttpClient,
    xai: &MockXai,
    refresh_token: &str,
) -> Result<Reply, BoxError> {
    refresh(
        client,
        xai,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", "test-client"),
            ("refresh_token", refresh_token),
        ],
    )
    .await
}

fn secrets(credential: &Credential) -> (String, String) {
    (
        credential.access_token().secret().to_owned(),
        credential
            .refresh_token()
            .map(|t| t.secret().to_owned())
            .unwrap_or_default(),
    )
}

fn error_code(reply: &Reply) -> Result<String, BoxError> {
    Ok(reply.json()?["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test]
async fn signed_in_requests_succeed_and_echo_the_body() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let alice = xai.sign_in("alice", Account::Subscribed);
    assert_eq!(alice.id(), "alice");
    assert!(alice.expires_at().is_some());
    let (access, refresh) = secrets(&alice);
    assert!(access.starts_with("mock-at-"), "{access}");
    assert!(refresh.starts_with("mock-rt-"), "{refresh}");

    let body: &'static [u8] = br#"{"model":"grok-4","messages":[{"role":"user","content":"hi"}]}"#;
    let reply = chat(&client, &xai, Some(&access), body).await?;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let checksum = format!("{:016x}", fnv1a_64(body));
    assert_eq!(
        reply.header("x-mock-request-bytes"),
        Some(&*body.len().to_string())
    );
    assert_eq!(reply.header("x-mock-request-fnv1a"), Some(&*checksum));
    assert_eq!(reply.header("x-mock-credential-id"), Some("alice"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let json = reply.json()?;
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["model"], "grok-4");
    assert_eq!(json["mock"]["request_bytes"], body.len());
    assert_eq!(json["mock"]["request_fnv1a"], checksum);
    assert_eq!(json["mock"]["credential_id"], "alice");
    assert!(json["choices"][0]["message"]["content"].is_string());

    // Any path under /v1/ is the inference API.
    let req = Request::get(format!("{}/v1/models", xai.base_url()))
        .header("authorization", format!("Bearer {access}"))
        .body(Full::new(Bytes::new()))?;
    let reply = send(&client, req).await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-mock-request-bytes"), Some("0"));
    Ok(())
}

#[tokio::test]
async fn large_bodies_arrive_whole() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let (access, _) = secrets(&xai.sign_in("alice", Account::Subscribed));
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let checksum = format!("{:016x}", fnv1a_64(&body));
    let req = Request::post(xai.chat_completions_uri())
        .header("authorization", format!("Bearer {access}"))
        .body(Full::new(Bytes::from(body)))?;
    let reply = send(&client(), req).await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-mock-request-bytes"), Some("3000000"));
    assert_eq!(reply.header("x-mock-request-fnv1a"), Some(&*checksum));
    assert_eq!(reply.json()?["model"], "grok-mock");
    Ok(())
}

#[tokio::test]
async fn expired_tokens_get_the_stale_403() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let (access, _) = secrets(&xai.sign_in("alice", Account::Subscribed));
    xai.expire_access_tokens();
    let reply = chat(&client, &xai, Some(&access), b"{}").await?;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.text(), STALE);

    // Unknown tokens get the same answer; a new sign-in works.
    let reply = chat(&client, &xai, Some("mock-at-999-0000000000000000"), b"{}").await?;
    assert_eq!((reply.status, reply.text()), (StatusCode::FORBIDDEN, STALE));
    let (fresh, _) = secrets(&xai.sign_in("alice", Account::Subscribed));
    let reply = chat(&client, &xai, Some(&fresh), b"{}").await?;
    assert_eq!(reply.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn tokens_expire_after_their_ttl() -> Result<(), BoxError> {
    let xai = MockXai::builder()
        .access_token_ttl(Duration::from_millis(50))
        .start()
        .await?;
    let client = client();
    let (access, _) = secrets(&xai.sign_in("alice", Account::Subscribed));
    let reply = chat(&client, &xai, Some(&access), b"{}").await?;
    assert_eq!(reply.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(80)).await;
    let reply = chat(&client, &xai, Some(&access), b"{}").await?;
    assert_eq!((reply.status, reply.text()), (StatusCode::FORBIDDEN, STALE));
    Ok(())
}

#[tokio::test]
async fn accounts_without_subscription_or_credits_get_their_403s() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let (none, _) = secrets(&xai.sign_in("none", Account::NoSubscription));
    let reply = chat(&client, &xai, Some(&none), b"{}").await?;
    assert_eq!(
        (reply.status, reply.text()),
        (StatusCode::FORBIDDEN, ENTITLEMENT)
    );

    let (broke, _) = secrets(&xai.sign_in("broke", Account::OutOfCredits));
    let reply = chat(&client, &xai, Some(&broke), b"{}").await?;
    assert_eq!(
        (reply.status, reply.text()),
        (StatusCode::FORBIDDEN, BILLING)
    );

    // A subscription that lapses, then comes back.
    let (alice, _) = secrets(&xai.sign_in("alice", Account::Subscribed));
    xai.set_account("alice", Account::NoSubscription);
    let reply = chat(&client, &xai, Some(&alice), b"{}").await?;
    assert_eq!(reply.text(), ENTITLEMENT);
    xai.set_account("alice", Account::Subscribed);
    let reply = chat(&client, &xai, Some(&alice), b"{}").await?;
    assert_eq!(reply.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn requests_without_a_bearer_token_get_401() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let reply = chat(&client, &xai, None, b"{}").await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    assert!(reply.json()?["error"].is_string());
    assert!(reply
        .text()
        .contains("[WKE=unauthenticated:no-credentials]"));
    Ok(())
}

#[tokio::test]
async fn refresh_rotates_and_spends_the_old_refresh_token() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let (old_access, old_refresh) = secrets(&xai.sign_in("alice", Account::OutOfCredits));

    let reply = refresh_token(&client, &xai, &old_refresh).await?;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("cache-control"), Some("no-store"));
    let json = reply.json()?;
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["expires_in"], 3600);
    let new_access = json["access_token"].as_str().unwrap_or_default().to_owned();
    let new_refresh = json["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(new_access.starts_with("mock-at-") && new_access != old_access);
    assert!(new_refresh.starts_with("mock-rt-") && new_refresh != old_refresh);

    assert_eq!(
        xai.last_token_form(),
        Some(vec![
            ("grant_type".to_owned(), "refresh_token".to_owned()),
            ("client_id".to_owned(), "test-client".to_owned()),
            ("refresh_token".to_owned(), old_refresh.clone()),
        ])
    );

    // The new access token belongs to the same account.
    let reply = chat(&client, &xai, Some(&new_access), b"{}").await?;
    assert_eq!(reply.text(), BILLING);

    // The old refresh token is spent; the new one works once.
    let reply = refresh_token(&client, &xai, &old_refresh).await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&reply)?, "invalid_grant");
    assert!(reply.json()?["error_description"].is_string());
    let reply = refresh_token(&client, &xai, &new_refresh).await?;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = refresh_token(&client, &xai, &new_refresh).await?;
    assert_eq!(error_code(&reply)?, "invalid_grant");
    Ok(())
}

#[tokio::test]
async fn without_rotation_the_refresh_token_is_reusable() -> Result<(), BoxError> {
    let xai = MockXai::builder()
        .rotate_refresh_tokens(false)
        .access_token_ttl(Duration::from_secs(900))
        .start()
        .await?;
    let client = client();
    let (_, refresh) = secrets(&xai.sign_in("alice", Account::Subscribed));
    for _ in 0..2 {
        let reply = refresh_token(&client, &xai, &refresh).await?;
        assert_eq!(reply.status, StatusCode::OK);
        let json = reply.json()?;
        assert!(json.get("refresh_token").is_none(), "{json}");
        assert_eq!(json["expires_in"], 900);
    }
    Ok(())
}

#[tokio::test]
async fn revoked_refresh_tokens_get_invalid_grant() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let (_, refresh) = secrets(&xai.sign_in("alice", Account::Subscribed));
    xai.revoke_refresh_tokens();
    let reply = refresh_token(&client, &xai, &refresh).await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&reply)?, "invalid_grant");
    let reply = refresh_token(&client, &xai, "mock-rt-1-unknown").await?;
    assert_eq!(error_code(&reply)?, "invalid_grant");
    let stats = xai.stats();
    assert_eq!((stats.invalid_grant, stats.refresh_failures), (2, 2));
    Ok(())
}

#[tokio::test]
async fn malformed_token_requests_get_rfc_6749_errors() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let (_, rt) = secrets(&xai.sign_in("alice", Account::Subscribed));
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[
                ("grant_type", "authorization_code"),
                ("client_id", "c"),
                ("code", "x"),
            ],
            "unsupported_grant_type",
        ),
        (
            &[("grant_type", "refresh_token"), ("refresh_token", &rt)],
            "invalid_request",
        ),
        (
            &[("grant_type", "refresh_token"), ("client_id", "c")],
            "invalid_request",
        ),
        (
            &[("client_id", "c"), ("refresh_token", &rt)],
            "invalid_request",
        ),
    ];
    for (fields, expected) in cases {
        let reply = refresh(&client, &xai, fields).await?;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{fields:?}");
        assert_eq!(error_code(&reply)?, expected, "{fields:?}");
    }
    // None of those spent the refresh token.
    let reply = refresh_token(&client, &xai, &rt).await?;
    assert_eq!(reply.status, StatusCode::OK);

    let req = Request::post(xai.token_endpoint())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            b"{\"grant_type\":\"refresh_token\"}",
        )))?;
    let reply = send(&client, req).await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&reply)?, "invalid_request");
    let req = Request::get(xai.token_endpoint()).body(Full::new(Bytes::new()))?;
    let reply = send(&client, req).await?;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    Ok(())
}

#[tokio::test]
async fn injected_token_failures() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let (_, rt) = secrets(&xai.sign_in("alice", Account::Subscribed));

    xai.fail_next_token_requests(2, StatusCode::BAD_GATEWAY);
    for _ in 0..2 {
        let reply = refresh_token(&client, &xai, &rt).await?;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
        assert_eq!(error_code(&reply)?, "server_error");
    }
    xai.fail_next_token_requests(1, StatusCode::UNAUTHORIZED);
    let reply = refresh_token(&client, &xai, &rt).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&reply)?, "invalid_client");

    xai.set_token_failure_rate(1.0);
    for _ in 0..3 {
        let reply = refresh_token(&client, &xai, &rt).await?;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error_code(&reply)?, "temporarily_unavailable");
    }
    xai.set_token_failure_rate(0.0);
    // Injected failures spent nothing.
    let reply = refresh_token(&client, &xai, &rt).await?;
    assert_eq!(reply.status, StatusCode::OK);

    let stats = xai.stats();
    assert_eq!(stats.token_requests, 7);
    assert_eq!(stats.injected_failures, 6);
    assert_eq!(stats.refresh_failures, 6);
    assert_eq!(stats.refreshes_ok, 1);
    Ok(())
}

#[tokio::test]
async fn random_failures_are_seeded() -> Result<(), BoxError> {
    async fn run(seed: u64) -> Result<Vec<StatusCode>, BoxError> {
        let xai = MockXai::builder()
            .seed(seed)
            .token_failure_rate(0.5)
            .start()
            .await?;
        let client = client();
        let mut statuses = Vec::new();
        for _ in 0..20 {
            statuses.push(refresh_token(&client, &xai, "unknown").await?.status);
        }
        Ok(statuses)
    }
    let (a, b) = (run(1).await?, run(1).await?);
    assert_eq!(a, b);
    assert!(a.contains(&StatusCode::SERVICE_UNAVAILABLE), "{a:?}");
    assert!(a.contains(&StatusCode::BAD_REQUEST), "{a:?}");
    Ok(())
}

#[tokio::test]
async fn refreshed_tokens_that_keep_failing() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let (_, rt) = secrets(&xai.sign_in("alice", Account::Subscribed));
    xai.set_refresh_issues_stale_tokens(true);
    let reply = refresh_token(&client, &xai, &rt).await?;
    assert_eq!(reply.status, StatusCode::OK);
    let access = reply.json()?["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let reply = chat(&client, &xai, Some(&access), b"{}").await?;
    assert_eq!((reply.status, reply.text()), (StatusCode::FORBIDDEN, STALE));
    Ok(())
}

#[tokio::test]
async fn latency_delays_answers() -> Result<(), BoxError> {
    let xai = MockXai::builder()
        .latency(Duration::from_millis(60), Duration::ZERO)
        .start()
        .await?;
    let client = client();
    let (access, rt) = secrets(&xai.sign_in("alice", Account::Subscribed));
    let started = tokio::time::Instant::now();
    chat(&client, &xai, Some(&access), b"{}").await?;
    assert!(started.elapsed() >= Duration::from_millis(60));
    xai.set_latency(Duration::ZERO, Duration::from_millis(60));
    let started = tokio::time::Instant::now();
    refresh_token(&client, &xai, &rt).await?;
    assert!(started.elapsed() >= Duration::from_millis(60));
    Ok(())
}

#[tokio::test]
async fn discovery_document() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let req = Request::get(xai.discovery_uri()).body(Full::new(Bytes::new()))?;
    let reply = send(&client(), req).await?;
    assert_eq!(reply.status, StatusCode::OK);
    let json = reply.json()?;
    assert_eq!(json["issuer"], xai.base_url());
    assert_eq!(json["token_endpoint"], xai.token_endpoint().to_string());
    let uri: Uri = json["token_endpoint"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    assert_eq!(uri.path(), "/oauth2/token");
    assert_eq!(
        xai.discovery_uri().path(),
        "/.well-known/openid-configuration"
    );
    assert!(xai.base_url().starts_with("http://127.0.0.1:"));
    Ok(())
}

#[tokio::test]
async fn stats_count_every_answer() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let (ok, rt) = secrets(&xai.sign_in("ok", Account::Subscribed));
    let (none, _) = secrets(&xai.sign_in("none", Account::NoSubscription));
    let (broke, _) = secrets(&xai.sign_in("broke", Account::OutOfCredits));
    chat(&client, &xai, Some(&ok), b"{}").await?;
    chat(&client, &xai, Some(&ok), b"{}").await?;
    chat(&client, &xai, Some(&none), b"{}").await?;
    chat(&client, &xai, Some(&broke), b"{}").await?;
    chat(&client, &xai, Some("nope"), b"{}").await?;
    chat(&client, &xai, None, b"{}").await?;
    refresh_token(&client, &xai, &rt).await?;
    refresh_token(&client, &xai, &rt).await?;
    let stats = xai.stats();
    assert_eq!(stats.inference_requests, 6);
    assert_eq!(stats.inference_ok, 2);
    assert_eq!(stats.entitlement_403, 1);
    assert_eq!(stats.billing_403, 1);
    assert_eq!(stats.stale_403, 1);
    assert_eq!(stats.unauthorized_401, 1);
    assert_eq!(stats.token_requests, 2);
    assert_eq!(stats.refreshes_ok, 1);
    assert_eq!(stats.refresh_failures, 1);
    assert_eq!(stats.invalid_grant, 1);
    assert_eq!(stats.injected_failures, 0);

    let shown = format!("{xai:?}");
    assert!(
        shown.contains("MockXai") && shown.contains("inference_ok: 2"),
        "{shown}"
    );
    assert!(
        !shown.contains("mock-at-") && !shown.contains("mock-rt-"),
        "{shown}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_requests() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let (access, _) = secrets(&xai.sign_in("alice", Account::Subscribed));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (client, xai, access) = (client.clone(), xai.clone(), access.clone());
        tasks.spawn(async move {
            chat(&client, &xai, Some(&access), b"{}")
                .await
                .map(|r| r.status)
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status??, StatusCode::OK);
    }
    assert_eq!(xai.stats().inference_ok, 64);
    Ok(())
}

async fn refused(addr: std::net::SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn shutdown_stops_the_server() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let addr = xai.local_addr();
    let client = client();
    let (access, _) = secrets(&xai.sign_in("alice", Account::Subscribed));
    // A pooled keep-alive connection is open too.
    let reply = chat(&client, &xai, Some(&access), b"{}").await?;
    assert_eq!(reply.status, StatusCode::OK);
    let other = xai.clone();
    xai.shutdown().await;
    assert!(refused(addr).await);
    // The pooled connection is closed as well: no answer from a stopped server.
    let result = tokio::time::timeout(
        Duration::from_secs(5),
        chat(&client, &other, Some(&access), b"{}"),
    )
    .await?;
    assert!(result.is_err());
    // Shutting down twice is fine.
    other.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let addr = xai.local_addr();
    let clone = xai.clone();
    drop(xai);
    // A clone keeps it running.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!refused(addr).await);
    drop(clone);
    for _ in 0..200 {
        if refused(addr).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("the server still accepts connections after its last handle was dropped".into())
}

#[tokio::test]
async fn methods_and_paths() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    let client = client();
    let req = Request::builder()
        .method(Method::DELETE)
        .uri(xai.discovery_uri())
        .body(Full::new(Bytes::new()))?;
    let reply = send(&client, req).await?;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));
    let req =
        Request::get(format!("{}/nothing/here", xai.base_url())).body(Full::new(Bytes::new()))?;
    assert_eq!(send(&client, req).await?.status, StatusCode::NOT_FOUND);
    Ok(())
}
