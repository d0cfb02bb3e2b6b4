//! The layer over a hyper-util client.
//!
//! A mock xAI (inference API and OAuth token endpoint) runs on 127.0.0.1, so this needs no
//! network and no account. The example signs in, lets the access token go stale, and sends a
//! chat completion through the layer: the 403 is recognised as a stale token, the credential is
//! refreshed once through `OAuth2Refresher`, and the request is retried with the same body.
//!
//! ```text
//! cargo run --example hyper_client --features mock
//! ```

use std::time::SystemTime;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use xai_oauth_recovery::body::RequestBody;
use xai_oauth_recovery::mock::{fnv1a_64, Account, MockXai};
use xai_oauth_recovery::{Credentials, OAuth2Refresher, RecoveryReport, XaiOAuthRecoveryLayer};

const CHAT: &[u8] = br#"{"model":"grok-4","messages":[{"role":"user","content":"Say hi."}]}"#;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let xai = MockXai::start().await?;
    println!("mock xAI listening on {}", xai.base_url());

    let credentials = Credentials::new(xai.sign_in("alice", Account::Subscribed));
    // Refresh tokens rotate: a real application persists every refreshed credential
    // (examples/persist.rs shows how).
    let mut refreshed = credentials.subscribe();

    // The layer hands the client its own body type, `RequestBody<B>`, which records the body
    // for one replay while it streams: that is the body type the API client is built for.
    let api: Client<HttpConnector, RequestBody<Full<Bytes>>> =
        Client::builder(TokioExecutor::new()).build_http();

    // The refresher sends its forms as plain `Full<Bytes>` through a client of its own. Use an
    // HTTPS connector (hyper-rustls, hyper-tls) in production: the refresher sends refresh
    // tokens over plain HTTP only to loopback, and only when told to.
    let token_http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let refresher = OAuth2Refresher::new(token_http, xai.token_endpoint(), "example-client")
        .allow_insecure_loopback();

    let mut client = ServiceBuilder::new()
        .layer(XaiOAuthRecoveryLayer::new(credentials.clone(), refresher))
        .service(api);

    xai.expire_access_tokens();
    println!("the access token of `alice` went stale");

    for attempt in 1..=2 {
        let request = Request::post(xai.chat_completions_uri())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(CHAT)))?;
        let response = client.ready().await?.call(request).await?;

        println!("request {attempt}: {}", response.status());
        match response.extensions().get::<RecoveryReport>() {
            Some(report) => println!("  {report}"),
            None => println!("  went through with the current token"),
        }
        let header = |name: &str| {
            let value = response.headers().get(name);
            value
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        // The mock counts and checksums the body it read: the retry's is the one sent.
        let (read, checksum) = (
            header("x-mock-request-bytes"),
            header("x-mock-request-fnv1a"),
        );
        let body = response.into_body().collect().await?.to_bytes();
        println!(
            "  sent {} bytes (fnv1a {:016x}); the server read {read} bytes (fnv1a {checksum}) and answered {} bytes",
            CHAT.len(),
            fnv1a_64(CHAT),
            body.len()
        );
    }

    while let Some(credential) = refreshed.try_recv() {
        let minutes = credential
            .expires_at()
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .map_or(0, |left| left.as_secs() / 60);
        // `Credential`'s Debug output never shows a token either.
        println!(
            "refreshed credential `{}`: new access and refresh tokens, the access token expires in {minutes} minutes",
            credential.id()
        );
    }
    let stats = xai.stats();
    println!(
        "mock xAI saw {} inference requests ({} stale), {} token requests",
        stats.inference_requests, stats.stale_403, stats.token_requests
    );
    Ok(())
}
